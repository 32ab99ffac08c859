"""CURVE on a real `mdp-broker`: who gets in, who may do what, revocation without a restart,
and the refusal to listen on a non-loopback address without authentication.

Peers here are raw pyzmq DEALER sockets with CURVE options, so every test sees exactly the
frames and handshake events; tests/integration/test_security_services.py drives the real
`mdp-worker` and `mdp-client`. Everything listens on loopback only; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.asyncio
from zmq.utils.monitor import recv_monitor_message

from mdp import fastzmq
from mdp.errors import SecurityError
from mdp.security import curve_client_options, generate_key_pair, load_public_key
from mdp.security.allowlists import RESCAN_INTERVAL, AllowLists
from mdp.security.zap import ZAP_ENDPOINT, safe_reply
from tests.support import TEST_HEARTBEAT_MS, TEST_LIVENESS, free_tcp_endpoint, script, wait_until

pytestmark = pytest.mark.timeout(60)


@dataclass
class Keys:
    """Key pairs broker, alice (client), w1 (worker), mallory (unknown) and the allow-lists."""

    root: Path

    @property
    def clients(self) -> Path:
        return self.root / "allowed" / "clients"

    @property
    def workers(self) -> Path:
        return self.root / "allowed" / "workers"

    def secret(self, name: str) -> Path:
        return self.root / "keys" / f"{name}.key_secret"

    def public(self, name: str) -> Path:
        return self.root / "keys" / f"{name}.key"

    def allow(self, role: str, name: str) -> None:
        result = subprocess.run(
            [script("mdp-keys"), "allow", role, str(self.public(name)), "--dir",
             str(self.clients if role == "client" else self.workers)],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    k = Keys(tmp_path)
    for name in ("broker", "alice", "w1", "mallory"):
        generate_key_pair(name, tmp_path / "keys")
    k.clients.mkdir(parents=True)
    k.workers.mkdir(parents=True)
    k.allow("client", "alice")
    k.allow("worker", "w1")
    return k


class Broker:
    """An `mdp-broker` subprocess whose log goes to a file we can poll."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.endpoint = free_tcp_endpoint()
        self.log_path = log
        self._log = log.open("wb")
        self.popen = subprocess.Popen(
            [script("mdp-broker"), "--bind", self.endpoint, "--heartbeat-ms",
             str(TEST_HEARTBEAT_MS), "--liveness", str(TEST_LIVENESS), *args],
            stdout=subprocess.DEVNULL, stderr=self._log, start_new_session=True,
            env={**os.environ, **(env or {})},
        )  # fmt: skip
        self.wait_log("broker serving on", what="the broker to start")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, text: str, timeout: float = 10.0, what: str = "") -> None:
        def seen() -> bool:
            if text in self.log():
                return True
            if self.popen.poll() is not None:
                raise AssertionError(f"broker exited {self.popen.returncode}: {self.log()}")
            return False

        wait_until(seen, timeout=timeout, what=what or repr(text))

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(timeout=5)
        self._log.close()


@pytest.fixture(params=["compiled", "pure-python"])
def broker(keys: Keys, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Broker]:
    """A CURVE broker, on each socket-I/O path (mdp.fastzmq): the ZAP User-Id that the role
    check needs is read by the compiled module, or by pyzmq without it."""
    compiled = request.param == "compiled"
    if compiled and not fastzmq.compiled()[0]:
        pytest.skip(f"the compiled module is not in use: {fastzmq.compiled()[1]}")
    b = Broker(
        [
            "--curve-secret-key", str(keys.secret("broker")),
            "--allow-clients", str(keys.clients),
            "--allow-workers", str(keys.workers),
        ],
        tmp_path / "broker.log",
        env={} if compiled else {"MDP_PURE_PYTHON": "1"},
    )  # fmt: skip
    assert ("socket I/O compiled" in b.log()) is compiled, b.log()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture
def ctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        yield context
    finally:
        context.destroy(linger=0)


class Peer:
    """A DEALER to the broker, with CURVE if given a key, and a monitor of its handshakes."""

    def __init__(
        self, ctx: zmq.Context[zmq.Socket[bytes]], keys: Keys, endpoint: str, name: str | None
    ) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if name is not None:
            for option, value in curve_client_options(keys.secret(name), keys.public("broker")):
                self.sock.setsockopt(option, value)
        self.monitor = self.sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED
            | zmq.EVENT_HANDSHAKE_FAILED_AUTH
            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
        )
        self.sock.connect(endpoint)

    def handshake(self, timeout: float = 5.0) -> tuple[zmq.Event, int]:
        """The first handshake outcome: SUCCEEDED, or a FAILED event with its value."""
        assert self.monitor.poll(int(timeout * 1000)), "no handshake event"
        event = recv_monitor_message(self.monitor)
        return zmq.Event(event["event"]), int(event["value"])

    def send(self, *frames: bytes) -> None:
        self.sock.send_multipart(list(frames), flags=zmq.NOBLOCK)

    def recv(self, timeout: float = 5.0) -> list[bytes] | None:
        if self.sock.poll(int(timeout * 1000)):
            return self.sock.recv_multipart()
        return None

    def recv_skipping_heartbeats(self, timeout: float = 5.0) -> list[bytes] | None:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            frames = self.recv(left)
            if frames is None or frames[:2] != [b"MDPW02", b"\x05"]:
                return frames
        return None

    def mmi_service(self, service: bytes) -> bytes | None:
        self.send(b"MDPC02", b"\x01", b"mmi.service", service)
        reply = self.recv()
        return None if reply is None else reply[-1]


def refused_at_handshake(peer: Peer) -> bool:
    event, value = peer.handshake()
    return event != zmq.Event.HANDSHAKE_SUCCEEDED and (
        event != zmq.Event.HANDSHAKE_FAILED_AUTH or value == 400
    )


# --- who gets in --------------------------------------------------------------------------


def test_an_allowed_client_key_is_served(broker: Broker, keys: Keys, ctx: zmq.Context) -> None:  # type: ignore[type-arg]
    alice = Peer(ctx, keys, broker.endpoint, "alice")
    assert alice.handshake()[0] == zmq.Event.HANDSHAKE_SUCCEEDED
    assert alice.mmi_service(b"shell") == b"404"
    broker.wait_log("accepted client 'alice' from 127.0.0.1")
    broker.wait_log("from client 'alice' (connection ")  # the audit line of the request


def test_a_client_without_a_key_is_refused_at_the_handshake(
    broker: Broker,
    keys: Keys,
    ctx: zmq.Context,  # type: ignore[type-arg]
) -> None:
    anonymous = Peer(ctx, keys, broker.endpoint, None)
    anonymous.send(b"MDPC02", b"\x01", b"mmi.service", b"shell")
    assert refused_at_handshake(anonymous)
    assert anonymous.recv(timeout=0.2) is None


def test_an_unknown_key_is_refused_with_zap_400(
    broker: Broker,
    keys: Keys,
    ctx: zmq.Context,  # type: ignore[type-arg]
) -> None:
    """RFC 27: the handler answers 400; libzmq reports HANDSHAKE_FAILED_AUTH with it."""
    mallory = Peer(ctx, keys, broker.endpoint, "mallory")
    mallory.send(b"MDPC02", b"\x01", b"mmi.service", b"shell")
    assert mallory.handshake() == (zmq.Event.HANDSHAKE_FAILED_AUTH, 400)
    broker.wait_log("refused connection from 127.0.0.1: unknown key")
    assert mallory.recv(timeout=0.2) is None


def test_a_worker_key_cannot_send_requests(
    broker: Broker,
    keys: Keys,
    ctx: zmq.Context,  # type: ignore[type-arg]
) -> None:
    worker = Peer(ctx, keys, broker.endpoint, "w1")
    worker.send(b"MDPW02", b"\x01", b"svc")
    impostor = Peer(ctx, keys, broker.endpoint, "w1")  # the worker's key, used as a client
    assert impostor.handshake()[0] == zmq.Event.HANDSHAKE_SUCCEEDED
    impostor.send(b"MDPC02", b"\x01", b"svc", b"from the impostor")
    broker.wait_log("a worker key may not send requests")
    alice = Peer(ctx, keys, broker.endpoint, "alice")
    alice.send(b"MDPC02", b"\x01", b"svc", b"from alice")
    request = worker.recv_skipping_heartbeats()
    assert request is not None and request[-1] == b"from alice"
    assert impostor.recv(timeout=0.2) is None


def test_a_client_key_cannot_register_as_a_worker(
    broker: Broker,
    keys: Keys,
    ctx: zmq.Context,  # type: ignore[type-arg]
) -> None:
    fake_worker = Peer(ctx, keys, broker.endpoint, "alice")
    fake_worker.send(b"MDPW02", b"\x01", b"svc")
    broker.wait_log("a client key may not act as a worker")
    alice = Peer(ctx, keys, broker.endpoint, "alice")
    assert alice.mmi_service(b"svc") == b"404"
    alice.send(b"MDPC02", b"\x01", b"svc", b"secret request")
    assert fake_worker.recv(timeout=0.3) is None


# --- revocation ---------------------------------------------------------------------------


def test_a_revoked_client_key_stops_working_without_a_restart(
    broker: Broker,
    keys: Keys,
    ctx: zmq.Context,  # type: ignore[type-arg]
) -> None:
    established = Peer(ctx, keys, broker.endpoint, "alice")
    assert established.mmi_service(b"x") == b"404"
    (keys.clients / "alice.key").unlink()
    broker.wait_log("(1 revoked)", what="the broker to re-read the allow-list")
    # New connections fail the handshake...
    fresh = Peer(ctx, keys, broker.endpoint, "alice")
    assert fresh.handshake() == (zmq.Event.HANDSHAKE_FAILED_AUTH, 400)
    # ...and the established one has its messages dropped.
    established.send(b"MDPC02", b"\x01", b"mmi.service", b"x")
    broker.wait_log("key not in the allow-lists")
    assert established.recv(timeout=0.2) is None
    # Allowing the key again also needs no restart.
    keys.allow("client", "alice")
    again = Peer(ctx, keys, broker.endpoint, "alice")
    assert again.mmi_service(b"x") == b"404"


def test_a_revoked_worker_is_disconnected_and_forgotten(
    keys: Keys,
    tmp_path: Path,
    ctx: zmq.Context,  # type: ignore[type-arg]
) -> None:
    # Heartbeats slow enough that this raw worker (which never heartbeats) outlives a re-read.
    broker = Broker(
        [
            "--curve-secret-key", str(keys.secret("broker")),
            "--allow-clients", str(keys.clients),
            "--allow-workers", str(keys.workers),
            "--heartbeat-ms", "5000",
        ],
        tmp_path / "broker.log",
    )  # fmt: skip
    try:
        revoke_worker(broker, keys, ctx)
    finally:
        broker.stop()


def revoke_worker(broker: Broker, keys: Keys, ctx: zmq.Context) -> None:  # type: ignore[type-arg]
    worker = Peer(ctx, keys, broker.endpoint, "w1")
    worker.send(b"MDPW02", b"\x01", b"svc")
    alice = Peer(ctx, keys, broker.endpoint, "alice")
    wait_until(lambda: alice.mmi_service(b"svc") == b"200", what="the worker to register")
    (keys.workers / "w1.key").unlink()
    assert worker.recv_skipping_heartbeats() == [b"MDPW02", b"\x06"]  # DISCONNECT
    broker.wait_log("its key was revoked; disconnected")
    assert alice.mmi_service(b"svc") == b"404"
    worker.send(b"MDPW02", b"\x01", b"svc")  # trying again is refused too
    broker.wait_log("key not in the allow-lists")
    assert alice.mmi_service(b"svc") == b"404"


# --- configuration ------------------------------------------------------------------------


def run_broker(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [script("mdp-broker"), "--log-level", "DEBUG", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
        check=False,
    )


@pytest.mark.parametrize("bind", ["tcp://0.0.0.0:{port}", "tcp://*:{port}", "tcp://[::]:{port}"])
def test_a_non_loopback_bind_without_curve_exits_with_the_set_up_commands(bind: str) -> None:
    port = free_tcp_endpoint().rsplit(":", 1)[1]
    result = run_broker("--bind", bind.format(port=port))
    assert result.returncode == 1
    assert "refusing to listen on" in result.stderr
    assert "mdp-keys generate broker --dir keys" in result.stderr
    assert "--insecure" in result.stderr
    assert "Traceback" not in result.stderr
    assert "serving" not in result.stderr  # refused before binding anything


def test_the_bind_check_applies_to_the_environment_variable_too() -> None:
    port = free_tcp_endpoint().rsplit(":", 1)[1]
    result = run_broker(env={"MDP_BROKER_BIND": f"tcp://127.0.0.1:{port} tcp://0.0.0.0:{port}"})
    assert result.returncode == 1
    assert f"refusing to listen on tcp://127.0.0.1:{port}, tcp://0.0.0.0:{port} " in result.stderr


def test_insecure_logs_a_warning_on_every_start(tmp_path: Path) -> None:
    broker = Broker(["--insecure"], tmp_path / "broker.log")
    try:
        assert "WARNING" in broker.log() and "INSECURE (--insecure)" in broker.log()
    finally:
        broker.stop()


def test_curve_options_are_checked_before_starting(keys: Keys) -> None:
    result = run_broker("--allow-clients", str(keys.clients))
    assert result.returncode == 2 and "need --curve-secret-key" in result.stderr
    result = run_broker("--curve-secret-key", str(keys.secret("broker")))
    assert result.returncode == 2 and "--allow-workers" in result.stderr
    result = run_broker(
        "--curve-secret-key", str(keys.public("broker")),
        "--allow-clients", str(keys.clients), "--allow-workers", str(keys.workers),
    )  # fmt: skip
    assert result.returncode == 1 and "holds no secret key" in result.stderr
    assert load_public_key(keys.public("broker")).decode() not in result.stderr


def test_curve_is_configured_from_environment_variables(
    keys: Keys,
    tmp_path: Path,
    ctx: zmq.Context,  # type: ignore[type-arg]
) -> None:
    broker = Broker(
        [],
        tmp_path / "broker.log",
        env={
            "MDP_BROKER_CURVE_SECRET_KEY": str(keys.secret("broker")),
            "MDP_BROKER_ALLOW_CLIENTS": str(keys.clients),
            "MDP_BROKER_ALLOW_WORKERS": str(keys.workers),
        },
    )
    try:
        assert Peer(ctx, keys, broker.endpoint, "alice").mmi_service(b"x") == b"404"
        assert refused_at_handshake(Peer(ctx, keys, broker.endpoint, None))
    finally:
        broker.stop()


# --- the asyncio ZAP handler --------------------------------------------------------------


class AsyncZapAuthenticator:
    """The ZAP handler as an asyncio task, for a CURVE server run in asyncio.

    Not part of the product (the broker runs `ZapThread` beside its poll loop); it shows that
    `safe_reply` applies the same rules under any event loop. `context` may be a plain or an
    asyncio pyzmq context; the handler binds on it (shadowing it for asyncio) so sockets of
    that context are checked.
    """

    def __init__(self, lists: AllowLists, rescan_interval: float = RESCAN_INTERVAL) -> None:
        self.lists = lists
        self.rescan_interval = rescan_interval
        self._task: asyncio.Task[None] | None = None
        self._socket: zmq.asyncio.Socket | None = None

    def start(self, context: zmq.Context[Any]) -> None:
        actx = zmq.asyncio.Context.shadow(context.underlying)
        sock = actx.socket(zmq.REP)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.bind(ZAP_ENDPOINT)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise SecurityError(f"cannot start the ZAP handler: {exc}") from None
        self._socket = sock
        self._task = asyncio.get_running_loop().create_task(self._run(sock), name="mdp-zap")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self, sock: zmq.asyncio.Socket) -> None:
        next_scan = time.monotonic() + self.rescan_interval
        try:
            while True:
                timeout = max(0.0, next_scan - time.monotonic())
                if await sock.poll(math.ceil(timeout * 1000)):
                    request = await sock.recv_multipart()
                    await sock.send_multipart(safe_reply(request, self.lists))
                if time.monotonic() >= next_scan:
                    try:
                        self.lists.refresh()
                    except OSError as exc:
                        logging.getLogger("mdp.security").warning(
                            "cannot re-read the allow-lists: %s", exc
                        )
                    next_scan = time.monotonic() + self.rescan_interval
        finally:
            sock.close(linger=0)
            self._socket = None


async def test_the_asyncio_zap_handler_applies_the_same_allow_lists(keys: Keys) -> None:
    from mdp.security import BrokerAuth, load_key_pair

    context = zmq.asyncio.Context()
    zap = AsyncZapAuthenticator(AllowLists(keys.clients, keys.workers))
    try:
        zap.start(context)
        auth = BrokerAuth(load_key_pair(keys.secret("broker")), zap.lists)
        server = context.socket(zmq.ROUTER)
        for option, value in auth.socket_options():
            server.setsockopt(option, value)
        port = server.bind_to_random_port("tcp://127.0.0.1")
        sync_ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        try:
            alice = Peer(sync_ctx, keys, f"tcp://127.0.0.1:{port}", "alice")
            alice.send(b"MDPC02", b"\x01", b"svc", b"hi")
            frame = await asyncio.wait_for(server.recv(copy=False), 10)
            assert frame.get("User-Id") == load_public_key(keys.public("alice")).decode()
            mallory = Peer(sync_ctx, keys, f"tcp://127.0.0.1:{port}", "mallory")
            mallory.send(b"MDPC02", b"\x01", b"svc", b"hi")
            assert await asyncio.to_thread(mallory.handshake) == (
                zmq.Event.HANDSHAKE_FAILED_AUTH,
                400,
            )
        finally:
            sync_ctx.destroy(linger=0)
            server.close(linger=0)
    finally:
        await zap.stop()
        context.destroy(linger=0)


def test_help_documents_the_security_options() -> None:
    broker = run_broker("--help").stdout
    for text in (
        "--curve-secret-key FILE",
        "--allow-clients DIR",
        "--allow-workers DIR",
        "--insecure",
        "MDP_BROKER_CURVE_SECRET_KEY",
        "MDP_BROKER_ALLOW_CLIENTS",
        "MDP_BROKER_ALLOW_WORKERS",
        "MDP_BROKER_INSECURE",
    ):
        assert text in broker, text
    keys_help = subprocess.run(
        [script("mdp-keys"), "--help"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    for command in ("generate", "allow", "revoke", "list"):
        assert command in keys_help, command
