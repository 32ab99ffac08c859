"""Run the commands of a file through `mdp.client`: concurrently, with the retry rule of the
command services, reporting each command as it finishes.

Retry rule: a command may be re-sent only while no worker has said anything about it (no
PARTIAL yet; the first PARTIAL a command worker sends is `started`), and over MDP/0.2 only once
the workers have been asked whether one has it (`services.locate`, `next_step`): a `started` may
have died with a broker. The worker that has it is re-attached to (`SERVICE@NAME`, same
`request_id`, answered from its memory), whether or not its `started` came through; if none has
it, the command goes again under a new `request_id` (the old one is fenced on every worker that
answered). A command whose worker cannot be reached is reported `lost`, because re-sending it
could run it twice; `--retry-started` re-sends it anyway, under the same `request_id`, so a
worker process that already ran it answers from its cache. MDP/0.1 has no PARTIALs, so the
client cannot tell whether a silent command started: over 0.1 a silent command is only
retried with `--retry-started`, and an attempt may stay silent for the command's run limit
plus the attempt silence limit (`--timeout`), as 0.1 gives no proof of life meanwhile.

Two limits, two names: the attempt silence limit (`Client.timeout`, `--timeout`) is how long
an attempt may go without any reply; the run limit (`CommandSpec.run_limit`, "timeout" in the
file) is how long the worker lets the command run. Over 0.2 the worker's `started` says which
run limit it applies (`CommandOutcome.run_limit`); over 0.1 nothing does, so the client counts
with the file's, or the worker's documented default (`DEFAULT_RUN_LIMIT`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

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
from services.locate import Located, locate

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
COMMAND_SERVICES = frozenset({"os", "shell"})
"""The services whose workers answer a lookup (spec §14.3): the runner asks them before it
re-sends a command whose fate it does not know."""
ASK_AGAIN_PAUSE = 0.5
"""Seconds between two rounds of asking when a worker did not answer (`next_step`)."""


@dataclass
class Active:
    """The commands that started and have not finished: index -> (service, worker name,
    request_id). What a cancel on exit must reach (spec §14.5)."""

    started: dict[int, tuple[str, str, str]] = field(default_factory=dict)
    cancelled: dict[int, str] = field(default_factory=dict)
    """Commands cancelled because the client was interrupted: index -> the cancel's outcome."""
    seen: dict[str, set[str]] = field(default_factory=dict)
    """Service -> the named workers that said `started` for one of its commands in this run.
    Before re-sending a command whose fate is unknown, each of them must be heard from (a
    broker that restarted may not list them yet, and one of them may be running it)."""


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
    if any(answer is False for answer in answers):
        # A worker that is full unregisters its `SERVICE` connections (spec §14.6), so the
        # broker answers 404 for it; its own address `SERVICE@NAME` stays registered, and a
        # request for SERVICE waits in the broker until it has room.
        busy = await _busy_services(client)
        answers = [
            True if a is False and n in busy else a for n, a in zip(names, answers, strict=True)
        ]
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


async def _busy_services(client: Client) -> set[str]:
    """The services some named worker hosts, by its `SERVICE@NAME` (`mmi.workers`), whether
    or not it has room now; empty when the broker cannot say."""
    try:
        workers = await client.workers()
    except (MDPError, zmq.ZMQError):
        return set()
    return {
        service.rpartition("@")[0]
        for worker in workers
        for service in worker.services
        if service.endswith(f"@{worker.name}")
    }


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

    Over MDP/0.2, for the command services, an attempt whose fate is unknown (silent: no
    `started`, or nothing after it) is not simply re-sent: the workers are asked first
    (`services.locate`, the rule in `next_step`), so a command never runs twice and one that
    runs on a worker still reachable through another broker is re-attached, not lost.

    Cancelled (the client is interrupted): unless `settings.detach`, a command that started is
    cancelled on its worker, and one still on its way is waited for until it can no longer
    start (its start deadline plus the skew allowance) and cancelled if it starts meanwhile;
    then CancelledError goes on (spec/command-service.md §14.5).
    """
    active = active if active is not None else Active()
    outcome = CommandOutcome(index=index, spec=spec, request_id=uuid.uuid4().hex, status="lost")
    v01 = client.version is Version.V01
    silence_limit = client.timeout
    if v01:  # no PARTIALs: the attempt is silent for as long as the command runs
        silence_limit += spec.run_limit if spec.run_limit is not None else DEFAULT_RUN_LIMIT
    service, _, host = spec.command_type.partition("@")
    locating = not v01 and not settings.retry_started and service in COMMAND_SERVICES
    shown = 1  # the attempt number the user sees
    may_start_until = 0.0  # monotonic: the current attempt cannot start after this
    started = asyncio.Event()

    def fresh_body(n: int) -> list[bytes]:
        nonlocal may_start_until
        # spec §14.1: this attempt may start only until the client stops waiting for it.
        may_start_until = time.monotonic() + silence_limit + SKEW_ALLOWANCE
        start_by = time.time() + silence_limit
        return [spec.request(outcome.request_id, start_by=start_by).pack()]

    def reattach_body(n: int) -> list[bytes]:
        # A start deadline already past on any clock within the skew allowance (§14.1): a
        # worker that knows the request_id answers from its memory (§10), one that does not
        # (restarted meanwhile) answers `expired`. A re-attach can never start a run.
        start_by = time.time() - 2 * SKEW_ALLOWANCE
        return [spec.request(outcome.request_id, start_by=start_by).pack()]

    def may_retry(failed: AttemptFailed) -> bool:
        if settings.retry_started:
            return True
        return not v01 and failed.total_partials == 0

    async def attempt(
        target: str,
        body: Callable[[int], list[bytes]],
        offset: int,
        retries: int | None = None,
        endpoint: str | None = None,
    ) -> list[bytes]:
        """Send to `target` (re-sent up to `retries` times); show its PARTIALs; its FINAL."""
        nonlocal shown
        parts = client.stream(
            target,
            timeout=silence_limit,
            retries=retries,
            may_retry=may_retry,
            attempt_body=body,
            settle=SKEW_ALLOWANCE,
            not_run=_not_run,
            endpoint=endpoint,
        )
        async with contextlib.aclosing(parts):
            async for part in parts:
                if offset + part.attempt != shown:
                    shown = offset + part.attempt
                    events.retrying(index, shown)
                outcome.attempts = shown
                if part.final:
                    active.started.pop(index, None)
                    return part.body
                _apply_partial(outcome, part.body, settings, events, active)
                if index in active.started:
                    started.set()
        raise AssertionError("stream() ended without a FINAL")  # pragma: no cover

    async def consume() -> None:
        if locating:
            await _recover(
                client, outcome, attempt, fresh_body, reattach_body, service, host, active
            )
        else:
            _apply_result(outcome, await attempt(spec.command_type, fresh_body, 0))

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


Attempt = Callable[..., Awaitable[list[bytes]]]


@dataclass(frozen=True, slots=True)
class Step:
    """What to do next with a command whose last attempt went silent (`next_step`)."""

    action: Literal["reattach", "resend", "ask-again", "lost"]
    worker: str | None = None
    """reattach: the worker that knows it (send to `SERVICE@worker`)."""
    endpoint: str | None = None
    """reattach/resend: a broker that answered (the next attempt goes there first)."""
    new_id: bool = False
    """resend: under a new request_id (the old one is fenced on the workers that answered)."""
    why: str = ""
    """ask-again, lost: what is not known, said to the user."""


def next_step(found: Located, started_on: str | None) -> Step:
    """The recovery rule of an attempt whose fate is unknown (spec/command-service.md §14.5),
    from what the workers said (`found`) and the worker that said `started`, if one did:

    | what `locate` found                       | `started` from | next step                   |
    |-------------------------------------------|----------------|-----------------------------|
    | a worker runs it or remembers its FINAL    | any            | reattach: same request_id   |
    |                                            |                | to SERVICE@worker           |
    | that worker did not answer                 | a worker       | ask again                   |
    | that worker answered, not knowing it       | a worker       | lost (it forgot: restarted) |
    | absent: every worker asked is fenced       | none           | resend (a new request_id if |
    |                                            |                | any worker was fenced)      |
    | a worker listed did not answer, or no      | none           | ask again                   |
    | broker answered                            |                |                             |

    "ask again" turns into "lost" when the caller's rounds run out: the silent worker may be
    running it, so it is never re-sent meanwhile.
    """
    if found.worker is not None:
        return Step("reattach", worker=found.worker, endpoint=found.endpoint)
    if started_on is not None:
        if started_on in found.unanswered:
            return Step("ask-again", why=f"{started_on}: {found.unanswered[started_on]}")
        if started_on in found.unaskable:
            return Step("lost", why=f"{started_on} cannot be asked ({found.unaskable[started_on]})")
        if started_on in found.answers:
            state = found.answers[started_on]
            return Step("lost", why=f"{started_on} no longer knows it (lookup: {state})")
        return Step("ask-again", why=f"{started_on} was not found on any broker that answered")
    if found.absent:
        reachable = found.reachable
        return Step(
            "resend",
            endpoint=reachable[0] if reachable else None,
            new_id=bool(found.fenced),
        )
    problems = [f"{name}: {why}" for name, why in found.unanswered.items()]
    if not found.reachable:
        problems += [f"{endpoint}: {why}" for endpoint, why in found.brokers.items() if why]
    elif not problems:
        brokers = ", ".join(found.reachable)
        problems.append(f"no worker for {found.service!r} is registered with {brokers}")
    return Step("ask-again", why="; ".join(problems))


async def _recover(
    client: Client,
    outcome: CommandOutcome,
    attempt: Attempt,
    fresh_body: Callable[[int], list[bytes]],
    reattach_body: Callable[[int], list[bytes]],
    service: str,
    host: str,
    active: Active,
) -> None:
    """Run the command to its outcome over MDP/0.2: one attempt at a time, each silent one
    followed by `locate` and `next_step` (spec/command-service.md §14.5). Fills `outcome`.

    Bounds: `client.retries` + 1 attempts that may start the command, as many re-attaches,
    and asking again for at most `client.retries` + 1 silence limits after a silent attempt
    (long enough for the workers to come back to a restarted broker)."""
    limit = client.retries + 1
    sends = reattaches = tries = 0
    through: list[str] = []
    target, body, endpoint = outcome.spec.command_type, fresh_body, None
    while True:
        tries += 1
        if body is fresh_body:
            sends += 1
        else:
            reattaches += 1
        try:
            final = await attempt(target, body, tries - 1, retries=0, endpoint=endpoint)
        except RequestTimeout as exc:
            through += exc.endpoints
            silent = exc
        else:
            if not _not_run(final):
                _apply_result(outcome, final)
                return
            if body is reattach_body:
                # It was known there a moment ago: the worker restarted under the same name.
                gone = f"{target} no longer knows it (restarted?)"
                await _lose(client, outcome, service, gone, target.partition("@")[2])
                return
            if sends >= limit:  # the last attempt came too late to start: it never ran
                _apply_result(outcome, final)
                return
            target, body, endpoint = outcome.spec.command_type, fresh_body, None
            continue
        worker = outcome.worker
        started_on = worker.name if worker is not None else None
        if started_on is None and silent.partials:
            # A worker without a name said `started`: it cannot be asked (an older worker).
            await _lose(client, outcome, service, "its worker has no name to ask it by")
            return
        names = [host] if host else ([started_on] if started_on else None)
        expect = sorted(active.seen.get(service, ())) if names is None else ()
        asking_until = time.monotonic() + limit * client.timeout
        while True:
            found = await locate(
                client,
                service,
                outcome.request_id,
                timeout=client.timeout,
                names=names,
                expect=expect,
            )
            step = next_step(found, started_on)
            if step.action != "ask-again" or time.monotonic() >= asking_until:
                break
            await asyncio.sleep(ASK_AGAIN_PAUSE)
        if step.action == "reattach" and reattaches < limit:
            assert step.worker is not None
            target, body, endpoint = f"{service}@{step.worker}", reattach_body, step.endpoint
            continue
        if step.action == "resend" and sends < limit:
            if step.new_id:
                outcome.request_id = uuid.uuid4().hex
            target, body, endpoint = outcome.spec.command_type, fresh_body, step.endpoint
            continue
        outcome.attempts = tries
        if step.action == "resend":
            outcome.message = (
                f"no worker started it ({sends} attempts through "
                f"{', '.join(dict.fromkeys(through))}, {client.timeout:g} s each); it will not "
                "start later. Were all workers busy? (mdp-client services shows queued requests)"
            )
            await _lose(client, outcome, service, None)
        elif step.action == "reattach":
            why = f"{step.worker} has it ({found.state}), but {reattaches} re-attaches went silent"
            await _lose(client, outcome, service, why, step.worker)
        elif started_on is not None:
            await _lose(client, outcome, service, step.why, started_on)
        else:
            outcome.message = (
                f"no answer for {client.timeout:g} s, and whether it started is not known: "
                f"{step.why}. Not re-sent, as it may be running there"
            )
            await _lose(client, outcome, service, None)
        return


async def _lose(
    client: Client,
    outcome: CommandOutcome,
    service: str,
    why: str | None,
    worker: str | None = None,
) -> None:
    """Report `outcome` lost; one that may run on `worker` is cancelled there first (spec §14:
    nothing reported lost goes on running). `why`: what is known of it there."""
    outcome.status = "lost"
    if why is not None:
        where = worker or (outcome.worker and _worker(outcome.worker)) or "a worker"
        outcome.message = (
            f"started on {where}, then nothing for {client.timeout:g} s; {why}: not re-sent "
            "because it may have run (--retry-started re-sends it under the same request_id)"
        )
    if worker is not None:
        answer = await cancel_one(client, service, worker, outcome.request_id)
        outcome.message = f"{outcome.message}; cancel sent to {worker}: {answer}"


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
        if not any(_same_process(event.worker, w) for w in outcome.workers):
            # The same worker again (a retry, a re-attach) answers from its memory: one run.
            outcome.workers.append(event.worker)
        if event.worker.name is not None:
            service = outcome.spec.command_type.partition("@")[0]
            active.seen.setdefault(service, set()).add(event.worker.name)
        if event.worker.name is not None and outcome.request_id == event.request_id:
            active.started[outcome.index] = (
                outcome.spec.command_type.partition("@")[0],  # cancel goes to SERVICE@NAME
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


def _same_process(a: WorkerInfo, b: WorkerInfo) -> bool:
    return (a.host, a.pid) == (b.host, b.pid)


def _worker(worker: WorkerInfo) -> str:
    return f"{worker.host}/{worker.pid}"
