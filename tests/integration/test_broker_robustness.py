"""Our broker survives garbage: 10,000 random messages, then a normal request round-trips.

The garbage is random frame lists (1 to 10 frames of random bytes; ZeroMQ cannot send a
message of zero frames, so "0 frames" is sent as one empty frame), frames just under
--max-msg-size, valid-looking MDP headers followed by random command bytes and random
arguments, and frames over --max-msg-size. It comes from a few DEALER sockets at once.

ZeroMQ drops the connection of a peer that exceeds the limit, and the messages that peer had
queued behind the oversize one are lost with it; so over-limit frames go out on a DEALER of
their own, and the other senders end with a probe (mmi.service) whose answer proves the
broker has read everything they sent. Afterwards the broker process is alive, answers a normal
request, has not grown by 50 MB, and logged no traceback.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator

import psutil  # type: ignore[import-untyped]
import pytest
import zmq

from tests.support import TEST_HEARTBEAT_MS, Process, free_tcp_endpoint, start_broker

MAX_MSG_SIZE = 64 * 1024
MESSAGES = 10_000
SENDERS = 4
OVERSIZE_EVERY = 200  # one message in 200 (50 in all) carries a frame over the limit
SEND_DEADLINE = 60.0  # seconds for the whole flood, whatever the machine's load
RSS_GROWTH_LIMIT = 50 * 1024 * 1024
SEED = 20_260_707

HEADERS = [b"MDPC01", b"MDPW01", b"MDPC02", b"MDPW02"]


def oversize(rng: random.Random) -> list[bytes]:
    """A message with one frame over the limit (ZeroMQ disconnects its sender)."""
    frames = [
        rng.choice(HEADERS),
        rng.randbytes(rng.randint(MAX_MSG_SIZE + 1, MAX_MSG_SIZE + 8192)),
    ]
    return frames if rng.random() < 0.5 else [b"", *frames]


def garbage(rng: random.Random) -> list[bytes]:
    """One random message, as frames (identity excluded)."""
    kind = rng.random()
    if kind < 0.01:
        # A frame at or just under the limit: accepted by ZeroMQ, then the broker's problem.
        return [rng.choice(HEADERS), rng.randbytes(rng.randint(MAX_MSG_SIZE - 4096, MAX_MSG_SIZE))]
    if kind < 0.5:
        # A valid-looking header, maybe the leading empty frame, a random command byte and up
        # to 5 random arguments (empty ones included).
        frames = [b""] if rng.random() < 0.5 else []
        frames += [rng.choice(HEADERS), bytes([rng.randint(0, 8)])]
        frames += [rng.randbytes(rng.choice((0, 1, 6, 20))) for _ in range(rng.randint(0, 5))]
        return frames
    count = rng.randint(0, 10)
    if count == 0:
        return [b""]
    return [rng.randbytes(rng.choice((0, 1, 2, 6, 64, 1000))) for _ in range(count)]


@pytest.fixture
def broker() -> Iterator[tuple[str, Process]]:
    endpoint = free_tcp_endpoint()
    # WARNING: no INFO line per random READY, so the piped stderr cannot fill up.
    proc = start_broker(
        endpoint,
        "--max-msg-size",
        str(MAX_MSG_SIZE),
        "--request-ttl",
        "5",
        "--log-level",
        "WARNING",
    )
    try:
        yield endpoint, proc
    finally:
        proc.stop()


def drain(sock: zmq.Socket[bytes]) -> None:
    """Throw away whatever the broker sent back (DISCONNECTs, heartbeats)."""
    while True:
        try:
            sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return


def round_trip(context: zmq.Context[zmq.Socket[bytes]], endpoint: str, service: bytes) -> None:
    """An RFC 18 worker and client on fresh sockets; the worker heartbeats while it waits."""
    worker = context.socket(zmq.DEALER)
    client = context.socket(zmq.DEALER)
    for sock in (worker, client):
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
    try:
        worker.send_multipart([b"MDPW02", b"\x01", service])
        client.send_multipart([b"MDPC02", b"\x01", service, b"still-alive"])
        deadline = time.monotonic() + 10
        while True:
            assert time.monotonic() < deadline, "the request never reached the worker"
            if worker.poll(TEST_HEARTBEAT_MS // 2, zmq.POLLIN):
                frames = worker.recv_multipart()
                if frames[:2] == [b"MDPW02", b"\x02"]:
                    break
                assert frames == [b"MDPW02", b"\x05"], f"worker got {frames!r}"
            worker.send_multipart([b"MDPW02", b"\x05"])
        assert frames[3:] == [b"", b"still-alive"]
        worker.send_multipart([b"MDPW02", b"\x04", frames[2], b"", b"ok"])
        assert client.poll(10_000, zmq.POLLIN), "no reply within 10 s"
        assert client.recv_multipart() == [b"MDPC02", b"\x03", service, b"ok"]
    finally:
        worker.close()
        client.close()


def test_broker_survives_10000_garbage_messages(broker: tuple[str, Process]) -> None:
    endpoint, proc = broker
    rng = random.Random(SEED)
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        round_trip(context, endpoint, b"warm-up")
        rss_before = psutil.Process(proc.pid).memory_info().rss
        senders = []
        for _ in range(SENDERS):
            sock = context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(endpoint)
            senders.append(sock)
        big = context.socket(zmq.DEALER)
        big.setsockopt(zmq.LINGER, 0)
        big.setsockopt(zmq.RECONNECT_IVL, 10)  # back quickly after each disconnection
        big.connect(endpoint)
        deadline = time.monotonic() + SEND_DEADLINE
        sent = 0
        while sent < MESSAGES:
            assert time.monotonic() < deadline, f"only {sent} messages sent in {SEND_DEADLINE}s"
            if sent % OVERSIZE_EVERY == 0:
                big.send_multipart(oversize(rng))  # queued however the connection fares
                sent += 1
                continue
            sock = senders[sent % SENDERS]
            try:
                sock.send_multipart(garbage(rng), zmq.NOBLOCK)
            except zmq.Again:
                # The pipe is full (a slow or disconnecting broker): let it catch up.
                sock.poll(10, zmq.POLLOUT)
                continue
            sent += 1
            if sent % 500 == 0:
                for s in senders:
                    drain(s)
        # ZeroMQ keeps each sender's messages in order: once the broker answers a probe sent
        # last, it has read (and dropped) everything before it on that connection.
        for sock in senders:
            sock.send_multipart([b"MDPC02", b"\x01", b"mmi.service", b"probe"])
        for i, sock in enumerate(senders):
            while True:
                assert time.monotonic() < deadline, f"sender {i}: no answer to the probe"
                if not sock.poll(100, zmq.POLLIN):
                    assert proc.alive(), f"broker died (seed {SEED}): {proc.stop()[2][-2000:]!r}"
                    continue
                if sock.recv_multipart()[:3] == [b"MDPC02", b"\x03", b"mmi.service"]:
                    break
        round_trip(context, endpoint, b"after-garbage")
        assert proc.alive()
        rss_after = psutil.Process(proc.pid).memory_info().rss
        growth = rss_after - rss_before
        assert growth < RSS_GROWTH_LIMIT, f"broker RSS grew by {growth / 2**20:.1f} MiB"
        for sock in [*senders, big]:
            sock.close()
    finally:
        context.destroy(linger=0)
    rc, _, err = proc.stop()
    assert rc == 0, f"broker exited with {rc}: {err[-2000:]!r}"
    assert b"Traceback" not in err, err[-4000:].decode(errors="replace")
