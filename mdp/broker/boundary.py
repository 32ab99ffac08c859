"""Who can reach the broker's endpoints: the broker's side of the local boundary
(spec/security.md, "Local boundary").

Whoever can send a request to the broker can run commands as the workers' user, and whoever
can send READY receives other users' commands. So:

1. **tcp:// means authentication.** Every user of the machine can reach 127.0.0.1, and other
   machines reach other addresses: without CURVE the broker refuses any endpoint but ipc://
   and inproc:// unless it is told `--insecure`, and then says so at start and in
   `mmi.services` (`unauthenticated_endpoints`). Loopback is not an exception: Redis's
   "protected mode" made it one, and local attacks on it are a well-worn path.
2. **ipc:// is guarded by the file system**, as Docker's and PostgreSQL's sockets are: connecting
   to a unix socket needs write permission on it and search permission on every directory
   above it. The broker binds with umask 077, so its socket is mode 0600 from its first moment
   (libzmq creates it with the process umask), and the default endpoint lives in a directory
   only its owner can enter (`mdp.local_dirs`). `--group NAME` opens a socket to a group on
   purpose (mode 0660, group NAME), as Docker's `docker` group does.
3. **One broker per socket.** libzmq unlinks whatever is at an ipc path before binding, so a
   second broker would silently take the path over from a running one; the broker refuses a
   path where a broker already answers (EADDRINUSE).
"""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import zmq

from mdp.endpoints import is_local_endpoint
from mdp.errors import MDPError

__all__ = [
    "GroupError",
    "bind_umask",
    "check_group_reach",
    "check_ipc_free",
    "group_id",
    "insecure_refusal",
    "insecure_warning",
    "ipc_path",
    "share_with_group",
]

_KEY_SET_HOWTO: Final = (
    "Use keys instead (README, 'Security model'):\n"
    "  mdp-keys init                            # a key set in ~/.config/mdp\n"
    "  mdp-broker --bind {bind}    # finds it: CURVE on; so do workers and clients\n"
)
_PER_MACHINE_HOWTO: Final = (
    "For several machines and people, one key each (README, 'Running across machines'):\n"
    "  mdp-keys generate broker --dir keys\n"
    "  mdp-keys generate alice --dir keys      # one per client\n"
    "  mdp-keys generate worker1 --dir keys    # one per worker\n"
    "  mdp-keys allow client keys/alice.key --dir allowed/clients\n"
    "  mdp-keys allow worker keys/worker1.key --dir allowed/workers\n"
    "  mdp-broker {binds} --curve-secret-key keys/broker.key_secret "
    "--allow-clients allowed/clients --allow-workers allowed/workers\n"
)


class GroupError(MDPError):
    """`--group` names no group, or a group that cannot reach the socket."""


def _who(endpoints: list[str]) -> str:
    loopback = all(_is_loopback(e) for e in endpoints)
    return (
        "every user of this machine"
        if loopback
        else "every user of this machine and anyone who can reach the port over the network"
    )


def insecure_refusal(endpoints: list[str]) -> str:
    """Why the broker will not listen on `endpoints` without CURVE, and what to do instead."""
    loopback = all(_is_loopback(e) for e in endpoints)
    return (
        f"refusing to listen on {', '.join(endpoints)} without authentication: "
        f"{_who(endpoints)} could run commands on your workers, as the users the workers run "
        "them as, and could register as a worker to receive other users' commands.\n"
        + _KEY_SET_HOWTO.format(bind=endpoints[0])
        + ("" if loopback else _PER_MACHINE_HOWTO.format(binds=_binds(endpoints)))
        + "Or pass --insecure (MDP_BROKER_INSECURE=1) to listen without authentication anyway."
    )


def _binds(endpoints: list[str]) -> str:
    return " ".join(f"--bind {e}" for e in endpoints)


def insecure_warning(endpoints: list[str]) -> str:
    """What an --insecure broker logs at start (and keeps saying in mmi.services)."""
    return (
        f"INSECURE (--insecure): {', '.join(endpoints)} accepts unauthenticated peers: "
        f"{_who(endpoints)} can run commands on the workers and register as a worker. "
        "Run `mdp-keys init` and restart without --insecure to require keys."
    )


def _is_loopback(endpoint: str) -> bool:
    return endpoint.lower().startswith("tcp://") and is_local_endpoint(endpoint)


# ------------------------------------------------------------------------------------------
# ipc:// sockets


def ipc_path(endpoint: str) -> str | None:
    """The file system path of an ipc:// endpoint (None for other transports; ipc://@NAME,
    Linux's abstract namespace, has no path and no permissions either)."""
    transport, _, address = endpoint.partition("://")
    if transport.lower() != "ipc" or address.startswith("@"):
        return None
    return address


@contextlib.contextmanager
def bind_umask() -> Iterator[None]:
    """Files created inside are closed to group and others: libzmq creates an ipc socket with
    the process umask, and a socket others may write to is a socket they may connect to.

    The umask is per process: the broker binds before it starts any other work."""
    previous = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(previous)


def check_ipc_free(endpoint: str) -> None:
    """Raise EADDRINUSE if a process already accepts connections on this ipc socket."""
    path = ipc_path(endpoint)
    if path is None or not os.path.exists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except OSError:
        return  # nobody listens (a socket file left behind): libzmq replaces it
    finally:
        probe.close()
    raise zmq.ZMQError(errno.EADDRINUSE, f"a broker already listens on {endpoint}")


def group_id(name: str) -> int:
    """The id of group `name` (a number is taken as a gid); GroupError if there is none."""
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        if name.isdigit():
            return int(name)
        raise GroupError(f"--group {name}: no such group") from None


def check_group_reach(endpoint: str, gid: int) -> None:
    """GroupError unless members of `gid` could enter the directory of this ipc socket.

    Only the socket's own directory is checked (its ancestors are usually /run or /srv): the
    default endpoint's directory is private to its owner, so `--group` needs another path.
    """
    path = ipc_path(endpoint)
    if path is None:
        return
    directory = Path(path).parent
    try:
        st = directory.stat()
    except OSError as exc:
        raise GroupError(f"cannot inspect {directory}: {exc.strerror}") from None
    reachable = st.st_mode & stat.S_IXOTH or (st.st_mode & stat.S_IXGRP and st.st_gid == gid)
    if not reachable:
        raise GroupError(
            f"members of the group cannot enter {directory} (mode "
            f"{stat.S_IMODE(st.st_mode):04o}), so --group would let nobody in. Bind a socket in "
            "a directory for the purpose, e.g.: install -d -m 0750 -g GROUP /run/mdp; "
            "mdp-broker --bind ipc:///run/mdp/broker.sock --group GROUP"
        )


def share_with_group(endpoint: str, gid: int) -> None:
    """Let members of `gid` connect: the socket gets that group and mode 0660."""
    path = ipc_path(endpoint)
    if path is None:
        return
    try:
        os.chown(path, -1, gid)
        os.chmod(path, 0o660)
    except OSError as exc:
        raise GroupError(f"cannot give {path} to group {gid}: {exc.strerror}") from None
