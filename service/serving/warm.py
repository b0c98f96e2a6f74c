"""Warming up before serving: every kernel compiled (or loaded from Numba's cache) on a throwaway
state, and the pipeline calls start-up times to seed the batcher's timer (service/runtime/app.py).
The real state is never touched."""

from __future__ import annotations

import numpy as np
from fraudscore.v1 import fraudscore_pb2 as pb

from core.encode import KeyHasher
from core.features import EntityState, FeatureEngine, LocalStore
from core.model import LoadedModel
from core.rules.named_lists import identifier_keys
from core.scoring import Scorer
from service.runtime.metrics import Metrics
from service.serving.encode import encode_transactions
from service.serving.pipeline import Pipeline


def trial_pipeline(pipeline: Pipeline) -> Pipeline:
    """A pipeline like `pipeline` (scorer, key, challenger) on a throwaway state and metrics, for
    timing calls at start-up without touching the real state or counting anything."""
    return Pipeline(engine=FeatureEngine(_throwaway_state(TRIAL_CAPACITY)), scorer=pipeline.scorer,
                    hasher=pipeline.hasher, metrics=Metrics(), challenger=pipeline.challenger)


TRIAL_CAPACITY = 4096  # slots per kind of the throwaway state that start-up times pipeline calls on


def _throwaway_state(capacity: int) -> EntityState:
    return EntityState.empty(card_capacity=capacity, merchant_capacity=capacity, customer_capacity=capacity,
                             device_capacity=capacity, ip_capacity=capacity)


def warm_transactions(n: int) -> list[pb.Transaction]:
    """`n` made-up transactions for warm-up and start-up timing: distinct cards, customers, devices and
    IPs, a few merchants, amounts spread from cents to thousands (so some are flagged and explained)."""
    return [pb.Transaction(transaction_id=f"warm-up-{i}", card_id=f"warm-card-{i}", merchant_id=f"warm-merchant-{i % 7}",
                           amount_minor=99 + (i * 7_919) % 400_000, currency="USD",
                           event_time_ms=1_767_225_600_000 + i, channel=pb.ECOMMERCE if i % 3 else pb.CARD_PRESENT,
                           country="US" if i % 5 else "BR", latitude=40.7, longitude=-74.0,
                           device_id=f"warm-device-{i}", ip_address=f"192.0.2.{i % 250 + 1}",
                           customer_id=f"warm-customer-{i}", merchant_category="5411" if i % 2 else "5732")
            for i in range(n)]


def warm_up(scorer: Scorer, hasher: KeyHasher, challenger: LoadedModel | None = None) -> None:
    """Compile (or load from cache) every kernel on a throwaway state, so real state stays untouched;
    with `challenger`, its prediction too."""
    engine = FeatureEngine(_throwaway_state(16))
    txn = warm_transactions(1)[0]
    batch = encode_transactions(hasher, [txn, txn])
    features = engine.compute(batch)
    engine.apply_outcomes(batch.card_key, batch.merchant_key, batch.event_time_ms, np.ones(2))
    # The store path's own kernels (rows into working tables, slots found without inserting), which
    # a server on a shared store runs on every batch: cold, their first compilation held a fresh
    # pod's first batches for seconds, and the budget answered them all from the fallback rules.
    through_store = FeatureEngine(LocalStore(_throwaway_state(16)))
    for _ in range(2):  # the second finds the first's rows: only then are rows written into working tables
        through_store.compute(batch)
    keys = identifier_keys(batch)
    scorer.fallback(features, batch.amount, keys=keys)
    if scorer.model is not None:
        scorer.score(features, batch.amount, keys=keys)
        # Reasons run only for flagged transactions, which the warm-up's may not be.
        scorer.model.forest.path_attributions(features)
        scorer.model.forest.contributions(features)
    if challenger is not None:
        challenger.forest.predict(features)
