"""`mdp-client --embedded`: broker and workers inside the client process (the quickstart)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.support import script

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
