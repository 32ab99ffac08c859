"""Multipart send/receive for hot paths, on pyzmq's compiled socket methods.

pyzmq's `Socket.send_multipart`/`recv_multipart` are written in Python on top of its "sugar"
layer, which turns every flag into an `enum.IntFlag` and checks every frame's type; for a
five-frame MDP message that is about half of the time spent per message. These functions call
the compiled backend methods directly with plain-int flags. Same semantics, bytes frames only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import zmq
from zmq.backend import Socket as _BackendSocket

_send: Any = _BackendSocket.send
_recv: Any = _BackendSocket.recv
_get: Any = _BackendSocket.get

NOBLOCK: Final = int(zmq.NOBLOCK)
SNDMORE: Final = int(zmq.SNDMORE)
_MORE_NOBLOCK: Final = NOBLOCK | SNDMORE
_RCVMORE: Final = int(zmq.RCVMORE)
_EVENTS: Final = int(zmq.EVENTS)
POLLIN: Final = int(zmq.POLLIN)
_Frame: Final = zmq.Frame
BIG_FRAME: Final = 4096
"""Frames at least this large are passed through as zmq.Frame, without copies."""


def send_frames(sock: zmq.Socket[Any], frames: Sequence[bytes | zmq.Frame]) -> None:
    """Send `frames` as one message without blocking; raises zmq.Again / zmq.ZMQError.

    A frame may be a zmq.Frame from `recv_frames`: it is passed on without a copy (libzmq
    shares the buffer by reference count).
    """
    last = len(frames) - 1
    for i in range(last):
        frame = frames[i]
        _send(sock, frame, _MORE_NOBLOCK, type(frame) is not _Frame)
    frame = frames[last]
    _send(sock, frame, NOBLOCK, type(frame) is not _Frame)


def recv_frames(sock: zmq.Socket[bytes]) -> list[bytes]:
    """Receive one whole message without blocking; raises zmq.Again if none is waiting.

    Frames of BIG_FRAME bytes or more stay zmq.Frame objects (opaque bodies, never compared
    or hashed), so a large body is never copied into Python; `send_frames` passes them on
    by reference. The rest are bytes.
    """
    # Receiving zmq.Frames (copy=False) and reading their `more` flag is cheaper than asking
    # the socket for RCVMORE after each frame: pyzmq's `get` converts every option number to
    # a SocketOption enum (two Python-level calls); Frame.more is filled in C.
    frame = _recv(sock, NOBLOCK, False)
    parts: list[Any] = [frame.bytes]
    while frame.more:
        frame = _recv(sock, NOBLOCK, False)
        parts.append(frame.bytes if len(frame) < BIG_FRAME else frame)
    return parts


class OversizedMessage(Exception):
    """`recv_frames` read a whole message with a frame over its `limit` (the message is
    consumed and dropped)."""

    def __init__(self, sender: bytes, size: int) -> None:
        super().__init__(f"a frame of {size} bytes")
        self.sender = sender
        self.size = size


def recv_frames_limited(sock: zmq.Socket[bytes], limit: int) -> list[bytes]:
    """`recv_frames`, but raises OversizedMessage (after consuming the whole message) when a
    frame is larger than `limit`. Only frames of BIG_FRAME bytes or more are measured."""
    frame = _recv(sock, NOBLOCK, False)
    parts: list[Any] = [frame.bytes]
    biggest = 0
    while frame.more:
        frame = _recv(sock, NOBLOCK, False)
        size = len(frame)
        if size < BIG_FRAME:
            parts.append(frame.bytes)
        else:
            parts.append(frame)
            if size > biggest:
                biggest = size
    if biggest > limit:
        raise OversizedMessage(parts[0], biggest)
    return parts


def readable(sock: zmq.Socket[bytes]) -> bool:
    """True if a whole message is waiting (cheaper than catching zmq.Again)."""
    return bool(_get(sock, _EVENTS) & POLLIN)


def recv_bytes(sock: zmq.Socket[bytes]) -> list[bytes]:
    """`recv_frames`, but every frame as bytes (for peers whose handlers want bytes)."""
    frame = _recv(sock, NOBLOCK, False)
    parts = [frame.bytes]
    while frame.more:
        frame = _recv(sock, NOBLOCK, False)
        parts.append(frame.bytes)
    return parts
