"""Client rules: the suite plays the broker and the worker behind it for a one-shot client."""

from __future__ import annotations

from mdp_conformance.client import BrokerSide
from mdp_conformance.rules import SHOULD, Skip, rule
from mdp_conformance.wire import C02_REQUEST, CLIENT_HEADER, EMPTY, show


@rule("client", "RFC 7/18 MDP/Client REQUEST")
def request_framing(side: BrokerSide, version: str) -> None:
    """RFC 7/18, MDP/Client: a REQUEST is exactly "" MDPC01 service body (RFC 7; a REQ socket
    adds the empty frame) or MDPC02 0x01 service body (RFC 18). The client then takes the
    FINAL (0.1: REPLY) as its answer and exits."""
    run = side.run("hello")
    request = side.request()
    if version == "0.1":
        expected = [EMPTY, CLIENT_HEADER["0.1"], side.service, b"hello"]
    else:
        expected = [CLIENT_HEADER["0.2"], C02_REQUEST, side.service, b"hello"]
    side.final(request, [b"world"])
    assert request.frames == expected, f"the REQUEST is {request}, expected {show(expected)}"
    run.expect_output(["world"])


@rule("client", "RFC 7/18 MDP/Client: body frames")
def multi_frame_bodies(side: BrokerSide, version: str) -> None:
    """RFC 7/18, MDP/Client: request and reply bodies are one or more frames of opaque
    binary. A three-frame request arrives as three frames, in order, and all three frames of
    the FINAL reach the client's output."""
    run = side.run("alpha", "beta", "gamma")
    request = side.request()
    assert request.version is not None, f"not an MDP client REQUEST: {request}"
    side.final(request, [b"one", b"two", b"three"])
    assert request.body == (b"alpha", b"beta", b"gamma"), f"the REQUEST is {request}"
    run.expect_output(["one", "two", "three"])


@rule("client", "RFC 18 MDP/Client: PARTIAL, FINAL", versions=("0.2",))
def partial_is_not_the_answer(side: BrokerSide, version: str) -> None:
    """RFC 18, MDP/Client: the broker sends the client any number of PARTIALs and then one
    FINAL; only the FINAL ends the request. Given two PARTIALs and then the FINAL, the client
    answers with the FINAL's body, not a PARTIAL's."""
    run = side.run("stream")
    request = side.request()
    side.partial(request, [b"partial-1"])
    side.partial(request, [b"partial-2"])
    side.final(request, [b"final"])
    run.expect_output(["final"])


@rule("client", "RFC 7/18 MDP/Client: service frame of replies", level=SHOULD)
def reply_for_another_service_is_not_the_answer(side: BrokerSide, version: str) -> None:
    """RFC 7/18, MDP/Client: a reply carries the service name of the request it answers. A
    FINAL naming another service (a stray reply, for example one meant for an earlier
    request of the same socket) is not taken as the answer; the FINAL that follows is."""
    run = side.run("which")
    request = side.request()
    if not request.service_in_reply:
        side.final(request, [b"right-service"])
        run.finish()
        raise Skip("the client's framing (majortomo's) has no service frame in replies")
    side.final(request, [b"wrong-service"], service=b"conformance.other")
    side.final(request, [b"right-service"])
    run.expect_output(["right-service"])


@rule("client", "RFC 7 Reliability; zguide Majordomo client (mdcliapi)", level=SHOULD)
def retries_after_silence(side: BrokerSide, version: str) -> None:
    """RFC 7/18, Reliability: clients recover from lost requests and dead brokers by retrying.
    When the run says the client retries after --retry-after-ms of silence, the suite leaves
    the first REQUEST unanswered: the same request comes again (not sooner than half that
    time, not later than it plus 2 s), and the answer to it is the client's output."""
    if side.retry_after is None:
        raise Skip("the run does not claim the client retries (give --retry-after-ms)")
    run = side.run("again")
    first = side.request()
    second = side.request(since=1, timeout=side.retry_after + 2.0 + 1.0)
    waited = second.at - first.at
    side.final(second, [b"answered"])
    assert (second.service, second.body) == (first.service, first.body), (
        f"the retry {second} differs from the request {first}"
    )
    assert waited >= side.retry_after / 2, f"the client re-sent after only {waited:.2f}s"
    assert waited <= side.retry_after + 2.0, f"the client re-sent only after {waited:.2f}s"
    run.expect_output(["answered"])
