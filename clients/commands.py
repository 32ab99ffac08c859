"""Commands files: load, validate, and report every problem with its place.

A commands file is JSON holding one command object or a list of them:

    {"command_type": "shell", "command_name": "echo", "parameters": ["Hello, world!"],
     "timeout": 5, "cwd": "/tmp", "env": {"GREETING": "hi"}}

Each entry is a `services.bodies.CommandSpec`. `timeout` is the command's run limit (seconds
the worker lets it run). `command_type` is the MDP service that runs the command ("os",
"shell", or any other service speaking the command bodies of spec/command-service.md). Unknown
fields are rejected, so a typo never silently changes what runs. Problems are reported as
`FILE[2].parameters[0]: message`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from services.bodies import CommandSpec

__all__ = ["EX_DATAERR", "EX_NOINPUT", "CommandSpec", "InputError", "load_commands", "oversized"]

EX_DATAERR = 65
"""The file is not valid JSON or not a valid commands file (sysexits.h)."""
EX_NOINPUT = 66
"""The file does not exist or cannot be read (sysexits.h)."""

MAX_FILE_BYTES = 64 * 1024 * 1024


class InputError(Exception):
    """The commands file cannot be used. `problems` holds one line per problem."""

    def __init__(self, problems: list[str], exit_code: int = EX_DATAERR) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems
        self.exit_code = exit_code


_FIELDS = ", ".join(CommandSpec.model_fields)

_ENVELOPE = 1024
"""Room for the MDP frames, request_id and start_by around a command's body."""


def oversized(specs: list[CommandSpec], limit: int) -> list[str]:
    """One problem per command whose request would exceed the broker's message limit (the
    broker would drop it unseen, and the client would wait for nothing)."""
    problems = []
    for index, spec in enumerate(specs):
        size = len(spec.request("0" * 32, start_by=1.0).pack()) + _ENVELOPE
        if size > limit:
            problems.append(
                f"command [{index}] ({spec.display()[:60]}...) is {size:,} bytes as a request, "
                f"over the broker's message limit of {limit:,} bytes (--max-msg-size); "
                "nothing was sent"
            )
    return problems


def load_commands(path: str) -> list[CommandSpec]:
    """Read and validate a commands file; `path` "-" reads standard input.

    Raises InputError: exit code 66 when the file is missing or unreadable, 65 when it is not
    valid JSON or not a valid commands file (every problem listed with its place).
    """
    name = "<stdin>" if path == "-" else path
    data = _read(path, name)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError([f"{name}: not UTF-8 text (byte {exc.start})"]) from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(
            [f"{name}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"]
        ) from None
    return validate_commands(document, name)


def validate_commands(document: Any, name: str) -> list[CommandSpec]:
    """Validate a parsed JSON document (one object or a list of objects)."""
    if isinstance(document, dict):
        entries, places = [document], [name]
    elif isinstance(document, list):
        if not document:
            raise InputError([f"{name}: the list holds no commands"])
        entries, places = document, [f"{name}[{i}]" for i in range(len(document))]
    else:
        raise InputError(
            [f"{name}: expected a command object or a list of them, got {_json_type(document)}"]
        )
    specs: list[CommandSpec] = []
    problems: list[str] = []
    for entry, place in zip(entries, places, strict=True):
        if not isinstance(entry, dict):
            problems.append(f"{place}: expected a command object, got {_json_type(entry)}")
            continue
        try:
            specs.append(CommandSpec.model_validate(entry))
        except ValidationError as exc:
            problems.extend(_describe(place, exc))
    if problems:
        raise InputError(problems)
    return specs


def _read(path: str, name: str) -> bytes:
    try:
        if path == "-":
            return sys.stdin.buffer.read(MAX_FILE_BYTES + 1)
        with Path(path).open("rb") as file:
            data = file.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise InputError([f"{name}: no such file"], EX_NOINPUT) from None
    except IsADirectoryError:
        raise InputError([f"{name}: is a directory, not a commands file"], EX_NOINPUT) from None
    except PermissionError:
        raise InputError([f"{name}: permission denied"], EX_NOINPUT) from None
    except OSError as exc:
        raise InputError([f"{name}: cannot read: {exc.strerror or exc}"], EX_NOINPUT) from None
    if len(data) > MAX_FILE_BYTES:
        raise InputError([f"{name}: larger than {MAX_FILE_BYTES // (1024 * 1024)} MiB"])
    return data


def _describe(place: str, exc: ValidationError) -> list[str]:
    lines = []
    for error in exc.errors(include_url=False, include_input=False):
        where = place + "".join(
            f"[{part}]" if isinstance(part, int) else f".{part}" for part in error["loc"]
        )
        kind = error["type"]
        if kind == "extra_forbidden":
            message = f"unknown field (allowed: {_FIELDS})"
        elif kind == "missing":
            message = "missing (required)"
        else:
            message = error["msg"]
            if message.startswith("Value error, "):
                message = message[len("Value error, ") :]
        lines.append(f"{where}: {message}")
    return lines


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"
