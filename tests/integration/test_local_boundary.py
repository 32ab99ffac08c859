"""The local boundary (spec/security.md, "Local boundary"): no other user of the machine can
run commands through our stack, nor pose as a worker, with the defaults.

These tests run as root, as CI does: root starts the broker and a `shell` worker with their
defaults, and the unprivileged user `nobody` (through `runuser`) tries what an attacker on a
shared host would, with nothing but pyzmq and msgpack: send a command to the default endpoint,
register a `shell` worker there, and send to a tcp://127.0.0.1 broker. A marker file tells
whether the attacker's command ever ran. The owner's own client must still succeed.

They are skipped, with the reason, when not run as root or when `nobody` cannot run a Python
with pyzmq (a copy of our pyzmq and msgpack is made readable for it; the interpreter must be
one it may execute).
"""

from __future__ import annotations

import grp
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import zmq

from mdp.local_dirs import default_endpoint
from tests.support import (
    TEST_HEARTBEAT_MS,
    TEST_LIVENESS,
    Process,
    free_tcp_endpoint,
    script,
    start_broker,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)

HEARTBEAT = ["--heartbeat-ms", str(TEST_HEARTBEAT_MS), "--liveness", str(TEST_LIVENESS)]

# What `nobody` runs: raw MDP/0.2 on a DEALER, as an attacker would write it. Prints one JSON
# line: what it could see and what came back.
ATTACKER = r"""
import json, os, sys, time
import msgpack, zmq

endpoint, action, marker = sys.argv[1:4]
out = {"uid": os.getuid()}
if endpoint.startswith("ipc://"):
    try:
        os.stat(endpoint[len("ipc://"):])
        out["stat"] = "ok"
    except OSError as exc:
        out["stat"] = exc.strerror
sock = zmq.Context.instance().socket(zmq.DEALER)
sock.linger = 0
sock.connect(endpoint)
if action == "request":
    body = msgpack.packb({"command_name": f"id; touch {marker}"})
    sock.send_multipart([b"MDPC02", b"\x01", b"shell", body])
    out["answered"] = bool(sock.poll(1500))
else:  # register as a shell worker and wait for somebody's command
    sock.send_multipart([b"MDPW02", b"\x01", b"shell"])
    requests = 0
    deadline = time.monotonic() + float(action)
    while (left := deadline - time.monotonic()) > 0:
        if sock.poll(int(left * 1000) + 1):
            frames = sock.recv_multipart()
            requests += len(frames) > 1 and frames[1] == b"\x02"
    out["requests"] = requests
print(json.dumps(out))
"""


def as_nobody(python: str, path: Path, *args: str) -> list[str]:
    """The command line that runs `python *args` as nobody, with `path` as its PYTHONPATH."""
    return ["runuser", "-u", "nobody", "--", "env", f"PYTHONPATH={path}", python, *args]


@dataclass(frozen=True)
class Nobody:
    """How to run Python as `nobody`: an interpreter it may execute, our pyzmq on its path."""

    python: str
    path: Path

    def run(self, *args: str, timeout: float = 20) -> dict[str, object]:
        result = subprocess.run(
            as_nobody(self.python, self.path, "-c", ATTACKER, *args),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd="/",
        )
        assert result.returncode == 0, result.stderr
        answer: dict[str, object] = json.loads(result.stdout)
        assert answer["uid"] == 65534
        return answer


def _runs_as_nobody(python: str, path: Path) -> bool:
    probe = subprocess.run(
        as_nobody(python, path, "-c", "import zmq, msgpack"),
        capture_output=True,
        timeout=30,
        cwd="/",
    )
    return probe.returncode == 0


@pytest.fixture(scope="module")
def nobody() -> Iterator[Nobody]:
    if os.geteuid() != 0:
        pytest.skip("needs root: the attacker is `nobody`, started with runuser")
    if shutil.which("runuser") is None:
        pytest.skip("needs runuser (util-linux) to act as nobody")
    # A copy of pyzmq (with its bundled libzmq) and msgpack that nobody can read.
    site = tempfile.mkdtemp(prefix="mdp-nobody-")
    os.chmod(site, 0o755)
    try:
        packages = Path(zmq.__file__).parent.parent
        for name in ("zmq", "pyzmq.libs", "msgpack"):
            if (packages / name).exists():
                shutil.copytree(packages / name, Path(site) / name)
        version = f"python{sys.version_info.major}.{sys.version_info.minor}"
        candidates = [os.path.realpath(sys.executable), f"/usr/bin/{version}"]
        python = next((p for p in candidates if _runs_as_nobody(p, Path(site))), None)
        if python is None:
            pytest.skip(f"nobody can run none of {candidates} with pyzmq (e.g. under /root)")
        yield Nobody(python, Path(site))
    finally:
        shutil.rmtree(site, ignore_errors=True)


@pytest.fixture
def markers() -> Iterator[Path]:
    """A directory for the marker files (root's: the attacker's command would run as root)."""
    directory = Path(tempfile.mkdtemp(prefix="mdp-mark-"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def default_stack() -> Iterator[str]:
    """A broker and a `shell` worker started with no endpoint option, as the README's
    quickstart does (as root, MDP_WORKER_ALLOW_ROOT, set for the suite, stands for the worst
    case: a root worker)."""
    endpoint = default_endpoint()
    broker = Process([script("mdp-broker"), *HEARTBEAT], to_files=True)
    worker = Process([script("mdp-worker"), "-s", "shell", *HEARTBEAT], to_files=True)
    try:
        wait_until(lambda: ping(endpoint) == 0, timeout=15, interval=0.1, what="a shell worker")
        yield endpoint
    finally:
        worker.stop()
        broker.stop()


def ping(endpoint: str | None = None, *args: str) -> int:
    argv = [script("mdp-client"), *(["-a", endpoint] if endpoint else []), *args]
    argv += ["--timeout", "0.5", "--retries", "0", "ping", "shell"]
    return subprocess.run(argv, capture_output=True, timeout=30).returncode


def run_as_owner(markers: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = {"command_type": "shell", "command_name": f"id -u; touch {markers}/owner"}
    return subprocess.run(
        [script("mdp-client"), *args, "-f", "-", "--json", "--timeout", "2"],
        input=json.dumps(command),
        capture_output=True,
        text=True,
        timeout=30,
    )


# ------------------------------------------------------------------------------------------


def test_nobody_cannot_run_a_command_through_the_default_endpoint(
    nobody: Nobody, default_stack: str, markers: Path
) -> None:
    answer = nobody.run(default_stack, "request", str(markers / "nobody"))
    assert answer["stat"] == "Permission denied"
    assert answer["answered"] is False
    assert not (markers / "nobody").exists()
    owner = run_as_owner(markers)
    assert owner.returncode == 0, owner.stderr
    assert (markers / "owner").exists()


def test_nobody_cannot_register_a_shell_worker_on_the_default_endpoint(
    nobody: Nobody, default_stack: str, markers: Path
) -> None:
    # While nobody's worker waits, the owner sends commands: all reach root's worker.
    attacker = subprocess.Popen(
        as_nobody(nobody.python, nobody.path, "-c", ATTACKER, default_stack, "3", "-"),
        stdout=subprocess.PIPE,
        text=True,
        cwd="/",
    )
    try:
        for _ in range(3):
            owner = run_as_owner(markers)
            assert owner.returncode == 0, owner.stderr
        out, _ = attacker.communicate(timeout=20)
    finally:
        if attacker.poll() is None:
            attacker.kill()
            attacker.wait(5)
    assert json.loads(out) == {"uid": 65534, "stat": "Permission denied", "requests": 0}


def test_a_tcp_broker_without_keys_refuses_to_start_so_nobody_reaches_nothing(
    nobody: Nobody, markers: Path
) -> None:
    endpoint = free_tcp_endpoint()
    broker = subprocess.run(
        [script("mdp-broker"), "--bind", endpoint, *HEARTBEAT],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert broker.returncode == 1
    assert "--insecure" in broker.stderr and "mdp-keys init" in broker.stderr
    answer = nobody.run(endpoint, "request", str(markers / "nobody"))
    assert answer["answered"] is False
    assert not (markers / "nobody").exists()


@pytest.fixture
def key_set() -> Iterator[Path]:
    """`mdp-keys init` in the suite's private XDG_CONFIG_HOME; removed afterwards."""
    init = subprocess.run([script("mdp-keys"), "init"], capture_output=True, text=True, timeout=30)
    root = Path(os.environ["XDG_CONFIG_HOME"]) / "mdp"
    try:
        assert init.returncode == 0, init.stderr
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def curve_stack(key_set: Path) -> Iterator[str]:
    """Plain `mdp-broker --bind tcp://127.0.0.1:PORT` and `mdp-worker -s shell -b` it: no key
    option, no --insecure. The key set is what makes the broker agree to start."""
    endpoint = free_tcp_endpoint()
    broker = start_broker(endpoint, insecure=False)
    worker = Process(
        [script("mdp-worker"), "-s", "shell", "-b", endpoint, *HEARTBEAT], to_files=True
    )
    try:
        wait_until(lambda: ping(endpoint) == 0, timeout=15, interval=0.1, what="a shell worker")
        yield endpoint
    finally:
        worker.stop()
        _, _, log = broker.stop()
        assert b"CURVE with the key set in" in log and b"--insecure" not in log


def test_with_mdp_keys_init_plain_programs_speak_curve_over_tcp(
    curve_stack: str, markers: Path, key_set: Path
) -> None:
    owner = run_as_owner(markers, "-a", curve_stack)
    assert owner.returncode == 0, owner.stderr
    assert (markers / "owner").exists()
    # A key set without the client's key is an error naming the file, never a fallback to
    # no CURVE.
    (key_set / "keys" / "client.key_secret").unlink()
    refused = run_as_owner(markers, "-a", curve_stack, "--retries", "0")
    assert refused.returncode == 2 and "keys/client.key_secret" in refused.stderr


def test_nobody_cannot_run_a_command_through_a_curve_broker_on_tcp(
    nobody: Nobody, curve_stack: str, markers: Path
) -> None:
    answer = nobody.run(curve_stack, "request", str(markers / "nobody"))
    assert answer["answered"] is False
    assert not (markers / "nobody").exists()


# ------------------------------------------------------------------------------------------
# Root


def test_a_root_worker_refuses_shell_without_user_or_allow_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    env = {k: v for k, v in os.environ.items() if k != "MDP_WORKER_ALLOW_ROOT"}
    result = subprocess.run(
        [script("mdp-worker"), "-s", "echo", "-s", "shell", "-b", "inproc://unused"],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert result.returncode == 2
    assert "--user NAME" in result.stderr and "--allow-root" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_root_worker_with_user_runs_commands_as_that_user(markers: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    env = {k: v for k, v in os.environ.items() if k != "MDP_WORKER_ALLOW_ROOT"}
    endpoint = default_endpoint()
    broker = Process([script("mdp-broker"), *HEARTBEAT], to_files=True)
    argv = [script("mdp-worker"), "-s", "shell", "--user", "nobody", *HEARTBEAT]
    worker = Process(argv, env=env, to_files=True)
    try:
        wait_until(lambda: ping(endpoint) == 0, timeout=15, interval=0.1, what="a shell worker")
        command = {"command_type": "shell", "command_name": "id -u"}
        result = subprocess.run(
            [script("mdp-client"), "-f", "-", "--json", "--timeout", "2"],
            input=json.dumps(command),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["results"][0]["stdout"].strip() == "65534"
    finally:
        worker.stop()
        broker.stop()


# ------------------------------------------------------------------------------------------
# What the programs say


def test_an_insecure_tcp_broker_says_so_at_start_and_in_mmi_services() -> None:
    endpoint = free_tcp_endpoint()
    broker = start_broker(endpoint)  # tcp without keys: --insecure
    try:
        services = subprocess.run(
            [script("mdp-client"), "-a", endpoint, "--timeout", "2", "services", "--json"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        _, _, log = broker.stop()
    assert services.returncode == 0 and json.loads(services.stdout) == []
    assert f"unauthenticated peers on {endpoint} (--insecure)" in services.stderr
    assert f"INSECURE (--insecure): {endpoint} accepts unauthenticated peers" in log.decode()
    assert "every user of this machine can run commands" in log.decode()


@pytest.mark.parametrize("program", ["mdp-broker", "mdp-worker", "mdp-client"])
def test_a_runtime_dir_open_to_others_is_refused_by_every_program(program: str) -> None:
    base = Path(tempfile.mkdtemp(prefix="mdp-open-"))
    try:
        (base / "mdp").mkdir(mode=0o700)
        (base / "mdp").chmod(0o755)
        args = {"mdp-worker": ["-s", "echo"], "mdp-client": ["ping", "echo"]}.get(program, [])
        result = subprocess.run(
            [script(program), *args],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "XDG_RUNTIME_DIR": str(base)},
        )
    finally:
        shutil.rmtree(base, ignore_errors=True)
    assert result.returncode == 2, result.stderr
    assert "cannot use the default endpoint" in result.stderr and "chmod 700" in result.stderr
    assert "Traceback" not in result.stderr


def test_group_needs_a_socket_the_group_can_reach() -> None:
    group = grp.getgrgid(os.getgid()).gr_name
    result = subprocess.run(
        [script("mdp-broker"), "--group", group, "--bind", default_endpoint()],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2 and "cannot enter" in result.stderr
    result = subprocess.run(
        [script("mdp-broker"), "--group", group, "--bind", "inproc://x"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2 and "no --bind ipc://PATH" in result.stderr


def test_a_second_broker_on_the_default_endpoint_is_refused(default_stack: str) -> None:
    result = subprocess.run([script("mdp-broker")], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and "already listens" in result.stderr
    assert ping() == 0  # the first one still serves
