"""The pipeline's per-rule metrics against a per-transaction count of the same scoring."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import orjson
import pytest
from fraudscore.v1 import fraudscore_pb2 as pb
from hypothesis import given
from hypothesis import strategies as st

from core.encode import EncodedBatch, KeyHasher, encode_columns
from core.features import FEATURE_NAMES, EntityState, FeatureEngine
from core.rules.file import parse_ruleset
from core.rules.ruleset import Decision, RuleHits
from core.scoring import ScoredBatch, Scorer, Source
from service.runtime.metrics import DECISION_LABELS, Metrics
from service.serving.encode import encode_transactions
from service.serving.items import Item
from service.serving.pipeline import Pipeline, Tally
from tests.service.serving import parsed

RULES = orjson.dumps({"version": "t", "rules": [], "fallback": {"default_probability": 0.02, "rules": [
    {"name": "big", "when": [{"field": "amount", "op": ">=", "value": 100}], "action": "DECLINE"},
    {"name": "mid", "when": [{"field": "amount", "op": ">=", "value": 20}], "action": "REVIEW"},
    {"name": "tiny_ok", "when": [{"field": "amount", "op": "<", "value": 1}], "action": "APPROVE"},
    {"name": "watch", "when": [{"field": "amount", "op": ">=", "value": 50}], "action": "DECLINE", "mode": "shadow"},
]}})


def _state() -> EntityState:
    return EntityState.empty(card_capacity=64, merchant_capacity=64, customer_capacity=64, device_capacity=64,
                             ip_capacity=64)


def test_rule_hits_are_counted_by_final_decision() -> None:
    amounts_minor = [50, 150, 2_500, 6_000, 6_000, 15_000, 90_000, 0, 4_000]
    txns = [pb.Transaction(transaction_id=f"t{i}", card_id=f"c{i}", merchant_id="m", amount_minor=a,
                           currency="USD", event_time_ms=1_767_225_600_000 + i) for i, a in enumerate(amounts_minor)]
    scorer = Scorer(None, parse_ruleset(RULES))
    metrics, hasher = Metrics(), KeyHasher()
    loop = asyncio.new_event_loop()
    try:
        items = [Item(t, 0.0, 0, loop.create_future()) for t in txns]
        Pipeline(engine=FeatureEngine(_state()), scorer=scorer, hasher=hasher, metrics=metrics).run(items).delivered(None)
    finally:
        loop.close()
    # The reference: the same scoring on a fresh state, counted one transaction and rule at a time.
    batch = encode_transactions(hasher, txns)
    scored = scorer.fallback(FeatureEngine(_state()).compute(batch), batch.amount)
    expected: Counter[tuple[str, str, str]] = Counter()
    for i in range(len(txns)):
        for r, rule in enumerate(scored.hits.rules):
            if scored.hits.hits[i, r]:
                mode = "shadow" if rule.shadow else "enforce"
                expected[rule.name, mode, Decision(int(scored.decision[i])).name] += 1
    counted = {(s.labels["rule"], s.labels["mode"], s.labels["decision"]): s.value
               for family in metrics.registry.collect() if family.name == "fraudscore_rule_hits"
               for s in family.samples if s.name == "fraudscore_rule_hits_total"}
    assert counted == expected
    assert len({d for _, _, d in expected}) == 3  # the batch reaches every decision
    decisions = {(s.labels["decision"], s.labels["source"]): s.value
                 for family in metrics.registry.collect() if family.name == "fraudscore_decisions"
                 for s in family.samples if s.name == "fraudscore_decisions_total"}
    assert decisions == Counter((Decision(int(d)).name, Source(int(s)).name)
                                for d, s in zip(scored.decision, scored.source, strict=True))
    assert expected["watch", "shadow", "DECLINE"] and expected["watch", "shadow", "REVIEW"]


class _Raising:
    def predict(self, features: object) -> object:
        raise RuntimeError("challenger broke")


def test_a_raising_challenger_changes_no_answer(model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    from dataclasses import replace

    from core.model import load_model_dir
    from service.runtime.reload import load_rules

    model = load_model_dir(model_dir)
    challenger = replace(model, forest=_Raising())
    txns = [pb.Transaction(transaction_id=f"t{i}", card_id=f"c{i % 3}", merchant_id="m", amount_minor=a,
                           currency="USD", event_time_ms=1_767_225_600_000 + i)
            for i, a in enumerate([50, 150_000, 2_500, 600_000, 6_000, 15_000, 90_000, 0])]

    def answers(challenger: object) -> tuple[list[pb.ScoreResponse], Metrics]:
        metrics = Metrics()
        pipeline = Pipeline(engine=FeatureEngine(_state()), scorer=Scorer(model, load_rules(None)),
                            hasher=KeyHasher(), metrics=metrics, challenger=challenger)  # type: ignore[arg-type]
        loop = asyncio.new_event_loop()
        try:
            out = []
            for _ in range(2):  # twice: the second failure within the minute is not logged again
                out += parsed(pipeline.run([Item(t, 0.0, 0, loop.create_future()) for t in txns]).answers)
        finally:
            loop.close()
        return out, metrics

    plain, _ = answers(None)
    with caplog.at_level(logging.ERROR, logger="fraudscore.pipeline"):
        shadowed, metrics = answers(challenger)
    for a in (*plain, *shadowed):
        a.server_latency_us = 0
    assert shadowed == plain
    assert all(a.source != pb.RULES_FALLBACK for a in shadowed)
    assert metrics.challenger_errors._value.get() == 2
    assert sum("challenger model failed" in r.getMessage() for r in caplog.records) == 1
    fallbacks = [s for f in metrics.registry.collect() if f.name == "fraudscore_fallbacks" for s in f.samples]
    assert not fallbacks


def _counted(metrics: Metrics, family: str) -> float:
    return sum(s.value for f in metrics.registry.collect() if f.name == family for s in f.samples
               if s.name == f"{family}_total")


def test_items_answered_by_the_fallback_enter_the_state_in_order_unscored(model_dir: Path) -> None:
    from core.model import load_model_dir
    from service.runtime.reload import load_rules

    scorer = Scorer(load_model_dir(model_dir), load_rules(None))
    txns = [pb.Transaction(transaction_id=f"t{i}", card_id=f"c{i % 3}", merchant_id=f"m{i % 2}",
                           amount_minor=500 + 4_000 * i, currency="USD", event_time_ms=1_767_225_600_000 + 1_000 * i)
            for i in range(12)]
    answered_early = {1, 4, 5, 9, 11}
    loop = asyncio.new_event_loop()
    try:
        def pipeline() -> tuple[Pipeline, Metrics]:
            metrics = Metrics()
            return Pipeline(engine=FeatureEngine(_state()), scorer=scorer, hasher=KeyHasher(), metrics=metrics), metrics

        mixed, mixed_metrics = pipeline()
        items = [Item(t, 0.0, 0, loop.create_future(), answered_by_fallback=k in answered_early)
                 for k, t in enumerate(txns)]
        result = mixed.run(items)
        reference, _ = pipeline()
        every = parsed(reference.run([Item(t, 0.0, 0, loop.create_future()) for t in txns]).answers)
    finally:
        loop.close()
    mixed_answers = parsed(result.answers)
    for a in (*mixed_answers, *every):
        a.server_latency_us = 0
    # Answers only for the others, each as if the whole batch had been scored: the state the later
    # ones saw holds the early-answered transactions before them.
    assert mixed_answers == [a for k, a in enumerate(every) if k not in answered_early]
    for mine, theirs in zip(mixed.engine.state.tables(), reference.engine.state.tables(), strict=True):
        for name in ("keys", "last_seen_ms", "values", "tags"):
            np.testing.assert_array_equal(getattr(mine, name), getattr(theirs, name))
    assert _counted(mixed_metrics, "fraudscore_features_only") == len(answered_early)
    # Answer metrics wait for delivery, and count only the answers that reached their calls.
    assert _counted(mixed_metrics, "fraudscore_decisions") == 0
    result.delivered([k % 2 == 0 for k in range(len(result.answers))])
    assert _counted(mixed_metrics, "fraudscore_decisions") == (len(result.answers) + 1) // 2


def test_a_batch_answered_entirely_by_the_fallback_still_enters_the_state() -> None:
    scorer = Scorer(None, parse_ruleset(RULES))
    txns = [pb.Transaction(transaction_id=f"t{i}", card_id="c", merchant_id="m", amount_minor=100, currency="USD",
                           event_time_ms=1_767_225_600_000 + i) for i in range(3)]
    engine = FeatureEngine(_state())
    loop = asyncio.new_event_loop()
    try:
        result = Pipeline(engine=engine, scorer=scorer, hasher=KeyHasher(), metrics=Metrics()).run(
            [Item(t, 0.0, 0, loop.create_future(), answered_by_fallback=True) for t in txns])
    finally:
        loop.close()
    assert list(result.answers) == []
    assert engine.state.card.occupancy() == 1 and engine.state.merchant.occupancy() == 1
    card_count_slot = FEATURE_NAMES.index("card_txn_count_1h")
    # The next transaction of that card counts the three (decayed by a few ms: just under 3).
    after = engine.compute(encode_transactions(KeyHasher(), [txns[-1]]))
    assert 2.99 < after[0, card_count_slot] <= 3.0


class _BrokenEngine:
    """A feature engine whose kernels (or state store) fail."""

    def compute(self, batch: object) -> np.ndarray:
        raise RuntimeError("state store unreachable")


def test_when_the_state_cannot_be_written_the_answers_still_come_and_the_loss_is_counted(
        caplog: pytest.LogCaptureFixture) -> None:
    scorer = Scorer(None, parse_ruleset(RULES))
    txns = [pb.Transaction(transaction_id=f"t{i}", card_id="c", merchant_id="m", amount_minor=100, currency="USD",
                           event_time_ms=1_767_225_600_000 + i) for i in range(4)]
    metrics = Metrics()
    pipeline = Pipeline(engine=_BrokenEngine(), scorer=scorer, hasher=KeyHasher(), metrics=metrics)  # type: ignore[arg-type]
    loop = asyncio.new_event_loop()
    try:
        with caplog.at_level(logging.ERROR, logger="fraudscore.pipeline"):
            mixed = pipeline.run([Item(t, 0.0, 0, loop.create_future(), answered_by_fallback=k % 2 == 0)
                                  for k, t in enumerate(txns)])
            mixed.delivered(None)
            alone = pipeline.run([Item(t, 0.0, 0, loop.create_future(), answered_by_fallback=True) for t in txns])
    finally:
        loop.close()
    assert [a.transaction_id for a in parsed(mixed.answers)] == ["t1", "t3"]
    assert all(a.degraded and a.source == pb.RULES_FALLBACK for a in parsed(mixed.answers))
    assert list(alone.answers) == []
    assert _counted(metrics, "fraudscore_state_errors") == 8  # every one of both batches, logged
    assert sum("did not enter the state" in r.getMessage() for r in caplog.records) == 2
    fallbacks = {s.labels["reason"]: s.value for f in metrics.registry.collect() if f.name == "fraudscore_fallbacks"
                 for s in f.samples if s.name == "fraudscore_fallbacks_total"}
    assert fallbacks == {"features_error": 2}


def test_a_snapshot_copy_equals_the_state_at_its_moment_and_reuses_its_arrays() -> None:
    engine = FeatureEngine(_state())
    pipeline = Pipeline(engine=engine, scorer=Scorer(None, parse_ruleset(RULES)), hasher=KeyHasher(), metrics=Metrics())
    txns = [pb.Transaction(transaction_id=f"t{i}", card_id=f"c{i}", merchant_id="m", amount_minor=100, currency="USD",
                           event_time_ms=1_767_225_600_000 + i) for i in range(5)]
    loop = asyncio.new_event_loop()
    try:
        first = pipeline.snapshot_copy()
        pipeline.run([Item(t, 0.0, 0, loop.create_future()) for t in txns[:3]])
        second = pipeline.snapshot_copy()
        pipeline.run([Item(t, 0.0, 0, loop.create_future()) for t in txns[3:]])  # after the copy: not in it
    finally:
        loop.close()
    assert second is first and second.card.occupancy() == 3 and engine.state.card.occupancy() == 5
    pipeline.snapshot_copy()
    for mine, theirs in zip(second.tables(), engine.state.tables(), strict=True):
        for name in ("keys", "last_seen_ms", "values", "tags", "counters"):
            assert np.array_equal(getattr(mine, name), getattr(theirs, name))
            assert not np.shares_memory(getattr(mine, name), getattr(theirs, name))


@given(st.lists(st.tuples(st.sampled_from([int(d) for d in Decision]), st.sampled_from([int(s) for s in Source]),
                          st.lists(st.booleans(), min_size=3, max_size=3)), max_size=200))
def test_a_tally_counts_each_pair_once_per_answer(rows: list[tuple[int, int, list[bool]]]) -> None:
    n = len(rows)
    scored = ScoredBatch(np.zeros(n), np.array([r[0] for r in rows], dtype=np.int8),
                         np.array([r[1] for r in rows], dtype=np.int8), False, [()] * n, "m", "r",
                         RuleHits((), np.array([r[2] for r in rows], dtype=bool).reshape(n, 3)))
    tally = Tally.of(scored)
    assert sorted(tally.decisions) == sorted((d, s, c) for (d, s), c in Counter((d, s) for d, s, _ in rows).items())
    expected = Counter((Decision(d).name, k) for d, _, hit in rows for k, h in enumerate(hit) if h)
    assert {(DECISION_LABELS[d], r): c for d, r, c in tally.rule_hits} == expected


_ID = st.text(max_size=12)
_TXN = st.builds(
    pb.Transaction, transaction_id=_ID, card_id=_ID, customer_id=_ID, merchant_id=_ID, device_id=_ID, ip_address=_ID,
    merchant_category=st.sampled_from(["", "5411", "0742", "12"]), amount_minor=st.integers(1, 10**15),
    currency=st.sampled_from(["USD", "JPY", "BHD", "EUR", "XAF"]), event_time_ms=st.integers(0, 2**62),
    channel=st.integers(0, 4), country=st.sampled_from(["", "US", "DE", "zz"]),
    latitude=st.none() | st.floats(-90, 90), longitude=st.none() | st.floats(-180, 180))


@given(st.lists(_TXN, min_size=1, max_size=20))
def test_the_serving_encoder_equals_the_offline_columns(txns: list[pb.Transaction]) -> None:
    # Replay encodes histories with encode_columns; the server must see the same numbers.
    for t in txns:  # latitude and longitude come together (validation)
        if t.HasField("latitude") != t.HasField("longitude"):
            t.ClearField("latitude")
            t.ClearField("longitude")
    hasher = KeyHasher(b"another-key-for-this-test")
    served = encode_transactions(hasher, txns)
    offline = encode_columns(
        hasher, card_id=[t.card_id for t in txns], customer_id=[t.customer_id for t in txns],
        merchant_id=[t.merchant_id for t in txns], device_id=[t.device_id for t in txns],
        ip_address=[t.ip_address for t in txns], amount_minor=np.array([t.amount_minor for t in txns]),
        currency=[t.currency for t in txns], event_time_ms=np.array([t.event_time_ms for t in txns]),
        channel=np.array([t.channel for t in txns]), merchant_category=[t.merchant_category for t in txns],
        country=[t.country for t in txns],
        latitude=np.array([t.latitude if t.HasField("latitude") else np.nan for t in txns]),
        longitude=np.array([t.longitude if t.HasField("longitude") else np.nan for t in txns]))
    for name in EncodedBatch.__slots__:
        mine, theirs = getattr(served, name), getattr(offline, name)
        assert mine.dtype == theirs.dtype and mine.flags.c_contiguous, name
        np.testing.assert_array_equal(mine, theirs, err_msg=name)
