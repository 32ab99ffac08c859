"""Where our programs keep what is theirs on this machine, and the checks that keep it theirs.

Two per-user directories:

- The **runtime directory** holds the default broker socket (`default_endpoint()`):
  `$XDG_RUNTIME_DIR/mdp` (the XDG Base Directory spec's per-user directory: owned by the user,
  mode 0700, emptied at logout) or, when `XDG_RUNTIME_DIR` is unset or is not ours (cron,
  `su` keeping the caller's environment, containers), `/tmp/mdp-UID`, as tmux and ssh-agent do.
- The **config directory** holds the key set `mdp-keys init` makes: `$XDG_CONFIG_HOME/mdp`,
  or `~/.config/mdp`.

A unix socket is guarded by the directories on its path: whoever cannot enter the directory
cannot connect to the socket in it, whatever the socket's own mode. So every program, broker
and peers alike, uses one of these directories only if it is a real directory (not a
symlink), owned by the effective user and closed to group and others (mode 0700, or
stricter); a missing one is created with mode 0700. Anything else is `PrivateDirError`, never
a warning: a directory another user made (say `/tmp/mdp-0`, made before root's first broker)
could hold that user's fake broker, which would then receive our commands; a directory others
can enter lets them connect to our broker and run commands as our workers' user.

Peers create the directory too rather than connect into a missing one: libzmq retries a
refused ipc connect forever, so a client that found nothing would otherwise connect to
whatever someone else puts there later.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from mdp.errors import MDPError

__all__ = [
    "FALLBACK_RUNTIME_BASE",
    "SOCKET_NAME",
    "PrivateDirError",
    "check_private_dir",
    "config_dir",
    "default_endpoint",
    "ensure_private_dir",
    "runtime_dir",
]

FALLBACK_RUNTIME_BASE: Final = "/tmp"
"""Where the runtime directory goes when `XDG_RUNTIME_DIR` is unusable: `/tmp/mdp-UID`. Fixed
(not `$TMPDIR`) so that programs started with different environments still meet."""

SOCKET_NAME: Final = "broker.sock"
_MAX_SOCKET_PATH: Final = 107  # sun_path is 108 bytes on Linux, with the terminating NUL
_PRIVATE_MASK: Final = stat.S_IRWXG | stat.S_IRWXO


class PrivateDirError(MDPError):
    """A directory that must be ours alone is missing, someone else's, or open to others."""


def runtime_dir(env: Mapping[str, str] | None = None) -> Path:
    """The directory of the default broker socket (not created or checked here)."""
    env = os.environ if env is None else env
    xdg = env.get("XDG_RUNTIME_DIR", "")
    # The XDG spec lets us rely on $XDG_RUNTIME_DIR being ours; an inherited one is not.
    if xdg and os.path.isabs(xdg) and _owned_dir(Path(xdg)):
        return Path(xdg) / "mdp"
    return Path(FALLBACK_RUNTIME_BASE) / f"mdp-{os.geteuid()}"


def default_endpoint(env: Mapping[str, str] | None = None) -> str:
    """The endpoint every program uses when given none: `ipc://RUNTIME_DIR/broker.sock`.

    The runtime directory is created if missing and checked (PrivateDirError if it is not
    ours alone, or if the socket path is too long for a unix socket).
    """
    directory = ensure_private_dir(runtime_dir(env))
    path = directory / SOCKET_NAME
    if len(os.fsencode(path)) > _MAX_SOCKET_PATH:
        raise PrivateDirError(
            f"{path} is longer than a unix socket path may be ({_MAX_SOCKET_PATH} bytes); "
            "set XDG_RUNTIME_DIR to a shorter directory or give an endpoint"
        )
    return f"ipc://{path}"


def config_dir(env: Mapping[str, str] | None = None) -> Path:
    """The directory of the local key set (`mdp-keys init`); not created or checked here."""
    env = os.environ if env is None else env
    xdg = env.get("XDG_CONFIG_HOME", "")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "mdp"
    home = env.get("HOME") or pwd.getpwuid(os.geteuid()).pw_dir
    return Path(home) / ".config" / "mdp"


def ensure_private_dir(path: Path) -> Path:
    """Create `path` (mode 0700) if missing, then `check_private_dir` it; return it.

    Missing parents are created with mode 0700 too (`~/.config` on a fresh account).
    """
    try:
        with contextlib.suppress(FileExistsError):
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            path.mkdir(mode=0o700)
    except OSError as exc:
        raise PrivateDirError(f"cannot create {path}: {exc.strerror}") from None
    return check_private_dir(path)


def check_private_dir(path: Path) -> Path:
    """Return `path` if it is a directory (not a symlink) owned by us and closed to group and
    others; otherwise raise PrivateDirError saying what is wrong and how to fix it."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        raise PrivateDirError(f"{path} does not exist") from None
    except OSError as exc:
        raise PrivateDirError(f"cannot inspect {path}: {exc.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        raise PrivateDirError(
            f"{path} is a symbolic link; refusing to use it as a private directory "
            "(remove it, and it is made anew)"
        )
    if not stat.S_ISDIR(st.st_mode):
        raise PrivateDirError(f"{path} is not a directory")
    uid = os.geteuid()
    if st.st_uid != uid:
        raise PrivateDirError(
            f"{path} belongs to {_user(st.st_uid)}, not to {_user(uid)}: another user may have "
            "made it to catch your commands, so it is not used. Remove it (as root) or set "
            "XDG_RUNTIME_DIR / XDG_CONFIG_HOME to a directory of your own"
        )
    if st.st_mode & _PRIVATE_MASK:
        raise PrivateDirError(
            f"{path} has mode {stat.S_IMODE(st.st_mode):04o}: other users could reach what is "
            f"in it; run `chmod 700 {path}` (to share a broker with a group, bind an ipc:// "
            "path elsewhere and use mdp-broker --group)"
        )
    return path


def _owned_dir(path: Path) -> bool:
    try:
        st = path.lstat()
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid()


def _user(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"
