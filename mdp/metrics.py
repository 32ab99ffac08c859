"""Prometheus metrics: what `--metrics-bind` of mdp-broker and mdp-worker share.

Naming follows Prometheus' conventions: every name starts with `mdp_`, values are in base units
(seconds, bytes), counters end in `_total`, and labels have few values (a service name, a
status; never a request or job id). Durations use `DURATION_BUCKETS`, which reach 600 s: the
client library's default buckets stop at 10 s, shorter than most commands.

The metrics are served over plain HTTP by prometheus-client's own small server, in a thread of
its own; a scrape reads counters the program keeps anyway, so it costs the hot path nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from mdp.endpoints import is_local_endpoint

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

__all__ = ["DURATION_BUCKETS", "MetricsBindError", "parse_bind", "serve_metrics"]

DURATION_BUCKETS: Final = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
    600.0, float("inf"),
)  # fmt: skip
"""Histogram buckets for command, job and queue-wait durations, in seconds."""


class MetricsBindError(ValueError):
    """A --metrics-bind value that is not HOST:PORT."""


def parse_bind(value: str) -> tuple[str, int]:
    """`HOST:PORT` (or `[V6]:PORT`, or `:PORT` for loopback) as (host, port)."""
    host, colon, port = value.rpartition(":")
    if not colon or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise MetricsBindError(f"{value!r} is not HOST:PORT (e.g. 127.0.0.1:9100)")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


def is_loopback_bind(host: str) -> bool:
    """True when `host` is a loopback address or name (metrics elsewhere are visible to all)."""
    return is_local_endpoint(f"tcp://{host if ':' not in host else f'[{host}]'}:1")


def serve_metrics(value: str, registry: CollectorRegistry) -> tuple[str, int]:
    """Serve `registry` at http://HOST:PORT/metrics in a daemon thread; return (host, port)
    actually bound (port 0 picks a free one). Raises MetricsBindError or OSError."""
    # Imported here: only a program started with --metrics-bind needs the server.
    from prometheus_client import start_http_server

    host, port = parse_bind(value)
    server, _thread = start_http_server(port, host, registry=registry)
    bound_port = int(server.server_address[1])
    return host, bound_port
