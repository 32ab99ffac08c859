"""`mdp-jobs`: the job manager. An MDP worker for `jobs.*` and `titanic.*`, an MDP client of
the target services, and the only writer of its store (`spec/jobs.md`).

The life of a job in this process
---------------------------------
1. `jobs.submit` (or `titanic.request`) validates the body, commits a `queued` job and only
   then answers (the store's group commit makes that cheap).
2. The dispatch loop, woken by submits and by finished runs, asks the store which services have
   unclaimed queued jobs, and for each claims as many as its window allows (twice the workers
   `mmi.services` reports). Each claimed job gets a task: `_dispatch`.
3. The claim records the attempt (request_id, `start_by` = claim + dispatch timeout) before
   anything is sent. `_dispatch` sends the request and follows the stream (`_follow`):
   `started` -> `running`; output -> numbered chunks; FINAL -> the end. Each event becomes
   one compare-and-set store update chosen by `core.step`.
4. Silence before `started`: the attempt cannot start any more once `start_by` + the skew
   allowance has passed, so the job goes back to the queue -- but it may have started unseen
   (the broker carrying `started` died), so it stays on record, `in_doubt`. So do the claims
   of a job service that died (or restarted) before `started` was committed. Whoever claims
   such a job next resolves it first (`_resolve`): every worker of the service is asked at
   `SERVICE@NAME`, through every broker, whether it knows that request_id, with a fence
   (`services.locate`); one that knows it is re-attached to, otherwise a new attempt goes
   under a new request_id, recorded first.
5. Silence after `started`, or a restart of this process with `running` jobs: `_reattach`
   re-sends the same request with a `start_by` in the past to the worker that said
   `started`, at its `SERVICE@NAME`, through each broker in turn -- only it answers, from its
   memory. If it does not know the run, or cannot be reached, the job is `lost` (and a
   cancel is sent to its worker, so it can never finish unseen).

Several job services on one database (PostgreSQL, `store.shared`)
-----------------------------------------------------------------
Each `mdp-jobs` has a name (`--name`, the owner written in the store). Claims are the store's
(`SKIP LOCKED`: a queued job goes to exactly one of them). A job that said `started` is held
by the job service that follows it, with a lease (`--lease`) it renews every third of it
(`_lease_loop`); the same loop takes over the running jobs whose lease ran out -- their job
service died -- and re-attaches them like a restart would, releases queued claims that are
surely dead (older than their `start_by` + skew), and so on every `--lease / 3`. A job service
that restarts under the same name takes its own running jobs back at once. Changes made by
the others reach long polls and the dispatch loop as store notifications (`subscribe`); the
polls every WAIT_SLICE and every second stay, so a lost notification only delays.

Every wait is bounded; the store is the only state that matters across restarts.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import socket
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import zmq
import zmq.asyncio

from mdp.client import Client
from mdp.errors import MDPError, ProtocolError
from mdp.mmi import MMINotImplemented
from mdp.protocol import HEARTBEAT_INTERVAL, HEARTBEAT_LIVENESS, validate_service_name
from mdp.worker import Request, Service, WorkerOptions
from services.bodies import (
    MAX_REQUEST_ID,
    BodyError,
    CancelRequest,
    Output,
    Started,
    pack,
    parse_cancel_reply,
    parse_partial,
    parse_result,
    unpack_map,
)
from services.jobs import titanic, wire
from services.jobs.core import Event, step
from services.jobs.pool import WorkerPool
from services.jobs.store.base import (
    ACTIVE,
    Job,
    JobStore,
    NewJob,
    StoreError,
    SubmitOutcome,
    Tombstone,
)
from services.locate import locate

__all__ = ["SKEW", "JobManager", "Settings"]

log = logging.getLogger("mdp.jobs")

SKEW = 1.0
"""The skew allowance of spec/command-service.md §14.1: an attempt is given up only once its
`start_by` plus this has passed."""
PAST = 1.0
"""The `start_by` of a re-attach: long past, so no worker starts it anew (§14.1)."""
DAY = 86_400.0
CONTROL_TIMEOUT = 2.0
"""Seconds to wait for the broker's MMI or a worker's answer to a cancel."""
LOOKUP_TIMEOUT = 1.0
"""Seconds to wait for each worker's answer to a lookup (`services.locate`)."""
WAIT_SLICE = 0.5
"""Long polls re-read the store at least this often (another manager may change a job)."""
TAKE_OVER_BATCH = 100
"""Running jobs taken over (and re-attached) per store call."""


@dataclass(frozen=True, slots=True)
class Settings:
    """How `mdp-jobs` runs (`mdp-jobs --help` explains each)."""

    broker: str
    heartbeat_interval: float = HEARTBEAT_INTERVAL
    liveness: int = HEARTBEAT_LIVENESS
    socket_options: Sequence[tuple[int, int | bytes]] = ()
    submit_connections: int = 32
    read_connections: int = 8
    dispatch_timeout: float = 30.0
    liveness_timeout: float = 15.0
    reattach_timeout: float = 120.0
    default_window: int = 4
    mmi_interval: float = 1.0
    max_log: int = 8 * 1024 * 1024
    keep: float = 7 * DAY
    keep_failed: float = 30 * DAY
    keep_records: float = 30 * DAY
    keep_tombstones: float = 365 * DAY
    purge_interval: float = 60.0
    purge_batch: int = 200
    grace: float = 5.0
    name: str = field(default_factory=socket.gethostname)
    """Who holds the jobs this process follows (the store's `owner`); unique per job service
    sharing one database, stable across its restarts."""
    lease: float = 10.0
    """A running job's owner renews its lease every third of this; another job service takes
    the job over when it runs out (the owner died)."""
    also_serve_on: Sequence[str] = ()
    """More brokers on which jobs.* and titanic.* are served (dispatch goes via `broker`)."""
    previous_run_gone: bool = False
    """The broker and workers an earlier run dispatched to are gone (embedded use): its
    claims are released at once instead of after the dispatch timeout."""

    def __post_init__(self) -> None:
        if self.keep_records < self.keep:
            raise ValueError("--keep-records must be at least --keep")
        for name in (
            "dispatch_timeout",
            "liveness_timeout",
            "mmi_interval",
            "purge_interval",
            "lease",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")


class JobManager:
    """One `mdp-jobs`: `await manager.run()` until `manager.stop()`."""

    def __init__(
        self,
        store: JobStore,
        settings: Settings,
        *,
        context: zmq.asyncio.Context | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.settings = settings
        self._own_context = context is None
        self._context = context or zmq.asyncio.Context()
        self._clock = clock
        # Dispatches: silence is timed here (it depends on the job's state), so the client's
        # own per-attempt timeout is out of the way and it never retries by itself.
        self.client = Client(
            settings.broker,
            timeout=DAY,
            retries=0,
            context=self._context,
            socket_options=settings.socket_options,
        )
        self.control = Client(
            settings.broker,
            timeout=CONTROL_TIMEOUT,
            retries=0,
            context=self._context,
            socket_options=settings.socket_options,
        )
        self.brokers = list(dict.fromkeys((settings.broker, *settings.also_serve_on)))
        # Cancels and lookups go to a worker's SERVICE@NAME through any broker: a silent one
        # moves on to the next (both are safe to repeat).
        self.anywhere = Client(
            self.brokers,
            timeout=CONTROL_TIMEOUT,
            retries=len(self.brokers) - 1,
            context=self._context,
            socket_options=settings.socket_options,
        )
        # Re-attaching follows a run through one broker at a time, the next one after a silence.
        self.followers = {settings.broker: self.client} | {
            broker: Client(
                broker,
                timeout=DAY,
                retries=0,
                context=self._context,
                socket_options=settings.socket_options,
            )
            for broker in self.brokers[1:]
        }
        self.pools: list[WorkerPool] = []
        self.ready = asyncio.Event()
        """Set once the store is open, claims released and the workers started."""
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._in_flight: dict[str, int] = defaultdict(int)
        self._workers_of: dict[str, int] = {}
        self._mmi_ok = True
        self._cancel_requested: set[str] = set()
        self._watchers: dict[str, list[asyncio.Future[None]]] = defaultdict(list)
        self._following: set[str] = set()
        self._buffer: dict[str, collections.deque[Job]] = collections.defaultdict(collections.deque)
        """Running jobs this process follows and holds the lease of."""
        self.dispatched = 0
        self.taken_over = 0
        self._started_at = self._clock()

    # --- life ----------------------------------------------------------------------------

    def now(self) -> float:
        """The manager's wall clock (seconds since the epoch)."""
        return self._clock()

    def stop(self) -> None:
        """Stop taking requests and dispatching; `run()` returns soon after."""
        self._stop.set()

    async def run(self) -> None:
        """Serve until `stop()`. The store must be open; it is left open."""
        started = self._started_at = self._clock()
        s = self.settings
        horizon = started if s.previous_run_gone else started - s.dispatch_timeout - SKEW
        released = await self.store.release_claims(before=horizon)
        if released:
            log.info("%d queued jobs claimed by an earlier run are queued again", released)
        if not s.previous_run_gone:
            self._spawn(self._release_claims_of_previous_run(started))
        self.store.subscribe(self._store_changed)
        await self._reattach_running()
        options = WorkerOptions(
            broker=s.broker,
            heartbeat_interval=s.heartbeat_interval,
            liveness=s.liveness,
            grace=s.grace,
            socket_options=s.socket_options,
        )
        # One pool of connections per broker: every jobs.* and titanic.* connection on this
        # loop, without a future per message (services/jobs/pool.py).
        self.pools = [
            WorkerPool(
                self._services(),
                dataclasses.replace(options, broker=broker),
                context=self._context,
            )
            for broker in (s.broker, *s.also_serve_on)
        ]
        loops = [
            asyncio.create_task(self._dispatch_loop(), name="jobs-dispatch"),
            asyncio.create_task(self._lease_loop(), name="jobs-lease"),
            asyncio.create_task(self._mmi_loop(), name="jobs-mmi"),
            asyncio.create_task(self._retention_loop(), name="jobs-retention"),
        ]
        runs = [asyncio.create_task(pool.run(), name="jobs-serve") for pool in self.pools]
        self.ready.set()
        log.info("serving jobs.* and titanic.* on %s", s.broker)
        try:
            await self._stop.wait()
        finally:
            for pool in self.pools:
                pool.stop(s.grace)
            for task in loops:
                task.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*runs, return_exceptions=True), s.grace + 2.0)
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            for client in (*self.followers.values(), self.control, self.anywhere):
                client.close()
            if self._own_context:
                self._context.destroy(linger=0)

    def _services(self) -> list[tuple[Service, int]]:
        s = self.settings
        guarded = _guarded
        return [
            (Service("jobs.submit", guarded(self._submit)), s.submit_connections),
            (Service("jobs.status", guarded(self._status)), s.read_connections),
            (Service("jobs.result", guarded(self._result)), s.read_connections),
            (Service("jobs.logs", guarded(self._logs)), s.read_connections),
            (Service("jobs.cancel", guarded(self._cancel_jobs)), s.read_connections),
            (Service("jobs.list", guarded(self._list)), s.read_connections),
            (Service("titanic.request", self._titanic_request), s.submit_connections // 4 or 1),
            (Service("titanic.reply", self._titanic_reply), s.read_connections),
            (Service("titanic.close", self._titanic_close), s.read_connections),
        ]

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("job task failed", exc_info=task.exception())

    async def _sleep(self, seconds: float) -> bool:
        """Sleep unless stopped; True when stopped."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)
        return self._stop.is_set()

    # --- change notification (long polls) ------------------------------------------------

    def _notify(self, job_id: str) -> None:
        for future in self._watchers.pop(job_id, ()):
            if not future.done():
                future.set_result(None)

    async def _changed(self, job_id: str, timeout: float) -> None:
        """Return when this manager changed the job, or after `timeout` (at most WAIT_SLICE)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._watchers[job_id].append(future)
        try:
            await asyncio.wait_for(future, min(timeout, WAIT_SLICE))
        except TimeoutError:
            watchers = self._watchers.get(job_id)
            if watchers is not None and future in watchers:
                watchers.remove(future)
                if not watchers:
                    del self._watchers[job_id]

    # --- applying events -----------------------------------------------------------------

    async def _apply(self, job: Job, event: Event, **payload: Any) -> Job | None:
        """Apply `event` to `job` (core.step + one compare-and-set). On a race, re-read the
        job and decide again. None when the event does not apply to the job any more."""
        for _ in range(3):
            if event is Event.FINAL:
                payload["cancel_requested"] = (
                    job.cancel_requested or job.id in self._cancel_requested
                )
            decision = step(job.state, event, at=self._clock(), **payload)
            if decision is None:
                return None
            changes = decision.changes
            if event is Event.STARTED:
                # The run is ours to follow: hold it with a lease (renewed by _lease_loop).
                lease_until = self._clock() + self.settings.lease
                changes = {**changes, "owner": self.settings.name, "lease_until": lease_until}
                self._following.add(job.id)
            updated = await self.store.update(job.id, decision.expect, **changes)
            if updated is not None:
                self._notify(job.id)
                return updated
            fresh = await self.store.get(job.id)
            if not isinstance(fresh, Job):
                return None
            job = fresh
        return None

    # --- dispatch ------------------------------------------------------------------------

    def _window(self, service: str) -> int:
        if not self._mmi_ok:
            return self.settings.default_window
        return 2 * self._workers_of.get(service, 0)

    async def _dispatch_loop(self) -> None:
        """Claim queued jobs and start them, per service, within its window.

        Claims run one window ahead of dispatch (`_buffer`), so a slot freed by a FINAL is
        refilled at once from memory, without waiting for a commit."""
        while not self._stop.is_set():
            self._wake.clear()
            try:
                services = await self.store.queued_services()
                for service in {*services, *(k for k, v in self._buffer.items() if v)}:
                    self._start_buffered(service)
                wanted = [
                    (service, room)
                    for service in services
                    if (
                        room := 2 * self._window(service)
                        - self._in_flight[service]
                        - len(self._buffer[service])
                    )
                    > 0
                ]
                now = self._clock()
                # The claim records the attempt (request_id, start_by) before it is sent.
                start_by = now + self.settings.dispatch_timeout
                claims = await asyncio.gather(
                    *(
                        self.store.claim(service, room, now, self.settings.name, start_by)
                        for service, room in wanted
                    )
                )
            except StoreError as exc:
                log.error("dispatch: %s", exc)
                await self._sleep(1.0)
                continue
            for (service, _), jobs in zip(wanted, claims, strict=True):
                self._buffer[service].extend(jobs)
                self._start_buffered(service)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 1.0)

    def _start_buffered(self, service: str) -> None:
        """Dispatch claimed jobs of `service` while its window has room."""
        buffer = self._buffer.get(service)
        now = self._clock()
        while buffer and self._in_flight[service] < self._window(service):
            job = buffer.popleft()
            if (job.claimed or now) + self.settings.dispatch_timeout / 2 < now:
                # Held too long (the window shrank): its start_by would be too close to the
                # moment peers may take the claim over. Give it back instead of sending it
                # (unsent: settled, unless an earlier attempt is in doubt).
                if not self.store.shared:
                    self._spawn(self._apply(job, Event.SILENT if job.in_doubt else Event.EXPIRED))
                continue
            self._in_flight[service] += 1
            self._spawn(self._dispatch(job))

    async def _dispatch(self, job: Job) -> None:
        self.dispatched += 1
        held = True

        def release() -> None:
            # The worker is free once its FINAL is here: the slot goes to the next job now,
            # while this one's result is being committed.
            nonlocal held
            if held:
                held = False
                self._in_flight[job.service] -= 1
                self._start_buffered(job.service)
                self._wake.set()

        try:
            if job.in_doubt and job.kind == "command":
                resolved = await self._resolve(job, release)
                if resolved is None:
                    return  # re-attached, given back, or lost
                job = resolved
            # start_by counts from the claim, so it is past before any peer may take the
            # claim over (dispatch timeout + skew after the claim).
            start_by = job.start_by
            if start_by is None:
                start_by = (job.claimed or self._clock()) + self.settings.dispatch_timeout
            outcome, job = await self._follow(
                job,
                _request(job, start_by),
                max(0.1, start_by + SKEW - self._clock()),
                release,
            )
            if outcome == "silent-queued":
                await self._apply(job, Event.SILENT)
            elif outcome in ("silent-running", "expired-running"):
                await self._reattach(job)
        except StoreError as exc:
            log.error("job %s: %s", job.id, exc)
        finally:
            release()
            self._following.discard(job.id)

    async def _follow(
        self,
        job: Job,
        body: list[bytes],
        first_silence: float,
        release: Callable[[], None] | None = None,
        *,
        client: Client | None = None,
        target: str | None = None,
    ) -> tuple[str, Job]:
        """Send `body` for `job` and store what comes back. Returns how it ended, and the job
        as last stored: `done` (the job is terminal), `gone` (it changed under us: cancelled,
        ...), `silent-queued`, `expired-queued` (nothing started; the claim is released),
        `silent-running`, `expired-running` (it had started; someone must re-attach).

        `started` is committed while the stream goes on (its write is queued before any later
        one of this job, and awaited before the FINAL's); `release` is called when the FINAL
        arrives, before it is committed. `client` and `target` (default: the dispatch broker,
        the job's service) say where the request goes; with a `target`, an `expired` answer
        leaves a queued job's attempt on record (a re-attach: that worker did not know it)."""
        state = job.state
        started: asyncio.Future[Job | None] | None = None

        async def settle() -> Job | None:
            nonlocal started
            if started is None:
                return job
            recorded, started = await started, None
            return recorded

        parts = (client or self.client).stream(target or job.service, *body)
        async with contextlib.aclosing(parts):
            while True:
                silence = first_silence if state == "queued" else self.settings.liveness_timeout
                try:
                    part = await asyncio.wait_for(anext(parts), silence)
                except (TimeoutError, MDPError):
                    recorded = await settle()
                    if recorded is None:
                        return "gone", job
                    return f"silent-{state}", recorded
                if not part.final:
                    try:
                        event = parse_partial(part.body)
                    except BodyError:
                        continue  # not a command service's PARTIAL: nothing to store
                    if isinstance(event, Started) and state == "queued":
                        worker = event.worker.model_dump(exclude_none=True)
                        started = asyncio.ensure_future(self._record_started(job, worker))
                        state = "running"
                    elif isinstance(event, Output):
                        await self.store.append_output(
                            job.id, [(event.stream, event.data)], self.settings.max_log
                        )
                        self._notify(job.id)
                    continue  # progress, or a re-attached run repeating `started`
                if release is not None:
                    release()
                recorded = await settle()
                if recorded is None:
                    return "gone", job
                job = recorded
                status, exit_code, message = _interpret(job.kind, part.body)
                if status == "expired":
                    if state == "queued":
                        await self._apply(job, Event.SILENT if target else Event.EXPIRED)
                    return f"expired-{state}", job
                done = await self._apply(
                    job,
                    Event.FINAL,
                    status=status,
                    result=part.body,
                    exit_code=exit_code,
                    message=message,
                )
                self._cancel_requested.discard(job.id)
                return ("done", done) if done is not None else ("gone", job)

    async def _record_started(self, job: Job, worker: dict[str, Any]) -> Job | None:
        """Store `started`; the job after it, or None if it is no longer ours to follow."""
        updated = await self._apply(job, Event.STARTED, worker=worker)
        if updated is not None:
            return updated
        fresh = await self.store.get(job.id)
        if isinstance(fresh, Job) and fresh.state == "running":
            return fresh  # already stored as running (a stale copy of the job)
        # Cancelled (or ended) while its request was on the way: stop the run.
        self._spawn(self._cancel_on_worker(job, worker))
        return None

    async def _reattach_running(self) -> None:
        """At start: every `running` job that is ours gets a re-attach task (spec/jobs.md §4):
        all of them in a store only we use; with peers, those of our name (our previous run)
        and those whose lease ran out."""
        if self.store.shared:
            while await self._take_over(self._clock(), own=True) == TAKE_OVER_BATCH:
                pass
            return
        cursor: int | None = None  # only we use this store: every running job is ours
        while True:
            page = await self.store.list_jobs(states={"running"}, before=cursor, limit=1000)
            for job in page:
                self._following.add(job.id)
                self._in_flight[job.service] += 1
                self._spawn(self._reattach_task(job))
            if len(page) < 1000:
                return
            cursor = page[-1].seq

    async def _take_over(self, now: float, *, own: bool = False) -> int:
        """Take over (and re-attach) a batch of running jobs whose lease ran out."""
        jobs = await self.store.take_over(
            self.settings.name,
            now,
            self._clock() + self.settings.lease,
            TAKE_OVER_BATCH,
            own=own,
        )
        for job in jobs:
            if job.id in self._following:
                continue  # already ours and followed (our lease just lapsed)
            if own is False or job.owner != self.settings.name:
                log.info("job %s: taken over (its job service stopped renewing)", job.id)
            self.taken_over += 1
            self._following.add(job.id)
            self._in_flight[job.service] += 1
            self._spawn(self._reattach_task(job))
        return len(jobs)

    async def _lease_loop(self) -> None:
        """Renew the leases of the runs we follow; take over the runs of dead peers; release
        queued claims that can no longer start (a dead peer's)."""
        s = self.settings
        while not await self._sleep(s.lease / 3):
            try:
                now = self._clock()
                if self._following:
                    held = await self.store.renew(s.name, set(self._following), now + s.lease)
                    for lost in self._following - held:
                        # Another job service took it over (we could not renew in time) or it
                        # ended: it follows the run now; ours ends at its next event.
                        self._following.discard(lost)
                if self.store.shared:
                    await self._cancels_from_peers(list(self._following))
                    await self._take_over(now)
                    released = await self.store.release_claims(
                        before=now - s.dispatch_timeout - SKEW
                    )
                    if released:
                        log.info("%d stale claims released (a job service stopped)", released)
                        self._wake.set()
            except StoreError as exc:
                log.warning("leases: %s", exc)

    def _store_changed(self, kind: str, job_id: str) -> None:
        """A hint from the store: another process changed something."""
        if kind == "queued":
            self._wake.set()
        elif job_id:
            self._notify(job_id)
            if job_id in self._following and job_id not in self._cancel_requested:
                self._spawn(self._cancels_from_peers([job_id]))

    async def _cancels_from_peers(self, ids: list[str]) -> None:
        """A cancel is a row: another job service may have set `cancel_requested` on a run we
        follow. We hold it, so we ask its worker (on our broker) to stop, and count the FINAL
        as a cancel."""
        if not ids:
            return
        try:
            found = await self.store.get_many(ids)
        except StoreError as exc:
            log.warning("cancel check: %s", exc)
            return
        for job in found:
            if (
                isinstance(job, Job)
                and job.cancel_requested
                and job.state == "running"
                and job.id not in self._cancel_requested
            ):
                self._cancel_requested.add(job.id)
                if job.worker:
                    self._spawn(self._cancel_on_worker(job, job.worker))

    async def _reattach_task(self, job: Job) -> None:
        try:
            await self._reattach(job)
        except StoreError as exc:
            log.error("job %s: %s", job.id, exc)
        finally:
            self._in_flight[job.service] -= 1
            self._following.discard(job.id)
            self._wake.set()

    async def _reattach(self, job: Job) -> None:
        """Follow a started job again without starting it anew, or declare it lost.

        The same request (same request_id, a `start_by` long past) goes to the worker that
        said `started`, at its `SERVICE@NAME`, through each broker in turn while they stay
        silent: it answers from its duplicate protection (the run's PARTIALs and FINAL, or
        the stored FINAL). `expired` from it means it does not know the run (it restarted):
        lost. A worker without a name is asked at SERVICE, where any other worker answers
        `expired` and runs nothing."""
        fresh = await self.store.get(job.id)
        if not isinstance(fresh, Job) or fresh.state != "running":
            return
        job = fresh
        if job.kind == "command":
            body = _request(job, PAST)
            target = _address(job.service, (job.worker or {}).get("name"))
            deadline = self._clock() + self.settings.reattach_timeout
            answers = 0
            turn = 0
            while self._clock() < deadline and not self._stop.is_set():
                client = self.client
                if target is not None:
                    client = self.followers[self.brokers[turn % len(self.brokers)]]
                    turn += 1
                outcome, job = await self._follow(
                    job, body, self.settings.liveness_timeout, client=client, target=target
                )
                if outcome in ("done", "gone"):
                    return
                if outcome == "expired-running":
                    answers += 1
                    if target is not None:
                        break  # the worker itself does not know the run
                    if answers >= max(2, 2 * self._workers_of.get(job.service, 1)):
                        break
                fresh = await self.store.get(job.id)
                if not isinstance(fresh, Job) or fresh.terminal:
                    return
                job = fresh
        if self._stop.is_set():
            return  # the next start re-attaches it
        lost = await self._apply(
            job,
            Event.REATTACH_FAILED,
            message="its worker could not be reached or no longer knew the run",
        )
        if lost is not None and job.worker:
            # So that it cannot go on unseen: the worker kills it, or never starts it.
            await self._cancel_on_worker(job, job.worker)

    async def _resolve(self, job: Job, release: Callable[[], None]) -> Job | None:
        """A claimed job whose previous attempt (`job.request_id`) may have started unseen --
        its dispatcher died, or it went silent before `started`: find out before anything new
        is sent (spec/jobs.md §4). Returns the job with a new attempt on record, to send; or
        None when it was handled here (re-attached, given back, lost).

        Once that attempt can no longer start (its `start_by` + skew passed), every worker of
        the service is asked at `SERVICE@NAME`, through every broker, whether it knows the
        request_id, with a fence (a worker that does not know it will never start it;
        `services.locate`). One knows it: re-attach there (the same request with a `start_by`
        long past; its duplicate protection follows the run or returns the stored FINAL).
        Every worker answered and none knows it: a new attempt under a new request_id,
        recorded before it is sent. Otherwise the claim is given back and the question asked
        again; after --reattach-timeout the job is `lost`."""
        assert job.request_id is not None and job.start_by is not None
        s = self.settings
        start_by = job.start_by
        if s.previous_run_gone and start_by < self._started_at + s.dispatch_timeout:
            # An attempt of the previous run, whose workers went with it: nothing can run it.
            return await self._new_attempt(job, job.request_id)
        wait = start_by + SKEW - self._clock()
        if wait > 0 and await self._sleep(wait):
            return None  # stopping: the claim is released at the next start
        found = await locate(
            self.anywhere, job.service, job.request_id, fence=True, timeout=LOOKUP_TIMEOUT
        )
        if found.known and found.worker:
            log.info(
                "job %s: attempt %s %s on %s: re-attached",
                job.id,
                job.request_id,
                found.state,
                found.worker,
            )
            outcome, job = await self._follow(
                job,
                _request(job, PAST),
                s.liveness_timeout,
                release,
                client=self.followers.get(found.endpoint or "", self.client),
                target=f"{job.service}@{found.worker}",
            )
            if outcome == "silent-queued":
                await self._apply(job, Event.SILENT)
            elif outcome in ("silent-running", "expired-running"):
                await self._reattach(job)
            return None
        if found.absent:
            if found.unaskable:
                log.warning(
                    "job %s: attempt %s: workers that cannot be asked: %s",
                    job.id,
                    job.request_id,
                    found.unaskable,
                )
            return await self._new_attempt(job, _next_request_id(job))
        log.info(
            "job %s: attempt %s: no answer from %s; asking again later",
            job.id,
            job.request_id,
            found.unanswered or "any broker",
        )
        if self._clock() > start_by + s.reattach_timeout:
            await self._apply(
                job,
                Event.REATTACH_FAILED,
                message="an attempt may have started on a worker that does not answer",
            )
            return None
        await self._sleep(CONTROL_TIMEOUT)  # not a tight loop of questions
        await self._apply(job, Event.SILENT)
        return None

    async def _new_attempt(self, job: Job, request_id: str) -> Job | None:
        """Record a new attempt of a job we claimed (None: the claim is not ours any more)."""
        assert job.claimed is not None
        now = self._clock()
        return await self.store.record_attempt(
            job.id, job.claimed, request_id, now + self.settings.dispatch_timeout, now
        )

    async def _release_claims_of_previous_run(self, started: float) -> None:
        """Claims older than our start are a previous run's; once their `start_by` (+ skew)
        is surely past, nothing can start them any more: queue them again."""
        if await self._sleep(self.settings.dispatch_timeout + SKEW):
            return
        released = await self.store.release_claims(before=started)
        if released:
            log.info("%d queued jobs claimed by an earlier run are queued again", released)
            self._wake.set()

    async def _mmi_loop(self) -> None:
        while not self._stop.is_set():
            try:
                services = await self.control.services()
            except MMINotImplemented:
                log.warning(
                    "the broker has no mmi.services: %d requests per service in flight",
                    self.settings.default_window,
                )
                self._mmi_ok = False
                self._wake.set()
                return
            except (MDPError, ProtocolError) as exc:
                log.debug("mmi.services: %s", exc)
            else:
                workers = {info.name: info.workers for info in services}
                if workers != self._workers_of:
                    self._workers_of = workers
                    self._wake.set()
            await self._sleep(self.settings.mmi_interval)

    async def _cancel_unseen(self, job: Job) -> None:
        """A queued job was cancelled while an attempt of it may be on its way or running
        with nobody following it (its `started` was never stored): every worker is told
        never to start its request_id (the fence of `services.locate`), and the one that
        runs it, if any, gets the cancel message. The job stays `cancelled`."""
        assert job.request_id is not None
        found = await locate(
            self.anywhere, job.service, job.request_id, fence=True, timeout=LOOKUP_TIMEOUT
        )
        if found.state == "running" and found.worker:
            await self._cancel_on_worker(job, {"name": found.worker})
        elif not (found.known or found.absent):
            log.warning(
                "job %s: cancelled; whether attempt %s runs unseen is unknown (no answer from %s)",
                job.id,
                job.request_id,
                found.unanswered or "any broker",
            )

    async def _cancel_on_worker(self, job: Job, worker: dict[str, Any]) -> None:
        """Send the command service's cancel message for the job's run to the worker running
        it (through any broker)."""
        job_id = job.id
        name = worker.get("name")
        if not name:
            log.warning("job %s: its worker has no name; it cannot be cancelled", job_id)
            return
        address = f"{job.service}@{name}"
        try:
            validate_service_name(address.encode())
            cancel = CancelRequest(cancel=job.request_id or job_id)
            reply = await self.anywhere.request(address, cancel.pack())
            outcome = parse_cancel_reply(reply).cancel
        except (MDPError, BodyError) as exc:
            log.warning("job %s: cancel via %s failed: %s", job_id, address, exc)
            return
        log.info("job %s: cancel via %s: %s", job_id, address, outcome)

    # --- retention -----------------------------------------------------------------------

    async def purge_once(self) -> int:
        """Run retention until nothing is due (bounded batches). Returns rows removed."""
        s = self.settings
        removed = 0
        while not self._stop.is_set():
            now = self._clock()
            counts = await self.store.purge(
                output_before=now - s.keep,
                output_failed_before=now - s.keep_failed,
                record_before=now - s.keep_records,
                record_failed_before=now - max(s.keep_records, s.keep_failed),
                tombstone_before=now - s.keep_tombstones,
                now=now,
                batch=s.purge_batch,
            )
            removed += counts.total
            if counts.total == 0:
                break
            await asyncio.sleep(0)  # submits and dispatches go between batches
        return removed

    async def _retention_loop(self) -> None:
        while not self._stop.is_set():
            try:
                removed = await self.purge_once()
                if removed:
                    log.info("retention removed %d rows", removed)
            except StoreError as exc:
                log.error("retention: %s", exc)
            await self._sleep(self.settings.purge_interval)

    # --- jobs.* --------------------------------------------------------------------------

    async def submit(self, new: NewJob) -> SubmitOutcome:
        """Commit a new job (durably) and wake the dispatcher."""
        outcome = await self.store.submit(new)
        if (
            outcome.outcome == "created"
            and self._window(new.service) > self._in_flight[new.service]
        ):
            # Only when it could be dispatched now: a full window wakes the loop as it drains.
            self._wake.set()
        return outcome

    async def _submit(self, request: Request) -> list[bytes]:
        sub = wire.parse(wire.SubmitJob, request.body)
        job_id = sub.id or uuid.uuid4().hex
        if sub.request is not None:
            kind: Any = "command"
            body = [sub.request.model_copy(update={"request_id": job_id}).pack()]
        else:
            kind, body = "frames", list(sub.frames or ())
        done = await self.submit(NewJob(job_id, kind, sub.service, body, self._clock()))
        if done.outcome in ("conflict", "expired"):
            return wire.answer(
                done.outcome,
                id=job_id,
                message=(
                    "this id names another job"
                    if done.outcome == "conflict"
                    else "this id belonged to a job that was purged; ids are not reused"
                ),
            )
        assert done.job is not None
        return wire.answer(id=job_id, state=done.job.state, created=done.outcome == "created")

    async def _status(self, request: Request) -> list[bytes]:
        asked = wire.parse(wire.StatusOfJobs, request.body)
        found = await self.store.get_many(asked.ids)
        jobs = [
            wire.lookup_map(job_id, job, with_request=True)
            for job_id, job in zip(asked.ids, found, strict=True)
        ]
        return wire.answer(jobs=jobs)

    async def _result(self, request: Request) -> list[bytes]:
        asked = wire.parse(wire.JobResult, request.body)
        deadline = self._clock() + asked.wait
        while True:
            found = await self.store.get(asked.id)
            if not isinstance(found, Job) or found.terminal or self._clock() >= deadline:
                break
            await self._changed(asked.id, deadline - self._clock())
        out: dict[str, Any] = {"job": wire.lookup_map(asked.id, found, with_request=True)}
        if isinstance(found, Job) and found.terminal and found.result is not None:
            if found.kind == "command":
                try:
                    out["result"] = unpack_map(found.result[0])
                except BodyError:
                    out["frames"] = found.result
            else:
                out["frames"] = found.result
        return wire.answer(**out)

    async def _logs(self, request: Request) -> list[bytes]:
        asked = wire.parse(wire.JobLogs, request.body)
        deadline = self._clock() + asked.wait
        while True:
            found = await self.store.get(asked.id)
            chunks = (
                await self.store.output(asked.id, asked.from_, asked.limit)
                if isinstance(found, Job)
                else []
            )
            active = isinstance(found, Job) and found.state in ACTIVE
            if chunks or not active or self._clock() >= deadline:
                break
            await self._changed(asked.id, deadline - self._clock())
        state = wire.lookup_map(asked.id, found, with_request=False)["state"]
        following = chunks[-1].n + 1 if chunks else asked.from_
        done = not active and (not isinstance(found, Job) or following >= found.output_chunks)
        return wire.answer(
            state=state,
            chunks=[{"n": c.n, "stream": c.stream, "data": c.data} for c in chunks],
            next=following,
            done=done,
        )

    async def cancel(self, job_id: str) -> tuple[str, str]:
        """Cancel one job: (its state now, what the cancel did), as jobs.cancel answers."""
        found = await self.store.get(job_id)
        if found is None:
            return "unknown", "unknown"
        if isinstance(found, Tombstone):
            return "expired", "expired"
        if found.terminal:
            return found.state, "finished"
        updated = await self._apply(found, Event.CANCEL)
        if updated is None:
            fresh = await self.store.get(job_id)
            state = fresh.state if isinstance(fresh, Job) else "expired"
            return state, "finished"
        if updated.state == "cancelled":
            buffer = self._buffer.get(updated.service)
            if buffer:  # claimed but not sent yet: it must not be
                self._buffer[updated.service] = collections.deque(
                    job for job in buffer if job.id != job_id
                )
            if updated.kind == "command" and updated.start_by is not None:
                # An attempt may be on its way or running unseen (in doubt): fence it
                # everywhere and stop it where it runs.
                self._spawn(self._cancel_unseen(updated))
            return "cancelled", "cancelled"
        self._cancel_requested.add(job_id)
        if updated.worker:
            self._spawn(self._cancel_on_worker(updated, updated.worker))
        return updated.state, "requested"

    async def _cancel_jobs(self, request: Request) -> list[bytes]:
        asked = wire.parse(wire.CancelJobs, request.body)
        jobs = []
        for job_id in asked.ids:
            state, outcome = await self.cancel(job_id)
            jobs.append({"id": job_id, "state": state, "cancel": outcome})
        return wire.answer(jobs=jobs)

    async def _list(self, request: Request) -> list[bytes]:
        asked = wire.parse(wire.ListJobs, request.body)
        jobs = await self.store.list_jobs(
            states=asked.state,
            service=asked.service,
            since=asked.since,
            before=asked.before,
            limit=asked.limit,
        )
        out: dict[str, Any] = {"jobs": [wire.job_map(job) for job in jobs]}
        if len(jobs) == asked.limit:
            out["next"] = jobs[-1].seq
        return wire.answer(**out)

    # --- titanic.* (RFC 9) ---------------------------------------------------------------

    async def _titanic_request(self, request: Request) -> list[bytes]:
        return await titanic.request(self, request.body)

    async def _titanic_reply(self, request: Request) -> list[bytes]:
        return await titanic.reply(self, request.body)

    async def _titanic_close(self, request: Request) -> list[bytes]:
        return await titanic.close(self, request.body)


def _guarded(
    handler: Callable[[Request], Awaitable[list[bytes]]],
) -> Callable[[Request], Awaitable[list[bytes]]]:
    """A jobs.* handler whose bad input and store failures become answers, not exceptions."""

    async def guarded(request: Request) -> list[bytes]:
        try:
            return await handler(request)
        except BodyError as exc:
            return wire.error_answer(exc)
        except StoreError as exc:
            log.error("%s: %s", request.service, exc)
            return wire.answer("error", message=str(exc))

    return guarded


def _request(job: Job, start_by: float) -> list[bytes]:
    """The body to send for `job`: a command gets this attempt's request_id and `start_by`."""
    if job.kind != "command":
        return list(job.request)
    body = msgpack.unpackb(job.request[0], raw=False)
    body["request_id"] = job.request_id or job.id
    body["start_by"] = start_by
    return [pack(body)]


def _address(service: str, name: str | None) -> str | None:
    """`SERVICE@NAME` of a named worker, or None (no name, or not a valid service name)."""
    if not name:
        return None
    address = f"{service}@{name}"
    try:
        validate_service_name(address.encode())
    except ProtocolError:
        return None
    return address


def _next_request_id(job: Job) -> str:
    """A request_id for a new attempt of `job` after its previous one was fenced."""
    candidate = f"{job.id}.{job.attempts}"
    return candidate if len(candidate) <= MAX_REQUEST_ID else uuid.uuid4().hex


def _interpret(kind: str, frames: list[bytes]) -> tuple[str, int | None, str | None]:
    """(job state word, exit code, message) for a FINAL body."""
    try:
        result = parse_result(frames)
    except BodyError:
        if kind == "frames":
            return "ok", None, None  # RFC 9: any reply is the reply
        return "error", None, "the service answered with a body that is not a command result"
    return result.status, result.exit_code, result.message
