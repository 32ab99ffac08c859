"""How a job row is laid out and decoded, the same for every SQL store.

Both stores select `COLUMNS` in this order and keep `request`, `worker` and `result` as msgpack
blobs, so one mapping from a row to a `Job` serves them all.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgpack

from services.jobs.store.base import Job

COLUMNS = (
    "seq, id, kind, service, request, state, created, attempts, claimed, started, worker, "
    "finished, result, exit_code, message, cancel_requested, output_chunks, output_bytes, "
    "output_truncated, output_purged, owner, lease_until, request_id, start_by"
)


def pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]


def unpack(blob: bytes | memoryview | None) -> Any:
    # PostgreSQL hands bytea over as bytes or memoryview, SQLite as bytes.
    return None if blob is None else msgpack.unpackb(bytes(blob), raw=False)


def job_from_row(row: Sequence[Any]) -> Job:
    """The `Job` of one row selected with `COLUMNS`."""
    return Job(
        seq=row[0],
        id=row[1],
        kind=row[2],
        service=row[3],
        request=list(unpack(row[4])),
        state=row[5],
        created=row[6],
        attempts=row[7],
        claimed=row[8],
        started=row[9],
        worker=unpack(row[10]),
        finished=row[11],
        result=None if row[12] is None else list(unpack(row[12])),
        exit_code=row[13],
        message=row[14],
        cancel_requested=bool(row[15]),
        output_chunks=row[16],
        output_bytes=row[17],
        output_truncated=bool(row[18]),
        output_purged=bool(row[19]),
        owner=row[20],
        lease_until=row[21],
        request_id=row[22],
        start_by=row[23],
    )
