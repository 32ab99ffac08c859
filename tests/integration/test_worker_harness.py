"""Helpers for the worker and command-service integration tests (no tests in this module):
starting `mdp-worker`, a raw MDP client on a DEALER socket with every receive bounded, MMI
queries, and reading a process's memory.

The client is deliberately not `mdp.client`: these tests check the worker against the wire
format, with nothing of ours on the client side but `mdp.protocol`'s frame layouts.
"""

from __future__ import annotations

import os
import time
from typing import Any

import msgpack
import psutil
import zmq

from mdp.protocol import Reply, build_client_request, parse_client_reply
from services.bodies import CommandResult, Output, PartialEvent, parse_partial, parse_result
from tests.support import TEST_HEARTBEAT_MS, TEST_LIVENESS, Process, script, wait_until

HEARTBEAT_ARGS = ["--heartbeat-ms", str(TEST_HEARTBEAT_MS), "--liveness", str(TEST_LIVENESS)]


def start_worker(endpoint: str, *args: str) -> Process:
    """`mdp-worker --broker ENDPOINT` with the test heartbeat settings and `args`."""
    return Process([script("mdp-worker"), "--broker", endpoint, *HEARTBEAT_ARGS, *args])


class RawClient:
    """One MDP client conversation at a time on a DEALER socket; every wait has a deadline."""

    def __init__(self, endpoint: str, version: str = "0.2") -> None:
        self.version = version
        self.socket: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
        self.socket.linger = 0
        self.socket.connect(endpoint)

    def close(self) -> None:
        self.socket.close(linger=0)

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, service: str, body: list[bytes]) -> None:
        self.socket.send_multipart(build_client_request(self.version, service.encode(), body))

    def recv(self, timeout: float) -> Reply:
        if not self.socket.poll(int(timeout * 1000)):
            raise AssertionError(f"no reply within {timeout}s")
        return parse_client_reply(self.version, self.socket.recv_multipart())

    def request(
        self, service: str, body: list[bytes], timeout: float = 10.0
    ) -> tuple[list[tuple[float, Reply]], Reply]:
        """Send one REQUEST; return the PARTIALs (with arrival times) and the FINAL."""
        self.send(service, body)
        return self.collect(timeout)

    def collect(self, timeout: float) -> tuple[list[tuple[float, Reply]], Reply]:
        deadline = time.monotonic() + timeout
        partials: list[tuple[float, Reply]] = []
        while True:
            reply = self.recv(max(0.0, deadline - time.monotonic()))
            if reply.final:
                return partials, reply
            partials.append((time.monotonic(), reply))

    def command(
        self, service: str, fields: dict[str, Any], timeout: float = 10.0
    ) -> tuple[list[PartialEvent], CommandResult]:
        """Run a command request; return the decoded PARTIAL events and the result."""
        partials, final = self.request(service, [msgpack.packb(fields)], timeout)
        return [parse_partial(p.body) for _, p in partials], parse_result(final.body)


def mmi(endpoint: str, service: str, body: list[bytes], timeout: float = 2.0) -> list[bytes]:
    with RawClient(endpoint) as client:
        _, final = client.request(service, body, timeout)
        return final.body


def workers_of(endpoint: str, service: str) -> int:
    """How many workers the broker has for `service` (mmi.services, our MMI extension)."""
    listing = msgpack.unpackb(mmi(endpoint, "mmi.services", [b""])[0])
    return sum(entry["workers"] for entry in listing if entry["name"] == service)


def wait_workers(endpoint: str, service: str, count: int = 1, timeout: float = 10.0) -> None:
    """Wait until the broker has exactly `count` workers registered for `service`."""
    wait_until(
        lambda: workers_of(endpoint, service) == count,
        timeout=timeout,
        interval=0.05,
        what=f"{count} worker(s) for {service!r}",
    )


def output_of(events: list[PartialEvent]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, Output) and e.stream == "stdout")


def rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


def group_alive(pgid: int) -> bool:
    """`os.killpg(pgid, 0)` succeeds: some process (perhaps a zombie) is still in the group."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def live_members(pgid: int) -> list[int]:
    """PIDs of the group's members that are not zombies."""
    found = []
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(proc.info["pid"]) == pgid and proc.info["status"] != "zombie":
                found.append(proc.info["pid"])
        except (psutil.Error, ProcessLookupError):
            continue
    return found


class LogReader:
    """Reads a `Process`'s stderr as it comes, without blocking (for waiting on log lines)."""

    def __init__(self, proc: Process) -> None:
        assert proc.popen.stderr is not None
        self.pipe = proc.popen.stderr
        self.text = ""

    def read(self) -> str:
        fd = self.pipe.fileno()
        os.set_blocking(fd, False)
        try:
            while True:
                try:
                    chunk = os.read(fd, 65536)
                except BlockingIOError:
                    break
                if not chunk:
                    break
                self.text += chunk.decode("utf-8", "replace")
        finally:
            os.set_blocking(fd, True)
        return self.text

    def wait_for(self, needle: str, timeout: float = 5.0, after: int = 0) -> int:
        """Wait until `needle` appears at or after offset `after`; return the offset past it."""
        wait_until(
            lambda: needle in self.read()[after:], timeout=timeout, interval=0.02, what=needle
        )
        return self.text.index(needle, after) + len(needle)
