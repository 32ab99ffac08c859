"""`/metrics` of mdp-web: the broker's services and the job service, seen through MDP.

mdp-web holds no state, so a scrape asks: `mmi.services` for workers and queued requests per
service, `mmi.workers` (when the broker has it) for busy and idle workers, and `jobs.list` for
the jobs per state. Jobs that started since the last scrape add their queue wait (started -
created) to a histogram; the ids already counted are remembered in a bounded set so a job is
counted once. Counters of what this process did (jobs submitted) are kept as usual.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from clients.web.backend import Backend, BackendError
from mdp.metrics import DURATION_BUCKETS

__all__ = ["WebMetrics"]

SEEN_CAP: Final = 10_000
RECENT: Final = 1000


class _Snapshot(Collector):
    """Gauges from the last refresh, handed to prometheus-client at collect time."""

    def __init__(self) -> None:
        self.services: list[tuple[str, int, int]] = []
        self.workers: dict[str, int] | None = None
        self.jobs: dict[str, int] = {}
        self.up: dict[str, int] = {"broker": 0, "jobs": 0}

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily(
            "mdp_web_backend_up", "1 if the last scrape reached it", labels=["backend"]
        )
        for name, value in self.up.items():
            up.add_metric([name], value)
        yield up
        workers = GaugeMetricFamily(
            "mdp_service_workers", "Workers registered per service", labels=["service"]
        )
        queued = GaugeMetricFamily(
            "mdp_service_queued_requests",
            "Requests waiting in the broker for a worker, per service",
            labels=["service"],
        )
        for name, count, waiting in self.services:
            workers.add_metric([name], count)
            queued.add_metric([name], waiting)
        yield workers
        yield queued
        if self.workers is not None:
            by_state = GaugeMetricFamily(
                "mdp_workers", "Workers by state (mmi.workers)", labels=["state"]
            )
            for state, count in self.workers.items():
                by_state.add_metric([state], count)
            yield by_state
        jobs = GaugeMetricFamily(
            "mdp_jobs", "Jobs in the job store by state (counted up to 10000)", labels=["state"]
        )
        for state, count in self.jobs.items():
            jobs.add_metric([state], count)
        yield jobs


class WebMetrics:
    """The registry behind `/metrics`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.submitted = Counter(
            "mdp_web_jobs_submitted", "Jobs submitted through mdp-web", registry=self.registry
        )
        self.queue_wait = Histogram(
            "mdp_job_queue_wait_seconds",
            "Time jobs waited between submit and start",
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.snapshot = _Snapshot()
        self.registry.register(self.snapshot)
        self._seen: OrderedDict[str, None] = OrderedDict()

    async def render(self, backend: Backend) -> bytes:
        """Refresh from the broker and the job service, then the text exposition format."""
        await self.refresh(backend)
        return generate_latest(self.registry)

    async def refresh(self, backend: Backend) -> None:
        snap = self.snapshot
        try:
            services = await backend.services()
            snap.services = [(s.name, s.workers, s.queued) for s in services]
            found = await backend.workers()
            snap.workers = _worker_states(found.workers) if found.available else None
            snap.up["broker"] = 1
        except BackendError:
            snap.up["broker"] = 0
            snap.services, snap.workers = [], None
        try:
            snap.jobs = await backend.count_jobs()
            recent = await backend.list_jobs(limit=RECENT)
            self._observe_waits(recent.get("jobs") or [])
            snap.up["jobs"] = 1
        except BackendError:
            snap.up["jobs"] = 0
            snap.jobs = {}

    def _observe_waits(self, jobs: list[dict[str, Any]]) -> None:
        for job in reversed(jobs):  # oldest first, so the bounded memory drops the oldest
            started, created, job_id = job.get("started"), job.get("created"), job.get("id")
            if not isinstance(started, int | float) or not isinstance(created, int | float):
                continue
            if job_id in self._seen:
                continue
            self._seen[str(job_id)] = None
            if len(self._seen) > SEEN_CAP:
                self._seen.popitem(last=False)
            self.queue_wait.observe(max(0.0, float(started) - float(created)))


def _worker_states(workers: list[dict[str, Any]]) -> dict[str, int]:
    counts = {"busy": 0, "idle": 0}
    for worker in workers:
        counts["busy" if worker_busy(worker) else "idle"] += 1
    return counts


def worker_busy(worker: dict[str, Any]) -> bool:
    """Whether an `mmi.workers` entry holds a request (`busy`, or `state` == "busy")."""
    if "busy" in worker:
        return bool(worker["busy"])
    return str(worker.get("state", "")).lower() == "busy"
