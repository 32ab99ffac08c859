"""Command-line pieces shared by mdp-broker, mdp-worker and mdp-client (click)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import click
import zmq

from mdp import logs
from mdp.endpoints import EndpointError, PrivateDirError, check_endpoint, default_endpoint
from mdp.metrics import MetricsBindError, parse_bind, serve_metrics
from mdp.protocol import HEARTBEAT_INTERVAL, HEARTBEAT_LIVENESS
from mdp.security import KeyFileError, SocketOptions, curve_client_options
from mdp.security.keyset import find_key_set

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

F = TypeVar("F", bound=Callable[..., Any])


Callback = Callable[[click.Context, click.Parameter, Any], Any]


def endpoint_callback(*, bind: bool = False) -> Callback:
    """A click callback that checks an endpoint option (one value or `multiple`) before use:
    endpoints to bind (`bind=True`) or to connect to.

    A connect endpoint is also tried on a throw-away socket (nothing is sent), so whatever
    else libzmq refuses is a usage error too, not a traceback later.
    """

    def check(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        for endpoint in (value,) if isinstance(value, str) else value or ():
            try:
                check_endpoint(endpoint, bind=bind)
            except EndpointError as exc:
                raise click.BadParameter(str(exc), ctx, param) from None
            if not bind:
                _try_connect(endpoint, ctx, param)
        return value

    return check


def _try_connect(endpoint: str, ctx: click.Context, param: click.Parameter) -> None:
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    try:
        sock.connect(endpoint)
    except zmq.ZMQError as exc:
        raise click.BadParameter(f"cannot connect to {endpoint!r}: {exc}", ctx, param) from None
    finally:
        sock.close(linger=0)


def log_options(info_help: str) -> Callable[[F], F]:
    """Add --log-level (with `info_help` saying what INFO logs) and --log-json."""

    def decorate(f: F) -> F:
        f = click.option(
            "--log-json", is_flag=True, show_envvar=True, help="Log JSON lines on stderr."
        )(f)
        return click.option(
            "--log-level",
            type=click.Choice(logs.LEVELS, case_sensitive=False),
            default="INFO",
            show_default=True,
            show_envvar=True,
            help=info_help,
        )(f)

    return decorate


def heartbeat_options(heartbeat_help: str, liveness_help: str) -> Callable[[F], F]:
    """Add --heartbeat-ms and --liveness, with the defaults broker and workers share."""

    def decorate(f: F) -> F:
        f = click.option(
            "--liveness",
            type=click.IntRange(min=1),
            default=HEARTBEAT_LIVENESS,
            show_default=True,
            show_envvar=True,
            help=liveness_help,
        )(f)
        return click.option(
            "--heartbeat-ms",
            type=click.IntRange(min=1),
            default=round(HEARTBEAT_INTERVAL * 1000),
            show_default=True,
            show_envvar=True,
            help=heartbeat_help,
        )(f)

    return decorate


Program = Literal["broker", "worker", "client"]

_KEY_FILE = click.Path(exists=True, dir_okay=False)
_KEY_DIR = click.Path(exists=True, file_okay=False)


def curve_options(program: Program) -> Callable[[F], F]:
    """Add the CURVE options of `program` (spec/security.md), read also from MDP_<PROGRAM>_*.

    The broker gets --curve-secret-key, --allow-clients and --allow-workers (its key pair and
    allow-list directories); a worker or client gets --curve-secret-key and --curve-server-key
    (its own key pair and the broker's public key; see `curve_socket_options`).
    """
    prefix = f"MDP_{program.upper()}_"
    if program == "broker":
        specs = [
            (
                "--curve-secret-key",
                _KEY_FILE,
                "FILE",
                "Turn on CURVE encryption and authentication with this key pair (the "
                "NAME.key_secret file from `mdp-keys generate`). Needs --allow-clients and "
                "--allow-workers.",
            ),
            (
                "--allow-clients",
                _KEY_DIR,
                "DIR",
                "Directory of client public keys (NAME.key) allowed to send requests. Re-read "
                "when it changes: add or remove a key without a restart.",
            ),
            (
                "--allow-workers",
                _KEY_DIR,
                "DIR",
                "Directory of worker public keys allowed to register services. Re-read when it "
                "changes.",
            ),
        ]
    else:
        specs = [
            (
                "--curve-secret-key",
                _KEY_FILE,
                "FILE",
                f"This {program}'s CURVE key pair (NAME.key_secret, from mdp-keys); with "
                "--curve-server-key, connect to a broker that requires CURVE authentication. "
                f"The broker must list the public key in its --allow-{program}s directory.",
            ),
            ("--curve-server-key", _KEY_FILE, "FILE", "The broker's CURVE public key (NAME.key)."),
        ]

    def decorate(f: F) -> F:
        for name, type_, metavar, help_ in reversed(specs):
            f = click.option(
                name,
                type=type_,
                default=None,
                metavar=metavar,
                envvar=prefix + name[2:].upper().replace("-", "_"),
                show_envvar=True,
                help=help_,
            )(f)
        return f

    return decorate


def curve_socket_options(secret: str | None, server: str | None) -> SocketOptions:
    """Socket options for a CURVE client or worker, from --curve-secret-key/--curve-server-key.

    Both or neither; a bad key file is a click usage error naming both options.
    """
    if secret is None and server is None:
        return []
    if secret is None or server is None:
        raise click.UsageError("--curve-secret-key and --curve-server-key go together")
    try:
        return curve_client_options(secret, server)
    except KeyFileError as exc:
        raise click.BadParameter(
            str(exc), param_hint="'--curve-secret-key/--curve-server-key'"
        ) from None


def metrics_option(what: str) -> Callable[[F], F]:
    """Add --metrics-bind HOST:PORT: serve Prometheus metrics about `what` (mdp.metrics)."""

    def check(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
        if value is not None:
            try:
                parse_bind(value)
            except MetricsBindError as exc:
                raise click.BadParameter(str(exc), ctx, param) from None
        return value

    return click.option(
        "--metrics-bind",
        default=None,
        metavar="HOST:PORT",
        callback=check,
        show_envvar=True,
        help=f"Serve Prometheus metrics about {what} at http://HOST:PORT/metrics (e.g. "
        "127.0.0.1:9100; metric names in spec/api.md). Off by default.",
    )


def start_metrics(value: str, registry: CollectorRegistry) -> None:
    """Serve `registry` at --metrics-bind `value`; a port that cannot be bound is a usage
    error (exit 1), never a traceback."""
    try:
        host, port = serve_metrics(value, registry)
    except OSError as exc:
        raise click.ClickException(
            f"cannot serve metrics on {value}: {exc.strerror or exc}"
        ) from None
    logging.getLogger("mdp").info("metrics at http://%s:%d/metrics", host, port)


def key_set_peer_options(role: str) -> tuple[SocketOptions, str | None]:
    """CURVE options for a "client" or "worker" given no key option: from the local key set
    (`mdp-keys init`, spec/security.md §6.3) if there is one, else none.

    Returns the options and where they came from (for a log line), or ([], None). A key set
    that exists but cannot be used is a usage error (status 2, like a bad key option), never
    a silent fallback to no CURVE.
    """
    try:
        key_set = find_key_set()
        if key_set is None:
            return [], None
        secret, server = key_set.peer_files(role)
        return curve_client_options(secret, server), f"the key set in {key_set.root}"
    except KeyFileError as exc:
        raise click.UsageError(str(exc)) from None


def default_endpoint_or_fail() -> str:
    """`default_endpoint()` for a program given no endpoint option; its directory's problem
    (not private, not ours) is a usage error naming the option that avoids it."""
    try:
        return default_endpoint()
    except PrivateDirError as exc:
        raise click.UsageError(f"cannot use the default endpoint: {exc}") from None
