"""The one exception hierarchy of the mdp library.

Peer input never raises out of the broker: the broker turns a `ProtocolError` into a counted
drop. The worker and client libraries raise these to their callers.
"""

from __future__ import annotations


class MDPError(Exception):
    """Base class of every error this library raises."""


class ProtocolError(MDPError):
    """A message does not follow any MDP frame layout we accept."""


class Timeout(MDPError):
    """No answer arrived before the deadline."""


class Disconnected(MDPError):
    """The peer went away, or told us to go away (DISCONNECT)."""


class ServiceUnavailable(MDPError):
    """The broker knows no worker for the service (MMI answered 404)."""


class SecurityError(MDPError):
    """CURVE cannot be set up as asked (so the program must not start without it)."""


class KeyFileError(SecurityError):
    """A certificate file or allow-list directory is missing, unreadable or malformed."""
