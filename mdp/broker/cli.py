"""`mdp-broker`: the command-line entry point. Parses options, builds the server, runs it."""

from __future__ import annotations

import logging
import sys

import click
import zmq

from mdp import __version__, logs
from mdp.broker.boundary import GroupError, check_group_reach, group_id, ipc_path
from mdp.broker.core import BrokerConfig
from mdp.broker.server import BrokerServer, InsecureBindError
from mdp.cli_options import (
    curve_options,
    default_endpoint_or_fail,
    endpoint_callback,
    heartbeat_options,
    log_options,
    metrics_option,
    start_metrics,
)
from mdp.protocol import DEFAULT_MAX_MSG_SIZE
from mdp.security import BrokerAuth, SecurityError
from mdp.security.keyset import find_key_set

log = logging.getLogger("mdp.broker")

CONTEXT = {"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "MDP_BROKER"}


@click.command(context_settings=CONTEXT)
@click.option(
    "--bind",
    "binds",
    envvar="MDP_BROKER_BIND",
    multiple=True,
    callback=endpoint_callback(bind=True),
    show_envvar=True,
    metavar="ENDPOINT",
    help="ZeroMQ endpoint to listen on (tcp://HOST:PORT, ipc://PATH). Repeat to listen on "
    "several. Default: ipc://$XDG_RUNTIME_DIR/mdp/broker.sock (or /tmp/mdp-UID/broker.sock), "
    "a socket only you can reach, where workers and clients look when given no endpoint. "
    "tcp:// needs keys (or --insecure).",
)
@click.option(
    "--group",
    default=None,
    show_envvar=True,
    metavar="NAME",
    help="Let members of group NAME connect to the ipc:// endpoints (socket mode 0660, group "
    "NAME), as Docker's docker group. Bind a socket in a directory they can enter, e.g. "
    "--bind ipc:///run/mdp/broker.sock: the default one is private.",
)
@heartbeat_options(
    "Heartbeat interval agreed with workers, in milliseconds.",
    "A worker silent for heartbeat x liveness is expired.",
)
@click.option(
    "--request-ttl",
    type=click.FloatRange(min=0, min_open=True),
    default=60.0,
    show_default=True,
    show_envvar=True,
    help="Seconds a request may wait for a worker before it is dropped.",
)
@click.option(
    "--max-queue",
    type=click.IntRange(min=1),
    default=10_000,
    show_default=True,
    show_envvar=True,
    help="Requests queued per service; beyond it new requests are dropped (and counted).",
)
@click.option(
    "--busy-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    show_envvar=True,
    help="Seconds of silence after which a worker holding a request is expired. Default: the "
    "normal heartbeat x liveness rule. Set it for third-party workers that cannot heartbeat "
    "while they handle a request (the zguide's, majortomo's).",
)
@click.option(
    "--max-msg-size",
    type=click.IntRange(min=1),
    default=DEFAULT_MAX_MSG_SIZE,
    show_default=True,
    show_envvar=True,
    help="Largest message accepted, in bytes; a peer sending more is disconnected by ZeroMQ.",
)
@log_options("INFO logs worker registrations and expiries; DEBUG also dumps every frame.")
@curve_options("broker")
@click.option(
    "--insecure",
    is_flag=True,
    show_envvar=True,
    help="Allow listening on tcp:// without CURVE, loopback included. Every user of this "
    "machine (and, beyond loopback, anyone who can reach the port) can then run commands on "
    "the workers; said at every start and in every mmi.services answer.",
)
@metrics_option("requests, services and workers")
@click.version_option(__version__, "-V", "--version", prog_name="mdp-broker")
def main(
    binds: tuple[str, ...],
    group: str | None,
    heartbeat_ms: int,
    liveness: int,
    request_ttl: float,
    max_queue: int,
    busy_timeout: float | None,
    max_msg_size: int,
    log_level: str,
    log_json: bool,
    curve_secret_key: str | None,
    allow_clients: str | None,
    allow_workers: str | None,
    insecure: bool,
    metrics_bind: str | None,
) -> None:
    """Route MDP requests from clients to workers by service name.

    One socket serves MDP/0.1 (RFC 7) and MDP/0.2 (RFC 18) clients and workers at once, and
    answers MMI (RFC 8) service discovery: mmi.service, and mmi.services (a msgpack list of
    services with worker counts and queue depth).

    Every option can also be set from an environment variable, shown in brackets (for example
    MDP_BROKER_HEARTBEAT_MS=1000). SIGINT or SIGTERM sends DISCONNECT to every worker and exits.

    Who can connect: with no --bind, only you (a unix socket in a directory only you can
    enter; see --group to share one). tcp://, loopback included, needs CURVE: --curve-secret-key
    with --allow-clients and --allow-workers, or, with none of them, the key set `mdp-keys init`
    made, which the broker then uses on every endpoint. Without keys it refuses tcp:// unless
    --insecure. See spec/security.md.

    \b
    Exit codes:
      0  stopped by SIGINT or SIGTERM
      1  cannot start: endpoint in use, tcp without keys, unusable keys or directory
      2  usage error

    \b
    Examples:
      mdp-broker
      mdp-keys init && mdp-broker --bind tcp://127.0.0.1:5555
      mdp-broker --bind tcp://0.0.0.0:5555 --curve-secret-key keys/broker.key_secret \\
          --allow-clients allowed/clients --allow-workers allowed/workers
      mdp-broker --bind ipc:///run/mdp/broker.sock --group mdp
    """
    logs.configure(log_level, log_json)
    endpoints = list(binds) or [default_endpoint_or_fail()]
    ipc_group = _group(group, endpoints)
    auth = _curve(curve_secret_key, allow_clients, allow_workers, insecure)
    config = BrokerConfig(
        heartbeat_interval=heartbeat_ms / 1000,
        liveness=liveness,
        request_ttl=request_ttl,
        max_queue=max_queue,
        busy_timeout=busy_timeout,
    )
    server = BrokerServer(
        endpoints,
        config,
        max_msg_size=max_msg_size,
        auth=auth,
        insecure=insecure,
        ipc_group=ipc_group,
    )
    try:
        server.bind()
    except (InsecureBindError, SecurityError, GroupError) as exc:
        raise click.ClickException(str(exc)) from None
    except zmq.ZMQError as exc:
        raise click.ClickException(f"cannot listen on {', '.join(endpoints)}: {exc}") from None
    if metrics_bind is not None:
        # Imported here: prometheus_client is a good part of the start-up time otherwise.
        from prometheus_client import CollectorRegistry

        from mdp.broker.metrics import BrokerCollector

        registry = CollectorRegistry()
        registry.register(BrokerCollector(server.core))
        start_metrics(metrics_bind, registry)
    server.serve(handle_signals=True)
    sys.exit(0)


def _curve(
    secret_key: str | None, clients: str | None, workers: str | None, insecure: bool
) -> BrokerAuth | None:
    """The broker's CURVE set-up from the options, else from the key set of `mdp-keys init`,
    or None when CURVE is off."""
    if secret_key is None:
        if clients is not None or workers is not None:
            raise click.UsageError("--allow-clients/--allow-workers need --curve-secret-key")
        return _curve_from_key_set(insecure)
    if clients is None or workers is None:
        raise click.UsageError(
            "--curve-secret-key needs both --allow-clients DIR and --allow-workers DIR "
            "(directories of public keys; see `mdp-keys allow --help`)"
        )
    if insecure:
        click.echo("mdp-broker: --insecure is ignored: CURVE is on", err=True)
    try:
        return BrokerAuth.from_files(secret_key, clients, workers)
    except SecurityError as exc:
        raise click.ClickException(str(exc)) from None


def _curve_from_key_set(insecure: bool) -> BrokerAuth | None:
    try:
        key_set = find_key_set()
        if key_set is None:
            return None
        auth = BrokerAuth.from_files(*key_set.broker_files())
    except SecurityError as exc:
        raise click.ClickException(str(exc)) from None
    log.info("CURVE with the key set in %s (mdp-keys init)", key_set.root)
    if insecure:
        click.echo("mdp-broker: --insecure is ignored: CURVE is on (key set)", err=True)
    return auth


def _group(name: str | None, endpoints: list[str]) -> int | None:
    """The gid for --group, after checking its members could reach an ipc:// endpoint."""
    if name is None:
        return None
    if not any(ipc_path(e) for e in endpoints):
        raise click.UsageError("--group shares ipc:// sockets; no --bind ipc://PATH is given")
    try:
        gid = group_id(name)
        for endpoint in endpoints:
            check_group_reach(endpoint, gid)
    except GroupError as exc:
        raise click.BadParameter(str(exc), param_hint="'--group'") from None
    return gid
