"""The job store interface: what `mdp-jobs` needs from a database, and nothing more.

Shaped like procrastinate's connector: a handful of async methods, each one transaction, so a
SQLite store (the default, `sqlite.py`) and a PostgreSQL store pass one shared test-suite
(`tests/unit/jobs/test_store.py`, parametrized on the store).

Rules every implementation keeps:

- **Durable on return.** When an awaited write returns, it is committed and survives a crash of
  the process or the machine (SQLite: WAL + synchronous=FULL). Implementations batch concurrent
  writes into one transaction (group commit) so durability does not cost throughput.
- **The store knows no transitions.** Which state may follow which is the job core's business
  (`services/jobs/core.py`); `update()` is a compare-and-set on the state, so two writers (or a
  stale task) can never move a job backwards.
- **Times are wall-clock seconds** (`time.time()`), chosen by the caller, so tests control them.
- **Never touch what is not ours.** Opening a file that is corrupt, foreign or of a newer schema
  raises `StoreCorrupt` without writing a byte to it.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "ACTIVE",
    "FAILED",
    "STATES",
    "TERMINAL",
    "Chunk",
    "Job",
    "JobStore",
    "NewJob",
    "PurgeCounts",
    "StoreCorrupt",
    "StoreError",
    "StoreFull",
    "SubmitOutcome",
    "Tombstone",
]

ACTIVE = frozenset({"queued", "running"})
"""States of a job that has not ended."""
TERMINAL = frozenset(
    {"ok", "failed", "timeout", "error", "invalid", "rejected", "cancelled", "lost"}
)
"""States of a job that has ended; a terminal job never changes state again."""
FAILED = TERMINAL - {"ok"}
"""Terminal states kept for `--keep-failed` rather than `--keep`."""
STATES = ACTIVE | TERMINAL

Kind = Literal["command", "frames"]
"""`command`: the request is one msgpack map of `spec/command-service.md`; `frames`: opaque
body frames (RFC 9 requests), passed through untouched."""

UPDATABLE = frozenset(
    {
        "state",
        "claimed",
        "started",
        "worker",
        "finished",
        "result",
        "exit_code",
        "message",
        "cancel_requested",
        "owner",
        "lease_until",
        "request_id",
        "start_by",
    }
)
"""The fields `JobStore.update()` may change."""


class StoreError(Exception):
    """The store failed; the operation did not happen (nothing was committed)."""


class StoreFull(StoreError):
    """The disk (or the database's size limit) is full: writes fail, stored jobs are kept."""


class StoreCorrupt(StoreError):
    """The database is corrupt, not ours, or of a newer schema; it was left untouched."""


@dataclass(frozen=True, slots=True)
class NewJob:
    """A job as submitted: who runs it (`service`) and what is sent (`request`)."""

    id: str
    kind: Kind
    service: str
    request: list[bytes]
    """Body frames as they will be sent (for `command`: one msgpack map, request_id = id)."""
    created: float


@dataclass(frozen=True, slots=True)
class Job:
    """A stored job."""

    id: str
    seq: int
    """Order of submission (unique, increasing): the queue order and the listing cursor."""
    kind: Kind
    service: str
    request: list[bytes]
    state: str
    created: float
    attempts: int = 0
    """How many times a dispatch was claimed (sent, or about to be)."""
    claimed: float | None = None
    """When a dispatcher claimed the job (still `queued`); None when nobody holds it."""
    started: float | None = None
    worker: dict[str, Any] | None = None
    """The worker that said `started` (`{"host", "pid", "id", ...}`)."""
    finished: float | None = None
    result: list[bytes] | None = None
    """The FINAL body frames; None before the end, for jobs that ended without one, and after
    retention removed the output."""
    exit_code: int | None = None
    message: str | None = None
    cancel_requested: bool = False
    output_chunks: int = 0
    output_bytes: int = 0
    output_truncated: bool = False
    """Some output chunks were not stored: the per-job cap was reached."""
    output_purged: bool = False
    """Retention removed the stored output and the FINAL body (the record remains)."""
    owner: str | None = None
    """The job service (`mdp-jobs --name`) that claimed the job or follows its run."""
    lease_until: float | None = None
    """A running job is its owner's until then; it renews the lease while it follows the run.
    Past it (the owner died), another job service takes the job over (`take_over`)."""
    request_id: str | None = None
    """The request_id of the latest attempt (the job id, unless an earlier attempt's fate was
    never learnt); recorded by `claim()` or `record_attempt()` before the attempt is sent. For
    a running or finished job: the request_id of its run."""
    start_by: float | None = None
    """That attempt's start deadline (spec/command-service.md §14.1) while it may still be
    running somewhere unseen; None once its fate is known not to matter (never sent, or
    refused `expired`)."""
    in_doubt: bool = False
    """Set by `claim()` only (not stored): the job's previous attempt (`request_id`) was sent,
    or may have been, and nobody learnt its fate -- its dispatcher died, or it went silent. It
    may be running on some worker: the claimer must find out before sending anything new."""

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL


@dataclass(frozen=True, slots=True)
class Tombstone:
    """What remains of a job whose record was purged (or closed): enough to say `expired`."""

    id: str
    state: str
    """The state the job had when its record went."""
    finished: float | None
    purged: float


@dataclass(frozen=True, slots=True)
class Chunk:
    """One stored piece of output, numbered from 0 per job."""

    n: int
    stream: str
    """`stdout` or `stderr`."""
    data: bytes


@dataclass(frozen=True, slots=True)
class SubmitOutcome:
    """What `JobStore.submit()` did.

    `created`: the job is new. `existing`: a job with this id and the same service and request
    exists (idempotent submit; `job` is it). `conflict`: the id names a different job.
    `expired`: the id belonged to a job that retention purged; it cannot be reused.
    """

    outcome: Literal["created", "existing", "conflict", "expired"]
    job: Job | None


@dataclass(frozen=True, slots=True)
class PurgeCounts:
    """What one `JobStore.purge()` batch removed."""

    outputs: int = 0
    records: int = 0
    tombstones: int = 0

    @property
    def total(self) -> int:
        return self.outputs + self.records + self.tombstones


class JobStore(abc.ABC):
    """The async interface of a job store. Every method is one transaction."""

    shared: bool = False
    """True when several processes may use the store at once (PostgreSQL): running jobs are
    then held by leases and taken over when their owner dies. False (SQLite): the one process
    that opened the store owns every job."""

    def subscribe(self, callback: Callable[[str, str], None]) -> None:  # noqa: B027
        """Call `callback(kind, job_id)` when ANOTHER process changed the store: kind `queued`
        (a job became claimable; job_id may be empty) or `job` (that job changed or got
        output). Only a hint that may be lost: callers poll too. Default: never called (a
        store only one process uses)."""

    @abc.abstractmethod
    async def open(self) -> None:
        """Open (creating or migrating the schema). Raises StoreCorrupt, untouched, for a
        corrupt, foreign or newer database."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Finish pending writes and release the database. Idempotent."""

    # --- writes --------------------------------------------------------------------------

    @abc.abstractmethod
    async def submit(self, job: NewJob) -> SubmitOutcome:
        """Store a new `queued` job, idempotently on its id (see SubmitOutcome)."""

    @abc.abstractmethod
    async def claim(
        self,
        service: str,
        limit: int,
        now: float,
        owner: str = "",
        start_by: float | None = None,
    ) -> list[Job]:
        """Take up to `limit` of the oldest unclaimed `queued` jobs of `service`, in order:
        mark them claimed at `now` by `owner` and count an attempt. The caller dispatches them.
        Two callers at once (even in two processes) never get the same job.

        The claim is also the record of the attempt about to be sent (dispatch intent): a job
        whose previous attempt is settled (`start_by` is None) gets `request_id` (kept, or
        its id) and `start_by`. A job whose previous attempt is not settled keeps both and
        comes back `in_doubt`."""

    @abc.abstractmethod
    async def record_attempt(
        self, job_id: str, claimed: float, request_id: str, start_by: float, now: float
    ) -> Job | None:
        """The holder of a claim made at `claimed` records a new attempt before sending it:
        `request_id` and `start_by`, and the claim renewed to `now`, in one compare-and-set.
        None when the job is no longer `queued` under that claim (someone else holds it)."""

    @abc.abstractmethod
    async def renew(self, owner: str, ids: Collection[str], until: float) -> set[str]:
        """Extend to `until` the leases of the `running` jobs in `ids` that `owner` holds. The
        ids still held (a job missing was taken over, or ended)."""

    @abc.abstractmethod
    async def take_over(
        self, owner: str, now: float, until: float, limit: int, *, own: bool = False
    ) -> list[Job]:
        """Give `owner`, with a lease until `until`, up to `limit` `running` jobs whose lease
        ran out before `now` (or that have none) -- and with `own`, also those `owner` holds
        with a lease ending before `until` (a restarted job service of the same name takes
        its own back at once; the ones just taken are not taken again). The caller re-attaches
        them (spec/jobs.md §4)."""

    @abc.abstractmethod
    async def release_claims(self, before: float) -> int:
        """Forget the claims of `queued` jobs claimed before `before` (their dispatcher is gone:
        a restart, a crash): those jobs get dispatched again. Returns how many."""

    @abc.abstractmethod
    async def update(self, job_id: str, expect: Collection[str], **changes: Any) -> Job | None:
        """Change fields of a job whose state is in `expect` (compare-and-set); the job after
        the change, or None if it does not exist or is in another state. Fields: UPDATABLE."""

    @abc.abstractmethod
    async def append_output(
        self, job_id: str, chunks: Sequence[tuple[str, bytes]], cap: int
    ) -> Job | None:
        """Store output chunks `(stream, data)` numbered after the existing ones, while the
        job's stored output stays within `cap` bytes; chunks beyond it are dropped and the job
        marked `output_truncated`. None if the job does not exist."""

    @abc.abstractmethod
    async def delete(self, job_id: str, now: float) -> bool:
        """Remove a terminal job's record and output, leaving a tombstone. False when there is
        no such terminal job."""

    @abc.abstractmethod
    async def purge(
        self,
        *,
        output_before: float,
        output_failed_before: float,
        record_before: float,
        record_failed_before: float,
        tombstone_before: float,
        now: float,
        batch: int,
    ) -> PurgeCounts:
        """One bounded retention step: remove the output (chunks and FINAL) of at most `batch`
        terminal jobs finished before `output_before` (`ok`) / `output_failed_before` (other
        terminal states), the records (leaving tombstones) of at most `batch` finished before
        `record_before` / `record_failed_before`, and at most `batch` tombstones purged before
        `tombstone_before`. Never touches a queued or running job."""

    # --- reads ---------------------------------------------------------------------------

    @abc.abstractmethod
    async def get(self, job_id: str) -> Job | Tombstone | None:
        """The job, its tombstone if it was purged, or None if the id was never stored."""

    async def get_many(self, ids: Sequence[str]) -> list[Job | Tombstone | None]:
        """`get` of each id, in order (a store may answer them in one query)."""
        return [await self.get(job_id) for job_id in ids]

    @abc.abstractmethod
    async def list_jobs(
        self,
        *,
        states: Collection[str] | None = None,
        service: str | None = None,
        since: float | None = None,
        before: int | None = None,
        limit: int = 100,
    ) -> list[Job]:
        """Jobs newest first (by seq): in `states`, of `service`, created at or after `since`,
        with seq below `before` (the cursor for the next page); at most `limit`."""

    @abc.abstractmethod
    async def queued_services(self) -> list[str]:
        """The services that have unclaimed `queued` jobs."""

    @abc.abstractmethod
    async def output(self, job_id: str, start: int = 0, limit: int = 256) -> list[Chunk]:
        """Stored chunks numbered `start` and later, at most `limit`, in order."""

    @abc.abstractmethod
    async def counts(self) -> dict[str, int]:
        """How many jobs are in each state (states with none are left out)."""
