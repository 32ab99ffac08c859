"""Running one command (services.execution), without any broker: statuses, process groups,
timeouts, caps, bytes, streaming. Every command here finishes in well under a second or is
killed by a short timeout."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import time
from pathlib import Path

import pytest

from services import execution
from services.bodies import CommandResult, Output, Progress
from services.execution import Limits, run_process

ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}
FAST = Limits(kill_grace=0.5, drain_time=0.3, progress_interval=0.1, flush_interval=0.02)


async def run(
    argv: list[str], timeout: float = 5.0, limits: Limits = FAST, **kw: object
) -> tuple[CommandResult, list[Output | Progress]]:
    events: list[Output | Progress] = []

    async def emit(event: Output | Progress) -> None:
        events.append(event)

    outcome = await run_process(
        argv,
        env=kw.pop("env", ENV),  # type: ignore[arg-type]
        run_limit=timeout,
        limits=limits,
        emit=emit,
        **kw,  # type: ignore[arg-type]
    )
    return outcome, events


async def wait_group_dead(pgid: int, timeout: float = 1.0) -> None:
    """Poll until no member of the group is alive. A SIGKILLed process may still be a moment
    into its exit when its pipes close, so "dead" is observed within a short deadline."""
    deadline = time.monotonic() + timeout
    while not group_gone_or_dead(pgid):
        assert time.monotonic() < deadline, f"process group {pgid} still has live members"
        await asyncio.sleep(0.01)


def group_gone_or_dead(pgid: int) -> bool:
    """No member of the process group is alive (zombies waiting for init count as dead)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, pgrp = fields[0], int(fields[2])
        if pgrp == pgid and state not in ("Z", "X"):
            return False
    return True


async def test_exit_zero_is_ok() -> None:
    outcome, _ = await run(["true"])
    assert (outcome.status, outcome.exit_code, outcome.signal) == ("ok", 0, None)


async def test_nonzero_exit_is_failed_with_the_code() -> None:
    outcome, _ = await run(["sh", "-c", "echo oops >&2; exit 3"])
    assert (outcome.status, outcome.exit_code) == ("failed", 3)
    assert outcome.stderr == b"oops\n"


async def test_death_by_signal_is_failed_with_the_signal() -> None:
    outcome, _ = await run(["sh", "-c", "kill -KILL $$"])
    assert (outcome.status, outcome.exit_code, outcome.signal) == ("failed", None, 9)


async def test_not_found_is_error() -> None:
    outcome, _ = await run(["no-such-command-mdp-test"])
    assert outcome.status == "error"
    assert outcome.message == "not found: no-such-command-mdp-test"


async def test_permission_denied_is_error(tmp_path: Path) -> None:
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(stat.S_IRUSR | stat.S_IWUSR)  # not executable
    outcome, _ = await run([str(script)])
    assert outcome.status == "error"
    assert outcome.message is not None and outcome.message.startswith("permission denied")


async def test_missing_cwd_is_error(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing")
    outcome, _ = await run(["true"], cwd=missing)
    assert outcome.status == "error"
    assert outcome.message == f"working directory not found: {missing}"


async def test_cwd_is_honoured(tmp_path: Path) -> None:
    outcome, _ = await run(["pwd"], cwd=str(tmp_path))
    assert outcome.stdout == str(tmp_path).encode() + b"\n"


async def test_environment_is_exactly_what_was_given() -> None:
    outcome, _ = await run(["/usr/bin/env"], env={"PATH": "/usr/bin:/bin", "ONLY": "this"})
    assert sorted(outcome.stdout.splitlines()) == [b"ONLY=this", b"PATH=/usr/bin:/bin"]


async def test_stdin_is_fed_and_closed() -> None:
    data = bytes(range(256)) * 2000  # larger than a pipe buffer
    outcome, _ = await run(["cat"], stdin=data, limits=Limits(max_output=len(data)))
    assert outcome.stdout == data


async def test_without_stdin_the_command_reads_dev_null() -> None:
    outcome, _ = await run(["cat"], timeout=2)
    assert (outcome.status, outcome.stdout) == ("ok", b"")


async def test_a_command_that_ignores_its_stdin_does_not_hang() -> None:
    outcome, _ = await run(["true"], stdin=b"x" * (4 * 1024 * 1024))
    assert outcome.status == "ok"


async def test_output_is_bytes_never_decoded() -> None:
    outcome, events = await run(["printf", r"\377\376\000abc\351"])
    assert outcome.stdout == b"\xff\xfe\x00abc\xe9"
    assert b"".join(e.data for e in events if isinstance(e, Output)) == outcome.stdout


async def test_each_stream_is_capped_and_flagged_truncated() -> None:
    limits = Limits(max_output=1000, progress_interval=5)
    outcome, events = await run(
        ["sh", "-c", "head -c 3000000 /dev/zero; head -c 10 /dev/zero >&2"], limits=limits
    )
    assert outcome.status == "ok"  # the child was never blocked on a full pipe
    assert len(outcome.stdout) == 1000 and len(outcome.stderr) == 10
    assert outcome.truncated
    streamed = sum(len(e.data) for e in events if isinstance(e, Output) and e.stream == "stdout")
    assert streamed == 1000  # nothing beyond the cap is streamed either


async def test_output_at_the_cap_is_not_truncated() -> None:
    outcome, _ = await run(["head", "-c", "1000", "/dev/zero"], limits=Limits(max_output=1000))
    assert len(outcome.stdout) == 1000 and not outcome.truncated


async def test_output_streams_in_order_and_in_bounded_chunks() -> None:
    limits = Limits(chunk_size=4096, flush_interval=0.01, progress_interval=5)
    outcome, events = await run(["seq", "1", "20000"], limits=limits)
    chunks = [e.data for e in events if isinstance(e, Output)]
    assert b"".join(chunks) == outcome.stdout
    assert len(chunks) > 1
    assert max(len(c) for c in chunks) <= 4096


async def test_progress_is_sent_while_the_command_is_silent() -> None:
    outcome, events = await run(["sleep", "0.45"])
    assert outcome.status == "ok"
    progress = [e for e in events if isinstance(e, Progress)]
    assert len(progress) >= 3
    assert [p.elapsed_ms for p in progress] == sorted(p.elapsed_ms for p in progress)


async def test_timeout_kills_the_whole_group_quickly() -> None:
    started = time.monotonic()
    outcome, _ = await run(["sh", "-c", "echo $$; sleep 60 & sleep 60"], timeout=0.5)
    assert time.monotonic() - started < 2.0
    assert outcome.status == "timeout"
    assert outcome.message is not None and "timed out" in outcome.message
    pgid = int(outcome.stdout.split()[0])
    await wait_group_dead(pgid)


async def test_timeout_escalates_to_sigkill_when_sigterm_is_ignored() -> None:
    started = time.monotonic()
    outcome, _ = await run(["sh", "-c", "trap '' TERM; echo $$; sleep 60"], timeout=0.3)
    assert outcome.status == "timeout"
    assert 0.3 + FAST.kill_grace <= time.monotonic() - started < 2.5
    await wait_group_dead(int(outcome.stdout.split()[0]))


async def test_background_child_holding_the_pipes_does_not_keep_us_waiting() -> None:
    started = time.monotonic()
    outcome, _ = await run(["sh", "-c", "echo $$; sleep 60 & echo done"], timeout=30)
    assert time.monotonic() - started < 2.0
    assert outcome.status == "ok" and outcome.stdout.endswith(b"done\n")
    assert outcome.message is not None and "background" in outcome.message
    await wait_group_dead(int(outcome.stdout.split()[0]))


async def test_background_child_that_released_the_pipes_is_left_alone() -> None:
    outcome, _ = await run(["sh", "-c", "sleep 0.5 >/dev/null 2>&1 & echo $!"])
    assert outcome.status == "ok" and outcome.message is None
    os.kill(int(outcome.stdout), 0)  # still running: it detached its output on purpose
    os.kill(int(outcome.stdout), signal.SIGKILL)


async def test_cancellation_kills_the_group() -> None:
    seen: list[Output | Progress] = []

    async def emit(event: Output | Progress) -> None:
        seen.append(event)

    task = asyncio.create_task(
        run_process(
            ["sh", "-c", "echo $$; sleep 60"], env=ENV, run_limit=30, limits=FAST, emit=emit
        )
    )
    deadline = time.monotonic() + 5
    while not any(isinstance(e, Output) for e in seen):
        assert time.monotonic() < deadline, "no output from the command"
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_group_dead(int(next(e for e in seen if isinstance(e, Output)).data))


# Both ways of starting a command: os.posix_spawn (the common case) and subprocess.Popen (a
# working directory, a user switch or resource limits need it).
START_PATHS = [pytest.param({}, id="posix_spawn"), pytest.param({"cwd": "/"}, id="popen")]


@pytest.mark.parametrize("how", START_PATHS)
async def test_the_command_gets_only_the_standard_descriptors(
    how: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A descriptor the worker inherited from whoever started it (the first command of a process
    # makes those close-on-exec: here, as if this were that first command).
    monkeypatch.setattr(execution, "_INHERITED_CLEARED", False)
    fd = os.open(os.devnull, os.O_RDONLY)
    os.set_inheritable(fd, True)
    try:
        outcome, _ = await run(["/bin/sh", "-c", "ls /proc/$$/fd; true"], **how)
    finally:
        os.close(fd)
    assert outcome.stdout.split() == [b"0", b"1", b"2"]


@pytest.mark.parametrize("how", START_PATHS)
async def test_sigpipe_kills_the_command_as_in_a_shell(how: dict[str, str]) -> None:
    # Python ignores SIGPIPE; the command must not inherit that: `yes` dies of it quietly
    # instead of complaining about a broken pipe.
    outcome, _ = await run(["/bin/sh", "-c", "yes | head -n 1"], **how)
    assert (outcome.status, outcome.stdout, outcome.stderr) == ("ok", b"y\n", b"")


async def test_the_command_is_looked_up_in_its_own_path(tmp_path: Path) -> None:
    denied = tmp_path / "denied"
    (denied / "mdp-test-tool").mkdir(parents=True)  # a directory by that name: EACCES
    found = tmp_path / "found"
    found.mkdir()
    tool = found / "mdp-test-tool"
    tool.write_text("#!/bin/sh\necho from $0\n")
    tool.chmod(0o755)
    path = f"{tmp_path / 'missing'}:{denied}:{found}:/usr/bin:/bin"
    outcome, _ = await run(["mdp-test-tool"], env={"PATH": path})
    assert (outcome.status, outcome.stdout) == ("ok", f"from {tool}\n".encode())
    tool.unlink()  # now only the directory: the first error other than "not found" is told
    outcome, _ = await run(["mdp-test-tool"], env={"PATH": path})
    assert (outcome.status, outcome.message) == ("error", "permission denied: mdp-test-tool")
    outcome, _ = await run(["mdp-test-tool"], env={"PATH": "/usr/bin:/bin"})
    assert (outcome.status, outcome.message) == ("error", "not found: mdp-test-tool")
