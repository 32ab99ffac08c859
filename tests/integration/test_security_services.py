"""Security acceptance with the real programs: `mdp-worker --service shell` behind a CURVE
`mdp-broker` (a refused peer's command never runs: marker files prove it), `mdp-client` with
and without keys, and the worker policy (`--allow`, `--deny-env`, `--max-memory`).

Loopback only; every wait is bounded.
"""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
import zmq

from mdp.security import curve_client_options
from services.bodies import CommandResult
from tests.integration.test_security import (
    Broker,
    Keys,
    Peer,
    ctx,
    keys,
    refused_at_handshake,
)
from tests.integration.test_worker_harness import RawClient, start_worker, wait_workers
from tests.support import Process, free_tcp_endpoint, script, start_broker, wait_until

pytestmark = pytest.mark.timeout(90)

__all__ = ["ctx", "keys"]  # fixtures shared with test_security


class CurveClient(RawClient):
    """The worker tests' raw MDP client, with CURVE keys set before it connects."""

    def __init__(self, endpoint: str, keys: Keys, name: str) -> None:
        self.version = "0.2"
        self.socket = zmq.Context.instance().socket(zmq.DEALER)
        self.socket.linger = 0
        for option, value in curve_client_options(keys.secret(name), keys.public("broker")):
            self.socket.setsockopt(option, value)
        self.socket.connect(endpoint)


def curve_args(keys: Keys, name: str) -> list[str]:
    return [
        "--curve-secret-key", str(keys.secret(name)),
        "--curve-server-key", str(keys.public("broker")),
    ]  # fmt: skip


@pytest.fixture
def secured(keys: Keys, tmp_path: Path) -> Iterator[Broker]:
    """A CURVE broker and an `mdp-worker --service shell` with the worker key w1."""
    broker = Broker(
        [
            "--curve-secret-key", str(keys.secret("broker")),
            "--allow-clients", str(keys.clients),
            "--allow-workers", str(keys.workers),
        ],
        tmp_path / "broker.log",
    )  # fmt: skip
    worker = start_worker(broker.endpoint, "--service", "shell", *curve_args(keys, "w1"))
    try:
        broker.wait_log("accepted worker 'w1'")
        with CurveClient(broker.endpoint, keys, "alice") as alice:

            def registered() -> bool:
                _, final = alice.request("mmi.service", [b"shell"], timeout=5)
                return final.body == [b"200"]

            wait_until(registered, timeout=15, what="the worker to register")
        yield broker
    finally:
        worker.stop(timeout=5)
        broker.stop()


def touch(path: Path) -> list[bytes]:
    return [msgpack.packb({"command_name": f"touch {shlex.quote(str(path))}"})]


def test_refused_clients_never_run_a_command(
    secured: Broker,
    keys: Keys,
    tmp_path: Path,
    ctx: zmq.Context,  # type: ignore[type-arg]
) -> None:
    """No key, an unknown key, a worker's key: the command never runs. An allowed client's
    command, sent afterwards, runs: the worker was there all along."""
    marker = tmp_path / "must-not-exist"
    for name in (None, "mallory"):
        peer = Peer(ctx, keys, secured.endpoint, name)
        peer.send(b"MDPC02", b"\x01", b"shell", *touch(marker))
        assert refused_at_handshake(peer), name
    impostor = Peer(ctx, keys, secured.endpoint, "w1")
    impostor.send(b"MDPC02", b"\x01", b"shell", *touch(marker))
    secured.wait_log("a worker key may not send requests")

    proof = tmp_path / "allowed-client-ran"
    with CurveClient(secured.endpoint, keys, "alice") as alice:
        _, result = alice.command("shell", {"command_name": f"touch {shlex.quote(str(proof))}"})
    assert result.status == "ok"
    assert proof.exists()
    assert not marker.exists()


def test_a_worker_with_a_client_key_cannot_register(
    secured: Broker,
    keys: Keys,
) -> None:
    worker = start_worker(secured.endpoint, "--service", "echo", *curve_args(keys, "alice"))
    try:
        secured.wait_log("a client key may not act as a worker")
        with CurveClient(secured.endpoint, keys, "alice") as alice:
            _, final = alice.request("mmi.service", [b"echo"])
        assert final.body == [b"404"]
    finally:
        worker.stop(timeout=5)


def test_mdp_client_with_an_allowed_key_runs_commands_and_without_is_refused(
    secured: Broker, keys: Keys, tmp_path: Path
) -> None:
    commands = tmp_path / "commands.json"
    commands.write_text('{"command_type": "shell", "command_name": "echo hello-curve"}')

    def run(*args: str, timeout: str = "5") -> subprocess.CompletedProcess[str]:
        argv = [
            script("mdp-client"),
            "-a",
            secured.endpoint,
            "--timeout",
            timeout,
            "--retries",
            "0",
        ]
        return subprocess.run(
            [*argv, *args, "-f", str(commands)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    ok = run(*curve_args(keys, "alice"))
    assert ok.returncode == 0, ok.stderr
    assert "hello-curve" in ok.stdout
    secured.wait_log("from client 'alice' (connection ")
    # Refused at the handshake, which the broker logs; the client only sees silence, so a
    # short --timeout does (this one broker's log holds alice's acceptance and nothing else).
    refused = run(*curve_args(keys, "mallory"), timeout="1")
    assert refused.returncode == 69  # no broker answered
    assert "hello-curve" not in refused.stdout
    secured.wait_log("refused connection from 127.0.0.1: unknown key")


def test_the_worker_refuses_half_a_curve_configuration(keys: Keys) -> None:
    result = subprocess.run(
        [script("mdp-worker"), "-s", "echo", "--curve-secret-key", str(keys.secret("w1"))],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2 and "go together" in result.stderr


# --- worker policy ------------------------------------------------------------------------

MAX_MEMORY = 200_000_000


@pytest.fixture(scope="module")
def policed() -> Iterator[str]:
    """A plain loopback broker and a worker with --allow, --deny-env and --max-memory."""
    endpoint = free_tcp_endpoint()
    broker = start_broker(endpoint)
    worker: Process = start_worker(
        endpoint,
        "-s", "os", "-s", "shell",
        "--allow", "echo", "--allow", "true", "--allow", "python3*",
        "--deny-env",
        "--max-memory", str(MAX_MEMORY),
    )  # fmt: skip
    try:
        wait_workers(endpoint, "os")
        wait_workers(endpoint, "shell")
        yield endpoint
    finally:
        worker.stop(timeout=5)
        broker.stop(timeout=5)


def command(endpoint: str, service: str, **fields: object) -> CommandResult:
    with RawClient(endpoint) as client:
        _, result = client.command(service, fields, timeout=30)
    return result


@pytest.mark.parametrize(
    ("service", "fields"),
    [
        ("os", {"command_name": "echo", "parameters": ["hi"]}),
        ("os", {"command_name": "true"}),
        ("shell", {"command_name": "echo hi"}),
        ("shell", {"command_name": "echo", "parameters": ["a; touch /tmp/x"]}),  # data, not code
    ],
)
def test_allow_lets_matching_commands_through(
    policed: str, service: str, fields: dict[str, object]
) -> None:
    assert command(policed, service, **fields).status == "ok"


@pytest.mark.parametrize(
    ("service", "name", "parameters"),
    [
        ("os", "touch", ["{marker}"]),
        ("os", "/usr/bin/touch", ["{marker}"]),
        ("os", "/bin/echo", ["hi"]),  # a bare-name pattern never matches a path
        ("shell", "touch {marker}", []),
        ("shell", "echo hi; touch {marker}", []),
        ("shell", "echo hi && touch {marker}", []),
        ("shell", "echo $(touch {marker})", []),
        ("shell", "echo hi > {marker}", []),
    ],
)
def test_allow_rejects_everything_else_and_nothing_runs(
    policed: str, tmp_path: Path, service: str, name: str, parameters: list[str]
) -> None:
    marker = tmp_path / "must-not-exist"
    fields = {
        "command_name": name.format(marker=marker),
        "parameters": [p.format(marker=marker) for p in parameters],
    }
    result = command(policed, service, **fields)
    assert result.status == "rejected", result
    assert result.message
    assert not marker.exists()


def test_deny_env_rejects_a_request_with_an_environment(policed: str) -> None:
    result = command(policed, "os", command_name="echo", env={"A": "1"})
    assert result.status == "rejected"
    assert "--deny-env" in (result.message or "")


def test_max_memory_makes_a_memory_hog_fail_fast(policed: str) -> None:
    """RLIMIT_AS of 200 MB: asking for 2 GiB fails at once instead of taking the machine."""
    result = command(
        policed, "os", command_name="python3", parameters=["-c", "b = bytearray(2 * 1024**3)"]
    )
    assert result.status == "failed", result
    assert b"MemoryError" in result.stderr
    assert result.duration_ms < 10_000


def test_max_memory_leaves_ordinary_commands_alone(policed: str) -> None:
    result = command(
        policed, "os", command_name="python3", parameters=["-c", "print(len(bytearray(10**7)))"]
    )
    assert (result.status, result.stdout) == ("ok", b"10000000\n")


def test_worker_help_documents_every_policy_option() -> None:
    out = subprocess.run(
        [script("mdp-worker"), "--help"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    for option in (
        "--curve-secret-key",
        "--curve-server-key",
        "--allow PATTERN",
        "--deny-env",
        "--user NAME",
        "--max-memory",
        "--max-procs",
        "MDP_WORKER_CURVE_SECRET_KEY",
    ):
        assert option in out, option
