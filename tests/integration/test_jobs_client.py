"""`mdp-client` job subcommands end to end: submit, status, jobs, wait, result, logs [-f]
[--from N], cancel, rerun, and --embedded (spec/jobs.md, README "Jobs")."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.jobs_harness import (
    start_command_worker,
    start_jobs,
    start_jobs_broker,
    wait_registered,
)
from tests.integration.test_fleet import wait_named
from tests.integration.test_worker_harness import wait_workers
from tests.support import Process, free_tcp_endpoint, script, wait_until

pytestmark = pytest.mark.timeout(120)


def client(endpoint: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [script("mdp-client"), *args, "-a", endpoint],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=60,
    )


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    where = free_tcp_endpoint()
    db = tmp_path_factory.mktemp("jobs") / "jobs.sqlite3"
    broker = start_jobs_broker(where)
    worker = start_command_worker(where, "-s", "shell", "-s", "os", "-c", "2")
    jobs = start_jobs(where, db)
    procs: list[Process] = [jobs, worker, broker]
    try:
        wait_workers(where, "shell", 2)
        wait_registered(where)
        yield where
    finally:
        for proc in procs:
            proc.stop(timeout=3)


def submit(endpoint: str, commands: list[dict[str, object]]) -> list[str]:
    done = client(endpoint, "submit", "-f", "-", stdin=json.dumps(commands))
    assert done.returncode == 0, done.stderr
    ids = done.stdout.split()
    assert len(ids) == len(commands)
    return ids


def test_submit_prints_ids_and_wait_prints_results_like_a_direct_run(endpoint: str) -> None:
    ids = submit(
        endpoint,
        [
            {"command_type": "shell", "command_name": "echo one"},
            {"command_type": "os", "command_name": "false"},
        ],
    )
    done = client(endpoint, "wait", *ids)
    assert done.returncode == 1  # one failed: the direct run's exit-code table
    assert "one" in done.stdout and "ok" in done.stdout and "failed" in done.stdout
    as_json = json.loads(client(endpoint, "result", "--json", *ids).stdout)
    statuses = [r["status"] for r in as_json["results"]]
    assert sorted(statuses) == ["failed", "ok"]
    assert {r["request_id"] for r in as_json["results"]} == set(ids)


def test_result_of_an_unfinished_job_and_of_unknown_ids_have_their_own_codes(
    endpoint: str,
) -> None:
    (slow,) = submit(endpoint, [{"command_type": "shell", "command_name": "sleep 5"}])
    assert client(endpoint, "result", slow).returncode == 3
    assert client(endpoint, "result", "no-such-job").returncode == 67
    status = client(endpoint, "status", slow, "no-such-job")
    assert status.returncode == 67
    assert "unknown" in status.stdout and slow in status.stdout
    cancelled = client(endpoint, "cancel", slow)
    assert cancelled.returncode == 0 and slow in cancelled.stdout


def test_jobs_lists_with_filters(endpoint: str) -> None:
    ids = submit(endpoint, [{"command_type": "os", "command_name": "true"}])
    client(endpoint, "wait", *ids)
    listed = json.loads(client(endpoint, "jobs", "--service", "os", "--json").stdout)
    assert ids[0] in [job["id"] for job in listed]
    assert all(job["service"] == "os" for job in listed)
    none = json.loads(client(endpoint, "jobs", "--state", "lost", "--json").stdout)
    assert none == []


def test_logs_follow_resumes_after_the_client_is_killed(endpoint: str, tmp_path: Path) -> None:
    (job,) = submit(
        endpoint,
        [
            {
                "command_type": "shell",
                "command_name": "for i in 1 2 3 4; do echo $i; sleep 0.4; done",
            }
        ],
    )
    first = Process([script("mdp-client"), "logs", "-f", job, "-a", endpoint], to_files=True)
    wait_until(lambda: first.output()[0].startswith(b"1\n"), timeout=20, what="the first line")
    first.kill()
    first.stop()
    rest = client(endpoint, "logs", "-f", "--from", "1", job)
    assert rest.returncode == 0, rest.stderr
    assert rest.stdout == "2\n3\n4\n"
    assert client(endpoint, "logs", job).stdout == "1\n2\n3\n4\n"


def test_rerun_makes_a_new_job_of_the_same_command(endpoint: str, tmp_path: Path) -> None:
    marker = tmp_path / "runs"
    (job,) = submit(endpoint, [{"command_type": "shell", "command_name": f"echo run >> {marker}"}])
    client(endpoint, "wait", job)
    again = client(endpoint, "rerun", job)
    assert again.returncode == 0, again.stderr
    new = again.stdout.strip()
    assert new and new != job
    assert client(endpoint, "wait", new).returncode == 0
    assert marker.read_text() == "run\nrun\n"


def test_embedded_runs_jobs_on_a_given_database(tmp_path: Path) -> None:
    db = tmp_path / "jobs.sqlite3"
    commands = json.dumps([{"command_type": "shell", "command_name": "echo embedded"}])
    done = subprocess.run(
        [script("mdp-client"), "submit", "--embedded", "--db", str(db), "-f", "-"],
        input=commands,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    (job,) = done.stdout.split()
    waited = subprocess.run(
        [script("mdp-client"), "wait", "--embedded", "--db", str(db), job],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert waited.returncode == 0, waited.stderr
    assert "embedded" in waited.stdout


@pytest.fixture
def named(tmp_path: Path) -> Iterator[str]:
    """A broker, mdp-jobs, and two named shell workers h1 and h2."""
    where = free_tcp_endpoint()
    broker = start_jobs_broker(where)
    workers = [start_command_worker(where, "-s", "shell", "--name", n) for n in ("h1", "h2")]
    jobs = start_jobs(where, tmp_path / "jobs.sqlite3")
    try:
        wait_named(where, ("h1", "h2"), connections=3)  # shell + 2 x shell@NAME
        wait_registered(where)
        yield where
    finally:
        for proc in (jobs, *workers, broker):
            proc.stop(timeout=3)


def test_submit_to_hosts_makes_one_job_per_host_and_command(named: str) -> None:
    """Issue 14: targeting composes with submit: `--host`/`--all` give one job per host and
    command, each addressed to `SERVICE@HOST` and run by that worker alone."""
    commands = json.dumps(
        [{"command_type": "shell", "command_name": f"echo {i}"} for i in range(2)]
    )
    cases = {("--host", "h2"): ["h2", "h2"], ("--all",): ["h1", "h1", "h2", "h2"]}
    for args, hosts in cases.items():
        done = client(named, "submit", *args, "--json", "-f", "-", stdin=commands)
        assert done.returncode == 0, (args, done.stderr)
        rows = json.loads(done.stdout)
        assert [row["host"] for row in rows] == hosts
        assert {row["service"] for row in rows} == {f"shell@{h}" for h in hosts}
        ids = [row["id"] for row in rows]
        assert len(set(ids)) == len(ids)
        assert client(named, "wait", *ids).returncode == 0
        results = json.loads(client(named, "result", "--json", *ids).stdout)["results"]
        by_id = {r["request_id"]: r for r in results}
        for row in rows:
            result = by_id[row["id"]]
            assert result["status"] == "ok"
            assert result["worker"]["name"] == row["host"]  # run by that host alone
            assert result["stdout"] == f"{row['index'] % 2}\n"
    unknown = client(named, "submit", "--host", "nope", "-f", "-", stdin=commands)
    assert unknown.returncode == 68 and "no registered worker matches" in unknown.stderr
    assert len(json.loads(client(named, "jobs", "--json").stdout)) == 2 + 4  # none for it
