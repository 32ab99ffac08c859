"""The process-wide concurrency limit (mdp.worker.Capacity, spec/command-service.md §14.6):
when it is full, idle connections pause; they register again only once a slot has stayed
free for RESUME_DELAY. Fake time, real worker cores, no sockets."""

from __future__ import annotations

import asyncio
from typing import cast

from mdp.worker import RESUME_DELAY, Capacity, Worker
from mdp.worker_core import Action, State, WorkerConfig, WorkerCore


class Connection:
    """What Capacity uses of a Worker: its core, whether it may pause, and its loop hooks."""

    def __init__(self, clock: list[float]) -> None:
        self.core = WorkerCore(WorkerConfig(b"os"))
        self.core.start(0.0)
        self.pausable = True
        self.clock = clock

    def _perform(self, actions: list[Action]) -> None:
        pass

    def _poke(self) -> None:
        pass

    def _clock(self) -> float:
        return self.clock[0]


async def test_paused_connections_register_again_only_once_a_slot_stayed_free() -> None:
    now = [0.0]
    capacity = Capacity(1, clock=lambda: now[0])
    idle = Connection(now)
    capacity.workers.append(cast(Worker, idle))
    try:
        capacity.take(0.0)
        assert idle.core.state is State.PAUSED  # full: the idle connection unregistered
        capacity.release(0.01)
        # Full again for a moment (a saturated worker: the next request came at once), then
        # free since 0.04.
        capacity.take(0.02)
        capacity.release(0.04)
        now[0] = 0.01 + RESUME_DELAY  # the first release's wait is over, not the room's
        capacity._resume_all()
        assert idle.core.state is State.PAUSED
        now[0] = 0.04 + RESUME_DELAY
        capacity._resume_all()
        assert idle.core.state is State.IDLE  # a new socket and READY
    finally:
        if capacity._resume is not None:
            capacity._resume.cancel()


async def test_a_slot_free_long_enough_resumes_on_its_own() -> None:
    capacity = Capacity(1)
    idle = Connection([0.0])
    idle._clock = asyncio.get_running_loop().time  # type: ignore[method-assign]
    capacity.workers.append(cast(Worker, idle))
    loop = asyncio.get_running_loop()
    capacity.take(loop.time())
    assert idle.core.state is State.PAUSED
    capacity.release(loop.time())
    deadline = loop.time() + RESUME_DELAY + 5.0
    while idle.core.state is State.PAUSED:
        assert loop.time() < deadline, "the paused connection never registered again"
        await asyncio.sleep(0.01)
