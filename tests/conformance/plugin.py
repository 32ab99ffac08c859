"""Command-line options and markers of the conformance suite.

pytest honours `pytest_addoption` only in plugins and initial conftests, so this module is
loaded by the repository-root `conftest.py` (`pytest_plugins`). That makes the options exist
both for `python -m pytest` from the root and for `pytest tests/conformance --broker-cmd ...`.
"""

from __future__ import annotations

import pytest

DEFAULT_BROKER_CMD = (
    "mdp-broker --bind {endpoint} --insecure --heartbeat-ms {heartbeat_ms} --liveness {liveness}"
    " --request-ttl {request_ttl}"
)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("mdp-conformance", "MDP broker conformance suite (tests/conformance)")
    group.addoption(
        "--broker-cmd",
        default=None,
        metavar="CMD",
        help="command that starts the broker under test. {endpoint} is replaced by a free "
        "loopback tcp endpoint; {heartbeat_ms}, {liveness} and {request_ttl} by the suite's "
        "settings. Default: our broker with short test timings: " + DEFAULT_BROKER_CMD,
    )
    group.addoption(
        "--broker-endpoint",
        default=None,
        metavar="ENDPOINT",
        help="endpoint of an already running broker (instead of --broker-cmd).",
    )
    group.addoption(
        "--mdp-version",
        default="both",
        choices=("0.1", "0.2", "both"),
        help="protocol version(s) to test; cross-version tests need 'both' (default: both).",
    )
    group.addoption(
        "--heartbeat-ms",
        type=int,
        default=None,
        help="the broker's heartbeat interval in ms. Default: 100 when the broker command has "
        "{heartbeat_ms} (the suite passes it), otherwise 2500 (the zguide's interval).",
    )
    group.addoption(
        "--liveness",
        type=int,
        default=None,
        help="heartbeats a worker may miss before the broker expires it (default 3).",
    )
    group.addoption(
        "--request-ttl",
        type=float,
        default=None,
        help="seconds a queued request lives in the broker. Default: 1 when the broker command "
        "has {request_ttl}; otherwise unknown and the TTL test is skipped.",
    )
    group.addoption(
        "--quiet-ms",
        type=int,
        default=None,
        help="window in which the suite checks that nothing arrives (default: 3 heartbeat "
        "intervals, kept between 300 and 1000 ms).",
    )


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--broker-cmd") and config.getoption("--broker-endpoint"):
        raise pytest.UsageError("give --broker-cmd or --broker-endpoint, not both")
    config.addinivalue_line(
        "markers",
        "dialects: non-RFC framings our broker also accepts; deselect with -m 'not dialects' "
        "when testing another broker.",
    )
    config.addinivalue_line(
        "markers",
        "recommended: checks a SHOULD/MAY-level behaviour (queueing, request expiry, LRU "
        "dispatch) rather than a MUST.",
    )
    config.addinivalue_line(
        "markers",
        "bridging: a 0.1 peer talks to a 0.2 peer through the broker (needs --mdp-version "
        "both); the RFCs do not define it.",
    )
