"""What only the SQLite store promises: its file is checked before it is touched, it is in WAL
mode with synchronous=FULL, writes are group-committed, and a full database fails loudly."""

from __future__ import annotations

import asyncio
import hashlib
import os
import sqlite3
from pathlib import Path

import pytest

from services.jobs.store import Job, NewJob, StoreCorrupt, StoreFull
from services.jobs.store.sqlite import APPLICATION_ID, SCHEMA_VERSION, SQLiteStore

pytestmark = pytest.mark.timeout(30)


def snapshot(directory: Path) -> dict[str, tuple[str, int]]:
    """Every file in `directory`: content digest and mtime (ns)."""
    return {
        p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in directory.iterdir()
    }


def foreign_sqlite(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE notes (text TEXT)")
    conn.execute("INSERT INTO notes VALUES ('mine')")
    conn.commit()
    conn.close()


def newer_schema(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.execute("CREATE TABLE jobs (x)")
    conn.commit()
    conn.close()


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda p: p.write_bytes(os.urandom(8192)), "not an SQLite database"),
        (lambda p: p.write_bytes(b"SQLite format 3\x00" + b"\x00" * 20), "not an SQLite"),
        (lambda p: p.write_text('{"jobs": []}\n'), "not an SQLite database"),
        (foreign_sqlite, "not an mdp job store"),
        (newer_schema, "newer than this mdp-jobs knows"),
    ],
    ids=["random-bytes", "truncated-header", "json-file", "foreign-sqlite", "newer-schema"],
)
async def test_unusable_file_is_refused_untouched(tmp_path: Path, make, says: str) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "jobs.sqlite3"
    make(path)
    before = snapshot(tmp_path)
    store = SQLiteStore(path)
    with pytest.raises(StoreCorrupt, match=says):
        await store.open()
    await store.close()
    assert snapshot(tmp_path) == before  # same bytes, same mtime, no -wal/-shm created


async def test_our_file_with_its_tables_gone_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    store = SQLiteStore(path)
    await store.open()
    await store.close()
    conn = sqlite3.connect(path)
    conn.execute("DROP TABLE output")
    conn.commit()
    conn.close()
    with pytest.raises(StoreCorrupt, match="tables are missing"):
        await SQLiteStore(path).open()


async def test_new_database_is_ours_in_wal_with_full_sync(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "dir" / "jobs.sqlite3"  # the directory is created
    store = SQLiteStore(path)
    await store.open()
    try:
        await store.submit(NewJob("a", "command", "shell", [b"x"], 1.0))
        conn = store._writer_conn
        assert conn is not None
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        await store.close()
    header = path.read_bytes()[:100]
    assert int.from_bytes(header[68:72], "big") == APPLICATION_ID


async def test_concurrent_writes_share_commits(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "jobs.sqlite3")
    await store.open()
    try:
        batches = store.batches
        await asyncio.gather(
            *(store.submit(NewJob(f"j{i}", "command", "shell", [b"x"], 1.0)) for i in range(500))
        )
        assert store.batches - batches < 100  # group commit: far fewer commits than writes
    finally:
        await store.close()


async def test_full_database_fails_submits_loudly_and_keeps_jobs(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "jobs.sqlite3", max_bytes=256 * 1024)
    await store.open()
    try:
        await store.submit(NewJob("kept", "command", "shell", [b"x"], 1.0))
        with pytest.raises(StoreFull):
            for i in range(1000):
                await store.submit(NewJob(f"big{i}", "command", "shell", [b"y" * 8000], 1.0))
        kept = await store.get("kept")
        assert isinstance(kept, Job) and kept.state == "queued"
    finally:
        await store.close()
