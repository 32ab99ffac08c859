"""MDP/Client frame layouts, both directions, through the broker to a worker and back."""

from __future__ import annotations

from mdp_conformance.harness import Harness, unique
from mdp_conformance.rules import rule
from mdp_conformance.wire import (
    C02_FINAL,
    C02_PARTIAL,
    CLIENT_HEADER,
    EMPTY,
    RFC7_REQ_CLIENT,
    WORKER_COMMANDS,
    WORKER_HEADER,
)


@rule("broker", "RFC 7/18 MDP/Client, MDP/Worker: REQUEST")
def request_reaches_worker_with_client_address_and_delimiter(peers: Harness, version: str) -> None:
    """RFC 7/18, MDP/Client REQUEST and MDP/Worker REQUEST: the client's REQUEST (RFC 7:
    "" MDPC01 service body; RFC 18: MDPC02 0x01 service body) reaches the worker as REQUEST
    (RFC 7: "" MDPW01 0x02 address "" body; RFC 18: MDPW02 0x02 address "" body).
    ROUTER Addressing / Request and Reply Processing: the address frame is the one the
    broker's ROUTER socket gave the directly connected client (its routing id)."""
    service = unique("layout")
    worker = peers.worker(version, service)
    client = peers.client(version)
    client.request(service, b"hello")
    request = worker.expect_request()
    head = [EMPTY] if version == "0.1" else []
    assert request.frames == [
        *head,
        WORKER_HEADER[version],
        WORKER_COMMANDS[version]["REQUEST"],
        client.identity,
        EMPTY,
        b"hello",
    ]


@rule("broker", "RFC 7 MDP/Client REPLY; RFC 18 MDP/Client FINAL")
def final_reaches_client_with_service_frame(peers: Harness, version: str) -> None:
    """RFC 7, MDP/Client REPLY ("" MDPC01 service body) / RFC 18, MDP/Client FINAL (MDPC02 0x03
    service body): the worker's REPLY/FINAL reaches the client with the service frame."""
    service = unique("layout")
    worker = peers.worker(version, service)
    client = peers.client(version)
    client.request(service, b"question")
    request = worker.expect_request()
    worker.final(request.client, b"answer")
    reply = client.recv()
    if version == "0.1":
        assert reply.frames == [EMPTY, CLIENT_HEADER["0.1"], service, b"answer"]
    else:
        assert reply.frames == [CLIENT_HEADER["0.2"], C02_FINAL, service, b"answer"]


@rule("broker", "RFC 18 MDP/Client: PARTIAL, FINAL", versions=("0.2",))
def partials_reach_client_in_order_before_final(peers: Harness, version: str) -> None:
    """RFC 18, MDP/Client and Request and Reply Processing: the worker's PARTIALs reach the
    client as PARTIAL (MDPC02 0x02 service body), in the order sent, then the FINAL."""
    service = unique("partial")
    worker = peers.worker(version, service)
    client = peers.client(version)
    client.request(service, b"stream")
    request = worker.expect_request()
    for i in range(3):
        worker.partial(request.client, b"part-%d" % i)
    worker.final(request.client, b"last")
    got = [client.recv().frames for _ in range(4)]
    header = CLIENT_HEADER["0.2"]
    assert got == [
        [header, C02_PARTIAL, service, b"part-0"],
        [header, C02_PARTIAL, service, b"part-1"],
        [header, C02_PARTIAL, service, b"part-2"],
        [header, C02_FINAL, service, b"last"],
    ]


@rule("broker", "RFC 18 MDP/Client; RFC 7 Architecture")
def nothing_reaches_client_after_final(peers: Harness, version: str) -> None:
    """RFC 18, MDP/Client: after a FINAL the broker SHALL NOT send the client any further
    command. RFC 7, Architecture: exactly one REPLY per request. The worker keeps sending
    replies after its FINAL/REPLY; the client sees none of them within the quiet window."""
    service = unique("final")
    worker = peers.worker(version, service)
    client = peers.client(version)
    client.request(service, b"once")
    request = worker.expect_request()
    worker.final(request.client, b"final")
    if version == "0.2":
        worker.partial(request.client, b"late-partial")
    worker.final(request.client, b"late-final")
    reply = client.recv()
    assert reply.final and reply.body == [b"final"]
    client.expect_silence()


@rule("broker", "RFC 7/18 MDP/Client, MDP/Worker: body frames")
def multi_frame_bodies_are_preserved_in_order(peers: Harness, version: str) -> None:
    """RFC 7/18, MDP/Client and MDP/Worker: request and reply bodies are "Frames 3+ / 5+ / 4+
    (opaque binary)": every frame arrives, unchanged and in order, both ways."""
    service = unique("frames")
    worker = peers.worker(version, service)
    client = peers.client(version)
    body = [b"one", EMPTY, bytes(range(256)), b"\x00", b"last"]
    client.request(service, *body)
    request = worker.expect_request()
    assert request.body == body
    answer = [b"\xff" * 1000, EMPTY, b"two", b"MDPC02", b"\x03"]
    worker.final(request.client, *answer)
    assert client.recv().body == answer


@rule("broker", "RFC 7/18 MDP/Client, MDP/Worker: body frames")
def empty_body_frame_is_allowed(peers: Harness, version: str) -> None:
    """RFC 7/18: a body is opaque binary, so a single empty body frame is a valid REQUEST
    (4 frames / 4 frames) and a valid REPLY/FINAL; both are delivered."""
    service = unique("empty")
    worker = peers.worker(version, service)
    client = peers.client(version)
    client.request(service, EMPTY)
    request = worker.expect_request()
    assert request.body == [EMPTY]
    worker.final(request.client, EMPTY)
    reply = client.recv()
    assert reply.final and reply.service == service and reply.body == [EMPTY]


@rule("broker", "RFC 7 MDP/Client: REQ socket", versions=("0.1",))
def rfc7_client_on_a_req_socket_round_trips(peers: Harness, version: str) -> None:
    """RFC 7, MDP/Client: clients SHOULD use a REQ socket, which adds the empty frame 0 to
    requests and strips it from replies; the broker serves it like a DEALER client."""
    service = unique("req")
    worker = peers.worker(version, service)
    client = peers.client(version, dialect=RFC7_REQ_CLIENT, req=True)
    client.request(service, b"ping")
    request = worker.expect_request()
    assert request.body == [b"ping"]
    worker.final(request.client, b"pong")
    reply = client.recv()
    assert reply.frames == [CLIENT_HEADER["0.1"], service, b"pong"]
