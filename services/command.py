"""The "os" and "shell" command services: validate the request body, protect against
duplicates, run the process within its run limit, stream its progress, and answer with a
CommandResult.

"os" executes `[command_name, *parameters]` directly: no shell ever sees the arguments.
"shell" runs `/bin/sh -c SCRIPT sh PARAMETERS...` where SCRIPT is `command_name` followed by
`"$@"` when there are parameters: the shell interprets `command_name` and hands each parameter
to it as one word, never parsing it. `spec/command-service.md` is the user-facing description.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import pwd
import re
import socket
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import msgpack

from mdp.worker import Request, Service
from services.bodies import (
    DEFAULT_MAX_RUN_LIMIT,
    DEFAULT_RUN_LIMIT,
    BodyError,
    CancelOutcome,
    CancelReply,
    CommandRequest,
    CommandResult,
    LookupReply,
    LookupState,
    Output,
    Progress,
    Started,
    WorkerInfo,
    WorkerStatus,
    pack,
    parse_cancel,
    parse_lookup,
    parse_request,
    unpack_map,
)
from services.dedup import Entry, RequestCache
from services.execution import Emit, GroupTracker, Limits, RunControl, run_process
from services.policy import ChildLimits, CommandPolicy

if TYPE_CHECKING:  # prometheus_client is imported only when --metrics-bind asks for it
    from services.metrics import CommandMetrics

__all__ = [
    "SHELL",
    "CommandService",
    "CommandSettings",
    "base_environment",
    "command_argv",
    "default_worker_name",
    "validate_worker_name",
]

log = logging.getLogger("services.command")

Mode = Literal["os", "shell"]

SHELL = "/bin/sh"

CANCELLED_IDS = 1024
"""request_ids cancelled before this worker saw them, remembered (spec §14.3) ..."""
CANCELLED_FOR = 600.0
"""... for this many seconds."""
_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


def validate_worker_name(name: str) -> str:
    """A worker name: 1 to 64 characters from A-Z a-z 0-9 . _ - (spec §14.3)."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"bad worker name {name!r}: use 1 to 64 characters from A-Z a-z 0-9 . _ -")
    return name


def default_worker_name() -> str:
    """The host name (its first 64 allowed characters), the default --name."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:64]
    return name or "worker"


@dataclass(frozen=True, slots=True)
class CommandSettings:
    """The worker's policy for command requests (from the mdp-worker options)."""

    default_run_limit: float = DEFAULT_RUN_LIMIT
    """The run limit of a request that gives none (still capped by `max_run_limit`);
    `--default-run-limit`."""
    max_run_limit: float = DEFAULT_MAX_RUN_LIMIT
    """No command runs longer, whatever its request says; `--max-run-limit`."""
    limits: Limits = field(default_factory=Limits)
    policy: CommandPolicy = field(default_factory=CommandPolicy)
    """Which commands may run (--allow, --deny-env); others are answered `rejected`."""
    child: ChildLimits = field(default_factory=ChildLimits)
    """The user commands run as and their resource limits (--user, --max-memory, ...)."""
    name: str = field(default_factory=default_worker_name)
    """The worker's name: `MODE@NAME` is its control service (spec §14.3)."""

    def __post_init__(self) -> None:
        if self.default_run_limit <= 0 or self.max_run_limit <= 0:
            raise ValueError("run limits must be positive")
        validate_worker_name(self.name)


def base_environment() -> dict[str, str]:
    """The minimal environment every command starts from: PATH and HOME of the worker (with
    fallbacks) and LANG=C.UTF-8. The request's `env` is added on top."""
    home = os.environ.get("HOME")
    if not home:
        try:
            home = pwd.getpwuid(os.getuid()).pw_dir
        except KeyError:
            home = "/"
    return {
        "PATH": os.environ.get("PATH") or "/usr/local/bin:/usr/bin:/bin",
        "HOME": home,
        "LANG": "C.UTF-8",
    }


def command_argv(mode: Mode, request: CommandRequest) -> list[str]:
    """The argv that runs `request` under `mode` (see the module docstring)."""
    if mode == "os":
        return [request.command_name, *request.parameters]
    script = request.command_name
    if request.parameters:
        script += ' "$@"'
    # $0 is "sh"; the parameters become $1..$n and reach the command as separate words.
    return [SHELL, "-c", script, "sh", *request.parameters]


def _request_digest(request: CommandRequest) -> bytes:
    # start_by differs between attempts of one request: it is no part of what the request is.
    return hashlib.sha256(pack(request.model_dump(exclude={"start_by"}))).digest()


def _peek_request_id(body: list[bytes]) -> str | None:
    """The request_id of a body that failed validation, if it carries a usable one."""
    if len(body) != 1:
        return None
    try:
        value = unpack_map(body[0]).get("request_id")
    except BodyError:
        return None
    return value if isinstance(value, str) and 0 < len(value) <= 128 else None


class CommandService:
    """The handler of the "os" or "shell" service. Use `.service()` to get the `Service`."""

    def __init__(
        self,
        mode: Mode,
        settings: CommandSettings | None = None,
        cache: RequestCache | None = None,
        tracker: GroupTracker | None = None,
    ) -> None:
        if mode not in ("os", "shell"):
            raise ValueError(f"unknown command mode {mode!r}")
        self.mode: Mode = mode
        self.settings = settings or CommandSettings()
        self.cache = cache if cache is not None else RequestCache()
        self.host = socket.gethostname()
        self.environment = base_environment()
        account = self.settings.child.check_user()  # ValueError: unknown user, or not root
        if account is not None:
            self.environment["HOME"] = account.pw_dir
        self._popen_kwargs = self.settings.child.popen_kwargs()
        self.tracker = tracker
        """Told of every command's process group (the worker's watchdog, spec §14.4)."""
        self.running: dict[str, RunControl] = {}
        """Runs in progress by request_id: what a cancel message reaches."""
        self._cancelled: OrderedDict[str, float] = OrderedDict()
        self.service_name: str = mode
        self.metrics: CommandMetrics | None = None
        """Prometheus counters of the answers (`mdp-worker --metrics-bind`), when on."""
        self.limit: asyncio.Semaphore | None = None
        """The worker's global concurrency limit (`mdp-worker --concurrency`), shared by every
        command service and connection of the process, whichever broker a request came from
        (spec §14.6). A request waits for a slot before anything about it is decided."""

    def service(self, name: str | None = None) -> Service:
        self.service_name = name or self.mode
        return Service(self.service_name, self, self.error_reply)

    def control_service(self) -> Service:
        """`MODE@NAME`: the service addressed to this worker alone, for commands and cancel
        (spec §14.3)."""
        return Service(f"{self.mode}@{self.settings.name}", self.control, self.error_reply)

    def _worker(self, request: Request) -> WorkerInfo:
        return WorkerInfo(
            host=self.host, pid=os.getpid(), id=request.worker_id, name=self.settings.name
        )

    async def control(self, request: Request) -> list[bytes]:
        """Answer a request sent to `MODE@NAME` (spec §14.3): a cancel message (a map with
        `cancel`) or a lookup (a map with `lookup`) is answered at once; anything else is a
        command, run like one sent to MODE."""
        kind = _control_kind(request.body)
        if kind is None:
            return await self(request)
        if kind == "lookup":
            return self._lookup(request)
        worker = self._worker(request)
        try:
            message = parse_cancel(request.body)
        except BodyError as exc:
            return [_answer("invalid", str(exc), worker, None, exc.errors).pack()]
        request_id = message.cancel
        run = self.running.get(request_id)
        outcome: CancelOutcome
        if run is not None:
            run.cancel()
            outcome = "cancelled"
        elif self.cache.get(self._key(request_id)) is not None:
            outcome = "finished"
        else:
            self._remember_cancelled(request_id)
            outcome = "unknown"
        log.info(
            "%s: cancel %r from client %s: %s", worker.id, request_id, request.client.hex(), outcome
        )
        return [CancelReply(request_id=request_id, cancel=outcome, worker=worker).pack()]

    def _key(self, request_id: str) -> tuple[str, str]:
        """The duplicate-protection key of a request_id: one per command service, whether the
        request came to MODE or to MODE@NAME (a re-attach through `MODE@NAME` follows a run
        that started through MODE, spec §10)."""
        return (self.service_name, request_id)

    def state_of(self, request_id: str) -> LookupState:
        """What this worker knows of `request_id` (spec §14.3, lookup)."""
        entry = self.cache.get(self._key(request_id))
        if request_id in self.running or (entry is not None and not entry.done.done()):
            return "running"
        if entry is not None:
            return "finished"
        if self._is_cancelled(request_id):
            return "cancelled"
        return "unknown"

    def _lookup(self, request: Request) -> list[bytes]:
        """A lookup (spec §14.3): the state of a request_id here, answered at once; with
        `fence`, an unknown id is remembered like one cancelled before it came, so it never
        starts here later. Decided without an await: no request can start in between."""
        worker = self._worker(request)
        try:
            message = parse_lookup(request.body)
        except BodyError as exc:
            return [_answer("invalid", str(exc), worker, None, exc.errors).pack()]
        request_id = message.lookup
        state = self.state_of(request_id)
        if state == "unknown" and message.fence:
            self._remember_cancelled(request_id)
        fenced = state == "cancelled" or (state == "unknown" and message.fence)
        log.info(
            "%s: lookup %r%s from client %s: %s",
            worker.id,
            request_id,
            " (fence)" if message.fence else "",
            request.client.hex(),
            state,
        )
        reply = LookupReply(request_id=request_id, state=state, fenced=fenced, worker=worker)
        return [reply.pack()]

    def _is_cancelled(self, request_id: str) -> bool:
        since = self._cancelled.get(request_id)
        return since is not None and since >= time.monotonic() - CANCELLED_FOR

    def _remember_cancelled(self, request_id: str) -> None:
        now = time.monotonic()
        cancelled = self._cancelled
        cancelled[request_id] = now
        cancelled.move_to_end(request_id)
        while cancelled and (
            len(cancelled) > CANCELLED_IDS or next(iter(cancelled.values())) < now - CANCELLED_FOR
        ):
            cancelled.popitem(last=False)

    def _refusal(self, command: CommandRequest, worker: WorkerInfo) -> CommandResult | None:
        """`cancelled` for an id cancelled before it came, `expired` past its start_by."""
        request_id = command.request_id
        if request_id is not None and self._is_cancelled(request_id):
            message = "cancelled (or fenced by a lookup) before it reached this worker; nothing ran"
            return _answer("cancelled", message, worker, request_id)
        if command.start_by is not None:
            late = time.time() - command.start_by
            if late > 0:
                # spec §14.1: the client has moved on (or will, within the skew allowance).
                message = f"arrived {late:.3f}s after its start deadline; nothing ran"
                return _answer("expired", message, worker, request_id)
        return None

    async def __call__(self, request: Request) -> list[bytes]:
        limit = self.limit
        known = self._known(request)
        if limit is None or known is not None:
            # A retry of a request_id known here starts nothing: it follows the run (or gets
            # the stored FINAL) without waiting for a slot, so a client re-attaching to a
            # command on a full worker hears `started` at once.
            return await self._measured(request, known)
        async with limit:
            if not request.alive():
                # Its connection closed while it waited for a slot: the client hears nothing
                # from here and may send it elsewhere, so it must never start here.
                message = "its broker connection closed before a slot was free; nothing ran"
                return [_answer("expired", message, self._worker(request), None).pack()]
            return await self._measured(request)

    def _known(self, request: Request) -> Entry | None:
        """The duplicate-protection entry of the request's request_id, if it has one here."""
        request_id = _peek_request_id(request.body)
        return None if request_id is None else self.cache.get(self._key(request_id))

    async def _measured(self, request: Request, known: Entry | None = None) -> list[bytes]:
        metrics = self.metrics
        if metrics is None:
            return await self._handle(request, known)
        with metrics.handling(self.service_name):
            reply = await self._handle(request, known)
        metrics.answered(self.service_name, reply)
        return reply

    async def _handle(self, request: Request, known: Entry | None = None) -> list[bytes]:
        """`known`: the entry of this request's request_id, when `__call__` found one (it then
        took no slot, so this must follow that run and never start another)."""
        worker = self._worker(request)
        try:
            command = parse_request(request.body)
        except BodyError as exc:
            # Nothing a client sends crashes the worker: a bad body is answered, field by field.
            request_id = _peek_request_id(request.body)
            return [_answer("invalid", str(exc), worker, request_id, exc.errors).pack()]
        refused = self.settings.policy.check(self.mode, command.command_name, command.env)
        if refused is not None:
            # spec/security.md §10: outside the worker's policy nothing runs.
            log.warning(
                "%s: rejected %s %r for client %s: %s",
                worker.id,
                self.mode,
                command.command_name[:80],
                request.client.hex(),
                refused,
            )
            return [_answer("rejected", refused, worker, command.request_id).pack()]
        if command.request_id is None:
            refusal = self._refusal(command, worker)
            if refusal is not None:
                return [refusal.pack()]
            await self._started(request, worker, command)
            return [await self._execute(command, request, worker, RunControl())]

        key = self._key(command.request_id)
        digest = _request_digest(command)
        entry = known if known is not None else self.cache.get(key)
        if entry is not None:
            if entry.digest != digest:
                message = "request_id was already used for a different request"
                return [_answer("rejected", message, worker, command.request_id).pack()]
            log.info("%s: duplicate request_id %r, not run again", worker.id, command.request_id)
            await self._started(request, worker, command)
            return [await self._follow(entry.done, request, worker, command.request_id)]

        refusal = self._refusal(command, worker)
        if refusal is not None:
            return [refusal.pack()]
        entry = self.cache.begin(key, digest)
        control = self.running[command.request_id] = RunControl()
        try:
            await self._started(request, worker, command)
            final = await self._execute(command, request, worker, control)
        except BaseException:
            self.cache.abandon(key, entry)
            raise
        finally:
            if self.running.get(command.request_id) is control:
                del self.running[command.request_id]
        self.cache.finish(key, entry, final)
        return [final]

    def _run_limit(self, command: CommandRequest) -> tuple[float, float]:
        """(the run limit the request asked for, the one applied) in seconds (spec §5)."""
        settings = self.settings
        wanted = command.run_limit if command.run_limit is not None else settings.default_run_limit
        return wanted, min(wanted, settings.max_run_limit)

    async def _started(self, request: Request, worker: WorkerInfo, command: CommandRequest) -> None:
        if request.streaming:
            started = Started(
                worker=worker, request_id=command.request_id, timeout=self._run_limit(command)[1]
            )
            await request.partial([started.pack()])

    async def _execute(
        self, command: CommandRequest, request: Request, worker: WorkerInfo, control: RunControl
    ) -> bytes:
        settings = self.settings
        wanted, run_limit = self._run_limit(command)
        env = {**self.environment, **(command.env or {})}
        emit: Emit | None = None
        if request.streaming:

            async def emit(event: Output | Progress) -> None:
                await request.partial([event.pack()])

        outcome = await run_process(
            command_argv(self.mode, command),
            env=env,
            run_limit=run_limit,
            limits=settings.limits,
            cwd=command.cwd,
            stdin=command.stdin,
            emit=emit,
            popen_kwargs=self._popen_kwargs,
            control=control,
            tracker=self.tracker,
        )
        message = outcome.message
        if outcome.status == "timeout" and wanted > settings.max_run_limit:
            message = f"{message} (the request asked for {wanted:g}s; this worker allows at most "
            message += f"{settings.max_run_limit:g}s)"
        result = outcome.model_copy(
            update={"worker": worker, "request_id": command.request_id, "message": message}
        )
        log.info(
            "%s: %s %r for client %s -> %s%s in %.0f ms",
            worker.id,
            self.mode,
            command.command_name[:80],
            request.client.hex(),
            outcome.status,
            f" (exit {outcome.exit_code})" if outcome.exit_code else "",
            outcome.duration_ms,
        )
        return result.pack()

    async def _follow(
        self,
        done: asyncio.Future[bytes | None],
        request: Request,
        worker: WorkerInfo,
        request_id: str,
    ) -> bytes:
        """Wait for the run in progress (sending Progress while it lasts), return its FINAL."""
        started = time.monotonic()
        interval = self.settings.limits.progress_interval
        while not done.done():
            await asyncio.wait({done}, timeout=interval)
            if not done.done() and request.streaming:
                elapsed = round((time.monotonic() - started) * 1000, 1)
                await request.partial([Progress(elapsed_ms=elapsed).pack()])
        final = done.result()
        if final is not None:
            return final
        message = "the first run of this request_id was interrupted (worker shutting down)"
        return _answer("error", message, worker, request_id).pack()

    def error_reply(self, request: Request, exc: BaseException) -> list[bytes]:
        """FINAL when the handler itself failed (a bug) or was cancelled at shutdown."""
        if isinstance(exc, asyncio.CancelledError):
            message = "the worker shut down before the command finished; it was killed"
        else:
            message = f"internal error in the worker: {type(exc).__name__}"
        request_id = _peek_request_id(request.body)
        return [_answer("error", message, self._worker(request), request_id).pack()]


def _answer(
    status: WorkerStatus,
    message: str,
    worker: WorkerInfo,
    request_id: str | None,
    errors: list[dict[str, str]] | None = None,
) -> CommandResult:
    """The result of a request that ran nothing (invalid, rejected, expired, cancelled before
    it started, or ended by the worker); its duration is 0 on the wire."""
    return CommandResult(
        status=status,
        message=message,
        errors=errors,
        duration_ms=0.0,
        worker=worker,
        request_id=request_id,
    )


def _control_kind(body: list[bytes]) -> Literal["cancel", "lookup"] | None:
    """The kind of a control body sent to `MODE@NAME` (`{"cancel": id}` or `{"lookup": id,
    ...}`), or None for a command."""
    if len(body) != 1:
        return None
    try:
        message = msgpack.unpackb(body[0], raw=False)
    except Exception:  # msgpack raises several unrelated types for bad input
        return None
    if not isinstance(message, dict):
        return None
    if "cancel" in message:
        return "cancel"
    if "lookup" in message:
        return "lookup"
    return None
