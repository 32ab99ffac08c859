"""The broker's I/O: one ROUTER socket around a `BrokerCore`.

The loop is a plain poll loop rather than asyncio: per wake-up it costs one poll() on the
sockets' signalling fds, then drains every waiting message with NOBLOCK receives (up to a
batch), hands each to the core, and sends what the core produced at once. That is the cheapest
way to move MDP frames through Python, and it keeps all rules in the core. To embed a broker in
an asyncio program, run `serve()` in a thread (`start_thread()`); the GIL is released while it
polls.
"""

from __future__ import annotations

import contextlib
import logging
import math
import select
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any

import zmq

from mdp import fastzmq
from mdp.broker import boundary
from mdp.broker.core import BrokerConfig, BrokerCore
from mdp.endpoints import check_endpoint, unauthenticated_endpoints
from mdp.errors import MDPError
from mdp.fastzmq import EAGAIN, EHOSTUNREACH, batch_io, readable
from mdp.protocol import DEFAULT_MAX_MSG_SIZE
from mdp.security import BrokerAuth

log = logging.getLogger("mdp.broker")

DEFAULT_SNDHWM = 10_000
BATCH = 256
SHUTDOWN_LINGER_MS = 500
ZMQ_SIZE_FACTOR = 4
"""libzmq reads frames up to this many times --max-msg-size (so the broker can count and log
the oversized ones); beyond it, libzmq drops the connection unseen."""
PROBE_DELAYS = (0.01, 0.1)
"""After libzmq reports a closed connection, workers are probed after these delays: the
socket learns of the closed pipe a moment after the monitor event."""
PROBE_GAP = 0.01


class InsecureBindError(MDPError):
    """The broker was asked to listen on tcp (or another network transport) without CURVE."""


class BrokerServer:
    """An MDP broker serving clients and workers of every version on one ROUTER socket.

    `serve()` blocks until `stop()` is called (from any thread) or, when `handle_signals` is
    true and it runs in the main thread, until SIGINT/SIGTERM. On the way out every worker gets
    DISCONNECT, and the socket closes with a short bounded linger so those can leave.

    `auth` turns on CURVE with ZAP and the per-message role check (mdp.security,
    spec/security.md). Without it, binding anything but ipc:// or inproc:// (tcp on loopback
    included: every local user reaches it) raises `InsecureBindError` before anything is
    bound, unless `insecure` is true. ipc:// sockets are created mode 0600, or 0660 with group
    `ipc_group` (a gid); see `mdp.broker.boundary`.
    """

    def __init__(
        self,
        endpoints: Iterable[str],
        config: BrokerConfig | None = None,
        *,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
        max_msg_size: int = DEFAULT_MAX_MSG_SIZE,
        socket_setup: list[tuple[int, int | bytes]] | None = None,
        auth: BrokerAuth | None = None,
        insecure: bool = False,
        ipc_group: int | None = None,
    ) -> None:
        self.endpoints = list(endpoints)
        if not self.endpoints:
            raise ValueError("a broker needs at least one endpoint to bind")
        for endpoint in self.endpoints:
            check_endpoint(endpoint, bind=True)
        self.core = BrokerCore(config)
        self.max_msg_size = max_msg_size
        self._context = context or zmq.Context.instance()
        self._socket_setup = socket_setup or []
        self.auth = auth
        self.insecure = insecure
        self.ipc_group = ipc_group
        self._socket: zmq.Socket[bytes] | None = None
        self._monitor: zmq.Socket[bytes] | None = None
        self._probes: list[float] = []  # when to probe workers next (spec/mdp.md §4.2)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.bound: list[str] = []
        self.ready = threading.Event()

    # ---------------------------------------------------------------------------------------

    def bind(self) -> list[str]:
        """Create the ROUTER socket and bind every endpoint; return the bound endpoints.

        Raises zmq.ZMQError if an endpoint cannot be bound (the socket is then closed; also
        EADDRINUSE for an ipc path where a broker already answers), InsecureBindError, before
        binding anything, for a network endpoint without `auth`, boundary.GroupError if the
        ipc sockets cannot be given to `ipc_group`, and mdp.security.SecurityError if the ZAP
        handler cannot start.
        """
        auth = self.auth
        open_to_all = unauthenticated_endpoints(self.endpoints) if auth is None else []
        if open_to_all and not self.insecure:
            raise InsecureBindError(boundary.insecure_refusal(open_to_all))
        for endpoint in self.endpoints:
            boundary.check_ipc_free(endpoint)
        if auth is not None:
            # The ZAP handler must exist before the socket can accept a handshake (RFC 27).
            auth.start(self._context)
        sock = self._context.socket(zmq.ROUTER)
        try:
            if auth is not None:
                for option, value in auth.socket_options():
                    sock.setsockopt(option, value)
            sock.setsockopt(zmq.LINGER, 0)
            # Unroutable sends raise instead of vanishing, so we can count them.
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            sock.setsockopt(zmq.MAXMSGSIZE, self.max_msg_size * ZMQ_SIZE_FACTOR)
            sock.setsockopt(zmq.SNDHWM, DEFAULT_SNDHWM)
            for option, value in self._socket_setup:
                sock.setsockopt(option, value)
            for endpoint in self.endpoints:
                with boundary.bind_umask():  # an ipc socket is ours alone from its first moment
                    sock.bind(endpoint)
                bound = sock.getsockopt_string(zmq.LAST_ENDPOINT)
                if self.ipc_group is not None:
                    boundary.share_with_group(bound, self.ipc_group)
                self.bound.append(bound)
        except BaseException:
            sock.close(linger=0)
            if auth is not None:
                auth.stop()
            raise
        self._socket = sock
        self._io = batch_io(sock)
        # ROUTER_NOTIFY needs libzmq's draft API; a monitor's DISCONNECTED event is the
        # portable sign that some peer's connection closed (which one, the probe tells).
        self._monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        if open_to_all:
            self.core.unauthenticated = tuple(unauthenticated_endpoints(self.bound))
            log.warning(boundary.insecure_warning(list(self.core.unauthenticated)))
        return self.bound

    def serve(self, *, handle_signals: bool = False) -> None:
        """Run until stopped. Binds first if `bind()` was not called."""
        if self._socket is None:
            self.bind()
        sock = self._socket
        assert sock is not None
        restore = self._install_signals() if handle_signals else None
        core = self.core
        outbox = core.outbox
        handle = core.handle
        wake_fd = self._wake_r.fileno()
        monitor = self._monitor
        assert monitor is not None
        # One poll() on the sockets' signalling fds and the wake-up pipe. libzmq's fds only say
        # "look again": the rule is that a socket is asked (ZMQ_EVENTS, or a receive that finds
        # nothing, which processes the socket's pending commands the same way) after its last
        # send or receive and before sleeping on its fd, which the drain below does by ending
        # on a receive that found nothing. That costs one check per wake-up instead of
        # zmq_poll's four, and each check is a few system calls.
        monitor_fd = int(monitor.getsockopt(zmq.FD))
        poller = select.poll()
        for fd in (int(sock.getsockopt(zmq.FD)), wake_fd, monitor_fd):
            poller.register(fd, select.POLLIN)
        flush = self._flush
        drain = self._io.drain
        send_from = self._io.send_from
        settle = self._settle
        oversized = self._oversized
        probes = self._probes
        limit = self.max_msg_size
        clock = time.monotonic
        next_tick = core.tick(clock())
        auth = self.auth
        generation = auth.lists.generation if auth is not None else 0
        # The same rule for the monitor: ask it once before the first sleep, or its fd may
        # never signal (the inproc connection's commands arrived before anyone looked).
        self._drain_monitor(monitor, clock())
        self.ready.set()
        compiled, why_not = fastzmq.compiled()
        log.info(
            "broker serving on %s (heartbeat %d ms x %d, request TTL %g s, socket I/O %s, %s)",
            ", ".join(self.bound),
            round(core.config.heartbeat_interval * 1000),
            core.config.liveness,
            core.config.request_ttl,
            "compiled" if compiled else f"in Python: {why_not}",
            "CURVE"
            if auth is not None
            else "UNAUTHENTICATED, --insecure"
            if self.core.unauthenticated
            else "no authentication: ipc/inproc only",
        )

        def on_message(identity: bytes, frames: list[Any]) -> None:
            handle(identity, frames, now)
            if outbox:
                # _flush inline: this is the hot path.
                failed = send_from(outbox, 0)
                if failed is None:
                    outbox.clear()
                else:
                    settle(failed)

        def on_authenticated(identity: bytes, frames: list[Any], user_id: str | None) -> None:
            # Under CURVE: the sender's key (its ZAP User-Id) must still be allowed, in the
            # role its message claims (spec/security.md), before the core sees the message.
            assert auth is not None
            if auth.admit([identity, *frames], user_id):
                on_message(identity, frames)

        now = clock()
        try:
            while not self._stopping:
                now = clock()
                if probes and now >= probes[0]:
                    del probes[0]
                    core.probe(now)
                    flush()
                if now >= next_tick:
                    next_tick = core.tick(now)
                    if auth is not None:
                        auth.prune(core.workers)
                    if outbox:
                        flush()
                # Drain in batches, each reply sent as soon as the core produced it. The drain
                # ends on a receive that found nothing, after the last send: the check libzmq
                # wants before the next sleep.
                if auth is None:
                    drained = drain(BATCH, limit, on_message, oversized, False)
                else:
                    if auth.lists.generation != generation:
                        generation = auth.lists.generation
                        self._expel_revoked(auth)
                    drained = drain(BATCH, limit, on_authenticated, oversized, True)
                    if auth.audit_pending:
                        auth.flush_audit()
                if drained == BATCH:
                    continue  # more may be waiting: no sleep, but timers first
                # Everything waiting was read: only now may a worker found unroutable be
                # forgotten (what it sent before closing, a FINAL, has been handled).
                core.confirm_gone(now)  # it only forgets: nothing to send
                due = min(next_tick, probes[0]) if probes else next_tick
                timeout = max(0, math.ceil((due - clock()) * 1000))
                for fd, _ in poller.poll(timeout):
                    if fd == wake_fd:
                        self._drain_wake()
                    elif fd == monitor_fd:
                        self._drain_monitor(monitor, clock())
            core.disconnect_all()
            self._flush()
        finally:
            with contextlib.suppress(zmq.ZMQError):
                sock.disable_monitor()
            monitor.close(linger=0)
            self._monitor = None
            sock.close(linger=SHUTDOWN_LINGER_MS)
            self._socket = None
            if auth is not None:
                auth.stop()
            self._wake_r.close()
            self._wake_w.close()
            if restore is not None:
                restore()
            counters = core.stats.as_dict()
            if auth is not None:
                counters["refused_by_role_check"] = auth.refused
            log.info("broker stopped; counters: %s", counters)

    def _expel_revoked(self, auth: BrokerAuth) -> None:
        """The allow-lists changed: disconnect and forget workers whose key was revoked."""
        core = self.core
        for identity in auth.revoked_workers():
            worker = core.workers.get(identity)
            if worker is not None:
                log.warning(
                    "worker %s (%s): its key was revoked; disconnected",
                    identity.hex(),
                    worker.service.name.decode("utf-8", "replace"),
                )
                core.expel(identity)

    def _oversized(self, sender: bytes, size: int) -> None:
        self.core.stats.oversized_messages += 1
        log.warning(
            "dropped a message from %s: a frame of %d bytes is over --max-msg-size (%d)",
            sender.hex(),
            size,
            self.max_msg_size,
        )

    def _drain_monitor(self, monitor: zmq.Socket[bytes], now: float) -> None:
        """Consume monitor events; a closed connection schedules the worker probes."""
        closed = False
        while readable(monitor):
            monitor.recv_multipart(zmq.NOBLOCK)  # [event+value, endpoint]: DISCONNECTED only
            closed = True
        if closed and self.core.workers:
            # Coalesced: probes less than PROBE_GAP apart are one, so a burst of closing
            # client connections costs at most one round of probes per PROBE_GAP.
            merged: list[float] = []
            for when in sorted([*self._probes, *(now + d for d in PROBE_DELAYS)]):
                if not merged or when - merged[-1] >= PROBE_GAP:
                    merged.append(when)
            self._probes[:] = merged

    def _flush(self) -> None:
        """Send the core's outbox and clear it."""
        self._settle(self._io.send_from(self.core.outbox, 0))

    def _settle(self, failed: tuple[int, int] | None) -> None:
        """After `send_from(outbox, ...)` returned `failed`: deal with each refused message, send
        the rest, and clear the outbox. Nothing is sent twice: libzmq refuses a message at its
        first frame, and only the messages after a refused one are sent again."""
        core = self.core
        outbox = core.outbox
        send_from = self._io.send_from
        while failed is not None:
            i, err = failed
            if err == EAGAIN:
                # The peer's pipe is full: drop rather than stall every peer.
                core.stats.unroutable += 1
            elif err == EHOSTUNREACH:
                # The peer's connection is gone (ROUTER_MANDATORY): tell the core, which may
                # add messages (a requeued request given to another worker).
                core.unroutable(outbox[i][0], outbox[i], time.monotonic())
            else:
                raise zmq.ZMQError(err)
            failed = send_from(outbox, i + 1)
        outbox.clear()

    # ---------------------------------------------------------------------------------------
    # Stopping

    def stop(self) -> None:
        """Ask the loop to stop; safe from any thread and from signal handlers."""
        self._stopping = True
        # Already closed, or the wake-up pipe is full: either way the loop sees the flag.
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def _drain_wake(self) -> None:
        with contextlib.suppress(OSError):  # BlockingIOError: drained
            while self._wake_r.recv(4096):
                pass

    def _install_signals(self) -> Callable[[], None] | None:
        if threading.current_thread() is not threading.main_thread():
            return None

        def on_signal(signum: int, frame: FrameType | None) -> None:
            log.info("received %s; shutting down", signal.Signals(signum).name)
            self.stop()

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}

        def restore() -> None:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

        return restore

    # ---------------------------------------------------------------------------------------
    # Embedding

    def start_thread(self, timeout: float = 5.0) -> list[str]:
        """Bind, run `serve()` in a daemon thread, and return the bound endpoints."""
        endpoints = self.bind()
        self._thread = threading.Thread(target=self.serve, name="mdp-broker", daemon=True)
        self._thread.start()
        if not self.ready.wait(timeout):
            raise RuntimeError("broker thread did not start")
        return endpoints

    def join(self, timeout: float | None = None) -> None:
        """Stop the broker thread started by `start_thread()` and wait for it."""
        self.stop()
        if self._thread is not None:
            self._thread.join(timeout)
