"""mdp.fastzmq's batch receive/send: the compiled module and the pure-Python path behave alike.

Every test runs on both paths (the compiled one skips where the module is not installed) over
real ROUTER/DEALER sockets on inproc, so what is checked is what libzmq delivers.
"""

from __future__ import annotations

import errno
import os
import shutil
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from mdp import fastzmq

pytestmark = pytest.mark.timeout(30)

COMPILED, WHY = fastzmq.compiled()


@pytest.fixture(params=["compiled", "python"])
def path(request: pytest.FixtureRequest) -> str:
    if request.param == "compiled" and not COMPILED:
        pytest.skip(f"the compiled module is not in use: {WHY}")
    return str(request.param)


@pytest.fixture
def pair() -> Iterator[tuple[zmq.Socket[bytes], zmq.Socket[bytes]]]:
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    router.bind("inproc://fastzmq")
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.ROUTING_ID, b"peer")
    dealer.connect("inproc://fastzmq")
    yield router, dealer
    dealer.close(linger=0)
    router.close(linger=0)
    ctx.term()


def io_for(sock: zmq.Socket[bytes], path: str) -> fastzmq.BatchIO:
    return fastzmq.batch_io(sock, compiled=path == "compiled")


Message = tuple[bytes, list[Any]]


def drain_once(
    io: fastzmq.BatchIO, most: int = 100, limit: int = 1 << 30
) -> tuple[int, list[Message], list[tuple[bytes, int]]]:
    """One drain: (its return value, the messages and the oversized reports it handed over)."""
    got: list[Message] = []
    oversized: list[tuple[bytes, int]] = []
    count = io.drain(
        most,
        limit,
        lambda first, rest: got.append((first, rest)),
        lambda first, size: oversized.append((first, size)),
        False,
    )
    return count, got, oversized


def receive(
    io: fastzmq.BatchIO, count: int, limit: int = 1 << 30
) -> tuple[list[Message], list[tuple[bytes, int]]]:
    """Drains until `count` messages (or oversized reports) arrived; bounded by a deadline."""
    got: list[Message] = []
    oversized: list[tuple[bytes, int]] = []
    deadline = time.monotonic() + 5
    while len(got) + len(oversized) < count:
        assert time.monotonic() < deadline, f"only {len(got)} of {count} messages arrived"
        n, messages, reports = drain_once(io, limit=limit)
        assert n == len(messages) + len(reports)
        got += messages
        oversized += reports
    return got, oversized


def test_nothing_waiting_is_an_empty_drain(pair, path):
    router, _ = pair
    assert drain_once(io_for(router, path)) == (0, [], [])


def test_messages_arrive_whole_in_order_with_small_frames_as_bytes(pair, path):
    router, dealer = pair
    for i in range(5):
        dealer.send_multipart([b"MDPC02", b"\x01", b"echo", str(i).encode()])
    got, oversized = receive(io_for(router, path), 5)
    assert oversized == []
    assert [identity for identity, _ in got] == [b"peer"] * 5
    assert [frames for _, frames in got] == [
        [b"MDPC02", b"\x01", b"echo", str(i).encode()] for i in range(5)
    ]
    assert all(type(frame) is bytes for _, frames in got for frame in frames)


def test_a_drain_stops_at_most(pair, path):
    router, dealer = pair
    for _ in range(3):
        dealer.send(b"x")
    io = io_for(router, path)
    deadline = time.monotonic() + 5
    first: list[Message] = []
    while not first:
        assert time.monotonic() < deadline
        count, first, _ = drain_once(io, most=1)
    assert count == 1
    assert len(first) == 1
    rest, _ = receive(io, 2)
    assert len(rest) == 2


def test_each_message_is_handled_before_the_next_is_received(pair, path):
    """What the broker relies on: replies sent from the callback go out before the drain's
    last receive, and a callback's exception stops the drain and reaches the caller."""
    router, dealer = pair
    io = io_for(router, path)
    for i in range(3):
        dealer.send(b"%d" % i)
    seen: list[bytes] = []

    def echo(identity: bytes, frames: list[Any]) -> None:
        seen.append(frames[0])
        assert io.send_from([[identity, b"re", frames[0]]], 0) is None
        if frames[0] == b"1":
            raise KeyError("stop here")

    deadline = time.monotonic() + 5
    raised = 0
    while len(seen) < 3:
        assert time.monotonic() < deadline
        try:
            io.drain(100, 1 << 20, echo, lambda first, size: None, False)
        except KeyError:
            raised += 1
            assert seen[-1] == b"1"  # the drain stopped at the message that raised
    assert seen == [b"0", b"1", b"2"]
    assert raised == 1
    for i in range(3):
        assert dealer.poll(5000)
        assert dealer.recv_multipart() == [b"re", b"%d" % i]


def test_with_user_id_each_message_comes_with_its_connections_zap_user_id(pair, path):
    """Without ZAP there is no User-Id: None (the broker's role check then refuses it)."""
    router, dealer = pair
    dealer.send_multipart([b"a", b"b"])
    got: list[tuple[bytes, list[Any], str | None]] = []
    deadline = time.monotonic() + 5
    while not got:
        assert time.monotonic() < deadline
        io_for(router, path).drain(
            10,
            1 << 20,
            lambda first, rest, user_id: got.append((first, rest, user_id)),
            lambda first, size: None,
            True,
        )
    assert got == [(b"peer", [b"a", b"b"], None)]


def test_a_large_frame_is_passed_on_without_change(pair, path):
    router, dealer = pair
    body = os.urandom(fastzmq.BIG_FRAME * 4)
    dealer.send_multipart([b"head", body])
    io = io_for(router, path)
    (identity, frames), *_ = receive(io, 1)[0]
    assert frames[0] == b"head"
    large = frames[1]
    assert len(large) == len(body)
    assert large.bytes == body
    assert bytes(memoryview(large)) == body
    # Sent back as it came: the peer gets the same bytes.
    assert io.send_from([[identity, b"back", large]], 0) is None
    assert dealer.poll(5000)
    assert dealer.recv_multipart() == [b"back", body]


def test_a_message_with_a_frame_over_the_limit_is_dropped_and_reported(pair, path):
    router, dealer = pair
    dealer.send_multipart([b"MDPC02", b"\x01", b"echo", b"x" * 10_000])
    dealer.send_multipart([b"MDPC02", b"\x01", b"echo", b"small"])
    got, oversized = receive(io_for(router, path), 2, limit=5_000)
    assert oversized == [(b"peer", 10_000)]
    assert got == [(b"peer", [b"MDPC02", b"\x01", b"echo", b"small"])]


def test_send_from_sends_the_rest_of_the_outbox(pair, path):
    router, dealer = pair
    outbox = [[b"peer", b"one"], (b"peer", b"two", bytearray(b"three"))]
    assert io_for(router, path).send_from(outbox, 0) is None
    assert dealer.poll(5000)
    assert dealer.recv_multipart() == [b"one"]
    assert dealer.poll(5000)
    assert dealer.recv_multipart() == [b"two", b"three"]


def test_send_from_stops_at_an_unknown_peer_and_says_where(pair, path):
    router, dealer = pair
    io = io_for(router, path)
    outbox = [[b"peer", b"first"], [b"nobody", b"lost"], [b"peer", b"after"]]
    assert io.send_from(outbox, 0) == (1, errno.EHOSTUNREACH)
    assert io.send_from(outbox, 2) is None
    received = []
    for _ in range(2):
        assert dealer.poll(5000)
        received.append(dealer.recv_multipart())
    assert received == [[b"first"], [b"after"]]


def test_a_full_pipe_is_reported_as_eagain(path):
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    router.setsockopt(zmq.SNDHWM, 1)
    router.bind("inproc://full")
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.ROUTING_ID, b"slow")
    dealer.setsockopt(zmq.RCVHWM, 1)
    dealer.connect("inproc://full")
    try:
        io = io_for(router, path)
        outbox = [[b"slow", b"%d" % i] for i in range(100)]
        failed = io.send_from(outbox, 0)
        assert failed is not None
        index, err = failed
        assert err == errno.EAGAIN
        assert 0 < index < 100
    finally:
        dealer.close(linger=0)
        router.close(linger=0)
        ctx.term()


def test_a_module_built_from_another_source_is_not_used(tmp_path: Path):
    if not COMPILED:
        pytest.skip(f"the compiled module is not in use: {WHY}")
    edited = tmp_path / "_fastzmq.c"
    edited.write_bytes(fastzmq.SOURCE.read_bytes() + b"\n/* edited */\n")
    module, why = fastzmq._load(edited)
    assert module is None
    assert "reinstall" in why
    module, why = fastzmq._load(fastzmq.SOURCE)
    assert module is not None, why


def test_the_pure_python_switch_is_honoured(monkeypatch):
    monkeypatch.setenv("MDP_PURE_PYTHON", "1")
    assert fastzmq._load() == (None, "MDP_PURE_PYTHON is set")


def test_an_install_with_a_c_compiler_uses_the_compiled_module():
    """The build hook must not silently fall back where it could have compiled."""
    include = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if os.environ.get("MDP_NO_COMPILE") or os.environ.get("MDP_PURE_PYTHON"):
        pytest.skip("the compiled module was turned off on purpose")
    if shutil.which("cc") is None or not include.exists():
        pytest.skip("no C compiler or no Python headers: the pure-Python path is expected")
    assert COMPILED, WHY
