"""Turn one benchmark run into `RESULTS.md` and the ratio chart.

Every figure in the tables is a median over repetitions; every ratio is ours/majortomo computed
pair by pair (the two runs of one repetition, taken back to back) and then the median of those
ratios, so slow drift on a shared machine affects both sides of each pair alike. The cost of
CURVE (issue 6) is computed the same way: our broker with CURVE / our broker without, pair by
pair. Tables about ours/majortomo use only the runs without CURVE.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from benchmarks.command import (
    CONCURRENCY,
    OTHER_CATEGORY,
    PROFILE_CATEGORIES,
    CeilingResult,
    CommandResult,
)
from benchmarks.loadgen import Scenario, ThroughputResult
from benchmarks.scale import IdleResult, QueueResult

CPU_RATIO_TARGET = 0.60
"""Our broker's CPU per request / majortomo's, every 64 B scenario (issue 17)."""
CPU_RATIO_TARGET_LARGE = 0.65
"""The same for the 64 KiB scenarios."""
RPS_RATIO_TARGET = 1.2
BROKER_BOUND_BUSY = 75.0
"""A scenario is broker-bound when majortomo's Python thread is busy at least this % of a
core: there the broker, not the peers, sets the pace, and req/s compares the brokers."""
C_CPU_TARGET = 1.1
"""Our broker's CPU per request / the C broker's, both spoken to in MDP/0.1 (issue 17)."""
COMMAND_TARGET = 0.90
IDLE_TARGET_PERCENT = 5.0
QUEUE_RSS_TARGET_MB = 200.0


@dataclass
class RunData:
    """Everything one run measured, plus where and how."""

    quick: bool
    repetitions: int
    machine: dict[str, str]
    started: str
    duration_s: float = 0.0
    load_start: tuple[float, float, float] = (0.0, 0.0, 0.0)
    load_end: tuple[float, float, float] = (0.0, 0.0, 0.0)
    quiet_wait_s: float = 0.0
    scenarios: list[Scenario] = field(default_factory=list)
    throughput: list[list[ThroughputResult]] = field(default_factory=list)
    """Per repetition, every run in the order it ran."""
    variant: list[list[ThroughputResult]] = field(default_factory=list)
    ceiling: list[CeilingResult] = field(default_factory=list)
    command: list[CommandResult] = field(default_factory=list)
    idle: list[IdleResult] = field(default_factory=list)
    queue: list[QueueResult] = field(default_factory=list)
    idle_workers: int = 0
    queue_requests: int = 0
    command_count: int = 0
    command_line: str = ""
    c_broker: list[list[ThroughputResult]] = field(default_factory=list)
    """Per repetition, the C broker's and our runs in MDP/0.1, in the order they ran."""
    c_broker_path: str = ""
    command_profiles: list[dict[str, Any]] = field(default_factory=list)
    """Per concurrency: py-spy samples of the worker and their shares per category."""


def load(raw: dict[str, Any]) -> RunData:
    """A RunData back from its `results.json` form (to re-render without re-measuring)."""
    data = RunData(
        **{k: v for k, v in raw.items() if k in RunData.__dataclass_fields__ and k != "machine"},
        machine=raw["machine"],
    )
    data.load_start = tuple(raw["load_start"])
    data.load_end = tuple(raw["load_end"])
    data.scenarios = [Scenario(**s) for s in raw["scenarios"]]
    data.throughput = [[ThroughputResult(**r) for r in rep] for rep in raw["throughput"]]
    data.variant = [[ThroughputResult(**r) for r in rep] for rep in raw["variant"]]
    data.c_broker = [[ThroughputResult(**r) for r in rep] for rep in raw.get("c_broker", [])]
    data.ceiling = [CeilingResult(**r) for r in raw["ceiling"]]
    data.command = [CommandResult(**r) for r in raw["command"]]
    data.idle = [IdleResult(**r) for r in raw["idle"]]
    data.queue = [QueueResult(**r) for r in raw["queue"]]
    return data


# --------------------------------------------------------------------------------------------
# Numbers


def median(values: Sequence[float]) -> float:
    """Median of finite values, NaN if there are none."""
    finite = [v for v in values if not math.isnan(v)]
    return statistics.median(finite) if finite else float("nan")


def runs_of(
    data: RunData,
    scenario: str,
    broker: str,
    dialect: str | None = None,
    security: str = "plain",
) -> list[ThroughputResult]:
    """The throughput results of one scenario, broker and security, one per repetition."""
    return [
        r
        for rep in data.throughput
        for r in rep
        if r.scenario == scenario
        and r.broker == broker
        and r.security == security
        and (dialect is None or r.dialect == dialect)
    ]


Side = tuple[str, str]
"""(broker, security): one side of a ratio."""
OURS: Final[Side] = ("ours", "plain")
MAJORTOMO: Final[Side] = ("majortomo", "plain")
PROXY: Final[Side] = ("proxy", "plain")


def _pairs(
    data: RunData, scenario: str, top: Side, bottom: Side
) -> list[tuple[ThroughputResult, ThroughputResult]]:
    """(top, bottom) runs of `scenario`, one pair per repetition that has both."""
    pairs = []
    for rep in data.throughput:
        tops = [r for r in rep if r.scenario == scenario and (r.broker, r.security) == top]
        bottoms = [r for r in rep if r.scenario == scenario and (r.broker, r.security) == bottom]
        if tops and bottoms:
            pairs.append((tops[0], bottoms[0]))
    return pairs


def pair_ratios(
    data: RunData,
    scenario: str,
    metric: Callable[[ThroughputResult], float],
    top: Side = OURS,
    bottom: Side = MAJORTOMO,
) -> list[float]:
    """top/bottom (default ours/majortomo, both without CURVE) for `metric`, per repetition."""
    return _ratio_list(_pairs(data, scenario, top, bottom), metric)


def c_pairs(data: RunData, scenario: str) -> list[tuple[ThroughputResult, ThroughputResult]]:
    """(ours, C broker) runs of `scenario` in MDP/0.1, one pair per repetition."""
    pairs = []
    for rep in data.c_broker:
        ours = [r for r in rep if r.scenario == scenario and r.broker == "ours"]
        theirs = [r for r in rep if r.scenario == scenario and r.broker == "c"]
        if ours and theirs:
            pairs.append((ours[0], theirs[0]))
    return pairs


def c_scenarios(data: RunData) -> list[str]:
    """The scenarios run against the C broker, in plan order."""
    names = {r.scenario for rep in data.c_broker for r in rep}
    return [s.name for s in data.scenarios if s.name in names]


def _cpu(r: ThroughputResult) -> float:
    return r.cpu_ms_per_1000


def _rps(r: ThroughputResult) -> float:
    return r.rps


def _p99(r: ThroughputResult) -> float:
    return r.p99_ms


def _fmt(value: float, digits: int = 2) -> str:
    if math.isnan(value):
        return "n/a"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def _ratios(values: Sequence[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values) or "n/a"


def _met(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**met**" if ok else "**not met**")


CURVE_CONFIGS: Final[dict[str, str]] = {
    "curve": "CURVE",
    "curve-info": "CURVE, INFO log (audit records)",
}
"""Our broker's CURVE configurations (`brokers.Security`), as the report names them."""


@dataclass
class CurveCost:
    """Our broker with CURVE against the same broker without, in one scenario.

    Figures are medians over repetitions; ratios are CURVE/plain per repetition (the two runs
    of a repetition ran back to back), then the median of those.
    """

    scenario: str
    security: str
    """"curve" (--log-level WARNING, like every other run) or "curve-info" (INFO: audit)."""
    repetitions: int
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_ms_per_1000: float
    main_thread_ms_per_1000: float
    plain_rps: float
    plain_p50_ms: float
    plain_p99_ms: float
    plain_cpu_ms_per_1000: float
    plain_main_thread_ms_per_1000: float
    rps_ratio: float
    p99_ratio: float
    cpu_ratio: float
    cpu_added_us_per_request: float
    """Median of per-repetition (CURVE - plain) broker CPU per request, in µs."""
    rps_ratios: list[float] = field(default_factory=list)
    p99_ratios: list[float] = field(default_factory=list)
    cpu_ratios: list[float] = field(default_factory=list)


def curve_costs(data: RunData) -> list[CurveCost]:
    """The cost of CURVE in every scenario (and configuration) this run measured it in."""
    out = []
    for s in data.scenarios:
        for security in CURVE_CONFIGS:
            pairs = _pairs(data, s.name, ("ours", security), OURS)
            if not pairs:
                continue
            curve = [a for a, _ in pairs]
            plain = [b for _, b in pairs]
            rps_ratios = _ratio_list(pairs, _rps)
            p99_ratios = _ratio_list(pairs, _p99)
            cpu_ratios = _ratio_list(pairs, _cpu)
            out.append(
                CurveCost(
                    scenario=s.name,
                    security=security,
                    repetitions=len(pairs),
                    rps=median([r.rps for r in curve]),
                    p50_ms=median([r.p50_ms for r in curve]),
                    p99_ms=median([r.p99_ms for r in curve]),
                    cpu_ms_per_1000=median([r.cpu_ms_per_1000 for r in curve]),
                    main_thread_ms_per_1000=median([r.main_thread_ms_per_1000 for r in curve]),
                    plain_rps=median([r.rps for r in plain]),
                    plain_p50_ms=median([r.p50_ms for r in plain]),
                    plain_p99_ms=median([r.p99_ms for r in plain]),
                    plain_cpu_ms_per_1000=median([r.cpu_ms_per_1000 for r in plain]),
                    plain_main_thread_ms_per_1000=median(
                        [r.main_thread_ms_per_1000 for r in plain]
                    ),
                    rps_ratio=median(rps_ratios),
                    p99_ratio=median(p99_ratios),
                    cpu_ratio=median(cpu_ratios),
                    cpu_added_us_per_request=median(
                        [a.cpu_ms_per_1000 - b.cpu_ms_per_1000 for a, b in pairs]
                    ),
                    rps_ratios=rps_ratios,
                    p99_ratios=p99_ratios,
                    cpu_ratios=cpu_ratios,
                )
            )
    return out


def _ratio_list(
    pairs: list[tuple[ThroughputResult, ThroughputResult]],
    metric: Callable[[ThroughputResult], float],
) -> list[float]:
    return [metric(a) / metric(b) for a, b in pairs if metric(b) > 0]


# --------------------------------------------------------------------------------------------
# Targets


@dataclass
class Target:
    """One target of issue 5 (or acceptance item of issue 6) and how this run did."""

    name: str
    measured: str
    met: bool | None
    status: str = ""
    """Shown instead of met/not met when set (for items that are shown, not passed)."""

    @property
    def result(self) -> str:
        """The result column: the status if set, else met / not met / n/a."""
        return f"**{self.status}**" if self.status else _met(self.met)


def _busy(r: ThroughputResult) -> float:
    """% of one core the broker's Python thread was busy during the run."""
    return r.main_thread_ms_per_1000 * r.rps / 1e4


def targets(data: RunData) -> list[Target]:
    """Evaluate each target of issues 5, 6 and 17 against this run."""
    out: list[Target] = []
    for s in data.scenarios:
        limit = CPU_RATIO_TARGET if s.payload <= 64 else CPU_RATIO_TARGET_LARGE
        ratios = pair_ratios(data, s.name, _cpu)
        m = median(ratios)
        measured = f"{_fmt(m)} x (per repetition: {_ratios(ratios)})"
        # Where the target is missed, say whether any broker on libzmq could meet it: the
        # transport ceiling (zmq.proxy, no MDP at all) relative to majortomo in the same run.
        floor = median(pair_ratios(data, s.name, _cpu, PROXY, MAJORTOMO))
        if not math.isnan(m) and m > limit and not math.isnan(floor):
            measured += (
                f"; the transport ceiling itself (zmq.proxy, no MDP) is {_fmt(floor)} x "
                "majortomo's here"
            )
        out.append(
            Target(
                f"Broker CPU per request <= {limit:.2f} x majortomo's, {s.name}",
                measured,
                None if math.isnan(m) else m <= limit,
            )
        )
    bound, free = [], []
    for s in data.scenarios:
        busy = median([_busy(r) for r in runs_of(data, s.name, "majortomo")])
        ours_busy = median([_busy(r) for r in runs_of(data, s.name, "ours")])
        ratios = pair_ratios(data, s.name, _rps)
        text = (
            f"{s.name}: {_fmt(median(ratios))} x (per repetition: {_ratios(ratios)}; "
            f"majortomo's Python thread busy {busy:.0f}%, ours {ours_busy:.0f}%)"
        )
        if busy >= BROKER_BOUND_BUSY:
            bound.append((median(ratios), text))
        elif not math.isnan(busy):
            free.append(f"{s.name} ({busy:.0f}%)")
    out.append(
        Target(
            f"Requests/s >= {RPS_RATIO_TARGET} x majortomo's where the broker is the bottleneck "
            f"(majortomo's Python thread busy >= {BROKER_BOUND_BUSY:.0f}% of a core)",
            "; ".join(t for _, t in bound)
            + (
                ("; " if bound else "")
                + "not broker-bound, the peers set the pace: "
                + ", ".join(free)
                if free
                else ""
            ),
            all(m >= RPS_RATIO_TARGET for m, _ in bound) if bound else None,
        )
    )
    worst: list[str] = []
    all_ok: bool | None = None
    for s in data.scenarios:
        m = median(pair_ratios(data, s.name, _p99))
        if math.isnan(m):
            continue
        all_ok = (all_ok is None or all_ok) and m <= 1.0
        worst.append(f"{s.name}: {m:.2f}")
    out.append(Target("p99 latency <= majortomo's, every scenario", "; ".join(worst), all_ok))
    out += _c_targets(data)
    out.append(_transport_target(data))
    pairs = [
        (c, k)
        for c, k in zip(data.command, data.ceiling, strict=False)
        if c.concurrency == CONCURRENCY
    ]
    if pairs:
        ratios = [c.rate / k.rate for c, k in pairs]
        m = median(ratios)
        out.append(
            Target(
                f"`true` through broker + os worker >= {COMMAND_TARGET:.0%} of the local ceiling"
                f" (concurrency {CONCURRENCY})",
                f"{m:.0%} ({_fmt(median([c.rate for c, _ in pairs]), 0)}/s vs "
                f"{_fmt(median([k.rate for _, k in pairs]), 0)}/s; per repetition: "
                + ", ".join(f"{r:.0%}" for r in ratios)
                + ")",
                m >= COMMAND_TARGET,
            )
        )
    else:
        out.append(Target("`true` through broker + os worker", "not measured", None))
    idle = [r for r in data.idle if r.broker == "ours"]
    if idle:
        m = median([r.core_percent for r in idle])
        registered = min(r.registered for r in idle)
        out.append(
            Target(
                f"{data.idle_workers:,} idle workers: broker < {IDLE_TARGET_PERCENT:g}% of a core",
                f"{m:.2f}% of a core ({registered:,} of {data.idle_workers:,} registered)",
                m < IDLE_TARGET_PERCENT and registered == data.idle_workers,
            )
        )
    queue = [r for r in data.queue if r.broker == "ours"]
    if queue:
        rss = max(max(r.rss_queued_mb, r.peak_rss_mb) for r in queue)
        lost = sum(r.missing + r.duplicates for r in queue)
        out.append(
            Target(
                f"{data.queue_requests:,} queued: RSS < {QUEUE_RSS_TARGET_MB:g} MB, all drain, "
                "none lost",
                f"peak RSS {rss:.1f} MB; {sum(r.received for r in queue):,} of "
                f"{data.queue_requests * len(queue):,} FINALs back, {lost} missing or duplicated "
                f"({len(queue)} repetitions); drain {median([r.drain_s for r in queue]):.1f} s",
                rss < QUEUE_RSS_TARGET_MB and lost == 0,
            )
        )
    out.append(_curve_target(data))
    return out


def _c_targets(data: RunData) -> list[Target]:
    names = c_scenarios(data)
    if not names:
        name = "As cheap as C: the zguide's C broker"
        return [Target(name, "not measured (no --c-broker)", None)]
    cpu_parts, rps_parts = [], []
    cpu_ok = rps_ok = True
    for name in names:
        pairs = c_pairs(data, name)
        cpu = _ratio_list(pairs, _cpu)
        rps = _ratio_list(pairs, _rps)
        cpu_ok = cpu_ok and median(cpu) <= C_CPU_TARGET
        rps_ok = rps_ok and median(rps) >= 1.0
        cpu_parts.append(f"{name}: {_fmt(median(cpu))} x (per repetition: {_ratios(cpu)})")
        rps_parts.append(f"{name}: {_fmt(median(rps))} x (per repetition: {_ratios(rps)})")
    return [
        Target(
            f"Broker CPU per request <= {C_CPU_TARGET} x the zguide C broker's (MDP/0.1)",
            "; ".join(cpu_parts),
            cpu_ok,
        ),
        Target("Requests/s >= the zguide C broker's (MDP/0.1)", "; ".join(rps_parts), rps_ok),
    ]


def _transport_target(data: RunData) -> Target:
    name = "Transport ceiling (`zmq.proxy`, same peers): our CPU per request relative to it"
    parts = []
    for s in data.scenarios:
        ratios = pair_ratios(data, s.name, _cpu, OURS, PROXY)
        if ratios:
            parts.append(f"{s.name}: {_fmt(median(ratios))} x")
    if not parts:
        return Target(name, "not measured", None)
    return Target(name, "; ".join(parts) + " (Transport ceiling)", True, status="shown")


def _curve_target(data: RunData) -> Target:
    name = "Issue 6: the benchmark shows the throughput cost of CURVE (same run, with and without)"
    costs = curve_costs(data)
    if not costs:
        return Target(name, "not measured", None)
    parts = [
        f"{c.scenario}"
        + (", INFO log with audit records" if c.security == "curve-info" else "")
        + f": req/s {c.rps_ratio:.2f} x, broker CPU per request {c.cpu_ratio:.2f} x"
        f" ({c.cpu_added_us_per_request:+.1f} µs), p99 {c.p99_ratio:.2f} x"
        for c in costs
    ]
    return Target(
        name,
        "CURVE/plain, medians of per-repetition ratios: " + "; ".join(parts) + " (Cost of CURVE)",
        True,
        status="CURVE cost shown",
    )


# --------------------------------------------------------------------------------------------
# Markdown


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def render(data: RunData, command_line: str) -> str:
    """RESULTS.md for one run."""
    m = data.machine
    load = " / ".join(f"{x:.2f}" for x in data.load_start)
    load_end = " / ".join(f"{x:.2f}" for x in data.load_end)
    lines = [
        "# Benchmark results: our MDP broker vs majortomo",
        "",
        f"Generated by `{command_line}` on {data.started} in {data.duration_s:.0f} s"
        + (
            " (**quick smoke run: short, one repetition; not for conclusions**)"
            if data.quick
            else ""
        )
        + ". How it works: [README.md](README.md).",
        "",
        "## Machine",
        "",
        *_table(
            ["", ""],
            [
                ["CPU", m["cpu"]],
                ["Cores", m["cores"]],
                ["RAM", m["ram"]],
                ["OS", m["os"]],
                ["Python", m["python"]],
                ["pyzmq / libzmq", f"{m['pyzmq']} / {m['libzmq']}"],
                ["majortomo", m["majortomo"]],
                ["mdp commit", m["commit"]],
                ["Our broker's socket I/O", m.get("socket_io", "not recorded")],
                ["Load average (1/5/15 min) at start", load],
                ["Load average at end", load_end],
                ["Waited for a quiet machine", f"{data.quiet_wait_s:.0f} s"],
            ],
        ),
        "",
        "The machine is shared (other test suites may run at the same time), so runs are",
        "interleaved ours/majortomo (and ours with CURVE) in every repetition",
        f"({data.repetitions} repetitions, the order alternating), figures are medians, and",
        "ratios are taken pair by pair.",
        "",
        "## Targets (issues 5, 6 and 17)",
        "",
        *_table(
            ["Target", "Measured", "Result"],
            [[t.name, t.measured, t.result] for t in targets(data)],
        ),
        "",
        "![ours/majortomo ratios](ratios.png)",
        "",
        *_throughput_section(data),
        *_variant_section(data),
        *_c_section(data),
        *_transport_section(data),
        *_curve_section(data),
        *_command_section(data),
        *_scale_section(data),
        *_runs_section(data),
    ]
    return "\n".join(lines) + "\n"


def _throughput_section(data: RunData) -> list[str]:
    lines = [
        "## Throughput and latency",
        "",
        "Echo workers and clients are raw-frame pyzmq processes (`benchmarks/loadgen.py`); ours",
        "is spoken to in RFC 18 framing, majortomo in its own dialect. NxW = clients x workers;",
        "`sync` = one request in flight per client, `xK` = K in flight per client (K sockets).",
        "CPU = the broker process's user+system CPU per 1,000 requests; busy = the share of one",
        "core the broker used during the run (CPU x req/s): well under 100% means the broker was",
        "not what limited req/s (on 2 cores the 12 peer processes were). Medians over",
        "repetitions; the ratio columns are medians of per-repetition ours/majortomo ratios.",
        "Both brokers without CURVE here; ours with CURVE is in [Cost of CURVE](#cost-of-curve).",
        "",
    ]
    rows = []
    for s in data.scenarios:
        for broker in ("ours", "majortomo"):
            runs = runs_of(data, s.name, broker)
            if not runs:
                continue
            rows.append(
                [
                    s.name if broker == "ours" else "",
                    broker,
                    _fmt(median([r.rps for r in runs]), 0),
                    _fmt(median([r.p50_ms for r in runs])),
                    _fmt(median([r.p99_ms for r in runs])),
                    _fmt(median([r.max_ms for r in runs])),
                    _fmt(median([r.cpu_ms_per_1000 for r in runs]), 1),
                    f"{median([r.cpu_ms_per_1000 * r.rps / 10_000 for r in runs]):.0f}%",
                    _fmt(median([r.rss_mb for r in runs]), 1),
                    _fmt(median(pair_ratios(data, s.name, _rps))) if broker == "ours" else "",
                    _fmt(median(pair_ratios(data, s.name, _p99))) if broker == "ours" else "",
                    _fmt(median(pair_ratios(data, s.name, _cpu))) if broker == "ours" else "",
                ]
            )
    lines += _table(
        [
            "Scenario",
            "Broker",
            "req/s",
            "p50 ms",
            "p99 ms",
            "max ms",
            "CPU ms/1k req",
            "busy",
            "RSS MB",
            "req/s ratio",
            "p99 ratio",
            "CPU ratio",
        ],
        rows,
    )
    problems = [
        f"{r.broker} {r.scenario}: {r.lost} lost, {r.bad} bad, {'; '.join(r.errors)}"
        for rep in data.throughput + data.variant
        for r in rep
        if r.lost or r.bad or r.errors
    ]
    lines += ["", "Lost or wrong replies: " + ("; ".join(problems) if problems else "none."), ""]
    lines += [
        "### Where the broker's CPU goes",
        "",
        "The broker process has two busy threads: the Python thread that runs the broker, and",
        "ZeroMQ's I/O thread (TCP reads and writes, waking the Python thread). The I/O thread's",
        "share is the same kind of work for any pyzmq broker; only the Python thread's differs.",
        "ms of CPU per 1,000 requests, medians.",
        "",
    ]
    rows = []
    for s in data.scenarios:
        row = [s.name]
        for broker in ("ours", "majortomo"):
            runs = runs_of(data, s.name, broker)
            main = median([r.main_thread_ms_per_1000 for r in runs])
            total = median([r.cpu_ms_per_1000 for r in runs])
            row += [_fmt(main, 1), _fmt(total - main, 1)]
        ours_main = [r.main_thread_ms_per_1000 for r in runs_of(data, s.name, "ours")]
        theirs_main = [r.main_thread_ms_per_1000 for r in runs_of(data, s.name, "majortomo")]
        ratios = [a / b for a, b in zip(ours_main, theirs_main, strict=False) if b > 0]
        rows.append([*row, _fmt(median(ratios))])
    lines += _table(
        [
            "Scenario",
            "ours: Python thread",
            "ours: I/O thread",
            "majortomo: Python thread",
            "majortomo: I/O thread",
            "Python-thread ratio",
        ],
        rows,
    )
    return [*lines, ""]


def _variant_section(data: RunData) -> list[str]:
    if not data.variant:
        return []
    name = data.variant[0][0].scenario if data.variant[0] else ""
    lines = [
        "## The same peers in majortomo's dialect, to both brokers",
        "",
        f"{name}, our broker spoken to in majortomo's dialect (leading empty frame, REQUEST",
        "0x02, FINAL 0x04 without a service frame) instead of RFC 18, run in the same",
        "repetitions; the majortomo row is the one from the main table.",
        "",
    ]
    variant_runs = [r for rep in data.variant for r in rep]
    main_ours = runs_of(data, name, "ours")
    theirs = runs_of(data, name, "majortomo")
    rows = []
    for label, runs in (
        ("ours, rfc18 framing", main_ours),
        ("ours, majortomo framing", variant_runs),
        ("majortomo", theirs),
    ):
        if runs:
            rows.append(
                [
                    label,
                    _fmt(median([r.rps for r in runs]), 0),
                    _fmt(median([r.p99_ms for r in runs])),
                    _fmt(median([r.cpu_ms_per_1000 for r in runs]), 1),
                ]
            )
    ratios = [
        v.cpu_ms_per_1000 / t.cpu_ms_per_1000
        for v, t in zip(variant_runs, theirs, strict=False)
        if t.cpu_ms_per_1000 > 0
    ]
    lines += _table(["Peers", "req/s", "p99 ms", "CPU ms/1k req"], rows)
    lines += [
        "",
        f"CPU ratio ours (majortomo framing)/majortomo, per repetition: {_ratios(ratios)};"
        f" median {_fmt(median(ratios))}.",
        "",
    ]
    return lines


def _split_row(label: str, broker: str, runs: list[ThroughputResult]) -> list[str]:
    total = median([r.cpu_ms_per_1000 for r in runs])
    main = median([r.main_thread_ms_per_1000 for r in runs])
    return [
        label,
        broker,
        _fmt(median([r.rps for r in runs]), 0),
        _fmt(median([r.p50_ms for r in runs])),
        _fmt(median([r.p99_ms for r in runs])),
        _fmt(total, 1),
        _fmt(main, 1),
        _fmt(total - main, 1),
    ]


def _c_section(data: RunData) -> list[str]:
    names = c_scenarios(data)
    if not names:
        return []
    lines = [
        "## Against the zguide's C broker (MDP/0.1)",
        "",
        "The zguide's `mdbroker.c` speaks only MDP/0.1 (RFC 7), so here both brokers are",
        "spoken to in MDP/0.1 by the same raw-frame peers (dialect `rfc7` in",
        "`benchmarks/loadgen.py`), back to back in each repetition, the order alternating.",
        f"Binary: `{data.c_broker_path}`, built from the zguide's `examples/C/mdbroker.c` as",
        "[README.md](README.md#the-c-broker) describes (nothing of it is in this repository).",
        "It handles one message per `zmq_poll` and keeps its state in czmq hashes and lists.",
        "CPU split as in the main table: the broker's own thread, and ZeroMQ's I/O thread.",
        "",
    ]
    rows = []
    for name in names:
        pairs = c_pairs(data, name)
        rows.append(_split_row(name, "ours (MDP/0.1)", [a for a, _ in pairs]))
        rows.append(_split_row("", "zguide C broker", [b for _, b in pairs]))
    lines += _table(
        [
            "Scenario",
            "Broker",
            "req/s",
            "p50 ms",
            "p99 ms",
            "CPU ms/1k req",
            "broker thread",
            "I/O thread",
        ],
        rows,
    )
    lines += ["", "ours/C per repetition:", ""]
    lines += _table(
        ["Scenario", "CPU ratio", "req/s ratio", "p99 ratio", "broker-thread CPU ratio"],
        [
            [
                name,
                _ratios(_ratio_list(c_pairs(data, name), _cpu)),
                _ratios(_ratio_list(c_pairs(data, name), _rps)),
                _ratios(_ratio_list(c_pairs(data, name), _p99)),
                _ratios(_ratio_list(c_pairs(data, name), _main)),
            ]
            for name in names
        ],
    )
    return [*lines, ""]


def _main(r: ThroughputResult) -> float:
    return r.main_thread_ms_per_1000


def _transport_section(data: RunData) -> list[str]:
    names = [s.name for s in data.scenarios if runs_of(data, s.name, "proxy")]
    if not names:
        return []
    lines = [
        "## Transport ceiling",
        "",
        "`python -m benchmarks.proxy`: a ROUTER for the clients and a DEALER for the workers",
        "joined by `zmq.proxy` (libzmq's C loop), with the same peer processes, message sizes",
        "and frame counts, and no MDP at all: no parsing, no queues, no heartbeats, requests",
        "dealt round-robin. Its CPU per request is what moving the bytes through one process",
        "costs; what a broker spends above it is its routing. It runs in the same group as",
        "ours and majortomo (first or last). Ratios: median of per-repetition ratios.",
        "",
    ]
    rows = []
    for name in names:
        rows.append(_split_row(name, "zmq.proxy", runs_of(data, name, "proxy")))
        for broker, side in (("ours", OURS), ("majortomo", MAJORTOMO)):
            runs = runs_of(data, name, broker)
            ratios = pair_ratios(data, name, _cpu, side, PROXY)
            rows.append(
                [*_split_row("", broker, runs), f"{_fmt(median(ratios))} ({_ratios(ratios)})"]
            )
        rows[-3].append("")
    lines += _table(
        [
            "Scenario",
            "Process",
            "req/s",
            "p50 ms",
            "p99 ms",
            "CPU ms/1k req",
            "main thread",
            "I/O thread",
            "CPU / proxy's (per repetition)",
        ],
        rows,
    )
    return [*lines, ""]


def _curve_section(data: RunData) -> list[str]:
    costs = curve_costs(data)
    if not costs:
        return []
    lines = [
        "## Cost of CURVE",
        "",
        "Our broker with CURVE (issue 6) next to the same broker without, in the same",
        "repetitions: in each scenario majortomo, ours and ours with CURVE run back to back (the",
        "order reversed every other repetition), each against a fresh broker. With CURVE the",
        "broker gets `--curve-secret-key DIR/broker.key_secret --allow-clients DIR/clients",
        "--allow-workers DIR/workers` with fresh key pairs (one for the broker, one shared by the",
        "clients, one shared by the workers; made with `mdp.security.generate_key_pair` and",
        "allowed the way `mdp-keys allow` does), and every client and worker socket gets",
        "`mdp.security.curve_client_options(own secret key, broker public key)` before it",
        "connects: every message is encrypted both ways and goes through the broker's role check.",
        "Same peers, RFC 18 framing and `--log-level WARNING` as the runs without CURVE; the",
        '"INFO log" row runs at the broker\'s default level, INFO, which also writes an audit',
        "record per batch of admitted requests (to a file). CPU is the whole broker process:",
        "the Python thread (role check, audit records), ZeroMQ's I/O thread (encryption) and the",
        "ZAP handler thread (handshakes; it re-reads the allow-lists every second). The peers",
        "encrypt too, on the same 2 cores, so req/s falls by more than the broker's own cost;",
        "CPU per request is the broker's cost alone. Ratios are CURVE/plain per repetition,",
        "then the median; CPU added = median of per-repetition differences, in µs per request.",
        "",
    ]
    rows = []
    for s in data.scenarios:
        mine = [c for c in costs if c.scenario == s.name]
        if not mine:
            continue
        plain = runs_of(data, s.name, "ours")
        rows.append(
            [
                s.name,
                "ours, no CURVE",
                _fmt(median([r.rps for r in plain]), 0),
                _fmt(median([r.p50_ms for r in plain])),
                _fmt(median([r.p99_ms for r in plain])),
                _fmt(median([r.cpu_ms_per_1000 for r in plain]), 1),
                _fmt(median([r.main_thread_ms_per_1000 for r in plain]), 1),
                "",
                "",
                "",
                "",
            ]
        )
        rows += [
            [
                "",
                f"ours, {CURVE_CONFIGS[c.security]}",
                _fmt(c.rps, 0),
                _fmt(c.p50_ms),
                _fmt(c.p99_ms),
                _fmt(c.cpu_ms_per_1000, 1),
                _fmt(c.main_thread_ms_per_1000, 1),
                _fmt(c.rps_ratio),
                _fmt(c.p99_ratio),
                _fmt(c.cpu_ratio),
                f"{c.cpu_added_us_per_request:+.1f}",
            ]
            for c in mine
        ]
    lines += _table(
        [
            "Scenario",
            "Broker",
            "req/s",
            "p50 ms",
            "p99 ms",
            "CPU ms/1k req",
            "of which Python thread",
            "req/s ratio",
            "p99 ratio",
            "CPU ratio",
            "CPU added µs/req",
        ],
        rows,
    )
    lines += ["", "Per repetition, CURVE/plain:", ""]
    lines += _table(
        ["Scenario", "Configuration", "req/s ratio", "p99 ratio", "CPU ratio"],
        [
            [
                c.scenario,
                CURVE_CONFIGS[c.security],
                _ratios(c.rps_ratios),
                _ratios(c.p99_ratios),
                _ratios(c.cpu_ratios),
            ]
            for c in costs
        ],
    )
    return [*lines, ""]


def _command_section(data: RunData) -> list[str]:
    lines = ["## Command scenario: `true` through broker + `mdp-worker --service os`", ""]
    if not data.command:
        return [*lines, "Not measured.", ""]
    lines += [
        "Ceiling: one process spawning `true` with asyncio (`create_subprocess_exec`, three",
        "pipes, `communicate()`), N at a time. Through the broker: our broker, one",
        "`mdp-worker --service os --concurrency N --log-level warning`, one raw-frame client with",
        "N requests in flight, each body `{command_name: true, parameters: []}` in msgpack;",
        "every FINAL must say `status: ok`. The target is about N = 8; 1, 4 and 16 show how",
        f"it scales. {data.command_count:,} commands per measurement, ceiling and broker",
        "alternating.",
        "",
        "Where the time goes, CPU ms per 1,000 commands: for the ceiling, its own process",
        "(asyncio, fork/exec, pipes) and the `true` processes; through the broker, the broker,",
        "the worker process alone (every thread: asyncio loop, spawning, MDP), the `true`",
        "processes it ran, its watchdog process (told of every command's process group, spec",
        "§14.4), and the client (getrusage, so a few ms of granularity).",
        "",
    ]
    rows = []
    per_rep = max(1, len({c.concurrency for c in data.command}))
    for i, (c, k) in enumerate(zip(data.command, data.ceiling, strict=False)):
        rows.append(
            [
                str(i // per_rep + 1),
                str(c.concurrency),
                _fmt(k.rate, 0),
                _fmt(c.rate, 0),
                f"{c.rate / k.rate:.0%}",
                _fmt(c.p50_ms),
                _fmt(c.p99_ms),
                _fmt(k.own_cpu_ms_per_1000, 0),
                _fmt(k.children_cpu_ms_per_1000, 0),
                _fmt(c.broker_cpu_ms_per_1000, 0),
                _fmt(c.worker_own_cpu_ms_per_1000, 0),
                _fmt(c.worker_cpu_ms_per_1000 - c.worker_own_cpu_ms_per_1000, 0),
                _fmt(c.worker_helpers_cpu_ms_per_1000, 0),
                _fmt(c.client_cpu_ms_per_1000, 0),
                f"{c.failed + c.lost}" + (f" ({'; '.join(c.errors)})" if c.errors else ""),
            ]
        )
    lines += _table(
        [
            "Rep",
            "N",
            "ceiling /s",
            "broker+worker /s",
            "share",
            "p50 ms",
            "p99 ms",
            "ceiling: own CPU",
            "ceiling: true",
            "broker CPU",
            "worker CPU",
            "worker: true",
            "worker: watchdog",
            "client CPU",
            "failed/lost",
        ],
        rows,
    )
    summary = []
    for n in sorted({c.concurrency for c in data.command}):
        pairs = [
            (c, k) for c, k in zip(data.command, data.ceiling, strict=False) if c.concurrency == n
        ]
        summary.append(
            [
                str(n),
                f"{median([c.rate / k.rate for c, k in pairs]):.0%}",
                _fmt(median([k.own_cpu_ms_per_1000 for _, k in pairs]), 0),
                _fmt(median([c.worker_own_cpu_ms_per_1000 for c, _ in pairs]), 0),
                _fmt(median([c.worker_helpers_cpu_ms_per_1000 for c, _ in pairs]), 0),
                _fmt(median([c.broker_cpu_ms_per_1000 for c, _ in pairs]), 0),
                _fmt(median([c.client_cpu_ms_per_1000 for c, _ in pairs]), 0),
            ]
        )
    lines += ["", "Medians per concurrency:", ""]
    lines += _table(
        [
            "N",
            "share of the ceiling",
            "ceiling process CPU",
            "worker process CPU",
            "watchdog CPU",
            "broker CPU",
            "client CPU",
        ],
        summary,
    )
    return [*lines, "", *_profile_section(data)]


def _profile_section(data: RunData) -> list[str]:
    profiles = [p for p in data.command_profiles if p.get("samples")]
    if not profiles:
        return []
    lines = [
        "### Where the worker's time goes",
        "",
        "One extra run per concurrency with the worker sampled by py-spy (500 Hz, its event",
        "loop only: no start-up, and the watchdog and the commands apart). Each sample is",
        "put in the first category found from the innermost frame outwards",
        "(`benchmarks.command.PROFILE_CATEGORIES`). µs per command = the share times the",
        "worker's own CPU per command at that concurrency (median of the runs above, which were",
        "not sampled).",
        "",
    ]
    names = [label for label, _ in PROFILE_CATEGORIES] + [OTHER_CATEGORY]
    own = {
        n: median([c.worker_own_cpu_ms_per_1000 for c in data.command if c.concurrency == n])
        for n in {p["concurrency"] for p in profiles}
    }
    rows = []
    for name in names:
        row = [name]
        for p in profiles:
            share = p["shares"].get(name, 0.0)
            row.append(f"{share:.0%} ({_fmt(share * own[p['concurrency']], 0)} µs)")
        rows.append(row)
    rows.append(["samples"] + [str(p["samples"]) for p in profiles])
    lines += _table(["", *(f"N = {p['concurrency']}" for p in profiles)], rows)
    return [*lines, ""]


def _scale_section(data: RunData) -> list[str]:
    lines = ["## Scale", ""]
    if data.idle:
        lines += [
            f"### {data.idle_workers:,} idle workers",
            "",
            "Each worker heartbeats every 2.5 s (both brokers' default), staggered; broker CPU is",
            "read over the window after a 2 s settling pause. Registered = workers the broker",
            "heartbeated during the window.",
            "",
        ]
        rows = []
        for broker in ("ours", "majortomo"):
            runs = [r for r in data.idle if r.broker == broker]
            if runs:
                rows.append(
                    [
                        broker,
                        f"{median([r.core_percent for r in runs]):.2f}%",
                        ", ".join(f"{r.core_percent:.2f}%" for r in runs),
                        f"{min(r.registered for r in runs):,}",
                        str(sum(r.disconnects for r in runs)),
                        _fmt(median([r.rss_mb for r in runs]), 1),
                        f"{median([r.window for r in runs]):.1f}",
                    ]
                )
        lines += _table(
            [
                "Broker",
                "CPU, % of a core",
                "per repetition",
                "registered (min)",
                "DISCONNECTs",
                "RSS MB",
                "window s",
            ],
            rows,
        )
        lines.append("")
    if data.queue:
        lines += [
            f"### {data.queue_requests:,} requests queued with no worker, then drained",
            "",
            "One client sends every request (64 B) down one DEALER socket; when the broker's CPU",
            "goes quiet its RSS is read; then 4 echo workers connect and the client counts FINALs",
            "by sequence number. Drain = from the workers' start to the last FINAL. Ours runs",
            "with `--max-queue 200000 --request-ttl 600` (the defaults, 10,000 and 60 s, would",
            "refuse or expire part of this load by design); majortomo has no limit on either.",
            "",
        ]
        rows = []
        for i, r in enumerate(data.queue):
            rows.append(
                [
                    str(i // 2 + 1),
                    r.broker,
                    f"{r.enqueue_s:.1f}",
                    _fmt(r.rss_queued_mb, 1),
                    _fmt(max(r.peak_rss_mb, r.rss_queued_mb), 1),
                    f"{r.received:,}",
                    str(r.missing),
                    str(r.duplicates),
                    f"{r.drain_s:.1f}",
                    _fmt(r.drain_rps, 0),
                    "; ".join(r.errors) or "",
                ]
            )
        lines += _table(
            [
                "Rep",
                "Broker",
                "enqueue s",
                "RSS queued MB",
                "peak RSS MB",
                "FINALs",
                "missing",
                "dup",
                "drain s",
                "drain req/s",
                "notes",
            ],
            rows,
        )
        lines.append("")
    return lines


def _runs_section(data: RunData) -> list[str]:
    lines = [
        "## Every throughput run",
        "",
        "In the order they ran (rep, scenario, broker).",
        "",
    ]
    rows = []
    for reps in (data.throughput, data.variant, data.c_broker):
        for rep_no, rep in enumerate(reps, 1):
            rows += [_run_row(rep_no, r) for r in rep]
    lines += _table(
        [
            "Rep",
            "Scenario",
            "Broker",
            "requests",
            "s",
            "req/s",
            "p50 ms",
            "p99 ms",
            "max ms",
            "CPU ms/1k",
            "per worker",
        ],
        rows,
    )
    return [*lines, ""]


def _run_row(rep_no: int, r: ThroughputResult) -> list[str]:
    return [
        str(rep_no),
        r.scenario,
        f"{r.broker} ({r.dialect}"
        + (f", {CURVE_CONFIGS.get(r.security, r.security)})" if r.security != "plain" else ")"),
        f"{r.completed:,}",
        f"{r.elapsed:.2f}",
        _fmt(r.rps, 0),
        _fmt(r.p50_ms),
        _fmt(r.p99_ms),
        _fmt(r.max_ms),
        _fmt(r.cpu_ms_per_1000, 1),
        "/".join(str(n) for n in r.worker_handled),
    ]


# --------------------------------------------------------------------------------------------
# Chart


def chart(data: RunData, path: Path) -> None:
    """A grouped bar chart of the ours/majortomo ratios per scenario (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s.name for s in data.scenarios]
    series = [
        ("broker CPU per request", _cpu, "#1f77b4"),
        ("requests/s", _rps, "#2ca02c"),
        ("p99 latency", _p99, "#d62728"),
    ]
    fig, ax = plt.subplots(figsize=(11, 5.5), dpi=110)
    width = 0.26
    heights: list[float] = []
    for i, (label, metric, color) in enumerate(series):
        values = [median(pair_ratios(data, n, metric)) for n in names]
        heights += [v for v in values if not math.isnan(v)]
        xs = [j + (i - 1) * width for j in range(len(names))]
        bars = ax.bar(xs, values, width, label=label, color=color)
        for bar, value in zip(bars, values, strict=True):
            if not math.isnan(value):
                ax.annotate(
                    f"{value:.2f}",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                )
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.axhline(CPU_RATIO_TARGET, color="#1f77b4", linestyle="--", linewidth=0.8)
    ax.axhline(RPS_RATIO_TARGET, color="#2ca02c", linestyle="--", linewidth=0.8)
    ax.set_xticks(range(len(names)), names, rotation=15, ha="right", fontsize=8)
    ax.set_ylabel("ours / majortomo (median of per-repetition ratios)")
    ax.set_title(
        "Our MDP broker relative to majortomo: below 1 is better for CPU and p99, above 1 for "
        f"req/s\n(dashed: targets CPU <= {CPU_RATIO_TARGET} (64 B), req/s >= {RPS_RATIO_TARGET})",
        fontsize=10,
    )
    top = max([RPS_RATIO_TARGET, *heights])
    ax.set_ylim(0, top * 1.25)
    ax.legend(fontsize=8, loc="upper center", ncol=3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
