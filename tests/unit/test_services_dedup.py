"""The request_id cache (services.dedup): bounded by entries, age and bytes; runs in progress
are never evicted."""

from __future__ import annotations

import pytest

from services.dedup import RequestCache


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_finished_result_is_returned_to_a_retry() -> None:
    cache = RequestCache()
    entry = cache.begin("a", b"d")
    assert cache.get("a") is entry and not entry.done.done()
    cache.finish("a", entry, b"final")
    again = cache.get("a")
    assert again is entry and again.done.result() == b"final"


async def test_entries_expire_by_age() -> None:
    clock = Clock()
    cache = RequestCache(max_age=10, clock=clock)
    cache.finish("a", cache.begin("a", b""), b"x")
    clock.now = 10
    assert cache.get("a") is not None
    clock.now = 10.01
    assert cache.get("a") is None


async def test_oldest_finished_entries_are_evicted_by_count() -> None:
    cache = RequestCache(max_entries=2)
    for key in ("a", "b", "c"):
        cache.finish(key, cache.begin(key, b""), b"x")
    assert cache.get("a") is None
    assert cache.get("b") is not None and cache.get("c") is not None
    assert len(cache) == 2


async def test_stored_bytes_are_bounded() -> None:
    cache = RequestCache(max_bytes=10)
    cache.finish("a", cache.begin("a", b""), b"123456")
    cache.finish("b", cache.begin("b", b""), b"123456")
    assert cache.get("a") is None and cache.get("b") is not None
    assert cache.stored_bytes == 6


async def test_running_entries_are_never_evicted() -> None:
    clock = Clock()
    cache = RequestCache(max_entries=1, max_age=1, clock=clock)
    running = cache.begin("run", b"")
    cache.finish("b", cache.begin("b", b""), b"x")
    clock.now = 100
    assert cache.get("run") is running
    assert cache.get("b") is None


async def test_abandoned_run_is_forgotten_and_followers_told() -> None:
    cache = RequestCache()
    entry = cache.begin("a", b"")
    cache.abandon("a", entry)
    assert cache.get("a") is None
    assert entry.done.result() is None


def test_bounds_must_be_positive() -> None:
    with pytest.raises(ValueError):
        RequestCache(max_entries=0)
