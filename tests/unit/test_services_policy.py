"""The worker's command policy and child limits (services.policy, spec/security.md "Worker
policy"), without a worker: which commands pass, and what the child process may use."""

from __future__ import annotations

import subprocess
import sys

import pytest

from services.policy import ChildLimits, CommandPolicy


def test_no_allow_patterns_allow_everything() -> None:
    assert CommandPolicy().check("shell", "rm -rf / ; echo") is None


@pytest.mark.parametrize(
    ("service", "command", "allowed"),
    [
        ("os", "ls", True),
        ("os", "echo", True),
        ("os", "rm", False),
        ("os", "/bin/ls", False),  # a bare-name pattern never matches a path
        ("os", "/tmp/ls", False),
        ("os", "/usr/bin/git", True),
        ("os", "/usr/bin/../../tmp/x", False),
        ("shell", "ls -la /tmp", True),
        ("shell", "rm -rf /tmp/x", False),
        ("shell", "ls; rm -rf /", False),
        ("shell", "ls && rm x", False),
        ("shell", "ls | sh", False),
        ("shell", "ls $(rm x)", False),
        ("shell", "ls `rm x`", False),
        ("shell", "ls > /etc/passwd", False),
        ("shell", "ls\nrm x", False),
        ("shell", "", False),
    ],
)
def test_allow_patterns_match_the_executable_or_the_first_word(
    service: str, command: str, allowed: bool
) -> None:
    policy = CommandPolicy(allow=("ls", "ech?", "/usr/bin/*"))
    assert (policy.check(service, command) is None) is allowed


def test_with_allow_patterns_the_request_may_not_change_which_program_runs() -> None:
    policy = CommandPolicy(allow=("ls",))
    assert policy.check("os", "ls", {"FOO": "1"}) is None
    for name in ("PATH", "LD_PRELOAD", "PYTHONPATH", "BASH_ENV"):
        reason = policy.check("os", "ls", {name: "/tmp"})
        assert reason is not None and name in reason


def test_deny_env_rejects_any_request_environment() -> None:
    policy = CommandPolicy(deny_env=True)
    assert policy.check("os", "ls", {}) is None
    assert policy.check("os", "ls", {"A": "1"}) is not None


def test_max_memory_makes_a_memory_hog_fail_fast() -> None:
    """RLIMIT_AS in the child: a 2 GiB allocation fails with MemoryError instead of paging."""
    limits = ChildLimits(max_memory=200_000_000)
    result = subprocess.run(
        [sys.executable, "-c", "b = bytearray(2 * 1024**3)"],
        capture_output=True,
        timeout=30,
        **limits.popen_kwargs(),
    )
    assert result.returncode != 0
    assert b"MemoryError" in result.stderr


def test_no_limits_means_no_preexec_and_bad_limits_are_refused() -> None:
    assert ChildLimits().popen_kwargs() == {}
    with pytest.raises(ValueError):
        ChildLimits(max_memory=0)
    with pytest.raises(ValueError):
        ChildLimits(max_procs=-1)


def test_user_needs_an_existing_account() -> None:
    with pytest.raises(ValueError, match="no such user"):
        ChildLimits(user="no-such-user-mdp").check_user()
