"""One real stack for the web console's tests: mdp-broker, mdp-worker (shell, os), mdp-jobs and
mdp-web, each a subprocess on loopback, started once for the package and stopped by PID.

The API tests speak HTTP to it with httpx; the browser tests drive Debian's Chromium with
Playwright (tests/web/test_browser.py). Tests share the stack, so each one makes its own jobs
and asserts about those, never about counts of all jobs.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import secrets
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import (
    TEST_HEARTBEAT_MS,
    TEST_LIVENESS,
    Process,
    free_tcp_endpoint,
    script,
    start_broker,
    wait_until,
)

httpx = pytest.importorskip("httpx", reason="the web tests need the [test] extra (httpx)")
pytest.importorskip("fastapi", reason="mdp-web needs the [web] extra")

ARTIFACTS = Path(os.environ.get("MDP_TEST_ARTIFACTS", Path(__file__).parents[2] / "test-artifacts"))
"""Where browser tests leave their screenshots (CI keeps the folder)."""


@dataclass
class Console:
    """The running stack: the console's base URL and token, the broker endpoint."""

    url: str
    token: str
    broker: str
    web: Process

    def client(self, **kw: object) -> httpx.Client:
        """An HTTP client that sends the token."""
        headers = {"Authorization": f"Bearer {self.token}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=20, **kw)  # type: ignore[arg-type]


def _jobs_command() -> list[str]:
    """mdp-jobs, as installed; MDP_TEST_JOBS_CMD overrides it (a command line)."""
    override = os.environ.get("MDP_TEST_JOBS_CMD")
    if override:
        return shlex.split(override)
    try:
        return [script("mdp-jobs")]
    except RuntimeError:
        if importlib.util.find_spec("services.jobs.cli") is None:
            pytest.skip("mdp-jobs is not installed (the job services are needed)")
        return [sys.executable, "-c", "from services.jobs.cli import main; main()"]


def worker_flags() -> list[str]:
    """--allow-root when this mdp-worker has it and we are root (tests run as root in CI)."""
    if os.geteuid() != 0:
        return []
    return ["--allow-root"] if "--allow-root" in _help((script("mdp-worker"),)) else []


@functools.cache
def _help(command: tuple[str, ...]) -> str:
    """A program's --help, asked once per session (each ask is a program start)."""
    return subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=30).stdout


def _option(command: list[str], name: str) -> bool:
    return name in _help(tuple(command))


def broker_has_insecure() -> bool:
    """This mdp-broker has --insecure (needed for tcp:// without CURVE where it exists)."""
    return _option([script("mdp-broker")], "--insecure")


def printed_url(web: Process) -> str | None:
    """The base URL mdp-web printed at start, once it has."""
    if not web.alive():
        raise AssertionError(f"mdp-web exited: {web.output()[1]!r}")
    found = re.search(rb"open (http://127\.0\.0\.1:\d+)/", web.output()[1])
    return found.group(1).decode() if found else None


@pytest.fixture(scope="package")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    """The whole stack, started once for the web tests."""
    home = tmp_path_factory.mktemp("web")
    endpoint = free_tcp_endpoint()
    beat = ["--heartbeat-ms", str(TEST_HEARTBEAT_MS), "--liveness", str(TEST_LIVENESS)]
    extra = ["--insecure"] if broker_has_insecure() else []
    broker = start_broker(endpoint, *extra)
    processes = [broker]
    try:
        processes.append(
            Process(
                [
                    script("mdp-worker"),
                    "--service",
                    "shell",
                    "--service",
                    "os",
                    "--broker",
                    endpoint,
                    "--concurrency",
                    "4",
                    *beat,
                    *worker_flags(),
                ],
                to_files=True,
            )
        )
        jobs = _jobs_command()
        jobs_beat = beat if _option(jobs, "--heartbeat-ms") else []
        processes.append(
            Process(
                [*jobs, "--broker", endpoint, "--db", str(home / "jobs.sqlite3"), *jobs_beat],
                to_files=True,
            )
        )
        token = secrets.token_urlsafe(24)
        token_file = home / "token"
        token_file.write_text(token + "\n")
        web = Process(
            [
                script("mdp-web"),
                "--broker",
                endpoint,
                "--bind",
                "127.0.0.1:0",
                "--token-file",
                str(token_file),
            ],
            to_files=True,
        )
        processes.append(web)

        url = wait_until(lambda: printed_url(web), timeout=20, what="mdp-web to print its URL")
        stack = Console(url, token, endpoint, web)
        with stack.client() as http:

            def ready() -> bool:
                names = {s["name"] for s in http.get("/api/v1/services").json().get("services", [])}
                return {"shell", "os", "jobs.submit", "jobs.logs"} <= names

            try:
                wait_until(ready, timeout=30, interval=0.1, what="the services to register")
            except AssertionError:
                logs = [p.output()[1][-2000:] for p in processes[1:]]
                raise AssertionError(f"the stack did not come up; stderr: {logs!r}") from None
        yield stack
    finally:
        for proc in reversed(processes):
            proc.stop()


def wait_for_state(http: httpx.Client, job_id: str, states: set[str], timeout: float = 30) -> dict:
    """Poll the API until the job is in one of `states`; the job."""

    last: list[dict] = [{}]

    def reached() -> dict | None:
        job = last[0] = http.get(f"/api/v1/jobs/{job_id}").json()
        return job if job.get("state") in states else None

    try:
        return wait_until(reached, timeout=timeout, interval=0.05, what=f"job {job_id} in {states}")
    except AssertionError as exc:  # say where it stuck: queued (no free slot?) or running
        raise AssertionError(f"{exc}; last seen: {last[0]}") from None


def submit(http: httpx.Client, **command: object) -> str:
    """Submit one command through the API; its job id."""
    answer = http.post("/api/v1/jobs", json=command)
    assert answer.status_code == 201, answer.text
    return str(answer.json()["jobs"][0]["id"])
