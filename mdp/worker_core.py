"""The worker side of MDP as a pure state machine: one worker connection, time passed in.

No sockets and no clock reads. The caller (`mdp.worker`) feeds in what happened -- frames from
the broker, a handler's PARTIAL or FINAL, the passing of time, a shutdown request -- together
with `now` (monotonic seconds), and carries out the actions it gets back, in order. `deadline`
says when `tick()` must be called next at the latest.

Theory of operation
-------------------
RFC 7 and RFC 18 give a worker one DEALER socket per conversation with the broker, one READY per
socket, and at most one request at a time. Heartbeats flow both ways independently of that
dialog, and a DISCONNECT from the broker -- or a broker that stays silent too long -- means
"close this socket and start again on a new one". Every transition below cites the clause.

States (a connection is always in exactly one):

    BACKOFF   no socket; a new one is opened at `reconnect_at`
    IDLE      socket open, READY sent, waiting for a REQUEST
    BUSY      socket open, a handler is running for one REQUEST
    ORPHANED  the socket was dropped (broker dead or DISCONNECT) while a handler was running;
              its reply can reach nobody, so a new socket is opened only once it has ended
              (the connection still takes at most one request at a time)
    PAUSED    no socket, on purpose: the process runs all it may (a global concurrency limit,
              `pause`), so this connection asks no broker for work until `resume`
    CLOSED    stopped for good

Transitions (everything else is ignored, see `receive`):

    state     event                         actions                          next
    --------  ----------------------------  -------------------------------  --------
    (new)     start                         OpenSocket, Send READY           IDLE
    BACKOFF   tick >= reconnect_at          OpenSocket, Send READY           IDLE
    IDLE      REQUEST                       Dispatch                         BUSY
    IDLE|BUSY any valid command but DISCONNECT  (refreshes broker liveness)  same
    IDLE      DISCONNECT | broker silent    CloseSocket                      BACKOFF
    BUSY      DISCONNECT | broker silent    CloseSocket                      ORPHANED
    IDLE|BUSY tick >= heartbeat due         Send HEARTBEAT                   same
    BUSY      handler PARTIAL (0.2 only)    Send PARTIAL                     BUSY
    BUSY      handler FINAL                 Send FINAL                       IDLE
    ORPHANED  handler FINAL                 (reply dropped)                  BACKOFF
    IDLE      pause                         Send DISCONNECT, CloseSocket     PAUSED
    PAUSED    resume                        OpenSocket, Send READY           IDLE
    PAUSED    shutdown                      -                                CLOSED
    IDLE      shutdown                      Send DISCONNECT, CloseSocket     CLOSED
    BACKOFF   shutdown                      -                                CLOSED
    BUSY      shutdown                      (stopping: finish, then)         BUSY
    BUSY*     handler FINAL                 Send FINAL, DISCONNECT, Close    CLOSED
    ORPHANED* handler FINAL                 -                                CLOSED
    BUSY*|ORPHANED*  tick >= cancel_at      Cancel (once)                    same
    BUSY*|ORPHANED*  tick >= abandon_at     (Send DISCONNECT, CloseSocket)   CLOSED

(* = shutdown requested.) Backoff: the first reconnection waits `backoff_initial`, each further
one without any traffic from the broker in between doubles it, up to `backoff_max`; any valid
command from the broker resets it.

Pausing is how a worker says "busy" the RFC way: MDP has no such command, and an idle
registered connection may be handed a request at any time, so a connection that must take no
work unregisters (RFC 7/18: the worker MAY send DISCONNECT at any time) and sends READY again
on a new socket (one READY per socket) when there is room. A REQUEST already on its way when we
close is dropped with the socket, unstarted; the broker counts it lost with the worker and the
client's retry rule applies (it never started, so it is re-sent).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from mdp.errors import ProtocolError
from mdp.protocol import (
    HEARTBEAT_INTERVAL,
    HEARTBEAT_LIVENESS,
    Command,
    Version,
    parse_broker_message,
    worker_framing,
)

__all__ = [
    "Action",
    "Cancel",
    "CloseSocket",
    "Dispatch",
    "OpenSocket",
    "Send",
    "State",
    "Stats",
    "WorkerConfig",
    "WorkerCore",
]

# After a handler was cancelled at the end of the shutdown grace period, how long we still wait
# for it to return before closing the connection without its reply.
CANCEL_WAIT = 1.0


class State(enum.Enum):
    BACKOFF = "backoff"
    IDLE = "idle"
    BUSY = "busy"
    ORPHANED = "orphaned"
    PAUSED = "paused"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class OpenSocket:
    """Create a new DEALER socket and connect it to the broker."""


@dataclass(frozen=True, slots=True)
class CloseSocket:
    """Close the current socket with linger 0; never use it again."""


@dataclass(frozen=True, slots=True)
class Send:
    """Send these frames on the current socket."""

    frames: list[bytes]


@dataclass(frozen=True, slots=True)
class Dispatch:
    """Run the handler for a REQUEST. `token` identifies it in `partial`/`final`/`Cancel`."""

    token: int
    client: bytes
    body: list[bytes]


@dataclass(frozen=True, slots=True)
class Cancel:
    """The shutdown grace period is over: cancel the handler running request `token`."""

    token: int


Action = OpenSocket | CloseSocket | Send | Dispatch | Cancel


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """Timing of one worker connection, in seconds. The interval and liveness must match the
    broker's (RFC 7/18: "agreed-upon intervals")."""

    service: bytes
    version: Version = Version.V02
    heartbeat_interval: float = HEARTBEAT_INTERVAL
    liveness: int = HEARTBEAT_LIVENESS
    backoff_initial: float = 0.1
    backoff_max: float = 4.0

    def __post_init__(self) -> None:
        if self.heartbeat_interval <= 0 or self.liveness < 1:
            raise ValueError("heartbeat interval and liveness must be positive")
        if not 0 < self.backoff_initial <= self.backoff_max:
            raise ValueError("need 0 < backoff_initial <= backoff_max")

    @property
    def broker_timeout(self) -> float:
        """Silence after which the broker is considered dead."""
        return self.heartbeat_interval * self.liveness


@dataclass(slots=True)
class Stats:
    """Counters a driver may log or expose."""

    requests: int = 0
    replies_dropped: int = 0
    invalid_messages: int = 0
    unexpected_requests: int = 0
    reconnects: int = 0


class WorkerCore:
    """One worker connection's protocol decisions. See the module docstring."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.state = State.BACKOFF
        self.stats = Stats()
        self.stopping = False
        self.drop_reason = ""  # why the last socket was dropped, for logs
        self._framing = worker_framing(config.version)
        self._started = False
        self._heard = False  # any valid command from the broker on the current socket
        self._last_send = 0.0
        self._last_recv = 0.0
        self._reconnect_at = 0.0
        self._backoff = config.backoff_initial
        self._token = 0  # of the request being handled; 0 when none
        self._next_token = 1
        self._client = b""
        self._cancel_at = math.inf
        self._cancel_sent = False

    # ---------------------------------------------------------------------------------------
    # Queries

    @property
    def busy(self) -> bool:
        """A handler is running (whether or not its reply can still be delivered)."""
        return self._token != 0

    @property
    def current_token(self) -> int:
        """Token of the request being handled, 0 when none."""
        return self._token

    @property
    def heard_from_broker(self) -> bool:
        """The broker sent a valid command on the current socket (READY has no answer, so this
        is the first sign that it is there)."""
        return self._heard and (self.state is State.IDLE or self.state is State.BUSY)

    @property
    def streaming(self) -> bool:
        """PARTIALs exist in this connection's protocol version (RFC 18 only)."""
        return self.config.version is Version.V02

    @property
    def deadline(self) -> float:
        """When `tick` must be called next (math.inf: only when something else happens)."""
        s = self.state
        if s is State.BACKOFF:
            return self._reconnect_at
        if s is State.IDLE or s is State.BUSY:
            due = min(
                self._last_send + self.config.heartbeat_interval,
                self._last_recv + self.config.broker_timeout,
            )
            return min(due, self._stop_deadline())
        if s is State.ORPHANED:
            return self._stop_deadline()
        return math.inf

    def _stop_deadline(self) -> float:
        if not self.stopping or not self.busy:
            return math.inf
        return self._cancel_at + CANCEL_WAIT if self._cancel_sent else self._cancel_at

    # ---------------------------------------------------------------------------------------
    # Events

    def start(self, now: float) -> list[Action]:
        """Open the first connection (RFC 7/18: a new socket, then READY)."""
        if self._started:
            return []
        self._started = True
        return self._connect(now)

    def receive(self, frames: list[bytes], now: float) -> list[Action]:
        """Frames arrived on the current socket."""
        if self.state is not State.IDLE and self.state is not State.BUSY:
            return []  # a stale socket's leftovers; the driver should not even deliver these
        try:
            message = parse_broker_message(self.config.version, frames)
        except ProtocolError:
            # RFC 7/18: invalid messages are dropped; they do not prove the broker alive.
            self.stats.invalid_messages += 1
            return []
        if message.command is Command.DISCONNECT:
            # RFC 7/18: send nothing more, close the socket, reconnect on a new one.
            self.drop_reason = "DISCONNECT from the broker"
            return self._drop_socket(now)
        # RFC 7/18: any received command except DISCONNECT acts as a heartbeat.
        self._last_recv = now
        self._heard = True
        self._backoff = self.config.backoff_initial
        if message.command is Command.REQUEST:
            if self.state is State.BUSY:
                # The broker gave us a second request while we hold one: RFC 7/18 forbid it.
                # We cannot take it and cannot reply to it for the broker; drop and count.
                self.stats.unexpected_requests += 1
                return []
            token = self._next_token
            self._next_token += 1
            self._token = token
            self._client = message.client
            self.state = State.BUSY
            self.stats.requests += 1
            return [Dispatch(token, message.client, message.body or [])]
        return []  # HEARTBEAT

    def partial(self, token: int, body: list[bytes], now: float) -> list[Action]:
        """The handler of request `token` produced a PARTIAL body (dropped under MDP/0.1)."""
        if token != self._token or self.state is not State.BUSY or not self.streaming:
            return []
        return [self._send(self._framing.addressed(Command.PARTIAL, self._client, body), now)]

    def final(self, token: int, body: list[bytes], now: float) -> list[Action]:
        """The handler of request `token` ended with this FINAL body (RFC 7: REPLY)."""
        if token != self._token:
            return []
        self._token = 0
        self._cancel_sent = False
        if self.state is State.ORPHANED:
            self.stats.replies_dropped += 1
            if self.stopping:
                self.state = State.CLOSED
                return []
            self.state = State.BACKOFF
            self._reconnect_at = max(self._reconnect_at, now)
            return []
        actions: list[Action] = [
            self._send(self._framing.addressed(Command.FINAL, self._client, body), now)
        ]
        self._client = b""
        if self.stopping:
            actions += self._close(now)
        else:
            self.state = State.IDLE
        return actions

    def tick(self, now: float) -> list[Action]:
        """Time passed: heartbeat, detect a dead broker, reconnect, enforce the grace period."""
        s = self.state
        if s is State.CLOSED:
            return []
        if self.stopping and self.busy:
            if self._cancel_sent and now >= self._cancel_at + CANCEL_WAIT:
                # The cancelled handler did not return: give up on its reply.
                self._token = 0
                self.stats.replies_dropped += 1
                if s is State.ORPHANED:
                    self.state = State.CLOSED
                    return []
                return self._close(now)
            if not self._cancel_sent and now >= self._cancel_at:
                self._cancel_sent = True
                return [Cancel(self._token)]
        if s is State.BACKOFF:
            if now >= self._reconnect_at:
                self.stats.reconnects += 1
                return self._connect(now)
            return []
        if s is State.IDLE or s is State.BUSY:
            if now >= self._last_recv + self.config.broker_timeout:
                # RFC 7/18: no heartbeat within liveness intervals -> the broker is disconnected;
                # the worker SHOULD restart a new conversation.
                self.drop_reason = f"silent for {self.config.broker_timeout:g}s"
                return self._drop_socket(now)
            if now >= self._last_send + self.config.heartbeat_interval:
                # RFC 7/18: both sides MUST heartbeat at the agreed interval; we send one only
                # when nothing else went out for a whole interval.
                return [self._send(self._framing.command(Command.HEARTBEAT), now)]
        return []

    def shutdown(self, now: float, grace: float) -> list[Action]:
        """Stop taking requests; let a running handler finish within `grace` seconds."""
        if self.state is State.CLOSED:
            return []
        if not self.stopping:
            self.stopping = True
            self._cancel_at = now + grace
        else:
            self._cancel_at = min(self._cancel_at, now + grace)
        if self.state is State.IDLE:
            return self._close(now)
        if self.state is State.BACKOFF or self.state is State.PAUSED:
            self.state = State.CLOSED
            return []
        return self.tick(now)

    def pause(self, now: float) -> list[Action]:
        """Take no work until `resume` (see the module docstring); only an IDLE connection
        pauses: a BUSY one is not asking for work, and one in BACKOFF is not registered."""
        if self.state is not State.IDLE or self.stopping:
            return []
        self.state = State.PAUSED
        return [self._send(self._framing.command(Command.DISCONNECT), now), CloseSocket()]

    def resume(self, now: float) -> list[Action]:
        """Ask for work again after `pause`: a new socket and READY."""
        if self.state is not State.PAUSED:
            return []
        return self._connect(now)  # BUSY/ORPHANED: maybe the (new) grace is already over

    # ---------------------------------------------------------------------------------------
    # Helpers

    def _send(self, frames: list[bytes], now: float) -> Send:
        self._last_send = now
        return Send(frames)

    def _connect(self, now: float) -> list[Action]:
        self.state = State.IDLE
        self._heard = False
        self._last_recv = now  # the broker gets a full liveness period to show up
        return [
            OpenSocket(),
            self._send(self._framing.command(Command.READY, self.config.service), now),
        ]

    def _drop_socket(self, now: float) -> list[Action]:
        if self.stopping and not self.busy:
            self.state = State.CLOSED
            return [CloseSocket()]
        self._reconnect_at = now + self._backoff
        self._backoff = min(self._backoff * 2, self.config.backoff_max)
        self.state = State.ORPHANED if self.busy else State.BACKOFF
        return [CloseSocket()]

    def _close(self, now: float) -> list[Action]:
        """RFC 7/18: the worker MAY send DISCONNECT at any time; then close for good."""
        self.state = State.CLOSED
        return [self._send(self._framing.command(Command.DISCONNECT), now), CloseSocket()]
