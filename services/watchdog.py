"""The watchdog: commands never outlive the worker that started them (spec/command-service.md
§14.4).

Every command runs in a session of its own (so that a timeout can kill its whole process group),
which also means nothing ties it to the worker: when a worker dies -- SIGKILL included -- its
commands would go on running with PPID 1, their timeouts no longer enforced. `prctl`'s
PDEATHSIG would reach only the direct child, not the grandchildren of a shell.

So each worker process starts one small watchdog process, in its own session, and keeps the
write end of a pipe to it. Over the pipe the worker says which process groups it starts
(`+PGID`) and which have ended (`-PGID`). The kernel closes the pipe when the worker exits,
however it exits; the watchdog then sends SIGTERM to every group still recorded, SIGKILL after
`KILL_GRACE` seconds, removes its state file and exits. Cost to the worker: one small pipe write
per command start and end; all bookkeeping happens in the watchdog, which reads in batches
(`BATCH_DELAY`) so that those writes rarely have to wake it.

The watchdog also records the groups in a state file (one "PGID STARTTIME" line each, STARTTIME
being the group leader's start time in clock ticks since boot, /proc/PID/stat field 22), which
it holds locked with flock(2) while it lives. If the watchdog itself is killed, the lock goes
with it: `reap_leftovers`, called when a worker starts, kills the processes recorded in every
unlocked state file -- only those whose session is the recorded group (each command leads its
own session) and which started no earlier than the recorded leader, so a reused pid is never hit.

Run as `python -m services.watchdog STATE_FILE`, with the pipe as its standard input.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from mdp.local_dirs import ensure_private_dir, runtime_dir

__all__ = ["KILL_GRACE", "Watchdog", "default_state_dir", "reap_leftovers"]

log = logging.getLogger("services.watchdog")

KILL_GRACE = 1.0
"""Seconds between SIGTERM and SIGKILL when the worker is gone."""
BATCH_DELAY = 0.02
"""After handling what it read, the watchdog sleeps this long before reading again, so that the
lines of a busy worker are handled in batches: its writes then find no sleeping reader to wake
(a pipe write that wakes a process costs the worker a context switch), and a group that
started and ended within one batch costs the watchdog nothing. The price: the worker's death
is noticed, and the state file updated, up to this much later."""
STARTUP_TIMEOUT = 5.0
SUFFIX = ".groups"


def default_state_dir() -> Path:
    """The user's private runtime directory ($XDG_RUNTIME_DIR/mdp, else /tmp/mdp-UID), made if
    missing and checked: a directory someone else made could hold state files naming process
    groups this worker would then kill (mdp.local_dirs; PrivateDirError otherwise)."""
    return ensure_private_dir(runtime_dir())


class Watchdog:
    """The worker's end: starts the watchdog process and tells it about process groups.

    `add`/`remove` never block for long (a line of a few bytes into a pipe) and never raise:
    if the watchdog is gone, commands simply lose that protection (logged once).
    """

    def __init__(self, state_dir: Path | str | None = None) -> None:
        directory = Path(state_dir) if state_dir is not None else default_state_dir()
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.state_file = directory / f"worker-{os.getpid()}-{time.monotonic_ns()}{SUFFIX}"
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "services.watchdog", str(self.state_file)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            # Its own session: a signal to the worker's process group does not reach it.
            start_new_session=True,
            close_fds=True,
        )
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._fd = self._proc.stdin.fileno()
        # The watchdog says "ready" once it holds the lock on its state file.
        ready = _read_line(self._proc.stdout.fileno(), STARTUP_TIMEOUT)
        self._proc.stdout.close()
        if ready != b"ready":
            self.close()
            raise RuntimeError("the watchdog process did not start")
        self._broken = False

    @property
    def pid(self) -> int:
        return self._proc.pid

    def add(self, pgid: int) -> None:
        """A command now leads process group `pgid`."""
        self._write(f"+{pgid}\n")

    def remove(self, pgid: int) -> None:
        """The command of group `pgid` has ended (its leader was reaped)."""
        self._write(f"-{pgid}\n")

    def _write(self, line: str) -> None:
        if self._broken:
            return
        try:
            os.write(self._fd, line.encode())
        except OSError as exc:
            self._broken = True
            log.error("the watchdog is gone (%s): commands may outlive this worker", exc)

    def close(self) -> None:
        """Close the pipe (the watchdog ends what is still recorded, then exits) and reap it."""
        proc = self._proc
        if proc.stdin is not None and not proc.stdin.closed:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        try:
            proc.wait(timeout=KILL_GRACE + 2)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _read_line(fd: int, timeout: float) -> bytes:
    data = b""
    deadline = time.monotonic() + timeout
    while not data.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            break
        chunk = os.read(fd, 64)
        if not chunk:
            break
        data += chunk
    return data.strip()


# ---------------------------------------------------------------------------------------------
# /proc


def _stat(pid: int) -> tuple[int, int] | None:
    """(session id, start time in ticks) of a live process, or None (also for a zombie: it
    is dead already, whether or not its parent has reaped it)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ")".
    fields = text[text.rfind(")") + 2 :].split()
    if not fields or fields[0] == "Z":
        return None
    try:
        return int(fields[3]), int(fields[19])  # session (field 6), starttime (field 22)
    except (IndexError, ValueError):
        return None


def _session_members(sid: int, not_before: int) -> list[int]:
    members = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None and stat[0] == sid and stat[1] >= not_before:
                members.append(int(entry.name))
    return members


def reap_leftovers(state_dir: Path | str | None = None) -> int:
    """Kill what dead watchdogs recorded (see the module docstring); returns how many
    processes were killed. Files of live watchdogs (locked) are left alone."""
    directory = Path(state_dir) if state_dir is not None else default_state_dir()
    killed = 0
    try:
        files = [p for p in directory.iterdir() if p.name.endswith(SUFFIX)]
    except OSError:
        return 0
    for path in files:
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # its watchdog lives
            for line in Path(path).read_text().splitlines():
                try:
                    pgid, started = (int(word) for word in line.split())
                except ValueError:
                    continue
                for pid in _session_members(pgid, started):
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
                        killed += 1
            with contextlib.suppress(OSError):
                path.unlink()
        finally:
            os.close(fd)
    if killed:
        log.warning("killed %d process(es) left running by a worker that died", killed)
    return killed


# ---------------------------------------------------------------------------------------------
# The watchdog process


def _signal_sessions(groups: dict[int, int], sig: int) -> int:
    """Send `sig` to every process of the recorded sessions; returns how many got it.

    By session rather than by process group: a command may make groups of its own (a shell
    with job control), and the start-time check keeps a reused number safe."""
    hit = 0
    for sid, started in groups.items():
        for pid in _session_members(sid, started):
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
                hit += 1
    return hit


def _end_groups(groups: dict[int, int]) -> None:
    if not _signal_sessions(groups, signal.SIGTERM):
        return
    deadline = time.monotonic() + KILL_GRACE
    while time.monotonic() < deadline:
        time.sleep(0.05)
        if not any(_session_members(sid, started) for sid, started in groups.items()):
            return
    _signal_sessions(groups, signal.SIGKILL)


def _save(fd: int, groups: dict[int, int]) -> None:
    data = "".join(f"{pgid} {started}\n" for pgid, started in groups.items()).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def _main(state_file: str) -> int:
    # The worker's signals are not ours: only the end of the pipe stops us.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    # Created under a name `reap_leftovers` ignores, locked, then renamed: a worker starting at
    # this moment can never take the new file for a dead watchdog's.
    fd = os.open(state_file + ".new", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.rename(state_file + ".new", state_file)
    os.write(1, b"ready\n")
    os.close(1)
    groups: dict[int, int] = {}
    pending = b""
    while True:
        chunk = os.read(0, 4096)
        if not chunk:
            break
        pending += chunk
        *lines, pending = pending.split(b"\n")
        # In order, but a group is looked up in /proc only if it is still recorded as running
        # at the end of the batch (a short command's +PGID and -PGID often come together).
        added: dict[int, None] = {}
        for line in lines:
            try:
                pgid = int(line[1:])
            except ValueError:
                continue
            if line[:1] == b"+":
                added[pgid] = None
            else:
                added.pop(pgid, None)
                groups.pop(pgid, None)
        for pgid in added:
            stat = _stat(pgid)
            if stat is not None:  # else it has already ended: nothing to watch
                groups[pgid] = stat[1]
        _save(fd, groups)
        time.sleep(BATCH_DELAY)
    if groups:
        _end_groups(groups)
    with contextlib.suppress(OSError):
        os.unlink(state_file)
    os.close(fd)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1]))
