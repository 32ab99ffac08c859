"""The command scenario: `true` through our broker and `mdp-worker --service os`, against the
local ceiling of spawning `true` from asyncio, measured in the same run.

- Ceiling (`run_ceiling`): one process runs `asyncio.create_subprocess_exec("true")` with stdin,
  stdout and stderr as pipes and awaits `communicate()`, N at a time (default 8), for a
  request count or a wall-time bound. Commands per second is the most a worker spawning the
  same way could do. Its own CPU and its children's (`true`) are read with getrusage.
- Through the broker (`run_command`): our broker, one `mdp-worker --service os --concurrency N
  --log-level warning`, and one client process with N DEALER sockets (N requests in flight),
  raw RFC 18 frames, each body the msgpack map `{"command_name": "true", "parameters": []}`
  (services/bodies.py). PARTIALs are skipped; each FINAL must decode to `status: ok`.
  Commands per second, latency, and where the CPU goes per 1,000 commands: the broker, the
  worker's own threads, the `true` processes it ran, and the client.

`python -m benchmarks.probe --command --concurrency 4 --py-spy /tmp/worker.txt` runs one
measurement and samples the worker with py-spy (collapsed stacks), to see where its time goes.

majortomo's broker is not measured here: `mdp-worker` speaks RFC 18, which it does not.
"""

from __future__ import annotations

import array
import asyncio
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import msgpack
import psutil
import zmq
from zmq.backend import zmq_poll

from benchmarks.brokers import BrokerProcess
from benchmarks.loadgen import (
    DIALECTS,
    NOBLOCK,
    POLLIN,
    dealer,
    mp_context,
    percentile,
    recv_frames,
    send_frames,
    stop_processes,
)

CONCURRENCY = 8
SERVICE = b"os"
BODY = msgpack.packb({"command_name": "true", "parameters": []}, use_bin_type=True)
REPLY_TIMEOUT_MS = 30_000
WORKER_STOP_GRACE = 5.0


# --------------------------------------------------------------------------------------------
# The local ceiling


async def _spawn_true(count: int, concurrency: int, deadline: float) -> int:
    true = shutil.which("true") or "/bin/true"
    done = 0

    async def runner() -> None:
        nonlocal done
        while done < count and time.monotonic() < deadline:
            done += 1  # claimed before the await, so runners never overshoot `count`
            proc = await asyncio.create_subprocess_exec(
                true,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            await proc.communicate()

    await asyncio.gather(*(runner() for _ in range(concurrency)))
    return done


def _rusage_cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def ceiling_process(count: int, concurrency: int, max_seconds: float, results: Any) -> None:
    """Spawn `true` `count` times, `concurrency` at a time.

    Reports (count, seconds, own CPU seconds, children's CPU seconds).
    """
    asyncio.run(_spawn_true(concurrency, concurrency, time.monotonic() + 10))  # warm-up
    own0 = _rusage_cpu(resource.RUSAGE_SELF)
    children0 = _rusage_cpu(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    done = asyncio.run(_spawn_true(count, concurrency, t0 + max_seconds))
    elapsed = time.monotonic() - t0
    own = _rusage_cpu(resource.RUSAGE_SELF) - own0
    results.put((done, elapsed, own, _rusage_cpu(resource.RUSAGE_CHILDREN) - children0))


@dataclass(slots=True)
class CeilingResult:
    """Local asyncio spawns of `true` per second."""

    completed: int
    elapsed: float
    rate: float
    concurrency: int = CONCURRENCY
    own_cpu_ms_per_1000: float = float("nan")
    """The spawning process's CPU per 1,000 spawns (getrusage, 1 ms or coarser ticks)."""
    children_cpu_ms_per_1000: float = float("nan")
    """The `true` processes' CPU per 1,000 spawns."""


def run_ceiling(count: int, max_seconds: float, concurrency: int = CONCURRENCY) -> CeilingResult:
    """Measure the local ceiling in a fresh child process."""
    ctx = mp_context()
    results = ctx.Queue()
    process = ctx.Process(
        target=ceiling_process, args=(count, concurrency, max_seconds, results), name="ceiling"
    )
    try:
        process.start()
        done, elapsed, own, children = results.get(timeout=max_seconds + 60)
    finally:
        stop_processes([process])
    per = 1e6 / done if done else float("nan")
    return CeilingResult(done, elapsed, done / elapsed, concurrency, own * per, children * per)


# --------------------------------------------------------------------------------------------
# Through the broker and mdp-worker


@dataclass(slots=True)
class CommandClientResult:
    """What the command client measured."""

    latencies_ns: bytes = b""
    completed: int = 0
    failed: int = 0
    partials: int = 0
    lost: int = 0
    t_start: float = 0.0
    t_end: float = 0.0
    cpu_s: float = 0.0
    """The client process's own CPU over the timed phase."""
    error: str = ""


def command_client(
    endpoint: str,
    count: int,
    max_seconds: float,
    barrier: threading.Barrier,
    results: Any,
    concurrency: int = CONCURRENCY,
) -> None:
    """`concurrency` synchronous DEALER sockets running `true` through the "os" service."""
    dialect = DIALECTS["rfc18"]
    request = (*dialect.client_head, SERVICE, BODY)
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    socks = [dealer(context, endpoint, REPLY_TIMEOUT_MS) for _ in range(concurrency)]
    result = CommandClientResult()
    latencies = array.array("q")
    clock = time.perf_counter_ns
    try:
        for sock in socks:  # warm-up: one command per socket, in parallel
            send_frames(sock, request)
        for sock in socks:
            while recv_frames(sock)[dialect.reply_command] != dialect.reply_final:
                pass
        barrier.wait(timeout=60)
        cpu0 = _rusage_cpu(resource.RUSAGE_SELF)
        result.t_start = time.monotonic()
        deadline = result.t_start + max_seconds
        sent_at: dict[Any, int] = {}
        items = [(sock, POLLIN) for sock in socks[:count]]
        for sock, _ in items:
            sent_at[sock] = clock()
            send_frames(sock, request)
        issued = len(items)
        while items:
            events = zmq_poll(items, REPLY_TIMEOUT_MS)
            if not events:
                result.lost += len(items)
                break
            for sock, _ in events:
                reply = recv_frames(sock, NOBLOCK)
                if reply[dialect.reply_command] != dialect.reply_final:
                    result.partials += 1
                    continue
                latencies.append(clock() - sent_at[sock])
                status = msgpack.unpackb(reply[dialect.reply_body]).get("status")
                if status != "ok":
                    result.failed += 1
                if issued < count and time.monotonic() < deadline:
                    sent_at[sock] = clock()
                    send_frames(sock, request)
                    issued += 1
                else:
                    items.remove((sock, POLLIN))
        result.t_end = time.monotonic()
        result.cpu_s = _rusage_cpu(resource.RUSAGE_SELF) - cpu0
    except (zmq.ZMQError, threading.BrokenBarrierError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        result.completed = len(latencies)
        result.latencies_ns = latencies.tobytes()
        for sock in socks:
            sock.close(linger=0)
        context.term()
        results.put(result)


def worker_command(endpoint: str, concurrency: int = CONCURRENCY) -> list[str]:
    """The `mdp-worker` command line for the scenario."""
    script = Path(sys.executable).with_name("mdp-worker")
    executable = str(script) if script.exists() else (shutil.which("mdp-worker") or "mdp-worker")
    return [
        executable,
        "--service",
        "os",
        "--concurrency",
        str(concurrency),
        "--broker",
        endpoint,
        "--log-level",
        "warning",
        # Benchmark machines often run everything as root; `true` as root is what is meant.
        *(["--allow-root"] if os.geteuid() == 0 else []),
    ]


@dataclass(slots=True)
class CommandResult:
    """`true` through broker + worker."""

    completed: int
    failed: int
    lost: int
    partials: int
    elapsed: float
    rate: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    broker_cpu_ms_per_1000: float
    worker_cpu_ms_per_1000: float
    """The worker with the `true` processes it ran."""
    errors: list[str] = field(default_factory=list)
    concurrency: int = CONCURRENCY
    worker_own_cpu_ms_per_1000: float = float("nan")
    """The worker process alone (every thread), without its children."""
    worker_helpers_cpu_ms_per_1000: float = float("nan")
    """The worker's long-lived children (its watchdog process), not in worker_cpu."""
    client_cpu_ms_per_1000: float = float("nan")


def run_command(
    broker: BrokerProcess,
    count: int,
    max_seconds: float,
    concurrency: int = CONCURRENCY,
    py_spy: str | None = None,
    pythonpath: str | None = None,
) -> CommandResult:
    """Start `mdp-worker --service os`, run `count` commands through `broker`, stop it.

    `py_spy`: sample the worker with py-spy into this file (collapsed stacks). `pythonpath`:
    put first on the worker's PYTHONPATH (A/B-test a patched copy of mdp/).
    """
    errors: list[str] = []
    env = None
    if pythonpath:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [pythonpath, env.get("PYTHONPATH")]))
    with tempfile.TemporaryFile() as stderr_file, tempfile.TemporaryDirectory() as workdir:
        worker = subprocess.Popen(
            worker_command(broker.endpoint, concurrency),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr_file,
            env=env,
            # Not the checkout: the worker starts its watchdog with `python -m`, which puts the
            # working directory first on sys.path (ahead of `pythonpath`).
            cwd=workdir,
        )
        spy = _start_py_spy(worker.pid, py_spy) if py_spy else None
        try:
            result, t0, cpu, worker_cpu, worker_own, helpers = _drive(
                broker, worker, count, max_seconds, errors, concurrency
            )
        finally:
            if spy is not None:
                spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
                try:
                    spy.wait(30)
                except subprocess.TimeoutExpired:
                    spy.kill()
                    spy.wait(5)
            worker.terminate()
            try:
                worker.wait(timeout=WORKER_STOP_GRACE)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait(timeout=5)
        if worker.returncode not in (0, -15):
            stderr_file.seek(0)
            stderr = stderr_file.read().decode(errors="replace")
            errors.append(f"mdp-worker exited {worker.returncode}: {stderr[-500:]}")
    if result.error:
        errors.append(result.error)
    ordered = sorted(array.array("q", result.latencies_ns))
    elapsed = max(result.t_end - t0, 1e-9)
    n = result.completed
    per = 1e6 / n if n else float("nan")
    return CommandResult(
        completed=n,
        failed=result.failed,
        lost=result.lost,
        partials=result.partials,
        elapsed=elapsed,
        rate=n / elapsed,
        p50_ms=percentile(ordered, 0.5) / 1e6,
        p99_ms=percentile(ordered, 0.99) / 1e6,
        max_ms=(ordered[-1] if ordered else 0) / 1e6,
        broker_cpu_ms_per_1000=cpu * per,
        worker_cpu_ms_per_1000=worker_cpu * per,
        errors=errors,
        concurrency=concurrency,
        worker_own_cpu_ms_per_1000=worker_own * per,
        worker_helpers_cpu_ms_per_1000=helpers * per,
        client_cpu_ms_per_1000=result.cpu_s * per,
    )


def _drive(
    broker: BrokerProcess,
    worker: subprocess.Popen[bytes],
    count: int,
    max_seconds: float,
    errors: list[str],
    concurrency: int,
) -> tuple[CommandClientResult, float, float, float, float, float]:
    """Run the client against a started worker.

    Returns (result, start time, broker CPU, worker CPU with children, worker CPU alone, CPU
    of the worker's long-lived children: its watchdog).
    """
    ctx = mp_context()
    barrier = ctx.Barrier(2)
    results = ctx.Queue()
    worker_ps = psutil.Process(worker.pid)
    client = ctx.Process(
        target=command_client,
        args=(broker.endpoint, count, max_seconds, barrier, results, concurrency),
        name="command-client",
    )
    result = CommandClientResult()
    cpu = worker_cpu = worker_own = helpers = 0.0
    t0 = time.monotonic()
    try:
        client.start()
        try:
            barrier.wait(timeout=60)
        except threading.BrokenBarrierError:
            errors.append("the command client's warm-up did not finish")
        helpers0 = _helpers_cpu(worker_ps)
        broker0, (worker0, own0) = broker.cpu_seconds(), _worker_cpu(worker_ps)
        t0 = time.monotonic()
        result = results.get(timeout=max_seconds + REPLY_TIMEOUT_MS / 1000 + 30)
        cpu = broker.cpu_seconds() - broker0
        worker1, own1 = _worker_cpu(worker_ps)
        worker_cpu, worker_own = worker1 - worker0, own1 - own0
        helpers1 = _helpers_cpu(worker_ps)
        helpers = sum(helpers1.get(pid, cpu0) - cpu0 for pid, cpu0 in helpers0.items())
    except Exception as exc:  # queue.Empty: report what we have
        errors.append(f"command scenario incomplete: {type(exc).__name__}")
    finally:
        barrier.abort()
        stop_processes([client])
    return result, t0, cpu, worker_cpu, worker_own, helpers


def _worker_cpu(process: psutil.Process) -> tuple[float, float]:
    """(CPU of a process plus its reaped children (the commands it ran), of the process alone)."""
    times = process.cpu_times()
    own = float(times.user + times.system)
    return own + float(times.children_user + times.children_system), own


def _helpers_cpu(process: psutil.Process) -> dict[int, float]:
    """CPU so far of each child the worker has now: between commands, its watchdog. A child
    gone by the second reading counts 0 (no figure is better than a wrong one)."""
    out: dict[int, float] = {}
    for child in process.children():
        try:
            times = child.cpu_times()
        except psutil.Error:
            continue
        out[child.pid] = float(times.user + times.system)
    return out


def py_spy_path() -> str | None:
    """The py-spy executable (next to this interpreter, or on PATH), or None."""
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


# Where a worker sample goes: the first marker found from the innermost frame outwards decides.
PROFILE_CATEGORIES: Final[tuple[tuple[str, tuple[str, ...]], ...]] = (
    (
        "spawning the command (posix_spawn or Popen: pipes, fork/exec, reaping)",
        ("Popen.", "_posix_spawn", "_Spawned.", "_start"),
    ),
    ("telling the watchdog (+PGID/-PGID)", ("Watchdog.",)),
    (
        "following the child (pidfd, pipe readers, output, timers)",
        ("_Run.", "_Capture.", "run_process", "RunControl."),
    ),
    (
        "request and reply bodies (msgpack, pydantic)",
        ("parse_request", "BaseModel.", "pack", "unpack", "_Body.", "model_"),
    ),
    (
        "MDP messaging (socket calls, worker core and loop)",
        (
            "Worker.",
            "WorkerCore.",
            "_AsyncSocket.",
            "Socket.",
            "Request.",
            "_checked_body",
            "send_frames",
            "recv_bytes",
            "readable",
        ),
    ),
    ("the command service's own steps", ("CommandService.",)),
)
OTHER_CATEGORY: Final = "asyncio event loop and the rest"


def profile_categories(path: str) -> tuple[int, dict[str, float]]:
    """Share of the worker's samples per `PROFILE_CATEGORIES` entry, from py-spy's raw output.

    Only the worker process's samples inside its event loop count (not its start-up, not the
    watchdog or the commands, which `--subprocesses` also samples). Returns (samples, shares).
    """
    counts: dict[str, int] = {}
    total = 0
    for line in Path(path).read_text(errors="replace").splitlines():
        stack, _, number = line.rpartition(" ")
        frames = stack.split(";")
        if not number.isdigit() or not frames or "mdp-worker" not in frames[0]:
            continue
        if not any("_run_once" in frame for frame in frames):
            continue
        category = OTHER_CATEGORY
        for frame in reversed(frames):
            name = frame.split(" (", 1)[0]
            found = next(
                (label for label, marks in PROFILE_CATEGORIES if any(m in name for m in marks)),
                None,
            )
            if found is not None:
                category = found
                break
        counts[category] = counts.get(category, 0) + int(number)
        total += int(number)
    return total, {k: v / total for k, v in counts.items()} if total else {}


def _start_py_spy(pid: int, path: str) -> subprocess.Popen[bytes]:
    spy = subprocess.Popen(
        [
            *(py_spy_path() or "py-spy", "record", "--pid", str(pid), "--rate", "500"),
            "--subprocesses",
            *("--format", "raw", "--output", path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)  # let it attach before the load starts
    return spy
