"""MDP on the wire: headers, command bytes, and parse/build of every frame layout we speak.

Pure functions and immutable values only; no sockets, no clocks. `spec/mdp.md` describes the
same layouts in prose.

Frames here never include the ROUTER identity frame: the broker strips it before parsing and
prepends it when sending.

Dialects ("framings") we accept, detected from a peer's own frames:

client side           request                            replies (PARTIAL | FINAL)
  RFC 7  (0.1)        "" MDPC01 service body...          "" MDPC01 service body...
  RFC 18 (0.2)        MDPC02 0x01 service body...        MDPC02 0x02|0x03 service body...
  RFC 18 + envelope   "" MDPC02 0x01 service body...     "" MDPC02 0x02|0x03 service body...
  majortomo           ("") MDPC02 0x02 service body...   ("") MDPC02 0x03|0x04 body...

worker side           frames          command bytes
  RFC 7  (0.1)        "" MDPW01 cmd   READY 1 REQUEST 2 REPLY 3 HEARTBEAT 4 DISCONNECT 5
  RFC 18 (0.2)        MDPW02 cmd      READY 1 REQUEST 2 PARTIAL 3 FINAL 4 HEARTBEAT 5 DISCONNECT 6
  RFC 18 + envelope   "" MDPW02 cmd   same bytes (majortomo, the C libmdp)

A peer is answered in the framing it used. An RFC 7 REPLY is treated as FINAL.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Final

from mdp.errors import ProtocolError

__all__ = [
    "CLIENT_MAJORTOMO",
    "CLIENT_MAJORTOMO_BARE",
    "CLIENT_RFC7",
    "CLIENT_RFC18",
    "CLIENT_RFC18_ENVELOPE",
    "HEARTBEAT_INTERVAL",
    "HEARTBEAT_LIVENESS",
    "MAX_SERVICE_NAME",
    "WORKER_RFC7",
    "WORKER_RFC18",
    "WORKER_RFC18_ENVELOPE",
    "BrokerMessage",
    "ClientFraming",
    "ClientRequest",
    "Command",
    "ProtocolError",
    "Reply",
    "Version",
    "WorkerFraming",
    "WorkerMessage",
    "build_client_request",
    "client_framing",
    "parse_broker_message",
    "parse_client_reply",
    "parse_peer_message",
    "parse_worker_command",
    "validate_service_name",
    "worker_framing",
]

EMPTY: Final = b""

CLIENT_V01: Final = b"MDPC01"
WORKER_V01: Final = b"MDPW01"
CLIENT_V02: Final = b"MDPC02"
WORKER_V02: Final = b"MDPW02"

# RFC 18 client command bytes.
C02_REQUEST: Final = b"\x01"
C02_PARTIAL: Final = b"\x02"
C02_FINAL: Final = b"\x03"

# majortomo's client dialect shifts the client bytes by one (it reuses the worker numbering).
# An RFC 18 client never sends 0x02, so a REQUEST carrying it identifies this dialect.
MAJORTOMO_REQUEST: Final = b"\x02"
MAJORTOMO_PARTIAL: Final = b"\x03"
MAJORTOMO_FINAL: Final = b"\x04"

HEARTBEAT_INTERVAL: Final = 2.5
"""Default heartbeat interval, seconds, agreed by broker and workers (the zguide's value)."""
HEARTBEAT_LIVENESS: Final = 3
"""Default number of silent intervals after which a peer is presumed dead (RFC 7: 3-5)."""

DEFAULT_MAX_MSG_SIZE: Final = 16 * 1024 * 1024
"""The broker's default message limit (`mdp-broker --max-msg-size`), which mdp-client checks
requests against; here so that a client need not import the broker to know it."""
MAX_SERVICE_NAME: Final = 255
"""Longest service name (bytes) we accept; RFC 7/18 only say "printable string"."""


class Version(enum.StrEnum):
    """The protocol versions a library peer can be configured to speak."""

    V01 = "0.1"
    V02 = "0.2"


class Command(enum.IntEnum):
    """Worker-side commands, by meaning. The wire byte depends on the version."""

    READY = 1
    REQUEST = 2
    PARTIAL = 3
    FINAL = 4  # also RFC 7's REPLY
    HEARTBEAT = 5
    DISCONNECT = 6


# Wire byte -> Command, per worker header.
_W01_DECODE: Final = {
    b"\x01": Command.READY,
    b"\x02": Command.REQUEST,
    b"\x03": Command.FINAL,
    b"\x04": Command.HEARTBEAT,
    b"\x05": Command.DISCONNECT,
}
_W02_DECODE: Final = {
    b"\x01": Command.READY,
    b"\x02": Command.REQUEST,
    b"\x03": Command.PARTIAL,
    b"\x04": Command.FINAL,
    b"\x05": Command.HEARTBEAT,
    b"\x06": Command.DISCONNECT,
}
_W01_ENCODE: Final = {v: k for k, v in _W01_DECODE.items()}
_W02_ENCODE: Final = {v: k for k, v in _W02_DECODE.items()}

# Bytes allowed in a service name: printable ASCII and anything >= 0x80 (UTF-8 names).
_SERVICE_FORBIDDEN: Final = bytes(range(0x20)) + b"\x7f"


def validate_service_name(service: bytes) -> None:
    """Raise ProtocolError unless `service` is a non-empty printable name of at most 255 bytes."""
    if not service:
        raise ProtocolError("empty service name")
    if len(service) > MAX_SERVICE_NAME:
        raise ProtocolError(f"service name longer than {MAX_SERVICE_NAME} bytes")
    if service.translate(None, _SERVICE_FORBIDDEN) != service:
        raise ProtocolError("service name has control characters")


# --------------------------------------------------------------------------------------------
# Framings: how one peer lays out its frames. Prefixes are precomputed so building a message on
# the hot path is one list concatenation.


@dataclass(frozen=True, slots=True)
class ClientFraming:
    """How the broker answers one client dialect.

    `partial_head`/`final_head` are the frames before the service frame (or before the body
    when `service_in_reply` is false). `partial_head` is None when the dialect has no PARTIAL
    (RFC 7): the broker then drops PARTIALs for that client.
    """

    name: str
    version: Version
    envelope: bool
    partial_head: tuple[bytes, ...] | None
    final_head: tuple[bytes, ...]
    service_in_reply: bool

    def final(self, service: bytes, body: list[bytes]) -> list[bytes]:
        """Frames of a FINAL (RFC 7: REPLY) for this client."""
        if self.service_in_reply:
            return [*self.final_head, service, *body]
        return [*self.final_head, *body]

    def partial(self, service: bytes, body: list[bytes]) -> list[bytes] | None:
        """Frames of a PARTIAL for this client, or None if its dialect has none (RFC 7)."""
        head = self.partial_head
        if head is None:
            return None
        if self.service_in_reply:
            return [*head, service, *body]
        return [*head, *body]


CLIENT_RFC7: Final = ClientFraming("rfc7", Version.V01, True, None, (EMPTY, CLIENT_V01), True)
CLIENT_RFC18: Final = ClientFraming(
    "rfc18", Version.V02, False, (CLIENT_V02, C02_PARTIAL), (CLIENT_V02, C02_FINAL), True
)
CLIENT_RFC18_ENVELOPE: Final = ClientFraming(
    "rfc18+envelope",
    Version.V02,
    True,
    (EMPTY, CLIENT_V02, C02_PARTIAL),
    (EMPTY, CLIENT_V02, C02_FINAL),
    True,
)
CLIENT_MAJORTOMO: Final = ClientFraming(
    "majortomo",
    Version.V02,
    True,
    (EMPTY, CLIENT_V02, MAJORTOMO_PARTIAL),
    (EMPTY, CLIENT_V02, MAJORTOMO_FINAL),
    False,
)
CLIENT_MAJORTOMO_BARE: Final = ClientFraming(
    "majortomo-bare",
    Version.V02,
    False,
    (CLIENT_V02, MAJORTOMO_PARTIAL),
    (CLIENT_V02, MAJORTOMO_FINAL),
    False,
)


@dataclass(frozen=True, slots=True)
class WorkerFraming:
    """How the broker (or a worker) lays out worker-protocol commands for one dialect."""

    name: str
    version: Version
    envelope: bool
    header: bytes
    heads: dict[Command, tuple[bytes, ...]] = field(init=False, repr=False, compare=False)
    """`head()` of every command of this version, computed once (the broker's hot path)."""

    def __post_init__(self) -> None:
        table = _W01_ENCODE if self.version is Version.V01 else _W02_ENCODE
        prefix = (EMPTY, self.header) if self.envelope else (self.header,)
        object.__setattr__(self, "heads", {c: (*prefix, byte) for c, byte in table.items()})

    def head(self, command: Command) -> tuple[bytes, ...]:
        """The frames before a command's arguments: [""], header, command byte."""
        head = self.heads.get(command)
        if head is None:
            raise ProtocolError(f"{command.name} does not exist in MDP/{self.version}")
        return head

    def command(self, command: Command, *args: bytes) -> list[bytes]:
        """A complete command: READY(service), HEARTBEAT(), DISCONNECT()."""
        return [*self.head(command), *args]

    def addressed(self, command: Command, client: bytes, body: list[bytes]) -> list[bytes]:
        """REQUEST/PARTIAL/FINAL: head, client address, empty delimiter, body."""
        return [*self.head(command), client, EMPTY, *body]


WORKER_RFC7: Final = WorkerFraming("rfc7", Version.V01, True, WORKER_V01)
WORKER_RFC18: Final = WorkerFraming("rfc18", Version.V02, False, WORKER_V02)
WORKER_RFC18_ENVELOPE: Final = WorkerFraming("rfc18+envelope", Version.V02, True, WORKER_V02)


def client_framing(version: Version | str) -> ClientFraming:
    """The framing our own client library uses for `version` (RFC 7 or bare RFC 18)."""
    return CLIENT_RFC7 if Version(version) is Version.V01 else CLIENT_RFC18


def worker_framing(version: Version | str) -> WorkerFraming:
    """The framing our own worker library uses for `version` (RFC 7 or bare RFC 18)."""
    return WORKER_RFC7 if Version(version) is Version.V01 else WORKER_RFC18


# --------------------------------------------------------------------------------------------
# Broker side: what a peer sent us.


@dataclass(slots=True)
class ClientRequest:
    """A client's REQUEST: the service it names and the opaque body frames (at least one)."""

    framing: ClientFraming
    service: bytes
    body: list[bytes]


@dataclass(slots=True)
class WorkerMessage:
    """A worker's command. `service` is set for READY; `client` and `body` for PARTIAL/FINAL."""

    framing: WorkerFraming
    command: Command
    service: bytes = b""
    client: bytes = b""
    body: list[bytes] | None = None


def parse_peer_message(frames: list[bytes]) -> ClientRequest | WorkerMessage:
    """Parse what a client or worker sent to the broker (identity frame already removed).

    Raises ProtocolError for anything that is not a valid MDP client REQUEST or worker command
    in one of the dialects listed in the module docstring.
    """
    n = len(frames)
    if n < 2:
        raise ProtocolError("too few frames")
    envelope = not frames[0]
    i = 1 if envelope else 0
    header = frames[i]
    if header == CLIENT_V02:
        return _parse_client_v02(frames, i + 1, envelope)
    if header == WORKER_V02:
        return _parse_worker(
            frames, i + 1, WORKER_RFC18_ENVELOPE if envelope else WORKER_RFC18, _W02_DECODE
        )
    if envelope:
        if header == CLIENT_V01:
            return _parse_client_v01(frames)
        if header == WORKER_V01:
            return _parse_worker(frames, 2, WORKER_RFC7, _W01_DECODE)
    raise ProtocolError("unknown protocol header")


def _parse_client_v01(frames: list[bytes]) -> ClientRequest:
    # RFC 7: "" MDPC01 service body+ (4 or more frames).
    if len(frames) < 4:
        raise ProtocolError("REQUEST needs a service and a body")
    service = frames[2]
    validate_service_name(service)
    return ClientRequest(CLIENT_RFC7, service, frames[3:])


def _parse_client_v02(frames: list[bytes], i: int, envelope: bool) -> ClientRequest:
    # RFC 18: MDPC02 0x01 service body+; see the module docstring for the variants.
    if len(frames) < i + 3:
        raise ProtocolError("REQUEST needs a command, a service and a body")
    command = frames[i]
    if command == C02_REQUEST:
        framing = CLIENT_RFC18_ENVELOPE if envelope else CLIENT_RFC18
    elif command == MAJORTOMO_REQUEST:
        framing = CLIENT_MAJORTOMO if envelope else CLIENT_MAJORTOMO_BARE
    else:
        raise ProtocolError("a client may only send REQUEST")
    service = frames[i + 1]
    validate_service_name(service)
    return ClientRequest(framing, service, frames[i + 2 :])


def _parse_worker(
    frames: list[bytes], i: int, framing: WorkerFraming, decode: dict[bytes, Command]
) -> WorkerMessage:
    n = len(frames)
    if n <= i:
        raise ProtocolError("missing command frame")
    command = decode.get(frames[i])
    if command is None:
        raise ProtocolError("unknown worker command")
    rest = n - i - 1
    if command is Command.PARTIAL or command is Command.FINAL:
        # client address, empty delimiter, body+
        if rest < 3:
            raise ProtocolError(f"{command.name} needs a client address, a delimiter and a body")
        client = frames[i + 1]
        if not client or frames[i + 2]:
            raise ProtocolError(f"{command.name} has a bad client address envelope")
        return WorkerMessage(framing, command, client=client, body=frames[i + 3 :])
    if command is Command.READY:
        if rest != 1:
            raise ProtocolError("READY takes exactly one service frame")
        service = frames[i + 1]
        validate_service_name(service)
        return WorkerMessage(framing, command, service=service)
    if command is Command.HEARTBEAT or command is Command.DISCONNECT:
        if rest != 0:
            raise ProtocolError(f"{command.name} takes no frames")
        return WorkerMessage(framing, command)
    raise ProtocolError("a worker may not send REQUEST")


# --------------------------------------------------------------------------------------------
# Client side (our client library).


def build_client_request(version: Version | str, service: bytes, body: list[bytes]) -> list[bytes]:
    """REQUEST frames for a DEALER socket, in RFC 7 or bare RFC 18 framing."""
    validate_service_name(service)
    if not body:
        raise ProtocolError("a REQUEST needs at least one body frame")
    if Version(version) is Version.V01:
        return [EMPTY, CLIENT_V01, service, *body]
    return [CLIENT_V02, C02_REQUEST, service, *body]


@dataclass(slots=True)
class Reply:
    """A PARTIAL or FINAL as the client sees it. RFC 7 replies are always final."""

    final: bool
    service: bytes
    body: list[bytes]


def parse_client_reply(version: Version | str, frames: list[bytes]) -> Reply:
    """Parse a broker reply received on a client DEALER socket."""
    if Version(version) is Version.V01:
        if len(frames) < 4 or frames[0] or frames[1] != CLIENT_V01:
            raise ProtocolError("not an MDP/0.1 REPLY")
        return Reply(True, frames[2], frames[3:])
    if len(frames) < 4 or frames[0] != CLIENT_V02:
        raise ProtocolError("not an MDP/0.2 PARTIAL/FINAL")
    if frames[1] == C02_FINAL:
        return Reply(True, frames[2], frames[3:])
    if frames[1] == C02_PARTIAL:
        return Reply(False, frames[2], frames[3:])
    raise ProtocolError("unknown client command from broker")


# --------------------------------------------------------------------------------------------
# Worker side (our worker library).


@dataclass(slots=True)
class BrokerMessage:
    """What the broker sent a worker: REQUEST (client + body), HEARTBEAT or DISCONNECT."""

    command: Command
    client: bytes = b""
    body: list[bytes] | None = None


def parse_broker_message(version: Version | str, frames: list[bytes]) -> BrokerMessage:
    """Parse a broker command received on a worker DEALER socket (bare framing for 0.2)."""
    framing = worker_framing(version)
    i = 2 if framing.envelope else 1
    if len(frames) <= i or frames[i - 1] != framing.header or (framing.envelope and frames[0]):
        raise ProtocolError("unknown protocol header")
    decode = _W01_DECODE if framing.version is Version.V01 else _W02_DECODE
    command = decode.get(frames[i])
    rest = len(frames) - i - 1
    if command is Command.REQUEST:
        if rest < 3 or frames[i + 2]:
            raise ProtocolError("REQUEST needs a client address, a delimiter and a body")
        return BrokerMessage(command, frames[i + 1], frames[i + 3 :])
    if command is Command.HEARTBEAT or command is Command.DISCONNECT:
        return BrokerMessage(command)
    raise ProtocolError("unexpected command from broker")


def parse_worker_command(frames: list[bytes]) -> WorkerMessage:
    """Parse frames as a worker command only (used by tests and tools)."""
    message = parse_peer_message(frames)
    if not isinstance(message, WorkerMessage):
        raise ProtocolError("not a worker command")
    return message
