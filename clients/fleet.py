"""Fleet targeting (`mdp-client --host NAME|GLOB`, `--all`): which named workers a run goes
to, the commands addressed to each, and the per-host view of the results.

A named worker registers `SERVICE@NAME` beside each command service it hosts (spec/mdp.md
§5.1), so "run this on web-3" is a request to `shell@web-3`. The client resolves names and
globs with `mmi.workers` and sends each command to each matching host: one result per host and
command. Nothing here changes the wire protocol.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from mdp.client import Client
from mdp.mmi import WorkerInfo
from services.bodies import CommandSpec

__all__ = [
    "HOST_ORDER",
    "UnknownHost",
    "address",
    "host_counts",
    "host_of",
    "resolve_hosts",
]

HOST_ORDER = ("ok", "failed", "timeout", "unreachable")
"""The summary's host categories, worst last: a host is as bad as its worst command."""
_CATEGORY = {
    "ok": "ok",
    "timeout": "timeout",
    "lost": "unreachable",
    "expired": "unreachable",
}


class UnknownHost(Exception):
    """A --host name or glob matched no registered worker (exit 68, EX_NOHOST)."""

    def __init__(self, patterns: list[str], known: list[str]) -> None:
        self.patterns = patterns
        self.known = known
        shown = ", ".join(known[:20]) + (", ..." if len(known) > 20 else "") or "none"
        super().__init__(
            f"no registered worker matches {', '.join(map(repr, patterns))} (workers: {shown})"
        )


async def resolve_hosts(
    client: Client, patterns: Sequence[str], every: bool
) -> tuple[list[str], list[WorkerInfo]]:
    """The sorted names of the workers `patterns` (names or fnmatch globs) or `every` select,
    asked of the broker with `mmi.workers`. Raises `UnknownHost` if a pattern matches none
    (every pattern must match: a typo must not silently shrink the run)."""
    workers = await client.workers()
    # Only named workers (anonymous connections are listed as "~hex" and have no address).
    known = sorted(w.name for w in workers if not w.name.startswith("~"))
    if every:
        if not known:
            raise UnknownHost(["--all"], known)
        return known, workers
    chosen: set[str] = set()
    unmatched = []
    for pattern in patterns:
        found = fnmatch.filter(known, pattern)
        if not found:
            unmatched.append(pattern)
        chosen.update(found)
    if unmatched:
        raise UnknownHost(unmatched, known)
    return sorted(chosen), workers


def address(specs: Sequence[CommandSpec], hosts: Sequence[str]) -> list[CommandSpec]:
    """Each command addressed to each host (`SERVICE@HOST`), host by host in file order."""
    return [
        spec.model_copy(update={"command_type": f"{spec.command_type}@{host}"})
        for host in hosts
        for spec in specs
    ]


def host_of(command_type: str) -> str | None:
    """The host a command was addressed to (`shell@web-3` -> `web-3`), else None."""
    _, at, host = command_type.partition("@")
    return host if at else None


def host_counts(statuses: Sequence[tuple[str, str]]) -> dict[str, list[str]]:
    """Hosts by category (ok/failed/timeout/unreachable) from (host, status) pairs: a host
    counts under its worst command's category."""
    worst: dict[str, int] = {}
    for host, status in statuses:
        rank = HOST_ORDER.index(_CATEGORY.get(status, "failed"))
        worst[host] = max(worst.get(host, 0), rank)
    grouped: dict[str, list[str]] = {category: [] for category in HOST_ORDER}
    for host, rank in sorted(worst.items()):
        grouped[HOST_ORDER[rank]].append(host)
    return grouped
