"""Scale-out (README "Scaling out"): several brokers, several `mdp-jobs` on one PostgreSQL, and
kill -9 of a broker and of a job service in the middle of a run; then a PostgreSQL restart.

What the chaos test asserts, from the markers and from the database:
- every acknowledged job reaches a terminal state, `ok`, and no command ran twice (marker
  files): not the runs whose `started` died with the killed broker or was never committed by
  the killed job service either -- whoever dispatches such a job next asks the workers about
  its request_id first (spec/jobs.md §4) and re-attaches instead of running it again;
- no job was claimed by two job services at once: a trigger the test installs logs every change
  of a job's claim and of a running job's owner; replayed per job, a claim is only ever taken
  while the job was unclaimed (or renewed by its holder), and a running job changes owner only
  after its lease ran out (or back to the same name, a restart taking its own jobs back).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import pytest

from tests.integration.jobs_harness import (
    TEST_JOBS_ARGS,
    JobsClient,
    start_command_worker,
    wait_registered,
)
from tests.integration.test_worker_harness import HEARTBEAT_ARGS, wait_workers, workers_of
from tests.pgserver import PgServer
from tests.support import Process, free_tcp_endpoint, script, start_broker, wait_until

pytestmark = pytest.mark.timeout(180)
psycopg = pytest.importorskip("psycopg")

LEASE = 2.0
ACTIVE = {"queued", "running"}

CLAIMS_LOG = """
CREATE TABLE claims_log (
    n BIGSERIAL PRIMARY KEY,
    job_id TEXT NOT NULL,
    event TEXT NOT NULL,
    owner TEXT,
    old_owner TEXT,
    old_claimed DOUBLE PRECISION,
    old_lease DOUBLE PRECISION,
    new_lease DOUBLE PRECISION
);
CREATE FUNCTION log_claims() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.claimed IS NOT NULL AND NEW.claimed IS DISTINCT FROM OLD.claimed THEN
        INSERT INTO claims_log (job_id, event, owner, old_owner, old_claimed)
        VALUES (NEW.id, 'claim', NEW.owner, OLD.owner, OLD.claimed);
    ELSIF NEW.claimed IS NULL AND OLD.claimed IS NOT NULL THEN
        INSERT INTO claims_log (job_id, event, owner) VALUES (NEW.id, 'release', OLD.owner);
    END IF;
    IF OLD.state = 'running' AND NEW.state = 'running'
            AND NEW.owner IS DISTINCT FROM OLD.owner THEN
        INSERT INTO claims_log (job_id, event, owner, old_owner, old_lease, new_lease)
        VALUES (NEW.id, 'take_over', NEW.owner, OLD.owner, OLD.lease_until, NEW.lease_until);
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER log_claims AFTER UPDATE ON mdp_jobs FOR EACH ROW EXECUTE FUNCTION log_claims();
"""


def start_pg_jobs(broker: str, url: str, name: str, *more: str) -> Process:
    return Process(
        [
            script("mdp-jobs"),
            "--broker",
            broker,
            "--db",
            url,
            "--name",
            name,
            "--lease",
            str(LEASE),
            # Fewer connections than the defaults: 2 job services x 2 brokers on 2 busy cores.
            "--submit-connections",
            "4",
            "--read-connections",
            "2",
            *HEARTBEAT_ARGS,
            *TEST_JOBS_ARGS,
            *more,
        ],
        to_files=True,
    )


def prepare(url: str) -> None:
    """Create the schema (as mdp-jobs would) and install the claims log."""
    from services.jobs.store.postgres import PostgresStore

    async def create() -> None:
        store = PostgresStore(url)
        await store.open()
        await store.close()

    asyncio.run(create())
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(CLAIMS_LOG)


@dataclass
class Cluster:
    url: str
    markers: Path
    brokers: list[str]
    broker_procs: list[Process] = field(default_factory=list)
    jobs: dict[str, Process] = field(default_factory=dict)
    jobs_args: dict[str, tuple[str, ...]] = field(default_factory=dict)
    workers: list[Process] = field(default_factory=list)

    def start_jobs(self, name: str, broker: int, *more: str) -> None:
        self.jobs_args[name] = (self.brokers[broker], *more)
        self.jobs[name] = start_pg_jobs(self.brokers[broker], self.url, name, *more)

    def restart_jobs(self, name: str) -> None:
        broker, *more = self.jobs_args[name]
        self.jobs[name] = start_pg_jobs(broker, self.url, name, *more)

    def command(self, i: int) -> dict[str, Any]:
        return {"command_name": f"date +%s.%N >> {self.markers / str(i)}; sleep 0.1; echo {i}"}

    def starts(self, i: int) -> list[float]:
        """When each run of command `i` began (wall clock), from its marker file."""
        path = self.markers / str(i)
        return [float(t) for t in path.read_text().split()] if path.exists() else []

    def runs(self, i: int) -> int:
        return len(self.starts(i))

    def logs(self, tail: int = 2500) -> str:
        out = []
        for name, proc in self.jobs.items():
            text = proc.output()[1].decode(errors="replace") if proc._files else ""
            out.append(f"--- {name}\n{text[-tail:]}")
        return "\n".join(out)


@pytest.fixture
def cluster(pg_url: str, tmp_path: Path) -> Iterator[Cluster]:
    prepare(pg_url)
    markers = tmp_path / "markers"
    markers.mkdir()
    c = Cluster(pg_url, markers, [free_tcp_endpoint() for _ in range(3)])
    c.broker_procs = [start_broker(b, "--insecure") for b in c.brokers]
    try:
        yield c
    finally:
        for proc in [*c.jobs.values(), *c.workers]:
            proc.stop(timeout=3)
        for proc in c.broker_procs:
            proc.stop(timeout=3)


class Submitter:
    """Submits with a chosen id through a broker that answers, moving on to the next one on a
    timeout (an id makes a retry through another broker the same job)."""

    def __init__(self, brokers: list[str]) -> None:
        self.brokers = brokers
        self.clients = {b: JobsClient(b) for b in brokers}
        self.turn = 0

    def close(self) -> None:
        for client in self.clients.values():
            client.close()

    def call(self, service: str, body: dict[str, Any], avoid: frozenset[str] = frozenset()) -> Any:
        for _ in range(2 * len(self.brokers)):
            broker = self.brokers[self.turn % len(self.brokers)]
            if broker not in avoid:
                try:
                    return self.clients[broker].call(service, body, timeout=5.0)
                except AssertionError:  # no reply in time: the broker or its job service died
                    self.clients[broker].close()
                    self.clients[broker] = JobsClient(broker)
            self.turn += 1
        raise AssertionError(f"no broker answered {service}")

    def submit(
        self, job_id: str, request: dict[str, Any], avoid: frozenset[str] = frozenset()
    ) -> bool:
        answer = self.call(
            "jobs.submit", {"service": "shell", "request": request, "id": job_id}, avoid
        )
        return bool(answer["status"] == "ok")

    def states(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        answer = self.call("jobs.status", {"ids": ids})
        assert answer["status"] == "ok", answer
        return {job["id"]: job for job in answer["jobs"]}


def replay_claims(url: str) -> list[str]:
    """Violations of "one job service at a time" in the claims log."""
    problems = []
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT job_id, event, owner, old_owner, old_claimed, old_lease, new_lease "
            "FROM claims_log ORDER BY n"
        ).fetchall()
    for job_id, event, owner, old_owner, old_claimed, old_lease, new_lease in rows:
        if event == "claim" and old_claimed is not None and owner != old_owner:
            # (The holder renewing its own claim, for a new attempt, is no second claim.)
            problems.append(f"{job_id}: claimed by {owner} while {old_owner} held its claim")
        if event != "take_over" or owner == old_owner:
            continue
        if old_lease is not None and old_lease > new_lease - LEASE + 0.05:
            problems.append(f"{job_id}: {owner} took it from {old_owner} before the lease ran out")
    assert any(r[1] == "claim" for r in rows), "the claims log saw nothing"
    return problems


def test_chaos_kill_9_of_a_broker_and_a_job_service_loses_nothing_runs_nothing_twice(
    cluster: Cluster,
) -> None:
    """3 brokers, 2 job services on one PostgreSQL (each dispatching through its own broker
    and serving jobs.* on all three), 4 workers on all three brokers; 500 jobs; kill -9
    broker 0 and job service b mid-run, restart both."""
    b0, b1, b2 = cluster.brokers
    every = [arg for broker in cluster.brokers for arg in ("--broker", broker)]
    for k in range(4):
        cluster.workers.append(
            start_command_worker(every[1], *every[2:], "-s", "shell", "-c", "4", "--name", f"w{k}")
        )
    cluster.start_jobs("jobs-a", 0, "--also-broker", b1, "--also-broker", b2)
    cluster.start_jobs("jobs-b", 1, "--also-broker", b0, "--also-broker", b2)
    for broker in cluster.brokers:
        wait_workers(broker, "shell", 16, timeout=20)
        wait_until(lambda b=broker: workers_of(b, "jobs.list") >= 4, timeout=20, what="mdp-jobs")

    submitter = Submitter(cluster.brokers)
    ids = [str(i) for i in range(500)]
    acknowledged: list[str] = []
    try:
        for job_id in ids[:250]:
            if submitter.submit(job_id, cluster.command(int(job_id))):
                acknowledged.append(job_id)

        def some_done() -> bool:
            states = submitter.states(acknowledged[:100])
            return sum(j["state"] == "ok" for j in states.values()) >= 50

        wait_until(some_done, timeout=60, interval=0.1, what="50 jobs done")
        cluster.broker_procs[0].kill()
        cluster.jobs["jobs-b"].kill()
        cluster.broker_procs[0].wait(5)
        cluster.jobs["jobs-b"].wait(5)
        killed = time.monotonic()
        # Submits go on meanwhile, through the brokers that are left.
        for job_id in ids[250:400]:
            if submitter.submit(job_id, cluster.command(int(job_id)), avoid=frozenset({b0})):
                acknowledged.append(job_id)
        cluster.broker_procs[0] = start_broker(b0, "--insecure")
        cluster.restart_jobs("jobs-b")
        for job_id in ids[400:]:
            if submitter.submit(job_id, cluster.command(int(job_id))):
                acknowledged.append(job_id)
        assert len(acknowledged) == 500

        deadline = time.monotonic() + 90
        final: dict[str, dict[str, Any]] = {}
        while time.monotonic() < deadline:
            final = {}
            for start in range(0, 500, 250):
                final.update(submitter.states(acknowledged[start : start + 250]))
            if all(j["state"] not in ACTIVE for j in final.values()):
                break
            time.sleep(0.2)
    finally:
        submitter.close()
    active = {i: j["state"] for i, j in final.items() if j["state"] in ACTIVE}
    assert not active, f"jobs still active: {active}\n{cluster.logs()}"
    print(f"all ended {time.monotonic() - killed:.1f}s after the kills")

    runs = {i: cluster.runs(int(i)) for i in acknowledged}
    twice = {i: n for i, n in runs.items() if n > 1}
    assert not twice, f"commands that ran more than once: {twice}\n{cluster.logs()}"
    states = {i: j["state"] for i, j in final.items()}
    assert set(states.values()) == {"ok"}, f"{states}\n{cluster.logs()}"
    assert set(runs.values()) == {1}
    # The output is the command's, whoever followed it.
    with psycopg.connect(cluster.url) as conn:
        rows = conn.execute("SELECT id, result FROM mdp_jobs WHERE state = 'ok'").fetchall()
        retried = conn.execute(
            "SELECT count(*) FILTER (WHERE attempts > 1), count(*) FILTER (WHERE request_id <> id)"
            " FROM mdp_jobs"
        ).fetchone()
    logs = cluster.logs(tail=10**7)
    print(
        f"claimed again: {retried[0]}, new request_ids: {retried[1]}, re-attached after a "
        f"lookup: {logs.count(': re-attached')}, taken over: {logs.count('taken over')}"
    )
    assert len(rows) == 500
    for job_id, result in rows:
        assert msgpack.unpackb(msgpack.unpackb(result)[0])["stdout"] == f"{job_id}\n".encode()
    assert replay_claims(cluster.url) == []


def test_postgresql_restart_mid_run_loses_nothing_and_services_recover(
    tmp_path: Path,
) -> None:
    from tests import pgserver

    reason = pgserver.skip_reason()
    if reason is not None:
        pytest.skip(reason)
    bin_dir = pgserver.find_bin_dir()
    assert bin_dir is not None
    server = PgServer(bin_dir)
    server.start()
    markers = tmp_path / "markers"
    markers.mkdir()
    broker = free_tcp_endpoint()
    c = Cluster(server.create_database(), markers, [broker])
    c.broker_procs = [start_broker(broker, "--insecure")]
    try:
        c.workers.append(start_command_worker(broker, "-s", "shell", "-c", "6", "--name", "w"))
        c.start_jobs("jobs-a", 0)
        c.start_jobs("jobs-b", 0)
        wait_workers(broker, "shell", 6, timeout=20)
        wait_until(lambda: workers_of(broker, "jobs.list") >= 4, timeout=20, what="mdp-jobs")
        submitter = Submitter([broker])
        try:
            ids = [str(i) for i in range(120)]
            for job_id in ids:
                assert submitter.submit(job_id, c.command(int(job_id)))
            wait_until(
                lambda: sum(j["state"] == "ok" for j in submitter.states(ids).values()) >= 20,
                timeout=60,
                interval=0.1,
                what="20 jobs done",
            )
            server.stop("immediate")  # a crash: no shutdown checkpoint
            # Down: a submit is refused with an error, never acknowledged.
            answer = submitter.call(
                "jobs.submit", {"service": "shell", "request": c.command(999), "id": "999"}
            )
            assert answer["status"] == "error", answer
            time.sleep(1.0)  # running jobs finish meanwhile; their results must wait
            server.start()
            final = JobsClient(broker).wait_terminal(ids, timeout=60)
        finally:
            submitter.close()
        assert all(c.jobs[n].alive() for n in c.jobs), "a job service exited"
        states = {i: j["state"] for i, j in final.items()}
        assert set(states.values()) == {"ok"}, states
        assert all(c.runs(int(i)) == 1 for i in ids)
        assert c.runs(999) == 0
    finally:
        for proc in [*c.jobs.values(), *c.workers, *c.broker_procs]:
            proc.stop(timeout=3)
        server.destroy()


def test_logs_follow_and_cancel_through_another_job_service(cluster: Cluster) -> None:
    """jobs-a (broker 0) runs the job; a client of broker 1 (served by jobs-b only) follows
    its output as it is written and cancels it: the cancel is a row that jobs-a acts on."""
    b0, b1, _ = cluster.brokers
    cluster.workers.append(start_command_worker(b0, "-s", "shell", "-c", "2", "--name", "w0"))
    cluster.start_jobs("jobs-a", 0)
    cluster.start_jobs("jobs-b", 1)
    wait_workers(b0, "shell", 2, timeout=20)
    wait_registered(b0, timeout=20)
    wait_registered(b1, timeout=20)
    with JobsClient(b0) as near, JobsClient(b1) as far:
        job = near.submit("shell", {"command_name": "echo one; sleep 0.5; echo two; sleep 60"})
        seen = b""
        after = 0
        deadline = time.monotonic() + 20
        while b"two" not in seen:
            assert time.monotonic() < deadline, f"output so far: {seen!r}"
            answer = far.call("jobs.logs", {"id": job, "from": after, "wait": 5}, timeout=10)
            assert answer["status"] == "ok" and not answer["done"], answer
            seen += b"".join(chunk["data"] for chunk in answer["chunks"])
            after = answer["next"]
        assert seen == b"one\ntwo\n"
        cancelled = far.call("jobs.cancel", {"ids": [job]})
        assert cancelled["jobs"][0]["cancel"] == "requested", cancelled
        answer = far.call("jobs.result", {"id": job, "wait": 15}, timeout=20)
        assert answer["job"]["state"] == "cancelled", answer
