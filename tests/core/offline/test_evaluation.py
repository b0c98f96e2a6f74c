"""core.offline.evaluation against brute-force references, on hand-made cases and random data."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.offline.evaluation import (
    average_precision,
    precision_recall_curve,
    recall_at_fpr,
    roc_auc,
    threshold_at_fpr,
)

FEW = settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


# --- references -----------------------------------------------------------------------------------

def reference_roc_auc(y: np.ndarray, s: np.ndarray) -> float:
    """P(score of a random fraud > score of a random legit), ties counting half: every pair."""
    pos, neg = s[y == 1], s[y == 0]
    total = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return total / (len(pos) * len(neg))


def _flags(y: np.ndarray, s: np.ndarray, t: float) -> tuple[int, int]:
    flagged = s >= t
    return int(np.sum(flagged & (y == 1))), int(np.sum(flagged & (y == 0)))


def reference_average_precision(y: np.ndarray, s: np.ndarray) -> float:
    """Sum over distinct thresholds, highest first, of (recall gained) × precision at that threshold."""
    pos = int(np.sum(y))
    total, last_recall = 0.0, 0.0
    for t in sorted(set(s.tolist()), reverse=True):
        tp, fp = _flags(y, s, t)
        recall = tp / pos
        total += (recall - last_recall) * tp / (tp + fp)
        last_recall = recall
    return total


def reference_recall_at_fpr(y: np.ndarray, s: np.ndarray, fpr: float) -> float:
    """Best recall over every threshold (including flagging nothing) whose FPR is ≤ fpr."""
    pos, neg = int(np.sum(y)), int(np.sum(y == 0))
    best = 0.0
    for t in [math.inf, *s.tolist()]:
        tp, fp = _flags(y, s, t)
        if fp / neg <= fpr:
            best = max(best, tp / pos)
    return best


def legit_rate(y: np.ndarray, s: np.ndarray, t: float) -> float:
    return float(np.sum(s[y == 0] >= t)) / float(np.sum(y == 0))


# --- strategies -----------------------------------------------------------------------------------

@st.composite
def labelled(draw: st.DrawFn, *, both: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Labels with both classes and scores drawn from a few values, so ties are common."""
    n = draw(st.integers(2 if both else 1, 40))
    y = np.array(draw(st.lists(st.sampled_from([0, 1]), min_size=n, max_size=n)), dtype=np.int64)
    if both:
        y[draw(st.integers(0, n - 1))] = 1
        y[(draw(st.integers(0, n - 2)) + 1 + int(np.flatnonzero(y == 1)[0])) % n] = 0
    pool = draw(st.sampled_from([
        st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.9, 1.0]),
        st.floats(-1e6, 1e6, allow_nan=False),
        st.integers(0, 3).map(float),
    ]))
    s = np.array(draw(st.lists(pool, min_size=n, max_size=n)), dtype=np.float64)
    return y, s


FPRS = st.one_of(
    st.sampled_from([0.0, 0.001, 0.01, 0.1, 0.29, 0.5, 1.0]),
    st.floats(0.0, 1.0),
    st.tuples(st.integers(0, 40), st.integers(1, 40)).map(lambda kn: min(kn[0] / kn[1], 1.0)),
)


# --- roc_auc --------------------------------------------------------------------------------------

def test_roc_auc_hand_made() -> None:
    y = np.array([0, 0, 1, 1])
    assert roc_auc(y, np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert roc_auc(y, np.array([0.9, 0.8, 0.2, 0.1])) == 0.0
    assert roc_auc(y, np.full(4, 0.3)) == 0.5
    # Pairs: (0.35 vs 0.1, 0.4) → 1 + 0, (0.8 vs both) → 2; 3 of 4.
    assert roc_auc(y, np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75, abs=1e-15)
    # A tie between a fraud and a legit counts half: (0.5 vs 0.5) → 0.5, (0.5 vs 0.1) → 1, (0.9 …) → 2.
    assert roc_auc(y, np.array([0.1, 0.5, 0.5, 0.9])) == pytest.approx(3.5 / 4, abs=1e-15)


@FEW
@given(data=labelled())
def test_roc_auc_matches_every_pair(data: tuple[np.ndarray, np.ndarray]) -> None:
    y, s = data
    assert roc_auc(y, s) == pytest.approx(reference_roc_auc(y, s), abs=1e-12)
    # Labels as booleans and the order of rows do not matter.
    order = np.random.default_rng(0).permutation(y.size)
    assert roc_auc(y[order].astype(bool), s[order]) == pytest.approx(roc_auc(y, s), abs=1e-12)


# --- average precision ----------------------------------------------------------------------------

def test_average_precision_hand_made() -> None:
    y = np.array([1, 0, 1, 0])
    # Ranked: fraud (P 1/1, R 1/2), legit, fraud (P 2/3, R 1), legit.
    assert average_precision(y, np.array([0.9, 0.8, 0.7, 0.1])) == pytest.approx(0.5 + 0.5 * 2 / 3, abs=1e-15)
    assert average_precision(y, np.array([0.9, 0.1, 0.8, 0.2])) == 1.0
    # Ties are one threshold: everything at once gives precision = base rate.
    assert average_precision(y, np.full(4, 0.5)) == pytest.approx(0.5, abs=1e-15)
    assert average_precision(np.array([1, 1]), np.array([0.2, 0.7])) == 1.0


@FEW
@given(data=labelled())
def test_average_precision_matches_a_per_threshold_reference(data: tuple[np.ndarray, np.ndarray]) -> None:
    y, s = data
    ap = average_precision(y, s)
    assert ap == pytest.approx(reference_average_precision(y, s), abs=1e-12)
    assert 0.0 < ap <= 1.0


# --- recall_at_fpr --------------------------------------------------------------------------------

def test_recall_at_fpr_hand_made() -> None:
    y = np.array([1, 0, 1, 0, 0, 0, 1, 0, 0, 0])
    s = np.array([0.95, 0.9, 0.85, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05])
    assert recall_at_fpr(y, s, 0.0) == pytest.approx(1 / 3)    # only above the first legit
    assert recall_at_fpr(y, s, 1 / 7) == pytest.approx(2 / 3)  # one of 7 legit may be flagged
    assert recall_at_fpr(y, s, 0.2) == pytest.approx(2 / 3)    # still only one (2/7 > 0.2)
    assert recall_at_fpr(y, s, 4 / 7) == pytest.approx(1.0)    # 0.3 flags 4 of 7 legit
    assert recall_at_fpr(y, s, 1.0) == 1.0
    # A legit row tied with the best fraud: at FPR 0 nothing may be flagged.
    assert recall_at_fpr(np.array([1, 0, 0]), np.array([0.9, 0.9, 0.1]), 0.0) == 0.0
    assert recall_at_fpr(np.array([1, 0, 0]), np.array([0.9, 0.9, 0.1]), 0.5) == 1.0


@FEW
@given(data=labelled(), fpr=FPRS)
def test_recall_at_fpr_matches_every_threshold(data: tuple[np.ndarray, np.ndarray], fpr: float) -> None:
    y, s = data
    assert recall_at_fpr(y, s, fpr) == pytest.approx(reference_recall_at_fpr(y, s, fpr), abs=1e-12)


# --- threshold_at_fpr -----------------------------------------------------------------------------

def test_threshold_at_fpr_hand_made() -> None:
    y = np.zeros(10, dtype=np.int64)
    s = np.arange(10, dtype=np.float64) / 10  # legit scores 0.0 … 0.9
    t = threshold_at_fpr(y, s, 0.0)
    assert t == np.nextafter(0.9, np.inf)  # flags no legit, and is the lowest such value
    assert threshold_at_fpr(y, s, 0.1) == np.nextafter(0.8, np.inf)  # flags exactly 0.9
    assert threshold_at_fpr(y, s, 0.25) == np.nextafter(0.7, np.inf)  # 2 of 10; 3 would be 0.3
    # k / n ≤ fpr is judged as recall_at_fpr judges it, even where fpr * n rounds below k.
    assert 0.29 * 100 < 29 and 29 / 100 <= 0.29
    legit100 = np.arange(100, dtype=np.float64)
    assert threshold_at_fpr(np.zeros(100), legit100, 0.29) == np.nextafter(70.0, np.inf)
    # Every legit row may be flagged: no threshold is too low.
    assert threshold_at_fpr(y, s, 1.0) == -math.inf
    # Fraud rows do not move the threshold; only legitimate rows define the FPR.
    y2 = np.r_[y, 1, 1]
    s2 = np.r_[s, 0.05, 5.0]
    assert threshold_at_fpr(y2, s2, 0.1) == threshold_at_fpr(y, s, 0.1)
    # Ties: flagging any of three equal top legit scores flags all three.
    tied = np.array([0.1, 0.2, 0.7, 0.7, 0.7])
    assert threshold_at_fpr(np.zeros(5), tied, 0.4) == np.nextafter(0.7, np.inf)
    assert threshold_at_fpr(np.zeros(5), tied, 0.6) == np.nextafter(0.2, np.inf)


@FEW
@given(data=labelled(), fpr=FPRS)
def test_threshold_at_fpr_is_the_lowest_threshold_within_the_fpr(
    data: tuple[np.ndarray, np.ndarray], fpr: float
) -> None:
    y, s = data
    t = threshold_at_fpr(y, s, fpr)
    assert legit_rate(y, s, t) <= fpr
    if t != -math.inf:
        assert legit_rate(y, s, float(np.nextafter(t, -np.inf))) > fpr
    # Consistent with recall_at_fpr: flagging `score >= t` catches that recall.
    caught = float(np.sum(s[y == 1] >= t)) / float(np.sum(y == 1))
    assert caught == pytest.approx(recall_at_fpr(y, s, fpr), abs=1e-12)


def test_threshold_at_fpr_without_legitimate_rows() -> None:
    assert threshold_at_fpr(np.array([1, 1]), np.array([0.2, 0.9]), 0.01) == 0.5


# --- one class missing ----------------------------------------------------------------------------

@pytest.mark.parametrize("label", [0, 1])
def test_ranking_metrics_are_nan_when_one_class_is_missing(label: int) -> None:
    y = np.full(5, label)
    s = np.linspace(0.0, 1.0, 5)
    assert math.isnan(roc_auc(y, s))
    assert math.isnan(recall_at_fpr(y, s, 0.01))
    if label == 0:
        assert math.isnan(average_precision(y, s))
    else:
        # All fraud: every threshold has precision 1; average precision is well defined.
        assert average_precision(y, s) == 1.0


@FEW
@given(data=labelled())
def test_precision_recall_curve_matches_flagging_at_each_distinct_score(data: tuple[np.ndarray, np.ndarray]) -> None:
    y, s = data
    precision, recall, thresholds = precision_recall_curve(y, s)
    assert thresholds.tolist() == sorted(set(s.tolist()), reverse=True)
    pos = int(np.sum(y))
    for p, r, t in zip(precision, recall, thresholds, strict=True):
        tp, fp = _flags(y, s, float(t))
        assert (p, r) == pytest.approx((tp / (tp + fp), tp / pos), abs=1e-12)


def test_precision_recall_curve_without_fraud_is_empty() -> None:
    precision, recall, thresholds = precision_recall_curve(np.zeros(3), np.array([0.1, 0.2, 0.3]))
    assert precision.size == recall.size == thresholds.size == 0
