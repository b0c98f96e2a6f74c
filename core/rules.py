"""The rules engine: named, vectorized conditions over features and transaction fields.

A ruleset file (JSON) has the rules applied on top of the model and the fallback rules
that decide alone when the model path is unavailable:

    {"version": "…", "rules": [RULE, …], "fallback": {"default_probability": 0.02, "rules": [RULE, …]}}
    RULE = {"name", "when": [{"field", "op", "value"}, …], "action": "DECLINE"|"REVIEW"|"APPROVE",
            "reason_code", "description", "priority": int, "mode": "enforce"|"shadow",
            "probability": float (fallback only: the estimate when it hits), "note": str}

All conditions of a rule must hold (AND). A missing value (NaN) never satisfies a
condition. Evaluation is one NumPy comparison per condition over the whole batch.

Precedence (docs/rules.md): an enforce-mode APPROVE hit (an allowlist) wins; then any
DECLINE hit; then a REVIEW hit raises an APPROVE to REVIEW; otherwise the model's
decision (or APPROVE in fallback) stands. Shadow rules are evaluated and counted only.
"""

from __future__ import annotations

import hashlib
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from core.errors import RulesLoadError
from core.features import FEATURE_NAMES

EXTRA_FIELDS = ("amount", "fraud_probability")
FIELDS = (*FEATURE_NAMES, *EXTRA_FIELDS)
_OPS: dict[str, Callable[[np.ndarray, Any], np.ndarray]] = {
    "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
    "==": operator.eq, "!=": operator.ne,
    "in": lambda col, values: np.isin(col, values),
    "not in": lambda col, values: ~np.isin(col, values),
}


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
    name: str
    conditions: tuple[Condition, ...]
    action: Decision
    reason_code: str
    description: str
    priority: int = 100
    shadow: bool = False
    probability: float = 0.5


@dataclass(frozen=True, slots=True)
class RuleHits:
    """hits[i, r]: rule r matched transaction i (rules in priority order)."""

    rules: tuple[Rule, ...]
    hits: np.ndarray

    def decide(self, base: np.ndarray) -> np.ndarray:
        """Apply enforce-mode hits to base decisions (int8 array of Decision values) by precedence."""
        out = base.astype(np.int8, copy=True)
        enforce = np.array([not r.shadow for r in self.rules], dtype=bool)
        def any_hit(action: Decision) -> np.ndarray:
            cols = enforce & np.array([r.action == action for r in self.rules], dtype=bool)
            if not cols.any():
                return np.zeros(out.shape[0], dtype=bool)
            return np.asarray(self.hits[:, cols].any(axis=1), dtype=bool)
        out[any_hit(Decision.REVIEW) & (out == Decision.APPROVE)] = Decision.REVIEW
        out[any_hit(Decision.DECLINE)] = Decision.DECLINE
        out[any_hit(Decision.APPROVE)] = Decision.APPROVE
        return out


@dataclass(frozen=True, slots=True)
class RuleSet:
    rules: tuple[Rule, ...]

    def evaluate(self, columns: Mapping[str, np.ndarray], n: int) -> RuleHits:
        """Evaluate every rule over a batch of `n`; `columns` maps field name → float64 array."""
        hits = np.zeros((n, len(self.rules)), dtype=bool)
        for r, rule in enumerate(self.rules):
            mask = np.ones(n, dtype=bool)
            for c in rule.conditions:
                col = columns.get(c.field)
                if col is None:  # e.g. fraud_probability in fallback: the rule cannot match
                    mask[:] = False
                    break
                with np.errstate(invalid="ignore"):
                    mask &= _OPS[c.op](col, c.value) & ~np.isnan(col)
            hits[:, r] = mask
        return RuleHits(self.rules, hits)


@dataclass(frozen=True, slots=True)
class Ruleset:
    """A loaded rules file: model-path rules and the fallback policy."""

    version: str
    rules: RuleSet
    fallback: RuleSet
    fallback_default_probability: float


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


def _parse_rule(where: str, raw: Any, *, names: set[str]) -> Rule:
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
    if not isinstance(when, list) or not when:
        raise ValueError(f"{where}: \"when\" must be a non-empty list of conditions")
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
        conditions=tuple(_parse_condition(f"{where}, condition {i}", c) for i, c in enumerate(when)),
        action=Decision[str(action)],
        reason_code=str(raw.get("reason_code") or name.upper()),
        description=str(raw.get("description") or name),
        priority=priority,
        shadow=mode == "shadow",
        probability=float(probability),
    )


def _parse_rules(where: str, raw: Any) -> RuleSet:
    if not isinstance(raw, list):
        raise ValueError(f"{where}: expected a list of rules")
    names: set[str] = set()
    rules = [_parse_rule(f"{where}[{i}]", r, names=names) for i, r in enumerate(raw)]
    return RuleSet(tuple(sorted(rules, key=lambda r: (r.priority, r.name))))


def parse_ruleset(data: bytes, *, source: str = "<bytes>") -> Ruleset:
    """Parse and validate a rules file's bytes; raises RulesLoadError naming the rule and the problem."""
    try:
        raw = orjson.loads(data)
        if not isinstance(raw, dict):
            raise ValueError("expected a JSON object with \"version\", \"rules\" and \"fallback\"")
        # A misspelt key ("rule") would otherwise load as an empty ruleset and silently disable every rule.
        unknown = set(raw) - {"version", "rules", "fallback"}
        if unknown:
            raise ValueError(f"unknown keys {sorted(unknown)}; expected \"version\", \"rules\" and \"fallback\"")
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
            rules=_parse_rules("rules", raw.get("rules", [])),
            fallback=_parse_rules("fallback.rules", fallback.get("rules", [])),
            fallback_default_probability=float(default_p),
        )
    except orjson.JSONDecodeError as exc:
        raise RulesLoadError(source, f"not valid JSON: {exc}") from None
    except ValueError as exc:
        raise RulesLoadError(source, str(exc)) from None


def load_ruleset(path: Path) -> Ruleset:
    """Read and validate a rules file."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise RulesLoadError(str(path), f"cannot read: {exc.strerror}") from None
    return parse_ruleset(data, source=str(path))


def rule_columns(features: np.ndarray | None, amount: np.ndarray, n: int,
                 fraud_probability: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The named columns rules may refer to. Without features (nothing computed), features are absent."""
    cols: dict[str, np.ndarray] = {"amount": amount}
    if features is not None:
        cols.update({name: features[:, i] for i, name in enumerate(FEATURE_NAMES)})
    if fraud_probability is not None:
        cols["fraud_probability"] = fraud_probability
    return cols
