"""`mdp-worker` as a real process against a real `mdp-broker`: both protocol versions,
re-registration after a broker restart, graceful shutdown, and concurrency."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import msgpack
import pytest

from tests.integration.test_worker_harness import (
    LogReader,
    RawClient,
    mmi,
    start_worker,
    wait_workers,
    workers_of,
)
from tests.support import (
    TEST_HEARTBEAT_MS,
    TEST_LIVENESS,
    Process,
    free_tcp_endpoint,
    start_broker,
)

BROKER_TIMEOUT = TEST_HEARTBEAT_MS / 1000 * TEST_LIVENESS
BACKOFF_MAX = 4.0  # mdp.worker.WorkerOptions.backoff_max


@pytest.fixture
def stopping() -> Iterator[list[Process]]:
    """Processes a test starts; stopped (by PID) at the end whatever happens."""
    procs: list[Process] = []
    yield procs
    for proc in reversed(procs):
        proc.stop(timeout=3)


@pytest.mark.parametrize("worker_version", ["0.1", "0.2"])
def test_echo_round_trips_over_both_versions(
    broker_endpoint: str, stopping: list[Process], worker_version: str
) -> None:
    """RFC 7 and RFC 18: the echo FINAL is the request body, frame for frame, whichever version
    the worker and the client speak (the broker bridges them)."""
    stopping.append(start_worker(broker_endpoint, "-s", "echo", "--mdp-version", worker_version))
    wait_workers(broker_endpoint, "echo")
    body = [b"one", b"", b"\x00\xff" * 1000, b"last"]
    for client_version in ("0.1", "0.2"):
        with RawClient(broker_endpoint, client_version) as client:
            partials, final = client.request("echo", body, timeout=5)
        assert partials == []
        assert (final.service, final.body) == (b"echo", body)


def test_worker_reregisters_after_the_broker_restarts(stopping: list[Process]) -> None:
    """RFC 7/18 heartbeating: a worker that hears nothing for interval x liveness starts a new
    conversation on a new socket, so a restarted broker gets it back without restarting it."""
    endpoint = free_tcp_endpoint()
    broker = start_broker(endpoint)
    stopping.append(broker)
    worker = start_worker(endpoint, "-s", "echo")
    stopping.append(worker)
    wait_workers(endpoint, "echo")

    log = LogReader(worker)
    killed = time.monotonic()
    broker.kill()  # SIGKILL: no DISCONNECT, the worker must notice the silence itself
    broker.wait(timeout=5)
    log.wait_for("lost the broker (silent for", timeout=BROKER_TIMEOUT + 2)
    stopping.append(start_broker(endpoint))
    up = time.monotonic()
    wait_workers(endpoint, "echo", timeout=BROKER_TIMEOUT + BACKOFF_MAX + 1)
    done = time.monotonic()
    print(
        f"re-registered {done - up:.2f}s after the new broker listened "
        f"({done - killed:.2f}s after the old one was killed)"
    )
    assert worker.alive()
    with RawClient(endpoint) as client:
        assert client.request("echo", [b"again"], timeout=5)[1].body == [b"again"]


def test_sigterm_when_idle_disconnects_and_exits_zero(
    broker_endpoint: str, stopping: list[Process]
) -> None:
    """RFC 7/18: the worker MAY send DISCONNECT; ours does on SIGTERM, so the broker forgets it
    at once instead of waiting for it to expire."""
    worker = start_worker(broker_endpoint, "-s", "echo", "-c", "2")
    stopping.append(worker)
    wait_workers(broker_endpoint, "echo", 2)
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=3) == 0
    # DISCONNECT, not expiry: gone well before interval x liveness would have run out.
    assert mmi(broker_endpoint, "mmi.service", [b"echo"]) == [b"404"]


def test_sigterm_lets_the_running_command_finish(
    broker_endpoint: str, stopping: list[Process]
) -> None:
    """Graceful shutdown: stop taking requests, finish the running one, then DISCONNECT."""
    worker = start_worker(broker_endpoint, "-s", "shell", "--grace", "10")
    stopping.append(worker)
    wait_workers(broker_endpoint, "shell")
    with RawClient(broker_endpoint) as client:
        client.send("shell", [msgpack.packb({"command_name": "sleep 0.5; echo finished"})])
        client.recv(timeout=5)  # the Started PARTIAL: the command is running
        worker.signal(signal.SIGTERM)
        _, final = client.collect(timeout=5)
    result = msgpack.unpackb(final.body[0])
    assert (result["status"], result["stdout"]) == ("ok", b"finished\n")
    assert worker.wait(timeout=3) == 0


def test_grace_period_over_cancels_the_command(
    broker_endpoint: str, stopping: list[Process]
) -> None:
    """Graceful shutdown, bounded: after --grace the command is killed and answered `error`."""
    worker = start_worker(broker_endpoint, "-s", "shell", "--grace", "0.2")
    stopping.append(worker)
    wait_workers(broker_endpoint, "shell")
    with RawClient(broker_endpoint) as client:
        client.send("shell", [msgpack.packb({"command_name": "sleep 30"})])
        client.recv(timeout=5)
        started = time.monotonic()
        worker.signal(signal.SIGTERM)
        _, final = client.collect(timeout=5)
    assert msgpack.unpackb(final.body[0])["status"] == "error"
    assert worker.wait(timeout=3) == 0
    assert time.monotonic() - started < 2


def test_concurrency_runs_requests_in_parallel(
    broker_endpoint: str, stopping: list[Process]
) -> None:
    """--concurrency 4: four connections in one process, so four `sleep 1` take about 1 s."""
    stopping.append(start_worker(broker_endpoint, "-s", "shell", "-c", "4"))
    wait_workers(broker_endpoint, "shell", 4)

    def sleep_one(_: int) -> tuple[str, int]:
        with RawClient(broker_endpoint) as client:
            _, final = client.request("shell", [msgpack.packb({"command_name": "sleep 1"})], 10)
        result = msgpack.unpackb(final.body[0])
        return result["status"], result["worker"]["pid"]

    started = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(sleep_one, range(4)))
    elapsed = time.monotonic() - started
    print(f"4 x sleep 1 with --concurrency 4: {elapsed:.2f}s")
    assert [status for status, _ in results] == ["ok"] * 4
    assert len({pid for _, pid in results}) == 1  # one process
    assert elapsed < 2.0


def test_worker_waits_for_a_broker_that_is_not_there_yet(stopping: list[Process]) -> None:
    """Started before its broker, the worker keeps retrying (backoff) and registers once the
    broker listens."""
    endpoint = free_tcp_endpoint()
    worker = start_worker(endpoint, "-s", "echo")
    stopping.append(worker)
    stopping.append(start_broker(endpoint))
    wait_workers(endpoint, "echo", timeout=BROKER_TIMEOUT + BACKOFF_MAX + 2)
    assert workers_of(endpoint, "echo") == 1
