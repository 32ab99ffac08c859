"""The job service end to end (spec/jobs.md): real `mdp-broker`, `mdp-worker` and `mdp-jobs`
processes, marker files that count how often each command ran, kill -9 at the worst moment."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import pytest

from services.jobs.store.base import NewJob
from services.jobs.store.sqlite import SQLiteStore
from services.locate import locate
from tests.integration.jobs_harness import (
    JobsClient,
    start_command_worker,
    start_jobs,
    start_jobs_broker,
    wait_registered,
)
from tests.integration.test_worker_harness import group_alive, wait_workers, workers_of
from tests.support import Process, free_tcp_endpoint, script, wait_until

pytestmark = pytest.mark.timeout(120)


@dataclass
class System:
    endpoint: str
    db: Path
    markers: Path
    broker: Process
    jobs: Process | None = None
    workers: list[Process] = field(default_factory=list)

    def start_jobs(self, *args: str) -> Process:
        self.jobs = start_jobs(self.endpoint, self.db, *args)
        wait_registered(self.endpoint)
        return self.jobs

    def start_worker(self, *args: str) -> Process:
        worker = start_command_worker(self.endpoint, *args)
        self.workers.append(worker)
        return worker

    def kill_jobs(self) -> None:
        """kill -9 mdp-jobs, and wait until the broker has expired its registrations (so no
        request is routed to the dead process, spec/mdp.md heartbeating)."""
        assert self.jobs is not None
        self.jobs.kill()
        self.jobs.wait(5)
        wait_until(
            lambda: workers_of(self.endpoint, "jobs.list") == 0,
            timeout=10,
            interval=0.05,
            what="the broker to forget the killed mdp-jobs",
        )

    def restart_broker(self) -> None:
        self.broker = start_jobs_broker(self.endpoint)

    def counted(self, name: str, then: str = "true") -> dict[str, str]:
        """A shell command that appends a line to marker file `name` each time it runs."""
        return {"command_name": f"echo run >> {self.markers / name}; {then}"}

    def runs(self, name: str) -> int:
        path = self.markers / name
        return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.fixture
def system(tmp_path: Path) -> Iterator[System]:
    endpoint = free_tcp_endpoint()
    markers = tmp_path / "markers"
    markers.mkdir()
    sys_ = System(endpoint, tmp_path / "jobs.sqlite3", markers, start_jobs_broker(endpoint))
    try:
        yield sys_
    finally:
        for proc in [sys_.jobs, *sys_.workers]:
            if proc is not None:
                proc.stop(timeout=3)
        sys_.broker.stop(timeout=3)


@pytest.fixture
def running(system: System) -> Iterator[tuple[System, JobsClient]]:
    """A system with one shell/os/echo worker (4 connections each) and mdp-jobs."""
    system.start_worker("-s", "shell", "-s", "os", "-s", "echo", "-c", "4")
    wait_workers(system.endpoint, "shell", 4)
    system.start_jobs()
    with JobsClient(system.endpoint) as client:
        yield system, client


def test_submit_answers_once_stored_and_the_result_is_the_commands(
    running: tuple[System, JobsClient],
) -> None:
    system, client = running
    job = client.submit("shell", {"command_name": "printf 'a\\n'; printf 'b\\n' >&2; exit 3"})
    assert len(job) == 32 and int(job, 16) >= 0
    answer = client.call("jobs.result", {"id": job, "wait": 10})
    assert answer["job"]["state"] == "failed" and answer["job"]["exit_code"] == 3
    result = answer["result"]
    assert (result["status"], result["stdout"], result["stderr"]) == ("failed", b"a\n", b"b\n")
    assert result["request_id"] == job
    assert answer["job"]["worker"]["pid"] == system.workers[0].pid


def test_invalid_submit_is_refused_and_stores_nothing(running: tuple[System, JobsClient]) -> None:
    _, client = running
    before = client.call("jobs.list", {"limit": 1000})["jobs"]
    for body in (
        {"service": "shell", "request": {"command_name": ""}},
        {"service": "shell", "request": {"command_name": "ls", "rm": 1}},
        {"service": "shell"},
        {"service": "", "frames": [b"x"]},
        {"service": "jobs.submit", "frames": [b"x"]},
        {"service": "shell", "request": {"command_name": "ls"}, "id": "bad id!"},
    ):
        answer = client.call("jobs.submit", body)
        assert answer["status"] == "invalid", body
        assert answer["errors"] and answer["message"]
    reply = client.frames("jobs.submit", [b"\xc1not msgpack"])
    assert msgpack.unpackb(reply[0])["status"] == "invalid"
    assert client.call("jobs.list", {"limit": 1000})["jobs"] == before


def test_the_same_id_twice_is_one_job_and_another_request_conflicts(
    running: tuple[System, JobsClient],
) -> None:
    system, client = running
    request = system.counted("idem")
    first = client.call("jobs.submit", {"service": "shell", "request": request, "id": "idem-1"})
    second = client.call("jobs.submit", {"service": "shell", "request": request, "id": "idem-1"})
    assert (first["created"], second["created"]) == (True, False)
    other = client.call(
        "jobs.submit", {"service": "shell", "request": {"command_name": "true"}, "id": "idem-1"}
    )
    assert other["status"] == "conflict"
    client.wait_terminal(["idem-1"])
    assert system.runs("idem") == 1


def test_unknown_and_expired_are_told_apart(system: System) -> None:
    system.start_worker("-s", "shell", "-c", "2")
    system.start_jobs("--keep", "0.5", "--keep-records", "1", "--purge-interval", "0.2")
    with JobsClient(system.endpoint) as client:
        job = client.submit("shell", {"command_name": "true"})
        assert client.status([job])[job]["state"] in {"queued", "running", "ok"}
        wait_until(
            lambda: client.status([job])[job]["state"] == "expired", timeout=15, interval=0.1
        )
        entry = client.status([job, "0" * 32])
        assert entry[job] == {
            "id": job,
            "state": "expired",
            "was": "ok",
            "finished": entry[job]["finished"],
        }
        assert entry["0" * 32] == {"id": "0" * 32, "state": "unknown"}
        resubmit = client.call(
            "jobs.submit", {"service": "shell", "request": {"command_name": "true"}, "id": job}
        )
        assert resubmit["status"] == "expired"


def test_output_chunks_are_numbered_and_read_from_any_chunk(
    running: tuple[System, JobsClient],
) -> None:
    _, client = running
    job = client.submit("shell", {"command_name": "for i in 1 2 3; do echo $i; sleep 0.15; done"})
    seen: list[bytes] = []
    following = 0
    for _ in range(100):
        answer = client.call("jobs.logs", {"id": job, "from": following, "wait": 5})
        assert [c["n"] for c in answer["chunks"]] == list(
            range(following, following + len(answer["chunks"]))
        )
        seen += [c["data"] for c in answer["chunks"]]
        following = answer["next"]
        if answer["done"]:
            break
    assert b"".join(seen) == b"1\n2\n3\n"
    assert len(seen) >= 2  # it arrived in pieces, as it was written
    again = client.call("jobs.logs", {"id": job, "from": 1})
    assert b"".join(c["data"] for c in again["chunks"]) == b"".join(seen[1:])
    assert client.call("jobs.logs", {"id": "nope"})["state"] == "unknown"


def test_rfc9_client_written_from_the_spec_round_trips(
    running: tuple[System, JobsClient],
) -> None:
    """RFC 9: titanic.request -> "200" + UUID; titanic.reply -> "300" until done, then "200" +
    the reply; titanic.close -> "200"; afterwards the UUID is unknown ("400")."""
    _, client = running
    reply = client.frames("titanic.request", [b"echo", b"hello", b"\x00\xffbinary"])
    assert reply[0][:3] == b"200" and len(reply) == 2
    uuid = reply[1]
    assert len(uuid) == 32 and all(c in b"0123456789abcdefABCDEF" for c in uuid)
    answer = wait_until(
        lambda: (r := client.frames("titanic.reply", [uuid]))[0][:3] != b"300" and r,
        timeout=10,
        interval=0.05,
    )
    assert answer == [b"200", b"hello", b"\x00\xffbinary"]
    assert client.frames("titanic.reply", [uuid.upper()]) == answer  # idempotent, any case
    listed = client.call("jobs.list", {"service": "echo"})["jobs"]
    assert uuid.decode() in [job["id"] for job in listed]  # a job like any other
    assert client.frames("titanic.close", [uuid]) == [b"200"]
    assert client.frames("titanic.reply", [uuid])[0][:3] == b"400"
    assert client.frames("titanic.close", [uuid]) == [b"200"]  # unknown: still 200
    assert client.frames("titanic.reply", [b"not-a-uuid"])[0][:3] == b"400"
    assert client.frames("titanic.request", [b"echo"])[0][:3] == b"400"


def kill_midway(system: System, client: JobsClient, victim: str) -> None:
    """Submit 100 counted jobs, kill -9 `victim` once some have finished, restart it, and
    check: every acknowledged job ends, and none ran twice."""
    ids = [f"job-{i:03d}" for i in range(100)]
    for job in ids:
        client.submit("shell", system.counted(job, "sleep 0.05"), job_id=job)

    def some_done() -> bool:
        states = [j["state"] for j in client.status(ids).values()]
        return sum(s == "ok" for s in states) >= 10

    wait_until(some_done, timeout=30, interval=0.05, what="10 jobs done")
    if victim == "jobs":
        system.kill_jobs()
        system.start_jobs()
    else:
        system.broker.kill()
        system.broker.wait(5)
        system.restart_broker()
        wait_registered(system.endpoint, timeout=15)
    client.close()
    with JobsClient(system.endpoint) as fresh:
        try:
            final = fresh.wait_terminal(ids, timeout=60)
        except AssertionError as exc:
            assert system.jobs is not None
            log = system.jobs.output()[1].decode(errors="replace")
            Path("/tmp/jobs13_dbg.log").write_text(log)
            log = log[-3000:]
            raise AssertionError(f"{exc}\nmdp-jobs log:\n{log}") from None
    states = {job: entry["state"] for job, entry in final.items()}
    runs = {job: system.runs(job) for job in ids}
    twice = {job: n for job, n in runs.items() if n > 1}
    assert not twice, f"ran more than once: {twice}"
    assert all(state in {"ok", "lost"} for state in states.values()), states
    assert all(runs[job] == 1 for job, state in states.items() if state == "ok")
    assert sum(state == "ok" for state in states.values()) >= 90, states


def test_kill_9_of_mdp_jobs_mid_run_loses_nothing_and_runs_nothing_twice(
    running: tuple[System, JobsClient],
) -> None:
    system, client = running
    kill_midway(system, client, "jobs")


def test_kill_9_of_the_broker_mid_run_loses_nothing_and_runs_nothing_twice(
    running: tuple[System, JobsClient],
) -> None:
    system, client = running
    kill_midway(system, client, "broker")


def test_attempts_whose_fate_was_never_stored_are_resolved_not_run_again(
    running: tuple[System, JobsClient],
) -> None:
    """spec/jobs.md §4: mdp-jobs died after sending two attempts and before storing what
    became of them. On restart it asks the worker about each request_id, with a fence: the
    one it runs is re-attached (not run again); the one it never got goes again under a new
    request_id. Each runs once."""
    system, client = running
    system.start_worker("-s", "shell", "-c", "2", "--name", "other")  # a second one to ask
    wait_workers(system.endpoint, "shell", 6)
    started = client.submit("shell", system.counted("started", "sleep 2"), job_id="started")
    wait_until(
        lambda: client.status([started])[started]["state"] == "running",
        timeout=10,
        interval=0.02,
        what="started stored",
    )
    system.kill_jobs()
    long_ago = time.time() - 600

    async def forget() -> None:
        # What the store holds had mdp-jobs died before committing `started`, and before
        # anything came back for an attempt of "unsent" that never reached a worker.
        store = SQLiteStore(system.db)
        await store.open()
        try:
            assert await store.update(
                started, {"running"}, state="queued", started=None, worker=None,
                claimed=long_ago, start_by=long_ago + 2,
            )  # fmt: skip
            request = [msgpack.packb({"command_name": system.counted("unsent")["command_name"],
                                      "request_id": "unsent"})]  # fmt: skip
            await store.submit(NewJob("unsent", "command", "shell", request, long_ago))
            [claimed] = await store.claim("shell", 1, long_ago, "jobs", start_by=long_ago + 2)
            assert claimed.request_id == "unsent"
        finally:
            await store.close()

    asyncio.run(forget())
    system.start_jobs()
    final = client.wait_terminal(["started", "unsent"], timeout=30)
    assert {job: entry["state"] for job, entry in final.items()} == {
        "started": "ok",
        "unsent": "ok",
    }
    assert system.runs("started") == 1 and system.runs("unsent") == 1
    result = client.call("jobs.result", {"id": "unsent"})["result"]
    assert result["request_id"] == "unsent.2"  # "unsent" is fenced on the workers now
    assert system.jobs is not None
    log = system.jobs.output()[1]
    assert re.search(rb"job started: attempt started (running|finished) on \S+: re-attached", log)


def test_cancel_of_a_job_whose_run_was_never_stored_stops_that_run(
    running: tuple[System, JobsClient],
) -> None:
    """spec/jobs.md §4: a queued job may have an attempt running unseen (mdp-jobs died before
    storing `started`); cancelling it stops that run too, not only the row."""
    system, client = running
    job = client.submit("shell", system.counted("victim", "sleep 20; echo end"), job_id="victim")
    wait_until(
        lambda: client.status([job])[job]["state"] == "running",
        timeout=10,
        interval=0.02,
        what="started stored",
    )
    system.kill_jobs()

    async def forget() -> None:
        store = SQLiteStore(system.db)
        await store.open()
        try:
            now = time.time()  # a fresh claim: the restarted mdp-jobs leaves it for 31 s
            assert await store.update(
                job, {"running"}, state="queued", started=None, worker=None, claimed=now,
                start_by=now + 2,
            )  # fmt: skip
        finally:
            await store.close()

    asyncio.run(forget())
    system.start_jobs("--dispatch-timeout", "30")
    answer = client.call("jobs.cancel", {"ids": [job]})
    assert answer["jobs"][0]["cancel"] == "cancelled", answer

    def stopped() -> bool:
        found = asyncio.run(locate(system.endpoint, "shell", job, fence=False))
        return found.state == "finished"  # its FINAL (cancelled) is all the worker holds

    wait_until(stopped, timeout=15, interval=0.2, what="the unseen run to be cancelled")
    assert client.status([job])[job]["state"] == "cancelled"
    assert system.runs("victim") == 1


def test_a_cancelled_queued_job_never_runs_even_across_a_restart(system: System) -> None:
    system.start_jobs()  # no worker yet: everything stays queued
    with JobsClient(system.endpoint) as client:
        job = client.submit("shell", system.counted("cancelled"))
        answer = client.call("jobs.cancel", {"ids": [job, "never"]})
        assert answer["jobs"] == [
            {"id": job, "state": "cancelled", "cancel": "cancelled"},
            {"id": "never", "state": "unknown", "cancel": "unknown"},
        ]
        system.kill_jobs()
        system.start_jobs()
        system.start_worker("-s", "shell")
        later = client.submit("shell", system.counted("later"))
        client.wait_terminal([later])
        assert client.status([job])[job]["state"] == "cancelled"
        assert system.runs("cancelled") == 0 and system.runs("later") == 1
        again = client.call("jobs.cancel", {"ids": [later]})["jobs"][0]
        assert again["cancel"] == "finished"


def _worker_has_cancel() -> bool:
    usage = subprocess.run(
        [script("mdp-worker"), "--help"], capture_output=True, text=True, timeout=10
    ).stdout
    return "--name" in usage


@pytest.mark.skipif(not _worker_has_cancel(), reason="mdp-worker has no cancel path yet (#11)")
def test_cancel_of_a_running_job_ends_its_whole_process_group(system: System) -> None:
    system.start_worker("-s", "shell", "--name", "w1")
    system.start_jobs()
    pidfile = system.markers / "pgid"
    with JobsClient(system.endpoint) as client:
        job = client.submit(
            "shell",
            {"command_name": f"sleep 60 & sleep 60 & echo $$ > {pidfile}; wait", "timeout": 100},
        )
        wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), timeout=10)
        pgid = int(pidfile.read_text())
        # Running as the store says (started is committed a moment after the command starts).
        wait_until(lambda: client.status([job])[job]["state"] == "running", timeout=10)
        answer = client.call("jobs.cancel", {"ids": [job]})["jobs"][0]
        assert answer["cancel"] == "requested"
        final = client.wait_terminal([job], timeout=15)[job]
        assert final["state"] == "cancelled"
        wait_until(lambda: not group_alive(pgid), timeout=5, what="the process group to end")


@pytest.mark.parametrize(
    "content",
    [os.urandom(4096), b"SQLite format 3\x00" + b"\x00" * 84, b'{"not": "a db"}'],
    ids=["random", "bad-header", "json"],
)
def test_a_corrupt_database_is_refused_untouched(tmp_path: Path, content: bytes) -> None:
    db = tmp_path / "jobs.sqlite3"
    db.write_bytes(content)
    before = (hashlib.sha256(db.read_bytes()).hexdigest(), db.stat().st_mtime_ns)
    proc = start_jobs(free_tcp_endpoint(), db)
    code = proc.wait(20)
    _, err = proc.output()
    proc.stop()
    assert code == 78
    assert b"jobs.sqlite3" in err and b"Traceback" not in err
    assert (hashlib.sha256(db.read_bytes()).hexdigest(), db.stat().st_mtime_ns) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["jobs.sqlite3"]


def test_sigterm_stops_mdp_jobs_cleanly(system: System) -> None:
    jobs = system.start_jobs()
    jobs.signal(signal.SIGTERM)
    assert jobs.wait(15) == 0
