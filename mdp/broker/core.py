"""The broker's routing rules as a sans-IO state machine.

Theory of operation
-------------------
`BrokerCore` owns every rule of `spec/mdp.md` and nothing else: no sockets, no clock reads.
Whoever owns the ROUTER socket drives it with two calls:

- `handle(identity, frames, now)`: one message a peer sent (the ROUTER identity split off);
- `tick(now)`: heartbeats, worker expiry and request TTL; returns the next time to call it.

Both append the messages to send to `outbox` as complete ROUTER frame lists (identity first);
the driver sends them and clears the list. Time is a float in seconds from any monotonic clock.
Body frames are passed through untouched: the server hands large ones over as `zmq.Frame`
objects (never copied into Python, see `mdp.fastzmq`), and the core only ever moves them.

The state:
- `workers`: every registered worker by identity, each with its service, framing, liveness
  deadline, next heartbeat time and the request it holds (at most one, per RFC 7/18).
- `services`: per service name, a FIFO of waiting requests and an LRU queue of idle workers.
  A service exists while it has workers or queued requests.
- `names`: per worker name (carried in a named worker's routing id, `mmi.worker_identity`), the
  process instance that holds it and how many of its connections are registered. A name belongs
  to one process at a time per broker: another process's READY under a name in use is refused
  with DISCONNECT (spec/mdp.md §5.1); the name is free again once its last connection is gone.

Requests a worker took are not resent when that worker dies: MDP workers may not be idempotent
(our command services are not), so the client notices the silence and decides (spec/mdp.md,
"At most once"). A request whose REQUEST could not even be handed to the worker's connection
was never delivered, so it goes to the next worker: the driver reports such sends with
`unroutable()`. `probe()` sends every worker a HEARTBEAT so that the driver learns at once which
connections are gone (it calls it when libzmq reports a closed connection). A worker found gone
that way is forgotten only at the driver's next `confirm_gone()`, which it calls once it has
read every message waiting: libzmq refuses sends to a connection that is closing while the
last messages it brought (a FINAL sent just before the worker closed) may still be queued.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field, fields
from typing import Any

from mdp import mmi
from mdp.protocol import (
    HEARTBEAT_INTERVAL,
    HEARTBEAT_LIVENESS,
    ClientFraming,
    ClientRequest,
    Command,
    ProtocolError,
    WorkerFraming,
    WorkerMessage,
    parse_peer_message,
)

log = logging.getLogger("mdp.broker")


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    """Tunables of the broker's rules. Times are in seconds."""

    heartbeat_interval: float = HEARTBEAT_INTERVAL
    liveness: int = HEARTBEAT_LIVENESS
    request_ttl: float = 60.0
    max_queue: int = 10_000
    busy_timeout: float | None = None
    """If set, a worker holding a request is expired only after this much silence (for
    third-party workers that cannot heartbeat while busy). None: the normal liveness rule."""

    def __post_init__(self) -> None:
        if self.heartbeat_interval <= 0:
            raise ValueError("heartbeat interval must be positive")
        if self.liveness < 1:
            raise ValueError("liveness must be at least 1")
        if self.request_ttl <= 0:
            raise ValueError("request TTL must be positive")
        if self.max_queue < 1:
            raise ValueError("max queue must be at least 1")
        if self.busy_timeout is not None and self.busy_timeout <= 0:
            raise ValueError("busy timeout must be positive")


@dataclass(slots=True)
class BrokerStats:
    """Counters of what the broker did and dropped; read them, never reset them."""

    requests: int = 0
    replies: int = 0
    partials: int = 0
    partials_dropped_for_v01: int = 0
    mmi_requests: int = 0
    invalid_messages: int = 0
    unexpected_commands: int = 0
    requests_expired: int = 0
    requests_dropped_queue_full: int = 0
    requests_lost_with_worker: int = 0
    workers_registered: int = 0
    workers_expired: int = 0
    workers_disconnected: int = 0
    unroutable: int = 0
    requests_requeued: int = 0
    workers_gone: int = 0
    oversized_messages: int = 0
    names_refused: int = 0

    def as_dict(self) -> dict[str, int]:
        """All counters by name."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(slots=True)
class Request:
    """A client request waiting in a service queue or held by a worker."""

    client: bytes
    framing: ClientFraming
    body: list[bytes]
    expires_at: float


@dataclass(slots=True, eq=False)
class Worker:
    """A registered worker. `gone` marks one that was forgotten while still in an idle queue."""

    identity: bytes
    service: Service
    framing: WorkerFraming
    expires_at: float
    heartbeat_at: float
    request: Request | None = None
    delivery: list[bytes] | None = None
    """The REQUEST message last put in the outbox for it (to recognise its failed send)."""
    gone: bool = False
    name: bytes | None = None
    """The worker's name from its routing id (`mmi.split_identity`); None if it has none."""


@dataclass(slots=True)
class ServiceCounts:
    """What happened to the requests of one service name (metrics; read, never reset).
    Kept in `BrokerCore.service_counts`, so the counts outlive the `Service` they count."""

    received: int = 0
    replied: int = 0
    expired: int = 0
    dropped_queue_full: int = 0
    lost_with_worker: int = 0


MAX_COUNTED_SERVICES = 1000
"""Service names counted one by one; any further name is counted under `OTHER_SERVICES`
(clients choose names, so their number must not grow the broker's memory without bound)."""
OTHER_SERVICES = b"(other)"


@dataclass(slots=True, eq=False)
class Service:
    """One service: its queued requests and its idle workers, least recently used first."""

    name: bytes
    counts: ServiceCounts
    requests: deque[Request] = field(default_factory=deque)
    idle: deque[Worker] = field(default_factory=deque)
    idle_count: int = 0
    worker_count: int = 0


class BrokerCore:
    """The MDP broker's state and rules; see the module docstring."""

    def __init__(self, config: BrokerConfig | None = None) -> None:
        self.config = config or BrokerConfig()
        self.stats = BrokerStats()
        self.workers: dict[bytes, Worker] = {}
        self.services: dict[bytes, Service] = {}
        self.service_counts: dict[bytes, ServiceCounts] = {}
        self.names: dict[bytes, list[Any]] = {}
        """Worker name -> [instance, registered connections] (see the module docstring)."""
        self.outbox: list[list[bytes]] = []
        self.unauthenticated: tuple[str, ...] = ()
        """Endpoints on which the server accepts unauthenticated network peers (--insecure);
        every mmi.services answer says so (spec/security.md §6.2)."""
        self._expiry = self.config.heartbeat_interval * self.config.liveness
        self._busy_expiry = self.config.busy_timeout
        # Ticks run four times per interval, so a heartbeat leaves at most 1.25 intervals apart.
        self._tick_period = self.config.heartbeat_interval / 4
        self._debug = log.isEnabledFor(logging.DEBUG)
        self._now = 0.0  # the time of the event being handled, for helpers that deliver
        self._closing: dict[bytes, Worker] = {}
        """Workers found unroutable, forgotten at the next `confirm_gone()`."""

    # ---------------------------------------------------------------------------------------
    # Input

    def handle(self, identity: bytes, frames: list[bytes], now: float) -> None:
        """Apply one message from peer `identity`. Never raises for anything a peer sends."""
        try:
            message = parse_peer_message(frames)
        except ProtocolError as exc:
            # RFC 7/18: invalid messages are dropped. The peer keeps whatever state it had.
            self.stats.invalid_messages += 1
            if self._debug:
                log.debug("dropped invalid message from %s: %s", identity.hex(), exc)
            return
        if self._debug:
            log.debug("from %s: %r", identity.hex(), frames)
        if type(message) is ClientRequest:
            self._on_client_request(identity, message, now)
        else:
            assert type(message) is WorkerMessage
            self._on_worker_message(identity, message, now)

    def _on_client_request(self, client: bytes, message: ClientRequest, now: float) -> None:
        service_name = message.service
        if mmi.is_mmi(service_name):
            self._on_mmi(client, message, now)
            return
        self.stats.requests += 1
        service = self.services.get(service_name)
        if service is None:
            service = self._new_service(service_name)
        service.counts.received += 1
        if len(service.requests) >= self.config.max_queue:
            self.stats.requests_dropped_queue_full += 1
            service.counts.dropped_queue_full += 1
            return
        request = Request(client, message.framing, message.body, now + self.config.request_ttl)
        worker = self._pop_idle(service) if not service.requests else None
        if worker is not None:
            self._deliver(worker, request, now)
        else:
            service.requests.append(request)

    def _on_worker_message(self, identity: bytes, message: WorkerMessage, now: float) -> None:
        command = message.command
        worker = self.workers.get(identity)
        if worker is None:
            if command is Command.READY:
                self._register(identity, message, now)
            elif command is not Command.DISCONNECT:
                # RFC 7/18: HEARTBEAT/REPLY before READY is valid but unexpected.
                self._reject(identity, message.framing)
            return
        if message.framing is not worker.framing:
            # A registered worker that switches dialect mid-conversation is not one we know.
            self._disconnect(worker, unexpected=True)
            return
        worker.expires_at = now + self._expiry  # RFC 7/18: any command counts as a heartbeat
        if command is Command.FINAL or command is Command.PARTIAL:
            request = worker.request
            if request is None or request.client != message.client:
                self._disconnect(worker, unexpected=True)
                return
            body = message.body
            assert body is not None
            service = worker.service
            if command is Command.FINAL:
                self.stats.replies += 1
                service.counts.replied += 1
                self.outbox.append([request.client, *request.framing.final(service.name, body)])
                worker.request = None
                self._make_idle(worker, now)
            else:
                reply = request.framing.partial(service.name, body)
                if reply is None:
                    self.stats.partials_dropped_for_v01 += 1
                else:
                    self.stats.partials += 1
                    self.outbox.append([request.client, *reply])
        elif command is Command.HEARTBEAT:
            pass
        elif command is Command.DISCONNECT:
            # RFC 7/18: after a worker's DISCONNECT the broker sends it nothing more.
            self._forget(worker)
            self.stats.workers_disconnected += 1
            log.info("worker %s (%s) disconnected", identity.hex(), _text(worker.service.name))
        else:  # a second READY
            self._disconnect(worker, unexpected=True)

    def _on_mmi(self, client: bytes, message: ClientRequest, now: float) -> None:
        # RFC 8: the broker answers the mmi.* namespace itself.
        self.stats.mmi_requests += 1
        name = message.service
        if name == mmi.SERVICE:
            service = self.services.get(message.body[0])
            body = mmi.FOUND if service is not None and service.worker_count else mmi.NOT_FOUND
        elif name == mmi.SERVICES:
            # spec/security.md §6.2: a broker open to anyone says so in every answer.
            services = mmi.encode_services(
                (
                    mmi.ServiceInfo(_text(s.name), s.worker_count, len(s.requests))
                    for s in self.services.values()
                ),
                self.unauthenticated,
            )
            self.outbox.append([client, *message.framing.final(name, services)])
            return
        elif name == mmi.WORKERS:
            body = mmi.encode_workers(self._worker_infos(now))
        else:
            body = mmi.NOT_IMPLEMENTED
        self.outbox.append([client, *message.framing.final(name, [body])])

    def _worker_infos(self, now: float) -> list[mmi.WorkerInfo]:
        """`mmi.workers`: the connections grouped by worker name (spec/mdp.md §5.1). Walks every
        connection, so it costs O(workers) per call; only MMI requests pay for it."""
        groups: dict[bytes, list[Worker]] = {}
        for worker in self.workers.values():
            key = worker.name if worker.name is not None else b"~" + worker.identity.hex().encode()
            groups.setdefault(key, []).append(worker)
        infos = []
        for key, members in sorted(groups.items()):
            in_flight = sum(1 for w in members if w.request is not None)
            heard = max(w.expires_at for w in members) - self._expiry
            infos.append(
                mmi.WorkerInfo(
                    name=_text(key),
                    services=sorted({_text(w.service.name) for w in members}),
                    version=",".join(sorted({f"MDP/{w.framing.version}" for w in members})),
                    busy=in_flight > 0,
                    in_flight=in_flight,
                    connections=len(members),
                    last_heard=max(0.0, now - heard),
                )
            )
        return infos

    # ---------------------------------------------------------------------------------------
    # Worker lifecycle

    def _register(self, identity: bytes, message: WorkerMessage, now: float) -> None:
        name = message.service
        if mmi.is_mmi(name):
            # RFC 8: workers may not register in the mmi.* namespace.
            self._reject(identity, message.framing)
            return
        named = mmi.split_identity(identity)
        worker_name = None
        if named is not None:
            worker_name, instance = named
            holder = self.names.get(worker_name)
            if holder is None:
                self.names[worker_name] = [instance, 1]
            elif holder[0] == instance:
                holder[1] += 1
            else:
                # spec/mdp.md §5.1: one process per name and broker; the second is refused.
                self.stats.names_refused += 1
                log.warning(
                    "worker %s refused: the name %r is in use by another worker process",
                    identity.hex(),
                    _text(worker_name),
                )
                self._reject(identity, message.framing)
                return
        service = self.services.get(name)
        if service is None:
            service = self._new_service(name)
        worker = Worker(
            identity,
            service,
            message.framing,
            expires_at=now + self._expiry,
            heartbeat_at=now + self.config.heartbeat_interval,
            name=worker_name,
        )
        self.workers[identity] = worker
        service.worker_count += 1
        self.stats.workers_registered += 1
        log.info(
            "worker %s registered for %s (%s)", identity.hex(), _text(name), message.framing.name
        )
        self._make_idle(worker, now)

    def _make_idle(self, worker: Worker, now: float) -> None:
        """The worker is free: give it the oldest live request, or queue it as idle (LRU)."""
        service = worker.service
        requests = service.requests
        while requests:
            request = requests.popleft()
            if request.expires_at > now:
                self._deliver(worker, request, now)
                return
            self.stats.requests_expired += 1
            service.counts.expired += 1
        service.idle.append(worker)
        service.idle_count += 1

    def _pop_idle(self, service: Service) -> Worker | None:
        idle = service.idle
        while idle:
            worker = idle.popleft()
            if not worker.gone:
                service.idle_count -= 1
                return worker
        return None

    def _deliver(self, worker: Worker, request: Request, now: float) -> None:
        worker.request = request
        worker.heartbeat_at = now + self.config.heartbeat_interval
        message = [
            worker.identity,
            *worker.framing.addressed(Command.REQUEST, request.client, request.body),
        ]
        worker.delivery = message
        self.outbox.append(message)

    def _forget(self, worker: Worker, *, requeue: bool = False) -> None:
        """Drop every trace of a worker; it gets nothing more from us. With `requeue`, the
        request it holds was never delivered: it goes to another worker or back in the queue."""
        del self.workers[worker.identity]
        worker.gone = True
        if worker.name is not None:
            holder = self.names[worker.name]
            holder[1] -= 1
            if not holder[1]:
                del self.names[worker.name]
        service = worker.service
        service.worker_count -= 1
        request = worker.request
        if request is not None:
            worker.request = None
            worker.delivery = None
            if requeue:
                self.stats.requests_requeued += 1
                other = self._pop_idle(service) if not service.requests else None
                if other is not None:
                    self._deliver(other, request, self._now)
                else:
                    # The head of the queue: it arrived before anything waiting there now.
                    service.requests.appendleft(request)
            else:
                self.stats.requests_lost_with_worker += 1
                service.counts.lost_with_worker += 1
        else:
            service.idle_count -= 1
            # Compact lazily so a churn of reconnecting workers cannot grow the idle queue.
            if len(service.idle) > 2 * service.idle_count + 16:
                service.idle = deque(w for w in service.idle if not w.gone)
        self._drop_if_unused(service)

    def _disconnect(self, worker: Worker, *, unexpected: bool) -> None:
        if unexpected:
            # RFC 7/18: a valid but unexpected command gets DISCONNECT and nothing more.
            self.stats.unexpected_commands += 1
            log.info(
                "worker %s (%s) sent an unexpected command; disconnected",
                worker.identity.hex(),
                _text(worker.service.name),
            )
        self.outbox.append([worker.identity, *worker.framing.command(Command.DISCONNECT)])
        self._forget(worker)

    def _reject(self, identity: bytes, framing: WorkerFraming) -> None:
        self.stats.unexpected_commands += 1
        self.outbox.append([identity, *framing.command(Command.DISCONNECT)])

    def _new_service(self, name: bytes) -> Service:
        """A new entry in `services`, counting into the counts its name already has."""
        counts = self.service_counts.get(name)
        if counts is None:
            if len(self.service_counts) >= MAX_COUNTED_SERVICES:
                name_counted = OTHER_SERVICES
            else:
                name_counted = name
            counts = self.service_counts.setdefault(name_counted, ServiceCounts())
        service = self.services[name] = Service(name, counts)
        return service

    def _drop_if_unused(self, service: Service) -> None:
        if not service.worker_count and not service.requests:
            self.services.pop(service.name, None)

    # ---------------------------------------------------------------------------------------
    # Time

    def tick(self, now: float) -> float:
        """Send due heartbeats, expire silent workers and old requests; return the next tick."""
        interval = self.config.heartbeat_interval
        expired: list[Worker] = []
        for worker in self.workers.values():
            deadline = worker.expires_at
            if worker.request is not None and self._busy_expiry is not None:
                deadline += self._busy_expiry - self._expiry
            if deadline <= now:
                expired.append(worker)
            elif worker.heartbeat_at <= now:
                worker.heartbeat_at = now + interval
                self.outbox.append([worker.identity, *worker.framing.command(Command.HEARTBEAT)])
        for worker in expired:
            self.stats.workers_expired += 1
            log.info("worker %s (%s) expired", worker.identity.hex(), _text(worker.service.name))
            self._disconnect(worker, unexpected=False)
        for service in list(self.services.values()):
            requests = service.requests
            while requests and requests[0].expires_at <= now:
                requests.popleft()
                self.stats.requests_expired += 1
                service.counts.expired += 1
            self._drop_if_unused(service)
        return now + self._tick_period

    def unroutable(self, identity: bytes, message: list[bytes], now: float) -> None:
        """The driver could not send `message` (from the outbox) to `identity`: that peer's
        connection is gone or closing (ROUTER_MANDATORY says EHOSTUNREACH).

        If the message was the REQUEST a worker was being given, the request goes to another
        worker (spec/mdp.md §3.4: it was never delivered) and the worker is forgotten at once:
        it cannot have answered a request it never got. Any other worker is forgotten at the
        next `confirm_gone()`, after the driver has read what it sent before its connection
        closed (spec/mdp.md §4.2). More messages may be added to `outbox`."""
        self.stats.unroutable += 1
        worker = self.workers.get(identity)
        if worker is None:
            return  # a client that went away, or a worker already forgotten
        if worker.request is not None and message is worker.delivery:
            self._gone(worker, now, requeue=True)
        else:
            self._closing[identity] = worker

    def confirm_gone(self, now: float) -> None:
        """The driver has read every message that was waiting: forget the workers `unroutable`
        found gone since the last call (unless they left meanwhile, or their identity now
        belongs to a new registration). A request such a worker still holds is lost (§3.4).
        Adds nothing to `outbox`."""
        closing = self._closing
        if not closing:
            return
        for identity, worker in closing.items():
            if self.workers.get(identity) is worker:
                self._gone(worker, now, requeue=False)
        closing.clear()

    def _gone(self, worker: Worker, now: float, *, requeue: bool) -> None:
        self.stats.workers_gone += 1
        log.info(
            "worker %s (%s) is gone (its connection closed)%s",
            worker.identity.hex(),
            _text(worker.service.name),
            "; its undelivered request goes to another worker" if requeue else "",
        )
        self._now = now
        self._forget(worker, requeue=requeue)

    def probe(self, now: float) -> None:
        """Send every worker a HEARTBEAT now; the sends that fail (`unroutable`) reveal the
        workers whose connection closed. Harmless to live workers: any command may come at any
        time, and a HEARTBEAT is one."""
        interval = self.config.heartbeat_interval
        for worker in self.workers.values():
            worker.heartbeat_at = now + interval
            self.outbox.append([worker.identity, *worker.framing.command(Command.HEARTBEAT)])

    def expel(self, identity: bytes) -> bool:
        """Send DISCONNECT to a registered worker and forget it (e.g. its key was revoked).

        Returns False if no worker has that identity. A request it held is lost (§3.4).
        """
        worker = self.workers.get(identity)
        if worker is None:
            return False
        self._disconnect(worker, unexpected=False)
        return True

    def disconnect_all(self) -> None:
        """Say DISCONNECT to every worker and forget them (for shutdown)."""
        for worker in list(self.workers.values()):
            self._disconnect(worker, unexpected=False)

    def queued(self) -> int:
        """Requests waiting for a worker, over all services."""
        return sum(len(s.requests) for s in self.services.values())


def _text(name: bytes) -> str:
    return name.decode("utf-8", "replace")
