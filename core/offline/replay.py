"""Offline replay: a whole history through the same feature kernels the service runs.

Transactions go through in arrival order, the order the service met them (a late event
sees the state its later-stamped predecessors left, as it did online): by
`received_time_ms` where the history has it, else by event time (`History.arrival_time_ms`).
Outcome reports are interleaved on that same clock exactly as the service would meet
them: a fraud label becomes visible to the features only once it has been reported (its
`fraud_reported_time_ms`, or event time + `label_delay_ms` when no report time is
known), and never before its own transaction arrived, so training never sees the future.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from core.encode import EncodedBatch, KeyHasher, amount_major, encode_columns
from core.features import FEATURE_NAMES, NUM_FEATURES, EntityState, FeatureEngine
from core.history.table import History
from core.model import LoadedModel
from core.rules.named_lists import identifier_keys
from core.rules.ruleset import Decision, Ruleset
from core.scoring import Scorer, Source, risk_score

DEFAULT_CHUNK = 4096


def encode_history(history: History, hasher: KeyHasher) -> EncodedBatch:
    """Encode a whole history as one columnar batch."""
    return encode_columns(
        hasher,
        card_id=history.card_id, customer_id=history.customer_id, merchant_id=history.merchant_id,
        device_id=history.device_id, ip_address=history.ip_address, amount_minor=history.amount_minor,
        currency=history.currency, event_time_ms=history.event_time_ms, channel=history.channel,
        merchant_category=history.merchant_category, country=history.country,
        latitude=history.latitude, longitude=history.longitude,
    )


def label_visible_time_ms(history: History, *, label_delay_ms: int | None = None) -> np.ndarray:
    """When each fraud label becomes known (int64; -1 for no label).

    The report time when the history has one; otherwise event time + `label_delay_ms`.
    With `label_delay_ms` set, a report is never visible before event time + delay either,
    and never before the transaction's arrival + 1 ms (`History.arrival_time_ms`; its event
    time without a receipt time): a transaction is scored before its own label exists.
    """
    fraud = history.is_fraud.astype(bool)
    reported = history.fraud_reported_time_ms.astype(np.int64).copy()
    if label_delay_ms is not None:
        delayed = history.event_time_ms + np.int64(label_delay_ms)
        reported = np.where(reported >= 0, np.maximum(reported, delayed), delayed)
    # Never before the transaction has been scored: a label reported in the same millisecond
    # (or with no delay, or before a late transaction arrived) would otherwise reach that very
    # transaction's features.
    arrived = np.maximum(history.arrival_time_ms, history.event_time_ms)
    reported = np.where(reported >= 0, np.maximum(reported, arrived + 1), reported)
    return np.where(fraud & (reported >= 0), reported, np.int64(-1))


def replay_features(
    history: History,
    *,
    state: EntityState | None = None,
    hasher: KeyHasher | None = None,
    label_delay_ms: int | None = None,
    chunk: int = DEFAULT_CHUNK,
    on_progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Features of every transaction of a history in arrival order, as the service would have computed them.

    Returns float64 (len(history), NUM_FEATURES). Outcomes are applied in time order
    before the first transaction that arrived at or after their visibility time.
    """
    arrival = history.arrival_time_ms
    if len(history) and np.any(np.diff(arrival) < 0):
        raise ValueError("history must be in arrival order (received_time_ms where known, else event_time_ms); "
                         "call history.sorted_by_time() first")
    hasher = hasher or KeyHasher()
    engine = FeatureEngine(state or EntityState.empty())
    batch = encode_history(history, hasher)
    visible = label_visible_time_ms(history, label_delay_ms=label_delay_ms)
    order = np.flatnonzero(visible >= 0)
    order = order[np.argsort(visible[order], kind="stable")]
    out_times = visible[order]
    # Index of the first transaction that may see each outcome: the first to arrive at or after its visibility.
    cut_at = np.searchsorted(arrival, out_times, side="left")
    out = np.empty((len(history), NUM_FEATURES), dtype=np.float64)
    done = 0
    applied = 0
    n = len(history)
    while done < n:
        # Apply every outcome that becomes visible at or before the next transaction.
        upto = int(np.searchsorted(cut_at, done, side="right"))
        if upto > applied:
            idx = order[applied:upto]
            engine.apply_outcomes(batch.card_key[idx], batch.merchant_key[idx], out_times[applied:upto],
                                  np.ones(idx.size, dtype=np.float64))
            applied = upto
        stop = min(n, done + chunk)
        if applied < order.size:
            stop = min(stop, max(int(cut_at[applied]), done + 1))
        engine.compute(batch.slice(done, stop), out=out[done:stop])
        if on_progress is not None:
            on_progress(stop - done)
        done = stop
    return out


def score_history(
    history: History,
    model: LoadedModel | None,
    ruleset: Ruleset,
    *,
    label_delay_ms: int | None = None,
    reasons_method: str = "path",
    hasher: KeyHasher | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> dict[str, np.ndarray]:
    """Score a whole history offline exactly as the service would have, one row per transaction.

    `reasons_method` must be the server's (`FRAUDSCORE_REASONS_METHOD`) for identical reasons,
    and `hasher` the server's (its FRAUDSCORE_ID_HASH_KEY; the development key by default) for
    identical features: seen-before flags, distinct counts and table neighbourhoods depend on
    the keyed hashes. `ruleset`'s named lists must have been hashed with it too.

    Columns: transaction_id, fraud_probability, risk_score, decision, source, reasons
    (codes joined by "|"), then every feature in registry order. Without a model the
    fallback rules decide, as in the service.
    """
    hasher = hasher or KeyHasher()
    features = replay_features(history, hasher=hasher, label_delay_ms=label_delay_ms, on_progress=on_progress)
    amount = amount_major(history.amount_minor, history.currency)
    scorer = Scorer(model, ruleset, reasons_method=reasons_method)
    keys = identifier_keys(encode_history(history, hasher)) if ruleset.lists else None
    scored = (scorer.score(features, amount, keys=keys) if model is not None
              else scorer.fallback(features, amount, keys=keys))
    return {
        "transaction_id": history.transaction_id,
        "fraud_probability": scored.fraud_probability,
        "risk_score": risk_score(scored.fraud_probability),
        "decision": np.array([Decision(d).name for d in scored.decision], dtype=object),
        "source": np.array([Source(s).name for s in scored.source], dtype=object),
        "reasons": np.array(["|".join(r.code for r in reasons) for reasons in scored.reasons], dtype=object),
        **{name: features[:, j] for j, name in enumerate(FEATURE_NAMES)},
    }
