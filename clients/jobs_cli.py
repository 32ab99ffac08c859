"""The job subcommands of `mdp-client`: submit, status, jobs, wait, result, logs, cancel,
rerun. They talk to `mdp-jobs` through the broker (`spec/jobs.md`), or with `--embedded` run a
broker, workers and `mdp-jobs` inside this process on a temporary or given `--db`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import click
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from clients.cli import CONTEXT, PROG, Connection, _fail, _run_sync, connection_options
from clients.commands import CommandSpec, InputError, load_commands
from clients.fleet import UnknownHost, address, host_of, resolve_hosts
from clients.jobs import JobsAPI, JobsError
from clients.render import HumanReport, JsonLinesReport, JsonReport, QuietConsole, Report
from clients.results import CommandOutcome, ExitCode, exit_code_for
from mdp.client import Client, RequestTimeout
from mdp.errors import MDPError
from services.bodies import CommandResult, WorkerInfo

__all__ = ["EXIT_PENDING", "EXIT_UNKNOWN_JOB", "register"]

F = TypeVar("F", bound=Callable[..., Any])

EXIT_UNKNOWN_JOB = 67
"""Some id names no job: never submitted (`unknown`) or purged by retention (`expired`)."""
EXIT_PENDING = 3
"""`result`: some job has not finished yet."""
WAIT_SLICE = 20.0
"""Seconds one long poll may be held by mdp-jobs (below the client's silence timeout)."""

JOB_EXIT_CODES = """\b
Exit codes:
  0    every job ok (submit, cancel, status, jobs: the request was answered)
  1    some job failed (non-zero exit, or status error/invalid/rejected/cancelled)
  2    usage error
  3    (result) some job has not finished yet
  65   (submit) FILE is not a valid commands file, or mdp-jobs refused a job
  66   (submit) FILE cannot be read
  67   some id is unknown (never submitted) or expired (purged by retention)
  69   no broker or no mdp-jobs answered
  75   some job was lost (started, then its worker vanished)
  124  some job timed out
"""


def job_options(f: F) -> F:
    """--embedded/--db and the broker options."""
    f = click.option(
        "--db",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="With --embedded: the job database to use (default: a temporary one).",
    )(f)
    f = click.option(
        "--embedded",
        is_flag=True,
        help="Run a broker, os/shell/echo workers and mdp-jobs inside this process (on --db) "
        "for as long as the command runs; -a is ignored.",
    )(f)
    return connection_options(f)


@contextlib.asynccontextmanager
async def jobs_api(
    connection: Connection, embedded: bool, db: Path | None
) -> AsyncIterator[JobsAPI]:
    """A JobsAPI on the given brokers, or on an embedded broker + workers + mdp-jobs."""
    if not embedded:
        client = connection.client()
        try:
            yield JobsAPI(client)
        finally:
            client.close()
        return
    from clients.embedded import EmbeddedError, embedded_system
    from services.jobs.manager import JobManager, Settings
    from services.jobs.store import StoreError, open_store

    with tempfile.TemporaryDirectory(prefix="mdp-jobs-") as scratch:
        location = str(db or Path(scratch) / "jobs.sqlite3")
        store = open_store(location)
        try:
            await store.open()
        except StoreError as exc:
            _fail(str(exc), 78)
        try:
            async with embedded_system(["os", "shell", "echo"], 4) as system:
                # The broker and workers of an earlier embedded run died with it: nothing it
                # dispatched can still start, so its claims are released at once.
                settings = Settings(
                    broker=system.endpoint, submit_connections=8, previous_run_gone=True
                )
                manager = JobManager(store, settings)
                task = asyncio.create_task(manager.run())
                client = connection.client([system.endpoint], local=True)
                try:
                    await _until_serving(client)
                    yield JobsAPI(client)
                finally:
                    client.close()
                    manager.stop()
                    with contextlib.suppress(asyncio.CancelledError):
                        await asyncio.wait_for(task, 10)
        except EmbeddedError as exc:
            _fail(str(exc), ExitCode.UNAVAILABLE)
        finally:
            await store.close()


async def _until_serving(client: Client) -> None:
    deadline = time.monotonic() + 10
    while not await client.service_exists("jobs.list"):
        if time.monotonic() > deadline:
            _fail("the embedded mdp-jobs did not start", ExitCode.UNAVAILABLE)
        await asyncio.sleep(0.02)


def _run(connection: Connection, body: Callable[[], Any]) -> None:
    """Run a coroutine function; a silent broker or mdp-jobs becomes exit 69."""

    async def guarded() -> int:
        try:
            return int(await body())
        except RequestTimeout:
            _fail(
                f"no answer from mdp-jobs through {', '.join(connection.brokers)} "
                "(is mdp-jobs running? `mdp-client ping jobs.submit`)",
                ExitCode.UNAVAILABLE,
            )
        except JobsError as exc:
            _fail(f"mdp-jobs refused: {exc}", ExitCode.DATA_ERROR)
        except MDPError as exc:
            _fail(str(exc), ExitCode.UNAVAILABLE)

    sys.exit(_run_sync(guarded()))


def _when(ts: float | None) -> str:
    if ts is None:
        return ""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _since(value: str) -> float:
    """--since: an ISO date/time (UTC unless it says otherwise) or a duration back (90m, 2d)."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if value[-1:] in units and value[:-1].replace(".", "", 1).isdigit():
        return time.time() - float(value[:-1]) * units[value[-1]]
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is neither a time (2026-12-01T08:00) nor a duration (90m, 2d)",
            param_hint="'--since'",
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


# ---------------------------------------------------------------------------------------------
# Outcomes: a job as the direct mode would have printed it


def outcome_of(index: int, entry: dict[str, Any]) -> CommandOutcome:
    """A CommandOutcome (what a direct run reports) from a jobs.result answer."""
    job = entry["job"]
    request = {
        k: v
        for k, v in (job.get("request") or {}).items()
        if k in ("command_name", "parameters", "timeout", "cwd", "env")
    }
    try:
        spec = CommandSpec.model_validate(
            {"command_type": job.get("service") or "?", **request}, strict=False
        )
    except ValidationError:
        spec = CommandSpec.model_construct(
            command_type=job.get("service") or "?", command_name="(opaque frames)"
        )
    state = job["state"]
    outcome = CommandOutcome(index=index, spec=spec, request_id=job["id"], status=state)
    result = entry.get("result")
    if isinstance(result, dict):
        with contextlib.suppress(ValidationError):  # not a command result: show the state only
            outcome.take(CommandResult.model_validate(result))
        outcome.status = state  # the job's state says more (e.g. lost after a re-attach)
    if job.get("worker"):
        with contextlib.suppress(ValidationError):
            outcome.worker = WorkerInfo.model_validate(job["worker"])
    if job.get("message") and not outcome.message:
        outcome.message = job["message"]
    if state in ("unknown", "expired"):
        outcome.message = (
            "no such job" if state == "unknown" else "this job's record was purged by retention"
        )
    if job.get("started") and job.get("finished"):
        outcome.elapsed_ms = (job["finished"] - job["created"]) * 1000
    return outcome


def _report(mode: str, outcomes_specs: Sequence[CommandSpec]) -> Report:
    if mode == "json":
        return JsonReport()
    if mode == "jsonl":
        return JsonLinesReport()
    return HumanReport(outcomes_specs, err=QuietConsole(stderr=True, highlight=False))


def _exit_for(outcomes: list[CommandOutcome]) -> int:
    if any(o.status in ("unknown", "expired") for o in outcomes):
        return EXIT_UNKNOWN_JOB
    if any(o.status in ("queued", "running") for o in outcomes):
        return EXIT_PENDING
    return int(exit_code_for(outcomes))


def output_mode(as_json: bool, as_jsonl: bool) -> str:
    if as_json and as_jsonl:
        raise click.UsageError("--json and --jsonl exclude each other")
    return "json" if as_json else "jsonl" if as_jsonl else "human"


def json_options(f: F) -> F:
    f = click.option("--jsonl", "as_jsonl", is_flag=True, help="One JSON object per line.")(f)
    return click.option("--json", "as_json", is_flag=True, help="One JSON document.")(f)


async def _targeted(
    connection: Connection, specs: list[CommandSpec], hosts: tuple[str, ...], every: bool
) -> list[CommandSpec]:
    """The commands addressed to each selected host (as `mdp-client --host/--all`); exits 68
    when a pattern matches no worker, 69 when no broker answers."""
    client = connection.client()
    try:
        chosen, _ = await resolve_hosts(client, hosts, every)
    except UnknownHost as exc:
        click.echo(f"{PROG}: {exc}", err=True)
        sys.exit(ExitCode.NO_HOST)
    except RequestTimeout:
        click.echo(f"{PROG}: no broker answered at {', '.join(connection.brokers)}", err=True)
        sys.exit(ExitCode.UNAVAILABLE)
    except MDPError as exc:
        click.echo(f"{PROG}: cannot list the workers (mmi.workers): {exc}", err=True)
        sys.exit(ExitCode.FAILED)
    finally:
        client.close()
    return address(specs, chosen)


# ---------------------------------------------------------------------------------------------
# The subcommands


@click.command(context_settings=CONTEXT, epilog=JOB_EXIT_CODES)
@click.option(
    "-f",
    "--file",
    "path",
    required=True,
    metavar="FILE",
    help="Commands file, as for a direct run (- reads standard input).",
)
@click.option(
    "--host",
    "hosts",
    multiple=True,
    metavar="NAME|GLOB",
    help="One job per matching worker and command, run on that worker alone (SERVICE@NAME); "
    "as for a direct run. No match: exit 68.",
)
@click.option("--all", "every_host", is_flag=True, help="One job per named worker and command.")
@job_options
@json_options
@click.pass_obj
def submit(
    parent: Connection,
    /,
    path: str,
    hosts: tuple[str, ...],
    every_host: bool,
    embedded: bool,
    db: Path | None,
    as_json: bool,
    as_jsonl: bool,
    **params: Any,
) -> None:
    """Submit the commands of FILE as jobs; print one job id per command.

    Returns as soon as mdp-jobs has stored every job (nothing waits for the commands). Follow
    them with status, wait, logs -f, result.
    """
    connection = Connection(params, parent)
    mode = output_mode(as_json, as_jsonl)
    try:
        specs = load_commands(path)
    except InputError as exc:
        for problem in exc.problems:
            click.echo(f"{PROG}: {problem}", err=True)
        sys.exit(exc.exit_code)

    if hosts and every_host:
        raise click.UsageError("--host and --all exclude each other")
    if (hosts or every_host) and embedded:
        raise click.UsageError("--host/--all need a broker with named workers, not --embedded")

    async def go() -> int:
        nonlocal specs
        if hosts or every_host:
            specs = await _targeted(connection, specs, hosts, every_host)
        async with jobs_api(connection, embedded, db) as api:
            limit = asyncio.Semaphore(64)

            async def one(spec: CommandSpec) -> dict[str, Any]:
                request = spec.model_dump(exclude_none=True, exclude={"command_type"})
                async with limit:
                    return await api.submit(spec.command_type, request)

            answers = await asyncio.gather(*(one(spec) for spec in specs))
        rows = [
            {"index": i, "id": a["id"], "service": s.command_type, "state": a["state"]}
            for i, (a, s) in enumerate(zip(answers, specs, strict=True))
        ]
        for row in rows:
            host = host_of(str(row["service"]))
            if host is not None:
                row["host"] = host
        if mode == "json":
            click.echo(json.dumps(rows))
        elif mode == "jsonl":
            for row in rows:
                click.echo(json.dumps(row))
        else:
            for row in rows:
                click.echo(f"{row['id']}  {row['host']}" if "host" in row else row["id"])
        return 0

    _run(connection, go)


@click.command(context_settings=CONTEXT, epilog=JOB_EXIT_CODES)
@click.argument("ids", nargs=-1, required=True, metavar="ID...")
@job_options
@click.option("--json", "as_json", is_flag=True, help="Print the entries as JSON.")
@click.pass_obj
def status(
    parent: Connection,
    /,
    ids: tuple[str, ...],
    embedded: bool,
    db: Path | None,
    as_json: bool,
    **params: Any,
) -> None:
    """Show the state of jobs: queued, running, ok, failed, ..., unknown or expired."""
    connection = Connection(params, parent)

    async def go() -> int:
        async with jobs_api(connection, embedded, db) as api:
            entries: list[dict[str, Any]] = []
            for start in range(0, len(ids), 1000):
                entries += await api.status(ids[start : start + 1000])
        if as_json:
            click.echo(json.dumps([_jsonable(e) for e in entries]))
        else:
            _table(entries)
        unknown = any(e["state"] in ("unknown", "expired") for e in entries)
        return EXIT_UNKNOWN_JOB if unknown else 0

    _run(connection, go)


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        from clients.results import json_bytes

        return json_bytes(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def _table(entries: list[dict[str, Any]]) -> None:
    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=1000)  # a pipe gets whole columns
    if not entries:
        console.print("no jobs")
        return
    table = Table(box=None)
    table.add_column("id", no_wrap=True, min_width=max(len(e["id"]) for e in entries))
    for name in ("state", "service", "created (UTC)", "worker", "exit"):
        table.add_column(name, no_wrap=True)
    for e in entries:
        worker = e.get("worker") or {}
        table.add_row(
            e["id"],
            e["state"],
            e.get("service", ""),
            _when(e.get("created")),
            f"{worker.get('name') or worker.get('host', '')}/{worker['pid']}" if worker else "",
            "" if e.get("exit_code") is None else str(e["exit_code"]),
        )
    console.print(table)


@click.command(name="jobs", context_settings=CONTEXT, epilog=JOB_EXIT_CODES)
@click.option("--state", "states", multiple=True, metavar="STATE", help="Only jobs in STATE.")
@click.option("--service", default=None, help="Only jobs of this target service.")
@click.option("--since", default=None, help="Created since: 2026-12-01T08:00 (UTC), or 90m, 2d.")
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
@job_options
@click.option("--json", "as_json", is_flag=True, help="Print the jobs as JSON.")
@click.pass_obj
def list_jobs(
    parent: Connection,
    /,
    states: tuple[str, ...],
    service: str | None,
    since: str | None,
    limit: int,
    embedded: bool,
    db: Path | None,
    as_json: bool,
    **params: Any,
) -> None:
    """List jobs, newest first."""
    connection = Connection(params, parent)
    after = _since(since) if since else None

    async def go() -> int:
        async with jobs_api(connection, embedded, db) as api:
            answer = await api.list(
                state=list(states) or None, service=service, since=after, limit=limit
            )
        if as_json:
            click.echo(json.dumps(answer["jobs"]))
        else:
            _table(answer["jobs"])
        return 0

    _run(connection, go)


async def _results(
    api: JobsAPI, ids: Sequence[str], wait: bool, report: Report
) -> list[CommandOutcome]:
    """Each job's outcome, reported as it is known. Waiting polls jobs.status for all the
    pending ids at once (one request per 1,000), so no number of ids holds mdp-jobs'
    connections; a single id is long-polled with jobs.result instead."""
    outcomes: dict[int, CommandOutcome] = {}
    pending = dict(enumerate(ids))
    pause = 0.05
    while pending:
        if wait and len(pending) > 1:
            listed = list(pending.items())
            entries: list[dict[str, Any]] = []
            for start in range(0, len(listed), 1000):
                entries += await api.status([job_id for _, job_id in listed[start : start + 1000]])
            ready = [
                index
                for (index, _), entry in zip(listed, entries, strict=True)
                if entry["state"] not in ("queued", "running")
            ]
        else:
            ready = list(pending)
        for index in ready:
            entry = await api.result(pending[index], wait=WAIT_SLICE if wait else 0.0)
            if wait and entry["job"]["state"] in ("queued", "running"):
                continue
            outcomes[index] = outcome_of(index, entry)
            report.finished(outcomes[index])
            del pending[index]
        if pending and len(pending) > 1:
            await asyncio.sleep(pause)
            pause = min(pause * 2, 1.0)
    return [outcomes[index] for index in sorted(outcomes)]


def _results_command(wait: bool) -> Callable[..., None]:
    def run(
        parent: Connection,
        /,
        ids: tuple[str, ...],
        embedded: bool,
        db: Path | None,
        as_json: bool,
        as_jsonl: bool,
        **params: Any,
    ) -> None:
        connection = Connection(params, parent)
        mode = output_mode(as_json, as_jsonl)
        if wait and connection.silence_limit <= WAIT_SLICE:
            connection.silence_limit = WAIT_SLICE + 5  # a held long poll is not silence

        async def go() -> int:
            async with jobs_api(connection, embedded, db) as api:
                specs = [CommandSpec.model_construct(command_type="?", command_name=i) for i in ids]
                report = _report(mode, specs)
                start = time.monotonic()
                with report:
                    outcomes = await _results(api, ids, wait, report)
                report.close(outcomes, time.monotonic() - start)
            return _exit_for(outcomes)

        _run(connection, go)

    return run


wait = click.command(
    name="wait",
    context_settings=CONTEXT,
    epilog=JOB_EXIT_CODES,
    help="Wait until the jobs end; print their results as a direct run prints them, and exit "
    "with the same codes.",
)(
    click.argument("ids", nargs=-1, required=True, metavar="ID...")(
        job_options(json_options(click.pass_obj(_results_command(True))))
    )
)

result = click.command(
    name="result",
    context_settings=CONTEXT,
    epilog=JOB_EXIT_CODES,
    help="Print the results of finished jobs as a direct run prints them (exit 3 if some job "
    "has not finished).",
)(
    click.argument("ids", nargs=-1, required=True, metavar="ID...")(
        job_options(json_options(click.pass_obj(_results_command(False))))
    )
)


@click.command(context_settings=CONTEXT, epilog=JOB_EXIT_CODES)
@click.argument("job_id", metavar="ID")
@click.option("-f", "--follow", is_flag=True, help="Keep printing output until the job ends.")
@click.option(
    "--from",
    "start",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="First chunk number to print (resume where an earlier logs -f stopped).",
)
@job_options
@click.pass_obj
def logs(
    parent: Connection,
    /,
    job_id: str,
    follow: bool,
    start: int,
    embedded: bool,
    db: Path | None,
    **params: Any,
) -> None:
    """Print a job's stored output (stdout to stdout, stderr to stderr), then with -f its live
    output until it ends. Output is kept as numbered chunks: when interrupted, the number to
    resume from is printed on stderr (`--from N`)."""
    connection = Connection(params, parent)
    if follow and connection.silence_limit <= WAIT_SLICE:
        connection.silence_limit = WAIT_SLICE + 5  # a held long poll is not silence

    async def go() -> int:
        position = start
        try:
            async with jobs_api(connection, embedded, db) as api:
                while True:
                    answer = await api.logs(job_id, position, wait=WAIT_SLICE if follow else 0)
                    for chunk in answer["chunks"]:
                        stream = sys.stdout if chunk["stream"] == "stdout" else sys.stderr
                        stream.buffer.write(chunk["data"])
                        stream.flush()
                    position = answer["next"]
                    if answer["state"] in ("unknown", "expired"):
                        _fail(f"{job_id}: {answer['state']}", EXIT_UNKNOWN_JOB)
                    if answer["done"] or (not follow and len(answer["chunks"]) < 256):
                        return 0
        except asyncio.CancelledError:
            click.echo(f"{PROG}: resume with: {PROG} logs -f --from {position} {job_id}", err=True)
            raise

    _run(connection, go)


@click.command(context_settings=CONTEXT, epilog=JOB_EXIT_CODES)
@click.argument("ids", nargs=-1, required=True, metavar="ID...")
@job_options
@click.option("--json", "as_json", is_flag=True, help="Print the answers as JSON.")
@click.pass_obj
def cancel(
    parent: Connection,
    /,
    ids: tuple[str, ...],
    embedded: bool,
    db: Path | None,
    as_json: bool,
    **params: Any,
) -> None:
    """Cancel jobs: a queued job never runs; a running one is stopped by its worker (its whole
    process group: SIGTERM, then SIGKILL)."""
    connection = Connection(params, parent)

    async def go() -> int:
        async with jobs_api(connection, embedded, db) as api:
            answers = await api.cancel(ids)
        if as_json:
            click.echo(json.dumps(answers))
        else:
            for a in answers:
                click.echo(f"{a['id']}: {a['cancel']} (state {a['state']})")
        unknown = any(a["cancel"] in ("unknown", "expired") for a in answers)
        return EXIT_UNKNOWN_JOB if unknown else 0

    _run(connection, go)


@click.command(context_settings=CONTEXT, epilog=JOB_EXIT_CODES)
@click.argument("job_id", metavar="ID")
@job_options
@click.pass_obj
def rerun(
    parent: Connection, /, job_id: str, embedded: bool, db: Path | None, **params: Any
) -> None:
    """Submit a new job with the same command as job ID; print the new id."""
    connection = Connection(params, parent)

    async def go() -> int:
        async with jobs_api(connection, embedded, db) as api:
            entry = (await api.status([job_id]))[0]
            if entry["state"] in ("unknown", "expired"):
                _fail(f"{job_id}: {entry['state']}", EXIT_UNKNOWN_JOB)
            if "request" not in entry:
                _fail(f"{job_id}: not a command job (it has opaque frames)", ExitCode.DATA_ERROR)
            answer = await api.submit(entry["service"], entry["request"])
        click.echo(answer["id"])
        return 0

    _run(connection, go)


def register(group: click.Group) -> None:
    """Add the job subcommands to `mdp-client`."""
    for command in (submit, status, list_jobs, wait, result, logs, cancel, rerun):
        group.add_command(command)
