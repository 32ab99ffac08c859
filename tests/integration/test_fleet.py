"""Fleet (issue 14): named workers, `mmi.workers`, --host/--all targeting, several brokers.

Real broker, worker and client processes. Commands append to marker files, so a test can count
how often each ran and how many ran at once. Every wait is bounded (wait_until, timeouts).
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from mdp.client import Client
from tests.integration.test_guarantees import start_worker
from tests.support import (
    TEST_HEARTBEAT_MS,
    TEST_LIVENESS,
    Process,
    free_tcp_endpoint,
    script,
    start_broker,
    wait_until,
)

pytestmark = pytest.mark.timeout(90)

NAMES = ("web-1", "web-2", "db-1")
NO_HOST = 68


def workers(endpoint: str) -> dict[str, dict[str, object]]:
    """`mdp-client workers --json` by name ({} when the broker does not answer)."""

    async def ask() -> dict[str, dict[str, object]]:
        async with Client(endpoint, timeout=0.5, retries=0) as client:
            try:
                return {w.name: w.to_map() for w in await client.workers()}
            except Exception:
                return {}

    return asyncio.run(ask())


def wait_named(
    endpoint: str, names: tuple[str, ...], connections: int, timeout: float = 15
) -> None:
    """Until every name has `connections` registered connections on the broker."""

    def ready() -> bool:
        found = workers(endpoint)
        return all(found.get(n, {}).get("connections") == connections for n in names)

    wait_until(ready, timeout=timeout, interval=0.05, what=f"workers {names} x {connections}")


def client(
    endpoints: list[str], *args: str, stdin: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    argv = [script("mdp-client"), "--timeout", "3"]
    for endpoint in endpoints:
        argv += ["-a", endpoint]
    return subprocess.run(
        [*argv, *args, "-f", "-"], input=stdin, capture_output=True, text=True, timeout=timeout
    )


# A command that prints the name of the worker running it: the worker's pid, looked up.
def whoami_commands(marker_dir: Path, count: int = 1) -> str:
    return json.dumps(
        [
            {
                "command_type": "shell",
                "command_name": f'echo "$PPID" >> {marker_dir}/ran-{i}; echo hi',
            }
            for i in range(count)
        ]
    )


@pytest.fixture
def three(tmp_path: Path) -> Iterator[tuple[str, dict[str, Process]]]:
    endpoint = free_tcp_endpoint()
    broker = start_broker(endpoint)
    procs = {name: start_worker(endpoint, name, tmp_path / "state") for name in NAMES}
    try:
        wait_named(endpoint, NAMES, connections=3)  # shell + 2 x shell@NAME (concurrency 1)
        yield endpoint, procs
    finally:
        for proc in procs.values():
            proc.stop()
        broker.stop()


def hosts_of(result: subprocess.CompletedProcess[str]) -> list[str]:
    document = json.loads(result.stdout)
    return sorted(record["host"] for record in document["results"])


def test_host_reaches_exactly_the_named_worker(
    three: tuple[str, dict[str, Process]], tmp_path: Path
) -> None:
    endpoint, procs = three
    result = client([endpoint], "--host", "web-2", "--json", stdin=whoami_commands(tmp_path, 3))
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert [r["host"] for r in document["results"]] == ["web-2"] * 3
    # Each command says which worker ran it: the named one, and only it.
    assert {r["worker"]["name"] for r in document["results"]} == {"web-2"}
    assert {r["worker"]["pid"] for r in document["results"]} == {procs["web-2"].pid}
    assert document["summary"]["hosts"]["ok"] == ["web-2"]


def test_all_gives_one_result_per_worker_and_glob_a_subset(
    three: tuple[str, dict[str, Process]], tmp_path: Path
) -> None:
    endpoint, _ = three
    result = client([endpoint], "--all", "--json", stdin=whoami_commands(tmp_path))
    assert result.returncode == 0, result.stderr
    assert hosts_of(result) == sorted(NAMES)
    document = json.loads(result.stdout)
    assert {r["host"]: r["worker"]["name"] for r in document["results"]} == {n: n for n in NAMES}

    result = client([endpoint], "--host", "web-*", "--json", stdin=whoami_commands(tmp_path))
    assert result.returncode == 0, result.stderr
    assert hosts_of(result) == ["web-1", "web-2"]

    human = client([endpoint], "--host", "web-*", "--host", "db-1", stdin=whoami_commands(tmp_path))
    assert human.returncode == 0, human.stderr
    for name in NAMES:
        assert f"shell@{name}:" in human.stdout  # each result says its host
    assert "3 hosts: 3 ok" in human.stdout


def test_unknown_host_is_its_own_exit_code_at_once(
    three: tuple[str, dict[str, Process]], tmp_path: Path
) -> None:
    endpoint, _ = three
    for pattern in ("web-9", "mail-*"):
        result = client([endpoint], "--host", pattern, stdin=whoami_commands(tmp_path), timeout=10)
        assert result.returncode == NO_HOST, result.stderr
        assert "no registered worker matches" in result.stderr
        assert "web-1" in result.stderr  # it says which names exist
        assert result.stdout == ""
    assert not list(tmp_path.glob("ran-*"))  # nothing was sent


def test_a_second_worker_with_a_name_in_use_is_refused(
    three: tuple[str, dict[str, Process]], tmp_path: Path
) -> None:
    endpoint, procs = three
    impostor = start_worker(endpoint, "web-1", tmp_path / "state")
    try:
        wait_until(
            lambda: b"refused the registration" in impostor.output()[1],
            timeout=10,
            what="the refusal in the second worker's log",
        )
        found = workers(endpoint)
        assert found["web-1"]["connections"] == 3  # the first keeps its name, alone
        result = client([endpoint], "--host", "web-1", "--json", stdin=whoami_commands(tmp_path, 2))
        assert result.returncode == 0, result.stderr
        pids = {r["worker"]["pid"] for r in json.loads(result.stdout)["results"]}
        assert pids == {procs["web-1"].pid}
    finally:
        impostor.stop()


def test_workers_json_fields_and_a_stopped_worker_ages_then_expires(
    three: tuple[str, dict[str, Process]],
) -> None:
    endpoint, procs = three
    result = subprocess.run(
        [script("mdp-client"), "-a", endpoint, "workers", "--json"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.returncode == 0, result.stderr
    entries = {e["name"]: e for e in json.loads(result.stdout)}
    assert set(entries) == set(NAMES)
    for name, entry in entries.items():
        assert set(entry) == {
            "name",
            "services",
            "version",
            "busy",
            "in_flight",
            "connections",
            "last_heard",
        }
        assert entry["services"] == ["shell", f"shell@{name}"]
        assert entry["version"] == "MDP/0.2"
        assert entry["busy"] is False and entry["in_flight"] == 0
        assert 0 <= entry["last_heard"] < 1.0

    procs["db-1"].signal(signal.SIGSTOP)
    try:
        seen: list[float] = []

        def aged() -> bool:
            entry = workers(endpoint).get("db-1")
            if entry is not None:
                seen.append(float(entry["last_heard"]))  # type: ignore[arg-type]
            return len(seen) >= 2 and seen[-1] > seen[0] + 0.1

        wait_until(aged, timeout=5, interval=0.05, what="a growing last-heard")
        expiry = TEST_HEARTBEAT_MS / 1000 * TEST_LIVENESS
        wait_until(lambda: "db-1" not in workers(endpoint), timeout=expiry + 5, what="expiry")
        assert max(seen) <= expiry + 0.5
    finally:
        procs["db-1"].signal(signal.SIGCONT)


# ---------------------------------------------------------------------------------------------
# Several brokers


def concurrent_max(log: Path) -> int:
    """Most commands running at once, from a log of "+" (start) and "-" (end) lines."""
    running = peak = 0
    for line in log.read_text().split():
        running += 1 if line == "+" else -1
        peak = max(peak, running)
    return peak


def test_concurrency_is_global_across_two_brokers(tmp_path: Path) -> None:
    """--concurrency 2 on two brokers: 20 commands from both sides at once never run more than
    2 at a time on the worker."""
    a, b = free_tcp_endpoint(), free_tcp_endpoint()
    brokers = [start_broker(a), start_broker(b)]
    log = tmp_path / "concurrent"
    worker = start_worker(
        a, "both", tmp_path / "state", extra=("--broker", b, "--concurrency", "2")
    )
    try:
        wait_named(a, ("both",), connections=5)  # shell x 2 + shell@both x 3
        wait_named(b, ("both",), connections=5)
        # flock: the start/end lines of concurrent commands must not interleave mid-line.
        command = (
            f"flock {log}.lock sh -c 'echo + >> {log}'; sleep 0.2; "
            f"flock {log}.lock sh -c 'echo - >> {log}'"
        )
        batch = json.dumps([{"command_type": "shell", "command_name": command}] * 10)
        clients = [
            subprocess.Popen(
                [
                    script("mdp-client"),
                    "-a",
                    endpoint,
                    "--timeout",
                    "10",
                    "--parallel",
                    "10",
                    "--json",
                    "-f",
                    "-",
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for endpoint in (a, b)
        ]
        for proc in clients:
            out, err = proc.communicate(batch, timeout=60)
            assert proc.returncode == 0, err
            assert json.loads(out)["summary"]["by_status"] == {"ok": 10}
        assert log.read_text().split().count("+") == 20
        assert concurrent_max(log) == 2
    finally:
        worker.stop()
        for broker in brokers:
            broker.stop()


def test_killing_one_of_two_brokers_loses_nothing_unstarted(tmp_path: Path) -> None:
    """Two brokers, two workers on both, 40 commands --parallel 8 through both; kill -9 one
    broker mid-batch: no command runs twice, every one completes through the other broker
    (those that had started are re-attached to their worker, whose `started` or result died
    with the broker; the others are re-sent once no worker knows them), and the restarted
    broker gets its workers back."""
    a, b = free_tcp_endpoint(), free_tcp_endpoint()
    broker_a, broker_b = start_broker(a), start_broker(b)
    procs = [
        start_worker(a, name, tmp_path / "state", extra=("--broker", b, "--concurrency", "4"))
        for name in ("w1", "w2")
    ]
    try:
        for endpoint in (a, b):
            wait_named(endpoint, ("w1", "w2"), connections=9)
        marks = tmp_path / "marks"
        marks.mkdir()
        batch = json.dumps(
            [
                {"command_type": "shell", "command_name": f"date +%s.%N >> {marks}/{i}; sleep 0.3"}
                for i in range(40)
            ]
        )
        run = subprocess.Popen(
            [
                script("mdp-client"),
                "-a",
                a,
                "-a",
                b,
                "--timeout",
                "2",
                "--parallel",
                "8",
                "--json",
                "-f",
                "-",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert run.stdin is not None
        run.stdin.write(batch)
        run.stdin.close()
        wait_until(lambda: len(list(marks.iterdir())) >= 10, timeout=30, what="10 started")
        broker_a.kill()
        out = run.stdout.read() if run.stdout else ""
        run.wait(timeout=60)
        err = run.stderr.read() if run.stderr else ""
        document = json.loads(out)
        results = document["results"]
        for i in range(40):
            starts = (marks / str(i)).read_text().split() if (marks / str(i)).exists() else []
            assert len(starts) == 1, (i, starts, results[i])  # ran, and exactly once
        # Both workers stay reachable through B: nothing is lost, whatever A held.
        assert [r["status"] for r in results] == ["ok"] * 40, [
            (r["index"], r["status"], r.get("message")) for r in results if r["status"] != "ok"
        ]
        assert all(len(r["workers"]) == 1 for r in results)
        assert run.returncode == 0, err

        # The killed broker, restarted, gets its workers back within heartbeat x liveness
        # (plus the workers' reconnect backoff, at most 4 s, and process start).
        broker_a = start_broker(a)
        wait_named(
            a, ("w1", "w2"), connections=9, timeout=TEST_HEARTBEAT_MS / 1000 * TEST_LIVENESS + 6
        )
    finally:
        for proc in procs:
            proc.stop()
        broker_a.stop()
        broker_b.stop()
