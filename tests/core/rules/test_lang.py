"""core.rules.lang: parser errors with positions, every operator against the interpreter, types,
precedence, and a property test of the compiled VM against the plain interpreter."""

from __future__ import annotations

import math

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.errors import RulesLoadError
from core.features import FEATURE_NAMES
from core.rules.file import parse_ruleset
from core.rules.lang import ExpressionError, parse_condition, render
from core.rules.lang.interpret import interpret
from core.rules.lang.nodes import Arithmetic, Call, Compare, Logic, Member, Name, Negate, Node, Not, Number
from core.rules.lang.parser import MAX_DEPTH, parse
from core.rules.ruleset import Decision, Rule, RuleSet

FEW = settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

COLUMNS = (*FEATURE_NAMES, "amount", "fraud_probability")
# Named in the tests: both ends of the feature matrix, one inside, and the extra fields.
TEST_COLUMNS = (FEATURE_NAMES[0], "card_txn_count_10m", FEATURE_NAMES[-1], "amount", "fraud_probability")


def condition(source: str) -> Node:
    return parse_condition(source, columns=COLUMNS)


Batch = tuple[np.ndarray | None, np.ndarray, np.ndarray | None]


def batch(columns: dict[str, np.ndarray], n: int) -> Batch:
    """features (noise in every feature not named; None if none is), amount (NaN if not named),
    fraud_probability (None if not named): as the scorer passes them."""
    features = None
    if any(c in FEATURE_NAMES for c in columns):
        features = np.random.default_rng(n).normal(0.0, 3.0, (n, len(FEATURE_NAMES)))
        for name, values in columns.items():
            if name in FEATURE_NAMES:
                features[:, FEATURE_NAMES.index(name)] = values
    return features, columns.get("amount", np.full(n, math.nan)), columns.get("fraud_probability")


def run(trees: list[Node], columns: dict[str, np.ndarray], n: int) -> np.ndarray:
    """Hits of `trees` (one rule each), compiled together and run by the VM."""
    rules = RuleSet(tuple(Rule(f"r{i}", (), Decision.REVIEW, "R", "r", expression=t) for i, t in enumerate(trees)))
    hits = rules.evaluate(*batch(columns, n))
    assert hits.hits.shape == (n, len(trees)) and hits.hits.dtype == bool
    return hits.hits


def reference(trees: list[Node], columns: dict[str, np.ndarray], n: int) -> np.ndarray:
    """The interpreter, row by row, over the same arrays; an absent column is left out of the row."""
    features, amount, probability = batch(columns, n)
    rows: list[dict[str, float]] = []
    for i in range(n):
        row = {"amount": float(amount[i])}
        if probability is not None:
            row["fraud_probability"] = float(probability[i])
        if features is not None:
            row.update({name: float(features[i, k]) for k, name in enumerate(FEATURE_NAMES)})
        rows.append(row)
    return np.array([[bool(interpret(t, row)) for t in trees] for row in rows], dtype=bool).reshape(n, len(trees))


# --- parser and checker errors, with exact positions ----------------------------------------------

ERRORS = [
    # (source, 1-based column, a fragment of the message)
    ("", 1, "expected an expression, got nothing"),
    ("   ", 4, "expected an expression, got nothing"),
    ("(amount > 5", 12, "expected ')' to close the '(' at column 1"),
    ("amount > 5)", 11, "unmatched ')'"),
    ("abs(amount > 5", 15, "expected ')' to close the call of 'abs' at column 1"),
    ("amout > 5", 1, "unknown name 'amout'; did you mean 'amount'?"),
    ("card_txn_count_10min > 5", 1, "did you mean 'card_txn_count_10m'?"),
    ("sqrt(amount) > 5", 1, "unknown function 'sqrt' (the functions are abs, min, max)"),
    ("mx(amount, 1) > 5", 1, "unknown function 'mx'; did you mean 'max'?"),
    ("abs(amount, 1) > 5", 1, "abs() takes exactly 1 argument, got 2"),
    ("min(amount) > 5", 1, "min() takes at least 2 arguments, got 1"),
    ("amount > 5 amount", 12, "expected an operator, 'and', 'or' or the end of the expression, got 'amount'"),
    ("amount > 5 and", 15, "expected a number, a name, '-', 'not' or '(', got nothing"),
    ('country == "US"', 12, "string literals are not supported"),
    ("country == 'US'", 12, "merchant_category in {5967, 7995}"),
    ("amount < 5 < 10", 12, "comparisons do not chain"),
    ("amount in {1} in {2}", 15, "comparisons do not chain"),
    ("amount.real > 5", 7, "attribute access is not part of the language"),
    ("amount(1) > 5", 1, "'amount' is a column, not a function"),
    ("abs > 5", 1, "'abs' is a function"),
    ("__import__(amount) > 1", 1, "unknown function '__import__'"),
    ("__import__('os')", 12, "string literals are not supported"),
    ("lambda x: x", 9, "lambdas, slices and annotations are not part of the language"),
    ("amount[0] > 1", 7, "indexing is not part of the language"),
    ("{1} > 1", 1, "a set of values only follows 'in' or 'not in'"),
    ("(abs)(amount) > 1", 6, "only abs, min and max can be called, by name"),
    ("amount = 5", 8, "expected '==' to compare"),
    ("amount > 5 && amount < 9", 12, "expected 'and'"),
    ("amount in (1, 2)", 11, "expected a set of numbers such as {1, 2, 3} after 'in', got '('"),
    ("amount in {1, amount}", 15, "a set holds number literals only; got 'amount'"),
    ("amount in {1 2}", 14, "expected ',' or '}' between the members of the set at column 11"),
    ("amount in {1, 2", 16, "expected ',' or '}' between the members of the set at column 11, got the end"),
    ("amount in {1,", 14, "the set at column 11 is not closed"),
    ("2abc > 1", 2, "expected an operator after the number '2'"),
    ("amount > 5 # big", 12, "comments belong in the rule's \"note\""),
    # types
    ("amount", 1, "a rule's \"when\" must be a condition (true or false), got a number"),
    ("amount + 1", 1, "must be a condition (true or false), got a number"),
    ("amount > 1 and 3", 16, "the right operand of 'and' must be a condition (true or false), got a number"),
    ("not amount", 5, "the operand of 'not' must be a condition"),
    ("(amount > 1) > 0", 2, "the left side of '>' must be a number, got a condition"),
    ("amount + (amount > 1) > 0", 11, "the right operand of '+' must be a number, got a condition"),
    ("-(amount > 1) < 0", 3, "the operand of unary '-' must be a number"),
    ("abs(amount > 1) > 0", 5, "argument 1 of abs() must be a number"),
    ("max(1, amount < 2) > 0", 8, "argument 2 of max() must be a number"),
    ("(amount > 1) in {1}", 2, "the left side of 'in' must be a number"),
]


@pytest.mark.parametrize(("source", "column", "fragment"), ERRORS, ids=[e[0] or "empty" for e in ERRORS])
def test_a_bad_expression_is_refused_with_its_position(source: str, column: int, fragment: str) -> None:
    with pytest.raises(ExpressionError) as info:
        condition(source)
    assert info.value.column == column, str(info.value)
    assert fragment in info.value.message, str(info.value)
    # The message shows the expression with a caret under the column.
    lines = str(info.value).splitlines()
    assert lines[0].startswith(f"column {column}: ")
    assert lines[-2] == f"    {source}" and lines[-1] == " " * (3 + column) + "^"


def test_nesting_deeper_than_the_limit_is_refused_not_a_crash() -> None:
    condition("(" * (MAX_DEPTH - 2) + "amount > 1" + ")" * (MAX_DEPTH - 2))
    for deep in ("(" * 500 + "amount > 1" + ")" * 500, "not " * 500 + "amount > 1", "-" * 500 + "amount > 1"):
        with pytest.raises(ExpressionError, match="nested too deeply"):
            condition(deep)


def test_a_bad_expression_in_a_file_names_the_rule_the_column_and_what_was_expected() -> None:
    data = orjson.dumps({"rules": [{"name": "fine", "when": "amount > 1", "action": "REVIEW"},
                                   {"name": "typo", "when": "amount > 1 and card_txn_cuont_10m > 3",
                                    "action": "DECLINE"}]})
    with pytest.raises(RulesLoadError) as info:
        parse_ruleset(data, source="r.json")
    reason = info.value.reason
    assert reason.startswith("rule 'typo': \"when\" column 16: unknown name 'card_txn_cuont_10m'; "
                             "did you mean 'card_txn_count_10m'?"), reason
    assert reason.endswith("    amount > 1 and card_txn_cuont_10m > 3\n" + " " * 19 + "^")


# --- precedence and the tree ----------------------------------------------------------------------

A, B = Name("amount"), Name("fraud_probability")


@pytest.mark.parametrize(("source", "tree"), [
    ("amount > 1 or amount < 0 and fraud_probability > 0.5",
     Logic("or", Compare(">", A, Number(1)), Logic("and", Compare("<", A, Number(0)), Compare(">", B, Number(0.5))))),
    ("not amount > 1 and amount < 5",
     Logic("and", Not(Compare(">", A, Number(1))), Compare("<", A, Number(5)))),
    ("not not amount > 1", Not(Not(Compare(">", A, Number(1))))),
    ("amount + 2 * fraud_probability > 3",
     Compare(">", Arithmetic("+", A, Arithmetic("*", Number(2), B)), Number(3))),
    ("amount - 1 - 2 == amount / 2 / 4",
     Compare("==", Arithmetic("-", Arithmetic("-", A, Number(1)), Number(2)),
             Arithmetic("/", Arithmetic("/", A, Number(2)), Number(4)))),
    ("-amount * 2 < -3", Compare("<", Arithmetic("*", Negate(A), Number(2)), Number(-3))),
    ("(amount + 1) * 2 >= 0", Compare(">=", Arithmetic("*", Arithmetic("+", A, Number(1)), Number(2)), Number(0))),
    ("amount - 1 not in [1, -2, 2.5e1]", Member(Arithmetic("-", A, Number(1)), (1.0, -2.0, 25.0), negated=True)),
    ("max(amount, 1, abs(fraud_probability)) != .5",
     Compare("!=", Call("max", (A, Number(1), Call("abs", (B,)))), Number(0.5))),
    ("amount in {}", Member(A, ())),
])
def test_precedence_and_associativity(source: str, tree: Node) -> None:
    assert condition(source) == tree
    assert condition(render(tree)) == tree


# --- every operator and function, against the interpreter and by hand -----------------------------

SPECIAL = np.array([math.nan, math.inf, -math.inf, 0.0, -0.0, 1.0, -1.0, 2.5, 5.0, 1e300])


def grid() -> dict[str, np.ndarray]:
    """Every pair of special values in amount × fraud_probability."""
    a, b = np.meshgrid(SPECIAL, SPECIAL)
    return {"amount": a.ravel(), "fraud_probability": b.ravel()}


EXPRESSIONS = [
    *(f"amount {op} fraud_probability" for op in ("<", "<=", ">", ">=", "==", "!=")),
    *(f"amount {op} 2.5" for op in ("<", "<=", ">", ">=", "==", "!=")),
    *(f"1 {op} amount" for op in ("<", "<=", ">", ">=", "==", "!=")),
    *(f"amount {op} fraud_probability > 1" for op in ("+", "-", "*", "/")),
    *(f"amount {op} fraud_probability < 1" for op in ("+", "-", "*", "/")),
    *(f"amount {op} fraud_probability == amount {op} fraud_probability" for op in ("+", "-", "*", "/")),
    "-amount > 0", "-amount == -amount", "abs(amount) >= 2.5", "abs(-amount) == abs(amount)",
    "min(amount, fraud_probability) < 1", "max(amount, fraud_probability) > 1",
    "min(amount, fraud_probability, 2) == 2", "max(amount, 0, fraud_probability) >= 0",
    "1 / min(amount, fraud_probability) < 0", "1 / max(amount, fraud_probability) > 0",
    "amount in {0, 1, 5}", "amount not in {0, 1, 5}", "amount + fraud_probability in [2, 6]",
    "amount * 2 not in [2, 10]", "amount in {}", "amount not in {}",
    "amount > 1 and fraud_probability > 1", "amount > 1 or fraud_probability > 1",
    "not amount > 1", "not (amount > 1 or fraud_probability < 1)", "not amount != fraud_probability",
    "amount / 0 > 0", "amount / 0 < 0", "amount / 0 != amount / 0", "0 / amount == 0",
]


def test_every_operator_and_function_matches_the_interpreter() -> None:
    trees = [condition(e) for e in EXPRESSIONS]
    columns = grid()
    n = columns["amount"].shape[0]
    np.testing.assert_array_equal(run(trees, columns, n), reference(trees, columns, n))


@pytest.mark.parametrize(("source", "amount", "expected"), [
    # A comparison with NaN is false, even != and not in; `not` then makes it true.
    ("amount != 1", math.nan, False), ("amount not in {1}", math.nan, False), ("amount == amount", math.nan, False),
    ("not (amount > 5)", math.nan, True), ("not amount <= 5", math.nan, True),
    # Arithmetic is IEEE: NaN propagates, x/0 is ±inf, 0/0 NaN.
    ("amount + 1 > 0", math.nan, False), ("amount / 0 == 1 / 0", 2.0, True), ("amount / 0 < 0", -2.0, True),
    ("amount / 0 == amount / 0", 0.0, False), ("amount / -0 < 0", 3.0, True),
    ("amount - amount == 0", math.inf, False), ("amount * 0 == 0", math.inf, False),
    ("min(amount, 1) == 1", math.nan, False), ("max(amount, 1) >= 1", math.nan, False),
    ("abs(amount) == 3", -3.0, True), ("-amount == 3", -3.0, True),
    ("amount in {-0.0}", 0.0, True), ("amount * 1e300 > 1e308", 1e300, True),
])
def test_semantics_by_hand(source: str, amount: float, expected: bool) -> None:
    tree = condition(source)
    assert interpret(tree, {"amount": amount}) is expected
    assert run([tree], {"amount": np.array([amount])}, 1)[0, 0] == expected


def test_absent_columns_read_as_nan() -> None:
    # fraud_probability is absent in fallback, the features when they could not be computed.
    trees = [condition(s) for s in ("fraud_probability < 2", "not fraud_probability > 2",
                                    "card_txn_count_10m >= 0", "not card_txn_count_10m >= 0",
                                    "amount > 0 or fraud_probability > 0")]
    rules = RuleSet(tuple(Rule(f"r{i}", (), Decision.REVIEW, "R", "r", expression=t) for i, t in enumerate(trees)))
    hits = rules.evaluate(None, np.array([1.0, 2.0]))
    np.testing.assert_array_equal(hits.hits, [[False, True, False, True, True]] * 2)


def test_the_list_form_and_the_expression_form_give_the_same_hits() -> None:
    listed = {"name": "burst", "action": "REVIEW", "when": [
        {"field": "card_txn_count_10m", "op": ">=", "value": 5}, {"field": "amount", "op": "<", "value": 10},
        {"field": "merchant_category", "op": "not in", "value": [5967, 7995]}]}
    written = {**listed, "name": "burst_text",
               "when": "card_txn_count_10m >= 5 and amount < 10 and merchant_category not in {5967, 7995}"}
    ruleset = parse_ruleset(orjson.dumps({"rules": [listed, written]})).rules
    assert ruleset.rules[0].tree() == ruleset.rules[1].tree()
    rng = np.random.default_rng(3)
    n = 200
    columns = {"card_txn_count_10m": rng.integers(0, 9, n).astype(float), "amount": rng.uniform(0, 20, n),
               "merchant_category": rng.choice([5967.0, 7995.0, 5411.0, math.nan], n)}
    hits = run([r.tree() for r in ruleset.rules], columns, n)
    np.testing.assert_array_equal(hits[:, 0], hits[:, 1])
    assert 0 < hits[:, 0].sum() < n


# --- property: compiled VM == interpreter on random well-typed trees ------------------------------

LITERALS = st.one_of(st.integers(-3, 3).map(float), st.sampled_from([0.5, 2.5, 1e300, -0.0, 0.0]))


def numbers(depth: int) -> st.SearchStrategy[Node]:
    leaves = st.one_of(LITERALS.map(Number), st.sampled_from(TEST_COLUMNS).map(Name))
    if depth <= 0:
        return leaves
    sub = st.deferred(lambda: numbers(depth - 1))
    return st.one_of(
        leaves,
        # A minus on a literal parses as a negative literal; keep the tree canonical.
        sub.filter(lambda n: not isinstance(n, Number)).map(Negate),
        st.builds(Arithmetic, st.sampled_from(["+", "-", "*", "/"]), sub, sub),
        st.builds(lambda a: Call("abs", (a,)), sub),
        st.builds(Call, st.sampled_from(["min", "max"]), st.lists(sub, min_size=2, max_size=3).map(tuple)),
    )


def conditions(depth: int) -> st.SearchStrategy[Node]:
    num = numbers(max(depth - 1, 0))
    comparisons = st.one_of(
        st.builds(Compare, st.sampled_from(["<", "<=", ">", ">=", "==", "!="]), num, num),
        st.builds(Member, num, st.lists(LITERALS, max_size=20).map(tuple), st.booleans()),
    )
    if depth <= 1:
        return comparisons
    sub = st.deferred(lambda: conditions(depth - 1))
    return st.one_of(comparisons, sub.map(Not), st.builds(Logic, st.sampled_from(["and", "or"]), sub, sub))


CELLS = st.one_of(st.integers(-3, 3).map(float), st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 0.5]))


@FEW
@given(trees=st.lists(conditions(4), min_size=1, max_size=4), data=st.data())
def test_the_compiled_vm_matches_the_interpreter(trees: list[Node], data: st.DataObject) -> None:
    # Through the text: render, parse back to the same tree, then compile.
    sources = [render(t) for t in trees]
    parsed = [condition(s) for s in sources]
    assert parsed == trees, sources
    n = data.draw(st.one_of(st.sampled_from([0, 1]), st.integers(0, 30)))
    present = [c for c in TEST_COLUMNS if c == "amount" or data.draw(st.booleans())]
    columns = {c: np.array(data.draw(st.lists(CELLS, min_size=n, max_size=n)), dtype=np.float64) for c in present}
    np.testing.assert_array_equal(run(parsed, columns, n), reference(parsed, columns, n), err_msg=str(sources))


def test_parse_refuses_what_the_checker_would_never_see() -> None:
    # Syntax first, then names: the first problem from the left is reported.
    with pytest.raises(ExpressionError, match="column 10: expected a number"):
        parse("nothing >")


def test_a_very_long_chain_is_refused_at_load_not_a_crash() -> None:
    # ~500 `or` links once overflowed Python's stack in the checker: refuse long rules cleanly.
    long_rule = " or ".join(f"amount == {k}" for k in range(600))
    with pytest.raises(RulesLoadError, match="too long"):
        parse_ruleset(orjson.dumps({"rules": [{"name": "long", "when": long_rule, "action": "REVIEW"}]}))
    fine = " or ".join(f"amount == {k}" for k in range(200))
    assert len(parse_ruleset(orjson.dumps({"rules": [{"name": "ok", "when": fine, "action": "REVIEW"}]})).rules.rules) == 1


@pytest.mark.parametrize("text", ["amount > 1e999", "amount in {1, 1e400}", "amount > -1e999", "amount > ١٢"])
def test_non_finite_literals_and_non_ascii_digits_are_refused(text: str) -> None:
    with pytest.raises(RulesLoadError):
        parse_ruleset(orjson.dumps({"rules": [{"name": "r", "when": text, "action": "REVIEW"}]}))
