"""The client side of MDP as a pure state machine: one request, its attempts and its deadlines.

No sockets and no clock reads: the caller passes `now` (a monotonic time in seconds) and does
what the returned values say. `mdp.client` is the asyncio/pyzmq loop around it.

Theory of operation
-------------------
RFC 7 and RFC 18 make the client dialog strictly synchronous: a client sends one REQUEST and
then gets zero or more PARTIALs (0.2 only) and one FINAL (0.1: REPLY). Replies carry the service
name but no request id, so a reply can only be correlated by the socket it arrives on. Each
*attempt* of a request therefore owns one DEALER socket for its whole life:

    start() -> Send(attempt 1, endpoint, frames)        caller: fresh socket, connect, send
    receive(frames) -> Part | None                      every valid PARTIAL resets liveness;
                                                        FINAL ends the request
    expire() -> Send(attempt n+1, next endpoint, ...)   no traffic for `timeout` seconds: the
              | raises RequestTimeout                   caller closes the socket (linger 0) and
                                                        never reuses it, so a late reply to an
                                                        abandoned attempt can reach nobody

This is the recovery strategy RFC 7/18 recommend for a non-responsive broker ("close the request
socket and open a new socket, and resend the request"), i.e. the zguide's Lazy Pirate, with
three additions: PARTIALs count as proof of life, the endpoints are tried in turn, and a retry
policy may refuse a retry (a command that already started must not silently run twice).

Two more hooks make retries safe for services that cannot run a request twice
(spec/command-service.md §14.1): `rebuild` gives each attempt its own body (a start deadline),
and `settle` keeps an attempt that has had no PARTIAL open that much longer after its liveness
deadline, so that a first PARTIAL sent just before the deadline still counts. A FINAL the
caller recognises as "this attempt did not run" can be turned into the next attempt at once
(`retry_after_final`).

States: "new" -> "waiting" -> "done" | "failed". Messages received in any state other than
"waiting" are ignored, as are messages that do not parse or name another service.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mdp.errors import ProtocolError, Timeout
from mdp.protocol import Version, build_client_request, parse_client_reply

__all__ = [
    "AttemptFailed",
    "Part",
    "RequestCore",
    "RequestTimeout",
    "RetryPolicy",
    "Send",
    "always_retry",
]


@dataclass(frozen=True, slots=True)
class Send:
    """Start attempt number `attempt`: open a fresh socket to `endpoint` and send `frames`."""

    attempt: int
    endpoint: str
    frames: list[bytes]


@dataclass(frozen=True, slots=True)
class Part:
    """One PARTIAL (`final` false) or the FINAL (`final` true) of a request.

    `attempt` says which attempt it belongs to (1 for the first send): after a retry, a
    streaming caller sees the PARTIALs of the new attempt, and may want to discard the old ones.
    """

    final: bool
    body: list[bytes]
    attempt: int


@dataclass(frozen=True, slots=True)
class AttemptFailed:
    """What a retry policy is told about an attempt that went silent for the liveness timeout."""

    service: bytes
    attempt: int
    """The attempt that failed, counting from 1."""
    endpoint: str
    partials: int
    """PARTIALs received during this attempt."""
    total_partials: int
    """PARTIALs received during all attempts of this request so far."""


RetryPolicy = Callable[[AttemptFailed], bool]
"""Decides whether a request may be sent again after `AttemptFailed`. Return False to give up."""


def always_retry(failed: AttemptFailed) -> bool:
    """The default policy: retry while retries remain (RFC 7/18 assume idempotent workers)."""
    return True


class RequestTimeout(Timeout):
    """A request got no FINAL: every attempt went silent, or the retry policy refused a retry.

    Attributes say what happened so a caller can report it precisely.
    """

    def __init__(
        self,
        message: str,
        *,
        service: bytes,
        attempts: int,
        endpoints: list[str],
        partials: int,
        retry_refused: bool,
    ) -> None:
        super().__init__(message)
        self.service = service
        self.attempts = attempts
        """How many attempts were sent."""
        self.endpoints = endpoints
        """The endpoint of each attempt, in order."""
        self.partials = partials
        """PARTIALs received over all attempts (0: nothing ever came back)."""
        self.retry_refused = retry_refused
        """True when the retry policy said no; False when the retries ran out (or the deadline)."""


class RequestCore:
    """One request's attempts, liveness deadline and reply validation. See the module docstring.

    `timeout` is the liveness timeout of an attempt (seconds without any valid message);
    `retries` how many times the request may be re-sent after the first attempt; `total_timeout`
    an optional bound on the whole request, retries included. Attempt n goes to
    `endpoints[(first_endpoint + n - 1) % len(endpoints)]`.
    """

    def __init__(
        self,
        version: Version | str,
        service: bytes,
        body: Sequence[bytes],
        endpoints: Sequence[str],
        *,
        timeout: float,
        retries: int,
        total_timeout: float | None = None,
        first_endpoint: int = 0,
        rebuild: Callable[[int], Sequence[bytes]] | None = None,
        settle: float = 0.0,
    ) -> None:
        if not endpoints:
            raise ValueError("at least one broker endpoint is needed")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        if retries < 0:
            raise ValueError("retries must not be negative")
        if settle < 0:
            raise ValueError("settle must not be negative")
        self.version = Version(version)
        self.service = service
        # Validates the service name and the body now, before anything is sent.
        self.frames = build_client_request(self.version, service, list(body))
        self.endpoints = list(endpoints)
        self.timeout = timeout
        self.retries = retries
        self.total_timeout = total_timeout
        self.first_endpoint = first_endpoint % len(self.endpoints)
        self.rebuild = rebuild
        """Called with the attempt number (1, 2, ...) for that attempt's body."""
        self.settle = settle
        """Seconds an attempt without any PARTIAL stays open past its liveness deadline."""
        self.state = "new"
        self.attempt = 0
        self.sent_to: list[str] = []
        self.partials = 0
        self.total_partials = 0
        self.ignored = 0
        """Messages dropped because they did not parse or named another service."""
        self._liveness_deadline = 0.0
        self._total_deadline: float | None = None

    # -----------------------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """The endpoint of the current attempt."""
        return self.sent_to[-1]

    @property
    def deadline(self) -> float:
        """When the current attempt expires unless something arrives first."""
        liveness = self._liveness_deadline
        if not self.partials:
            liveness += self.settle
        if self._total_deadline is None:
            return liveness
        return min(liveness, self._total_deadline)

    def start(self, now: float) -> Send:
        """The first attempt."""
        if self.state != "new":
            raise RuntimeError("request already started")
        if self.total_timeout is not None:
            self._total_deadline = now + self.total_timeout
        return self._next_attempt(now)

    def receive(self, frames: list[bytes], now: float) -> Part | None:
        """A message arrived on the current attempt's socket. None means: ignored, keep waiting."""
        if self.state != "waiting":
            self.ignored += 1
            return None
        try:
            reply = parse_client_reply(self.version, frames)
        except ProtocolError:
            self.ignored += 1
            return None
        if reply.service != self.service:
            # RFC 7/18: replies carry the service name of the request they answer.
            self.ignored += 1
            return None
        if reply.final:
            self.state = "done"
        else:
            # Any PARTIAL is proof that the broker and a worker are alive: liveness restarts.
            self.partials += 1
            self.total_partials += 1
            self._liveness_deadline = now + self.timeout
        return Part(reply.final, reply.body, self.attempt)

    def expire(self, now: float, may_retry: RetryPolicy = always_retry) -> Send:
        """The current attempt's deadline passed: the next attempt, or RequestTimeout.

        The caller must close the current attempt's socket whatever this returns or raises.
        """
        if self.state != "waiting":
            raise RuntimeError(f"expire() in state {self.state}")
        failed = AttemptFailed(
            self.service, self.attempt, self.endpoint, self.partials, self.total_partials
        )
        if self._total_deadline is not None and now >= self._total_deadline:
            raise self._fail(f"no FINAL within {self.total_timeout:g} s", refused=False)
        if self.attempt > self.retries:
            raise self._fail(self._silence_message(), refused=False)
        if not may_retry(failed):
            raise self._fail(self._silence_message() + "; retry refused", refused=True)
        return self._next_attempt(now)

    def retry_after_final(self, now: float, may_retry: RetryPolicy = always_retry) -> Send | None:
        """The FINAL just received says this attempt did not run (the caller knows how to
        tell): the next attempt at once, or None when no retry is left or the policy refuses
        (the caller then takes that FINAL as the answer)."""
        if self.state != "done":
            raise RuntimeError(f"retry_after_final() in state {self.state}")
        failed = AttemptFailed(
            self.service, self.attempt, self.endpoint, self.partials, self.total_partials
        )
        if self._total_deadline is not None and now >= self._total_deadline:
            return None
        if self.attempt > self.retries or not may_retry(failed):
            return None
        return self._next_attempt(now)

    # -----------------------------------------------------------------------------------------

    def _next_attempt(self, now: float) -> Send:
        endpoint = self.endpoints[(self.first_endpoint + self.attempt) % len(self.endpoints)]
        if self.rebuild is not None and self.attempt:
            # The first attempt's body was built (and checked) in __init__.
            self.frames = build_client_request(
                self.version, self.service, list(self.rebuild(self.attempt + 1))
            )
        self.attempt += 1
        self.partials = 0
        self.sent_to.append(endpoint)
        self.state = "waiting"
        self._liveness_deadline = now + self.timeout
        return Send(self.attempt, endpoint, self.frames)

    def _silence_message(self) -> str:
        tries = "attempt" if self.attempt == 1 else "attempts"
        what = "after a PARTIAL" if self.partials else "to the request"
        return (
            f"no answer {what} within {self.timeout:g} s "
            f"({self.attempt} {tries}: {', '.join(self.sent_to)})"
        )

    def _fail(self, message: str, *, refused: bool) -> RequestTimeout:
        self.state = "failed"
        return RequestTimeout(
            message,
            service=self.service,
            attempts=self.attempt,
            endpoints=list(self.sent_to),
            partials=self.total_partials,
            retry_refused=refused,
        )
