"""MDP workers on asyncio and pyzmq: the handler API and the socket loop around `worker_core`.

Writing a service takes a few lines::

    from mdp.worker import Request, Service, WorkerOptions, serve

    async def shout(request: Request) -> list[bytes]:
        await request.partial([b"working on it"])  # optional; dropped under MDP/0.1
        return [frame.upper() for frame in request.body]

    asyncio.run(serve([Service("shout", shout)], WorkerOptions()))

The handler API
---------------
- A handler is an async function `(Request) -> list[bytes]`. `request.body` holds the REQUEST
  body frames; the returned list is the FINAL body (RFC 7: the REPLY), at least one frame.
- `await request.partial(frames)` sends a PARTIAL before the FINAL (RFC 18). Under MDP/0.1
  there are no PARTIALs: the call does nothing, and `request.streaming` is False.
- A handler that raises does not stop the worker: the exception is logged with its traceback
  and the FINAL is `service.error_reply(request, exc)`. The default error reply is two frames,
  `b"error"` and a short UTF-8 description (`"ValueError: bad input"`). A handler that returns
  something other than a non-empty list of bytes counts as raising `TypeError`.
- Each request runs in its own asyncio task while the connection keeps heartbeating, so a
  handler may take as long as it needs -- but it must not block the event loop (use
  `asyncio.to_thread` for blocking work), or heartbeats stop and the broker expires the worker.

One `Worker` is one MDP connection and handles one request at a time (RFC 7/18); `serve()` runs
several connections (`concurrency`) for several services in one process and stops them all,
gracefully, on SIGINT/SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace

import zmq
import zmq.asyncio

from mdp import mmi
from mdp.endpoints import check_endpoint, default_endpoint
from mdp.fastzmq import readable, recv_bytes, send_frames
from mdp.protocol import HEARTBEAT_INTERVAL, HEARTBEAT_LIVENESS, Version, validate_service_name
from mdp.worker_core import (
    Action,
    Cancel,
    CloseSocket,
    Dispatch,
    OpenSocket,
    Send,
    State,
    WorkerConfig,
    WorkerCore,
)

__all__ = [
    "Capacity",
    "ErrorReply",
    "Handler",
    "Request",
    "Service",
    "Worker",
    "WorkerOptions",
    "default_error_reply",
    "serve",
]

log = logging.getLogger("mdp.worker")

Handler = Callable[["Request"], Awaitable[list[bytes]]]
"""An async function from a request to the FINAL body frames."""

ErrorReply = Callable[["Request", BaseException], list[bytes]]
"""Builds the FINAL body sent when a handler raised (or was cancelled at shutdown)."""

# Longest wait of the socket loop, whatever the deadlines say: a safety net, not a timer.
_MAX_WAIT = 1.0

# How long closing the socket at shutdown may wait to hand the last messages (a FINAL sent as the
# grace period ended, the DISCONNECT) to the broker. Closing with linger 0 would discard them and
# leave the client waiting for an answer that was already computed. Reconnects still use 0: what
# is queued for a broker we gave up on is stale.
_FLUSH_LINGER_MS = 1000


def default_error_reply(request: Request, exc: BaseException) -> list[bytes]:
    """FINAL body for a failed plain handler: `[b"error", b"<ExceptionType>: <message>"]`."""
    if isinstance(exc, asyncio.CancelledError):
        text = "cancelled: the worker is shutting down"
    else:
        text = f"{type(exc).__name__}: {exc}"[:500]
    return [b"error", text.encode("utf-8", "replace")]


@dataclass(frozen=True, slots=True)
class Service:
    """A named service: its handler and the FINAL it sends when the handler fails."""

    name: str
    handler: Handler
    error_reply: ErrorReply = default_error_reply

    def __post_init__(self) -> None:
        validate_service_name(self.name.encode())
        if mmi.is_mmi(self.name):
            raise ValueError("the mmi. namespace is reserved for the broker (RFC 8)")


@dataclass(frozen=True, slots=True)
class WorkerOptions:
    """How a worker connects. Interval and liveness must match the broker's settings.

    `broker` defaults to `mdp.endpoints.default_endpoint()`, the user's private ipc:// socket
    (PrivateDirError if its directory is not private to the user)."""

    broker: str = field(default_factory=default_endpoint)
    version: Version = Version.V02
    heartbeat_interval: float = HEARTBEAT_INTERVAL
    liveness: int = HEARTBEAT_LIVENESS
    grace: float = 10.0
    backoff_initial: float = 0.1
    backoff_max: float = 4.0
    socket_options: Sequence[tuple[int, int | bytes]] = ()
    """(option, value) pairs set on every socket before it connects, e.g.
    `mdp.security.curve_client_options(...)` for a CURVE broker."""
    name: str | None = None
    """The worker's name: every connection's routing id carries it (`mmi.worker_identity`),
    so the broker lists the connections together in `mmi.workers` and refuses the name to any
    other process (spec/mdp.md §5.1). None: anonymous connections."""
    instance: str = field(default_factory=lambda: os.urandom(4).hex())
    """This process's token in the routing ids (the same for every connection and broker)."""

    def __post_init__(self) -> None:
        check_endpoint(self.broker)

    def config(self, service: str) -> WorkerConfig:
        return WorkerConfig(
            service=service.encode(),
            version=Version(self.version),
            heartbeat_interval=self.heartbeat_interval,
            liveness=self.liveness,
            backoff_initial=self.backoff_initial,
            backoff_max=self.backoff_max,
        )


@dataclass(slots=True)
class Request:
    """One request as a handler sees it."""

    body: list[bytes]
    """The REQUEST body frames."""
    client: bytes
    """The client's address as the broker gave it (opaque)."""
    service: str
    worker_id: str
    """Identifies the worker connection handling this request (`service#n`)."""
    streaming: bool
    """True when PARTIALs reach the client (MDP/0.2); False under MDP/0.1."""
    _send_partial: Callable[[list[bytes]], None] = field(repr=False, default=lambda body: None)
    alive: Callable[[], bool] = field(repr=False, default=lambda: True)
    """False once the connection it came on was dropped: its FINAL can reach nobody (a handler
    that waited, e.g. for a concurrency slot, should then not start anything)."""

    async def partial(self, body: list[bytes]) -> None:
        """Send a PARTIAL body (one or more frames) ahead of the FINAL; no-op under MDP/0.1."""
        self._send_partial(_checked_body(body, "a PARTIAL"))
        await asyncio.sleep(0)  # let the socket loop run between bursts


def _checked_body(body: object, what: str) -> list[bytes]:
    if not isinstance(body, list | tuple) or not body:
        raise TypeError(f"{what} body must be a non-empty list of bytes, got {type(body).__name__}")
    frames: list[bytes] = []
    for frame in body:
        if not isinstance(frame, bytes | bytearray | memoryview):
            raise TypeError(f"{what} body frame must be bytes, got {type(frame).__name__}")
        frames.append(bytes(frame))
    return frames


RESUME_DELAY = 0.05
"""Seconds a freed slot must stay free before paused connections register again."""


class Capacity:
    """A limit on the requests all the connections of one process hold at once, whichever
    service and broker they came on (`mdp-worker --concurrency`, spec/command-service.md
    §14.6). When they hold `limit`, every other idle connection that may pause does
    (`WorkerCore.pause`: it unregisters, so no broker hands it work); when one is released they
    register again. `slots` is the semaphore handlers take before they start anything, for
    the requests that were already on their way when the connections paused."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("the limit must be at least 1")
        self.limit = limit
        self.held = 0
        self.slots = asyncio.Semaphore(limit)
        self.workers: list[Worker] = []
        self._resume: asyncio.TimerHandle | None = None

    def take(self, now: float) -> None:
        self.held += 1
        if self.held == self.limit:
            for worker in self.workers:
                if worker.pausable:
                    worker._perform(worker.core.pause(now))
                    worker._poke()

    def release(self, now: float) -> None:
        self.held -= 1
        if self.held < self.limit and self._resume is None:
            # The connection that was released is registered again by its FINAL (RFC 7: a
            # reply means ready) and usually takes the next queued request at once; resuming
            # the others only if the room is still there a moment later keeps a saturated
            # worker from closing and reopening every paused socket on each command.
            self._resume = asyncio.get_running_loop().call_later(RESUME_DELAY, self._resume_all)

    def _resume_all(self) -> None:
        self._resume = None
        if self.held >= self.limit:
            return
        for worker in self.workers:
            if worker.core.state is State.PAUSED:
                worker._perform(worker.core.resume(worker._clock()))
                worker._poke()


class Worker:
    """One MDP worker connection for one service: READY, heartbeats, requests, reconnects."""

    def __init__(
        self,
        service: Service,
        options: WorkerOptions,
        *,
        context: zmq.asyncio.Context | None = None,
        worker_id: str = "",
        clock: Callable[[], float] = time.monotonic,
        capacity: Capacity | None = None,
        pausable: bool = True,
    ) -> None:
        self.service = service
        self.options = options
        self.worker_id = worker_id or f"{service.name}#0"
        self.core = WorkerCore(options.config(service.name))
        self._context = context or zmq.asyncio.Context.instance()
        # Plain (not asyncio) sockets on the same ZeroMQ context: see "The socket loop".
        self._plain_context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.shadow(
            self._context.underlying
        )
        self._clock = clock
        self._socket: zmq.Socket[bytes] | None = None
        self._fd = -1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._check_soon = False
        self._wake: asyncio.Future[None] | None = None
        self._sleep_until = -math.inf  # when the sleeping run() wakes anyway (-inf: awake)
        self._task: asyncio.Task[None] | None = None
        self._stop_grace: float | None = None  # set by stop(), consumed by the loop
        self._announced = False
        self.capacity = capacity
        """Shared with the process's other connections (see `Capacity`); None: no limit."""
        self.pausable = pausable
        """This connection unregisters while the capacity is full (False: one that must stay
        reachable, e.g. for cancel messages)."""
        if capacity is not None:
            capacity.workers.append(self)

    # ---------------------------------------------------------------------------------------
    # Public

    @property
    def state(self) -> State:
        return self.core.state

    def stop(self, grace: float | None = None) -> None:
        """Stop taking requests; a running one gets `grace` seconds (default: options.grace)."""
        grace = self.options.grace if grace is None else grace
        self._stop_grace = grace if self._stop_grace is None else min(grace, self._stop_grace)
        self._poke()  # the loop hands it to the core (which keeps the earliest deadline)

    async def run(self) -> None:
        """Serve until `stop()` completes the shutdown."""
        self._loop = asyncio.get_running_loop()
        try:
            self._perform(self.core.start(self._clock()))
            while True:
                if self._stop_grace is not None:
                    grace, self._stop_grace = self._stop_grace, None
                    self._perform(self.core.shutdown(self._clock(), grace))
                self._perform(self.core.tick(self._clock()))
                capacity = self.capacity
                if capacity is not None and self.pausable and capacity.held >= capacity.limit:
                    # A connection that came back (BACKOFF -> IDLE) while the process is full.
                    self._perform(self.core.pause(self._clock()))
                if self.core.state is State.CLOSED:
                    break
                await self._wait(self.core.deadline)
        finally:
            await self._teardown()

    # ---------------------------------------------------------------------------------------
    # The socket loop
    #
    # No future per message: the socket is a plain DEALER whose file descriptor the event loop
    # watches (`add_reader`). ZeroMQ signals that descriptor edge-wise ("look again"), so a
    # readable socket is drained until ZMQ_EVENTS has no POLLIN, and after every send it is
    # asked again (a send may process the signal of a message that arrived meanwhile). Each
    # message goes to the core from the reader callback. `run()` itself only sleeps until the
    # core's deadline; it is woken early when an event moved that deadline earlier (or closed
    # the connection), which steady traffic never does: sends and receives only push it later.

    async def _wait(self, deadline: float) -> None:
        """Sleep until the deadline (at most _MAX_WAIT) or until `_poke()`."""
        loop = asyncio.get_running_loop()
        until = min(deadline, self._clock() + _MAX_WAIT)
        wake = self._wake = loop.create_future()
        self._sleep_until = until
        timer = loop.call_later(max(0.0, until - self._clock()), self._poke)
        try:
            await wake
        finally:
            timer.cancel()
            self._sleep_until = -math.inf

    def _poke(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    def _poke_if_needed(self) -> None:
        """Wake `run()` if the core's deadline is now earlier than its sleep, or it closed."""
        core = self.core
        if core.deadline < self._sleep_until or core.state is State.CLOSED:
            self._poke()

    def _readable(self) -> None:
        """The socket's descriptor fired (or a send found input waiting): drain it."""
        self._check_soon = False
        sock = self._socket
        core = self.core
        clock = self._clock
        while sock is not None:
            try:
                if not readable(sock):
                    break
                frames = recv_bytes(sock)
            except zmq.Again:
                break
            except zmq.ZMQError as exc:
                log.warning("%s: receive failed: %s", self.worker_id, exc)
                break
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s: <- %r", self.worker_id, frames)
            self._perform(core.receive(frames, clock()))
            if not self._announced and core.heard_from_broker:
                self._announced = True
                log.info(
                    "%s: registered with %s as %r (MDP/%s)",
                    self.worker_id,
                    self.options.broker,
                    self.service.name,
                    self.options.version,
                )
            sock = self._socket  # a DISCONNECT closes it
        self._poke_if_needed()

    def _perform(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Send):
                self._send(action.frames)
            elif isinstance(action, OpenSocket):
                self._open()
            elif isinstance(action, CloseSocket):
                self._close(reason=True)
            elif isinstance(action, Dispatch):
                self._dispatch(action)
            elif isinstance(action, Cancel):
                self._cancel()

    def _cancel(self) -> None:
        if self._task is not None and not self._task.done():
            log.warning("%s: grace period over, cancelling the handler", self.worker_id)
            self._task.cancel()

    def _open(self) -> None:
        assert self._loop is not None
        sock = self._plain_context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if self.options.name is not None:
            sock.setsockopt(
                zmq.ROUTING_ID, mmi.worker_identity(self.options.name, self.options.instance)
            )
        for option, value in self.options.socket_options:
            sock.setsockopt(option, value)
        sock.connect(self.options.broker)
        self._socket = sock
        self._fd = int(sock.getsockopt(zmq.FD))
        self._loop.add_reader(self._fd, self._readable)
        self._announced = False
        log.debug("%s: connecting to %s", self.worker_id, self.options.broker)

    def _close(self, reason: bool = False) -> None:
        if self._socket is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._fd)
            closing = self.core.state is State.CLOSED
            self._socket.close(linger=_FLUSH_LINGER_MS if closing else 0)
            self._socket = None
            if reason and self.core.state is not State.CLOSED:
                refused = not self._announced and self.core.drop_reason.startswith("DISCONNECT")
                log.warning(
                    "%s: %s (%s); reconnecting%s",
                    self.worker_id,
                    # A DISCONNECT before anything else answers our READY: a refusal.
                    f"{self.options.broker} refused the registration (is the name "
                    f"{self.options.name!r} in use by another worker? spec/mdp.md §5.1)"
                    if refused and self.options.name is not None
                    else "lost the broker",
                    self.core.drop_reason,
                    " once the running request ends" if self.core.busy else "",
                )

    def _send(self, frames: list[bytes]) -> None:
        sock = self._socket
        if sock is None:
            return
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s: -> %r", self.worker_id, frames)
        try:
            send_frames(sock, frames)
        except zmq.ZMQError as exc:
            # zmq.Again: the queue to the broker is full (it is not there). The message is
            # lost like any other in flight to a dead broker; heartbeating notices and we
            # reconnect.
            log.warning("%s: message to the broker dropped: %s", self.worker_id, exc)
        # The send may have consumed the descriptor's edge for a message that arrived
        # meanwhile: if one waits, drain it soon (not here: we may be inside `_perform`).
        if not self._check_soon and self._loop is not None:
            try:
                waiting = readable(sock)
            except zmq.ZMQError:
                waiting = False
            if waiting:
                self._check_soon = True
                self._loop.call_soon(self._readable)

    # ---------------------------------------------------------------------------------------
    # Handlers

    def _dispatch(self, action: Dispatch) -> None:
        token = action.token
        request = Request(
            body=action.body,
            client=action.client,
            service=self.service.name,
            worker_id=self.worker_id,
            streaming=self.core.streaming,
            _send_partial=lambda body: self._perform(self.core.partial(token, body, self._clock())),
            alive=lambda: self.core.state is State.BUSY and self.core.current_token == token,
        )
        if self.capacity is not None:
            self.capacity.take(self._clock())
        self._task = asyncio.create_task(self._handle(token, request), name=self.worker_id)

    async def _handle(self, token: int, request: Request) -> None:
        try:
            body = _checked_body(await self.service.handler(request), "the FINAL")
        except asyncio.CancelledError as exc:
            body = self._error_reply(request, exc)
        except Exception as exc:
            log.exception("%s: handler for %r failed", self.worker_id, self.service.name)
            body = self._error_reply(request, exc)
        finally:
            if self.capacity is not None:
                self.capacity.release(self._clock())
        self._perform(self.core.final(token, body, self._clock()))
        self._poke_if_needed()

    def _error_reply(self, request: Request, exc: BaseException) -> list[bytes]:
        try:
            return _checked_body(self.service.error_reply(request, exc), "the error")
        except Exception:
            log.exception("%s: error_reply for %r failed", self.worker_id, self.service.name)
            return default_error_reply(request, exc)

    async def _teardown(self) -> None:
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), timeout=1.0)
        self._close()


async def serve(
    services: Sequence[Service],
    options: WorkerOptions,
    concurrency: int = 1,
    *,
    handle_signals: bool = True,
    started: Callable[[list[Worker]], None] | None = None,
    control: Sequence[Service] = (),
    brokers: Sequence[str] = (),
    control_concurrency: int = 1,
    capacity: Capacity | None = None,
) -> None:
    """Run `concurrency` connections per service until SIGINT/SIGTERM (if `handle_signals`).

    `control` services get `control_concurrency` connections each: services addressed to this
    worker (`SERVICE@NAME`), whose cancel messages must not wait behind the others' requests.

    `brokers`: serve through each of these endpoints at once (default: `options.broker` only),
    with a full set of connections per broker (RFC 7: one DEALER per conversation). Each one
    heartbeats and reconnects on its own.

    `capacity`: a limit on the requests held at once over all these connections (see
    `Capacity`); the first connection of each control service never pauses, so a cancel
    message always finds one. Handlers should take `capacity.slots` before starting work.

    The first signal stops taking requests and gives running ones `options.grace` seconds; a
    second signal cancels them at once. Returns when every connection has closed.
    """
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    context = zmq.asyncio.Context()
    endpoints = list(brokers) or [options.broker]
    workers: list[Worker] = []
    for k, endpoint in enumerate(endpoints):
        each = options if endpoint == options.broker else replace(options, broker=endpoint)
        suffix = f"@{k}" if len(endpoints) > 1 else ""
        # (service, connection number, pausable): a control service's first connection never
        # pauses, so a cancel or lookup always finds one.
        hosted = [(s, i, True) for s in services for i in range(concurrency)]
        hosted += [(s, i, i > 0) for s in control for i in range(control_concurrency)]
        workers += [
            Worker(
                service,
                each,
                context=context,
                worker_id=f"{service.name}#{i}{suffix}",
                capacity=capacity,
                pausable=pausable,
            )
            for service, i, pausable in hosted
        ]
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM) if handle_signals else ()
    received: list[int] = []

    def on_signal(signum: int) -> None:
        received.append(signum)
        grace = options.grace if len(received) == 1 else 0.0
        log.info(
            "%s: stopping (%s)",
            signal.Signals(signum).name,
            f"grace {grace:g}s" if grace else "cancelling running requests",
        )
        for worker in workers:
            worker.stop(grace)

    for signum in signals:
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        if started is not None:
            started(workers)
        async with asyncio.TaskGroup() as group:
            for worker in workers:
                group.create_task(worker.run(), name=worker.worker_id)
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)
        context.destroy(linger=0)
