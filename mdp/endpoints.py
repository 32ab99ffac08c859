"""ZeroMQ endpoint checks for the three programs and the libraries.

libzmq accepts some endpoints it should refuse: it reads a tcp port with `atoi` and keeps the
low 16 bits, so `tcp://127.0.0.1:99999` binds or connects to port 34463 without a word. Other
mistakes it refuses only with EINVAL or EPROTONOSUPPORT, which pyzmq raises from deep inside a
connect. `check_endpoint` says what is wrong, in words, before any socket sees the endpoint.
"""

from __future__ import annotations

from typing import Final

from mdp.errors import MDPError

__all__ = ["EndpointError", "check_endpoint"]

TRANSPORTS: Final = ("tcp", "ipc", "inproc")
"""The transports MDP peers use; a few more (below) are passed on to libzmq to judge."""
_OTHER_ZMQ_TRANSPORTS: Final = frozenset({"ws", "wss", "tipc", "vmci"})
_EXAMPLES: Final = "tcp://HOST:PORT, ipc://PATH or inproc://NAME"
_MAX_PORT: Final = 65535


class EndpointError(MDPError, ValueError):
    """An endpoint that cannot be bound or connected to, with the reason."""


def check_endpoint(endpoint: str, *, bind: bool = False) -> str:
    """Return `endpoint` if it is well formed, else raise EndpointError saying why.

    For binding (`bind=True`) a tcp port may be `*` or 0 (any free port) and the host `*`
    (every interface); to connect, both must be concrete. Host names are not resolved here.
    """
    transport, sep, address = endpoint.partition("://")
    if not sep:
        raise EndpointError(f"{endpoint!r} is not a ZeroMQ endpoint like {_EXAMPLES}")
    transport = transport.lower()
    if transport in _OTHER_ZMQ_TRANSPORTS:
        return endpoint
    if transport not in TRANSPORTS:
        raise EndpointError(f"{endpoint!r}: unknown transport {transport!r} (use {_EXAMPLES})")
    if not address:
        raise EndpointError(f"{endpoint!r}: the address after {transport}:// is missing")
    if transport == "tcp":
        _check_tcp(endpoint, address, bind)
    return endpoint


def _check_tcp(endpoint: str, address: str, bind: bool) -> None:
    # tcp://SOURCE;HOST:PORT binds the outgoing connection to SOURCE; HOST:PORT is the peer.
    destination = address.rsplit(";", 1)[-1]
    host, colon, port = destination.rpartition(":")
    if not colon or not host:
        raise EndpointError(f"{endpoint!r}: a tcp endpoint needs HOST:PORT")
    if bind and port == "*":
        return
    if not port.isdigit():
        wanted = "a number or *" if bind else "a number"
        raise EndpointError(f"{endpoint!r}: the port {port!r} is not {wanted}")
    number = int(port)
    lowest = 0 if bind else 1
    if not lowest <= number <= _MAX_PORT:
        raise EndpointError(f"{endpoint!r}: the port {number} is outside {lowest}-{_MAX_PORT}")
    if not bind and host == "*":
        raise EndpointError(f"{endpoint!r}: '*' is for binding; connect to a host name or address")
