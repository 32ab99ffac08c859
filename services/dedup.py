"""Duplicate protection: which `request_id`s this worker process has seen, and their results.

A client that lost track of a request may send it again with the same `request_id`. Within one
worker process such a retry never runs the command a second time: while the first run is in
progress the retry follows it (and gets its FINAL when it ends), afterwards it gets the stored
FINAL. The cache is bounded three ways -- entries, age, and bytes of stored results -- and only
finished entries are ever evicted (running ones are bounded by the number of connections).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

__all__ = ["Entry", "RequestCache"]


@dataclass(slots=True, eq=False)
class Entry:
    """One request_id: a digest of the request it named, and its FINAL body once known."""

    digest: bytes
    started_at: float
    done: asyncio.Future[bytes | None] = field(repr=False)
    """Resolves to the FINAL body, or None if the run was interrupted (worker shutdown)."""
    finished_at: float | None = None

    @property
    def size(self) -> int:
        if not self.done.done():
            return 0
        result = self.done.result()
        return 0 if result is None else len(result)


class RequestCache:
    """A bounded map from request keys to runs, oldest evicted first."""

    def __init__(
        self,
        max_entries: int = 1024,
        max_age: float = 600.0,
        max_bytes: int = 64 * 1024 * 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 1 or max_age <= 0 or max_bytes < 0:
            raise ValueError("cache bounds must be positive")
        self.max_entries = max_entries
        self.max_age = max_age
        self.max_bytes = max_bytes
        self._clock = clock
        self._entries: OrderedDict[Hashable, Entry] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def stored_bytes(self) -> int:
        return self._bytes

    def get(self, key: Hashable) -> Entry | None:
        """The entry for `key` if it is running or finished recently enough."""
        self._purge()
        return self._entries.get(key)

    def begin(self, key: Hashable, digest: bytes) -> Entry:
        """Record that the request `key` starts running now."""
        self._purge()
        loop = asyncio.get_running_loop()
        entry = Entry(digest=digest, started_at=self._clock(), done=loop.create_future())
        self._entries[key] = entry
        self._purge()
        return entry

    def finish(self, key: Hashable, entry: Entry, result: bytes) -> None:
        """The run ended with this FINAL body: keep it for retries, wake followers."""
        if entry.done.done():
            return
        entry.done.set_result(result)
        entry.finished_at = self._clock()
        if self._entries.get(key) is entry:
            self._entries.move_to_end(key)
            self._bytes += len(result)
        self._purge()

    def abandon(self, key: Hashable, entry: Entry) -> None:
        """The run was interrupted without a result: forget it, tell followers."""
        if not entry.done.done():
            entry.done.set_result(None)
        if self._entries.get(key) is entry:
            del self._entries[key]

    def _purge(self) -> None:
        now = self._clock()
        # Oldest finished first: entries are moved to the end when they finish.
        for key in [k for k, e in self._entries.items() if e.finished_at is not None]:
            entry = self._entries[key]
            assert entry.finished_at is not None
            expired = now - entry.finished_at > self.max_age
            if not (expired or len(self._entries) > self.max_entries or self._over_bytes()):
                break
            del self._entries[key]
            self._bytes -= entry.size

    def _over_bytes(self) -> bool:
        return self._bytes > self.max_bytes
