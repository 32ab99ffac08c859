"""`services.locate.locate`: which worker knows a request_id, through every reachable broker,
and the fence on every other (spec/command-service.md §14.3).

An in-process broker (a thread) and named workers (`mdp.worker.serve` in another thread, each
with its own command service, so each has its own memory like a separate process) on abstract
ipc:// sockets: cheap, and the real broker, worker and wire bodies.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mdp.broker.server import BrokerServer
from mdp.client import Client
from mdp.worker import Request, Service, Worker, WorkerOptions, serve
from services.bodies import CommandResult, Started, pack, parse_partial, parse_result
from services.command import CommandService, CommandSettings
from services.execution import Limits
from services.locate import Located, locate

pytestmark = pytest.mark.timeout(30)

SETTINGS = Limits(progress_interval=0.2, kill_grace=0.5, drain_time=0.3)


@dataclass
class Fleet:
    endpoint: str
    workers: list[Worker] = field(default_factory=list)


def ipc() -> str:
    return f"ipc://@mdp-locate-test-{uuid.uuid4().hex}"


async def _old_control(request: Request) -> list[bytes]:
    """`shell@old`: a worker from before the lookup treats it as a command, answers invalid."""
    return [CommandResult(status="invalid", message="invalid command request").pack()]


async def _answer_ok(request: Request) -> list[bytes]:
    return [CommandResult(status="ok").pack()]


@pytest.fixture
def fleet() -> Iterator[Fleet]:
    """A broker with named shell workers w1, w2 and an older named worker `old`."""
    endpoint = ipc()
    broker = BrokerServer([endpoint])
    broker.start_thread()
    system = Fleet(endpoint)
    loop = asyncio.new_event_loop()

    async def run_all() -> None:
        coroutines = []
        for name in ("w1", "w2"):
            command = CommandService("shell", CommandSettings(limits=SETTINGS, name=name))
            coroutines.append(
                serve(
                    [command.service()],
                    WorkerOptions(broker=endpoint, grace=0.0, name=name),
                    2,
                    handle_signals=False,
                    started=system.workers.extend,
                    control=[command.control_service()],
                    control_concurrency=3,  # as mdp-worker: --concurrency + 1
                )
            )
        coroutines.append(
            serve(
                [Service("shell", _answer_ok)],
                WorkerOptions(broker=endpoint, grace=0.0, name="old"),
                handle_signals=False,
                started=system.workers.extend,
                control=[Service("shell@old", _old_control)],
            )
        )
        await asyncio.gather(*coroutines)

    thread = threading.Thread(target=loop.run_until_complete, args=(run_all(),), daemon=True)
    thread.start()
    try:
        asyncio.run(_registered(endpoint, {"w1", "w2", "old"}))
        yield system
    finally:
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(lambda: [w.stop(0.0) for w in system.workers])
        thread.join(5)
        if not thread.is_alive():
            loop.close()
        broker.join(5)


async def _registered(endpoint: str, names: set[str]) -> None:
    async with Client(endpoint, timeout=0.5, retries=0) as client:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(Exception):
                if names <= {w.name for w in await client.workers()}:
                    return
            assert time.monotonic() < deadline, "workers did not register"
            await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running(client: Client, request_id: str, marker: Path) -> AsyncIterator[str]:
    """A command with `request_id` running on one of the shell workers; yields its name."""
    body = pack(
        {"command_name": f"echo x >> {marker}; sleep 30", "request_id": request_id, "timeout": 30}
    )
    parts = client.stream("shell@w1", body, timeout=5, retries=0)
    first = await anext(parts)
    started = parse_partial(first.body)
    assert isinstance(started, Started)
    try:
        yield str(started.worker.name)
    finally:
        await parts.aclose()
        with contextlib.suppress(Exception):
            await client.request("shell@w1", pack({"cancel": request_id}), timeout=2, retries=0)


def absent_everywhere(found: Located) -> None:
    assert found.absent and not found.known
    assert found.answers == {"w1": "unknown", "w2": "unknown"}
    assert sorted(found.fenced) == ["w1", "w2"]


async def test_an_id_no_worker_knows_is_absent_and_fenced_on_each(fleet: Fleet) -> None:
    async with Client(fleet.endpoint, timeout=2, retries=0) as client:
        found = await locate(client, "shell", "nobody-has-it")
        absent_everywhere(found)
        assert found.brokers == {fleet.endpoint: None}
        assert found.unanswered == {}
        # The older worker cannot be asked, and says so; it does not block `absent`.
        assert "old" in found.unaskable and "does not understand" in found.unaskable["old"]
        # Fenced: the id, arriving now at either worker, is refused and never runs.
        for name in ("w1", "w2"):
            body = pack({"command_name": "true", "request_id": "nobody-has-it"})
            result = parse_result(await client.request(f"shell@{name}", body))
            assert result.status == "cancelled", result


async def test_without_fence_nothing_is_remembered(fleet: Fleet) -> None:
    async with Client(fleet.endpoint, timeout=2, retries=0) as client:
        found = await locate(client, "shell", "just-asking", fence=False)
        assert found.answers == {"w1": "unknown", "w2": "unknown"} and found.fenced == []
        assert not found.absent  # nobody fenced: a re-send could still meet the old one
        body = pack({"command_name": "true", "request_id": "just-asking"})
        assert parse_result(await client.request("shell@w2", body)).status == "ok"


async def test_the_worker_running_it_is_found_and_the_others_fenced(
    fleet: Fleet, tmp_path: Path
) -> None:
    async with Client(fleet.endpoint, timeout=2, retries=0) as client:
        async with running(client, "busy-1", tmp_path / "runs") as name:
            assert name == "w1"
            found = await locate(client, "shell", "busy-1")
            where = (found.worker, found.state, found.endpoint)
            assert where == ("w1", "running", fleet.endpoint), found
            assert found.known and not found.absent
            assert found.answers == {"w1": "running", "w2": "unknown"}
            assert found.fenced == ["w2"]
            # `names`: only the workers asked about are asked.
            only = await locate(client, "shell", "busy-1", names=["w1"])
            assert only.answers == {"w1": "running"} and only.unaskable == {}
        # Cancelled as `running` ends: once its process is gone, it ran (and ended) here.
        deadline = time.monotonic() + 5
        while (await locate(client, "shell", "busy-1", names=["w1"])).state != "finished":
            assert time.monotonic() < deadline, "still running after its cancel"
            await asyncio.sleep(0.05)


async def test_a_named_worker_no_broker_lists_is_unanswered(fleet: Fleet) -> None:
    async with Client(fleet.endpoint, timeout=2, retries=0) as client:
        found = await locate(client, "shell", "x", names=["w9"])
        assert found.unanswered == {"w9": "not registered with any broker that answered"}
        assert not found.known and not found.absent
        # `expect`: a worker seen lately that no broker lists (yet) blocks `absent` too,
        # while every listed worker is still asked (and fenced).
        found = await locate(client, "shell", "y", expect=["w1", "w9"])
        assert set(found.unanswered) == {"w9"} and sorted(found.fenced) == ["w1", "w2"]
        assert not found.absent


async def test_a_dead_broker_is_skipped_at_once(fleet: Fleet, tmp_path: Path) -> None:
    dead = f"ipc://{tmp_path}/nobody-listens"
    async with Client([dead, fleet.endpoint], timeout=2, retries=0) as client:
        began = time.monotonic()
        found = await locate(client, "shell", "after-a-crash", timeout=2)
        assert time.monotonic() - began < 1.5  # refused: not waited for the whole timeout
        assert found.brokers[fleet.endpoint] is None
        assert "refused" in (found.brokers[dead] or "")
        absent_everywhere(found)


async def test_no_broker_at_all_concludes_nothing(tmp_path: Path) -> None:
    found = await locate(f"ipc://{tmp_path}/nobody", "shell", "x", timeout=0.5)
    assert not found.known and not found.absent
    assert found.reachable == []
