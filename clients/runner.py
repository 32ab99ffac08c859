"""Run the commands of a file through `mdp.client`: concurrently, with the retry rule of the
command services, reporting each command as it finishes.

Retry rule: a command may be re-sent only while no worker has said anything about it (no
PARTIAL yet; the first PARTIAL a command worker sends is `started`). Once started, a command
that goes silent is reported `lost`, because re-sending it could run it twice; `--retry-started`
re-sends it anyway, under the same `request_id`, so a worker process that already ran it answers
from its cache. MDP/0.1 has no PARTIALs, so the client cannot tell whether a silent command
started: over 0.1 a silent command is only retried with `--retry-started`, and an attempt may
stay silent for the command's run limit plus the attempt silence limit (`--timeout`), as 0.1
gives no proof of life meanwhile.

Two limits, two names: the attempt silence limit (`Client.timeout`, `--timeout`) is how long
an attempt may go without any reply; the run limit (`CommandSpec.run_limit`, "timeout" in the
file) is how long the worker lets the command run. Over 0.2 the worker's `started` says which
run limit it applies (`CommandOutcome.run_limit`); over 0.1 nothing does, so the client counts
with the file's, or the worker's documented default (`DEFAULT_RUN_LIMIT`).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import zmq

from clients.results import CommandOutcome
from mdp.client import AttemptFailed, Client, MMINotImplemented, RequestTimeout
from mdp.errors import MDPError
from mdp.protocol import Version
from services.bodies import (
    DEFAULT_RUN_LIMIT,
    BodyError,
    CancelRequest,
    CommandSpec,
    Output,
    Started,
    WorkerInfo,
    parse_cancel_reply,
    parse_partial,
    parse_result,
)

__all__ = [
    "SKEW_ALLOWANCE",
    "Active",
    "Events",
    "RunSettings",
    "ServiceCheckFailed",
    "cancel_one",
    "check_services",
    "run_commands",
]

SKEW_ALLOWANCE = 1.0
"""Seconds by which the clocks of client and worker hosts may differ (spec §14.1)."""
CANCEL_TIMEOUT = 1.0
"""How long a cancel message may take (spec §14.5)."""


@dataclass
class Active:
    """The commands that started and have not finished: index -> (service, worker name,
    request_id). What a cancel on exit must reach (spec §14.5)."""

    started: dict[int, tuple[str, str, str]] = field(default_factory=dict)
    cancelled: dict[int, str] = field(default_factory=dict)
    """Commands cancelled because the client was interrupted: index -> the cancel's outcome."""


async def cancel_one(client: Client, service: str, worker: str, request_id: str) -> str:
    """Send a cancel for `request_id` to `service@worker`; its outcome, or why there is none."""
    body = CancelRequest(cancel=request_id).pack()
    try:
        reply = await client.request(f"{service}@{worker}", body, timeout=CANCEL_TIMEOUT, retries=0)
        return parse_cancel_reply(reply).cancel
    except RequestTimeout:
        return "no answer"
    except (BodyError, MDPError, zmq.ZMQError) as exc:
        return f"failed ({exc})"


@dataclass(frozen=True)
class RunSettings:
    """How to run a file: the CLI options that matter to the runner."""

    parallel: int = 16
    retry_started: bool = False
    stream: bool = False
    detach: bool = False
    """On interrupt, leave started commands running (default: cancel them)."""


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
    gone = await client.unreachable()
    if gone and len(gone) == len(client.endpoints):
        # Said within about a second, and why, rather than after every attempt timed out.
        raise ServiceCheckFailed(
            [f"cannot reach the broker at {e}: {why}" for e, why in gone.items()]
        )
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
    active: Active | None = None,
) -> list[CommandOutcome]:
    """Run every command, at most `settings.parallel` at a time; outcomes in file order.
    `active` is kept up to date with the commands running on a worker."""
    events = events or Events()
    active = active if active is not None else Active()
    outcomes: list[CommandOutcome | None] = [None] * len(specs)
    pending = iter(enumerate(specs))

    async def lane() -> None:
        for index, spec in pending:  # the lanes share one iterator: each command runs once
            outcome = await run_one(client, index, spec, settings, events, active)
            outcomes[index] = outcome
            events.finished(outcome)

    async with asyncio.TaskGroup() as group:
        for _ in range(max(1, min(settings.parallel, len(specs)))):
            group.create_task(lane())
    return [outcome for outcome in outcomes if outcome is not None]


def _not_run(body: list[bytes]) -> bool:
    """The FINAL says this attempt never ran: it reached the worker past its start deadline."""
    try:
        return parse_result(body).status == "expired"
    except BodyError:
        return False


async def run_one(
    client: Client,
    index: int,
    spec: CommandSpec,
    settings: RunSettings,
    events: Events,
    active: Active | None = None,
) -> CommandOutcome:
    """Send one command and turn whatever comes back (or does not) into its outcome.

    Cancelled (the client is interrupted): unless `settings.detach`, a command that started is
    cancelled on its worker, and one still on its way is waited for until it can no longer
    start (its start deadline plus the skew allowance) and cancelled if it starts meanwhile;
    then CancelledError goes on (spec/command-service.md §14.5).
    """
    active = active if active is not None else Active()
    request_id = uuid.uuid4().hex
    outcome = CommandOutcome(index=index, spec=spec, request_id=request_id, status="lost")
    v01 = client.version is Version.V01
    silence_limit = client.timeout
    if v01:  # no PARTIALs: the attempt is silent for as long as the command runs
        silence_limit += spec.run_limit if spec.run_limit is not None else DEFAULT_RUN_LIMIT
    attempt = 1
    may_start_until = 0.0  # monotonic: the current attempt cannot start after this
    started = asyncio.Event()

    def attempt_body(n: int) -> list[bytes]:
        nonlocal may_start_until
        # spec §14.1: this attempt may start only until the client stops waiting for it.
        may_start_until = time.monotonic() + silence_limit + SKEW_ALLOWANCE
        return [spec.request(request_id, start_by=time.time() + silence_limit).pack()]

    def may_retry(failed: AttemptFailed) -> bool:
        if settings.retry_started:
            return True
        return not v01 and failed.total_partials == 0

    async def consume() -> None:
        nonlocal attempt
        async for part in client.stream(
            spec.command_type,
            timeout=silence_limit,
            may_retry=may_retry,
            attempt_body=attempt_body,
            settle=SKEW_ALLOWANCE,
            not_run=_not_run,
        ):
            if part.attempt != attempt:
                attempt = part.attempt
                events.retrying(index, attempt)
            outcome.attempts = part.attempt
            if part.final:
                active.started.pop(index, None)
                _apply_result(outcome, part.body)
            else:
                _apply_partial(outcome, part.body, settings, events, active)
                if index in active.started:
                    started.set()

    start = time.monotonic()
    inner = asyncio.create_task(consume())
    try:
        await asyncio.shield(inner)
    except RequestTimeout as exc:
        outcome.status = "lost"
        outcome.attempts = exc.attempts
        outcome.message = _lost_message(exc, outcome, v01, silence_limit)
        running = active.started.pop(index, None)
        if running is not None:
            # spec §14: nothing reported lost goes on running.
            answer = await cancel_one(client, *running)
            outcome.message += f"; cancel sent to {running[1]}: {answer}"
    except zmq.ZMQError as exc:  # e.g. too many open files: this command was never sent
        outcome.status = "error"
        outcome.message = f"the client could not send it: {exc}"
    except asyncio.CancelledError:
        if not settings.detach and not inner.done():
            await _stop_on_exit(client, index, inner, started, may_start_until, active)
        inner.cancel()
        raise
    finally:
        active.started.pop(index, None)
    outcome.elapsed_ms = (time.monotonic() - start) * 1000
    return outcome


async def _stop_on_exit(
    client: Client,
    index: int,
    inner: asyncio.Task[None],
    started: asyncio.Event,
    may_start_until: float,
    active: Active,
) -> None:
    """The client is going away: make sure this command does not run on without it."""
    if index not in active.started:
        # Not started (yet): wait until it can no longer start, or until it does.
        wait = may_start_until - time.monotonic()
        if wait > 0:
            starting = asyncio.create_task(started.wait())
            await asyncio.wait({inner, starting}, timeout=wait, return_when="FIRST_COMPLETED")
            starting.cancel()
    running = active.started.get(index)
    if running is not None and not inner.done():
        active.cancelled[index] = await cancel_one(client, *running)


def _apply_partial(
    outcome: CommandOutcome,
    body: list[bytes],
    settings: RunSettings,
    events: Events,
    active: Active,
) -> None:
    try:
        event = parse_partial(body)
    except BodyError:
        return  # a PARTIAL we do not understand still proved the worker alive; nothing to show
    if isinstance(event, Started):
        outcome.worker = event.worker
        outcome.run_limit = event.run_limit
        if event.worker not in outcome.workers:  # the same worker again answers from memory
            outcome.workers.append(event.worker)
        if event.worker.name is not None and outcome.request_id == event.request_id:
            active.started[outcome.index] = (
                outcome.spec.command_type,
                event.worker.name,
                outcome.request_id,
            )
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
    outcome.take(result)


def _lost_message(exc: RequestTimeout, outcome: CommandOutcome, v01: bool, timeout: float) -> str:
    """Why the command is lost; `timeout` is the attempt silence limit that ran out."""
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
    tries = "attempt" if exc.attempts == 1 else "attempts"
    if v01:
        return f"no answer from {', '.join(dict.fromkeys(exc.endpoints))} ({exc.attempts} {tries})"
    # spec §14.1: every attempt's start deadline has passed; none can start any more.
    return (
        f"no worker started it ({exc.attempts} {tries} through "
        f"{', '.join(dict.fromkeys(exc.endpoints))}, {timeout:g} s each); it will not start "
        "later. Were all workers busy? (mdp-client services shows queued requests)"
    )


def _worker(worker: WorkerInfo) -> str:
    return f"{worker.host}/{worker.pid}"
