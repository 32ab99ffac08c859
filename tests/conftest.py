"""Fixtures shared by the unit and integration tests."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest

from tests import pgserver
from tests.pgserver import PgServer
from tests.support import Process, free_tcp_endpoint, start_broker


@pytest.fixture(scope="session", autouse=True)
def _private_user_dirs() -> Iterator[None]:
    """Keep the suite away from the real user's runtime and config directories.

    With no endpoint option our programs use a socket in $XDG_RUNTIME_DIR/mdp and the key set
    in $XDG_CONFIG_HOME/mdp; a test must neither meet a broker the user runs there nor pick
    up their keys. Both point at fresh private directories (short: unix socket paths are
    limited to 107 bytes). When the suite runs as root (CI containers), the workers it starts
    run the test commands as root too: that is opted into here, once, with the variable the
    operator would set (MDP_WORKER_ALLOW_ROOT); the tests of the refusal itself remove it.
    """
    runtime = tempfile.mkdtemp(prefix="mdp-rt-")
    config = tempfile.mkdtemp(prefix="mdp-cfg-")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_RUNTIME_DIR", runtime)
        patch.setenv("XDG_CONFIG_HOME", config)
        if os.geteuid() == 0:
            patch.setenv("MDP_WORKER_ALLOW_ROOT", "1")
        yield
    shutil.rmtree(runtime, ignore_errors=True)
    shutil.rmtree(config, ignore_errors=True)


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
