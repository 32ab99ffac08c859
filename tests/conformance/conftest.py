"""Fixtures of the conformance suite: the broker under test, the per-test harness, and the
protocol-version parametrization. The options themselves live in `plugin.py`.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest
import zmq

from tests.conformance.harness import BrokerTarget, Harness
from tests.conformance.plugin import DEFAULT_BROKER_CMD
from tests.conformance.wire import REPLY_COMMANDS, VERSIONS

# Timings the suite passes to a broker command that has the placeholders: short, so the
# heartbeat and expiry tests take a fraction of a second.
FAST_HEARTBEAT_MS = 100
FAST_LIVENESS = 3
FAST_REQUEST_TTL = 1.0
# What a broker uses when nobody told it otherwise: the zguide's 2500 ms x 3.
CONVENTIONAL_HEARTBEAT_MS = 2500
CONVENTIONAL_LIVENESS = 3


def selected_versions(config: pytest.Config) -> tuple[str, ...]:
    chosen = config.getoption("--mdp-version")
    return VERSIONS if chosen == "both" else (chosen,)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize `version` (and `reply_command`, or `client_version`/`worker_version` for
    cross-version tests); versions not selected with --mdp-version are skipped, not hidden."""
    selected = selected_versions(metafunc.config)
    marker = metafunc.definition.get_closest_marker("mdp_versions")
    versions = tuple(marker.args) if marker else VERSIONS

    def mark(*needed: str) -> list[pytest.MarkDecorator]:
        missing = [v for v in needed if v not in selected]
        if missing:
            return [pytest.mark.skip(reason=f"--mdp-version does not select {'/'.join(missing)}")]
        return []

    names = metafunc.fixturenames
    if "version" in names and "reply_command" in names:
        metafunc.parametrize(
            ("version", "reply_command"),
            [
                pytest.param(v, c, id=f"{v}-{c}", marks=mark(v))
                for v in versions
                for c in REPLY_COMMANDS[v]
            ],
        )
    elif "version" in names:
        metafunc.parametrize("version", [pytest.param(v, id=v, marks=mark(v)) for v in versions])
    if "client_version" in names and "worker_version" in names:
        metafunc.parametrize(
            ("client_version", "worker_version"),
            [
                pytest.param(c, w, id=f"client{c}-worker{w}", marks=mark(c, w))
                for c, w in (("0.1", "0.2"), ("0.2", "0.1"))
            ],
        )


@dataclass
class StartedBroker:
    """A broker process the suite started: stopped by its PID (and its own process group)."""

    popen: subprocess.Popen[bytes]
    log: IO[bytes]

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, size: int = 4000) -> str:
        self.log.flush()
        data = Path(self.log.name).read_bytes()
        return data[-size:].decode(errors="replace")

    def stop(self) -> None:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                # It was started in its own session, so its PID is its process group.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout=5)
        self.log.close()


def _free_endpoint() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{sock.getsockname()[1]}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _resolve(argv: list[str]) -> list[str]:
    """Find a bare program name on PATH or next to this interpreter (an unactivated venv)."""
    if argv and os.sep not in argv[0] and shutil.which(argv[0]) is None:
        beside = Path(sys.executable).parent / argv[0]
        if beside.exists():
            return [str(beside), *argv[1:]]
    return argv


def _start(command: str, endpoint: str) -> StartedBroker:
    argv = _resolve(shlex.split(command))
    log = tempfile.NamedTemporaryFile(prefix="mdp-conformance-broker-", suffix=".log")  # noqa: SIM115
    popen = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    started = StartedBroker(popen, log)
    host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
    deadline = time.monotonic() + 15
    while True:
        if not started.alive():
            raise RuntimeError(f"broker {argv} exited at start:\n{started.log_tail()}")
        try:
            with socket.create_connection((host, int(port)), timeout=0.2):
                return started
        except OSError:
            if time.monotonic() > deadline:
                started.stop()
                raise RuntimeError(f"broker {argv} did not listen on {endpoint}") from None
            time.sleep(0.02)  # waiting for an external process to bind; no socket to poll yet


@pytest.fixture(scope="session")
def _broker(request: pytest.FixtureRequest) -> Iterator[tuple[BrokerTarget, StartedBroker | None]]:
    config = request.config
    endpoint = config.getoption("--broker-endpoint")
    command = config.getoption("--broker-cmd")
    hb_ms = config.getoption("--heartbeat-ms")
    liveness = config.getoption("--liveness") or None
    ttl = config.getoption("--request-ttl")
    started: StartedBroker | None = None
    if endpoint:
        hb_ms = hb_ms or CONVENTIONAL_HEARTBEAT_MS
        liveness = liveness or CONVENTIONAL_LIVENESS
    else:
        command = command or DEFAULT_BROKER_CMD
        hb_ms = hb_ms or (
            FAST_HEARTBEAT_MS if "{heartbeat_ms}" in command else CONVENTIONAL_HEARTBEAT_MS
        )
        liveness = liveness or (FAST_LIVENESS if "{liveness}" in command else CONVENTIONAL_LIVENESS)
        if ttl is None and "{request_ttl}" in command:
            ttl = FAST_REQUEST_TTL
        endpoint = _free_endpoint()
        for key, value in (
            ("{endpoint}", endpoint),
            ("{heartbeat_ms}", str(hb_ms)),
            ("{liveness}", str(liveness)),
            ("{request_ttl}", _number(ttl) if ttl is not None else ""),
        ):
            command = command.replace(key, value)
        started = _start(command, endpoint)
    quiet_ms = config.getoption("--quiet-ms")
    quiet = quiet_ms / 1000 if quiet_ms else min(1.0, max(0.3, 3 * hb_ms / 1000))
    target = BrokerTarget(endpoint, hb_ms / 1000, liveness, ttl, quiet)
    try:
        yield target, started
    finally:
        if started is not None:
            started.stop()


@pytest.fixture(scope="session")
def broker(_broker: tuple[BrokerTarget, StartedBroker | None]) -> BrokerTarget:
    """What the suite knows about the broker under test."""
    return _broker[0]


@pytest.fixture(autouse=True)
def _broker_survives(_broker: tuple[BrokerTarget, StartedBroker | None]) -> Iterator[None]:
    """Whatever a test sent, a broker the suite started must still be running afterwards."""
    yield
    started = _broker[1]
    if started is not None and not started.alive():
        pytest.fail(f"the broker exited during this test:\n{started.log_tail()}")


@pytest.fixture(scope="session")
def zmq_context() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield context
    context.term()


@pytest.fixture
def peers(zmq_context: zmq.Context[zmq.Socket[bytes]], broker: BrokerTarget) -> Iterator[Harness]:
    """The test's sockets; all closed at the end of the test."""
    harness = Harness(zmq_context, broker)
    try:
        yield harness
    finally:
        harness.close()
