"""An asyncio MDP client: requests to any service, streamed replies, retries and failover.

    async with Client() as client:        # the default endpoint; or Client(["tcp://host:5555"])
        body = await client.request("echo", b"hello")          # the FINAL body
        async for part in client.stream("report", request):     # PARTIALs, then the FINAL
            ...
        if await client.service_exists("report"): ...          # MMI (RFC 8)

Correlation: MDP replies carry no request id, and RFC 7/18 make the client dialog synchronous
per socket, so every in-flight attempt of a request owns one DEALER socket. Any number of
requests can be in flight at once, each on its own socket. A socket whose request ended with a
FINAL goes back to a small idle pool (after a FINAL the broker sends nothing more, RFC 18); a
socket whose attempt was abandoned is closed with linger 0 and never reused, so a late reply
to it reaches nobody. The rules of one request live in `mdp.client_core.RequestCore`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncGenerator, Callable, Sequence
from types import TracebackType
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from mdp import mmi
from mdp.client_core import (
    AttemptFailed,
    Part,
    RequestCore,
    RequestTimeout,
    RetryPolicy,
    always_retry,
)
from mdp.endpoints import check_endpoint, default_endpoint, tcp_host
from mdp.errors import ProtocolError
from mdp.mmi import MMINotImplemented, ServiceInfo, ServiceList, WorkerInfo
from mdp.protocol import Version

__all__ = [
    "DEFAULT_RETRIES",
    "DEFAULT_TIMEOUT",
    "AttemptFailed",
    "Client",
    "MMINotImplemented",
    "Part",
    "RequestTimeout",
    "RetryPolicy",
    "ServiceInfo",
    "ServiceList",
]

log = logging.getLogger("mdp.client")

DEFAULT_TIMEOUT = 5.0
"""Seconds an attempt may stay silent (no PARTIAL, no FINAL) before it is abandoned."""
DEFAULT_RETRIES = 2
"""Attempts after the first one."""
DEFAULT_MAX_IDLE_SOCKETS = 64
REACH_TIMEOUT = 1.0
"""How long `Client.unreachable` watches a connection attempt."""
MAX_SOCKETS = 4096
"""The socket cap of a context the client owns: bounds the requests in flight at once."""


def _as_bytes(service: str | bytes) -> bytes:
    return service.encode() if isinstance(service, str) else service


class Client:
    """An MDP client for any service; bodies are opaque frames.

    `endpoints`: one broker endpoint or several (default: `mdp.endpoints.default_endpoint()`,
    the user's private ipc:// socket; PrivateDirError if its directory is not private to the
    user); a retry goes to the next one in turn, and new
    requests start at the endpoint that answered last. `version`: MDP "0.2" (default, PARTIALs
    streamed) or "0.1" (a single REPLY, seen as the FINAL). `timeout`: seconds an attempt may
    stay silent before it is abandoned and the request re-sent on a fresh socket, up to
    `retries` times. `may_retry`: the default retry policy (see `RetryPolicy`). `context`: a
    pyzmq context to share (needed for inproc endpoints); the client owns one otherwise.
    `socket_options`: (option, value) pairs set on every socket before it connects, e.g.
    `mdp.security.curve_client_options(...)` for a CURVE broker.

    Use one Client from one event loop. Close it (or use `async with`) to release its sockets.
    """

    def __init__(
        self,
        endpoints: str | Sequence[str] | None = None,
        *,
        version: Version | str = Version.V02,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        may_retry: RetryPolicy = always_retry,
        context: zmq.Context[Any] | None = None,
        max_idle_sockets: int = DEFAULT_MAX_IDLE_SOCKETS,
        socket_options: Sequence[tuple[int, int | bytes]] = (),
    ) -> None:
        if endpoints is None:
            endpoints = default_endpoint()
        self.endpoints = [endpoints] if isinstance(endpoints, str) else list(endpoints)
        if not self.endpoints:
            raise ValueError("at least one broker endpoint is needed")
        for endpoint in self.endpoints:
            check_endpoint(endpoint)
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        if retries < 0:
            raise ValueError("retries must not be negative")
        self.version = Version(version)
        self.timeout = timeout
        self.retries = retries
        self.may_retry = may_retry
        self.max_idle_sockets = max_idle_sockets
        self.socket_options = list(socket_options)
        self._own_context = context is None
        if context is None:
            self._context = zmq.asyncio.Context()
            # Room for one socket per in-flight request (the default cap is 1023).
            self._context.set(zmq.MAX_SOCKETS, MAX_SOCKETS)
        elif isinstance(context, zmq.asyncio.Context):
            self._context = context
        else:
            self._context = zmq.asyncio.Context.shadow(context.underlying)
        self._idle: dict[str, list[zmq.asyncio.Socket]] = {}
        self._busy: set[zmq.asyncio.Socket] = set()
        self._preferred = 0
        self._closed = False
        self.abandoned = 0
        """Attempts abandoned (socket closed) because they went silent."""

    # -----------------------------------------------------------------------------------------
    # Public API

    async def request(
        self,
        service: str | bytes,
        *body: bytes,
        timeout: float | None = None,
        retries: int | None = None,
        may_retry: RetryPolicy | None = None,
        total_timeout: float | None = None,
        endpoint: str | None = None,
    ) -> list[bytes]:
        """Send a request and return the FINAL body (PARTIALs are received and dropped).

        Raises `RequestTimeout` (a `mdp.errors.Timeout`) when no FINAL arrived: every attempt
        went silent for `timeout` seconds, the retry policy refused, or `total_timeout` passed.
        Raises `mdp.errors.ProtocolError` for an invalid service name or an empty body.
        """
        parts = self.stream(
            service,
            *body,
            timeout=timeout,
            retries=retries,
            may_retry=may_retry,
            total_timeout=total_timeout,
            endpoint=endpoint,
        )
        async with contextlib.aclosing(parts):
            async for part in parts:
                if part.final:
                    return part.body
        raise AssertionError("stream() ended without a FINAL")  # pragma: no cover

    async def stream(
        self,
        service: str | bytes,
        *body: bytes,
        timeout: float | None = None,
        retries: int | None = None,
        may_retry: RetryPolicy | None = None,
        total_timeout: float | None = None,
        attempt_body: Callable[[int], Sequence[bytes]] | None = None,
        settle: float = 0.0,
        not_run: Callable[[list[bytes]], bool] | None = None,
        endpoint: str | None = None,
    ) -> AsyncGenerator[Part, None]:
        """Send a request and yield each PARTIAL, then the FINAL (`part.final` is true).

        Every PARTIAL restarts the liveness timeout. Over MDP/0.1 only the FINAL is yielded.
        After a retry, the new attempt's PARTIALs follow (`part.attempt` tells them apart).
        Arguments default to the client's settings; errors as for `request()`.

        For services that must not run a request twice (spec/mdp.md §6): `attempt_body(n)`
        builds attempt n's body (then `body` is ignored); `settle` keeps an attempt that had no
        PARTIAL open that many seconds past its liveness timeout before the next one goes; a
        FINAL for which `not_run(body)` is true means that attempt did not run: the next
        attempt goes at once, if the retries and the policy allow (else it is yielded).
        `endpoint` (one of the client's) takes the first attempt instead of the endpoint that
        answered last; retries go on from there in turn.

        Leaving the loop early abandons the request: its socket is closed and any late reply
        is discarded. Wrap the generator in `contextlib.aclosing()` so that happens at once.
        """
        if self._closed:
            raise RuntimeError("client is closed")
        core = RequestCore(
            self.version,
            _as_bytes(service),
            body if attempt_body is None else attempt_body(1),
            self.endpoints,
            timeout=self.timeout if timeout is None else timeout,
            retries=self.retries if retries is None else retries,
            total_timeout=total_timeout,
            first_endpoint=self._preferred if endpoint is None else self._index(endpoint),
            rebuild=attempt_body,
            settle=settle,
        )
        policy = self.may_retry if may_retry is None else may_retry
        loop = _loop_time
        send = core.start(loop())
        sock = self._acquire(send.endpoint)
        finished = False
        try:
            await self._send(sock, send.frames)
            while True:
                remaining = core.deadline - loop()
                frames = await self._recv(sock, remaining) if remaining > 0 else None
                if frames is None:
                    self._discard(sock)
                    self.abandoned += 1
                    try:
                        send = core.expire(loop(), policy)
                    except RequestTimeout:
                        self._preferred = (core.first_endpoint + core.attempt) % len(self.endpoints)
                        raise
                    log.debug(
                        "%s: attempt %d silent for %g s; retrying on %s",
                        core.service.decode(errors="replace"),
                        send.attempt - 1,
                        core.timeout,
                        send.endpoint,
                    )
                    sock = self._fresh(send.endpoint)
                    await self._send(sock, send.frames)
                    continue
                part = core.receive(frames, loop())
                if part is None:
                    log.debug("ignored a message that is not a reply to this request")
                    continue
                if part.final:
                    if not_run is not None and not_run(part.body):
                        retry = core.retry_after_final(loop(), policy)
                        if retry is not None:
                            log.debug("attempt %d did not run; retrying", retry.attempt - 1)
                            self._release(core.sent_to[-2], sock)
                            sock = self._acquire(retry.endpoint)
                            await self._send(sock, retry.frames)
                            continue
                    finished = True
                    self._preferred = self.endpoints.index(core.endpoint)
                    self._release(core.endpoint, sock)
                    yield part
                    return
                yield part
        finally:
            if not finished:
                self._discard(sock)

    @property
    def context(self) -> zmq.asyncio.Context:
        """The pyzmq context of this client's sockets (to open more clients beside it)."""
        return self._context

    def _index(self, endpoint: str) -> int:
        try:
            return self.endpoints.index(endpoint)
        except ValueError:
            raise ValueError(f"{endpoint!r} is not one of this client's endpoints") from None

    async def unreachable(self, timeout: float = REACH_TIMEOUT) -> dict[str, str]:
        """The broker endpoints that certainly cannot be reached now, each with the reason:
        its host name does not resolve, or the connection is refused (nothing listens).

        Takes at most about `timeout` seconds, all endpoints at once. An endpoint that neither
        connects nor fails within that time (a slow network, packets dropped) is not listed:
        only a request's own timeout can tell.
        """
        found = await asyncio.gather(*(self._unreachable(e, timeout) for e in self.endpoints))
        return {e: why for e, why in zip(self.endpoints, found, strict=True) if why is not None}

    async def _unreachable(self, endpoint: str, timeout: float) -> str | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        host = tcp_host(endpoint)
        if host is not None:
            try:
                await asyncio.wait_for(loop.getaddrinfo(host, None), timeout)
            except socket.gaierror:
                return f"unknown host {host!r} (the name does not resolve)"
            except TimeoutError:
                return None
        sock = self._context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        # A monitor sees what a DEALER hides: libzmq retries a refused connection silently.
        monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_CONNECT_RETRIED)
        try:
            sock.connect(endpoint)
            while (remaining := deadline - loop.time()) > 0:
                if not await monitor.poll(max(1, round(remaining * 1000))):
                    break
                event = parse_monitor_message(await monitor.recv_multipart())["event"]
                if event == zmq.EVENT_CONNECTED:
                    return None
                if event == zmq.EVENT_CONNECT_RETRIED:
                    return "connection refused (nothing listens there)"
            return None
        finally:
            with contextlib.suppress(zmq.ZMQError):
                sock.disable_monitor()
            monitor.close(linger=0)
            sock.close(linger=0)

    async def mmi(self, service: str | bytes, *body: bytes) -> list[bytes]:
        """Ask the broker's management interface (RFC 8): `service` starts with "mmi."."""
        name = _as_bytes(service)
        if not mmi.is_mmi(name):
            raise ValueError("MMI services start with 'mmi.'")
        return await self.request(name, *(body or (b"",)))

    async def service_exists(self, service: str | bytes) -> bool:
        """True when the broker has at least one worker for `service` (`mmi.service`, RFC 8).

        Raises `MMINotImplemented` if the broker answers 501, `ProtocolError` for any other
        answer than 200/404, `RequestTimeout` if the broker does not answer.
        """
        reply = await self.mmi(mmi.SERVICE, _as_bytes(service))
        code = reply[0] if reply else b""
        if code == mmi.FOUND:
            return True
        if code == mmi.NOT_FOUND:
            return False
        if code == mmi.NOT_IMPLEMENTED:
            raise MMINotImplemented("the broker does not implement mmi.service")
        raise ProtocolError(f"unexpected mmi.service answer {code[:20]!r}")

    async def services(self) -> ServiceList:
        """Every service the broker knows, with worker count and queue depth (`mmi.services`).

        `mmi.services` is our extension (spec/mdp.md): the FINAL body is one msgpack frame
        holding a list of maps {"name": str, "workers": int, "queued": int}, and from a broker
        started with --insecure a second one, {"unauthenticated": [endpoint, ...]} (kept in
        `ServiceList.unauthenticated`). Raises `MMINotImplemented` if the broker answers 501,
        `ProtocolError` for a malformed answer.
        """
        return mmi.decode_services(await self.mmi(mmi.SERVICES))

    async def workers(self) -> list[WorkerInfo]:
        """Every worker the broker knows, by name (`mmi.workers`, spec/mdp.md §5.1): its
        services, protocol version, busy, in-flight requests, connections and seconds since it
        was last heard. Raises `MMINotImplemented` for 501, `ProtocolError` for a bad answer."""
        return mmi.decode_workers(await self.mmi(mmi.WORKERS))

    def close(self) -> None:
        """Close every socket (linger 0: unsent requests are dropped) and the owned context."""
        if self._closed:
            return
        self._closed = True
        for socks in self._idle.values():
            for sock in socks:
                sock.close(linger=0)
        self._idle.clear()
        for sock in self._busy:
            sock.close(linger=0)
        self._busy.clear()
        if self._own_context:
            self._context.term()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -----------------------------------------------------------------------------------------
    # Sockets

    def _fresh(self, endpoint: str) -> zmq.asyncio.Socket:
        sock = self._context.socket(zmq.DEALER)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            for option, value in self.socket_options:
                sock.setsockopt(option, value)
            sock.connect(endpoint)
        except zmq.ZMQError:
            sock.close(linger=0)
            raise
        self._busy.add(sock)
        return sock

    def _acquire(self, endpoint: str) -> zmq.asyncio.Socket:
        """An idle socket to `endpoint` with nothing pending on it, or a fresh one."""
        idle = self._idle.get(endpoint)
        while idle:
            sock = idle.pop()
            if int(sock.get(zmq.EVENTS)) & zmq.POLLIN:
                # Traffic after a FINAL breaks RFC 18; never let it reach another request.
                sock.close(linger=0)
                continue
            self._busy.add(sock)
            return sock
        return self._fresh(endpoint)

    def _release(self, endpoint: str, sock: zmq.asyncio.Socket) -> None:
        """The request on `sock` ended with a FINAL: keep the socket for a later request."""
        self._busy.discard(sock)
        idle = self._idle.setdefault(endpoint, [])
        if self._closed or len(idle) >= self.max_idle_sockets:
            sock.close(linger=0)
        else:
            idle.append(sock)

    def _discard(self, sock: zmq.asyncio.Socket) -> None:
        """Abandon `sock`: close it with linger 0; whatever arrives for it later is lost."""
        self._busy.discard(sock)
        sock.close(linger=0)

    @staticmethod
    async def _send(sock: zmq.asyncio.Socket, frames: list[bytes]) -> None:
        # A connecting DEALER queues the message (no ZMQ_IMMEDIATE), so this does not wait for
        # the broker; NOBLOCK makes sure of it. A full queue counts as a silent attempt.
        try:
            await sock.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.Again:
            log.debug("send queue full; the attempt will time out")

    @staticmethod
    async def _recv(sock: zmq.asyncio.Socket, timeout: float) -> list[bytes] | None:
        """The next message on `sock`, or None after `timeout` seconds."""
        events = await sock.poll(max(1, round(timeout * 1000)))
        if not events:
            return None
        return await sock.recv_multipart(flags=zmq.NOBLOCK)


def _loop_time() -> float:
    return asyncio.get_running_loop().time()
