"""Endpoint checks (mdp.endpoints): what libzmq would silently misread or refuse with EINVAL is
refused up front, with the reason; every endpoint libzmq reads as written passes."""

from __future__ import annotations

import pytest

from mdp.broker.server import BrokerServer
from mdp.client import Client
from mdp.endpoints import EndpointError, check_endpoint
from mdp.worker import WorkerOptions


@pytest.mark.parametrize(
    "endpoint",
    [
        "tcp://127.0.0.1:5555",
        "tcp://localhost:1",
        "tcp://[::1]:65535",
        "tcp://eth0:5555",
        "tcp://192.0.2.1:4000;127.0.0.1:5555",
        "TCP://127.0.0.1:5555",
        "ipc:///tmp/mdp.sock",
        "inproc://broker",
    ],
)
def test_well_formed_endpoints_pass_both_ways(endpoint: str) -> None:
    assert check_endpoint(endpoint) == endpoint
    assert check_endpoint(endpoint, bind=True) == endpoint


@pytest.mark.parametrize("endpoint", ["tcp://*:5555", "tcp://127.0.0.1:*", "tcp://127.0.0.1:0"])
def test_wildcards_and_port_zero_are_for_binding_only(endpoint: str) -> None:
    assert check_endpoint(endpoint, bind=True) == endpoint
    with pytest.raises(EndpointError):
        check_endpoint(endpoint)


@pytest.mark.parametrize(
    ("endpoint", "reason"),
    [
        # libzmq keeps the low 16 bits of the port: 99999 would be port 34463.
        ("tcp://127.0.0.1:99999", "outside"),
        ("tcp://127.0.0.1:65536", "outside"),
        ("tcp://127.0.0.1:x", "not a number"),
        ("tcp://127.0.0.1", "HOST:PORT"),
        ("tcp://:5555", "HOST:PORT"),
        ("tcp://", "missing"),
        ("ipc://", "missing"),
        ("foo://x", "unknown transport 'foo'"),
        ("127.0.0.1:5555", "not a ZeroMQ endpoint"),
        ("", "not a ZeroMQ endpoint"),
    ],
)
def test_malformed_endpoints_are_refused_with_the_reason(endpoint: str, reason: str) -> None:
    for bind in (False, True):
        with pytest.raises(EndpointError, match=reason):
            check_endpoint(endpoint, bind=bind)


def test_the_error_is_a_value_error_for_library_callers() -> None:
    with pytest.raises(ValueError):
        check_endpoint("tcp://127.0.0.1:70000")


def test_the_libraries_refuse_a_malformed_endpoint_before_opening_a_socket() -> None:
    with pytest.raises(EndpointError, match="99999"):
        Client(["tcp://127.0.0.1:5555", "tcp://127.0.0.1:99999"])
    with pytest.raises(EndpointError, match="99999"):
        WorkerOptions(broker="tcp://127.0.0.1:99999")
    with pytest.raises(EndpointError, match="99999"):
        BrokerServer(["tcp://127.0.0.1:99999"])
