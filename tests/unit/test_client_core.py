"""The client's request state machine (`mdp.client_core`), without sockets or clocks."""

from __future__ import annotations

import pytest

from mdp.client_core import AttemptFailed, RequestCore, RequestTimeout
from mdp.errors import ProtocolError, Timeout
from mdp.protocol import Version

EP = ["tcp://a:1", "tcp://b:2"]


def core(version: str = "0.2", retries: int = 2, **kw: object) -> RequestCore:
    return RequestCore(version, b"echo", [b"x"], EP, timeout=1.0, retries=retries, **kw)  # type: ignore[arg-type]


def final(body: bytes = b"r", service: bytes = b"echo") -> list[bytes]:
    return [b"MDPC02", b"\x03", service, body]


def partial(body: bytes = b"p", service: bytes = b"echo") -> list[bytes]:
    return [b"MDPC02", b"\x02", service, body]


def test_first_attempt_sends_rfc18_request_to_first_endpoint() -> None:
    """RFC 18 MDP/Client: REQUEST is MDPC02, 0x01, service, body."""
    send = core().start(0.0)
    assert send.attempt == 1
    assert send.endpoint == EP[0]
    assert send.frames == [b"MDPC02", b"\x01", b"echo", b"x"]


def test_rfc7_request_has_the_empty_envelope_frame() -> None:
    """RFC 7 MDP/Client: REQUEST is "", MDPC01, service, body."""
    send = core("0.1").start(0.0)
    assert send.frames == [b"", b"MDPC01", b"echo", b"x"]


def test_rfc7_reply_is_final() -> None:
    """RFC 7 has one REPLY per request; we surface it as the FINAL."""
    c = core("0.1")
    c.start(0.0)
    part = c.receive([b"", b"MDPC01", b"echo", b"r"], 0.1)
    assert part is not None and part.final and part.body == [b"r"]
    assert c.state == "done"


def test_invalid_service_or_empty_body_is_refused_before_sending() -> None:
    with pytest.raises(ProtocolError):
        RequestCore(Version.V02, b"", [b"x"], EP, timeout=1, retries=0)
    with pytest.raises(ProtocolError):
        RequestCore(Version.V02, b"echo", [], EP, timeout=1, retries=0)


def test_partial_resets_liveness_and_final_ends() -> None:
    """RFC 18: zero or more PARTIALs, then one FINAL; a PARTIAL proves the peers are alive."""
    c = core()
    c.start(0.0)
    assert c.deadline == 1.0
    part = c.receive(partial(), 0.8)
    assert part is not None and not part.final and part.attempt == 1
    assert c.deadline == pytest.approx(1.8)
    part = c.receive(final(), 1.5)
    assert part is not None and part.final and part.body == [b"r"]
    assert c.state == "done"
    # RFC 18: nothing follows a FINAL; anything that does is ignored.
    assert c.receive(final(), 1.6) is None


def test_reply_naming_another_service_is_ignored() -> None:
    """RFC 7/18: a reply carries the service name of the request."""
    c = core()
    c.start(0.0)
    assert c.receive(final(service=b"other"), 0.1) is None
    assert c.receive([b"garbage"], 0.1) is None
    assert c.ignored == 2
    assert c.state == "waiting"
    assert c.deadline == 1.0  # ignored messages are not proof of life


def test_silence_retries_on_the_next_endpoint_in_turn() -> None:
    c = core(retries=2)
    c.start(0.0)
    second = c.expire(1.0)
    assert (second.attempt, second.endpoint) == (2, EP[1])
    assert c.deadline == 2.0
    third = c.expire(2.0)
    assert (third.attempt, third.endpoint) == (3, EP[0])
    with pytest.raises(RequestTimeout) as info:
        c.expire(3.0)
    assert isinstance(info.value, Timeout)
    assert info.value.attempts == 3
    assert info.value.endpoints == [EP[0], EP[1], EP[0]]
    assert not info.value.retry_refused
    assert c.state == "failed"


def test_first_endpoint_rotates_the_order() -> None:
    c = core(first_endpoint=1)
    assert c.start(0.0).endpoint == EP[1]
    assert c.expire(1.0).endpoint == EP[0]


def test_retry_policy_sees_partials_and_may_refuse() -> None:
    seen: list[AttemptFailed] = []

    def policy(failed: AttemptFailed) -> bool:
        seen.append(failed)
        return failed.partials == 0

    c = core(retries=5)
    c.start(0.0)
    c.expire(1.0, policy)  # nothing received: retry allowed
    c.receive(partial(), 1.5)
    with pytest.raises(RequestTimeout) as info:
        c.expire(2.5, policy)
    assert info.value.retry_refused
    assert info.value.partials == 1
    assert [(f.attempt, f.partials, f.total_partials) for f in seen] == [(1, 0, 0), (2, 1, 1)]


def test_total_timeout_bounds_the_request_across_retries() -> None:
    c = core(retries=10, total_timeout=2.5)
    c.start(0.0)
    c.expire(1.0)
    c.expire(2.0)
    assert c.deadline == 2.5
    with pytest.raises(RequestTimeout, match=r"within 2\.5 s"):
        c.expire(2.5)


def test_no_retries_fails_after_first_silence() -> None:
    c = core(retries=0)
    c.start(0.0)
    with pytest.raises(RequestTimeout):
        c.expire(1.0)


# --- hooks for services that must not run twice (spec/mdp.md §6, command-service §14.1) ----


def test_each_attempt_gets_the_body_rebuild_makes() -> None:
    c = core(rebuild=lambda n: [f"attempt {n}".encode()])
    assert c.start(0.0).frames[-1] == b"x"  # attempt 1: the body given (already checked)
    assert c.expire(1.0).frames[-1] == b"attempt 2"
    assert c.expire(2.0).frames[-1] == b"attempt 3"


def test_settle_holds_an_attempt_without_partials_open_longer() -> None:
    c = core(settle=0.5)
    c.start(0.0)
    assert c.deadline == 1.5  # not started: kept until it can no longer start
    c.receive(partial(), 0.2)
    assert c.deadline == 1.2  # started: the plain liveness timeout


def test_a_not_run_final_turns_into_the_next_attempt() -> None:
    c = core(retries=1)
    c.start(0.0)
    c.receive(final(b"expired"), 0.1)
    retry = c.retry_after_final(0.1)
    assert retry is not None and retry.attempt == 2 and retry.endpoint == EP[1]
    assert c.state == "waiting"
    c.receive(final(b"expired"), 0.2)
    assert c.retry_after_final(0.2) is None  # no retry left: that FINAL is the answer


def test_a_not_run_final_is_not_retried_when_the_policy_refuses() -> None:
    c = core()
    c.start(0.0)
    c.receive(final(), 0.1)
    assert c.retry_after_final(0.1, lambda failed: False) is None
