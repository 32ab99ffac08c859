"""The "os" and "shell" services end to end: `mdp-broker` + `mdp-worker` subprocesses and a raw
MDP client. These are the acceptance checks of spec/command-service.md.

One broker and one worker (os + shell, two connections each) serve the whole module; every
test uses its own request_ids, so they do not interfere.
"""

from __future__ import annotations

import itertools
import stat
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import msgpack
import pytest

from services.bodies import Started
from tests.integration.test_worker_harness import (
    RawClient,
    group_alive,
    live_members,
    output_of,
    rss,
    start_worker,
    wait_workers,
    workers_of,
)
from tests.support import Process, free_tcp_endpoint, start_broker, wait_until


@dataclass
class Setup:
    endpoint: str
    worker: Process


@pytest.fixture(scope="module")
def setup() -> Iterator[Setup]:
    endpoint = free_tcp_endpoint()
    broker = start_broker(endpoint)
    worker = start_worker(endpoint, "-s", "os", "-s", "shell", "-c", "2")
    try:
        wait_workers(endpoint, "os", 2)
        wait_workers(endpoint, "shell", 2)
        yield Setup(endpoint, worker)
    finally:
        worker.stop(timeout=3)
        broker.stop(timeout=3)


@pytest.fixture
def client(setup: Setup) -> Iterator[RawClient]:
    with RawClient(setup.endpoint) as c:
        yield c


def test_os_never_lets_a_shell_see_the_parameters(client: RawClient) -> None:
    events, result = client.command("os", {"command_name": "echo", "parameters": ["a; rm -rf /"]})
    assert (result.status, result.stdout) == ("ok", b"a; rm -rf /\n")
    assert output_of(events) == b"a; rm -rf /\n"


def test_shell_passes_parameters_quoted(client: RawClient) -> None:
    _, result = client.command("shell", {"command_name": "echo", "parameters": ["a; rm -rf /"]})
    assert (result.status, result.stdout) == ("ok", b"a; rm -rf /\n")


def test_home_expands_only_in_shell(client: RawClient) -> None:
    env = {"HOME": "/home/mdp-test"}
    _, os_result = client.command("os", {"command_name": "echo", "parameters": ["$HOME"]})
    assert os_result.stdout == b"$HOME\n"
    _, os_param = client.command(
        "shell", {"command_name": "echo", "parameters": ["$HOME"], "env": env}
    )
    assert os_param.stdout == b"$HOME\n"  # a parameter is data, even in the shell
    _, sh_result = client.command("shell", {"command_name": "echo $HOME", "env": env})
    assert sh_result.stdout == b"/home/mdp-test\n"


def test_started_is_the_first_partial_and_names_the_worker(client: RawClient, setup: Setup) -> None:
    events, result = client.command("shell", {"command_name": "echo hi", "request_id": "st-1"})
    first = events[0]
    assert isinstance(first, Started)
    assert (first.worker.pid, first.request_id) == (setup.worker.pid, "st-1")
    assert result.worker is not None and result.worker.pid == setup.worker.pid


@pytest.mark.parametrize(
    "script",
    ["echo $$; sleep 60", "echo $$; sleep 60 & sleep 60"],
    ids=["sleep", "with-background-grandchild"],
)
def test_timeout_kills_the_whole_process_group(client: RawClient, script: str) -> None:
    started = time.monotonic()
    events, result = client.command("shell", {"command_name": script, "timeout": 1}, 10)
    elapsed = time.monotonic() - started
    print(f"timeout 1s answered after {elapsed:.2f}s")
    assert result.status == "timeout"
    assert elapsed < 3.0
    pgid = int(result.stdout.split()[0])
    assert output_of(events).split()[0] == str(pgid).encode()
    # Nothing of the group runs any more. (A SIGKILLed process may be a moment into its exit
    # when its pipes close, hence a short deadline rather than one look.)
    wait_until(lambda: live_members(pgid) == [], timeout=1, what=f"group {pgid} to be dead")
    # Killed members become zombies until their parent (init, for the orphaned grandchild)
    # reaps them; this machine's init does so every ~2 s. Then the group is gone entirely.
    wait_until(lambda: not group_alive(pgid), timeout=5, what=f"process group {pgid} to vanish")


def test_huge_output_is_capped_and_memory_stays_small(client: RawClient, setup: Setup) -> None:
    """200 MB on stdout: the worker keeps 1 MiB, says truncated, and its RSS stays < 100 MB."""
    client.send("shell", [msgpack.packb({"command_name": "head -c 200000000 /dev/zero"})])
    peak = rss(setup.worker.pid)
    deadline = time.monotonic() + 60
    while True:
        reply = client.recv(max(0.0, deadline - time.monotonic()))
        peak = max(peak, rss(setup.worker.pid))
        if reply.final:
            break
    result = msgpack.unpackb(reply.body[0])
    print(f"worker RSS peak while streaming 200 MB: {peak / 2**20:.1f} MiB")
    assert result["status"] == "ok"
    assert result["truncated"] is True
    assert result["stdout"] == b"\0" * 1024 * 1024
    assert peak < 100 * 2**20


def test_non_utf8_output_arrives_byte_exact(client: RawClient, tmp_path: Path) -> None:
    data = bytes(range(256)) * 4 + b"\xff\xfe\xc3\x28"
    source = tmp_path / "bytes.bin"
    source.write_bytes(data)
    events, result = client.command("os", {"command_name": "cat", "parameters": [str(source)]})
    assert result.stdout == data
    assert output_of(events) == data
    _, err = client.command("shell", {"command_name": f"cat {source} >&2"})
    assert err.stderr == data


def test_not_found_is_error(client: RawClient) -> None:
    _, result = client.command("os", {"command_name": "no-such-command-mdp"})
    assert (result.status, result.message) == ("error", "not found: no-such-command-mdp")


def test_permission_denied_is_error(client: RawClient, tmp_path: Path) -> None:
    script = tmp_path / "not-executable.sh"
    script.write_text("#!/bin/sh\necho should not run\n")
    script.chmod(stat.S_IRUSR | stat.S_IWUSR)
    _, result = client.command("os", {"command_name": str(script)})
    assert result.status == "error"
    assert result.message == f"permission denied: {script}"


def test_bad_cwd_is_error(client: RawClient, tmp_path: Path) -> None:
    _, result = client.command("os", {"command_name": "pwd", "cwd": str(tmp_path / "gone")})
    assert result.status == "error" and "working directory" in (result.message or "")


def test_in_the_shell_a_missing_command_is_the_shells_exit_127(client: RawClient) -> None:
    _, result = client.command("shell", {"command_name": "no-such-command-mdp"})
    assert (result.status, result.exit_code) == ("failed", 127)


def test_garbage_body_is_invalid_not_a_crash(client: RawClient) -> None:
    _, final = client.request("shell", [b"\xc1garbage"], timeout=5)
    result = msgpack.unpackb(final.body[0])
    assert result["status"] == "invalid" and result["errors"]
    events, result2 = client.command("shell", {"command_name": "echo", "bogus": 1})
    assert result2.status == "invalid" and events == []
    assert result2.errors == [
        {"loc": "bogus", "msg": "Extra inputs are not permitted", "type": "extra_forbidden"}
    ]
    _, ok = client.command("shell", {"command_name": "echo still alive"})
    assert ok.stdout == b"still alive\n"


def test_duplicate_request_id_runs_once(client: RawClient, tmp_path: Path) -> None:
    marker = tmp_path / "executions"
    fields = {"command_name": f"echo ran >> {marker}; echo result", "request_id": "dup-seq"}
    _, first = client.command("shell", fields)
    _, second = client.command("shell", fields)
    assert marker.read_text() == "ran\n"
    assert second == first


def test_duplicate_request_id_in_flight_follows_the_first_run(setup: Setup, tmp_path: Path) -> None:
    """Two connections get the same request_id at once: one runs it, the other follows."""
    marker = tmp_path / "executions"
    fields = {"command_name": f"echo ran >> {marker}; sleep 0.5; echo $$", "request_id": "dup-par"}

    def run(_: int) -> bytes:
        with RawClient(setup.endpoint) as c:
            return c.command("shell", fields, timeout=10)[1].stdout

    with ThreadPoolExecutor(2) as pool:
        outputs = list(pool.map(run, range(2)))
    assert marker.read_text() == "ran\n"
    assert outputs[0] == outputs[1]


def test_mdp_0_1_client_gets_only_the_final_result(setup: Setup) -> None:
    """RFC 7 has no PARTIAL: a 0.1 client of a 0.2 worker gets the complete result as REPLY."""
    with RawClient(setup.endpoint, "0.1") as c:
        events, result = c.command("shell", {"command_name": "echo one; echo two >&2"})
    assert events == []
    assert (result.stdout, result.stderr) == (b"one\n", b"two\n")


def test_worker_process_is_still_the_same(setup: Setup) -> None:
    assert setup.worker.alive()
    # Right after the process was full (--concurrency is global), its idle connections register
    # again once a slot has stayed free for a moment (spec/command-service.md §14.6).
    wait_until(lambda: workers_of(setup.endpoint, "os") == 2, timeout=5, what="2 os connections")


def test_a_long_silent_command_keeps_the_worker_registered_and_reports_progress() -> None:
    """With 100 ms x 3 heartbeats a worker silent for 0.3 s would be expired; a command silent
    for 3 s (10 expiry windows) must not make it silent. Progress PARTIALs (every 0.5 s here,
    2 s by default) reach the client, one per interval."""
    endpoint = free_tcp_endpoint()
    broker = start_broker(endpoint)
    worker = start_worker(endpoint, "-s", "shell", "-c", "1", "--progress-interval", "0.5")
    try:
        wait_workers(endpoint, "shell", 1)
        with RawClient(endpoint) as client:
            started = time.monotonic()
            command = {"command_name": "sleep 3; echo done", "timeout": 30}
            client.send("shell", [msgpack.packb(command)])
            partials, final = client.collect(timeout=20)
        elapsed = time.monotonic() - started
        result = msgpack.unpackb(final.body[0])
        assert result["status"] == "ok" and result["stdout"] == b"done\n"
        assert elapsed >= 3
        times = [started] + [t for t, _ in partials] + [time.monotonic()]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        kinds = [msgpack.unpackb(p.body[0]) for _, p in partials]
        progress = [k for k in kinds if k.get("event") == "progress"]
        print(f"3 s command: {len(progress)} progress partials, largest gap {max(gaps):.2f}s")
        assert len(progress) >= 4
        assert max(gaps) < 0.5 + 1.0  # the interval, plus slack for a busy machine
        # The broker never expired the worker: it is still registered.
        assert workers_of(endpoint, "shell") == 1
    finally:
        worker.stop(timeout=3)
        broker.stop(timeout=3)
