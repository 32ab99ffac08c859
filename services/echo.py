"""The "echo" service: the FINAL body is the request body, frame for frame (tests, benchmarks).

It also follows the conformance suite's contract for a worker under test (docs/conformance.md):
a request of exactly two frames, `MDP-CONFORMANCE-SLEEP` and a decimal number of milliseconds,
is echoed only after that long (at most a minute), so `mdp-conformance worker` can watch the
worker heartbeat while it is busy.
"""

from __future__ import annotations

import asyncio

from mdp.worker import Request, Service

__all__ = ["SERVICE", "SLEEP_FRAME", "echo"]

SLEEP_FRAME = b"MDP-CONFORMANCE-SLEEP"
MAX_SLEEP_MS = 60_000


async def echo(request: Request) -> list[bytes]:
    """Reply with the request's body frames unchanged (after the requested delay, see above)."""
    body = request.body
    if len(body) == 2 and body[0] == SLEEP_FRAME and body[1].isdigit():
        await asyncio.sleep(min(int(body[1]), MAX_SLEEP_MS) / 1000)
    return body


SERVICE = Service("echo", echo)
