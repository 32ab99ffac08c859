"""The broker's rules, checked on the sans-IO core: frames and time in, frames out."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mdp.broker.core import BrokerConfig, BrokerCore

HB = 1.0  # heartbeat interval of these tests, seconds
LIVENESS = 3

W02 = b"MDPW02"
W01 = b"MDPW01"
C02 = b"MDPC02"
C01 = b"MDPC01"


def core(**overrides: object) -> BrokerCore:
    settings_ = {"heartbeat_interval": HB, "liveness": LIVENESS, "request_ttl": 10.0}
    settings_.update(overrides)
    return BrokerCore(BrokerConfig(**settings_))  # type: ignore[arg-type]


def sent(broker: BrokerCore) -> list[list[bytes]]:
    out = list(broker.outbox)
    broker.outbox.clear()
    return out


def ready02(broker: BrokerCore, worker: bytes, service: bytes = b"echo", now: float = 0) -> None:
    broker.handle(worker, [W02, b"\x01", service], now)


def ready01(broker: BrokerCore, worker: bytes, service: bytes = b"echo", now: float = 0) -> None:
    broker.handle(worker, [b"", W01, b"\x01", service], now)


def request02(broker: BrokerCore, client: bytes, service: bytes = b"echo", *body: bytes) -> None:
    broker.handle(client, [C02, b"\x01", service, *(body or (b"hi",))], 0)


# --- routing ------------------------------------------------------------------------------


def test_request_goes_to_idle_worker_with_client_envelope() -> None:
    """RFC 18 MDP/Worker REQUEST: header, 0x02, client address, empty delimiter, body."""
    b = core()
    ready02(b, b"W")
    request02(b, b"C", b"echo", b"a", b"", b"c")
    assert sent(b) == [[b"W", W02, b"\x02", b"C", b"", b"a", b"", b"c"]]


def test_final_is_routed_to_the_client_with_the_service_frame() -> None:
    """RFC 18 MDP/Client FINAL: MDPC02, 0x03, service, body."""
    b = core()
    ready02(b, b"W")
    request02(b, b"C")
    sent(b)
    b.handle(b"W", [W02, b"\x03", b"C", b"", b"p1"], 0.1)
    b.handle(b"W", [W02, b"\x04", b"C", b"", b"f1", b"f2"], 0.2)
    assert sent(b) == [
        [b"C", C02, b"\x02", b"echo", b"p1"],
        [b"C", C02, b"\x03", b"echo", b"f1", b"f2"],
    ]


def test_requests_wait_for_a_worker_that_registers_later() -> None:
    """RFC 7/18: the broker SHOULD queue requests for a service with no worker yet."""
    b = core()
    request02(b, b"C1", b"echo", b"1")
    request02(b, b"C2", b"echo", b"2")
    assert sent(b) == []
    ready02(b, b"W", now=1)
    assert sent(b) == [[b"W", W02, b"\x02", b"C1", b"", b"1"]]
    b.handle(b"W", [W02, b"\x04", b"C1", b"", b"r1"], 1)
    assert sent(b) == [
        [b"C1", C02, b"\x03", b"echo", b"r1"],
        [b"W", W02, b"\x02", b"C2", b"", b"2"],
    ]


def test_least_recently_used_worker_gets_the_next_request() -> None:
    b = core()
    for w in (b"W1", b"W2", b"W3"):
        ready02(b, w)
    order = []
    for i in range(6):
        client = b"C%d" % i
        request02(b, client)
        (message,) = sent(b)
        order.append(message[0])
        b.handle(message[0], [W02, b"\x04", client, b"", b"ok"], 0)
        sent(b)
    assert order == [b"W1", b"W2", b"W3", b"W1", b"W2", b"W3"]


def test_services_are_isolated() -> None:
    b = core()
    ready02(b, b"WA", b"a")
    request02(b, b"C", b"b")
    assert sent(b) == []
    assert b.services[b"b"].requests
    assert b.services[b"a"].idle_count == 1


# --- version bridging ---------------------------------------------------------------------


def test_v01_client_served_by_v02_worker_gets_only_the_final_as_reply() -> None:
    b = core()
    ready02(b, b"W")
    b.handle(b"C", [b"", C01, b"echo", b"q"], 0)
    assert sent(b) == [[b"W", W02, b"\x02", b"C", b"", b"q"]]
    b.handle(b"W", [W02, b"\x03", b"C", b"", b"partial"], 0)
    assert sent(b) == []
    b.handle(b"W", [W02, b"\x04", b"C", b"", b"final"], 0)
    assert sent(b) == [[b"C", b"", C01, b"echo", b"final"]]


def test_v02_client_served_by_v01_worker_gets_the_reply_as_final() -> None:
    b = core()
    ready01(b, b"W")
    request02(b, b"C", b"echo", b"q")
    assert sent(b) == [[b"W", b"", W01, b"\x02", b"C", b"", b"q"]]
    b.handle(b"W", [b"", W01, b"\x03", b"C", b"", b"r"], 0)
    assert sent(b) == [[b"C", C02, b"\x03", b"echo", b"r"]]


def test_majortomo_client_dialect_gets_shifted_bytes_without_service() -> None:
    b = core()
    ready02(b, b"W")
    b.handle(b"C", [b"", C02, b"\x02", b"echo", b"q"], 0)
    sent(b)
    b.handle(b"W", [W02, b"\x03", b"C", b"", b"p"], 0)
    b.handle(b"W", [W02, b"\x04", b"C", b"", b"f"], 0)
    assert sent(b) == [[b"C", b"", C02, b"\x03", b"p"], [b"C", b"", C02, b"\x04", b"f"]]


def test_v02_peers_with_a_leading_empty_frame_are_answered_with_it() -> None:
    b = core()
    b.handle(b"W", [b"", W02, b"\x01", b"echo"], 0)
    b.handle(b"C", [b"", C02, b"\x01", b"echo", b"q"], 0)
    assert sent(b) == [[b"W", b"", W02, b"\x02", b"C", b"", b"q"]]
    b.handle(b"W", [b"", W02, b"\x04", b"C", b"", b"f"], 0)
    assert sent(b) == [[b"C", b"", C02, b"\x03", b"echo", b"f"]]


# --- heartbeats and expiry ----------------------------------------------------------------


def test_idle_worker_gets_heartbeats_every_interval() -> None:
    b = core()
    ready02(b, b"W")
    t = 0.0
    beats = []
    while t < 5:
        b.handle(b"W", [W02, b"\x05"], t)  # the worker heartbeats too, so it stays alive
        t = b.tick(t)
        beats += [t for m in sent(b) if m == [b"W", W02, b"\x05"]]
    assert 4 <= len(beats) <= 5


def test_any_worker_command_counts_as_a_heartbeat() -> None:
    """RFC 7/18 Heartbeating: any received command except DISCONNECT acts as a heartbeat."""
    b = core()
    ready02(b, b"W")
    request02(b, b"C")
    for t in range(1, 10):
        b.handle(b"W", [W02, b"\x03", b"C", b"", b"p"], t)
        b.tick(t + 0.5)
    assert b"W" in b.workers


def test_silent_worker_expires_after_interval_times_liveness() -> None:
    b = core()
    ready02(b, b"W")
    b.tick(HB * LIVENESS - 0.01)
    assert b"W" in b.workers
    sent(b)
    b.tick(HB * LIVENESS)
    assert b"W" not in b.workers
    assert [b"W", W02, b"\x06"] in sent(b)
    assert b.stats.workers_expired == 1
    assert b"echo" not in b.services


def test_silent_busy_worker_expires_too_and_its_request_is_not_resent() -> None:
    b = core()
    ready02(b, b"W1")
    request02(b, b"C")
    ready02(b, b"W2", now=2.5)
    sent(b)
    b.tick(HB * LIVENESS)
    assert b"W1" not in b.workers
    assert not any(m[0] == b"W2" and m[2] == b"\x02" for m in sent(b))
    assert b.stats.requests_lost_with_worker == 1


def test_busy_timeout_relaxes_expiry_of_a_worker_holding_a_request() -> None:
    b = core(busy_timeout=30.0)
    ready02(b, b"W")
    request02(b, b"C")
    b.tick(20)
    assert b"W" in b.workers
    b.tick(30)
    assert b"W" not in b.workers


def test_busy_timeout_does_not_apply_to_idle_workers() -> None:
    b = core(busy_timeout=30.0)
    ready02(b, b"W")
    b.tick(HB * LIVENESS)
    assert b"W" not in b.workers


def test_queued_request_expires_after_ttl() -> None:
    b = core(request_ttl=2.0)
    request02(b, b"C")
    b.tick(1.0)
    assert b.queued() == 1
    b.tick(2.0)
    assert b.queued() == 0
    assert b.stats.requests_expired == 1
    ready02(b, b"W", now=2.5)
    assert sent(b) == []


def test_expired_request_is_not_delivered_even_before_a_tick() -> None:
    b = core(request_ttl=2.0)
    request02(b, b"C")
    ready02(b, b"W", now=3.0)
    assert sent(b) == []
    assert b.stats.requests_expired == 1


def test_queue_bound_drops_and_counts() -> None:
    b = core(max_queue=3)
    for i in range(5):
        request02(b, b"C%d" % i)
    assert b.queued() == 3
    assert b.stats.requests_dropped_queue_full == 2


# --- strictness ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "frames",
    [
        pytest.param([W02, b"\x01", b"echo"], id="second READY"),
        pytest.param([W02, b"\x04", b"C", b"", b"x"], id="FINAL without a request"),
        pytest.param([W02, b"\x03", b"C", b"", b"x"], id="PARTIAL without a request"),
        pytest.param([b"", W02, b"\x05"], id="switches dialect"),
    ],
)
def test_unexpected_command_from_registered_worker_gets_disconnect(frames: list[bytes]) -> None:
    """RFC 7/18: a valid but unexpected command gets DISCONNECT and nothing more."""
    b = core()
    ready02(b, b"W")
    b.handle(b"W", frames, 0)
    assert sent(b) == [[b"W", W02, b"\x06"]]
    assert b"W" not in b.workers


def test_final_for_another_client_is_not_forwarded() -> None:
    b = core()
    ready02(b, b"W")
    request02(b, b"C")
    sent(b)
    b.handle(b"W", [W02, b"\x04", b"OTHER", b"", b"spoof"], 0)
    assert sent(b) == [[b"W", W02, b"\x06"]]


@pytest.mark.parametrize(
    "frames",
    [
        pytest.param([W02, b"\x05"], id="HEARTBEAT before READY"),
        pytest.param([W02, b"\x04", b"C", b"", b"x"], id="FINAL before READY"),
        pytest.param([b"", W01, b"\x03", b"C", b"", b"x"], id="REPLY before READY"),
        pytest.param([W02, b"\x01", b"mmi.service"], id="READY for mmi.*"),
    ],
)
def test_unexpected_command_from_unknown_peer_gets_disconnect(frames: list[bytes]) -> None:
    b = core()
    b.handle(b"W", frames, 0)
    (reply,) = sent(b)
    assert reply[0] == b"W" and reply[-1] in (b"\x05", b"\x06")
    assert not b.workers


def test_worker_disconnect_is_honoured_silently() -> None:
    b = core()
    ready02(b, b"W")
    b.handle(b"W", [W02, b"\x06"], 0)
    assert not b.workers
    request02(b, b"C")
    b.tick(0.5)
    assert sent(b) == []


@pytest.mark.parametrize(
    "frames",
    [
        [],
        [b""],
        [b"XXXX", b"\x01", b"echo", b"x"],
        [C02, b"\x09", b"echo", b"x"],
        [C02, b"\x01", b"echo"],
        [C02, b"\x01", b"", b"x"],
        [b"", C01, b"echo"],
        [C01, b"echo", b"x"],
        [W02, b"\x07"],
        [W02],
        [W02, b"\x01"],
        [W02, b"\x01", b"a", b"b"],
        [W02, b"\x04", b"C", b"x", b"body"],
        [W02, b"\x04", b"", b"", b"body"],
        [W02, b"\x04", b"C", b""],
        [W02, b"\x05", b"extra"],
        [C02, b"\x01", b"bad\nname", b"x"],
        [C02, b"\x01", b"x" * 256, b"x"],
    ],
)
def test_invalid_messages_are_dropped_and_counted(frames: list[bytes]) -> None:
    b = core()
    ready02(b, b"W")
    b.handle(b"P", frames, 0)
    assert sent(b) == []
    assert b.stats.invalid_messages == 1
    request02(b, b"C")
    assert sent(b)[0][0] == b"W"


# --- MMI ----------------------------------------------------------------------------------


def test_mmi_service_answers_200_for_a_registered_service_and_404_otherwise() -> None:
    """RFC 8: mmi.service replies 200 if a worker is registered for the service, else 404."""
    b = core()
    ready02(b, b"W")
    b.handle(b"C", [C02, b"\x01", b"mmi.service", b"echo"], 0)
    b.handle(b"C", [C02, b"\x01", b"mmi.service", b"nope"], 0)
    b.handle(b"C", [b"", C01, b"mmi.service", b"echo"], 0)
    assert sent(b) == [
        [b"C", C02, b"\x03", b"mmi.service", b"200"],
        [b"C", C02, b"\x03", b"mmi.service", b"404"],
        [b"C", b"", C01, b"mmi.service", b"200"],
    ]


def test_mmi_service_is_404_for_a_service_with_only_queued_requests() -> None:
    b = core()
    request02(b, b"C", b"later")
    b.handle(b"C", [C02, b"\x01", b"mmi.service", b"later"], 0)
    assert sent(b)[-1][-1] == b"404"


def test_unknown_mmi_service_answers_501() -> None:
    """RFC 8: unimplemented mmi.* services reply 501."""
    b = core()
    b.handle(b"C", [C02, b"\x01", b"mmi.nope", b""], 0)
    assert sent(b) == [[b"C", C02, b"\x03", b"mmi.nope", b"501"]]


def test_mmi_services_lists_workers_and_queue_depth() -> None:
    b = core()
    ready02(b, b"W1", b"a")
    ready02(b, b"W2", b"a")
    request02(b, b"C", b"b")
    b.handle(b"C", [C02, b"\x01", b"mmi.services", b""], 0)
    reply = sent(b)[-1]
    assert reply[:4] == [b"C", C02, b"\x03", b"mmi.services"]
    listing = sorted(msgpack.unpackb(reply[4]), key=lambda s: s["name"])
    assert listing == [
        {"name": "a", "workers": 2, "queued": 0},
        {"name": "b", "workers": 0, "queued": 1},
    ]


def test_mmi_services_of_an_insecure_broker_says_who_is_unauthenticated() -> None:
    """spec/security.md §6.2: a broker open to unauthenticated peers says so in every answer."""
    b = core()
    b.handle(b"C", [C02, b"\x01", b"mmi.services", b""], 0)
    assert len(sent(b)[-1]) == 5  # a secure broker: the list alone
    b.unauthenticated = ("tcp://127.0.0.1:5555",)
    b.handle(b"C", [C02, b"\x01", b"mmi.services", b""], 0)
    reply = sent(b)[-1]
    assert reply[:4] == [b"C", C02, b"\x03", b"mmi.services"] and len(reply) == 6
    assert msgpack.unpackb(reply[5]) == {"unauthenticated": ["tcp://127.0.0.1:5555"]}


# --- shutdown -----------------------------------------------------------------------------


def test_disconnect_all_says_disconnect_to_every_worker_in_its_framing() -> None:
    b = core()
    ready02(b, b"W2")
    ready01(b, b"W1")
    b.disconnect_all()
    assert sorted(sent(b)) == sorted([[b"W2", W02, b"\x06"], [b"W1", b"", W01, b"\x05"]])
    assert not b.workers and not b.services


# --- consistency under random input -------------------------------------------------------


def check_invariants(b: BrokerCore) -> None:
    for identity, worker in b.workers.items():
        assert worker.identity == identity and not worker.gone
        assert b.services.get(worker.service.name) is worker.service
        in_idle = sum(1 for w in worker.service.idle if w is worker)
        assert in_idle == (0 if worker.request is not None else 1)
    for name, service in b.services.items():
        assert service.name == name
        members = [w for w in b.workers.values() if w.service is service]
        assert service.worker_count == len(members)
        live_idle = [w for w in service.idle if not w.gone]
        assert service.idle_count == len(live_idle)
        assert not (live_idle and service.requests), "idle worker while requests wait"
        assert len(service.requests) <= b.config.max_queue
        assert service.worker_count or service.requests or name not in b.services


IDS = st.sampled_from([b"A", b"B", b"C", b"D"])
HEADERS = st.sampled_from([b"", b"MDPC01", b"MDPC02", b"MDPW01", b"MDPW02", b"junk"])
COMMANDS = st.sampled_from([b"\x00", b"\x01", b"\x02", b"\x03", b"\x04", b"\x05", b"\x06", b"\x07"])
SMALL = st.sampled_from([b"", b"echo", b"mmi.service", b"mmi.x", b"A", b"B", b"other"])
FRAME = st.one_of(HEADERS, COMMANDS, SMALL, IDS, st.binary(max_size=8))
MESSAGE = st.one_of(
    st.lists(FRAME, max_size=8),
    st.tuples(
        st.lists(st.just(b""), max_size=1), HEADERS, COMMANDS, st.lists(FRAME, max_size=4)
    ).map(lambda t: [*t[0], t[1], t[2], *t[3]]),
)
STEP = st.tuples(IDS, MESSAGE, st.floats(min_value=0, max_value=2))


@settings(max_examples=400, deadline=None)
@given(st.lists(STEP, max_size=60))
def test_random_frames_never_raise_and_keep_state_consistent(steps: list) -> None:  # type: ignore[type-arg]
    b = core(max_queue=3, request_ttl=3.0)
    now = 0.0
    for identity, frames, dt in steps:
        now += dt
        b.handle(identity, frames, now)
        if dt > 1:
            b.tick(now)
        check_invariants(b)
        for message in b.outbox:
            assert message and message[0] in (b"A", b"B", b"C", b"D")
        b.outbox.clear()
    b.tick(now + 100)
    check_invariants(b)
    assert not b.workers and not b.services


def test_expel_disconnects_a_worker_and_loses_its_request() -> None:
    b = core()
    ready02(b, b"W")
    request02(b, b"C")
    sent(b)
    assert b.expel(b"W") is True
    assert sent(b) == [[b"W", W02, b"\x06"]]
    assert not b.workers and b.stats.requests_lost_with_worker == 1
    assert b.expel(b"W") is False


# --- connections that closed (spec/mdp.md §3.4, §4.2) ------------------------------------


def test_an_undelivered_request_goes_to_the_next_idle_worker() -> None:
    """The REQUEST to a worker whose connection is gone could not be sent: it was never
    delivered, so the next worker gets it, and the gone worker is forgotten."""
    b = core()
    ready02(b, b"W1")
    ready02(b, b"W2")
    request02(b, b"C", b"echo", b"x")
    (delivery,) = b.outbox
    sent(b)
    b.unroutable(b"W1", delivery, 0.5)
    assert sent(b) == [[b"W2", W02, b"\x02", b"C", b"", b"x"]]
    assert set(b.workers) == {b"W2"}
    assert (b.stats.requests_requeued, b.stats.workers_gone) == (1, 1)
    assert b.stats.requests_lost_with_worker == 0


def test_an_undelivered_request_waits_at_the_head_of_the_queue() -> None:
    b = core()
    ready02(b, b"W1")
    request02(b, b"C1", b"echo", b"1")
    (delivery,) = b.outbox
    sent(b)
    request02(b, b"C2", b"echo", b"2")  # queued behind: W1 is busy
    b.unroutable(b"W1", delivery, 0.5)
    assert sent(b) == []
    ready02(b, b"W2", now=1)
    assert sent(b) == [[b"W2", W02, b"\x02", b"C1", b"", b"1"]]


def test_a_failed_heartbeat_forgets_a_busy_worker_and_its_request_is_lost() -> None:
    """At most once: a request that was delivered is never given to another worker."""
    b = core()
    ready02(b, b"W1")
    ready02(b, b"W2")
    request02(b, b"C", b"echo", b"x")
    sent(b)
    b.probe(0.5)
    probes = sent(b)
    assert sorted(p[0] for p in probes) == [b"W1", b"W2"]
    assert all(p[1:] == [W02, b"\x05"] for p in probes)
    busy = next(p for p in probes if p[0] == b"W1")
    b.unroutable(b"W1", busy, 0.5)
    b.confirm_gone(0.5)  # nothing more came from W1
    assert sent(b) == []
    assert set(b.workers) == {b"W2"}
    assert b.stats.requests_lost_with_worker == 1


def test_a_final_read_after_a_failed_heartbeat_still_reaches_its_client() -> None:
    """A worker that sends its FINAL and closes at once: libzmq may refuse the probe to it
    (its connection is closing) while the FINAL is still queued. Until the driver has read
    everything (`confirm_gone`), the worker is known, so the FINAL is delivered."""
    b = core()
    ready02(b, b"W1")
    request02(b, b"C", b"echo", b"x")
    sent(b)
    b.probe(0.5)
    (heartbeat,) = sent(b)
    b.unroutable(b"W1", heartbeat, 0.5)
    assert set(b.workers) == {b"W1"}  # not yet: its last messages may be waiting
    b.handle(b"W1", [W02, b"\x04", b"C", b"", b"done"], 0.5)
    b.handle(b"W1", [W02, b"\x06"], 0.5)  # its DISCONNECT
    assert sent(b) == [[b"C", C02, b"\x03", b"echo", b"done"]]
    b.confirm_gone(0.5)
    assert b.workers == {}
    assert b.stats.requests_lost_with_worker == 0
    assert b.stats.workers_gone == 0  # it said DISCONNECT itself


def test_confirm_gone_leaves_a_new_registration_under_the_same_identity_alone() -> None:
    b = core()
    ready02(b, b"W1")
    b.probe(0.5)
    (heartbeat,) = sent(b)
    b.unroutable(b"W1", heartbeat, 0.5)
    b.handle(b"W1", [W02, b"\x06"], 0.5)  # the old connection's DISCONNECT
    ready02(b, b"W1", now=0.6)  # a new connection under the same routing id
    b.confirm_gone(0.6)
    assert set(b.workers) == {b"W1"}


def test_a_gone_idle_worker_is_never_given_a_request() -> None:
    b = core()
    ready02(b, b"W1")
    ready02(b, b"W2")
    b.probe(0.1)
    b.unroutable(b"W1", sent(b)[0], 0.1)
    b.confirm_gone(0.1)
    request02(b, b"C", b"echo", b"x")
    assert sent(b) == [[b"W2", W02, b"\x02", b"C", b"", b"x"]]


def test_unroutable_reply_to_a_client_changes_nothing() -> None:
    b = core()
    ready02(b, b"W")
    b.unroutable(b"C", [b"C", C02, b"\x03", b"echo", b"x"], 0.1)
    assert set(b.workers) == {b"W"} and b.stats.unroutable == 1


# --- mmi.workers and worker names (spec/mdp.md §5.1) --------------------------------------


def _mmi_workers(b: BrokerCore, now: float) -> list[dict[str, object]]:
    b.handle(b"C", [C02, b"\x01", b"mmi.workers", b""], now)
    (reply,) = sent(b)
    assert reply[:4] == [b"C", C02, b"\x03", b"mmi.workers"]
    entries: list[dict[str, object]] = msgpack.unpackb(reply[4], raw=False)
    return entries


def test_mmi_workers_groups_connections_by_name_with_state_and_age() -> None:
    from mdp import mmi

    b = core()
    one = mmi.worker_identity("web-1", "aaaa")
    ready02(b, one, b"shell", now=0)
    ready02(b, mmi.worker_identity("web-1", "aaaa"), b"shell@web-1", now=0)
    ready01(b, b"\x00anon", b"echo", now=0)
    sent(b)
    request02(b, b"C1", b"shell")
    sent(b)
    entries = _mmi_workers(b, now=2.0)
    assert entries == [
        {
            "name": "web-1",
            "services": ["shell", "shell@web-1"],
            "version": "MDP/0.2",
            "busy": True,
            "in_flight": 1,
            "connections": 2,
            "last_heard": 2.0,
        },
        {
            "name": "~" + b"\x00anon".hex(),
            "services": ["echo"],
            "version": "MDP/0.1",
            "busy": False,
            "in_flight": 0,
            "connections": 1,
            "last_heard": 2.0,
        },
    ]
    b.handle(one, [W02, b"\x05"], 2.5)  # a HEARTBEAT from one connection: heard at 2.5
    assert _mmi_workers(b, now=3.0)[0]["last_heard"] == 0.5
    assert (
        mmi.decode_workers([mmi.encode_workers(mmi.decode_workers([mmi.encode_workers([])]))]) == []
    )


def test_a_name_belongs_to_one_process_per_broker() -> None:
    from mdp import mmi

    b = core()
    ready02(b, mmi.worker_identity("web-1", "first"), b"shell")
    assert sent(b) == []
    impostor = mmi.worker_identity("web-1", "second")
    ready02(b, impostor, b"shell@web-1")
    assert sent(b) == [[impostor, W02, b"\x06"]]  # refused: DISCONNECT
    assert b.stats.names_refused == 1 and impostor not in b.workers
    # Once the holder's last connection is gone, the name is free again.
    (holder,) = b.workers
    b.handle(holder, [W02, b"\x06"], 1.0)
    ready02(b, impostor, b"shell@web-1", now=1.0)
    assert sent(b) == [] and impostor in b.workers


def test_decode_workers_rejects_malformed_answers() -> None:
    from mdp import mmi
    from mdp.errors import ProtocolError

    with pytest.raises(mmi.MMINotImplemented):
        mmi.decode_workers([b"501"])
    for bad in ([b"x", b"y"], [b"\xc1"], [msgpack.packb({"a": 1})], [msgpack.packb([{"name": 1}])]):
        with pytest.raises(ProtocolError):
            mmi.decode_workers(bad)
    assert mmi.split_identity(b"mdpw/bad name/x/y") is None
    assert mmi.split_identity(mmi.worker_identity("a.b_c-1", "i")) == (b"a.b_c-1", b"i")
