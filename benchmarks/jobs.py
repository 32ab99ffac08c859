"""The job service benchmark (issue 13): durable submits, and `true` through `mdp-jobs` next
to the direct path, in one run.

    python -m benchmarks.jobs                 # 3 repetitions, about a minute and a half
    python -m benchmarks.jobs --quick         # 1 repetition, smaller counts

- **Durable submit**: our broker and `mdp-jobs` on a fresh SQLite database (WAL,
  synchronous=FULL); no worker for the target service, so nothing is dispatched. One client
  process keeps 64 submitters busy (64 DEALER sockets, each one `jobs.submit` at a time, raw
  RFC 18 frames). Acknowledgements per second over the run, and p50/p99 of submit latency.
  Goal: >= 5,000/s on the 2-core machine.
- **End to end**: N `true` commands (`os`), through broker + `mdp-worker --service os
  --concurrency 8`:
  direct: a client with 16 requests in flight, until every FINAL is back;
  jobs: the same N submitted to `mdp-jobs` (64 submitters), until every job is terminal (read
  from the database, read-only). Commands per second; ratio jobs/direct per repetition.
  Goal: >= 0.8.
The two paths alternate in each repetition; figures are medians, ratios pair by pair. Every
process is started here and stopped by PID; everything binds to 127.0.0.1. The result is
printed as Markdown and written to `benchmarks/JOBS.md`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import msgpack
import zmq

from benchmarks.brokers import free_port

SUBMITTERS = 64
PURGE_WINDOW = 120.0
DIRECT_IN_FLIGHT = 16
WORKER_CONCURRENCY = 8
TERMINAL = ("ok", "failed", "timeout", "error", "invalid", "rejected", "cancelled", "lost")


def _has_option(program: str, option: str) -> bool:
    usage = subprocess.run([_script(program), "--help"], capture_output=True, text=True).stdout
    return option in usage


def _broker(endpoint: str) -> list[str]:
    """mdp-broker on loopback tcp (no CURVE: --insecure where this broker requires it)."""
    insecure = ["--insecure"] if _has_option("mdp-broker", "--insecure") else []
    return [_script("mdp-broker"), "--bind", endpoint, "--log-level", "warning", *insecure]


def _worker(endpoint: str) -> list[str]:
    """mdp-worker for os (--allow-root when we are root and it has the option)."""
    root = os.geteuid() == 0 and _has_option("mdp-worker", "--allow-root")
    return [
        _script("mdp-worker"),
        "--service",
        "os",
        "--concurrency",
        str(WORKER_CONCURRENCY),
        "--broker",
        endpoint,
        "--log-level",
        "warning",
        *(["--allow-root"] if root else []),
    ]


def _script(name: str) -> str:
    candidate = Path(sys.executable).with_name(name)
    return str(candidate) if candidate.exists() else (shutil.which(name) or name)


class Procs:
    """Processes started for one measurement; stopped (by PID) on exit."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str]) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        self.procs.append(proc)
        return proc

    def __enter__(self) -> Procs:
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)


def _request(service: bytes, body: bytes) -> list[bytes]:
    return [b"MDPC02", b"\x01", service, body]  # RFC 18 client REQUEST on a DEALER


def _wait_service(endpoint: str, service: bytes, timeout: float = 15.0) -> None:
    """Poll mmi.service until `service` has a worker."""
    ctx = zmq.Context.instance()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(endpoint)
        sock.send_multipart(_request(b"mmi.service", service))
        ok = sock.poll(500) and sock.recv_multipart()[-1] == b"200"
        sock.close()
        if ok:
            return
        time.sleep(0.05)
    raise RuntimeError(f"{service.decode()} did not register")


def drive(endpoint: str, service: bytes, bodies: list[bytes], in_flight: int) -> list[float]:
    """Send every body with `in_flight` synchronous DEALER sockets; latencies (s) of FINALs."""
    ctx = zmq.Context.instance()
    socks = []
    for _ in range(in_flight):
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(endpoint)
        socks.append(sock)
    poller = zmq.Poller()
    for sock in socks:
        poller.register(sock, zmq.POLLIN)
    sent_at: dict[zmq.Socket[bytes], float] = {}
    latencies: list[float] = []
    pending = iter(bodies)
    for sock in socks:
        body = next(pending, None)
        if body is None:
            break
        sock.send_multipart(_request(service, body))
        sent_at[sock] = time.perf_counter()
    while sent_at:
        events = dict(poller.poll(10_000))
        if not events:
            raise RuntimeError("no reply for 10 s")
        for sock in events:
            frames = sock.recv_multipart()
            if frames[1] != b"\x03":  # a PARTIAL (0x02): the FINAL (0x03) follows
                continue
            latencies.append(time.perf_counter() - sent_at.pop(sock))
            body = next(pending, None)
            if body is not None:
                sock.send_multipart(_request(service, body))
                sent_at[sock] = time.perf_counter()
    for sock in socks:
        sock.close()
    return latencies


def _submit_body(service: str, request: dict[str, object]) -> bytes:
    return msgpack.packb({"service": service, "request": request})


def _terminal(db: Path) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        marks = ", ".join("?" * len(TERMINAL))
        row = conn.execute(f"SELECT count(*) FROM jobs WHERE state IN ({marks})", TERMINAL)
        return int(row.fetchone()[0])
    finally:
        conn.close()


def jobs_command(endpoint: str, db: Path) -> list[str]:
    """mdp-jobs with SUBMITTERS submit connections, logging only warnings."""
    return [
        _script("mdp-jobs"),
        "--broker",
        endpoint,
        "--db",
        str(db),
        "--log-level",
        "warning",
        "--submit-connections",
        str(SUBMITTERS),
    ]


@dataclass
class Submit:
    rate: float
    p50_ms: float
    p99_ms: float


def durable_submit(count: int, scratch: Path) -> Submit:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    db = scratch / f"submit-{time.monotonic_ns()}.sqlite3"
    with Procs() as procs:
        procs.start(_broker(endpoint))
        procs.start(jobs_command(endpoint, db))
        _wait_service(endpoint, b"jobs.submit")
        time.sleep(1.0)  # every submit connection registered
        body = _submit_body("bench-nobody", {"command_name": "true"})
        drive(endpoint, b"jobs.submit", [body] * 500, SUBMITTERS)  # warm-up
        start = time.perf_counter()
        latencies = drive(endpoint, b"jobs.submit", [body] * count, SUBMITTERS)
        elapsed = time.perf_counter() - start
    latencies.sort()
    return Submit(
        count / elapsed,
        latencies[len(latencies) // 2] * 1000,
        latencies[int(len(latencies) * 0.99)] * 1000,
    )


def end_to_end(count: int, scratch: Path, through_jobs: bool) -> float:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    db = scratch / f"e2e-{time.monotonic_ns()}.sqlite3"
    with Procs() as procs:
        procs.start(_broker(endpoint))
        procs.start(_worker(endpoint))
        _wait_service(endpoint, b"os")
        if not through_jobs:
            body = msgpack.packb({"command_name": "true"})
            drive(endpoint, b"os", [body] * 50, DIRECT_IN_FLIGHT)  # warm-up
            start = time.perf_counter()
            drive(endpoint, b"os", [body] * count, DIRECT_IN_FLIGHT)
            return count / (time.perf_counter() - start)
        procs.start(jobs_command(endpoint, db))
        _wait_service(endpoint, b"jobs.submit")
        time.sleep(1.5)  # connections registered; mmi.services polled once
        body = _submit_body("os", {"command_name": "true"})
        drive(endpoint, b"jobs.submit", [body] * 50, SUBMITTERS)  # warm-up
        deadline = time.monotonic() + 60
        while _terminal(db) < 50 and time.monotonic() < deadline:
            time.sleep(0.02)
        start = time.perf_counter()
        drive(endpoint, b"jobs.submit", [body] * count, SUBMITTERS)
        while _terminal(db) < count + 50:
            if time.monotonic() > deadline + 120:
                raise RuntimeError("jobs did not finish")
            time.sleep(0.01)
        return count / (time.perf_counter() - start)


@dataclass
class Scale:
    rows: int
    fill_s: float
    list_running_ms: float
    status_ms: float
    submit_p99_idle_ms: float
    submit_p99_purging_ms: float
    purged: int


async def _store_scale(rows: int, scratch: Path) -> Scale:
    """The store alone with `rows` finished jobs: lookups, and submit p99 while retention
    purges half of them (bounded batches) next to 64 concurrent submitters."""
    import asyncio

    from services.jobs.manager import JobManager, Settings
    from services.jobs.store import NewJob
    from services.jobs.store.sqlite import SQLiteStore

    db = scratch / f"scale-{time.monotonic_ns()}.sqlite3"
    store = SQLiteStore(db)
    await store.open()
    await store.close()
    now = time.time()
    started = time.perf_counter()
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA journal_mode = WAL")
    request = msgpack.packb([msgpack.packb({"command_name": "true", "request_id": "x"})])
    old = now - 40 * 86400  # half of them past --keep-records (30 d)
    with conn:
        conn.executemany(
            "INSERT INTO jobs (id, kind, service, request, state, created, started, finished,"
            " exit_code) VALUES (?, 'command', 'os', ?, 'ok', ?, ?, ?, 0)",
            (
                (f"done-{i:07d}", request, t, t, t)
                for i in range(rows)
                for t in [old + i * 1e-3 if i % 2 == 0 else now - 3600 + i * 1e-6]
            ),
        )
        conn.executemany(
            "INSERT INTO jobs (id, kind, service, request, state, created, started)"
            " VALUES (?, 'command', 'os', ?, 'running', ?, ?)",
            ((f"run-{i}", request, now, now) for i in range(20)),
        )
    conn.close()
    fill = time.perf_counter() - started
    await store.open()
    try:

        async def timed(call: object) -> float:
            begin = time.perf_counter()
            await call  # type: ignore[misc]
            return (time.perf_counter() - begin) * 1000

        listing = [await timed(store.list_jobs(states={"running"}, limit=50)) for _ in range(20)]
        status = [
            await timed(store.get(f"done-{i * 4999:07d}")) for _ in range(1) for i in range(20)
        ]

        async def submit_p99(
            tag: str, seconds: float, during: asyncio.Future[int] | None = None
        ) -> float:
            """p99 of submits for `seconds`, or, with `during`, until that is done."""
            latencies: list[float] = []
            stop = time.monotonic() + seconds

            def going() -> bool:
                if during is not None:
                    return not during.done() and time.monotonic() < stop
                return time.monotonic() < stop

            async def submitter(k: int) -> None:
                n = 0
                while going():
                    begin = time.perf_counter()
                    await store.submit(NewJob(f"{tag}-{k}-{n}", "command", "os", [request], now))
                    latencies.append((time.perf_counter() - begin) * 1000)
                    n += 1

            await asyncio.gather(*(submitter(k) for k in range(SUBMITTERS)))
            latencies.sort()
            return latencies[int(len(latencies) * 0.99)]

        idle = await submit_p99("idle", 5.0)
        manager = JobManager(store, Settings(broker="tcp://127.0.0.1:1"))
        purge = asyncio.create_task(manager.purge_once())
        # Over the whole purge (at most PURGE_WINDOW s), not a few seconds of it.
        busy = await submit_p99("busy", PURGE_WINDOW, during=purge)
        purged = await purge
        manager.client.close()
        manager.control.close()
    finally:
        await store.close()
    return Scale(
        rows,
        fill,
        statistics.median(listing),
        statistics.median(status),
        idle,
        busy,
        purged,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 repetition, smaller counts")
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--output", type=Path, default=Path(__file__).with_name("JOBS.md"))
    parser.add_argument(
        "--scale-rows",
        type=int,
        default=1_000_000,
        help="finished jobs in the store for the scale measurement (0: skip it)",
    )
    args = parser.parse_args()
    reps = 1 if args.quick else args.repetitions
    submits_n = 5_000 if args.quick else 20_000
    e2e_n = 500 if args.quick else 2_000
    submits: list[Submit] = []
    direct: list[float] = []
    jobs: list[float] = []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="mdp-bench-jobs-") as scratch:
        for rep in range(reps):
            print(f"repetition {rep + 1}/{reps}", file=sys.stderr)
            submits.append(durable_submit(submits_n, Path(scratch)))
            order = [False, True] if rep % 2 == 0 else [True, False]
            for via_jobs in order:
                rate = end_to_end(e2e_n, Path(scratch), via_jobs)
                (jobs if via_jobs else direct).append(rate)
        scale = None
        if args.scale_rows:
            import asyncio

            print(f"scale: {args.scale_rows:,} rows", file=sys.stderr)
            scale = asyncio.run(_store_scale(args.scale_rows, Path(scratch)))
    ratios = [j / d for j, d in zip(jobs, direct, strict=True)]
    median_submit = statistics.median(s.rate for s in submits)
    median_ratio = statistics.median(ratios)

    def verdict(ok: bool) -> str:
        return "**met**" if ok else "**not met**"

    def each(values: list[float], fmt: str) -> str:
        return ", ".join(format(v, fmt) for v in values)

    rows = [
        (
            f"durable submits/s, {SUBMITTERS} submitters, SQLite synchronous=FULL",
            f"{median_submit:,.0f}",
            each([s.rate for s in submits], ",.0f"),
            ">= 5,000",
            verdict(median_submit >= 5000),
        ),
        (
            "submit latency p50 / p99 (ms)",
            f"{statistics.median(s.p50_ms for s in submits):.2f} / "
            f"{statistics.median(s.p99_ms for s in submits):.2f}",
            ", ".join(f"{s.p50_ms:.2f}/{s.p99_ms:.2f}" for s in submits),
            "",
            "",
        ),
        (
            f"`true` direct, commands/s ({DIRECT_IN_FLIGHT} in flight, "
            f"worker concurrency {WORKER_CONCURRENCY})",
            f"{statistics.median(direct):,.0f}",
            each(direct, ",.0f"),
            "",
            "",
        ),
        (
            "`true` through mdp-jobs, commands/s (submit to terminal)",
            f"{statistics.median(jobs):,.0f}",
            each(jobs, ",.0f"),
            "",
            "",
        ),
        (
            "ratio jobs / direct",
            f"{median_ratio:.2f}",
            each(ratios, ".2f"),
            ">= 0.8",
            verdict(median_ratio >= 0.8),
        ),
    ]
    command = "python -m benchmarks.jobs" + (" --quick" if args.quick else "")
    lines = [
        "# Job service benchmark",
        "",
        f"`{command}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {reps} "
        f"repetition(s); {os.cpu_count()} CPUs; load average {load_before[0]:.2f} at start, "
        f"{os.getloadavg()[0]:.2f} at end (the machine is shared). Method: `benchmarks/jobs.py`.",
        "",
        "| measurement | median | per repetition | goal | result |",
        "|---|---|---|---|---|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]
    if scale is not None:
        idle, busy = scale.submit_p99_idle_ms, scale.submit_p99_purging_ms
        lines += [
            "",
            f"Store alone (`SQLiteStore`, no broker): {scale.rows:,} finished jobs (filled in "
            f"{scale.fill_s:.0f} s) and 20 running.",
            "",
            "| measurement | median | goal | result |",
            "|---|---|---|---|",
            f"| `jobs --state running` (list_jobs, 50) | {scale.list_running_ms:.2f} ms "
            f"| < 50 ms | {verdict(scale.list_running_ms < 50)} |",
            f"| `status ID` (get) | {scale.status_ms:.2f} ms | < 50 ms "
            f"| {verdict(scale.status_ms < 50)} |",
            f"| submit p99, {SUBMITTERS} submitters, idle | {idle:.2f} ms | | |",
            f"| submit p99 while retention purges ({scale.purged:,} rows removed; over the "
            "whole purge, 64 submitters) "
            f"| {busy:.2f} ms | <= 2x idle | {verdict(busy <= 2 * idle)} |",
        ]
    text = "\n".join(lines) + "\n"
    print(text)
    args.output.write_text(text)


if __name__ == "__main__":
    main()
