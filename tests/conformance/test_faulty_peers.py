"""The suite judges each rule on its own: small deliberately faulty peers fail exactly the
rule they break, and nothing else."""

from __future__ import annotations

import sys

import pytest

from mdp_conformance.broker import BrokerSettings, BrokerSubject
from mdp_conformance.rules import cases_of
from mdp_conformance.runner import FAIL, SKIP, Outcome, run
from mdp_conformance.worker import WorkerSettings, WorkerSubject

FAULTY_WORKER = (
    f"{sys.executable} -m tests.conformance.peers.faulty_worker"
    " {endpoint} {service} {mdp_version} {heartbeat_ms} "
)
FRAGILE_BROKER = (
    f"{sys.executable} -m tests.conformance.peers.fragile_broker --bind {{endpoint}} --insecure"
    " --heartbeat-ms {heartbeat_ms} --liveness {liveness} --request-ttl {request_ttl}"
)


def failed(outcomes: list[Outcome]) -> dict[str, str]:
    return {o.case.id: o.detail for o in outcomes if o.failed}


def run_worker(fault: str) -> list[Outcome]:
    subject = WorkerSubject(WorkerSettings(FAULTY_WORKER + fault, versions=("0.2",)))
    try:
        cases = [c for c in cases_of("worker") if c.version == "0.2"]
        return run(subject, cases)
    finally:
        subject.close()


@pytest.mark.parametrize(
    ("fault", "broken_rule", "says"),
    [
        ("busy-silent", "heartbeats-while-busy[0.2]", "no command from the worker for"),
        ("partial-after-final", "one-final-and-nothing-after-it[0.2]", "the worker sent"),
    ],
)
def test_a_faulty_worker_fails_exactly_the_rule_it_breaks(
    fault: str, broken_rule: str, says: str
) -> None:
    outcomes = run_worker(fault)
    assert list(failed(outcomes)) == [broken_rule], failed(outcomes)
    assert says in failed(outcomes)[broken_rule]
    assert not [o for o in outcomes if o.status == SKIP]


def test_a_broker_that_exits_on_one_malformed_message_fails_that_rule_only() -> None:
    """The fragile broker exits on MDPC02 0x07: the rule that sends it fails with the broker's
    last output; the broker is restarted, and the rules before and after it pass."""
    # A 0.1 s quiet window (0.3 s by default) for the "is dropped" rules: what is asserted here
    # is which rules fail and the restart, and a shorter window can only make a rule pass more.
    subject = BrokerSubject(BrokerSettings(command=FRAGILE_BROKER, versions=("0.2",), quiet_ms=100))
    try:
        cases = [
            c
            for c in cases_of("broker")
            if c.version == "0.2" and c.rule.func.__module__.endswith(("malformed", "mmi"))
        ]
        outcomes = run(subject, cases)
    finally:
        subject.close()
    crashing = "client-request-with-an-unknown-command-is-dropped[0.2]"
    assert list(failed(outcomes)) == [crashing], failed(outcomes)
    detail = failed(outcomes)[crashing]
    assert "the broker died (exit 3)" in detail
    assert "fragile broker: unknown client command 0x07, giving up" in detail
    assert subject.starts == 2
    after = [o for o in outcomes[[o.case.id for o in outcomes].index(crashing) + 1 :]]
    assert len(after) >= 10 and all(o.status != FAIL for o in after)
