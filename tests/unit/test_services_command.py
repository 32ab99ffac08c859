"""The "os" and "shell" services as handlers (services.command), called directly with a fake
request: validation, quoting, environment, timeouts, partials, duplicate protection."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import msgpack
import pytest

from mdp.worker import Request
from services.bodies import (
    CommandResult,
    LookupReply,
    Output,
    Progress,
    Started,
    pack,
    parse_lookup_reply,
    parse_partial,
    parse_result,
)
from services.command import CommandService, CommandSettings, base_environment, command_argv
from services.dedup import RequestCache
from services.execution import Limits

SETTINGS = CommandSettings(limits=Limits(progress_interval=0.1, kill_grace=0.5, drain_time=0.3))


class Call:
    """A fake MDP request: the body, and every PARTIAL the handler sends."""

    def __init__(self, body: list[bytes], service: str = "shell", streaming: bool = True):
        self.partials: list[list[bytes]] = []
        self.request = Request(
            body=body,
            client=b"client",
            service=service,
            worker_id=f"{service}#0",
            streaming=streaming,
            _send_partial=self.partials.append,
        )

    def events(self) -> list[Started | Progress | Output]:
        return [parse_partial(p) for p in self.partials]


async def call(
    service: CommandService, fields: dict[str, object], streaming: bool = True
) -> tuple[CommandResult, Call]:
    c = Call([pack(fields)], service=service.mode, streaming=streaming)
    final = await service(c.request)
    return parse_result(final), c


@pytest.fixture
def shell() -> CommandService:
    return CommandService("shell", SETTINGS)


@pytest.fixture
def os_service() -> CommandService:
    return CommandService("os", SETTINGS)


async def test_os_passes_parameters_without_any_shell(os_service: CommandService) -> None:
    result, _ = await call(os_service, {"command_name": "echo", "parameters": ["a; rm -rf /"]})
    assert (result.status, result.stdout) == ("ok", b"a; rm -rf /\n")


async def test_shell_passes_each_parameter_as_one_word(shell: CommandService) -> None:
    result, _ = await call(
        shell, {"command_name": "echo", "parameters": ["a; rm -rf /", "$HOME", "`id`", "x  y"]}
    )
    assert (result.status, result.stdout) == ("ok", b"a; rm -rf / $HOME `id` x  y\n")


async def test_shell_interprets_the_command_text(shell: CommandService) -> None:
    result, _ = await call(shell, {"command_name": "echo one; echo $((1+1)) | tr 2 3"})
    assert result.stdout == b"one\n3\n"


async def test_shell_parameters_are_positional_arguments(shell: CommandService) -> None:
    result, _ = await call(shell, {"command_name": "printf '%s|'", "parameters": ["a b", "c"]})
    assert result.stdout == b"a b|c|"


async def test_home_expands_only_in_shell(
    shell: CommandService, os_service: CommandService
) -> None:
    fields = {"command_name": "echo", "parameters": ["$HOME"], "env": {"HOME": "/h/test"}}
    os_result, _ = await call(os_service, fields)
    assert os_result.stdout == b"$HOME\n"
    sh_result, _ = await call(shell, {"command_name": "echo $HOME", "env": {"HOME": "/h/test"}})
    assert sh_result.stdout == b"/h/test\n"


def test_argv_of_each_mode() -> None:
    from services.bodies import CommandRequest

    request = CommandRequest(command_name="ls -l", parameters=["a b"])
    assert command_argv("os", request) == ["ls -l", "a b"]
    assert command_argv("shell", request) == ["/bin/sh", "-c", 'ls -l "$@"', "sh", "a b"]
    bare = CommandRequest(command_name="for i in 1 2; do echo $i; done")
    assert command_argv("shell", bare) == ["/bin/sh", "-c", bare.command_name, "sh"]


async def test_environment_is_minimal_plus_the_request_env(os_service: CommandService) -> None:
    result, _ = await call(os_service, {"command_name": "env", "env": {"EXTRA": "1"}})
    names = sorted(line.split(b"=", 1)[0] for line in result.stdout.splitlines())
    assert names == [b"EXTRA", b"HOME", b"LANG", b"PATH"]
    assert b"LANG=C.UTF-8" in result.stdout.splitlines()
    assert set(base_environment()) == {"PATH", "HOME", "LANG"}


async def test_request_env_overrides_the_base(os_service: CommandService) -> None:
    result, _ = await call(os_service, {"command_name": "env", "env": {"LANG": "C"}})
    assert b"LANG=C" in result.stdout.splitlines()


async def test_result_carries_worker_request_id_and_duration(shell: CommandService) -> None:
    result, _ = await call(shell, {"command_name": "exit 4", "request_id": "r-1"})
    assert (result.status, result.exit_code, result.request_id) == ("failed", 4, "r-1")
    assert result.worker is not None
    assert (result.worker.pid, result.worker.id) == (os.getpid(), "shell#0")
    assert result.duration_ms >= 0


async def test_first_partial_is_started_then_output(shell: CommandService) -> None:
    result, c = await call(shell, {"command_name": "echo hi", "request_id": "r-2"})
    events = c.events()
    assert isinstance(events[0], Started)
    assert events[0].request_id == "r-2" and events[0].worker.pid == os.getpid()
    assert [e.data for e in events if isinstance(e, Output)] == [b"hi\n"]
    assert result.stdout == b"hi\n"


async def test_no_partials_when_the_protocol_has_none(shell: CommandService) -> None:
    result, c = await call(shell, {"command_name": "echo hi; sleep 0.25"}, streaming=False)
    assert result.stdout == b"hi\n"
    assert c.partials == []


async def test_timeout_is_capped_by_the_worker() -> None:
    service = CommandService("os", CommandSettings(max_run_limit=0.3, limits=SETTINGS.limits))
    started = time.monotonic()
    result, _ = await call(service, {"command_name": "sleep", "parameters": ["30"], "timeout": 99})
    assert result.status == "timeout"
    assert time.monotonic() - started < 2
    assert result.message is not None and "at most 0.3s" in result.message


async def test_default_timeout_applies_without_one() -> None:
    service = CommandService("os", CommandSettings(default_run_limit=0.3, limits=SETTINGS.limits))
    result, _ = await call(service, {"command_name": "sleep", "parameters": ["30"]})
    assert result.status == "timeout"


async def test_not_found_is_error_with_a_message(os_service: CommandService) -> None:
    result, _ = await call(os_service, {"command_name": "no-such-mdp-command"})
    assert (result.status, result.message) == ("error", "not found: no-such-mdp-command")


async def test_bad_cwd_is_error(os_service: CommandService, tmp_path: Path) -> None:
    result, _ = await call(os_service, {"command_name": "true", "cwd": str(tmp_path / "x")})
    assert result.status == "error" and result.message is not None
    assert "working directory" in result.message


async def test_stdin_reaches_the_command(os_service: CommandService) -> None:
    result, _ = await call(os_service, {"command_name": "cat", "stdin": b"\x00\xffdata"})
    assert result.stdout == b"\x00\xffdata"


@pytest.mark.parametrize(
    ("body", "locs"),
    [
        ([b"\xc1"], [""]),  # not msgpack
        ([pack([1, 2])], [""]),  # not a map
        ([pack({"command_name": "x"}), b"more"], [""]),  # two frames
        ([pack({})], ["command_name"]),
        ([pack({"command_name": "x", "rm": True})], ["rm"]),
        ([pack({"command_name": "x", "parameters": "ls"})], ["parameters"]),
        ([pack({"command_name": "x", "parameters": [1]})], ["parameters.0"]),
        ([pack({"command_name": "x", "timeout": -1})], ["timeout"]),
        ([pack({"command_name": "x", "env": {"A=B": "c"}})], ["env"]),
        ([pack({"command_name": "x\x00y"})], ["command_name"]),
        ([msgpack.packb({1: 2})], [""]),  # non-string keys
    ],
)
async def test_garbage_bodies_are_invalid_with_field_errors(
    shell: CommandService, body: list[bytes], locs: list[str]
) -> None:
    c = Call(body)
    result = parse_result(await shell(c.request))
    assert result.status == "invalid"
    assert result.errors is not None
    assert [e["loc"] for e in result.errors] == locs
    assert all(e["msg"] for e in result.errors)
    assert c.partials == []  # not accepted: no Started


async def test_invalid_body_still_echoes_a_usable_request_id(shell: CommandService) -> None:
    result, _ = await call(shell, {"request_id": "keep-me", "parameters": 5})
    assert (result.status, result.request_id) == ("invalid", "keep-me")


async def test_duplicate_request_id_is_not_run_twice(shell: CommandService, tmp_path: Path) -> None:
    marker = tmp_path / "runs"
    fields = {"command_name": f"echo run >> {marker}; echo out", "request_id": "dup-1"}
    first, _ = await call(shell, fields)
    second, c = await call(shell, fields)
    assert marker.read_text() == "run\n"
    assert second == first
    assert isinstance(c.events()[0], Started)


async def test_a_retry_follows_the_run_in_progress(shell: CommandService, tmp_path: Path) -> None:
    marker = tmp_path / "runs"
    fields = {"command_name": f"echo run >> {marker}; sleep 0.4; echo out", "request_id": "dup-2"}
    first = asyncio.create_task(call(shell, fields))
    deadline = time.monotonic() + 5
    while not marker.exists():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    second, follower = await call(shell, fields)
    assert second == (await first)[0]
    assert second.stdout == b"out\n"
    assert marker.read_text() == "run\n"
    assert any(isinstance(e, Progress) for e in follower.events())


async def test_same_request_id_for_another_request_is_rejected(shell: CommandService) -> None:
    await call(shell, {"command_name": "true", "request_id": "dup-3"})
    result, c = await call(shell, {"command_name": "false", "request_id": "dup-3"})
    assert (result.status, result.request_id) == ("rejected", "dup-3")
    assert c.partials == []


async def test_request_ids_are_per_service(tmp_path: Path) -> None:
    cache = RequestCache()
    marker = tmp_path / "runs"
    fields = {"command_name": "sh", "parameters": ["-c", f"echo x >> {marker}"], "request_id": "s"}
    await call(CommandService("os", SETTINGS, cache), fields)
    await call(CommandService("shell", SETTINGS, cache), fields)
    assert marker.read_text() == "x\nx\n"


async def test_cancelled_run_is_forgotten_and_answered_with_an_error(shell: CommandService) -> None:
    c = Call([pack({"command_name": "sleep 30", "request_id": "dup-4"})])
    task = asyncio.create_task(shell(c.request))
    deadline = time.monotonic() + 5
    while not c.partials:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    reply = parse_result(shell.error_reply(c.request, asyncio.CancelledError()))
    assert (reply.status, reply.request_id) == ("error", "dup-4")
    assert shell.cache.get(("shell", "dup-4")) is None  # a later retry may run it


async def test_internal_error_reply_is_a_command_result(shell: CommandService) -> None:
    c = Call([pack({"command_name": "x"})])
    reply = parse_result(shell.error_reply(c.request, RuntimeError("bug")))
    assert reply.status == "error" and reply.message == "internal error in the worker: RuntimeError"


# ---------------------------------------------------------------------------------------------
# Lookup and fence on MODE@NAME (spec/command-service.md §14.3)


async def lookup(service: CommandService, request_id: str, fence: bool = False) -> LookupReply:
    c = Call([pack({"lookup": request_id, "fence": fence})], service="shell@w")
    reply = parse_lookup_reply(await service.control(c.request))
    assert c.partials == []  # answered at once, FINAL only
    return reply


async def test_lookup_of_an_unseen_id_is_unknown_and_changes_nothing(
    shell: CommandService, tmp_path: Path
) -> None:
    reply = await lookup(shell, "never-seen")
    assert (reply.request_id, reply.state, reply.fenced) == ("never-seen", "unknown", False)
    assert reply.worker is not None and reply.worker.name == shell.settings.name
    marker = tmp_path / "runs"
    result, _ = await call(
        shell, {"command_name": f"echo x >> {marker}", "request_id": "never-seen"}
    )
    assert result.status == "ok" and marker.read_text() == "x\n"  # a plain lookup fences nothing


async def test_a_fenced_id_is_refused_if_it_arrives_later(
    shell: CommandService, tmp_path: Path
) -> None:
    reply = await lookup(shell, "late", fence=True)
    assert (reply.state, reply.fenced) == ("unknown", True)
    marker = tmp_path / "runs"
    result, c = await call(shell, {"command_name": f"echo x >> {marker}", "request_id": "late"})
    assert (result.status, result.request_id) == ("cancelled", "late")
    assert not marker.exists() and c.partials == []  # never started
    again = await lookup(shell, "late", fence=True)
    assert (again.state, again.fenced) == ("cancelled", True)


async def test_lookup_says_running_then_finished_and_fence_does_not_touch_a_known_id(
    shell: CommandService, tmp_path: Path
) -> None:
    marker = tmp_path / "runs"
    fields = {"command_name": f"echo x >> {marker}; sleep 0.3; echo out", "request_id": "r1"}
    first = asyncio.create_task(call(shell, fields))
    deadline = time.monotonic() + 5
    while not marker.exists():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    running = await lookup(shell, "r1", fence=True)
    assert (running.state, running.fenced) == ("running", False)
    result, _ = await first
    assert result.status == "ok"
    finished = await lookup(shell, "r1", fence=True)
    assert (finished.state, finished.fenced) == ("finished", False)
    # A re-attach (the same request and request_id, to MODE@NAME) gets the stored FINAL.
    c = Call([pack(fields)], service="shell@w")
    again = parse_result(await shell.control(c.request))
    assert again == result and marker.read_text() == "x\n"


async def test_a_reattach_through_the_addressed_service_follows_the_run(
    shell: CommandService, tmp_path: Path
) -> None:
    """The duplicate-protection key is the command service, whether a request came to MODE or
    MODE@NAME (§10); following a run takes no concurrency slot."""
    shell.limit = asyncio.Semaphore(1)
    marker = tmp_path / "runs"
    fields = {"command_name": f"echo x >> {marker}; sleep 0.4; echo out", "request_id": "r2"}
    first = asyncio.create_task(call(shell, fields))
    deadline = time.monotonic() + 5
    while not marker.exists():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    c = Call([pack({**fields, "start_by": time.time() - 5})], service="shell@w")
    follower = asyncio.create_task(shell.control(c.request))
    while not c.partials:  # `started` at once, although the only slot is taken
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    assert isinstance(c.events()[0], Started)
    assert parse_result(await follower) == (await first)[0]
    assert marker.read_text() == "x\n"


async def test_a_reattach_with_a_past_start_by_starts_nothing_where_the_id_is_unknown(
    shell: CommandService, tmp_path: Path
) -> None:
    marker = tmp_path / "runs"
    fields = {
        "command_name": f"echo x >> {marker}",
        "request_id": "r3",
        "start_by": time.time() - 5,
    }
    c = Call([pack(fields)], service="shell@w")
    result = parse_result(await shell.control(c.request))
    assert result.status == "expired" and not marker.exists()


async def test_a_bad_lookup_is_invalid(shell: CommandService) -> None:
    c = Call([pack({"lookup": "", "fence": "yes"})], service="shell@w")
    result = parse_result(await shell.control(c.request))
    assert result.status == "invalid"
    assert {e["loc"] for e in result.errors or []} == {"lookup", "fence"}
