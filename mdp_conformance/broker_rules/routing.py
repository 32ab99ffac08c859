"""Routing: queueing, worker selection, service isolation, concurrency, request expiry."""

from __future__ import annotations

import time

from mdp_conformance.harness import REPLY_TIMEOUT, Client, Harness, Worker, unique
from mdp_conformance.rules import SHOULD, Skip, rule
from mdp_conformance.wire import show


@rule("broker", "RFC 7/18 Architecture: service queues", level=SHOULD)
def request_is_queued_until_a_worker_registers(peers: Harness, version: str) -> None:
    """RFC 7/18, MDP/Client: the broker SHOULD queue requests for a service no worker has
    registered. The request sits in the broker for the quiet window (the client gets nothing),
    then reaches the first worker that sends READY for the service."""
    service = unique("late")
    client = peers.client(version)
    client.request(service, b"early")
    client.expect_silence()
    worker = peers.worker(version, service)
    request = worker.expect_request()
    assert request.body == [b"early"]
    worker.final(request.client, b"served-late")
    assert client.recv().body == [b"served-late"]


@rule("broker", "RFC 7/18 Goals: LRU", level=SHOULD)
def requests_go_to_the_least_recently_used_worker(peers: Harness, version: str) -> None:
    """RFC 7/18, Goals and Architecture: the broker MAY deliver requests on any basis and the
    protocol is designed to allow least-recently-used dispatch; this checks LRU. Requests are
    sent one at a time to three idle workers of one service. Once every worker has served one
    (which also proves all three READYs were processed, whatever order they arrived in), each
    further request must go to the worker whose last reply is the oldest."""
    service = unique("lru")
    workers = [peers.worker(version, service) for _ in range(3)]
    client = peers.client(version)
    last_reply: dict[bytes, int] = {}

    def serve(n: int) -> Worker:
        client.request(service, b"%d" % n)
        peers.wait_for(lambda: any(w.inbox for w in workers), REPLY_TIMEOUT, f"request {n}")
        peers.pump(0)
        chosen = [w for w in workers if w.inbox]
        assert len(chosen) == 1, f"request {n} reached {len(chosen)} workers"
        worker = chosen[0]
        request = worker.expect_request()
        assert request.body == [b"%d" % n]
        worker.final(request.client, b"ok")
        assert client.recv().body == [b"ok"]
        last_reply[worker.identity] = n
        return worker

    warm_up = 0
    while len(last_reply) < len(workers):
        assert warm_up < 12, f"{warm_up} requests used only {len(last_reply)} of 3 workers"
        serve(warm_up)
        warm_up += 1
    for n in range(warm_up, warm_up + 6):
        expected = min(last_reply, key=last_reply.__getitem__)
        got = serve(n)
        assert got.identity == expected, (
            f"request {n} went to {got.identity!r}, least recently used was {expected!r}"
        )


@rule("broker", "RFC 7/18 MDP/Client: service name")
def services_are_isolated(peers: Harness, version: str) -> None:
    """RFC 7/18, MDP/Client: the service name matches the one a worker gave in READY; a
    request reaches only a worker of its own service, the reply names that service, and a
    request for a service without workers reaches nobody."""
    service_a, service_b, service_c = unique("iso-a"), unique("iso-b"), unique("iso-c")
    worker_a = peers.worker(version, service_a)
    worker_b = peers.worker(version, service_b)
    client_a, client_b, client_c = (peers.client(version) for _ in range(3))
    client_c.request(service_c, b"for-c")
    client_a.request(service_a, b"for-a")
    client_b.request(service_b, b"for-b")
    request_a = worker_a.expect_request()
    request_b = worker_b.expect_request()
    assert request_a.body == [b"for-a"] and request_a.client == client_a.identity
    assert request_b.body == [b"for-b"] and request_b.client == client_b.identity
    worker_a.final(request_a.client, b"from-a")
    worker_b.final(request_b.client, b"from-b")
    reply_a, reply_b = client_a.recv(), client_b.recv()
    assert (reply_a.service, reply_a.body) == (service_a, [b"from-a"])
    assert (reply_b.service, reply_b.body) == (service_b, [b"from-b"])
    worker_a.expect_no_request(allow_disconnect=False)
    assert not worker_b.inbox, f"worker b got {show(worker_b.inbox[0].frames)}"
    assert not client_c.replies


@rule("broker", "RFC 7/18 Request and Reply Processing")
def concurrent_clients_get_only_their_own_replies(peers: Harness, version: str) -> None:
    """RFC 7/18, Request and Reply Processing: the broker routes each reply by the client
    address the worker returns. Fifty clients with a request each in flight at once, served
    by four workers (0.2 workers send a PARTIAL then a FINAL): every client gets exactly its
    own reply, and nothing else arrives on any client afterwards."""
    service = unique("many")
    workers = [peers.worker(version, service) for _ in range(4)]
    clients = [peers.client(version) for _ in range(50)]
    for i, client in enumerate(clients):
        client.request(service, client.identity, b"payload-%d" % i)
    done: dict[bytes, list[list[bytes]]] = {c.identity: [] for c in clients}
    finals = 0

    def serve() -> bool:
        nonlocal finals
        for worker in workers:
            while worker.inbox:
                request = worker.expect_request(0)
                assert request.client == request.body[0], "REQUEST names another client"
                if version == "0.2":
                    worker.partial(request.client, b"partial", *request.body)
                worker.final(request.client, b"final", *request.body)
        for client in clients:
            while client.replies:
                reply = client.replies.popleft()
                assert reply.service == service
                done[client.identity].append([reply.kind.encode(), *reply.body])
                finals += reply.final
        return finals >= len(clients)

    peers.wait_for(serve, 10.0, "fifty replies")
    peers.pump_for(peers.target.quiet)
    serve()
    for i, client in enumerate(clients):
        body = [client.identity, b"payload-%d" % i]
        expected = [[b"FINAL", b"final", *body]]
        if version == "0.2":
            expected.insert(0, [b"PARTIAL", b"partial", *body])
        assert done[client.identity] == expected, f"client {i} got {done[client.identity]}"


@rule("broker", "RFC 7/18 MDP/Client: request expiry", level=SHOULD)
def queued_request_expires_after_the_request_ttl(peers: Harness, version: str) -> None:
    """RFC 7/18, MDP/Client: the broker SHOULD expire requests for a service with no worker
    after a configurable time. A request older than the broker's TTL (--request-ttl) is not
    delivered to a worker that registers afterwards; a fresh request is. The suite allows one
    heartbeat interval plus 250 ms past the TTL for a broker that expires on a timer tick."""
    ttl = peers.target.request_ttl
    if ttl is None:
        raise Skip("the broker's request TTL is unknown (pass --request-ttl)")
    service = unique("ttl")
    stale = peers.client(version)
    stale.request(service, b"stale")
    sent = time.monotonic()
    stale.expect_silence(ttl + peers.target.heartbeat + 0.25 - (time.monotonic() - sent))
    worker = peers.worker(version, service)
    fresh: Client = peers.client(version)
    worker.expect_no_request()
    fresh.request(service, b"fresh")
    request = worker.expect_request()
    assert request.body == [b"fresh"], "the expired request was delivered"
    worker.final(request.client, b"ok")
    assert fresh.recv().body == [b"ok"]
    stale.expect_silence(0)
