"""Judge every case on its own, even when the peer under test dies.

Theory of operation: a `Subject` is the peer under test as the runner sees it. For each case
the runner asks it for a context to hand the rule (`subject.session(case)`), runs the rule,
and then asks the subject whether the peer died meanwhile (`subject.casualty()`). A dead peer
turns that case into a failure carrying the peer's last log lines, whatever the rule said,
and the subject restarts the peer (when the suite started it) before the next case, so one
crash costs one rule, not the rest of the report.

    rule returned                      -> pass
    rule raised AssertionError         -> fail (its message: the first difference seen)
    rule raised Skip                   -> skip (the reason)
    rule raised anything else          -> error (the exception, as one line)
    the peer died during the case      -> fail: "the broker died (exit 3); its last output: ..."
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

from mdp_conformance.rules import Case, Skip

PASS = "pass"
FAIL = "fail"
SKIP = "skip"
ERROR = "error"


@dataclass(frozen=True)
class Outcome:
    case: Case
    status: str
    detail: str
    seconds: float

    @property
    def failed(self) -> bool:
        return self.status in (FAIL, ERROR)


class Subject(Protocol):
    """The peer under test, as the runner drives it."""

    versions: tuple[str, ...]

    def session(self, case: Case) -> AbstractContextManager[object]:
        """The context the rule gets (opened before, closed after the case)."""
        ...

    def casualty(self) -> str | None:
        """None, or how the peer died during the case (then it is restarted if possible)."""
        ...

    def close(self) -> None: ...


def judge(subject: Subject, case: Case) -> Outcome:
    start = time.monotonic()
    missing = [v for v in case.versions_needed() if v not in subject.versions]
    if missing:
        return Outcome(case, SKIP, f"--mdp-version does not select {'/'.join(missing)}", 0.0)
    status, detail = PASS, ""
    try:
        with subject.session(case) as context:
            case.call(context)
    except Skip as exc:
        status, detail = SKIP, str(exc)
    except AssertionError as exc:
        status, detail = FAIL, str(exc) or "assertion failed"
    except Exception as exc:
        where = traceback.extract_tb(exc.__traceback__)[-1]
        status = ERROR
        detail = f"{type(exc).__name__}: {exc} (at {where.name}, line {where.lineno})"
    died = subject.casualty()
    if died is not None:
        status, detail = FAIL, died + (f"\n(the rule saw: {detail})" if detail else "")
    return Outcome(case, status, detail, time.monotonic() - start)


def run(
    subject: Subject, cases: Iterable[Case], report: Callable[[Outcome], None] | None = None
) -> list[Outcome]:
    """Judge each case in turn; `report` sees each outcome as soon as it is known."""
    outcomes: list[Outcome] = []
    for case in cases:
        outcome = judge(subject, case)
        outcomes.append(outcome)
        if report is not None:
            report(outcome)
    return outcomes
