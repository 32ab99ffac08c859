"""Many MDP worker connections on one event loop, driven without a future per message.

`mdp.worker.Worker` runs each connection as its own loop of awaits (a future per receive, an
`asyncio.wait` per wake-up). `mdp-jobs` keeps dozens of connections for `jobs.submit`, so that
concurrent submits share one commit, and there that machinery cost more CPU than the submit
itself. This driver runs the very same sans-IO `mdp.worker_core.WorkerCore` per connection, but:

- sockets are plain (not asyncio) DEALERs whose file descriptor the event loop watches
  (`add_reader`); ZeroMQ signals that descriptor edge-wise, so a readable socket is drained
  until `EVENTS` has no POLLIN, and after every send it is checked again (a send may consume
  the edge);
- a REQUEST starts the handler as a task; its FINAL (or error reply) goes straight to the core;
- one timer task serves every connection's deadline (heartbeats, broker liveness, reconnects,
  the shutdown grace), waking at the earliest one.

The handler API is `mdp.worker`'s (`Service`, `Request`, error replies); the behaviour on the
wire is `WorkerCore`'s, so RFC 7/18 conformance is unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import zmq

from mdp.fastzmq import readable, recv_bytes, send_frames
from mdp.worker import Request, Service, WorkerOptions, default_error_reply
from mdp.worker_core import (
    Action,
    Cancel,
    CloseSocket,
    Dispatch,
    OpenSocket,
    Send,
    State,
    WorkerCore,
)

__all__ = ["WorkerPool"]

log = logging.getLogger("mdp.worker")

_MAX_WAIT = 1.0
"""Longest sleep of the timer, whatever the deadlines say: a safety net."""


def _body(value: object, what: str) -> list[bytes]:
    if not isinstance(value, list | tuple) or not value:
        raise TypeError(f"{what} body must be a non-empty list of bytes")
    frames = []
    for frame in value:
        if not isinstance(frame, bytes | bytearray | memoryview):
            raise TypeError(f"{what} body frame must be bytes, got {type(frame).__name__}")
        frames.append(bytes(frame))
    return frames


FLUSH_LINGER_MS = 1000
"""How long closing a connection at shutdown may take to hand over its last messages."""


def _closed(core: WorkerCore) -> bool:
    return core.state is State.CLOSED


class _Connection:
    __slots__ = ("check_soon", "core", "fd", "service", "sock", "task", "worker_id")

    def __init__(self, service: Service, core: WorkerCore, worker_id: str) -> None:
        self.service = service
        self.core = core
        self.worker_id = worker_id
        self.sock: zmq.Socket[bytes] | None = None
        self.fd = -1
        self.task: asyncio.Task[None] | None = None
        self.check_soon = False


class WorkerPool:
    """`count` connections for each `(service, count)`, all on the running event loop."""

    def __init__(
        self,
        services: Sequence[tuple[Service, int]],
        options: WorkerOptions,
        *,
        context: zmq.Context[Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.options = options
        self._context: zmq.Context[Any] = (
            zmq.Context.shadow(context.underlying) if context is not None else zmq.Context()
        )
        self._own_context = context is None
        self._clock = clock
        self.connections = [
            _Connection(service, WorkerCore(options.config(service.name)), f"{service.name}#{i}")
            for service, count in services
            for i in range(count)
        ]
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = asyncio.Event()
        self._sleep_until = -math.inf  # when the sleeping timer wakes anyway (-inf: awake)
        self._stop_grace: float | None = None

    def stop(self, grace: float | None = None) -> None:
        """Stop taking requests; running handlers get `grace` seconds (default: options')."""
        grace = self.options.grace if grace is None else grace
        self._stop_grace = grace if self._stop_grace is None else min(grace, self._stop_grace)
        self._wake.set()

    async def run(self) -> None:
        """Serve until `stop()` has closed every connection."""
        self._loop = asyncio.get_running_loop()
        try:
            now = self._clock()
            for conn in self.connections:
                self._perform(conn, conn.core.start(now))
            while True:
                now = self._clock()
                if self._stop_grace is not None:
                    grace, self._stop_grace = self._stop_grace, None
                    for conn in self.connections:
                        self._perform(conn, conn.core.shutdown(now, grace))
                earliest = now + _MAX_WAIT
                open_ = False
                for conn in self.connections:
                    core = conn.core
                    if core.deadline <= now:
                        self._perform(conn, core.tick(now))  # a closed core does nothing
                    if not _closed(core):
                        open_ = True
                        earliest = min(earliest, core.deadline)
                if not open_:
                    return
                self._wake.clear()
                self._sleep_until = earliest
                try:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(
                            self._wake.wait(), max(0.0, earliest - self._clock())
                        )
                finally:
                    self._sleep_until = -math.inf
        finally:
            await self._teardown()

    # --- actions -------------------------------------------------------------------------

    def _perform(self, conn: _Connection, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Send):
                self._send(conn, action.frames)
            elif isinstance(action, Dispatch):
                self._dispatch(conn, action)
            elif isinstance(action, OpenSocket):
                self._open(conn)
            elif isinstance(action, CloseSocket):
                self._close(conn)
            elif isinstance(action, Cancel) and conn.task is not None:
                conn.task.cancel()

    def _open(self, conn: _Connection) -> None:
        assert self._loop is not None
        sock: zmq.Socket[bytes] = self._context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        for option, value in self.options.socket_options:
            sock.setsockopt(option, value)
        sock.connect(self.options.broker)
        conn.sock = sock
        conn.fd = int(sock.getsockopt(zmq.FD))
        self._loop.add_reader(conn.fd, self._readable, conn)

    def _close(self, conn: _Connection) -> None:
        sock, conn.sock = conn.sock, None
        if sock is None:
            return
        if self._loop is not None:
            self._loop.remove_reader(conn.fd)
        # At shutdown the last FINAL and the DISCONNECT were just queued: give them a moment to
        # reach the broker (linger 0 would drop them). A connection given up on sends nothing.
        closing = conn.core.state is State.CLOSED
        sock.close(linger=FLUSH_LINGER_MS if closing else 0)
        if not closing:
            log.warning(
                "%s: lost the broker (%s); reconnecting", conn.worker_id, conn.core.drop_reason
            )

    def _send(self, conn: _Connection, frames: list[bytes]) -> None:
        sock = conn.sock
        if sock is None:
            return
        try:
            send_frames(sock, frames)
        except zmq.Again:
            # The queue to the broker is full (it is not there): lost like any message in
            # flight to a dead broker; heartbeating notices and we reconnect.
            log.warning("%s: message to the broker dropped", conn.worker_id)
        if not conn.check_soon and self._loop is not None and readable(sock):
            # The send consumed the descriptor's edge of a message that waits: drain it soon.
            conn.check_soon = True
            self._loop.call_soon(self._readable, conn)

    def _readable(self, conn: _Connection) -> None:
        conn.check_soon = False
        sock = conn.sock
        while sock is not None:
            try:
                if not readable(sock):
                    break
                frames = recv_bytes(sock)
            except zmq.Again:
                break
            except zmq.ZMQError as exc:
                log.warning("%s: receive failed: %s", conn.worker_id, exc)
                break
            self._perform(conn, conn.core.receive(frames, self._clock()))
            sock = conn.sock
        self._wake_if_earlier(conn)

    def _wake_if_earlier(self, conn: _Connection) -> None:
        """Wake the timer if this connection now needs it before the timer's own wake-up (a
        new socket, a DISCONNECT); steady traffic only moves deadlines later."""
        if conn.core.deadline < self._sleep_until or _closed(conn.core):
            self._wake.set()

    # --- handlers ------------------------------------------------------------------------

    def _dispatch(self, conn: _Connection, action: Dispatch) -> None:
        assert self._loop is not None
        token = action.token
        request = Request(
            body=action.body,
            client=action.client,
            service=conn.service.name,
            worker_id=conn.worker_id,
            streaming=conn.core.streaming,
            _send_partial=lambda body: self._perform(
                conn, conn.core.partial(token, body, self._clock())
            ),
        )
        conn.task = self._loop.create_task(self._handle(conn, token, request))

    async def _handle(self, conn: _Connection, token: int, request: Request) -> None:
        try:
            body = _body(await conn.service.handler(request), "the FINAL")
        except asyncio.CancelledError as exc:
            body = self._error_reply(conn, request, exc)
        except Exception as exc:
            log.exception("%s: handler for %r failed", conn.worker_id, conn.service.name)
            body = self._error_reply(conn, request, exc)
        conn.task = None
        self._perform(conn, conn.core.final(token, body, self._clock()))
        if conn.core.state is State.BACKOFF or conn.core.state is State.CLOSED:
            self._wake.set()  # an orphaned connection may reconnect; a closed one may be the last

    @staticmethod
    def _error_reply(conn: _Connection, request: Request, exc: BaseException) -> list[bytes]:
        try:
            return _body(conn.service.error_reply(request, exc), "the error")
        except Exception:
            log.exception("%s: error_reply for %r failed", conn.worker_id, conn.service.name)
            return default_error_reply(request, exc)

    async def _teardown(self) -> None:
        tasks = [conn.task for conn in self.connections if conn.task is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 1.0)
        for conn in self.connections:
            self._close(conn)
        if self._own_context:
            self._context.term()
