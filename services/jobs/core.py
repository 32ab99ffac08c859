"""The life of a job, as a table: which event moves a job from which state to which.

Theory of operation
-------------------
A job has one state (`spec/jobs.md` §1). The manager (`services/jobs/manager.py`) turns what it
hears — a PARTIAL `started`, a FINAL, a silence, a cancel from a user, a failed re-attach —
into an `Event`, asks `step()` what to do, and applies the answer to the store as ONE
compare-and-set `update(job_id, expect={state}, **changes)`. If the job moved meanwhile (a
cancel raced a FINAL), the update matches nothing and the manager re-reads the job and asks
again: the store never goes backwards, and this module never does I/O.

Rules that are not transitions but follow from the table:

- Only `queued` jobs are dispatched (and re-dispatched): a job that said `started` is never
  sent again as a new run (at most once once started, `spec/jobs.md` §4).
- `SILENT` and `EXPIRED` before `started` put the job back in the queue (the claim released).
  `EXPIRED` also settles the attempt (`start_by` cleared: it ran nowhere), so the same
  request_id goes again with a fresh `start_by`. After `SILENT` the attempt stays on record:
  it may have started unseen, so the next dispatcher asks the workers first (manager.py,
  `_resolve`) and either re-attaches to it or sends a new request_id.
- After `started`, silence leads to a re-attach attempt (not in this table: it sends nothing
  new), and `REATTACH_FAILED` makes the job `lost`.
- A terminal job accepts no event: every row from a terminal state is absent, so `step()`
  returns None and the caller leaves the job alone (cancel answers `finished`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from services.jobs.store.base import TERMINAL

__all__ = ["TABLE", "Event", "Rule", "Step", "final_state", "step"]


class Event(enum.Enum):
    STARTED = "started"
    """The worker's first PARTIAL: the command is about to run (payload: worker, at)."""
    FINAL = "final"
    """The target's FINAL (payload: state, result frames, exit_code, message, at)."""
    EXPIRED = "expired"
    """The worker refused the attempt: it arrived after its `start_by`; nothing ran."""
    SILENT = "silent"
    """No answer to a dispatch within the dispatch timeout, before any `started`."""
    CANCEL = "cancel"
    """A user cancelled the job (jobs.cancel, titanic.close)."""
    REATTACH_FAILED = "reattach_failed"
    """The job was running, or an attempt of it may have started unseen; its worker could not
    be reached or did not know the run."""


@dataclass(frozen=True, slots=True)
class Rule:
    to: str | None
    """The new state; None: decided by the payload (FINAL) or unchanged (`running` + cancel)."""
    why: str
    """The clause of spec/jobs.md this row implements."""


# (from state, event) -> rule. A missing row means: the event does not apply; ignore it.
TABLE: dict[tuple[str, Event], Rule] = {
    ("queued", Event.STARTED): Rule("running", "§4 started moves the job to running"),
    ("queued", Event.FINAL): Rule(None, "§4 a service without started ends from queued"),
    ("queued", Event.EXPIRED): Rule("queued", "§4 before started, a dispatch may be retried"),
    ("queued", Event.SILENT): Rule("queued", "§4 before started, a dispatch may be retried"),
    ("queued", Event.CANCEL): Rule("cancelled", "§4 a cancelled queued job never runs"),
    ("queued", Event.REATTACH_FAILED): Rule("lost", "§4 an attempt whose fate stays unknown"),
    ("running", Event.FINAL): Rule(None, "§4 the FINAL's status ends the job"),
    ("running", Event.CANCEL): Rule(None, "§4 a running job is cancelled by its worker"),
    ("running", Event.REATTACH_FAILED): Rule("lost", "§4 not re-attached: lost"),
}


@dataclass(frozen=True, slots=True)
class Step:
    """What to write: `store.update(job_id, expect, **changes)`."""

    expect: frozenset[str]
    changes: dict[str, Any] = field(default_factory=dict)
    cancel_worker: bool = False
    """Also send the command service's cancel message to the worker running the job."""


def final_state(status: str, cancel_requested: bool) -> str:
    """The job state for a FINAL's status (`spec/jobs.md` §1): the same word, except that a
    run that ended after a cancel was requested, other than `ok`, counts as `cancelled`."""
    if cancel_requested and status != "ok":
        return "cancelled"
    return status if status in TERMINAL else "error"


def step(state: str, event: Event, *, at: float, **payload: Any) -> Step | None:
    """The store update for `event` on a job in `state`, or None when the event does not apply.

    Payload: STARTED `worker`; FINAL `status`, `result`, `exit_code`, `message`,
    `cancel_requested`; CANCEL and REATTACH_FAILED optionally `message`.
    """
    rule = TABLE.get((state, event))
    if rule is None:
        return None
    expect = frozenset({state})
    if event is Event.STARTED:
        return Step(expect, {"state": "running", "started": at, "worker": payload["worker"]})
    if event is Event.FINAL:
        return Step(
            expect,
            {
                "state": final_state(payload["status"], payload.get("cancel_requested", False)),
                "finished": at,
                "result": payload.get("result"),
                "exit_code": payload.get("exit_code"),
                "message": payload.get("message"),
                "claimed": None,
            },
        )
    if event is Event.SILENT:
        return Step(expect, {"claimed": None})
    if event is Event.EXPIRED:
        return Step(expect, {"claimed": None, "start_by": None})
    if event is Event.CANCEL:
        if state == "queued":
            return Step(
                expect,
                {
                    "state": "cancelled",
                    "finished": at,
                    "claimed": None,
                    "message": payload.get("message", "cancelled before it started"),
                },
            )
        return Step(expect, {"cancel_requested": True}, cancel_worker=True)
    if event is Event.REATTACH_FAILED:
        return Step(
            expect,
            {
                "state": "lost",
                "claimed": None,
                "finished": at,
                "message": payload.get("message", "its worker could not be re-attached"),
            },
        )
    raise AssertionError(f"no action for {event}")  # pragma: no cover - TABLE and code agree
