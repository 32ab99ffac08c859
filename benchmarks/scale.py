"""Scale scenarios: many idle workers, and a deep queue with no worker that then drains.

Idle workers (`run_idle_workers`): host processes open one DEALER socket per worker, register
them all for one service, then each socket heartbeats every 2.5 s (staggered evenly over the
interval) and reads what the broker sends. After a settling pause the broker's CPU time is read
over a fixed window: CPU seconds / wall seconds = share of one core. A worker counts as
registered if the broker heartbeated it during the window (both brokers heartbeat only workers
they know).

Deep queue (`run_queue_drain`): one client sends every request down one DEALER socket (the
broker does not care how many requests a client identity has in flight) with no worker
registered; once the broker has read them all (its CPU goes quiet) its RSS is read. Then W echo
workers arrive and the client counts FINALs by sequence number until all came back or the time
bound passes: received, duplicates and missing are reported, and the time from the workers'
start to the last FINAL.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import zmq

from benchmarks.brokers import BrokerProcess
from benchmarks.loadgen import (
    DIALECTS,
    DISCONNECT,
    HEARTBEAT,
    HEARTBEAT_INTERVAL,
    NOBLOCK,
    POLLIN,
    READY,
    SEQ_BYTES,
    SERVICE,
    _get,
    dealer,
    echo_worker,
    make_body,
    mp_context,
    recv_frames,
    send_frames,
    stop_processes,
)

_EVENTS = int(zmq.EVENTS)
HOST_TICK = 0.05
WORKERS_PER_HOST = 500
"""Sockets per host process (a zmq context allows 1023 sockets by default)."""


# --------------------------------------------------------------------------------------------
# Idle workers


@dataclass(slots=True)
class HostStats:
    """What one idle-worker host process saw, per worker socket."""

    workers: int = 0
    heartbeats_from_broker: list[int] = field(default_factory=list)
    disconnects: int = 0


def idle_worker_host(
    endpoint: str, dialect_name: str, count: int, stop: Any, results: Any, service: bytes
) -> None:
    """Register `count` workers and keep them alive, heartbeating, until `stop` is set."""
    head = DIALECTS[dialect_name].worker_head
    at = len(head)
    heartbeat = (*head, HEARTBEAT)
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    context.set(zmq.MAX_SOCKETS, count + 16)
    socks = [dealer(context, endpoint, 0) for _ in range(count)]
    received = [0] * count
    stats = HostStats(count, received)
    try:
        start = time.monotonic()
        for sock in socks:
            send_frames(sock, (*head, READY, service))
        results.put("ready")
        due = [start + HEARTBEAT_INTERVAL * (i + 1) / count for i in range(count)]
        while not stop.wait(HOST_TICK):
            now = time.monotonic()
            for i, sock in enumerate(socks):
                while _get(sock, _EVENTS) & POLLIN:
                    command = recv_frames(sock, NOBLOCK)[at]
                    if command == HEARTBEAT:
                        received[i] += 1
                    elif command == DISCONNECT:
                        stats.disconnects += 1
                if now >= due[i]:
                    send_frames(sock, heartbeat)
                    due[i] = now + HEARTBEAT_INTERVAL
        for sock in socks:
            send_frames(sock, (*head, DISCONNECT))
    finally:
        for sock in socks:
            sock.close(linger=0)
        context.term()
        results.put(stats)


@dataclass(slots=True)
class IdleResult:
    """The broker's cost of keeping many idle workers registered."""

    broker: str
    workers: int
    registered: int
    disconnects: int
    window: float
    cpu_s: float
    core_percent: float
    rss_mb: float
    errors: list[str] = field(default_factory=list)


def run_idle_workers(
    broker: BrokerProcess, dialect: str, workers: int, window: float, settle: float = 2.0
) -> IdleResult:
    """Register `workers` idle workers and measure the broker's CPU over `window` seconds."""
    ctx = mp_context()
    stop = ctx.Event()
    results = ctx.Queue()
    counts = [WORKERS_PER_HOST] * (workers // WORKERS_PER_HOST)
    if workers % WORKERS_PER_HOST:
        counts.append(workers % WORKERS_PER_HOST)
    hosts = [
        ctx.Process(
            target=idle_worker_host,
            args=(broker.endpoint, dialect, n, stop, results, SERVICE),
            name=f"idle-host-{i}",
        )
        for i, n in enumerate(counts)
    ]
    errors: list[str] = []
    stats: list[HostStats] = []
    try:
        for host in hosts:
            host.start()
        for _ in hosts:
            results.get(timeout=30)  # "ready": every READY sent
        time.sleep(settle)
        cpu0 = broker.cpu_seconds()
        t0 = time.monotonic()
        time.sleep(window)
        cpu1 = broker.cpu_seconds()
        elapsed = time.monotonic() - t0
        rss = broker.rss_bytes()
        stop.set()
        for _ in hosts:
            try:
                stats.append(results.get(timeout=15))
            except Exception:  # queue.Empty
                errors.append("a worker host did not report")
                break
    finally:
        stop.set()
        stop_processes(hosts)
    beats = [b for s in stats for b in s.heartbeats_from_broker]
    return IdleResult(
        broker=broker.kind,
        workers=workers,
        registered=sum(1 for b in beats if b > 0),
        disconnects=sum(s.disconnects for s in stats),
        window=elapsed,
        cpu_s=cpu1 - cpu0,
        core_percent=100 * (cpu1 - cpu0) / elapsed,
        rss_mb=rss / 2**20,
        errors=errors,
    )


# --------------------------------------------------------------------------------------------
# Deep queue, then drain


@dataclass(slots=True)
class QueueClientResult:
    """What the queueing client saw."""

    sent: int = 0
    received: int = 0
    duplicates: int = 0
    bad: int = 0
    missing: int = 0
    t_sent: float = 0.0
    t_last: float = 0.0
    error: str = ""


def queue_client(
    endpoint: str,
    dialect_name: str,
    count: int,
    payload_size: int,
    timeout: float,
    results: Any,
    service: bytes,
) -> None:
    """Send `count` requests at once, then collect FINALs by sequence number."""
    dialect = DIALECTS[dialect_name]
    payload = bytes(max(payload_size, SEQ_BYTES))
    head = (*dialect.client_head, service)
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = dealer(context, endpoint, 500)
    result = QueueClientResult()
    seen = bytearray(count)
    try:
        for seq in range(count):
            send_frames(sock, (*head, make_body(seq, payload)))
        result.sent = count
        result.t_sent = time.monotonic()
        results.put("sent")
        deadline = result.t_sent + timeout
        while result.received < count and time.monotonic() < deadline:
            try:
                reply = recv_frames(sock)
            except zmq.Again:
                continue
            if len(reply) <= dialect.reply_body or reply[dialect.reply_command] != (
                dialect.reply_final
            ):
                result.bad += 1
                continue
            seq = int.from_bytes(reply[dialect.reply_body][:SEQ_BYTES], "little")
            if seq >= count:
                result.bad += 1
            elif seen[seq]:
                result.duplicates += 1
            else:
                seen[seq] = 1
                result.received += 1
                result.t_last = time.monotonic()
    except zmq.ZMQError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        result.missing = count - result.received
        sock.close(linger=0)
        context.term()
        results.put(result)


@dataclass(slots=True)
class QueueResult:
    """The broker holding a deep queue, then draining it."""

    broker: str
    requests: int
    enqueue_s: float
    rss_queued_mb: float
    peak_rss_mb: float
    received: int
    duplicates: int
    missing: int
    bad: int
    drain_s: float
    drain_rps: float
    errors: list[str] = field(default_factory=list)


def run_queue_drain(
    broker: BrokerProcess,
    dialect: str,
    requests: int,
    workers: int,
    payload: int = 64,
    timeout: float = 180.0,
) -> QueueResult:
    """Queue `requests` with no worker, read the broker's RSS, then drain with `workers`."""
    ctx = mp_context()
    stop = ctx.Event()
    client_results = ctx.Queue()
    worker_results = ctx.Queue()
    errors: list[str] = []
    queuer = ctx.Process(
        target=queue_client,
        args=(broker.endpoint, dialect, requests, payload, timeout, client_results, SERVICE),
        name="queue-client",
    )
    echo = [
        ctx.Process(
            target=echo_worker,
            args=(broker.endpoint, dialect, stop, worker_results, SERVICE),
            name=f"echo-worker-{i}",
        )
        for i in range(workers)
    ]
    result = QueueClientResult()
    t_start = time.monotonic()
    t_workers = t_start
    rss_queued = 0
    try:
        queuer.start()
        client_results.get(timeout=timeout)  # "sent"
        if not broker.wait_idle(timeout=timeout):
            errors.append("the broker was still busy after the client sent everything")
        t_queued = time.monotonic()
        rss_queued = broker.rss_bytes()
        t_workers = time.monotonic()
        for process in echo:
            process.start()
        result = client_results.get(timeout=timeout + 30)
        stop.set()
    except Exception as exc:  # queue.Empty: report what we have
        errors.append(f"queue scenario incomplete: {type(exc).__name__}")
        t_queued = time.monotonic()
    finally:
        stop.set()
        stop_processes([queuer, *echo])
    if result.error:
        errors.append(result.error)
    drain = max(result.t_last - t_workers, 1e-9) if result.received else float("nan")
    return QueueResult(
        broker=broker.kind,
        requests=requests,
        enqueue_s=t_queued - t_start,
        rss_queued_mb=rss_queued / 2**20,
        peak_rss_mb=broker.peak_rss_bytes() / 2**20,
        received=result.received,
        duplicates=result.duplicates,
        missing=requests - result.received,
        bad=result.bad,
        drain_s=drain,
        drain_rps=result.received / drain if result.received else 0.0,
        errors=errors,
    )
