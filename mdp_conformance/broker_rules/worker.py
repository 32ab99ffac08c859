"""MDP/Worker: heartbeating, expiry of silent workers, and DISCONNECT from the worker."""

from __future__ import annotations

import time

from mdp_conformance.harness import Client, Harness, Worker, unique
from mdp_conformance.rules import rule


def serve_one(client: Client, worker: Worker, service: bytes, body: bytes) -> None:
    """One request from `client` answered by `worker` (which proves it is registered)."""
    client.request(service, body)
    request = worker.expect_request()
    assert request.body == [body]
    worker.final(request.client, b"done", body)
    reply = client.recv()
    assert reply.final and reply.body == [b"done", body]


@rule("broker", "RFC 7/18 Heartbeating")
def broker_heartbeats_an_idle_worker(peers: Harness, version: str) -> None:
    """RFC 7/18, Heartbeating: the broker MUST send heartbeats at regular, agreed intervals.
    After READY an idle worker gets a HEARTBEAT (RFC 7: "" MDPW01 0x04; RFC 18: MDPW02 0x05,
    checked frame by frame) within about one interval, and then regularly. The RFCs do not say
    when the first one is due, so the suite allows up to two intervals (a broker that checks
    its timers once per interval) plus 250 ms of scheduling slack for every gap."""
    interval = peers.target.heartbeat
    allowed = 2 * interval + 0.25
    worker = peers.worker(version, unique("hb"))
    start = time.monotonic()
    peers.wait_for(lambda: len(worker.heartbeats) >= 3, 3 * allowed, "three broker heartbeats")
    gaps = [b - a for a, b in zip([start, *worker.heartbeats], worker.heartbeats, strict=False)]
    assert max(gaps) <= allowed, f"heartbeat gaps {gaps} exceed {allowed:.2f}s"
    assert not worker.inbox, "the broker sent an idle worker something other than HEARTBEAT"


@rule("broker", "RFC 7/18 Heartbeating")
def worker_heartbeats_keep_it_registered(peers: Harness, version: str) -> None:
    """RFC 7/18, Heartbeating: HEARTBEAT (RFC 7: "" MDPW01 0x04; RFC 18: MDPW02 0x05) is valid
    at any time after READY, and a worker that heartbeats is not considered disconnected. A
    worker heartbeating for longer than the expiry window (interval x liveness and slack) is
    neither disconnected nor forgotten: a request still reaches it."""
    service = unique("alive")
    worker = peers.worker(version, service)
    client = peers.client(version)
    peers.pump_for(peers.target.expiry_window)
    assert not worker.inbox, f"the broker sent {worker.inbox[0].frames} to a live worker"
    serve_one(client, worker, service, b"still-there")


@rule("broker", "RFC 7/18 Heartbeating")
def silent_worker_is_expired(peers: Harness, version: str) -> None:
    """RFC 7/18, Heartbeating: a peer MUST consider the other disconnected when no heartbeat
    arrives within some multiple of the interval, and the broker SHOULD then stop sending it
    messages. After interval x liveness (plus slack) of silence the worker gets no more
    requests: a new request is queued and reaches a live worker that registers later.
    RFC 7/18 (Opening and Closing) let the broker send DISCONNECT or stay silent: both are
    accepted, and so are heartbeats to the silent worker (a SHOULD NOT, not a MUST NOT)."""
    service = unique("expire")
    silent = peers.worker(version, service, heartbeat=False)
    client = peers.client(version)
    serve_one(client, silent, service, b"before")
    quiet_since = silent.last_sent
    peers.pump_for(peers.target.expiry_window - (time.monotonic() - quiet_since))
    client.request(service, b"after")
    silent.expect_no_request()
    live = peers.worker(version, service)
    request = live.expect_request()
    assert request.body == [b"after"]
    live.final(request.client, b"served-by-live")
    assert client.recv().body == [b"served-by-live"]


@rule("broker", "RFC 7/18 Opening and Closing a Connection")
def worker_disconnect_stops_all_traffic_to_it(peers: Harness, version: str) -> None:
    """RFC 7/18, Opening and Closing a Connection: the worker MAY send DISCONNECT (RFC 7:
    "" MDPW01 0x05; RFC 18: MDPW02 0x06) at any time; the broker MUST then send it no further
    commands - no HEARTBEAT and no REQUEST. A request sent afterwards waits for (and reaches)
    another worker."""
    service = unique("bye")
    leaving = peers.worker(version, service)
    client = peers.client(version)
    serve_one(client, leaving, service, b"before")
    leaving.disconnect()
    leaving.expect_nothing_after_own_disconnect()
    client.request(service, b"after")
    leaving.expect_nothing_after_own_disconnect()
    other = peers.worker(version, service)
    request = other.expect_request()
    assert request.body == [b"after"]
    other.final(request.client, b"from-other")
    assert client.recv().body == [b"from-other"]
    leaving.expect_nothing_after_own_disconnect(0)
