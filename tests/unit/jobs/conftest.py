"""Fixtures of the job tests. `store_factory` is parametrized on the store implementation, so
the whole store suite runs against every implementation (add a PostgreSQL param beside
"sqlite"; it must give each test an empty database)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from services.jobs.store import JobStore, open_store

StoreFactory = Callable[[], Awaitable[JobStore]]


@pytest.fixture(params=["sqlite", "postgres"])
async def store_factory(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[StoreFactory]:
    """Opens stores on one fresh database; every store opened is closed at the end."""
    if request.param == "sqlite":
        location = str(tmp_path / "jobs.sqlite3")
    elif request.param == "postgres":
        location = request.getfixturevalue("pg_url")
    else:  # pragma: no cover - other implementations add their branch here
        raise AssertionError(request.param)
    opened: list[JobStore] = []

    async def make() -> JobStore:
        store = open_store(location)
        await store.open()
        opened.append(store)
        return store

    yield make
    for store in opened:
        await store.close()


@pytest.fixture
async def store(store_factory: StoreFactory) -> JobStore:
    return await store_factory()
