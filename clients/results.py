"""What running one command came to, the process exit code of a run, and their JSON form."""

from __future__ import annotations

import base64
import enum
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from clients.commands import CommandSpec
from services.bodies import WorkerInfo

__all__ = ["CommandOutcome", "ExitCode", "exit_code_for", "json_bytes", "summary"]


class ExitCode(enum.IntEnum):
    """`mdp-client` exit codes. When several apply, the highest in this list wins:

    USAGE (2) > NO_INPUT (66) > DATA_ERROR (65) > UNAVAILABLE (69) > LOST (75) > TIMEOUT (124)
    > FAILED (1) > OK (0). The first four stop the run before any command is sent.
    """

    OK = 0
    FAILED = 1
    """Some command failed: non-zero exit, or status error/invalid/rejected."""
    USAGE = 2
    DATA_ERROR = 65
    NO_INPUT = 66
    UNAVAILABLE = 69
    """No broker answered, or a service is unknown to the broker."""
    LOST = 75
    """Some command got no result after the allowed retries."""
    TIMEOUT = 124
    """Some command ran past its timeout and was killed by the worker."""


# Statuses a worker reports (spec/command-service.md), plus "lost": the client got no result.
FAILED_STATUSES = frozenset({"failed", "error", "invalid", "rejected", "cancelled"})
STATUS_ORDER = (
    "ok",
    "failed",
    "timeout",
    "error",
    "invalid",
    "rejected",
    "cancelled",
    "expired",
    "lost",
)


@dataclass
class CommandOutcome:
    """The result of one command of the file, as the client saw it."""

    index: int
    spec: CommandSpec
    request_id: str
    status: str
    exit_code: int | None = None
    signal: int | None = None
    stdout: bytes = b""
    stderr: bytes = b""
    truncated: bool = False
    duration_ms: float | None = None
    """How long the command ran, as measured by the worker."""
    elapsed_ms: float = 0.0
    """From the first send to the result, as measured by the client (queueing included)."""
    worker: WorkerInfo | None = None
    workers: list[WorkerInfo] = field(default_factory=list)
    """Every worker that said `started` for it, in order (more than one: it ran more than
    once, which only --retry-started allows)."""
    attempts: int = 1
    message: str | None = None
    errors: list[dict[str, str]] | None = None
    streamed: bool = field(default=False, repr=False)
    """Output was already shown live (--stream)."""

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict. Output is a string when it is valid UTF-8, else {"base64": ...}."""
        return {
            "index": self.index,
            "command_type": self.spec.command_type,
            "command_name": self.spec.command_name,
            "parameters": self.spec.parameters,
            "request_id": self.request_id,
            "status": self.status,
            "exit_code": self.exit_code,
            "signal": self.signal,
            "stdout": json_bytes(self.stdout),
            "stderr": json_bytes(self.stderr),
            "truncated": self.truncated,
            "duration_ms": self.duration_ms,
            "elapsed_ms": round(self.elapsed_ms, 3),
            "worker": self.worker.model_dump() if self.worker else None,
            "workers": [worker.model_dump() for worker in self.workers],
            "attempts": self.attempts,
            "message": self.message,
            "errors": self.errors,
        }


def json_bytes(data: bytes) -> str | dict[str, str]:
    """Bytes for JSON without loss: the text when valid UTF-8, else {"base64": "..."}."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(data).decode("ascii")}


def exit_code_for(outcomes: Iterable[CommandOutcome]) -> ExitCode:
    """LOST (75) > TIMEOUT (124) > FAILED (1) > OK (0), over all commands."""
    statuses = {outcome.status for outcome in outcomes}
    if "lost" in statuses or "expired" in statuses:  # expired: it never ran, like lost
        return ExitCode.LOST
    if "timeout" in statuses:
        return ExitCode.TIMEOUT
    if statuses & FAILED_STATUSES:
        return ExitCode.FAILED
    return ExitCode.OK


def summary(outcomes: list[CommandOutcome], elapsed_s: float) -> dict[str, Any]:
    """Counts by status, the exit code and the wall time of the run."""
    counts = Counter(outcome.status for outcome in outcomes)
    return {
        "total": len(outcomes),
        "by_status": {status: counts[status] for status in STATUS_ORDER if counts[status]},
        "exit_code": int(exit_code_for(outcomes)),
        "elapsed_ms": round(elapsed_s * 1000, 3),
    }
