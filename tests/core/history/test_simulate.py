"""core.history.simulate: determinism, schema, fraud rate and the signature of every fraud pattern."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest

from core.history.simulate import FraudPattern, SimulatedWorld, simulate, simulate_world
from core.history.table import COLUMNS, Channel, History
from core.history.validate import looks_like_pan, validate_history

DAY_MS = 86_400_000
START_MS = 1_767_225_600_000


@pytest.fixture(scope="module")
def world() -> SimulatedWorld:
    return simulate_world(num_days=10, num_cards=2000, seed=5)


def distance_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    p1, p2 = np.radians(lat1), np.radians(lat2)
    a = np.sin((p2 - p1) / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(np.radians(lon2 - lon1) / 2) ** 2
    return float(2 * 6371.0 * np.arcsin(np.sqrt(a)))


def legit_before(world: SimulatedWorld, row: int | np.integer) -> np.ndarray:
    """Mask: the legitimate rows of `row`'s card that happened before it."""
    h = world.history
    mask: np.ndarray = (
        (world.fraud_pattern == FraudPattern.NONE)
        & (h.card_id == h.card_id[row])
        & (h.event_time_ms < h.event_time_ms[row])
    )
    return mask


def test_same_seed_same_arrays_other_seed_other_arrays() -> None:
    first = simulate_world(num_days=5, num_cards=500, seed=42)
    again = simulate_world(num_days=5, num_cards=500, seed=42)
    assert first.history.equals(again.history)
    for spec in COLUMNS:  # bit for bit, NaN payloads included
        mine, theirs = getattr(first.history, spec.name), getattr(again.history, spec.name)
        if mine.dtype != object:
            assert mine.tobytes() == theirs.tobytes(), spec.name
    assert np.array_equal(first.fraud_pattern, again.fraud_pattern)
    assert simulate(num_days=5, num_cards=500, seed=42).equals(first.history)
    assert not simulate(num_days=5, num_cards=500, seed=43).equals(first.history)


def test_schema_order_and_ids(world: SimulatedWorld) -> None:
    h = world.history
    validate_history(h)  # dtypes, ranges, unique transaction ids, no PAN-shaped card ids
    assert len(world.fraud_pattern) == len(h) and world.fraud_pattern.dtype == np.int8
    assert np.all(np.diff(h.event_time_ms) >= 0)
    assert h.event_time_ms.min() >= START_MS and h.event_time_ms.max() < START_MS + 10 * DAY_MS
    assert len(np.unique(h.transaction_id)) == len(h)
    assert all(re.fullmatch(r"t_\d{8}", t) for t in h.transaction_id[:100])
    assert not looks_like_pan(h.card_id).any()
    assert all(re.fullmatch(r"card_\d+", c) for c in np.unique(h.card_id))
    assert not any(re.fullmatch(r"\d{13,19}", c) for c in np.unique(h.card_id))
    assert all(re.fullmatch(r"10\.\d+\.\d+\.\d+", ip) for ip in np.unique(h.ip_address) if ip)
    assert set(np.unique(h.channel)) <= {int(c) for c in Channel}
    assert {Channel.CARD_PRESENT, Channel.ECOMMERCE, Channel.ATM} <= set(np.unique(h.channel))
    assert (h.amount_minor > 0).all()
    # Card-present rows have a place and no device; e-commerce rows have a device and an IP.
    present = h.channel == Channel.CARD_PRESENT
    assert not np.isnan(h.latitude[present]).any() and (h.device_id[present] == "").all()
    online = h.channel == Channel.ECOMMERCE
    assert (h.device_id[online] != "").all() and (h.ip_address[online] != "").all()


def test_labels_and_report_times(world: SimulatedWorld) -> None:
    h = world.history
    fraud = h.is_fraud == 1
    assert np.array_equal(fraud, world.fraud_pattern != FraudPattern.NONE)
    assert (h.fraud_reported_time_ms[~fraud] == -1).all()
    delay = h.fraud_reported_time_ms[fraud] - h.event_time_ms[fraud]
    assert (delay >= DAY_MS).all() and (delay <= 31 * DAY_MS).all()
    assert 0.005 <= fraud.mean() <= 0.02


@pytest.mark.parametrize("seed", [1, 7])
def test_every_pattern_present_even_in_a_small_world(seed: int) -> None:
    world = simulate_world(num_days=5, num_cards=500, seed=seed)
    assert set(np.unique(world.fraud_pattern)) == {int(p) for p in FraudPattern}


def test_fraud_scale_changes_incidence() -> None:
    none = simulate(num_days=5, num_cards=500, fraud_scale=0.0)
    assert none.is_fraud.sum() == 0 and (none.fraud_reported_time_ms == -1).all()
    normal = simulate(num_days=10, num_cards=2000).is_fraud.sum()
    more = simulate(num_days=10, num_cards=2000, fraud_scale=4.0).is_fraud.sum()
    assert more > 2.5 * normal


def test_card_testing_is_a_burst_of_small_online_payments(world: SimulatedWorld) -> None:
    h, testing = world.history, world.fraud_pattern == FraudPattern.CARD_TESTING
    assert ((h.amount_minor[testing] >= 100) & (h.amount_minor[testing] <= 500)).all()
    assert (h.channel[testing] == Channel.ECOMMERCE).all()
    for card in np.unique(h.card_id[testing]):
        rows = np.flatnonzero(testing & (h.card_id == card))
        # A card is rarely tested twice; split its rows where more than an hour passes.
        for burst in np.split(rows, np.flatnonzero(np.diff(h.event_time_ms[rows]) > 60 * 60_000) + 1):
            assert 5 <= len(burst) <= 30
            assert h.event_time_ms[burst[-1]] - h.event_time_ms[burst[0]] <= 60 * 60_000
            assert len(np.unique(h.merchant_id[burst])) <= 3
            before = legit_before(world, burst[0])
            assert h.device_id[burst[0]] not in set(h.device_id[before])
            assert set(h.merchant_id[burst]) - set(h.merchant_id[before])  # somewhere unusual


def test_account_takeover_is_a_new_device_far_from_home(world: SimulatedWorld) -> None:
    h, takeover = world.history, world.fraud_pattern == FraudPattern.ACCOUNT_TAKEOVER
    assert (h.channel[takeover] == Channel.ECOMMERCE).all()
    checked = 0
    for row in np.flatnonzero(takeover):
        before = legit_before(world, row)
        assert h.device_id[row] not in set(h.device_id[before])
        assert h.ip_address[row] not in set(h.ip_address[before])
        located = before & ~np.isnan(h.latitude)
        if located.any():
            home = np.median(h.latitude[located]), np.median(h.longitude[located])
            assert distance_km(*home, h.latitude[row], h.longitude[row]) > 1000
            checked += 1
    assert checked >= 10


def test_compromised_merchant_victims_share_an_earlier_merchant(world: SimulatedWorld) -> None:
    h, abused = world.history, world.fraud_pattern == FraudPattern.COMPROMISED_MERCHANT
    breached = set(world.breached_merchant_ids)
    cards = np.unique(h.card_id[abused])
    assert len(cards) >= 5
    visited_by_card = []
    for card in cards:
        first = np.flatnonzero(abused & (h.card_id == card))[0]
        visited = set(h.merchant_id[legit_before(world, first)])
        assert visited & breached
        visited_by_card.append(visited)
    # The breach shows in the data: victims visited a breached merchant far more often than
    # cards at large did (popular merchants get breached, so compare with their base rate).
    legit = world.fraud_pattern == FraudPattern.NONE
    all_cards = len(np.unique(h.card_id))
    lifts = [np.mean([m in v for v in visited_by_card])
             / (len(np.unique(h.card_id[legit & (h.merchant_id == m)])) / all_cards) for m in breached]
    assert max(lifts) >= 4
    # The abuse is card-not-present from devices the cards never used, shared within the ring.
    assert (h.channel[abused] == Channel.ECOMMERCE).all()
    assert len(np.unique(h.device_id[abused])) <= 3 * len(breached)


def test_large_amounts_are_large_for_the_card(world: SimulatedWorld) -> None:
    h, large = world.history, world.fraud_pattern == FraudPattern.LARGE_AMOUNT
    legit = world.fraud_pattern == FraudPattern.NONE
    ratios = [h.amount_minor[row] / np.median(h.amount_minor[legit & (h.card_id == h.card_id[row])])
              for row in np.flatnonzero(large)]
    assert min(ratios) >= 3 and np.median(ratios) >= 8
    assert np.isin(h.merchant_category[large], ["5732", "5944"]).mean() >= 0.5


def test_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="num_days"):
        simulate(num_days=0)
    with pytest.raises(ValueError, match="num_merchants"):
        simulate(num_merchants=10)
    with pytest.raises(ValueError, match="fraud_scale"):
        simulate(fraud_scale=-1.0)


def test_progress_bar_goes_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    simulate(num_days=2, num_cards=100, progress=True)
    assert "simulate" in capsys.readouterr().err


def test_defaults_are_quick_and_sized_as_documented() -> None:
    started = time.perf_counter()
    history = simulate()
    elapsed = time.perf_counter() - started
    assert isinstance(history, History)
    assert 150_000 <= len(history) <= 250_000
    assert 0.005 <= history.is_fraud.mean() <= 0.02
    assert elapsed < 20.0
