"""majortomo's Worker (PyPI `majortomo`) as the conformance suite's echo worker.

    python -m tests.conformance.peers.majortomo_worker ENDPOINT SERVICE HEARTBEAT_MS LIVENESS

Written the way majortomo's own echo worker (majortomo/echo.py) is: a WorkerRequestsIterator
and send_reply_final. The suite's sleep request (MDP-CONFORMANCE-SLEEP, ms) sleeps in the
handler, as any blocking handler would. After a DISCONNECT the iterator ends; the worker then
connects again, as RFC 7/18 ask.
"""

from __future__ import annotations

import signal
import sys
import time

from majortomo import Worker, WorkerRequestsIterator

SLEEP = b"MDP-CONFORMANCE-SLEEP"


def main(endpoint: str, service: str, heartbeat_ms: str, liveness: str) -> None:
    interval = int(heartbeat_ms) / 1000
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    while not stopping:
        worker = Worker(endpoint, service, interval, interval * int(liveness))
        requests = WorkerRequestsIterator(worker)
        for body in requests:
            if len(body) == 2 and body[0] == SLEEP and body[1].isdigit():
                time.sleep(int(body[1]) / 1000)
            requests.send_reply_final(body)


if __name__ == "__main__":
    main(*sys.argv[1:5])
