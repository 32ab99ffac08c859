"""`mdp-client --curve-secret-key/--curve-server-key` against a broker that requires CURVE.

No worker is needed: `ping` gets "404" only from a broker that let the client in, and no answer
at all from one that refused the handshake.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import free_tcp_endpoint, script, start_broker

pytestmark = pytest.mark.timeout(60)


def keys(*args: str) -> None:
    subprocess.run([script("mdp-keys"), *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    for name in ("broker", "alice", "mallory"):
        keys("generate", name, "--dir", str(tmp_path / "keys"))
    keys("allow", "client", str(tmp_path / "keys/alice.key"), "--dir", str(tmp_path / "clients"))
    (tmp_path / "workers").mkdir()
    endpoint = free_tcp_endpoint()
    broker = start_broker(
        endpoint,
        "--curve-secret-key",
        str(tmp_path / "keys/broker.key_secret"),
        "--allow-clients",
        str(tmp_path / "clients"),
        "--allow-workers",
        str(tmp_path / "workers"),
    )
    try:
        yield endpoint, tmp_path / "keys"
    finally:
        broker.stop()


def ping(endpoint: str, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [script("mdp-client"), "-a", endpoint, "--timeout", "0.5", "--retries", "0"]
    return subprocess.run(
        [*argv, *args, "ping", "shell"], capture_output=True, text=True, timeout=30
    )


def test_allowed_key_is_answered(secured: tuple[str, Path]) -> None:
    endpoint, k = secured
    result = ping(
        endpoint,
        "--curve-secret-key",
        str(k / "alice.key_secret"),
        "--curve-server-key",
        str(k / "broker.key"),
    )
    assert result.returncode == 69
    assert "unknown to the broker" in result.stdout  # the broker answered 404


@pytest.mark.parametrize("key", [None, "mallory"])
def test_no_key_or_unknown_key_gets_no_answer(secured: tuple[str, Path], key: str | None) -> None:
    endpoint, k = secured
    args = (
        []
        if key is None
        else [
            "--curve-secret-key",
            str(k / f"{key}.key_secret"),
            "--curve-server-key",
            str(k / "broker.key"),
        ]
    )
    result = ping(endpoint, *args)
    assert result.returncode == 69
    assert "no broker answered" in result.stderr


def test_half_the_curve_options_is_a_usage_error(secured: tuple[str, Path]) -> None:
    endpoint, k = secured
    result = ping(endpoint, "--curve-server-key", str(k / "broker.key"))
    assert result.returncode == 2
    assert "go together" in result.stderr


def test_missing_key_file_is_a_clear_usage_error(secured: tuple[str, Path], tmp_path: Path) -> None:
    endpoint, k = secured
    result = ping(
        endpoint,
        "--curve-secret-key",
        str(tmp_path / "absent.key_secret"),
        "--curve-server-key",
        str(k / "broker.key"),
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "absent.key_secret" in result.stderr
