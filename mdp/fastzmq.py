"""Multipart send/receive for hot paths: compiled when available, pyzmq otherwise.

pyzmq's `Socket.send_multipart`/`recv_multipart` are written in Python on top of its "sugar"
layer, which turns every flag into an `enum.IntFlag` and checks every frame's type; for a
five-frame MDP message that is about half of the time spent per message. The per-message
functions here call the compiled backend methods directly with plain-int flags. Same
semantics, bytes frames only.

`batch_io(sock)` goes one step further for the broker: one call receives every waiting
message (handing each to a callback), one call sends a whole outbox. With the optional C
module `_mdp_fastzmq` (built from `mdp/_fastzmq.c` at install time when a C compiler is
present, see `hatch_build.py`) each is a single call into C; without it, the same semantics in
Python on the functions below.
`MDP_PURE_PYTHON=1` in the environment turns the C module off (for comparisons and tests);
`compiled()` says which path this process uses, and why.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any, Final, NamedTuple

import zmq
from zmq.backend import Socket as _BackendSocket

_send: Any = _BackendSocket.send
_recv: Any = _BackendSocket.recv
_get: Any = _BackendSocket.get

NOBLOCK: Final = int(zmq.NOBLOCK)
SNDMORE: Final = int(zmq.SNDMORE)
_MORE_NOBLOCK: Final = NOBLOCK | SNDMORE
_EVENTS: Final = int(zmq.EVENTS)
POLLIN: Final = int(zmq.POLLIN)
_Frame: Final = zmq.Frame
BIG_FRAME: Final = 4096
"""Frames at least this large are passed through as zmq.Frame, without copies."""


def send_frames(sock: zmq.Socket[Any], frames: Sequence[bytes | zmq.Frame]) -> None:
    """Send `frames` as one message without blocking; raises zmq.Again / zmq.ZMQError.

    A frame may be a zmq.Frame (as `batch_io`'s pure-Python drain hands over large frames):
    it is passed on without a copy (libzmq shares the buffer by reference count).
    """
    last = len(frames) - 1
    for i in range(last):
        frame = frames[i]
        _send(sock, frame, _MORE_NOBLOCK, type(frame) is not _Frame)
    frame = frames[last]
    _send(sock, frame, NOBLOCK, type(frame) is not _Frame)


def readable(sock: zmq.Socket[bytes]) -> bool:
    """True if a whole message is waiting (cheaper than catching zmq.Again)."""
    return bool(_get(sock, _EVENTS) & POLLIN)


def recv_bytes(sock: zmq.Socket[bytes]) -> list[bytes]:
    """Receive one whole message without blocking, every frame as bytes; raises zmq.Again if
    none is waiting."""
    # Receiving zmq.Frames (copy=False) and reading their `more` flag is cheaper than asking
    # the socket for RCVMORE after each frame: pyzmq's `get` converts every option number to
    # a SocketOption enum (two Python-level calls); Frame.more is filled in C.
    frame = _recv(sock, NOBLOCK, False)
    parts = [frame.bytes]
    while frame.more:
        frame = _recv(sock, NOBLOCK, False)
        parts.append(frame.bytes)
    return parts


# ---------------------------------------------------------------------------------------------
# Batches: the broker's whole-outbox send and drain-everything receive

EAGAIN: Final = errno.EAGAIN
EHOSTUNREACH: Final = errno.EHOSTUNREACH


class BatchIO(NamedTuple):
    """The batch functions bound to one socket (see `batch_io`)."""

    drain: Callable[[int, int, Callable[..., object], Callable[[bytes, int], object], bool], int]
    """`drain(most, limit, on_message, on_oversized, with_user_id)`: receive up to `most`
    waiting messages without blocking, calling `on_message(first frame, [other frames])` for
    each before the next receive (with `with_user_id`, a third argument: the ZAP User-Id of the
    sender's connection, or None); returns how many were read. Fewer than `most` means the last
    receive found nothing, after every callback (and every send it made) had run: that receive
    is the check libzmq wants before the caller sleeps on the socket's fd. A message with a
    frame after the first over `limit` bytes is consumed and `on_oversized(first frame, size)`
    called instead. A callback's exception propagates."""
    send_from: Callable[[list[Any], int], tuple[int, int] | None]
    """`send_from(outbox, start)`: send outbox[start:] without blocking. None when all went;
    else (index, errno) of the first message libzmq refused (EAGAIN: the peer's pipe is full;
    EHOSTUNREACH: no such peer), and the ones after it were not sent."""


def _py_drain(
    sock: zmq.Socket[bytes],
    most: int,
    limit: int,
    on_message: Callable[..., object],
    on_oversized: Callable[[bytes, int], object],
    with_user_id: bool,
) -> int:
    got = 0
    while got < most:
        try:
            frame = _recv(sock, NOBLOCK, False)
        except zmq.Again:
            break
        got += 1
        first = frame.bytes
        user_id: str | None = None
        if with_user_id:
            try:
                user_id = frame.get("User-Id")
            except zmq.ZMQError:  # no such property: not a connection ZAP approved
                user_id = None
        rest: list[Any] = []
        biggest = 0
        while frame.more:
            frame = _recv(sock, NOBLOCK, False)
            size = len(frame)
            rest.append(frame.bytes if size < BIG_FRAME else frame)
            if size > biggest:
                biggest = size
        if biggest > limit:
            on_oversized(first, biggest)
        elif with_user_id:
            on_message(first, rest, user_id)
        else:
            on_message(first, rest)
    return got


def _py_send_from(sock: zmq.Socket[bytes], outbox: list[Any], start: int) -> tuple[int, int] | None:
    for i in range(start, len(outbox)):
        try:
            send_frames(sock, outbox[i])
        except zmq.ZMQError as exc:
            if exc.errno in (EAGAIN, EHOSTUNREACH):
                return i, exc.errno
            raise
    return None


_LIBZMQ_FUNCTIONS: Final = (
    "zmq_msg_init",
    "zmq_msg_close",
    "zmq_msg_recv",
    "zmq_msg_send",
    "zmq_msg_copy",
    "zmq_msg_move",
    "zmq_msg_data",
    "zmq_msg_size",
    "zmq_msg_more",
    "zmq_send",
    "zmq_errno",
    "zmq_msg_gets",
)


SOURCE: Final = Path(__file__).with_name("_fastzmq.c")


def _load(source: Path = SOURCE) -> tuple[ModuleType | None, str]:
    """The C module bound to pyzmq's libzmq, or None and the reason. `source` is the C file
    the module must have been built from (when it exists: a wheel install may not ship it)."""
    if os.environ.get("MDP_PURE_PYTHON"):
        return None, "MDP_PURE_PYTHON is set"
    try:
        import _mdp_fastzmq as module
    except ImportError:
        return None, "_mdp_fastzmq is not installed (no C compiler when mdp was installed)"
    if source.exists():
        built_from = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
        if built_from != module.SOURCE_HASH:
            return None, (
                "_mdp_fastzmq was built from another mdp/_fastzmq.c; reinstall mdp "
                "(pip install -e .) to rebuild it"
            )
    # The socket handles belong to the libzmq pyzmq loaded (its own bundled copy, usually):
    # resolving through pyzmq's extension module finds exactly that one.
    from zmq.backend.cython import _zmq

    try:
        library = ctypes.CDLL(_zmq.__file__)
        addresses = tuple(
            ctypes.cast(getattr(library, name), ctypes.c_void_p).value for name in _LIBZMQ_FUNCTIONS
        )
    except (OSError, AttributeError) as exc:
        return None, f"pyzmq's libzmq functions are not reachable: {exc}"
    module.bind(addresses, zmq.ZMQError)
    return module, "compiled"


_loaded: tuple[ModuleType | None, str] | None = None


def _module() -> tuple[ModuleType | None, str]:
    # Loaded on first use: only the broker needs it, and ctypes costs the others start-up time.
    global _loaded
    if _loaded is None:
        _loaded = _load()
    return _loaded


def compiled() -> tuple[bool, str]:
    """Whether `batch_io` uses the C module in this process, and why (or why not)."""
    module, why = _module()
    return module is not None, why


def batch_io(sock: zmq.Socket[bytes], *, compiled: bool = True) -> BatchIO:
    """The batch receive/send functions for `sock`: compiled when available and `compiled`.

    The compiled ones hold the socket's libzmq address: use them only while `sock` is open.
    """
    module = _module()[0] if compiled else None
    if module is not None:
        handle = sock.underlying
        return BatchIO(partial(module.drain, handle), partial(module.send_from, handle))
    return BatchIO(partial(_py_drain, sock), partial(_py_send_from, sock))
