"""Rules: what the suite checks, how strongly the RFCs require it, and the cases they expand to.

A rule is a plain function that drives its peer and raises `AssertionError` (with the first
difference it saw) when the peer breaks the rule, or `Skip` when the rule cannot be judged in
this run. `@rule(...)` registers it with its target (broker, worker or client), its RFC clause
and its level. One rule expands to one `Case` per protocol version it applies to (and per
variant, for rules with several inputs); the runner judges every case on its own.

Levels:
    MUST    required by RFC 7 / RFC 18 / RFC 8; a failure makes the run fail (exit 1)
    SHOULD  recommended by the RFCs (queueing, expiry, LRU, reconnecting)
    MAY     allowed, optional behaviour the suite still reports
    EXT     not in any RFC: framings real peers use (dialects) and version bridging
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

MUST: Final = "MUST"
SHOULD: Final = "SHOULD"
MAY: Final = "MAY"
EXT: Final = "EXT"
LEVELS: Final = (MUST, SHOULD, MAY, EXT)

TARGETS: Final = ("broker", "worker", "client")
VERSIONS: Final = ("0.1", "0.2")
BOTH: Final = "both"  # a rule that needs a 0.1 and a 0.2 peer at once (bridging)


class Skip(Exception):
    """The rule cannot be judged in this run (the reason says why); neither pass nor fail."""


@dataclass(frozen=True)
class Rule:
    """One checked behaviour of one target."""

    target: str
    name: str
    clause: str
    level: str
    func: Callable[..., None]
    versions: tuple[str, ...]
    variants: Callable[[str], Iterable[Mapping[str, Any]]] | None = None

    @property
    def summary(self) -> str:
        """The first sentence of the rule's docstring (its RFC clause comes first there)."""
        doc = inspect.getdoc(self.func) or ""
        return " ".join(doc.split("\n\n")[0].split())

    def cases(self) -> list[Case]:
        out: list[Case] = []
        for version in self.versions:
            for params in self.variants(version) if self.variants else ({},):
                out.append(Case(self, version, dict(params)))
        return out


@dataclass(frozen=True)
class Case:
    """A rule applied to one protocol version (and one variant of its input)."""

    rule: Rule
    version: str
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        parts = [self.version, *(str(v) for v in self.params.values())]
        return f"{self.rule.name}[{'-'.join(parts)}]"

    def versions_needed(self) -> tuple[str, ...]:
        return VERSIONS if self.version == BOTH else (self.version,)

    def call(self, context: object) -> None:
        kwargs = dict(self.params)
        if self.version != BOTH:
            kwargs["version"] = self.version
        self.rule.func(context, **kwargs)


_REGISTRY: dict[str, list[Rule]] = {target: [] for target in TARGETS}


def rule(
    target: str,
    clause: str,
    *,
    level: str = MUST,
    versions: tuple[str, ...] = VERSIONS,
    variants: Callable[[str], Iterable[Mapping[str, Any]]] | None = None,
    name: str | None = None,
) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Register the decorated function as a rule of `target` (the function is returned as is).

    `clause` names the RFC section the rule checks ("RFC 7/18, Heartbeating"); `versions` the
    protocol versions it applies to (`("both",)` for a rule needing both at once); `variants`
    maps a version to the keyword arguments of each case (for example every reply command).
    The rule's name defaults to the function's, with dashes.
    """
    assert target in TARGETS and level in LEVELS

    def register(func: Callable[..., None]) -> Callable[..., None]:
        rule_name = name or func.__name__.removeprefix("test_").replace("_", "-")
        _REGISTRY[target].append(Rule(target, rule_name, clause, level, func, versions, variants))
        return func

    return register


def rules_of(target: str) -> list[Rule]:
    """Every rule of `target`, in the order the suite runs them (imports the rule modules)."""
    if target == "broker":
        from mdp_conformance import broker_rules  # noqa: F401 - registers the rules
    elif target == "worker":
        from mdp_conformance import worker_rules  # noqa: F401
    elif target == "client":
        from mdp_conformance import client_rules  # noqa: F401
    else:
        raise ValueError(f"unknown target {target!r}")
    return list(_REGISTRY[target])


def cases_of(target: str) -> list[Case]:
    return [case for r in rules_of(target) for case in r.cases()]
