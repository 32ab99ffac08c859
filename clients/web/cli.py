"""`mdp-web`: the web console and REST API, an MDP client of the broker (spec/api.md)."""

from __future__ import annotations

import socket
import sys
from pathlib import Path
from typing import Final

import click

from clients.web.security import Guard, generate_token, is_loopback_host
from mdp import __version__, logs
from mdp.cli_options import (
    curve_options,
    curve_socket_options,
    default_endpoint_or_fail,
    endpoint_callback,
    key_set_peer_options,
)
from mdp.client import Client
from mdp.metrics import MetricsBindError, parse_bind

__all__ = ["main"]

PROG: Final = "mdp-web"
CONTEXT = {
    "help_option_names": ["-h", "--help"],
    "auto_envvar_prefix": "MDP_WEB",
    "max_content_width": 100,
}
EPILOG = """\b
Exit codes:
  0   stopped by SIGINT/SIGTERM
  1   the address cannot be bound
  2   usage error (also: a non-loopback --bind without TLS and without --insecure)

\b
Examples:
  mdp-web                                   # http://127.0.0.1:8080, prints the sign-in URL
  mdp-web --broker tcp://127.0.0.1:5555 --bind 127.0.0.1:8080 --token-file ~/.config/mdp/web-token
  mdp-web --broker tcp://b1:5555 --broker tcp://b2:5555 --broker tcp://b3:5555
  mdp-web --bind 0.0.0.0:8443 --tls-cert cert.pem --tls-key key.pem --allow-host ops.example.org
"""


@click.command(context_settings=CONTEXT, epilog=EPILOG)
@click.option(
    "-b",
    "--broker",
    "brokers",
    multiple=True,
    show_envvar=True,
    callback=endpoint_callback(),
    metavar="ENDPOINT",
    help="A broker to reach; repeat it to give every broker of a scaled-out deployment "
    '(README "Scaling out"): a request that goes silent for --timeout is sent again to the '
    "next one, and later requests start at the one that answered last. Default: the same as "
    "mdp-client's, this user's broker on this machine (ipc://$XDG_RUNTIME_DIR/mdp/broker.sock). "
    "With no key option but a key set from `mdp-keys init`, its client key is used.",
)
@click.option(
    "--bind",
    default="127.0.0.1:8080",
    show_default=True,
    show_envvar=True,
    metavar="HOST:PORT",
    help="Where the console listens. Port 0 picks a free one. Not loopback: needs TLS "
    "(--tls-cert/--tls-key, or --behind-tls-proxy) or --insecure.",
)
@click.option(
    "--token-file",
    type=click.Path(dir_okay=False, exists=True),
    show_envvar=True,
    help="Read the access token from FILE (first line). Default: a new random token at each "
    "start, printed once as a sign-in URL.",
)
@click.option(
    "--allow-host",
    "allow_hosts",
    multiple=True,
    show_envvar=True,
    metavar="NAME",
    help="A host name users type to reach the console (the Host header). Loopback names and "
    "the --bind address are always allowed. Repeat for several.",
)
@click.option("--tls-cert", type=click.Path(dir_okay=False, exists=True), show_envvar=True,
              help="Serve https with this certificate (PEM).")  # fmt: skip
@click.option("--tls-key", type=click.Path(dir_okay=False, exists=True), show_envvar=True,
              help="The private key of --tls-cert (PEM).")  # fmt: skip
@click.option(
    "--behind-tls-proxy",
    is_flag=True,
    show_envvar=True,
    help="A TLS proxy in front serves the console as https: allow a non-loopback --bind and "
    "mark the session cookie Secure.",
)
@click.option(
    "--insecure",
    is_flag=True,
    show_envvar=True,
    help="Allow a non-loopback --bind over plain http. The token and the session then cross "
    "the network in clear text.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=5.0,
    show_default=True,
    show_envvar=True,
    help="Seconds a request to the broker may stay silent before it is sent again (to the next "
    "--broker, if several); a long poll's own wait comes on top.",
)
@curve_options("client")
@click.option(
    "--log-level",
    type=click.Choice(logs.LEVELS, case_sensitive=False),
    default="INFO",
    show_default=True,
    show_envvar=True,
)
@click.version_option(__version__, "-V", "--version", prog_name=PROG)
def main(
    brokers: tuple[str, ...],
    bind: str,
    token_file: str | None,
    allow_hosts: tuple[str, ...],
    tls_cert: str | None,
    tls_key: str | None,
    behind_tls_proxy: bool,
    insecure: bool,
    timeout: float,
    curve_secret_key: str | None,
    curve_server_key: str | None,
    log_level: str,
) -> None:
    """Serve the MDP web console and its REST API (/api/v1, OpenAPI at /api/v1/docs).

    The console is an MDP client: services and workers come from the broker's management
    interface (MMI), jobs from the job services of mdp-jobs. It keeps no state of its own.

    Every request needs the token, even on loopback: the API takes `Authorization: Bearer
    TOKEN`; the pages exchange it for a session cookie at /login?token=TOKEN (the URL printed
    at start). Prometheus metrics are at /metrics (Bearer token too).

    Every option can also be set from an MDP_WEB_* environment variable (shown in brackets).
    """
    logs.configure(log_level, False)
    try:
        host, port = parse_bind(bind)
    except MetricsBindError as exc:
        raise click.BadParameter(str(exc), param_hint="'--bind'") from None
    if (tls_cert is None) != (tls_key is None):
        raise click.UsageError("--tls-cert and --tls-key go together")
    tls = tls_cert is not None
    if not is_loopback_host(host) and not (tls or behind_tls_proxy or insecure):
        raise click.UsageError(
            f"refusing to serve {bind} over plain http: other machines could read the token "
            "and the session. Use --tls-cert/--tls-key, or --behind-tls-proxy when a TLS proxy "
            "is in front, or --insecure to do it anyway."
        )
    token, generated = _token(token_file)
    options = curve_socket_options(curve_secret_key, curve_server_key)
    if not options:
        options, _ = key_set_peer_options("client")
    if not brokers:
        brokers = (default_endpoint_or_fail(),)
    try:
        sock = _listen(host, port)
    except OSError as exc:
        click.echo(f"{PROG}: cannot listen on {bind}: {exc.strerror or exc}", err=True)
        sys.exit(1)
    scheme = "https" if tls or behind_tls_proxy else "http"
    shown_host = f"[{host}]" if ":" in host else host
    if host in ("0.0.0.0", "::"):
        shown_host = "127.0.0.1"
    url = f"{scheme}://{shown_host}:{sock.getsockname()[1]}/"
    if generated:
        click.echo(f"{PROG}: open {url}login?token={token}", err=True)
    else:
        click.echo(f"{PROG}: open {url} (token from {token_file})", err=True)
    _serve(
        sock,
        list(dict.fromkeys(brokers)),
        Guard.for_bind(token, host, allow_hosts, secure=tls or behind_tls_proxy),
        timeout,
        options,
        tls_cert,
        tls_key,
        log_level,
    )


def _token(token_file: str | None) -> tuple[str, bool]:
    if token_file is None:
        return generate_token(), True
    try:
        lines = Path(token_file).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise click.BadParameter(
            f"cannot read {token_file}: {exc}", param_hint="'--token-file'"
        ) from None
    token = lines[0].strip() if lines else ""
    if len(token) < 16:
        raise click.BadParameter(
            f"{token_file}: the token must be at least 16 characters on the first line",
            param_hint="'--token-file'",
        )
    return token, False


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    # Listen now: connections that come before the server runs wait in the backlog, so the
    # printed URL works at once.
    sock.listen(128)
    return sock


def _serve(
    sock: socket.socket,
    brokers: list[str],
    guard: Guard,
    timeout: float,
    options: list[tuple[int, int | bytes]],
    tls_cert: str | None,
    tls_key: str | None,
    log_level: str,
) -> None:
    import uvicorn

    from clients.web.app import create_app
    from clients.web.backend import Backend

    backend = Backend(Client(brokers, timeout=timeout, socket_options=options))
    app = create_app(backend, guard)
    config = uvicorn.Config(
        app,
        log_level=log_level.lower(),
        access_log=log_level.upper() == "DEBUG",
        ssl_certfile=tls_cert,
        ssl_keyfile=tls_key,
        timeout_graceful_shutdown=1,
        server_header=False,
    )
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        backend.close()
    sys.exit(0)
