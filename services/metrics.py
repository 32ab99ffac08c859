"""Prometheus metrics of the command services (`mdp-worker --metrics-bind`).

Counted when a command service answers a request: `mdp_commands_total` by service and status
(`ok`, `failed`, `timeout`, ... as spec/command-service.md §8), `mdp_command_duration_seconds`
(the run time the FINAL reports; buckets up to 600 s), and `mdp_commands_running`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from mdp.metrics import DURATION_BUCKETS
from services.bodies import BodyError, unpack_map

__all__ = ["CommandMetrics"]


class CommandMetrics:
    """The command services' metrics, in one registry shared by every service of a worker."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.commands = Counter(
            "mdp_commands",
            "Commands answered, by service and status",
            ["service", "status"],
            registry=registry,
        )
        self.duration = Histogram(
            "mdp_command_duration_seconds",
            "Run time of commands (from start to exit, as the result reports it)",
            ["service"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.running = Gauge(
            "mdp_commands_running", "Requests being handled now", ["service"], registry=registry
        )

    @contextlib.contextmanager
    def handling(self, service: str) -> Iterator[None]:
        """Count a request in `mdp_commands_running` while it is handled."""
        gauge = self.running.labels(service)
        gauge.inc()
        try:
            yield
        finally:
            gauge.dec()

    def answered(self, service: str, reply: list[bytes]) -> None:
        """Count the FINAL `reply` (a packed CommandResult) of a request to `service`."""
        try:
            result = unpack_map(reply[0]) if len(reply) == 1 else {}
        except BodyError:
            result = {}
        status = result.get("status")
        self.commands.labels(service, status if isinstance(status, str) else "unknown").inc()
        duration = result.get("duration_ms")
        if isinstance(duration, int | float) and duration > 0:
            self.duration.labels(service).observe(duration / 1000)
