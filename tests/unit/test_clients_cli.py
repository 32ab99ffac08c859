"""`mdp-client` options, input errors, help and rendering, without a broker (click's runner)."""

from __future__ import annotations

import base64
import io
import json
import socket
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from rich.console import Console

from clients.cli import main
from clients.commands import CommandSpec
from clients.render import HumanReport, printable
from clients.results import CommandOutcome, ExitCode, exit_code_for, json_bytes
from services.bodies import WorkerInfo

DEAD = "tcp://127.0.0.1:1"


def invoke(*args: str, input: str | None = None, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(main, list(args), input=input, env=env)


@pytest.fixture
def commands(tmp_path: Path) -> str:
    path = tmp_path / "commands.json"
    path.write_text(json.dumps({"command_type": "os", "command_name": "true"}))
    return str(path)


def test_help_lists_exit_codes_and_env_vars() -> None:
    result = invoke("-h")
    assert result.exit_code == 0
    for code in ["65", "66", "69", "75", "124"]:
        assert f"  {code} " in result.output
    assert "MDP_CLIENT_BROKER" in result.output


def test_version() -> None:
    result = invoke("--version")
    assert result.exit_code == 0
    assert "mdp-client" in result.output


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--json", "--jsonl"],
        ["--stream", "--json"],
        ["--parallel", "0"],
        ["--timeout", "0"],
        ["--mdp-version", "0.3"],
        ["--no-such-option"],
        ["unknown-subcommand"],
        ["-a", "localhost:5555"],
        ["-a", "tcp://127.0.0.1:99999"],
        ["-a", "tcp://bad host:5555"],
    ],
)
def test_usage_errors_exit_2(commands: str, args: list[str]) -> None:
    full = args if not args or args[0] == "unknown-subcommand" else ["-f", commands, *args]
    result = invoke(*full)
    assert result.exit_code == ExitCode.USAGE, result.output
    assert "Traceback" not in result.output


def test_file_with_subcommand_is_a_usage_error(commands: str) -> None:
    assert invoke("-f", commands, "services").exit_code == ExitCode.USAGE


def test_file_from_environment_does_not_block_subcommands(commands: str) -> None:
    env = {"MDP_CLIENT_FILE": commands}
    result = invoke("-a", DEAD, "--timeout", "0.1", "--retries", "0", "ping", "os", env=env)
    assert result.exit_code == ExitCode.UNAVAILABLE


def test_bad_file_exits_65_with_every_problem(tmp_path: Path) -> None:
    path = tmp_path / "commands.json"
    path.write_text(json.dumps([{"command_type": "os"}, {"command_type": "os", "x": 1}]))
    result = invoke("-f", str(path), "-a", DEAD)
    assert result.exit_code == ExitCode.DATA_ERROR
    assert f"mdp-client: {path}[0].command_name: missing (required)" in result.output
    assert f"mdp-client: {path}[1].x: unknown field" in result.output


def test_invalid_json_on_stdin_exits_65() -> None:
    result = invoke("-f", "-", input="{nope")
    assert result.exit_code == ExitCode.DATA_ERROR
    assert "<stdin>: invalid JSON at line 1" in result.output


def test_missing_file_exits_66(tmp_path: Path) -> None:
    result = invoke("-f", str(tmp_path / "absent.json"))
    assert result.exit_code == ExitCode.NO_INPUT
    assert "absent.json: no such file" in result.output


def test_refused_connection_exits_69_at_once_saying_so(commands: str) -> None:
    """Issue 11 defect 7: nothing listens there; said within about a second, not after
    every attempt timed out."""
    start = time.monotonic()
    result = invoke("-f", commands, "-a", DEAD, "--timeout", "5", "--retries", "2")
    elapsed = time.monotonic() - start
    assert result.exit_code == ExitCode.UNAVAILABLE
    assert "cannot reach the broker at tcp://127.0.0.1:1: connection refused" in result.output
    assert elapsed < 1.5


def test_unknown_host_exits_69_at_once_saying_so(commands: str) -> None:
    start = time.monotonic()
    result = invoke("-f", commands, "-a", "tcp://no-such-host.invalid:5555", "--timeout", "5")
    assert result.exit_code == ExitCode.UNAVAILABLE
    assert "unknown host 'no-such-host.invalid'" in result.output
    assert time.monotonic() - start < 1.5


def test_silent_broker_exits_69_within_bound(commands: str) -> None:
    """Something accepts the connection but never answers: only the attempts can tell."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        endpoint = f"tcp://127.0.0.1:{listener.getsockname()[1]}"
        start = time.monotonic()
        result = invoke("-f", commands, "-a", endpoint, "--timeout", "0.2", "--retries", "1")
        elapsed = time.monotonic() - start
    assert result.exit_code == ExitCode.UNAVAILABLE
    assert f"no broker answered at {endpoint} (2 attempts, 0.2 s each)" in result.output
    assert elapsed < 0.4 + 1.0


def test_options_from_environment(commands: str) -> None:
    with socket.socket() as listener:  # accepts, never answers: the attempts tell
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        env = {
            "MDP_CLIENT_FILE": commands,
            "MDP_CLIENT_BROKER": f"tcp://127.0.0.1:{listener.getsockname()[1]}",
            "MDP_CLIENT_TIMEOUT": "0.1",
            "MDP_CLIENT_RETRIES": "0",
        }
        result = invoke(env=env)
    assert result.exit_code == ExitCode.UNAVAILABLE
    assert "(1 attempt, 0.1 s each)" in result.output


@pytest.mark.parametrize("args", [["ping", "shell"], ["services"]])
def test_subcommands_without_broker_exit_69(args: list[str]) -> None:
    result = invoke("-a", DEAD, "--timeout", "0.1", "--retries", "0", *args)
    assert result.exit_code == ExitCode.UNAVAILABLE
    assert "cannot reach the broker at tcp://127.0.0.1:1: connection refused" in result.output
    # Options are accepted after the subcommand too.
    result = invoke(*args, "-a", DEAD, "--timeout", "0.1", "--retries", "0")
    assert result.exit_code == ExitCode.UNAVAILABLE


# ---------------------------------------------------------------------------------------------
# Results and rendering


def outcome(status: str, **kw: object) -> CommandOutcome:
    spec = CommandSpec(command_type="shell", command_name="echo", parameters=["hi"])
    return CommandOutcome(index=0, spec=spec, request_id="rid", status=status, **kw)  # type: ignore[arg-type]


def test_exit_code_precedence() -> None:
    """lost (75) > timeout (124) > failed (1) > ok (0)."""
    assert exit_code_for([outcome("ok")]) is ExitCode.OK
    assert exit_code_for([outcome("ok"), outcome("invalid")]) is ExitCode.FAILED
    assert exit_code_for([outcome("failed"), outcome("timeout")]) is ExitCode.TIMEOUT
    assert exit_code_for([outcome("timeout"), outcome("lost")]) is ExitCode.LOST


def test_json_keeps_every_byte() -> None:
    assert json_bytes(b"caf\xc3\xa9") == "café"
    assert json_bytes(b"caf\xe9") == {"base64": base64.b64encode(b"caf\xe9").decode()}
    document = outcome("ok", stdout=b"\xff\x00", stderr=b"warn").to_json()
    assert base64.b64decode(document["stdout"]["base64"]) == b"\xff\x00"
    assert document["stderr"] == "warn"


def test_printable_escapes_control_characters() -> None:
    assert printable(b"a\x1b[31mred\r\nb\tc\xff") == "a\\x1b[31mred\nb\tc\ufffd"


def render(outcomes: list[CommandOutcome], stream: bool = False) -> str:
    buffer = io.StringIO()
    console = Console(file=buffer, width=200, color_system=None)
    specs = [o.spec for o in outcomes]
    with HumanReport(specs, stream=stream, out=console, err=console) as report:
        for o in outcomes:
            report.finished(o)
    report.close(outcomes, 1.5)
    return buffer.getvalue()


def test_human_output_shows_status_exit_duration_worker_and_output() -> None:
    text = render(
        [
            outcome(
                "failed",
                exit_code=3,
                duration_ms=12.4,
                worker=WorkerInfo(host="h", pid=7),
                stdout=b"out line\n",
                stderr=b"caf\xe9\n",
            )
        ]
    )
    assert "failed" in text and "exit 3" in text and "12 ms" in text and "worker h/7" in text
    assert "out│ out line" in text
    assert "err│ caf\ufffd" in text


def test_human_summary_for_lists() -> None:
    o1, o2 = outcome("ok"), outcome("timeout")
    o2.index = 1
    text = render([o1, o2])
    assert "2 commands in 1.50 s: 1 ok, 1 timeout" in text


def test_streamed_output_is_prefixed_and_not_repeated() -> None:
    spec = CommandSpec(command_type="os", command_name="ls")
    specs = [spec, spec]
    buffer = io.StringIO()
    console = Console(file=buffer, width=200, color_system=None)
    report = HumanReport(specs, stream=True, out=console, err=console)
    report.output(1, "stdout", b"par")
    report.output(1, "stdout", b"tial\nrest")
    o = CommandOutcome(
        index=1, spec=spec, request_id="rid", status="ok", stdout=b"partial\nrest", streamed=True
    )
    report.finished(o)
    lines = buffer.getvalue().splitlines()
    assert lines[0] == "[1] os: ls │ partial"
    assert lines[1] == "[1] os: ls │ rest"
    assert lines[2].startswith("ok ")
    assert len(lines) == 3
