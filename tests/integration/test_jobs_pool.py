"""services/jobs/pool.py: many worker connections on one loop, against a real broker."""

from __future__ import annotations

import asyncio
import time

import pytest

from mdp.worker import Request, Service, WorkerOptions
from services.jobs.pool import WorkerPool
from tests.integration.jobs_harness import start_jobs_broker
from tests.integration.test_worker_harness import RawClient, workers_of
from tests.support import free_tcp_endpoint

pytestmark = pytest.mark.timeout(60)


SLOW = 3
"""How many `slow` requests wait for each other: they can only all finish if they run at once."""
_slow_arrived: list[asyncio.Event] = []


async def upper(request: Request) -> list[bytes]:
    if request.body == [b"boom"]:
        raise ValueError("boom")
    if request.body == [b"slow"]:
        # A barrier, not a sleep: each waits until all SLOW are in their handlers together.
        _slow_arrived.append(asyncio.Event())
        if len(_slow_arrived) == SLOW:
            for event in _slow_arrived:
                event.set()
        await asyncio.wait_for(_slow_arrived[-1].wait(), 10)
    await request.partial([b"working"])
    return [frame.upper() for frame in request.body]


def options(endpoint: str) -> WorkerOptions:
    return WorkerOptions(
        broker=endpoint,
        heartbeat_interval=0.25,  # as start_jobs_broker's
        liveness=4,
        grace=1.0,
    )


async def until(predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(predicate):
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


def ask(endpoint: str, body: bytes) -> list[bytes]:
    with RawClient(endpoint) as client:
        partials, final = client.request("upper", [body], timeout=10)
        return [*(p.body[0] for _, p in partials), *final.body]


async def test_pool_serves_requests_on_every_connection_and_survives_errors() -> None:
    endpoint = free_tcp_endpoint()
    broker = start_jobs_broker(endpoint)
    pool = WorkerPool([(Service("upper", upper), 3)], options(endpoint))
    task = asyncio.create_task(pool.run())
    try:
        await until(lambda: workers_of(endpoint, "upper") == 3)
        _slow_arrived.clear()
        answers = await asyncio.gather(
            *(asyncio.to_thread(ask, endpoint, b"slow") for _ in range(SLOW))
        )
        assert answers == [[b"working", b"SLOW"]] * SLOW  # in parallel: see `upper`
        failed = await asyncio.to_thread(ask, endpoint, b"boom")
        assert failed == [b"error", b"ValueError: boom"]
        await asyncio.sleep(1.2)  # several heartbeat intervals: still registered
        assert await asyncio.to_thread(ask, endpoint, b"hi") == [b"working", b"HI"]
        assert workers_of(endpoint, "upper") == 3
        broker.kill()
        broker.wait(5)
        broker = start_jobs_broker(endpoint)
        await until(lambda: workers_of(endpoint, "upper") == 3)
        assert await asyncio.to_thread(ask, endpoint, b"again") == [b"working", b"AGAIN"]
        pool.stop()
        await asyncio.wait_for(task, 5)
        await until(lambda: workers_of(endpoint, "upper") == 0)
    finally:
        pool.stop(0)
        await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 5)
        broker.stop()
