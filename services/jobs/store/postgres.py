"""The PostgreSQL job store: several `mdp-jobs` processes (on one or several machines) share
one database (the [postgres] extra: psycopg 3 and psycopg_pool).

Theory of operation
-------------------
- **The database coordinates; we add no protocol of our own.** Like procrastinate, Solid Queue
  or Airflow's HA scheduler, every decision that two processes could race on is one statement
  in one transaction: a claim is `UPDATE ... WHERE seq IN (SELECT ... FOR UPDATE SKIP LOCKED)`,
  so two managers claiming at the same moment take disjoint jobs without waiting for each
  other; a state change is a compare-and-set (`WHERE state IN expect`), so a stale writer can
  never move a job backwards; retention takes a transaction-level advisory lock
  (`pg_try_advisory_xact_lock`), so it runs in one place at a time.
- **Durable on return.** Every method is one transaction, committed before it returns, with
  the server's own durability (`synchronous_commit`, on by default). Submits are group-
  committed: those that arrive while earlier ones commit go together in the next transaction
  (one multi-row INSERT, one WAL flush), at most `MAX_COMMITTERS` transactions at a time.
- **Leases.** A running job is held by one owner (a manager process) until `lease_until`;
  `renew` extends the leases of the jobs it follows, `take_over` gives the jobs whose lease ran
  out (their owner died) to a live one, which re-attaches them by `request_id`.
- **Round trips.** Connections run in autocommit mode: a write that is one statement (submit,
  claim, update, renew, take-over) is one round trip and its own transaction; the others use
  an explicit transaction.
- **Wake-ups.** A trigger sends `pg_notify('mdp_jobs', '<origin> <kind> <id>')` for each
  submitted job, released claim and changed job, inside the writing transaction (delivered
  on commit); `<origin>` is the writing connection's `mdp.origin` setting. One listening
  connection per store passes the notifications of *other* stores to the callbacks of
  `subscribe()`. A notification is only a
  hint: a lost one (the listener was reconnecting) delays a waiter until its next poll, it
  never loses a job.
- **Connection loss.** Connections come from a psycopg pool that replaces broken ones. A
  broken connection fails the current transaction (nothing was committed, or the commit's
  outcome is unknown and the operation is idempotent on retry). `submit` and the reads fail
  fast with `StoreError` (a client is never told a job is stored that was not committed);
  `update` and `append_output` -- results and output of jobs that are running -- wait for the
  database to come back and then write, so nothing a worker returned is dropped.
- **Versioned schema.** Table `mdp_jobs_meta` holds our application name and the schema
  version; `MIGRATIONS[i]` takes the schema from version i to i+1, under an advisory lock so
  that several processes starting at once migrate it once. A database with a newer version,
  or with tables of ours but no meta row, raises `StoreCorrupt` and is left untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import uuid
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any, TypeVar

import psycopg
from psycopg import errors as pg_errors
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from services.jobs.store.base import (
    FAILED,
    TERMINAL,
    UPDATABLE,
    Chunk,
    Job,
    JobStore,
    NewJob,
    PurgeCounts,
    StoreCorrupt,
    StoreError,
    StoreFull,
    SubmitOutcome,
    Tombstone,
)
from services.jobs.store.rows import COLUMNS as _COLUMNS
from services.jobs.store.rows import job_from_row as _job
from services.jobs.store.rows import pack as _pack

__all__ = ["APPLICATION", "CHANNEL", "MIGRATIONS", "SCHEMA_VERSION", "PostgresStore"]

log = logging.getLogger("mdp.jobs.store.postgres")

T = TypeVar("T")

APPLICATION = "mdp-jobs"
"""The meta row that marks a database as an mdp job store."""
CHANNEL = "mdp_jobs"
"""The LISTEN/NOTIFY channel of wake-up hints."""
POOL_SIZE = 8
"""Connections per store: enough for concurrent submits to share the server's WAL flushes."""
CONNECT_TIMEOUT = 3.0
"""Seconds to wait for a connection before a submit or a read fails with StoreError."""
MAX_BATCH = 512
"""Most submits committed in one transaction."""
MAX_COMMITTERS = 4
"""Submit transactions in flight at once (each with the submits that queued meanwhile)."""
RETRY_CONNECT_TIMEOUT = 0.5
"""Seconds to wait for a connection when retrying after a lost one."""
RETRY_INTERVAL = 0.5
"""Seconds between the attempts of a write that waits for the database to come back."""
_MIGRATION_LOCK = 0x4D44504A0001
_RETENTION_LOCK = 0x4D44504A0002

MIGRATIONS: list[str] = [
    # 0 -> 1: the first schema.
    """
    CREATE TABLE mdp_jobs (
        seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,  -- queue order and list cursor
        id TEXT NOT NULL UNIQUE,
        kind TEXT NOT NULL,
        service TEXT NOT NULL,
        request BYTEA NOT NULL,                 -- msgpack list of body frames
        state TEXT NOT NULL,
        created DOUBLE PRECISION NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        claimed DOUBLE PRECISION,
        started DOUBLE PRECISION,
        worker BYTEA,                           -- msgpack map
        finished DOUBLE PRECISION,
        result BYTEA,                           -- msgpack list of FINAL frames
        exit_code INTEGER,
        message TEXT,
        cancel_requested BOOLEAN NOT NULL DEFAULT FALSE,
        output_chunks INTEGER NOT NULL DEFAULT 0,
        output_bytes BIGINT NOT NULL DEFAULT 0,
        output_truncated BOOLEAN NOT NULL DEFAULT FALSE,
        output_purged BOOLEAN NOT NULL DEFAULT FALSE,
        owner TEXT,                             -- the manager that holds the job
        lease_until DOUBLE PRECISION            -- ... until then (running jobs)
    );
    CREATE INDEX mdp_jobs_queue ON mdp_jobs (service, seq)
        WHERE state = 'queued' AND claimed IS NULL;
    CREATE INDEX mdp_jobs_claims ON mdp_jobs (claimed) WHERE state = 'queued';
    CREATE INDEX mdp_jobs_leases ON mdp_jobs (lease_until) WHERE state = 'running';
    CREATE INDEX mdp_jobs_state ON mdp_jobs (state, seq);
    CREATE INDEX mdp_jobs_service ON mdp_jobs (service, seq);
    CREATE INDEX mdp_jobs_output_retention ON mdp_jobs (finished)
        WHERE finished IS NOT NULL AND output_purged = FALSE;
    CREATE INDEX mdp_jobs_retention ON mdp_jobs (finished) WHERE finished IS NOT NULL;
    CREATE TABLE mdp_jobs_output (
        job_seq BIGINT NOT NULL,
        n INTEGER NOT NULL,
        stream TEXT NOT NULL,
        data BYTEA NOT NULL,
        PRIMARY KEY (job_seq, n)
    );
    CREATE TABLE mdp_jobs_tombstones (
        id TEXT PRIMARY KEY,
        state TEXT NOT NULL,
        finished DOUBLE PRECISION,
        purged DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX mdp_jobs_tombstones_purged ON mdp_jobs_tombstones (purged);
    -- Wake-up hints, sent by the database itself on commit: no extra round trip per write.
    -- The payload starts with the writer's origin (a session setting), so a store can skip
    -- its own changes.
    CREATE FUNCTION mdp_jobs_notify() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE
        kind TEXT;
    BEGIN
        IF TG_OP = 'INSERT' THEN
            kind := 'queued';
        ELSIF NEW.state = 'queued' AND NEW.claimed IS NULL AND OLD.claimed IS NOT NULL THEN
            kind := 'queued';
        ELSIF NEW.state <> OLD.state OR NEW.output_chunks <> OLD.output_chunks
                OR NEW.cancel_requested <> OLD.cancel_requested THEN
            kind := 'job';
        ELSE
            RETURN NULL;
        END IF;
        PERFORM pg_notify('mdp_jobs', coalesce(current_setting('mdp.origin', true), '-')
            || ' ' || kind || ' ' || NEW.id);
        RETURN NULL;
    END $$;
    CREATE TRIGGER mdp_jobs_notify AFTER INSERT OR UPDATE ON mdp_jobs
        FOR EACH ROW EXECUTE FUNCTION mdp_jobs_notify();
    """,
    # 1 -> 2: the attempt on record before it is sent (its request_id and start deadline), so
    # whoever dispatches the job next knows which request_id may be running somewhere.
    """
    ALTER TABLE mdp_jobs ADD COLUMN request_id TEXT, ADD COLUMN start_by DOUBLE PRECISION;
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)

_TERMINAL = sorted(TERMINAL)
_FAILED = sorted(FAILED)

Conn = psycopg.AsyncConnection[Any]


def _encode_change(name: str, value: Any) -> Any:
    if name == "worker":
        return None if value is None else _pack(value)
    if name == "result":
        return None if value is None else _pack(list(value))
    if name == "cancel_requested":
        return bool(value)
    return value


def _store_error(exc: Exception) -> StoreError:
    if isinstance(exc, pg_errors.DiskFull):
        return StoreFull(f"the job database is full: {exc}")
    if isinstance(exc, PoolTimeout):
        return StoreError("the job database cannot be reached (no connection)")
    return StoreError(f"job database error: {exc}".strip())


def _connection_lost(exc: Exception) -> bool:
    """True for errors after which the same operation may succeed on a new connection."""
    return isinstance(exc, psycopg.OperationalError | PoolTimeout)


class PostgresStore(JobStore):
    """A job store in a PostgreSQL database (`postgresql://user@host:port/dbname`)."""

    shared = True
    """Several processes may use this store at once (leases and take-over matter)."""

    def __init__(
        self,
        location: str,
        *,
        pool_size: int = POOL_SIZE,
        connect_timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        self.location = location
        self.origin = uuid.uuid4().hex[:12]
        """Tags our notifications, so the listener passes on only other stores' changes."""
        self._pool_size = pool_size
        self._connect_timeout = connect_timeout
        self._pool: AsyncConnectionPool[Conn] | None = None
        self._closed = asyncio.Event()
        self._callbacks: list[Callable[[str, str], None]] = []
        self._listener: asyncio.Task[None] | None = None
        self._pending: list[tuple[NewJob, asyncio.Future[SubmitOutcome]]] = []
        self._committers = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self.listening = asyncio.Event()
        """Set while the listener connection LISTENs (tests wait for it)."""

    # --- life ----------------------------------------------------------------------------

    async def open(self) -> None:
        if self._pool is not None:
            return
        pool: AsyncConnectionPool[Conn] = AsyncConnectionPool(
            self.location,
            min_size=1,
            max_size=self._pool_size,
            timeout=self._connect_timeout,
            # Give up a failed background connect at once: the next request starts a fresh
            # attempt, so we reconnect as soon as the server is back rather than after the
            # pool's growing back-off.
            reconnect_timeout=0,
            open=False,
            name="mdp-jobs",
            kwargs={"autocommit": True},
            configure=self._configure,
        )
        try:
            await pool.open(wait=True, timeout=self._connect_timeout)
        except (PoolTimeout, psycopg.Error) as exc:
            await pool.close()
            raise StoreError(f"cannot connect to the job database: {_reason(exc)}") from None
        self._pool = pool
        try:
            await self._migrate()
        except BaseException:
            self._pool = None
            await pool.close()
            raise
        self._closed.clear()
        self._listener = asyncio.create_task(self._listen(), name="mdp-jobs-listen")

    async def close(self) -> None:
        self._closed.set()
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._listener
            self._listener = None
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    async def _configure(self, conn: Conn) -> None:
        """Each new pooled connection tags the notifications its writes cause."""
        await conn.execute("SELECT set_config('mdp.origin', %s, false)", (self.origin,))

    async def _migrate(self) -> None:
        async def run(conn: Conn) -> None:
            # One migrator at a time; the others wait here and then find the schema current.
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            version = await self._version(conn)
            if version > SCHEMA_VERSION:
                raise StoreCorrupt(
                    f"the job database has schema version {version}, newer than this program "
                    f"knows ({SCHEMA_VERSION}): upgrade mdp"
                )
            if version == 0:
                await conn.execute(
                    "CREATE TABLE mdp_jobs_meta (application TEXT NOT NULL, version INTEGER "
                    "NOT NULL)"
                )
                await conn.execute("INSERT INTO mdp_jobs_meta VALUES (%s, 0)", (APPLICATION,))
            for step in range(version, SCHEMA_VERSION):
                await conn.execute(MIGRATIONS[step])
            if version < SCHEMA_VERSION:
                await conn.execute("UPDATE mdp_jobs_meta SET version = %s", (SCHEMA_VERSION,))

        await self._transaction(run, retry=False, atomic=True)

    @staticmethod
    async def _version(conn: Conn) -> int:
        """Our schema version in this database (0: none of our tables). StoreCorrupt for tables
        named like ours that are not ours. Reads only."""
        cur = await conn.execute(
            "SELECT table_name FROM information_schema.tables "
            "WHERE table_schema = current_schema() AND table_name LIKE 'mdp\\_jobs%%'"
        )
        tables = {row[0] for row in await cur.fetchall()}
        if not tables:
            return 0
        if "mdp_jobs_meta" not in tables:
            raise StoreCorrupt(
                "the database has tables named mdp_jobs* but no mdp_jobs_meta: not a job store "
                "of this program; left untouched"
            )
        cur = await conn.execute("SELECT application, version FROM mdp_jobs_meta")
        rows = await cur.fetchall()
        if len(rows) != 1 or rows[0][0] != APPLICATION:
            raise StoreCorrupt("mdp_jobs_meta does not describe an mdp job store; left untouched")
        return int(rows[0][1])

    # --- transactions --------------------------------------------------------------------

    async def _transaction(
        self,
        fn: Callable[[Conn], Awaitable[T]],
        *,
        retry: bool = True,
        wait: bool = False,
        atomic: bool = False,
    ) -> T:
        """Run `fn` on a pooled (autocommit) connection: in one transaction with `atomic`,
        else each statement commits on its own (for `fn`s of one write statement).

        `retry`: a lost connection is retried once on a fresh one (every operation here is
        idempotent or a compare-and-set). `wait`: keep retrying until the database is back or
        the store is closed (writes about running jobs)."""
        attempt = 0
        while True:
            pool = self._pool
            if pool is None:
                raise StoreError("the job store is not open")
            try:
                # After a loss, a new connection is only worth a short wait: the server is
                # probably down, and a submit must fail fast rather than hang.
                timeout = self._connect_timeout if attempt == 0 else RETRY_CONNECT_TIMEOUT
                async with pool.connection(timeout=timeout) as conn:
                    if not atomic:
                        return await fn(conn)
                    async with conn.transaction():
                        return await fn(conn)
            except (StoreError, ValueError):
                raise
            except Exception as exc:
                if not isinstance(exc, psycopg.Error | PoolTimeout):
                    raise
                attempt += 1
                if not _connection_lost(exc):
                    raise _store_error(exc) from None
                # The other idle connections probably broke too (a server restart): have the
                # pool test and replace them before the retry takes one.
                with contextlib.suppress(Exception):
                    await pool.check()
                if wait and not self._closed.is_set():
                    if attempt == 1 or attempt % 20 == 0:
                        log.warning("job database unreachable, retrying: %s", _reason(exc))
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._closed.wait(), RETRY_INTERVAL)
                    continue
                if retry and attempt == 1:
                    continue
                raise _store_error(exc) from None

    # --- wake-ups ------------------------------------------------------------------------

    def subscribe(self, callback: Callable[[str, str], None]) -> None:
        """Call `callback(kind, job_id)` for changes made by other processes: kind `queued`
        (a job was submitted or released) or `job` (a job changed or got output)."""
        self._callbacks.append(callback)

    async def _listen(self) -> None:
        """Keep one connection LISTENing; reconnect after a loss (hints sent meanwhile are
        lost: waiters poll anyway)."""
        while not self._closed.is_set():
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self.location, autocommit=True, connect_timeout=int(self._connect_timeout)
                )
                async with conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self.listening.set()
                    # Something may have changed while we were not listening: wake everyone.
                    self._dispatch("queued", "")
                    async for note in conn.notifies():
                        origin, _, rest = note.payload.partition(" ")
                        if origin != self.origin:
                            kind, _, job_id = rest.partition(" ")
                            self._dispatch(kind, job_id)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("listener: %s", _reason(exc))
            self.listening.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closed.wait(), RETRY_INTERVAL)

    def _dispatch(self, kind: str, job_id: str) -> None:
        for callback in self._callbacks:
            try:
                callback(kind, job_id)
            except Exception:
                log.exception("job store subscriber failed")

    # --- writes --------------------------------------------------------------------------

    async def submit(self, job: NewJob) -> SubmitOutcome:
        # Group commit: submits that arrive while earlier ones are being committed go in the
        # next transaction together, so they share one WAL flush (the cost of durability).
        future: asyncio.Future[SubmitOutcome] = asyncio.get_running_loop().create_future()
        self._pending.append((job, future))
        if self._committers < MAX_COMMITTERS:
            self._committers += 1
            task = asyncio.create_task(self._commit_submits())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await future

    async def _commit_submits(self) -> None:
        try:
            while self._pending:
                batch = self._pending[:MAX_BATCH]
                del self._pending[:MAX_BATCH]
                jobs = [job for job, _ in batch]

                async def op(conn: Conn, jobs: list[NewJob] = jobs) -> list[SubmitOutcome]:
                    return await _submit_many(conn, jobs)

                try:
                    outcomes = await self._transaction(op, atomic=True)
                except Exception as exc:  # every submit of the batch failed: none was stored
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), outcome in zip(batch, outcomes, strict=True):
                    if not future.done():
                        future.set_result(outcome)
        finally:
            self._committers -= 1

    async def claim(
        self,
        service: str,
        limit: int,
        now: float,
        owner: str = "",
        start_by: float | None = None,
    ) -> list[Job]:
        returning = ", ".join(f"m.{c.strip()}" for c in _COLUMNS.split(","))

        async def op(conn: Conn) -> list[Job]:
            # SKIP LOCKED: a job another manager is claiming right now is not waited for,
            # it is simply not ours; the next unclaimed ones are. `p` is the row as it was
            # (whether its previous attempt was settled); SET and `p` read the old values.
            cur = await conn.execute(
                "UPDATE mdp_jobs m SET claimed = %s, attempts = m.attempts + 1, owner = %s, "
                "request_id = coalesce(m.request_id, m.id), "
                "start_by = coalesce(m.start_by, %s::float8) "
                "FROM (SELECT seq, start_by IS NOT NULL AS doubt FROM mdp_jobs "
                "WHERE service = %s AND state = 'queued' AND claimed IS NULL ORDER BY seq "
                "LIMIT %s FOR UPDATE SKIP LOCKED) p "
                f"WHERE m.seq = p.seq RETURNING {returning}, p.doubt",
                (now, owner or None, start_by, service, max(0, limit)),
            )
            jobs = [
                dataclasses.replace(_job(row), in_doubt=True) if row[-1] else _job(row)
                for row in await cur.fetchall()
            ]
            return sorted(jobs, key=lambda j: j.seq)

        return await self._transaction(op)

    async def record_attempt(
        self, job_id: str, claimed: float, request_id: str, start_by: float, now: float
    ) -> Job | None:
        async def op(conn: Conn) -> Job | None:
            cur = await conn.execute(
                "UPDATE mdp_jobs SET request_id = %s, start_by = %s, claimed = %s "
                f"WHERE id = %s AND state = 'queued' AND claimed = %s RETURNING {_COLUMNS}",
                (request_id, start_by, now, job_id, claimed),
            )
            row = await cur.fetchone()
            return None if row is None else _job(row)

        return await self._transaction(op, wait=True)

    async def renew(self, owner: str, ids: Collection[str], until: float) -> set[str]:
        wanted = list(ids)
        if not wanted:
            return set()

        async def op(conn: Conn) -> set[str]:
            cur = await conn.execute(
                "UPDATE mdp_jobs SET lease_until = %s WHERE state = 'running' AND owner = %s "
                "AND id = ANY(%s) RETURNING id",
                (until, owner, wanted),
            )
            return {row[0] for row in await cur.fetchall()}

        return await self._transaction(op)

    async def take_over(
        self, owner: str, now: float, until: float, limit: int, *, own: bool = False
    ) -> list[Job]:
        async def op(conn: Conn) -> list[Job]:
            # SKIP LOCKED: two job services taking over at once split the orphans.
            cur = await conn.execute(
                "UPDATE mdp_jobs SET owner = %s, lease_until = %s WHERE seq IN ("
                "SELECT seq FROM mdp_jobs WHERE state = 'running' AND (lease_until IS NULL "
                "OR lease_until < %s OR (%s AND owner = %s AND lease_until < %s)) "
                f"ORDER BY seq LIMIT %s FOR UPDATE SKIP LOCKED) RETURNING {_COLUMNS}",
                (owner, until, now, own, owner, until, max(0, limit)),
            )
            return sorted((_job(row) for row in await cur.fetchall()), key=lambda j: j.seq)

        return await self._transaction(op)

    async def release_claims(self, before: float | None = None) -> int:
        async def op(conn: Conn) -> int:
            sql = (
                "UPDATE mdp_jobs SET claimed = NULL WHERE state = 'queued' AND claimed IS NOT NULL"
            )
            params: tuple[Any, ...] = ()
            if before is not None:
                sql += " AND claimed < %s"
                params = (before,)
            cur = await conn.execute(sql, params)
            return max(cur.rowcount, 0)

        return await self._transaction(op)

    async def update(self, job_id: str, expect: Collection[str], **changes: Any) -> Job | None:
        unknown = set(changes) - UPDATABLE
        if unknown:
            raise ValueError(f"fields that cannot be updated: {sorted(unknown)}")
        if not changes:
            raise ValueError("nothing to update")
        names = list(changes)
        sql = (
            f"UPDATE mdp_jobs SET {', '.join(f'{n} = %s' for n in names)} "
            f"WHERE id = %s AND state = ANY(%s) RETURNING {_COLUMNS}"
        )
        params = [_encode_change(n, changes[n]) for n in names] + [job_id, list(expect)]

        async def op(conn: Conn) -> Job | None:
            cur = await conn.execute(sql, params)
            row = await cur.fetchone()
            return None if row is None else _job(row)

        return await self._transaction(op, wait=True)

    async def append_output(
        self, job_id: str, chunks: Sequence[tuple[str, bytes]], cap: int
    ) -> Job | None:
        streams = [stream for stream, _ in chunks]
        datas = [bytes(data) for _, data in chunks]
        returning = ", ".join(f"m.{c.strip()}" for c in _COLUMNS.split(","))

        async def op(conn: Conn) -> Job | None:
            # One statement, so one round trip: the row lock (FOR UPDATE) orders concurrent
            # appends to one job; the chunks kept are the prefix that fits under the cap
            # (a running sum), numbered after the stored ones.
            cur = await conn.execute(
                "WITH j AS (SELECT seq, output_chunks AS n0, output_bytes AS b0, "
                "output_truncated AS t0 FROM mdp_jobs WHERE id = %s FOR UPDATE), "
                "c AS (SELECT ord, stream, data, sum(length(data)) OVER (ORDER BY ord) AS cum "
                "FROM unnest(%s::text[], %s::bytea[]) WITH ORDINALITY AS u(stream, data, ord)), "
                "k AS (SELECT c.* FROM c, j WHERE NOT j.t0 AND j.b0 + c.cum <= %s), "
                "ins AS (INSERT INTO mdp_jobs_output (job_seq, n, stream, data) "
                "SELECT j.seq, j.n0 + k.ord - 1, k.stream, k.data FROM k, j RETURNING 1) "
                "UPDATE mdp_jobs m SET output_chunks = j.n0 + (SELECT count(*) FROM k), "
                "output_bytes = j.b0 + coalesce((SELECT max(cum) FROM k), 0), "
                "output_truncated = j.t0 OR (SELECT count(*) FROM k) < (SELECT count(*) FROM c) "
                f"FROM j WHERE m.seq = j.seq RETURNING {returning}",
                (job_id, streams, datas, cap),
            )
            row = await cur.fetchone()
            return None if row is None else _job(row)

        return await self._transaction(op, wait=True)

    async def delete(self, job_id: str, now: float) -> bool:
        async def op(conn: Conn) -> bool:
            cur = await conn.execute(
                "SELECT seq, id, state, finished FROM mdp_jobs "
                "WHERE id = %s AND state = ANY(%s) FOR UPDATE",
                (job_id, _TERMINAL),
            )
            row = await cur.fetchone()
            if row is None:
                return False
            await _remove(conn, [row], now)
            return True

        return await self._transaction(op, atomic=True)

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
        async def op(conn: Conn) -> PurgeCounts:
            cur = await conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (_RETENTION_LOCK,))
            locked = await cur.fetchone()
            if locked is None or not locked[0]:
                return PurgeCounts()  # another manager is purging right now
            outputs: list[tuple[Any, ...]] = []
            for before, states in ((output_before, ["ok"]), (output_failed_before, _FAILED)):
                cur = await conn.execute(
                    "SELECT seq, finished FROM mdp_jobs WHERE finished IS NOT NULL "
                    "AND output_purged = FALSE AND finished < %s AND state = ANY(%s) "
                    "ORDER BY finished LIMIT %s FOR UPDATE SKIP LOCKED",
                    (before, states, batch),
                )
                outputs += await cur.fetchall()
            outputs = sorted(outputs, key=lambda r: r[1])[:batch]
            seqs = [row[0] for row in outputs]
            if seqs:
                await conn.execute("DELETE FROM mdp_jobs_output WHERE job_seq = ANY(%s)", (seqs,))
                await conn.execute(
                    "UPDATE mdp_jobs SET output_purged = TRUE, result = NULL WHERE seq = ANY(%s)",
                    (seqs,),
                )
            records: list[tuple[Any, ...]] = []
            for before, states in ((record_before, ["ok"]), (record_failed_before, _FAILED)):
                cur = await conn.execute(
                    "SELECT seq, id, state, finished FROM mdp_jobs WHERE finished IS NOT NULL "
                    "AND finished < %s AND state = ANY(%s) ORDER BY finished LIMIT %s "
                    "FOR UPDATE SKIP LOCKED",
                    (before, states, batch),
                )
                records += await cur.fetchall()
            records = sorted(records, key=lambda r: r[3])[:batch]
            await _remove(conn, records, now)
            cur = await conn.execute(
                "DELETE FROM mdp_jobs_tombstones WHERE id IN (SELECT id FROM mdp_jobs_tombstones "
                "WHERE purged < %s ORDER BY purged LIMIT %s)",
                (tombstone_before, batch),
            )
            return PurgeCounts(len(outputs), len(records), max(cur.rowcount, 0))

        return await self._transaction(op, atomic=True)

    # --- reads ---------------------------------------------------------------------------

    async def _read(self, fn: Callable[[Conn], Awaitable[T]]) -> T:
        return await self._transaction(fn)

    async def get(self, job_id: str) -> Job | Tombstone | None:
        async def read(conn: Conn) -> Job | Tombstone | None:
            cur = await conn.execute(f"SELECT {_COLUMNS} FROM mdp_jobs WHERE id = %s", (job_id,))
            row = await cur.fetchone()
            if row is not None:
                return _job(row)
            cur = await conn.execute(
                "SELECT id, state, finished, purged FROM mdp_jobs_tombstones WHERE id = %s",
                (job_id,),
            )
            stone = await cur.fetchone()
            return None if stone is None else Tombstone(*stone)

        return await self._read(read)

    async def get_many(self, ids: Sequence[str]) -> list[Job | Tombstone | None]:
        wanted = list(ids)

        async def read(conn: Conn) -> list[Job | Tombstone | None]:
            cur = await conn.execute(
                f"SELECT {_COLUMNS} FROM mdp_jobs WHERE id = ANY(%s)", (wanted,)
            )
            found: dict[str, Job | Tombstone] = {}
            for row in await cur.fetchall():
                found[row[1]] = _job(row)
            missing = [job_id for job_id in wanted if job_id not in found]
            if missing:
                cur = await conn.execute(
                    "SELECT id, state, finished, purged FROM mdp_jobs_tombstones "
                    "WHERE id = ANY(%s)",
                    (missing,),
                )
                for stone in await cur.fetchall():
                    found[stone[0]] = Tombstone(*stone)
            return [found.get(job_id) for job_id in wanted]

        return await self._read(read)

    async def list_jobs(
        self,
        *,
        states: Collection[str] | None = None,
        service: str | None = None,
        since: float | None = None,
        before: int | None = None,
        limit: int = 100,
    ) -> list[Job]:
        where: list[str] = []
        params: list[Any] = []
        if states is not None:
            wanted = sorted(states)
            if not wanted:
                return []
            where.append("state = ANY(%s)")
            params.append(wanted)
        if service is not None:
            where.append("service = %s")
            params.append(service)
        if since is not None:
            where.append("created >= %s")
            params.append(since)
        if before is not None:
            where.append("seq < %s")
            params.append(before)
        sql = f"SELECT {_COLUMNS} FROM mdp_jobs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY seq DESC LIMIT %s"
        params.append(max(0, limit))

        async def read(conn: Conn) -> list[Job]:
            cur = await conn.execute(sql, params)
            return [_job(row) for row in await cur.fetchall()]

        return await self._read(read)

    async def queued_services(self) -> list[str]:
        async def read(conn: Conn) -> list[str]:
            # A loose index scan over mdp_jobs_queue: one probe per service, not per job.
            cur = await conn.execute(
                "WITH RECURSIVE s(service) AS ("
                " (SELECT service FROM mdp_jobs WHERE state = 'queued' AND claimed IS NULL"
                "  ORDER BY service LIMIT 1)"
                " UNION ALL"
                " SELECT (SELECT service FROM mdp_jobs WHERE state = 'queued' AND claimed IS NULL"
                "  AND service > s.service ORDER BY service LIMIT 1) FROM s"
                " WHERE s.service IS NOT NULL"
                ") SELECT service FROM s WHERE service IS NOT NULL"
            )
            return [row[0] for row in await cur.fetchall()]

        return await self._read(read)

    async def output(self, job_id: str, start: int = 0, limit: int = 256) -> list[Chunk]:
        async def read(conn: Conn) -> list[Chunk]:
            cur = await conn.execute(
                "SELECT o.n, o.stream, o.data FROM mdp_jobs_output o "
                "JOIN mdp_jobs j ON j.seq = o.job_seq "
                "WHERE j.id = %s AND o.n >= %s ORDER BY o.n LIMIT %s",
                (job_id, start, max(0, limit)),
            )
            return [Chunk(n, stream, bytes(data)) for n, stream, data in await cur.fetchall()]

        return await self._read(read)

    async def counts(self) -> dict[str, int]:
        async def read(conn: Conn) -> dict[str, int]:
            cur = await conn.execute("SELECT state, count(*) FROM mdp_jobs GROUP BY state")
            return {state: int(count) for state, count in await cur.fetchall()}

        return await self._read(read)


async def _submit_many(conn: Conn, jobs: Sequence[NewJob]) -> list[SubmitOutcome]:
    """Insert new jobs (in order: seq follows the list), idempotently on their ids."""
    cur = await conn.execute(
        "INSERT INTO mdp_jobs (id, kind, service, request, state, created) "
        "SELECT u.id, u.kind, u.service, u.request, 'queued', u.created "
        "FROM unnest(%s::text[], %s::text[], %s::text[], %s::bytea[], %s::float8[]) "
        "WITH ORDINALITY AS u(id, kind, service, request, created, ord) "
        "WHERE NOT EXISTS (SELECT 1 FROM mdp_jobs_tombstones t WHERE t.id = u.id) "
        "ORDER BY u.ord ON CONFLICT (id) DO NOTHING RETURNING id, seq",
        (
            [job.id for job in jobs],
            [job.kind for job in jobs],
            [job.service for job in jobs],
            [_pack(list(job.request)) for job in jobs],
            [job.created for job in jobs],
        ),
    )
    created = {job_id: int(seq) for job_id, seq in await cur.fetchall()}
    others = sorted({job.id for job in jobs} - set(created))
    found: dict[str, Job] = {}
    if others:
        cur = await conn.execute(f"SELECT {_COLUMNS} FROM mdp_jobs WHERE id = ANY(%s)", (others,))
        found = {row[1]: _job(row) for row in await cur.fetchall()}
    outcomes = []
    for job in jobs:
        seq = created.pop(job.id, None)  # a second submit of one id in one batch: existing
        if seq is not None:
            stored = Job(
                id=job.id,
                seq=seq,
                kind=job.kind,
                service=job.service,
                request=list(job.request),
                state="queued",
                created=job.created,
            )
            found[job.id] = stored
            outcomes.append(SubmitOutcome("created", stored))
            continue
        existing = found.get(job.id)
        if existing is None:
            outcomes.append(SubmitOutcome("expired", None))
            continue
        same = (existing.kind, existing.service, existing.request) == (
            job.kind,
            job.service,
            list(job.request),
        )
        outcomes.append(SubmitOutcome("existing" if same else "conflict", existing))
    return outcomes


async def _remove(conn: Conn, records: Sequence[Sequence[Any]], now: float) -> None:
    """Delete job records `(seq, id, state, finished)` and their output, leaving tombstones."""
    if not records:
        return
    seqs = [row[0] for row in records]
    await conn.execute("DELETE FROM mdp_jobs_output WHERE job_seq = ANY(%s)", (seqs,))
    await conn.execute("DELETE FROM mdp_jobs WHERE seq = ANY(%s)", (seqs,))
    async with conn.cursor() as cur:
        await cur.executemany(
            "INSERT INTO mdp_jobs_tombstones (id, state, finished, purged) "
            "VALUES (%s, %s, %s, %s) ON CONFLICT (id) DO UPDATE SET state = EXCLUDED.state, "
            "finished = EXCLUDED.finished, purged = EXCLUDED.purged",
            [(row[1], row[2], row[3], now) for row in records],
        )


def _reason(exc: BaseException) -> str:
    """The first line of a driver error: what a user can act on."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
