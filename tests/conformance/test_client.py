"""Every client rule of `mdp_conformance` against our client library (`mdp.client.Client`,
through the one-shot program `tests/conformance/peers/our_client.py`), both protocol versions,
including the retry rule: the suite plays the broker and the worker."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest

from mdp_conformance.client import ClientSettings, ClientSubject
from mdp_conformance.rules import Case, cases_of
from mdp_conformance.runner import SKIP, judge

# {timeout_ms} is what the run claims (--retry-after-ms): the client retries after it.
OUR_CLIENT = (
    f"{sys.executable} -m tests.conformance.peers.our_client"
    " {endpoint} {service} {mdp_version} {timeout_ms} {body}"
)
RETRY_AFTER_MS = 400


@pytest.fixture(scope="module")
def our_client() -> Iterator[ClientSubject]:
    subject = ClientSubject(ClientSettings(OUR_CLIENT, retry_after_ms=RETRY_AFTER_MS))
    try:
        yield subject
    finally:
        subject.close()


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in cases_of("client")])
def test_our_client(our_client: ClientSubject, case: Case) -> None:
    outcome = judge(our_client, case)
    assert outcome.status != SKIP, f"our client must be judged on every rule: {outcome.detail}"
    if outcome.failed:
        pytest.fail(f"{case.rule.clause}: {outcome.detail}", pytrace=False)
