"""The command runner (`clients.runner`) against a fake broker that plays the command service.

The fake answers mmi.service itself and hands every command request to a behaviour function,
which decides what the "worker" sends back: a started PARTIAL, output, a result, or silence.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
import zmq
import zmq.asyncio

from clients.commands import CommandSpec
from clients.results import CommandOutcome, ExitCode, exit_code_for
from clients.runner import (
    Events,
    RunSettings,
    ServiceCheckFailed,
    Step,
    check_services,
    next_step,
    run_commands,
)
from mdp.client import Client
from mdp.mmi import WorkerInfo as MMIWorker
from mdp.mmi import encode_workers
from services.bodies import (
    CommandRequest,
    CommandResult,
    LookupReply,
    LookupState,
    Output,
    Started,
    WorkerInfo,
    parse_request,
    unpack_map,
)
from services.locate import Located

pytestmark = pytest.mark.timeout(20)

WORKER = WorkerInfo(host="fake", pid=1)
NAMED = WorkerInfo(host="fake", pid=2, name="w1")
W1 = MMIWorker(
    name="w1",
    services=["shell", "shell@w1"],
    version="MDP/0.2",
    busy=False,
    in_flight=0,
    connections=2,
    last_heard=0.0,
)


@dataclass
class Call:
    """One request as the fake broker saw it."""

    identity: bytes
    version: str
    service: bytes
    request: CommandRequest
    fake: FakeCommandBroker

    async def started(self, worker: WorkerInfo = WORKER) -> None:
        started = Started(worker=worker, request_id=self.request.request_id)
        await self.fake.reply(self, False, started.pack())

    async def output(self, data: bytes, stream: str = "stdout") -> None:
        await self.fake.reply(self, False, Output(stream=stream, data=data).pack())  # type: ignore[arg-type]

    async def result(self, status: str = "ok", **kw: object) -> None:
        fields: dict[str, object] = {"request_id": self.request.request_id, "worker": WORKER}
        fields.update(kw)
        body = CommandResult(status=status, **fields).pack()  # type: ignore[arg-type]
        await self.fake.reply(self, True, body)


Behaviour = Callable[[Call], Awaitable[None]]


async def run_to_result(call: Call) -> None:
    await call.started()
    if call.request.parameters:
        await call.output(call.request.parameters[0].encode())
    await call.result(
        "ok", exit_code=0, stdout=" ".join(call.request.parameters).encode(), duration_ms=1.0
    )


@dataclass
class FakeCommandBroker:
    ctx: zmq.asyncio.Context
    behaviour: Behaviour = run_to_result
    known: set[bytes] = field(default_factory=lambda: {b"os", b"shell"})
    calls: list[Call] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    fleet: list[MMIWorker] | None = None
    """The answer to mmi.workers (None: 501, like a broker without it)."""
    state_of: Callable[[str], LookupState | None] | None = None
    """The answer to a lookup of a request_id (None: no answer at all)."""
    controls: list[tuple[bytes, dict[str, object]]] = field(default_factory=list)
    """Every lookup and cancel, with the service it was sent to."""

    def __post_init__(self) -> None:
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind("tcp://127.0.0.1:*")
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.tasks: set[asyncio.Task[None]] = set()

    async def serve(self) -> None:
        while True:
            identity, *frames = await self.sock.recv_multipart()
            if frames[0] == b"":
                version, service, body = "0.1", frames[2], frames[3:]
            else:
                version, service, body = "0.2", frames[2], frames[3:]
            if service == b"mmi.service":
                code = b"200" if body[0] in self.known else b"404"
                await self.send(identity, version, True, service, code)
                continue
            if service == b"mmi.workers" and self.fleet is not None:
                await self.send(identity, version, True, service, encode_workers(self.fleet))
                continue
            if service.startswith(b"mmi."):  # without a fleet, no mmi.workers either
                await self.send(identity, version, True, service, b"501")
                continue
            control = unpack_map(body[0]) if body else {}
            if "lookup" in control or "cancel" in control:
                self.controls.append((service, control))
                if "lookup" in control and self.state_of is not None:
                    state = self.state_of(control["lookup"])
                    if state is not None:
                        fenced = state in ("unknown", "cancelled")
                        reply = LookupReply(
                            request_id=control["lookup"], state=state, fenced=fenced
                        )
                        await self.send(identity, version, True, service, reply.pack())
                continue
            call = Call(identity, version, service, parse_request(body), self)
            self.calls.append(call)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            task = asyncio.create_task(self.behaviour(call))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def reply(self, call: Call, final: bool, body: bytes) -> None:
        if final:
            self.in_flight -= 1
        await self.send(call.identity, call.version, final, call.service, body)

    async def send(
        self, identity: bytes, version: str, final: bool, service: bytes, body: bytes
    ) -> None:
        if version == "0.1":
            if final:
                await self.sock.send_multipart([identity, b"", b"MDPC01", service, body])
            return
        command = b"\x03" if final else b"\x02"
        await self.sock.send_multipart([identity, b"MDPC02", command, service, body])

    def ids(self) -> list[str | None]:
        return [call.request.request_id for call in self.calls]


@pytest.fixture
async def ctx() -> AsyncIterator[zmq.asyncio.Context]:
    context = zmq.asyncio.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture
async def fake(ctx: zmq.asyncio.Context) -> AsyncIterator[FakeCommandBroker]:
    broker = FakeCommandBroker(ctx)
    task = asyncio.create_task(broker.serve())
    yield broker
    task.cancel()
    for t in list(broker.tasks):
        t.cancel()


def spec(name: str = "echo", *params: str, kind: str = "shell") -> CommandSpec:
    return CommandSpec(command_type=kind, command_name=name, parameters=list(params))


class Recorder(Events):
    def __init__(self) -> None:
        self.log: list[tuple[str, object]] = []

    def started(self, index: int, worker: WorkerInfo) -> None:
        self.log.append(("started", index))

    def output(self, index: int, stream: str, data: bytes) -> None:
        self.log.append(("output", (index, stream, data)))

    def retrying(self, index: int, attempt: int) -> None:
        self.log.append(("retrying", (index, attempt)))

    def finished(self, outcome: CommandOutcome) -> None:
        self.log.append(("finished", outcome.index))


async def run(
    fake: FakeCommandBroker,
    specs: list[CommandSpec],
    settings: RunSettings | None = None,
    events: Events | None = None,
    **client_kw: object,
) -> list[CommandOutcome]:
    kw: dict[str, object] = {"timeout": 0.4, "retries": 2}
    kw.update(client_kw)
    client = Client(fake.endpoint, **kw)  # type: ignore[arg-type]
    try:
        return await run_commands(client, specs, settings or RunSettings(), events)
    finally:
        client.close()


async def test_results_in_file_order_with_request_ids(fake: FakeCommandBroker) -> None:
    specs = [spec("echo", str(i)) for i in range(10)]
    outcomes = await run(fake, specs)
    assert [o.stdout for o in outcomes] == [str(i).encode() for i in range(10)]
    assert all(o.status == "ok" and o.worker == WORKER for o in outcomes)
    assert sorted(o.request_id for o in outcomes) == sorted(fake.ids())  # type: ignore[type-var]
    assert len({o.request_id for o in outcomes}) == 10
    assert exit_code_for(outcomes) is ExitCode.OK


async def test_at_most_parallel_commands_in_flight(fake: FakeCommandBroker) -> None:
    async def slow(call: Call) -> None:
        await call.started()
        await asyncio.sleep(0.05)  # the "command" runs; this is the fake's work, not a sync
        await call.result("ok", exit_code=0)

    fake.behaviour = slow
    outcomes = await run(fake, [spec() for _ in range(12)], RunSettings(parallel=3))
    assert len(outcomes) == 12
    assert fake.max_in_flight == 3


async def test_stream_reports_output_events(fake: FakeCommandBroker) -> None:
    recorder = Recorder()
    outcomes = await run(fake, [spec("echo", "hi")], RunSettings(stream=True), recorder)
    assert recorder.log == [
        ("started", 0),
        ("output", (0, "stdout", b"hi")),
        ("finished", 0),
    ]
    assert outcomes[0].streamed


async def test_unstarted_silent_command_is_resent(fake: FakeCommandBroker) -> None:
    """Nothing came back: the command did not start, so re-sending it is safe."""

    async def silent_first(call: Call) -> None:
        if len(fake.calls) > 1:
            await run_to_result(call)

    fake.behaviour = silent_first
    recorder = Recorder()
    [outcome] = await run(fake, [spec("echo", "x")], events=recorder)
    assert outcome.status == "ok"
    assert outcome.attempts == 2
    assert fake.ids()[0] == fake.ids()[1] == outcome.request_id
    assert ("retrying", (0, 2)) in recorder.log


async def test_started_then_silent_is_lost_and_not_resent(fake: FakeCommandBroker) -> None:
    async def start_then_die(call: Call) -> None:
        await call.started()

    fake.behaviour = start_then_die
    [outcome] = await run(fake, [spec("sleep", "60")])
    assert outcome.status == "lost"
    assert "--retry-started" in (outcome.message or "")
    assert len(fake.calls) == 1
    assert exit_code_for([outcome]) is ExitCode.LOST


async def test_retry_started_resends_with_same_request_id(fake: FakeCommandBroker) -> None:
    async def start_then_die_once(call: Call) -> None:
        await call.started()
        if len(fake.calls) > 1:
            await call.result("ok", exit_code=0)

    fake.behaviour = start_then_die_once
    [outcome] = await run(fake, [spec("sleep", "1")], RunSettings(retry_started=True))
    assert outcome.status == "ok"
    assert len(fake.calls) == 2
    assert fake.ids()[0] == fake.ids()[1] == outcome.request_id


async def test_result_for_another_request_is_never_shown(fake: FakeCommandBroker) -> None:
    async def wrong_id(call: Call) -> None:
        await call.result("ok", request_id="someone-else", stdout=b"not yours")

    fake.behaviour = wrong_id
    [outcome] = await run(fake, [spec()])
    assert outcome.status == "error"
    assert outcome.stdout == b""
    assert "another request" in (outcome.message or "")


async def test_reply_that_is_not_a_result_is_an_error(fake: FakeCommandBroker) -> None:
    async def echo(call: Call) -> None:
        await fake.reply(call, True, b"\xc1 not msgpack")

    fake.behaviour = echo
    [outcome] = await run(fake, [spec()])
    assert outcome.status == "error"
    assert exit_code_for([outcome]) is ExitCode.FAILED


async def test_worker_statuses_map_to_exit_codes(fake: FakeCommandBroker) -> None:
    async def by_name(call: Call) -> None:
        status = call.request.command_name
        await call.result(status, exit_code=1 if status == "failed" else None)

    fake.behaviour = by_name
    outcomes = await run(fake, [spec("ok"), spec("failed"), spec("timeout")])
    assert [o.status for o in outcomes] == ["ok", "failed", "timeout"]
    assert exit_code_for(outcomes) is ExitCode.TIMEOUT
    assert exit_code_for(outcomes[:2]) is ExitCode.FAILED


async def test_mdp01_silent_command_is_not_resent(fake: FakeCommandBroker) -> None:
    """MDP/0.1 has no PARTIAL, so the client cannot know the command did not start."""

    async def silent(call: Call) -> None:
        return None

    fake.behaviour = silent
    [outcome] = await run(
        fake, [CommandSpec(command_type="os", command_name="x", timeout=0.2)], version="0.1"
    )
    assert outcome.status == "lost"
    assert "MDP/0.1" in (outcome.message or "")
    assert len(fake.calls) == 1


async def test_mdp01_round_trip(fake: FakeCommandBroker) -> None:
    [outcome] = await run(fake, [spec("echo", "a")], version="0.1")
    assert (outcome.status, outcome.stdout) == ("ok", b"a")
    assert fake.calls[0].version == "0.1"


async def test_check_services_reports_unknown_services(fake: FakeCommandBroker) -> None:
    client = Client(fake.endpoint, timeout=0.5, retries=0)
    try:
        assert await check_services(client, ["os", "shell", "os"]) == []
        with pytest.raises(ServiceCheckFailed) as info:
            await check_services(client, ["os", "nope", "gone"])
    finally:
        client.close()
    assert len(info.value.problems) == 2
    assert "'gone' is unknown to the broker" in info.value.problems[0]


async def test_check_services_without_broker() -> None:
    """Nothing listens: said at once, with the reason (issue 11 defect 7)."""
    client = Client("tcp://127.0.0.1:1", timeout=5, retries=2)
    start = asyncio.get_running_loop().time()
    try:
        with pytest.raises(ServiceCheckFailed) as info:
            await check_services(client, ["os", "shell"])
    finally:
        client.close()
    assert info.value.problems == [
        "cannot reach the broker at tcp://127.0.0.1:1: connection refused (nothing listens there)"
    ]
    assert asyncio.get_running_loop().time() - start < 1.5


async def test_check_services_with_a_silent_broker() -> None:
    with socket.socket() as listener:  # accepts the connection, never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        endpoint = f"tcp://127.0.0.1:{listener.getsockname()[1]}"
        client = Client(endpoint, timeout=0.2, retries=1)
        try:
            with pytest.raises(ServiceCheckFailed) as info:
                await check_services(client, ["os", "shell"])
        finally:
            client.close()
    assert info.value.problems == [f"no broker answered at {endpoint} (2 attempts, 0.2 s each)"]


# ---------------------------------------------------------------------------------------------
# A silent attempt: ask the workers before anything is re-sent (spec/command-service.md §14.5)


def silent_first(fake: FakeCommandBroker, then: Behaviour = run_to_result) -> Behaviour:
    async def behaviour(call: Call) -> None:
        if len(fake.calls) > 1:
            await then(call)

    return behaviour


async def test_a_silent_attempt_its_worker_ran_is_reattached_not_run_again(
    fake: FakeCommandBroker,
) -> None:
    """Its `started` (and result) died with the broker: the worker that ran it is asked, and
    the same request_id goes to it alone, with a start deadline already past."""
    fake.fleet, fake.state_of = [W1], lambda request_id: "finished"
    fake.behaviour = silent_first(fake)
    [outcome] = await run(fake, [spec("echo", "x")])
    assert (outcome.status, outcome.attempts) == ("ok", 2)
    first, second = fake.calls
    assert (first.service, second.service) == (b"shell", b"shell@w1")
    assert first.request.request_id == second.request.request_id == outcome.request_id
    assert second.request.start_by is not None and second.request.start_by < time.time()
    assert [(s, c["fence"]) for s, c in fake.controls] == [(b"shell@w1", True)]


async def test_a_silent_attempt_no_worker_knows_is_resent_under_a_new_request_id(
    fake: FakeCommandBroker,
) -> None:
    """Every worker said `unknown` and is now fenced: the old request_id can never start, so
    the command goes again under a new one."""
    fake.fleet, fake.state_of = [W1], lambda request_id: "unknown"
    fake.behaviour = silent_first(fake)
    recorder = Recorder()
    [outcome] = await run(fake, [spec("echo", "x")], events=recorder)
    assert (outcome.status, outcome.attempts) == ("ok", 2)
    first, second = fake.calls
    assert second.service == b"shell"
    assert first.request.request_id != second.request.request_id == outcome.request_id
    assert ("retrying", (0, 2)) in recorder.log


async def test_started_then_silent_is_reattached_to_the_worker_still_running_it(
    fake: FakeCommandBroker,
) -> None:
    async def start_then_silent(call: Call) -> None:
        await call.started(NAMED)
        if len(fake.calls) > 1:
            await call.result("ok", exit_code=0, worker=NAMED)

    fake.fleet, fake.state_of = [W1], lambda request_id: "running"
    fake.behaviour = start_then_silent
    [outcome] = await run(fake, [spec("sleep", "1")])
    assert outcome.status == "ok"
    assert [c.service for c in fake.calls] == [b"shell", b"shell@w1"]
    assert outcome.workers == [NAMED]  # one run, on one worker
    assert [s for s, c in fake.controls] == [b"shell@w1"]  # only the worker that had it


async def test_started_on_a_worker_that_no_longer_knows_it_is_lost_and_cancelled(
    fake: FakeCommandBroker,
) -> None:
    async def start_then_silent(call: Call) -> None:
        await call.started(NAMED)

    fake.fleet, fake.state_of = [W1], lambda request_id: "unknown"
    fake.behaviour = start_then_silent
    [outcome] = await run(fake, [spec("sleep", "60")])
    assert outcome.status == "lost"
    assert "w1 no longer knows it" in (outcome.message or "")
    assert len(fake.calls) == 1  # never re-sent
    assert [next(iter(c)) for s, c in fake.controls] == ["lookup", "cancel"]


async def test_a_worker_that_does_not_answer_means_no_resend(fake: FakeCommandBroker) -> None:
    """It may be running the command: the client asks again for a while, then says lost."""
    fake.fleet, fake.state_of = [W1], lambda request_id: None
    fake.behaviour = silent_first(fake)
    began = time.monotonic()
    [outcome] = await run(fake, [spec("echo", "x")])
    assert outcome.status == "lost"
    assert "whether it started is not known" in (outcome.message or "")
    assert "w1: no answer" in (outcome.message or "")
    assert len(fake.calls) == 1
    assert len(fake.controls) >= 2  # asked more than once
    assert time.monotonic() - began < 5  # bounded: (--retries + 1) silence limits of asking


def test_next_step_table() -> None:
    """`next_step`, row by row."""
    base = {"request_id": "r", "service": "shell"}
    known = Located(**base, worker="w1", state="running", endpoint="e", answers={"w1": "running"})
    assert next_step(known, None) == Step("reattach", worker="w1", endpoint="e")
    assert next_step(known, "w1").action == "reattach"
    silent = Located(**base, brokers={"e": None}, unanswered={"w1": "no answer"})
    assert next_step(silent, "w1").action == "ask-again"
    assert next_step(silent, None).action == "ask-again"
    forgot = Located(**base, brokers={"e": None}, answers={"w1": "unknown"}, fenced=["w1"])
    assert next_step(forgot, "w1").action == "lost"
    assert next_step(forgot, None) == Step("resend", endpoint="e", new_id=True)
    legacy = Located(**base, brokers={"e": "does not implement mmi.workers"}, unaskable={"e": "x"})
    assert next_step(legacy, None) == Step("resend", new_id=False)  # same request_id: no fence
    empty = Located(**base, brokers={"e": None})  # a restarted broker without its workers yet
    assert next_step(empty, None).action == "ask-again"
    nobody = Located(**base, brokers={"e": "connection refused"})
    assert next_step(nobody, None).action == "ask-again"


async def test_check_services_counts_a_full_worker_by_its_address(fake: FakeCommandBroker) -> None:
    """A worker that is full unregisters its `shell` connections (spec §14.6): mmi.service
    says 404, but its `shell@NAME` is still registered, so the service is there (busy)."""
    fake.known = {b"os"}
    fake.fleet = [W1]
    client = Client(fake.endpoint, timeout=0.5, retries=0)
    try:
        assert await check_services(client, ["shell"]) == []
        with pytest.raises(ServiceCheckFailed) as info:
            await check_services(client, ["shell", "gone"])
    finally:
        client.close()
    assert len(info.value.problems) == 1 and "'gone' is unknown" in info.value.problems[0]
