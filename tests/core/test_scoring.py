"""core.scoring: thresholds, rule overrides and their source, reasons, risk score, and the fallback."""

from __future__ import annotations

import dataclasses
import math
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.features import FEATURE_NAMES
from core.history.table import History
from core.model import LoadedModel, Thresholds, load_model_dir
from core.offline.replay import replay_features
from core.reasons import REASON_CODES, REASON_OF_FEATURE
from core.rules.file import parse_ruleset
from core.rules.ruleset import Decision, Ruleset
from core.scoring import Scorer, Source, risk_score

MODEL_CODES = {r.code for r in REASON_CODES}
FEW = settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
ROWS = 3000


@pytest.fixture(scope="module")
def model(model_dir: Path) -> LoadedModel:
    return load_model_dir(model_dir)


@pytest.fixture(scope="module")
def features(small_history: History) -> np.ndarray:
    """Replayed features of the first rows of the small history (realistic values, NaN included)."""
    return replay_features(small_history)[:ROWS]


@pytest.fixture(scope="module")
def amount(small_history: History) -> np.ndarray:
    return small_history.amount_minor[:ROWS] / 100.0


def ruleset(rules: list[dict[str, Any]] | None = None, fallback: list[dict[str, Any]] | None = None,
            *, default_probability: float = 0.02) -> Ruleset:
    return parse_ruleset(orjson.dumps({
        "version": "rs-test", "rules": rules or [],
        "fallback": {"default_probability": default_probability, "rules": fallback or []},
    }))


def rule(name: str, field: str, op: str, value: Any, action: str, **more: Any) -> dict[str, Any]:
    return {"name": name, "when": [{"field": field, "op": op, "value": value}], "action": action,
            "reason_code": f"R_{name.upper()}", **more}


def expected_base(p: np.ndarray, t: Thresholds) -> np.ndarray:
    return np.where(p >= t.decline, Decision.DECLINE, np.where(p >= t.review, Decision.REVIEW, Decision.APPROVE))


# --- the model path -------------------------------------------------------------------------------

def test_decisions_follow_the_thresholds(model: LoadedModel, features: np.ndarray, amount: np.ndarray) -> None:
    out = Scorer(model, ruleset()).score(features, amount)
    p = model.forest.predict(features)
    np.testing.assert_array_equal(out.fraud_probability, p)
    np.testing.assert_array_equal(out.decision, expected_base(p, model.thresholds))
    assert out.decision.dtype == np.int8 and out.source.dtype == np.int8
    assert (out.source == Source.MODEL).all()
    assert not out.degraded
    assert out.model_version == model.version and out.ruleset_version == "rs-test"
    assert len(out) == ROWS and len(out.reasons) == ROWS
    # The model must produce all three decisions here, or this test shows little.
    assert set(np.unique(out.decision).tolist()) == {int(d) for d in Decision}


def test_a_probability_equal_to_a_threshold_takes_that_threshold(
    model: LoadedModel, features: np.ndarray, amount: np.ndarray
) -> None:
    p = np.unique(model.forest.predict(features))
    review, decline = float(p[len(p) // 3]), float(p[2 * len(p) // 3])
    moved = dataclasses.replace(model, thresholds=Thresholds(review=review, decline=decline))
    out = Scorer(moved, ruleset()).score(features, amount)
    at_review = out.fraud_probability == review
    at_decline = out.fraud_probability == decline
    assert at_review.any() and at_decline.any()
    assert (out.decision[at_review] == Decision.REVIEW).all()
    assert (out.decision[at_decline] == Decision.DECLINE).all()
    assert (out.decision[out.fraud_probability < review] == Decision.APPROVE).all()
    np.testing.assert_array_equal(out.decision, expected_base(out.fraud_probability, moved.thresholds))


def test_a_decline_rule_overrides_the_model_and_leads_the_reasons(
    model: LoadedModel, features: np.ndarray
) -> None:
    amount = np.where(np.arange(ROWS) % 2 == 0, 2000.0, 20.0)
    scorer = Scorer(model, ruleset([rule("big", "amount", ">=", 1000, "DECLINE")]))
    out = scorer.score(features, amount)
    base = Scorer(model, ruleset()).score(features, amount).decision
    big = amount >= 1000
    assert (out.decision[big] == Decision.DECLINE).all()
    np.testing.assert_array_equal(out.decision[~big], base[~big])
    changed = big & (base != Decision.DECLINE)
    assert changed.any() and (big & (base == Decision.DECLINE)).any()
    np.testing.assert_array_equal(out.source, np.where(changed, Source.RULES, Source.MODEL))
    for i in np.flatnonzero(big):
        assert out.reasons[i][0].code == "R_BIG" and out.reasons[i][0].description == "big"
    for i in np.flatnonzero(~big):
        assert all(r.code != "R_BIG" for r in out.reasons[i])


def test_an_allowlist_approves_and_a_rule_may_read_the_probability(
    model: LoadedModel, features: np.ndarray
) -> None:
    amount = np.where(np.arange(ROWS) % 3 == 0, 1.0, 50.0)
    p = model.forest.predict(features)
    cut = float(np.quantile(p, 0.5))
    scorer = Scorer(model, ruleset([
        rule("vip", "amount", "<", 5, "ALLOW", priority=1),
        rule("risky", "fraud_probability", ">=", cut, "REVIEW", priority=2),
    ]))
    out = scorer.score(features, amount)
    base = expected_base(p, model.thresholds)
    vip = amount < 5
    risky = p >= cut
    assert vip.any() and (vip & (base != Decision.APPROVE)).any()
    expected = base.copy()
    expected[risky & (base == Decision.APPROVE)] = Decision.REVIEW
    expected[vip] = Decision.APPROVE
    np.testing.assert_array_equal(out.decision, expected)
    np.testing.assert_array_equal(out.source, np.where(expected != base, Source.RULES, Source.MODEL))
    for i in range(ROWS):
        codes = [r.code for r in out.reasons[i] if r.code not in MODEL_CODES]
        assert codes == [c for c, hit in (("R_VIP", vip[i]), ("R_RISKY", risky[i])) if hit]


def test_shadow_rules_give_no_reason_and_no_decision(
    model: LoadedModel, features: np.ndarray, amount: np.ndarray
) -> None:
    out = Scorer(model, ruleset([rule("watch", "amount", ">=", 0, "DECLINE", mode="shadow")])).score(features, amount)
    plain = Scorer(model, ruleset()).score(features, amount)
    np.testing.assert_array_equal(out.decision, plain.decision)
    assert (out.source == Source.MODEL).all()
    assert out.reasons == plain.reasons
    assert out.hits.hits[:, 0].all()  # counted for metrics


@pytest.mark.parametrize("method", ["path", "shap"])
def test_reasons_are_the_top_positive_reason_codes_of_non_approvals(
    model: LoadedModel, features: np.ndarray, amount: np.ndarray, method: str
) -> None:
    out = Scorer(model, ruleset(), reasons_method=method).score(features, amount)
    attribute = model.forest.contributions if method == "shap" else model.forest.path_attributions
    attributions = attribute(features)[:, :-1]
    # Plain reference: add up each reason code's features, keep the positive ones, largest first.
    lengths = set()
    explained = 0
    for i, reasons in enumerate(out.reasons):
        if out.decision[i] == Decision.APPROVE:
            assert reasons == ()
            continue
        explained += 1
        totals: dict[str, float] = {}
        for j, name in enumerate(FEATURE_NAMES):
            code = REASON_OF_FEATURE[name].code
            totals[code] = totals.get(code, 0.0) + attributions[i, j]
        positive = sorted((w for w in totals.values() if w > 0), reverse=True)
        assert len(reasons) == min(3, len(positive))
        lengths.add(len(reasons))
        weights = [r.weight for r in reasons]
        assert weights == pytest.approx(positive[: len(reasons)], rel=1e-12)
        for r in reasons:
            assert r.code in MODEL_CODES and r.description
            assert r.weight == pytest.approx(totals[r.code], rel=1e-12)
    assert explained > 0 and 3 in lengths


def test_top_reasons_is_a_knob(model: LoadedModel, features: np.ndarray, amount: np.ndarray) -> None:
    out = Scorer(model, ruleset(), top_reasons=1).score(features, amount)
    assert max(len(r) for r in out.reasons) == 1


def test_without_a_model_score_raises(features: np.ndarray, amount: np.ndarray) -> None:
    with pytest.raises(RuntimeError, match="no model"):
        Scorer(None, ruleset()).score(features, amount)


# --- risk score -----------------------------------------------------------------------------------

def test_risk_score_bounds() -> None:
    # The 0..999 scale truncates: 0.0015 and 0.4996 do not round up.
    p = np.array([0.0, 0.0005, 0.001, 0.0015, 0.4996, 0.5, 0.999, 0.9999, 1.0, math.nan])
    scores = risk_score(p)
    assert scores.dtype == np.int32
    np.testing.assert_array_equal(scores, [0, 0, 1, 1, 499, 500, 999, 999, 999, 0])


@FEW
@given(st.lists(st.floats(0.0, 1.0), max_size=20))
def test_risk_score_is_monotone_and_within_0_999(values: list[float]) -> None:
    p = np.sort(np.array(values, dtype=np.float64))
    scores = risk_score(p)
    assert ((scores >= 0) & (scores <= 999)).all()
    assert (np.diff(scores) >= 0).all()


# --- the fallback ---------------------------------------------------------------------------------

def default_ruleset() -> Ruleset:
    return parse_ruleset(resources.files("service").joinpath("defaults/rules.json").read_bytes())


@pytest.mark.parametrize("with_model", [False, True])
def test_fallback_answers_degraded_from_rules(
    with_model: bool, model: LoadedModel, features: np.ndarray, amount: np.ndarray
) -> None:
    rs = default_ruleset()
    out = Scorer(model if with_model else None, rs).fallback(features, amount)
    assert out.degraded
    assert out.model_version == ""
    assert out.ruleset_version == rs.version
    assert (out.source == Source.RULES_FALLBACK).all()
    assert len(out) == ROWS and out.hits.hits.shape == (ROWS, len(rs.fallback.rules))
    assert ((out.fraud_probability >= rs.fallback_default_probability) & (out.fraud_probability <= 1)).all()
    # Reasons are exactly the enforce-mode fallback rules that hit.
    for i in range(ROWS):
        assert [r.code for r in out.reasons[i]] == [
            rule.reason_code for rule, hit in zip(rs.fallback.rules, out.hits.hits[i], strict=True)
            if hit and not rule.shadow
        ]


def test_fallback_without_features_still_evaluates_amount_only_rules() -> None:
    rs = default_ruleset()
    amount = np.array([5.0, 100.0, 5000.0, 12_000.0, math.nan])
    out = Scorer(None, rs).fallback(None, amount)
    np.testing.assert_array_equal(
        out.decision, [Decision.APPROVE, Decision.APPROVE, Decision.REVIEW, Decision.REVIEW, Decision.APPROVE])
    np.testing.assert_array_equal(out.fraud_probability, [0.02, 0.02, 0.2, 0.2, 0.02])
    assert [[r.code for r in reasons] for reasons in out.reasons] == [
        [], [], ["R_VERY_LARGE_AMOUNT"], ["R_VERY_LARGE_AMOUNT"], []]
    # Rules that need a feature cannot match without features: only the amount-only rule hits.
    amount_only = [all(c.field == "amount" for c in r.conditions) for r in rs.fallback.rules]
    assert not out.hits.hits[:, ~np.array(amount_only)].any()
    assert out.degraded and (out.source == Source.RULES_FALLBACK).all()


def test_fallback_with_features_applies_feature_rules(features: np.ndarray) -> None:
    rs = default_ruleset()
    burst = features.copy()
    burst[:, FEATURE_NAMES.index("card_txn_count_10m")] = 9.0
    burst[:, FEATURE_NAMES.index("card_fraud_count_30d")] = 0.0
    amount = np.full(ROWS, 3.0)
    out = Scorer(None, rs).fallback(burst, amount)
    assert (out.decision == Decision.DECLINE).all()  # the card-testing fallback rule declines
    assert (out.fraud_probability >= 0.8).all()
    assert all(reasons[0].code == "R_CARD_TESTING" for reasons in out.reasons)


@st.composite
def fallback_cases(draw: st.DrawFn) -> tuple[list[dict[str, Any]], float, np.ndarray]:
    count = draw(st.integers(0, 4))
    rules = [rule(f"r{i}", "amount", draw(st.sampled_from([">=", "<", "=="])), draw(st.sampled_from([0, 10, 50])),
                  draw(st.sampled_from(["DECLINE", "REVIEW", "APPROVE"])),
                  probability=draw(st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0])),
                  mode=draw(st.sampled_from(["enforce", "enforce", "shadow"])))
             for i in range(count)]
    amounts = np.array(draw(st.lists(st.sampled_from([0.0, 5.0, 10.0, 50.0, 99.0, math.nan]), max_size=10)))
    return rules, draw(st.sampled_from([0.0, 0.02, 0.3])), amounts


@FEW
@given(case=fallback_cases())
def test_fallback_probability_is_the_largest_of_default_and_enforced_hits(
    case: tuple[list[dict[str, Any]], float, np.ndarray]
) -> None:
    rules, default, amount = case
    rs = ruleset(fallback=rules, default_probability=default)
    out = Scorer(None, rs).fallback(None, amount)
    for i, a in enumerate(amount.tolist()):
        hit = [r for r in rules if r["mode"] == "enforce" and not math.isnan(a) and {
            ">=": a >= r["when"][0]["value"], "<": a < r["when"][0]["value"], "==": a == r["when"][0]["value"],
        }[r["when"][0]["op"]]]
        assert out.fraud_probability[i] == max([default, *(r["probability"] for r in hit)])
        actions = {r["action"] for r in hit}
        expected = ("APPROVE" if "APPROVE" in actions else "DECLINE" if "DECLINE" in actions
                    else "REVIEW" if "REVIEW" in actions else "APPROVE")
        assert out.decision[i] == Decision[expected]


def test_reasons_method_must_be_known(model: LoadedModel) -> None:
    with pytest.raises(ValueError, match="reasons_method"):
        Scorer(model, ruleset(), reasons_method="lime")
