"""`mdp-keys`: make CURVE key pairs and manage the broker's allow-list directories.

Keys are ZeroMQ certificate files (`zmq.auth.create_certificates` format): `NAME.key` is the
public half, safe to copy anywhere; `NAME.key_secret` holds the pair and stays with its owner
(mode 0600). See spec/security.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from mdp import __version__
from mdp.security import (
    PUBLIC_SUFFIX,
    KeyFileError,
    generate_key_pair,
    load_public_key,
    valid_key_name,
    write_public_key,
)
from mdp.security.keyset import ROLES as KEY_SET_ROLES
from mdp.security.keyset import KeySetError, init_key_set

CONTEXT = {"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "MDP_KEYS"}
ROLES = ("client", "worker")


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, "-V", "--version", prog_name="mdp-keys")
def main() -> None:
    """Make CURVE key pairs and manage the broker's allow-lists.

    \b
    The short way, for a broker, workers and clients of one user:
      mdp-keys init
      mdp-broker --bind tcp://127.0.0.1:5555    # finds the key set: CURVE on
    \b
    By hand, for several machines and people (README, "Running across machines"):
      mdp-keys generate broker --dir keys
      mdp-keys generate alice --dir keys
      mdp-keys generate worker1 --dir keys
      mdp-keys allow client keys/alice.key --dir allowed/clients
      mdp-keys allow worker keys/worker1.key --dir allowed/workers
    """


@main.command()
def init() -> None:
    """Make the local key set: a key pair each for the broker, a client and a worker, and the
    broker's allow-lists with the client and worker keys, in $XDG_CONFIG_HOME/mdp (or
    ~/.config/mdp; mode 0700, secret keys 0600).

    mdp-broker, mdp-worker and mdp-client then use CURVE with these keys whenever they are
    given no key option, on every endpoint, so a broker may listen on tcp:// without
    --insecure. A worker or client on another machine needs keys/worker.key_secret (or
    keys/client.key_secret) and keys/broker.key copied into the same place there. An existing
    key set is never overwritten.
    """
    try:
        key_set = init_key_set()
    except FileExistsError as exc:
        raise click.ClickException(str(exc)) from None
    except (KeySetError, OSError) as exc:
        raise click.ClickException(f"cannot make the key set: {exc}") from None
    click.echo(f"made the key set in {key_set.root}:")
    for role in KEY_SET_ROLES:
        click.echo(f"  {key_set.secret(role).relative_to(key_set.root)} (secret, mode 0600)")
    for allowed in (key_set.allowed_clients, key_set.allowed_workers):
        click.echo(f"  {allowed.relative_to(key_set.root)}/ (allow-list)")
    click.echo(
        "mdp-broker, mdp-worker and mdp-client use it when given no key option, e.g.\n"
        "  mdp-broker --bind tcp://127.0.0.1:5555\n"
        "  mdp-worker --service shell --broker tcp://127.0.0.1:5555\n"
        "  mdp-client -a tcp://127.0.0.1:5555 -f examples/batch.json"
    )


@main.command()
@click.argument("name")
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False),
    default=".",
    show_default=True,
    help="Where to write the files (created if missing).",
)
def generate(name: str, directory: str) -> None:
    """Write a new key pair: NAME.key (public) and NAME.key_secret (secret, mode 0600).

    Give NAME.key to whoever must recognise this peer (the broker's allow-list, or, for the
    broker's own key, every client and worker). Never copy NAME.key_secret off its machine.
    Existing files are never overwritten.
    """
    if not valid_key_name(name):
        raise click.BadParameter(
            "use letters, digits, '_', '.', '-' (not starting with '.')", param_hint="NAME"
        )
    try:
        public, secret = generate_key_pair(name, directory)
    except FileExistsError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"cannot write the key pair: {exc}") from None
    click.echo(f"public key: {public}")
    click.echo(f"secret key: {secret} (keep it private)")


@main.command()
@click.argument("role", type=click.Choice(ROLES))
@click.argument("key_file", metavar="FILE", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False),
    required=True,
    help="The broker's allow-list directory for ROLE (its --allow-clients or --allow-workers).",
)
@click.option("--name", default=None, help="Name for the key (default: FILE's name).")
def allow(role: str, key_file: str, directory: str, name: str | None) -> None:
    """Let the owner of FILE connect as ROLE (client or worker).

    Copies the public key of FILE (a NAME.key; a NAME.key_secret also works, but only its
    public half is copied) into DIR as NAME.key. A running broker picks it up within a second.
    To revoke, delete DIR/NAME.key (or run `mdp-keys revoke`).
    """
    try:
        public = load_public_key(key_file)
    except KeyFileError as exc:
        raise click.ClickException(str(exc)) from None
    if name is None:
        name = Path(key_file).name
        for suffix in (".key_secret", PUBLIC_SUFFIX):
            name = name.removesuffix(suffix)
    if not valid_key_name(name):
        raise click.BadParameter(f"{name!r} is not a valid key name", param_hint="--name")
    target = Path(directory) / f"{name}{PUBLIC_SUFFIX}"
    if target.exists():
        try:
            existing = load_public_key(target)
        except KeyFileError:
            existing = None
        if existing != public:
            raise click.ClickException(
                f"{target} already holds a different key; revoke it first or choose --name"
            )
    try:
        write_public_key(public, target)
    except OSError as exc:
        raise click.ClickException(f"cannot write {target}: {exc}") from None
    click.echo(f"allowed {role} {name!r}: {target}")


@main.command()
@click.argument("role", type=click.Choice(ROLES))
@click.argument("name")
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, exists=True),
    required=True,
    help="The broker's allow-list directory for ROLE.",
)
def revoke(role: str, name: str, directory: str) -> None:
    """Remove NAME from an allow-list directory. A running broker refuses the key within a
    second: new connections fail the handshake, established ones have their messages dropped,
    and a worker using it is disconnected."""
    name = name.removesuffix(PUBLIC_SUFFIX)
    if not valid_key_name(name):
        raise click.BadParameter(f"{name!r} is not a valid key name", param_hint="NAME")
    target = Path(directory) / f"{name}{PUBLIC_SUFFIX}"
    try:
        target.unlink()
    except FileNotFoundError:
        raise click.ClickException(f"{target} does not exist") from None
    click.echo(f"revoked {role} {name!r}")


@main.command(name="list")
@click.argument("directory", metavar="DIR", type=click.Path(file_okay=False, exists=True))
def list_keys(directory: str) -> None:
    """Print the name and public key of every NAME.key in DIR."""
    for path in sorted(Path(directory).glob(f"*{PUBLIC_SUFFIX}")):
        try:
            key = load_public_key(path).decode("ascii")
        except KeyFileError as exc:
            click.echo(f"mdp-keys: {exc}", err=True)
            continue
        click.echo(f"{path.name.removesuffix(PUBLIC_SUFFIX)}\t{key}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
