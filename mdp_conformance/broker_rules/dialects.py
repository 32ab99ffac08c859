"""Non-RFC framings that real MDP/0.2 peers use, which our broker accepts.

These are not RFC rules: they document variants our broker serves (spec/mdp.md) so that
majortomo and the C libmdp can use it. Deselect them against another broker with
`-m "not dialects"`.

    variant                  sends                           gets back
    0.2 client + empty frame "" MDPC02 0x01 service body+    "" MDPC02 0x02|0x03 service body+
    majortomo client         "" MDPC02 0x02 service body+    "" MDPC02 0x03|0x04 body+
    0.2 worker + empty frame "" MDPW02 command ...           "" MDPW02 command ...
"""

from __future__ import annotations

from mdp_conformance.harness import Harness, unique
from mdp_conformance.rules import EXT, rule
from mdp_conformance.wire import (
    C02_FINAL,
    C02_PARTIAL,
    C02_REQUEST,
    CLIENT_HEADER,
    EMPTY,
    WORKER_COMMANDS,
    WORKER_HEADER,
    ClientDialect,
    WorkerDialect,
)

RFC18_ENVELOPE_CLIENT = ClientDialect(
    "rfc18+envelope", "0.2", True, C02_REQUEST, C02_PARTIAL, C02_FINAL
)
MAJORTOMO_CLIENT = ClientDialect(
    "majortomo", "0.2", True, b"\x02", b"\x03", b"\x04", service_in_reply=False
)
RFC18_ENVELOPE_WORKER = WorkerDialect("rfc18+envelope", "0.2", True)


@rule("broker", "none (dialect)", level=EXT, versions=("0.2",))
def rfc18_client_with_a_leading_empty_frame_gets_replies_with_it(
    peers: Harness, version: str
) -> None:
    """Variant: a 0.2 client that keeps RFC 7's empty frame 0 ("" MDPC02 0x01 service body)
    is answered in the same framing: "" MDPC02 0x02 service body for each PARTIAL and
    "" MDPC02 0x03 service body for the FINAL."""
    service = unique("envelope-client")
    worker = peers.worker(version, service)
    client = peers.client(version, dialect=RFC18_ENVELOPE_CLIENT)
    client.request(service, b"q")
    request = worker.expect_request()
    assert request.client == client.identity and request.body == [b"q"]
    worker.partial(request.client, b"p")
    worker.final(request.client, b"f")
    header = CLIENT_HEADER["0.2"]
    assert client.recv().frames == [EMPTY, header, C02_PARTIAL, service, b"p"]
    assert client.recv().frames == [EMPTY, header, C02_FINAL, service, b"f"]


@rule("broker", "none (dialect)", level=EXT, versions=("0.2",))
def majortomo_client_gets_partial_3_and_final_4_without_service_frame(
    peers: Harness, version: str
) -> None:
    """Variant: majortomo's client sends REQUEST as 0x02 ("" MDPC02 0x02 service body; an
    RFC 18 client never sends 0x02) and expects PARTIAL 0x03 / FINAL 0x04 with no service
    frame: "" MDPC02 0x03 body and "" MDPC02 0x04 body."""
    service = unique("majortomo-client")
    worker = peers.worker(version, service)
    client = peers.client(version, dialect=MAJORTOMO_CLIENT)
    client.request(service, b"q1", b"q2")
    request = worker.expect_request()
    assert request.client == client.identity and request.body == [b"q1", b"q2"]
    worker.partial(request.client, b"p")
    worker.final(request.client, b"f1", b"f2")
    header = CLIENT_HEADER["0.2"]
    assert client.recv().frames == [EMPTY, header, b"\x03", b"p"]
    assert client.recv().frames == [EMPTY, header, b"\x04", b"f1", b"f2"]


@rule("broker", "none (dialect)", level=EXT, versions=("0.2",))
def rfc18_worker_with_a_leading_empty_frame_is_served_with_it(peers: Harness, version: str) -> None:
    """Variant: a 0.2 worker that keeps RFC 7's empty frame 0 ("" MDPW02 0x01 service, as
    majortomo's and the C libmdp's workers do) is registered, gets REQUEST as
    "" MDPW02 0x02 address "" body and HEARTBEAT as "" MDPW02 0x05, and its PARTIAL/FINAL
    reach an RFC 18 client."""
    service = unique("envelope-worker")
    worker = peers.worker(version, service, dialect=RFC18_ENVELOPE_WORKER)
    client = peers.client(version)
    client.request(service, b"q")
    request = worker.expect_request()
    assert request.frames == [
        EMPTY,
        WORKER_HEADER["0.2"],
        WORKER_COMMANDS["0.2"]["REQUEST"],
        client.identity,
        EMPTY,
        b"q",
    ]
    worker.partial(request.client, b"p")
    worker.final(request.client, b"f")
    assert [client.recv().frames for _ in range(2)] == [
        [CLIENT_HEADER["0.2"], C02_PARTIAL, service, b"p"],
        [CLIENT_HEADER["0.2"], C02_FINAL, service, b"f"],
    ]
    # Heartbeats come in the worker's own framing (the harness checks every frame).
    allowed = 2 * peers.target.heartbeat + 0.25
    peers.wait_for(lambda: worker.heartbeats, allowed, "a HEARTBEAT in the worker's framing")
