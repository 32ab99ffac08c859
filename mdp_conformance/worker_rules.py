"""Worker rules: the suite plays the broker (a ROUTER) for a worker it starts for each case.

Timing allowances: the worker is told an interval (`{heartbeat_ms}`); a gap between two of
its commands may be up to twice that plus 250 ms of scheduling slack for a loaded machine (a
worker that checks its timers once per interval sends at most one interval late).
"""

from __future__ import annotations

import itertools
import time

from mdp_conformance.rules import SHOULD, Skip, rule
from mdp_conformance.wire import EMPTY, WORKER_COMMANDS, WORKER_HEADER, show
from mdp_conformance.worker import REPLY_TIMEOUT, SLEEP_FRAME, BrokerSide, Message

# A client address as a ZeroMQ ROUTER generates it (0x00 and four bytes), and one that is
# plainly binary: a worker must hand both back untouched.
ROUTER_ADDRESS = b"\x00\x80\x00\x00\x29"
BINARY_ADDRESS = b"\x00\xff\x00\r\n\x01client\x00"


def allowed_gap(side: BrokerSide) -> float:
    return 2 * side.heartbeat + 0.25


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


def from_worker(side: BrokerSide, identity: bytes, since: int) -> list[Message]:
    return [m for m in side.messages[since:] if m.identity == identity]


@rule("worker", "RFC 7/18 Opening and Closing; MDP/Worker READY")
def ready_first_with_the_service(side: BrokerSide, version: str) -> None:
    """RFC 7/18, Opening and Closing a Connection: the worker opens the connection by sending
    READY for its service, and sends it first (HEARTBEAT is valid only after READY). Its frames
    are exactly RFC 7's "" MDPW01 0x01 service or RFC 18's MDPW02 0x01 service."""
    ready = side.ready()
    first = next(m for m in side.messages if m.identity == ready.identity)
    assert first is ready, f"the worker's first command was {first}, not READY"
    head = [EMPTY] if version == "0.1" else []
    expected = [*head, WORKER_HEADER[version], WORKER_COMMANDS[version]["READY"], side.service]
    assert ready.frames == expected, f"READY is {ready}, expected {show(expected)}"


@rule("worker", "RFC 7/18 Heartbeating")
def heartbeats_while_idle(side: BrokerSide, version: str) -> None:
    """RFC 7/18, Heartbeating: both broker and worker MUST send heartbeats at regular and
    agreed-upon intervals. An idle worker sends HEARTBEAT at the interval it was told: over
    liveness + 2 intervals no gap exceeds twice the interval (plus 250 ms of slack)."""
    ready = side.registered()
    side.pump_for((side.liveness + 2) * side.heartbeat)
    mine = from_worker(side, ready.identity, side.messages.index(ready))
    others = [m for m in mine if m.command not in ("READY", "HEARTBEAT")]
    assert not others, f"an idle worker sent {others[0]}"
    times = [m.at for m in mine] + [time.monotonic()]
    worst = max(gaps(times))
    assert worst <= allowed_gap(side), (
        f"an idle worker was silent for {worst:.2f}s (interval {side.heartbeat:.2f}s, allowed "
        f"{allowed_gap(side):.2f}s); heartbeats: {len(mine) - 1}"
    )


@rule("worker", "RFC 7/18 Heartbeating")
def heartbeats_while_busy(side: BrokerSide, version: str) -> None:
    """RFC 7/18, Heartbeating: both sides MUST heartbeat at regular intervals, and any command
    but DISCONNECT counts as one. A worker handling a request that takes liveness + 3
    intervals keeps sending HEARTBEAT (or PARTIALs): no gap exceeds twice the interval (plus
    250 ms). Otherwise its broker rightly declares it dead in the middle of the request."""
    ready = side.registered()
    busy = max(0.6, (side.liveness + 3) * side.heartbeat)
    ms = str(round(busy * 1000)).encode()
    sent = time.monotonic()
    mark = side.request(ready.identity, ROUTER_ADDRESS, SLEEP_FRAME, ms)
    final = side.final(mark, ready.identity, timeout=busy + 10 * side.heartbeat + 5)
    took = final.at - sent
    if took < busy / 2:
        raise Skip(
            f"the worker answered a {busy:.2f}s sleep request after {took:.2f}s: it does not "
            f"implement the {SLEEP_FRAME.decode()} convention, so it was never busy"
        )
    times = [sent] + [m.at for m in from_worker(side, ready.identity, mark) if m.at <= final.at]
    worst = max(gaps(times))
    assert worst <= allowed_gap(side), (
        f"no command from the worker for {worst:.2f}s while it handled a request "
        f"(interval {side.heartbeat:.2f}s, allowed {allowed_gap(side):.2f}s): a broker "
        f"declares it disconnected after {side.liveness * side.heartbeat:.2f}s"
    )


@rule("worker", "RFC 7/18 Request and Reply Processing")
def reply_envelope_is_byte_exact(side: BrokerSide, version: str) -> None:
    """RFC 7/18, Request and Reply Processing: REPLY/FINAL contain precisely one client
    address frame, followed by an empty frame. The worker returns the address of the REQUEST
    byte for byte - also a binary one starting with 0x00, as a ROUTER generates them - and
    the empty delimiter, then the (echoed) body."""
    ready = side.registered()
    framing = side.framings[ready.identity]
    final_command = "REPLY" if framing.version == "0.1" else "FINAL"
    for address in (ROUTER_ADDRESS, BINARY_ADDRESS):
        mark = side.request(ready.identity, address, b"ping")
        final = side.final(mark, ready.identity)
        expected = [*framing.head(final_command), address, EMPTY, b"ping"]
        assert final.frames == expected, f"the reply is {final}, expected {show(expected)}"


@rule("worker", "RFC 7/18 MDP/Worker: REQUEST and REPLY/FINAL bodies")
def multi_frame_bodies_are_echoed_intact(side: BrokerSide, version: str) -> None:
    """RFC 7/18, MDP/Worker: request and reply bodies are frames of opaque binary. A request
    of several frames (one empty, one of all 256 byte values) reaches the echo service intact:
    its FINAL body is the same frames, in order."""
    ready = side.registered()
    body = [b"one", EMPTY, bytes(range(256)), b"\x00", b"last"]
    mark = side.request(ready.identity, ROUTER_ADDRESS, *body)
    final = side.final(mark, ready.identity)
    assert final.args[2:] == body, f"sent body {show(body)}, the reply is {final}"


@rule("worker", "RFC 18 MDP/Worker; RFC 7 Architecture")
def one_final_and_nothing_after_it(side: BrokerSide, version: str) -> None:
    """RFC 18, MDP/Worker: a worker answers a REQUEST with any number of PARTIALs and then
    exactly one FINAL; RFC 7: exactly one REPLY. After it the worker sends no further reply
    for that request (HEARTBEATs are fine) - checked over the quiet window, for a quick and a
    busy request."""
    ready = side.registered()
    window = max(0.3, 3 * side.heartbeat)
    for body in ([b"quick"], [SLEEP_FRAME, str(round(2 * side.heartbeat * 1000)).encode()]):
        mark = side.request(ready.identity, ROUTER_ADDRESS, *body)
        final = side.final(mark, ready.identity, timeout=REPLY_TIMEOUT + 2 * side.heartbeat)
        side.pump_for(window)
        replies = side.replies(mark, ready.identity)
        at = next(i for i, m in enumerate(replies) if m is final)
        after = replies[at + 1 :]
        assert not after, f"after its {final.command} the worker sent {after[0]}"
        before = [m for m in replies[:at] if m.command != "PARTIAL"]
        assert not before, f"before its {final.command} the worker sent {before[0]}"


@rule("worker", "RFC 7/18 Opening and Closing a Connection")
def disconnect_is_honoured(side: BrokerSide, version: str) -> None:
    """RFC 7/18, Opening and Closing a Connection: when the worker receives DISCONNECT it must
    send no further commands to the broker; it MUST close its socket and reconnect on a new
    socket. After DISCONNECT nothing more comes on the old connection (a HEARTBEAT already
    in flight, within half an interval, is tolerated) and a new READY arrives."""
    ready = side.registered()
    side.pump_for(side.heartbeat)
    mark = len(side.messages)
    side.send(ready.identity, "DISCONNECT")
    sent = time.monotonic()
    side.framings.pop(ready.identity, None)  # the suite stops heartbeating that connection
    again = side.ready(timeout=REPLY_TIMEOUT, since=mark)
    side.pump_for(max(0.3, 3 * side.heartbeat))
    late = [
        m
        for m in side.messages[mark:]
        if m.identity == ready.identity
        and m is not again
        and not (m.command == "HEARTBEAT" and m.at - sent <= side.heartbeat / 2)
    ]
    if again.identity == ready.identity:
        late = [m for m in late if m.at < again.at]
    assert not late, f"after DISCONNECT the old connection sent {late[0]}"


@rule("worker", "RFC 7/18 Heartbeating; RFC 6 (PPP)", level=SHOULD)
def reconnects_after_broker_silence(side: BrokerSide, version: str) -> None:
    """RFC 7/18, Heartbeating: a peer MUST consider the other disconnected when no heartbeat
    arrives within some multiple of the interval, and a worker that detects a dead broker
    SHOULD restart a new conversation (Paranoid Pirate). The suite stops heartbeating; within
    interval x liveness, plus one interval and 2 s of reconnect back-off, a new READY comes
    (on a new connection)."""
    side.registered()
    side.pump_for(side.heartbeat)
    mark = len(side.messages)
    side.silent = True
    silent_since = time.monotonic()
    limit = side.heartbeat * (side.liveness + 1) + 2.0
    again = side.ready(timeout=limit + 1.0, since=mark)
    waited = again.at - silent_since
    assert waited <= limit, f"the worker re-sent READY only after {waited:.2f}s of silence"


MALFORMED = {
    # frames after the worker header and the REQUEST command byte
    "no-delimiter": [ROUTER_ADDRESS, b"body"],
    "no-body": [ROUTER_ADDRESS, EMPTY],
    "no-address": [],
    "delimiter-not-empty": [ROUTER_ADDRESS, b"junk", b"body"],
}


@rule("worker", "RFC 7/18 MDP/Worker REQUEST; Opening and Closing")
def survives_malformed_requests(side: BrokerSide, version: str) -> None:
    """RFC 7/18, MDP/Worker: a REQUEST is the header, 0x02, one client address, an empty frame
    and a body; invalid messages are dropped (Opening and Closing). REQUESTs missing the
    delimiter, the body or the address, an unknown command byte and a wrong header do not
    crash the worker, and it then answers a valid request (if it re-registered meanwhile, on
    its new connection)."""
    ready = side.registered()
    framing = side.framings[ready.identity]
    request_head = framing.head("REQUEST")
    for args in MALFORMED.values():
        side.send_raw(ready.identity, [*request_head, *args])
    side.send_raw(ready.identity, [*request_head[:-1], b"\x0f", b"x"])
    side.send_raw(ready.identity, [*request_head[:-2], b"MDPX99", b"\x02", ROUTER_ADDRESS])
    side.pump_for(max(0.3, 3 * side.heartbeat))
    assert side.process.alive(), "the worker exited after malformed REQUESTs"
    current = [m for m in side.messages if m.command == "READY"][-1]
    mark = side.request(current.identity, ROUTER_ADDRESS, b"still-there")
    final = side.final(mark, current.identity)
    assert final.args[2:] == [b"still-there"], f"the valid request got {final}"
