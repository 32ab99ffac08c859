"""Fixtures shared by the unit and integration tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests import pgserver
from tests.pgserver import PgServer
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


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """One throw-away PostgreSQL server for the whole session (skips when there is none)."""
    reason = pgserver.skip_reason()
    if reason is not None:
        pytest.skip(reason)
    bin_dir = pgserver.find_bin_dir()
    assert bin_dir is not None
    server = PgServer(bin_dir)
    try:
        server.start()
    except Exception as exc:  # a server that cannot start is an environment problem
        server.destroy()
        log = server.log.read_text() if server.log.exists() else ""
        pytest.fail(f"cannot start PostgreSQL from {bin_dir}: {exc}\n{log}")
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture
def pg_url(pg_server: PgServer) -> Iterator[str]:
    """A fresh, empty database on the session's PostgreSQL server."""
    url = pg_server.create_database()
    try:
        yield url
    finally:
        pg_server.drop_database(url)
