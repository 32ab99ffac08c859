"""Our client library (`mdp.client.Client`) as a one-shot program for `mdp-conformance client`.

    python -m tests.conformance.peers.our_client ENDPOINT SERVICE VERSION TIMEOUT_MS BODY...

Sends one request (each BODY word is a frame), prints each frame of the FINAL body on a line
of its own and exits 0; exits 1 with the error on stderr when no answer came.
"""

from __future__ import annotations

import asyncio
import sys

from mdp.client import Client
from mdp.errors import MDPError


async def main(endpoint: str, service: str, version: str, timeout_ms: str, *body: str) -> int:
    async with Client(endpoint, version=version, timeout=int(timeout_ms) / 1000, retries=2) as c:
        try:
            answer = await c.request(service, *(word.encode() for word in body))
        except MDPError as exc:
            print(f"our_client: {exc}", file=sys.stderr)
            return 1
    for frame in answer:
        print(frame.decode(errors="replace"))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(*sys.argv[1:])))
