"""How results are shown: for humans (rich), as one JSON document, or as JSON lines.

Human output goes to stdout, progress and diagnostics to stderr. Colour follows rich: none when
the stream is not a terminal or when NO_COLOR is set. Command output is decoded for display with
replacement characters and control characters shown escaped (a remote command cannot drive the
terminal); the JSON forms keep every byte (see `clients.results.json_bytes`).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from clients.results import STATUS_ORDER, CommandOutcome, hosts_summary, summary
from clients.runner import Events
from services.bodies import CommandSpec, WorkerInfo

__all__ = [
    "HumanReport",
    "JsonLinesReport",
    "JsonReport",
    "QuietConsole",
    "Report",
    "printable",
    "write_stdout",
]

STATUS_STYLE = {
    "ok": "bold green",
    "failed": "bold red",
    "timeout": "bold yellow",
    "error": "bold magenta",
    "invalid": "bold magenta",
    "rejected": "bold magenta",
    "cancelled": "bold magenta",
    "expired": "bold red reverse",
    "lost": "bold red reverse",
}
PREFIX_WIDTH = 40
HEADER_WIDTH = 120
"""Longest command line shown in a result header; --json keeps the whole command."""
# C0 and C1 control characters except tab, shown escaped.
_CONTROL = {c: f"\\x{c:02x}" for c in [*range(0x20), *range(0x7F, 0xA0)] if c != 0x09}


def printable(data: bytes) -> str:
    """Bytes as display text: invalid UTF-8 replaced, control characters escaped (keeps \\n)."""
    lines = data.decode("utf-8", errors="replace").split("\n")
    return "\n".join(line.removesuffix("\r").translate(_CONTROL) for line in lines)


def _stdout_gone() -> None:
    """stdout's reader went away (`| head`): discard the rest of our output, keep running so
    the commands already sent finish and the exit code still tells how they went."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)


def write_stdout(text: str) -> None:
    """Write and flush `text` on stdout; a closed pipe silences further output."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        _stdout_gone()


class QuietConsole(Console):
    """A rich Console that goes quiet when its pipe closes instead of raising SystemExit."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        if not self.stderr:
            _stdout_gone()


class Report(Events):
    """An `Events` sink that also closes the run (prints what is left, given every outcome)."""

    def __enter__(self) -> Report:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def close(self, outcomes: list[CommandOutcome], elapsed_s: float) -> None:
        """The run is over."""


class JsonReport(Report):
    """`--json`: one document {"results": [...in file order], "summary": {...}} at the end."""

    def close(self, outcomes: list[CommandOutcome], elapsed_s: float) -> None:
        document = {
            "results": [outcome.to_json() for outcome in outcomes],
            "summary": summary(outcomes, elapsed_s),
        }
        write_stdout(json.dumps(document, indent=2) + "\n")


class JsonLinesReport(Report):
    """`--jsonl`: one object per command, written as soon as it finishes."""

    def finished(self, outcome: CommandOutcome) -> None:
        write_stdout(json.dumps(outcome.to_json()) + "\n")


class HumanReport(Report):
    """Per command: status, exit code, duration, worker, then its output; a summary for lists.

    With `stream`, output lines are shown live, prefixed by `[index] command` when the file
    holds several commands. With `progress`, a progress bar runs on stderr (lists only).
    """

    def __init__(
        self,
        specs: Sequence[CommandSpec],
        *,
        stream: bool = False,
        progress: bool = False,
        out: Console | None = None,
        err: Console | None = None,
    ) -> None:
        self.specs = specs
        self.stream = stream
        self.several = len(specs) > 1
        self.out = out or QuietConsole(highlight=False)
        self.err = err or QuietConsole(stderr=True, highlight=False)
        self._partial_lines: dict[tuple[int, str], bytes] = {}
        self._progress: Progress | None = None
        self._task: Any = None
        if progress and self.several:
            self._progress = Progress(
                TextColumn("[progress.description]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=self.err,
                transient=True,
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self._task = self._progress.add_task("commands", total=len(specs))
        # While the bar is live, anything printed to the same terminal must go through the
        # bar's console, or the two would overwrite each other.
        self._screen = self.err if self._progress and _same_terminal() else self.out

    def __enter__(self) -> HumanReport:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
            self._screen = self.out

    # --------------------------------------------------------------------------------------

    def output(self, index: int, stream: str, data: bytes) -> None:
        key = (index, stream)
        pending = self._partial_lines.pop(key, b"") + data
        *lines, rest = pending.split(b"\n")
        if rest:
            self._partial_lines[key] = rest
        for line in lines:
            self._live_line(index, stream, line)

    def retrying(self, index: int, attempt: int) -> None:
        if self.stream:
            self._print(Text(f"{self._prefix(index)}re-sent (attempt {attempt})", style="dim"))

    def finished(self, outcome: CommandOutcome) -> None:
        for stream in ("stdout", "stderr"):
            rest = self._partial_lines.pop((outcome.index, stream), b"")
            if rest:
                self._live_line(outcome.index, stream, rest)
        self._print(self._header(outcome))
        if not outcome.streamed:
            self._print_output(outcome.stdout, "out│ ", "")
            self._print_output(outcome.stderr, "err│ ", "red")
        if outcome.truncated:
            self._print(Text("  (output truncated at the worker's limit)", style="yellow"))
        if outcome.message:
            message = printable(outcome.message.encode())
            self._print(Text(f"  {message}", style="dim" if outcome.status == "ok" else ""))
        for error in outcome.errors or []:
            where, what = str(error.get("loc", "")), str(error.get("msg", ""))
            self._print(Text(f"  {printable(where.encode())}: {printable(what.encode())}"))
        if self._progress is not None:
            self._progress.advance(self._task)

    def close(self, outcomes: list[CommandOutcome], elapsed_s: float) -> None:
        if not self.several and hosts_summary(outcomes) is None:
            return
        counts = summary(outcomes, elapsed_s)["by_status"]
        line = Text(f"{len(outcomes)} commands in {_duration(elapsed_s * 1000)}: ")
        for i, status in enumerate(s for s in STATUS_ORDER if s in counts):
            if i:
                line.append(", ")
            line.append(f"{counts[status]} {status}", style=STATUS_STYLE[status])
        self.out.print(line, soft_wrap=True)
        hosts = hosts_summary(outcomes)
        if hosts is not None:
            # --host/--all: one line per category naming its hosts, then the count line.
            for category, names in hosts.items():
                if names:
                    style = "bold green" if category == "ok" else "bold red"
                    self.out.print(Text(f"{category:<11} ", style=style) + Text(" ".join(names)))
            total = sum(len(names) for names in hosts.values())
            parts = [f"{len(names)} {category}" for category, names in hosts.items() if names]
            self.out.print(Text(f"{total} hosts: {', '.join(parts)}"), soft_wrap=True)

    # --------------------------------------------------------------------------------------

    def _print(self, text: Text) -> None:
        self._screen.print(text, soft_wrap=True)

    def _prefix(self, index: int) -> str:
        if not self.several:
            return ""
        shown = printable(self.specs[index].display().encode())
        if len(shown) > PREFIX_WIDTH:
            shown = shown[: PREFIX_WIDTH - 1] + "…"
        return f"[{index}] {shown} │ "

    def _live_line(self, index: int, stream: str, line: bytes) -> None:
        text = Text()
        text.append(self._prefix(index), style="dim")
        text.append(printable(line), style="red" if stream == "stderr" else "")
        self._print(text)

    def _header(self, outcome: CommandOutcome) -> Text:
        text = Text()
        text.append(f"{outcome.status:<8}", style=STATUS_STYLE.get(outcome.status, "bold"))
        text.append(f" [{outcome.index}] " if self.several else " ")
        text.append(shorten(printable(outcome.spec.display().encode()), HEADER_WIDTH), style="bold")
        details = []
        if outcome.exit_code is not None:
            details.append(f"exit {outcome.exit_code}")
        if outcome.signal is not None:
            details.append(f"signal {outcome.signal}")
        ms = outcome.duration_ms if outcome.duration_ms is not None else outcome.elapsed_ms
        details.append(_duration(ms))
        if outcome.worker is not None:
            details.append(f"worker {_worker(outcome.worker)}")
        if outcome.attempts > 1:
            details.append(f"{outcome.attempts} attempts")
        text.append(f"  ({', '.join(details)})", style="dim")
        if len(outcome.workers) > 1:
            # Only --retry-started allows this: say it plainly, it is not a plain "ok".
            names = ", ".join(_worker(worker) for worker in outcome.workers)
            text.append(f"  RAN {len(outcome.workers)} TIMES, on {names}", style="bold yellow")
        return text

    def _print_output(self, data: bytes, label: str, style: str) -> None:
        if not data:
            return
        for line in printable(data.removesuffix(b"\n")).split("\n"):
            text = Text()
            text.append(f"  {label}", style="dim")
            text.append(line, style=style)
            self._print(text)


def shorten(text: str, width: int) -> str:
    """`text` cut to `width` characters, saying how much was left out."""
    if len(text) <= width:
        return text
    cut = width - 20
    return f"{text[:cut]}… (+{len(text) - cut:,} chars)"


def _duration(ms: float) -> str:
    return f"{ms:.0f} ms" if ms < 1000 else f"{ms / 1000:.2f} s"


def _worker(worker: WorkerInfo) -> str:
    if worker.name and worker.name != worker.host:
        return f"{worker.name} ({worker.host}/{worker.pid})"
    return f"{worker.host}/{worker.pid}"


def _same_terminal() -> bool:
    """True when stdout and stderr are the same terminal device."""
    try:
        out, err = os.fstat(sys.stdout.fileno()), os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (out.st_dev, out.st_ino, out.st_rdev) == (err.st_dev, err.st_ino, err.st_rdev)
