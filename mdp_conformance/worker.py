"""The worker under test, and the suite playing its broker.

Theory of operation: every case binds a fresh ROUTER socket on a free loopback endpoint and
starts the worker command against it, so no case inherits another's connection state. All
waiting goes through `BrokerSide.pump`, which polls the ROUTER with a short tick, files every
message with its arrival time, and heartbeats each registered worker once per interval, as a
broker MUST (RFC 7/18, Heartbeating) - unless the rule told it to fall silent.

The worker's framing is learned from its READY: RFC 7 ("" MDPW01 ...), RFC 18 (MDPW02 ...),
or a 0.2 worker keeping RFC 7's empty frame (majortomo's). Only the READY rule judges the
framing; every other rule talks to the worker in the framing it chose, so one framing defect
costs one rule.

The service contract (docs/conformance.md): the worker serves `{service}` as an echo - the
FINAL (0.1: REPLY) body is the request body, frame for frame - and a request whose body is
the two frames `SLEEP_FRAME` and a decimal number of milliseconds is answered (with the same
echo) only after that long, so the suite can watch the worker while it is busy.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field

import zmq

from mdp_conformance.process import Started, StartError, expand, free_endpoint, placeholders
from mdp_conformance.rules import VERSIONS, Case
from mdp_conformance.wire import EMPTY, WORKER_COMMANDS, WORKER_HEADER, show

SLEEP_FRAME = b"MDP-CONFORMANCE-SLEEP"
"""First frame of a request that asks the worker under test to take a while before its FINAL."""

DEFAULT_HEARTBEAT_MS = 100
DEFAULT_LIVENESS = 3
DEFAULT_SERVICE = "echo"
START_TIMEOUT = 15.0  # a cold interpreter on a loaded machine; only a broken worker waits it out
REPLY_TIMEOUT = 10.0  # generous: a passing rule returns as soon as the reply is there


@dataclass
class Message:
    """One message from a worker, as the broker's ROUTER received it."""

    identity: bytes
    frames: list[bytes]
    at: float
    version: str | None = None  # None: no MDP worker header where one belongs
    envelope: bool = False  # a leading empty frame before the header
    command: str | None = None  # READY, HEARTBEAT, REPLY, PARTIAL, FINAL, DISCONNECT
    args: list[bytes] = field(default_factory=list)

    def __str__(self) -> str:
        return show(self.frames)


def parse(identity: bytes, frames: list[bytes], at: float) -> Message:
    message = Message(identity, frames, at)
    i = 1 if frames and frames[0] == EMPTY else 0
    if len(frames) < i + 2:
        return message
    for version, header in WORKER_HEADER.items():
        if frames[i] == header:
            names = {byte: name for name, byte in WORKER_COMMANDS[version].items()}
            message.version = version
            message.envelope = i == 1
            message.command = names.get(frames[i + 1])
            message.args = frames[i + 2 :]
    return message


@dataclass(frozen=True)
class Framing:
    """How the worker under test lays out its commands (learned from its READY)."""

    version: str
    envelope: bool

    def head(self, command: str) -> list[bytes]:
        byte = WORKER_COMMANDS[self.version][command]
        header = WORKER_HEADER[self.version]
        return [EMPTY, header, byte] if self.envelope else [header, byte]


@dataclass(frozen=True)
class WorkerSettings:
    command: str
    versions: tuple[str, ...] = VERSIONS
    service: str = DEFAULT_SERVICE
    heartbeat_ms: int | None = None
    liveness: int | None = None


class BrokerSide:
    """The suite as the worker's broker, for one case: a ROUTER and the worker process."""

    def __init__(
        self,
        context: zmq.Context[zmq.Socket[bytes]],
        settings: WorkerSettings,
        version: str,
        heartbeat: float,
        liveness: int,
    ) -> None:
        self.version = version
        self.service = settings.service.encode()
        self.heartbeat = heartbeat
        self.liveness = liveness
        self.endpoint = free_endpoint()
        self.router: zmq.Socket[bytes] = context.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a vanished peer raises
        self.router.bind(self.endpoint)
        self.messages: list[Message] = []  # everything, in arrival order
        self.framings: dict[bytes, Framing] = {}  # identity -> framing of its READY
        self.silent = False  # True: the suite stops heartbeating (the broker "went away")
        self._last_sent: dict[bytes, float] = {}
        self.tick = min(0.02, heartbeat / 4)
        values = {
            "endpoint": self.endpoint,
            "service": settings.service,
            "heartbeat_ms": str(round(heartbeat * 1000)),
            "liveness": str(liveness),
            "mdp_version": version,
        }
        self.process = Started(expand(settings.command, values), "worker")

    # -- receiving
    def pump(self, timeout: float) -> None:
        now = time.monotonic()
        if not self.silent:
            for identity in self.framings:
                if now - self._last_sent.get(identity, 0.0) >= self.heartbeat:
                    self.send(identity, "HEARTBEAT")
        if self.router.poll(max(0, int(timeout * 1000)), zmq.POLLIN):
            at = time.monotonic()
            while True:
                try:
                    identity, *frames = self.router.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                message = parse(identity, frames, at)
                self.messages.append(message)
                if message.command == "READY" and message.version is not None:
                    self.framings[identity] = Framing(message.version, message.envelope)
                    self._last_sent[identity] = at

    def pump_for(self, window: float) -> None:
        deadline = time.monotonic() + window
        while (remaining := deadline - time.monotonic()) > 0:
            self.pump(min(remaining, self.tick))

    def wait_for(self, find: Callable[[], Message | None], timeout: float, what: str) -> Message:
        """Pump until `find()` returns a message; fail the rule after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while (found := find()) is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                seen = ", ".join(str(m) for m in self.messages[-3:]) or "nothing at all"
                raise AssertionError(
                    f"timed out after {timeout:.2f}s waiting for {what}; last seen: {seen}"
                )
            if not self.process.alive():
                raise AssertionError(f"the worker exited while the suite waited for {what}")
            self.pump(min(remaining, self.tick))
        return found

    def next_message(
        self, since: int, match: Callable[[Message], bool]
    ) -> Callable[[], Message | None]:
        """A finder for the first message at index >= `since` that `match`es."""

        def find() -> Message | None:
            return next((m for m in self.messages[since:] if match(m)), None)

        return find

    def ready(self, timeout: float = START_TIMEOUT, since: int = 0) -> Message:
        """The first READY (from any connection) at index >= `since`."""
        return self.wait_for(
            self.next_message(since, lambda m: m.command == "READY"), timeout, "READY"
        )

    def registered(self) -> Message:
        """The worker's READY, once it is registered with the service the suite expects."""
        ready = self.ready()
        assert ready.args == [self.service], (
            f"READY names {ready.args!r}, the worker was told {self.service!r}: {ready}"
        )
        return ready

    # -- sending
    def send(self, identity: bytes, command: str, *args: bytes) -> None:
        framing = self.framings.get(identity) or Framing(self.version, self.version == "0.1")
        try:
            self.router.send_multipart([identity, *framing.head(command), *args])
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:  # the worker's connection is gone: nothing to do
                raise
        self._last_sent[identity] = time.monotonic()

    def send_raw(self, identity: bytes, frames: list[bytes]) -> None:
        self.router.send_multipart([identity, *frames])
        self._last_sent[identity] = time.monotonic()

    def request(self, identity: bytes, client: bytes, *body: bytes) -> int:
        """Send REQUEST; returns the index from which the worker's answer will be filed."""
        mark = len(self.messages)
        self.send(identity, "REQUEST", client, EMPTY, *body)
        return mark

    def replies(self, since: int, identity: bytes) -> list[Message]:
        return [
            m
            for m in self.messages[since:]
            if m.identity == identity and m.command in ("REPLY", "PARTIAL", "FINAL")
        ]

    def final(self, since: int, identity: bytes, timeout: float = REPLY_TIMEOUT) -> Message:
        """The first REPLY (0.1) / FINAL (0.2) from `identity` at index >= `since`."""
        return self.wait_for(
            self.next_message(
                since, lambda m: m.identity == identity and m.command in ("REPLY", "FINAL")
            ),
            timeout,
            "the worker's FINAL/REPLY",
        )

    def close(self) -> None:
        self.process.stop()
        self.router.close(linger=0)


class WorkerSubject:
    """Starts the worker command afresh for every case, against a fresh suite broker."""

    def __init__(self, settings: WorkerSettings) -> None:
        used = placeholders(settings.command)
        if "endpoint" not in used:
            raise StartError("the worker command must contain {endpoint}")
        self.settings = settings
        self.versions = settings.versions
        self.heartbeat_ms = settings.heartbeat_ms or DEFAULT_HEARTBEAT_MS
        self.liveness = settings.liveness or DEFAULT_LIVENESS
        self.context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._death: str | None = None

    def session(self, case: Case) -> AbstractContextManager[object]:
        return self._session(case)

    @contextmanager
    def _session(self, case: Case) -> Iterator[BrokerSide]:
        self._death = None
        side = BrokerSide(
            self.context, self.settings, case.version, self.heartbeat_ms / 1000, self.liveness
        )
        try:
            yield side
        finally:
            if not side.process.alive():
                self._death = side.process.died()
            side.close()

    def casualty(self) -> str | None:
        return self._death

    def close(self) -> None:
        self.context.term()
