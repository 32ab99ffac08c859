"""Interoperability: peers someone else wrote, talking through our broker.

majortomo (PyPI) speaks its own MDP/0.2 dialect: its worker keeps RFC 7's leading empty
frame, and its client sends REQUEST as 0x02 and expects PARTIAL 0x03 / FINAL 0x04 without a
service frame. Our broker serves both (spec/mdp.md). Its classes are blocking, so the worker
runs in a thread that serves a fixed number of requests and then says DISCONNECT.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest
import zmq

from tests.support import TEST_HEARTBEAT_MS, wait_until

majortomo = pytest.importorskip("majortomo")

TIMEOUT = 5.0

Handler = Callable[[list[bytes]], tuple[list[list[bytes]], list[bytes]]]
"""A request body -> (PARTIAL bodies, FINAL body)."""


class MajortomoWorkerThread:
    """A majortomo.Worker serving `count` requests in a daemon thread."""

    def __init__(self, endpoint: str, service: bytes, handler: Handler, count: int) -> None:
        self.endpoint, self.service, self.handler, self.count = endpoint, service, handler, count
        self.served: list[tuple[bytes, list[bytes]]] = []
        self.error: BaseException | None = None
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="majortomo-worker")
        self.context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()

    def _run(self) -> None:
        worker = majortomo.Worker(
            self.endpoint,
            self.service,
            heartbeat_interval=TEST_HEARTBEAT_MS / 1000,
            zmq_context=self.context,
            zmq_linger=100,
        )
        try:
            worker.connect()
            self.ready.set()
            for _ in range(self.count):
                client, body = worker.wait_for_request()
                self.served.append((client, body))
                partials, final = self.handler(body)
                for partial in partials:
                    worker.send_reply_partial(client, partial)
                worker.send_reply_final(client, final)
        except BaseException as exc:  # reported to the test by join()
            self.error = exc
        finally:
            worker.close()

    def start(self) -> MajortomoWorkerThread:
        self.thread.start()
        assert self.ready.wait(TIMEOUT), "the majortomo worker did not connect"
        return self

    def join(self) -> None:
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive(), "the majortomo worker did not finish its requests"
        if self.error is not None:
            raise self.error
        self.context.term()


def streaming(body: list[bytes]) -> tuple[list[list[bytes]], list[bytes]]:
    """Two PARTIALs, then a FINAL that echoes the request."""
    return [[b"partial-1", *body], [b"partial-2"]], [b"final", *body]


@pytest.fixture
def context() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def recv(sock: zmq.Socket[bytes], timeout: float = TIMEOUT) -> list[bytes]:
    """One message, or fail after `timeout` seconds."""
    assert sock.poll(int(timeout * 1000), zmq.POLLIN), f"nothing received within {timeout}s"
    return sock.recv_multipart()


def assert_nothing_more(sock: zmq.Socket[bytes], window: float = 0.3) -> None:
    """Nothing else arrives within `window` (three test heartbeat intervals)."""
    assert not sock.poll(int(window * 1000), zmq.POLLIN), f"unexpected {sock.recv_multipart()}"


def dealer(
    context: zmq.Context[zmq.Socket[bytes]], endpoint: str, socket_type: int = zmq.DEALER
) -> zmq.Socket[bytes]:
    sock = context.socket(socket_type)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


def test_majortomo_client_and_worker_round_trip_with_partials(broker_endpoint: str) -> None:
    """majortomo's own Client and Worker: PARTIALs and the FINAL arrive in order, twice."""
    worker = MajortomoWorkerThread(broker_endpoint, b"mt-echo", streaming, count=2).start()
    client_context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    client = majortomo.Client(broker_endpoint, zmq_context=client_context, zmq_linger=0)
    try:
        client.connect()
        for body in ([b"hello"], [b"multi", b"", b"frame"]):
            client.send(b"mt-echo", *body)
            parts = list(client.recv_all(timeout=TIMEOUT))
            assert parts == [[b"partial-1", *body], [b"partial-2"], [b"final", *body]]
    finally:
        client.close()
        client_context.term()
    worker.join()
    assert [body for _, body in worker.served] == [[b"hello"], [b"multi", b"", b"frame"]]


def test_majortomo_worker_serves_an_rfc18_client(
    broker_endpoint: str, context: zmq.Context[zmq.Socket[bytes]]
) -> None:
    """A raw RFC 18 client gets the majortomo worker's PARTIALs and FINAL in RFC 18 framing,
    with the service frame."""
    worker = MajortomoWorkerThread(broker_endpoint, b"mt-18", streaming, count=1).start()
    client = dealer(context, broker_endpoint)
    client.send_multipart([b"MDPC02", b"\x01", b"mt-18", b"q"])
    assert recv(client) == [b"MDPC02", b"\x02", b"mt-18", b"partial-1", b"q"]
    assert recv(client) == [b"MDPC02", b"\x02", b"mt-18", b"partial-2"]
    assert recv(client) == [b"MDPC02", b"\x03", b"mt-18", b"final", b"q"]
    worker.join()
    assert_nothing_more(client)


def test_majortomo_worker_serves_an_rfc7_client(
    broker_endpoint: str, context: zmq.Context[zmq.Socket[bytes]]
) -> None:
    """A raw RFC 7 client (DEALER, leading empty frame) gets exactly one REPLY, carrying the
    majortomo worker's FINAL body; its PARTIALs are dropped."""
    worker = MajortomoWorkerThread(broker_endpoint, b"mt-7", streaming, count=1).start()
    client = dealer(context, broker_endpoint)
    client.send_multipart([b"", b"MDPC01", b"mt-7", b"q"])
    assert recv(client) == [b"", b"MDPC01", b"mt-7", b"final", b"q"]
    worker.join()
    assert_nothing_more(client)


def test_rfc7_req_client_round_trips_through_an_rfc18_worker(
    broker_endpoint: str, context: zmq.Context[zmq.Socket[bytes]]
) -> None:
    """RFC 7's recommended client, a zmq.REQ socket, served by a raw RFC 18 worker: the
    worker gets the REQUEST with the client address and delimiter; the REQ socket gets one
    REPLY (MDPC01 service body; REQ strips the empty frame)."""
    worker = dealer(context, broker_endpoint)
    worker.send_multipart([b"MDPW02", b"\x01", b"req-echo"])
    client = dealer(context, broker_endpoint, zmq.REQ)
    client.send_multipart([b"MDPC01", b"req-echo", b"ping", b""])

    def request() -> list[bytes] | None:
        # Heartbeat like a live worker (the test broker expires silence after 300 ms) and
        # skip the broker's HEARTBEATs.
        worker.send_multipart([b"MDPW02", b"\x05"])
        if not worker.poll(TEST_HEARTBEAT_MS // 2, zmq.POLLIN):
            return None
        frames = worker.recv_multipart()
        return None if frames == [b"MDPW02", b"\x05"] else frames

    frames = wait_until(request, timeout=TIMEOUT, interval=0, what="the REQUEST")
    assert frames is not None
    assert frames[:2] == [b"MDPW02", b"\x02"] and frames[3:] == [b"", b"ping", b""]
    worker.send_multipart([b"MDPW02", b"\x04", frames[2], b"", b"pong"])
    assert recv(client) == [b"MDPC01", b"req-echo", b"pong"]
