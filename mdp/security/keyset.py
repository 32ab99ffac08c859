"""The local key set: CURVE keys for one broker, one client and one worker, made by
`mdp-keys init` in the user's config directory and found by the programs when they are given
no key option.

Layout (`mdp.local_dirs.config_dir()`, mode 0700; spec/security.md §6.3)::

    keys/broker.key  keys/broker.key_secret      the broker's pair
    keys/client.key  keys/client.key_secret      the client's pair
    keys/worker.key  keys/worker.key_secret      the worker's pair
    allowed/clients/client.key                   the broker's client allow-list
    allowed/workers/worker.key                   the broker's worker allow-list

The rule the programs follow is one sentence: when `keys/` exists and no key option is given,
the broker, workers and clients use CURVE with these keys, on every endpoint. Each program
needs only its own files, so a worker machine can hold just `keys/worker.key_secret` and
`keys/broker.key` (copied from the broker's machine) and run with no key option either.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from mdp.errors import KeyFileError
from mdp.local_dirs import PrivateDirError, check_private_dir, config_dir, ensure_private_dir
from mdp.security.keys import (
    PUBLIC_SUFFIX,
    SECRET_SUFFIX,
    generate_key_pair,
    load_public_key,
    write_public_key,
)

__all__ = ["KeySet", "KeySetError", "find_key_set", "init_key_set"]

ROLES: Final = ("broker", "client", "worker")


class KeySetError(KeyFileError):
    """The key set exists but cannot be used as asked (a file missing, a directory not private)."""


@dataclass(frozen=True, slots=True)
class KeySet:
    """Paths of the key set in `root`; `files_for` checks the ones a program needs."""

    root: Path

    @property
    def keys(self) -> Path:
        return self.root / "keys"

    @property
    def allowed_clients(self) -> Path:
        return self.root / "allowed" / "clients"

    @property
    def allowed_workers(self) -> Path:
        return self.root / "allowed" / "workers"

    def secret(self, role: str) -> Path:
        return self.keys / f"{role}{SECRET_SUFFIX}"

    def public(self, role: str) -> Path:
        return self.keys / f"{role}{PUBLIC_SUFFIX}"

    def broker_files(self) -> tuple[Path, Path, Path]:
        """(secret key, client allow-list, worker allow-list) for the broker."""
        secret, clients, workers = self._present(
            self.secret("broker"), self.allowed_clients, self.allowed_workers
        )
        return secret, clients, workers

    def peer_files(self, role: str) -> tuple[Path, Path]:
        """(own secret key, broker's public key) for a "client" or a "worker"."""
        if role not in ("client", "worker"):
            raise ValueError(f"role must be client or worker, not {role!r}")
        secret, server = self._present(self.secret(role), self.public("broker"))
        return secret, server

    def _present(self, *paths: Path) -> tuple[Path, ...]:
        missing = [str(p.relative_to(self.root)) for p in paths if not p.exists()]
        if missing:
            raise KeySetError(
                f"the key set in {self.root} has no {', '.join(missing)}; copy it there, run "
                "`mdp-keys init` on a machine without a key set, or give the key options"
            )
        return paths


def find_key_set(env: Mapping[str, str] | None = None) -> KeySet | None:
    """The user's key set if `mdp-keys init` made one (its `keys/` exists), else None.

    KeySetError if it exists but its directory is not private to us: keys in a directory
    another user controls prove nothing.
    """
    root = config_dir(env)
    key_set = KeySet(root)
    if not os.path.lexists(key_set.keys):
        return None
    try:
        check_private_dir(root)
        check_private_dir(key_set.keys)
    except PrivateDirError as exc:
        raise KeySetError(f"not using the key set: {exc}") from None
    return key_set


def init_key_set(env: Mapping[str, str] | None = None) -> KeySet:
    """Make the key set in the user's config directory; FileExistsError if there is one.

    Secret files are mode 0600 from the start (see `generate_key_pair`), directories 0700.
    """
    root = config_dir(env)
    key_set = KeySet(root)
    if os.path.lexists(key_set.keys):
        raise FileExistsError(f"a key set already exists in {root}; not overwriting any key")
    try:
        ensure_private_dir(root)
    except PrivateDirError as exc:
        raise KeySetError(str(exc)) from None
    key_set.keys.mkdir(mode=0o700)
    for role in ROLES:
        generate_key_pair(role, key_set.keys)
    for role, allowed in (("client", key_set.allowed_clients), ("worker", key_set.allowed_workers)):
        allowed.mkdir(mode=0o700, parents=True, exist_ok=True)
        public = load_public_key(key_set.public(role))
        write_public_key(public, allowed / f"{role}{PUBLIC_SUFFIX}")
    return key_set
