"""The msgpack bodies of the command services ("os", "shell"): the contract between
`mdp-worker` and `mdp-client`. `spec/command-service.md` describes them in prose.

Every body is one msgpack frame holding a map. Requests are validated with pydantic; unknown
fields are rejected. Byte fields (stdin, stdout, stderr, data) are msgpack bin, never decoded.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgpack
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

MAX_COMMAND_NAME = 64 * 1024
MAX_PARAMETERS = 10_000
MAX_PARAMETER = 128 * 1024
MAX_REQUEST_ID = 128
MAX_ENV_VARS = 1_000
MAX_STDIN = 8 * 1024 * 1024
MAX_TIMEOUT = 7 * 24 * 3600.0


class BodyError(ValueError):
    """A body is not a valid msgpack map of the expected model.

    `errors` lists each problem as {"loc": "field.path", "msg": "...", "type": "..."}.
    """

    def __init__(self, message: str, errors: list[dict[str, str]] | None = None) -> None:
        super().__init__(message)
        self.errors = errors or [{"loc": "", "msg": message, "type": "body"}]


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def pack(self) -> bytes:
        """This body as one msgpack frame."""
        return pack(self.model_dump(exclude_none=True))


class CommandFields(_Body):
    """What a command is, shared by the request body and the command client's file entries."""

    command_name: Annotated[str, Field(min_length=1, max_length=MAX_COMMAND_NAME)]
    parameters: Annotated[
        list[Annotated[str, Field(max_length=MAX_PARAMETER)]], Field(max_length=MAX_PARAMETERS)
    ] = []
    timeout: Annotated[float, Field(gt=0, le=MAX_TIMEOUT)] | None = None
    """Seconds the worker lets the command run (the worker caps it)."""
    cwd: Annotated[str, Field(min_length=1, max_length=4096)] | None = None
    env: Annotated[dict[str, str], Field(max_length=MAX_ENV_VARS)] | None = None
    """Added to the worker's minimal environment."""

    @field_validator("command_name", "cwd")
    @classmethod
    def _text_has_no_nul(cls, value: str | None) -> str | None:
        return None if value is None else _no_nul(value)

    @field_validator("parameters")
    @classmethod
    def _parameters_have_no_nul(cls, value: list[str]) -> list[str]:
        for item in value:
            _no_nul(item)
        return value

    @field_validator("env")
    @classmethod
    def _env_is_well_formed(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return None
        for key, item in value.items():
            if not key or "=" in key or "\x00" in key:
                raise ValueError(f"bad environment variable name {key!r}")
            _no_nul(item)
        return value


class CommandRequest(CommandFields):
    """A request to the "os" or "shell" service."""

    request_id: Annotated[str, Field(min_length=1, max_length=MAX_REQUEST_ID)] | None = None
    stdin: Annotated[bytes, Field(max_length=MAX_STDIN)] | None = None
    start_by: Annotated[float, Field(gt=0)] | None = None
    """UNIX time (wall clock) after which the worker must not start this attempt
    (spec/command-service.md §14.1). Not part of the request's identity: each attempt of one
    request_id carries its own."""


class WorkerInfo(_Body):
    """Which worker process handled a request."""

    host: str
    pid: int
    id: str = ""
    name: str | None = None
    """The worker's --name: `SERVICE@NAME` reaches this worker alone (§14.3)."""


Status = Literal["ok", "failed", "timeout", "error", "invalid", "rejected", "expired", "cancelled"]


class CommandResult(_Body):
    """The FINAL body of a command request: the complete (capped) result."""

    model_config = ConfigDict(extra="ignore", frozen=True)  # newer workers may add fields

    status: Status
    exit_code: int | None = None
    signal: int | None = None
    stdout: bytes = b""
    stderr: bytes = b""
    truncated: bool = False
    duration_ms: float = 0.0
    worker: WorkerInfo | None = None
    request_id: str | None = None
    message: str | None = None
    errors: list[dict[str, str]] | None = None


class Started(_Body):
    """First PARTIAL: the worker accepted the request."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    event: Literal["started"] = "started"
    worker: WorkerInfo
    request_id: str | None = None
    timeout: float | None = None
    """The run limit the worker applies to this command, in seconds (§14.2)."""


class Progress(_Body):
    """PARTIAL sent while a command is silent, so the client knows the worker is alive."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    event: Literal["progress"] = "progress"
    elapsed_ms: float


class Output(_Body):
    """PARTIAL carrying a chunk of the command's output, in order, as bytes."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    stream: Literal["stdout", "stderr"]
    data: bytes


class CancelRequest(_Body):
    """A control message to `SERVICE@NAME`: stop the run of this request_id (§14.3)."""

    cancel: Annotated[str, Field(min_length=1, max_length=MAX_REQUEST_ID)]


CancelOutcome = Literal["cancelled", "finished", "unknown"]


class CancelReply(_Body):
    """The FINAL answer to a CancelRequest."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    request_id: str
    cancel: CancelOutcome
    worker: WorkerInfo | None = None


PartialEvent = Started | Progress | Output
_PARTIAL: TypeAdapter[PartialEvent] = TypeAdapter(PartialEvent)


def pack(value: Any) -> bytes:
    """msgpack-encode a plain value (str as str, bytes as bin)."""
    return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]


def unpack_map(frame: bytes) -> dict[str, Any]:
    """Decode one msgpack frame that must hold a map with string keys."""
    try:
        value = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise BodyError(f"body is not valid msgpack: {type(exc).__name__}") from None
    if not isinstance(value, dict):
        raise BodyError("body must be a msgpack map")
    return value


def _errors_of(exc: ValidationError) -> list[dict[str, str]]:
    return [
        {
            "loc": ".".join(str(part) for part in error["loc"]),
            "msg": error["msg"],
            "type": error["type"],
        }
        for error in exc.errors(include_url=False, include_input=False)
    ]


def parse_request(frames: list[bytes]) -> CommandRequest:
    """Validate a request body (exactly one frame). Raises BodyError with field-by-field errors."""
    if len(frames) != 1:
        raise BodyError(f"body must be exactly one frame, got {len(frames)}")
    data = unpack_map(frames[0])
    try:
        return CommandRequest.model_validate(data)
    except ValidationError as exc:
        raise BodyError("invalid command request", _errors_of(exc)) from None


def parse_cancel(frames: list[bytes]) -> CancelRequest:
    """Validate a control body sent to `SERVICE@NAME`. Raises BodyError."""
    if len(frames) != 1:
        raise BodyError(f"body must be exactly one frame, got {len(frames)}")
    try:
        return CancelRequest.model_validate(unpack_map(frames[0]))
    except ValidationError as exc:
        raise BodyError("invalid control message", _errors_of(exc)) from None


def parse_cancel_reply(frames: list[bytes]) -> CancelReply:
    """Validate the FINAL answer to a cancel message. Raises BodyError."""
    if len(frames) != 1:
        raise BodyError(f"body must be exactly one frame, got {len(frames)}")
    try:
        return CancelReply.model_validate(unpack_map(frames[0]))
    except ValidationError as exc:
        raise BodyError("invalid cancel answer", _errors_of(exc)) from None


def parse_result(frames: list[bytes]) -> CommandResult:
    """Validate a FINAL body from a command service."""
    if len(frames) != 1:
        raise BodyError(f"body must be exactly one frame, got {len(frames)}")
    try:
        return CommandResult.model_validate(unpack_map(frames[0]))
    except ValidationError as exc:
        raise BodyError("invalid command result", _errors_of(exc)) from None


def parse_partial(frames: list[bytes]) -> PartialEvent:
    """Validate a PARTIAL body from a command service (started, progress or output)."""
    if len(frames) != 1:
        raise BodyError(f"body must be exactly one frame, got {len(frames)}")
    try:
        return _PARTIAL.validate_python(unpack_map(frames[0]))
    except ValidationError as exc:
        raise BodyError("invalid partial body", _errors_of(exc)) from None
