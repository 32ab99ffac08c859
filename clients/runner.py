"""Run the commands of a file through `mdp.client`: concurrently, with the retry rule of the
command services, reporting each command as it finishes.

Retry rule: a command may be re-sent only while no worker has said anything about it (no
PARTIAL yet; the first PARTIAL a command worker sends is `started`). Once started, a command
that goes silent is reported `lost`, because re-sending it could run it twice; `--retry-started`
re-sends it anyway, under the same `request_id`, so a worker process that already ran it answers
from its cache. MDP/0.1 has no PARTIALs, so the client cannot tell whether a silent command
started: over 0.1 a silent command is only retried with `--retry-started`, and its liveness
timeout is the command's own timeout plus `--timeout` (0.1 gives no proof of life meanwhile).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import zmq

from clients.commands import CommandSpec
from clients.results import CommandOutcome
from mdp.client import AttemptFailed, Client, MMINotImplemented, RequestTimeout
from mdp.errors import MDPError
from mdp.protocol import Version
from services.bodies import (
    BodyError,
    Output,
    Started,
    WorkerInfo,
    parse_partial,
    parse_result,
)

__all__ = ["Events", "RunSettings", "ServiceCheckFailed", "check_services", "run_commands"]

WORKER_DEFAULT_TIMEOUT = 30.0
"""The command timeout a worker applies when the request has none (spec/command-service.md)."""


@dataclass(frozen=True)
class RunSettings:
    """How to run a file: the CLI options that matter to the runner."""

    parallel: int = 16
    retry_started: bool = False
    stream: bool = False


class Events:
    """What the runner reports while it works. The default methods do nothing."""

    def started(self, index: int, worker: WorkerInfo) -> None:
        """A worker accepted command `index`."""

    def output(self, index: int, stream: str, data: bytes) -> None:
        """A chunk of command `index`'s stdout/stderr (MDP/0.2, `stream` setting only)."""

    def retrying(self, index: int, attempt: int) -> None:
        """Command `index` is being re-sent; this is attempt number `attempt`."""

    def finished(self, outcome: CommandOutcome) -> None:
        """Command `outcome.index` is done (in whatever status)."""


class ServiceCheckFailed(Exception):
    """The broker did not answer the MMI check, or does not know a service (exit 69)."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


async def check_services(client: Client, services: Sequence[str]) -> list[str]:
    """Ask the broker (mmi.service, RFC 8) whether each service has a worker, all at once.

    Returns warnings (a broker without MMI is not checked). Raises ServiceCheckFailed when no
    broker answers, or listing every service the broker does not know.
    """
    names = sorted(set(services))
    answers = await asyncio.gather(
        *(client.service_exists(name) for name in names), return_exceptions=True
    )
    problems: list[str] = []
    warnings: list[str] = []
    brokers = ", ".join(client.endpoints)
    for name, answer in zip(names, answers, strict=True):
        if isinstance(answer, RequestTimeout):
            tries = client.retries + 1
            problems.append(
                f"no broker answered at {brokers} "
                f"({tries} attempt{'s' if tries > 1 else ''}, {client.timeout:g} s each)"
            )
            break
        if isinstance(answer, MMINotImplemented):
            warnings.append(f"the broker does not implement mmi.service; {name!r} not checked")
        elif isinstance(answer, MDPError):
            problems.append(f"the broker's answer to mmi.service for {name!r}: {answer}")
        elif isinstance(answer, BaseException):
            raise answer
        elif not answer:
            problems.append(
                f"service {name!r} is unknown to the broker at {brokers}: "
                "no worker is registered for it (mmi.service answered 404)"
            )
    if problems:
        raise ServiceCheckFailed(problems)
    return warnings


async def run_commands(
    client: Client,
    specs: Sequence[CommandSpec],
    settings: RunSettings,
    events: Events | None = None,
) -> list[CommandOutcome]:
    """Run every command, at most `settings.parallel` at a time; outcomes in file order."""
    events = events or Events()
    outcomes: list[CommandOutcome | None] = [None] * len(specs)
    pending = iter(enumerate(specs))

    async def lane() -> None:
        for index, spec in pending:  # the lanes share one iterator: each command runs once
            outcome = await run_one(client, index, spec, settings, events)
            outcomes[index] = outcome
            events.finished(outcome)

    async with asyncio.TaskGroup() as group:
        for _ in range(max(1, min(settings.parallel, len(specs)))):
            group.create_task(lane())
    return [outcome for outcome in outcomes if outcome is not None]


async def run_one(
    client: Client, index: int, spec: CommandSpec, settings: RunSettings, events: Events
) -> CommandOutcome:
    """Send one command and turn whatever comes back (or does not) into its outcome."""
    request_id = uuid.uuid4().hex
    body = spec.request(request_id).pack()
    outcome = CommandOutcome(index, spec, request_id, status="lost")
    v01 = client.version is Version.V01
    timeout = client.timeout + (spec.timeout or WORKER_DEFAULT_TIMEOUT) if v01 else client.timeout
    attempt = 1

    def may_retry(failed: AttemptFailed) -> bool:
        if settings.retry_started:
            return True
        return not v01 and failed.total_partials == 0

    start = time.monotonic()
    try:
        async for part in client.stream(
            spec.command_type, body, timeout=timeout, may_retry=may_retry
        ):
            if part.attempt != attempt:
                attempt = part.attempt
                events.retrying(index, attempt)
            outcome.attempts = part.attempt
            if part.final:
                _apply_result(outcome, part.body)
            else:
                _apply_partial(outcome, part.body, settings, events)
    except RequestTimeout as exc:
        outcome.status = "lost"
        outcome.attempts = exc.attempts
        outcome.message = _lost_message(exc, outcome, v01, timeout)
    except zmq.ZMQError as exc:  # e.g. too many open files: this command was never sent
        outcome.status = "error"
        outcome.message = f"the client could not send it: {exc}"
    outcome.elapsed_ms = (time.monotonic() - start) * 1000
    return outcome


def _apply_partial(
    outcome: CommandOutcome, body: list[bytes], settings: RunSettings, events: Events
) -> None:
    try:
        event = parse_partial(body)
    except BodyError:
        return  # a PARTIAL we do not understand still proved the worker alive; nothing to show
    if isinstance(event, Started):
        outcome.worker = event.worker
        events.started(outcome.index, event.worker)
    elif isinstance(event, Output) and settings.stream:
        outcome.streamed = True
        events.output(outcome.index, event.stream, event.data)


def _apply_result(outcome: CommandOutcome, body: list[bytes]) -> None:
    try:
        result = parse_result(body)
    except BodyError as exc:
        outcome.status = "error"
        outcome.message = (
            f"the {outcome.spec.command_type!r} service did not answer with a command result "
            f"({exc})"
        )
        return
    if result.request_id is not None and result.request_id != outcome.request_id:
        # Never show one command's result as another's.
        outcome.status = "error"
        outcome.message = f"discarded a result for another request ({result.request_id})"
        return
    outcome.status = result.status
    outcome.exit_code = result.exit_code
    outcome.signal = result.signal
    outcome.stdout = result.stdout
    outcome.stderr = result.stderr
    outcome.truncated = result.truncated
    outcome.duration_ms = result.duration_ms
    outcome.worker = result.worker or outcome.worker
    outcome.message = result.message
    outcome.errors = result.errors


def _lost_message(exc: RequestTimeout, outcome: CommandOutcome, v01: bool, timeout: float) -> str:
    if exc.retry_refused and v01:
        return (
            f"no reply within {timeout:g} s; MDP/0.1 cannot tell whether the command started, "
            "so it was not re-sent (--retry-started re-sends it)"
        )
    if exc.retry_refused:
        where = f" on {_worker(outcome.worker)}" if outcome.worker else ""
        return (
            f"started{where}, then nothing for {timeout:g} s: not re-sent because it may have "
            "run (--retry-started re-sends it under the same request_id)"
        )
    if exc.partials:
        return f"went silent after starting; {exc.attempts} attempts, none finished"
    return f"no answer from {', '.join(dict.fromkeys(exc.endpoints))} ({exc.attempts} attempts)"


def _worker(worker: WorkerInfo) -> str:
    return f"{worker.host}/{worker.pid}"
