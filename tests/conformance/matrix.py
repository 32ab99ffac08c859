"""Produce the results matrix of docs/conformance.md by running `mdp-conformance` on every
implementation we can install here: ours, and majortomo's broker, Worker and Client (PyPI
`majortomo`, in the test extra).

    python -m tests.conformance.matrix            # runs everything (majortomo's broker: ~8 min)
    python -m tests.conformance.matrix --render   # re-render from the last run's JSON files

Each run's JSON goes to build/conformance-results/ (kept out of git); the sections of
docs/conformance.md between the `rules:start`/`rules:end` and `matrix:start`/`matrix:end`
markers are replaced (the rule list from the rules' own docstrings), nothing else. Cells
aggregate a rule's cases (versions, variants): "pass", "FAIL", "skip", or for mixed results the
failing cases. Each failing rule is then listed with the first difference the suite saw.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "conformance.md"
RESULTS = ROOT / "build" / "conformance-results"  # not committed: it holds local paths
START, END = "<!-- matrix:start -->", "<!-- matrix:end -->"
RULES_START, RULES_END = "<!-- rules:start -->", "<!-- rules:end -->"
PY = sys.executable
BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Subject:
    key: str
    target: str
    label: str
    args: list[str]


SUBJECTS = [
    Subject(
        "ours-broker",
        "broker",
        "ours (mdp-broker)",
        [
            "--cmd",
            f"{BIN / 'mdp-broker'} --bind {{endpoint}} --insecure --heartbeat-ms {{heartbeat_ms}}"
            " --liveness {liveness} --request-ttl {request_ttl}",
        ],
    ),
    Subject(
        "majortomo-broker",
        "broker",
        "majortomo 0.2.0 broker",
        # majortomo wants the timeout to be an exact multiple of the interval (in seconds).
        [
            "--cmd",
            f"{PY} -m majortomo.broker -b {{endpoint}} -i 0.125 -t 0.375",
            "--heartbeat-ms",
            "125",
            "--liveness",
            "3",
        ],
    ),
    Subject(
        "ours-worker",
        "worker",
        "ours (mdp-worker -s echo)",
        [
            "--cmd",
            f"{BIN / 'mdp-worker'} --broker {{endpoint}} --service {{service}}"
            " --heartbeat-ms {heartbeat_ms} --liveness {liveness} --mdp-version {mdp_version}",
        ],
    ),
    Subject(
        "majortomo-worker",
        "worker",
        "majortomo 0.2.0 Worker",
        [
            "--cmd",
            f"{PY} -m tests.conformance.peers.majortomo_worker {{endpoint}} {{service}}"
            " {heartbeat_ms} {liveness}",
            "--mdp-version",
            "0.2",
        ],
    ),
    Subject(
        "ours-client",
        "client",
        "ours (mdp.client.Client)",
        [
            "--cmd",
            f"{PY} -m tests.conformance.peers.our_client {{endpoint}} {{service}}"
            " {mdp_version} {timeout_ms} {body}",
            "--retry-after-ms",
            "400",
        ],
    ),
    Subject(
        "majortomo-client",
        "client",
        "majortomo 0.2.0 Client",
        [
            "--cmd",
            f"{PY} -m tests.conformance.peers.majortomo_client {{endpoint}} {{service}}"
            " 5000 {body}",
            "--mdp-version",
            "0.2",
        ],
    ),
]


def run(subject: Subject) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{subject.key}.json"
    command = [str(BIN / "mdp-conformance"), subject.target, *subject.args, "--json", str(out)]
    print(f"== {subject.label}: {' '.join(command)}", file=sys.stderr, flush=True)
    done = subprocess.run(command, cwd=ROOT, stdout=subprocess.DEVNULL, check=False)
    if done.returncode not in (0, 1):
        raise SystemExit(f"mdp-conformance exited {done.returncode} for {subject.label}")


def load(subject: Subject) -> dict[str, object]:
    data: dict[str, object] = json.loads((RESULTS / f"{subject.key}.json").read_text())
    return data


def suffix(result: dict[str, str]) -> str:
    """The case's variant: "0.2", "0.2-FINAL", "both"."""
    return result["id"].split("[", 1)[1][:-1]


def cell(results: list[dict[str, str]]) -> str:
    if not results:
        return "n/a"
    statuses = {r["status"] for r in results}
    if statuses == {"pass"}:
        return "pass"
    if statuses <= {"skip"}:
        return "skip"
    failing = [r for r in results if r["status"] in ("fail", "error")]
    judged = [r for r in results if r["status"] != "skip"]
    if not failing:
        return (
            "pass (" + ", ".join(suffix(r) for r in results if r["status"] == "skip") + " skipped)"
        )
    if len(failing) == len(judged):
        return "**FAIL**"
    return "**FAIL** " + ", ".join(suffix(r) for r in failing)


def first_line(detail: str) -> str:
    """The detail's first line, without the random peer names that change on every run."""
    line = next((ln.strip() for ln in detail.splitlines() if ln.strip()), "")
    line = re.sub(r"(worker|client|raw)-[0-9a-f]{12}", r"\1-...", line)
    return line.replace("|", "\\|")


def render() -> str:
    lines: list[str] = []
    for target in ("broker", "worker", "client"):
        subjects = [s for s in SUBJECTS if s.target == target]
        data = {s.key: load(s) for s in subjects}
        lines.append(f"### {target.capitalize()}s\n")
        for s in subjects:
            d = data[s.key]
            counts = d["counts"]  # type: ignore[index]
            summary = "; ".join(
                f"{level}: " + ", ".join(f"{n} {k}" for k, n in tally.items() if n)
                for level, tally in counts.items()  # type: ignore[union-attr]
            )
            verdict = "passes" if d["passed"] else "fails"
            lines.append(f"- **{s.label}** {verdict} ({summary}).")
        lines.append("")
        header = "| rule | level | " + " | ".join(s.label for s in subjects) + " |"
        lines += [header, "|" + "---|" * (2 + len(subjects))]
        rules: dict[str, str] = {}
        for s in subjects:
            for r in data[s.key]["results"]:  # type: ignore[index]
                rules.setdefault(r["rule"], r["level"])
        for rule, level in rules.items():
            cells = [
                cell([r for r in data[s.key]["results"] if r["rule"] == rule])  # type: ignore[index]
                for s in subjects
            ]
            lines.append(f"| `{rule}` | {level} | " + " | ".join(cells) + " |")
        lines.append("")
        for s in subjects:
            failed = [r for r in data[s.key]["results"] if r["status"] in ("fail", "error")]  # type: ignore[index]
            if not failed:
                continue
            lines.append(f"Failures of {s.label}, with the first difference the suite saw:\n")
            by_rule: dict[str, list[dict[str, str]]] = {}
            for r in failed:
                by_rule.setdefault(r["rule"], []).append(r)
            results = data[s.key]["results"]  # type: ignore[index]
            for rule, cases in by_rule.items():
                judged = [r for r in results if r["rule"] == rule and r["status"] != "skip"]
                which = (
                    f"all {len(cases)} cases"
                    if len(cases) == len(judged) > 3
                    else ", ".join(suffix(r) for r in cases)
                )
                lines.append(
                    f"- `{rule}` [{which}] ({cases[0]['level']}): {first_line(cases[0]['detail'])}"
                )
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def render_rules() -> str:
    """Every rule, its level, clause and versions, and what it checks (its docstring)."""
    from mdp_conformance.rules import rules_of

    lines: list[str] = []
    for target in ("broker", "worker", "client"):
        lines += [
            f"### {target.capitalize()} rules\n",
            "| rule | level | clause | versions | checks |",
        ]
        lines.append("|---|---|---|---|---|")
        for r in rules_of(target):
            versions = "0.1 + 0.2 at once" if r.versions == ("both",) else ", ".join(r.versions)
            checks = r.summary.replace("|", "\\|")
            lines.append(f"| `{r.name}` | {r.level} | {r.clause} | {versions} | {checks} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def replace(text: str, start: str, end: str, body: str) -> str:
    head, tail = text.index(start) + len(start), text.index(end)
    return text[:head] + "\n" + body + text[tail:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--render", action="store_true", help="only re-render from the JSON")
    parser.add_argument("--only", action="append", help="run only these subject keys")
    args = parser.parse_args()
    if not args.render:
        for subject in SUBJECTS:
            if not args.only or subject.key in args.only:
                run(subject)
    text = replace(DOC.read_text(), RULES_START, RULES_END, render_rules())
    DOC.write_text(replace(text, START, END, render()))
    print(f"wrote the matrix into {DOC.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
