"""The client under test, and the suite playing its broker and the service's worker.

Theory of operation: every case binds a fresh ROUTER on a free loopback endpoint; the rule
runs the client command (a one-shot program) against it, reads the REQUESTs that arrive,
answers them as the rule chooses (the suite is both the broker and the worker behind it), and
then judges what the client printed and how it exited. MMI queries (RFC 8) are answered on
the spot - `mmi.service` says 200 for the service under test - so clients that ask before
they send are served too.

The client contract (docs/conformance.md): the command sends ONE request to `{service}`
whose body frames are the words `{body}` expands to, prints each frame of the FINAL (0.1:
REPLY) body on a line of its own on stdout, and exits 0. With `--retry-after-ms`, the run
claims that the client re-sends a request that got no answer for that long.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

import zmq

from mdp_conformance.process import Started, StartError, expand, free_endpoint, placeholders
from mdp_conformance.rules import VERSIONS, Case
from mdp_conformance.wire import C02_FINAL, C02_PARTIAL, C02_REQUEST, CLIENT_HEADER, EMPTY, show

DEFAULT_SERVICE = "conformance.echo"
MAJORTOMO_PARTIAL = b"\x03"
MAJORTOMO_FINAL = b"\x04"
START_TIMEOUT = 15.0  # a cold interpreter on a loaded machine
EXIT_TIMEOUT = 10.0


@dataclass
class Request:
    """A message from the client, as the broker's ROUTER received it."""

    identity: bytes
    frames: list[bytes]
    at: float
    version: str | None = None  # None: not an MDP client REQUEST
    envelope: bool = False  # a leading empty frame (RFC 7 always; some 0.2 clients too)
    service: bytes = b""
    body: tuple[bytes, ...] = ()
    majortomo: bool = False  # majortomo's 0.2 dialect: "" MDPC02 0x02 service body

    @property
    def service_in_reply(self) -> bool:
        return not self.majortomo

    def __str__(self) -> str:
        return show(self.frames)


def parse(identity: bytes, frames: list[bytes], at: float) -> Request:
    """RFC 7: "" MDPC01 service body+; RFC 18: MDPC02 0x01 service body+ (also with "").

    Also recognised, so that the other rules can judge such a client in its own framing:
    majortomo's "" MDPC02 0x02 service body+, answered with "" MDPC02 0x03|0x04 body+ (no
    service frame). Only the request-framing rule holds the framing against the client."""
    request = Request(identity, frames, at)
    i = 1 if frames and frames[0] == EMPTY else 0
    rest = frames[i:]
    if len(rest) >= 3 and rest[0] == CLIENT_HEADER["0.1"]:
        request.version, request.service, request.body = "0.1", rest[1], tuple(rest[2:])
    elif len(rest) >= 4 and rest[0] == CLIENT_HEADER["0.2"] and rest[1] == C02_REQUEST:
        request.version, request.service, request.body = "0.2", rest[2], tuple(rest[3:])
    elif len(rest) >= 4 and i == 1 and rest[0] == CLIENT_HEADER["0.2"] and rest[1] == b"\x02":
        request.version, request.service, request.body = "0.2", rest[2], tuple(rest[3:])
        request.majortomo = True
    request.envelope = i == 1
    return request


@dataclass(frozen=True)
class ClientSettings:
    command: str
    versions: tuple[str, ...] = VERSIONS
    service: str = DEFAULT_SERVICE
    retry_after_ms: int | None = None


class ClientRun:
    """One run of the client command."""

    def __init__(self, process: Started) -> None:
        self.process = process

    def finish(self, timeout: float = EXIT_TIMEOUT) -> tuple[int, list[str]]:
        """Exit code and stdout lines; fails the rule if the client does not exit in time."""
        code = self.process.wait_exit(timeout)
        if code is None:
            raise AssertionError(
                f"the client did not exit within {timeout:.0f}s of its answer; its output:\n"
                f"{self.process.log_tail()}"
            )
        return code, self.process.stdout().decode(errors="replace").splitlines()

    def expect_output(self, lines: list[str]) -> None:
        code, out = self.finish()
        assert code == 0, f"the client exited {code}; its stderr:\n{self.process.log_tail()}"
        assert out == lines, f"the client printed {out!r}, expected the FINAL body {lines!r}"


class BrokerSide:
    """The suite as the client's broker (and worker), for one case."""

    def __init__(
        self, context: zmq.Context[zmq.Socket[bytes]], settings: ClientSettings, version: str
    ) -> None:
        self.settings = settings
        self.version = version
        self.service = settings.service.encode()
        self.retry_after = (
            settings.retry_after_ms / 1000 if settings.retry_after_ms is not None else None
        )
        self.endpoint = free_endpoint()
        self.router: zmq.Socket[bytes] = context.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.bind(self.endpoint)
        self.requests: list[Request] = []  # every non-MMI message, in arrival order
        self.mmi: list[Request] = []
        self.runs: list[ClientRun] = []

    def run(self, *body: str) -> ClientRun:
        """Start the client command for a request of `body` (one word per frame)."""
        values = {
            "endpoint": self.endpoint,
            "service": self.settings.service,
            "mdp_version": self.version,
            "timeout_ms": str(self.settings.retry_after_ms or 5000),
        }
        argv = expand(self.settings.command, values, {"body": list(body)})
        started = ClientRun(Started(argv, "client", separate_stdout=True))
        self.runs.append(started)
        return started

    def pump(self, timeout: float) -> None:
        if not self.router.poll(max(0, int(timeout * 1000)), zmq.POLLIN):
            return
        at = time.monotonic()
        while True:
            try:
                identity, *frames = self.router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            request = parse(identity, frames, at)
            if request.version is not None and request.service.startswith(b"mmi."):
                self.mmi.append(request)
                self._answer_mmi(request)
            else:
                self.requests.append(request)

    def _answer_mmi(self, request: Request) -> None:
        """RFC 8: mmi.service answers 200/404; other mmi.* services 501."""
        if request.service == b"mmi.service":
            code = b"200" if request.body[:1] == (self.service,) else b"404"
        else:
            code = b"501"
        self.final(request, [code], service=request.service)

    def request(self, since: int = 0, timeout: float = START_TIMEOUT) -> Request:
        """The first request at index >= `since`, within `timeout`."""
        deadline = time.monotonic() + timeout
        while len(self.requests) <= since:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                logs = "\n".join(r.process.log_tail(5) for r in self.runs if r.process)
                raise AssertionError(
                    f"no request from the client within {timeout:.1f}s; its output:\n{logs}"
                )
            if self.runs and not self.runs[-1].process.alive() and len(self.requests) <= since:
                # it may have sent just before exiting: one more look, then fail
                self.pump(0.05)
                if len(self.requests) <= since:
                    code, _ = self.runs[-1].finish(0)
                    raise AssertionError(
                        f"the client exited {code} without sending a request; its output:\n"
                        f"{self.runs[-1].process.log_tail(5)}"
                    )
            self.pump(min(remaining, 0.02))
        return self.requests[since]

    def pump_for(self, window: float) -> None:
        deadline = time.monotonic() + window
        while (remaining := deadline - time.monotonic()) > 0:
            self.pump(min(remaining, 0.02))

    # -- answering, in the framing the request came in
    def _head(self, request: Request) -> list[bytes]:
        version = request.version or self.version
        head = [EMPTY] if request.envelope or version == "0.1" else []
        return [*head, CLIENT_HEADER[version]]

    def final(self, request: Request, body: list[bytes], service: bytes | None = None) -> None:
        """REPLY (0.1) / FINAL (0.2) for `request`; `service` defaults to the request's."""
        if request.majortomo:
            command = [MAJORTOMO_FINAL]
        else:
            command = [C02_FINAL] if (request.version or self.version) == "0.2" else []
        named = [service or request.service] if request.service_in_reply else []
        self.router.send_multipart(
            [request.identity, *self._head(request), *command, *named, *body]
        )

    def partial(self, request: Request, body: list[bytes]) -> None:
        command = MAJORTOMO_PARTIAL if request.majortomo else C02_PARTIAL
        named = [request.service] if request.service_in_reply else []
        self.router.send_multipart([request.identity, *self._head(request), command, *named, *body])

    def close(self) -> None:
        for run in self.runs:
            run.process.stop()
        self.router.close(linger=0)


class ClientSubject:
    """Runs the client command as each rule asks, against a fresh suite broker per case."""

    def __init__(self, settings: ClientSettings) -> None:
        if "endpoint" not in placeholders(settings.command):
            raise StartError("the client command must contain {endpoint}")
        self.settings = settings
        self.versions = settings.versions
        self.context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._death: str | None = None

    def session(self, case: Case) -> AbstractContextManager[object]:
        return self._session(case)

    @contextmanager
    def _session(self, case: Case) -> Iterator[BrokerSide]:
        self._death = None
        side = BrokerSide(self.context, self.settings, case.version)
        try:
            yield side
        finally:
            for run in side.runs:
                code = run.process.returncode
                if code is not None and code < 0 and not run.process.stopping:
                    self._death = run.process.died()  # killed by a signal: a crash
            side.close()

    def casualty(self) -> str | None:
        return self._death

    def close(self) -> None:
        self.context.term()
