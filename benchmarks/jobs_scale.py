"""Scale-out benchmark (issue 16): one `mdp-jobs` on SQLite next to one and two `mdp-jobs`
sharing one PostgreSQL, in the same run.

    python -m benchmarks.jobs_scale            # 3 repetitions, about 3 minutes
    python -m benchmarks.jobs_scale --quick    # 1 repetition, smaller counts

- **Durable submits/s**: one broker, the job service(s), no worker for the target service
  (nothing is dispatched); 64 synchronous submitters on the broker, which spreads `jobs.submit`
  over the job services. Acknowledged (= committed) submits per second.
- **End-to-end jobs/s**: the same, plus one `mdp-worker --service os --concurrency 8`; N
  `true` jobs submitted, until every one is terminal (read from the database).
- **Where the limit is**: CPU seconds per 1,000 jobs of the broker, the job service(s), the
  worker and the PostgreSQL server processes during each run (psutil, by PID): on 2 cores,
  whichever is near 2 s per second of run time is the bottleneck.

PostgreSQL runs from Debian's binaries (`initdb`/`pg_ctl`, as in the tests) in a temp
directory, with its default durability (fsync on, synchronous_commit on). The configurations
alternate within each repetition; figures are medians. Writes `benchmarks/JOBS_SCALE.md`.
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from benchmarks.brokers import free_port
from benchmarks.jobs import (
    SUBMITTERS,
    TERMINAL,
    Procs,
    _broker,
    _script,
    _submit_body,
    _wait_service,
    _worker,
    drive,
)

CONFIGS = ("sqlite x1", "postgres x1", "postgres x2")


@dataclass
class Run:
    rate: float
    cpu: dict[str, float] = field(default_factory=dict)
    """CPU seconds per 1,000 jobs, per role."""


def _cpu(pids: dict[str, list[int]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for role, group in pids.items():
        total = 0.0
        for pid in group:
            try:
                times = psutil.Process(pid).cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += times.user + times.system
        out[role] = total
    return out


def _postgres_pids(postmaster: int) -> list[int]:
    try:
        parent = psutil.Process(postmaster)
    except psutil.NoSuchProcess:
        return []
    return [postmaster, *(child.pid for child in parent.children(recursive=True))]


class Database:
    """Where the job services keep their jobs for one run."""

    def __init__(self, kind: str, scratch: Path, server: object | None) -> None:
        self.kind = kind
        self.server = server
        if kind == "sqlite":
            self.location = str(scratch / f"jobs-{time.monotonic_ns()}.sqlite3")
        else:
            self.location = server.create_database()  # type: ignore[attr-defined]

    def terminal(self) -> int:
        marks = ", ".join("?" * len(TERMINAL))
        if self.kind == "sqlite":
            conn = sqlite3.connect(f"file:{self.location}?mode=ro", uri=True)
            try:
                row = conn.execute(f"SELECT count(*) FROM jobs WHERE state IN ({marks})", TERMINAL)
                return int(row.fetchone()[0])
            finally:
                conn.close()
        import psycopg

        with psycopg.connect(self.location) as pg:
            cur = pg.execute(
                "SELECT count(*) FROM mdp_jobs WHERE state = ANY(%s)", (list(TERMINAL),)
            )
            found = cur.fetchone()
            return int(found[0]) if found else 0

    def server_pids(self) -> list[int]:
        if self.server is None:
            return []
        pid_file = self.server.data / "postmaster.pid"  # type: ignore[attr-defined]
        return _postgres_pids(int(pid_file.read_text().split()[0]))


def _start(procs: Procs, endpoint: str, db: Database, services: int) -> list[int]:
    pids = []
    for k in range(services):
        argv = [
            _script("mdp-jobs"),
            "--broker",
            endpoint,
            "--db",
            db.location,
            "--name",
            f"jobs-{k}",
            "--log-level",
            "warning",
            "--submit-connections",
            str(SUBMITTERS // services),
        ]
        pids.append(procs.start(argv).pid)
    return pids


def measure(config: str, count: int, end_to_end: bool, scratch: Path, server: object) -> Run:
    kind, _, times = config.partition(" x")
    services = int(times)
    db = Database(kind, scratch, server if kind == "postgres" else None)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with Procs() as procs:
        broker = procs.start(_broker(endpoint))
        pids: dict[str, list[int]] = {"broker": [broker.pid]}
        if end_to_end:
            worker = procs.start(_worker(endpoint))
            pids["worker"] = [worker.pid]
            _wait_service(endpoint, b"os")
        pids["jobs"] = _start(procs, endpoint, db, services)
        _wait_service(endpoint, b"jobs.submit")
        time.sleep(1.5)  # every connection registered; mmi.services polled once
        target = "os" if end_to_end else "bench-nobody"
        body = _submit_body(target, {"command_name": "true"})
        drive(endpoint, b"jobs.submit", [body] * 100, SUBMITTERS)  # warm-up
        deadline = time.monotonic() + 60
        if end_to_end:
            while db.terminal() < 100 and time.monotonic() < deadline:
                time.sleep(0.05)
        pids["postgres"] = db.server_pids()
        before = _cpu(pids)
        start = time.perf_counter()
        drive(endpoint, b"jobs.submit", [body] * count, SUBMITTERS)
        if end_to_end:
            while db.terminal() < count + 100:
                if time.monotonic() > deadline + 180:
                    raise RuntimeError("jobs did not finish")
                time.sleep(0.02)
        elapsed = time.perf_counter() - start
        after = _cpu(pids)
    spent = {role: (after[role] - before[role]) * 1000 / count for role in pids if pids[role]}
    spent["wall"] = elapsed * 1000 / count
    return Run(count / elapsed, spent)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 repetition, smaller counts")
    parser.add_argument("--output", default=str(Path(__file__).with_name("JOBS_SCALE.md")))
    args = parser.parse_args()
    repetitions, submits, jobs = (1, 1000, 400) if args.quick else (3, 3000, 1500)

    from tests import pgserver
    from tests.pgserver import PgServer

    reason = pgserver.skip_reason()
    if reason is not None:
        sys.exit(f"jobs_scale: {reason}")
    bin_dir = pgserver.find_bin_dir()
    assert bin_dir is not None
    server = PgServer(bin_dir, fsync=True)
    server.start()
    results: dict[tuple[str, str], list[Run]] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="mdp-bench-scale-") as tmp:
            for rep in range(repetitions):
                for what, count, e2e in (("submit", submits, False), ("e2e", jobs, True)):
                    for config in CONFIGS:
                        run = measure(config, count, e2e, Path(tmp), server)
                        results.setdefault((what, config), []).append(run)
                        print(
                            f"rep {rep + 1} {what:6} {config:12} {run.rate:8.0f}/s", file=sys.stderr
                        )
    finally:
        server.destroy()

    lines = [
        "# Scale-out: job services on SQLite and on PostgreSQL",
        "",
        f"`python -m benchmarks.jobs_scale{' --quick' if args.quick else ''}`, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {psutil.cpu_count()} cores, "
        f"load {psutil.getloadavg()[0]:.2f} at the end; medians of {repetitions}.",
        "",
        "| measure | config | per second | runs | CPU ms per job: broker / jobs / worker / "
        "postgres (wall) |",
        "|---|---|---:|---|---|",
    ]
    for (what, config), runs in results.items():
        rate = statistics.median(r.rate for r in runs)
        cpu = {
            role: statistics.median(r.cpu.get(role, 0.0) for r in runs)
            for role in ("broker", "jobs", "worker", "postgres", "wall")
        }
        label = "durable submits" if what == "submit" else "end-to-end jobs"
        each = ", ".join(f"{r.rate:.0f}" for r in runs)
        lines.append(
            f"| {label} | {config} | {rate:,.0f} | {each} | "
            f"{cpu['broker']:.2f} / {cpu['jobs']:.2f} / {cpu['worker']:.2f} / "
            f"{cpu['postgres']:.2f} ({cpu['wall']:.2f}) |"
        )
    text = "\n".join(lines) + "\n"
    Path(args.output).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
