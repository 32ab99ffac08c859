"""mdp-conformance as a user runs it: exit codes, the table, JUnit XML and JSON, and a suite
that imports nothing from the code it judges."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

CONFORMANCE = [sys.executable, "-m", "mdp_conformance"]
BUSY_SILENT_WORKER = (
    f"{sys.executable} -m tests.conformance.peers.faulty_worker"
    " {endpoint} {service} {mdp_version} {heartbeat_ms} busy-silent"
)


def conformance(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CONFORMANCE, *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_the_suite_imports_nothing_from_the_code_it_judges() -> None:
    """Every module of mdp_conformance, every rule registered: no mdp/services/clients."""
    probe = (
        "import sys, pkgutil, importlib, mdp_conformance as p\n"
        "for m in pkgutil.walk_packages(p.__path__, 'mdp_conformance.'):\n"
        "    if not m.name.endswith('__main__'): importlib.import_module(m.name)\n"
        "from mdp_conformance.rules import cases_of\n"
        "assert all(cases_of(t) for t in ('broker', 'worker', 'client'))\n"
        "print(sorted(n for n in sys.modules if n.split('.')[0] in "
        "('mdp', 'services', 'clients')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]"


def test_a_failed_must_rule_exits_1_with_the_table_junit_and_json(tmp_path: Path) -> None:
    junit, report = tmp_path / "results.xml", tmp_path / "results.json"
    done = conformance(
        "worker",
        "--cmd",
        BUSY_SILENT_WORKER,
        "--mdp-version",
        "0.2",
        "--rule",
        "heartbeats-while-*",
        "--junit-xml",
        str(junit),
        "--json",
        str(report),
    )
    assert done.returncode == 1, done.stderr
    assert "heartbeats-while-busy[0.2]" in done.stdout and "RFC 7/18 Heartbeating" in done.stdout
    assert "no command from the worker for" in done.stdout
    data = json.loads(report.read_text())
    assert data["passed"] is False
    assert {r["id"]: r["status"] for r in data["results"]} == {
        "heartbeats-while-idle[0.2]": "pass",
        "heartbeats-while-busy[0.2]": "fail",
    }
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite is not None
    assert (suite.get("tests"), suite.get("failures")) == ("2", "1")
    failure = suite.find("testcase[@name='heartbeats-while-busy[0.2]']/failure")
    assert failure is not None and "no command from the worker" in failure.get("message", "")


def test_usage_errors_exit_2_with_a_message_not_a_traceback() -> None:
    done = conformance("worker", "--cmd", "my-worker --broker {endpoint}")
    assert done.returncode == 2
    assert "{mdp_version}" in done.stderr and "Traceback" not in done.stderr
    done = conformance("broker")
    assert done.returncode == 2 and "--cmd or --endpoint" in done.stderr


def test_a_broker_that_cannot_start_exits_3() -> None:
    done = conformance("broker", "--cmd", f"{sys.executable} -c 'raise SystemExit(7)' {{endpoint}}")
    assert done.returncode == 3
    assert "exited at start" in done.stderr and "Traceback" not in done.stderr


def test_an_endpoint_nobody_listens_on_exits_3_at_once() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        done = conformance("broker", "--endpoint", f"tcp://127.0.0.1:{port}")
    assert done.returncode == 3
    assert "no broker listens on" in done.stderr
