"""core.offline.replay: labels become visible only once reported, and replay equals the service's view."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.encode import KeyHasher
from core.features import FEATURE_NAMES, NUM_FEATURES, EntityState, FeatureEngine
from core.history.simulate import simulate
from core.history.table import History
from core.offline.replay import encode_history, label_visible_time_ms, replay_features

BASE_MS = 1_767_225_600_000
HOUR_MS, DAY_MS = 3_600_000, 86_400_000
CARD_FRAUD = FEATURE_NAMES.index("card_fraud_count_30d")
MERCHANT_FRAUD = FEATURE_NAMES.index("merchant_fraud_count_30d")


def small_state() -> EntityState:
    return EntityState.empty(card_capacity=1024, merchant_capacity=1024, customer_capacity=1024,
                             device_capacity=1024, ip_capacity=1024)


def history(rows: list[dict[str, object]]) -> History:
    """A history from rows of card_id, merchant_id, event_time_ms and optionally the label columns."""
    columns: dict[str, list[object]] = {
        "transaction_id": [f"t{i}" for i in range(len(rows))],
        "card_id": [r["card_id"] for r in rows],
        "merchant_id": [r["merchant_id"] for r in rows],
        "amount_minor": [1000] * len(rows),
        "currency": ["EUR"] * len(rows),
        "event_time_ms": [r["event_time_ms"] for r in rows],
        "is_fraud": [r.get("is_fraud", 0) for r in rows],
        "fraud_reported_time_ms": [r.get("fraud_reported_time_ms", -1) for r in rows],
    }
    return History.from_columns(columns)


@pytest.fixture(scope="module")
def world() -> History:
    return simulate(num_days=3, num_cards=200, num_merchants=80, seed=5)


def fraud_at_hours(*, report_hours: float | None, is_fraud: int = 1) -> History:
    """Card c1 pays at m1 every hour for 12 hours; its first payment is fraud, reported at `report_hours`.

    Card c2 pays at m1 on the half hour, so the merchant's count is seen from another card.
    """
    reported = -1 if report_hours is None else BASE_MS + int(report_hours * HOUR_MS)
    rows: list[dict[str, object]] = []
    for h in range(12):
        rows.append({"card_id": "c1", "merchant_id": "m1", "event_time_ms": BASE_MS + h * HOUR_MS,
                     "is_fraud": is_fraud if h == 0 else 0,
                     "fraud_reported_time_ms": reported if h == 0 else -1})
        rows.append({"card_id": "c2", "merchant_id": "m1", "event_time_ms": BASE_MS + h * HOUR_MS + HOUR_MS // 2})
    return history(rows)


@pytest.mark.parametrize("chunk", [1, 3, 4096])
def test_a_fraud_label_is_seen_only_at_or_after_its_report(chunk: int) -> None:
    h = fraud_at_hours(report_hours=5)  # exactly at c1's sixth payment
    f = replay_features(h, chunk=chunk)
    report_ms = BASE_MS + 5 * HOUR_MS
    before, after = h.event_time_ms < report_ms, h.event_time_ms >= report_ms
    assert before.sum() == 10 and after.sum() == 14
    c1 = h.card_id == "c1"
    assert (f[before, CARD_FRAUD] == 0).all() and (f[before, MERCHANT_FRAUD] == 0).all()
    decay = np.exp(-(h.event_time_ms[after] - report_ms) / (30 * DAY_MS))
    np.testing.assert_allclose(f[after & c1, CARD_FRAUD], decay[c1[after]], rtol=1e-12)
    np.testing.assert_allclose(f[after, MERCHANT_FRAUD], decay, rtol=1e-12)
    assert (f[after & ~c1, CARD_FRAUD] == 0).all()  # c2 was never reported


def test_label_delay_postpones_visibility() -> None:
    unreported = fraud_at_hours(report_hours=None)
    assert (replay_features(unreported)[:, [CARD_FRAUD, MERCHANT_FRAUD]] == 0).all()  # never known

    f = replay_features(unreported, label_delay_ms=3 * HOUR_MS)  # event time + 3 h
    visible = unreported.event_time_ms >= BASE_MS + 3 * HOUR_MS
    assert (f[~visible, MERCHANT_FRAUD] == 0).all() and (f[visible, MERCHANT_FRAUD] > 0).all()

    early_report = fraud_at_hours(report_hours=1)  # the delay wins over an earlier report
    f = replay_features(early_report, label_delay_ms=3 * HOUR_MS)
    assert (f[~visible, MERCHANT_FRAUD] == 0).all() and (f[visible, MERCHANT_FRAUD] > 0).all()
    late_report = fraud_at_hours(report_hours=8)  # ... and a later report wins over the delay
    f = replay_features(late_report, label_delay_ms=3 * HOUR_MS)
    visible = late_report.event_time_ms >= BASE_MS + 8 * HOUR_MS
    assert (f[~visible, MERCHANT_FRAUD] == 0).all() and (f[visible, MERCHANT_FRAUD] > 0).all()


def test_label_visible_time() -> None:
    h = history([
        {"card_id": "a", "merchant_id": "m", "event_time_ms": 1000, "is_fraud": 1, "fraud_reported_time_ms": 5000},
        {"card_id": "a", "merchant_id": "m", "event_time_ms": 2000, "is_fraud": 1},
        {"card_id": "a", "merchant_id": "m", "event_time_ms": 3000},
        {"card_id": "a", "merchant_id": "m", "event_time_ms": 4000, "is_fraud": 1, "fraud_reported_time_ms": 4500},
    ])
    assert label_visible_time_ms(h).tolist() == [5000, -1, -1, 4500]
    assert label_visible_time_ms(h, label_delay_ms=1000).tolist() == [5000, 3000, -1, 5000]


@pytest.mark.parametrize(("report_hours", "label_delay_ms"), [(0, None), (None, 0), (0, 0)])
def test_a_fraud_never_sees_its_own_label(report_hours: float | None, label_delay_ms: int | None) -> None:
    # Reported in the very millisecond it happened, or with no delay: the service scored the
    # payment before anyone knew, so its own features hold no fraud; the next payment's do.
    h = fraud_at_hours(report_hours=report_hours)
    f = replay_features(h, label_delay_ms=label_delay_ms)
    assert f[0, CARD_FRAUD] == 0 and f[0, MERCHANT_FRAUD] == 0
    assert f[1, MERCHANT_FRAUD] > 0 and f[2, CARD_FRAUD] > 0
    assert label_visible_time_ms(h, label_delay_ms=label_delay_ms)[0] == BASE_MS + 1


def test_legitimate_rows_never_count_as_fraud() -> None:
    h = fraud_at_hours(report_hours=2, is_fraud=0)
    assert (replay_features(h)[:, [CARD_FRAUD, MERCHANT_FRAUD]] == 0).all()


def test_unsorted_history_is_refused() -> None:
    h = fraud_at_hours(report_hours=2)
    shuffled = h.take(np.array([1, 0, *range(2, len(h))]))
    with pytest.raises(ValueError, match="arrival order"):
        replay_features(shuffled)


def late(rows: list[dict[str, object]]) -> History:
    """`history`, with each row's `received_time_ms` (its arrival at the server) from the rows."""
    h = history(rows)
    received = np.array([r.get("received_time_ms", -1) for r in rows], dtype=np.int64)
    return History(**{**h.columns(), "received_time_ms": received})


def test_replay_goes_in_arrival_order_so_a_late_event_sees_what_the_server_saw() -> None:
    # c1 pays at 10:00 and 10:05; the 10:00 one reaches the server at 10:07, after the other.
    at = BASE_MS
    rows = [{"card_id": "c1", "merchant_id": "m", "event_time_ms": at + 300_000, "received_time_ms": at + 300_000},
            {"card_id": "c1", "merchant_id": "m", "event_time_ms": at, "received_time_ms": at + 420_000}]
    h = late(rows)
    assert np.diff(h.event_time_ms)[0] < 0 and h.sorted_by_time().equals(h)  # already in arrival order
    f = replay_features(h, state=small_state())
    count = FEATURE_NAMES.index("card_txn_count_10m")
    assert f[0, count] == 0 and f[1, count] > 0  # the late one counts the one that arrived before it
    # What the server computes, fed in arrival order:
    engine = FeatureEngine(small_state())
    online = np.vstack([engine.compute(encode_history(h.slice(i, i + 1), KeyHasher())) for i in range(len(h))])
    np.testing.assert_array_equal(f, online)
    # In event order the late one would come first and count nothing.
    in_event_order = History(**{**h.columns(), "received_time_ms": np.full(2, -1, dtype=np.int64)}).sorted_by_time()
    assert in_event_order.transaction_id.tolist() == ["t1", "t0"]
    assert replay_features(in_event_order, state=small_state())[0, count] == 0


def test_a_label_is_never_visible_before_its_transaction_arrived() -> None:
    # A fraud stamped 10:00, reported 10:01, but received only at 10:05: its own features must not
    # hold its label (online, no report can count before the transaction exists there).
    rows = [{"card_id": "c1", "merchant_id": "m", "event_time_ms": BASE_MS, "received_time_ms": BASE_MS + 300_000,
             "is_fraud": 1, "fraud_reported_time_ms": BASE_MS + 60_000},
            {"card_id": "c1", "merchant_id": "m", "event_time_ms": BASE_MS + 360_000}]
    h = late(rows)
    assert label_visible_time_ms(h).tolist() == [BASE_MS + 300_001, -1]
    f = replay_features(h)
    assert f[0, CARD_FRAUD] == 0 and f[1, CARD_FRAUD] > 0


def test_sorted_by_time_is_arrival_order_with_event_time_where_no_receipt_time_is_known() -> None:
    rows = [{"card_id": "a", "merchant_id": "m", "event_time_ms": 1_000, "received_time_ms": 9_000},
            {"card_id": "a", "merchant_id": "m", "event_time_ms": 5_000},
            {"card_id": "a", "merchant_id": "m", "event_time_ms": 2_000, "received_time_ms": 2_000},
            {"card_id": "a", "merchant_id": "m", "event_time_ms": 7_000, "received_time_ms": 5_000}]
    h = late(rows)
    assert h.arrival_time_ms.tolist() == [9_000, 5_000, 2_000, 5_000]
    assert h.sorted_by_time().transaction_id.tolist() == ["t2", "t1", "t3", "t0"]  # equal times keep their order


def test_empty_history_gives_no_rows() -> None:
    h = fraud_at_hours(report_hours=2).slice(0, 0)
    calls: list[int] = []
    assert replay_features(h, on_progress=calls.append).shape == (0, NUM_FEATURES)
    assert calls == []


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_progress_counts_every_row_once(world: History, chunk: int) -> None:
    calls: list[int] = []
    replay_features(world, chunk=chunk, label_delay_ms=HOUR_MS, state=small_state(), on_progress=calls.append)
    assert sum(calls) == len(world)
    assert all(1 <= c <= chunk for c in calls)


def test_replay_of_a_simulated_world_is_deterministic(world: History) -> None:
    first = replay_features(world, state=small_state())
    second = replay_features(world, state=small_state())
    other_chunks = replay_features(world, state=small_state(), chunk=97)
    assert first.shape == (len(world), NUM_FEATURES)
    assert first.tobytes() == second.tobytes() == other_chunks.tobytes()
    assert np.isfinite(first[:, FEATURE_NAMES.index("card_txn_count_24h")]).all()


def service_view(h: History, *, label_delay_ms: int | None, seed: int) -> np.ndarray:
    """What the live service would have computed: transactions in random batches, and each fraud
    report fed through apply_outcomes as it arrives, before any transaction at or after its time."""
    reported = h.fraud_reported_time_ms.copy()
    if label_delay_ms is not None:
        delayed = h.event_time_ms + label_delay_ms
        reported = np.where(reported >= 0, np.maximum(reported, delayed), delayed)
    reports = sorted((int(reported[i]), i) for i in np.flatnonzero((h.is_fraud == 1) & (reported >= 0)))
    hasher = KeyHasher()
    batch = encode_history(h, hasher)
    engine = FeatureEngine(small_state())
    rng = random.Random(seed)
    out, start, r = [], 0, 0
    while start < len(h):
        while r < len(reports) and reports[r][0] <= h.event_time_ms[start]:
            t, i = reports[r]
            engine.apply_outcomes(batch.card_key[i:i + 1], batch.merchant_key[i:i + 1],
                                  np.array([t], dtype=np.int64), np.ones(1))
            r += 1
        stop = min(len(h), start + rng.choice([1, 2, 5, 50, 1000]))
        if r < len(reports):  # the next report must land between batches
            stop = min(stop, max(start + 1, int(np.searchsorted(h.event_time_ms, reports[r][0], side="left"))))
        out.append(engine.compute(batch.slice(start, stop)))
        start = stop
    return np.concatenate(out)


def with_reports(h: History, *, after_ms: int | None) -> History:
    """`h` with each fraud reported `after_ms` after its event (None: never reported)."""
    if after_ms is None:
        reported = np.full(len(h), -1, dtype=np.int64)
    else:
        reported = np.where(h.is_fraud == 1, h.event_time_ms + after_ms, -1).astype(np.int64)
    return History(**{**h.columns(), "fraud_reported_time_ms": reported})


@pytest.mark.parametrize(("report_after_ms", "label_delay_ms", "seed"), [
    (2 * HOUR_MS, None, 1), (2 * HOUR_MS, HOUR_MS, 2), (None, DAY_MS, 3), (None, None, 4)])
def test_replay_equals_what_the_service_would_have_computed(
        world: History, report_after_ms: int | None, label_delay_ms: int | None, seed: int) -> None:
    h = with_reports(world, after_ms=report_after_ms)
    replayed = replay_features(h, state=small_state(), label_delay_ms=label_delay_ms)
    live = service_view(h, label_delay_ms=label_delay_ms, seed=seed)
    assert replayed.tobytes() == live.tobytes()
    # The comparison covered fraud features that were not all zero (when any label was visible).
    labelled = report_after_ms is not None or label_delay_ms is not None
    assert (replayed[:, CARD_FRAUD] > 0).any() == labelled
    assert (replayed[:, MERCHANT_FRAUD] > 0).any() == labelled


@settings(max_examples=50, deadline=None)
@given(distinct=st.lists(st.sampled_from(["", "a", "card-1", "card-2", "ü", "US", "5411", "12345"]), max_size=30),
       repeat=st.sampled_from([1, 5, 300]))
def test_encoding_a_long_column_equals_encoding_value_by_value(distinct: list[str], repeat: int) -> None:
    # Long columns are encoded once per distinct value; the result must not depend on it.
    from core.encode import country_code, mapped, mcc_code

    hasher = KeyHasher(b"k")
    values = distinct * repeat
    column = np.array(values, dtype=object)
    assert hasher.keys(column).tolist() == [hasher.key(v) for v in values]
    assert mapped(column, mcc_code, np.int64).tolist() == [mcc_code(v) for v in values]
    assert mapped(values, country_code, np.int64).tolist() == [country_code(v) for v in values]
