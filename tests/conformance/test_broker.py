"""Every broker rule of `mdp_conformance`, one pytest case each, against the broker under test
(ours by default; `--broker-cmd`/`--broker-endpoint` for another)."""

from __future__ import annotations

import pytest

from mdp_conformance.broker import BrokerSubject
from mdp_conformance.rules import SHOULD, Case, cases_of
from mdp_conformance.runner import SKIP, judge


def _marks(case: Case) -> list[pytest.MarkDecorator]:
    module = case.rule.func.__module__.rsplit(".", 1)[-1]
    marks = []
    if module in ("dialects", "bridging"):
        marks.append(getattr(pytest.mark, module))
    if case.rule.level == SHOULD:
        marks.append(pytest.mark.recommended)
    return marks


@pytest.mark.parametrize(
    "case", [pytest.param(c, id=c.id, marks=_marks(c)) for c in cases_of("broker")]
)
def test_broker_rule(broker_subject: BrokerSubject, case: Case) -> None:
    outcome = judge(broker_subject, case)
    if outcome.status == SKIP:
        pytest.skip(outcome.detail)
    if outcome.failed:
        pytest.fail(f"{case.rule.clause}: {outcome.detail}", pytrace=False)
