"""`mdp-jobs`: the durable job service (`spec/jobs.md`). Parses options, opens the store, runs
the manager until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import ClassVar
from urllib.parse import urlsplit, urlunsplit

import click

from mdp import __version__, logs
from mdp.cli_options import (
    curve_socket_options,
    default_endpoint_or_fail,
    endpoint_callback,
    heartbeat_options,
    log_options,
)
from services.cli import ByteSize
from services.jobs.manager import JobManager, Settings
from services.jobs.store import StoreCorrupt, StoreError, open_store

__all__ = ["EXIT_UNUSABLE_DB", "default_db", "main"]

log = logging.getLogger("mdp.jobs")

EXIT_UNUSABLE_DB = 78  # EX_CONFIG
DAY = 86_400.0

CONTEXT = {
    "help_option_names": ["-h", "--help"],
    "auto_envvar_prefix": "MDP_JOBS",
    "max_content_width": 100,
}


def default_db() -> Path:
    """$XDG_STATE_HOME/mdp/jobs.sqlite3 (XDG_STATE_HOME defaults to ~/.local/state)."""
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "mdp" / "jobs.sqlite3"


class Duration(click.ParamType):  # type: ignore[type-arg]  # generic only in click >= 8.2
    """A duration: 90, 90s, 15m, 12h, 7d (seconds when no unit)."""

    name = "DURATION"
    _UNITS: ClassVar[dict[str, float]] = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": DAY}

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, int | float):
            return float(value)
        text = str(value).strip().lower()
        unit = text[-1:] if text[-1:] in self._UNITS and not text[-1:].isdigit() else ""
        number = text[: len(text) - len(unit)]
        try:
            seconds = float(number) * self._UNITS[unit]
        except ValueError:
            self.fail(f"{value!r} is not a duration like 90, 90s, 15m, 12h or 7d", param, ctx)
        if seconds <= 0:
            self.fail(f"{value!r} must be positive", param, ctx)
        return seconds


EPILOG = """\b
Exit codes:
  0   stopped by SIGINT/SIGTERM (running commands go on; the next start re-attaches them)
  2   usage error
  78  the database cannot be used: corrupt, not a job store, newer schema, or unreadable
      (the file is left untouched)
"""


@click.command(context_settings=CONTEXT, epilog=EPILOG)
@click.option(
    "-b",
    "--broker",
    default=None,
    show_envvar=True,
    metavar="ENDPOINT",
    callback=endpoint_callback(),
    help="The broker's ZeroMQ endpoint: jobs.* are served there and jobs are sent through it. "
    "Default: this user's broker on this machine, ipc://$XDG_RUNTIME_DIR/mdp/broker.sock (see "
    "mdp-broker --help).",
)
@click.option(
    "--also-broker",
    multiple=True,
    show_envvar=True,
    metavar="ENDPOINT",
    callback=endpoint_callback(),
    help="Serve jobs.* and titanic.* on this broker too (repeatable), so clients of any of "
    "several brokers reach this job service. Jobs are still sent through --broker; re-attaching "
    "to a run, looking up a request_id and cancelling go through any of them.",
)
@click.option(
    "--db",
    default=None,
    show_envvar=True,
    metavar="PATH|URL",
    help="The job database: an SQLite file (created with its directory if missing), or "
    "postgresql://USER@HOST:PORT/DBNAME to share one PostgreSQL database between several "
    "job services (the [postgres] extra; the schema is created and migrated on start). "
    "[default: $XDG_STATE_HOME/mdp/jobs.sqlite3, i.e. ~/.local/state/mdp/jobs.sqlite3]",
)
@click.option(
    "--name",
    default=None,
    show_envvar=True,
    help="This job service's name in the database: who holds the running jobs it follows. "
    "Give each job service sharing a PostgreSQL database its own, and keep it across "
    "restarts (a restart then takes its running jobs back at once). [default: host name]",
)
@click.option(
    "--lease",
    type=Duration(),
    default="10s",
    show_default=True,
    show_envvar=True,
    help="With a shared database: a running job's lease, renewed every third of it. When a "
    "job service dies, another takes its running jobs over this long after its last renewal.",
)
@click.option(
    "--keep",
    type=Duration(),
    default="7d",
    show_default=True,
    show_envvar=True,
    help="Finished jobs lose their output (chunks and final result) this long after they end.",
)
@click.option(
    "--keep-failed",
    type=Duration(),
    default="30d",
    show_default=True,
    show_envvar=True,
    help="The same for jobs that did not end ok (failed, timeout, error, lost, ...).",
)
@click.option(
    "--keep-records",
    type=Duration(),
    default="30d",
    show_default=True,
    show_envvar=True,
    help="Finished jobs lose their record this long after they end (a tombstone remains, so "
    "lookups say 'expired'); failures not before --keep-failed.",
)
@click.option(
    "--keep-tombstones",
    type=Duration(),
    default="365d",
    show_default=True,
    show_envvar=True,
    help="Tombstones go after this long; their ids then look 'unknown'.",
)
@click.option(
    "--purge-interval",
    type=Duration(),
    default="60s",
    show_default=True,
    show_envvar=True,
    help="How often retention runs (in batches of --purge-batch rows per transaction).",
)
@click.option(
    "--purge-batch",
    type=click.IntRange(1, 100_000),
    default=200,
    show_default=True,
    show_envvar=True,
    help="Rows per retention transaction.",
)
@click.option(
    "--max-log",
    type=ByteSize(),
    default="8M",
    show_default=True,
    show_envvar=True,
    help="Output stored per job as numbered chunks (K/M/G); beyond it chunks are dropped and "
    "the job says output.truncated (the final result still holds the worker's capped output).",
)
@click.option(
    "--dispatch-timeout",
    type=Duration(),
    default="30s",
    show_default=True,
    show_envvar=True,
    help="Each dispatch must start by now + this (start_by); a job whose target is silent "
    "that long (plus 1 s of clock skew) goes back to the queue.",
)
@click.option(
    "--liveness-timeout",
    type=Duration(),
    default="15s",
    show_default=True,
    show_envvar=True,
    help="A running job silent this long (the command service sends progress every 2 s) is "
    "re-attached through its worker's duplicate protection, or else reported lost.",
)
@click.option(
    "--submit-connections",
    type=click.IntRange(1, 1024),
    default=32,
    show_default=True,
    show_envvar=True,
    help="Connections for jobs.submit (how many submits are committed together at most).",
)
@click.option(
    "--read-connections",
    type=click.IntRange(1, 1024),
    default=8,
    show_default=True,
    show_envvar=True,
    help="Connections for each other service (status, result, logs, cancel, list, titanic.*).",
)
@heartbeat_options(
    "Heartbeat interval; must match the broker's --heartbeat-ms.",
    "The broker is presumed dead after heartbeat x liveness of silence. Must match the "
    "broker's --liveness.",
)
@click.option(
    "--curve-secret-key",
    type=click.Path(dir_okay=False),
    default=None,
    show_envvar=True,
    metavar="FILE",
    help="This program's CURVE key pair (NAME.key_secret); the broker must list its public key "
    "in --allow-workers and --allow-clients (it is both).",
)
@click.option(
    "--curve-server-key",
    type=click.Path(dir_okay=False),
    default=None,
    show_envvar=True,
    metavar="FILE",
    help="The broker's CURVE public key (NAME.key).",
)
@log_options("INFO logs start, stop, retention and cancels; DEBUG every frame.")
@click.version_option(__version__, "-V", "--version", prog_name="mdp-jobs")
def main(
    broker: str | None,
    also_broker: tuple[str, ...],
    db: str | None,
    name: str | None,
    lease: float,
    keep: float,
    keep_failed: float,
    keep_records: float,
    keep_tombstones: float,
    purge_interval: float,
    purge_batch: int,
    max_log: int,
    dispatch_timeout: float,
    liveness_timeout: float,
    submit_connections: int,
    read_connections: int,
    heartbeat_ms: int,
    liveness: int,
    curve_secret_key: str | None,
    curve_server_key: str | None,
    log_level: str,
    log_json: bool,
) -> None:
    """Run the durable job service: jobs.* and RFC 9 titanic.* on an MDP broker.

    Clients submit jobs (mdp-client submit); mdp-jobs commits each one to its database before
    it answers, sends it to the target service (os, shell, any) when a worker is free, and
    keeps its state, output and result for status, logs, wait and result lookups. A job
    that started is never run again automatically; after a restart, running jobs are
    re-attached through their worker. Titanic (RFC 9) clients work unchanged.

    Every option can also be set from an environment variable, shown in brackets. The
    services and guarantees are described in spec/jobs.md.

    \b
    Examples:
      mdp-jobs --broker tcp://127.0.0.1:5555
      mdp-jobs --db /var/lib/mdp/jobs.sqlite3 --keep 2d --keep-failed 14d
      mdp-jobs --broker tcp://b1:5555 --also-broker tcp://b2:5555 --name jobs-a \\
               --db postgresql://mdp@db.example/mdp
    """
    logs.configure(log_level, log_json)
    if log_level.upper() != "DEBUG":
        # ~100 worker connections would each log their registration and reconnections.
        logging.getLogger("mdp.worker").setLevel(logging.WARNING)
    socket_options = curve_socket_options(curve_secret_key, curve_server_key)
    if broker is None:
        broker = default_endpoint_or_fail()
    try:
        settings = Settings(
            broker=broker,
            heartbeat_interval=heartbeat_ms / 1000,
            liveness=liveness,
            socket_options=socket_options,
            submit_connections=submit_connections,
            read_connections=read_connections,
            dispatch_timeout=dispatch_timeout,
            liveness_timeout=liveness_timeout,
            max_log=max_log,
            keep=keep,
            keep_failed=keep_failed,
            keep_records=keep_records,
            keep_tombstones=keep_tombstones,
            purge_interval=purge_interval,
            purge_batch=purge_batch,
            lease=lease,
            also_serve_on=also_broker,
            name=name or socket.gethostname(),
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    location = db or str(default_db())
    try:
        asyncio.run(serve(location, settings))
    except (StoreCorrupt, StoreError) as exc:
        click.echo(f"mdp-jobs: {exc}", err=True)
        sys.exit(EXIT_UNUSABLE_DB)
    except KeyboardInterrupt:  # before the signal handlers were installed
        sys.exit(130)
    log.info("stopped")
    sys.exit(0)


async def serve(location: str, settings: Settings) -> None:
    """Open the store, run a manager until SIGINT/SIGTERM, close the store."""
    store = open_store(location)
    await store.open()
    try:
        manager = JobManager(store, settings)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, manager.stop)
        log.info(
            "job store %s as %r (pid %d)", _without_password(location), settings.name, os.getpid()
        )
        await manager.run()
    finally:
        await store.close()


def _without_password(location: str) -> str:
    """A database URL fit for logs: any password replaced by ***."""
    parts = urlsplit(location)
    if parts.password is None:
        return location
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))
