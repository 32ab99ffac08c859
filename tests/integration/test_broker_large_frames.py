"""Body frames of every size cross the broker byte-exact; the broker passes large frames
through without copying them (mdp.fastzmq), and that must never change what arrives."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest
import zmq

SIZES = [0, 1, 4095, 4096, 4097, 65_536, 1 << 20]


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
