"""The broker's Prometheus metrics, read from the counters its core keeps anyway.

`BrokerCollector.collect()` runs in the metrics server's thread when Prometheus scrapes: it
copies the core's integers (a few dict and list copies, each one C call under the GIL, so the
routing loop never sees a half-read state and does no work of its own for metrics). The core
counts per service name in `BrokerCore.service_counts` (see `ServiceCounts`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import fields

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mdp.broker.core import BrokerCore, ServiceCounts

__all__ = ["BrokerCollector"]

OUTCOMES = tuple(f.name for f in fields(ServiceCounts))


def _text(name: bytes) -> str:
    return name.decode("utf-8", "replace")


class BrokerCollector(Collector):
    """`mdp_broker_*` metrics of one `BrokerCore` (names and labels: spec/api.md §4)."""

    def __init__(self, core: BrokerCore) -> None:
        self.core = core

    def collect(self) -> Iterable[Metric]:
        core = self.core
        stats = core.stats
        counts = list(core.service_counts.items())
        services = list(core.services.values())
        requests = CounterMetricFamily(
            "mdp_broker_requests",
            "Client requests by service and what became of them",
            labels=["service", "outcome"],
        )
        for name, count in counts:
            for outcome in OUTCOMES:
                requests.add_metric([_text(name), outcome], getattr(count, outcome))
        yield requests
        workers = GaugeMetricFamily(
            "mdp_broker_service_workers", "Workers registered per service", labels=["service"]
        )
        queued = GaugeMetricFamily(
            "mdp_broker_service_queued_requests",
            "Requests waiting for a worker, per service",
            labels=["service"],
        )
        for service in services:
            workers.add_metric([_text(service.name)], service.worker_count)
            queued.add_metric([_text(service.name)], len(service.requests))
        yield workers
        yield queued
        yield GaugeMetricFamily("mdp_broker_workers", "Workers registered", value=len(core.workers))
        yield CounterMetricFamily(
            "mdp_broker_workers_registered",
            "Workers that registered (READY)",
            value=stats.workers_registered,
        )
        yield CounterMetricFamily(
            "mdp_broker_workers_expired",
            "Workers expired after heartbeat x liveness of silence",
            value=stats.workers_expired,
        )
        dropped = CounterMetricFamily(
            "mdp_broker_messages_dropped",
            "Messages dropped: invalid, unexpected commands, unroutable, oversized",
            labels=["reason"],
        )
        dropped.add_metric(["invalid"], stats.invalid_messages)
        dropped.add_metric(["unexpected"], stats.unexpected_commands)
        dropped.add_metric(["unroutable"], stats.unroutable)
        dropped.add_metric(["oversized"], stats.oversized_messages)
        yield dropped
        yield CounterMetricFamily(
            "mdp_broker_mmi_requests", "MMI requests answered", value=stats.mmi_requests
        )
        # spec/security.md §6.2: an --insecure broker says so here too (one series per open
        # endpoint, value 1; none at all when every peer is authenticated or local).
        unauthenticated = GaugeMetricFamily(
            "mdp_broker_unauthenticated_endpoints",
            "Endpoints on which the broker accepts unauthenticated peers (--insecure)",
            labels=["endpoint"],
        )
        for endpoint in core.unauthenticated:
            unauthenticated.add_metric([endpoint], 1)
        yield unauthenticated
