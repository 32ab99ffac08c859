"""`python -m benchmarks.probe`: one throughput scenario against one broker, for quick checks
and profiling.

    python -m benchmarks.probe --broker ours --clients 8 --workers 4 --requests 24000
    python -m benchmarks.probe --broker ours --profile /tmp/ours.prof   # broker under cProfile
    python -m benchmarks.probe --security curve --repeat 3              # our broker with CURVE
    python -m benchmarks.probe --broker c --c-broker /tmp/mdbroker      # the zguide's C broker
    python -m benchmarks.probe --broker ours --dialect rfc7             # ours, spoken MDP/0.1
    python -m benchmarks.probe --broker proxy                           # the transport ceiling
    python -m benchmarks.probe --command --concurrency 4 --py-spy /tmp/w.txt   # see below

`--command` runs the command scenario instead (`benchmarks.command`): the spawn ceiling at
`--concurrency`, then `true` through our broker and `mdp-worker --service os --concurrency N`,
`--requests` commands each; `--pythonpath` then applies to the broker and the worker, and
`--py-spy` samples the worker (with its subprocesses).
    python -m pstats /tmp/ours.prof                                     # then: sort tottime

With `--profile` the broker runs as `python -m cProfile -o PATH -m ...` and is given time to
exit on SIGTERM so the profile is written (majortomo needs up to 2.5 s for that). Profiled
CPU figures are inflated by the profiler; compare them only with each other.
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import statistics
import subprocess
import time

from benchmarks.brokers import ALL_KINDS, SECURITY, start_broker
from benchmarks.command import run_ceiling, run_command
from benchmarks.loadgen import DIALECTS, NATIVE_DIALECT, Scenario, ThroughputResult, run_throughput

DEFAULT_REQUESTS = 24_000


def main() -> None:
    """Parse options, run the scenario `--repeat` times, print each result and the medians."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.probe", description=__doc__)
    parser.add_argument("--broker", choices=ALL_KINDS, default="ours")
    parser.add_argument(
        "--c-broker",
        metavar="PATH",
        help="the built zguide mdbroker binary (started as `PATH ENDPOINT`), for --broker c",
    )
    parser.add_argument("--dialect", choices=[*DIALECTS, "native"], default="native")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--outstanding", type=int, default=1)
    parser.add_argument("--payload", type=int, default=64)
    parser.add_argument(
        "--requests", type=int, default=DEFAULT_REQUESTS, help="(--command: default 1,500)"
    )
    parser.add_argument("--max-seconds", type=float, default=10.0)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument(
        "--security",
        choices=SECURITY,
        default="plain",
        help="our broker only: plain, curve (CURVE, log level WARNING) or curve-info (CURVE at "
        "the default INFO, which writes the audit records)",
    )
    parser.add_argument("--profile", metavar="PATH", help="run the broker under cProfile")
    parser.add_argument(
        "--pythonpath",
        metavar="DIR",
        help="put DIR first on the broker's PYTHONPATH (A/B-test a patched copy of mdp/)",
    )
    parser.add_argument(
        "--py-spy",
        metavar="PATH",
        help="sample the broker with `py-spy record --native --format raw` (collapsed stacks, "
        "active samples only) into PATH; needs py-spy on PATH",
    )
    parser.add_argument(
        "--command",
        action="store_true",
        help="run the command scenario (`true` through broker + mdp-worker) instead",
    )
    parser.add_argument("--concurrency", type=int, default=8, help="for --command")
    args = parser.parse_args()
    if args.broker == "c" and not args.c_broker:
        parser.error("--broker c needs --c-broker PATH")
    if args.command:
        _command(args)
        return
    dialect = NATIVE_DIALECT[args.broker] if args.dialect == "native" else args.dialect
    scenario = Scenario(
        "probe",
        args.clients,
        args.workers,
        args.outstanding,
        args.payload,
        args.requests,
        args.max_seconds,
    )
    wrapper = ["-m", "cProfile", "-o", args.profile] if args.profile else None
    results: list[ThroughputResult] = []
    for _ in range(max(1, args.repeat)):
        broker = start_broker(
            args.broker,
            wrapper=wrapper,
            pythonpath=args.pythonpath,
            security=args.security,
            c_broker=args.c_broker,
        )
        spy = _start_py_spy(broker.pid, args.py_spy) if args.py_spy else None
        try:
            results.append(run_throughput(broker, dialect, scenario))
        finally:
            if spy is not None:
                spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
                try:
                    spy.wait(30)
                except subprocess.TimeoutExpired:
                    spy.kill()
                    spy.wait(5)
            broker.stop(grace=5.0 if args.profile else 0.5)
        r = results[-1]
        print(
            f"{r.broker} ({r.dialect}, {r.security}) {r.completed} req in {r.elapsed:.2f} s: "
            f"{r.rps:,.0f} req/s, p50 {r.p50_ms:.2f} p99 {r.p99_ms:.2f} max {r.max_ms:.2f} ms, "
            f"CPU {r.cpu_ms_per_1000:.1f} ms/1k (main thread {r.main_thread_ms_per_1000:.1f}), "
            f"RSS {r.rss_mb:.1f} MB"
            + (f", lost {r.lost} bad {r.bad}" if r.lost or r.bad else "")
            + (f", {r.errors}" if r.errors else "")
        )
    if len(results) > 1:
        medians = {
            f.name: statistics.median(getattr(r, f.name) for r in results)
            for f in dataclasses.fields(ThroughputResult)
            if f.name in ("rps", "p99_ms", "cpu_ms_per_1000", "main_thread_ms_per_1000")
        }
        print("medians:", ", ".join(f"{k} {v:.2f}" for k, v in medians.items()))


def _command(args: argparse.Namespace) -> None:
    count = args.requests if args.requests != DEFAULT_REQUESTS else 1_500
    rates: list[float] = []
    for _ in range(max(1, args.repeat)):
        ceiling = run_ceiling(count, args.max_seconds, args.concurrency)
        broker = start_broker("ours", pythonpath=args.pythonpath)
        try:
            r = run_command(
                broker, count, args.max_seconds, args.concurrency, args.py_spy, args.pythonpath
            )
        finally:
            broker.stop()
        rates.append(r.rate / ceiling.rate)
        print(
            f"concurrency {args.concurrency}: ceiling {ceiling.rate:,.0f}/s (own CPU "
            f"{ceiling.own_cpu_ms_per_1000:.0f}, true {ceiling.children_cpu_ms_per_1000:.0f} "
            f"ms/1k); broker+worker {r.rate:,.0f}/s = {r.rate / ceiling.rate:.0%}, p50 "
            f"{r.p50_ms:.2f} p99 {r.p99_ms:.2f} ms; CPU ms/1k: broker "
            f"{r.broker_cpu_ms_per_1000:.0f}, worker {r.worker_own_cpu_ms_per_1000:.0f}, true "
            f"{r.worker_cpu_ms_per_1000 - r.worker_own_cpu_ms_per_1000:.0f}, watchdog "
            f"{r.worker_helpers_cpu_ms_per_1000:.0f}, client "
            f"{r.client_cpu_ms_per_1000:.0f}"
            + (f"; {r.failed} failed {r.lost} lost" if r.failed or r.lost else "")
            + (f"; {r.errors}" if r.errors else ""),
            flush=True,
        )
    if len(rates) > 1:
        print(f"median share of the ceiling: {statistics.median(rates):.0%}")


def _start_py_spy(pid: int, path: str) -> subprocess.Popen[bytes]:
    spy = subprocess.Popen(
        [
            *("py-spy", "record", "--pid", str(pid), "--native", "--rate", "500"),
            *("--format", "raw", "--output", path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)  # let it attach before the load starts
    return spy


if __name__ == "__main__":
    main()
