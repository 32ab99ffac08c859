"""The broker's allow-lists: directories of public keys for clients and for workers.

The broker reads two allow-list directories of public keys: one for clients, one for workers
(`AllowLists`). They are re-read whenever they change, so `mdp-keys allow` and `rm` take
effect without a restart. A key's roles are where its file is: in the client list, the worker
list, or both.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import zmq
import zmq.auth
import zmq.utils.z85

from mdp.errors import KeyFileError
from mdp.security.keys import PUBLIC_SUFFIX, check_z85_key

__all__ = ["RESCAN_INTERVAL", "AllowLists", "Peer"]

log = logging.getLogger("mdp.security")

RESCAN_INTERVAL: Final = 1.0
"""Seconds between re-reads of the allow-list directories (they are also re-read on every
handshake, so a new connection always sees the current lists)."""


@dataclass(frozen=True, slots=True)
class Peer:
    """An allowed public key: its name (the file name without `.key`) and its roles."""

    key: str
    """The public key, Z85 text; also the ZAP User-Id of its connections."""
    name: str
    client: bool = False
    worker: bool = False

    def describe(self) -> str:
        roles = "+".join(r for r, ok in (("client", self.client), ("worker", self.worker)) if ok)
        return f"{roles} {self.name!r}"


Signature = tuple[tuple[str, int, int, int], ...] | None


def _directory_signature(directory: Path) -> Signature:
    """What changes when a key file is added, removed, renamed or rewritten; None if missing."""
    try:
        entries = [
            (entry.name, st.st_ino, st.st_mtime_ns, st.st_size)
            for entry in os.scandir(directory)
            if entry.name.endswith(PUBLIC_SUFFIX) and (st := entry.stat())
        ]
    except OSError:
        return None
    return tuple(sorted(entries))


class AllowLists:
    """The client and worker allow-list directories, re-read when they change.

    `peers` maps a public key (Z85 text) to its `Peer`; it is replaced as a whole on each
    re-read, so readers in other threads always see one consistent version. `generation` goes
    up by one on every change. Only one thread should call `refresh()`.
    """

    def __init__(
        self,
        clients: str | os.PathLike[str] | None,
        workers: str | os.PathLike[str] | None,
    ) -> None:
        self.clients = Path(clients) if clients is not None else None
        self.workers = Path(workers) if workers is not None else None
        for directory in (self.clients, self.workers):
            if directory is not None and not directory.is_dir():
                raise KeyFileError(f"allow-list directory {directory} does not exist")
        self.peers: dict[str, Peer] = {}
        self.generation = 0
        self._signatures: tuple[Signature, Signature] = (None, None)
        self._loaded = False
        self.refresh()

    def lookup(self, public_key: bytes) -> Peer | None:
        """The allowed peer with this (raw, 32-byte) public key, or None."""
        return self.peers.get(zmq.utils.z85.encode(public_key).decode("ascii"))

    def refresh(self) -> bool:
        """Re-read both directories if anything in them changed; True if the lists changed."""
        signatures = (self._signature(self.clients), self._signature(self.workers))
        if self._loaded and signatures == self._signatures:
            return False
        peers: dict[str, Peer] = {}
        for directory, role in ((self.clients, "client"), (self.workers, "worker")):
            if directory is None:
                continue
            if not directory.is_dir():
                log.warning(
                    "allow-list directory %s is gone: no %s key is allowed", directory, role
                )
                continue
            for key, name in self._read(directory):
                known = peers.get(key)
                if known is None:
                    known = Peer(key, name)
                peers[key] = Peer(
                    key,
                    known.name,
                    client=known.client or role == "client",
                    worker=known.worker or role == "worker",
                )
        changed = peers != self.peers
        self._signatures = signatures
        if changed or not self._loaded:
            removed = self.peers.keys() - peers.keys()
            self.peers = peers
            self.generation += 1
            log.info(
                "allow-lists %s: %d client keys, %d worker keys%s",
                "changed" if self._loaded else "loaded",
                sum(p.client for p in peers.values()),
                sum(p.worker for p in peers.values()),
                f" ({len(removed)} revoked)" if removed and self._loaded else "",
            )
        self._loaded = True
        return changed

    @staticmethod
    def _signature(directory: Path | None) -> Signature:
        return None if directory is None else _directory_signature(directory)

    @staticmethod
    def _read(directory: Path) -> list[tuple[str, str]]:
        found: list[tuple[str, str]] = []
        for path in sorted(directory.glob(f"*{PUBLIC_SUFFIX}")):
            try:
                public, secret = zmq.auth.load_certificate(path)
                key = check_z85_key(public, path, "public key")
            except (OSError, ValueError, KeyFileError) as exc:
                log.warning("ignoring allow-list file %s: %s", path, exc)
                continue
            if secret is not None:
                log.warning("allow-list file %s contains a secret key; it should not", path)
            found.append((key.decode("ascii"), path.name[: -len(PUBLIC_SUFFIX)]))
        return found
