"""The worker's protocol decisions (mdp.worker_core), one rule per test, no sockets, fake time."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mdp.protocol import Command, Version, worker_framing
from mdp.worker_core import (
    CANCEL_WAIT,
    Action,
    Cancel,
    CloseSocket,
    Dispatch,
    OpenSocket,
    Send,
    State,
    WorkerConfig,
    WorkerCore,
)

HB = 0.1
LIVENESS = 3


def make(version: Version = Version.V02, **kw: float) -> WorkerCore:
    config = WorkerConfig(b"echo", version=version, heartbeat_interval=HB, liveness=LIVENESS, **kw)  # type: ignore[arg-type]
    return WorkerCore(config)


def broker(version: Version, command: Command, *args: bytes) -> list[bytes]:
    """Frames the broker sends a worker (no identity frame on the worker's DEALER)."""
    return worker_framing(version).command(command, *args)


def request(version: Version, client: bytes, *body: bytes) -> list[bytes]:
    return worker_framing(version).addressed(Command.REQUEST, client, list(body))


def sent(actions: list[Action]) -> list[list[bytes]]:
    return [a.frames for a in actions if isinstance(a, Send)]


def started(version: Version = Version.V02) -> WorkerCore:
    core = make(version)
    core.start(0.0)
    return core


@pytest.mark.parametrize("version", list(Version))
def test_start_opens_a_socket_and_sends_ready(version: Version) -> None:
    """RFC 7/18 "Opening and Closing": a new socket, connect, then READY with the service."""
    core = make(version)
    actions = core.start(0.0)
    assert isinstance(actions[0], OpenSocket)
    assert sent(actions) == [worker_framing(version).command(Command.READY, b"echo")]
    assert core.state is State.IDLE
    assert core.start(0.0) == []  # READY is never repeated on the same socket


def test_ready_frames_on_the_wire() -> None:
    """RFC 18 READY: "MDPW02", 0x01, service; RFC 7 READY: "", "MDPW01", 0x01, service."""
    assert sent(make(Version.V02).start(0.0)) == [[b"MDPW02", b"\x01", b"echo"]]
    assert sent(make(Version.V01).start(0.0)) == [[b"", b"MDPW01", b"\x01", b"echo"]]


def test_heartbeat_after_one_quiet_interval() -> None:
    """RFC 7/18 "Heartbeating": the worker MUST heartbeat at the agreed interval."""
    core = started()
    assert core.deadline == pytest.approx(HB)
    assert core.tick(HB * 0.9) == []
    assert sent(core.tick(HB)) == [[b"MDPW02", b"\x05"]]
    assert core.deadline == pytest.approx(2 * HB)


def test_no_heartbeat_while_other_commands_go_out() -> None:
    """RFC 7/18: peers SHOULD NOT send HEARTBEAT while also sending other commands."""
    core = started()
    (dispatch,) = core.receive(request(Version.V02, b"C", b"x"), 0.05)
    assert isinstance(dispatch, Dispatch)
    core.partial(dispatch.token, [b"p"], 0.09)
    assert core.tick(HB) == []  # the PARTIAL at 0.09 counts
    assert sent(core.tick(0.09 + HB)) == [[b"MDPW02", b"\x05"]]


def test_heartbeats_continue_while_busy() -> None:
    """Our rule (spec/mdp.md §4.2): a busy worker keeps heartbeating."""
    core = started()
    core.receive(request(Version.V02, b"C", b"x"), 0.0)
    beats = 0
    now = 0.0
    while now < 1.0:
        core.receive(broker(Version.V02, Command.HEARTBEAT), now)
        beats += len(sent(core.tick(now)))
        now = round(now + 0.01, 2)
    assert core.state is State.BUSY
    assert beats >= 9


def test_request_is_dispatched_with_client_and_body() -> None:
    """RFC 18 REQUEST: client address, empty delimiter, body frames."""
    core = started()
    (action,) = core.receive(request(Version.V02, b"client-7", b"a", b"b"), 0.01)
    assert action == Dispatch(1, b"client-7", [b"a", b"b"])
    assert core.state is State.BUSY and core.busy


@pytest.mark.parametrize("version", list(Version))
def test_final_goes_to_the_client_and_frees_the_worker(version: Version) -> None:
    """RFC 18 FINAL / RFC 7 REPLY: client address, empty frame, body."""
    core = started(version)
    (d,) = core.receive(request(version, b"C", b"x"), 0.01)
    assert isinstance(d, Dispatch)
    out = sent(core.final(d.token, [b"y"], 0.02))
    assert out == [worker_framing(version).addressed(Command.FINAL, b"C", [b"y"])]
    assert core.state is State.IDLE and not core.busy


def test_partial_is_sent_under_0_2() -> None:
    """RFC 18: zero or more PARTIALs before the FINAL."""
    core = started()
    (d,) = core.receive(request(Version.V02, b"C", b"x"), 0.0)
    assert isinstance(d, Dispatch)
    assert sent(core.partial(d.token, [b"p"], 0.0)) == [[b"MDPW02", b"\x03", b"C", b"", b"p"]]


def test_partial_is_dropped_under_0_1() -> None:
    """RFC 7 has no PARTIAL: only the FINAL leaves, as REPLY."""
    core = started(Version.V01)
    (d,) = core.receive(request(Version.V01, b"C", b"x"), 0.0)
    assert isinstance(d, Dispatch)
    assert not core.streaming
    assert core.partial(d.token, [b"p"], 0.0) == []


def test_stale_token_is_ignored() -> None:
    """A reply for a request that is not the current one never reaches the wire."""
    core = started()
    (d,) = core.receive(request(Version.V02, b"C", b"x"), 0.0)
    assert isinstance(d, Dispatch)
    assert core.partial(d.token + 1, [b"p"], 0.0) == []
    assert core.final(d.token + 1, [b"p"], 0.0) == []
    core.final(d.token, [b"done"], 0.0)
    assert core.final(d.token, [b"again"], 0.0) == []  # exactly one FINAL per REQUEST


def test_second_request_while_busy_is_dropped_and_counted() -> None:
    """RFC 7/18: a worker handles one request at a time; a broker sending another is wrong."""
    core = started()
    core.receive(request(Version.V02, b"A", b"x"), 0.0)
    assert core.receive(request(Version.V02, b"B", b"y"), 0.01) == []
    assert core.stats.unexpected_requests == 1
    assert core.current_token == 1


@pytest.mark.parametrize(
    "frames",
    [
        [],
        [b"MDPW01", b"\x05"],  # wrong version for this connection
        [b"MDPW02"],
        [b"MDPW02", b"\x09"],
        [b"MDPW02", b"\x01", b"echo"],  # READY is not something a broker sends
        [b"MDPW02", b"\x02", b"C", b"not-empty", b"x"],
        [b"MDPW02", b"\x02", b"C", b""],  # no body
    ],
)
def test_invalid_messages_are_dropped_and_do_not_count_as_heartbeats(frames: list[bytes]) -> None:
    """RFC 7/18: invalid messages are dropped; only commands act as heartbeats."""
    core = started()
    assert core.receive(frames, 0.25) == []
    assert core.stats.invalid_messages == 1
    assert isinstance(core.tick(HB * LIVENESS)[0], CloseSocket)  # liveness not refreshed


def test_broker_silence_drops_the_socket_and_reconnects_after_backoff() -> None:
    """RFC 7/18: no heartbeat within liveness intervals -> the broker is disconnected; restart
    on a new socket (READY again)."""
    core = started()
    assert core.deadline == pytest.approx(HB)  # heartbeat first
    core.tick(HB)
    core.tick(2 * HB)
    assert core.tick(3 * HB) == [CloseSocket()]
    assert core.state is State.BACKOFF
    assert core.deadline == pytest.approx(3 * HB + 0.1)
    assert core.tick(3 * HB + 0.05) == []
    actions = core.tick(3 * HB + 0.1)
    assert isinstance(actions[0], OpenSocket)
    assert sent(actions) == [[b"MDPW02", b"\x01", b"echo"]]
    assert core.state is State.IDLE
    assert core.stats.reconnects == 1


def test_any_broker_command_refreshes_liveness() -> None:
    """RFC 7/18: any received command except DISCONNECT acts as a heartbeat."""
    core = started()
    for step in range(1, 20):
        now = step * HB
        core.receive(broker(Version.V02, Command.HEARTBEAT), now - 0.01)
        assert not any(isinstance(a, CloseSocket) for a in core.tick(now))
    assert core.state is State.IDLE
    assert core.heard_from_broker


def test_backoff_doubles_and_is_capped_and_resets_on_traffic() -> None:
    """Our rule: reconnect after 0.1 s, doubling per silent attempt, capped (a few seconds)."""
    core = make(backoff_initial=0.1, backoff_max=0.4)
    now = 0.0
    core.start(now)
    waits = []
    for _ in range(5):
        while core.state is State.IDLE:  # heartbeats until the broker is declared dead
            now = core.deadline
            core.tick(now)
        waits.append(round(core.deadline - now, 6))  # `now`: the tick that dropped the socket
        now = core.deadline
        core.tick(now)
    assert waits == [0.1, 0.2, 0.4, 0.4, 0.4]
    core.receive(broker(Version.V02, Command.HEARTBEAT), now)
    while core.state is State.IDLE:
        now = core.deadline
        core.tick(now)
    assert core.deadline - now == pytest.approx(0.1)


@pytest.mark.parametrize("version", list(Version))
def test_disconnect_from_broker_closes_and_reconnects_on_a_new_socket(version: Version) -> None:
    """RFC 7/18: on DISCONNECT the worker sends nothing more, closes its socket and reconnects
    on a new socket."""
    core = started(version)
    assert core.receive(broker(version, Command.DISCONNECT), 0.01) == [CloseSocket()]
    assert core.state is State.BACKOFF
    actions = core.tick(core.deadline)
    assert isinstance(actions[0], OpenSocket)
    assert sent(actions) == [worker_framing(version).command(Command.READY, b"echo")]


def test_broker_lost_while_busy_orphans_the_request_until_the_handler_ends() -> None:
    """The reply can reach nobody; a new socket opens only after the handler has ended, so the
    connection never holds two requests."""
    core = started()
    (d,) = core.receive(request(Version.V02, b"C", b"x"), 0.0)
    assert isinstance(d, Dispatch)
    assert core.receive(broker(Version.V02, Command.DISCONNECT), 0.01) == [CloseSocket()]
    assert core.state is State.ORPHANED
    assert core.deadline == math.inf
    assert core.tick(100.0) == []
    assert core.partial(d.token, [b"p"], 100.0) == []
    assert core.final(d.token, [b"late"], 100.0) == []
    assert core.stats.replies_dropped == 1
    assert core.state is State.BACKOFF
    assert isinstance(core.tick(100.0)[0], OpenSocket)


def test_shutdown_when_idle_sends_disconnect_and_closes() -> None:
    """RFC 7/18: the worker MAY send DISCONNECT at any time."""
    core = started()
    assert core.shutdown(0.5, grace=5.0) == [Send([b"MDPW02", b"\x06"]), CloseSocket()]
    assert core.state is State.CLOSED
    assert core.deadline == math.inf
    assert core.tick(100.0) == []


def test_shutdown_during_backoff_just_stops() -> None:
    core = started()
    core.receive(broker(Version.V02, Command.DISCONNECT), 0.0)
    assert core.shutdown(0.01, grace=5.0) == []
    assert core.state is State.CLOSED


def test_shutdown_while_busy_lets_the_request_finish_then_disconnects() -> None:
    core = started()
    (d,) = core.receive(request(Version.V02, b"C", b"x"), 0.0)
    assert isinstance(d, Dispatch)
    core.shutdown(0.1, grace=5.0)
    assert core.state is State.BUSY and core.stopping
    assert core.receive(request(Version.V02, b"D", b"y"), 0.2) == []  # takes nothing new
    actions = core.final(d.token, [b"done"], 1.0)
    assert sent(actions) == [[b"MDPW02", b"\x04", b"C", b"", b"done"], [b"MDPW02", b"\x06"]]
    assert isinstance(actions[-1], CloseSocket)
    assert core.state is State.CLOSED


def test_shutdown_grace_expiry_cancels_the_handler_once() -> None:
    core = started()
    (d,) = core.receive(request(Version.V02, b"C", b"x"), 0.0)
    assert isinstance(d, Dispatch)
    core.shutdown(0.0, grace=0.25)
    core.receive(broker(Version.V02, Command.HEARTBEAT), 0.2)
    assert core.deadline <= 0.25
    assert core.tick(0.25) == [Cancel(d.token)]
    assert Cancel(d.token) not in core.tick(0.26)
    # The cancelled handler answers with its error reply: FINAL then DISCONNECT.
    assert len(sent(core.final(d.token, [b"cancelled"], 0.3))) == 2
    assert core.state is State.CLOSED


def test_a_handler_that_ignores_cancellation_is_abandoned() -> None:
    core = started()
    core.receive(request(Version.V02, b"C", b"x"), 0.0)
    actions = core.shutdown(0.0, grace=0.0)
    assert isinstance(actions[0], Cancel)
    core.receive(broker(Version.V02, Command.HEARTBEAT), CANCEL_WAIT - 0.01)
    assert CloseSocket() not in core.tick(CANCEL_WAIT - 0.01)
    assert core.deadline <= CANCEL_WAIT
    assert core.tick(CANCEL_WAIT) == [Send([b"MDPW02", b"\x06"]), CloseSocket()]
    assert core.state is State.CLOSED
    assert core.stats.replies_dropped == 1


def test_second_shutdown_can_shorten_the_grace() -> None:
    core = started()
    core.receive(request(Version.V02, b"C", b"x"), 0.0)
    core.shutdown(0.0, grace=60.0)
    assert isinstance(core.shutdown(0.05, grace=0.0)[0], Cancel)


def test_config_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        WorkerConfig(b"x", heartbeat_interval=0)
    with pytest.raises(ValueError):
        WorkerConfig(b"x", backoff_initial=5, backoff_max=1)


_events = st.lists(
    st.one_of(
        st.tuples(st.just("recv"), st.sampled_from(["hb", "req", "disc", "junk"])),
        st.tuples(st.just("tick"), st.floats(0, 0.5)),
        st.tuples(st.just("partial"), st.integers(0, 3)),
        st.tuples(st.just("final"), st.integers(0, 3)),
        st.tuples(st.just("shutdown"), st.floats(0, 1)),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(events=_events, version=st.sampled_from(list(Version)))
def test_random_event_sequences_keep_the_core_consistent(
    events: list[tuple[str, object]], version: Version
) -> None:
    """Whatever happens, in any order: nothing raises, a socket is open exactly in IDLE/BUSY,
    nothing is sent without one, a FINAL follows each Dispatch at most once."""
    core = make(version)
    now = 0.0
    socket_open = False
    finals: dict[int, int] = {}
    tokens: list[int] = []

    def apply(actions: list[Action]) -> None:
        nonlocal socket_open
        for action in actions:
            if isinstance(action, OpenSocket):
                assert not socket_open
                socket_open = True
            elif isinstance(action, CloseSocket):
                assert socket_open
                socket_open = False
            elif isinstance(action, Send):
                assert socket_open
            elif isinstance(action, Dispatch):
                tokens.append(action.token)

    frames = {
        "hb": broker(version, Command.HEARTBEAT),
        "req": request(version, b"C", b"x"),
        "disc": broker(version, Command.DISCONNECT),
        "junk": [b"junk"],
    }
    apply(core.start(now))
    for kind, arg in events:
        if kind == "recv":
            apply(core.receive(frames[str(arg)], now))
        elif kind == "tick":
            now += float(arg)  # type: ignore[arg-type]
            apply(core.tick(now))
        elif kind in ("partial", "final") and tokens:
            token = tokens[min(int(arg), len(tokens) - 1)]  # type: ignore[call-overload]
            if kind == "partial":
                apply(core.partial(token, [b"p"], now))
            else:
                out = core.final(token, [b"f"], now)
                finals[token] = finals.get(token, 0) + len(
                    [a for a in out if isinstance(a, Send) and b"f" in a.frames[-1:]]
                )
                apply(out)
        elif kind == "shutdown":
            apply(core.shutdown(now, float(arg)))  # type: ignore[arg-type]
        assert socket_open == (core.state in (State.IDLE, State.BUSY))
        assert core.busy == (core.state in (State.BUSY, State.ORPHANED))
        assert core.deadline >= 0
    assert all(count <= 1 for count in finals.values())


# --- pause/resume (a global concurrency limit, the RFC way) -------------------------------


def test_pause_unregisters_an_idle_connection_and_resume_registers_it_anew() -> None:
    core = started()
    actions = core.pause(1.0)
    assert sent(actions) == [worker_framing(Version.V02).command(Command.DISCONNECT)]
    assert isinstance(actions[-1], CloseSocket) and core.state is State.PAUSED
    assert core.deadline == math.inf  # no heartbeats, no broker timeout while paused
    assert core.tick(100.0) == []
    assert core.receive(request(Version.V02, b"C", b"x"), 100.0) == []  # no socket: nothing
    actions = core.resume(101.0)
    assert isinstance(actions[0], OpenSocket)
    assert sent(actions) == [[b"MDPW02", b"\x01", b"echo"]]
    assert core.state is State.IDLE
    assert core.tick(101.0 + HB / 2) == []  # the broker gets a full liveness period again


def test_only_an_idle_connection_pauses_and_shutdown_ends_a_paused_one() -> None:
    core = started()
    core.receive(request(Version.V02, b"C", b"x"), 0.5)
    assert core.pause(1.0) == [] and core.state is State.BUSY
    assert core.resume(1.0) == []
    idle = started()
    idle.pause(1.0)
    assert idle.shutdown(2.0, grace=5.0) == [] and idle.state is State.CLOSED
