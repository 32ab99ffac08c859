"""Who may use the web console, and from where (spec/api.md §2).

A page that runs shell commands is a target for every other web page its user visits, so the
console trusts no request by its network origin, not even one from loopback:

- a secret token, even on loopback, defeats other local users and processes: the API takes
  `Authorization: Bearer TOKEN`, pages take the session cookie;
- the session cookie is `HttpOnly; SameSite=Strict` (no script reads it, no other site sends
  it); `/login?token=` exchanges the token for it once;
- a `Host` allow-list defeats DNS rebinding (a foreign name resolving to 127.0.0.1): 400;
- an `Origin` check on unsafe methods refuses cross-site form posts: 403;
- a CSRF token on unsafe methods authenticated by the cookie (a hidden form field or the
  `X-CSRF-Token` header) covers posts that carry no Origin.

Sessions hold no server state: the cookie is a random id with an HMAC keyed by the token, and
the CSRF token is a second HMAC of that id. A new token (restart without `--token-file`) ends
every session.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import urlsplit

__all__ = [
    "COOKIE",
    "CSRF_FIELD",
    "CSRF_HEADER",
    "Guard",
    "generate_token",
    "host_of",
    "is_loopback_host",
]

COOKIE: Final = "mdp_session"
CSRF_FIELD: Final = "csrf_token"
CSRF_HEADER: Final = "x-csrf-token"
TOKEN_BYTES: Final = 32
LOOPBACK_NAMES: Final = frozenset({"localhost", "127.0.0.1", "::1"})


def generate_token() -> str:
    """A fresh random token (256 bits, URL-safe)."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def host_of(value: str) -> str:
    """The host name of a `Host` header or netloc, lower case, without port or brackets."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:].split("]", 1)[0]
    if value.count(":") > 1:  # a bare IPv6 address
        return value
    return value.split(":", 1)[0]


def is_loopback_host(host: str) -> bool:
    """True for `localhost` and loopback addresses (127.0.0.0/8, ::1)."""
    host = host_of(host)
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class Guard:
    """The console's token and the checks derived from it."""

    token: str
    allowed_hosts: frozenset[str] = field(default_factory=lambda: LOOPBACK_NAMES)
    secure_cookie: bool = False
    """Mark the cookie `Secure` (the console is reached over https)."""

    def __post_init__(self) -> None:
        if len(self.token) < 16:
            raise ValueError("the token must have at least 16 characters")
        self._key = hashlib.sha256(b"mdp-web session key\0" + self.token.encode()).digest()

    @classmethod
    def for_bind(
        cls, token: str, bind_host: str, extra_hosts: Iterable[str] = (), secure: bool = False
    ) -> Guard:
        """The allow-list for a console bound to `bind_host`: loopback names, the bind address
        itself when it is concrete, and `extra_hosts` (the names users type, e.g. behind a
        proxy)."""
        hosts = set(LOOPBACK_NAMES)
        bind = host_of(bind_host)
        if bind not in ("", "0.0.0.0", "::"):
            hosts.add(bind)
        hosts.update(host_of(h) for h in extra_hosts)
        return cls(token, frozenset(hosts), secure)

    # -----------------------------------------------------------------------------------------

    def host_allowed(self, host_header: str | None) -> bool:
        """The `Host` header names this console (DNS rebinding defence)."""
        return host_header is not None and host_of(host_header) in self.allowed_hosts

    def origin_allowed(self, origin: str | None) -> bool:
        """An `Origin` header is absent (not a browser's cross-site request) or ours."""
        if origin is None:
            return True
        if origin == "null":  # sandboxed frames, file:// pages, some redirects
            return False
        parts = urlsplit(origin)
        return parts.scheme in ("http", "https") and host_of(parts.netloc) in self.allowed_hosts

    def token_valid(self, candidate: str | None) -> bool:
        """Constant-time comparison with the token."""
        return candidate is not None and hmac.compare_digest(
            candidate.encode(), self.token.encode()
        )

    def bearer_valid(self, authorization: str | None) -> bool:
        """`Authorization: Bearer TOKEN` carries the token."""
        if not authorization:
            return False
        scheme, _, credentials = authorization.partition(" ")
        return scheme.lower() == "bearer" and self.token_valid(credentials.strip())

    # -----------------------------------------------------------------------------------------
    # Sessions and CSRF

    def new_session(self) -> str:
        """A cookie value for a fresh session."""
        sid = secrets.token_urlsafe(18)
        return f"{sid}.{self._mac('session', sid)}"

    def session_id(self, cookie: str | None) -> str | None:
        """The session id of a valid cookie value, else None."""
        if not cookie:
            return None
        sid, _, mac = cookie.partition(".")
        if not sid or not hmac.compare_digest(mac.encode(), self._mac("session", sid).encode()):
            return None
        return sid

    def csrf_token(self, sid: str) -> str:
        """The CSRF token of a session (put in forms and in a meta tag for scripts)."""
        return self._mac("csrf", sid)

    def csrf_valid(self, sid: str, candidate: str | None) -> bool:
        """A submitted CSRF token belongs to this session."""
        return candidate is not None and hmac.compare_digest(
            candidate.encode(), self.csrf_token(sid).encode()
        )

    def _mac(self, purpose: str, value: str) -> str:
        digest = hmac.new(self._key, f"{purpose}\0{value}".encode(), hashlib.sha256)
        return digest.hexdigest()[:43]
