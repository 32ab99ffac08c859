"""Every worker rule of `mdp_conformance` against our `mdp-worker` (echo service, short
heartbeats), both protocol versions: the suite plays the broker."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from mdp_conformance.rules import Case, cases_of
from mdp_conformance.runner import SKIP, judge
from mdp_conformance.worker import WorkerSettings, WorkerSubject

OUR_WORKER = (
    "mdp-worker --broker {endpoint} --service {service} --heartbeat-ms {heartbeat_ms}"
    " --liveness {liveness} --mdp-version {mdp_version} --log-level debug"
)


@pytest.fixture(scope="module")
def our_worker() -> Iterator[WorkerSubject]:
    subject = WorkerSubject(WorkerSettings(OUR_WORKER))
    try:
        yield subject
    finally:
        subject.close()


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in cases_of("worker")])
def test_our_worker(our_worker: WorkerSubject, case: Case) -> None:
    outcome = judge(our_worker, case)
    assert outcome.status != SKIP, f"our worker must be judged on every rule: {outcome.detail}"
    if outcome.failed:
        pytest.fail(f"{case.rule.clause}: {outcome.detail}", pytrace=False)
