"""A reply from an abandoned attempt is never shown as the result of another command.

A real `mdp-broker`, a fake "shell" service hosted by `mdp.worker` in a thread of the test
process, and `mdp-client` as a subprocess. The fake answers the first attempt of "slow" late,
with no PARTIAL before (so the client abandons the attempt and re-sends it) and with no
request_id in the result (so the only thing that protects the client is that an abandoned
attempt's socket is closed and never reused). When the late answer goes out, another command
is in flight on the client: a client that reused the abandoned socket would show the late
answer as that command's result.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from mdp.worker import Request, Service, Worker, WorkerOptions, serve
from services.bodies import CommandResult, Progress, parse_request
from tests.support import (
    TEST_HEARTBEAT_MS,
    TEST_LIVENESS,
    free_tcp_endpoint,
    script,
    start_broker,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)

LATE = b"LATE ANSWER FROM AN ABANDONED ATTEMPT"


class FakeWorkers:
    """`concurrency` connections of one service, served by `handler` in a background thread."""

    def __init__(
        self,
        endpoint: str,
        service: str,
        handler: Callable[[Request], Awaitable[list[bytes]]],
        concurrency: int,
    ) -> None:
        self.loop = asyncio.new_event_loop()
        self.workers: list[Worker] = []
        options = WorkerOptions(
            broker=endpoint,
            heartbeat_interval=TEST_HEARTBEAT_MS / 1000,
            liveness=TEST_LIVENESS,
            grace=0.0,
        )
        coroutine = serve(
            [Service(service, handler)],
            options,
            concurrency,
            handle_signals=False,
            started=self.workers.extend,
        )
        self.thread = threading.Thread(
            target=self.loop.run_until_complete, args=(coroutine,), daemon=True
        )
        self.thread.start()

    def stop(self) -> None:
        def stop_all() -> None:
            for worker in self.workers:
                worker.stop(0.0)

        self.loop.call_soon_threadsafe(stop_all)
        self.thread.join(10)
        self.loop.close()


def result(stdout: bytes) -> list[bytes]:
    # Deliberately no request_id: correlation must not depend on it.
    return [CommandResult(status="ok", exit_code=0, stdout=stdout).pack()]


def test_late_reply_of_abandoned_attempt_is_never_shown(tmp_path: Path) -> None:
    seen: set[str] = set()
    running: set[str] = set()
    late_sent_while: list[set[str]] = []

    async def handler(request: Request) -> list[bytes]:
        command = parse_request(request.body)
        name = command.command_name
        if name == "slow" and command.request_id not in seen:
            seen.add(command.request_id or "")
            await asyncio.sleep(2.0)  # the fake's behaviour: answer after the client gave up
            late_sent_while.append(set(running))
            return result(LATE)
        running.add(name)
        try:
            if name == "long":  # in flight when the late answer goes out; alive via PARTIALs
                for _ in range(15):
                    await asyncio.sleep(0.2)
                    await request.partial([Progress(elapsed_ms=0).pack()])
            return result(name.encode() + b"\n")
        finally:
            running.discard(name)

    endpoint = free_tcp_endpoint()
    broker = start_broker(endpoint)
    fake = FakeWorkers(endpoint, "shell", handler, concurrency=2)
    commands = [
        {"command_type": "shell", "command_name": name} for name in ["slow", "long", "fast"]
    ]
    path = tmp_path / "commands.json"
    path.write_text(json.dumps(commands))
    try:
        wait_until(lambda: len(fake.workers) == 2, timeout=10)
        ping = [script("mdp-client"), "-a", endpoint, "--timeout", "0.5", "ping", "shell"]
        wait_until(
            lambda: subprocess.run(ping, capture_output=True, timeout=10).returncode == 0,
            timeout=15,
            what="the fake workers to register",
        )
        start = time.monotonic()
        completed = subprocess.run(
            [
                script("mdp-client"),
                "-a",
                endpoint,
                "-f",
                str(path),
                "--json",
                "--parallel",
                "1",
                "--timeout",
                "0.5",
                "--retries",
                "3",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "NO_COLOR": "1"},
        )
        elapsed = time.monotonic() - start
    finally:
        fake.stop()
        broker.stop()

    assert completed.returncode == 0, completed.stderr
    results = json.loads(completed.stdout)["results"]
    assert [r["stdout"] for r in results] == ["slow\n", "long\n", "fast\n"]
    assert results[0]["attempts"] == 2
    assert LATE.decode() not in completed.stdout
    # The late answer really went out while another command of this client was in flight.
    assert late_sent_while == [{"long"}]
    assert elapsed < 10
