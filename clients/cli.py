"""`mdp-client`: run the commands of a file through an MDP broker, and ask the broker about its
services. Thin: parse options, build objects, run, map the result to an exit code.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from types import FrameType
from typing import Any, NoReturn, TypeVar

import click
from rich.console import Console
from rich.table import Table

from clients.commands import CommandSpec, InputError, load_commands, oversized
from clients.render import HumanReport, JsonLinesReport, JsonReport, QuietConsole, Report
from clients.results import ExitCode, exit_code_for
from clients.runner import (
    Active,
    RunSettings,
    ServiceCheckFailed,
    check_services,
    run_commands,
)
from mdp import __version__
from mdp.cli_options import (
    curve_options,
    curve_socket_options,
    default_endpoint_or_fail,
    endpoint_callback,
    key_set_peer_options,
)
from mdp.client import (
    DEFAULT_RETRIES,
    DEFAULT_TIMEOUT,
    Client,
    MMINotImplemented,
    RequestTimeout,
)
from mdp.errors import MDPError
from mdp.protocol import DEFAULT_MAX_MSG_SIZE

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")

PROG = "mdp-client"
CONTEXT: dict[str, Any] = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

EXIT_CODES = """\b
Exit codes (when several apply, the first in this list wins):
  2    usage error (bad option)
  66   FILE does not exist or cannot be read
  65   FILE is not valid JSON or not a valid commands file, or a command is larger
       than the broker's message limit (--max-msg-size); nothing is sent
  68   a --host name or glob matches no registered worker; nothing is sent
  69   no broker answered (refused connections and unknown hosts are said within a
       second), or a service is unknown to the broker
  75   some command was lost or expired: no result after the allowed retries; a lost
       command that had not started never starts later, one that had is cancelled
  124  some command timed out (the worker killed it)
  1    some command failed (non-zero exit, or status error/invalid/rejected/cancelled)
  0    every command ok
  130  interrupted (SIGINT, Ctrl-C); 143 terminated (SIGTERM): the commands that started
       are cancelled on their workers (process groups killed) unless --detach, and
       those still on their way are waited for until they can no longer start
"""

MAIN_HELP = f"""Run the commands in FILE through an MDP broker and report their results.

FILE holds one command or a JSON list of them, e.g.

\b
  {{"command_type": "shell", "command_name": "echo",
   "parameters": ["Hello, world!"], "timeout": 5, "cwd": "/tmp", "env": {{"A": "1"}}}}

command_type names the service that runs it: "os" runs command_name with the parameters as
its arguments (no shell); "shell" runs command_name through /bin/sh -c, parameters safely
quoted. timeout (the command's run limit: seconds the worker lets it run), cwd and env are
optional; any other field is an error.

Before sending anything, the client asks the broker (MMI) whether every service the file needs
has a worker. Commands then run concurrently, at most --parallel at a time, and each is printed
as it finishes. An attempt that stays silent for --timeout seconds (no reply, no progress: the
attempt silence limit) is abandoned and re-sent on a fresh connection, to the next -a broker in
turn, at most --retries times; but a command a worker has already started is never re-sent
unless --retry-started is given (it may have run), it is reported "lost" instead. Over
--mdp-version 0.1 the client cannot see a start, so silent commands are only re-sent with
--retry-started. Each attempt carries a start deadline (--timeout after it was sent): an
attempt still waiting in the broker's queue after that (+ 1 s for clock skew) can never start,
so nothing reported lost runs later and nothing runs twice. MDP says nothing while a request
waits in the queue: keep --parallel within the workers' total concurrency, or --timeout above
the longest wait.

In --json/--jsonl output, stdout/stderr are strings when they are valid UTF-8 and
{{"base64": "..."}} otherwise, and nothing but JSON goes to stdout (a run that stops before
sending anything, exit 65/66/69, prints nothing there; the reason goes to stderr).

Every option can also be set with an MDP_CLIENT_* environment variable (shown in brackets).

\b
Examples:
  {PROG} -f examples/batch.json
  {PROG} --embedded -f examples/batch.json        # no broker or worker needed
  echo '{{"command_type":"os","command_name":"ls"}}' | {PROG} -f - --json
  {PROG} --host web-3 -f cmds.json                # on the worker named web-3 only
  {PROG} --host 'web-*' -f cmds.json --json       # each command on every web-* worker
  {PROG} --all -f cmds.json                       # each command on every named worker
  {PROG} services
  {PROG} workers
  {PROG} ping shell

{EXIT_CODES}"""


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"{PROG}: {message}", err=True)
    sys.exit(code)


def connection_options(f: F) -> F:
    """Options every subcommand needs to reach a broker."""
    options = [
        click.option(
            "-a",
            "--broker",
            "brokers",
            multiple=True,
            callback=endpoint_callback(),
            metavar="ENDPOINT",
            envvar="MDP_CLIENT_BROKER",
            show_envvar=True,
            help="Broker endpoint; repeat for failover, tried in turn. [default: this user's "
            "broker on this machine, ipc://$XDG_RUNTIME_DIR/mdp/broker.sock]",
        ),
        click.option(
            "--timeout",
            "silence_limit",
            type=click.FloatRange(min=0, min_open=True),
            envvar="MDP_CLIENT_TIMEOUT",
            show_envvar=True,
            help="Attempt silence limit: seconds an attempt may go without any reply before it "
            "is abandoned and re-sent (not the command's run limit, `timeout` in FILE). "
            f"[default: {DEFAULT_TIMEOUT:g}]",
        ),
        click.option(
            "--retries",
            type=click.IntRange(min=0),
            envvar="MDP_CLIENT_RETRIES",
            show_envvar=True,
            help=f"How many times a silent request may be re-sent. [default: {DEFAULT_RETRIES}]",
        ),
        curve_options("client"),
        click.option(
            "--mdp-version",
            type=click.Choice(["0.1", "0.2"]),
            envvar="MDP_CLIENT_MDP_VERSION",
            show_envvar=True,
            help="MDP client protocol: 0.2 streams progress and output, 0.1 (RFC 7) does not. "
            "[default: 0.2]",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


class Connection:
    """The broker options, merged from the group and a subcommand (the subcommand wins)."""

    def __init__(self, params: dict[str, Any], parent: Connection | None = None) -> None:
        def pick(name: str, default: Any) -> Any:
            value = params.get(name)
            if value is not None and value != ():
                return value
            return getattr(parent, name) if parent is not None else default

        self._brokers: list[str] = list(pick("brokers", ()))
        self.silence_limit: float = pick("silence_limit", DEFAULT_TIMEOUT)
        """The attempt silence limit (--timeout)."""
        self.retries: int = pick("retries", DEFAULT_RETRIES)
        self.mdp_version: str = pick("mdp_version", "0.2")
        self.curve_secret_key: str | None = pick("curve_secret_key", None)
        self.curve_server_key: str | None = pick("curve_server_key", None)
        self._socket_options = curve_socket_options(self.curve_secret_key, self.curve_server_key)
        self._key_set_checked = bool(self._socket_options)

    @property
    def brokers(self) -> list[str]:
        """The -a endpoints, or the default endpoint (resolved only when a broker is needed:
        --embedded needs none)."""
        if not self._brokers:
            self._brokers = [default_endpoint_or_fail()]
        return self._brokers

    @property
    def socket_options(self) -> list[tuple[int, int | bytes]]:
        """CURVE from the key options, else from the key set of `mdp-keys init`, else none."""
        if not self._key_set_checked:
            self._socket_options, _ = key_set_peer_options("client")
            self._key_set_checked = True
        return self._socket_options

    def client(self, brokers: Sequence[str] | None = None, *, local: bool = False) -> Client:
        """A Client for the given brokers; `local` (the embedded broker) skips CURVE."""
        return Client(
            list(brokers or self.brokers),
            version=self.mdp_version,
            timeout=self.silence_limit,
            retries=self.retries,
            socket_options=[] if local else self.socket_options,
        )


@click.group(
    invoke_without_command=True,
    context_settings=CONTEXT,
    help=MAIN_HELP,
    subcommand_metavar="[services | workers | ping SERVICE]",
)
@click.option(
    "-f",
    "--file",
    "path",
    metavar="FILE",
    envvar="MDP_CLIENT_FILE",
    show_envvar=True,
    help="Commands file (JSON: one command or a list); - reads standard input.",
)
@connection_options
@click.option(
    "--parallel",
    type=click.IntRange(min=1, max=1000),
    default=16,
    show_default=True,
    envvar="MDP_CLIENT_PARALLEL",
    show_envvar=True,
    help="How many commands may run at once.",
)
@click.option(
    "--stream",
    is_flag=True,
    envvar="MDP_CLIENT_STREAM",
    show_envvar=True,
    help="Show output live as it arrives, each line prefixed by its command.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    envvar="MDP_CLIENT_JSON",
    show_envvar=True,
    help="Print one JSON document with every result (nothing else on stdout).",
)
@click.option(
    "--jsonl",
    "as_jsonl",
    is_flag=True,
    envvar="MDP_CLIENT_JSONL",
    show_envvar=True,
    help="Print one JSON object per command as it finishes (nothing else on stdout).",
)
@click.option(
    "--retry-started",
    is_flag=True,
    envvar="MDP_CLIENT_RETRY_STARTED",
    show_envvar=True,
    help="Re-send a command that went silent after it started (same request_id: a worker "
    "that already ran it answers from its cache; another worker would run it again, and the "
    "result then names every worker that ran it).",
)
@click.option(
    "--detach",
    is_flag=True,
    envvar="MDP_CLIENT_DETACH",
    show_envvar=True,
    help="On Ctrl-C/SIGTERM, leave the commands that started running on their workers "
    "(by default they are cancelled: their process groups are killed).",
)
@click.option(
    "--max-msg-size",
    type=click.IntRange(min=1024),
    default=DEFAULT_MAX_MSG_SIZE,
    show_default=True,
    envvar="MDP_CLIENT_MAX_MSG_SIZE",
    show_envvar=True,
    metavar="BYTES",
    help="The broker's message limit (its --max-msg-size): a command whose request is larger "
    "is refused before anything is sent (exit 65).",
)
@click.option(
    "--host",
    "hosts",
    multiple=True,
    metavar="NAME|GLOB",
    help="Run each command on the named worker (its --name) alone, through SERVICE@NAME; a "
    "glob ('web-*') runs it on every matching worker. Repeatable. Names are resolved with "
    "mmi.workers: one that matches nothing is an error (exit 68), nothing is sent.",
)
@click.option(
    "--all",
    "every_host",
    is_flag=True,
    help="Run each command on every named worker the broker knows (one result per host and "
    "command; the summary counts hosts ok/failed/timeout/unreachable).",
)
@click.option(
    "--embedded",
    is_flag=True,
    envvar="MDP_CLIENT_EMBEDDED",
    show_envvar=True,
    help="Start a broker and one worker per needed service inside this process, run FILE, "
    "exit. Needs no other process; -a is ignored.",
)
@click.version_option(__version__, "-V", "--version", prog_name=PROG)
@click.pass_context
def main(
    ctx: click.Context,
    /,
    path: str | None,
    parallel: int,
    stream: bool,
    as_json: bool,
    as_jsonl: bool,
    retry_started: bool,
    detach: bool,
    max_msg_size: int,
    hosts: tuple[str, ...],
    every_host: bool,
    embedded: bool,
    **params: Any,
) -> None:
    connection = Connection(params)
    ctx.obj = connection
    if ctx.invoked_subcommand is not None:
        from_env = ctx.get_parameter_source("path") is click.core.ParameterSource.ENVIRONMENT
        if path is not None and not from_env:
            raise click.UsageError(
                f"-f/--file runs commands; it cannot go with {ctx.invoked_subcommand!r}"
            )
        return
    if path is None:
        raise click.UsageError(
            "give a commands file with -f FILE (or -f - for stdin), or a subcommand"
        )
    if as_json and as_jsonl:
        raise click.UsageError("--json and --jsonl exclude each other")
    if stream and (as_json or as_jsonl):
        raise click.UsageError("--stream shows output for humans; it cannot go with --json/--jsonl")
    if hosts and every_host:
        raise click.UsageError("--host and --all exclude each other")
    if (hosts or every_host) and embedded:
        raise click.UsageError("--host/--all need a broker with named workers, not --embedded")
    try:
        specs = load_commands(path)
    except InputError as exc:
        for problem in exc.problems:
            click.echo(f"{PROG}: {problem}", err=True)
        sys.exit(exc.exit_code)
    mode = "json" if as_json else "jsonl" if as_jsonl else "human"
    if mode == "human" and len(specs) == 1 and sys.stdout.isatty():
        stream = True  # one command on a terminal: show its output as it comes
    too_big = oversized(specs, max_msg_size)
    if too_big:
        for problem in too_big:
            click.echo(f"{PROG}: {problem}", err=True)
        sys.exit(ExitCode.DATA_ERROR)
    settings = RunSettings(
        parallel=parallel, retry_started=retry_started, stream=stream, detach=detach
    )
    target = Target(hosts, every_host) if hosts or every_host else None
    sys.exit(_run_sync(_run_file(specs, connection, settings, mode, embedded, target)))


class _Terminated(KeyboardInterrupt):
    """SIGTERM, taken the way Ctrl-C is: unwinding cancels every task, so the commands an
    embedded worker runs are killed with their process groups instead of outliving us."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise _Terminated


def _run_sync(coroutine: Any) -> int:
    previous = signal.signal(signal.SIGTERM, _on_sigterm)  # until the event loop runs
    try:
        return int(asyncio.run(_cancellable(coroutine)))
    except _Terminated:
        click.echo(f"{PROG}: terminated", err=True)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        click.echo(f"{PROG}: interrupted", err=True)
        return 128 + signal.SIGINT
    finally:
        signal.signal(signal.SIGTERM, previous)


async def _cancellable(coroutine: Any) -> Any:
    """Run `coroutine` with SIGTERM cancelling it the way asyncio's Ctrl-C does, so that its
    cleanup (cancelling the commands it started) runs on the event loop; then _Terminated."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    terminated = False

    def on_sigterm() -> None:
        nonlocal terminated
        if terminated:  # a second SIGTERM: leave at once
            raise _Terminated
        terminated = True
        task.cancel()

    loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    try:
        return await coroutine
    except asyncio.CancelledError:
        if terminated:
            raise _Terminated from None
        raise
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


async def _run_file(
    specs: list[CommandSpec],
    connection: Connection,
    settings: RunSettings,
    mode: str,
    embedded: bool,
    target: Target | None = None,
) -> int:
    async with _brokers(connection, specs, embedded, settings.parallel) as brokers:
        if brokers is None:
            return ExitCode.UNAVAILABLE
        client = connection.client(brokers, local=embedded)
        try:
            if target is not None:
                addressed = await _addressed(client, connection, specs, target)
                if isinstance(addressed, int):
                    return addressed
                specs = addressed
            try:
                warnings = await check_services(client, [spec.command_type for spec in specs])
            except ServiceCheckFailed as exc:
                for problem in exc.problems:
                    click.echo(f"{PROG}: {problem}", err=True)
                return ExitCode.UNAVAILABLE
            for warning in warnings:
                click.echo(f"{PROG}: warning: {warning}", err=True)
            report = _report(mode, specs, settings.stream)
            start = time.monotonic()
            active = Active()
            try:
                with report:
                    outcomes = await run_commands(client, specs, settings, report, active)
            except asyncio.CancelledError:
                if active.cancelled:
                    done = ", ".join(f"[{i}] {o}" for i, o in sorted(active.cancelled.items()))
                    click.echo(f"{PROG}: cancelled on their workers: {done}", err=True)
                raise
            report.close(outcomes, time.monotonic() - start)
            return exit_code_for(outcomes)
        finally:
            client.close()


@dataclass(frozen=True)
class Target:
    """--host patterns or --all."""

    hosts: tuple[str, ...]
    every: bool


async def _addressed(
    client: Client, connection: Connection, specs: list[CommandSpec], target: Target
) -> list[CommandSpec] | int:
    """The commands addressed to every host the target selects, or the exit code that ends
    the run before anything is sent (68 no such host, 69 no broker, 1 no mmi.workers)."""
    from clients.fleet import UnknownHost, address, resolve_hosts

    try:
        await _reachable(client)
        hosts, _ = await resolve_hosts(client, target.hosts, target.every)
    except UnknownHost as exc:
        click.echo(f"{PROG}: {exc}", err=True)
        return ExitCode.NO_HOST
    except RequestTimeout:
        _no_broker(connection)
    except MMINotImplemented:
        click.echo(f"{PROG}: the broker does not implement mmi.workers", err=True)
        return ExitCode.FAILED
    except MDPError as exc:
        click.echo(f"{PROG}: bad mmi.workers answer: {exc}", err=True)
        return ExitCode.FAILED
    return address(specs, hosts)


@asynccontextmanager
async def _brokers(
    connection: Connection, specs: list[CommandSpec], embedded: bool, parallel: int
) -> AsyncIterator[list[str] | None]:
    """The broker endpoints to use: the given ones, or an embedded broker's (None: failed)."""
    if not embedded:
        yield connection.brokers
        return
    from clients.embedded import EmbeddedError, embedded_system

    try:
        async with embedded_system([spec.command_type for spec in specs], parallel) as system:
            yield [system.endpoint]
    except EmbeddedError as exc:
        click.echo(f"{PROG}: {exc}", err=True)
        yield None


def _report(mode: str, specs: list[CommandSpec], stream: bool) -> Report:
    if mode == "json":
        return JsonReport()
    if mode == "jsonl":
        return JsonLinesReport()
    err = QuietConsole(stderr=True, highlight=False)
    return HumanReport(specs, stream=stream, progress=err.is_terminal, err=err)


# ---------------------------------------------------------------------------------------------
# Subcommands


@main.command(
    context_settings=CONTEXT,
    epilog="Exit codes: 0 ok; 69 no broker answered; 1 the broker has no mmi.services.",
)
@connection_options
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
@click.pass_obj
def services(parent: Connection, /, as_json: bool, **params: Any) -> None:
    """List the services the broker knows, with their workers and queued requests (mmi.services)."""
    connection = Connection(params, parent)

    async def ask() -> int:
        found = await _ask_mmi(connection, "mmi.services", lambda client: client.services())
        if found.unauthenticated:
            click.echo(
                f"{PROG}: warning: the broker accepts unauthenticated peers on "
                f"{', '.join(found.unauthenticated)} (--insecure): anyone who can reach it "
                "can run commands and register workers",
                err=True,
            )
        if as_json:
            import json

            click.echo(json.dumps([s.to_map() for s in found]))
            return 0
        console = Console(highlight=False)
        if not found:
            console.print("no services registered")
            return 0
        table = Table("service", "workers", "queued", box=None)
        for service in sorted(found, key=lambda s: s.name):
            table.add_row(service.name, str(service.workers), str(service.queued))
        console.print(table)
        return 0

    sys.exit(_run_sync(ask()))


@main.command(
    context_settings=CONTEXT,
    epilog="Exit codes: 0 ok; 69 no broker answered; 1 the broker has no mmi.workers.",
)
@connection_options
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
@click.pass_obj
def workers(parent: Connection, /, as_json: bool, **params: Any) -> None:
    """List the workers the broker knows, by name (mmi.workers): services, protocol version,
    busy or idle, requests in flight, connections, and seconds since the broker last heard from
    each. A worker that stops answering shows a growing "last heard" until it expires."""
    connection = Connection(params, parent)

    async def ask() -> int:
        found = await _ask_mmi(connection, "mmi.workers", lambda client: client.workers())
        if as_json:
            import json

            click.echo(json.dumps([w.to_map() for w in found]))
            return 0
        console = Console(highlight=False)
        if not found:
            console.print("no workers registered")
            return 0
        table = Table(
            "worker", "state", "in flight", "conns", "last heard", "version", "services", box=None
        )
        for w in found:
            table.add_row(
                w.name,
                "busy" if w.busy else "idle",
                str(w.in_flight),
                str(w.connections),
                f"{w.last_heard:.1f}s",
                w.version,
                " ".join(w.services),
            )
        console.print(table)
        return 0

    sys.exit(_run_sync(ask()))


@main.command(
    context_settings=CONTEXT,
    epilog="Exit codes: 0 the service has a worker; 69 it has none, or no broker answered.",
)
@click.argument("service")
@connection_options
@click.pass_obj
def ping(parent: Connection, /, service: str, **params: Any) -> None:
    """Ask the broker whether SERVICE has at least one worker (mmi.service, RFC 8)."""
    connection = Connection(params, parent)

    async def ask() -> int:
        client = connection.client()
        start = time.monotonic()
        try:
            await _reachable(client)
            found = await client.service_exists(service)
        except RequestTimeout:
            _no_broker(connection)
        except MDPError as exc:
            _fail(f"bad mmi.service answer: {exc}", ExitCode.FAILED)
        finally:
            client.close()
        ms = (time.monotonic() - start) * 1000
        if found:
            click.echo(f"{service}: available (200 in {ms:.1f} ms)")
            return 0
        click.echo(f"{service}: unknown to the broker, no worker registered (404 in {ms:.1f} ms)")
        return ExitCode.UNAVAILABLE

    sys.exit(_run_sync(ask()))


async def _ask_mmi(
    connection: Connection, service: str, call: Callable[[Client], Awaitable[T]]
) -> T:
    """One MMI query (`call`, naming `service` in errors) with the CLI's answers to failure:
    exit 69 when no broker answers, 1 when the broker lacks the service or answers badly."""
    client = connection.client()
    try:
        await _reachable(client)
        return await call(client)
    except RequestTimeout:
        _no_broker(connection)
    except MMINotImplemented:
        _fail(f"the broker does not implement {service}", ExitCode.FAILED)
    except MDPError as exc:
        _fail(f"bad {service} answer: {exc}", ExitCode.FAILED)
    finally:
        client.close()


async def _reachable(client: Client) -> None:
    """Exit 69 at once, saying why, when no broker endpoint can be reached at all."""
    gone = await client.unreachable()
    if gone and len(gone) == len(client.endpoints):
        for endpoint, why in gone.items():
            click.echo(f"{PROG}: cannot reach the broker at {endpoint}: {why}", err=True)
        client.close()
        sys.exit(ExitCode.UNAVAILABLE)


def _no_broker(connection: Connection) -> NoReturn:
    tries = connection.retries + 1
    _fail(
        f"no broker answered at {', '.join(connection.brokers)} "
        f"({tries} attempt{'s' if tries > 1 else ''}, {connection.silence_limit:g} s each)",
        ExitCode.UNAVAILABLE,
    )


# The job subcommands (submit, status, jobs, wait, result, logs, cancel, rerun) live in their
# own module; imported last because they build on the pieces above.
from clients.jobs_cli import register as _register_job_commands  # noqa: E402

_register_job_commands(main)
