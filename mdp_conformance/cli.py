"""mdp-conformance: check an MDP broker, worker or client against RFC 7, RFC 18 and RFC 8."""

from __future__ import annotations

import fnmatch
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape

from mdp_conformance import __version__, report
from mdp_conformance.process import StartError
from mdp_conformance.rules import BOTH, VERSIONS, Case, cases_of
from mdp_conformance.runner import Outcome, Subject, run

EXIT_PASS = 0
EXIT_FAIL = 1
EXIT_USAGE = 2
EXIT_NO_PEER = 3

EPILOG = """\b
Exit codes:
  0  every required (MUST) rule passed (SHOULD/MAY/EXT results never change this)
  1  at least one MUST rule failed
  2  usage error
  3  the broker could not be started at all (a worker or client that cannot
     start fails each case instead, with its output)

See docs/conformance.md for every rule and its RFC clause."""


def _versions(value: str) -> tuple[str, ...]:
    return VERSIONS if value == "both" else (value,)


def common(func: Callable[..., Any]) -> Callable[..., Any]:
    """Options every target shares."""
    options = [
        click.option(
            "--mdp-version",
            type=click.Choice(["0.1", "0.2", "both"]),
            default="both",
            show_default=True,
            help="Protocol version(s) to check (a rule that needs both is skipped with one).",
        ),
        click.option(
            "--rule",
            "patterns",
            multiple=True,
            metavar="GLOB",
            help="Only cases whose id matches (fnmatch, e.g. 'heartbeat*' or '*[0.2]'). "
            "Repeatable.",
        ),
        click.option("--list", "list_only", is_flag=True, help="List the cases and exit."),
        click.option(
            "--junit-xml",
            type=click.Path(dir_okay=False, path_type=Path),
            help="Also write the results as JUnit XML (one testcase per case).",
        ),
        click.option(
            "--json",
            "json_path",
            type=click.Path(dir_okay=False, path_type=Path),
            help="Also write the results as JSON ('-': to stdout, instead of the table).",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def select(target: str, versions: Sequence[str], patterns: Sequence[str]) -> list[Case]:
    """The cases of the chosen versions (a rule needing both versions stays, and is skipped
    with its reason when only one is chosen) whose id or rule name matches a pattern."""
    cases = [c for c in cases_of(target) if c.version in versions or c.version == BOTH]
    if not patterns:
        return cases

    def matches(case: Case) -> bool:
        return any(
            fnmatch.fnmatchcase(case.id, p) or fnmatch.fnmatchcase(case.rule.name, p)
            for p in patterns
        )

    return [c for c in cases if matches(c)]


def execute(
    target: str,
    versions: Sequence[str],
    make_subject: Callable[[], Subject],
    describe: Callable[[Subject], str],
    patterns: Sequence[str],
    list_only: bool,
    junit_xml: Path | None,
    json_path: Path | None,
) -> None:
    """Run the selected cases of `target` and exit with the verdict."""
    cases = select(target, versions, patterns)
    if not cases:
        raise click.UsageError(f"no {target} rule matches {' '.join(patterns)}")
    to_stderr = json_path == Path("-")
    # Piped into a file or CI log: wide enough that the table's rows stay on one line.
    tty = (sys.stderr if to_stderr else sys.stdout).isatty()
    out = Console(stderr=to_stderr, width=None if tty else 160)
    if list_only:
        for case in cases:
            out.print(f"{escape(case.id)}  [dim]{case.rule.level}  {case.rule.clause}[/dim]")
        sys.exit(EXIT_PASS)
    progress = Console(stderr=True)
    try:
        subject = make_subject()
    except StartError as exc:
        progress.print(f"[bold red]mdp-conformance {target}:[/] {escape(str(exc))}")
        sys.exit(EXIT_NO_PEER)
    progress.print(
        f"[dim]mdp-conformance {target}: {len(cases)} cases against {escape(describe(subject))}"
    )

    def show(outcome: Outcome) -> None:
        style = report.STYLES[outcome.status]
        progress.print(
            f"  [{style}]{outcome.status:5}[/] {escape(outcome.case.id)} "
            f"[dim]({outcome.seconds:.2f}s)[/]",
            highlight=False,
        )

    try:
        outcomes = run(subject, cases, show)
        name = describe(subject)
    finally:
        subject.close()
    if json_path == Path("-"):
        click.echo(json.dumps(report.to_json(target, name, outcomes), indent=2))
    else:
        report.render(out, target, name, outcomes)
        if json_path is not None:
            report.write_json(json_path, target, name, outcomes)
    if junit_xml is not None:
        report.write_junit(junit_xml, target, name, outcomes)
    sys.exit(EXIT_PASS if report.verdict(outcomes) else EXIT_FAIL)


@click.group(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog=EPILOG,
)
@click.version_option(__version__, "-V", "--version", prog_name="mdp-conformance")
def main() -> None:
    """Check a Majordomo (MDP) broker, worker or client against RFC 7 (MDP/0.1), RFC 18
    (MDP/0.2) and RFC 8 (MMI), frame by frame.

    Each subcommand plays the other side of the protocol on raw ZeroMQ sockets and prints
    one row per rule: its RFC clause, pass/fail/skip, and the first difference it saw. A peer
    the suite starts is restarted when it crashes, and the rule that crashed it fails with its
    last output; every other rule is judged on its own.

    \b
    Examples:
      mdp-conformance broker --cmd "mdp-broker --bind {endpoint} --insecure"
      mdp-conformance broker --endpoint tcp://127.0.0.1:5555 --heartbeat-ms 2500
      mdp-conformance worker --cmd "mdp-worker --broker {endpoint} --service {service}
          --heartbeat-ms {heartbeat_ms} --liveness {liveness} --mdp-version {mdp_version}"
      mdp-conformance client --cmd "my-client {endpoint} {service} {body}" --mdp-version 0.2
    """


@main.command(epilog=EPILOG)
@click.option(
    "--cmd",
    metavar="CMD",
    help="Start the broker with this command. {endpoint} becomes a free tcp://127.0.0.1:PORT "
    "it must bind; {heartbeat_ms}, {liveness} and {request_ttl}, if present, become the "
    "suite's short timings (100 ms, 3, 1 s).",
)
@click.option("--endpoint", metavar="ENDPOINT", help="Check a broker that is already running.")
@click.option(
    "--heartbeat-ms",
    type=click.IntRange(min=1),
    help="The broker's heartbeat interval. Default: 100 if --cmd has {heartbeat_ms}, "
    "otherwise 2500 (the zguide's).",
)
@click.option(
    "--liveness",
    type=click.IntRange(min=1),
    help="Heartbeats a worker may miss before the broker expires it. Default: 3.",
)
@click.option(
    "--request-ttl",
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds the broker keeps a queued request. Default: 1 if --cmd has {request_ttl}; "
    "otherwise unknown, and the expiry rule is skipped.",
)
@click.option(
    "--quiet-ms",
    type=click.IntRange(min=1),
    help="Window in which 'nothing arrives' is checked (default: 3 heartbeats, 300-1000 ms).",
)
@common
def broker(
    cmd: str | None,
    endpoint: str | None,
    heartbeat_ms: int | None,
    liveness: int | None,
    request_ttl: float | None,
    quiet_ms: int | None,
    mdp_version: str,
    patterns: tuple[str, ...],
    list_only: bool,
    junit_xml: Path | None,
    json_path: Path | None,
) -> None:
    """Check a broker: the suite plays clients and workers.

    Give --cmd (the suite starts the broker, and restarts it after a crash) or --endpoint
    (a broker someone else runs; a crash then spoils the remaining rules).
    """
    from mdp_conformance.broker import BrokerSettings, BrokerSubject

    if not list_only and (cmd is None) == (endpoint is None):
        raise click.UsageError("give --cmd or --endpoint (exactly one)")
    if cmd is not None and "{endpoint}" not in cmd:
        raise click.UsageError("--cmd must contain {endpoint}: the address the broker binds")
    settings = BrokerSettings(
        cmd, endpoint, _versions(mdp_version), heartbeat_ms, liveness, request_ttl, quiet_ms
    )

    def describe(subject: Subject) -> str:
        assert isinstance(subject, BrokerSubject)
        return subject.command_line

    execute(
        "broker",
        _versions(mdp_version),
        lambda: BrokerSubject(settings),
        describe,
        patterns,
        list_only,
        junit_xml,
        json_path,
    )


@main.command(epilog=EPILOG)
@click.option(
    "--cmd",
    metavar="CMD",
    help="Start the worker with this command, afresh for every case. Placeholders: "
    "{endpoint} (the suite's broker, to connect to), {service}, {heartbeat_ms}, {liveness}, "
    "{mdp_version} (0.1 or 0.2: the version the case checks).",
)
@click.option(
    "--service",
    default="echo",
    show_default=True,
    help="The service the worker registers; it must echo request bodies (docs/conformance.md).",
)
@click.option(
    "--heartbeat-ms",
    type=click.IntRange(min=1),
    help="The worker's heartbeat interval: passed as {heartbeat_ms}, or what the worker uses "
    "when --cmd has no {heartbeat_ms}. Default: 100.",
)
@click.option(
    "--liveness",
    type=click.IntRange(min=1),
    help="Heartbeats the worker may miss from the broker before it reconnects. Default: 3.",
)
@common
def worker(
    cmd: str | None,
    service: str,
    heartbeat_ms: int | None,
    liveness: int | None,
    mdp_version: str,
    patterns: tuple[str, ...],
    list_only: bool,
    junit_xml: Path | None,
    json_path: Path | None,
) -> None:
    """Check a worker: the suite plays its broker.

    The worker is started for every case and must serve SERVICE as an echo: the FINAL body is
    the request body. A request whose body is "MDP-CONFORMANCE-SLEEP" and a number of
    milliseconds must be answered only after that long (the busy-heartbeat rule needs it; a
    worker that answers at once gets that rule skipped).

    Without {mdp_version} in --cmd, say with --mdp-version which version the worker speaks.
    """
    from mdp_conformance.worker import WorkerSettings, WorkerSubject

    if list_only:
        cmd = cmd or ""
    elif cmd is None:
        raise click.UsageError("--cmd is required: the command that starts the worker")
    elif "{endpoint}" not in cmd:
        raise click.UsageError("--cmd must contain {endpoint}: the address the worker connects to")
    if "{mdp_version}" not in cmd and mdp_version == "both" and not list_only:
        raise click.UsageError(
            "--cmd has no {mdp_version}: give --mdp-version 0.1 or 0.2, the version it speaks"
        )
    if "{heartbeat_ms}" not in cmd and heartbeat_ms is None and not list_only:
        raise click.UsageError(
            "--cmd has no {heartbeat_ms}: give --heartbeat-ms, the interval the worker uses"
        )
    settings = WorkerSettings(cmd, _versions(mdp_version), service, heartbeat_ms, liveness)

    def describe(subject: Subject) -> str:
        return cmd

    execute(
        "worker",
        _versions(mdp_version),
        lambda: WorkerSubject(settings),
        describe,
        patterns,
        list_only,
        junit_xml,
        json_path,
    )


@main.command(epilog=EPILOG)
@click.option(
    "--cmd",
    metavar="CMD",
    help="Run the client with this command (once or more per case). Placeholders: "
    "{endpoint} (the suite's broker), {service}, {body} (a word of its own: becomes one "
    "argument per body frame), {mdp_version}, {timeout_ms} (the --retry-after-ms value).",
)
@click.option(
    "--service",
    default="conformance.echo",
    show_default=True,
    help="The service the client is asked to call.",
)
@click.option(
    "--retry-after-ms",
    type=click.IntRange(min=1),
    help="The client re-sends a request that got no answer for this long: checks that it does "
    "(otherwise that rule is skipped).",
)
@common
def client(
    cmd: str | None,
    service: str,
    retry_after_ms: int | None,
    mdp_version: str,
    patterns: tuple[str, ...],
    list_only: bool,
    junit_xml: Path | None,
    json_path: Path | None,
) -> None:
    """Check a client: the suite plays the broker and the worker behind it.

    The client is a one-shot program: it sends ONE request to SERVICE whose body frames are
    the arguments {body} expands to, prints each frame of the answer (the FINAL body) on a
    line of its own, and exits 0. MMI queries (mmi.service) are answered.

    Without {mdp_version} in --cmd, say with --mdp-version which version the client speaks.
    """
    from mdp_conformance.client import ClientSettings, ClientSubject

    if list_only:
        cmd = cmd or ""
    elif cmd is None:
        raise click.UsageError("--cmd is required: the command that starts the client")
    elif "{endpoint}" not in cmd:
        raise click.UsageError("--cmd must contain {endpoint}: the address the client connects to")
    if "{mdp_version}" not in cmd and mdp_version == "both" and not list_only:
        raise click.UsageError(
            "--cmd has no {mdp_version}: give --mdp-version 0.1 or 0.2, the version it speaks"
        )
    settings = ClientSettings(cmd, _versions(mdp_version), service, retry_after_ms)

    def describe(subject: Subject) -> str:
        return cmd

    execute(
        "client",
        _versions(mdp_version),
        lambda: ClientSubject(settings),
        describe,
        patterns,
        list_only,
        junit_xml,
        json_path,
    )
