"""clients.web.security: the token, session and CSRF checks, and the Host/Origin allow-list
(spec/api.md §3). The HTTP side of the same rules is in tests/web/test_api.py."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi", reason="mdp-web needs the [web] extra")

from clients.web.security import Guard, generate_token, host_of, is_loopback_host

TOKEN = "0123456789abcdef-token"


def test_host_of_strips_port_brackets_and_case() -> None:
    assert host_of("LocalHost:8080") == "localhost"
    assert host_of("[::1]:8080") == "::1"
    assert host_of("::1") == "::1"
    assert host_of("127.0.0.1") == "127.0.0.1"


def test_loopback_hosts() -> None:
    assert is_loopback_host("127.0.0.2")
    assert is_loopback_host("localhost:1")
    assert is_loopback_host("[::1]")
    assert not is_loopback_host("10.0.0.1")
    assert not is_loopback_host("evil.example")


def test_the_host_allow_list_is_loopback_the_bind_address_and_the_named_hosts() -> None:
    guard = Guard.for_bind(TOKEN, "10.1.2.3", ["ops.example.org"])
    for host in ("localhost:8080", "127.0.0.1", "[::1]:80", "10.1.2.3:8080", "OPS.example.org"):
        assert guard.host_allowed(host), host
    assert not guard.host_allowed("evil.example")
    assert not guard.host_allowed(None)
    wildcard = Guard.for_bind(TOKEN, "0.0.0.0")
    assert not wildcard.host_allowed("0.0.0.0")


def test_origin_absent_or_ours_is_allowed_foreign_or_null_is_not() -> None:
    guard = Guard.for_bind(TOKEN, "127.0.0.1")
    assert guard.origin_allowed(None)
    assert guard.origin_allowed("http://127.0.0.1:8080")
    assert guard.origin_allowed("http://localhost:9")
    assert not guard.origin_allowed("http://evil.example")
    assert not guard.origin_allowed("null")
    assert not guard.origin_allowed("file://")


def test_bearer_needs_the_exact_token() -> None:
    guard = Guard(TOKEN)
    assert guard.bearer_valid(f"Bearer {TOKEN}")
    assert guard.bearer_valid(f"bearer {TOKEN}")
    assert not guard.bearer_valid(f"Bearer {TOKEN}x")
    assert not guard.bearer_valid(f"Basic {TOKEN}")
    assert not guard.bearer_valid(None)


def test_sessions_are_signed_by_the_token_and_csrf_belongs_to_one_session() -> None:
    guard = Guard(TOKEN)
    cookie = guard.new_session()
    sid = guard.session_id(cookie)
    assert sid is not None
    assert guard.session_id(cookie + "x") is None
    assert guard.session_id("forged.0000") is None
    assert Guard("another-token-0123456").session_id(cookie) is None  # a new token ends it
    csrf = guard.csrf_token(sid)
    assert guard.csrf_valid(sid, csrf)
    other = guard.session_id(guard.new_session())
    assert other is not None
    assert not guard.csrf_valid(other, csrf)
    assert not guard.csrf_valid(sid, None)


def test_tokens_are_long_and_short_ones_refused() -> None:
    assert len(generate_token()) >= 40
    with pytest.raises(ValueError):
        Guard("short")
