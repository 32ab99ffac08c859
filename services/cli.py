"""`mdp-worker`: host one or more services on an MDP broker. Parses options, builds, runs."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sys
from pathlib import Path
from typing import ClassVar

import click

from mdp import __version__, logs
from mdp.cli_options import (
    curve_options,
    curve_socket_options,
    default_endpoint_or_fail,
    endpoint_callback,
    heartbeat_options,
    key_set_peer_options,
    log_options,
    metrics_option,
    start_metrics,
)
from mdp.endpoints import PrivateDirError, unauthenticated_endpoints
from mdp.protocol import Version
from mdp.worker import Capacity, WorkerOptions, serve
from services.bodies import DEFAULT_MAX_RUN_LIMIT, DEFAULT_RUN_LIMIT
from services.command import (
    CommandService,
    CommandSettings,
    default_worker_name,
    validate_worker_name,
)
from services.execution import Limits
from services.policy import ChildLimits, CommandPolicy
from services.registry import BUILTIN, ServiceSpecError, control_services, load_services
from services.watchdog import Watchdog, default_state_dir, reap_leftovers

CONTEXT = {
    "help_option_names": ["-h", "--help"],
    "auto_envvar_prefix": "MDP_WORKER",
    "max_content_width": 100,
}

log = logging.getLogger("mdp.worker")

COMMAND_SERVICES = frozenset({"os", "shell"})
"""The built-in services that run whatever command a client sends (see --allow-root)."""


class ByteSize(click.ParamType):  # type: ignore[type-arg]  # generic only in click >= 8.2
    """A number of bytes: 1048576, 512K, 1M, 1MiB, 2G (powers of 1024)."""

    name = "BYTES"
    _UNITS: ClassVar[dict[str, int]] = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> int:
        if isinstance(value, int):
            return value
        match = re.fullmatch(r"\s*(\d+)\s*([kmg]?)(?:i?b)?\s*", str(value), re.IGNORECASE)
        if match is None:
            self.fail(f"{value!r} is not a size like 1048576, 512K or 1M", param, ctx)
        return int(match[1]) * self._UNITS[match[2].lower()]


@click.command(context_settings=CONTEXT)
@click.option(
    "-s",
    "--service",
    "services",
    multiple=True,
    required=True,
    metavar="NAME",
    envvar="MDP_WORKER_SERVICE",
    show_envvar=True,
    help="Service to host: os (run commands directly), shell (through /bin/sh), echo, or a "
    "user service as module:function or NAME=module:function. Repeat for several services "
    "(in the environment variable: separated by spaces).",
)
@click.option(
    "-b",
    "--broker",
    "brokers",
    multiple=True,
    show_envvar=True,
    metavar="ENDPOINT",
    callback=endpoint_callback(),
    help="The broker's ZeroMQ endpoint (tcp://HOST:PORT, ipc://PATH). Default: the broker of "
    "this user on this machine, ipc://$XDG_RUNTIME_DIR/mdp/broker.sock (see mdp-broker --help). "
    "Repeat it to serve through several brokers at once (a full set of connections on each; "
    'see README "Several brokers"); --concurrency still bounds the total.',
)
@click.option(
    "-c",
    "--concurrency",
    type=click.IntRange(1, 1024),
    default=1,
    show_default=True,
    show_envvar=True,
    help="How many commands this process runs at once, in total: over all its services and "
    "all its brokers. MDP gives a connection one request at a time, so each service gets this "
    "many connections per broker, and a request that finds every slot taken waits for one.",
)
@click.option(
    "--name",
    default=None,
    show_envvar=True,
    metavar="NAME",
    help="This worker's name (1-64 of A-Z a-z 0-9 . _ -). For each command service it also "
    "registers SERVICE@NAME, which reaches this worker alone (mdp-client --host, cancel). A name "
    "given here is exclusive: a broker refuses a second process under it. [default: the host "
    "name, shared by every worker of the host started without --name]",
)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False),
    default=None,
    show_envvar=True,
    metavar="DIR",
    help="Where the watchdog records the process groups of running commands, so that none "
    "outlives this worker, even after SIGKILL. [default: $XDG_RUNTIME_DIR/mdp, else "
    "/tmp/mdp-UID]",
)
@click.option(
    "--max-run-limit",
    "--max-timeout",
    "max_run_limit",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_MAX_RUN_LIMIT,
    show_default=True,
    envvar="MDP_WORKER_MAX_TIMEOUT",
    show_envvar=True,
    metavar="SECONDS",
    help='No command runs longer than this, whatever run limit ("timeout") its request asks for.',
)
@click.option(
    "--default-run-limit",
    "--default-timeout",
    "default_run_limit",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_RUN_LIMIT,
    show_default=True,
    envvar="MDP_WORKER_DEFAULT_TIMEOUT",
    show_envvar=True,
    metavar="SECONDS",
    help='Run limit of a command whose request gives no "timeout" (capped by --max-run-limit).',
)
@click.option(
    "--max-output",
    type=ByteSize(),
    default="1M",
    show_default=True,
    show_envvar=True,
    help="Bytes of stdout, and of stderr, kept per command (K/M/G = KiB/MiB/GiB). The rest is "
    "read and discarded, and the result says truncated.",
)
@click.option(
    "--progress-interval",
    type=click.FloatRange(min=0.01),
    default=2.0,
    show_default=True,
    show_envvar=True,
    metavar="SECONDS",
    help="A silent command sends a progress PARTIAL this often (MDP/0.2).",
)
@click.option(
    "--mdp-version",
    type=click.Choice([v.value for v in Version]),
    default=Version.V02.value,
    show_default=True,
    show_envvar=True,
    help="0.2 (RFC 18) streams PARTIALs; 0.1 (RFC 7) sends only the final reply.",
)
@heartbeat_options(
    "Heartbeat interval; must match the broker's --heartbeat-ms.",
    "The broker is presumed dead after heartbeat x liveness of silence; the worker then "
    "reconnects (backing off up to 4 s). Must match the broker's --liveness.",
)
@click.option(
    "--grace",
    type=click.FloatRange(min=0),
    default=10.0,
    show_default=True,
    show_envvar=True,
    metavar="SECONDS",
    help="On SIGINT/SIGTERM, how long running requests may still take before they are "
    "cancelled (a second signal cancels them at once).",
)
@log_options("INFO logs registrations, reconnections and one line per command; DEBUG every frame.")
@curve_options("worker")
@click.option(
    "--allow",
    "allow",
    multiple=True,
    metavar="PATTERN",
    show_envvar=True,
    help="Only run commands matching this fnmatch pattern (repeatable; in the environment "
    "variable: separated by spaces): the program for os (a pattern without / matches only a "
    "bare name looked up in PATH), the first word for shell (whose script may then not "
    "contain ; & | ` $( < > or newlines). Requests outside get status rejected, and may not "
    "set PATH, LD_*, PYTHON*... in env. Default: everything. See spec/security.md.",
)
@click.option(
    "--deny-env",
    is_flag=True,
    show_envvar=True,
    help="Reject (status rejected) requests that carry environment variables. Commands always "
    "start from a minimal environment (PATH, HOME, LANG), never the worker's own.",
)
@click.option(
    "--user",
    default=None,
    metavar="NAME",
    show_envvar=True,
    help="Run commands as this user (its uid, gid and groups). The worker must be started as root.",
)
@click.option(
    "--allow-root",
    is_flag=True,
    show_envvar=True,
    help="Started as root without --user, run os/shell commands as root anyway. Without it "
    "such a worker refuses to start: whoever can reach the broker as a client would get a "
    "root shell.",
)
@click.option(
    "--max-memory",
    type=ByteSize(),
    default=None,
    show_envvar=True,
    help="Address-space limit of each command (RLIMIT_AS, set in the child; K/M/G = "
    "KiB/MiB/GiB): a command that asks for more fails at once instead of exhausting the "
    "machine. Leave room for the program itself (Python needs some tens of MB).",
)
@click.option(
    "--max-procs",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    show_envvar=True,
    help="Process limit (RLIMIT_NPROC, set in the child). The kernel counts all processes of "
    "the user the command runs as, so use it with --user and a dedicated account.",
)
@metrics_option("the commands it runs")
@click.version_option(__version__, "-V", "--version", prog_name="mdp-worker")
def main(
    services: tuple[str, ...],
    brokers: tuple[str, ...],
    concurrency: int,
    max_run_limit: float,
    default_run_limit: float,
    max_output: int,
    progress_interval: float,
    mdp_version: str,
    heartbeat_ms: int,
    liveness: int,
    grace: float,
    log_level: str,
    log_json: bool,
    curve_secret_key: str | None,
    curve_server_key: str | None,
    allow: tuple[str, ...],
    deny_env: bool,
    user: str | None,
    allow_root: bool,
    max_memory: int | None,
    max_procs: int | None,
    name: str | None,
    state_dir: str | None,
    metrics_bind: str | None,
) -> None:
    """Host services on an MDP broker: run the commands clients send to "os" and "shell".

    \b
    Built-in services:
      os      runs [command_name, *parameters] directly; no shell sees the arguments
      shell   runs command_name with /bin/sh -c; each parameter is passed to it as one
              word ("$@"), never parsed by the shell
      echo    replies with the request body (for tests and benchmarks)

    Each command runs in its own process group with a minimal environment (PATH, HOME,
    LANG=C.UTF-8, plus the request's env). When its run limit passes, or on cancel, the whole
    group gets SIGTERM, then SIGKILL. Output is kept as bytes, capped per stream. Results of
    requests with a request_id are remembered, so a retried request is never run twice by this
    process; a request that arrives after its start deadline is answered "expired" and never runs. A
    watchdog process ends the commands of a worker that dies, however it dies. The body
    format and these guarantees are described in spec/command-service.md.

    Every option can also be set from an environment variable, shown in brackets (for
    example MDP_WORKER_CONCURRENCY=4). SIGINT or SIGTERM stops taking requests, lets running
    ones finish (see --grace), sends DISCONNECT and exits 0.

    With no --broker, the worker connects to this user's broker on this machine (a private
    ipc:// socket no other user can reach). With no key option but a key set made by
    `mdp-keys init`, it uses CURVE with that key set's worker key (spec/security.md).

    Started as root, a worker hosting os or shell refuses to start unless --user NAME says
    whom to run commands as, or --allow-root says root is meant.

    \b
    Examples:
      mdp-worker --service shell --service os
      mdp-worker -s echo --broker tcp://10.0.0.5:5555 --concurrency 8
      mdp-worker -s upper=mypackage.handlers:upper
    """
    logs.configure(log_level, log_json)
    try:
        worker_name = validate_worker_name(name) if name is not None else default_worker_name()
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--name'") from None
    socket_options = curve_socket_options(curve_secret_key, curve_server_key)
    keys_from = "--curve-secret-key" if socket_options else None
    if not socket_options:
        socket_options, keys_from = key_set_peer_options("worker")
    if not brokers:
        brokers = (default_endpoint_or_fail(),)
    child = ChildLimits(max_memory=max_memory, max_procs=max_procs, user=user)
    try:
        child.check_user()
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--user'") from None
    settings = CommandSettings(
        default_run_limit=default_run_limit,
        max_run_limit=max_run_limit,
        limits=Limits(max_output=max_output, progress_interval=progress_interval),
        policy=CommandPolicy(
            allow=tuple(word for value in allow for word in value.split()), deny_env=deny_env
        ),
        child=child,
        name=worker_name,
    )
    specs = [word for value in services for word in value.split()]
    try:
        hosted = load_services(specs, settings)
    except ServiceSpecError as exc:
        raise click.BadParameter(str(exc), param_hint="'--service'") from None
    as_root = sorted(COMMAND_SERVICES.intersection(specs)) if os.geteuid() == 0 else []
    if as_root and user is None and not allow_root:
        # A warning is not a control: it would run every client's command as root.
        raise click.UsageError(
            f"running as root, {' and '.join(as_root)} would run every command as root. Give "
            "--user NAME to run commands as that user (a dedicated account), or --allow-root "
            "if root is really meant (then anyone who can send to this service is root)."
        )
    directory: str | Path | None = state_dir
    try:
        directory = state_dir if state_dir is not None else default_state_dir()
        # A previous incarnation whose watchdog died too may have left commands running.
        reap_leftovers(directory)
        watchdog = Watchdog(directory)
    except (OSError, RuntimeError, PrivateDirError) as exc:
        raise click.BadParameter(
            f"cannot start the watchdog in {directory}: {exc}", param_hint="'--state-dir'"
        ) from None
    metrics = None
    if metrics_bind is not None:
        # Imported here: prometheus_client is a good part of the start-up time otherwise.
        from prometheus_client import CollectorRegistry

        from services.metrics import CommandMetrics

        registry = CollectorRegistry()
        metrics = CommandMetrics(registry)
        start_metrics(metrics_bind, registry)
    for service in hosted:
        if isinstance(service.handler, CommandService):
            service.handler.tracker = watchdog
            service.handler.metrics = metrics
    control = control_services(hosted)
    capacity = Capacity(concurrency)
    for service in hosted:
        if isinstance(service.handler, CommandService):
            service.handler.limit = capacity.slots
    brokers = tuple(dict.fromkeys(brokers))  # the same broker twice would split the name
    # Warnings only once every option is known to be good: a usage error says nothing else.
    for broker in brokers:
        if not socket_options and unauthenticated_endpoints([broker]):
            log.warning(
                "connecting to %s without CURVE: nothing is encrypted or authenticated "
                "(`mdp-keys init` makes keys the programs find)",
                broker,
            )
    if as_root and user is None:
        log.warning("--allow-root: %s commands run as root", " and ".join(as_root))
    options = WorkerOptions(
        broker=brokers[0],
        name=worker_name,
        # spec/mdp.md §5.1: an explicit --name is this process's alone; the default (the host
        # name) is shared by the workers of one host, which are then one host to --host.
        instance=os.urandom(4).hex() if name is not None else "host",
        version=Version(mdp_version),
        heartbeat_interval=heartbeat_ms / 1000,
        liveness=liveness,
        grace=grace,
        socket_options=socket_options,
    )
    log.info(
        "serving %s on %s as %r (MDP/%s, %d connection%s each, pid %d, watchdog pid %d, %s)",
        ", ".join(s.name for s in hosted),
        " and ".join(brokers),
        worker_name,
        mdp_version,
        concurrency,
        "" if concurrency == 1 else "s",
        os.getpid(),
        watchdog.pid,
        f"CURVE with {keys_from}" if keys_from else "no CURVE",
    )
    try:
        asyncio.run(
            serve(
                hosted,
                options,
                concurrency,
                control=control,
                brokers=brokers,
                # One more than the commands it may run, so a cancel always finds a connection.
                control_concurrency=concurrency + 1,
                capacity=capacity,
            )
        )
    except KeyboardInterrupt:  # before the signal handlers were installed
        sys.exit(130)
    finally:
        watchdog.close()
    log.info("stopped")
    sys.exit(0)


__all__ = ["BUILTIN", "main"]
