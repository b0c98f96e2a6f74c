"""Named lists: loading (files, comments, refusals), list conditions in expressions (types checked at
load, with positions), the compiled VM against the interpreter, and scoring with a blocklist."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.encode import KeyHasher, country_code
from core.errors import RulesLoadError
from core.features import FEATURE_NAMES
from core.model import Thresholds
from core.rules.file import load_ruleset, parse_ruleset
from core.rules.lang import ExpressionError, NamedList, parse_condition, render
from core.rules.lang.interpret import interpret
from core.rules.lang.nodes import IDENTIFIERS, Identifier, ListMember, Logic, Node, Not
from core.rules.named_lists import load_lists
from core.rules.ruleset import Decision, Rule, RuleSet, Ruleset
from core.scoring import Scorer, Source

COLUMNS = (*FEATURE_NAMES, "amount", "fraud_probability")
PAN = "4111 1111 1111 1111"  # a test card number: passes the Luhn check
HASHER = KeyHasher(b"test-key")


def document(lists: dict[str, Any], rules: list[dict[str, Any]] | None = None,
             fallback: list[dict[str, Any]] | None = None) -> bytes:
    return orjson.dumps({"version": "t", "lists": lists, "rules": rules or [],
                         "fallback": {"rules": fallback or []}})


def keys_of(**columns: list[int]) -> np.ndarray:
    """The (IDENTIFIERS, n) key matrix, 0 (unknown) where a kind is not given."""
    n = len(next(iter(columns.values())))
    return np.array([columns.get(kind, [0] * n) for kind in IDENTIFIERS], dtype=np.uint64)


# --- loading --------------------------------------------------------------------------------------

def test_a_list_file_skips_comments_and_blank_lines_and_is_hashed_with_the_given_key(tmp_path: Path) -> None:
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "cards.txt").write_text("# stolen, reported 2026-11-20\n\ntok_a\n  tok_b  \n#tok_c\ntok_a\n")
    (tmp_path / "rules.json").write_bytes(document({
        "blocked_cards": {"kind": "card", "file": "lists/cards.txt"},
        "risky_countries": {"kind": "country", "values": ["KP", "ir"]},
        "risky_mccs": {"kind": "merchant_category", "values": ["7995"]}}))
    ruleset = load_ruleset(tmp_path / "rules.json", hasher=HASHER)
    cards = ruleset.lists["blocked_cards"]
    assert sorted(cards.values.tolist()) == sorted([HASHER.key("tok_a"), HASHER.key("tok_b")])
    assert cards.values.dtype == np.uint64
    assert ruleset.lists["risky_countries"].values.tolist() == sorted([country_code("KP") + 1, country_code("IR") + 1])
    assert ruleset.lists["risky_mccs"].values.tolist() == [7995.0]
    assert [p for p, _ in ruleset.list_files] == [tmp_path / "lists" / "cards.txt"]
    # Another key, other hashes: lists follow FRAUDSCORE_ID_HASH_KEY.
    other = load_ruleset(tmp_path / "rules.json")
    assert set(other.lists["blocked_cards"].values.tolist()).isdisjoint(cards.values.tolist())


@pytest.mark.parametrize(("lists", "fragment"), [
    ({"b": {"kind": "card", "file": "absent.txt"}}, "list 'b': cannot read file "),
    ({"b": {"kind": "cards", "values": []}}, "list 'b': kind must be one of card, customer"),
    ({"b": {"kind": "card"}}, "list 'b': expected {\"kind\", and \"file\" or \"values\""),
    ({"b": {"kind": "card", "values": ["x"], "file": "f"}}, "list 'b': expected {\"kind\""),
    ({"b": {"kind": "card", "values": ["ok", PAN]}}, "list 'b', value 1: looks like a card number (PAN)"),
    ({"b": {"kind": "device", "values": ["ok", " "]}}, "list 'b', value 1: empty value"),
    ({"b": {"kind": "card", "values": [1]}}, "list 'b': \"values\" must be a list of strings"),
    ({"b": {"kind": "country", "values": ["USA"]}}, "list 'b', value 0: expected an ISO 3166 alpha-2"),
    ({"b": {"kind": "merchant_category", "values": ["54"]}}, "list 'b', value 0: expected a 4-digit"),
    ({"bad-name": {"kind": "card", "values": []}}, "list 'bad-name': a list's name is letters"),
    ([], "\"lists\" must be an object"),
])
def test_a_bad_list_is_refused_naming_it(tmp_path: Path, lists: Any, fragment: str) -> None:
    with pytest.raises(RulesLoadError) as info:
        parse_ruleset(document(lists), source="r.json", base_dir=tmp_path)
    assert fragment in info.value.reason
    assert PAN not in str(info.value)  # never echo a card number


def test_a_pan_in_a_file_is_refused_with_the_file_and_line_and_without_the_number(tmp_path: Path) -> None:
    (tmp_path / "cards.txt").write_text("# header\ntok_1\n" + PAN + "\n")
    (tmp_path / "rules.json").write_bytes(document({"blocked": {"kind": "card", "file": "cards.txt"}}))
    with pytest.raises(RulesLoadError, match=r"list 'blocked', file .*cards.txt, line 3: looks like a card") as info:
        load_ruleset(tmp_path / "rules.json")
    assert PAN not in str(info.value)


# --- expressions: syntax and types, with positions ------------------------------------------------

KINDS = {"blocked_cards": "card", "vip_merchants": "merchant", "risky_mccs": "merchant_category",
         "risky_countries": "country"}


@pytest.mark.parametrize(("source", "column", "fragment"), [
    ("card > 1", 1, "'card' is an identifier, not a number"),
    ("amount > 1 and merchant == 3", 16, "'merchant' is an identifier"),
    ("merchant in @blocked_cards", 1, "@blocked_cards holds card values; 'merchant' cannot be in it"),
    ("amount in @blocked_cards", 1, "@blocked_cards holds card identifiers: only 'card'"),
    ("card in @blocked_card", 9, "unknown list @blocked_card; did you mean 'blocked_cards'?"),
    ("card in {1, 2}", 1, "'card' is an identifier"),
    ("card in @", 9, "expected a list's name right after '@'"),
    ("@blocked_cards", 1, "a named list only follows 'in' or 'not in'"),
    ("card in @vip_merchants or amount > 1", 1, "@vip_merchants holds merchant values"),
    ("card_new_country in @risky_countries", 1, "@risky_countries holds country identifiers"),
    ("not (merchant_category > 1) in @risky_mccs", 6, "the left side of 'in' must be a number, got a condition"),
])
def test_a_list_condition_with_a_type_error_is_refused_with_its_position(source: str, column: int,
                                                                        fragment: str) -> None:
    with pytest.raises(ExpressionError) as info:
        parse_condition(source, columns=COLUMNS, lists=KINDS)
    assert info.value.column == column, str(info.value)
    assert fragment in info.value.message, str(info.value)


def test_a_rule_naming_an_undefined_list_is_refused_with_the_rule() -> None:
    rules = [{"name": "blocked", "when": "card in @nope", "action": "DECLINE"}]
    with pytest.raises(RulesLoadError, match=r"rule 'blocked': \"when\" column 9: unknown list @nope"):
        parse_ruleset(document({}, rules))


@pytest.mark.parametrize("source", ["card in @blocked_cards", "merchant not in @vip_merchants and amount > 3",
                                    "merchant_category - 1 not in @risky_mccs", "not country in @risky_countries"])
def test_list_conditions_render_back_to_the_same_tree(source: str) -> None:
    tree = parse_condition(source, columns=COLUMNS, lists=KINDS)
    assert parse_condition(render(tree), columns=COLUMNS, lists=KINDS) == tree


# --- evaluation: the VM against the interpreter ---------------------------------------------------

FEW = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
KEYS = st.sampled_from([0, 1, 7, 2**63, 2**64 - 1, 12345, 99])


def lists_of(members: dict[str, list[int]]) -> dict[str, NamedList]:
    return {f"l_{kind}": NamedList(f"l_{kind}", kind, np.array(sorted(set(v)), dtype=np.uint64))
            for kind, v in members.items()}


def list_conditions(depth: int) -> st.SearchStrategy[Node]:
    leaf = st.builds(lambda kind, negated: ListMember(Identifier(kind), f"l_{kind}", negated),
                     st.sampled_from(IDENTIFIERS), st.booleans())
    if depth <= 1:
        return leaf
    sub = st.deferred(lambda: list_conditions(depth - 1))
    return st.one_of(leaf, sub.map(Not), st.builds(Logic, st.sampled_from(["and", "or"]), sub, sub))


@FEW
@given(trees=st.lists(list_conditions(3), min_size=1, max_size=3), data=st.data())
def test_the_compiled_vm_matches_the_interpreter_on_lists(trees: list[Node], data: st.DataObject) -> None:
    # Up to 40 members: past the scan length, so the binary search is exercised too.
    members = {k: data.draw(st.lists(st.one_of(KEYS, st.integers(1, 2**64 - 1)), max_size=40)) for k in IDENTIFIERS}
    lists = lists_of(members)
    n = data.draw(st.integers(0, 12))
    # Keys drawn from the members too, so that hits happen.
    pool = st.one_of(KEYS, *(st.sampled_from(v) for v in members.values() if v))
    keys = {k: data.draw(st.lists(pool, min_size=n, max_size=n)) for k in IDENTIFIERS}
    rules = RuleSet(tuple(Rule(f"r{i}", (), Decision.REVIEW, "R", "r", expression=t) for i, t in enumerate(trees)),
                    lists)
    hits = rules.evaluate(None, np.zeros(n), keys=keys_of(**keys)).hits
    rows = [{kind: keys[kind][i] for kind in IDENTIFIERS} for i in range(n)]
    expected = np.array([[bool(interpret(t, row, lists)) for t in trees] for row in rows], dtype=bool)
    np.testing.assert_array_equal(hits, expected.reshape(n, len(trees)))


def test_an_unknown_identifier_is_in_no_list_and_not_out_of_any() -> None:
    lists = lists_of({"card": [5], "device": [6]})
    trees = [parse_condition(s, columns=COLUMNS, lists={n: v.kind for n, v in lists.items()})
             for s in ("card in @l_card", "card not in @l_card", "device not in @l_device")]
    rules = RuleSet(tuple(Rule(f"r{i}", (), Decision.REVIEW, "R", "r", expression=t) for i, t in enumerate(trees)),
                    lists)
    hits = rules.evaluate(None, np.zeros(3), keys=keys_of(card=[5, 0, 9], device=[0, 0, 7])).hits
    np.testing.assert_array_equal(hits, [[True, False, False], [False, False, False], [False, True, True]])
    # Without keys at all, no list condition holds, either way.
    assert not rules.evaluate(None, np.zeros(2)).hits.any()
    with pytest.raises(ValueError, match="keys"):
        rules.evaluate(None, np.zeros(2), keys=np.zeros((len(IDENTIFIERS), 3), dtype=np.uint64))


def test_code_lists_match_the_column() -> None:
    ruleset = parse_ruleset(document({"risky": {"kind": "merchant_category", "values": ["7995", "5967"]}},
                                     [{"name": "mcc", "when": "merchant_category in @risky", "action": "REVIEW"}]))
    features = np.zeros((3, len(FEATURE_NAMES)))
    features[:, FEATURE_NAMES.index("merchant_category")] = [7995, 5411, np.nan]
    assert ruleset.rules.evaluate(features, np.zeros(3)).hits[:, 0].tolist() == [True, False, False]


# --- scoring: a blocklist declines whatever the model says; an allowlist approves -----------------

def blocklist_ruleset(tmp_path: Path) -> Ruleset:
    (tmp_path / "blocked.txt").write_text("tok_stolen\n")
    (tmp_path / "rules.json").write_bytes(document(
        {"blocked_cards": {"kind": "card", "file": "blocked.txt"},
         "vip": {"kind": "customer", "values": ["cust_vip"]},
         "sanctioned": {"kind": "country", "values": ["KP"]}},
        [{"name": "blocked_card", "when": "card in @blocked_cards", "action": "DECLINE", "reason_code": "R_BLOCKED"},
         {"name": "vip", "when": "customer in @vip", "action": "APPROVE", "reason_code": "R_VIP"}],
        [{"name": "blocked_card", "when": "card in @blocked_cards or country in @sanctioned", "action": "DECLINE",
          "reason_code": "R_BLOCKED", "probability": 0.99}]))
    return load_ruleset(tmp_path / "rules.json", hasher=HASHER)


class _ApprovingForest:
    def predict(self, features: np.ndarray) -> np.ndarray:
        return np.zeros(features.shape[0])


class _Model:
    forest = _ApprovingForest()
    thresholds = Thresholds(review=0.5, decline=0.9)
    version = "m"


def test_a_blocklisted_card_is_declined_with_the_rules_reason_even_when_the_model_approves(tmp_path: Path) -> None:
    scorer = Scorer(_Model(), blocklist_ruleset(tmp_path), top_reasons=0)  # type: ignore[arg-type]
    cards = [HASHER.key("tok_stolen"), HASHER.key("tok_fine"), 0, HASHER.key("tok_stolen")]
    customers = [0, 0, 0, HASHER.key("cust_vip")]
    out = scorer.score(np.zeros((4, len(FEATURE_NAMES))), np.ones(4), keys=keys_of(card=cards, customer=customers))
    # The allowlisted customer wins over the blocklist (an APPROVE rule is the strongest).
    assert out.decision.tolist() == [Decision.DECLINE, Decision.APPROVE, Decision.APPROVE, Decision.APPROVE]
    assert out.source.tolist() == [Source.RULES, Source.MODEL, Source.MODEL, Source.MODEL]
    assert [r.code for r in out.reasons[0]] == ["R_BLOCKED"]
    assert [[r.code for r in reasons] for reasons in out.reasons[1:3]] == [[], []]
    # In fallback, the same lists, and the country list on its codes (unknown country -1 matches nothing).
    fb = scorer.fallback(None, np.ones(3), keys=keys_of(card=[cards[0], cards[1], 0],
                                                        country=[0, country_code("KP") + 1, 0]))
    assert fb.decision.tolist() == [Decision.DECLINE, Decision.DECLINE, Decision.APPROVE]
    assert fb.fraud_probability.tolist()[:2] == [0.99, 0.99]


def test_the_lists_parse_with_the_default_hasher_as_replay_uses(tmp_path: Path) -> None:
    lists, files = load_lists({"b": {"kind": "ip", "values": ["192.0.2.1"]}}, base_dir=tmp_path, hasher=KeyHasher())
    assert lists["b"].values.tolist() == [KeyHasher().key("192.0.2.1")] and files == ()
