"""The SQLite job store: one file, WAL, synchronous=FULL, group commit by one writer thread.

Theory of operation
-------------------
- **One writer.** Every write is a small function run by a single thread on its own
  connection. The thread takes the first waiting write, then every other write that queued up
  meanwhile (up to `MAX_BATCH`), runs them in ONE transaction (`BEGIN IMMEDIATE` ... `COMMIT`,
  each write inside its own SAVEPOINT so one failing write does not undo the others) and only
  then settles their futures. With synchronous=FULL the COMMIT waits for the WAL to reach the
  disk: that fsync is the cost of durability, and group commit pays it once for a whole batch.
  While one batch is being synced the next one gathers, so throughput grows with concurrency.
- **Readers** use their own connections in a small thread pool; WAL lets them read the last
  committed state while the writer writes.
- **The file is checked before it is touched.** Its first 100 bytes (SQLite's header) must
  say SQLite 3, carry our `application_id` and a schema version we know; otherwise `open()`
  raises `StoreCorrupt` and nothing was written (not even a -wal or -shm file). A new database
  is created in rollback-journal mode first, so its header (application id, version) is in the
  main file before WAL is switched on.
- **Versioned schema.** `PRAGMA user_version` is the schema version; `MIGRATIONS[i]` takes a
  database from version i to i+1, inside the writer's transaction.
- **A full disk** makes the batch's COMMIT fail: every write of the batch raises `StoreFull`,
  nothing of it is stored, and what was committed before stays.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import queue
import sqlite3
import struct
import threading
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

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

__all__ = ["APPLICATION_ID", "MAX_BATCH", "SCHEMA_VERSION", "SQLiteStore"]

T = TypeVar("T")

APPLICATION_ID = 0x4D44504A  # "MDPJ": marks the file as an mdp job store
MAX_BATCH = 1024
"""Most writes committed in one transaction."""
READERS = 2

_MAGIC = b"SQLite format 3\x00"

MIGRATIONS: list[str] = [
    # 0 -> 1: the first schema.
    """
    CREATE TABLE jobs (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: queue order and list cursor
        id TEXT NOT NULL UNIQUE,
        kind TEXT NOT NULL,
        service TEXT NOT NULL,
        request BLOB NOT NULL,                  -- msgpack list of body frames
        state TEXT NOT NULL,
        created REAL NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        claimed REAL,
        started REAL,
        worker BLOB,                            -- msgpack map
        finished REAL,
        result BLOB,                            -- msgpack list of FINAL frames
        exit_code INTEGER,
        message TEXT,
        cancel_requested INTEGER NOT NULL DEFAULT 0,
        output_chunks INTEGER NOT NULL DEFAULT 0,
        output_bytes INTEGER NOT NULL DEFAULT 0,
        output_truncated INTEGER NOT NULL DEFAULT 0,
        output_purged INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX jobs_queue ON jobs (service, seq) WHERE state = 'queued' AND claimed IS NULL;
    CREATE INDEX jobs_state ON jobs (state, seq);
    CREATE INDEX jobs_service ON jobs (service, seq);
    CREATE INDEX jobs_output_retention ON jobs (finished)
        WHERE finished IS NOT NULL AND output_purged = 0;
    CREATE INDEX jobs_retention ON jobs (finished) WHERE finished IS NOT NULL;
    CREATE TABLE output (
        job_seq INTEGER NOT NULL,
        n INTEGER NOT NULL,
        stream TEXT NOT NULL,
        data BLOB NOT NULL,
        PRIMARY KEY (job_seq, n)
    );
    CREATE TABLE tombstones (
        id TEXT PRIMARY KEY,
        state TEXT NOT NULL,
        finished REAL,
        purged REAL NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX tombstones_purged ON tombstones (purged);
    """,
    # 1 -> 2: who holds a job, and until when (several job services on one database share
    # the schema's meaning with the PostgreSQL store; here one process holds them all).
    """
    ALTER TABLE jobs ADD COLUMN owner TEXT;
    ALTER TABLE jobs ADD COLUMN lease_until REAL;
    """,
    # 2 -> 3: the attempt on record before it is sent (its request_id and start deadline), so
    # whoever dispatches the job next knows which request_id may be running somewhere.
    """
    ALTER TABLE jobs ADD COLUMN request_id TEXT;
    ALTER TABLE jobs ADD COLUMN start_by REAL;
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)

_TERMINAL_SQL = ", ".join(f"'{s}'" for s in sorted(TERMINAL))
_FAILED_SQL = ", ".join(f"'{s}'" for s in sorted(FAILED))


def _encode_change(name: str, value: Any) -> Any:
    if name == "worker":
        return None if value is None else _pack(value)
    if name == "result":
        return None if value is None else _pack(list(value))
    if name == "cancel_requested":
        return int(bool(value))
    return value


def _store_error(exc: sqlite3.Error) -> StoreError:
    code = getattr(exc, "sqlite_errorcode", None)
    if code == sqlite3.SQLITE_FULL or "full" in str(exc):
        return StoreFull(f"the job database is full: {exc}")
    return StoreError(f"job database error: {exc}")


def check_header(path: Path) -> int | None:
    """The schema version in an existing database file's header, None for a new (absent or
    empty) file. Raises StoreCorrupt for anything that is not our database. Reads only."""
    try:
        with path.open("rb") as f:
            header = f.read(100)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StoreCorrupt(f"{path}: cannot read: {exc.strerror}") from None
    if not header:
        return None
    if len(header) < 100 or not header.startswith(_MAGIC):
        raise StoreCorrupt(f"{path}: not an SQLite database (corrupt or another kind of file)")
    version, application_id = struct.unpack(">I4xI", header[60:72])
    if application_id != APPLICATION_ID:
        raise StoreCorrupt(
            f"{path}: an SQLite database that is not an mdp job store "
            f"(application_id {application_id:#x}); refusing to use it"
        )
    if version > SCHEMA_VERSION:
        raise StoreCorrupt(
            f"{path}: job store schema version {version} is newer than this mdp-jobs knows "
            f"({SCHEMA_VERSION}); upgrade mdp"
        )
    return int(version)


class _Op:
    __slots__ = ("fn", "future", "loop")

    def __init__(
        self,
        fn: Callable[[sqlite3.Connection], Any],
        loop: asyncio.AbstractEventLoop,
        future: asyncio.Future[Any],
    ) -> None:
        self.fn = fn
        self.loop = loop
        self.future = future


def _settle(results: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for future, value, exc in results:
        if future.done():  # the awaiting task was cancelled; the write happened anyway
            continue
        if exc is None:
            future.set_result(value)
        else:
            future.set_exception(exc)


class SQLiteStore(JobStore):
    """The default job store: one SQLite file (see the module docstring).

    `max_bytes` caps the database size (SQLite's max_page_count): writes beyond it fail with
    StoreFull, as on a full disk.
    """

    def __init__(self, path: str | os.PathLike[str], *, max_bytes: int | None = None) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self._queue: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._writer_conn: sqlite3.Connection | None = None
        self._readers: ThreadPoolExecutor | None = None
        self._local = threading.local()
        self._reader_conns: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self.batches = 0
        """Transactions committed (writes / batches = the group-commit factor)."""
        self.writes = 0

    # --- life ----------------------------------------------------------------------------

    async def open(self) -> None:
        await asyncio.to_thread(self._open_sync)
        self._readers = ThreadPoolExecutor(READERS, thread_name_prefix="jobs-store-read")
        self._writer = threading.Thread(target=self._write_loop, name="jobs-store-write")
        self._writer.daemon = True
        self._writer.start()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 5000")
        return conn

    def _open_sync(self) -> None:
        version = check_header(self.path)
        if version is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = self._connect()
        except sqlite3.Error as exc:
            raise StoreCorrupt(f"{self.path}: cannot open: {exc}") from None
        try:
            if version is None:
                # Rollback-journal mode for the first transaction: the header (our
                # application_id and version) lands in the main file, not only in the WAL.
                conn.execute("PRAGMA journal_mode = DELETE")
                conn.execute("BEGIN IMMEDIATE")
                conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                conn.execute("COMMIT")
                version = 0
            else:
                self._check_schema(conn, version)
            if conn.execute("PRAGMA journal_mode = WAL").fetchone()[0].lower() != "wal":
                raise StoreError(f"{self.path}: cannot switch the database to WAL mode")
            conn.execute("PRAGMA synchronous = FULL")
            if version < SCHEMA_VERSION:
                conn.execute("BEGIN IMMEDIATE")
                for step in range(version, SCHEMA_VERSION):
                    for statement in _statements(MIGRATIONS[step]):
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                conn.execute("COMMIT")
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            if self.max_bytes is not None:
                page = conn.execute("PRAGMA page_size").fetchone()[0]
                conn.execute(f"PRAGMA max_page_count = {max(1, self.max_bytes // page)}")
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise StoreCorrupt(f"{self.path}: unusable job database: {exc}") from None
        except BaseException:
            conn.close()
            raise
        self._writer_conn = conn

    def _check_schema(self, conn: sqlite3.Connection, version: int) -> None:
        """Our header, but is the inside sane? Reads only (a corrupt schema raises)."""
        tables = {
            row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
        if version >= 1 and not {"jobs", "output", "tombstones"} <= tables:
            raise StoreCorrupt(f"{self.path}: the job store's tables are missing (corrupt?)")

    async def close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            self._queue.put(None)
            await asyncio.to_thread(writer.join)
        readers, self._readers = self._readers, None
        if readers is not None:
            readers.shutdown(wait=True)
        with self._lock:
            for conn in self._reader_conns:
                conn.close()
            self._reader_conns.clear()
        if self._writer_conn is not None:
            self._writer_conn.close()
            self._writer_conn = None

    # --- the writer ----------------------------------------------------------------------

    def _write(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        if self._writer is None:
            raise StoreError("the job store is not open")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put(_Op(fn, loop, future))
        return future

    def _write_loop(self) -> None:
        conn = self._writer_conn
        assert conn is not None
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            stop = False
            while len(batch) < MAX_BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            self._commit(conn, batch)
            if stop:
                return

    def _commit(self, conn: sqlite3.Connection, batch: list[_Op]) -> None:
        results: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for op in batch:
                conn.execute("SAVEPOINT op")
                try:
                    value = op.fn(conn)
                except Exception as exc:
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    error = _store_error(exc) if isinstance(exc, sqlite3.Error) else exc
                    results.append((op.future, None, error))
                else:
                    conn.execute("RELEASE op")
                    results.append((op.future, value, None))
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                # (SQLite may have rolled the transaction back itself already)
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            error = _store_error(exc)
            results = [(op.future, None, error) for op in batch]
        self.batches += 1
        self.writes += len(batch)
        by_loop: dict[asyncio.AbstractEventLoop, list[Any]] = {}
        for op, result in zip(batch, results, strict=True):
            by_loop.setdefault(op.loop, []).append(result)
        for loop, settled in by_loop.items():
            # A closed event loop raises RuntimeError: nobody waits for these writes any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_settle, settled)

    # --- readers -------------------------------------------------------------------------

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            conn.execute("PRAGMA query_only = ON")
            self._local.conn = conn
            with self._lock:
                self._reader_conns.append(conn)
        return conn

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._readers is None:
            raise StoreError("the job store is not open")

        def run() -> T:
            try:
                return fn(self._reader())
            except sqlite3.Error as exc:
                raise _store_error(exc) from None

        return await asyncio.get_running_loop().run_in_executor(self._readers, run)

    # --- writes --------------------------------------------------------------------------

    async def submit(self, job: NewJob) -> SubmitOutcome:
        request = _pack(list(job.request))

        def op(conn: sqlite3.Connection) -> SubmitOutcome:
            cur = conn.execute(
                "INSERT INTO jobs (id, kind, service, request, state, created) "
                "SELECT ?, ?, ?, ?, 'queued', ? "
                "WHERE NOT EXISTS (SELECT 1 FROM tombstones WHERE id = ?) "
                "ON CONFLICT (id) DO NOTHING",
                (job.id, job.kind, job.service, request, job.created, job.id),
            )
            if cur.rowcount == 1:
                stored = Job(
                    id=job.id,
                    seq=int(cur.lastrowid or 0),
                    kind=job.kind,
                    service=job.service,
                    request=list(job.request),
                    state="queued",
                    created=job.created,
                )
                return SubmitOutcome("created", stored)
            row = conn.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job.id,)).fetchone()
            if row is None:
                return SubmitOutcome("expired", None)
            existing = _job(row)
            same = (existing.kind, existing.service, existing.request) == (
                job.kind,
                job.service,
                list(job.request),
            )
            return SubmitOutcome("existing" if same else "conflict", existing)

        return await self._write(op)

    async def claim(
        self,
        service: str,
        limit: int,
        now: float,
        owner: str = "",
        start_by: float | None = None,
    ) -> list[Job]:
        def op(conn: sqlite3.Connection) -> list[Job]:
            # One writer: what the jobs were before the claim is read in the same transaction.
            picked = conn.execute(
                "SELECT seq, start_by IS NOT NULL FROM jobs WHERE service = ? "
                "AND state = 'queued' AND claimed IS NULL ORDER BY seq LIMIT ?",
                (service, limit),
            ).fetchall()
            if not picked:
                return []
            doubt = {seq for seq, unsettled in picked if unsettled}
            rows = conn.execute(
                "UPDATE jobs SET claimed = ?, attempts = attempts + 1, owner = ?, "
                "request_id = coalesce(request_id, id), start_by = coalesce(start_by, ?) "
                f"WHERE seq IN ({', '.join('?' * len(picked))}) RETURNING {_COLUMNS}",
                (now, owner or None, start_by, *(seq for seq, _ in picked)),
            ).fetchall()
            jobs = (_job(row) for row in rows)
            return sorted(
                (dataclasses.replace(j, in_doubt=True) if j.seq in doubt else j for j in jobs),
                key=lambda j: j.seq,
            )

        return await self._write(op)

    async def record_attempt(
        self, job_id: str, claimed: float, request_id: str, start_by: float, now: float
    ) -> Job | None:
        def op(conn: sqlite3.Connection) -> Job | None:
            row = conn.execute(
                "UPDATE jobs SET request_id = ?, start_by = ?, claimed = ? "
                f"WHERE id = ? AND state = 'queued' AND claimed = ? RETURNING {_COLUMNS}",
                (request_id, start_by, now, job_id, claimed),
            ).fetchone()
            return None if row is None else _job(row)

        return await self._write(op)

    async def renew(self, owner: str, ids: Collection[str], until: float) -> set[str]:
        wanted = list(ids)

        def op(conn: sqlite3.Connection) -> set[str]:
            held: set[str] = set()
            for start in range(0, len(wanted), 500):
                part = wanted[start : start + 500]
                rows = conn.execute(
                    f"UPDATE jobs SET lease_until = ? WHERE state = 'running' AND owner = ? "
                    f"AND id IN ({', '.join('?' * len(part))}) RETURNING id",
                    (until, owner, *part),
                ).fetchall()
                held.update(row[0] for row in rows)
            return held

        return await self._write(op)

    async def take_over(
        self, owner: str, now: float, until: float, limit: int, *, own: bool = False
    ) -> list[Job]:
        def op(conn: sqlite3.Connection) -> list[Job]:
            rows = conn.execute(
                "UPDATE jobs SET owner = ?, lease_until = ? WHERE seq IN ("
                "SELECT seq FROM jobs WHERE state = 'running' AND (lease_until IS NULL "
                "OR lease_until < ? OR (? AND owner = ? AND lease_until < ?)) "
                f"ORDER BY seq LIMIT ?) RETURNING {_COLUMNS}",
                (owner, until, now, int(own), owner, until, limit),
            ).fetchall()
            return sorted((_job(row) for row in rows), key=lambda j: j.seq)

        return await self._write(op)

    async def release_claims(self, before: float) -> int:
        def op(conn: sqlite3.Connection) -> int:
            cur = conn.execute(
                "UPDATE jobs SET claimed = NULL WHERE state = 'queued' AND claimed < ?",
                (before,),
            )
            return cur.rowcount

        return await self._write(op)

    async def update(self, job_id: str, expect: Collection[str], **changes: Any) -> Job | None:
        unknown = set(changes) - UPDATABLE
        if unknown:
            raise ValueError(f"fields that cannot be updated: {sorted(unknown)}")
        if not changes:
            raise ValueError("nothing to update")
        states = list(expect)
        names = list(changes)
        sql = (
            f"UPDATE jobs SET {', '.join(f'{n} = ?' for n in names)} "
            f"WHERE id = ? AND state IN ({', '.join('?' * len(states))}) RETURNING {_COLUMNS}"
        )
        params = [_encode_change(n, changes[n]) for n in names] + [job_id, *states]

        def op(conn: sqlite3.Connection) -> Job | None:
            row = conn.execute(sql, params).fetchone()
            return None if row is None else _job(row)

        return await self._write(op)

    async def append_output(
        self, job_id: str, chunks: Sequence[tuple[str, bytes]], cap: int
    ) -> Job | None:
        pieces = [(stream, bytes(data)) for stream, data in chunks]

        def op(conn: sqlite3.Connection) -> Job | None:
            row = conn.execute(
                "SELECT seq, output_chunks, output_bytes, output_truncated FROM jobs WHERE id = ?",
                (job_id,),
            ).fetchone()
            if row is None:
                return None
            seq, n, size, truncated = row
            rows = []
            for stream, data in pieces:
                if truncated or size + len(data) > cap:
                    truncated = 1
                    break
                rows.append((seq, n, stream, data))
                n += 1
                size += len(data)
            if rows:
                conn.executemany(
                    "INSERT INTO output (job_seq, n, stream, data) VALUES (?, ?, ?, ?)", rows
                )
            updated = conn.execute(
                "UPDATE jobs SET output_chunks = ?, output_bytes = ?, output_truncated = ? "
                f"WHERE seq = ? RETURNING {_COLUMNS}",
                (n, size, truncated, seq),
            ).fetchone()
            return _job(updated)

        return await self._write(op)

    async def delete(self, job_id: str, now: float) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            row = conn.execute(
                "SELECT seq, state, finished FROM jobs "
                f"WHERE id = ? AND state IN ({_TERMINAL_SQL})",
                (job_id,),
            ).fetchone()
            if row is None:
                return False
            _remove(conn, [(row[0], job_id, row[1], row[2])], now)
            return True

        return await self._write(op)

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
        # The 'ok' rows are read through a retention index, in `finished` order, so a batch
        # stops after `batch` rows due. Left to itself SQLite picks jobs_state (state = 'ok'),
        # then sorts every finished 'ok' job: each batch cost O(rows) and held up the submits
        # committed with it. The failed ones (usually few) are left to the planner
        # (jobs_state).
        ok_output = "INDEXED BY jobs_output_retention"
        ok_record = "INDEXED BY jobs_retention"

        def op(conn: sqlite3.Connection) -> PurgeCounts:
            outputs = []
            for before, states, index in (
                (output_before, "'ok'", ok_output),
                (output_failed_before, _FAILED_SQL, ""),
            ):
                outputs += conn.execute(
                    f"SELECT seq FROM jobs {index} WHERE finished IS NOT NULL "
                    f"AND output_purged = 0 AND finished < ? AND state IN ({states}) "
                    "ORDER BY finished LIMIT ?",
                    (before, batch),
                ).fetchall()
            # One batch bounds the rows of both kinds together: outputs first, records with
            # the room left (a long transaction would hold up the submits queued behind it).
            outputs = outputs[:batch]
            seqs = [(seq,) for (seq,) in outputs]
            conn.executemany("DELETE FROM output WHERE job_seq = ?", seqs)
            conn.executemany("UPDATE jobs SET output_purged = 1, result = NULL WHERE seq = ?", seqs)
            room = batch - len(outputs)
            records: list[tuple[int, str, str, float | None]] = []
            if room > 0:
                for before, states, index in (
                    (record_before, "'ok'", ok_record),
                    (record_failed_before, _FAILED_SQL, ""),
                ):
                    records += conn.execute(
                        f"SELECT seq, id, state, finished FROM jobs {index} WHERE finished IS NOT "
                        f"NULL AND finished < ? AND state IN ({states}) ORDER BY finished LIMIT ?",
                        (before, room),
                    ).fetchall()
                records = records[:room]
            _remove(conn, records, now)
            cur = conn.execute(
                "DELETE FROM tombstones WHERE id IN (SELECT id FROM tombstones "
                "WHERE purged < ? ORDER BY purged LIMIT ?)",
                (tombstone_before, batch),
            )
            return PurgeCounts(len(outputs), len(records), max(cur.rowcount, 0))

        return await self._write(op)

    # --- reads ---------------------------------------------------------------------------

    async def get(self, job_id: str) -> Job | Tombstone | None:
        def read(conn: sqlite3.Connection) -> Job | Tombstone | None:
            row = conn.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is not None:
                return _job(row)
            stone = conn.execute(
                "SELECT id, state, finished, purged FROM tombstones WHERE id = ?", (job_id,)
            ).fetchone()
            return None if stone is None else Tombstone(*stone)

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
            where.append(f"state IN ({', '.join('?' * len(wanted))})")
            params += wanted
        if service is not None:
            where.append("service = ?")
            params.append(service)
        if since is not None:
            where.append("created >= ?")
            params.append(since)
        if before is not None:
            where.append("seq < ?")
            params.append(before)
        sql = f"SELECT {_COLUMNS} FROM jobs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY seq DESC LIMIT ?"
        params.append(max(0, limit))
        return await self._read(lambda conn: [_job(r) for r in conn.execute(sql, params)])

    async def queued_services(self) -> list[str]:
        def read(conn: sqlite3.Connection) -> list[str]:
            # A loose index scan over jobs_queue: one probe per service, not per job.
            services: list[str] = []
            row = conn.execute(
                "SELECT min(service) FROM jobs WHERE state = 'queued' AND claimed IS NULL"
            ).fetchone()
            while row is not None and row[0] is not None:
                services.append(row[0])
                row = conn.execute(
                    "SELECT min(service) FROM jobs WHERE state = 'queued' AND claimed IS NULL "
                    "AND service > ?",
                    (row[0],),
                ).fetchone()
            return services

        return await self._read(read)

    async def output(self, job_id: str, start: int = 0, limit: int = 256) -> list[Chunk]:
        def read(conn: sqlite3.Connection) -> list[Chunk]:
            rows = conn.execute(
                "SELECT o.n, o.stream, o.data FROM output o JOIN jobs j ON j.seq = o.job_seq "
                "WHERE j.id = ? AND o.n >= ? ORDER BY o.n LIMIT ?",
                (job_id, start, max(0, limit)),
            ).fetchall()
            return [Chunk(n, stream, data) for n, stream, data in rows]

        return await self._read(read)

    async def counts(self) -> dict[str, int]:
        def read(conn: sqlite3.Connection) -> dict[str, int]:
            rows = conn.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall()
            return {state: count for state, count in rows}

        return await self._read(read)


def _remove(
    conn: sqlite3.Connection, records: Sequence[tuple[int, str, str, float | None]], now: float
) -> None:
    """Delete job records and their output, leaving tombstones."""
    seqs = [(record[0],) for record in records]
    conn.executemany("DELETE FROM output WHERE job_seq = ?", seqs)
    conn.executemany("DELETE FROM jobs WHERE seq = ?", seqs)
    conn.executemany(
        "INSERT OR REPLACE INTO tombstones (id, state, finished, purged) VALUES (?, ?, ?, ?)",
        [(job_id, state, finished, now) for _, job_id, state, finished in records],
    )


def _statements(script: str) -> list[str]:
    """Split a migration script into statements (ours hold no ';' inside strings)."""
    return [s.strip() for s in script.split(";") if s.strip()]
