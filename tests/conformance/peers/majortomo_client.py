"""majortomo's Client (PyPI `majortomo`) as a one-shot program for `mdp-conformance client`.

    python -m tests.conformance.peers.majortomo_client ENDPOINT SERVICE TIMEOUT_MS BODY...

Sends one request, takes the last part `recv_all` yields (the FINAL) as the answer, prints
each of its frames on a line of its own and exits 0; exits 1 on majortomo's errors.
"""

from __future__ import annotations

import sys

from majortomo import Client
from majortomo.error import Timeout


def main(endpoint: str, service: str, timeout_ms: str, *body: str) -> int:
    with Client(endpoint) as client:
        client.send(service.encode(), *(word.encode() for word in body))
        try:
            parts = list(client.recv_all(timeout=int(timeout_ms) / 1000))
        except Timeout as exc:
            print(f"majortomo_client: {exc}", file=sys.stderr)
            return 1
    for frame in parts[-1] if parts else []:
        print(frame.decode(errors="replace"))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
