"""Fixtures shared by the unit and integration tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support import Process, free_tcp_endpoint, start_broker


@pytest.fixture
def broker_endpoint() -> Iterator[str]:
    """A fresh `mdp-broker` subprocess on a free loopback port, with test heartbeat settings."""
    endpoint = free_tcp_endpoint()
    proc: Process = start_broker(endpoint)
    try:
        yield endpoint
    finally:
        proc.stop()
