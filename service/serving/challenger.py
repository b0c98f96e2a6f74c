"""The challenger in shadow (FRAUDSCORE_CHALLENGER_MODEL_DIR): scored on the batches the champion
answered, after the answers are made, feeding metrics only, never an answer. Its directory is
watched and hot-swapped by service/runtime/challenger_reload.py."""

from __future__ import annotations

import numpy as np

from core.model import LoadedModel
from service.runtime.metrics import DECISION_LABELS, DECISION_VALUES, Metrics


def record_challenger(challenger: LoadedModel, features: np.ndarray, champion: np.ndarray, metrics: Metrics) -> None:
    """The challenger's shadow scoring of a batch the champion answered: its probabilities into
    `fraudscore_challenger_probability`, and where its decision (by its own thresholds) differs from
    the champion's answer, a count by the pair. Feeds metrics only; raises what the model raises."""
    p = challenger.forest.predict(features)
    # Indices 0, 1, 2 = APPROVE, REVIEW, DECLINE (DECISION_LABELS order).
    mine = np.searchsorted(DECISION_VALUES, challenger.thresholds.decide(p))
    theirs = np.searchsorted(DECISION_VALUES, champion)
    metrics.challenger_probability.observe_many(p)
    pairs = np.bincount(theirs * 3 + mine, minlength=9)
    for k in np.flatnonzero(pairs).tolist():
        c, m = divmod(k, 3)
        if c != m:
            metrics.challenger_disagreements.labels(DECISION_LABELS[c], DECISION_LABELS[m]).inc(int(pairs[k]))
