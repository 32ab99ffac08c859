"""The broker under test: a command the suite starts (and restarts after a crash) or an
endpoint someone else runs. Each case gets a fresh `Harness` of raw-frame clients and workers.
"""

from __future__ import annotations

import contextlib
import shlex
import socket
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

import zmq

from mdp_conformance.harness import BrokerTarget, Harness
from mdp_conformance.process import Started, StartError, expand, free_endpoint, placeholders
from mdp_conformance.rules import VERSIONS, Case

# Timings the suite passes to a broker command that has the placeholders: short, so the
# heartbeat and expiry rules take a fraction of a second.
FAST_HEARTBEAT_MS = 100
FAST_LIVENESS = 3
FAST_REQUEST_TTL = 1.0
# What a broker uses when nobody told it otherwise: the zguide's 2500 ms x 3.
CONVENTIONAL_HEARTBEAT_MS = 2500
CONVENTIONAL_LIVENESS = 3


@dataclass(frozen=True)
class BrokerSettings:
    """What the user told the suite (None: the default for the way the broker is reached)."""

    command: str | None = None
    endpoint: str | None = None
    versions: tuple[str, ...] = VERSIONS
    heartbeat_ms: int | None = None
    liveness: int | None = None
    request_ttl: float | None = None
    quiet_ms: int | None = None


def _check_listening(endpoint: str) -> None:
    """A tcp endpoint nobody listens on would make every rule time out: say so at once."""
    if not endpoint.startswith("tcp://"):
        return
    host, _, port = endpoint.removeprefix("tcp://").rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
            return
    except (OSError, ValueError) as exc:
        raise StartError(f"no broker listens on {endpoint}: {exc}") from None


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


class BrokerSubject:
    """A broker reached at an endpoint; restarted by the suite when it started it and it died."""

    def __init__(self, settings: BrokerSettings) -> None:
        if (settings.command is None) == (settings.endpoint is None):
            raise ValueError("give a broker command or an endpoint, not both or neither")
        self.settings = settings
        self.versions = settings.versions
        used = placeholders(settings.command) if settings.command else set()
        hb_ms = settings.heartbeat_ms or (
            FAST_HEARTBEAT_MS if "heartbeat_ms" in used else CONVENTIONAL_HEARTBEAT_MS
        )
        liveness = settings.liveness or (
            FAST_LIVENESS if "liveness" in used else CONVENTIONAL_LIVENESS
        )
        ttl = settings.request_ttl
        if ttl is None and "request_ttl" in used:
            ttl = FAST_REQUEST_TTL
        quiet = (
            settings.quiet_ms / 1000 if settings.quiet_ms else min(1.0, max(0.3, 3 * hb_ms / 1000))
        )
        self.heartbeat_ms, self.liveness, self.request_ttl, self.quiet = hb_ms, liveness, ttl, quiet
        self.context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.process: Started | None = None
        self.broken: str | None = None  # why the broker could not be (re)started
        self.starts = 0
        self.endpoint = settings.endpoint or ""
        if settings.command is not None:
            self._start()
        else:
            _check_listening(self.endpoint)

    @property
    def command_line(self) -> str:
        return shlex.join(self.process.argv) if self.process else self.endpoint

    def _start(self) -> None:
        assert self.settings.command is not None
        # A fresh endpoint on every start: the dead broker's port may linger in TIME_WAIT.
        self.endpoint = free_endpoint()
        values = {
            "endpoint": self.endpoint,
            "heartbeat_ms": str(self.heartbeat_ms),
            "liveness": str(self.liveness),
            "request_ttl": _number(self.request_ttl) if self.request_ttl is not None else "",
        }
        self.starts += 1
        try:
            self.process = Started(expand(self.settings.command, values), "broker")
            self.process.wait_listening(self.endpoint)
        except StartError as exc:
            self.broken = str(exc)
            raise

    def target(self) -> BrokerTarget:
        return BrokerTarget(
            self.endpoint, self.heartbeat_ms / 1000, self.liveness, self.request_ttl, self.quiet
        )

    def session(self, case: Case) -> AbstractContextManager[object]:
        return self._session()

    @contextmanager
    def _session(self) -> Iterator[Harness]:
        if self.broken is not None:
            raise StartError(f"the broker could not be restarted: {self.broken}")
        if self.process is not None and not self.process.alive():
            self._start()  # it died outside a case (between cases): start it again
        process = self.process
        harness = Harness(
            self.context, self.target(), dead=lambda: process is not None and not process.alive()
        )
        try:
            yield harness
        finally:
            harness.close()

    def casualty(self) -> str | None:
        if self.process is None or self.process.alive():
            return None
        died = self.process.died()
        self.process.stop()
        with contextlib.suppress(StartError):  # recorded in self.broken; later cases say so
            self._start()
        return died

    def close(self) -> None:
        if self.process is not None:
            self.process.stop()
        self.context.term()
