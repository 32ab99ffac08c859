"""`mdp-client --embedded`: broker and workers inside the client process (the quickstart)."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest

from tests.integration.test_worker_harness import live_members
from tests.support import Process, script, wait_until

pytestmark = pytest.mark.timeout(60)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run(*args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [script("mdp-client"), "--embedded", *args],
        capture_output=True,
        text=True,
        timeout=30,
        input=input,
    )


def test_quickstart_batch_runs_and_exits_0() -> None:
    result = run("-f", str(EXAMPLES / "batch.json"), "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    expected = json.loads((EXAMPLES / "batch.json").read_text())
    assert [r["status"] for r in document["results"]] == ["ok"] * len(expected)
    assert document["results"][0]["stdout"] == "Hello, world!\n"
    # The non-UTF-8 example keeps its bytes.
    assert "base64" in document["results"][-1]["stdout"]


def test_failures_example_reports_each_status() -> None:
    result = run("-f", str(EXAMPLES / "failures.json"), "--json")
    assert result.returncode == 124, result.stderr
    statuses = [r["status"] for r in json.loads(result.stdout)["results"]]
    assert statuses == ["failed", "timeout", "error", "error"]


def test_service_the_embedded_worker_cannot_host_exits_69() -> None:
    result = run("-f", "-", input='{"command_type": "custom", "command_name": "x"}')
    assert result.returncode == 69
    assert "--embedded hosts only the built-in services" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_the_client_and_the_commands_its_workers_ran(
    tmp_path: Path, sig: signal.Signals
) -> None:
    """`timeout 10 mdp-client --embedded ...` or Ctrl-C: no command outlives the client, and
    the exit code is 128 + the signal."""
    marker = tmp_path / "pgid"
    commands = tmp_path / "commands.json"
    entry = {"command_type": "shell", "command_name": f"echo $$ > {marker}; exec sleep 30"}
    commands.write_text(json.dumps([entry]))
    client = Process(
        [script("mdp-client"), "--embedded", "-f", str(commands)],
        # A child of a non-interactive shell may inherit SIGINT ignored; a terminal's is not.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        wait_until(lambda: marker.exists() and marker.read_text().strip(), 15, what="the command")
        pgid = int(marker.read_text())
        assert live_members(pgid), "the command should be running"
        client.signal(sig)
        assert client.wait(timeout=10) == 128 + sig
        _, err = client.popen.communicate(timeout=5)
        assert b"Traceback" not in err
        wait_until(lambda: live_members(pgid) == [], 5, what=f"group {pgid} to be dead")
    finally:
        client.kill()
