"""CURVE for the broker's peers (clients and workers): the socket options of a CURVE client."""

from __future__ import annotations

import os

import zmq

from mdp.security.keys import load_key_pair, load_public_key

__all__ = ["SocketOptions", "curve_client_options"]

SocketOptions = list[tuple[int, int | bytes]]
"""(option, value) pairs to set on a socket before it binds or connects."""


def curve_client_options(
    secret_key_file: str | os.PathLike[str], server_key_file: str | os.PathLike[str]
) -> SocketOptions:
    """Socket options that make a DEALER/REQ a CURVE client of the broker.

    `secret_key_file`: this peer's `NAME.key_secret`; `server_key_file`: the broker's public
    `NAME.key` (its `.key_secret` works too, but do not hand that out). Set them before
    connecting. Raises KeyFileError.
    """
    pair = load_key_pair(secret_key_file)
    server = load_public_key(server_key_file)
    return [
        (zmq.CURVE_SERVERKEY, server),
        (zmq.CURVE_PUBLICKEY, pair.public),
        (zmq.CURVE_SECRETKEY, pair.secret),
    ]
