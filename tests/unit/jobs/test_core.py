"""The job state table (services/jobs/core.py, spec/jobs.md §1 and §4)."""

from __future__ import annotations

import pytest

from services.jobs.core import TABLE, Event, final_state, step
from services.jobs.store.base import TERMINAL

W = {"host": "h", "pid": 1, "id": "shell#0", "name": "h"}


def test_started_moves_a_queued_job_to_running_with_its_worker() -> None:
    decision = step("queued", Event.STARTED, at=5.0, worker=W)
    assert decision is not None
    assert decision.expect == {"queued"}
    assert decision.changes == {"state": "running", "started": 5.0, "worker": W}


def test_a_started_job_is_never_put_back_in_the_queue() -> None:
    """§4 at most once once started: no event takes a running job back to queued."""
    for event in Event:
        decision = step("running", event, at=1.0, worker=W, status="ok")
        if decision is not None:
            assert decision.changes.get("state") != "queued"
            assert "claimed" not in decision.changes or decision.changes["state"] in TERMINAL


def test_before_started_a_silent_dispatch_is_queued_again_still_on_record() -> None:
    """§4: it may have started unseen; the next dispatcher must find out first."""
    decision = step("queued", Event.SILENT, at=1.0)
    assert decision is not None and decision.changes == {"claimed": None}


def test_before_started_an_expired_dispatch_is_queued_again_and_settled() -> None:
    """§4: `expired` means it ran nowhere; the same request_id may go again."""
    decision = step("queued", Event.EXPIRED, at=1.0)
    assert decision is not None and decision.changes == {"claimed": None, "start_by": None}


def test_the_final_status_ends_the_job() -> None:
    decision = step("running", Event.FINAL, at=9.0, status="timeout", exit_code=None)
    assert decision is not None
    assert decision.changes["state"] == "timeout" and decision.changes["finished"] == 9.0


def test_cancel_of_a_queued_job_is_final_and_of_a_running_one_asks_the_worker() -> None:
    queued = step("queued", Event.CANCEL, at=1.0)
    assert queued is not None and queued.changes["state"] == "cancelled"
    assert not queued.cancel_worker
    running = step("running", Event.CANCEL, at=1.0)
    assert running is not None and running.changes == {"cancel_requested": True}
    assert running.cancel_worker


def test_a_run_that_ends_after_a_cancel_request_is_cancelled_unless_it_was_ok() -> None:
    assert final_state("failed", cancel_requested=True) == "cancelled"
    assert final_state("cancelled", cancel_requested=False) == "cancelled"
    assert final_state("ok", cancel_requested=True) == "ok"
    assert final_state("what", cancel_requested=False) == "error"


def test_a_failed_reattach_makes_the_job_lost() -> None:
    decision = step("running", Event.REATTACH_FAILED, at=3.0)
    assert decision is not None and decision.changes["state"] == "lost"


def test_a_queued_job_whose_attempt_cannot_be_learnt_about_is_lost() -> None:
    """§4: an attempt that may have started on a worker that never answers is not sent
    again (at most once): the job is lost, its claim dropped."""
    decision = step("queued", Event.REATTACH_FAILED, at=3.0)
    assert decision is not None
    assert decision.changes["state"] == "lost" and decision.changes["claimed"] is None


@pytest.mark.parametrize("state", sorted(TERMINAL))
def test_a_terminal_job_accepts_no_event(state: str) -> None:
    assert all(step(state, event, at=1.0, worker=W, status="ok") is None for event in Event)
    assert not any(key[0] == state for key in TABLE)
