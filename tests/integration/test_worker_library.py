"""The worker library (mdp.worker) in-process against a scripted broker: a ROUTER socket the
test drives frame by frame. Covers the handler API and the socket loop: heartbeats while a
handler runs, PARTIAL/FINAL framing, failing handlers, DISCONNECT, broker silence, stop().
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

import pytest
import zmq
import zmq.asyncio

from mdp.protocol import Command, Version, worker_framing
from mdp.worker import Request, Service, Worker, WorkerOptions
from mdp.worker_core import State

HB = 0.1
LIVENESS = 3


class ScriptedBroker:
    """A ROUTER the test drives. While `heartbeating`, it heartbeats every worker it has heard
    from, like a real broker; everything workers send lands in `inbox`."""

    def __init__(self, version: Version = Version.V02) -> None:
        self.framing = worker_framing(version)
        self.context = zmq.asyncio.Context()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.linger = 0
        self.socket.bind("tcp://127.0.0.1:*")
        self.endpoint: str = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.inbox: asyncio.Queue[tuple[bytes, list[bytes]]] = asyncio.Queue()
        self.peers: set[bytes] = set()
        self.heartbeating = True
        self._tasks = [asyncio.create_task(self._receive()), asyncio.create_task(self._beat())]

    async def _receive(self) -> None:
        while True:
            identity, *frames = await self.socket.recv_multipart()
            self.peers.add(identity)
            await self.inbox.put((identity, frames))

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(HB / 2)
            if self.heartbeating:
                for peer in list(self.peers):
                    await self.send(peer, self.framing.command(Command.HEARTBEAT))

    async def send(self, identity: bytes, frames: list[bytes]) -> None:
        await self.socket.send_multipart([identity, *frames])

    async def request(self, identity: bytes, client: bytes, body: list[bytes]) -> None:
        await self.send(identity, self.framing.addressed(Command.REQUEST, client, body))

    async def next(
        self, match: Callable[[list[bytes]], bool], timeout: float = 3.0
    ) -> tuple[bytes, list[bytes]]:
        """The next message `match` accepts (others are skipped), within `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError("the expected message did not arrive")
            identity, frames = await asyncio.wait_for(self.inbox.get(), remaining)
            if match(frames):
                return identity, frames

    def is_(self, command: Command) -> Callable[[list[bytes]], bool]:
        head = list(self.framing.head(command))
        return lambda frames: frames[: len(head)] == head

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.context.destroy(linger=0)


@contextlib.asynccontextmanager
async def running(
    service: Service, version: Version = Version.V02
) -> AsyncIterator[tuple[ScriptedBroker, Worker, bytes]]:
    """A scripted broker and a running worker; yields them and the worker's identity."""
    broker = ScriptedBroker(version)
    options = WorkerOptions(
        broker=broker.endpoint, version=version, heartbeat_interval=HB, liveness=LIVENESS
    )
    worker = Worker(service, options, context=broker.context)
    task = asyncio.create_task(worker.run())
    try:
        identity, frames = await broker.next(broker.is_(Command.READY))
        assert frames[-1] == service.name.encode()
        yield broker, worker, identity
    finally:
        worker.stop(0)
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(task, 3)
        await broker.close()


def body_of(frames: list[bytes], framing_len: int) -> list[bytes]:
    """Body frames of a PARTIAL/FINAL: after head, client address and empty delimiter."""
    return frames[framing_len + 2 :]


async def test_handler_gets_the_body_and_its_return_is_the_final() -> None:
    async def upper(request: Request) -> list[bytes]:
        return [frame.upper() for frame in request.body]

    async with running(Service("upper", upper)) as (broker, _, wid):
        await broker.request(wid, b"client-1", [b"ab", b"cd"])
        _, frames = await broker.next(broker.is_(Command.FINAL))
        assert frames == [b"MDPW02", b"\x04", b"client-1", b"", b"AB", b"CD"]


async def test_heartbeats_continue_while_a_handler_runs() -> None:
    """RFC 7/18 heartbeating, also while busy: the handler is a separate task."""
    release = asyncio.Event()

    async def slow(request: Request) -> list[bytes]:
        await request.partial([b"working"])
        await release.wait()
        return [b"done"]

    async with running(Service("slow", slow)) as (broker, worker, wid):
        await broker.request(wid, b"C", [b"x"])
        _, partial = await broker.next(broker.is_(Command.PARTIAL))
        assert partial == [b"MDPW02", b"\x03", b"C", b"", b"working"]
        beats = 0
        started = time.monotonic()
        while time.monotonic() - started < 0.6:
            await broker.next(broker.is_(Command.HEARTBEAT), timeout=2 * HB)
            beats += 1
        assert beats >= 4
        assert worker.state is State.BUSY
        release.set()
        _, final = await broker.next(broker.is_(Command.FINAL))
        assert final[-1] == b"done"


async def test_a_failing_handler_gets_an_error_reply_and_the_worker_goes_on() -> None:
    calls = 0

    async def flaky(request: Request) -> list[bytes]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ValueError("boom")
        return [b"fine"]

    async with running(Service("flaky", flaky)) as (broker, _, wid):
        await broker.request(wid, b"C", [b"x"])
        _, final = await broker.next(broker.is_(Command.FINAL))
        assert final[-2:] == [b"error", b"ValueError: boom"]
        await broker.request(wid, b"C", [b"x"])
        _, final = await broker.next(broker.is_(Command.FINAL))
        assert final[-1] == b"fine"


@pytest.mark.parametrize("returned", [None, [], [b"ok", "text"], b"bytes"])
async def test_a_handler_returning_a_non_body_counts_as_failing(returned: object) -> None:
    async def wrong(request: Request) -> list[bytes]:
        return returned  # type: ignore[return-value]

    async with running(Service("wrong", wrong)) as (broker, _, wid):
        await broker.request(wid, b"C", [b"x"])
        _, final = await broker.next(broker.is_(Command.FINAL))
        assert final[-2] == b"error" and final[-1].startswith(b"TypeError")


async def test_a_custom_error_reply_is_used() -> None:
    async def broken(request: Request) -> list[bytes]:
        raise RuntimeError("x")

    def reply(request: Request, exc: BaseException) -> list[bytes]:
        return [b"custom", type(exc).__name__.encode()]

    async with running(Service("broken", broken, reply)) as (broker, _, wid):
        await broker.request(wid, b"C", [b"x"])
        _, final = await broker.next(broker.is_(Command.FINAL))
        assert final[-2:] == [b"custom", b"RuntimeError"]


async def test_mdp_0_1_sends_no_partial_and_replies_with_the_envelope() -> None:
    """RFC 7: REPLY is "" MDPW01 0x03 client "" body; there is no PARTIAL."""
    seen: list[bool] = []

    async def handler(request: Request) -> list[bytes]:
        seen.append(request.streaming)
        await request.partial([b"dropped"])
        return [b"reply"]

    async with running(Service("old", handler), Version.V01) as (broker, _, wid):
        await broker.request(wid, b"C", [b"x"])
        _, frames = await broker.next(lambda f: f[:3] != [b"", b"MDPW01", b"\x04"])
        assert frames == [b"", b"MDPW01", b"\x03", b"C", b"", b"reply"]
        assert seen == [False]


async def test_disconnect_makes_the_worker_register_again_on_a_new_socket() -> None:
    """RFC 7/18: on DISCONNECT, close the socket and reconnect on a new one (new identity)."""

    async def echo(request: Request) -> list[bytes]:
        return request.body

    async with running(Service("echo", echo)) as (broker, _, wid):
        await broker.send(wid, broker.framing.command(Command.DISCONNECT))
        new_id, _ = await broker.next(broker.is_(Command.READY))
        assert new_id != wid
        await broker.request(new_id, b"C", [b"again"])
        assert (await broker.next(broker.is_(Command.FINAL)))[1][-1] == b"again"


async def test_a_silent_broker_is_left_for_a_new_socket() -> None:
    """RFC 7/18: no heartbeat for interval x liveness -> the broker is presumed dead."""

    async def echo(request: Request) -> list[bytes]:
        return request.body

    async with running(Service("echo", echo)) as (broker, _, wid):
        broker.heartbeating = False
        started = time.monotonic()
        new_id, _ = await broker.next(broker.is_(Command.READY), timeout=HB * LIVENESS + 1)
        assert new_id != wid
        assert HB * LIVENESS * 0.9 <= time.monotonic() - started < HB * LIVENESS + 0.5


async def test_stop_when_idle_sends_disconnect_and_returns() -> None:
    async def echo(request: Request) -> list[bytes]:
        return request.body

    async with running(Service("echo", echo)) as (broker, worker, _):
        worker.stop()
        await broker.next(broker.is_(Command.DISCONNECT))
        assert worker.state is State.CLOSED


async def test_stop_while_busy_finishes_then_disconnects() -> None:
    entered, release = asyncio.Event(), asyncio.Event()

    async def slow(request: Request) -> list[bytes]:
        entered.set()
        await release.wait()
        return [b"finished"]

    async with running(Service("slow", slow)) as (broker, worker, wid):
        await broker.request(wid, b"C", [b"x"])
        await asyncio.wait_for(entered.wait(), 3)
        worker.stop(grace=5)
        await broker.request(wid, b"D", [b"y"])  # a misbehaving broker: must be ignored
        release.set()
        _, final = await broker.next(broker.is_(Command.FINAL))
        assert final[2] == b"C" and final[-1] == b"finished"
        await broker.next(broker.is_(Command.DISCONNECT))


async def test_grace_over_cancels_the_handler_with_an_error_reply() -> None:
    entered = asyncio.Event()

    async def forever(request: Request) -> list[bytes]:
        entered.set()
        await asyncio.Event().wait()
        return [b"never"]

    async with running(Service("forever", forever)) as (broker, worker, wid):
        await broker.request(wid, b"C", [b"x"])
        await asyncio.wait_for(entered.wait(), 3)
        worker.stop(grace=0.1)
        _, final = await broker.next(broker.is_(Command.FINAL))
        assert final[-2] == b"error" and b"shutting down" in final[-1]
        await broker.next(broker.is_(Command.DISCONNECT))


async def test_socket_options_are_set_before_connecting() -> None:
    """WorkerOptions.socket_options reach every socket (the hook CURVE keys go through)."""
    broker = ScriptedBroker()
    options = WorkerOptions(
        broker=broker.endpoint,
        heartbeat_interval=HB,
        liveness=LIVENESS,
        socket_options=[(zmq.ROUTING_ID, b"worker-with-options")],
    )

    async def echo(request: Request) -> list[bytes]:
        return request.body

    worker = Worker(Service("echo", echo), options, context=broker.context)
    task = asyncio.create_task(worker.run())
    try:
        identity, _ = await broker.next(broker.is_(Command.READY))
        assert identity == b"worker-with-options"
    finally:
        worker.stop(0)
        await asyncio.wait_for(task, 3)
        await broker.close()
