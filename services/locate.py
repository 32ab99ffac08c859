"""Find which worker knows a request_id, through every reachable broker, and fence the others.

When an attempt's fate is unknown -- it was sent, no `started` came back, and its broker went
silent -- the command may be queued nowhere, refused, or running on a worker whose `started`
died with the broker. Re-sending it blindly could run it twice (duplicate protection is per
worker process, spec/command-service.md §10). `locate` asks instead:

1. every broker for its workers (`mmi.workers`, spec/mdp.md §5.1), all brokers at once; a
   broker that refuses connections or does not answer within `timeout` is skipped (it is the
   one that died: every worker is meant to be on every broker, README "Several brokers");
2. every named worker that hosts the service, through a broker that lists it, with a lookup
   on its own address `SERVICE@NAME` (spec/command-service.md §14.3):
   `{"lookup": request_id, "fence": true}`. The worker answers at once with what it knows
   (`running`, `finished`, `cancelled`, `unknown`) and, with `fence`, remembers an unknown id
   like one cancelled before it came, so that id can never start there afterwards.

The answer (`Located`) is one of three, and what a caller may do follows from it:

- `known`: worker `worker` runs it, or ran it and remembers its FINAL. Safe next step:
  re-attach, i.e. send the same request under the same request_id to `SERVICE@worker` (its
  duplicate protection follows the run or returns the stored FINAL; nothing starts again).
- `absent`: every reachable worker answered, none knows it, and each is now fenced. Safe next
  step: send it again under a NEW request_id (the old one would be refused).
- neither: some broker or named worker did not answer (`unanswered`). Ask again later; never
  re-send meanwhile: the silent worker may be running it.

Workers that cannot be asked -- anonymous connections, workers that do not understand the
lookup (older versions), brokers without `mmi.workers` -- are listed in `unaskable`; `absent`
ignores them, since asking again will not help. A caller that wants the strict guarantee
treats a non-empty `unaskable` as "neither". The `mdp-client` runner (clients/runner.py) and
the job service use this module.

Limits: a worker's memory of request_ids is bounded (600 s, 1,024 ids, §10), so `unknown`
from a worker that ran the request long ago is possible; workers of one host that share the
default name (no `--name`) answer for one process at a time, so give workers distinct names.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import zmq

from mdp.client import Client, MMINotImplemented, RequestTimeout
from mdp.errors import MDPError
from mdp.mmi import WorkerInfo
from services.bodies import (
    BodyError,
    LookupRequest,
    LookupState,
    parse_lookup_reply,
    parse_result,
)

__all__ = ["LOCATE_TIMEOUT", "Located", "locate"]

LOCATE_TIMEOUT = 1.0
"""How long each step of `locate` (the worker lists, then the lookups) may take by default."""


@dataclass(frozen=True, slots=True)
class Located:
    """What the reachable workers said about one request_id (see the module docstring)."""

    request_id: str
    service: str
    worker: str | None = None
    """The name of the worker that knows it (state `running` or `finished`), else None."""
    state: LookupState | None = None
    """`running` or `finished` for `worker`; None when no worker knows it."""
    endpoint: str | None = None
    """A broker through which `worker` answered: where to re-attach."""
    answers: dict[str, LookupState] = field(default_factory=dict)
    """Every worker that answered the lookup, by name, with its state."""
    fenced: list[str] = field(default_factory=list)
    """The workers where this request_id can no longer start (fenced or cancelled there)."""
    unanswered: dict[str, str] = field(default_factory=dict)
    """Named workers hosting the service that a broker lists but that gave no answer, with
    why: they may know the request, so nothing can be concluded while this is not empty."""
    unaskable: dict[str, str] = field(default_factory=dict)
    """Workers (or brokers) that cannot be asked at all, with why: anonymous connections,
    workers older than the lookup, brokers without `mmi.workers`."""
    brokers: dict[str, str | None] = field(default_factory=dict)
    """Each broker endpoint: None when it listed its workers, else why it did not."""

    @property
    def known(self) -> bool:
        """A worker runs it or remembers its FINAL: re-attach to `SERVICE@worker`."""
        return self.worker is not None

    @property
    def reachable(self) -> list[str]:
        """The brokers that answered `mmi.workers`."""
        return [endpoint for endpoint, why in self.brokers.items() if why is None]

    @property
    def absent(self) -> bool:
        """No reachable worker knows it, every one that answered is fenced, and at least one
        answered (or none can be asked): a re-send under a new request_id cannot make it run
        twice on any of them. A broker listing no worker for the service (one that restarted
        and has not got its workers back) proves nothing."""
        return (
            self.worker is None
            and not self.unanswered
            and bool(self.answers or self.unaskable)
            and all(name in self.fenced for name in self.answers)
        )


async def locate(
    where: Client | str | Sequence[str],
    service: str,
    request_id: str,
    *,
    fence: bool = True,
    timeout: float = LOCATE_TIMEOUT,
    names: Sequence[str] | None = None,
    expect: Sequence[str] = (),
) -> Located:
    """Ask every worker hosting `service` (os, shell) through every reachable broker what it
    knows of `request_id`; with `fence`, each worker that does not know it will refuse it if
    it arrives later. `names` limits the question to those workers (e.g. the one that said
    `started`, or the `--host` a command was addressed to). `expect`: workers that must be
    heard from although no broker may list them (e.g. every worker that ran something for the
    caller lately: a broker that restarted may not have them back yet); a name in `names` or
    `expect` that no reachable broker lists is `unanswered`.

    `where` is a `Client` (its endpoints, version, context and CURVE options are used) or
    broker endpoint(s). Takes at most about 2 x `timeout` (worker lists, then lookups, each
    step all at once), plus `timeout` per extra broker tried for a worker that did not answer.
    Never raises for an unreachable broker or worker: `Located` says what was not reached.
    """
    if isinstance(where, Client):
        return await _locate(where, service, request_id, fence, timeout, names, expect)
    async with Client(where, timeout=timeout, retries=0) as client:
        return await _locate(client, service, request_id, fence, timeout, names, expect)


async def _locate(
    client: Client,
    service: str,
    request_id: str,
    fence: bool,
    timeout: float,
    names: Sequence[str] | None,
    expect: Sequence[str],
) -> Located:
    per_broker = [
        Client(
            endpoint,
            version=client.version,
            timeout=timeout,
            retries=0,
            context=client.context,
            socket_options=client.socket_options,
        )
        for endpoint in client.endpoints
    ]
    try:
        listings = await asyncio.gather(*(_workers(c, timeout) for c in per_broker))
        brokers: dict[str, str | None] = {}
        # name -> the brokers that list it, in endpoint order
        routes: dict[str, list[Client]] = {}
        unaskable: dict[str, str] = {}
        wanted = None if names is None else set(names)
        for broker, listing in zip(per_broker, listings, strict=True):
            endpoint = broker.endpoints[0]
            if isinstance(listing, str):
                brokers[endpoint] = listing
                if listing.startswith("does not implement"):
                    unaskable[endpoint] = f"the broker {listing}"
                continue
            brokers[endpoint] = None
            for worker in listing:
                if wanted is not None and worker.name not in wanted:
                    continue
                reason = _unaskable(worker, service)
                if reason is None:
                    routes.setdefault(worker.name, []).append(broker)
                elif reason:
                    unaskable[worker.name] = reason
        unanswered: dict[str, str] = {}
        required = (wanted or set()) | set(expect)
        for name in sorted(required - set(routes) - set(unaskable)):
            unanswered[name] = "not registered with any broker that answered"
        body = LookupRequest(lookup=request_id, fence=fence).pack()
        asked = await asyncio.gather(
            *(_ask(routes[name], f"{service}@{name}", body, timeout) for name in routes)
        )
        answers: dict[str, LookupState] = {}
        fenced: list[str] = []
        knower: tuple[str, LookupState, str | None] | None = None
        for name, (answer, via) in zip(routes, asked, strict=True):
            if isinstance(answer, str):
                if answer.startswith("does not understand"):
                    unaskable[name] = answer
                else:
                    unanswered[name] = answer
                continue
            state, is_fenced = answer
            answers[name] = state
            if is_fenced:
                fenced.append(name)
            if state in ("running", "finished") and knower is None:
                knower = (name, state, via)
        return Located(
            request_id=request_id,
            service=service,
            worker=knower[0] if knower else None,
            state=knower[1] if knower else None,
            endpoint=knower[2] if knower else None,
            answers=answers,
            fenced=fenced,
            unanswered=unanswered,
            unaskable=unaskable,
            brokers=brokers,
        )
    finally:
        for broker in per_broker:
            broker.close()


def _unaskable(worker: WorkerInfo, service: str) -> str | None:
    """Why `worker` cannot be asked about `service`: "" when it does not host it at all, None
    when it can be asked."""
    address = f"{service}@{worker.name}"
    if address in worker.services:
        return None
    if service not in worker.services:
        return ""
    if worker.name.startswith("~"):
        return f"an anonymous worker hosts {service!r}: it has no address to ask"
    return f"it hosts {service!r} without {address!r}"


async def _workers(broker: Client, timeout: float) -> list[WorkerInfo] | str:
    """The broker's workers, or why there are none: a refused connection is told at once
    (a killed broker), an absent answer after `timeout`."""
    listing = asyncio.ensure_future(broker.workers())
    reach = asyncio.ensure_future(broker.unreachable(timeout=timeout))
    try:
        done, _ = await asyncio.wait({listing, reach}, return_when=asyncio.FIRST_COMPLETED)
        if listing not in done:
            why = reach.result().get(broker.endpoints[0])
            if why is not None:
                return why
            await asyncio.wait({listing})
        try:
            return listing.result()
        except MMINotImplemented:
            return "does not implement mmi.workers"
        except RequestTimeout:
            return f"no answer to mmi.workers within {timeout:g} s"
        except (MDPError, zmq.ZMQError) as exc:
            return f"mmi.workers failed: {exc}"
    finally:
        for task in (listing, reach):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


async def _ask(
    routes: list[Client], address: str, body: bytes, timeout: float
) -> tuple[tuple[LookupState, bool] | str, str | None]:
    """The lookup's answer from `address` ((state, fenced) and the broker it came through),
    trying each broker that lists the worker in turn, or why there is none."""
    why = "no broker to ask through"
    for broker in routes:
        endpoint = broker.endpoints[0]
        try:
            reply = await broker.request(address, body, timeout=timeout, retries=0)
        except RequestTimeout:
            why = f"no answer within {timeout:g} s through {endpoint}"
            continue
        except (MDPError, zmq.ZMQError) as exc:
            why = f"the lookup failed through {endpoint}: {exc}"
            continue
        try:
            answer = parse_lookup_reply(reply)
        except BodyError:
            try:
                result = parse_result(reply)
            except BodyError:
                return f"does not understand the lookup (answered {reply[:1]!r})", endpoint
            return f"does not understand the lookup (answered {result.status!r})", endpoint
        return (answer.state, answer.fenced), endpoint
    return why, None
