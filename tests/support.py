"""Shared helpers for the test suite: finding our console scripts, free loopback endpoints,
subprocesses we start (and stop by PID), and polling with a deadline instead of sleeping.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

# Short intervals for tests: never the production defaults.
TEST_HEARTBEAT_MS = 100
TEST_LIVENESS = 3


def script(name: str) -> str:
    """Path of one of our console scripts (mdp-broker, ...), preferring this interpreter's venv."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"console script {name} is not installed; pip install -e .")
    return found


def free_tcp_endpoint() -> str:
    """A tcp://127.0.0.1:PORT endpoint whose port was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"tcp://127.0.0.1:{port}"


def wait_until(
    predicate: Callable[[], T], timeout: float = 5.0, interval: float = 0.01, what: str = ""
) -> T:
    """Poll `predicate` until it returns something truthy; fail the test after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


class Process:
    """A subprocess we started, in its own process group, stopped only by its own PID/PGID.

    Output goes to pipes the test reads, or with `to_files=True` to temporary files, so a
    long-lived process that logs a lot can never block on a full pipe nobody reads.
    """

    def __init__(
        self,
        argv: Sequence[str],
        env: dict[str, str] | None = None,
        *,
        to_files: bool = False,
        **kw: object,
    ):
        self.argv = list(argv)
        full_env = {**os.environ, **(env or {})}
        # Closed in stop(); they must outlive this call.
        self._files = (
            (tempfile.TemporaryFile(), tempfile.TemporaryFile())  # noqa: SIM115
            if to_files
            else None
        )
        out, err = self._files or (subprocess.PIPE, subprocess.PIPE)
        self.popen = subprocess.Popen(
            self.argv,
            env=full_env,
            stdout=out,
            stderr=err,
            start_new_session=True,
            **kw,  # type: ignore[arg-type]
        )

    def output(self) -> tuple[bytes, bytes]:
        """What a `to_files` process has written so far: (stdout, stderr)."""
        assert self._files is not None, "output() needs to_files=True"
        result = []
        for f in self._files:
            f.seek(0)
            result.append(f.read())
        return result[0], result[1]

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout=timeout)

    def stop(self, timeout: float = 5.0) -> tuple[int, bytes, bytes]:
        """SIGTERM, then SIGKILL to its whole group after `timeout`; returns (rc, out, err)."""
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
        try:
            out, err = self.popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            out, err = self.popen.communicate(timeout=timeout)
        if self._files is not None:
            out, err = self.output()
            for f in self._files:
                f.close()
            self._files = None
        return self.popen.returncode, out, err

    def kill(self) -> None:
        """SIGKILL the process group this process leads (it was started in its own session)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)


def start_broker(endpoint: str, *extra: str, insecure: bool = True, **kw: object) -> Process:
    """Start `mdp-broker` on `endpoint` with test heartbeat settings and wait until it binds.

    A tcp endpoint without CURVE options gets `--insecure` (unless `insecure=False`): the
    broker refuses tcp without authentication otherwise (spec/security.md), and most tests
    are about other things.
    """
    if (
        insecure
        and endpoint.startswith("tcp://")
        and not {"--curve-secret-key", "--insecure"} & set(extra)
    ):
        extra = (*extra, "--insecure")
    proc = Process(
        [
            script("mdp-broker"),
            "--bind",
            endpoint,
            "--heartbeat-ms",
            str(TEST_HEARTBEAT_MS),
            "--liveness",
            str(TEST_LIVENESS),
            *extra,
        ],
        to_files=True,
        **kw,
    )
    if endpoint.startswith("tcp://"):
        host, port = endpoint[len("tcp://") :].rsplit(":", 1)

        def bound() -> bool:
            if not proc.alive():
                raise AssertionError(f"broker exited: {proc.output()[1]!r}")
            try:
                with socket.create_connection((host, int(port)), timeout=0.2):
                    return True
            except OSError:
                return False

        wait_until(bound, timeout=10, what="the broker to bind")
    return proc
