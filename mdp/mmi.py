"""The Majordomo Management Interface (RFC 8) and our extensions of it: names, status codes and
the body schemas. The broker answers these services itself; `mdp.client.Client` asks them.

| service        | request body        | FINAL body                                          |
|----------------|---------------------|-----------------------------------------------------|
| `mmi.service`  | a service name      | `200` a worker is registered for it, else `404`     |
| `mmi.services` | anything (ignored)  | msgpack list of `{"name", "workers", "queued"}`;     |
|                |                     | an --insecure broker adds `{"unauthenticated": [..]}`|
| any other      | anything            | `501`                                               |

`mmi.services` is our extension (spec/mdp.md §5): one msgpack frame, a list with one map per
known service (with workers or queued requests). Encoded by `encode_services` in the broker
and decoded by `decode_services` in the client, so both sides share this one definition.
Workers may not register in the `mmi.` namespace (RFC 8).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

import msgpack

from mdp.errors import ProtocolError

__all__ = [
    "FOUND",
    "NOT_FOUND",
    "NOT_IMPLEMENTED",
    "PREFIX",
    "SERVICE",
    "SERVICES",
    "WORKERS",
    "MMINotImplemented",
    "ServiceInfo",
    "ServiceList",
    "decode_services",
    "encode_services",
    "is_mmi",
]

PREFIX: Final = b"mmi."
"""RFC 8: the namespace the broker answers itself."""
SERVICE: Final = b"mmi.service"
SERVICES: Final = b"mmi.services"
WORKERS: Final = b"mmi.workers"
"""The fleet's extension (a msgpack list of one map per worker); its schema joins this module
when the broker answers it."""

FOUND: Final = b"200"
NOT_FOUND: Final = b"404"
NOT_IMPLEMENTED: Final = b"501"


class MMINotImplemented(ProtocolError):
    """The broker answered "501": it does not implement this `mmi.*` service (RFC 8)."""


def is_mmi(service: bytes | str) -> bool:
    """True for a name in the broker's own `mmi.` namespace."""
    if isinstance(service, str):
        return service.startswith(PREFIX.decode())
    return service.startswith(PREFIX)


@dataclass(frozen=True, slots=True)
class ServiceInfo:
    """One entry of the `mmi.services` answer (our MMI extension, see spec/mdp.md)."""

    name: str
    workers: int
    """Workers registered for the service."""
    queued: int
    """Requests waiting in the broker for a worker."""

    def to_map(self) -> dict[str, str | int]:
        """The entry as the wire (and `mdp-client services --json`) shows it."""
        return {"name": self.name, "workers": self.workers, "queued": self.queued}


class ServiceList(list[ServiceInfo]):
    """The `mmi.services` answer: the services, and `unauthenticated`, the endpoints on which
    the broker accepts peers nothing authenticates (started with --insecure; else empty)."""

    unauthenticated: tuple[str, ...] = ()


def encode_services(
    services: Iterable[ServiceInfo], unauthenticated: Sequence[str] = ()
) -> list[bytes]:
    """The FINAL body of `mmi.services`: the list, and for a broker that lets unauthenticated
    peers in, a second frame saying on which endpoints (spec/security.md §6.2)."""
    body: list[bytes] = [msgpack.packb([s.to_map() for s in services], use_bin_type=True)]
    if unauthenticated:
        body.append(msgpack.packb({"unauthenticated": list(unauthenticated)}))
    return body


def decode_services(reply: list[bytes]) -> ServiceList:
    """The services in an `mmi.services` FINAL (and its `unauthenticated` endpoints). Raises
    `MMINotImplemented` for `501` and `ProtocolError` for any answer that does not follow the
    schema."""
    if reply == [NOT_IMPLEMENTED]:
        raise MMINotImplemented("the broker does not implement mmi.services")
    if len(reply) not in (1, 2):
        raise ProtocolError("mmi.services answer must be one frame, or two")
    try:
        entries = msgpack.unpackb(reply[0], raw=False)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise ProtocolError(f"mmi.services answer is not msgpack: {exc}") from None
    if not isinstance(entries, list):
        raise ProtocolError("mmi.services answer must be a list")
    result = ServiceList()
    if len(reply) == 2:
        result.unauthenticated = _decode_unauthenticated(reply[1])
    for entry in entries:
        if not isinstance(entry, dict):
            raise ProtocolError("mmi.services entries must be maps")
        name, workers, queued = entry.get("name"), entry.get("workers"), entry.get("queued")
        if not (isinstance(name, str) and isinstance(workers, int) and isinstance(queued, int)):
            raise ProtocolError(f"malformed mmi.services entry {entry!r:.100}")
        result.append(ServiceInfo(name, workers, queued))
    return result


def _decode_unauthenticated(frame: bytes) -> tuple[str, ...]:
    try:
        facts = msgpack.unpackb(frame, raw=False)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise ProtocolError(f"mmi.services second frame is not msgpack: {exc}") from None
    endpoints = facts.get("unauthenticated") if isinstance(facts, dict) else None
    if not isinstance(endpoints, list) or not all(isinstance(e, str) for e in endpoints):
        raise ProtocolError(f"malformed mmi.services second frame {facts!r:.100}")
    return tuple(endpoints)
