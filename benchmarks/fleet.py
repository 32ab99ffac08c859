"""`python -m benchmarks.fleet`: the cost of fleet targeting (issue 14) on our broker.

1. Fan-out: `--names` named workers (hosted `--per-process` to a process, each a real
   `CommandService` with its own name, so `shell@NAME` is served exactly as by `mdp-worker`)
   and one broker; `mdp-client --all` runs one `true` on every one of them, `--repeat` times.
   Reported: the client's wall time to collect every answer (its own `elapsed_ms`, from first
   send to last result; process start not included) and the broker's CPU per fan-out (utime +
   stime from /proc, before and after).
2. Idle: `--idle` named workers registered with their addressed service (two connections each:
   `shell` and `shell@NAME`), simulated by raw DEALER sockets that only heartbeat, so the
   broker carries 2 x N connections. Reported: the broker's CPU share of one core over
   `--idle-seconds` of doing nothing but heartbeats, and the time of one `mmi.workers` answer.

    python -m benchmarks.fleet                              # 100 names, 1,000 idle workers
    python -m benchmarks.fleet --names 20 --idle 200 --repeat 3   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zmq

from mdp import mmi

HOST = """
import asyncio, sys
from mdp.worker import WorkerOptions, serve
from services.command import CommandService, CommandSettings
from services.execution import Limits

endpoint, first, count, hb = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])

async def main():
    jobs = []
    for i in range(first, first + count):
        name = f"w{i:04d}"
        svc = CommandService("shell", CommandSettings(name=name))
        options = WorkerOptions(broker=endpoint, name=name, heartbeat_interval=hb)
        jobs.append(serve([svc.service()], options, 1, control=[svc.control_service()],
                          handle_signals=False))
    await asyncio.gather(*jobs)

asyncio.run(main())
"""


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bin_path(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def start_broker(endpoint: str, hb_ms: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            bin_path("mdp-broker"),
            "--bind",
            endpoint,
            "--heartbeat-ms",
            str(hb_ms),
            "--log-level",
            "WARNING",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def ask_workers(endpoint: str) -> tuple[list[mmi.WorkerInfo], float]:
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(endpoint)
    start = time.perf_counter()
    sock.send_multipart([b"MDPC02", b"\x01", mmi.WORKERS, b""])
    if not sock.poll(10_000):
        raise RuntimeError("no mmi.workers answer")
    frames = sock.recv_multipart()
    took = time.perf_counter() - start
    sock.close(linger=0)
    return mmi.decode_workers(frames[3:]), took


def wait_names(endpoint: str, count: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            found, _ = ask_workers(endpoint)
        except RuntimeError:
            found = []
        if sum(1 for w in found if w.connections >= 2) >= count:
            return
        time.sleep(0.2)
    raise RuntimeError(f"only {len(found)} of {count} workers registered")


def fan_out(args: argparse.Namespace) -> dict[str, object]:
    tmp = Path(tempfile.mkdtemp(prefix="mdp-fleet-bench-"))
    endpoint = f"ipc://{tmp}/broker"
    broker = start_broker(endpoint, 2500)
    hosts = []
    try:
        for first in range(0, args.names, args.per_process):
            count = min(args.per_process, args.names - first)
            hosts.append(
                subprocess.Popen(
                    [sys.executable, "-c", HOST, endpoint, str(first), str(count), "2.5"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        wait_names(endpoint, args.names)
        commands = tmp / "cmd.json"
        commands.write_text(json.dumps({"command_type": "shell", "command_name": "true"}))
        collect_ms, cpu_ms = [], []
        for _ in range(args.repeat):
            before = cpu_seconds(broker.pid)
            run = subprocess.run(
                [
                    bin_path("mdp-client"),
                    "-a",
                    endpoint,
                    "--all",
                    "--parallel",
                    str(min(args.names, 1000)),
                    "--timeout",
                    "30",
                    "--json",
                    "-f",
                    str(commands),
                ],
                capture_output=True,
                text=True,
                timeout=300,
            )
            after = cpu_seconds(broker.pid)
            document = json.loads(run.stdout)
            ok = document["summary"]["by_status"].get("ok", 0)
            if ok != args.names:
                raise RuntimeError(f"{ok} of {args.names} ok: {run.stderr[-500:]}")
            collect_ms.append(document["summary"]["elapsed_ms"])
            cpu_ms.append((after - before) * 1000)
        return {
            "names": args.names,
            "processes": len(hosts),
            "collect_ms": collect_ms,
            "collect_ms_median": statistics.median(collect_ms),
            "broker_cpu_ms_per_fanout": cpu_ms,
            "broker_cpu_ms_median": statistics.median(cpu_ms),
        }
    finally:
        for proc in hosts:
            proc.terminate()
        for proc in hosts:
            proc.wait(timeout=30)
        broker.terminate()
        broker.wait(timeout=30)


def idle(args: argparse.Namespace) -> dict[str, object]:
    tmp = Path(tempfile.mkdtemp(prefix="mdp-fleet-idle-"))
    endpoint = f"ipc://{tmp}/broker"
    broker = start_broker(endpoint, 2500)
    ctx = zmq.Context()
    ctx.set(zmq.MAX_SOCKETS, 2 * args.idle + 64)  # the default (1023) is below 2,000
    sockets = []
    try:
        for i in range(args.idle):
            name = f"i{i:05d}"
            for service in (b"shell", f"shell@{name}".encode()):
                sock = ctx.socket(zmq.DEALER)
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.ROUTING_ID, mmi.worker_identity(name, "bench"))
                sock.connect(endpoint)
                sock.send_multipart([b"MDPW02", b"\x01", service])
                sockets.append(sock)
        wait_names(endpoint, args.idle)
        poller = zmq.Poller()
        for sock in sockets:
            poller.register(sock, zmq.POLLIN)
        end = time.monotonic() + 1.0  # settle
        heartbeat = [b"MDPW02", b"\x05"]

        def serve_until(deadline: float) -> None:
            next_beat = time.monotonic()
            while time.monotonic() < deadline:
                if time.monotonic() >= next_beat:
                    for sock in sockets:
                        sock.send_multipart(heartbeat)
                    next_beat += 2.5
                for sock, _ in poller.poll(200):
                    while sock.poll(0):
                        sock.recv_multipart()

        serve_until(end)
        before, start = cpu_seconds(broker.pid), time.monotonic()
        serve_until(start + args.idle_seconds)
        share = (cpu_seconds(broker.pid) - before) / (time.monotonic() - start)
        answers = [ask_workers(endpoint)[1] * 1000 for _ in range(3)]
        return {
            "idle_workers": args.idle,
            "connections": len(sockets),
            "seconds": args.idle_seconds,
            "broker_cpu_share_of_a_core": round(share, 4),
            "mmi_workers_ms": [round(ms, 2) for ms in answers],
        }
    finally:
        broker.kill()  # SIGKILL: its graceful stop would say DISCONNECT to 2,000 peers first
        broker.wait(timeout=30)
        for sock in sockets:
            sock.close(linger=0)
        ctx.term()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--names", type=int, default=100)
    parser.add_argument("--per-process", type=int, default=25)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--idle", type=int, default=1000)
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    args = parser.parse_args()
    print(json.dumps({"load_avg": os.getloadavg(), "fan_out": fan_out(args)}, indent=2))
    print(json.dumps({"idle": idle(args)}, indent=2))


if __name__ == "__main__":
    main()
