"""Backtest a ruleset on a labelled history: what each rule would have hit, caught and changed.

Pure compute over arrays (no I/O): `fraudscore backtest` reads the files and prints. The
history is replayed through the feature kernels exactly as `core.offline.replay` does (a fraud
label feeds the features only once it was reported), the model (when given) and its
thresholds give the base decisions, and the rules are evaluated once over the whole
history. Without a model the fallback rules are backtested, as the service decides
without one.

A rule's "decisions changed" compares the final decisions with the rule enforced
against those without it: a shadow rule is counted as if switched to enforce, which is
what an analyst wants to know before switching it on. Both sides are one `decide` over
the same hit matrix, so a backtest costs one feature replay, one prediction, one rule
evaluation and two decisions per rule, all vectorized.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from core.encode import KeyHasher, amount_major
from core.errors import DataError
from core.history.table import History
from core.model import LoadedModel
from core.offline.replay import encode_history, replay_features
from core.rules.named_lists import identifier_keys
from core.rules.ruleset import Decision, RuleHits, Ruleset
from core.scoring import Source

_NUM_DECISIONS = max(Decision) + 1  # Decision values index a (from, to) count matrix


@dataclass(frozen=True, slots=True)
class DecisionChange:
    """`count` transactions whose final decision goes from `before` (rule off) to `after` (rule on)."""

    before: Decision
    after: Decision
    count: int


@dataclass(frozen=True, slots=True)
class RuleBacktest:
    """One rule's results over the history. Rates are NaN when their denominator is 0."""

    name: str
    shadow: bool
    action: Decision
    priority: int
    hits: int
    fraud_hits: int
    hit_rate: float                       # hits / transactions
    precision: float                      # fraud_hits / hits
    recall: float                         # fraud_hits / all fraud
    fraud_missed_by_model: int | None     # fraud hits the model's thresholds APPROVE; None without a model
    changes: tuple[DecisionChange, ...]   # rule on vs off (shadow: as if enforced), by from→to, nonzero only

    @property
    def decisions_changed(self) -> int:
        """Transactions whose final decision this rule (enforced) changes."""
        return sum(c.count for c in self.changes)


@dataclass(frozen=True, slots=True)
class BacktestTotals:
    """The whole history under the ruleset as it is (shadow rules change nothing)."""

    transactions: int
    fraud: int
    fraud_flagged: int                                  # fraud whose final decision is REVIEW or DECLINE
    decisions: tuple[tuple[Source, Decision, int], ...]  # final decisions by source, nonzero only
    model_version: str                                  # "" without a model
    ruleset_version: str


@dataclass(frozen=True, slots=True)
class BacktestReport:
    rules: tuple[RuleBacktest, ...]  # in the ruleset's priority order
    totals: BacktestTotals


def backtest(
    history: History,
    ruleset: Ruleset,
    model: LoadedModel | None = None,
    *,
    label_delay_ms: int | None = None,
    source: str = "<in-memory history>",
    hasher: KeyHasher | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> BacktestReport:
    """Replay a labelled, time-sorted history and report every rule's hits, precision, recall and changes.

    With `model`, the ruleset's model-path rules are backtested on top of the model's
    thresholded decisions (as `Scorer.score`); without, its fallback rules on top of
    APPROVE (as `Scorer.fallback`). `label_delay_ms` is `replay_features`'. `hasher` must be
    the server's (its FRAUDSCORE_ID_HASH_KEY) and the one `ruleset`'s named lists were hashed
    with; the development key by default. Raises `DataError` naming `source` when the history
    has no fraud label at all.
    """
    fraud = history.is_fraud.astype(bool)
    total_fraud = int(fraud.sum())
    if total_fraud == 0:
        raise DataError(source, "no transaction is labelled fraud (is_fraud = 1), so precision and recall "
                        "mean nothing; backtest a labelled history", column="is_fraud")
    hasher = hasher or KeyHasher()
    features = replay_features(history, hasher=hasher, label_delay_ms=label_delay_ms, on_progress=on_progress)
    amount = amount_major(history.amount_minor, history.currency)
    n = len(history)
    keys = identifier_keys(encode_history(history, hasher)) if ruleset.lists else None
    if model is not None:
        # The model path of Scorer.score: thresholds, then the model-path rules with the probability.
        probability = model.forest.predict(features)
        base = model.thresholds.decide(probability)
        hits = ruleset.rules.evaluate(features, amount, probability, keys=keys)
    else:
        base = np.full(n, int(Decision.APPROVE), dtype=np.int8)
        hits = ruleset.fallback.evaluate(features, amount, keys=keys)
    final = hits.decide(base)
    if model is not None:
        source_of = np.where(final != base, int(Source.RULES), int(Source.MODEL))
    else:
        source_of = np.full(n, int(Source.RULES_FALLBACK))
    rules = tuple(_rule_backtest(hits, r, base, fraud, total_fraud, model is not None)
                  for r in range(len(hits.rules)))
    by_source = np.bincount(source_of * _NUM_DECISIONS + final, minlength=(max(Source) + 1) * _NUM_DECISIONS)
    totals = BacktestTotals(
        transactions=n,
        fraud=total_fraud,
        fraud_flagged=int(np.count_nonzero(fraud & (final != int(Decision.APPROVE)))),
        decisions=tuple((s, d, int(by_source[s * _NUM_DECISIONS + d]))
                        for s in Source for d in Decision if by_source[s * _NUM_DECISIONS + d]),
        model_version=model.version if model is not None else "",
        ruleset_version=ruleset.version,
    )
    return BacktestReport(rules, totals)


def _rule_backtest(hits: RuleHits, r: int, base: np.ndarray, fraud: np.ndarray, total_fraud: int,
                   with_model: bool) -> RuleBacktest:
    rule = hits.rules[r]
    hit = hits.hits[:, r]
    n = hit.shape[0]
    hit_count = int(np.count_nonzero(hit))
    fraud_hit = hit & fraud
    fraud_hits = int(np.count_nonzero(fraud_hit))
    # On: this rule enforced, every other rule as it is. Off: the same with its column masked.
    enforced = tuple(replace(x, shadow=False) if i == r else x for i, x in enumerate(hits.rules))
    on = RuleHits(enforced, hits.hits).decide(base)
    masked = hits.hits.copy()
    masked[:, r] = False
    off = RuleHits(hits.rules, masked).decide(base)
    changed = on != off
    pairs = np.bincount(off[changed].astype(np.intp) * _NUM_DECISIONS + on[changed],
                        minlength=_NUM_DECISIONS * _NUM_DECISIONS)
    changes = tuple(DecisionChange(before, after, int(pairs[before * _NUM_DECISIONS + after]))
                    for before in Decision for after in Decision if pairs[before * _NUM_DECISIONS + after])
    missed = int(np.count_nonzero(fraud_hit & (base == int(Decision.APPROVE)))) if with_model else None
    return RuleBacktest(
        name=rule.name,
        shadow=rule.shadow,
        action=rule.action,
        priority=rule.priority,
        hits=hit_count,
        fraud_hits=fraud_hits,
        hit_rate=hit_count / n if n else float("nan"),
        precision=fraud_hits / hit_count if hit_count else float("nan"),
        recall=fraud_hits / total_fraud,
        fraud_missed_by_model=missed,
        changes=changes,
    )


def report_columns(report: BacktestReport) -> dict[str, np.ndarray]:
    """The per-rule table as named columns (for `write_table`): one row per rule, one column per change."""
    rows = report.rules
    columns: dict[str, np.ndarray] = {
        "rule": np.array([r.name for r in rows], dtype=object),
        "mode": np.array(["shadow" if r.shadow else "enforce" for r in rows], dtype=object),
        "action": np.array([r.action.name for r in rows], dtype=object),
        "priority": np.array([r.priority for r in rows], dtype=np.int64),
        "hits": np.array([r.hits for r in rows], dtype=np.int64),
        "fraud_hits": np.array([r.fraud_hits for r in rows], dtype=np.int64),
        "hit_rate": np.array([r.hit_rate for r in rows], dtype=np.float64),
        "precision": np.array([r.precision for r in rows], dtype=np.float64),
        "recall": np.array([r.recall for r in rows], dtype=np.float64),
        # NaN (an empty cell) without a model.
        "fraud_missed_by_model": np.array([np.nan if r.fraud_missed_by_model is None else r.fraud_missed_by_model
                                           for r in rows], dtype=np.float64),
        "decisions_changed": np.array([r.decisions_changed for r in rows], dtype=np.int64),
    }
    for before in Decision:
        for after in Decision:
            if before != after:
                columns[f"{before.name.lower()}_to_{after.name.lower()}"] = np.array(
                    [sum(c.count for c in r.changes if (c.before, c.after) == (before, after)) for r in rows],
                    dtype=np.int64)
    return columns


__all__ = ["BacktestReport", "BacktestTotals", "DecisionChange", "RuleBacktest", "backtest", "report_columns"]
