"""Running one command as a child process: its own session, a run limit that kills the whole
process group, capped byte-exact output, streaming of output and progress while it runs.

No MDP and no request parsing here (that is `services.command`): `run_process` takes an argv
and its run limit, and returns a `CommandResult` (status, exit code or signal, output,
duration; `services.command` adds who ran it). Everything it waits for is bounded:

    start      in a new session (so its pid is also its process group id), with
               os.posix_spawn, or subprocess.Popen when a working directory, a user or
               resource limits are asked for (`_start`); failures to start (not found,
               permission denied, bad cwd) become status "error"
    run        until the leader exits or the run limit passes; stdout/stderr are read as they
               come (each capped at `max_output`, the rest read and discarded so the child
               never blocks on a full pipe), coalesced into Output events at most every
               `flush_interval`, and a Progress event goes out after `progress_interval` of
               silence
    timeout    (the run limit passed) SIGTERM to the group; once the leader has exited and
               the pipes are closed, or after `kill_grace`, SIGKILL to the group
    drain      after the leader exits, the pipes get `drain_time` to reach end-of-file; if
               something in the group still holds them open (a background grandchild), the
               group is SIGKILLed and the pipes are closed after at most another `drain_time`
    cancel     `RunControl.cancel()` (a cancel message, spec/command-service.md §14.3): as for
               a timeout, with status "cancelled"; before the start, nothing starts

Output reaches `emit` within `flush_interval` of being read (the first bytes after a quiet
spell at once), so a client sees it live. A `tracker` (the worker's watchdog,
`services.watchdog`) is told of the process group as soon as it exists and when it has ended.

Output is never decoded. Child processes are reaped with waitpid (`poll`) and found to have
exited through a pidfd where the kernel has them (Linux >= 5.3), by polling every 50 ms
elsewhere. Either way of starting gives the command the same: descriptors 0, 1 and 2 only,
SIGPIPE and SIGXFSZ at their defaults, the environment it was given, its program looked up in
that environment's PATH.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import io
import os
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import IO, Any, Literal, Protocol

from services.bodies import CommandResult, Output, Progress, WorkerStatus

__all__ = ["Emit", "GroupTracker", "Limits", "RunControl", "run_process"]

Emit = Callable[[Output | Progress], Awaitable[None]]
"""Receives the streaming events of a running command, in order."""


class GroupTracker(Protocol):
    """Whoever must know the process groups of running commands (the worker's watchdog)."""

    def add(self, pgid: int) -> None: ...

    def remove(self, pgid: int) -> None: ...


class RunControl:
    """A handle on one run: `cancel()` ends it like a timeout does, with status "cancelled"."""

    def __init__(self) -> None:
        self.cancelled = False
        self._wake: asyncio.Event | None = None

    def cancel(self) -> None:
        """Stop the command (SIGTERM to its group, SIGKILL after `kill_grace`); before it
        started, it never starts. Idempotent."""
        self.cancelled = True
        if self._wake is not None:
            self._wake.set()


_READ_SIZE = 64 * 1024
_POLL_EXIT = 0.05  # how often the exit is polled where no pidfd is available
_WRITE_SIZE = 64 * 1024


@dataclass(frozen=True, slots=True)
class Limits:
    """How one command is run. Times in seconds, sizes in bytes."""

    max_output: int = 1024 * 1024
    """Bytes kept per stream (stdout, stderr); the rest is read and discarded."""
    kill_grace: float = 1.0
    """Between SIGTERM and SIGKILL when the run limit passes."""
    drain_time: float = 0.5
    """After the command exits, how long its pipes may stay open before the group is killed."""
    flush_interval: float = 0.05
    """Output is coalesced into Output events at most this often (or every `chunk_size`)."""
    chunk_size: int = 64 * 1024
    """Largest Output event."""
    progress_interval: float = 2.0
    """A Progress event is sent after this long without any event."""


class _Capture:
    """One output pipe: the kept bytes (at most `cap`), the part not yet streamed, and EOF."""

    def __init__(self, name: Literal["stdout", "stderr"], pipe: IO[bytes], cap: int) -> None:
        self.name = name
        self.pipe = pipe
        self.fd = pipe.fileno()
        self.cap = cap
        self.kept = bytearray()
        self.pending = bytearray()
        self.truncated = False
        self.eof = False
        os.set_blocking(self.fd, False)

    def feed(self, data: bytes) -> None:
        room = self.cap - len(self.kept)
        if room > 0:
            part = data[:room]
            self.kept += part
            self.pending += part
        if len(data) > room:
            self.truncated = True  # the rest is dropped: read, never stored


class _Run:
    """The state of one running process and the loop callbacks that feed it."""

    def __init__(
        self, proc: _Child, stdin: bytes | None, limits: Limits, emit: Emit | None
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.proc = proc
        self.limits = limits
        self.emit = emit
        self.started = time.monotonic()
        self.last_event = self.started
        self.last_flush = self.started
        self.changed = asyncio.Event()
        assert proc.stdout is not None and proc.stderr is not None
        self.captures = [
            _Capture("stdout", proc.stdout, limits.max_output),
            _Capture("stderr", proc.stderr, limits.max_output),
        ]
        for capture in self.captures:
            self.loop.add_reader(capture.fd, self._on_readable, capture)
        self.stdin = memoryview(stdin or b"")
        if proc.stdin is not None:
            os.set_blocking(proc.stdin.fileno(), False)
            self.loop.add_writer(proc.stdin.fileno(), self._on_writable)
        self.pidfd: int | None = None
        self.exit_watched = False  # a pidfd in the loop fires when the leader exits
        self.exit_signalled = False  # ... and it has fired
        with contextlib.suppress(AttributeError, OSError):
            self.pidfd = os.pidfd_open(proc.pid)
            self.loop.add_reader(self.pidfd, self._on_exit)
            self.exit_watched = True

    # -- loop callbacks --------------------------------------------------------------------

    def _on_readable(self, capture: _Capture) -> None:
        try:
            data = os.read(capture.fd, _READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close_capture(capture)
            self.changed.set()
            return
        idle = not capture.pending
        capture.feed(data)
        # Wake the loop for the first bytes after a flush (it then flushes within
        # flush_interval, spec §7) and for a full chunk; bytes in between just accumulate.
        if (idle and capture.pending) or len(capture.pending) >= self.limits.chunk_size:
            self.changed.set()

    def _on_exit(self) -> None:
        if self.pidfd is not None:  # readable for good once the process exited: stop watching
            self.loop.remove_reader(self.pidfd)
        self.exit_signalled = True
        self.changed.set()

    def _on_writable(self) -> None:
        pipe = self.proc.stdin
        assert pipe is not None
        try:
            written = os.write(pipe.fileno(), self.stdin[:_WRITE_SIZE])
        except BlockingIOError:
            return
        except OSError:  # the command closed its stdin (EPIPE) or exited: stop feeding it
            written = len(self.stdin)
        self.stdin = self.stdin[written:]
        if not self.stdin:
            self._close_stdin()

    # -- state -----------------------------------------------------------------------------

    @property
    def exited(self) -> bool:
        if self.exit_watched and not self.exit_signalled:
            return False  # the pidfd fires when it exits: no waitpid needed until then
        return self.proc.poll() is not None

    @property
    def pipes_closed(self) -> bool:
        return all(c.eof for c in self.captures)

    def _close_capture(self, capture: _Capture) -> None:
        if not capture.eof:
            capture.eof = True
            self.loop.remove_reader(capture.fd)
            capture.pipe.close()

    def _close_stdin(self) -> None:
        pipe = self.proc.stdin
        if pipe is not None and not pipe.closed:
            self.loop.remove_writer(pipe.fileno())
            with contextlib.suppress(OSError):
                pipe.close()

    def close(self) -> None:
        """Release every descriptor and loop callback (idempotent)."""
        for capture in self.captures:
            self._close_capture(capture)
        self._close_stdin()
        if self.pidfd is not None:
            self.loop.remove_reader(self.pidfd)  # no-op if already removed
            os.close(self.pidfd)
            self.pidfd = None

    def kill_group(self, sig: signal.Signals) -> None:
        # The process was started in a new session: its pid is its process group id.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    # -- waiting ---------------------------------------------------------------------------

    async def until(self, done: Callable[[], bool], deadline: float) -> bool:
        """Stream output until `done()` or `deadline`; True if `done()` became true."""
        while True:
            await self.flush(force=False)
            if done():
                return True
            now = time.monotonic()
            if now >= deadline:
                return False
            wake = min(deadline, self.last_event + self.limits.progress_interval)
            if any(c.pending for c in self.captures):
                wake = min(wake, self.last_flush + self.limits.flush_interval)
            if not self.exit_watched and not self.exited:
                wake = min(wake, now + _POLL_EXIT)
            self.changed.clear()
            # asyncio.timeout rather than wait_for: no Task per wait (a few µs per command).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, wake - now)):
                    await self.changed.wait()

    async def flush(self, force: bool) -> None:
        """Send pending output as Output events (when due), or a Progress event after silence."""
        now = time.monotonic()
        due = force or now >= self.last_flush + self.limits.flush_interval
        for capture in self.captures:
            while capture.pending and (due or len(capture.pending) >= self.limits.chunk_size):
                data = bytes(capture.pending[: self.limits.chunk_size])
                del capture.pending[: self.limits.chunk_size]
                self.last_flush = self.last_event = now
                if self.emit is not None:
                    await self.emit(Output(stream=capture.name, data=data))
        if now >= self.last_event + self.limits.progress_interval:
            self.last_event = now
            if self.emit is not None:
                await self.emit(Progress(elapsed_ms=round((now - self.started) * 1000, 1)))


_DEVNULL: int | None = None


def _devnull() -> int:
    """A descriptor of /dev/null for commands' stdin, opened once per process (never
    inherited: it is dup2()ed onto the child's 0). subprocess.DEVNULL would open and close
    /dev/null for every command."""
    global _DEVNULL
    if _DEVNULL is None:
        _DEVNULL = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    return _DEVNULL


class _Child(Protocol):
    """What a run needs of its child process: `subprocess.Popen` or `_Spawned`."""

    pid: int
    stdin: IO[bytes] | None
    stdout: IO[bytes] | None
    stderr: IO[bytes] | None

    def poll(self) -> int | None: ...


class _Spawned:
    """A child started by `_posix_spawn`: its pid, its pipes, and `poll` as Popen's (the exit
    status once reaped, negative for a signal)."""

    def __init__(self, pid: int, stdin: int | None, stdout: int, stderr: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self.stdin: IO[bytes] | None = None if stdin is None else io.FileIO(stdin, "wb")
        self.stdout: IO[bytes] | None = io.FileIO(stdout, "rb")
        self.stderr: IO[bytes] | None = io.FileIO(stderr, "rb")

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                # Reaped by someone else (SIGCHLD ignored): the status is lost. 0, as Popen.
                self.returncode = 0
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode


_UNREAPED: set[_Spawned] = set()
"""Children a run ended without reaping (one that did not die yet after SIGKILL: uninterruptible
sleep). subprocess keeps such Popen objects and reaps them when the next one starts;
`_reap_leftovers` does the same for ours."""


def _reap_leftovers() -> None:
    for child in list(_UNREAPED):
        if child.returncode is not None or child.poll() is not None:
            _UNREAPED.discard(child)


# Python ignores SIGPIPE (and SIGXFSZ); subprocess restores their defaults in the child
# (restore_signals=True), so a command killed by a closed pipe dies as it would from a shell.
_DEFAULT_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ)


def _executable_candidates(name: str, env: Mapping[str, str]) -> list[str]:
    """Where `name` is looked for: itself if it has a directory part, else each directory of
    the command's own PATH (as subprocess does, `os.get_exec_path(env)`)."""
    if os.path.dirname(name):
        return [name]
    return [os.path.join(directory, name) for directory in os.get_exec_path(env)]


def _posix_spawn(argv: list[str], env: Mapping[str, str], stdin: bool) -> _Spawned | None:
    """Start `argv` as `subprocess.Popen(argv, stdin=PIPE or /dev/null, stdout=PIPE,
    stderr=PIPE, start_new_session=True, close_fds=True, env=env)` would, with os.posix_spawn:
    no Popen object and no error pipe, about half Popen's CPU in this process (A/B figures in
    the commit that brought it). Raises OSError as Popen does (the first error other than "not
    found" along the search path, else "not found"). None if a pipe got descriptor 0, 1 or 2
    (this process runs with a standard stream closed): then Popen, which handles that, must.

    close_fds: every descriptor Python or libzmq opens is close-on-exec (PEP 446), and the
    first call makes those this process inherited close-on-exec too (`_no_inheritable_fds`),
    so the command gets only 0, 1 and 2, as with close_fds=True.
    """
    global _INHERITED_CLEARED
    if not _INHERITED_CLEARED:
        _no_inheritable_fds()
        _INHERITED_CLEARED = True
    _reap_leftovers()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    in_r, in_w = os.pipe() if stdin else (_devnull(), None)
    parent_ends = [out_r, err_r] if in_w is None else [out_r, err_r, in_w]
    child_ends = [out_w, err_w] if in_w is None else [out_w, err_w, in_r]
    if min(parent_ends + child_ends) < 3:
        for fd in parent_ends + child_ends:
            os.close(fd)
        return None
    actions = [
        (os.POSIX_SPAWN_DUP2, in_r, 0),
        (os.POSIX_SPAWN_DUP2, out_w, 1),
        (os.POSIX_SPAWN_DUP2, err_w, 2),
    ]
    error: OSError | None = None
    try:
        if env.get("PATH") == os.environ.get("PATH") and not os.path.dirname(argv[0]):
            # The command's PATH is ours: the C library's search (in the child, one execve
            # per directory, as subprocess does) finds what `_executable_candidates` would.
            pid = os.posix_spawnp(
                argv[0], argv, env, file_actions=actions, setsid=True, setsigdef=_DEFAULT_SIGNALS
            )
            return _Spawned(pid, in_w, out_r, err_r)
        for path in _executable_candidates(argv[0], env):
            try:
                os.stat(path)  # a miss costs a stat here, not a whole spawn
                pid = os.posix_spawn(
                    path, argv, env, file_actions=actions, setsid=True, setsigdef=_DEFAULT_SIGNALS
                )
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as exc:  # e.g. permission denied: remembered, the search goes on
                error = error or exc
                continue
            return _Spawned(pid, in_w, out_r, err_r)
        if error is None:
            error = FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))
        error.filename = argv[0]
        raise error
    except BaseException:
        for fd in parent_ends:
            os.close(fd)
        raise
    finally:
        for fd in child_ends:
            os.close(fd)


_INHERITED_CLEARED = False


def _no_inheritable_fds() -> None:
    """Make every descriptor above 2 of this process close-on-exec (those it inherited from
    whoever started it; nothing it opens itself is inheritable)."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2:
            with contextlib.suppress(OSError):  # the listing's own descriptor, now closed
                if os.get_inheritable(fd):
                    os.set_inheritable(fd, False)


def _start(
    argv: list[str],
    env: Mapping[str, str],
    cwd: str | None,
    stdin: bool,
    popen_kwargs: Mapping[str, Any] | None,
) -> _Child:
    """Start the command in a new session with its output on pipes (OSError, ValueError or
    TypeError if it cannot start). os.posix_spawn where it can do what is asked: it has no
    working directory, user switch or pre-exec step; subprocess.Popen otherwise."""
    if cwd is None and not popen_kwargs:
        child = _posix_spawn(argv, env, stdin)
        if child is not None:
            return child
    return subprocess.Popen(
        argv,
        stdin=subprocess.PIPE if stdin else _devnull(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        bufsize=0,  # the pipes are used through their descriptors only
        cwd=cwd,
        env=dict(env),
        start_new_session=True,
        close_fds=True,
        **(popen_kwargs or {}),
    )


def _start_error(exc: OSError, argv: list[str], cwd: str | None) -> str:
    about_cwd = cwd is not None and exc.filename == cwd
    if isinstance(exc, FileNotFoundError):
        return f"working directory not found: {cwd}" if about_cwd else f"not found: {argv[0]}"
    if isinstance(exc, PermissionError):
        return (
            f"permission denied: working directory {cwd}"
            if about_cwd
            else f"permission denied: {argv[0]}"
        )
    if isinstance(exc, NotADirectoryError) and about_cwd:
        return f"not a directory: {cwd}"
    return f"cannot start {argv[0]}: {exc.strerror or exc}"


async def run_process(
    argv: list[str],
    *,
    env: Mapping[str, str],
    run_limit: float,
    limits: Limits,
    cwd: str | None = None,
    stdin: bytes | None = None,
    emit: Emit | None = None,
    popen_kwargs: Mapping[str, Any] | None = None,
    control: RunControl | None = None,
    tracker: GroupTracker | None = None,
) -> CommandResult:
    """Run `argv` (no shell involved) for at most `run_limit` seconds and return how it ended:
    status ok, failed, timeout, error or cancelled; `exit_code` or `signal` once the process
    has ended. Never raises for anything the command does; cancellation kills the process
    group and re-raises. `popen_kwargs` are extra `subprocess.Popen` arguments (the worker's
    user switch and resource limits, `services.policy.ChildLimits.popen_kwargs`). `control`
    lets a caller cancel the run; `tracker` is told of the process group (see the module
    docstring)."""
    started = time.monotonic()
    control = control or RunControl()
    if control.cancelled:
        return CommandResult(
            status="cancelled", duration_ms=0.0, message="cancelled before it started; nothing ran"
        )
    try:
        proc = _start(argv, env, cwd, bool(stdin), popen_kwargs)
    except OSError as exc:
        return CommandResult(
            status="error", duration_ms=_ms(started), message=_start_error(exc, argv, cwd)
        )
    except (ValueError, TypeError) as exc:  # e.g. an embedded NUL the models did not catch
        return CommandResult(
            status="error", duration_ms=_ms(started), message=f"cannot start: {exc}"
        )

    if tracker is not None:
        tracker.add(proc.pid)  # its own session: the pid is the process group id
    run = _Run(proc, stdin, limits, emit)
    control._wake = run.changed
    message: str | None = None
    cancelled = False
    try:
        deadline = run.started + run_limit
        timed_out = not await run.until(lambda: run.exited or control.cancelled, deadline)
        cancelled = control.cancelled and not run.exited
        timed_out = timed_out and not cancelled
        finished = lambda: run.exited and run.pipes_closed  # noqa: E731
        if timed_out or cancelled:
            run.kill_group(signal.SIGTERM)
            await run.until(finished, time.monotonic() + limits.kill_grace)
            run.kill_group(signal.SIGKILL)
            await run.until(finished, time.monotonic() + limits.drain_time)
            message = (
                "cancelled; the process group was killed"
                if cancelled
                else f"timed out after {run_limit:g}s; the process group was killed"
            )
        elif not await run.until(lambda: run.pipes_closed, time.monotonic() + limits.drain_time):
            run.kill_group(signal.SIGKILL)
            await run.until(lambda: run.pipes_closed, time.monotonic() + limits.drain_time)
            message = (
                "processes left in the background kept the output open after the command "
                "exited; they were killed"
            )
        await run.flush(force=True)
    except BaseException:  # cancelled (worker shutdown): take the whole group down with us
        run.kill_group(signal.SIGKILL)
        raise
    finally:
        control._wake = None
        run.close()
        if proc.poll() is None:
            if isinstance(proc, _Spawned):
                _UNREAPED.add(proc)  # reaped when a later command starts
        elif tracker is not None:
            tracker.remove(proc.pid)  # reaped; one that is not stays watched
    stdout, stderr = (bytes(c.kept) for c in run.captures)
    truncated = any(c.truncated for c in run.captures)
    returncode = proc.poll()
    if returncode is None:  # still not dead after SIGKILL (uninterruptible sleep)
        message = f"{message or 'killed'} (the process did not die yet; it is reaped later)"
    exit_code = returncode if returncode is not None and returncode >= 0 else None
    sig = -returncode if returncode is not None and returncode < 0 else None
    if cancelled:
        status: WorkerStatus = "cancelled"
    elif timed_out:
        status = "timeout"
    else:
        status = "ok" if returncode == 0 else "failed"
    return CommandResult(
        status=status,
        exit_code=exit_code,
        signal=sig,
        stdout=stdout,
        stderr=stderr,
        truncated=truncated,
        duration_ms=_ms(started),
        message=message,
    )


def _ms(since: float) -> float:
    return round((time.monotonic() - since) * 1000, 1)
