"""The feature engine: one object, one call per batch, the same online and offline."""

from __future__ import annotations

import numpy as np

from core.encode import EncodedBatch
from core.features import kernels
from core.features.registry import NUM_FEATURES
from core.features.state import EntityState, EntityTable


def _arrays(t: EntityTable) -> tuple[np.ndarray, ...]:
    return (t.keys, t.last_seen_ms, t.counters, t.values, t.tags)


class FeatureEngine:
    """Computes the registry's features for a batch and advances the entity state.

    Not thread-safe by design: exactly one thread (the pipeline thread, or the offline
    replay loop) owns an engine and its state, so no locks are needed and every feature
    is deterministic for a given order of events.
    """

    __slots__ = ("state",)

    def __init__(self, state: EntityState) -> None:
        self.state = state

    def compute(self, batch: EncodedBatch) -> np.ndarray:
        """Features of every transaction, as of its moment, in registry order: float64 (n, NUM_FEATURES)."""
        out = np.empty((len(batch), NUM_FEATURES), dtype=np.float64)
        s = self.state
        kernels.compute_features(  # type: ignore[call-arg]
            batch.card_key, batch.customer_key, batch.merchant_key, batch.device_key, batch.ip_key,
            batch.amount, batch.event_time_ms, batch.channel, batch.merchant_category, batch.country,
            batch.latitude, batch.longitude,
            *_arrays(s.card), *_arrays(s.merchant), *_arrays(s.customer), *_arrays(s.device), *_arrays(s.ip),
            out,
        )
        return out

    def apply_outcomes(self, card_key: np.ndarray, merchant_key: np.ndarray,
                       reported_time_ms: np.ndarray, fraud_weight: np.ndarray) -> None:
        """Feed outcome reports (fraud_weight 1.0 for fraud or chargeback, 0.0 for legitimate)."""
        kernels.apply_outcomes(
            np.ascontiguousarray(card_key, dtype=np.uint64), np.ascontiguousarray(merchant_key, dtype=np.uint64),
            np.ascontiguousarray(reported_time_ms, dtype=np.int64), np.ascontiguousarray(fraud_weight, dtype=np.float64),
            *_arrays(self.state.card), *_arrays(self.state.merchant),
        )
