"""What a worker lets a command be and use (spec/security.md, "Worker policy").

`CommandPolicy` decides, before anything runs, whether a request to the "os" or "shell" service
may run at all (allowed programs, environment variables). `ChildLimits` confines the child
process that runs it (resource limits, the account it runs as). `mdp-worker` builds both from
its options; the command services (`services.command`) apply them.
"""

from __future__ import annotations

import fnmatch
import os
import pwd
import re
import resource
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ChildLimits", "CommandPolicy"]

_SHELL_CONTROL = re.compile(r"[;&|`\n\r<>]|\$\(")
_LOADER_VARIABLES = re.compile(r"^(PATH|IFS|ENV|BASH_ENV|LD_\w*|DYLD_\w*|PYTHON\w*)$")


@dataclass(frozen=True, slots=True)
class CommandPolicy:
    """What the command services accept (spec/security.md, "Worker policy").

    `allow`: fnmatch patterns (case-sensitive). Empty: every command is allowed. Otherwise,
    for "os" the executable as the request names it must match one pattern (a pattern without
    `/` only matches a bare name looked up in PATH, never a path) and may not contain `..`;
    for "shell" the first word must match and the line may not contain `;`, `&`, `|`, `` ` ``,
    `$(`, `<`, `>` or a newline (otherwise any command could follow an allowed one).
    `deny_env`: reject any request that carries environment variables. Whatever `deny_env`
    says, with an allow-list a request may not set PATH, IFS, ENV, BASH_ENV, LD_*, DYLD_* or
    PYTHON* (they change which program runs).
    """

    allow: tuple[str, ...] = ()
    deny_env: bool = False

    def check(self, service: str, command: str, env: Mapping[str, str] | None = None) -> str | None:
        """None if the request may run; otherwise why it is rejected (for the client)."""
        if env and self.deny_env:
            return "this worker does not accept environment variables (--deny-env)"
        if not self.allow:
            return None
        if env:
            bad = sorted(k for k in env if _LOADER_VARIABLES.match(k))
            if bad:
                return f"environment variables not allowed with --allow: {', '.join(bad)}"
        if service == "shell":
            if _SHELL_CONTROL.search(command):
                return "shell control characters (; & | ` $( < > newline) are not allowed"
            words = command.split()
            program = words[0] if words else ""
        else:
            program = command
        if ".." in Path(program).parts:
            return f"{program!r}: '..' is not allowed in a program path"
        if self.allows(program):
            return None
        return f"{program!r} does not match any allowed pattern"

    def allows(self, program: str) -> bool:
        for pattern in self.allow:
            if "/" not in pattern and "/" in program:
                continue
            if fnmatch.fnmatchcase(program, pattern):
                return True
        return False


@dataclass(frozen=True, slots=True)
class ChildLimits:
    """How a command's child process is confined: resource limits and the user it runs as.

    `max_memory`: RLIMIT_AS in bytes (address space: a command that asks for more gets ENOMEM
    / MemoryError instead of pushing the machine into swap). `max_procs`: RLIMIT_NPROC, counted
    per user, so it is meaningful with `user` (a dedicated account). `user`: run commands as
    this account; needs the worker to run as root. Limits are set in the child between fork
    and exec (`preexec_fn`, which only calls setrlimit); the user switch is done by
    subprocess itself (`user=`, `group=`, `extra_groups=`).
    """

    max_memory: int | None = None
    max_procs: int | None = None
    user: str | None = None

    def __post_init__(self) -> None:
        if self.max_memory is not None and self.max_memory <= 0:
            raise ValueError("--max-memory must be positive")
        if self.max_procs is not None and self.max_procs <= 0:
            raise ValueError("--max-procs must be positive")

    def check_user(self) -> pwd.struct_passwd | None:
        """The account for `user` (ValueError if unknown or if we are not root)."""
        if self.user is None:
            return None
        try:
            account = pwd.getpwnam(self.user)
        except KeyError:
            raise ValueError(f"--user {self.user}: no such user") from None
        if os.geteuid() != 0:
            raise ValueError(f"--user {self.user} needs the worker to be started as root")
        return account

    def popen_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for subprocess / asyncio.create_subprocess_exec."""
        kwargs: dict[str, Any] = {}
        account = self.check_user()
        if account is not None:
            kwargs["user"] = account.pw_uid
            kwargs["group"] = account.pw_gid
            kwargs["extra_groups"] = os.getgrouplist(account.pw_name, account.pw_gid)
        preexec = self.preexec()
        if preexec is not None:
            kwargs["preexec_fn"] = preexec
        return kwargs

    def preexec(self) -> Callable[[], None] | None:
        """The function the child runs before exec, or None if there are no limits."""
        limits: list[tuple[int, int]] = []
        if self.max_memory is not None:
            limits.append((resource.RLIMIT_AS, self.max_memory))
        if self.max_procs is not None:
            limits.append((resource.RLIMIT_NPROC, self.max_procs))
        if not limits:
            return None
        setrlimit = resource.setrlimit

        def set_limits() -> None:  # runs in the forked child: syscalls only, no imports/locks
            for which, value in limits:
                setrlimit(which, (value, value))

        return set_limits
