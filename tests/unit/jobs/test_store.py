"""The job store contract (`services/jobs/store/base.py`), run against every implementation."""

from __future__ import annotations

import asyncio

import pytest

from services.jobs.store import Chunk, Job, JobStore, NewJob, Tombstone
from tests.unit.jobs.conftest import StoreFactory

pytestmark = pytest.mark.timeout(30)

T0 = 1_700_000_000.0
DAY = 86_400.0


def new(job_id: str, service: str = "shell", body: bytes = b"x", created: float = T0) -> NewJob:
    return NewJob(id=job_id, kind="command", service=service, request=[body], created=created)


async def finish(store: JobStore, job_id: str, state: str, at: float) -> Job:
    job = await store.update(job_id, {"queued", "running"}, state=state, finished=at)
    assert job is not None
    return job


async def test_submit_stores_a_queued_job(store: JobStore) -> None:
    outcome = await store.submit(new("a", body=b"\x81\xa1k\xa1v"))
    assert outcome.outcome == "created"
    job = await store.get("a")
    assert isinstance(job, Job)
    assert (job.id, job.kind, job.service, job.request, job.state, job.created) == (
        "a",
        "command",
        "shell",
        [b"\x81\xa1k\xa1v"],
        "queued",
        T0,
    )
    assert outcome.job is not None and job.seq == outcome.job.seq


async def test_never_stored_id_is_none(store: JobStore) -> None:
    assert await store.get("nope") is None


async def test_same_id_same_request_is_one_job(store: JobStore) -> None:
    first = await store.submit(new("a"))
    second = await store.submit(new("a", created=T0 + 5))
    assert second.outcome == "existing"
    assert second.job is not None and first.job is not None
    assert second.job.seq == first.job.seq
    assert len(await store.list_jobs()) == 1


async def test_same_id_other_request_is_a_conflict(store: JobStore) -> None:
    await store.submit(new("a", body=b"one"))
    outcome = await store.submit(new("a", body=b"two"))
    assert outcome.outcome == "conflict"
    job = await store.get("a")
    assert isinstance(job, Job) and job.request == [b"one"]


async def test_submit_is_durable_across_reopen(store_factory: StoreFactory) -> None:
    first = await store_factory()
    await first.submit(new("a"))
    await first.close()
    second = await store_factory()
    job = await second.get("a")
    assert isinstance(job, Job) and job.state == "queued"


async def test_concurrent_submits_all_stored(store: JobStore) -> None:
    outcomes = await asyncio.gather(*(store.submit(new(f"j{i}")) for i in range(300)))
    assert all(o.outcome == "created" for o in outcomes)
    assert len({o.job.seq for o in outcomes if o.job}) == 300
    assert (await store.counts()) == {"queued": 300}


async def test_claim_takes_oldest_unclaimed_of_one_service(store: JobStore) -> None:
    for i in range(5):
        await store.submit(new(f"s{i}", service="shell"))
        await store.submit(new(f"o{i}", service="os"))
    first = await store.claim("shell", 3, T0 + 1)
    assert [j.id for j in first] == ["s0", "s1", "s2"]
    assert all(j.claimed == T0 + 1 and j.attempts == 1 and j.state == "queued" for j in first)
    second = await store.claim("shell", 10, T0 + 2)
    assert [j.id for j in second] == ["s3", "s4"]
    assert await store.claim("shell", 10, T0 + 3) == []


async def test_release_claims_makes_old_claims_claimable_again(store: JobStore) -> None:
    await store.submit(new("a"))
    await store.submit(new("b"))
    await store.claim("shell", 1, T0)
    await store.claim("shell", 1, T0 + 10)
    assert await store.queued_services() == []
    assert await store.release_claims(before=T0 + 5) == 1
    assert await store.queued_services() == ["shell"]
    again = await store.claim("shell", 5, T0 + 11)
    assert [(j.id, j.attempts) for j in again] == [("a", 2)]


async def test_a_claim_records_the_attempt_before_it_is_sent(store: JobStore) -> None:
    """spec/jobs.md §4: the request_id and start_by of an attempt are committed with its
    claim, so whoever dispatches the job next knows what may be running."""
    await store.submit(new("a"))
    [job] = await store.claim("shell", 1, T0, owner="jobs-1", start_by=T0 + 30)
    assert (job.request_id, job.start_by, job.in_doubt) == ("a", T0 + 30, False)
    stored = await store.get("a")
    assert isinstance(stored, Job) and (stored.request_id, stored.start_by) == ("a", T0 + 30)


async def test_a_job_whose_attempt_was_never_settled_is_claimed_in_doubt(store: JobStore) -> None:
    await store.submit(new("a"))
    await store.submit(new("b"))
    await store.claim("shell", 2, T0, owner="dead", start_by=T0 + 30)
    # b's attempt was refused `expired` (settled: nothing ran); a's dispatcher died.
    assert await store.update("b", {"queued"}, claimed=None, start_by=None) is not None
    assert await store.release_claims(before=T0 + 40) == 1
    again = await store.claim("shell", 5, T0 + 41, owner="me", start_by=T0 + 71)
    assert [(j.id, j.in_doubt, j.request_id, j.start_by) for j in again] == [
        ("a", True, "a", T0 + 30),  # kept as it was: the claimer must find out first
        ("b", False, "b", T0 + 71),
    ]


async def test_record_attempt_is_a_compare_and_set_on_the_claim(store: JobStore) -> None:
    await store.submit(new("a"))
    await store.claim("shell", 1, T0, owner="me", start_by=T0 + 30)
    assert await store.record_attempt("a", T0 + 1, "a.2", T0 + 90, T0 + 60) is None
    job = await store.record_attempt("a", T0, "a.2", T0 + 90, T0 + 60)
    assert job is not None
    assert (job.request_id, job.start_by, job.claimed) == ("a.2", T0 + 90, T0 + 60)
    assert await store.record_attempt("a", T0, "a.3", T0 + 95, T0 + 65) is None  # renewed


async def test_queued_services_lists_each_service_once(store: JobStore) -> None:
    for i in range(3):
        await store.submit(new(f"s{i}", service="shell"))
    await store.submit(new("e", service="echo"))
    await store.submit(new("o", service="os"))
    await finish(store, "o", "cancelled", T0)
    assert await store.queued_services() == ["echo", "shell"]


async def test_update_is_compare_and_set_on_state(store: JobStore) -> None:
    await store.submit(new("a"))
    running = await store.update(
        "a", {"queued"}, state="running", started=T0 + 1, worker={"host": "h", "pid": 1}
    )
    assert running is not None and running.state == "running"
    assert running.worker == {"host": "h", "pid": 1}
    assert await store.update("a", {"queued"}, state="cancelled") is None
    done = await store.update(
        "a", {"running"}, state="ok", finished=T0 + 2, result=[b"r"], exit_code=0
    )
    assert done is not None and done.terminal and done.result == [b"r"] and done.exit_code == 0
    assert await store.update("missing", {"queued"}, state="ok") is None


async def test_update_refuses_unknown_fields(store: JobStore) -> None:
    await store.submit(new("a"))
    with pytest.raises(ValueError):
        await store.update("a", {"queued"}, id="b")


async def test_output_is_numbered_in_order_and_read_from_any_chunk(store: JobStore) -> None:
    await store.submit(new("a"))
    await store.append_output("a", [("stdout", b"one"), ("stderr", b"two")], cap=1000)
    job = await store.append_output("a", [("stdout", b"three")], cap=1000)
    assert job is not None and (job.output_chunks, job.output_bytes) == (3, 11)
    assert await store.output("a") == [
        Chunk(0, "stdout", b"one"),
        Chunk(1, "stderr", b"two"),
        Chunk(2, "stdout", b"three"),
    ]
    assert [c.n for c in await store.output("a", start=1, limit=1)] == [1]
    assert await store.output("a", start=3) == []


async def test_output_beyond_the_cap_is_dropped_and_marked(store: JobStore) -> None:
    await store.submit(new("a"))
    job = await store.append_output("a", [("stdout", b"12345"), ("stdout", b"678")], cap=6)
    assert job is not None and job.output_truncated and job.output_bytes == 5
    job = await store.append_output("a", [("stdout", b"9")], cap=6)
    assert job is not None and job.output_chunks == 1  # nothing after a dropped chunk
    assert [c.data for c in await store.output("a")] == [b"12345"]


async def test_append_output_to_unknown_job_is_none(store: JobStore) -> None:
    assert await store.append_output("nope", [("stdout", b"x")], cap=10) is None


async def test_delete_leaves_a_tombstone_and_the_id_cannot_be_reused(store: JobStore) -> None:
    await store.submit(new("a"))
    assert not await store.delete("a", T0)  # still queued: never removed
    await store.append_output("a", [("stdout", b"x")], cap=10)
    await finish(store, "a", "ok", T0 + 1)
    assert await store.delete("a", T0 + 2)
    stone = await store.get("a")
    assert stone == Tombstone("a", "ok", T0 + 1, T0 + 2)
    assert await store.output("a") == []
    assert (await store.submit(new("a"))).outcome == "expired"


async def test_list_filters_and_pages_newest_first(store: JobStore) -> None:
    for i in range(6):
        await store.submit(new(f"j{i}", service="os" if i % 2 else "shell", created=T0 + i))
    await finish(store, "j0", "failed", T0 + 10)
    assert [j.id for j in await store.list_jobs()] == ["j5", "j4", "j3", "j2", "j1", "j0"]
    assert [j.id for j in await store.list_jobs(service="os")] == ["j5", "j3", "j1"]
    assert [j.id for j in await store.list_jobs(states={"failed"})] == ["j0"]
    assert [j.id for j in await store.list_jobs(since=T0 + 4)] == ["j5", "j4"]
    page = await store.list_jobs(limit=2)
    rest = await store.list_jobs(before=page[-1].seq, limit=10)
    assert [j.id for j in page + rest] == ["j5", "j4", "j3", "j2", "j1", "j0"]
    assert await store.list_jobs(states=set()) == []


async def test_purge_removes_output_first_then_the_record(store: JobStore) -> None:
    await store.submit(new("old"))
    await store.append_output("old", [("stdout", b"x")], cap=10)
    await store.update("old", {"queued"}, state="ok", finished=T0, result=[b"final"])
    await store.submit(new("young"))
    await finish(store, "young", "ok", T0 + 5 * DAY)
    counts = await store.purge(
        output_before=T0 + DAY,
        output_failed_before=T0 + DAY,
        record_before=T0 - DAY,
        record_failed_before=T0 - DAY,
        tombstone_before=T0 - DAY,
        now=T0 + 2 * DAY,
        batch=100,
    )
    assert (counts.outputs, counts.records) == (1, 0)
    old = await store.get("old")
    assert isinstance(old, Job) and old.output_purged and old.result is None
    assert old.state == "ok" and await store.output("old") == []
    young = await store.get("young")
    assert isinstance(young, Job) and not young.output_purged
    counts = await store.purge(
        output_before=T0 + DAY,
        output_failed_before=T0 + DAY,
        record_before=T0 + DAY,
        record_failed_before=T0 + DAY,
        tombstone_before=T0 - DAY,
        now=T0 + 3 * DAY,
        batch=100,
    )
    assert counts.records == 1
    assert isinstance(await store.get("old"), Tombstone)
    assert isinstance(await store.get("young"), Job)


async def test_purge_keeps_failures_longer_and_never_touches_active_jobs(store: JobStore) -> None:
    await store.submit(new("ok", created=T0))
    await finish(store, "ok", "ok", T0)
    await store.submit(new("bad", created=T0))
    await finish(store, "bad", "failed", T0)
    await store.submit(new("queued", created=T0 - 100 * DAY))
    await store.submit(new("running", created=T0 - 100 * DAY))
    await store.update("running", {"queued"}, state="running", started=T0 - 100 * DAY)
    counts = await store.purge(
        output_before=T0 + DAY,
        output_failed_before=T0 - DAY,
        record_before=T0 + DAY,
        record_failed_before=T0 - DAY,
        tombstone_before=T0 - DAY,
        now=T0 + 2 * DAY,
        batch=100,
    )
    assert counts.records == 1
    assert isinstance(await store.get("ok"), Tombstone)
    assert isinstance(await store.get("bad"), Job)
    assert {j.id for j in await store.list_jobs(states={"queued", "running"})} == {
        "queued",
        "running",
    }


async def test_purge_is_bounded_by_batch(store: JobStore) -> None:
    for i in range(7):
        await store.submit(new(f"j{i}"))
        await finish(store, f"j{i}", "ok", T0 + i)
    limits = {
        "output_before": T0 + DAY,
        "output_failed_before": T0 + DAY,
        "record_before": T0 + DAY,
        "record_failed_before": T0 + DAY,
        "tombstone_before": T0 - DAY,
    }
    removed: list[str] = []
    while True:
        before = {j.id for j in await store.list_jobs()}
        step = await store.purge(**limits, now=T0 + DAY, batch=3)
        assert step.outputs <= 3 and step.records <= 3
        if not step.total:
            break
        after = {j.id for j in await store.list_jobs()}
        removed += sorted(before - after)
    assert removed == [f"j{i}" for i in range(7)]  # the oldest finished go first
    assert await store.list_jobs() == []
    stones = await store.purge(**{**limits, "tombstone_before": T0 + 2 * DAY}, now=T0, batch=5)
    assert stones.tombstones == 5
    left = [await store.get(f"j{i}") for i in range(7)]
    assert sum(isinstance(x, Tombstone) for x in left) == 2
    assert sum(x is None for x in left) == 5


async def test_counts_by_state(store: JobStore) -> None:
    for i in range(3):
        await store.submit(new(f"j{i}"))
    await finish(store, "j0", "ok", T0)
    assert await store.counts() == {"queued": 2, "ok": 1}


async def start(store: JobStore, job_id: str, owner: str, until: float) -> Job:
    job = await store.update(
        job_id, {"queued"}, state="running", started=T0, owner=owner, lease_until=until
    )
    assert job is not None and (job.owner, job.lease_until) == (owner, until)
    return job


async def test_claim_records_the_owner(store: JobStore) -> None:
    await store.submit(new("a"))
    [job] = await store.claim("shell", 1, T0, owner="jobs-1")
    assert job.owner == "jobs-1"


async def test_renew_extends_only_the_owners_running_jobs(store: JobStore) -> None:
    for job_id in ("mine", "theirs", "queued"):
        await store.submit(new(job_id))
    await start(store, "mine", "a", T0 + 10)
    await start(store, "theirs", "b", T0 + 10)
    held = await store.renew("a", ["mine", "theirs", "queued", "nope"], T0 + 20)
    assert held == {"mine"}
    mine, theirs = await store.get("mine"), await store.get("theirs")
    assert isinstance(mine, Job) and mine.lease_until == T0 + 20
    assert isinstance(theirs, Job) and theirs.lease_until == T0 + 10
    assert await store.renew("a", [], T0 + 30) == set()


async def test_take_over_gives_expired_leases_to_a_new_owner(store: JobStore) -> None:
    for job_id in ("expired", "live", "own", "queued"):
        await store.submit(new(job_id))
    await start(store, "expired", "dead", T0 + 5)
    await start(store, "live", "alive", T0 + 50)
    await start(store, "own", "me", T0 + 15)  # written by the previous run of "me"
    taken = await store.take_over("me", T0 + 10, T0 + 20, 100)
    assert [(j.id, j.owner, j.lease_until) for j in taken] == [("expired", "me", T0 + 20)]
    assert await store.take_over("other", T0 + 10, T0 + 20, 100) == []
    # A restarted job service takes its own jobs back at once, never a live peer's.
    again = await store.take_over("me", T0 + 11, T0 + 21, 100, own=True)
    assert sorted(j.id for j in again) == ["expired", "own"]
    assert await store.renew("me", ["expired", "own", "live"], T0 + 30) == {"expired", "own"}


async def test_take_over_is_bounded_and_leaves_no_job_to_two_owners(
    store_factory: StoreFactory,
) -> None:
    first, second = await store_factory(), await store_factory()
    for i in range(20):
        await first.submit(new(f"j{i:02}"))
        await start(first, f"j{i:02}", "dead", T0)
    assert len(await first.take_over("x", T0 + 1, T0 + 9, 5)) == 5
    rounds = await asyncio.gather(
        *(
            store.take_over(name, T0 + 1, T0 + 9, 3)
            for store, name in [(first, "a"), (second, "b")] * 4
        )
    )
    ids = [j.id for taken in rounds for j in taken]
    assert len(ids) == len(set(ids)) == 15


async def test_get_many_answers_each_id_in_order(store: JobStore) -> None:
    await store.submit(new("a"))
    await store.submit(new("b"))
    await finish(store, "b", "ok", T0)
    await store.delete("b", T0 + 1)
    found = await store.get_many(["nope", "b", "a", "a"])
    assert found[0] is None and isinstance(found[1], Tombstone)
    assert [j.id if isinstance(j, Job) else None for j in found[2:]] == ["a", "a"]


async def test_taking_back_own_jobs_in_batches_takes_each_once(store: JobStore) -> None:
    for i in range(5):
        await store.submit(new(f"j{i}"))
        await start(store, f"j{i}", "me", T0 + 5)
    taken: list[str] = []
    while batch := await store.take_over("me", T0, T0 + 20, 2, own=True):
        taken += [j.id for j in batch]
    assert sorted(taken) == [f"j{i}" for i in range(5)]


async def test_concurrent_submits_of_one_id_make_one_job(store: JobStore) -> None:
    outcomes = await asyncio.gather(
        *(store.submit(new("same")) for _ in range(5)),
        store.submit(new("same", body=b"other")),
        *(store.submit(new(f"j{i}")) for i in range(20)),
    )
    kinds = [o.outcome for o in outcomes[:6]]
    assert kinds.count("created") == 1
    assert set(kinds) <= {"created", "existing", "conflict"}
    assert (await store.counts()) == {"queued": 21}
    seqs = [o.job.seq for o in outcomes[6:] if o.job]
    assert seqs == sorted(seqs)  # submission order is queue order
