"""`python -m benchmarks.run`: every scenario of issue 5 against our broker and majortomo's,
the throughput scenarios also against our broker with CURVE (issue 6), against the transport
ceiling (`zmq.proxy`, issue 17), and, given `--c-broker PATH`, the small-message scenarios
against the zguide's C broker in MDP/0.1 (issue 17).

Each repetition runs every scenario once per broker, back to back, alternating which broker
goes first, so drift on a shared machine hits both alike; in the throughput scenarios our
broker with CURVE runs in the same group, next to ours without. Every run gets a fresh broker
process. Writes `benchmarks/RESULTS.md`, `benchmarks/ratios.png` and `benchmarks/results.json`.

    python -m benchmarks.run                  # full run, about 9 minutes on 2 cores
    python -m benchmarks.run --quick          # smoke run, about a minute; not for conclusions
    python -m benchmarks.run --wait-for-quiet 600   # first wait (bounded) for load < 1.0
    python -m benchmarks.run --c-broker /tmp/mdbroker   # also the zguide's C broker

Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import psutil
import zmq

from benchmarks.brokers import BROKERS, BrokerKind, BrokerProcess, Security, start_broker
from benchmarks.command import profile_categories, py_spy_path, run_ceiling, run_command
from benchmarks.loadgen import NATIVE_DIALECT, Scenario, ThroughputResult, run_throughput
from benchmarks.report import RunData, chart, curve_costs, load, render, targets
from benchmarks.scale import run_idle_workers, run_queue_drain

HERE = Path(__file__).resolve().parent
KIB = 1024
T = TypeVar("T")


@dataclass(frozen=True)
class Plan:
    """What one run measures, and how much of it."""

    repetitions: int
    scenarios: list[Scenario]
    variant: str
    """Scenario also run against our broker in majortomo's dialect ("" for none)."""
    curve: tuple[str, ...]
    """Scenarios also run against our broker with CURVE (at --log-level WARNING)."""
    curve_info: str
    """Scenario also run against our broker with CURVE at INFO, its default, which writes the
    audit records ("" for none)."""
    transport: tuple[str, ...]
    """Scenarios also run through the transport ceiling (`benchmarks.proxy`)."""
    c_scenarios: tuple[str, ...]
    """Scenarios run against the C broker and ours, both in MDP/0.1, when --c-broker is given."""
    command_count: int
    command_seconds: float
    idle_workers: int
    idle_window: float
    queue_requests: int
    queue_workers: int = 4
    queue_timeout: float = 180.0
    command_concurrency: tuple[int, ...] = (8,)
    """Concurrencies of the command scenario; the first is the one the target is about."""
    quick: bool = False
    extra: dict[str, str] = field(default_factory=dict)


def full_plan(repetitions: int) -> Plan:
    """The run RESULTS.md is made from."""
    return Plan(
        repetitions=repetitions,
        scenarios=[
            Scenario("1x1 sync 64 B", 1, 1, 1, 64, 8_000, 6.0),
            Scenario("8x4 sync 64 B", 8, 4, 1, 64, 24_000, 6.0),
            Scenario("8x4 x32 64 B", 8, 4, 32, 64, 40_000, 6.0),
            Scenario("1x1 sync 64 KiB", 1, 1, 1, 64 * KIB, 4_000, 6.0),
            Scenario("8x4 sync 64 KiB", 8, 4, 1, 64 * KIB, 10_000, 6.0),
            Scenario("8x4 x32 64 KiB", 8, 4, 32, 64 * KIB, 10_000, 6.0),
        ],
        variant="8x4 sync 64 B",
        curve=(
            "1x1 sync 64 B",
            "8x4 sync 64 B",
            "8x4 x32 64 B",
            "1x1 sync 64 KiB",
            "8x4 sync 64 KiB",
            "8x4 x32 64 KiB",
        ),
        curve_info="8x4 sync 64 B",
        transport=(
            "1x1 sync 64 B",
            "8x4 sync 64 B",
            "8x4 x32 64 B",
            "1x1 sync 64 KiB",
            "8x4 sync 64 KiB",
            "8x4 x32 64 KiB",
        ),
        c_scenarios=("1x1 sync 64 B", "8x4 sync 64 B", "8x4 x32 64 B"),
        command_count=1_500,
        command_seconds=6.0,
        command_concurrency=(8, 1, 4, 16),
        idle_workers=1_000,
        idle_window=10.0,
        queue_requests=100_000,
    )


def quick_plan() -> Plan:
    """A smoke run: every code path, small counts, one repetition."""
    return Plan(
        repetitions=1,
        scenarios=[
            Scenario("1x1 sync 64 B", 1, 1, 1, 64, 500, 2.0, warmup=5),
            Scenario("8x4 sync 64 B", 8, 4, 1, 64, 3_000, 2.0, warmup=5),
            Scenario("8x4 x32 64 B", 8, 4, 32, 64, 4_000, 2.0, warmup=5),
            Scenario("1x1 sync 64 KiB", 1, 1, 1, 64 * KIB, 200, 2.0, warmup=5),
            Scenario("8x4 sync 64 KiB", 8, 4, 1, 64 * KIB, 800, 2.0, warmup=5),
            Scenario("8x4 x32 64 KiB", 8, 4, 32, 64 * KIB, 800, 2.0, warmup=5),
        ],
        variant="",
        curve=("8x4 sync 64 B", "8x4 x32 64 B"),
        curve_info="8x4 sync 64 B",
        transport=("1x1 sync 64 B", "8x4 x32 64 B"),
        c_scenarios=("1x1 sync 64 B", "8x4 sync 64 B"),
        command_count=200,
        command_seconds=2.0,
        command_concurrency=(8, 1),
        idle_workers=200,
        idle_window=2.0,
        queue_requests=10_000,
        queue_timeout=60.0,
        quick=True,
    )


# --------------------------------------------------------------------------------------------


def log(message: str) -> None:
    """One progress line on stderr."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def machine_info() -> dict[str, str]:
    """CPU, cores, RAM, OS and library versions, for the report."""
    from importlib.metadata import PackageNotFoundError, version

    from mdp.fastzmq import compiled as fastzmq_compiled

    compiled, why = fastzmq_compiled()

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        majortomo = version("majortomo")
    except PackageNotFoundError:
        majortomo = "not installed"
    try:
        commit = subprocess.run(
            ["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        commit = ""
    return {
        "cpu": cpu,
        "cores": f"{psutil.cpu_count(logical=True)} logical ({psutil.cpu_count(logical=False)} "
        "physical)",
        "ram": f"{psutil.virtual_memory().total / 2**30:.1f} GiB",
        "os": f"{platform.system()} {platform.release()} ({platform.machine()})",
        "python": platform.python_version(),
        "pyzmq": zmq.__version__,
        "libzmq": zmq.zmq_version(),
        "majortomo": majortomo,
        "commit": commit or "unknown",
        # Our broker runs from this same installation, with this environment.
        "socket_io": "compiled (mdp/_fastzmq.c)" if compiled else f"Python: {why}",
    }


def wait_for_quiet(max_wait: float, threshold: float) -> float:
    """Wait, at most `max_wait` seconds, until the 1-minute load average is below `threshold`."""
    start = time.monotonic()
    while time.monotonic() - start < max_wait:
        load = os.getloadavg()[0]
        if load < threshold:
            break
        log(f"load average {load:.2f} >= {threshold}; waiting for a quieter moment")
        time.sleep(min(15.0, max(0.0, max_wait - (time.monotonic() - start))))
    return time.monotonic() - start


def with_broker(
    kind: BrokerKind,
    measure: Callable[[BrokerProcess], T],
    *,
    security: Security = "plain",
    max_queue: int | None = None,
    request_ttl: float | None = None,
    c_broker: str | None = None,
) -> T:
    """Start a fresh broker, measure against it, stop it by PID."""
    broker = start_broker(
        kind,
        security=security,
        max_queue=max_queue,
        request_ttl=request_ttl,
        c_broker=c_broker,
    )
    try:
        return measure(broker)
    finally:
        broker.stop()


def order(rep: int) -> tuple[BrokerKind, ...]:
    """Which broker goes first alternates between repetitions."""
    return BROKERS if rep % 2 == 0 else tuple(reversed(BROKERS))


def contenders(plan: Plan, scenario: Scenario, rep: int) -> list[tuple[BrokerKind, Security]]:
    """The brokers one throughput scenario runs against in repetition `rep`, in order.

    majortomo, ours, then ours with CURVE (and at INFO), reversed every other repetition: ours
    without CURVE sits between majortomo and ours with CURVE, so both ratios compare runs
    taken back to back, and in both pairs which side goes first alternates. The transport
    ceiling (proxy) goes first, before majortomo, or last.
    """
    group: list[tuple[BrokerKind, Security]] = [("majortomo", "plain"), ("ours", "plain")]
    if scenario.name in plan.transport:
        group.insert(0, ("proxy", "plain"))
    if scenario.name in plan.curve:
        group.append(("ours", "curve"))
    if scenario.name == plan.curve_info:
        group.append(("ours", "curve-info"))
    return group if rep % 2 == 0 else group[::-1]


def _log_run(rep: int, label: str, result: ThroughputResult) -> None:
    log(
        f"rep {rep + 1} {result.scenario:<16} {label:<16} {result.rps:8,.0f} req/s  "
        f"p99 {result.p99_ms:6.2f} ms  CPU {result.cpu_ms_per_1000:6.1f} ms/1k"
        + (f"  lost {result.lost} bad {result.bad}" if result.lost or result.bad else "")
        + (f"  {result.errors}" if result.errors else "")
    )


def run_repetition(plan: Plan, data: RunData, rep: int, c_broker: str | None = None) -> None:
    """One repetition of every scenario, appended to `data`.

    `c_broker`: the built zguide broker, run against ours in `plan.c_scenarios` (MDP/0.1).
    """
    runs = []
    for scenario in plan.scenarios:
        for kind, security in contenders(plan, scenario, rep):
            measure = functools.partial(
                run_throughput, dialect=NATIVE_DIALECT[kind], scenario=scenario
            )
            result = with_broker(kind, measure, security=security)
            runs.append(result)
            _log_run(rep, kind if security == "plain" else f"{kind} {security}", result)
    data.throughput.append(runs)
    if plan.variant:
        scenario = next(s for s in plan.scenarios if s.name == plan.variant)
        measure = functools.partial(run_throughput, dialect="majortomo", scenario=scenario)
        result = with_broker("ours", measure)
        data.variant.append([result])
        log(
            f"rep {rep + 1} {scenario.name} ours, majortomo dialect: {result.rps:,.0f} req/s, "
            f"CPU {result.cpu_ms_per_1000:.1f} ms/1k"
        )
    if c_broker:
        c_runs = []
        for name in plan.c_scenarios:
            scenario = next(s for s in plan.scenarios if s.name == name)
            kinds: tuple[BrokerKind, ...] = ("c", "ours") if rep % 2 == 0 else ("ours", "c")
            for kind in kinds:
                measure = functools.partial(run_throughput, dialect="rfc7", scenario=scenario)
                result = with_broker(kind, measure, c_broker=c_broker)
                c_runs.append(result)
                _log_run(rep, f"{kind} (MDP/0.1)", result)
        data.c_broker.append(c_runs)

    for concurrency in plan.command_concurrency:
        ceiling_first = rep % 2 == 0
        for step in (0, 1):
            if (step == 0) == ceiling_first:
                ceiling = run_ceiling(plan.command_count, plan.command_seconds, concurrency)
                data.ceiling.append(ceiling)
                log(f"rep {rep + 1} ceiling at {concurrency}: {ceiling.rate:,.0f} spawns/s")
            else:
                command = with_broker(
                    "ours",
                    functools.partial(
                        run_command,
                        count=plan.command_count,
                        max_seconds=plan.command_seconds,
                        concurrency=concurrency,
                    ),
                )
                data.command.append(command)
                log(
                    f"rep {rep + 1} true via broker+os worker at {concurrency}: "
                    f"{command.rate:,.0f}/s" + (f"  {command.errors}" if command.errors else "")
                )

    for kind in order(rep):
        idle = with_broker(
            kind,
            functools.partial(
                run_idle_workers,
                dialect=NATIVE_DIALECT[kind],
                workers=plan.idle_workers,
                window=plan.idle_window,
            ),
        )
        data.idle.append(idle)
        log(
            f"rep {rep + 1} {plan.idle_workers} idle workers, {kind}: "
            f"{idle.core_percent:.2f}% of a core, {idle.registered} registered"
        )
    for kind in order(rep):
        queue = with_broker(
            kind,
            functools.partial(
                run_queue_drain,
                dialect=NATIVE_DIALECT[kind],
                requests=plan.queue_requests,
                workers=plan.queue_workers,
                timeout=plan.queue_timeout,
            ),
            max_queue=200_000,
            request_ttl=600,
        )
        data.queue.append(queue)
        log(
            f"rep {rep + 1} {plan.queue_requests} queued, {kind}: RSS {queue.rss_queued_mb:.1f} "
            f"MB, {queue.received} back, {queue.missing} missing, drain {queue.drain_s:.1f} s"
        )


def profile_commands(plan: Plan, data: RunData) -> None:
    """One extra command run per concurrency with the worker sampled by py-spy (if installed):
    where the worker's time goes. Not used for any rate or CPU figure (sampling slows it)."""
    if py_spy_path() is None:
        log("py-spy not found: no profile of the worker (pip install py-spy)")
        return
    for concurrency in plan.command_concurrency:
        with tempfile.TemporaryDirectory(prefix="mdp-bench-spy-") as tmp:
            path = str(Path(tmp) / "worker.txt")
            with_broker(
                "ours",
                functools.partial(
                    run_command,
                    count=plan.command_count,
                    max_seconds=plan.command_seconds,
                    concurrency=concurrency,
                    py_spy=path,
                ),
            )
            samples, shares = profile_categories(path) if Path(path).exists() else (0, {})
        data.command_profiles.append(
            {"concurrency": concurrency, "samples": samples, "shares": shares}
        )
        log(f"profile of the worker at {concurrency}: {samples} samples")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write the report; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="Benchmark our MDP broker against majortomo's, side by side.",
    )
    parser.add_argument("--quick", action="store_true", help="fast smoke run (< 1 min)")
    parser.add_argument("--repetitions", type=int, default=3, help="repetitions (default 3)")
    parser.add_argument(
        "--wait-for-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="first wait up to this long for the 1-minute load average to drop below "
        "--load-threshold (default: do not wait)",
    )
    parser.add_argument("--load-threshold", type=float, default=1.0)
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=14.0,
        help="start no repetition that would end after this (default 14)",
    )
    parser.add_argument(
        "--c-broker",
        metavar="PATH",
        help="a built zguide MDP/0.1 broker (examples/C/mdbroker.c) that takes its endpoint as "
        "its argument (`PATH tcp://127.0.0.1:PORT`): the small-message scenarios also run "
        "against it and against ours, both spoken to in MDP/0.1 (default: skipped). Build notes: "
        "benchmarks/README.md",
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help="where RESULTS.md, ratios.png and results.json go (default: benchmarks/, or "
        "benchmarks/quick/ with --quick, which git ignores)",
    )
    parser.add_argument(
        "--render",
        type=Path,
        metavar="RESULTS_JSON",
        help="measure nothing: rewrite RESULTS.md and ratios.png from a results.json",
    )
    args = parser.parse_args(argv)
    c_broker: str | None = None
    if args.c_broker:
        path = Path(args.c_broker)
        if not path.is_file() or not os.access(path, os.X_OK):
            parser.error(f"--c-broker {args.c_broker}: not an executable file")
        c_broker = str(path.resolve())
    if args.render is not None:
        data = load(json.loads(args.render.read_text()))
        render_dir: Path = args.output_dir or args.render.parent
        render_dir.mkdir(parents=True, exist_ok=True)
        (render_dir / "RESULTS.md").write_text(
            render(data, data.command_line or "python -m benchmarks.run")
        )
        _chart(data, render_dir / "ratios.png")
        log(f"rewrote {render_dir / 'RESULTS.md'} from {args.render}")
        return 0
    plan = quick_plan() if args.quick else full_plan(max(1, args.repetitions))
    given = sys.argv[1:] if argv is None else argv
    command_line = " ".join(["python -m benchmarks.run", shlex.join(given)]).strip()
    out: Path = args.output_dir or (HERE / "quick" if args.quick else HERE)

    quiet = wait_for_quiet(args.wait_for_quiet, args.load_threshold) if args.wait_for_quiet else 0
    start = time.monotonic()
    data = RunData(
        quick=plan.quick,
        repetitions=0,
        machine=machine_info(),
        started=datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        load_start=os.getloadavg(),
        quiet_wait_s=quiet,
        scenarios=plan.scenarios,
        idle_workers=plan.idle_workers,
        queue_requests=plan.queue_requests,
        command_count=plan.command_count,
        command_line=command_line,
        c_broker_path=c_broker or "",
    )
    log(f"load average {data.load_start[0]:.2f}; {plan.repetitions} repetition(s)")
    for rep in range(plan.repetitions):
        elapsed = time.monotonic() - start
        if rep and elapsed / rep + elapsed > args.max_minutes * 60:
            log(f"stopping after {rep} repetitions to stay under {args.max_minutes} minutes")
            break
        run_repetition(plan, data, rep, c_broker)
        data.repetitions = rep + 1
    profile_commands(plan, data)
    data.duration_s = time.monotonic() - start
    data.load_end = os.getloadavg()

    out.mkdir(parents=True, exist_ok=True)
    # The raw figures first: whatever fails after this, `--render` can redo it.
    summary = {"curve_cost": [dataclasses.asdict(c) for c in curve_costs(data)]}
    (out / "results.json").write_text(
        json.dumps({**dataclasses.asdict(data), **summary}, indent=1) + "\n"
    )
    (out / "RESULTS.md").write_text(render(data, command_line))
    _chart(data, out / "ratios.png")
    for target in targets(data):
        status = target.status or (
            "n/a" if target.met is None else ("met" if target.met else "NOT MET")
        )
        log(f"{status:>7}: {target.name}: {target.measured}")
    log(f"wrote {out / 'RESULTS.md'} in {data.duration_s:.0f} s")
    return 0


def _chart(data: RunData, path: Path) -> None:
    try:
        chart(data, path)
    except ImportError as exc:  # matplotlib is in the [bench] extra
        log(f"no chart ({exc}); pip install -e '.[bench]' and use --render")


if __name__ == "__main__":
    sys.exit(main())
