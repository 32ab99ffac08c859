"""`mdp-client --embedded`: a broker and workers inside the client process, for zero set-up.

The broker (`mdp.broker.server.BrokerServer`) runs its poll loop in a thread; the workers
(`mdp.worker.serve` with the command services of `services.registry`) run their own event loop
in another thread, so the client's loop never delays their heartbeats. They meet on an ipc://
endpoint: an abstract socket (`ipc://@...`) on Linux, which leaves no file behind whatever ends
the process, else one in a private temporary directory. Each needed service gets `concurrency`
connections (the client's --parallel), so no command waits in the broker's queue. A watchdog
process (`services.watchdog`) ends the running commands if this process dies, SIGKILL included.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from mdp.broker.server import BrokerServer
from mdp.client import Client, RequestTimeout
from mdp.worker import Worker, WorkerOptions, serve
from services.command import CommandService, CommandSettings
from services.registry import BUILTIN, control_services, load_services
from services.watchdog import Watchdog, reap_leftovers

__all__ = ["EmbeddedError", "EmbeddedSystem", "embedded_system"]

STARTUP_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0


class EmbeddedError(Exception):
    """The embedded broker or workers cannot serve this file."""


@dataclass
class EmbeddedSystem:
    """Where the embedded broker listens."""

    endpoint: str
    services: list[str]
    workers: list[Worker] = field(default_factory=list)


@contextlib.asynccontextmanager
async def embedded_system(
    services: Sequence[str], concurrency: int = 16
) -> AsyncIterator[EmbeddedSystem]:
    """Start a broker and `concurrency` worker connections per service; stop them on exit.

    Raises EmbeddedError if a service is not one we can host, or if the workers do not
    register within a few seconds.
    """
    needed = sorted(set(services))
    unknown = [name for name in needed if name not in BUILTIN]
    if unknown:
        raise EmbeddedError(
            f"--embedded hosts only the built-in services ({', '.join(BUILTIN)}); "
            f"the file needs {', '.join(map(repr, unknown))}"
        )
    directory: str | None = None
    if sys.platform == "linux":
        endpoint = f"ipc://@mdp-embedded-{uuid.uuid4().hex}"
    else:
        directory = tempfile.mkdtemp(prefix="mdp-")
        endpoint = f"ipc://{directory}/broker"
    broker = BrokerServer([endpoint])
    system = EmbeddedSystem(endpoint, needed)
    loop: asyncio.AbstractEventLoop | None = None
    thread: threading.Thread | None = None
    watchdog: Watchdog | None = None
    try:
        broker.start_thread()
        hosted = load_services(needed, CommandSettings())
        if any(isinstance(s.handler, CommandService) for s in hosted):
            try:
                reap_leftovers()
                watchdog = Watchdog()
            except (OSError, RuntimeError) as exc:
                raise EmbeddedError(f"cannot start the watchdog: {exc}") from None
            for service in hosted:
                if isinstance(service.handler, CommandService):
                    service.handler.tracker = watchdog
        loop = asyncio.new_event_loop()
        coroutine = serve(
            hosted,
            WorkerOptions(broker=endpoint, grace=0.0),
            concurrency,
            handle_signals=False,
            started=system.workers.extend,
            control=control_services(hosted),
        )
        thread = threading.Thread(
            target=loop.run_until_complete, args=(coroutine,), name="mdp-workers", daemon=True
        )
        thread.start()
        await _registered(endpoint, needed)
        yield system
    finally:
        if loop is not None and thread is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                loop.call_soon_threadsafe(_stop_all, system.workers)
            thread.join(STOP_TIMEOUT)
            if not thread.is_alive():
                loop.close()
        broker.join(STOP_TIMEOUT)
        if watchdog is not None:
            watchdog.close()
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)


def _stop_all(workers: list[Worker]) -> None:
    for worker in workers:
        worker.stop(0.0)


async def _registered(endpoint: str, services: list[str]) -> None:
    """Wait (bounded) until the broker has a worker for every service."""
    client = Client(endpoint, timeout=1.0, retries=0)
    deadline = time.monotonic() + STARTUP_TIMEOUT
    try:
        for name in services:
            while True:
                with contextlib.suppress(RequestTimeout):
                    if await client.service_exists(name):
                        break
                if time.monotonic() >= deadline:
                    raise EmbeddedError(f"the embedded {name!r} worker did not register")
                await asyncio.sleep(0.02)
    finally:
        client.close()
