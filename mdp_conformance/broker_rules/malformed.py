"""Invalid messages are dropped, and the broker keeps serving.

RFC 7/18, MDP/Worker, Opening and Closing a Connection: "The broker SHOULD respond to invalid
messages by dropping them and treating that peer as invalid." RFC 7/18 give every command's
exact frames; anything else is invalid. Every test sends the invalid frames, checks within the
quiet window that nothing was forwarded to anyone, and then that a normal request still
round-trips. "Treating that peer as invalid" is left open by the RFCs, so a sender using a
worker header may get a DISCONNECT (in any framing) or nothing; a client sender gets nothing.
"""

from __future__ import annotations

from collections.abc import Callable

from mdp_conformance.harness import Harness, Peer, unique
from mdp_conformance.rules import rule
from mdp_conformance.wire import (
    C02_REQUEST,
    CLIENT_HEADER,
    EMPTY,
    REPLY_COMMANDS,
    WORKER_COMMANDS,
    WORKER_DIALECTS,
    WORKER_HEADER,
    show,
    worker_command,
)

# A DISCONNECT in any framing a broker might answer an invalid worker-headered peer with.
DISCONNECTS = (
    [EMPTY, WORKER_HEADER["0.1"], WORKER_COMMANDS["0.1"]["DISCONNECT"]],
    [WORKER_HEADER["0.2"], WORKER_COMMANDS["0.2"]["DISCONNECT"]],
    [EMPTY, WORKER_HEADER["0.2"], WORKER_COMMANDS["0.2"]["DISCONNECT"]],
)


def client_head(version: str) -> list[bytes]:
    """The frames before the service frame in a valid client REQUEST."""
    return (
        [EMPTY, CLIENT_HEADER["0.1"]] if version == "0.1" else [CLIENT_HEADER["0.2"], C02_REQUEST]
    )


def worker_head(version: str, command: str) -> list[bytes]:
    return worker_command(WORKER_DIALECTS[version], command)


def assert_only_disconnects(sender: Peer) -> None:
    others = [frames for frames in sender.raw if frames not in DISCONNECTS]
    assert not others, f"the broker answered an invalid message with {show(others[0])}"


def check_client_messages_dropped(
    peers: Harness, version: str, service: bytes, messages: list[list[bytes]]
) -> None:
    """Send `messages` from a raw DEALER while a worker serves `service`: the sender gets no
    answer, the worker no REQUEST; then a valid request for `service` round-trips."""
    worker = peers.worker(version, service)
    sender = peers.raw()
    for frames in messages:
        sender.send(frames)
    sender.expect_no_raw()
    assert not worker.inbox, f"an invalid request was forwarded: {show(worker.inbox[0].frames)}"
    client = peers.client(version)
    client.request(service, b"valid")
    request = worker.expect_request()
    assert request.body == [b"valid"], f"an invalid request was forwarded: {request.body}"
    worker.final(request.client, b"still-serving")
    assert client.recv().body == [b"still-serving"]


def check_worker_messages_dropped(
    peers: Harness, version: str, service: bytes, messages: list[list[bytes]]
) -> None:
    """Send `messages` (which may claim READY for `service`) from a raw DEALER: the sender is
    not registered (a request for `service` waits instead of reaching it) and gets nothing but
    perhaps DISCONNECT; then a real worker registers and serves the waiting request."""
    sender = peers.raw()
    for frames in messages:
        sender.send(frames)
    client = peers.client(version)
    client.request(service, b"valid")
    peers.pump_for(peers.target.quiet)
    assert_only_disconnects(sender)
    assert not client.replies, f"the client got {show(client.replies[0].frames)}"
    worker = peers.worker(version, service)
    request = worker.expect_request()
    assert request.body == [b"valid"]
    worker.final(request.client, b"still-serving")
    assert client.recv().body == [b"still-serving"]


# --- client side


@rule("broker", "RFC 7/18 MDP/Client; Opening and Closing")
def client_request_with_a_wrong_header_is_dropped(peers: Harness, version: str) -> None:
    """RFC 7/18, MDP/Client: frame 1 (RFC 7, after the empty frame 0) / frame 0 (RFC 18) is
    exactly "MDPC01" / "MDPC02". Requests with another header, or (RFC 7) a non-empty frame
    0, are invalid and dropped."""
    service = unique("badhdr")
    if version == "0.1":
        messages = [
            [EMPTY, b"MDPC00", service, b"x"],
            [EMPTY, b"mdpc01", service, b"x"],
            [b"junk", CLIENT_HEADER["0.1"], service, b"x"],
        ]
    else:
        messages = [
            [b"MDPC00", C02_REQUEST, service, b"x"],
            [b"MDPC0", C02_REQUEST, service, b"x"],
            [b"MDPC022", C02_REQUEST, service, b"x"],
        ]
    check_client_messages_dropped(peers, version, service, messages)


@rule("broker", "RFC 18 MDP/Client; Opening and Closing", versions=("0.2",))
def client_request_with_an_unknown_command_is_dropped(peers: Harness, version: str) -> None:
    """RFC 18, MDP/Client: a client sends only REQUEST (0x01). Unknown command frames (0x00,
    0x07, 0xFF, a two-byte frame) are invalid and dropped. (RFC 7 clients have no command
    frame.)"""
    service = unique("badcmd")
    header = CLIENT_HEADER["0.2"]
    messages = [
        [header, command, service, b"x"] for command in (b"\x00", b"\x07", b"\xff", b"\x01\x01")
    ]
    check_client_messages_dropped(peers, version, service, messages)


@rule("broker", "RFC 7/18 MDP/Client; Opening and Closing")
def client_request_with_missing_frames_is_dropped(peers: Harness, version: str) -> None:
    """RFC 7/18, MDP/Client: a REQUEST has 4 or more frames. Shorter ones (a lone empty frame,
    a header alone, a header and command with no service) are invalid and dropped."""
    head = client_head(version)
    messages = [[EMPTY], head[:1], head]
    check_client_messages_dropped(peers, version, unique("short"), messages)


@rule("broker", "RFC 7/18 MDP/Client; Opening and Closing")
def client_request_with_an_empty_service_name_is_dropped(peers: Harness, version: str) -> None:
    """RFC 7/18, MDP/Client: the service name is a printable string that matches a worker's
    READY; an empty service frame names no service, so the request is invalid and dropped."""
    messages = [[*client_head(version), EMPTY, b"x"]]
    check_client_messages_dropped(peers, version, unique("noname"), messages)


@rule("broker", "RFC 7/18 MDP/Client; Opening and Closing")
def client_request_without_a_body_is_dropped(peers: Harness, version: str) -> None:
    """RFC 7/18, MDP/Client: "Frames 3+: Request body" - a REQUEST of 4 or more frames has at
    least one body frame. A REQUEST that stops after the service frame is invalid and is not
    forwarded to the service's worker."""
    service = unique("nobody")
    check_client_messages_dropped(peers, version, service, [[*client_head(version), service]])


# --- worker side


@rule("broker", "RFC 7/18 MDP/Worker; Opening and Closing")
def worker_command_with_a_wrong_header_is_dropped(peers: Harness, version: str) -> None:
    """RFC 7/18, MDP/Worker: every command carries "MDPW01" after an empty frame (RFC 7) or
    "MDPW02" first (RFC 18). A READY with another header (or, for RFC 7, without the empty
    frame or with a non-empty one) is invalid: dropped, nothing registered."""
    service = unique("badhdr")
    ready = WORKER_COMMANDS[version]["READY"]
    if version == "0.1":
        header = WORKER_HEADER["0.1"]
        messages = [
            [EMPTY, b"MDPW00", ready, service],
            [header, ready, service],
            [b"junk", header, ready, service],
        ]
    else:
        messages = [[b"MDPW00", ready, service], [b"MDPW0", ready, service]]
    check_worker_messages_dropped(peers, version, service, messages)


@rule("broker", "RFC 7/18 MDP/Worker; Opening and Closing")
def worker_command_with_an_unknown_command_is_dropped(peers: Harness, version: str) -> None:
    """RFC 7/18, MDP/Worker: the command bytes are 0x01-0x05 (RFC 7) / 0x01-0x06 (RFC 18).
    Other command frames (0x00, the next unused byte, 0xFF, a two-byte frame) are invalid and
    dropped; a worker sending them with a service frame is not registered."""
    service = unique("badcmd")
    header = worker_head(version, "READY")[:-1]
    unused = b"\x06" if version == "0.1" else b"\x07"
    messages = [[*header, command, service] for command in (b"\x00", unused, b"\xff", b"\x01\x01")]
    check_worker_messages_dropped(peers, version, service, messages)


@rule("broker", "RFC 7/18 MDP/Worker; Opening and Closing")
def worker_command_with_missing_frames_is_dropped(peers: Harness, version: str) -> None:
    """RFC 7/18, MDP/Worker: READY is 4 (RFC 7) / 3 (RFC 18) frames, ending with the service
    name. A header without a command frame, or a READY without its service frame, is invalid
    and dropped."""
    ready = worker_head(version, "READY")
    messages = [ready[:-1], ready]
    check_worker_messages_dropped(peers, version, unique("short"), messages)


@rule("broker", "RFC 7/18 MDP/Worker; Opening and Closing")
def worker_ready_with_an_empty_service_name_is_dropped(peers: Harness, version: str) -> None:
    """RFC 7/18, MDP/Worker: READY carries the service name (a printable string); an empty
    service frame names no service, so the READY is invalid and dropped."""
    messages = [[*worker_head(version, "READY"), EMPTY]]
    check_worker_messages_dropped(peers, version, unique("noname"), messages)


BAD_ENVELOPES: dict[str, Callable[[bytes], list[bytes]]] = {
    # frames after the command byte, given the client address
    "delimiter-not-empty": lambda client: [client, b"junk", b"body"],
    "no-delimiter": lambda client: [client, b"body"],
    "no-body": lambda client: [client, EMPTY],
    "empty-address": lambda client: [EMPTY, EMPTY, b"body"],
    "address-stack": lambda client: [client, client, EMPTY, b"body"],
}


def envelope_variants(version: str) -> list[dict[str, str]]:
    return [
        {"reply_command": command, "defect": defect}
        for command in REPLY_COMMANDS[version]
        for defect in BAD_ENVELOPES
    ]


@rule("broker", "RFC 7/18 Request and Reply Processing", variants=envelope_variants)
def worker_reply_with_a_bad_envelope_is_dropped(
    peers: Harness, version: str, reply_command: str, defect: str
) -> None:
    """RFC 7/18, Request and Reply Processing: a REPLY / PARTIAL / FINAL carries precisely
    one client address frame, followed by an empty frame, followed by at least one body frame
    (6+ / 5+ frames). A reply from the worker holding the request that breaks this is invalid:
    the client gets nothing. The worker may be disconnected for it or not; both accepted."""
    service = unique("envelope")
    worker = peers.worker(version, service)
    client = peers.client(version)
    client.request(service, b"q")
    request = worker.expect_request()
    worker.send([*worker_head(version, reply_command), *BAD_ENVELOPES[defect](request.client)])
    client.expect_silence()
    others = [i for i in worker.inbox if i.command != "DISCONNECT"]
    assert not others, f"the worker got {show(others[0].frames)}"
    peers.round_trip(unique("after-envelope"), version, version)
