"""`--metrics-bind` of mdp-broker and mdp-worker: a known workload, then a scrape that shows it
(names, units and labels as spec/api.md §4 lists them)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import urllib.request

import msgpack
import pytest

from mdp.client import Client, RequestTimeout
from tests.support import (
    TEST_HEARTBEAT_MS,
    TEST_LIVENESS,
    Process,
    free_tcp_endpoint,
    script,
    start_broker,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        return str(answer.read().decode())


def value(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _option(name: str) -> list[str]:
    text = subprocess.run(
        [script("mdp-broker"), "--help"], capture_output=True, text=True, timeout=30
    ).stdout
    return [name] if name in text else []


def _allow_root() -> list[str]:
    if os.geteuid() != 0:
        return []
    text = subprocess.run(
        [script("mdp-worker"), "--help"], capture_output=True, text=True, timeout=30
    ).stdout
    return ["--allow-root"] if "--allow-root" in text else []


def test_broker_and_worker_metrics_after_a_known_workload() -> None:
    endpoint = free_tcp_endpoint()
    broker_port, worker_port = free_port(), free_port()
    broker = start_broker(
        endpoint,
        "--metrics-bind",
        f"127.0.0.1:{broker_port}",
        "--request-ttl",
        "0.3",
        *_option("--insecure"),
    )
    worker = Process(
        [
            script("mdp-worker"),
            "--service",
            "shell",
            "--broker",
            endpoint,
            "--heartbeat-ms",
            str(TEST_HEARTBEAT_MS),
            "--liveness",
            str(TEST_LIVENESS),
            "--metrics-bind",
            f"127.0.0.1:{worker_port}",
            *_allow_root(),
        ],
        to_files=True,
    )
    try:

        async def workload() -> None:
            async with Client(endpoint, timeout=10) as client:
                while not await client.service_exists("shell"):
                    await asyncio.sleep(0.05)
                for command in ("true", "true", "exit 3"):
                    body = msgpack.packb({"command_name": command})
                    await client.request("shell", body)
                with pytest.raises(RequestTimeout):  # nobody serves it: expires in the broker
                    await client.request("nobody", b"x", timeout=1, retries=0)

        asyncio.run(workload())
        broker_text = wait_until(
            lambda: (
                (t := scrape(broker_port))
                and value(t, 'mdp_broker_requests_total{outcome="expired",service="nobody"}') == 1
                and t
            ),
            timeout=10,
            what="the expired request to be counted",
        )
        assert (
            value(broker_text, 'mdp_broker_requests_total{outcome="received",service="shell"}') == 3
        )
        assert (
            value(broker_text, 'mdp_broker_requests_total{outcome="replied",service="shell"}') == 3
        )
        assert value(broker_text, 'mdp_broker_service_workers{service="shell"}') >= 1
        assert value(broker_text, "mdp_broker_workers") >= 1
        assert "# TYPE mdp_broker_messages_dropped_total counter" in broker_text
        worker_text = scrape(worker_port)
        assert value(worker_text, 'mdp_commands_total{service="shell",status="ok"}') == 2
        assert value(worker_text, 'mdp_commands_total{service="shell",status="failed"}') == 1
        assert value(worker_text, 'mdp_command_duration_seconds_count{service="shell"}') == 3
        assert 'mdp_command_duration_seconds_bucket{le="600.0",service="shell"} 3.0' in worker_text
        assert value(worker_text, 'mdp_commands_running{service="shell"}') == 0
    finally:
        worker.stop()
        broker.stop()


def test_a_bad_metrics_bind_is_a_usage_error() -> None:
    done = subprocess.run(
        [script("mdp-broker"), "--metrics-bind", "nowhere"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert "HOST:PORT" in done.stderr
