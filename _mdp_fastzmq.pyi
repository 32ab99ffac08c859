# Types of the optional C module built from mdp/_fastzmq.c (see mdp.fastzmq, hatch_build.py).
from collections.abc import Callable
from typing import Any

SOURCE_HASH: str
BIG_FRAME: int

class Frame:
    """A large received frame, kept in libzmq's buffer (sent on without a copy)."""

    @property
    def bytes(self) -> bytes: ...
    def __len__(self) -> int: ...
    def __buffer__(self, flags: int, /) -> memoryview: ...

def bind(addresses: tuple[int | None, ...], error_class: type[BaseException], /) -> None: ...
def drain(
    handle: int,
    most: int,
    limit: int,
    on_message: Callable[..., object],
    on_oversized: Callable[[bytes, int], object],
    with_user_id: bool,
    /,
) -> int: ...
def send_from(handle: int, outbox: list[Any], start: int, /) -> tuple[int, int] | None: ...
