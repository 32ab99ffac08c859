"""Who may talk to the broker. `spec/security.md` is the prose version of this package.

Theory of operation
-------------------
Transport security is CurveZMQ (RFC 26) on the broker's one ROUTER socket, with every
handshake checked by a ZAP handler (RFC 27) that lives in the broker process. One module per
concern:

- `keys`: certificate files. `NAME.key` holds a public key, `NAME.key_secret` a key pair
  (`zmq.auth.create_certificates` format). The broker has a key pair; clients and workers
  each have one and know the broker's public key.
- `allowlists`: the broker's two directories of public keys, one for clients, one for
  workers, re-read whenever they change (so `mdp-keys allow` and `rm` need no restart).
- `zap`: the ZAP handler. It refuses a key in neither list (status 400), so an unknown key
  never gets past the handshake; an accepted connection gets its public key as ZAP User-Id.
- `roles`: the broker's per-message check. ZeroMQ stamps that User-Id on every message; the
  broker checks each message's role (client or worker header) against the *current* lists,
  so a revoked key's established connections stop working at the next re-read.
- `curve`: the socket options that make a client or worker a CURVE client of the broker.

- `keyset`: the local key set `mdp-keys init` makes, which the programs use when given no key
  option.

Which endpoints need CURVE is `mdp.endpoints.unauthenticated_endpoints`, and the broker's rules
for them are `mdp.broker.boundary`; what a worker lets a command do is the command services'
business (`services.policy`).
"""

from __future__ import annotations

from mdp.errors import KeyFileError, SecurityError
from mdp.security.allowlists import RESCAN_INTERVAL, AllowLists, Peer
from mdp.security.curve import SocketOptions, curve_client_options
from mdp.security.keys import (
    PUBLIC_SUFFIX,
    SECRET_SUFFIX,
    KeyPair,
    generate_key_pair,
    load_key_pair,
    load_public_key,
    valid_key_name,
    write_public_key,
)
from mdp.security.roles import BrokerAuth
from mdp.security.zap import ZAP_DOMAIN, ZapThread, zap_reply

__all__ = [
    "PUBLIC_SUFFIX",
    "RESCAN_INTERVAL",
    "SECRET_SUFFIX",
    "ZAP_DOMAIN",
    "AllowLists",
    "BrokerAuth",
    "KeyFileError",
    "KeyPair",
    "Peer",
    "SecurityError",
    "SocketOptions",
    "ZapThread",
    "curve_client_options",
    "generate_key_pair",
    "load_key_pair",
    "load_public_key",
    "valid_key_name",
    "write_public_key",
    "zap_reply",
]
