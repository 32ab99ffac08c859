"""Valid but unexpected worker commands: DISCONNECT, nothing forwarded, nothing afterwards.

RFC 7/18, MDP/Worker, Opening and Closing a Connection: "The broker MUST respond to any valid
but unexpected command by sending DISCONNECT and then no further commands to that worker."
Every test here also checks the broker's side of DISCONNECT (nothing at all reaches the
worker after it, not even HEARTBEAT, within the quiet window) and that a normal request
through a fresh worker still round-trips afterwards.
"""

from __future__ import annotations

import secrets

from mdp_conformance.harness import Client, Harness, Worker, unique
from mdp_conformance.rules import rule
from mdp_conformance.wire import REPLY_COMMANDS, show


def reply_variants(version: str) -> list[dict[str, str]]:
    """One case per command a worker of `version` replies with (REPLY; PARTIAL and FINAL)."""
    return [{"reply_command": command} for command in REPLY_COMMANDS[version]]


def waiting_client(peers: Harness, version: str) -> Client:
    """A client the broker knows (it has completed a round trip) that now waits for a reply
    to a request nobody can serve: the natural victim of a forwarded spoofed reply."""
    client = peers.client(version)
    helper_service = unique("helper")
    helper = peers.worker(version, helper_service)
    client.request(helper_service, b"hello")
    request = helper.expect_request()
    helper.final(request.client, b"hi")
    assert client.recv().body == [b"hi"]
    peers.close_peer(helper)
    client.request(unique("nobody"), b"waiting")
    return client


def assert_disconnected(peers: Harness, rogue: Worker) -> None:
    """The rogue got DISCONNECT, and nothing after it for the quiet window."""
    rogue.expect_disconnect()
    rogue.expect_nothing_after_disconnect()


def assert_not_forwarded(client: Client, spoofed: bytes) -> None:
    bad = [r for r in client.replies if spoofed in r.body]
    assert not bad, f"client {client.identity!r} got the spoofed reply {show(bad[0].frames)}"


@rule("broker", "RFC 7/18 Opening and Closing a Connection")
def second_ready_gets_disconnect(peers: Harness, version: str) -> None:
    """RFC 7/18, Opening and Closing a Connection: the worker MUST NOT send a further READY;
    a second READY is valid but unexpected, so the broker sends DISCONNECT and then nothing.
    A fresh worker for the same service then serves a normal request."""
    service = unique("ready2")
    rogue = peers.worker(version, service)
    rogue.ready(service)
    assert_disconnected(peers, rogue)
    peers.round_trip(service, version, version)
    assert not rogue.after_disconnect, show(rogue.after_disconnect[0].frames)


@rule("broker", "RFC 7/18 Opening and Closing; Request and Reply", variants=reply_variants)
def reply_without_a_request_gets_disconnect(
    peers: Harness, version: str, reply_command: str
) -> None:
    """RFC 7/18, Request and Reply Processing: a worker replies (RFC 7: REPLY; RFC 18: PARTIAL
    or FINAL) only to a REQUEST it holds. One from a registered worker that holds none is
    valid but unexpected: DISCONNECT, and the reply is not forwarded to the client it names
    (a client waiting for a reply on another service)."""
    service = unique("noreq")
    victim = waiting_client(peers, version)
    rogue = peers.worker(version, service)
    spoofed = b"spoofed-" + secrets.token_hex(4).encode()
    rogue.reply(reply_command, victim.identity, spoofed)
    assert_disconnected(peers, rogue)
    assert_not_forwarded(victim, spoofed)
    assert not victim.replies, f"the victim got {show(victim.replies[0].frames)}"
    peers.round_trip(service, version, version)


@rule("broker", "RFC 7/18 Opening and Closing; Request and Reply", variants=reply_variants)
def reply_naming_another_client_gets_disconnect(
    peers: Harness, version: str, reply_command: str
) -> None:
    """RFC 7/18, Request and Reply Processing: a reply carries the address of the client whose
    REQUEST the worker holds. A worker serving client A that replies to client B is valid
    but unexpected: DISCONNECT, and neither B (itself waiting for a reply) nor A receives the
    spoofed body. The broker MAY hand A's request to another worker (RFC 7/18, Goals: recover
    from dead or disconnected workers by resending requests) or drop it; both are accepted."""
    service = unique("other")
    rogue = peers.worker(version, service)
    client_a = peers.client(version)
    client_b = waiting_client(peers, version)
    client_a.request(service, b"from-a")
    request = rogue.expect_request()
    assert request.client == client_a.identity
    spoofed = b"spoofed-" + secrets.token_hex(4).encode()
    rogue.reply(reply_command, client_b.identity, spoofed)
    assert_disconnected(peers, rogue)
    assert not client_b.replies, f"client B got {show(client_b.replies[0].frames)}"
    peers.round_trip(service, version, version)
    assert_not_forwarded(client_a, spoofed)
    assert_not_forwarded(client_b, spoofed)
    assert not rogue.after_disconnect, show(rogue.after_disconnect[0].frames)


@rule("broker", "RFC 7/18 Heartbeating; Opening and Closing")
def heartbeat_before_ready_gets_disconnect(peers: Harness, version: str) -> None:
    """RFC 7/18, Heartbeating: HEARTBEAT commands are valid after a READY. One from a worker
    that never sent READY is valid but unexpected: DISCONNECT, then nothing."""
    rogue = peers.worker(version)
    rogue.heartbeat()
    assert_disconnected(peers, rogue)
    peers.round_trip(unique("after-hb"), version, version)


@rule("broker", "RFC 7/18 Opening and Closing; Request and Reply", variants=reply_variants)
def reply_before_ready_gets_disconnect(peers: Harness, version: str, reply_command: str) -> None:
    """RFC 7/18, MDP/Worker: the dialog starts with READY; a reply from a worker that never
    sent READY is valid but unexpected: DISCONNECT, and the reply is not forwarded to the
    (waiting) client it names."""
    victim = waiting_client(peers, version)
    rogue = peers.worker(version)
    spoofed = b"spoofed-" + secrets.token_hex(4).encode()
    rogue.reply(reply_command, victim.identity, spoofed)
    assert_disconnected(peers, rogue)
    assert not victim.replies, f"the victim got {show(victim.replies[0].frames)}"
    peers.round_trip(unique("after-reply"), version, version)


@rule("broker", "RFC 8; RFC 7/18 Opening and Closing")
def ready_for_an_mmi_service_gets_disconnect(peers: Harness, version: str) -> None:
    """RFC 8, Namespace: the broker MUST handle every "mmi." service itself and MUST
    disconnect a worker that registers one. The worker gets DISCONNECT, and a request for
    that name is answered by the broker ("501", not implemented), never forwarded."""
    name = b"mmi.conformance-" + secrets.token_hex(4).encode()
    rogue = peers.worker(version, name)
    assert_disconnected(peers, rogue)
    client = peers.client(version)
    reply = client.call(name, b"anything")
    assert (reply.service, reply.body) == (name, [b"501"])
    assert not rogue.after_disconnect, show(rogue.after_disconnect[0].frames)
    peers.round_trip(unique("after-mmi"), version, version)
