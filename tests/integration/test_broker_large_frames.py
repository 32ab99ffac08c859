"""Body frames of every size cross the broker byte-exact; the broker passes large frames
through without copying them (mdp.fastzmq), and that must never change what arrives.

Every test runs against a broker on each socket-I/O path: the compiled module and pure Python
(MDP_PURE_PYTHON=1), which a machine without a C compiler at install time uses.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest
import zmq

from mdp import fastzmq
from tests.support import Process, free_tcp_endpoint, start_broker

SIZES = [0, 1, 4095, 4096, 4097, 65_536, 1 << 20]


@pytest.fixture(params=["compiled", "pure-python"])
def broker_endpoint(request: pytest.FixtureRequest) -> Iterator[str]:
    compiled = request.param == "compiled"
    if compiled and not fastzmq.compiled()[0]:
        pytest.skip(f"the compiled module is not in use: {fastzmq.compiled()[1]}")
    endpoint = free_tcp_endpoint()
    proc: Process = start_broker(endpoint, env={} if compiled else {"MDP_PURE_PYTHON": "1"})
    try:
        # The broker says which path it took when it starts serving.
        said = b"socket I/O compiled" if compiled else b"socket I/O in Python"
        deadline = time.monotonic() + 10
        while said not in proc.output()[1]:
            assert time.monotonic() < deadline, proc.output()[1]
            time.sleep(0.02)
        yield endpoint
    finally:
        proc.stop()


@pytest.fixture
def ctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield context
    context.destroy(linger=0)


def dealer(ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str) -> zmq.Socket[bytes]:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


def recv_command(sock: zmq.Socket[bytes], command: bytes, timeout: float = 5) -> list[bytes]:
    """The next message whose command frame (index 1) is `command`, skipping heartbeats."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if sock.poll(int(left * 1000) + 1):
            frames = sock.recv_multipart()
            if frames[1] == command:
                return frames
    raise AssertionError(f"nothing with command {command!r} within {timeout}s")


def test_body_frames_of_every_size_round_trip_byte_exact(
    broker_endpoint: str, ctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    worker = dealer(ctx, broker_endpoint)
    worker.send_multipart([b"MDPW02", b"\x01", b"echo"])
    client = dealer(ctx, broker_endpoint)
    body = [os.urandom(size) for size in SIZES]
    client.send_multipart([b"MDPC02", b"\x01", b"echo", *body])
    request = recv_command(worker, b"\x02")
    assert request[4:] == body
    reply = [b"partial", *reversed(body)]
    worker.send_multipart([b"MDPW02", b"\x03", request[2], b"", *reply])
    worker.send_multipart([b"MDPW02", b"\x04", request[2], b"", *body])
    assert recv_command(client, b"\x02") == [b"MDPC02", b"\x02", b"echo", *reply]
    assert recv_command(client, b"\x03") == [b"MDPC02", b"\x03", b"echo", *body]


def test_an_oversized_service_name_in_mmi_is_unknown(
    broker_endpoint: str, ctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    client = dealer(ctx, broker_endpoint)
    client.send_multipart([b"MDPC02", b"\x01", b"mmi.service", b"s" * 8192])
    assert recv_command(client, b"\x03") == [b"MDPC02", b"\x03", b"mmi.service", b"404"]
