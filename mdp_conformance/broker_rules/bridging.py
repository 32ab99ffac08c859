"""Version bridging: a 0.1 client served by a 0.2 worker and the other way round.

Neither RFC defines talking across versions (RFC 18 says MDP/0.2 is not compatible with
MDP/0.1); a broker that speaks both on one socket has to translate, and the only translation
that keeps each client's own contract is checked here. Runs only with --mdp-version both.
"""

from __future__ import annotations

from mdp_conformance.harness import Harness, unique
from mdp_conformance.rules import BOTH, EXT, rule
from mdp_conformance.wire import C02_FINAL, CLIENT_HEADER, EMPTY


@rule("broker", "none (bridging); RFC 7 MDP/Client", level=EXT, versions=(BOTH,))
def rfc7_client_gets_only_the_final_of_an_rfc18_worker(peers: Harness) -> None:
    """RFC 7, MDP/Client: a 0.1 client gets exactly one REPLY per REQUEST. Served by a 0.2
    worker that sends PARTIALs then a FINAL, it gets one REPLY ("" MDPC01 service body) whose
    body is the FINAL's, and nothing else (the PARTIALs are dropped)."""
    service = unique("bridge")
    worker = peers.worker("0.2", service)
    client = peers.client("0.1")
    client.request(service, b"q")
    request = worker.expect_request()
    assert request.client == client.identity and request.body == [b"q"]
    worker.partial(request.client, b"p1")
    worker.partial(request.client, b"p2")
    worker.final(request.client, b"f1", b"f2")
    reply = client.recv()
    assert reply.frames == [EMPTY, CLIENT_HEADER["0.1"], service, b"f1", b"f2"]
    client.expect_silence()


@rule("broker", "none (bridging); RFC 18 MDP/Client", level=EXT, versions=(BOTH,))
def rfc18_client_gets_the_reply_of_an_rfc7_worker_as_final(peers: Harness) -> None:
    """RFC 18, MDP/Client: a 0.2 client waits for a FINAL. Served by a 0.1 worker, the
    worker's REPLY reaches it as FINAL (MDPC02 0x03 service body), and nothing else."""
    service = unique("bridge")
    worker = peers.worker("0.1", service)
    client = peers.client("0.2")
    client.request(service, b"q", EMPTY)
    request = worker.expect_request()
    assert request.client == client.identity and request.body == [b"q", EMPTY]
    worker.final(request.client, b"r1", EMPTY)
    reply = client.recv()
    assert reply.frames == [CLIENT_HEADER["0.2"], C02_FINAL, service, b"r1", EMPTY]
    client.expect_silence()
