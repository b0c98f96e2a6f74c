"""core.rules.ruleset: validation of rules files, compiled evaluation against a per-row reference, precedence."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.errors import RulesLoadError
from core.features import FEATURE_NAMES
from core.rules.file import load_ruleset, parse_ruleset
from core.rules.kernel import SCAN_MEMBERS
from core.rules.ruleset import Condition, Decision, Rule, RuleHits, RuleSet

FEW = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

OPS = ("<", "<=", ">", ">=", "==", "!=", "in", "not in")


def rule(name: str = "r", **fields: Any) -> dict[str, Any]:
    """A valid rule document; `fields` replace or add keys."""
    doc: dict[str, Any] = {
        "name": name,
        "when": [{"field": "amount", "op": ">", "value": 100}],
        "action": "DECLINE",
    }
    doc.update(fields)
    return doc


def document(rules: list[Any] | None = None, fallback_rules: list[Any] | None = None, *,
             default_probability: float = 0.02) -> bytes:
    return orjson.dumps({"version": "test", "rules": rules or [],
                         "fallback": {"default_probability": default_probability, "rules": fallback_rules or []}})


def when(field: str = "amount", op: str = ">", value: Any = 100) -> list[dict[str, Any]]:
    return [{"field": field, "op": op, "value": value}]


def evaluate(ruleset: RuleSet, columns: Mapping[str, np.ndarray], n: int) -> RuleHits:
    """Evaluate named columns as the scorer passes them: a feature matrix (None when no feature is
    named, NaN in the features not named: either way their conditions fail), amount (NaN when not
    named) and fraud_probability (None when not named)."""
    named = [i for i, name in enumerate(FEATURE_NAMES) if name in columns]
    features = None
    if named:
        features = np.full((n, len(FEATURE_NAMES)), math.nan)
        for i in named:
            features[:, i] = columns[FEATURE_NAMES[i]]
    amount = columns.get("amount", np.full(n, math.nan))
    return ruleset.evaluate(features, amount, columns.get("fraud_probability"))


# --- validation -----------------------------------------------------------------------------------

RULE_ERRORS: list[tuple[str, dict[str, Any], tuple[str, ...]]] = [
    ("unknown field", rule(when=when(field="amount_usd")), ("unknown field 'amount_usd'",)),
    ("unknown op", rule(when=when(op="=>")), ("unknown op '=>'",)),
    ("string value", rule(when=when(value="100")), ("value must be a number", "'100'")),
    ("bool value", rule(when=when(value=True)), ("value must be a number",)),
    ("list value for <", rule(when=when(value=[1, 2])), ("value must be a number",)),
    ("null value", rule(when=when(value=None)), ("value must be a number",)),
    ("in without a list", rule(when=when(op="in", value=5)), ("op 'in' needs a list of numbers",)),
    ("in with strings", rule(when=when(op="in", value=["a"])), ("op 'in' needs a list of numbers",)),
    ("not in without a list", rule(when=when(op="not in", value="x")), ("op 'not in' needs a list of numbers",)),
    ("condition without value", rule(when=[{"field": "amount", "op": ">"}]), ("condition 0", "expected")),
    ("condition with extra key", rule(when=[{"field": "amount", "op": ">", "value": 1, "unit": "EUR"}]),
     ("condition 0", "expected")),
    ("condition not an object", rule(when=["amount > 100"]), ("condition 0", "expected")),
    ("bad action", rule(action="BLOCK"), ("action must be DECLINE, REVIEW or APPROVE", "'BLOCK'")),
    ("missing action", {"name": "r", "when": when()}, ("action must be",)),
    ("lower-case action", rule(action="decline"), ("action must be",)),
    ("bad mode", rule(mode="dry-run"), ("mode must be", "'dry-run'")),
    ("probability above 1", rule(probability=1.5), ("probability must be a number in [0, 1]", "1.5")),
    ("negative probability", rule(probability=-0.1), ("probability must be a number in [0, 1]",)),
    ("string probability", rule(probability="0.5"), ("probability must be a number in [0, 1]",)),
    ("bool probability", rule(probability=True), ("probability must be a number in [0, 1]",)),
    ("fractional priority", rule(priority=1.5), ("priority must be an integer", "1.5")),
    ("string priority", rule(priority="1"), ("priority must be an integer",)),
    ("bool priority", rule(priority=True), ("priority must be an integer",)),
    ("unknown keys", rule(severity=3, enabled=True), ("unknown keys ['enabled', 'severity']",)),
    ("empty when", rule(when=[]), ('"when" must be a non-empty list',)),
    ("missing when", {"name": "r", "action": "DECLINE"}, ('"when" must be a non-empty list',)),
    ("when not a list", rule(when={"field": "amount", "op": ">", "value": 1}), ('"when" must be a non-empty list',)),
]


@pytest.mark.parametrize(("doc", "problem"), [pytest.param(d, p, id=i) for i, d, p in RULE_ERRORS])
@pytest.mark.parametrize("section", ["rules", "fallback"])
def test_a_bad_rule_is_refused_naming_the_rule_and_the_problem(
    doc: dict[str, Any], problem: tuple[str, ...], section: str
) -> None:
    good = rule("fine")
    data = document(rules=[good, doc]) if section == "rules" else document(fallback_rules=[good, doc])
    with pytest.raises(RulesLoadError) as info:
        parse_ruleset(data, source="rules-under-test.json")
    assert info.value.path == "rules-under-test.json"
    assert "rule 'r'" in info.value.reason
    for fragment in problem:
        assert fragment in info.value.reason
    assert "rules-under-test.json" in str(info.value)


def test_duplicate_rule_names_are_refused() -> None:
    with pytest.raises(RulesLoadError, match=r"rule 'twice': duplicate name"):
        parse_ruleset(document(rules=[rule("twice"), rule("other"), rule("twice", action="REVIEW")]))


def test_the_same_name_may_appear_once_in_rules_and_once_in_fallback() -> None:
    ruleset = parse_ruleset(document(rules=[rule("same")], fallback_rules=[rule("same")]))
    assert [r.name for r in ruleset.rules.rules] == [r.name for r in ruleset.fallback.rules] == ["same"]


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        pytest.param(b"{not json", "not valid JSON", id="bad JSON"),
        pytest.param(b"", "not valid JSON", id="empty file"),
        pytest.param(b"[]", "expected a JSON object", id="a list"),
        pytest.param(b'"rules"', "expected a JSON object", id="a string"),
        pytest.param(b'{"rules": {}}', "rules: expected a list of rules", id="rules not a list"),
        pytest.param(b'{"fallback": []}', '"fallback" must be an object', id="fallback not an object"),
        pytest.param(b'{"fallback": {"default_probability": 2}}', "fallback.default_probability must be in [0, 1]",
                     id="default probability above 1"),
        pytest.param(b'{"fallback": {"default_probability": "low"}}', "fallback.default_probability",
                     id="default probability a string"),
        pytest.param(b'{"fallback": {"rules": 1}}', "fallback.rules: expected a list of rules",
                     id="fallback rules not a list"),
        pytest.param(b'{"rules": ["x"]}', "rules[0]: expected an object, got str", id="rule not an object"),
        pytest.param(b'{"rules": [{"when": []}]}', 'rules[0]: every rule needs a non-empty "name"',
                     id="rule without a name"),
        pytest.param(b'{"rules": [{"name": ""}]}', 'rules[0]: every rule needs a non-empty "name"',
                     id="rule with an empty name"),
        pytest.param(b'{"fallback": {"rules": [{"name": 7}]}}', 'fallback.rules[0]: every rule needs',
                     id="fallback rule with a number for a name"),
        pytest.param(b'{"version": "v", "rule": []}', "unknown keys ['rule']", id="misspelt rules"),
        pytest.param(b'{"fallback": {"rules": [], "default": 0.1}}', "fallback: unknown keys ['default']",
                     id="misspelt default_probability"),
    ],
)
def test_a_bad_file_is_refused_saying_what_is_wrong(data: bytes, problem: str) -> None:
    with pytest.raises(RulesLoadError) as info:
        parse_ruleset(data, source="f.json")
    assert problem in info.value.reason
    assert info.value.path == "f.json"


def test_load_ruleset_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "rules.json"
    path.write_bytes(document(rules=[rule("big", when=when(op="~"))]))
    with pytest.raises(RulesLoadError) as info:
        load_ruleset(path)
    assert info.value.path == str(path)
    assert "rule 'big'" in info.value.reason and "unknown op" in info.value.reason
    with pytest.raises(RulesLoadError, match="cannot read") as missing:
        load_ruleset(tmp_path / "absent.json")
    assert missing.value.path == str(tmp_path / "absent.json")


# --- parsing --------------------------------------------------------------------------------------

def test_a_full_rule_is_parsed_into_its_record() -> None:
    ruleset = parse_ruleset(document(fallback_rules=[rule(
        "testing", when=[{"field": "card_txn_count_10m", "op": ">=", "value": 5},
                         {"field": "channel", "op": "in", "value": [1, 2.5]}],
        action="REVIEW", reason_code="R_T", description="burst", priority=7, mode="shadow",
        probability=1, note="why",
    )], default_probability=0))
    assert ruleset.fallback_default_probability == 0.0
    assert ruleset.fallback.rules == (Rule(
        name="testing",
        conditions=(Condition("card_txn_count_10m", ">=", 5.0), Condition("channel", "in", (1.0, 2.5))),
        action=Decision.REVIEW, reason_code="R_T", description="burst", priority=7, shadow=True, probability=1.0,
    ),)


def test_defaults_of_a_minimal_rule_and_file() -> None:
    data = b'{"rules": [{"name": "big", "when": [{"field": "amount", "op": ">", "value": 1}], "action": "REVIEW"}]}'
    ruleset = parse_ruleset(data)
    (r,) = ruleset.rules.rules
    assert (r.reason_code, r.description, r.priority, r.shadow, r.probability) == ("BIG", "big", 100, False, 0.5)
    assert ruleset.fallback.rules == ()
    assert ruleset.fallback_default_probability == 0.02
    # Without a version the content names the ruleset: the same bytes, the same version.
    assert ruleset.version.startswith("rs-")
    assert parse_ruleset(data).version == ruleset.version
    assert parse_ruleset(data + b" ").version != ruleset.version


def test_allow_is_accepted_as_approve() -> None:
    ruleset = parse_ruleset(document(rules=[rule("vip", action="ALLOW"), rule("ok", action="APPROVE")]))
    assert [r.action for r in ruleset.rules.rules] == [Decision.APPROVE, Decision.APPROVE]


def test_every_feature_and_extra_field_may_be_named() -> None:
    names = [*FEATURE_NAMES, "amount", "fraud_probability"]
    ruleset = parse_ruleset(document(rules=[rule(f"r{i}", when=when(field=f)) for i, f in enumerate(names)]))
    assert sorted(r.conditions[0].field for r in ruleset.rules.rules) == sorted(names)


def test_rules_are_ordered_by_priority_then_name() -> None:
    ruleset = parse_ruleset(document(rules=[
        rule("c", priority=30), rule("default"), rule("b", priority=10), rule("a", priority=10),
        rule("first", priority=-5),
    ]))
    assert [r.name for r in ruleset.rules.rules] == ["first", "a", "b", "c", "default"]
    # Hit columns follow the same order.
    rs = parse_ruleset(document(rules=[rule("late", priority=50, when=when(op=">", value=10)),
                                       rule("early", priority=1, when=when(op="<", value=10))]))
    hits = evaluate(rs.rules, {"amount": np.array([5.0, 50.0])}, 2)
    assert [r.name for r in hits.rules] == ["early", "late"]
    np.testing.assert_array_equal(hits.hits, [[True, False], [False, True]])


# --- evaluation against a per-row reference --------------------------------------------------------

TEST_FIELDS = ("amount", "card_txn_count_10m", "card_new_device", "fraud_probability")
NUMBERS = st.sampled_from([-1.0, 0.0, 0.5, 1, 2.0, 5, 10.0])
CELLS = st.one_of(NUMBERS.map(float), st.sampled_from([math.nan, math.inf, -math.inf]))


@st.composite
def conditions(draw: st.DrawFn) -> dict[str, Any]:
    op = draw(st.sampled_from(OPS))
    value = draw(st.lists(NUMBERS, max_size=3)) if op in ("in", "not in") else draw(NUMBERS)
    return {"field": draw(st.sampled_from(TEST_FIELDS)), "op": op, "value": value}


@st.composite
def rule_lists(draw: st.DrawFn) -> list[dict[str, Any]]:
    count = draw(st.integers(0, 5))
    return [rule(f"r{i}", when=draw(st.lists(conditions(), min_size=1, max_size=3)),
                 action=draw(st.sampled_from(["DECLINE", "REVIEW", "APPROVE"])),
                 priority=draw(st.integers(0, 3)), mode=draw(st.sampled_from(["enforce", "shadow"])))
            for i in range(count)]


@st.composite
def batches(draw: st.DrawFn) -> tuple[int, dict[str, np.ndarray]]:
    n = draw(st.integers(0, 12))
    present = [f for f in TEST_FIELDS if draw(st.booleans()) or f == "amount"]
    return n, {f: np.array(draw(st.lists(CELLS, min_size=n, max_size=n)), dtype=np.float64) for f in present}


def reference_condition(cond: dict[str, Any], row: dict[str, float]) -> bool:
    if cond["field"] not in row:
        return False
    v, x = row[cond["field"]], cond["value"]
    if math.isnan(v):
        return False
    op = cond["op"]
    if op == "in":
        return any(v == float(y) for y in x)
    if op == "not in":
        return all(v != float(y) for y in x)
    plain = {"<": v < x, "<=": v <= x, ">": v > x, ">=": v >= x, "==": v == x, "!=": v != x}
    return bool(plain[op])


@FEW
@given(rules=rule_lists(), batch=batches())
def test_evaluation_matches_a_per_row_reference(rules: list[dict[str, Any]], batch: tuple[int, dict]) -> None:
    n, columns = batch
    ruleset = parse_ruleset(document(rules=rules)).rules
    hits = evaluate(ruleset, columns, n)
    assert hits.hits.shape == (n, len(rules)) and hits.hits.dtype == bool
    by_name = {r["name"]: r for r in rules}
    for i in range(n):
        row = {f: float(col[i]) for f, col in columns.items()}
        for j, parsed in enumerate(hits.rules):
            expected = all(reference_condition(c, row) for c in by_name[parsed.name]["when"])
            assert hits.hits[i, j] == expected, (parsed, row)


@pytest.mark.parametrize("op", OPS)
def test_nan_never_matches_any_condition(op: str) -> None:
    value: Any = [0.0, 1.0] if op in ("in", "not in") else 1.0
    ruleset = parse_ruleset(document(rules=[rule("r", when=when(field="card_new_device", op=op, value=value))])).rules
    hits = evaluate(ruleset, {"card_new_device": np.array([math.nan, math.nan])}, 2)
    assert not hits.hits.any()


def test_a_missing_column_means_no_match() -> None:
    # fraud_probability is absent in fallback; a rule on it must not match, whatever its operator.
    ruleset = parse_ruleset(document(rules=[
        rule("p_low", when=when(field="fraud_probability", op="!=", value=0.5)),
        rule("p_not_in", when=when(field="fraud_probability", op="not in", value=[])),
        rule("mixed", when=[{"field": "amount", "op": ">=", "value": 0},
                            {"field": "card_txn_count_10m", "op": "<", "value": 100}]),
        rule("amount_only", when=when(op=">=", value=0)),
    ])).rules
    hits = evaluate(ruleset, {"amount": np.array([1.0, 2.0, 3.0])}, 3)
    assert dict(zip([r.name for r in hits.rules], hits.hits.all(axis=0).tolist(), strict=True)) == {
        "amount_only": True, "mixed": False, "p_low": False, "p_not_in": False,
    }
    assert not hits.hits[:, [r.name != "amount_only" for r in hits.rules]].any()


def test_an_empty_batch_and_an_empty_ruleset() -> None:
    ruleset = parse_ruleset(document(rules=[rule("r")])).rules
    empty = evaluate(ruleset, {"amount": np.empty(0)}, 0)
    assert empty.hits.shape == (0, 1)
    assert empty.decide(np.empty(0, dtype=np.int8)).shape == (0,)
    none = evaluate(RuleSet(()), {"amount": np.array([1e9])}, 1)
    assert none.hits.shape == (1, 0)
    np.testing.assert_array_equal(none.decide(np.array([Decision.REVIEW], dtype=np.int8)), [Decision.REVIEW])



def test_an_empty_ruleset_with_and_without_features_and_probability() -> None:
    for n in (0, 1, 5):
        features = np.zeros((n, len(FEATURE_NAMES)))
        for hits in (RuleSet(()).evaluate(features, np.ones(n), np.ones(n)), RuleSet(()).evaluate(None, np.ones(n))):
            assert hits.hits.shape == (n, 0) and hits.hits.dtype == bool
            base = np.full(n, Decision.DECLINE, dtype=np.int8)
            np.testing.assert_array_equal(hits.decide(base), base)


@pytest.mark.parametrize(("features", "amount", "probability"), [
    pytest.param(np.zeros((2, len(FEATURE_NAMES) - 1)), np.ones(2), None, id="a feature short"),
    pytest.param(np.zeros((3, len(FEATURE_NAMES))), np.ones(2), None, id="a row too many"),
    pytest.param(np.zeros(len(FEATURE_NAMES)), np.ones(1), None, id="one-dimensional features"),
    pytest.param(None, np.ones(2), np.ones(3), id="probability longer than amount"),
    pytest.param(None, np.ones((2, 1)), None, id="two-dimensional amount"),
])
def test_shapes_that_disagree_are_refused_before_the_kernel(
    features: np.ndarray | None, amount: np.ndarray, probability: np.ndarray | None
) -> None:
    ruleset = parse_ruleset(document(rules=[rule("r", when=when(field=FEATURE_NAMES[-1]))])).rules
    with pytest.raises(ValueError, match="expected amount"):
        ruleset.evaluate(features, amount, probability)
    hits = ruleset.evaluate(None, np.ones(2))
    with pytest.raises(ValueError, match="hits must be"):
        hits.decide(np.ones(3, dtype=np.int8))


# --- compiled evaluation against a plain interpreter ----------------------------------------------

# Columns the random rules name: both ends of the feature matrix, a few inside, and the extra fields.
PLAIN_FIELDS = (FEATURE_NAMES[0], "card_txn_count_10m", "card_new_device", FEATURE_NAMES[-1],
                "amount", "fraud_probability")
SPECIAL = [math.nan, math.inf, -math.inf, 0.0, -0.0]
PLAIN_VALUES = st.one_of(st.integers(-3, 3).map(float), st.sampled_from([0.5, 1e300, *SPECIAL]))
# Sets small enough to be scanned and large enough to be halved first (core.rules.kernel.SCAN_MEMBERS).
PLAIN_SETS = st.one_of(st.lists(PLAIN_VALUES, max_size=5),
                       st.lists(st.integers(-40, 40).map(float), min_size=SCAN_MEMBERS + 1, max_size=70))


@st.composite
def plain_rules(draw: st.DrawFn) -> tuple[Rule, ...]:
    """Rules made directly (not parsed), so condition values may be NaN or ±inf too."""
    rules = []
    for r in range(draw(st.integers(0, 6))):
        conds = []
        for _ in range(draw(st.integers(1, 3))):
            op = draw(st.sampled_from(OPS))
            value = tuple(draw(PLAIN_SETS)) if op in ("in", "not in") else draw(PLAIN_VALUES)
            conds.append(Condition(draw(st.sampled_from(PLAIN_FIELDS)), op, value))
        rules.append(Rule(f"r{r}", tuple(conds), draw(st.sampled_from(list(Decision))), f"R{r}", f"rule {r}",
                          shadow=draw(st.booleans())))
    return tuple(rules)


@st.composite
def plain_batches(draw: st.DrawFn) -> tuple[np.ndarray | None, np.ndarray, np.ndarray | None]:
    """features (n, F) or None, amount, fraud_probability or None; n from 0, 1 often."""
    n = draw(st.one_of(st.sampled_from([0, 1]), st.integers(0, 40)))
    cells = st.one_of(PLAIN_VALUES, st.integers(-40, 40).map(float))

    def column() -> np.ndarray:
        return np.array(draw(st.lists(cells, min_size=n, max_size=n)), dtype=np.float64)

    features = None
    if draw(st.booleans()):
        # Columns no rule names get noise (a kernel reading the wrong column would show).
        features = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).normal(0.0, 3.0, (n, len(FEATURE_NAMES)))
        for name in PLAIN_FIELDS[:4]:
            features[:, FEATURE_NAMES.index(name)] = column()
    amount = column()
    probability = column() if draw(st.booleans()) else None
    return features, amount, probability


def plain_evaluate(rules: tuple[Rule, ...], features: np.ndarray | None, amount: np.ndarray,
                   probability: np.ndarray | None) -> list[list[bool]]:
    """Per transaction, per rule, per condition, in plain Python floats."""
    def value(field: str, i: int) -> float | None:
        if field == "amount":
            return float(amount[i])
        if field == "fraud_probability":
            return None if probability is None else float(probability[i])
        return None if features is None else float(features[i, FEATURE_NAMES.index(field)])

    def holds(c: Condition, x: float | None) -> bool:
        if x is None or math.isnan(x):
            return False
        if c.op in ("in", "not in"):
            members = c.value if isinstance(c.value, tuple) else (c.value,)
            found = any(x == m for m in members)
            return found if c.op == "in" else not found
        v = float(c.value)  # type: ignore[arg-type]
        return {"<": x < v, "<=": x <= v, ">": x > v, ">=": x >= v, "==": x == v, "!=": x != v}[c.op]

    return [[all(holds(c, value(c.field, i)) for c in r.conditions) for r in rules] for i in range(amount.shape[0])]


@FEW
@given(rules=plain_rules(), batch=plain_batches())
def test_compiled_evaluation_matches_a_plain_interpreter(
    rules: tuple[Rule, ...], batch: tuple[np.ndarray | None, np.ndarray, np.ndarray | None]
) -> None:
    features, amount, probability = batch
    hits = RuleSet(rules).evaluate(features, amount, probability)
    n = amount.shape[0]
    assert hits.hits.shape == (n, len(rules)) and hits.hits.dtype == bool and hits.rules == rules
    np.testing.assert_array_equal(hits.hits, np.array(plain_evaluate(rules, features, amount, probability),
                                                      dtype=bool).reshape(n, len(rules)))


@pytest.mark.parametrize("size", [0, 1, 2, SCAN_MEMBERS, SCAN_MEMBERS + 1, 2 * SCAN_MEMBERS + 1, 100, 257])
def test_set_membership_of_every_member_and_every_gap(size: int) -> None:
    # Members 0, 3, 6, …: each one and each value beside it, so every halving step meets a hit and a miss.
    members = tuple(3.0 * k for k in range(size))
    ruleset = RuleSet(tuple(Rule(op, (Condition("amount", op, members),), Decision.REVIEW, "R", op)
                            for op in ("in", "not in")))
    amount = np.array([*np.arange(-2.0, 3.0 * size + 2.0), math.inf, -math.inf, math.nan])
    hits = ruleset.evaluate(None, amount)
    np.testing.assert_array_equal(hits.hits[:, 0], [x in members for x in amount.tolist()])
    np.testing.assert_array_equal(hits.hits[:, 1], [not math.isnan(x) and x not in members for x in amount.tolist()])


def test_inputs_in_other_dtypes_and_layouts_are_evaluated_alike() -> None:
    ruleset = RuleSet((Rule("r", (Condition(FEATURE_NAMES[1], ">=", 1.0), Condition("amount", "in", (2.0, 3.0))),
                            Decision.DECLINE, "R", "r"),))
    wide = np.zeros((3, 2 * len(FEATURE_NAMES)))
    wide[:, 2] = [0.0, 1.0, 5.0]  # column 1 of every other column
    hits = ruleset.evaluate(wide[:, ::2], np.array([2, 2, 4], dtype=np.int32), np.ones(3, dtype=np.float32))
    np.testing.assert_array_equal(hits.hits[:, 0], [False, True, False])


# --- precedence -----------------------------------------------------------------------------------

def reference_decision(base: Decision, enforce_hits: set[Decision]) -> Decision:
    """docs/rules.md: allowlist wins, then any DECLINE, then REVIEW raises APPROVE; otherwise base."""
    if Decision.APPROVE in enforce_hits:
        return Decision.APPROVE
    if Decision.DECLINE in enforce_hits:
        return Decision.DECLINE
    if Decision.REVIEW in enforce_hits and base == Decision.APPROVE:
        return Decision.REVIEW
    return base


def _rule(name: str, action: Decision, *, shadow: bool) -> Rule:
    return Rule(name, (Condition("amount", ">", 0.0),), action, name.upper(), name, shadow=shadow)


def test_precedence_over_every_combination_of_hits_and_base_decision() -> None:
    actions = list(Decision)
    rules = tuple(_rule(f"{'shadow' if s else 'enforce'}_{a.name}", a, shadow=s)
                  for s in (False, True) for a in actions)
    rows, bases, expected = [], [], []
    for pattern in itertools.product([False, True], repeat=len(rules)):
        for base in actions:
            rows.append(pattern)
            bases.append(base)
            enforce_hits = {r.action for r, hit in zip(rules, pattern, strict=True) if hit and not r.shadow}
            expected.append(reference_decision(base, enforce_hits))
    assert len(rows) == 2 ** 6 * 3
    base_array = np.array(bases, dtype=np.int8)
    decided = RuleHits(rules, np.array(rows, dtype=bool)).decide(base_array)
    assert decided.dtype == np.int8
    np.testing.assert_array_equal(decided, np.array(expected, dtype=np.int8))
    np.testing.assert_array_equal(base_array, bases)  # the input is not modified



@FEW
@given(rules=plain_rules(), data=st.data())
def test_decide_matches_the_precedence_reference(rules: tuple[Rule, ...], data: st.DataObject) -> None:
    n = data.draw(st.integers(0, 30))
    hits = np.array(data.draw(st.lists(st.lists(st.booleans(), min_size=len(rules), max_size=len(rules)),
                                       min_size=n, max_size=n)), dtype=bool).reshape(n, len(rules))
    base = np.array(data.draw(st.lists(st.sampled_from(list(Decision)), min_size=n, max_size=n)), dtype=np.int8)
    expected = [reference_decision(Decision(b), {r.action for r, hit in zip(rules, row, strict=True)
                                                 if hit and not r.shadow})
                for b, row in zip(base.tolist(), hits.tolist(), strict=True)]
    decided = RuleHits(rules, hits).decide(base)
    np.testing.assert_array_equal(decided, np.array(expected, dtype=np.int8))
    # The effects a RuleSet precomputes at load give the same decisions as those derived from the rules.
    compiled = RuleSet(rules).evaluate(None, np.zeros(n))
    np.testing.assert_array_equal(RuleHits(rules, hits, compiled.effect).decide(base), decided)


@pytest.mark.parametrize("action", list(Decision))
def test_shadow_rules_are_counted_but_never_decide(action: Decision) -> None:
    ruleset = parse_ruleset(document(rules=[
        rule("shadow", when=when(op=">=", value=0), action=action.name, mode="shadow"),
    ])).rules
    hits = evaluate(ruleset, {"amount": np.array([1.0, 2.0, math.nan])}, 3)
    np.testing.assert_array_equal(hits.hits[:, 0], [True, True, False])
    assert hits.hits.sum() == 2
    for base in Decision:
        base_array = np.full(3, base, dtype=np.int8)
        np.testing.assert_array_equal(hits.decide(base_array), base_array)


# --- the shipped defaults -------------------------------------------------------------------------

def test_the_packaged_default_ruleset_parses() -> None:
    data = resources.files("service").joinpath("defaults/rules.json").read_bytes()
    ruleset = parse_ruleset(data, source="service/defaults/rules.json")
    assert ruleset.version
    assert ruleset.rules.rules
    assert ruleset.fallback.rules, "the fallback policy decides alone when the model is down; it needs rules"
    assert 0.0 <= ruleset.fallback_default_probability <= 1.0
    # The fallback has no fraud_probability: a fallback rule on it could never match.
    assert all(c.field != "fraud_probability" for r in ruleset.fallback.rules for c in r.conditions)
    # At least one fallback rule needs only the amount, so it works even when features are unavailable.
    assert any(all(c.field == "amount" for c in r.conditions) for r in ruleset.fallback.rules)
