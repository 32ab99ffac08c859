"""The broker's per-message role check (spec/security.md, "Roles").

ZeroMQ stamps the ZAP User-Id (the peer's public key) on every message a CURVE connection
delivers. The broker's receive loop reads it from each message's first frame and
`BrokerAuth.admit` checks the message's role against the *current* allow-lists: a client header
needs a key in the client list, a worker header a key in the worker list. So a client key
cannot register as a worker, a worker key cannot send requests, and a revoked key's
established connections stop working at the next re-read (at most `RESCAN_INTERVAL` seconds);
revoked workers are also disconnected and forgotten (`BrokerAuth.revoked_workers`).

Checking each message (rather than caching a role per ROUTER identity) is deliberate: a peer may
choose its own routing id, so an identity can move from one connection (and key) to another,
and ZAP never learns the peer's routing id. The check costs one frame object and one dict
lookup per message (spec/security.md, "Cost").
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from typing import Any, Final

import zmq

from mdp.security.allowlists import RESCAN_INTERVAL, AllowLists
from mdp.security.curve import SocketOptions
from mdp.security.keys import KeyPair, load_key_pair
from mdp.security.zap import ZAP_DOMAIN, ZapThread

__all__ = ["CLIENT_ROLE", "WORKER_ROLE", "BrokerAuth"]

log = logging.getLogger("mdp.security")
audit = logging.getLogger("mdp.audit")


CLIENT_ROLE: Final = 1
WORKER_ROLE: Final = 2
_ROLE_OF_HEADER: Final[Mapping[bytes, int]] = {
    b"MDPC01": CLIENT_ROLE,
    b"MDPC02": CLIENT_ROLE,
    b"MDPW01": WORKER_ROLE,
    b"MDPW02": WORKER_ROLE,
}
_REFUSAL_LOG_INTERVAL: Final = 1.0


class BrokerAuth:
    """CURVE for the broker: its key pair, the allow-lists, the ZAP handler, the role check.

    The server calls `socket_options()` before binding, `start(context)` before binding,
    `admit(frames, user_id)` for every message (frames include the ROUTER identity),
    `revoked_workers()` when `lists.generation` changed, `prune(...)` now and then, and
    `stop()` at the end.
    """

    def __init__(
        self,
        key_pair: KeyPair,
        lists: AllowLists,
        *,
        rescan_interval: float = RESCAN_INTERVAL,
    ) -> None:
        self.key_pair = key_pair
        self.lists = lists
        self.zap = ZapThread(lists, rescan_interval)
        self.worker_keys: dict[bytes, str] = {}
        """ROUTER identity -> key of the last worker message from it (to expel on revocation)."""
        self.refused = 0
        """Messages dropped because their key lost its place in the allow-lists or has the
        wrong role for the message."""
        self.audit_pending: list[tuple[str, bytes, bytes]] = []
        """Requests admitted since the last `flush_audit()`: (key name, identity, service)."""
        self._audit = False
        self._last_refusal_log = 0.0

    @classmethod
    def from_files(
        cls,
        secret_key_file: str | os.PathLike[str],
        clients: str | os.PathLike[str] | None,
        workers: str | os.PathLike[str] | None,
        *,
        rescan_interval: float = RESCAN_INTERVAL,
    ) -> BrokerAuth:
        """Load the broker's key pair and allow-list directories (KeyFileError if unusable)."""
        return cls(
            load_key_pair(secret_key_file),
            AllowLists(clients, workers),
            rescan_interval=rescan_interval,
        )

    def socket_options(self) -> SocketOptions:
        """Options that make a ROUTER a CURVE server whose handshakes ZAP must approve."""
        return [
            (zmq.CURVE_SERVER, 1),
            (zmq.CURVE_SECRETKEY, self.key_pair.secret),
            (zmq.CURVE_PUBLICKEY, self.key_pair.public),
            (zmq.ZAP_DOMAIN, ZAP_DOMAIN),
            # Without a ZAP handler, fail the handshake rather than let everyone in.
            (zmq.ZAP_ENFORCE_DOMAIN, 1),
        ]

    def start(self, context: zmq.Context[Any]) -> None:
        self._audit = audit.isEnabledFor(logging.INFO)
        self.zap.start(context)

    def stop(self) -> None:
        self.zap.stop()

    def admit(self, frames: list[bytes], user_id: str | None) -> bool:
        """May this message (ROUTER identity first) go to the broker core?

        A message whose key is no longer allowed, or whose header does not match the key's
        role, is refused (and counted). Anything else passes; the core then judges the MDP.
        """
        peer = self.lists.peers.get(user_id) if user_id is not None else None
        if peer is None:
            self._refuse(frames[0], user_id, "key not in the allow-lists (revoked?)")
            return False
        n = len(frames)
        if n < 3:
            return True  # no MDP message; the core drops and counts it
        index = 2 if not frames[1] else 1
        header = frames[index] if index < n else b""
        role = _ROLE_OF_HEADER.get(header)
        if role == CLIENT_ROLE:
            if not peer.client:
                self._refuse(frames[0], peer.name, "a worker key may not send requests")
                return False
            if self._audit:
                # v0.1: header service...; v0.2: header command service...
                at = index + (1 if header == b"MDPC01" else 2)
                self.audit_pending.append((peer.name, frames[0], frames[at] if at < n else b""))
        elif role == WORKER_ROLE:
            if not peer.worker:
                self._refuse(frames[0], peer.name, "a client key may not act as a worker")
                return False
            self.worker_keys[frames[0]] = peer.key
        return True

    def flush_audit(self) -> None:
        """Log the requests admitted since the last call: one record per call (the server calls
        it once per batch), so under load the audit trail costs one log record per batch."""
        pending = self.audit_pending
        if not pending:
            return
        lines = [
            f"client {name!r} (connection {identity.hex()}) for service "
            f"{service.decode('utf-8', 'replace')!r}"
            for name, identity, service in pending
        ]
        pending.clear()
        if len(lines) == 1:
            audit.info("request from %s", lines[0])
        else:
            audit.info("%d requests: from %s", len(lines), "; from ".join(lines))

    def revoked_workers(self) -> list[bytes]:
        """Identities whose last worker message came from a key no longer allowed as worker."""
        peers = self.lists.peers
        gone = [
            identity
            for identity, key in self.worker_keys.items()
            if (peer := peers.get(key)) is None or not peer.worker
        ]
        for identity in gone:
            del self.worker_keys[identity]
        return gone

    def prune(self, registered: Mapping[bytes, object]) -> None:
        """Forget identities that are no longer registered workers."""
        if len(self.worker_keys) > len(registered):
            for identity in [i for i in self.worker_keys if i not in registered]:
                del self.worker_keys[identity]

    def _refuse(self, identity: bytes, who: str | None, why: str) -> None:
        self.refused += 1
        now = time.monotonic()
        # Rate-limited: a refused peer may send thousands of messages.
        if now - self._last_refusal_log >= _REFUSAL_LOG_INTERVAL:
            self._last_refusal_log = now
            log.warning(
                "dropped a message from %s (connection %s): %s [%d refused so far]",
                who,
                identity.hex(),
                why,
                self.refused,
            )
