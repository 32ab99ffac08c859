"""The broker's side of the local boundary (mdp.broker.boundary, spec/security.md §6): which
endpoints need authentication, what the refusal says, and how ipc sockets are kept private."""

from __future__ import annotations

import grp
import os
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from mdp.broker import boundary
from mdp.broker.server import BrokerServer, InsecureBindError
from mdp.endpoints import unauthenticated_endpoints
from tests.support import wait_until

pytestmark = pytest.mark.timeout(10)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short private directory (unix socket paths are limited to 107 bytes)."""
    directory = Path(tempfile.mkdtemp(prefix="mdp-b-"))
    try:
        yield directory
    finally:
        for child in directory.iterdir():
            child.unlink()
        directory.rmdir()


def listening(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


def test_every_transport_but_ipc_and_inproc_needs_authentication() -> None:
    endpoints = ["ipc:///run/x", "inproc://y", "tcp://127.0.0.1:1", "tcp://[::1]:2", "ws://h:3"]
    assert unauthenticated_endpoints(endpoints) == endpoints[2:]


def test_the_refusal_says_who_could_run_commands_and_how_to_make_keys() -> None:
    local = boundary.insecure_refusal(["tcp://127.0.0.1:5555"])
    assert "every user of this machine could run commands" in local
    assert "mdp-keys init" in local and "--insecure" in local
    exposed = boundary.insecure_refusal(["tcp://0.0.0.0:5555"])
    assert "anyone who can reach the port over the network" in exposed
    assert "mdp-keys generate broker --dir keys" in exposed


def test_broker_server_refuses_loopback_tcp_without_curve_before_binding() -> None:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        server = BrokerServer(["tcp://127.0.0.1:0"], context=context)
        with pytest.raises(InsecureBindError, match="mdp-keys init"):
            server.bind()
        assert server.bound == []
    finally:
        context.destroy(linger=0)


def test_an_insecure_broker_tells_its_core_which_endpoints_are_open(
    caplog: pytest.LogCaptureFixture,
) -> None:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    server = BrokerServer(["tcp://127.0.0.1:0", "inproc://b"], context=context, insecure=True)
    try:
        bound = server.bind()
        assert server.core.unauthenticated == (bound[0],)
        assert "INSECURE (--insecure)" in caplog.text and bound[0] in caplog.text
    finally:
        server.join(1)
        if server._socket is not None:
            server._socket.close(linger=0)
        context.destroy(linger=0)


def test_an_ipc_socket_is_closed_to_group_and_others_whatever_the_umask(short_dir: Path) -> None:
    endpoint = f"ipc://{short_dir}/b.sock"
    previous = os.umask(0)
    try:
        server = BrokerServer([endpoint])
        server.bind()
        after = os.umask(0)
    finally:
        os.umask(previous)
    try:
        assert stat.S_IMODE((short_dir / "b.sock").stat().st_mode) & 0o077 == 0
        assert after == 0  # the process umask is restored after the bind
    finally:
        assert server._socket is not None
        server._socket.close(linger=0)


def test_a_second_broker_on_a_live_ipc_socket_is_refused(short_dir: Path) -> None:
    endpoint = f"ipc://{short_dir}/b.sock"
    first = BrokerServer([endpoint])
    first.bind()
    try:
        with pytest.raises(zmq.ZMQError, match="already listens"):
            BrokerServer([endpoint]).bind()
    finally:
        assert first._socket is not None
        first._socket.close(linger=0)
    # A socket file nobody listens on any more is taken over as before. (libzmq closes the
    # listener in its I/O thread, a moment after close() returns.)
    wait_until(lambda: not listening(short_dir / "b.sock"), timeout=5, what="the listener to close")
    second = BrokerServer([endpoint])
    second.bind()
    assert second._socket is not None
    second._socket.close(linger=0)


def test_group_sharing_gives_the_socket_to_the_group(short_dir: Path) -> None:
    gid = os.getgid() if os.geteuid() != 0 else grp.getgrnam("nogroup").gr_gid
    endpoint = f"ipc://{short_dir}/b.sock"
    server = BrokerServer([endpoint], ipc_group=gid)
    server.bind()
    try:
        st = (short_dir / "b.sock").stat()
        assert (st.st_gid, stat.S_IMODE(st.st_mode)) == (gid, 0o660)
    finally:
        assert server._socket is not None
        server._socket.close(linger=0)


def test_group_sharing_needs_a_directory_the_group_can_enter(short_dir: Path) -> None:
    with pytest.raises(boundary.GroupError, match="cannot enter"):
        boundary.check_group_reach(f"ipc://{short_dir}/b.sock", 12345)
    short_dir.chmod(0o750)
    os.chown(short_dir, -1, os.getgid())
    boundary.check_group_reach(f"ipc://{short_dir}/b.sock", os.getgid())
    with pytest.raises(boundary.GroupError, match="no such group"):
        boundary.group_id("no-such-group-mdp")


def test_an_insecure_broker_says_so_in_its_metrics() -> None:
    """spec/security.md §6.2: the open endpoints are a metric too; none when secure."""
    pytest.importorskip("prometheus_client")
    from prometheus_client import CollectorRegistry, generate_latest

    from mdp.broker.core import BrokerCore
    from mdp.broker.metrics import BrokerCollector

    core = BrokerCore()
    registry = CollectorRegistry()
    registry.register(BrokerCollector(core))
    assert b"mdp_broker_unauthenticated_endpoints{" not in generate_latest(registry)
    core.unauthenticated = ("tcp://127.0.0.1:5555",)
    text = generate_latest(registry).decode()
    assert 'mdp_broker_unauthenticated_endpoints{endpoint="tcp://127.0.0.1:5555"} 1.0' in text
