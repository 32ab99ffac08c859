"""What a run found, for people (a table) and for CI (JUnit XML, JSON).

The verdict: a run passes when no MUST case failed or errored. SHOULD, MAY and EXT cases are
reported in a table of their own and never change the verdict. Skipped cases are listed with
their reason; they neither pass nor fail.
"""

from __future__ import annotations

import json
import platform
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from mdp_conformance.rules import MUST
from mdp_conformance.runner import ERROR, FAIL, PASS, SKIP, Outcome

STYLES = {PASS: "green", FAIL: "bold red", ERROR: "bold red", SKIP: "yellow"}


def verdict(outcomes: Sequence[Outcome]) -> bool:
    """True when every MUST case that ran passed."""
    return not any(o.failed for o in outcomes if o.case.rule.level == MUST)


def counts(outcomes: Sequence[Outcome]) -> dict[str, dict[str, int]]:
    """{"MUST": {"pass": n, "fail": n, ...}, "SHOULD": {...}, ...}"""
    out: dict[str, dict[str, int]] = {}
    for level in sorted({o.case.rule.level for o in outcomes}, key=_level_order):
        tally = Counter(o.status for o in outcomes if o.case.rule.level == level)
        out[level] = {status: tally.get(status, 0) for status in (PASS, FAIL, ERROR, SKIP)}
    return out


def _level_order(level: str) -> int:
    return ("MUST", "SHOULD", "MAY", "EXT").index(level)


def first_line(detail: str, width: int = 160) -> str:
    line = next((ln.strip() for ln in detail.splitlines() if ln.strip()), "")
    return line if len(line) <= width else line[: width - 3] + "..."


def table(title: str, outcomes: Sequence[Outcome]) -> Table:
    grid = Table(title=title, title_justify="left", show_lines=False, expand=False)
    grid.add_column("rule", overflow="fold")
    grid.add_column("clause", overflow="fold", max_width=34)
    grid.add_column("level")
    grid.add_column("result")
    grid.add_column("first difference / reason", overflow="fold")
    for o in outcomes:
        grid.add_row(  # Text, not str: frames like [b'', ...] are not rich markup
            Text(o.case.id),
            Text(o.case.rule.clause),
            Text(o.case.rule.level),
            Text(o.status, style=STYLES[o.status]),
            Text(first_line(o.detail)),
        )
    return grid


def render(console: Console, target: str, subject: str, outcomes: Sequence[Outcome]) -> None:
    """The terminal report: MUST rules, then the others, then the failures in full."""
    required = [o for o in outcomes if o.case.rule.level == MUST]
    optional = [o for o in outcomes if o.case.rule.level != MUST]
    console.print(table(f"{target}: required (MUST) rules - {subject}", required))
    if optional:
        title = f"{target}: recommended and non-RFC rules (they do not fail the run)"
        console.print(table(title, optional))
    failed = [o for o in outcomes if o.failed]
    for o in failed:
        heading = f"\n{o.status.upper()} {o.case.id} ({o.case.rule.clause})"
        console.print(Text(heading, style="bold"))
        console.print(Text(o.case.rule.summary, style="dim"))
        console.print(Text(o.detail))
    summary = ", ".join(
        f"{level} " + " ".join(f"{n} {status}" for status, n in tally.items() if n)
        for level, tally in counts(outcomes).items()
    )
    ok = verdict(outcomes)
    console.print(
        Text(
            f"\n{target}: {'PASS' if ok else 'FAIL'} ({summary})",
            style="bold green" if ok else "bold red",
        )
    )


def to_json(target: str, subject: str, outcomes: Sequence[Outcome]) -> dict[str, Any]:
    return {
        "target": target,
        "subject": subject,
        "passed": verdict(outcomes),
        "counts": counts(outcomes),
        "results": [
            {
                "id": o.case.id,
                "rule": o.case.rule.name,
                "version": o.case.version,
                "params": o.case.params,
                "clause": o.case.rule.clause,
                "level": o.case.rule.level,
                "status": o.status,
                "detail": o.detail,
                "seconds": round(o.seconds, 3),
            }
            for o in outcomes
        ],
    }


def write_json(path: Path, target: str, subject: str, outcomes: Sequence[Outcome]) -> None:
    path.write_text(json.dumps(to_json(target, subject, outcomes), indent=2) + "\n")


def write_junit(path: Path, target: str, subject: str, outcomes: Sequence[Outcome]) -> None:
    """One <testsuite> per run; each case a <testcase> (classname: target.level)."""
    tally = Counter(o.status for o in outcomes)
    suite = ET.Element(
        "testsuite",
        name=f"mdp-conformance-{target}",
        tests=str(len(outcomes)),
        failures=str(tally[FAIL]),
        errors=str(tally[ERROR]),
        skipped=str(tally[SKIP]),
        time=f"{sum(o.seconds for o in outcomes):.3f}",
        hostname=platform.node(),
    )
    props = ET.SubElement(suite, "properties")
    ET.SubElement(props, "property", name="subject", value=subject)
    for o in outcomes:
        case = ET.SubElement(
            suite,
            "testcase",
            classname=f"{target}.{o.case.rule.level}",
            name=o.case.id,
            time=f"{o.seconds:.3f}",
        )
        if o.status in (FAIL, ERROR):
            # A SHOULD failure is still a <failure>; its classname says it is not required.
            child = ET.SubElement(case, "failure" if o.status == FAIL else "error")
            child.set("message", first_line(o.detail))
            child.text = f"{o.case.rule.clause}: {o.case.rule.summary}\n\n{o.detail}"
        elif o.status == SKIP:
            ET.SubElement(case, "skipped", message=first_line(o.detail))
    root = ET.Element("testsuites")
    root.append(suite)
    tree = ET.ElementTree(root)
    ET.indent(tree)
    tree.write(path, encoding="utf-8", xml_declaration=True)
