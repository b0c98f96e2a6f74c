"""The rules engine: named conditions over features and transaction fields, compiled at load.
(Reading and validating the file is core/rules/file.py.)

A ruleset file (JSON) has the rules applied on top of the model and the fallback rules
that decide alone when the model path is unavailable:

    {"version": "…", "rules": [RULE, …], "fallback": {"default_probability": 0.02, "rules": [RULE, …]}}
    RULE = {"name", "when": EXPRESSION | [{"field", "op", "value"}, …], "action": "DECLINE"|"REVIEW"|"APPROVE",
            "reason_code", "description", "priority": int, "mode": "enforce"|"shadow",
            "probability": float (fallback only: the estimate when it hits), "note": str}

"lists" (optional) names allowlists and blocklists (core.rules.named_lists) that expressions test with
`card in @blocked_cards`. "when" is an expression in the rules language (core.rules.lang: `card_txn_count_10m >= 5 and
amount < 10`), or the older list of conditions that must all hold (AND), which loads as the same
tree. A comparison with a missing value (NaN) is false. Each RuleSet compiles its rules into one
postfix program when it is made; one Numba kernel (core.rules.lang.vm) runs it over the whole
batch, a second (core.rules.kernel) applies the decisions, so a batch costs two compiled calls
whatever the number of rules.

Precedence (docs/rules.md): an enforce-mode APPROVE hit (an allowlist) wins; then any
DECLINE hit; then a REVIEW hit raises an APPROVE to REVIEW; otherwise the model's
decision (or APPROVE in fallback) stands. Shadow rules are evaluated and counted only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path

import numpy as np
import numpy.typing as npt

from core.features import FEATURE_NAMES, NUM_FEATURES
from core.rules import kernel
from core.rules.lang import NamedList, Node, compile_program, vm
from core.rules.lang.nodes import IDENTIFIERS, Compare, Logic, Member, Name, Number

EXTRA_FIELDS = ("amount", "fraud_probability")
FIELDS = (*FEATURE_NAMES, *EXTRA_FIELDS)
CONDITION_OPS = ("<", "<=", ">", ">=", "==", "!=", "in", "not in")
RULE_COLUMNS = {**{name: i for i, name in enumerate(FEATURE_NAMES)},
            "amount": vm.AMOUNT_COLUMN, "fraud_probability": vm.PROBABILITY_COLUMN}
_ABSENT = np.empty(0, dtype=np.float64)
_NO_FEATURES = np.empty((0, NUM_FEATURES), dtype=np.float64)
_NO_KEYS = np.empty((len(IDENTIFIERS), 0), dtype=np.uint64)


class Decision(IntEnum):
    """Values match the API's Decision enum."""

    APPROVE = 1
    REVIEW = 2
    DECLINE = 3


@dataclass(frozen=True, slots=True)
class Condition:
    field: str
    op: str
    value: float | tuple[float, ...]


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule. Its condition is `expression` when given (a checked tree from core.rules.lang),
    else all of `conditions` (the list form of older files; empty for an expression rule)."""

    name: str
    conditions: tuple[Condition, ...]
    action: Decision
    reason_code: str
    description: str
    priority: int = 100
    shadow: bool = False
    probability: float = 0.5
    expression: Node | None = None

    def tree(self) -> Node:
        """The condition as one tree, whichever form the rule was written in."""
        return self.expression if self.expression is not None else condition_tree(self.conditions)


def condition_tree(conditions: tuple[Condition, ...]) -> Node:
    """The expression a list of conditions means: each one, ANDed, left to right."""
    if not conditions:
        raise ValueError("a rule needs an expression or at least one condition")
    trees: list[Node] = []
    for c in conditions:
        if c.field not in RULE_COLUMNS or c.op not in CONDITION_OPS:
            raise ValueError(f"unknown field {c.field!r} or op {c.op!r}")
        column = Name(c.field)
        if c.op in ("in", "not in"):
            members = c.value if isinstance(c.value, tuple) else (c.value,)
            trees.append(Member(column, tuple(float(v) for v in members), negated=c.op == "not in"))
        elif isinstance(c.value, tuple):
            raise ValueError(f"op {c.op!r} needs one number, got {c.value!r}")
        elif c.op == "!=" and math.isnan(c.value):
            # The list form has always read `x != NaN` as "x is present"; the language's
            # comparisons with NaN are false, so say it as x == x (false only for NaN).
            trees.append(Compare("==", column, column))
        else:
            trees.append(Compare(c.op, column, Number(float(c.value))))
    tree = trees[0]
    for t in trees[1:]:
        tree = Logic("and", tree, t)
    return tree


def _effects(rules: tuple[Rule, ...]) -> npt.NDArray[np.int8]:
    return np.array([kernel.NO_EFFECT if r.shadow else int(r.action) for r in rules], dtype=np.int8)


@dataclass(frozen=True, slots=True)
class RuleHits:
    """hits[i, r]: rule r matched transaction i (rules in priority order).

    `effect` is what each rule does when it hits (precomputed by RuleSet; derived from
    `rules` when left out).
    """

    rules: tuple[Rule, ...]
    hits: npt.NDArray[np.bool_]
    effect: npt.NDArray[np.int8] | None = field(default=None, repr=False, compare=False)

    def decide(self, base: np.ndarray) -> npt.NDArray[np.int8]:
        """Apply enforce-mode hits to base decisions (int8 array of Decision values) by precedence."""
        effect = _effects(self.rules) if self.effect is None else self.effect
        hits = np.ascontiguousarray(self.hits, dtype=np.bool_)
        base = np.ascontiguousarray(base, dtype=np.int8)
        # The kernel indexes without bounds checks: shapes that disagree must never reach it.
        if hits.ndim != 2 or base.shape != (hits.shape[0],) or effect.shape != (hits.shape[1],):
            raise ValueError(f"hits must be (n, {effect.shape[0]}) for base (n,), "
                             f"got hits {hits.shape} and base {base.shape}")
        decided: npt.NDArray[np.int8] = kernel.decide(hits, effect, base)
        return decided


@dataclass(frozen=True, slots=True)
class RuleProgram:
    """A RuleSet compiled for core.rules.lang.vm (its module docstring describes the arrays)."""

    program: npt.NDArray[np.int64]      # (instructions, 4): opcode and operands
    rule_start: npt.NDArray[np.int64]   # (rules + 1,): rule r's instructions are rule_start[r]:rule_start[r + 1]
    constants: npt.NDArray[np.float64]  # literals and sorted set members
    depth: int                          # the deepest the VM's stack gets
    effect: npt.NDArray[np.int8]        # (rules,): NO_EFFECT for a shadow rule, else its Decision
    key_members: npt.NDArray[np.uint64]  # members of the identifier lists the rules use


def compile_rules(rules: tuple[Rule, ...], lists: Mapping[str, NamedList] | None = None) -> RuleProgram:
    """The program the VM runs for `rules`, in their order, with the named `lists` they use."""
    trees = []
    for rule in rules:
        try:
            trees.append(rule.tree())
        except ValueError as exc:
            raise ValueError(f"rule {rule.name!r}: {exc}") from None
    compiled = compile_program(trees, RULE_COLUMNS, lists)
    return RuleProgram(compiled.program, compiled.rule_start, compiled.constants, compiled.depth, _effects(rules),
                       compiled.key_members)


@dataclass(frozen=True, slots=True)
class RuleSet:
    """Rules in priority order, compiled into `program` when the set is made."""

    rules: tuple[Rule, ...]
    lists: Mapping[str, NamedList] = field(default_factory=dict, repr=False, compare=False)
    program: RuleProgram = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "program", compile_rules(self.rules, self.lists))

    def evaluate(self, features: np.ndarray | None, amount: np.ndarray,
                 fraud_probability: np.ndarray | None = None, keys: np.ndarray | None = None) -> RuleHits:
        """Evaluate every rule over a batch.

        `features` is the (n, NUM_FEATURES) matrix in FEATURE_NAMES order, or None when it could
        not be computed; `amount` (n,); `fraud_probability` (n,), or None in fallback; `keys` the
        (IDENTIFIERS, n) uint64 identifiers (core.rules.named_lists.identifier_keys), or None. An absent
        column reads as NaN, so no comparison on it holds; absent keys are unknown, in no list.
        """
        amount = np.ascontiguousarray(amount, dtype=np.float64)
        n = amount.shape[0] if amount.ndim == 1 else -1
        # The kernel indexes without bounds checks: shapes that disagree must never reach it.
        x = _NO_FEATURES if features is None else np.ascontiguousarray(features, dtype=np.float64)
        p = _ABSENT if fraud_probability is None else np.ascontiguousarray(fraud_probability, dtype=np.float64)
        k = _NO_KEYS if keys is None else np.ascontiguousarray(keys, dtype=np.uint64)
        if n < 0 or (features is not None and x.shape != (n, NUM_FEATURES)) or (
                fraud_probability is not None and p.shape != (n,)) or (keys is not None and k.shape != (len(IDENTIFIERS), n)):
            raise ValueError(f"expected amount (n,), features (n, {NUM_FEATURES}) or None, fraud_probability "
                             f"(n,) or None, keys ({len(IDENTIFIERS)}, n) or None; got {amount.shape}, "
                             f"{None if features is None else x.shape}, "
                             f"{None if fraud_probability is None else p.shape}, {None if keys is None else k.shape}")
        program = self.program
        hits: npt.NDArray[np.bool_] = vm.evaluate(
            x, features is not None, amount, p, fraud_probability is not None, k, keys is not None,
            program.program, program.rule_start, program.constants, program.key_members, program.depth)
        return RuleHits(self.rules, hits, program.effect)


@dataclass(frozen=True, slots=True)
class Ruleset:
    """A loaded rules file: model-path rules and the fallback policy."""

    version: str
    rules: RuleSet
    fallback: RuleSet
    fallback_default_probability: float
    lists: Mapping[str, NamedList] = field(default_factory=dict, repr=False, compare=False)
    # The list files read, each with the sha256 of what was read: a reload watches them with the rules file.
    list_files: tuple[tuple[Path, str], ...] = ()
