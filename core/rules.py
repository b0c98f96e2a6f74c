"""The rules engine: named conditions over features and transaction fields, compiled at load.

A ruleset file (JSON) has the rules applied on top of the model and the fallback rules
that decide alone when the model path is unavailable:

    {"version": "…", "rules": [RULE, …], "fallback": {"default_probability": 0.02, "rules": [RULE, …]}}
    RULE = {"name", "when": EXPRESSION | [{"field", "op", "value"}, …], "action": "DECLINE"|"REVIEW"|"APPROVE",
            "reason_code", "description", "priority": int, "mode": "enforce"|"shadow",
            "probability": float (fallback only: the estimate when it hits), "note": str}

"lists" (optional) names allowlists and blocklists (core.named_lists) that expressions test with
`card in @blocked_cards`. "when" is an expression in the rules language (core.rules_lang: `card_txn_count_10m >= 5 and
amount < 10`), or the older list of conditions that must all hold (AND), which loads as the same
tree. A comparison with a missing value (NaN) is false. Each RuleSet compiles its rules into one
postfix program when it is made; one Numba kernel (core.rules_lang.vm) runs it over the whole
batch, a second (core.rules_kernel) applies the decisions, so a batch costs two compiled calls
whatever the number of rules.

Precedence (docs/rules.md): an enforce-mode APPROVE hit (an allowlist) wins; then any
DECLINE hit; then a REVIEW hit raises an APPROVE to REVIEW; otherwise the model's
decision (or APPROVE in fallback) stands. Shadow rules are evaluated and counted only.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from core import rules_kernel as kernel
from core.encode import KeyHasher
from core.errors import RulesLoadError
from core.features import FEATURE_NAMES, NUM_FEATURES
from core.named_lists import list_kinds, load_lists
from core.rules_lang import ExpressionError, NamedList, Node, compile_program, parse_condition, vm
from core.rules_lang.nodes import IDENTIFIERS, Compare, Logic, Member, Name, Number

EXTRA_FIELDS = ("amount", "fraud_probability")
FIELDS = (*FEATURE_NAMES, *EXTRA_FIELDS)
_OPS = ("<", "<=", ">", ">=", "==", "!=", "in", "not in")
_COLUMNS = {**{name: i for i, name in enumerate(FEATURE_NAMES)},
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
    """One rule. Its condition is `expression` when given (a checked tree from core.rules_lang),
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
        if c.field not in _COLUMNS or c.op not in _OPS:
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
    """A RuleSet compiled for core.rules_lang.vm (its module docstring describes the arrays)."""

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
    compiled = compile_program(trees, _COLUMNS, lists)
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
        (IDENTIFIERS, n) uint64 identifiers (core.named_lists.identifier_keys), or None. An absent
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


def _parse_condition(where: str, raw: Any) -> Condition:
    if not isinstance(raw, dict) or set(raw) != {"field", "op", "value"}:
        raise ValueError(f"{where}: expected {{\"field\", \"op\", \"value\"}}, got {raw!r}")
    field, op, value = raw["field"], raw["op"], raw["value"]
    if field not in FIELDS:
        raise ValueError(f"{where}: unknown field {field!r}; expected a feature name or one of {EXTRA_FIELDS}")
    if op not in _OPS:
        raise ValueError(f"{where}: unknown op {op!r}; expected one of {sorted(_OPS)}")
    if op in ("in", "not in"):
        if not isinstance(value, list) or not all(isinstance(v, int | float) for v in value):
            raise ValueError(f"{where}: op {op!r} needs a list of numbers, got {value!r}")
        return Condition(field, op, tuple(float(v) for v in value))
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{where}: value must be a number, got {value!r}")
    return Condition(field, op, float(value))


def _parse_rule(where: str, raw: Any, *, names: set[str], lists: Mapping[str, str]) -> Rule:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected an object, got {type(raw).__name__}")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: every rule needs a non-empty \"name\"")
    where = f"rule {name!r}"
    if name in names:
        raise ValueError(f"{where}: duplicate name")
    names.add(name)
    unknown = set(raw) - {"name", "when", "action", "reason_code", "description", "priority", "mode", "probability", "note"}
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
    when = raw.get("when")
    expression: Node | None = None
    if isinstance(when, str):
        try:
            expression = parse_condition(when, columns=_COLUMNS, lists=lists)
        except ExpressionError as exc:
            raise ValueError(f"{where}: \"when\" {exc}") from None
    elif not isinstance(when, list) or not when:
        raise ValueError(f"{where}: \"when\" must be a non-empty list of conditions or an expression such as \"amount > 100\"")
    action = raw.get("action")
    if action == "ALLOW":
        action = "APPROVE"
    if action not in Decision.__members__:
        raise ValueError(f"{where}: action must be DECLINE, REVIEW or APPROVE, got {action!r}")
    mode = raw.get("mode", "enforce")
    if mode not in ("enforce", "shadow"):
        raise ValueError(f"{where}: mode must be \"enforce\" or \"shadow\", got {mode!r}")
    probability = raw.get("probability", 0.5)
    if isinstance(probability, bool) or not isinstance(probability, int | float) or not 0.0 <= probability <= 1.0:
        raise ValueError(f"{where}: probability must be a number in [0, 1], got {probability!r}")
    priority = raw.get("priority", 100)
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise ValueError(f"{where}: priority must be an integer, got {priority!r}")
    return Rule(
        name=name,
        conditions=() if expression is not None else tuple(
            _parse_condition(f"{where}, condition {i}", c) for i, c in enumerate(when)),
        action=Decision[str(action)],
        reason_code=str(raw.get("reason_code") or name.upper()),
        description=str(raw.get("description") or name),
        priority=priority,
        shadow=mode == "shadow",
        probability=float(probability),
        expression=expression,
    )


def _parse_rules(where: str, raw: Any, lists: Mapping[str, NamedList]) -> RuleSet:
    if not isinstance(raw, list):
        raise ValueError(f"{where}: expected a list of rules")
    names: set[str] = set()
    kinds = list_kinds(lists)
    rules = [_parse_rule(f"{where}[{i}]", r, names=names, lists=kinds) for i, r in enumerate(raw)]
    return RuleSet(tuple(sorted(rules, key=lambda r: (r.priority, r.name))), lists)


def parse_ruleset(data: bytes, *, source: str = "<bytes>", base_dir: Path | None = None,
                  hasher: KeyHasher | None = None) -> Ruleset:
    """Parse and validate a rules file's bytes; raises RulesLoadError naming the rule and the problem.

    List files are read relative to `base_dir` (the current directory when None); identifier lists
    are hashed with `hasher`, which must be the service's (FRAUDSCORE_ID_HASH_KEY) for them to
    match: KeyHasher() by default, as offline replay uses."""
    try:
        raw = orjson.loads(data)
        if not isinstance(raw, dict):
            raise ValueError("expected a JSON object with \"version\", \"rules\" and \"fallback\"")
        # A misspelt key ("rule") would otherwise load as an empty ruleset and silently disable every rule.
        unknown = set(raw) - {"version", "rules", "fallback", "lists"}
        if unknown:
            raise ValueError(f"unknown keys {sorted(unknown)}; expected \"version\", \"rules\", \"fallback\" "
                             "and \"lists\"")
        lists, list_files = load_lists(raw.get("lists", {}), base_dir=base_dir or Path(),
                                       hasher=hasher or KeyHasher())
        fallback = raw.get("fallback", {})
        if not isinstance(fallback, dict):
            raise ValueError("\"fallback\" must be an object with \"rules\" and \"default_probability\"")
        unknown = set(fallback) - {"rules", "default_probability"}
        if unknown:
            raise ValueError(f"fallback: unknown keys {sorted(unknown)}; expected \"rules\" and \"default_probability\"")
        default_p = fallback.get("default_probability", 0.02)
        if isinstance(default_p, bool) or not isinstance(default_p, int | float) or not 0 <= default_p <= 1:
            raise ValueError(f"fallback.default_probability must be in [0, 1], got {default_p!r}")
        version = raw.get("version") or "rs-" + hashlib.sha256(data).hexdigest()[:12]
        return Ruleset(
            version=str(version),
            rules=_parse_rules("rules", raw.get("rules", []), lists),
            fallback=_parse_rules("fallback.rules", fallback.get("rules", []), lists),
            fallback_default_probability=float(default_p),
            lists=lists,
            list_files=list_files,
        )
    except orjson.JSONDecodeError as exc:
        raise RulesLoadError(source, f"not valid JSON: {exc}") from None
    except ValueError as exc:
        raise RulesLoadError(source, str(exc)) from None


def load_ruleset(path: Path, *, hasher: KeyHasher | None = None) -> Ruleset:
    """Read and validate a rules file (and its list files, relative to it; `hasher` as parse_ruleset's)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise RulesLoadError(str(path), f"cannot read: {exc.strerror}") from None
    return parse_ruleset(data, source=str(path), base_dir=path.parent, hasher=hasher)

