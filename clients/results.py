"""What running one command came to, the process exit code of a run, and their JSON form.

A command's outcome is the worker's `CommandResult` itself (services/bodies.py: the one result
model), extended with what only the client saw: which entry of the file it was, how long it
took from the client's side, how many attempts. When no usable result came back, the client
fills the same fields itself (status "lost", or "error" with a message).
"""

from __future__ import annotations

import base64
import enum
from collections import Counter
from collections.abc import Iterable
from typing import Any, get_args

from pydantic import ConfigDict, Field

from services.bodies import CommandResult, CommandSpec, WorkerInfo, WorkerStatus

__all__ = ["CommandOutcome", "ExitCode", "exit_code_for", "json_bytes", "summary"]


class ExitCode(enum.IntEnum):
    """`mdp-client` exit codes. When several apply, the highest in this list wins:

    USAGE (2) > NO_INPUT (66) > DATA_ERROR (65) > NO_HOST (68) > UNAVAILABLE (69) > LOST (75)
    > TIMEOUT (124) > FAILED (1) > OK (0). The first five stop the run before any command is
    sent.
    """

    OK = 0
    FAILED = 1
    """Some command failed: non-zero exit, or status error/invalid/rejected."""
    USAGE = 2
    DATA_ERROR = 65
    NO_INPUT = 66
    NO_HOST = 68
    """A --host name or glob matched no registered worker (sysexits EX_NOHOST)."""
    UNAVAILABLE = 69
    """No broker answered, or a service is unknown to the broker."""
    LOST = 75
    """Some command got no result after the allowed retries."""
    TIMEOUT = 124
    """Some command ran past its timeout and was killed by the worker."""


# Statuses a worker reports (spec/command-service.md), plus "lost": the client got no result.
FAILED_STATUSES = frozenset({"failed", "error", "invalid", "rejected", "cancelled"})
STATUS_ORDER: tuple[str, ...] = (*get_args(WorkerStatus), "lost")


class CommandOutcome(CommandResult):
    """One command of the file as the client shows it: its `CommandResult` and what the client
    saw. Filled in as the command runs (mutable); starts as "lost" until a result arrives."""

    model_config = ConfigDict(extra="forbid", frozen=False)

    status: str  # type: ignore[assignment]
    """A worker's status, "lost", or (`mdp-client status/wait`) a job's state such as "queued",
    "running" or "unknown" (spec/jobs.md §1)."""
    index: int
    """The command's place in the file."""
    spec: CommandSpec
    request_id: str
    """The request_id the client sent (a worker's result for another one is never adopted)."""
    elapsed_ms: float = 0.0
    """From the first send to the result, as measured by the client (queueing included)."""
    workers: list[WorkerInfo] = Field(default_factory=list)
    """Every worker that said `started` for it, in order (more than one: it ran more than
    once, which only --retry-started allows)."""
    attempts: int = 1
    run_limit: float | None = None
    """The run limit the worker announced in `started` (MDP/0.2); None before that."""
    streamed: bool = Field(default=False, repr=False)
    """Output was already shown live (--stream)."""

    def take(self, result: CommandResult) -> None:
        """Adopt a worker's result for this command (keeping the worker named by `started` if
        the result names none)."""
        for name in CommandResult.model_fields:
            value = getattr(result, name)
            if name != "request_id" and not (name == "worker" and value is None):
                setattr(self, name, value)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict. Output is a string when it is valid UTF-8, else {"base64": ...}.
        A command addressed to one worker (`SERVICE@HOST`, --host/--all) also has `host`."""
        service, at, host = self.spec.command_type.partition("@")
        return {
            "index": self.index,
            **({"host": host} if at else {}),
            "command_type": service if at else self.spec.command_type,
            "command_name": self.spec.command_name,
            "parameters": self.spec.parameters,
            **self.model_dump(exclude={"index", "spec", "streamed", "run_limit"}),
            "stdout": json_bytes(self.stdout),
            "stderr": json_bytes(self.stderr),
            "elapsed_ms": round(self.elapsed_ms, 3),
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
    counts: Counter[str] = Counter(outcome.status for outcome in outcomes)
    document: dict[str, Any] = {
        "total": len(outcomes),
        "by_status": {status: counts[status] for status in STATUS_ORDER if counts[status]},
        "exit_code": int(exit_code_for(outcomes)),
        "elapsed_ms": round(elapsed_s * 1000, 3),
    }
    hosts = hosts_summary(outcomes)
    if hosts is not None:
        document["hosts"] = hosts
    return document


def hosts_summary(outcomes: Iterable[CommandOutcome]) -> dict[str, list[str]] | None:
    """For a run addressed to hosts (--host/--all): the hosts by their worst command's
    category, ok/failed/timeout/unreachable (lost or expired). None for an ordinary run."""
    pairs = []
    for outcome in outcomes:
        _, at, host = outcome.spec.command_type.partition("@")
        if at:
            pairs.append((host, outcome.status))
    if not pairs:
        return None
    from clients.fleet import host_counts

    return host_counts(pairs)
