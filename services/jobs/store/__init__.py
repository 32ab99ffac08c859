"""Job stores: one small async interface (`base.JobStore`), several implementations.

`open_store("sqlite:///path/jobs.sqlite3")` or a plain path opens the default SQLite store.
"""

from __future__ import annotations

import importlib

from services.jobs.store.base import (
    TERMINAL,
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

__all__ = [
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
    "open_store",
]


def open_store(location: str) -> JobStore:
    """A store (not yet opened: `await store.open()`) for `location`.

    `location` is a path or `sqlite:///path` (the SQLite store). Other schemes belong to other
    implementations (e.g. `postgresql://` in the [postgres] extra).
    """
    if location.startswith(("postgresql://", "postgres://")):
        try:
            # Imported by name: the module and its driver come with the [postgres] extra.
            module = importlib.import_module("services.jobs.store.postgres")
        except ImportError as exc:
            raise StoreError(
                "a PostgreSQL store needs the [postgres] extra: pip install 'mdp[postgres]'"
            ) from exc
        store: JobStore = module.PostgresStore(location)
        return store
    from services.jobs.store.sqlite import SQLiteStore

    path = location.removeprefix("sqlite://")
    return SQLiteStore(path)
