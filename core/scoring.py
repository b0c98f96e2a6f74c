"""Decisions: model probability + thresholds, then rules by precedence, with reasons.

Pure compute over arrays: the service calls `Scorer.score` for the model path and
`Scorer.fallback` when the model path is unavailable.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import IntEnum

import numpy as np

from core.model import LoadedModel
from core.reasons import top_reasons
from core.rules.ruleset import Decision, RuleHits, Ruleset


class Source(IntEnum):
    """Values match the API's DecisionSource enum."""

    MODEL = 1
    RULES = 2
    RULES_FALLBACK = 3


@dataclass(frozen=True, slots=True)
class Reason:
    code: str
    description: str
    weight: float


@dataclass(frozen=True, slots=True)
class ScoredBatch:
    """One decision per transaction, in batch order."""

    fraud_probability: np.ndarray  # float64
    decision: np.ndarray           # int8, Decision values
    source: np.ndarray             # int8, Source values
    degraded: bool
    reasons: list[tuple[Reason, ...]]
    model_version: str
    ruleset_version: str
    hits: RuleHits                 # every rule evaluated (shadow included), for metrics

    def __len__(self) -> int:
        return int(self.fraud_probability.shape[0])

    def take(self, rows: np.ndarray) -> ScoredBatch:
        """The decisions at `rows` (integer positions), in that order."""
        return ScoredBatch(self.fraud_probability[rows], self.decision[rows], self.source[rows], self.degraded,
                           [self.reasons[k] for k in rows.tolist()], self.model_version, self.ruleset_version,
                           replace(self.hits, hits=self.hits.hits[rows]))


def risk_score(p: np.ndarray) -> np.ndarray:
    """fraud_probability on the API's 0..999 scale (NaN → 0)."""
    scaled = np.floor(p * 1000.0)
    scaled[np.isnan(scaled)] = 0.0  # np.nan_to_num costs ~10 µs a call, more than all this
    scores: np.ndarray = np.minimum(scaled, 999.0).astype(np.int32)
    return scores


# Plain ints: an IntEnum member lookup costs ~1 µs, several per batch.
_APPROVE = int(Decision.APPROVE)


def _rule_reasons(hits: RuleHits) -> list[list[Reason]]:
    """Each transaction's enforce-mode rule hits as reasons, in rule order."""
    rules, width = hits.rules, hits.hits.shape[1]
    reasons: list[list[Reason]] = [[] for _ in range(hits.hits.shape[0])]
    made: list[Reason | None] = [None] * width  # one (frozen) Reason per rule, shared by its hits
    # Only the hits, not every (transaction, rule) pair: that loop took ~0.3 ms for a batch of 256.
    for k in np.flatnonzero(hits.hits).tolist():
        i, r = divmod(k, width)
        rule = rules[r]
        if not rule.shadow:
            reason = made[r]
            if reason is None:
                reason = made[r] = Reason(rule.reason_code, rule.description, 1.0)
            reasons[i].append(reason)
    return reasons


_SOURCE_MODEL, _SOURCE_RULES, _SOURCE_FALLBACK = int(Source.MODEL), int(Source.RULES), int(Source.RULES_FALLBACK)
REASONS_METHODS = ("path", "shap")


class Scorer:
    """Holds the current model (or none) and ruleset; immutable, swapped whole on reload.

    `reasons_method` picks how a flagged transaction's model reasons are attributed
    (docs/reasons.md): "path" credits each split on the transaction's path with the change
    in the node's value (Saabas; about the cost of a prediction), "shap" gives exact
    TreeSHAP values as LightGBM's pred_contrib (~30× dearer: ~0.2 ms a row on the default
    model).
    """

    __slots__ = ("model", "reasons_method", "ruleset", "top_reasons")

    def __init__(self, model: LoadedModel | None, ruleset: Ruleset, *, top_reasons: int = 3,
                 reasons_method: str = "path") -> None:
        if reasons_method not in REASONS_METHODS:
            raise ValueError(f"reasons_method must be one of {REASONS_METHODS}, got {reasons_method!r}")
        self.model = model
        self.ruleset = ruleset
        self.top_reasons = top_reasons
        self.reasons_method = reasons_method

    def score(self, features: np.ndarray, amount: np.ndarray, *, keys: np.ndarray | None = None) -> ScoredBatch:
        """The model path. Raises whatever the model raises; the caller falls back.

        `keys`: the batch's identifiers for named lists (core.rules.named_lists.identifier_keys); without
        them no `card in @list` condition holds."""
        if self.model is None:
            raise RuntimeError("no model loaded")
        forest = self.model.forest
        p = forest.predict(features)
        base = self.model.thresholds.decide(p)
        hits = self.ruleset.rules.evaluate(features, amount, p, keys)
        decision = hits.decide(base)
        source = np.where(decision != base, _SOURCE_RULES, _SOURCE_MODEL).astype(np.int8)
        reasons = _rule_reasons(hits)
        # Model reasons only where the answer is not APPROVE: an approval needs no explanation.
        explain = np.flatnonzero(decision != _APPROVE)
        if explain.size and self.top_reasons > 0:
            rows = np.ascontiguousarray(features[explain])
            attribute = forest.contributions if self.reasons_method == "shap" else forest.path_attributions
            attributions = attribute(rows)[:, :-1]
            for i, top in zip(explain, top_reasons(attributions, self.top_reasons), strict=True):
                reasons[i].extend(Reason(code.code, code.description, w) for code, w in top)
        return ScoredBatch(p, decision, source, False, [tuple(r) for r in reasons], self.model.version,
                           self.ruleset.version, hits)

    def fallback(self, features: np.ndarray | None, amount: np.ndarray, *,
                 keys: np.ndarray | None = None) -> ScoredBatch:
        """The fallback ruleset alone; features may be None when they could not be computed, `keys`
        as score's."""
        n = amount.shape[0]
        fb = self.ruleset.fallback
        hits = fb.evaluate(features, amount, keys=keys)
        decision = hits.decide(np.full(n, _APPROVE, dtype=np.int8))
        probs = np.array([r.probability for r in fb.rules], dtype=np.float64)
        enforce = np.array([not r.shadow for r in fb.rules], dtype=bool)
        p = np.full(n, self.ruleset.fallback_default_probability, dtype=np.float64)
        if probs.size:
            # Shadow rules are counted only: they must not move the answered probability either.
            p = np.maximum(p, np.where(hits.hits & enforce, probs, 0.0).max(axis=1))
        reasons = [tuple(r) for r in _rule_reasons(hits)]
        source = np.full(n, _SOURCE_FALLBACK, dtype=np.int8)
        return ScoredBatch(p, decision, source, True, reasons, "", self.ruleset.version, hits)
