"""Raw-frame peers for the conformance suite: clients and workers on pyzmq sockets.

Theory of operation: one `Harness` per test owns every socket the test opens. All waiting goes
through `Harness.pump`, which polls every socket at once with a short tick, files what arrives
in the receiving peer's inbox, and sends HEARTBEAT for each live worker that has been quiet for
half an interval (RFC 7/18, Heartbeating: both sides MUST heartbeat). Nothing ever blocks
without a deadline, and no test sleeps to synchronise: a wait is either "until this arrives or
the deadline passes" or a documented quiet window in which nothing may arrive.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import zmq

from mdp_conformance.wire import (
    CLIENT_DIALECTS,
    FINAL_COMMAND,
    WORKER_DIALECTS,
    ClientDialect,
    Incoming,
    Reply,
    WorkerDialect,
    client_request,
    parse_client_reply,
    parse_worker_incoming,
    show,
    worker_command,
    worker_reply,
)

# How long a positive expectation ("this reply arrives") may take. Generous: the machine may
# be busy; a passing test returns as soon as the frames are there.
REPLY_TIMEOUT = 5.0


@dataclass(frozen=True)
class BrokerTarget:
    """What the suite knows about the broker under test: only its endpoint and the settings
    the user told it (or that it passed on the command line it started)."""

    endpoint: str
    heartbeat: float  # seconds
    liveness: int
    request_ttl: float | None  # seconds; None when unknown
    quiet: float  # seconds: the window in which "nothing arrives" is checked

    @property
    def expiry_window(self) -> float:
        """How long after a worker's last command the broker must have expired it: interval x
        liveness (RFC 7/18, Heartbeating), plus one interval for a broker that checks its
        timers once per interval, plus 250 ms of scheduling slack for a loaded machine."""
        return self.heartbeat * (self.liveness + 1) + 0.25


def unique(kind: str) -> bytes:
    """A name no other test (or earlier run against the same broker) uses."""
    return f"conf.{kind}.{secrets.token_hex(5)}".encode()


class Peer:
    """One socket and the messages that arrived on it, in order."""

    def __init__(self, harness: Harness, sock: zmq.Socket[bytes], identity: bytes) -> None:
        self.harness = harness
        self.sock = sock
        self.identity = identity
        self.closed = False
        self.raw: deque[list[bytes]] = deque()

    def send(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)

    def accept(self, frames: list[bytes], at: float, earliest: float) -> None:
        """File one message, read at `at`; it cannot have arrived before `earliest`."""
        self.raw.append(frames)

    def tick(self, now: float) -> None:
        """Called on every pump round; workers heartbeat here."""

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.sock.close(linger=0)

    def recv_raw(self, timeout: float = REPLY_TIMEOUT) -> list[bytes]:
        self.harness.wait_for(lambda: self.raw, timeout, f"a message on {self.identity!r}")
        return self.raw.popleft()

    def expect_no_raw(self, window: float | None = None) -> None:
        """Nothing at all arrives on this socket for the quiet window."""
        self.harness.pump_for(self.harness.target.quiet if window is None else window)
        assert not self.raw, f"{self.identity!r} expected nothing, got {show(self.raw[0])}"


class Client(Peer):
    """An MDP client speaking `dialect` on a DEALER (or, for RFC 7, a REQ) socket."""

    def __init__(
        self, harness: Harness, sock: zmq.Socket[bytes], identity: bytes, dialect: ClientDialect
    ) -> None:
        super().__init__(harness, sock, identity)
        self.dialect = dialect
        self.replies: deque[Reply] = deque()

    def accept(self, frames: list[bytes], at: float, earliest: float) -> None:
        # A reply that breaks the dialect's layout fails the test right here (WireError).
        self.replies.append(parse_client_reply(self.dialect, frames))

    def request(self, service: bytes, *body: bytes) -> None:
        self.send(client_request(self.dialect, service, list(body)))

    def recv(self, timeout: float = REPLY_TIMEOUT) -> Reply:
        """The next PARTIAL/FINAL/REPLY, within `timeout`."""
        self.harness.wait_for(lambda: self.replies, timeout, f"a reply on client {self.identity!r}")
        return self.replies.popleft()

    def recv_final(self, timeout: float = REPLY_TIMEOUT) -> tuple[list[Reply], Reply]:
        """Every PARTIAL up to the FINAL, and the FINAL."""
        partials: list[Reply] = []
        deadline = time.monotonic() + timeout
        while True:
            reply = self.recv(max(0.0, deadline - time.monotonic()))
            if reply.final:
                return partials, reply
            partials.append(reply)

    def call(self, service: bytes, *body: bytes, timeout: float = REPLY_TIMEOUT) -> Reply:
        """REQUEST, then the FINAL (PARTIALs are dropped)."""
        self.request(service, *body)
        return self.recv_final(timeout)[1]

    def expect_silence(self, window: float | None = None) -> None:
        """No reply at all arrives within the window (the target's quiet window by default)."""
        self.harness.pump_for(self.harness.target.quiet if window is None else window)
        assert not self.replies, (
            f"client {self.identity!r} expected no reply, got {show(self.replies[0].frames)}"
        )


class Worker(Peer):
    """An MDP worker speaking `dialect` on a DEALER socket.

    Broker HEARTBEATs are recorded in `heartbeats` (with arrival times) and kept out of
    `inbox`; REQUEST and DISCONNECT go to `inbox`. Once DISCONNECT arrives the worker stops
    heartbeating (RFC 7/18: it must send no further commands) and everything received after
    it is also recorded in `after_disconnect`.
    """

    def __init__(
        self,
        harness: Harness,
        sock: zmq.Socket[bytes],
        identity: bytes,
        dialect: WorkerDialect,
        heartbeat: bool,
    ) -> None:
        super().__init__(harness, sock, identity)
        self.dialect = dialect
        self.version = dialect.version
        self.auto_heartbeat = heartbeat
        self.last_sent = time.monotonic()
        self.inbox: deque[Incoming] = deque()
        self.heartbeats: list[float] = []
        self.disconnected = False  # the broker sent DISCONNECT
        self.said_disconnect_at: float | None = None  # when we sent DISCONNECT
        self.after_disconnect: list[Incoming] = []  # received after the broker's DISCONNECT
        # received after ours, each with the earliest moment it can have arrived
        self.after_own_disconnect: list[tuple[float, Incoming]] = []
        self.service: bytes | None = None

    # -- sending
    def send(self, frames: list[bytes]) -> None:
        super().send(frames)
        self.last_sent = time.monotonic()

    def command(self, command: str, *args: bytes) -> None:
        self.send(worker_command(self.dialect, command, *args))

    def ready(self, service: bytes) -> None:
        self.service = service
        self.command("READY", service)

    def heartbeat(self) -> None:
        self.command("HEARTBEAT")

    def disconnect(self) -> None:
        self.command("DISCONNECT")
        self.said_disconnect_at = time.monotonic()

    def reply(self, command: str, client: bytes, *body: bytes) -> None:
        self.send(worker_reply(self.dialect, command, client, list(body)))

    def final(self, client: bytes, *body: bytes) -> None:
        """REPLY (0.1) or FINAL (0.2)."""
        self.reply(FINAL_COMMAND[self.version], client, *body)

    def partial(self, client: bytes, *body: bytes) -> None:
        self.reply("PARTIAL", client, *body)

    # -- receiving
    def accept(self, frames: list[bytes], at: float, earliest: float) -> None:
        incoming = parse_worker_incoming(self.dialect, frames, at)
        if self.disconnected:
            self.after_disconnect.append(incoming)
        if self.said_disconnect_at is not None:
            self.after_own_disconnect.append((earliest, incoming))
        if incoming.command == "HEARTBEAT":
            self.heartbeats.append(at)
            return
        if incoming.command == "DISCONNECT":
            self.disconnected = True
        self.inbox.append(incoming)

    def tick(self, now: float) -> None:
        if (
            self.auto_heartbeat
            and self.service is not None  # HEARTBEAT is valid only after READY
            and not self.disconnected
            and self.said_disconnect_at is None
            and now - self.last_sent >= self.harness.target.heartbeat / 2
        ):
            self.heartbeat()

    def recv(self, timeout: float = REPLY_TIMEOUT) -> Incoming:
        """The next REQUEST or DISCONNECT (HEARTBEATs are recorded, not returned)."""
        self.harness.wait_for(lambda: self.inbox, timeout, f"a command on worker {self.identity!r}")
        return self.inbox.popleft()

    def expect_request(self, timeout: float = REPLY_TIMEOUT) -> Incoming:
        incoming = self.recv(timeout)
        assert incoming.command == "REQUEST", (
            f"worker {self.identity!r} expected REQUEST, got {show(incoming.frames)}"
        )
        return incoming

    def expect_disconnect(self, timeout: float = REPLY_TIMEOUT) -> Incoming:
        incoming = self.recv(timeout)
        assert incoming.command == "DISCONNECT", (
            f"worker {self.identity!r} expected DISCONNECT, got {show(incoming.frames)}"
        )
        return incoming

    def expect_no_request(self, window: float | None = None, allow_disconnect: bool = True) -> None:
        """No REQUEST arrives within the window. HEARTBEATs are ignored; a DISCONNECT is
        tolerated when `allow_disconnect` (the broker MAY send one at any time)."""
        self.harness.pump_for(self.harness.target.quiet if window is None else window)
        for incoming in self.inbox:
            if incoming.command == "DISCONNECT" and allow_disconnect:
                continue
            raise AssertionError(
                f"worker {self.identity!r} expected no request, got {show(incoming.frames)}"
            )

    def expect_nothing_after_disconnect(self, window: float | None = None) -> None:
        """RFC 7/18: after DISCONNECT the broker sends that worker no further commands, not
        even HEARTBEAT. Watches the socket for the quiet window."""
        assert self.disconnected, "the broker never sent DISCONNECT"
        self.harness.pump_for(self.harness.target.quiet if window is None else window)
        assert not self.after_disconnect, (
            f"worker {self.identity!r} got a command after DISCONNECT: "
            f"{show(self.after_disconnect[0].frames)}"
        )

    def expect_nothing_after_own_disconnect(self, window: float | None = None) -> None:
        """RFC 7/18: once the broker has our DISCONNECT it sends us no further commands. Watches
        the socket for the quiet window. One HEARTBEAT is tolerated if it is the first thing
        that came and may have arrived within half an interval of our DISCONNECT: the broker
        can have sent it before our DISCONNECT reached it (a broker heartbeats at most once
        per interval, so a later one would be a new send)."""
        assert self.said_disconnect_at is not None, "the worker never sent DISCONNECT"
        sent = self.said_disconnect_at
        self.harness.pump_for(self.harness.target.quiet if window is None else window)
        late = [incoming for _, incoming in self.after_own_disconnect]
        if late and late[0].command == "HEARTBEAT":
            earliest = self.after_own_disconnect[0][0]
            if earliest - sent <= self.harness.target.heartbeat / 2:
                late = late[1:]
        assert not late, f"worker {self.identity!r} got a command after its DISCONNECT: " + show(
            late[0].frames
        )

    def close(self) -> None:
        # Leave the broker tidy: a worker that is still registered says goodbye (RFC 7/18: the
        # worker MAY send DISCONNECT at any time).
        if not self.closed and not self.disconnected and self.said_disconnect_at is None:
            with contextlib.suppress(zmq.Again):  # never block a teardown
                self.sock.send_multipart(worker_command(self.dialect, "DISCONNECT"), zmq.NOBLOCK)
            self.closed = True
            self.sock.close(linger=100)
            return
        super().close()


class Harness:
    """Every socket one test opens, polled together."""

    def __init__(
        self,
        context: zmq.Context[zmq.Socket[bytes]],
        target: BrokerTarget,
        dead: Callable[[], bool] = lambda: False,
    ) -> None:
        self.context = context
        self.target = target
        self.dead = dead
        """True once the broker under test has exited (a broker the suite started): a wait
        for something from it then ends at once instead of at its deadline."""
        self.peers: list[Peer] = []
        self._by_socket: dict[zmq.Socket[bytes], Peer] = {}
        self._poller: zmq.Poller | None = None
        self.tick_s = min(0.02, target.heartbeat / 4)
        self._last_poll_return = time.monotonic()

    # -- peers
    def _socket(self, socket_type: int, identity: bytes) -> zmq.Socket[bytes]:
        sock: zmq.Socket[bytes] = self.context.socket(socket_type)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTING_ID, identity)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.connect(self.target.endpoint)
        return sock

    def _add(self, peer: Peer) -> None:
        self.peers.append(peer)
        self._by_socket[peer.sock] = peer
        self._poller = None

    def client(
        self, version: str = "0.2", dialect: ClientDialect | None = None, req: bool = False
    ) -> Client:
        """A client of `version` (or an explicit dialect). `req=True` uses a REQ socket."""
        dialect = dialect or CLIENT_DIALECTS[version]
        identity = b"client-" + secrets.token_hex(6).encode()
        sock = self._socket(zmq.REQ if req else zmq.DEALER, identity)
        peer = Client(self, sock, identity, dialect)
        self._add(peer)
        return peer

    def worker(
        self,
        version: str = "0.2",
        service: bytes | None = None,
        dialect: WorkerDialect | None = None,
        heartbeat: bool = True,
    ) -> Worker:
        """A worker of `version`; sends READY for `service` when one is given. With
        `heartbeat=False` it never heartbeats on its own (for the expiry tests)."""
        dialect = dialect or WORKER_DIALECTS[version]
        identity = b"worker-" + secrets.token_hex(6).encode()
        peer = Worker(self, self._socket(zmq.DEALER, identity), identity, dialect, heartbeat)
        self._add(peer)
        if service is not None:
            peer.ready(service)
        return peer

    def raw(self) -> Peer:
        """A DEALER that sends whatever the test gives it and keeps what it receives unparsed."""
        identity = b"raw-" + secrets.token_hex(6).encode()
        peer = Peer(self, self._socket(zmq.DEALER, identity), identity)
        self._add(peer)
        return peer

    def close_peer(self, peer: Peer) -> None:
        peer.close()
        self._by_socket.pop(peer.sock, None)
        self._poller = None

    def close(self) -> None:
        for peer in self.peers:
            peer.close()
        self.peers.clear()
        self._by_socket.clear()

    # -- waiting
    def pump(self, timeout: float) -> None:
        """One round: heartbeat due workers, poll every socket up to `timeout`, file what came."""
        now = time.monotonic()
        for peer in self._by_socket.values():
            peer.tick(now)
        if self._poller is None:
            self._poller = zmq.Poller()
            for sock in self._by_socket:
                self._poller.register(sock, zmq.POLLIN)
        # Whatever this round reads was not there when the previous poll returned (everything
        # readable then was drained), so that moment bounds its arrival from below.
        earliest = self._last_poll_return
        ready = self._poller.poll(max(0, int(timeout * 1000)))
        at = self._last_poll_return = time.monotonic()
        for sock, _ in ready:
            peer = self._by_socket[sock]
            while True:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                except zmq.ZMQError as exc:
                    if exc.errno == zmq.EFSM:  # a REQ socket holds one reply per request
                        break
                    raise
                peer.accept(frames, at, earliest)

    def pump_for(self, window: float) -> None:
        """Keep every peer serviced (heartbeats, inboxes) for `window` seconds."""
        deadline = time.monotonic() + window
        while (remaining := deadline - time.monotonic()) > 0:
            self.pump(min(remaining, self.tick_s))

    def wait_for(self, predicate: Callable[[], object], timeout: float, what: str) -> None:
        """Pump until `predicate()` is truthy; fail the test after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out after {timeout:.2f}s waiting for {what}")
            if self.dead():
                # The runner reports the death itself (with the broker's last output).
                raise AssertionError(f"the broker exited while waiting for {what}")
            self.pump(min(remaining, self.tick_s))

    # -- common checks
    def round_trip(
        self,
        service: bytes,
        client_version: str = "0.2",
        worker_version: str = "0.2",
    ) -> None:
        """A normal request through a fresh worker and a fresh client round-trips.

        Requests left over from the test (for example one the broker re-queued after
        disconnecting a worker that held it) may reach the fresh worker first; it answers them
        like any worker would and keeps waiting for ours.
        """
        worker = self.worker(worker_version, service)
        client = self.client(client_version)
        marker = b"round-trip-" + secrets.token_hex(4).encode()
        client.request(service, marker)
        deadline = time.monotonic() + REPLY_TIMEOUT
        while True:
            request = worker.expect_request(max(0.0, deadline - time.monotonic()))
            worker.final(request.client, b"echo", *request.body)
            if request.body == [marker]:
                break
        reply = client.recv(REPLY_TIMEOUT)
        assert reply.final, f"expected the final reply, got {show(reply.frames)}"
        assert reply.service == service
        assert reply.body == [b"echo", marker]
        self.close_peer(client)
        self.close_peer(worker)
