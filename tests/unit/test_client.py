"""`mdp.client.Client` against raw fake brokers (pyzmq ROUTER sockets on loopback).

The fake broker is the test: it receives exactly what the client sent and answers with hand-built
frames, so every test checks the client against the RFC layouts, not against our broker.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import msgpack
import pytest
import zmq
import zmq.asyncio

from mdp.client import Client, MMINotImplemented, RequestTimeout, ServiceInfo
from mdp.client_core import AttemptFailed
from mdp.errors import ProtocolError, Timeout

pytestmark = pytest.mark.timeout(20)

WAIT = 5.0  # bound on every wait of the fake broker


class FakeBroker:
    """A bare ROUTER socket: `recv()` returns (identity, frames); `send()` routes frames."""

    def __init__(self, ctx: zmq.asyncio.Context) -> None:
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind("tcp://127.0.0.1:*")
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)

    async def recv(self, timeout: float = WAIT) -> tuple[bytes, list[bytes]]:
        frames = await asyncio.wait_for(self.sock.recv_multipart(), timeout)
        return frames[0], frames[1:]

    async def nothing(self, within: float) -> bool:
        """True when nothing arrives within `within` seconds."""
        return not await self.sock.poll(int(within * 1000))

    async def send(self, identity: bytes, *frames: bytes) -> None:
        await self.sock.send_multipart([identity, *frames])

    async def final(self, identity: bytes, service: bytes, *body: bytes) -> None:
        await self.send(identity, b"MDPC02", b"\x03", service, *body)

    async def partial(self, identity: bytes, service: bytes, *body: bytes) -> None:
        await self.send(identity, b"MDPC02", b"\x02", service, *body)


@pytest.fixture
async def ctx() -> AsyncIterator[zmq.asyncio.Context]:
    context = zmq.asyncio.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture
async def broker(ctx: zmq.asyncio.Context) -> FakeBroker:
    return FakeBroker(ctx)


@pytest.fixture
async def client(broker: FakeBroker) -> AsyncIterator[Client]:
    c = Client(broker.endpoint, timeout=0.5, retries=2)
    yield c
    c.close()


async def test_request_round_trip_rfc18(broker: FakeBroker, client: Client) -> None:
    """RFC 18: REQUEST = MDPC02 0x01 service body; FINAL = MDPC02 0x03 service body."""
    task = asyncio.create_task(client.request("echo", b"a", b"b"))
    ident, frames = await broker.recv()
    assert frames == [b"MDPC02", b"\x01", b"echo", b"a", b"b"]
    await broker.final(ident, b"echo", b"A", b"B")
    assert await task == [b"A", b"B"]


async def test_request_round_trip_rfc7(broker: FakeBroker) -> None:
    """RFC 7: REQUEST = "" MDPC01 service body; REPLY = "" MDPC01 service body."""
    with Client_(broker.endpoint, version="0.1") as client:
        task = asyncio.create_task(client.request("echo", b"a"))
        ident, frames = await broker.recv()
        assert frames == [b"", b"MDPC01", b"echo", b"a"]
        await broker.send(ident, b"", b"MDPC01", b"echo", b"A")
        assert await task == [b"A"]


async def test_stream_yields_partials_then_final(broker: FakeBroker, client: Client) -> None:
    """RFC 18: the client must handle zero or more PARTIALs before the FINAL."""

    async def collect() -> list[tuple[bool, list[bytes]]]:
        return [(p.final, p.body) async for p in client.stream("svc", b"q")]

    task = asyncio.create_task(collect())
    ident, _ = await broker.recv()
    await broker.partial(ident, b"svc", b"1")
    await broker.partial(ident, b"svc", b"2")
    await broker.final(ident, b"svc", b"end")
    assert await task == [(False, [b"1"]), (False, [b"2"]), (True, [b"end"])]


async def test_many_requests_in_flight_are_correlated(broker: FakeBroker, client: Client) -> None:
    """Replies answered in reverse order still reach the request they belong to."""
    n = 40
    tasks = [asyncio.create_task(client.request("echo", str(i).encode())) for i in range(n)]
    received = [await broker.recv() for _ in range(n)]
    assert len({ident for ident, _ in received}) == n  # one socket per in-flight request
    for ident, frames in reversed(received):
        await broker.final(ident, b"echo", b"re:" + frames[-1])
    results = await asyncio.gather(*tasks)
    assert results == [[b"re:" + str(i).encode()] for i in range(n)]


async def test_completed_socket_is_reused(broker: FakeBroker, client: Client) -> None:
    task = asyncio.create_task(client.request("echo", b"1"))
    first, _ = await broker.recv()
    await broker.final(first, b"echo", b"r")
    await task
    task = asyncio.create_task(client.request("echo", b"2"))
    second, _ = await broker.recv()
    await broker.final(second, b"echo", b"r")
    await task
    assert first == second


async def test_silent_attempt_is_retried_on_a_fresh_socket(
    broker: FakeBroker, client: Client
) -> None:
    """RFC 7/18 client recovery: close the socket, open a new one, resend the request."""
    task = asyncio.create_task(client.request("echo", b"x"))
    first, frames1 = await broker.recv()
    second, frames2 = await broker.recv(timeout=2)  # after the 0.5 s liveness timeout
    assert frames1 == frames2
    assert first != second
    await broker.final(second, b"echo", b"ok")
    assert await task == [b"ok"]
    assert client.abandoned == 1


async def test_late_reply_to_abandoned_attempt_reaches_nobody(
    broker: FakeBroker, client: Client
) -> None:
    """The reply to an abandoned attempt is never delivered, neither to the retried request
    nor to any later request."""
    task_a = asyncio.create_task(client.request("echo", b"A"))
    old, _ = await broker.recv()
    retry, _ = await broker.recv(timeout=2)
    # The worker behind the first attempt answers late: the socket is gone, so it is lost.
    await broker.final(old, b"echo", b"late answer to A")
    task_b = asyncio.create_task(client.request("echo", b"B"))
    b_ident, b_frames = await broker.recv()
    assert b_frames[-1] == b"B"
    assert b_ident != old
    await broker.final(b_ident, b"echo", b"answer to B")
    await broker.final(retry, b"echo", b"answer to A")
    assert await task_b == [b"answer to B"]
    assert await task_a == [b"answer to A"]


async def test_partials_keep_a_long_request_alive(broker: FakeBroker, client: Client) -> None:
    """Every PARTIAL restarts the liveness timeout (0.5 s here); the request lasts ~1.2 s."""
    task = asyncio.create_task(client.request("svc", b"x"))
    ident, _ = await broker.recv()
    for _ in range(4):
        assert await broker.nothing(0.3)  # no retry while PARTIALs flow
        await broker.partial(ident, b"svc", b"progress")
    await broker.final(ident, b"svc", b"done")
    assert await task == [b"done"]
    assert client.abandoned == 0


async def test_retries_exhausted_raise_timeout_within_bound(broker: FakeBroker) -> None:
    with Client_(broker.endpoint, timeout=0.3, retries=2) as client:
        start = time.monotonic()
        with pytest.raises(RequestTimeout) as info:
            await client.request("echo", b"x")
        elapsed = time.monotonic() - start
    assert isinstance(info.value, Timeout)
    assert info.value.attempts == 3
    assert 0.85 < elapsed < 0.9 + 1.0


async def test_unreachable_broker_times_out() -> None:
    with Client_("tcp://127.0.0.1:1", timeout=0.2, retries=1) as client:
        start = time.monotonic()
        with pytest.raises(RequestTimeout):
            await client.request("echo", b"x")
        assert time.monotonic() - start < 0.4 + 1.0


async def test_failover_tries_endpoints_in_turn(ctx: zmq.asyncio.Context) -> None:
    silent, alive = FakeBroker(ctx), FakeBroker(ctx)
    with Client_([silent.endpoint, alive.endpoint], timeout=0.3, retries=1) as client:
        task = asyncio.create_task(client.request("echo", b"x"))
        await silent.recv()
        ident, _ = await alive.recv(timeout=2)
        await alive.final(ident, b"echo", b"from second")
        assert await task == [b"from second"]
        # The next request starts at the endpoint that answered.
        task = asyncio.create_task(client.request("echo", b"y"))
        ident, _ = await alive.recv()
        await alive.final(ident, b"echo", b"again")
        assert await task == [b"again"]
        assert await silent.nothing(0.05)


async def test_retry_policy_refusal_stops_after_a_partial(broker: FakeBroker) -> None:
    def not_after_partial(failed: AttemptFailed) -> bool:
        return failed.partials == 0

    with Client_(broker.endpoint, timeout=0.3, retries=3, may_retry=not_after_partial) as client:
        task = asyncio.create_task(client.request("svc", b"x"))
        ident, _ = await broker.recv()
        await broker.partial(ident, b"svc", b"started")
        with pytest.raises(RequestTimeout) as info:
            await task
        assert info.value.retry_refused
        assert info.value.attempts == 1
        assert info.value.partials == 1
        assert await broker.nothing(0.1)  # never re-sent


async def test_malformed_and_foreign_replies_are_ignored(
    broker: FakeBroker, client: Client
) -> None:
    task = asyncio.create_task(client.request("echo", b"x"))
    ident, _ = await broker.recv()
    await broker.send(ident, b"garbage")
    await broker.send(ident, b"MDPC02", b"\x07", b"echo", b"bad command")
    await broker.final(ident, b"other-service", b"not ours")
    await broker.final(ident, b"echo", b"ours")
    assert await task == [b"ours"]


async def test_socket_with_traffic_after_final_is_not_reused(
    broker: FakeBroker, client: Client
) -> None:
    """RFC 18: nothing follows a FINAL. If a broker breaks that, the socket is dropped rather
    than letting the extra message reach the next request."""
    task = asyncio.create_task(client.request("echo", b"1"))
    first, _ = await broker.recv()
    await broker.final(first, b"echo", b"r1")
    await broker.final(first, b"echo", b"stray")
    assert await task == [b"r1"]
    idle = client._idle[broker.endpoint]
    await wait_for_stray(idle[0])
    task = asyncio.create_task(client.request("echo", b"2"))
    second, _ = await broker.recv()
    assert second != first
    await broker.final(second, b"echo", b"r2")
    assert await task == [b"r2"]


async def test_cancelled_request_closes_its_socket(broker: FakeBroker, client: Client) -> None:
    task = asyncio.create_task(client.request("echo", b"1"))
    first, _ = await broker.recv()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    task = asyncio.create_task(client.request("echo", b"2"))
    second, _ = await broker.recv()
    assert second != first
    await broker.final(first, b"echo", b"late")
    await broker.final(second, b"echo", b"r2")
    assert await task == [b"r2"]


async def test_invalid_request_is_refused_before_sending(client: Client) -> None:
    with pytest.raises(ProtocolError):
        await client.request("echo")
    with pytest.raises(ProtocolError):
        await client.request("", b"x")


# ---------------------------------------------------------------------------------------------
# MMI (RFC 8)


async def test_service_exists_uses_mmi_service(broker: FakeBroker, client: Client) -> None:
    """RFC 8: mmi.service answers "200" when a worker is registered, "404" otherwise."""
    for code, expected in [(b"200", True), (b"404", False)]:
        task = asyncio.create_task(client.service_exists("shell"))
        ident, frames = await broker.recv()
        assert frames == [b"MDPC02", b"\x01", b"mmi.service", b"shell"]
        await broker.final(ident, b"mmi.service", code)
        assert await task is expected


async def test_service_exists_raises_on_501(broker: FakeBroker, client: Client) -> None:
    task = asyncio.create_task(client.service_exists("shell"))
    ident, _ = await broker.recv()
    await broker.final(ident, b"mmi.service", b"501")
    with pytest.raises(MMINotImplemented):
        await task


async def test_services_parses_mmi_services(broker: FakeBroker, client: Client) -> None:
    task = asyncio.create_task(client.services())
    ident, frames = await broker.recv()
    assert frames[:3] == [b"MDPC02", b"\x01", b"mmi.services"]
    body = msgpack.packb([{"name": "shell", "workers": 2, "queued": 0}], use_bin_type=True)
    await broker.final(ident, b"mmi.services", body)
    assert await task == [ServiceInfo("shell", 2, 0)]


async def test_services_rejects_malformed_answer(broker: FakeBroker, client: Client) -> None:
    task = asyncio.create_task(client.services())
    ident, _ = await broker.recv()
    await broker.final(ident, b"mmi.services", msgpack.packb([{"name": 3}]))
    with pytest.raises(ProtocolError):
        await task


async def wait_for_stray(sock: zmq.asyncio.Socket) -> None:
    """Wait (bounded) until the stray message is queued on `sock`, without consuming it."""
    deadline = time.monotonic() + WAIT
    while not int(sock.get(zmq.EVENTS)) & zmq.POLLIN:
        assert time.monotonic() < deadline, "the stray message never arrived"
        await asyncio.sleep(0.005)


def Client_(*args: object, **kw: object) -> _Closing:
    """A Client usable in a plain `with` block (closed on exit)."""
    return _Closing(Client(*args, **kw))  # type: ignore[arg-type]


class _Closing:
    def __init__(self, client: Client) -> None:
        self.client = client

    def __enter__(self) -> Client:
        return self.client

    def __exit__(self, *exc: object) -> None:
        self.client.close()


async def test_socket_options_make_a_curve_client(ctx: zmq.asyncio.Context) -> None:
    """`socket_options` are set before connecting: here CURVE against a CURVE ROUTER."""
    server_public, server_secret = zmq.curve_keypair()
    client_public, client_secret = zmq.curve_keypair()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.setsockopt(zmq.CURVE_SERVER, 1)
    router.setsockopt(zmq.CURVE_SECRETKEY, server_secret)
    router.bind("tcp://127.0.0.1:*")
    endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
    options = [
        (zmq.CURVE_SERVERKEY, server_public),
        (zmq.CURVE_PUBLICKEY, client_public),
        (zmq.CURVE_SECRETKEY, client_secret),
    ]
    with Client_(endpoint, timeout=2, retries=0, socket_options=options) as client:
        task = asyncio.create_task(client.request("echo", b"secret"))
        ident, *frames = await asyncio.wait_for(router.recv_multipart(), WAIT)
        assert frames[-1] == b"secret"
        await router.send_multipart([ident, b"MDPC02", b"\x03", b"echo", b"ok"])
        assert await task == [b"ok"]
    # Without a key the handshake never completes: the request gets no answer.
    with Client_(endpoint, timeout=0.2, retries=0) as plain, pytest.raises(RequestTimeout):
        await plain.request("echo", b"x")
    router.close(linger=0)
