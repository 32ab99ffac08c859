"""A broker-agnostic MDP load generator: raw-frame echo workers and clients in their own processes.

Every broker is measured with the same peers, written here with plain pyzmq and no MDP library,
so the only thing that changes between two runs is the broker. The peers speak one of two
dialects on the wire (`DIALECTS`):

- "rfc18": RFC 18 as written (bare framing). Client REQUEST `MDPC02 0x01 service body`; replies
  `MDPC02 0x03 service body`. Workers `MDPW02 cmd ...`.
- "majortomo": majortomo's variant. Client REQUEST `"" MDPC02 0x02 service body`; replies
  `"" MDPC02 0x04 body` (no service frame). Workers `"" MDPW02 cmd ...` with RFC 18 bytes.
  majortomo's broker speaks only this; ours speaks both.
- "rfc7": MDP/0.1 (RFC 7), the only dialect of the zguide's C broker; ours speaks it too.
  Client REQUEST `"" MDPC01 service body`; REPLY `"" MDPC01 service body`. Workers
  `"" MDPW01 cmd ...` with RFC 7's bytes (REPLY 0x03, HEARTBEAT 0x04, DISCONNECT 0x05).
- "proxy": no MDP, for the transport ceiling (`benchmarks.proxy`). Clients send the frames of
  an RFC 18 FINAL (`MDPC02 0x03 service body`); workers never register or heartbeat, and send
  back every message they receive (routing identity included) unchanged, so the client gets
  exactly what it sent. Message sizes and frame counts are those of the MDP runs.

Shape of a run (`run_throughput`): W echo worker processes register; N client processes each
open K DEALER sockets (K = outstanding requests per client; MDP's client dialog is synchronous,
so K concurrent requests need K sockets) and do a short warm-up; all clients then start
together on a barrier, and each keeps every socket busy until its share of the request count is
done or the wall-time bound passes. Each request carries an 8-byte sequence number that the
client checks in the reply. The parent reads the broker's CPU time (psutil, by PID) at the
barrier and after the last client reports; latency is send-to-FINAL per request.

Against a CURVE broker (`BrokerProcess.curve`), every client socket gets the client key's
`mdp.security.curve_client_options` and every worker socket the worker key's, before it
connects; the peers are otherwise the same.

`python -m benchmarks.probe --help` runs one scenario against one broker, for quick checks.
"""

from __future__ import annotations

import array
import multiprocessing as mp
import multiprocessing.synchronize
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Final

import zmq
from zmq.backend import Socket as _BackendSocket
from zmq.backend import zmq_poll

from benchmarks.brokers import BrokerProcess, SocketOptions

# pyzmq's compiled socket methods with plain-int flags: about half the cost of
# send_multipart/recv_multipart, so the peers take less CPU from the broker on a small machine.
_send: Any = _BackendSocket.send
_recv: Any = _BackendSocket.recv
_get: Any = _BackendSocket.get
NOBLOCK: Final = int(zmq.NOBLOCK)
SNDMORE: Final = int(zmq.SNDMORE)
RCVMORE: Final = int(zmq.RCVMORE)
POLLIN: Final = int(zmq.POLLIN)

READY: Final = b"\x01"
REQUEST: Final = b"\x02"
FINAL: Final = b"\x04"
HEARTBEAT: Final = b"\x05"
DISCONNECT: Final = b"\x06"

HEARTBEAT_INTERVAL = 2.5
"""Seconds between worker heartbeats; both brokers default to 2.5 s."""
REPLY_TIMEOUT_MS = 10_000
"""A reply later than this counts as lost and ends that client's run."""
WORKER_POLL_MS = 100
SEQ_BYTES = 8
SERVICE: Final = b"echo"


@dataclass(frozen=True, slots=True)
class Dialect:
    """Where things are in one dialect's frames (the ROUTER identity is never included)."""

    name: str
    client_head: tuple[bytes, ...]
    """REQUEST frames before the service frame."""
    reply_command: int
    """Index of the command byte in a reply."""
    reply_final: bytes
    reply_body: int
    """Index of the first body frame in a reply."""
    worker_head: tuple[bytes, ...]
    """Worker command frames before the command byte."""
    reply: bytes = FINAL
    """The worker's FINAL (RFC 7: REPLY) command byte."""
    heartbeat: bytes = HEARTBEAT
    disconnect: bytes = DISCONNECT
    registers: bool = True
    """False for "proxy": the worker only echoes, with no MDP commands at all."""


DIALECTS: Final = {
    "rfc18": Dialect("rfc18", (b"MDPC02", b"\x01"), 1, b"\x03", 3, (b"MDPW02",)),
    "majortomo": Dialect("majortomo", (b"", b"MDPC02", b"\x02"), 2, b"\x04", 3, (b"", b"MDPW02")),
    # RFC 7 replies carry no command byte: the header frame is what is checked.
    "rfc7": Dialect(
        "rfc7", (b"", b"MDPC01"), 1, b"MDPC01", 3, (b"", b"MDPW01"), b"\x03", b"\x04", b"\x05"
    ),
    "proxy": Dialect("proxy", (b"MDPC02", b"\x03"), 1, b"\x03", 3, (), registers=False),
}
NATIVE_DIALECT: Final = {"ours": "rfc18", "majortomo": "majortomo", "c": "rfc7", "proxy": "proxy"}


def send_frames(sock: zmq.Socket[bytes], frames: list[bytes] | tuple[bytes, ...]) -> None:
    """Send one multipart message (blocking while the pipe is full)."""
    last = len(frames) - 1
    for i in range(last):
        _send(sock, frames[i], SNDMORE)
    _send(sock, frames[last], 0)


def recv_frames(sock: zmq.Socket[bytes], flags: int = 0) -> list[bytes]:
    """Receive one multipart message; raises zmq.Again on timeout or, with NOBLOCK, if none."""
    parts: list[bytes] = [_recv(sock, flags)]
    while _get(sock, RCVMORE):
        parts.append(_recv(sock, 0))
    return parts


def dealer(
    context: zmq.Context[zmq.Socket[bytes]],
    endpoint: str,
    rcvtimeo: int,
    options: SocketOptions = (),
) -> Any:
    """A connected DEALER socket that drops unsent messages on close.

    `options` are set before connecting (e.g. CURVE client options).
    """
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, rcvtimeo)
    for option, value in options:
        sock.setsockopt(option, value)
    sock.connect(endpoint)
    return sock


def make_body(seq: int, payload: bytes) -> bytes:
    """A request body of len(payload) bytes starting with an 8-byte sequence number."""
    return seq.to_bytes(SEQ_BYTES, "little") + payload[SEQ_BYTES:]


# --------------------------------------------------------------------------------------------
# Echo worker


@dataclass(slots=True)
class WorkerStats:
    """What one echo worker saw."""

    handled: int = 0
    heartbeats_received: int = 0
    disconnects_received: int = 0


def echo_worker(
    endpoint: str,
    dialect_name: str,
    stop: mp.synchronize.Event,
    results: Any,
    service: bytes,
    options: SocketOptions = (),
) -> None:
    """Register for `service`, echo every REQUEST body as a FINAL, heartbeat, until `stop`.

    `options`: socket options set before connecting (CURVE: the worker key's).
    """
    dialect = DIALECTS[dialect_name]
    head = dialect.worker_head
    at = len(head)
    final_head = (*head, dialect.reply)
    heartbeat = (*head, dialect.heartbeat)
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = dealer(context, endpoint, WORKER_POLL_MS, options)
    stats = WorkerStats()
    if not dialect.registers:
        _echo_raw(sock, context, stop, stats, results)
        return
    try:
        send_frames(sock, (*head, READY, service))
        clock = time.monotonic
        next_heartbeat = clock() + HEARTBEAT_INTERVAL
        while True:
            try:
                frames = recv_frames(sock)
            except zmq.Again:
                if stop.is_set():
                    break
            else:
                command = frames[at]
                if command == REQUEST:
                    # REQUEST: client, "", body...  ->  FINAL: client, "", body...
                    for frame in final_head:
                        _send(sock, frame, SNDMORE)
                    send_frames(sock, frames[at + 1 :])
                    stats.handled += 1
                elif command == dialect.heartbeat:
                    stats.heartbeats_received += 1
                elif command == dialect.disconnect:
                    stats.disconnects_received += 1
                    break
            now = clock()
            if now >= next_heartbeat:
                send_frames(sock, heartbeat)
                next_heartbeat = now + HEARTBEAT_INTERVAL
        if not stats.disconnects_received:
            send_frames(sock, (*head, dialect.disconnect))
    finally:
        sock.close(linger=100)
        context.term()
        results.put(stats)


def _echo_raw(
    sock: Any,
    context: zmq.Context[zmq.Socket[bytes]],
    stop: mp.synchronize.Event,
    stats: WorkerStats,
    results: Any,
) -> None:
    """The "proxy" dialect's worker: send every message back unchanged, until `stop`."""
    try:
        while True:
            try:
                frames = recv_frames(sock)
            except zmq.Again:
                if stop.is_set():
                    break
            else:
                send_frames(sock, frames)
                stats.handled += 1
    finally:
        sock.close(linger=100)
        context.term()
        results.put(stats)


# --------------------------------------------------------------------------------------------
# Clients


@dataclass(slots=True)
class ClientResult:
    """What one client process measured in its timed phase."""

    latencies_ns: bytes = b""
    """array('q') of send-to-FINAL latencies, as bytes."""
    completed: int = 0
    lost: int = 0
    bad: int = 0
    t_start: float = 0.0
    t_end: float = 0.0
    error: str = ""


def _check(reply: list[bytes], dialect: Dialect, expect: bytes, size: int) -> bool:
    return (
        len(reply) > dialect.reply_body
        and reply[dialect.reply_command] == dialect.reply_final
        and len(reply[dialect.reply_body]) == size
        and reply[dialect.reply_body].startswith(expect)
    )


def client(
    endpoint: str,
    dialect_name: str,
    payload_size: int,
    requests: int,
    outstanding: int,
    warmup: int,
    max_seconds: float,
    barrier: threading.Barrier,
    results: Any,
    service: bytes,
    options: SocketOptions = (),
) -> None:
    """One client process: `outstanding` synchronous DEALER sockets, `requests` in total.

    `options`: socket options set on each socket before connecting (CURVE: the client key's).
    """
    dialect = DIALECTS[dialect_name]
    payload = bytes(max(payload_size, SEQ_BYTES))
    request_head = (*dialect.client_head, service)
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    socks = [dealer(context, endpoint, REPLY_TIMEOUT_MS, options) for _ in range(outstanding)]
    result = ClientResult()
    try:
        # Warm-up, one socket at a time: connections made, workers registered, caches warm.
        seq = 1 << 48
        for i, sock in enumerate(socks):
            for _ in range(warmup if i == 0 else 1):
                seq += 1
                send_frames(sock, (*request_head, make_body(seq, payload)))
                recv_frames(sock)
        barrier.wait(timeout=60)
        result.t_start = time.monotonic()
        deadline = result.t_start + max_seconds
        if outstanding == 1:
            _run_sync(socks[0], request_head, dialect, payload, requests, deadline, result)
        else:
            _run_window(socks, request_head, dialect, payload, requests, deadline, result)
        result.t_end = time.monotonic()
    except (zmq.ZMQError, threading.BrokenBarrierError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        for sock in socks:
            sock.close(linger=0)
        context.term()
        results.put(result)


def _run_sync(
    sock: Any,
    request_head: tuple[bytes, ...],
    dialect: Dialect,
    payload: bytes,
    requests: int,
    deadline: float,
    result: ClientResult,
) -> None:
    latencies = array.array("q")
    clock = time.perf_counter_ns
    size = len(payload)
    for seq in range(requests):
        body = make_body(seq, payload)
        t0 = clock()
        send_frames(sock, (*request_head, body))
        try:
            reply = recv_frames(sock)
        except zmq.Again:
            result.lost += 1
            break
        latencies.append(clock() - t0)
        if not _check(reply, dialect, body[:SEQ_BYTES], size):
            result.bad += 1
        if time.monotonic() >= deadline:
            break
    result.completed = len(latencies)
    result.latencies_ns = latencies.tobytes()


def _run_window(
    socks: list[Any],
    request_head: tuple[bytes, ...],
    dialect: Dialect,
    payload: bytes,
    requests: int,
    deadline: float,
    result: ClientResult,
) -> None:
    latencies = array.array("q")
    clock = time.perf_counter_ns
    size = len(payload)
    sent_at: dict[Any, int] = {}
    expect: dict[Any, bytes] = {}
    items = [(sock, POLLIN) for sock in socks]
    issued = 0

    def issue(sock: Any) -> None:
        nonlocal issued
        body = make_body(issued, payload)
        issued += 1
        expect[sock] = body[:SEQ_BYTES]
        sent_at[sock] = clock()
        send_frames(sock, (*request_head, body))

    for sock in socks[:requests]:
        issue(sock)
    in_flight = len(sent_at)
    while in_flight:
        events = zmq_poll(items, REPLY_TIMEOUT_MS)
        if not events:
            result.lost += in_flight
            break
        now = clock()
        more = issued < requests and time.monotonic() < deadline
        for sock, _ in events:
            reply = recv_frames(sock, NOBLOCK)
            latencies.append(now - sent_at[sock])
            if not _check(reply, dialect, expect[sock], size):
                result.bad += 1
            if more and issued < requests:
                issue(sock)
            else:
                in_flight -= 1
                items.remove((sock, POLLIN))
    result.completed = len(latencies)
    result.latencies_ns = latencies.tobytes()


# --------------------------------------------------------------------------------------------
# Running a scenario


@dataclass(frozen=True, slots=True)
class Scenario:
    """N clients x W workers, K outstanding per client, a payload size, bounded runs."""

    name: str
    clients: int
    workers: int
    outstanding: int
    payload: int
    requests: int
    max_seconds: float = 10.0
    warmup: int = 20

    @property
    def sync(self) -> bool:
        """True when each client has one request in flight (MDP's synchronous dialog)."""
        return self.outstanding == 1


@dataclass(slots=True)
class ThroughputResult:
    """One scenario against one broker: throughput, latency, broker cost."""

    broker: str
    dialect: str
    scenario: str
    completed: int
    lost: int
    bad: int
    elapsed: float
    rps: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    cpu_ms_per_1000: float
    """Broker process CPU (all threads, user+system) per 1,000 requests."""
    main_thread_ms_per_1000: float
    """Of which the broker's main (Python) thread; the rest is ZeroMQ's I/O thread."""
    broker_cpu_s: float
    rss_mb: float
    worker_handled: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    security: str = "plain"
    """Our broker's security (`brokers.Security`): "plain", "curve" or "curve-info"."""


def mp_context() -> Any:
    """A forkserver context: children start clean (no inherited zmq state), and fast."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(
        ["benchmarks.loadgen", "benchmarks.scale", "benchmarks.command", "zmq"]
    )
    return ctx


def percentile(sorted_values: list[int] | array.array[int], q: float) -> int:
    """Nearest-rank percentile of an already sorted sequence (0 if empty)."""
    if not sorted_values:
        return 0
    index = min(len(sorted_values) - 1, max(0, round(q * len(sorted_values) + 0.5) - 1))
    return sorted_values[index]


def stop_processes(processes: list[Any], timeout: float = 5.0) -> None:
    """Join child processes; terminate (then kill) any still running, by PID."""
    processes = [p for p in processes if p.pid is not None]  # skip any never started
    deadline = time.monotonic() + timeout
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.is_alive():
            process.terminate()
            process.join(2.0)
        if process.is_alive():
            process.kill()
            process.join(2.0)


def run_throughput(broker: BrokerProcess, dialect: str, scenario: Scenario) -> ThroughputResult:
    """Run `scenario` against a running broker and measure it.

    Against a CURVE broker, clients use its client key pair and workers its worker key pair.
    """
    curve = broker.curve
    client_options = curve.client_options() if curve else []
    worker_options = curve.worker_options() if curve else []
    ctx = mp_context()
    stop = ctx.Event()
    barrier = ctx.Barrier(scenario.clients + 1)
    client_results = ctx.Queue()
    worker_results = ctx.Queue()
    workers = [
        ctx.Process(
            target=echo_worker,
            args=(broker.worker_endpoint, dialect, stop, worker_results, SERVICE, worker_options),
            name=f"echo-worker-{i}",
        )
        for i in range(scenario.workers)
    ]
    share, extra = divmod(scenario.requests, scenario.clients)
    clients = [
        ctx.Process(
            target=client,
            args=(
                broker.endpoint,
                dialect,
                scenario.payload,
                share + (1 if i < extra else 0),
                scenario.outstanding,
                scenario.warmup,
                scenario.max_seconds,
                barrier,
                client_results,
                SERVICE,
                client_options,
            ),
            name=f"client-{i}",
        )
        for i in range(scenario.clients)
    ]
    results: list[ClientResult] = []
    stats: list[WorkerStats] = []
    errors: list[str] = []
    try:
        for process in workers + clients:
            process.start()
        try:
            barrier.wait(timeout=60)
        except threading.BrokenBarrierError:
            errors.append("clients did not all finish their warm-up")
        cpu0, main0 = broker.cpu_seconds(), broker.main_thread_cpu_seconds()
        t0 = time.monotonic()
        bound = scenario.max_seconds + REPLY_TIMEOUT_MS / 1000 + 30
        for _ in clients:
            try:
                results.append(client_results.get(timeout=bound))
            except Exception:  # queue.Empty: a client died or hung; the rest is still valid
                errors.append("a client did not report")
                break
        cpu1, main1 = broker.cpu_seconds(), broker.main_thread_cpu_seconds()
        rss = broker.rss_bytes()
        stop.set()
        for _ in workers:
            try:
                stats.append(worker_results.get(timeout=10))
            except Exception:  # queue.Empty
                errors.append("a worker did not report")
                break
    finally:
        stop.set()
        barrier.abort()
        stop_processes(clients + workers)
    errors += [r.error for r in results if r.error]
    latencies = array.array("q")
    for r in results:
        latencies.frombytes(r.latencies_ns)
    ordered = sorted(latencies)
    completed = sum(r.completed for r in results)
    t_end = max((r.t_end for r in results), default=t0)
    elapsed = max(t_end - t0, 1e-9)
    cpu = cpu1 - cpu0
    per_1000 = 1e6 / completed if completed else float("nan")
    return ThroughputResult(
        broker=broker.kind,
        dialect=dialect,
        scenario=scenario.name,
        completed=completed,
        lost=sum(r.lost for r in results),
        bad=sum(r.bad for r in results),
        elapsed=elapsed,
        rps=completed / elapsed,
        p50_ms=percentile(ordered, 0.50) / 1e6,
        p99_ms=percentile(ordered, 0.99) / 1e6,
        max_ms=(ordered[-1] if ordered else 0) / 1e6,
        cpu_ms_per_1000=cpu * per_1000,
        main_thread_ms_per_1000=(main1 - main0) * per_1000,
        broker_cpu_s=cpu,
        rss_mb=rss / 2**20,
        worker_handled=[s.handled for s in stats],
        errors=errors,
        security=broker.security,
    )
