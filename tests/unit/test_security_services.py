"""The worker policy inside the command services (spec/security.md §10), called directly with
a fake request: rejection before anything runs, the user switch, resource limits."""

from __future__ import annotations

import logging
import os
import pwd
from pathlib import Path

import pytest

from services.bodies import CommandResult, pack, parse_result
from services.command import CommandService, CommandSettings
from services.policy import ChildLimits, CommandPolicy
from tests.unit.test_services_command import Call


async def run(service: CommandService, **fields: object) -> CommandResult:
    c = Call([pack(fields)], service=service.mode)
    return parse_result(await service(c.request))


async def test_a_rejected_request_runs_nothing_and_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    service = CommandService("shell", CommandSettings(policy=CommandPolicy(allow=("echo",))))
    marker = tmp_path / "marker"
    result = await run(service, command_name=f"echo x; touch {marker}", request_id="r1")
    assert (result.status, result.request_id) == ("rejected", "r1")
    assert result.message and "control characters" in result.message
    assert not marker.exists()
    assert "rejected shell" in caplog.text and "636c69656e74" in caplog.text  # client address


async def test_a_rejected_request_id_can_be_used_again_once_allowed() -> None:
    """Rejection happens before duplicate protection: nothing is remembered for it."""
    strict = CommandService("os", CommandSettings(policy=CommandPolicy(allow=("true",))))
    assert (await run(strict, command_name="echo", request_id="same")).status == "rejected"
    assert (await run(strict, command_name="true", request_id="same")).status == "ok"


async def test_deny_env_rejects_and_an_empty_env_is_fine() -> None:
    service = CommandService("os", CommandSettings(policy=CommandPolicy(deny_env=True)))
    assert (await run(service, command_name="true", env={"A": "1"})).status == "rejected"
    assert (await run(service, command_name="true", env={})).status == "ok"


async def test_max_procs_stops_a_command_from_forking() -> None:
    """RLIMIT_NPROC counts the user's processes; 1 leaves no room for a child. (Root is exempt
    from it, so as root the command runs as nobody, as --user would make it.)"""
    user = "nobody" if os.geteuid() == 0 else None
    service = CommandService("shell", CommandSettings(child=ChildLimits(max_procs=1, user=user)))
    result = await run(service, command_name="/bin/true & wait; echo forked", cwd="/")
    assert result.status == "failed", result
    assert b"forked" not in result.stdout
    assert (await run(service, command_name="echo no-fork-needed", cwd="/")).status == "ok"


@pytest.mark.skipif(os.geteuid() != 0, reason="--user needs root")
async def test_user_runs_commands_as_that_account_with_its_home(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    nobody = pwd.getpwnam("nobody")
    service = CommandService("shell", CommandSettings(child=ChildLimits(user="nobody")))
    result = await run(service, command_name='echo "$(id -u) $(id -g) $HOME"', cwd="/")
    assert result.status == "ok", result
    assert result.stdout == f"{nobody.pw_uid} {nobody.pw_gid} {nobody.pw_dir}\n".encode()


@pytest.mark.skipif(os.geteuid() == 0, reason="root may switch users")
def test_user_without_root_is_refused_at_start() -> None:
    with pytest.raises(ValueError, match="root"):
        CommandService("os", CommandSettings(child=ChildLimits(user="nobody")))
