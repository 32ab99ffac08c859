"""The REST API under /api/v1 (spec/api.md): JSON over the job services and MMI.

Every handler is a thin translation: HTTP in, one or a few MDP requests through `Backend`, JSON
out. Bodies of submits are validated by the same model as a commands file (`CommandSpec`), so
the API refuses exactly what `mdp-client -f` refuses, with FastAPI's 422 and the field's error.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from clients.commands import CommandSpec
from clients.web.backend import JOB_STATES, Backend, BackendError
from clients.web.output import display_chunk
from services.bodies import CommandRequest

__all__ = ["RETRY_PAUSE", "SSE_WAIT", "router"]

RETRY_PAUSE = 1.0
"""Seconds between tries of a stream whose job service did not answer."""
SSE_WAIT = 15.0
"""Seconds one long poll of `jobs.logs` waits for output; a keep-alive comment follows each."""

router = APIRouter(prefix="/api/v1")


def backend_of(request: Request) -> Backend:
    backend: Backend = request.app.state.backend
    return backend


class Problem(BaseModel):
    """An error answer: `detail` says what; `errors` lists field errors when there are any."""

    detail: str
    errors: list[Any] = []


PROBLEMS: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "No token or session"},
    503: {"model": Problem, "description": "The broker or the job service did not answer"},
}


def problem(exc: BackendError) -> JSONResponse:
    """The JSON answer for a failed backend call."""
    return JSONResponse({"detail": exc.message, "errors": exc.errors}, status_code=exc.status)


# ----------------------------------------------------------------------------------------------
# Services and workers


@router.get("/services", responses=PROBLEMS, tags=["broker"])
async def list_services(request: Request) -> Any:
    """The broker's services (`mmi.services`): name, registered workers, queued requests."""
    try:
        services = await backend_of(request).services()
    except BackendError as exc:
        return problem(exc)
    return {"services": [s.to_map() for s in services]}


@router.get("/workers", responses=PROBLEMS, tags=["broker"])
async def list_workers(request: Request) -> Any:
    """The broker's workers (`mmi.workers`). `available` is false when the broker does not
    implement it (it answers 501); `workers` is then empty and `/services` has the counts."""
    try:
        found = await backend_of(request).workers()
    except BackendError as exc:
        return problem(exc)
    return {"available": found.available, "workers": found.workers}


# ----------------------------------------------------------------------------------------------
# Jobs


@router.post("/jobs", status_code=201, responses=PROBLEMS, tags=["jobs"])
async def submit_jobs(request: Request, body: CommandSpec | list[CommandSpec]) -> Any:
    """Submit one command or a list, with the fields of a commands file (`command_type` is the
    service, e.g. `shell`, or `shell@HOST` for one worker). Answers the new jobs' ids."""
    specs = body if isinstance(body, list) else [body]
    if not specs:
        raise HTTPException(422, "the list holds no commands")
    backend = backend_of(request)
    jobs = []
    for spec in specs:
        try:
            answer = await backend.submit(spec.command_type, request_body(spec))
        except BackendError as exc:
            return problem(exc)
        request.app.state.metrics.submitted.inc()
        jobs.append(
            {"id": answer.get("id"), "state": answer.get("state"), "service": spec.command_type}
        )
    return {"jobs": jobs}


def request_body(spec: CommandSpec) -> dict[str, Any]:
    """The command request a job carries (the job id becomes its request_id)."""
    fields = spec.model_dump(exclude_none=True, exclude={"command_type"})
    return CommandRequest.model_validate(fields).model_dump(exclude_none=True)


@router.get("/jobs", responses=PROBLEMS, tags=["jobs"])
async def list_jobs(
    request: Request,
    state: Annotated[list[str], Query(description="Repeat for several states")] = [],  # noqa: B006
    service: str | None = None,
    host: Annotated[str | None, Query(description="Jobs whose worker ran on this host")] = None,
    before: Annotated[int | None, Query(description="The `next` of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
) -> Any:
    """Jobs, newest first, filtered by state, service and host; `next` pages on."""
    unknown = [s for s in state if s not in JOB_STATES]
    if unknown:
        raise HTTPException(422, f"unknown state {unknown[0]!r}; states: {', '.join(JOB_STATES)}")
    try:
        return await find_jobs(backend_of(request), state, service, host, before, limit)
    except BackendError as exc:
        return problem(exc)


async def find_jobs(
    backend: Backend,
    states: list[str],
    service: str | None,
    host: str | None,
    before: int | None,
    limit: int,
) -> dict[str, Any]:
    """One page of jobs. A host filter is applied to the pages `jobs.list` gives (it has no
    host field), reading at most 10 of them to fill the page."""
    if not host:
        page = await backend.list_jobs(states, service, before, limit)
        return {"jobs": page.get("jobs") or [], "next": page.get("next")}
    found: list[dict[str, Any]] = []
    cursor = before
    for _ in range(10):
        page = await backend.list_jobs(states, service, cursor, limit)
        found.extend(j for j in page.get("jobs") or [] if job_host(j) == host)
        cursor = page.get("next")
        if cursor is None or len(found) >= limit:
            break
    return {"jobs": found[:limit], "next": cursor}


def job_host(job: dict[str, Any]) -> str | None:
    """The host a job ran on (its worker's), or the host it was sent to (`SERVICE@HOST`)."""
    worker = job.get("worker")
    if isinstance(worker, dict) and worker.get("host"):
        return str(worker["host"])
    service = str(job.get("service") or "")
    return service.split("@", 1)[1] if "@" in service else None


async def known_job(backend: Backend, job_id: str) -> dict[str, Any]:
    """The job, or HTTP 404 (unknown id) / 410 (expired by retention)."""
    job = await backend.job(job_id)
    if job.get("state") == "unknown":
        raise HTTPException(404, f"no job {job_id!r}")
    if job.get("state") == "expired":
        raise HTTPException(410, f"job {job_id!r} has expired (retention removed it)")
    return job


@router.get("/jobs/{job_id}", responses=PROBLEMS, tags=["jobs"])
async def get_job(request: Request, job_id: str) -> Any:
    """One job (`jobs.status`), with its request. 404 unknown, 410 expired."""
    try:
        return await known_job(backend_of(request), job_id)
    except BackendError as exc:
        return problem(exc)


@router.get("/jobs/{job_id}/result", responses=PROBLEMS, tags=["jobs"])
async def get_result(request: Request, job_id: str) -> Any:
    """The job and, once it ended with one, the command's FINAL (`jobs.result`). stdout and
    stderr are strings when valid UTF-8, else {"base64": ...}."""
    backend = backend_of(request)
    try:
        await known_job(backend, job_id)
        return await backend.result(job_id)
    except BackendError as exc:
        return problem(exc)


@router.get("/jobs/{job_id}/output", responses=PROBLEMS, tags=["jobs"])
async def get_output(
    request: Request,
    job_id: str,
    start: Annotated[int, Query(alias="from", ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=1024)] = 256,
) -> Any:
    """Stored output chunks from number `from` (`jobs.logs`): `next` is the number to ask for
    next; `done` is true once the job ended and every chunk was read."""
    backend = backend_of(request)
    try:
        await known_job(backend, job_id)
        logs = await backend.logs(job_id, start, limit)
    except BackendError as exc:
        return problem(exc)
    return {k: logs.get(k) for k in ("state", "chunks", "next", "done")}


@router.post("/jobs/{job_id}/cancel", responses=PROBLEMS, tags=["jobs"])
async def cancel_job(request: Request, job_id: str) -> Any:
    """Cancel a job: `cancel` is `cancelled` (it was queued), `requested` (it runs; its
    process group is ended), or `finished` (already over)."""
    backend = backend_of(request)
    try:
        await known_job(backend, job_id)
        answers = await backend.cancel([job_id])
    except BackendError as exc:
        return problem(exc)
    if len(answers) != 1:
        return problem(BackendError(502, "jobs.cancel: malformed answer"))
    return answers[0]


@router.post("/jobs/{job_id}/rerun", status_code=201, responses=PROBLEMS, tags=["jobs"])
async def rerun_job(request: Request, job_id: str) -> Any:
    """A new job with the same service and request as this one."""
    backend = backend_of(request)
    try:
        answer = await rerun(backend, job_id)
    except BackendError as exc:
        return problem(exc)
    request.app.state.metrics.submitted.inc()
    return answer


async def rerun(backend: Backend, job_id: str) -> dict[str, Any]:
    """Submit a copy of job `job_id`: {"id", "state", "service"}."""
    service, body = await backend.request_of(job_id)
    if body is None:
        raise HTTPException(404, f"no job {job_id!r} with a command to run again")
    answer = await backend.submit(service, body)
    return {"id": answer.get("id"), "state": answer.get("state"), "service": service}


# ----------------------------------------------------------------------------------------------
# Live output


@router.get(
    "/jobs/{job_id}/events",
    responses={200: {"content": {"text/event-stream": {}}}, **PROBLEMS},
    response_class=StreamingResponse,
    tags=["jobs"],
)
async def job_events(
    request: Request,
    job_id: str,
    start: Annotated[int, Query(alias="from", ge=0)] = 0,
    last_event_id: Annotated[str | None, Header()] = None,
) -> Any:
    """Server-Sent Events: `state` (the job now), one `output` per chunk (its `id` is the
    chunk number), more `state` events as it changes, and `end` (the final job) last.

    Stored chunks come first, then live ones. A client that reconnects with `Last-Event-ID`
    (EventSource does it by itself) resumes after that chunk, with no gap and no repeat."""
    backend = backend_of(request)
    if last_event_id is not None:
        try:
            start = max(start, int(last_event_id) + 1)
        except ValueError:
            raise HTTPException(400, "Last-Event-ID must be a chunk number") from None
    try:
        job = await known_job(backend, job_id)
    except BackendError as exc:
        return problem(exc)
    return StreamingResponse(
        stream_events(backend, job, start),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


def sse(event: str, data: Any, event_id: int | None = None) -> str:
    """One Server-Sent Event (data is JSON on one line)."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


async def stream_events(backend: Backend, job: dict[str, Any], start: int) -> AsyncIterator[str]:
    """The event stream of one job (see `job_events`)."""
    job_id = str(job["id"])
    yield "retry: 1000\n\n"
    yield sse("state", job)
    state = job.get("state")
    wait = 0.0
    while True:
        try:
            logs = await backend.logs(job_id, start, 256, wait=wait)
        except BackendError as exc:
            if exc.status != 503:
                yield sse("problem", {"detail": exc.message})
                return
            # The job service is away (restarting, overloaded): say so and keep trying; the
            # stream resumes where it was when it answers again.
            yield sse("problem", {"detail": exc.message, "retrying": True})
            await asyncio.sleep(RETRY_PAUSE)
            continue
        chunks = logs.get("chunks") or []
        for chunk in chunks:
            yield sse("output", display_chunk(chunk), int(chunk["n"]))
        start = int(logs.get("next", start))
        if logs.get("state") != state and logs.get("state") not in (None, "unknown", "expired"):
            state = logs.get("state")
            try:
                job = await backend.job(job_id)
            except BackendError:
                job = {**job, "state": state}
            if not logs.get("done"):
                yield sse("state", job)
        if logs.get("done"):
            with contextlib.suppress(BackendError):
                job = await backend.job(job_id)
            yield sse("end", job)
            return
        if not chunks:
            yield ": keep-alive\n\n"
        # The first read returns what is stored at once; later ones are held by jobs.logs until
        # a chunk lands or the job ends (they return at once while stored chunks remain).
        wait = SSE_WAIT
