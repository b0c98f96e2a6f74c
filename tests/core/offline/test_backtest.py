"""core.offline.backtest against a direct NumPy computation from replay_features on a small simulated history."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import orjson
import pytest

from core.encode import amount_major
from core.errors import DataError
from core.features import FEATURE_NAMES
from core.history.simulate import simulate
from core.history.table import History
from core.model import load_model_dir
from core.offline.backtest import BacktestReport, RuleBacktest, backtest, report_columns
from core.offline.replay import replay_features
from core.rules.file import parse_ruleset
from core.rules.ruleset import Decision, Ruleset
from core.scoring import Scorer, Source

APPROVE, REVIEW, DECLINE = int(Decision.APPROVE), int(Decision.REVIEW), int(Decision.DECLINE)
RULES = [
    {"name": "big_amount", "when": "amount > 300", "action": "DECLINE", "priority": 10},
    {"name": "busy_card", "when": [{"field": "card_txn_count_1h", "op": ">=", "value": 3}],
     "action": "REVIEW", "priority": 20},
    {"name": "burst_shadow", "when": "card_txn_count_10m >= 2", "action": "DECLINE", "mode": "shadow",
     "priority": 30},
    {"name": "reported_card", "when": "card_fraud_count_30d >= 1", "action": "REVIEW", "priority": 40},
    {"name": "never", "when": "amount < 0", "action": "REVIEW", "priority": 50},
]


def ruleset_of(rules: list[dict[str, object]]) -> Ruleset:
    """The same rules on the model path and as the fallback policy."""
    return parse_ruleset(orjson.dumps({"version": "bt-test", "rules": rules, "fallback": {"rules": rules}}))


@pytest.fixture(scope="module")
def history() -> History:
    return simulate(num_days=3, num_cards=300, num_merchants=70, seed=5)


def by_name(report: BacktestReport) -> dict[str, RuleBacktest]:
    return {r.name: r for r in report.rules}


def changes_of(rule: RuleBacktest) -> dict[tuple[Decision, Decision], int]:
    return {(c.before, c.after): c.count for c in rule.changes}


def expected_changes(off: np.ndarray, on: np.ndarray) -> dict[tuple[Decision, Decision], int]:
    differ = off != on
    return dict(Counter((Decision(a), Decision(b)) for a, b in zip(off[differ], on[differ], strict=True)))


def expected_hits(history: History, features: np.ndarray) -> dict[str, np.ndarray]:
    amount = amount_major(history.amount_minor, history.currency)
    column = {name: features[:, j] for j, name in enumerate(FEATURE_NAMES)}
    return {
        "big_amount": amount > 300,
        "busy_card": column["card_txn_count_1h"] >= 3,
        "burst_shadow": column["card_txn_count_10m"] >= 2,
        "reported_card": column["card_fraud_count_30d"] >= 1,
        "never": np.zeros(len(history), dtype=bool),
    }


@pytest.mark.parametrize("label_delay_ms", [None, 6 * 3_600_000])
def test_hits_precision_and_recall_match_numpy_on_the_replayed_features(
        history: History, label_delay_ms: int | None) -> None:
    report = backtest(history, ruleset_of(RULES), label_delay_ms=label_delay_ms)
    fraud = history.is_fraud == 1
    expected = expected_hits(history, replay_features(history, label_delay_ms=label_delay_ms))
    assert [r.name for r in report.rules] == [r["name"] for r in RULES]
    for rule in report.rules:
        hit = expected[rule.name]
        assert rule.hits == hit.sum(), rule.name
        assert rule.fraud_hits == (hit & fraud).sum(), rule.name
        assert rule.hit_rate == pytest.approx(hit.mean())
        assert rule.recall == pytest.approx((hit & fraud).sum() / fraud.sum())
        if hit.any():
            assert rule.precision == pytest.approx(fraud[hit].mean())
        assert rule.fraud_missed_by_model is None  # no model given
    # The small world must exercise the interesting cases, or the checks above prove little.
    assert 0 < by_name(report)["big_amount"].hits < len(history)
    assert by_name(report)["burst_shadow"].fraud_hits > 0
    totals = report.totals
    assert (totals.transactions, totals.fraud) == (len(history), fraud.sum())
    assert {s for s, _, _ in totals.decisions} == {Source.RULES_FALLBACK}
    assert sum(count for _, _, count in totals.decisions) == len(history)


def test_decisions_changed_by_an_enforce_decline_rule_and_a_shadow_rule_as_if_enforced(history: History) -> None:
    report = backtest(history, ruleset_of(RULES))
    hits = expected_hits(history, replay_features(history))
    review = hits["busy_card"] | hits["reported_card"]
    # Fallback: APPROVE, raised to REVIEW by a REVIEW hit, DECLINE by an enforced DECLINE hit.
    final = np.where(hits["big_amount"], DECLINE, np.where(review, REVIEW, APPROVE))
    without_big = np.where(review, REVIEW, APPROVE)
    big = by_name(report)["big_amount"]
    assert changes_of(big) == expected_changes(without_big, final)
    assert big.decisions_changed == (final != without_big).sum() > 0
    # The shadow rule changes nothing today; enforced, it would decline what it hits.
    shadow = by_name(report)["burst_shadow"]
    assert changes_of(shadow) == expected_changes(final, np.where(hits["burst_shadow"], DECLINE, final))
    assert shadow.decisions_changed > 0
    counts = Counter(final.tolist())
    assert {d: c for _, d, c in report.totals.decisions} == {Decision(d): c for d, c in counts.items()}


def test_a_rule_that_never_hits(history: History) -> None:
    never = by_name(backtest(history, ruleset_of(RULES)))["never"]
    assert (never.hits, never.fraud_hits, never.hit_rate, never.recall) == (0, 0, 0.0, 0.0)
    assert np.isnan(never.precision)
    assert never.changes == () and never.decisions_changed == 0


def test_an_allowlist_hides_the_declines_it_overrides(history: History) -> None:
    rules = [{"name": "allow_huge", "when": "amount > 1000", "action": "APPROVE", "priority": 1},
             {"name": "big_amount", "when": "amount > 300", "action": "DECLINE", "priority": 10}]
    report = by_name(backtest(history, ruleset_of(rules)))
    amount = amount_major(history.amount_minor, history.currency)
    assert report["big_amount"].hits == (amount > 300).sum()
    assert changes_of(report["big_amount"]) == {
        (Decision.APPROVE, Decision.DECLINE): int(((amount > 300) & (amount <= 1000)).sum())}
    # Without the allowlist those transactions would be declined by big_amount.
    assert changes_of(report["allow_huge"]) == {(Decision.DECLINE, Decision.APPROVE): int((amount > 1000).sum())}


def test_with_a_model_decisions_match_the_scorer(history: History, model_dir: Path) -> None:
    model = load_model_dir(model_dir)
    ruleset = ruleset_of(RULES)
    report = backtest(history, ruleset, model)
    features = replay_features(history)
    amount = amount_major(history.amount_minor, history.currency)
    scored = Scorer(model, ruleset, top_reasons=0).score(features, amount)
    counts = Counter(zip(scored.source.tolist(), scored.decision.tolist(), strict=True))
    assert {(s, d): c for s, d, c in report.totals.decisions} == {
        (Source(s), Decision(d)): c for (s, d), c in counts.items()}
    assert report.totals.model_version == model.version
    base_approve = scored.fraud_probability < model.thresholds.review
    fraud = history.is_fraud == 1
    for rule, hit in zip(report.rules, scored.hits.hits.T, strict=True):
        assert rule.fraud_missed_by_model == (hit & fraud & base_approve).sum(), rule.name


def test_a_history_without_fraud_labels_is_refused(history: History) -> None:
    columns = history.columns() | {"is_fraud": np.zeros(len(history), dtype=np.int8)}
    with pytest.raises(DataError, match="no transaction is labelled fraud") as caught:
        backtest(History.from_columns(columns), ruleset_of(RULES), source="unlabelled.csv")
    assert caught.value.column == "is_fraud" and caught.value.path == "unlabelled.csv"


def test_report_columns_hold_one_row_per_rule(history: History) -> None:
    report = backtest(history, ruleset_of(RULES))
    columns = report_columns(report)
    assert columns["rule"].tolist() == [r.name for r in report.rules]
    assert columns["mode"].tolist() == ["enforce", "enforce", "shadow", "enforce", "enforce"]
    big = by_name(report)["big_amount"]
    assert columns["approve_to_decline"][0] + columns["review_to_decline"][0] == big.decisions_changed
    assert np.isnan(columns["fraud_missed_by_model"]).all()
