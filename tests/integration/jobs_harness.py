"""Helpers for the job-service tests (no tests here): starting `mdp-jobs`, and a small
synchronous client of the `jobs.*` services on a raw DEALER socket, every receive bounded."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import msgpack

from tests.integration.test_worker_harness import RawClient, workers_of
from tests.support import Process, script, start_broker, wait_until

# 250 ms x 4: still short, but a process starved of CPU for 300 ms on a loaded 2-core machine
# does not lose its broker (the job tests kill and restart processes and count every run).
HEARTBEAT_ARGS = ["--heartbeat-ms", "250", "--liveness", "4"]

# Few connections: with the tests' 100 ms heartbeats, each one costs mdp-jobs 20 messages/s.
TEST_JOBS_ARGS = [
    "--dispatch-timeout",
    "2",
    "--liveness-timeout",
    "2",
    "--submit-connections",
    "4",
    "--read-connections",
    "2",
]
if os.environ.get("MDP_JOBS_TEST_DEBUG"):
    TEST_JOBS_ARGS += ["--log-level", "DEBUG"]


def start_jobs_broker(endpoint: str) -> Process:
    """`mdp-broker` with the job tests' heartbeat settings."""
    return start_broker(endpoint, *HEARTBEAT_ARGS)


def start_jobs(endpoint: str, db: Path, *args: str) -> Process:
    """`mdp-jobs` on `endpoint` with database `db`, short test timeouts, output to files."""
    return Process(
        [
            script("mdp-jobs"),
            "--broker",
            endpoint,
            "--db",
            str(db),
            *HEARTBEAT_ARGS,
            *TEST_JOBS_ARGS,
            *args,
        ],
        to_files=True,
    )


def start_command_worker(endpoint: str, *args: str) -> Process:
    """`mdp-worker` for shell/os/echo with test settings; output to files (it logs a lot)."""
    return Process(
        [
            script("mdp-worker"),
            "--broker",
            endpoint,
            *HEARTBEAT_ARGS,
            "--progress-interval",
            "0.3",
            *args,
        ],
        to_files=True,
    )


RETRYABLE = frozenset(
    {"jobs.status", "jobs.list", "jobs.logs", "jobs.result", "jobs.cancel", "titanic.reply"}
)


class JobsClient:
    """Requests to jobs.* (msgpack maps) and titanic.* (raw frames), one at a time."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.raw = RawClient(endpoint)

    def close(self) -> None:
        self.raw.close()

    def __enter__(self) -> JobsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def frames(self, service: str, body: list[bytes], timeout: float = 10.0) -> list[bytes]:
        """One request; a lookup (idempotent) is sent once more on a fresh socket if its reply
        was lost (a worker connection dropped under load takes its reply with it)."""
        attempts = 2 if service in RETRYABLE else 1
        for attempt in range(attempts):
            try:
                _, final = self.raw.request(service, body, timeout)
                return final.body
            except AssertionError:
                if attempt + 1 == attempts:
                    raise
                self.raw.close()
                self.raw = RawClient(self.endpoint)
        raise AssertionError("unreachable")

    def call(self, service: str, body: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
        reply = self.frames(service, [msgpack.packb(body)], timeout)
        assert len(reply) == 1
        answer: dict[str, Any] = msgpack.unpackb(reply[0])
        return answer

    def submit(self, service: str, request: dict[str, Any], job_id: str | None = None) -> str:
        body: dict[str, Any] = {"service": service, "request": request}
        if job_id is not None:
            body["id"] = job_id
        answer = self.call("jobs.submit", body)
        assert answer["status"] == "ok", answer
        job: str = answer["id"]
        return job

    def status(self, ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        answer = self.call("jobs.status", {"ids": list(ids)})
        assert answer["status"] == "ok", answer
        return {job["id"]: job for job in answer["jobs"]}

    def wait_terminal(self, ids: list[str], timeout: float = 30.0) -> dict[str, dict[str, Any]]:
        """Poll jobs.status until every job is terminal; their entries."""
        active = {"queued", "running"}
        last: dict[str, dict[str, Any]] = {}

        def done() -> bool:
            nonlocal last
            now: dict[str, dict[str, Any]] = {}
            for start in range(0, len(ids), 1000):
                now.update(self.status(ids[start : start + 1000]))
            last = now
            return all(job["state"] not in active for job in last.values())

        try:
            wait_until(done, timeout=timeout, interval=0.1, what="every job to end")
        except AssertionError:
            states = {i: j["state"] for i, j in last.items() if j["state"] in active}
            raise AssertionError(f"jobs still active after {timeout}s: {states}") from None
        return last


def wait_registered(endpoint: str, timeout: float = 10.0) -> None:
    """Wait until mdp-jobs has registered its services with the broker."""
    wait_until(
        lambda: all(workers_of(endpoint, name) >= 1 for name in ("jobs.list", "titanic.close")),
        timeout=timeout,
        interval=0.05,
        what="mdp-jobs to register",
    )
