"""MDP frames as the RFCs lay them out, written for the conformance suite alone.

This module deliberately does not import the `mdp` package: the suite must be able to judge
any broker, so it carries its own reading of RFC 7 (MDP/0.1), RFC 18 (MDP/0.2) and RFC 8 (MMI).

Frames never include the ROUTER identity frame: a DEALER (or REQ) peer neither sends nor
receives it.

    client side                   REQUEST                        broker replies
      RFC 7   DEALER              "" MDPC01 service body+        "" MDPC01 service body+
      RFC 7   REQ                    MDPC01 service body+           MDPC01 service body+
      RFC 18  DEALER              MDPC02 0x01 service body+      MDPC02 0x02|0x03 service body+

    worker side                   frames                         command bytes
      RFC 7                       "" MDPW01 command args*        READY 1, REQUEST 2, REPLY 3,
                                                                 HEARTBEAT 4, DISCONNECT 5
      RFC 18                      MDPW02 command args*           READY 1, REQUEST 2, PARTIAL 3,
                                                                 FINAL 4, HEARTBEAT 5,
                                                                 DISCONNECT 6

`tests/conformance/test_dialects.py` adds the non-RFC variants our broker also accepts
(a 0.2 peer keeping the 0.1-style leading empty frame, and majortomo's client dialect).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

EMPTY: Final = b""

V01: Final = "0.1"
V02: Final = "0.2"
VERSIONS: Final = (V01, V02)

CLIENT_HEADER: Final = {V01: b"MDPC01", V02: b"MDPC02"}
WORKER_HEADER: Final = {V01: b"MDPW01", V02: b"MDPW02"}

# RFC 7, MDP/Worker and RFC 18, MDP/Worker: the command byte of each worker-protocol command.
WORKER_COMMANDS: Final[dict[str, dict[str, bytes]]] = {
    V01: {
        "READY": b"\x01",
        "REQUEST": b"\x02",
        "REPLY": b"\x03",
        "HEARTBEAT": b"\x04",
        "DISCONNECT": b"\x05",
    },
    V02: {
        "READY": b"\x01",
        "REQUEST": b"\x02",
        "PARTIAL": b"\x03",
        "FINAL": b"\x04",
        "HEARTBEAT": b"\x05",
        "DISCONNECT": b"\x06",
    },
}

# The commands a worker answers a REQUEST with, per version; the last one ends the reply.
REPLY_COMMANDS: Final = {V01: ("REPLY",), V02: ("PARTIAL", "FINAL")}
FINAL_COMMAND: Final = {V01: "REPLY", V02: "FINAL"}

# RFC 18, MDP/Client: client command bytes.
C02_REQUEST: Final = b"\x01"
C02_PARTIAL: Final = b"\x02"
C02_FINAL: Final = b"\x03"


class WireError(AssertionError):
    """The broker sent frames that do not match the layout the RFC gives for them."""


def show(frames: list[bytes]) -> str:
    """Frames for an assertion message, long ones shortened."""
    return "[" + ", ".join(repr(f if len(f) <= 40 else f[:40] + b"...") for f in frames) + "]"


# ---------------------------------------------------------------------------------------------
# Client side


@dataclass(frozen=True)
class ClientDialect:
    """How one kind of client lays out its REQUEST and expects its replies.

    `envelope`: the client itself sends and receives the leading empty frame (an RFC 7 DEALER
    client does; a REQ socket adds and strips it, so the application never sees it).
    `request_byte` is None for RFC 7, which has no command frame. `partial_byte` is None when
    the dialect has no PARTIAL. `service_in_reply`: replies carry the service frame.
    """

    name: str
    version: str
    envelope: bool
    request_byte: bytes | None
    partial_byte: bytes | None
    final_byte: bytes | None
    service_in_reply: bool = True

    @property
    def header(self) -> bytes:
        return CLIENT_HEADER[self.version]


RFC7_CLIENT: Final = ClientDialect("rfc7", V01, True, None, None, None)
RFC7_REQ_CLIENT: Final = ClientDialect("rfc7-req", V01, False, None, None, None)
RFC18_CLIENT: Final = ClientDialect("rfc18", V02, False, C02_REQUEST, C02_PARTIAL, C02_FINAL)
CLIENT_DIALECTS: Final = {V01: RFC7_CLIENT, V02: RFC18_CLIENT}


@dataclass(frozen=True)
class Reply:
    """A reply as a client received it. `final` is True for FINAL and for an RFC 7 REPLY."""

    final: bool
    service: bytes | None
    body: list[bytes]
    frames: list[bytes]

    @property
    def kind(self) -> str:
        return "FINAL" if self.final else "PARTIAL"


def client_request(dialect: ClientDialect, service: bytes, body: list[bytes]) -> list[bytes]:
    """A client REQUEST (RFC 7, MDP/Client; RFC 18, MDP/Client)."""
    head = [EMPTY] if dialect.envelope else []
    head.append(dialect.header)
    if dialect.request_byte is not None:
        head.append(dialect.request_byte)
    return [*head, service, *body]


def parse_client_reply(dialect: ClientDialect, frames: list[bytes]) -> Reply:
    """Check a broker-to-client message against the dialect's layout and take it apart."""
    i = 0
    if dialect.envelope:
        if not frames or frames[0] != EMPTY:
            raise WireError(f"{dialect.name} reply must start with an empty frame: {show(frames)}")
        i = 1
    if len(frames) <= i or frames[i] != dialect.header:
        raise WireError(f"{dialect.name} reply must carry {dialect.header!r}: {show(frames)}")
    i += 1
    final = True
    if dialect.final_byte is not None:
        if len(frames) <= i:
            raise WireError(f"{dialect.name} reply has no command frame: {show(frames)}")
        command = frames[i]
        if command == dialect.final_byte:
            final = True
        elif dialect.partial_byte is not None and command == dialect.partial_byte:
            final = False
        else:
            raise WireError(f"{dialect.name} reply has command {command!r}: {show(frames)}")
        i += 1
    service: bytes | None = None
    if dialect.service_in_reply:
        if len(frames) <= i:
            raise WireError(f"{dialect.name} reply has no service frame: {show(frames)}")
        service = frames[i]
        i += 1
    body = frames[i:]
    if not body:
        raise WireError(f"{dialect.name} reply has no body frame: {show(frames)}")
    return Reply(final, service, body, frames)


# ---------------------------------------------------------------------------------------------
# Worker side


@dataclass(frozen=True)
class WorkerDialect:
    """How a worker lays out commands: RFC 7 always has the leading empty frame, RFC 18 never
    does (the `rfc18+envelope` variant in test_dialects.py keeps it)."""

    name: str
    version: str
    envelope: bool

    @property
    def header(self) -> bytes:
        return WORKER_HEADER[self.version]

    def head(self, command: str) -> list[bytes]:
        byte = WORKER_COMMANDS[self.version][command]
        return [EMPTY, self.header, byte] if self.envelope else [self.header, byte]


RFC7_WORKER: Final = WorkerDialect("rfc7", V01, True)
RFC18_WORKER: Final = WorkerDialect("rfc18", V02, False)
WORKER_DIALECTS: Final = {V01: RFC7_WORKER, V02: RFC18_WORKER}


@dataclass(frozen=True)
class Incoming:
    """A broker-to-worker command: REQUEST (client + body), HEARTBEAT or DISCONNECT."""

    command: str
    client: bytes
    body: list[bytes]
    frames: list[bytes]
    at: float


def worker_command(dialect: WorkerDialect, command: str, *args: bytes) -> list[bytes]:
    """READY(service), HEARTBEAT(), DISCONNECT(), or any command with raw arguments."""
    return [*dialect.head(command), *args]


def worker_reply(
    dialect: WorkerDialect, command: str, client: bytes, body: list[bytes]
) -> list[bytes]:
    """REPLY/PARTIAL/FINAL: the client address, the empty delimiter, then the body."""
    return [*dialect.head(command), client, EMPTY, *body]


def parse_worker_incoming(dialect: WorkerDialect, frames: list[bytes], at: float) -> Incoming:
    """Check a broker-to-worker message against the RFC layout and take it apart.

    RFC 7/18, MDP/Worker: REQUEST is header, 0x02, one client address frame, an empty
    delimiter and at least one body frame; HEARTBEAT and DISCONNECT are exactly the header and
    the command byte. The broker sends a worker nothing else.
    """
    i = 0
    if dialect.envelope:
        if not frames or frames[0] != EMPTY:
            raise WireError(f"{dialect.name} command must start with '': {show(frames)}")
        i = 1
    if len(frames) <= i + 1 or frames[i] != dialect.header:
        raise WireError(f"{dialect.name} command must carry {dialect.header!r}: {show(frames)}")
    byte = frames[i + 1]
    names = {v: k for k, v in WORKER_COMMANDS[dialect.version].items()}
    command = names.get(byte)
    rest = frames[i + 2 :]
    if command == "REQUEST":
        if len(rest) < 3:
            raise WireError(f"REQUEST needs address, delimiter and body: {show(frames)}")
        if not rest[0]:
            raise WireError(f"REQUEST has an empty client address: {show(frames)}")
        if rest[1] != EMPTY:
            raise WireError(f"REQUEST client address must be followed by '': {show(frames)}")
        return Incoming(command, rest[0], rest[2:], frames, at)
    if command in ("HEARTBEAT", "DISCONNECT"):
        if rest:
            raise WireError(f"{command} must have no further frames: {show(frames)}")
        return Incoming(command, EMPTY, [], frames, at)
    raise WireError(f"a broker may send a worker only REQUEST/HEARTBEAT/DISCONNECT: {show(frames)}")
