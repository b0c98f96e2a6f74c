"""Ranking metrics for a fraud model, in plain NumPy (no scikit-learn on any path)."""

from __future__ import annotations

import numpy as np


def _sorted_counts(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    order = np.argsort(-score, kind="mergesort")
    s = score[order]
    yy = y[order].astype(np.float64)
    # Last index of each run of equal scores: ties are counted together.
    distinct = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    tp = np.cumsum(yy)[distinct]
    fp = (distinct + 1) - tp
    return tp, fp, s[distinct]


def roc_auc(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (ties count half); NaN when only one class is present."""
    pos = float(np.sum(y))
    neg = float(y.size - pos)
    if pos == 0 or neg == 0:
        return float("nan")
    tp, fp, _ = _sorted_counts(y, score)
    tpr = np.r_[0.0, tp / pos]
    fpr = np.r_[0.0, fp / neg]
    return float(np.trapezoid(tpr, fpr))


def average_precision(y: np.ndarray, score: np.ndarray) -> float:
    """Average precision (step-wise area under the precision-recall curve)."""
    pos = float(np.sum(y))
    if pos == 0:
        return float("nan")
    tp, fp, _ = _sorted_counts(y, score)
    precision = tp / (tp + fp)
    recall = tp / pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def recall_at_fpr(y: np.ndarray, score: np.ndarray, fpr: float) -> float:
    """Share of fraud caught when at most `fpr` of legitimate transactions are flagged."""
    pos = float(np.sum(y))
    neg = float(y.size - pos)
    if pos == 0 or neg == 0:
        return float("nan")
    tp, fp, _ = _sorted_counts(y, score)
    ok = fp / neg <= fpr
    return float(tp[ok].max() / pos) if ok.any() else 0.0


def threshold_at_fpr(y: np.ndarray, score: np.ndarray, fpr: float) -> float:
    """The lowest score threshold (`score >= t` flags) whose false-positive rate is ≤ `fpr`."""
    legit = np.sort(score[y == 0])
    if legit.size == 0:
        return 0.5
    # The most legitimate rows that may be flagged: the largest k with k / n <= fpr, judged as
    # recall_at_fpr judges it (floor(fpr * n) can fall one short: 0.29 * 100 == 28.999…).
    allowed = int(np.count_nonzero(np.arange(1, legit.size + 1) / legit.size <= fpr))
    if allowed == legit.size:
        return float("-inf")  # every legitimate row may be flagged; without this the index below wraps
    # Flag strictly above the (allowed+1)-th highest legitimate score.
    kth = legit[legit.size - allowed - 1]
    return float(np.nextafter(kth, np.inf))


def precision_recall_curve(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, threshold) at each distinct score, highest threshold first (`score >= t` flags).

    The points `average_precision` sums over; empty arrays when there is no fraud.
    """
    pos = float(np.sum(y))
    if pos == 0 or score.size == 0:
        empty = np.empty(0, dtype=np.float64)
        return empty, empty, empty
    tp, fp, thresholds = _sorted_counts(y, score)
    return tp / (tp + fp), tp / pos, thresholds.astype(np.float64)


def threshold_at_rate(score: np.ndarray, rate: float) -> float:
    """The lowest score threshold (`score >= t` flags) that flags at most `rate` of all rows.

    Rows tied at the boundary are all left unflagged, so the rate is never exceeded.
    """
    ordered = np.sort(score)
    if ordered.size == 0:
        return 0.5
    allowed = int(np.count_nonzero(np.arange(1, ordered.size + 1) / ordered.size <= rate))
    if allowed == ordered.size:
        return float("-inf")
    return float(np.nextafter(ordered[ordered.size - allowed - 1], np.inf))
