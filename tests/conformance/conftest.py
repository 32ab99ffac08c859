"""Fixtures of the in-repo conformance runs: the peers under test, built from the options in
`plugin.py` (defaults: our own broker, worker and client with short timings).

The rules themselves live in the installable `mdp_conformance` package; these tests run each
case through the same runner `mdp-conformance` uses, so a crash of the peer fails only the
case that caused it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from mdp_conformance.broker import BrokerSettings, BrokerSubject
from mdp_conformance.rules import VERSIONS
from tests.conformance.plugin import DEFAULT_BROKER_CMD


def selected_versions(config: pytest.Config) -> tuple[str, ...]:
    chosen = config.getoption("--mdp-version")
    return VERSIONS if chosen == "both" else (chosen,)


@pytest.fixture(scope="session")
def broker_subject(request: pytest.FixtureRequest) -> Iterator[BrokerSubject]:
    config = request.config
    endpoint = config.getoption("--broker-endpoint")
    command = None if endpoint else (config.getoption("--broker-cmd") or DEFAULT_BROKER_CMD)
    subject = BrokerSubject(
        BrokerSettings(
            command=command,
            endpoint=endpoint,
            versions=selected_versions(config),
            heartbeat_ms=config.getoption("--heartbeat-ms"),
            liveness=config.getoption("--liveness"),
            request_ttl=config.getoption("--request-ttl"),
            quiet_ms=config.getoption("--quiet-ms"),
        )
    )
    try:
        yield subject
    finally:
        subject.close()
