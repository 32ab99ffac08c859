"""A deliberately fragile broker: ours, except that it exits on one malformed message.

    python -m tests.conformance.peers.fragile_broker --bind ENDPOINT [mdp-broker options]

A 0.2 client REQUEST with the unknown command byte 0x07 (MDPC02 0x07 ...) makes it print one
line and exit 3 at once, the way a broker that asserts on its input dies. Everything else is
handled by our broker. The conformance suite must fail exactly the rule that sends that
message, restart the broker, and judge every other rule on its own.
"""

from __future__ import annotations

import os

from mdp.broker import core
from mdp.broker.cli import main

_handle = core.BrokerCore.handle


def fragile_handle(self: core.BrokerCore, identity: bytes, frames: list[bytes], now: float) -> None:
    if frames[:2] == [b"MDPC02", b"\x07"]:
        print("fragile broker: unknown client command 0x07, giving up", flush=True)
        os._exit(3)
    _handle(self, identity, frames, now)


core.BrokerCore.handle = fragile_handle  # type: ignore[method-assign]

if __name__ == "__main__":
    main()
