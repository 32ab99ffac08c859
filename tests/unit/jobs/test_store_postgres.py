"""What only the PostgreSQL store does: several stores (processes) on one database, schema
ownership, wake-up hints, retention in one place, and life through a server restart."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import pytest

from services.jobs.store import Job, NewJob, StoreCorrupt, StoreError
from tests import pgserver
from tests.pgserver import PgServer

pytestmark = pytest.mark.timeout(60)

psycopg = pytest.importorskip("psycopg")
PostgresStore = pytest.importorskip("services.jobs.store.postgres").PostgresStore

T0 = 1_700_000_000.0


def new(job_id: str, service: str = "shell") -> NewJob:
    return NewJob(id=job_id, kind="command", service=service, request=[b"x"], created=T0)


@pytest.fixture
async def stores(pg_url: str) -> AsyncIterator[list[PostgresStore]]:
    """Three stores on one database, as three `mdp-jobs` processes would have."""
    opened = [PostgresStore(pg_url) for _ in range(3)]
    await asyncio.gather(*(s.open() for s in opened))  # concurrent first opens migrate once
    yield opened
    for store in opened:
        await store.close()


async def test_concurrent_claims_never_give_one_job_to_two_stores(
    stores: list[PostgresStore],
) -> None:
    await asyncio.gather(*(stores[0].submit(new(f"j{i:03}")) for i in range(200)))

    async def claim_all(store: PostgresStore, owner: str) -> list[str]:
        got: list[str] = []
        while batch := await store.claim("shell", 7, T0, owner=owner):
            got += [j.id for j in batch]
        return got

    claimed = await asyncio.gather(
        *(claim_all(store, f"m{k}") for k, store in enumerate(stores) for _ in range(2))
    )
    every = [job_id for got in claimed for job_id in got]
    assert sorted(every) == [f"j{i:03}" for i in range(200)]  # each exactly once
    jobs = await stores[1].list_jobs(limit=1000)
    assert all(j.attempts == 1 and j.claimed == T0 for j in jobs)


async def test_schema_is_versioned_in_a_meta_table(
    pg_url: str, stores: list[PostgresStore]
) -> None:
    from services.jobs.store.postgres import APPLICATION, SCHEMA_VERSION

    async with await psycopg.AsyncConnection.connect(pg_url) as conn:
        cur = await conn.execute("SELECT application, version FROM mdp_jobs_meta")
        assert await cur.fetchall() == [(APPLICATION, SCHEMA_VERSION)]


async def test_newer_schema_is_refused_untouched(pg_url: str) -> None:
    first = PostgresStore(pg_url)
    await first.open()
    await first.submit(new("a"))
    await first.close()
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        await conn.execute("UPDATE mdp_jobs_meta SET version = 99")
    store = PostgresStore(pg_url)
    with pytest.raises(StoreCorrupt, match="newer"):
        await store.open()
    async with await psycopg.AsyncConnection.connect(pg_url) as conn:
        cur = await conn.execute("SELECT id FROM mdp_jobs")
        assert await cur.fetchall() == [("a",)]


async def test_foreign_tables_with_our_names_are_refused(pg_url: str) -> None:
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        await conn.execute("CREATE TABLE mdp_jobs (x int)")
    with pytest.raises(StoreCorrupt, match="not a job store"):
        await PostgresStore(pg_url).open()


async def test_unreachable_server_is_a_clear_error() -> None:
    from tests.support import free_tcp_endpoint

    port = free_tcp_endpoint().rsplit(":", 1)[1]
    store = PostgresStore(f"postgresql://postgres@127.0.0.1:{port}/x", connect_timeout=1.0)
    started = time.monotonic()
    with pytest.raises(StoreError, match="cannot connect to the job database"):
        await store.open()
    assert time.monotonic() - started < 5


async def test_other_stores_are_woken_by_a_submit_not_the_submitter(
    stores: list[PostgresStore],
) -> None:
    seen: list[list[tuple[str, str]]] = [[], [], []]
    for k, store in enumerate(stores):
        store.subscribe(lambda kind, job_id, k=k: seen[k].append((kind, job_id)))
    await asyncio.wait_for(asyncio.gather(*(s.listening.wait() for s in stores)), 5)

    async def heard(k: int, item: tuple[str, str]) -> None:
        deadline = time.monotonic() + 5
        while item not in seen[k]:
            assert time.monotonic() < deadline, f"store {k} never heard {item}: {seen[k]}"
            await asyncio.sleep(0.01)

    await stores[0].submit(new("a"))
    await asyncio.gather(heard(1, ("queued", "a")), heard(2, ("queued", "a")))
    await stores[1].update("a", {"queued"}, state="running", started=T0)
    await asyncio.gather(heard(0, ("job", "a")), heard(2, ("job", "a")))
    assert ("queued", "a") not in seen[0] and ("job", "a") not in seen[1]


async def test_retention_runs_in_one_place_at_a_time(
    pg_url: str, stores: list[PostgresStore]
) -> None:
    from services.jobs.store.postgres import _RETENTION_LOCK

    await stores[0].submit(new("a"))
    await stores[0].update("a", {"queued"}, state="ok", finished=T0)
    limits = {
        "output_before": T0 + 1,
        "output_failed_before": T0 + 1,
        "record_before": T0 + 1,
        "record_failed_before": T0 + 1,
        "tombstone_before": 0.0,
        "now": T0 + 2,
        "batch": 10,
    }
    async with await psycopg.AsyncConnection.connect(pg_url) as other, other.transaction():
        # Another manager is purging: this one skips its turn instead of waiting.
        await other.execute("SELECT pg_advisory_xact_lock(%s)", (_RETENTION_LOCK,))
        assert (await stores[1].purge(**limits)).total == 0
    assert (await stores[1].purge(**limits)).records == 1


# --- a server of its own, to restart -----------------------------------------------------


@pytest.fixture
def own_server() -> Iterator[PgServer]:
    reason = pgserver.skip_reason()
    if reason is not None:
        pytest.skip(reason)
    bin_dir = pgserver.find_bin_dir()
    assert bin_dir is not None
    server = PgServer(bin_dir)
    server.start()
    try:
        yield server
    finally:
        server.destroy()


async def test_server_restart_submits_fail_then_writes_wait_and_land(
    own_server: PgServer,
) -> None:
    url = own_server.create_database()
    store = PostgresStore(url, connect_timeout=1.0)
    await store.open()
    try:
        await store.submit(new("running"))
        await store.update("running", {"queued"}, state="running", started=T0)
        await asyncio.to_thread(own_server.stop)
        # Down: a submit fails with a clear error (never acknowledged without a commit) ...
        with pytest.raises(StoreError):
            await store.submit(new("b"))
        # ... while the result of a running job waits for the database to come back.
        finishing = asyncio.create_task(
            store.update("running", {"running"}, state="ok", finished=T0 + 1, exit_code=0)
        )
        await asyncio.sleep(0.5)
        assert not finishing.done()
        await asyncio.to_thread(own_server.start)
        done = await asyncio.wait_for(finishing, 20)
        assert isinstance(done, Job) and done.state == "ok"
        # Reconnected on its own: submits work again.
        assert (await store.submit(new("c"))).outcome == "created"
        assert (await store.counts()) == {"ok": 1, "queued": 1}
    finally:
        await store.close()
