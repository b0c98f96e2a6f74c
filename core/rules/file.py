"""Reading a rules file: JSON in, a validated `Ruleset` out, or a RulesLoadError naming the rule,
the list or the expression column and what was expected (the format: core/rules/ruleset.py, docs/rules.md)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson

from core.encode import KeyHasher
from core.errors import RulesLoadError
from core.rules.lang import ExpressionError, NamedList, Node, parse_condition
from core.rules.named_lists import list_kinds, load_lists
from core.rules.ruleset import (
    CONDITION_OPS,
    EXTRA_FIELDS,
    FIELDS,
    RULE_COLUMNS,
    Condition,
    Decision,
    Rule,
    RuleSet,
    Ruleset,
)


def _parse_condition(where: str, raw: Any) -> Condition:
    if not isinstance(raw, dict) or set(raw) != {"field", "op", "value"}:
        raise ValueError(f"{where}: expected {{\"field\", \"op\", \"value\"}}, got {raw!r}")
    field, op, value = raw["field"], raw["op"], raw["value"]
    if field not in FIELDS:
        raise ValueError(f"{where}: unknown field {field!r}; expected a feature name or one of {EXTRA_FIELDS}")
    if op not in CONDITION_OPS:
        raise ValueError(f"{where}: unknown op {op!r}; expected one of {sorted(CONDITION_OPS)}")
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
            expression = parse_condition(when, columns=RULE_COLUMNS, lists=lists)
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

