"""The ZAP handler (RFC 27): which CURVE handshakes the broker accepts.

`zap_reply` refuses a key in neither allow-list with status 400, so an unknown key never gets
past the handshake. An accepted connection gets the peer's public key (Z85 text) as its ZAP
User-Id, which ZeroMQ then stamps on every message of that connection (`mdp.security.roles`
reads it). `ZapThread` runs the handler next to the broker's poll loop and re-reads the
allow-lists between requests.
"""

from __future__ import annotations

import contextlib
import logging
import math
import socket
import threading
import time
from typing import Any, Final

import zmq
import zmq.utils.z85

from mdp.errors import SecurityError
from mdp.security.allowlists import RESCAN_INTERVAL, AllowLists

__all__ = ["ZAP_DOMAIN", "ZAP_ENDPOINT", "ZAP_VERSION", "ZapThread", "safe_reply", "zap_reply"]

log = logging.getLogger("mdp.security")

ZAP_ENDPOINT: Final = "inproc://zeromq.zap.01"  # RFC 27: the handler binds this endpoint
ZAP_DOMAIN: Final = b"mdp"
ZAP_VERSION: Final = b"1.0"


def zap_reply(request: list[bytes], lists: AllowLists) -> list[bytes]:
    """The handler's answer to one ZAP request (envelope already stripped by a REP socket).

    Request: version, request id, domain, address, identity, mechanism, credentials...
    Reply:   version, request id, status code, status text, user id, metadata.
    Only CURVE in our domain with a key from either allow-list gets "200"; the user id is the
    key in Z85 text, which the broker later finds on every message of the connection.
    """
    if len(request) < 6:
        log.warning("malformed ZAP request (%d frames)", len(request))
        return [
            ZAP_VERSION,
            request[1] if len(request) > 1 else b"",
            b"500",
            b"malformed",
            b"",
            b"",
        ]
    version, request_id, domain, address, _identity, mechanism = request[:6]
    credentials = request[6:]

    def refuse(code: bytes, text: str) -> list[bytes]:
        log.warning("refused connection from %s: %s", address.decode("ascii", "replace"), text)
        return [ZAP_VERSION, request_id, code, text.encode(), b"", b""]

    if version != ZAP_VERSION:
        return refuse(b"500", "unsupported ZAP version")  # RFC 27: "500" internal error
    if domain != ZAP_DOMAIN:
        return refuse(b"400", f"unknown ZAP domain {domain!r}")
    if mechanism != b"CURVE" or len(credentials) != 1 or len(credentials[0]) != 32:
        return refuse(b"400", f"mechanism {mechanism.decode('ascii', 'replace')} is not allowed")
    lists.refresh()  # a handshake always sees the current lists
    peer = lists.lookup(credentials[0])
    if peer is None:
        key = zmq.utils.z85.encode(credentials[0]).decode("ascii")
        return refuse(b"400", f"unknown key {key}")
    log.info("accepted %s from %s", peer.describe(), address.decode("ascii", "replace"))
    return [ZAP_VERSION, request_id, b"200", b"OK", peer.key.encode("ascii"), b""]


def safe_reply(request: list[bytes], lists: AllowLists) -> list[bytes]:
    """`zap_reply`, but a bug in it refuses the handshake (500) instead of killing the
    handler: a REP socket must answer every request, and no answer would stall every
    handshake."""
    try:
        return zap_reply(request, lists)
    except Exception:
        log.exception("ZAP handler failed; refusing the connection")
        request_id = request[1] if len(request) > 1 else b""
        return [ZAP_VERSION, request_id, b"500", b"internal error", b"", b""]


class ZapThread:
    """The ZAP handler in a daemon thread, for the broker's (non-asyncio) poll loop.

    `start()` binds the handler on `context` before returning, so any CURVE socket created
    afterwards is checked. Between requests it re-reads the allow-lists every
    `RESCAN_INTERVAL` seconds, which is how revocation reaches established connections.
    """

    def __init__(self, lists: AllowLists, rescan_interval: float = RESCAN_INTERVAL) -> None:
        self.lists = lists
        self.rescan_interval = rescan_interval
        self._socket: zmq.Socket[bytes] | None = None
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_w.setblocking(False)
        self._stopping = False

    def start(self, context: zmq.Context[Any]) -> None:
        sock: zmq.Socket[bytes] = context.socket(zmq.REP)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.bind(ZAP_ENDPOINT)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise SecurityError(f"cannot start the ZAP handler: {exc}") from None
        self._socket = sock
        self._thread = threading.Thread(target=self._run, name="mdp-zap", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stopping = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        if self._thread is not None:
            self._thread.join(timeout)
        self._wake_r.close()
        self._wake_w.close()

    def _run(self) -> None:
        sock = self._socket
        assert sock is not None
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._wake_r.fileno(), zmq.POLLIN)
        next_scan = time.monotonic() + self.rescan_interval
        try:
            while not self._stopping:
                timeout = max(0.0, next_scan - time.monotonic())
                events = dict(poller.poll(math.ceil(timeout * 1000)))
                if events.get(sock):
                    sock.send_multipart(safe_reply(sock.recv_multipart(), self.lists))
                if time.monotonic() >= next_scan:
                    self._rescan()
                    next_scan = time.monotonic() + self.rescan_interval
        finally:
            sock.close(linger=0)
            self._socket = None

    def _rescan(self) -> None:
        try:
            self.lists.refresh()
        except OSError as exc:  # a directory that vanished mid-read: next scan will tell
            log.warning("cannot re-read the allow-lists: %s", exc)
