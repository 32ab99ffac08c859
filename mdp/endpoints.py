"""ZeroMQ endpoints: whether one is well formed, and whether other machines can reach it.

libzmq accepts some endpoints it should refuse: it reads a tcp port with `atoi` and keeps the
low 16 bits, so `tcp://127.0.0.1:99999` binds or connects to port 34463 without a word. Other
mistakes it refuses only with EINVAL or EPROTONOSUPPORT, which pyzmq raises from deep inside a
connect. `check_endpoint` says what is wrong, in words, before any socket sees the endpoint.

`unauthenticated_endpoints` says which endpoints let in peers nothing authenticates unless
CURVE is on: every one but ipc:// and inproc://, loopback tcp included (every local user reaches
it). The broker refuses those without CURVE or --insecure (spec/security.md §6), and the worker
warns when it connects to one without. `is_local_endpoint` tells loopback from the network, for
the words of those messages. `default_endpoint` is where every program meets when given none.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Final

from mdp.errors import MDPError
from mdp.local_dirs import PrivateDirError, default_endpoint

__all__ = [
    "EndpointError",
    "PrivateDirError",
    "check_endpoint",
    "default_endpoint",
    "is_local_endpoint",
    "unauthenticated_endpoints",
]
# default_endpoint(): the private ipc:// endpoint every program uses when given none
# (mdp.local_dirs, spec/security.md §6.1). New programs take their default from it too.

TRANSPORTS: Final = ("tcp", "ipc", "inproc")
"""The transports MDP peers use; a few more (below) are passed on to libzmq to judge."""
_OTHER_ZMQ_TRANSPORTS: Final = frozenset({"ws", "wss", "tipc", "vmci"})
_EXAMPLES: Final = "tcp://HOST:PORT, ipc://PATH or inproc://NAME"
_MAX_PORT: Final = 65535
_LOOPBACK_NAMES: Final = frozenset({"localhost", "lo", "ip6-localhost"})
_LOCAL_TRANSPORTS: Final = frozenset({"ipc", "inproc"})


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
    host, port = _host_port(address.rsplit(";", 1)[-1])
    if port is None or not host:
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


def tcp_host(endpoint: str) -> str | None:
    """The peer host of a tcp:// endpoint (brackets of an IPv6 address removed), else None."""
    if not endpoint.startswith("tcp://"):
        return None
    host, _ = _host_port(endpoint[len("tcp://") :].rsplit(";", 1)[-1])
    return host.removeprefix("[").removesuffix("]") or None


def _host_port(address: str) -> tuple[str, str | None]:
    """A tcp address split at its last colon: (host, port); (address, None) without a colon."""
    host, colon, port = address.rpartition(":")
    return (host, port) if colon else (address, None)


# ------------------------------------------------------------------------------------------
# Exposure: who can reach an endpoint, and whom the broker lets in without CURVE


def is_local_endpoint(endpoint: str) -> bool:
    """True if binding `endpoint` cannot be reached from another machine.

    ipc:// and inproc:// are local; tcp:// is local only for a loopback address (127.0.0.0/8,
    ::1), `localhost` or the `lo` interface. Anything else, including `*`, other host names
    and other transports, counts as exposed: we do not resolve names to decide.
    """
    transport, sep, address = endpoint.partition("://")
    if not sep:
        return False
    transport = transport.lower()
    if transport in _LOCAL_TRANSPORTS:
        return True
    if transport != "tcp":
        return False
    host, _ = _host_port(address)
    if ";" in host:  # tcp://SOURCE;DEST is a connect form; for bind the host is what counts
        return False
    host = host.strip("[]").lower()
    if host in _LOOPBACK_NAMES:
        return True
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def unauthenticated_endpoints(endpoints: Iterable[str]) -> list[str]:
    """The endpoints whose peers, without CURVE, nothing authenticates: all but ipc:// (the
    file system decides who connects) and inproc:// (this process). Loopback tcp is among
    them: every user of the machine can reach it (spec/security.md §6.2)."""
    return [e for e in endpoints if e.partition("://")[0].lower() not in _LOCAL_TRANSPORTS]
