"""The msgpack bodies of the `jobs.*` services (`spec/jobs.md` §2-3): pydantic models of the
requests, and the plain maps of the answers. Validated at the edge; the manager works on the
models."""

from __future__ import annotations

import re
import time
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from services.bodies import (
    BodyError,
    CommandRequest,
    pack,
    parse_body,
    unpack_map,
    valid_service_name,
)
from services.jobs.store.base import STATES, Job, Tombstone

__all__ = [
    "CancelJobs",
    "JobLogs",
    "JobResult",
    "ListJobs",
    "StatusOfJobs",
    "SubmitJob",
    "check_job_id",
    "job_map",
    "parse",
]

JOB_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
MAX_IDS = 1_000
MAX_FRAMES = 64
MAX_WAIT = 30.0


def check_job_id(value: str) -> str:
    if not JOB_ID.fullmatch(value):
        raise ValueError("a job id is 1 to 128 characters from A-Z a-z 0-9 . _ : -")
    return value


JobId = Annotated[str, Field(min_length=1, max_length=128)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SubmitJob(_Request):
    """`jobs.submit`: one job for `service`, a command `request` or opaque `frames`."""

    service: Annotated[str, Field(min_length=1, max_length=255)]
    request: CommandRequest | None = None
    frames: Annotated[list[bytes], Field(min_length=1, max_length=MAX_FRAMES)] | None = None
    id: JobId | None = None

    @field_validator("service")
    @classmethod
    def _service_name(cls, value: str) -> str:
        if valid_service_name(value).startswith(("mmi.", "jobs.", "titanic.")):
            raise ValueError("a job cannot target the mmi., jobs. or titanic. services")
        return value

    @field_validator("id")
    @classmethod
    def _id(cls, value: str | None) -> str | None:
        return None if value is None else check_job_id(value)

    def model_post_init(self, context: Any) -> None:
        if (self.request is None) == (self.frames is None):
            raise ValueError("give exactly one of 'request' (a command) and 'frames'")
        if self.request is not None and self.request.request_id not in (None, self.id):
            raise ValueError("request.request_id must be absent or equal to the job id")
        if self.request is not None and self.request.start_by is not None:
            raise ValueError("request.start_by is set by mdp-jobs for each dispatch")


class StatusOfJobs(_Request):
    ids: Annotated[list[JobId], Field(min_length=1, max_length=MAX_IDS)]


class JobResult(_Request):
    id: JobId
    wait: Annotated[float, Field(ge=0, le=MAX_WAIT)] = 0.0


class JobLogs(_Request):
    id: JobId
    from_: Annotated[int, Field(ge=0, alias="from")] = 0
    limit: Annotated[int, Field(ge=1, le=1024)] = 256
    wait: Annotated[float, Field(ge=0, le=MAX_WAIT)] = 0.0


class CancelJobs(_Request):
    ids: Annotated[list[JobId], Field(min_length=1, max_length=MAX_IDS)]


class ListJobs(_Request):
    state: list[str] | None = None
    service: str | None = None
    since: float | None = None
    before: int | None = None
    limit: Annotated[int, Field(ge=1, le=1000)] = 100

    @field_validator("state")
    @classmethod
    def _states(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            unknown = sorted(set(value) - STATES)
            if unknown:
                raise ValueError(f"unknown states {unknown}; states are {sorted(STATES)}")
        return value


M = TypeVar("M", bound=BaseModel)


def parse(model: type[M], frames: list[bytes]) -> M:
    """Validate a jobs.* request body (one msgpack map frame). Raises BodyError."""
    return parse_body(model.model_validate, frames, f"{model.__name__} request")


def job_map(job: Job, *, with_request: bool = False) -> dict[str, Any]:
    """A job as answers show it (`spec/jobs.md` §2), fields without a value left out."""
    out: dict[str, Any] = {
        "id": job.id,
        "service": job.service,
        "state": job.state,
        "kind": job.kind,
        "created": job.created,
        "attempts": job.attempts,
        "cancel_requested": job.cancel_requested,
        "output": {
            "chunks": job.output_chunks,
            "bytes": job.output_bytes,
            "truncated": job.output_truncated,
            "purged": job.output_purged,
        },
    }
    for name in ("started", "finished", "worker", "exit_code", "message"):
        value = getattr(job, name)
        if value is not None:
            out[name] = value
    if with_request:
        if job.kind == "command":
            request = unpack_map(job.request[0])
            request.pop("request_id", None)
            out["request"] = request
        else:
            out["frames"] = job.request
    return out


def lookup_map(job_id: str, found: Job | Tombstone | None, *, with_request: bool) -> dict[str, Any]:
    """The answer entry for one looked-up id: the job, or unknown/expired."""
    if found is None:
        return {"id": job_id, "state": "unknown"}
    if isinstance(found, Tombstone):
        out: dict[str, Any] = {"id": job_id, "state": "expired", "was": found.state}
        if found.finished is not None:
            out["finished"] = found.finished
        return out
    return job_map(found, with_request=with_request)


def answer(status: str = "ok", **fields: Any) -> list[bytes]:
    """A jobs.* FINAL body: one msgpack map with `status` first."""
    return [pack({"status": status, **fields})]


def error_answer(exc: BodyError) -> list[bytes]:
    return answer("invalid", message=str(exc), errors=exc.errors)


def now() -> float:
    return time.time()
