"""RFC 9 (TSP, "Titanic") on the job store: `titanic.request`, `titanic.reply`,
`titanic.close` (`spec/jobs.md` §8). Every Titanic request is a job of kind `frames`: its body
frames go to the target service untouched, and the FINAL frames come back untouched.

Status frames (RFC 9 "Status Frames"): "200" OK, "300" pending, "400" unknown, "500" error.
"""

from __future__ import annotations

import re
import uuid
from typing import TYPE_CHECKING

from mdp.errors import ProtocolError
from mdp.protocol import validate_service_name
from services.jobs.store.base import ACTIVE, Job, NewJob, StoreError

if TYPE_CHECKING:
    from services.jobs.manager import JobManager

__all__ = ["close", "reply", "request"]

OK = b"200"
PENDING = b"300"
UNKNOWN = b"400"
ERROR = b"500"

_UUID = re.compile(rb"[0-9A-Fa-f]{32}")


def _uuid(frames: list[bytes]) -> str | None:
    """RFC 9: the request is 1 frame, a UUID of 32 hex characters (any case)."""
    if len(frames) != 1 or not _UUID.fullmatch(frames[0]):
        return None
    return frames[0].decode().lower()


async def request(manager: JobManager, frames: list[bytes]) -> list[bytes]:
    """titanic.request: [service, body...] -> ["200", uuid] once the request is stored."""
    if len(frames) < 2:
        return [UNKNOWN]  # RFC 9 wants 2 or more frames; a retry cannot fix it
    service = frames[0]
    try:
        validate_service_name(service)
        name = service.decode()
    except (ProtocolError, UnicodeDecodeError):
        return [UNKNOWN]
    if name.startswith(("mmi.", "jobs.", "titanic.")):
        return [UNKNOWN]
    job_id = uuid.uuid4().hex
    try:
        await manager.submit(NewJob(job_id, "frames", name, frames[1:], manager.now()))
    except StoreError:
        return [ERROR]
    return [OK, job_id.encode()]


async def reply(manager: JobManager, frames: list[bytes]) -> list[bytes]:
    """titanic.reply: [uuid] -> ["200", *reply] | ["300"] | ["400"] | ["500"]. Idempotent."""
    job_id = _uuid(frames)
    if job_id is None:
        return [UNKNOWN]
    try:
        found = await manager.store.get(job_id)
    except StoreError:
        return [ERROR]
    if not isinstance(found, Job):
        return [UNKNOWN]  # never known, closed, or purged
    if found.state in ACTIVE:
        return [PENDING]
    if found.result is None:
        return [ERROR]  # ended without a reply (lost, cancelled) or its output was purged
    return [OK, *found.result]


async def close(manager: JobManager, frames: list[bytes]) -> list[bytes]:
    """titanic.close: [uuid] -> ["200"]; removes the request and its reply (RFC 9)."""
    job_id = _uuid(frames)
    if job_id is None:
        return [OK]  # "MUST return 200 OK if the UUID is not known"
    try:
        found = await manager.store.get(job_id)
        if not isinstance(found, Job):
            return [OK]
        if found.state in ACTIVE:
            await manager.cancel(job_id)  # queued: never runs; running: its worker stops it
        await manager.store.delete(job_id, manager.now())
    except StoreError:
        return [ERROR]
    return [OK]
