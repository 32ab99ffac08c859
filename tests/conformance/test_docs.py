"""docs/conformance.md stays true: its rule list is the one the rules' docstrings give."""

from __future__ import annotations

from tests.conformance.matrix import DOC, RULES_END, RULES_START, render_rules


def test_the_rule_list_in_the_docs_is_current() -> None:
    text = DOC.read_text()
    listed = text[text.index(RULES_START) + len(RULES_START) : text.index(RULES_END)]
    assert listed == "\n" + render_rules(), (
        "docs/conformance.md lists other rules than mdp_conformance has: run "
        "python -m tests.conformance.matrix --render"
    )
