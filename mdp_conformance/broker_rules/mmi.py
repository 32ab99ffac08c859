"""MMI (RFC 8): the broker answers the mmi.* namespace itself."""

from __future__ import annotations

import time

from mdp_conformance.harness import REPLY_TIMEOUT, Client, Harness, unique
from mdp_conformance.rules import rule
from mdp_conformance.wire import show


def mmi(client: Client, service: bytes, *body: bytes) -> bytes:
    """Ask an MMI service; return the one-frame answer after checking the reply's layout."""
    client.request(service, *body)
    partials, final = client.recv_final()
    assert not partials, f"MMI answered with PARTIAL {show(partials[0].frames)}"
    assert final.service == service, f"MMI reply must carry service {service!r}"
    assert len(final.body) == 1, f"MMI reply body must be one frame: {show(final.frames)}"
    return final.body[0]


@rule("broker", "RFC 8 Default services")
def mmi_service_answers_200_for_a_registered_service(peers: Harness, version: str) -> None:
    """RFC 8, Default services: mmi.service answers "200" when at least one worker is
    registered for the service named in the request body; the reply carries the service
    frame "mmi.service". The READY travels on another connection than the query, so "404"
    is accepted until the broker has seen it (polled with a deadline)."""
    service = unique("mmi")
    peers.worker(version, service)
    client = peers.client(version)
    deadline = time.monotonic() + REPLY_TIMEOUT
    while (answer := mmi(client, b"mmi.service", service)) != b"200":
        assert answer == b"404", f"mmi.service answered {answer!r}"
        assert time.monotonic() < deadline, "mmi.service never answered 200"
        peers.pump(peers.tick_s)


@rule("broker", "RFC 8 Default services")
def mmi_service_answers_404_for_an_unknown_service(peers: Harness, version: str) -> None:
    """RFC 8, Default services: mmi.service answers "404" when no worker is registered for
    the service; the reply carries the service frame "mmi.service"."""
    client = peers.client(version)
    assert mmi(client, b"mmi.service", unique("absent")) == b"404"


@rule("broker", "RFC 8 Default services")
def unimplemented_mmi_service_answers_501(peers: Harness, version: str) -> None:
    """RFC 8, Default services: any unimplemented service in the mmi. namespace results in
    "501"; the reply carries the service frame ("mmi.foo")."""
    client = peers.client(version)
    assert mmi(client, b"mmi.foo", b"anything") == b"501"
