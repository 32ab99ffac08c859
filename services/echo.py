"""The "echo" service: the FINAL body is the request body, frame for frame (tests, benchmarks)."""

from __future__ import annotations

from mdp.worker import Request, Service

__all__ = ["SERVICE", "echo"]


async def echo(request: Request) -> list[bytes]:
    """Reply with the request's body frames unchanged."""
    return request.body


SERVICE = Service("echo", echo)
