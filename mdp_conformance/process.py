"""Peers the suite starts itself: command templates, free endpoints, logs, stopping by PID.

A command template is split like a shell would (`shlex`), then each `{placeholder}` is
replaced in every word. A word that is exactly `{body}` expands to several words (one per body
frame), so a client can be handed a multi-frame body. Every peer runs in its own session with
stdout and stderr in a temporary log file, so its last lines can be shown when it crashes, and
is stopped by its own PID (SIGTERM, then SIGKILL to its process group).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path


class StartError(RuntimeError):
    """The peer could not be started (bad command, exited at once, never listened)."""


def free_endpoint() -> str:
    """A loopback tcp endpoint no one listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{sock.getsockname()[1]}"


def placeholders(template: str) -> set[str]:
    """The `{name}` placeholders a template uses."""
    found: set[str] = set()
    for word in shlex.split(template):
        start = word.find("{")
        while start != -1:
            end = word.find("}", start)
            if end == -1:
                break
            found.add(word[start + 1 : end])
            start = word.find("{", end)
    return found


def expand(
    template: str, values: Mapping[str, str], lists: Mapping[str, Sequence[str]] | None = None
) -> list[str]:
    """argv from a template: `{name}` replaced by `values[name]` in every word; a word that
    is exactly `{name}` for a name in `lists` becomes that many words."""
    argv: list[str] = []
    for word in shlex.split(template):
        key = word[1:-1] if word.startswith("{") and word.endswith("}") else None
        if lists and key is not None and key in lists:
            argv.extend(lists[key])
            continue
        for name, value in values.items():
            word = word.replace("{" + name + "}", value)
        argv.append(word)
    return _resolve(argv)


def _resolve(argv: list[str]) -> list[str]:
    """Find a bare program name on PATH or next to this interpreter (an unactivated venv)."""
    if argv and os.sep not in argv[0] and shutil.which(argv[0]) is None:
        beside = Path(sys.executable).parent / argv[0]
        if beside.exists():
            return [str(beside), *argv[1:]]
    return argv


class Started:
    """A process the suite started, with its output in a log file."""

    def __init__(self, argv: list[str], label: str, separate_stdout: bool = False) -> None:
        """`separate_stdout`: keep stdout apart from the log (stderr), for `stdout()`."""
        self.argv = argv
        self.label = label
        self._log = tempfile.NamedTemporaryFile(prefix=f"mdp-conformance-{label}-", suffix=".log")  # noqa: SIM115
        self._out = tempfile.TemporaryFile() if separate_stdout else None  # noqa: SIM115
        try:
            self.popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=self._out if self._out is not None else self._log,
                stderr=self._log if self._out is not None else subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            self._log.close()
            raise StartError(f"cannot start {shlex.join(argv)}: {exc}") from None
        self.stopping = False

    def alive(self) -> bool:
        return self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def log_text(self) -> str:
        with contextlib.suppress(ValueError):
            self._log.flush()
        try:
            return Path(self._log.name).read_bytes().decode(errors="replace")
        except OSError:
            return ""

    def stdout(self) -> bytes:
        """What the process wrote on stdout (with `separate_stdout`)."""
        if self._out is None:
            return b""
        self._out.seek(0)
        return self._out.read()

    def log_tail(self, lines: int = 12) -> str:
        tail = self.log_text().rstrip().splitlines()[-lines:]
        return "\n".join(tail) if tail else "(no output)"

    def died(self) -> str:
        """'exited with code N' / 'killed by SIGX' and the last log lines."""
        code = self.popen.poll()
        how = f"killed by {signal.Signals(-code).name}" if code and code < 0 else f"exit {code}"
        return f"the {self.label} died ({how}); its last output:\n{self.log_tail()}"

    def wait_exit(self, timeout: float) -> int | None:
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = 3.0) -> None:
        self.stopping = True
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            if self.wait_exit(timeout) is None:
                # Started in its own session, so its PID is its process group's id.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout=5)
        with contextlib.suppress(ValueError):
            self._log.close()
            if self._out is not None:
                self._out.close()

    def wait_listening(self, endpoint: str, timeout: float = 15.0) -> None:
        """Until the peer accepts tcp connections on `endpoint` (ipc/inproc: just alive)."""
        if not endpoint.startswith("tcp://"):
            return
        host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive():
                raise StartError(f"{shlex.join(self.argv)} exited at start.\n{self.died()}")
            try:
                with socket.create_connection((host, int(port)), timeout=0.2):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise StartError(
                        f"{shlex.join(self.argv)} did not listen on {endpoint} within "
                        f"{timeout:.0f}s"
                    ) from None
                # An external process binding: there is no socket of ours to poll yet.
                time.sleep(0.02)
