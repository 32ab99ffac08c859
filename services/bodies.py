"""The msgpack bodies of the command services ("os", "shell"): the contract between
`mdp-worker` and `mdp-client`. `spec/command-service.md` describes them in prose.

Every body is one msgpack frame holding a map. Requests are validated with pydantic; unknown
fields are rejected. Byte fields (stdin, stdout, stderr, data) are msgpack bin, never decoded.

One model per thing, so no field list is ever copied:

- `CommandFields`: what a command is (name, parameters, run limit, cwd, env).
- `CommandSpec`: an entry of a commands file: `CommandFields` + the service that runs it
  (`command_type`). `CommandSpec.request(request_id)` is the body sent to that service.
- `CommandRequest`: that body: `CommandFields` + request_id, stdin, start_by.
- `CommandResult`: how a command ended. The worker sends it as the FINAL body, `mdp-client`
  shows it (`clients.results.CommandOutcome` adds only what the client itself saw), and a job
  store keeps it. Its status "lost" is the one a worker never sends: a client (or job service)
  sets it when no result came back.

Two limits are easy to confuse, so they have distinct names in code. A command's **run
limit** (`run_limit`; on the wire and in commands files the field `timeout`) is how long the
worker lets it run before it kills the process group (status "timeout"). The client's
**attempt silence limit** (`mdp-client --timeout`) is how long one attempt may go without any
reply before the client gives up on it; it is no part of any body.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar

import msgpack
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    TypeAdapter,
    ValidationError,
    field_validator,
)

from mdp import mmi
from mdp.protocol import ProtocolError, validate_service_name

MAX_COMMAND_NAME = 64 * 1024
MAX_PARAMETERS = 10_000
MAX_PARAMETER = 128 * 1024
MAX_REQUEST_ID = 128
MAX_ENV_VARS = 1_000
MAX_STDIN = 8 * 1024 * 1024
MAX_RUN_LIMIT = 7 * 24 * 3600.0
"""The largest run limit a request may ask for (the worker caps it further)."""
DEFAULT_RUN_LIMIT = 30.0
"""The run limit of a request that gives none (`mdp-worker --default-timeout`)."""
DEFAULT_MAX_RUN_LIMIT = 300.0
"""No command runs longer than this, whatever it asks (`mdp-worker --max-timeout`)."""


class BodyError(ValueError):
    """A body is not a valid msgpack map of the expected model.

    `errors` lists each problem as {"loc": "field.path", "msg": "...", "type": "..."}.
    """

    def __init__(self, message: str, errors: list[dict[str, str]] | None = None) -> None:
        super().__init__(message)
        self.errors = errors or [{"loc": "", "msg": message, "type": "body"}]


def valid_service_name(value: str) -> str:
    """`value` if it is a valid MDP service name; else ValueError (for pydantic validators)."""
    try:
        validate_service_name(value.encode())
    except ProtocolError as exc:
        raise ValueError(str(exc)) from None
    return value


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
    timeout: Annotated[float, Field(gt=0, le=MAX_RUN_LIMIT)] | None = None
    """The command's run limit (`run_limit`) under its wire name."""
    cwd: Annotated[str, Field(min_length=1, max_length=4096)] | None = None
    env: Annotated[dict[str, str], Field(max_length=MAX_ENV_VARS)] | None = None
    """Added to the worker's minimal environment."""

    @property
    def run_limit(self) -> float | None:
        """Seconds the worker lets the command run (it caps them; None: its default).
        "timeout" on the wire and in commands files."""
        return self.timeout

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


class CommandSpec(CommandFields):
    """A command and the service that runs it: one entry of a commands file (and what a job
    service is asked to run)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    command_type: Annotated[str, Field(min_length=1)]
    """The service that runs the command: "os", "shell", ..."""

    @field_validator("command_type")
    @classmethod
    def _service_name(cls, value: str) -> str:
        if mmi.is_mmi(valid_service_name(value)):
            raise ValueError("mmi.* names belong to the broker's management interface")
        return value

    def request(self, request_id: str, start_by: float | None = None) -> CommandRequest:
        """The request body sent to the service: the same command fields, `request_id` and
        `start_by` (spec/command-service.md §14.1)."""
        fields = self.model_dump(exclude={"command_type"})
        return CommandRequest.model_construct(**fields, request_id=request_id, start_by=start_by)

    def display(self) -> str:
        """A one-line rendering, e.g. `shell: echo 'Hello, world!'`."""
        if self.command_type.partition("@")[0] == "shell":  # shell@HOST too
            text = " ".join([self.command_name, *map(shlex.quote, self.parameters)])
        else:
            text = shlex.join([self.command_name, *self.parameters])
        return f"{self.command_type}: {text}"


class WorkerInfo(_Body):
    """Which worker process handled a request."""

    host: str
    pid: int
    id: str = ""
    name: str | None = None
    """The worker's --name: `SERVICE@NAME` reaches this worker alone (§14.3)."""


WorkerStatus = Literal[
    "ok", "failed", "timeout", "error", "invalid", "rejected", "cancelled", "expired"
]
"""The statuses a worker reports (spec/command-service.md §8)."""
Status = WorkerStatus | Literal["lost"]
"""A command's status: a worker's, or "lost" (no result came back; a worker never sends it)."""


class CommandResult(_Body):
    """How a command ended: the FINAL body of a command request (the complete, capped result),
    what the client shows and what a job store keeps."""

    model_config = ConfigDict(extra="ignore", frozen=True)  # newer workers may add fields

    status: Status
    exit_code: int | None = None
    signal: int | None = None
    stdout: bytes = b""
    stderr: bytes = b""
    truncated: bool = False
    duration_ms: float | None = None
    """How long the command ran, as the worker measured it; 0 for a request that never ran;
    None when no worker reported (lost)."""
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
    """The run limit the worker applies to this command (`run_limit`) under its wire name."""

    @property
    def run_limit(self) -> float | None:
        """Seconds the worker lets this command run (spec/command-service.md §14.2): the
        request's run limit, or the worker's default, capped by the worker's maximum."""
        return self.timeout


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


class LookupRequest(_Body):
    """A control message to `SERVICE@NAME`: what do you know of this request_id (§14.3)?
    Read-only, except that with `fence` an id the worker has not seen is remembered like one
    cancelled before it came: if it arrives later it is refused (`cancelled`), never run."""

    lookup: Annotated[str, Field(min_length=1, max_length=MAX_REQUEST_ID)]
    fence: StrictBool = False


LookupState = Literal["running", "finished", "cancelled", "unknown"]
"""What a worker knows of a request_id (spec/command-service.md §14.3): it runs here now; it
ran here and its FINAL is remembered; it was cancelled or fenced before it came (it will be
refused); never seen here."""


class LookupReply(_Body):
    """The FINAL answer to a LookupRequest."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    request_id: str
    state: LookupState
    fenced: bool = False
    """True when the id will be refused if it arrives here (state cancelled, or unknown and
    the lookup asked for `fence`)."""
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


T = TypeVar("T")


def parse_body(validate: Callable[[dict[str, Any]], T], frames: list[bytes], what: str) -> T:
    """Validate a body of exactly one msgpack-map frame with `validate` (e.g. a model's
    `model_validate`). Raises BodyError saying `what` was invalid, field by field."""
    if len(frames) != 1:
        raise BodyError(f"body must be exactly one frame, got {len(frames)}")
    data = unpack_map(frames[0])
    try:
        return validate(data)
    except ValidationError as exc:
        raise BodyError(f"invalid {what}", _errors_of(exc)) from None


def parse_request(frames: list[bytes]) -> CommandRequest:
    """Validate a request body (exactly one frame). Raises BodyError with field-by-field errors."""
    return parse_body(CommandRequest.model_validate, frames, "command request")


def parse_cancel(frames: list[bytes]) -> CancelRequest:
    """Validate a control body sent to `SERVICE@NAME`. Raises BodyError."""
    return parse_body(CancelRequest.model_validate, frames, "control message")


def parse_cancel_reply(frames: list[bytes]) -> CancelReply:
    """Validate the FINAL answer to a cancel message. Raises BodyError."""
    return parse_body(CancelReply.model_validate, frames, "cancel answer")


def parse_lookup(frames: list[bytes]) -> LookupRequest:
    """Validate a lookup message sent to `SERVICE@NAME`. Raises BodyError."""
    return parse_body(LookupRequest.model_validate, frames, "control message")


def parse_lookup_reply(frames: list[bytes]) -> LookupReply:
    """Validate the FINAL answer to a lookup message. Raises BodyError."""
    return parse_body(LookupReply.model_validate, frames, "lookup answer")


def parse_result(frames: list[bytes]) -> CommandResult:
    """Validate a FINAL body from a command service."""
    result = parse_body(CommandResult.model_validate, frames, "command result")
    if result.status == "lost":  # only the side that got no result may say so
        raise BodyError("invalid command result: a worker cannot report 'lost'")
    return result


def parse_partial(frames: list[bytes]) -> PartialEvent:
    """Validate a PARTIAL body from a command service (started, progress or output)."""
    return parse_body(_PARTIAL.validate_python, frames, "partial body")
