"""A small raw-frame MDP worker for the conformance suite's own tests, correct unless told to
break one rule.

    python -m tests.conformance.peers.faulty_worker ENDPOINT SERVICE VERSION HEARTBEAT_MS FAULT

It echoes request bodies, honours the suite's sleep request (MDP-CONFORMANCE-SLEEP, ms),
heartbeats, re-registers on DISCONNECT and after heartbeat x 3 of broker silence, and drops
malformed messages. FAULT is one of:

    none                 no fault
    busy-silent          sends no HEARTBEAT while it handles a request (a blocking handler)
    partial-after-final  sends a PARTIAL after each FINAL (0.2)
"""

from __future__ import annotations

import sys
import time

import zmq

LIVENESS = 3
HEADER = {"0.1": b"MDPW01", "0.2": b"MDPW02"}
COMMANDS = {
    "0.1": {"READY": 1, "REQUEST": 2, "REPLY": 3, "HEARTBEAT": 4, "DISCONNECT": 5},
    "0.2": {"READY": 1, "REQUEST": 2, "PARTIAL": 3, "FINAL": 4, "HEARTBEAT": 5, "DISCONNECT": 6},
}
SLEEP = b"MDP-CONFORMANCE-SLEEP"


class Worker:
    def __init__(self, endpoint: str, service: str, version: str, hb_ms: str, fault: str) -> None:
        self.endpoint, self.service, self.version = endpoint, service.encode(), version
        self.heartbeat = int(hb_ms) / 1000
        self.fault = fault
        self.context = zmq.Context()
        self.names = {bytes([b]): n for n, b in COMMANDS[version].items()}

    def head(self, command: str) -> list[bytes]:
        head = [HEADER[self.version], bytes([COMMANDS[self.version][command]])]
        return [b"", *head] if self.version == "0.1" else head

    def send(self, command: str, *args: bytes) -> None:
        self.sock.send_multipart([*self.head(command), *args])
        self.last_sent = time.monotonic()

    def connect(self) -> None:
        self.sock = self.context.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(self.endpoint)
        self.send("READY", self.service)
        self.last_heard = time.monotonic()

    def busy(self, seconds: float) -> None:
        if self.fault == "busy-silent":
            time.sleep(seconds)  # the bug: a blocking handler, so no heartbeat goes out
            return
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, self.heartbeat / 2))
            if time.monotonic() - self.last_sent >= self.heartbeat:
                self.send("HEARTBEAT")

    def on_request(self, args: list[bytes]) -> None:
        if len(args) < 3 or not args[0] or args[1] != b"":
            return  # malformed: dropped
        address, body = args[0], args[2:]
        if len(body) == 2 and body[0] == SLEEP and body[1].isdigit():
            self.busy(int(body[1]) / 1000)
        final = "REPLY" if self.version == "0.1" else "FINAL"
        self.send(final, address, b"", *body)
        if self.fault == "partial-after-final" and self.version == "0.2":
            self.send("PARTIAL", address, b"", b"late")

    def serve(self) -> None:
        self.connect()
        while True:
            if self.sock.poll(int(self.heartbeat * 1000 / 4)):
                frames = self.sock.recv_multipart()
                self.last_heard = time.monotonic()
                if self.version == "0.1":
                    if not frames or frames[0] != b"":
                        continue
                    frames = frames[1:]
                if len(frames) < 2 or frames[0] != HEADER[self.version]:
                    continue
                command = self.names.get(frames[1])
                if command == "REQUEST":
                    self.on_request(frames[2:])
                elif command == "DISCONNECT":
                    self.sock.close()
                    self.connect()
                    continue
            now = time.monotonic()
            if now - self.last_heard > self.heartbeat * LIVENESS:
                self.sock.close()
                self.connect()
            elif now - self.last_sent >= self.heartbeat:
                self.send("HEARTBEAT")


if __name__ == "__main__":
    Worker(*sys.argv[1:6]).serve()
