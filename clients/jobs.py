"""An async client of the job services (`spec/jobs.md`): one method per `jobs.*` service,
msgpack maps in and out. Used by `mdp-client submit/status/jobs/wait/result/logs/cancel/rerun`
and meant for any program that talks to `mdp-jobs` (the web console, scripts).

    async with Client(endpoint) as mdp:
        jobs = JobsAPI(mdp)
        job_id = await jobs.submit("shell", {"command_name": "make test"})
        answer = await jobs.result(job_id, wait=30)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgpack

from mdp.client import Client
from mdp.errors import ProtocolError

__all__ = ["JobsAPI", "JobsError"]


class JobsError(Exception):
    """`mdp-jobs` refused a request: `status` is its answer's status (invalid, conflict,
    expired, error), `answer` the whole answer."""

    def __init__(self, answer: dict[str, Any]) -> None:
        self.status: str = str(answer.get("status"))
        self.answer = answer
        problems = "; ".join(
            f"{e.get('loc') or 'body'}: {e.get('msg')}" for e in answer.get("errors") or []
        )
        text = answer.get("message") or self.status
        super().__init__(f"{text}: {problems}" if problems else str(text))


class JobsAPI:
    """The jobs.* services over an `mdp.client.Client`. Every method raises `JobsError` for
    a refusal, and what the client raises (`RequestTimeout`, ...) when nobody answers."""

    def __init__(self, client: Client) -> None:
        self.client = client

    async def call(self, service: str, body: dict[str, Any], **kw: Any) -> dict[str, Any]:
        """Send one jobs.* request; the answer map (raises JobsError unless status is ok)."""
        reply = await self.client.request(service, msgpack.packb(body, use_bin_type=True), **kw)
        try:
            answer = msgpack.unpackb(reply[0], raw=False) if len(reply) == 1 else None
        except Exception:  # msgpack raises several unrelated types for bad input
            answer = None
        if not isinstance(answer, dict):
            raise ProtocolError(f"{service}: the answer is not one msgpack map")
        if answer.get("status") != "ok":
            raise JobsError(answer)
        return answer

    async def submit(
        self, service: str, request: dict[str, Any], job_id: str | None = None
    ) -> dict[str, Any]:
        """Submit a command job; the answer ({"id", "state", "created"}) once it is stored."""
        body: dict[str, Any] = {"service": service, "request": request}
        if job_id is not None:
            body["id"] = job_id
        return await self.call("jobs.submit", body)

    async def status(self, ids: Sequence[str]) -> list[dict[str, Any]]:
        return list((await self.call("jobs.status", {"ids": list(ids)}))["jobs"])

    async def result(self, job_id: str, wait: float = 0.0) -> dict[str, Any]:
        """{"job": {...}, "result": {...}} (or "frames"); the wait is bounded by the client's
        timeout too, so keep `wait` below it."""
        return await self.call("jobs.result", {"id": job_id, "wait": wait})

    async def logs(
        self, job_id: str, start: int = 0, wait: float = 0.0, limit: int = 256
    ) -> dict[str, Any]:
        return await self.call(
            "jobs.logs", {"id": job_id, "from": start, "wait": wait, "limit": limit}
        )

    async def cancel(self, ids: Sequence[str]) -> list[dict[str, Any]]:
        return list((await self.call("jobs.cancel", {"ids": list(ids)}))["jobs"])

    async def list(self, **filters: Any) -> dict[str, Any]:
        body = {key: value for key, value in filters.items() if value is not None}
        return await self.call("jobs.list", body)
