"""Loading and validating commands files (`clients.commands`)."""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

import pytest

from clients.commands import EX_DATAERR, EX_NOINPUT, InputError, load_commands
from services.bodies import parse_request

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def write(tmp_path: Path, document: object, name: str = "commands.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(document))
    return str(path)


def problems(tmp_path: Path, document: object) -> list[str]:
    path = write(tmp_path, document)
    with pytest.raises(InputError) as info:
        load_commands(path)
    assert info.value.exit_code == EX_DATAERR
    prefix = str(tmp_path) + os.sep
    return [p.removeprefix(prefix) for p in info.value.problems]


def test_single_object_in_the_original_format(tmp_path: Path) -> None:
    path = write(
        tmp_path, {"command_type": "shell", "command_name": "echo", "parameters": ["Hello"]}
    )
    [spec] = load_commands(path)
    assert (spec.command_type, spec.command_name, spec.parameters) == ("shell", "echo", ["Hello"])


def test_list_with_optional_fields(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        [
            {"command_type": "os", "command_name": "true"},
            {
                "command_type": "shell",
                "command_name": "echo $X",
                "timeout": 5,
                "cwd": "/tmp",
                "env": {"X": "1"},
            },
        ],
    )
    first, second = load_commands(path)
    assert first.parameters == [] and first.timeout is None
    assert second.timeout == 5.0 and second.cwd == "/tmp" and second.env == {"X": "1"}


def test_request_body_carries_the_request_id_and_validates(tmp_path: Path) -> None:
    [spec] = load_commands(
        write(tmp_path, {"command_type": "os", "command_name": "ls", "timeout": 2.5})
    )
    body = spec.request("abc").pack()
    request = parse_request([body])
    assert request.request_id == "abc"
    assert request.command_name == "ls" and request.timeout == 2.5


def test_every_problem_is_reported_with_its_place(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        [
            {"command_type": "shell", "command_name": "echo"},
            {"command_type": "shell", "command_name": "echo", "parameters": "Hello"},
            {"command_type": "os", "command_name": "ls", "parameters": ["-l", 3]},
            {"command_name": "ls", "colour": "red"},
            "ls -l",
        ],
    )
    assert found[0].startswith("commands.json[1].parameters: ")
    assert found[1].startswith("commands.json[2].parameters[1]: ")
    assert "commands.json[3].command_type: missing (required)" in found
    assert any(p.startswith("commands.json[3].colour: unknown field") for p in found)
    assert found[-1] == "commands.json[4]: expected a command object, got a string"
    assert len(found) == 5


def test_single_object_problems_have_no_index(tmp_path: Path) -> None:
    assert problems(tmp_path, {"command_type": "os", "command_name": ""})[0].startswith(
        "commands.json.command_name: "
    )


@pytest.mark.parametrize(
    ("entry", "where"),
    [
        ({"timeout": 0}, "timeout"),
        ({"timeout": -1}, "timeout"),
        ({"timeout": "5"}, "timeout"),
        ({"timeout": True}, "timeout"),
        ({"env": {"A=B": "x"}}, "env"),
        ({"env": {"A": 1}}, "env.A"),
        ({"cwd": ""}, "cwd"),
        ({"command_name": "a\u0000b"}, "command_name"),
        ({"command_type": "mmi.service"}, "command_type"),
        ({"command_type": "bad\nname"}, "command_type"),
        ({"request_id": "mine"}, "request_id"),
    ],
)
def test_field_limits(tmp_path: Path, entry: dict[str, object], where: str) -> None:
    document = {"command_type": "os", "command_name": "ls", **entry}
    [problem] = problems(tmp_path, document)
    assert problem.startswith(f"commands.json.{where}: "), problem


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ([], "commands.json: the list holds no commands"),
        ("ls", "commands.json: expected a command object or a list of them, got a string"),
        (None, "commands.json: expected a command object or a list of them, got null"),
    ],
)
def test_wrong_top_level(tmp_path: Path, document: object, message: str) -> None:
    assert problems(tmp_path, document) == [message]


def test_invalid_json_says_where(tmp_path: Path) -> None:
    path = tmp_path / "commands.json"
    path.write_text('[\n  {"command_type": "os",}\n]')
    with pytest.raises(InputError) as info:
        load_commands(str(path))
    assert info.value.exit_code == EX_DATAERR
    [problem] = info.value.problems
    assert problem.startswith(f"{path}: invalid JSON at line 2, column ")


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "commands.json"
    path.write_bytes(b'{"command_type": "\xff"}')
    with pytest.raises(InputError, match="not UTF-8") as info:
        load_commands(str(path))
    assert info.value.exit_code == EX_DATAERR


def test_missing_file_is_no_input(tmp_path: Path) -> None:
    with pytest.raises(InputError) as info:
        load_commands(str(tmp_path / "nope.json"))
    assert info.value.exit_code == EX_NOINPUT
    assert info.value.problems == [f"{tmp_path / 'nope.json'}: no such file"]


def test_directory_is_no_input(tmp_path: Path) -> None:
    with pytest.raises(InputError) as info:
        load_commands(str(tmp_path))
    assert info.value.exit_code == EX_NOINPUT


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file_is_no_input(tmp_path: Path) -> None:
    path = Path(write(tmp_path, {"command_type": "os", "command_name": "ls"}))
    path.chmod(0)
    with pytest.raises(InputError, match="permission denied") as info:
        load_commands(str(path))
    assert info.value.exit_code == EX_NOINPUT


def test_stdin(monkeypatch: pytest.MonkeyPatch) -> None:
    data = json.dumps({"command_type": "os", "command_name": "ls"}).encode()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    [spec] = load_commands("-")
    assert spec.command_name == "ls"


def test_display() -> None:
    from clients.commands import CommandSpec

    shell = CommandSpec(command_type="shell", command_name="echo", parameters=["a b"])
    assert shell.display() == "shell: echo 'a b'"
    os_ = CommandSpec(command_type="os", command_name="ls", parameters=["-l", "x y"])
    assert os_.display() == "os: ls -l 'x y'"


@pytest.mark.parametrize("name", ["commands.json", "batch.json"])
def test_examples_are_valid(name: str) -> None:
    specs = load_commands(str(EXAMPLES / name))
    assert specs
    if name == "batch.json":
        assert {s.command_type for s in specs} == {"os", "shell"}
