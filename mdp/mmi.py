"""The Majordomo Management Interface (RFC 8) and our extensions of it: names, status codes and
the body schemas. The broker answers these services itself; `mdp.client.Client` asks them.

| service        | request body        | FINAL body                                          |
|----------------|---------------------|-----------------------------------------------------|
| `mmi.service`  | a service name      | `200` a worker is registered for it, else `404`     |
| `mmi.services` | anything (ignored)  | msgpack list of `{"name", "workers", "queued"}`;     |
|                |                     | an --insecure broker adds `{"unauthenticated": [..]}`|
| `mmi.workers`  | anything (ignored)  | msgpack list of `WorkerInfo` maps (below)            |
| any other      | anything            | `501`                                               |

`mmi.services` is our extension (spec/mdp.md §5): one msgpack frame, a list with one map per
known service (with workers or queued requests). Encoded by `encode_services` in the broker
and decoded by `decode_services` in the client, so both sides share this one definition.
Workers may not register in the `mmi.` namespace (RFC 8).

`mmi.workers` is our extension too (spec/mdp.md §5.1): one map per named worker, i.e. per
`NAME` that its connections' routing ids carry (`worker_identity`; mdp-worker sets them), with
`{"name", "services", "version", "busy", "in_flight", "connections", "last_heard"}`. A connection
whose routing id carries no name (a third-party worker) is listed on its own, named `~` + the
routing id in hex.
"""

from __future__ import annotations

import os
import re
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
    "WorkerInfo",
    "decode_services",
    "decode_workers",
    "encode_services",
    "encode_workers",
    "is_mmi",
    "split_identity",
    "worker_identity",
]

PREFIX: Final = b"mmi."
"""RFC 8: the namespace the broker answers itself."""
SERVICE: Final = b"mmi.service"
SERVICES: Final = b"mmi.services"
WORKERS: Final = b"mmi.workers"

NAME_PATTERN: Final = re.compile(r"[A-Za-z0-9._-]{1,64}")
"""A worker name (spec/mdp.md §5.1): 1 to 64 of A-Z a-z 0-9 . _ -, so `SERVICE@NAME` and the
routing id below can be split without ambiguity."""
IDENTITY_MARK: Final = b"mdpw/"
"""Routing ids of named worker connections: `mdpw/NAME/INSTANCE/RANDOM` (ASCII)."""


def worker_identity(name: str, instance: str) -> bytes:
    """The ZeroMQ routing id a named worker's connection uses: `mdpw/NAME/INSTANCE/RANDOM`.

    `instance` identifies the worker process (the same on every connection and every broker),
    so the broker can tell two processes that claim one name apart; RANDOM keeps every
    connection's id unique (a reconnecting socket must not collide with the old one)."""
    return IDENTITY_MARK + f"{name}/{instance}/{os.urandom(4).hex()}".encode()


def split_identity(identity: bytes) -> tuple[bytes, bytes] | None:
    """(NAME, INSTANCE) of a routing id made by `worker_identity`, else None."""
    if not identity.startswith(IDENTITY_MARK):
        return None
    parts = identity[len(IDENTITY_MARK) :].split(b"/")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        return None
    try:
        if not NAME_PATTERN.fullmatch(parts[0].decode("ascii")):
            return None
    except UnicodeDecodeError:
        return None
    return parts[0], parts[1]


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


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """One entry of the `mmi.workers` answer (our MMI extension, spec/mdp.md §5.1)."""

    name: str
    services: list[str]
    """Every service its connections registered, sorted (`SERVICE@NAME` included)."""
    version: str
    """The MDP dialect(s) its connections speak, e.g. `MDP/0.2` (joined with `,` if mixed)."""
    busy: bool
    """At least one of its connections holds a request."""
    in_flight: int
    """Requests its connections hold now."""
    connections: int
    """Its registered connections (one per service and concurrency slot)."""
    last_heard: float
    """Seconds since the broker last heard from it (any connection, any command)."""

    def to_map(self) -> dict[str, object]:
        """The entry as the wire (and `mdp-client workers --json`) shows it."""
        return {
            "name": self.name,
            "services": list(self.services),
            "version": self.version,
            "busy": self.busy,
            "in_flight": self.in_flight,
            "connections": self.connections,
            "last_heard": round(self.last_heard, 3),
        }


def encode_workers(workers: Iterable[WorkerInfo]) -> bytes:
    """The FINAL body of `mmi.workers`."""
    body: bytes = msgpack.packb([w.to_map() for w in workers], use_bin_type=True)
    return body


def decode_workers(reply: list[bytes]) -> list[WorkerInfo]:
    """The workers in an `mmi.workers` FINAL. Raises `MMINotImplemented` for `501` and
    `ProtocolError` for any answer that does not follow the schema."""
    if reply == [NOT_IMPLEMENTED]:
        raise MMINotImplemented("the broker does not implement mmi.workers")
    if len(reply) != 1:
        raise ProtocolError("mmi.workers answer must be one frame")
    try:
        entries = msgpack.unpackb(reply[0], raw=False)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise ProtocolError(f"mmi.workers answer is not msgpack: {exc}") from None
    if not isinstance(entries, list):
        raise ProtocolError("mmi.workers answer must be a list")
    result = []
    for entry in entries:
        if not isinstance(entry, dict):
            raise ProtocolError("mmi.workers entries must be maps")
        name, services = entry.get("name"), entry.get("services")
        version, busy = entry.get("version"), entry.get("busy")
        in_flight, connections = entry.get("in_flight"), entry.get("connections")
        last_heard = entry.get("last_heard")
        if not (
            isinstance(name, str)
            and isinstance(services, list)
            and all(isinstance(x, str) for x in services)
            and isinstance(version, str)
            and isinstance(busy, bool)
            and isinstance(in_flight, int)
            and isinstance(connections, int)
            and isinstance(last_heard, int | float)
        ):
            raise ProtocolError(f"malformed mmi.workers entry {entry!r:.100}")
        result.append(
            WorkerInfo(name, services, version, busy, in_flight, connections, float(last_heard))
        )
    return result
