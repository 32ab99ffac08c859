"""The transport ceiling: `python -m benchmarks.proxy FRONTEND BACKEND`.

A ROUTER bound on FRONTEND for the clients and a DEALER bound on BACKEND for the workers,
joined by `zmq.proxy` (libzmq's `zmq_proxy`, a C loop). Requests go round-robin to the
workers, and replies find their client by the identity frame the ROUTER prepended. It is what
moving the same peers' bytes through one process costs with no MDP at all: no parsing, no
queues, no heartbeats. The benchmark's peers speak the "proxy" dialect to it
(`benchmarks.loadgen`). It runs until killed (SIGTERM ends the process).
"""

from __future__ import annotations

import sys

import zmq


def main(argv: list[str]) -> int:
    """Bind both sockets (backend first, so the frontend answering means both are up)."""
    if len(argv) != 2:
        print("usage: python -m benchmarks.proxy FRONTEND BACKEND", file=sys.stderr)
        return 2
    context = zmq.Context()
    frontend = context.socket(zmq.ROUTER)
    backend = context.socket(zmq.DEALER)
    for sock in (frontend, backend):
        sock.setsockopt(zmq.LINGER, 0)
    backend.bind(argv[1])
    frontend.bind(argv[0])
    zmq.proxy(frontend, backend)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
