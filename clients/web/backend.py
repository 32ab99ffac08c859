"""The web console's only way to the world: MDP requests through the broker.

`Backend` asks the broker's management interface (`mmi.services`, `mmi.workers`) and the job
services of `spec/jobs.md` (`jobs.submit`, `jobs.status`, `jobs.result`, `jobs.logs`,
`jobs.cancel`, `jobs.list`). It holds no state: every page and every API answer is one or a few
requests. Failures become one exception type, `BackendError`, whose `status` is the HTTP status
the API answers with (503 when nothing answered, 502 for a malformed answer, 422 for a request
the job service found invalid, 409 for a conflict).
"""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import msgpack

from clients.jobs import JobsAPI, JobsError
from mdp import mmi
from mdp.client import Client, MMINotImplemented, RequestTimeout
from mdp.errors import MDPError, ProtocolError

__all__ = ["JOB_STATES", "TERMINAL_STATES", "Backend", "BackendError", "Workers"]

JOB_STATES: Final = (
    "queued",
    "running",
    "ok",
    "failed",
    "timeout",
    "error",
    "invalid",
    "rejected",
    "cancelled",
    "lost",
)
TERMINAL_STATES: Final = frozenset(JOB_STATES[2:])
WORKERS_SERVICE: Final = mmi.WORKERS
"""The fleet's MMI extension (issue 14): a msgpack list of one map per worker."""
PROBE_AFTER: Final = 0.5
"""Seconds of silence after which the broker is asked whether the service has a worker."""
ATTEMPTS: Final = 3
"""Attempts of a job-service call (they are all safe to repeat); with several brokers each
silent attempt moves on to the next one (`mdp.client.Client`)."""
COUNT_CAP: Final = 10_000
"""Jobs counted per state at most (`count_jobs`): counting walks `jobs.list` pages."""


class BackendError(Exception):
    """A request through the broker failed. `status` is the HTTP status to answer with;
    `errors` the job service's field errors for an `invalid` answer."""

    def __init__(self, status: int, message: str, errors: list[Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.errors = errors or []


@dataclass(frozen=True, slots=True)
class Workers:
    """The answer of `mmi.workers`, or `available=False` when the broker answers 501."""

    available: bool
    workers: list[dict[str, Any]]


class Backend:
    """MDP calls for the web console; one per process, used from one event loop."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.jobs = JobsAPI(client)
        """The job services' wire (clients/jobs.py, shared with mdp-client's job commands)."""

    def close(self) -> None:
        """Close the MDP client's sockets."""
        self.client.close()

    # -----------------------------------------------------------------------------------------
    # MMI

    async def services(self) -> list[mmi.ServiceInfo]:
        """Every service the broker knows (`mmi.services`), sorted by name."""
        try:
            found = await self.client.services()
        except MMINotImplemented:
            raise BackendError(501, "the broker does not implement mmi.services") from None
        except RequestTimeout:
            raise BackendError(503, "the broker did not answer") from None
        except ProtocolError as exc:
            raise BackendError(502, f"malformed mmi.services answer: {exc}") from None
        return sorted(found, key=lambda s: s.name)

    async def workers(self) -> Workers:
        """The broker's workers (`mmi.workers`), or `available=False` if it answers 501."""
        try:
            reply = await self.client.mmi(WORKERS_SERVICE)
        except RequestTimeout:
            raise BackendError(503, "the broker did not answer") from None
        if reply == [mmi.NOT_IMPLEMENTED]:
            return Workers(False, [])
        try:
            entries = msgpack.unpackb(reply[0], raw=False) if len(reply) == 1 else None
        except Exception:  # msgpack raises several unrelated types for bad input
            entries = None
        if isinstance(entries, dict):  # a map holding the list is accepted as well
            entries = entries.get("workers")
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise BackendError(502, "malformed mmi.workers answer")
        return Workers(True, [_plain(e) for e in entries])

    # -----------------------------------------------------------------------------------------
    # Job services (spec/jobs.md)

    async def call(self, service: str, body: dict[str, Any], *, wait: float = 0) -> dict[str, Any]:
        """One job-service request; the answer map when its `status` is `ok`.

        An attempt silent for the client's timeout (`mdp-web --timeout`, plus a long poll's
        `wait`) is sent again, to the next broker when there are several, up to `ATTEMPTS` in
        all (at least one per broker): every job service is safe to repeat (reads, cancel, and
        a submit carries its own id, so a repeated one is the same job, spec/jobs.md §3.1).

        A broker queues a request for a service nobody serves without a word, so silence is
        all a missing mdp-jobs looks like. With one broker, an attempt still silent after
        `PROBE_AFTER` makes it say whether the service has a worker at all (the attempt keeps
        waiting meanwhile): a missing mdp-jobs is reported at once, not after a silent attempt.
        With several, one broker without the service says nothing of the others: the (next)
        broker is asked after the first silent attempt.
        """
        timeout = self.client.timeout + wait
        early = len(self.client.endpoints) == 1
        for attempt in range(max(ATTEMPTS, len(self.client.endpoints))):
            pending = asyncio.ensure_future(
                self.jobs.call(service, body, timeout=timeout, retries=0)
            )
            try:
                if early and attempt == 0:
                    done, _ = await asyncio.wait({pending}, timeout=PROBE_AFTER)
                    if not done and await self._present(service) is False:
                        raise BackendError(503, _absent(service))
                return await pending
            except RequestTimeout:
                if attempt == 0:
                    present = await self._present(service)
                    if present is None:
                        raise BackendError(503, "the broker did not answer") from None
                    if not present:
                        raise BackendError(503, _absent(service)) from None
            except JobsError as exc:
                raise _refusal(service, exc) from None
            except MDPError as exc:
                raise BackendError(502, f"{service}: {exc}") from None
            finally:
                if not pending.done():
                    pending.cancel()  # abandons the attempt: its socket is closed
                    pending.add_done_callback(_retrieve)
        raise BackendError(503, f"{service} did not answer in time")

    async def _present(self, service: str) -> bool | None:
        """Whether `service` has a worker (`mmi.service`); None when the broker cannot say."""
        try:
            return await self.client.service_exists(service)
        except (RequestTimeout, MDPError):
            return None

    async def submit(self, service: str, request: dict[str, Any]) -> dict[str, Any]:
        """`jobs.submit`: {"id", "state", "created"}."""
        job_id = uuid.uuid4().hex  # our own id makes a repeated submit the same job
        return await self.call(
            "jobs.submit", {"id": job_id, "service": service, "request": request}
        )

    async def job(self, job_id: str) -> dict[str, Any]:
        """`jobs.status` of one id: the job, or {"id", "state": "unknown"|"expired", ...}."""
        answer = await self.call("jobs.status", {"ids": [job_id]})
        jobs = answer.get("jobs")
        if not isinstance(jobs, list) or len(jobs) != 1 or not isinstance(jobs[0], dict):
            raise BackendError(502, "jobs.status: malformed answer")
        return _map(jobs[0])

    async def request_of(self, job_id: str) -> tuple[str, dict[str, Any] | None]:
        """The service and the raw command request of a job (None for unknown, expired and
        `frames` jobs), for a rerun: bytes such as stdin stay bytes."""
        answer = await self.call("jobs.status", {"ids": [job_id]})
        jobs = answer.get("jobs")
        job = jobs[0] if isinstance(jobs, list) and len(jobs) == 1 else None
        if not isinstance(job, dict) or not isinstance(job.get("request"), dict):
            return "", None
        request = {k: v for k, v in job["request"].items() if k not in ("request_id", "start_by")}
        return str(job.get("service")), request

    async def result(self, job_id: str) -> dict[str, Any]:
        """`jobs.result` without waiting: {"job", "result"?}."""
        return _map(await self.call("jobs.result", {"id": job_id}))

    async def logs(
        self, job_id: str, start: int = 0, limit: int = 256, wait: float = 0
    ) -> dict[str, Any]:
        """`jobs.logs`: {"state", "chunks": [{"n", "stream", "data"}], "next", "done"}."""
        body: dict[str, Any] = {"id": job_id, "from": start, "limit": limit}
        if wait:
            body["wait"] = wait
        return _map(await self.call("jobs.logs", body, wait=wait))

    async def cancel(self, ids: Sequence[str]) -> list[dict[str, Any]]:
        """`jobs.cancel`: one {"id", "state", "cancel"} per id."""
        answer = await self.call("jobs.cancel", {"ids": list(ids)})
        return [_plain(j) for j in answer.get("jobs") or []]

    async def list_jobs(
        self,
        states: Sequence[str] = (),
        service: str | None = None,
        before: int | None = None,
        limit: int = 50,
        since: float | None = None,
    ) -> dict[str, Any]:
        """`jobs.list`, newest first: {"jobs": [...], "next"?}."""
        body: dict[str, Any] = {"limit": limit}
        if states:
            body["state"] = list(states)
        if service:
            body["service"] = service
        if before is not None:
            body["before"] = before
        if since is not None:
            body["since"] = since
        return _map(await self.call("jobs.list", body))

    async def count_jobs(self, since: float | None = None) -> dict[str, int]:
        """Jobs per state, each counted up to `COUNT_CAP` (one `jobs.list` walk per state)."""

        async def count(state: str) -> int:
            total, before = 0, None
            while total < COUNT_CAP:
                page = await self.list_jobs([state], before=before, limit=1000, since=since)
                total += len(page.get("jobs") or [])
                before = page.get("next")
                if before is None:
                    break
            return min(total, COUNT_CAP)

        counts = await asyncio.gather(*(count(s) for s in JOB_STATES))
        return dict(zip(JOB_STATES, counts, strict=True))


def _absent(service: str) -> str:
    return f"no worker serves {service}: is mdp-jobs running?"


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Fetch an abandoned attempt's outcome, so asyncio does not log it as never retrieved."""
    if not task.cancelled():
        task.exception()


def _refusal(service: str, exc: JobsError) -> BackendError:
    """The HTTP view of a job service's refusal (spec/jobs.md §2)."""
    answer = exc.answer
    message = str(answer.get("message") or exc.status)
    if exc.status == "invalid":
        return BackendError(422, message, list(answer.get("errors") or []))
    if exc.status in ("conflict", "expired"):
        return BackendError(409, message)
    return BackendError(503, f"{service}: {message}")


def _map(value: Any) -> dict[str, Any]:
    """`_plain` of a map (answers are maps)."""
    plain = _plain(value)
    return plain if isinstance(plain, dict) else {}


def _plain(value: Any) -> Any:
    """A decoded msgpack value made JSON-safe the way `mdp-client --json` does it: bytes
    become a string when they are valid UTF-8 and {"base64": "..."} otherwise."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return {"base64": base64.b64encode(value).decode("ascii")}
    return value


def now() -> float:
    """Wall-clock time, as job times are (Unix seconds)."""
    return time.time()
