"""`mdp-broker` as a user runs it: options, environment, signals, errors."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq

from tests.support import Process, free_tcp_endpoint, script, start_broker


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [script("mdp-broker"), *args], capture_output=True, text=True, timeout=20, env=env
    )


def test_help_explains_every_option() -> None:
    result = run("--help")
    assert result.returncode == 0
    for option in (
        "--bind",
        "--heartbeat-ms",
        "--liveness",
        "--request-ttl",
        "--max-queue",
        "--busy-timeout",
        "--max-msg-size",
        "--log-level",
        "--log-json",
        "--group",
        "--insecure",
        "[env var: MDP_BROKER_BIND]",
    ):
        assert option in result.stdout, option


def test_bad_option_value_is_a_usage_error_without_traceback() -> None:
    result = run("--heartbeat-ms", "zero")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "--heartbeat-ms" in result.stderr


@pytest.mark.parametrize(
    ("endpoint", "reason"),
    [
        ("tcp://127.0.0.1:x", "the port 'x' is not a number or *"),
        # libzmq alone would bind port 34463 (99999 modulo 65536) without a word.
        ("tcp://127.0.0.1:99999", "the port 99999 is outside 0-65535"),
        ("udp://127.0.0.1:5555", "unknown transport 'udp'"),
    ],
)
def test_malformed_endpoint_is_a_usage_error(endpoint: str, reason: str) -> None:
    result = run("--bind", endpoint)
    assert result.returncode == 2
    assert reason in result.stderr
    assert "Traceback" not in result.stderr


def test_unbindable_endpoint_gives_a_clear_error(tmp_path: Path) -> None:
    endpoint = f"ipc://{tmp_path}/no-such-directory/broker.sock"
    result = run("--bind", endpoint)
    assert result.returncode == 1
    assert f"cannot listen on {endpoint}" in result.stderr
    assert "Traceback" not in result.stderr


def test_endpoint_already_in_use_gives_a_clear_error() -> None:
    endpoint = free_tcp_endpoint()
    first = start_broker(endpoint)
    try:
        result = run("--bind", endpoint, "--insecure")
        assert result.returncode == 1
        assert "Address already in use" in result.stderr
    finally:
        first.stop()


def worker_socket(ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str) -> zmq.Socket[bytes]:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    sock.send_multipart([b"MDPW02", b"\x01", b"echo"])
    return sock


def recv_until(sock: zmq.Socket[bytes], wanted: bytes, timeout: float) -> list[bytes]:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if sock.poll(int(left * 1000) + 1):
            frames = sock.recv_multipart()
            if frames[1] == wanted:
                return frames
    raise AssertionError(f"no command {wanted!r} within {timeout}s")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_sends_disconnect_to_workers_and_exits_0_within_a_second(sig: int) -> None:
    endpoint = free_tcp_endpoint()
    broker = start_broker(endpoint)
    ctx = zmq.Context()
    try:
        workers = [worker_socket(ctx, endpoint) for _ in range(3)]
        for w in workers:  # a heartbeat proves the broker registered it
            recv_until(w, b"\x05", timeout=5)
        started = time.monotonic()
        broker.signal(sig)
        assert broker.wait(timeout=5) == 0
        assert time.monotonic() - started < 1.0
        for w in workers:
            assert recv_until(w, b"\x06", timeout=2) == [b"MDPW02", b"\x06"]
    finally:
        broker.stop()
        ctx.destroy(linger=0)


def test_options_are_read_from_environment_variables() -> None:
    endpoint = free_tcp_endpoint()
    broker = Process(
        [script("mdp-broker")],
        env={
            "MDP_BROKER_BIND": endpoint,
            "MDP_BROKER_HEARTBEAT_MS": "50",
            "MDP_BROKER_INSECURE": "1",
        },
    )
    ctx = zmq.Context()
    try:
        w = worker_socket(ctx, endpoint)
        recv_until(w, b"\x05", timeout=5)
        started = time.monotonic()
        recv_until(w, b"\x05", timeout=5)
        # The 50 ms interval from the environment, not the 2500 ms default.
        assert time.monotonic() - started < 1.0
    finally:
        broker.stop()
        ctx.destroy(linger=0)


def test_registration_is_logged_at_info_and_json_logs_are_json() -> None:
    endpoint = free_tcp_endpoint()
    broker = start_broker(endpoint, "--log-json")
    ctx = zmq.Context()
    try:
        w = worker_socket(ctx, endpoint)
        recv_until(w, b"\x05", timeout=5)
    finally:
        ctx.destroy(linger=0)
        _, _, err = broker.stop()
    lines = [json.loads(line) for line in err.decode().splitlines() if line.strip()]
    assert any("registered for echo" in entry["message"] for entry in lines)
    assert all(entry["level"] in ("INFO", "WARNING") for entry in lines)


def test_broker_survives_a_peer_that_vanishes_mid_request() -> None:
    """A reply to a client that is gone is counted as unroutable, not fatal."""
    endpoint = free_tcp_endpoint()
    broker = start_broker(endpoint)
    ctx = zmq.Context()
    try:
        w = worker_socket(ctx, endpoint)
        client = ctx.socket(zmq.DEALER)
        client.setsockopt(zmq.LINGER, 0)
        client.connect(endpoint)
        client.send_multipart([b"MDPC02", b"\x01", b"echo", b"x"])
        request = recv_until(w, b"\x02", timeout=5)
        client.close()
        w.send_multipart([b"MDPW02", b"\x04", request[2], b"", b"late"])
        client2 = ctx.socket(zmq.DEALER)
        client2.setsockopt(zmq.LINGER, 0)
        client2.connect(endpoint)
        client2.send_multipart([b"MDPC02", b"\x01", b"echo", b"y"])
        request = recv_until(w, b"\x02", timeout=5)
        w.send_multipart([b"MDPW02", b"\x04", request[2], b"", b"ok"])
        assert client2.poll(5000)
        assert client2.recv_multipart() == [b"MDPC02", b"\x03", b"echo", b"ok"]
        assert broker.alive()
    finally:
        ctx.destroy(linger=0)
        broker.stop()


def test_python_dash_m_runs_the_broker() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mdp.broker", "--version"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.returncode == 0
    assert "mdp-broker" in result.stdout
