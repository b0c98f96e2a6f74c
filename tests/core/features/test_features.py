"""core.features: the Numba kernels against a plain-Python reference, batching, state bounds, snapshots.

The reference below is written from the registry descriptions and the kernels' documented
semantics, one readable loop over transactions with a dict per entity kind. It knows
nothing of slots, tags or hash tables, so the comparison checks the layout too.
"""

from __future__ import annotations

import math
import os
import random
import re
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.encode import EncodedBatch, KeyHasher
from core.features import FEATURE_NAMES, FEATURE_SET_VERSION, NUM_FEATURES, EntityState, FeatureEngine
from core.features.state import MAX_PROBE, EntityTable

REPO = Path(__file__).resolve().parents[3]
BASE_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z, a Thursday
MIN_MS, HOUR_MS, DAY_MS = 60_000, 3_600_000, 86_400_000
NAN = math.nan
EARTH_RADIUS_KM = 6371.0088
EW_MIN_ALPHA = 1.0 / 64.0
MIN_STD = 0.1
TAU_MS = {"1m": 1.0 * MIN_MS, "10m": 10.0 * MIN_MS, "1h": 1.0 * HOUR_MS, "24h": 1.0 * DAY_MS, "7d": 7.0 * DAY_MS,
          "30d": 30.0 * DAY_MS}
SKETCH_BUCKET_MS = 12 * HOUR_MS
COL = {name: i for i, name in enumerate(FEATURE_NAMES)}


# --------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class Txn:
    """One transaction, already encoded: keys (0 = unknown), amount in major units."""

    card: int
    merchant: int
    time_ms: int
    amount: float = 10.0
    customer: int = 0
    device: int = 0
    ip: int = 0
    channel: int = 1
    mcc: int = -1
    country: int = -1
    lat: float = NAN
    lon: float = NAN


@dataclass(frozen=True, slots=True)
class Report:
    """One outcome report (fraud weight 1.0, legitimate 0.0)."""

    card: int
    merchant: int
    time_ms: int
    weight: float = 1.0


Event = Txn | Report


def encode(txns: Sequence[Txn]) -> EncodedBatch:
    def col(name: str, dtype: type) -> np.ndarray:
        return np.array([getattr(t, name) for t in txns], dtype=dtype)

    return EncodedBatch(
        card_key=col("card", np.uint64), customer_key=col("customer", np.uint64),
        merchant_key=col("merchant", np.uint64), device_key=col("device", np.uint64), ip_key=col("ip", np.uint64),
        amount=col("amount", np.float64), event_time_ms=col("time_ms", np.int64), channel=col("channel", np.int64),
        merchant_category=col("mcc", np.int64), country=col("country", np.int64),
        latitude=col("lat", np.float64), longitude=col("lon", np.float64),
    )


def small_state(capacity: int = 1024) -> EntityState:
    return EntityState.empty(card_capacity=capacity, merchant_capacity=capacity, customer_capacity=capacity,
                             device_capacity=capacity, ip_capacity=capacity)


def run_engine(events: Sequence[Event], *, seed: int = 0, engine: FeatureEngine | None = None,
               batch: int | None = None) -> tuple[np.ndarray, FeatureEngine]:
    """Feed `events` through a FeatureEngine as the service would: transactions in batches, reports between.

    Batch sizes come from `seed` (1 to 9, or everything up to the next report), or are `batch`
    when given; consecutive reports go in one call or one by one, also by `seed`.
    """
    engine = engine or FeatureEngine(small_state())
    rng = random.Random(seed)
    rows: list[np.ndarray] = []
    pending: list[Txn] = []
    reports: list[Report] = []

    def size() -> int:
        if batch is not None:
            return batch
        return rng.choice([1, 1, 2, 3, 5, 9, 1 << 30])

    def flush_txns() -> None:
        i = 0
        while i < len(pending):
            step = size()
            rows.append(engine.compute(encode(pending[i:i + step])))
            i += step
        pending.clear()

    def flush_reports() -> None:
        groups = [reports] if rng.random() < 0.5 else [[r] for r in reports]
        for group in groups:
            if group:
                engine.apply_outcomes(np.array([r.card for r in group], dtype=np.uint64),
                                      np.array([r.merchant for r in group], dtype=np.uint64),
                                      np.array([r.time_ms for r in group], dtype=np.int64),
                                      np.array([r.weight for r in group], dtype=np.float64))
        reports.clear()

    for event in events:
        if isinstance(event, Report):
            flush_txns()
            reports.append(event)
        else:
            flush_reports()
            pending.append(event)
    flush_txns()
    flush_reports()
    features = np.concatenate(rows) if rows else np.empty((0, NUM_FEATURES))
    return features, engine


def state_arrays(state: EntityState) -> Iterator[tuple[str, np.ndarray]]:
    for t in state.tables():
        for name in ("keys", "last_seen_ms", "values", "tags", "counters"):
            yield f"{t.kind}.{name}", getattr(t, name)


def assert_bitwise_equal(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype
    assert a.tobytes() == b.tobytes()


def assert_same_state(a: EntityState, b: EntityState) -> None:
    for (name, x), (_, y) in zip(state_arrays(a), state_arrays(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert x.tobytes() == y.tobytes(), name


# --------------------------------------------------------------------------- the reference


def decayed(value: float, as_of: float, now: float, tau: float) -> float:
    """A counter kept as of `as_of`, read at `now`; read earlier (a late event), it is taken as it is."""
    return value * math.exp(-(now - as_of) / tau) if now > as_of else value


def with_event(value: float, as_of: float, t: float, tau: float, weight: float) -> float:
    """The counter after an event of `weight` at `t`, kept as of max(as_of, t)."""
    if t >= as_of:
        return decayed(value, as_of, t, tau) + weight
    return value + weight * math.exp(-(as_of - t) / tau)  # a late event adds its own decayed weight


@dataclass
class Moments:
    """Mean and variance of log amounts: a running mean for 64 transactions, then EW with alpha 1/64."""

    mean: float = 0.0
    var: float = 0.0

    def zscore(self, count: float, x: float) -> float:
        if count < 2:
            return NAN
        return (x - self.mean) / max(math.sqrt(self.var), MIN_STD)

    def add(self, count: float, x: float) -> None:
        alpha = max(1.0 / (count + 1.0), EW_MIN_ALPHA)
        delta = x - self.mean
        self.mean += alpha * delta
        self.var = (1.0 - alpha) * (self.var + alpha * delta * delta)


@dataclass
class MerchantMemory:
    """The card's merchants as the documented Bloom filter: bit positions key mod 128 and (key >> 7) mod 128,
    forgotten all at once when 64 of the 128 are set."""

    bits: set[int] = field(default_factory=set)

    def novelty(self, key: int, known: bool) -> float:
        if key == 0:
            return NAN
        positions = {key % 128, (key >> 7) % 128}
        seen = positions <= self.bits
        if len(self.bits) >= 64:
            self.bits.clear()
        self.bits |= positions
        return (0.0 if seen else 1.0) if known else NAN


@dataclass
class DistinctSketch:
    """Keys seen per 12-hour bucket (as bit positions key >> 58), for the bucket of the card's latest
    event time and the one before; an event sees the kept buckets from its own bucket's predecessor
    on (all kept buckets when it is late)."""

    buckets: dict[int, set[int]] = field(default_factory=dict)

    def estimate_and_add(self, key: int, bucket: int, state_bucket: int) -> float:
        kept = {b: bits for b, bits in self.buckets.items() if b in (state_bucket, state_bucket - 1)}
        visible: set[int] = set()
        for b, bits in kept.items():
            if bucket <= state_bucket or b >= bucket - 1:
                visible |= bits
        zeros = 64 - len(visible)
        estimate = 64.0 * math.log(64.0 / max(zeros, 1))
        newest = max(bucket, state_bucket)
        self.buckets = {b: bits for b, bits in kept.items() if b in (newest, newest - 1)}
        if key != 0 and bucket in (newest, newest - 1):
            self.buckets.setdefault(bucket, set()).add(key >> 58)
        return estimate


@dataclass
class Card:
    as_of: float = 0.0  # the latest event time seen; counters are kept as of it (zero counters need no time)
    count: float = 0.0
    txns: dict[str, float] = field(default_factory=lambda: dict.fromkeys(("1m", "10m", "1h", "24h", "7d", "30d"), 0.0))
    amounts: dict[str, float] = field(default_factory=lambda: dict.fromkeys(("1h", "24h", "7d"), 0.0))
    moments: Moments = field(default_factory=Moments)
    devices: list[int] = field(default_factory=list)  # the last two distinct, most recent first
    ips: list[int] = field(default_factory=list)
    country: int | None = None
    merchants: MerchantMemory = field(default_factory=MerchantMemory)
    distinct_merchants: DistinctSketch = field(default_factory=DistinctSketch)
    distinct_devices: DistinctSketch = field(default_factory=DistinctSketch)
    location: tuple[float, float, float] | None = None  # (time, lat, lon) of the latest located transaction
    fraud: float = 0.0
    fraud_as_of: float = 0.0


@dataclass
class Merchant:
    as_of: float = 0.0
    count: float = 0.0
    txns: dict[str, float] = field(default_factory=lambda: dict.fromkeys(("10m", "1h", "24h", "7d", "30d"), 0.0))
    amounts: dict[str, float] = field(default_factory=lambda: dict.fromkeys(("1h", "24h"), 0.0))
    moments: Moments = field(default_factory=Moments)
    fraud: dict[str, float] = field(default_factory=lambda: dict.fromkeys(("7d", "30d"), 0.0))
    fraud_as_of: float = 0.0


@dataclass
class Small:
    """Customer, device or IP: decayed counts and sums, and card switches."""

    as_of: float = 0.0
    txns: dict[str, float] = field(default_factory=lambda: dict.fromkeys(("10m", "1h", "24h"), 0.0))
    amounts: dict[str, float] = field(default_factory=lambda: dict.fromkeys(("1h", "24h"), 0.0))
    switches: float = 0.0
    last_card: int = 0


def novelty(recent: list[int], key: int, known: bool) -> float:
    """1.0 when `key` is not among the card's two last distinct keys (then remembered); NaN when unknown."""
    if key == 0:
        return NAN
    seen = key in recent
    if not recent or recent[0] != key:
        recent[:] = [key, *recent[:1]]
    return (0.0 if seen else 1.0) if known else NAN


def haversine_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    p1, p2 = math.radians(lat1), math.radians(lat2)
    a = math.sin((p2 - p1) / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(math.radians(lon2 - lon1) / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(a)))


class Reference:
    """Every registry feature, one transaction at a time, with unbounded dicts for state."""

    def __init__(self) -> None:
        self.cards: dict[int, Card] = {}
        self.merchants: dict[int, Merchant] = {}
        self.customers: dict[int, Small] = {}
        self.devices: dict[int, Small] = {}
        self.ips: dict[int, Small] = {}

    def report(self, r: Report) -> None:
        if r.weight == 0.0:  # a legitimate outcome changes nothing
            return
        t = float(r.time_ms)
        if r.card:
            c = self.cards.setdefault(r.card, Card())
            c.fraud = with_event(c.fraud, c.fraud_as_of, t, TAU_MS["30d"], r.weight)
            c.fraud_as_of = max(c.fraud_as_of, t)
        if r.merchant:
            m = self.merchants.setdefault(r.merchant, Merchant())
            m.fraud = {w: with_event(v, m.fraud_as_of, t, TAU_MS[w], r.weight) for w, v in m.fraud.items()}
            m.fraud_as_of = max(m.fraud_as_of, t)

    def transaction(self, txn: Txn) -> dict[str, float]:
        t = float(txn.time_ms)
        x = math.log1p(txn.amount)
        when = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=txn.time_ms)
        f: dict[str, float] = {
            "amount_log": x,
            "channel": float(txn.channel),
            "merchant_category": float(txn.mcc) if txn.mcc >= 0 else NAN,
            "hour_of_day_utc": when.hour + when.minute / 60 + when.second / 3600 + when.microsecond / 3.6e9,
            "day_of_week_utc": float(when.weekday()),
            # Solar time: the sun crosses 15° of longitude an hour, 240,000 ms a degree.
            "hour_of_day_local": NAN if math.isnan(txn.lon) else ((t + txn.lon * 240_000.0) % DAY_MS) / HOUR_MS,
        }
        f |= self._card(txn, t, x)
        f |= self._merchant(txn, t, x)
        f |= self._small("customer", self.customers, txn.customer, txn, t)
        f |= self._small("device", self.devices, txn.device, txn, t)
        f |= self._small("ip", self.ips, txn.ip, txn, t)
        return f

    def _card(self, txn: Txn, t: float, x: float) -> dict[str, float]:
        names = [n for n in FEATURE_NAMES if n.startswith("card_")]
        if txn.card == 0:
            return dict.fromkeys(names, NAN)
        c = self.cards.setdefault(txn.card, Card())
        known = c.count > 0
        f = {f"card_txn_count_{w}": decayed(c.txns[w], c.as_of, t, TAU_MS[w]) for w in c.txns}
        f |= {f"card_amount_sum_{w}": decayed(c.amounts[w], c.as_of, t, TAU_MS[w]) for w in c.amounts}
        f["card_seconds_since_last"] = max(0.0, t - c.as_of) / 1000 if known else NAN
        f["card_amount_zscore"] = c.moments.zscore(c.count, x)
        f["card_amount_to_mean_ratio"] = (1 + txn.amount) / math.exp(c.moments.mean) if known else NAN
        f["card_txn_count_total"] = c.count
        f["card_new_device"] = novelty(c.devices, txn.device, known)
        f["card_new_ip"] = novelty(c.ips, txn.ip, known)
        f["card_new_merchant"] = c.merchants.novelty(txn.merchant, known)
        bucket, state_bucket = txn.time_ms // SKETCH_BUCKET_MS, int(c.as_of) // SKETCH_BUCKET_MS
        f["card_distinct_merchants_24h"] = c.distinct_merchants.estimate_and_add(txn.merchant, bucket, state_bucket)
        f["card_distinct_devices_24h"] = c.distinct_devices.estimate_and_add(txn.device, bucket, state_bucket)
        if txn.country < 0:
            f["card_new_country"] = NAN
        else:
            f["card_new_country"] = NAN if c.country is None else float(c.country != txn.country)
            c.country = txn.country
        located = not (math.isnan(txn.lat) or math.isnan(txn.lon))
        f["card_distance_km_from_last"] = f["card_speed_kmh_from_last"] = NAN
        if located and c.location is not None:
            t0, lat0, lon0 = c.location
            km = haversine_km(lat0, lon0, txn.lat, txn.lon)
            f["card_distance_km_from_last"] = km
            f["card_speed_kmh_from_last"] = km / max(abs(t - t0) / HOUR_MS, 1 / 60)
        if located and (c.location is None or t >= c.location[0]):
            c.location = (t, txn.lat, txn.lon)
        f["card_fraud_count_30d"] = decayed(c.fraud, c.fraud_as_of, t, TAU_MS["30d"])
        # Then the transaction becomes history.
        for w in c.txns:
            c.txns[w] = with_event(c.txns[w], c.as_of, t, TAU_MS[w], 1.0)
        for w in c.amounts:
            c.amounts[w] = with_event(c.amounts[w], c.as_of, t, TAU_MS[w], txn.amount)
        c.moments.add(c.count, x)
        c.count += 1
        c.as_of = max(c.as_of, t)
        assert set(f) == set(names)
        return f

    def _merchant(self, txn: Txn, t: float, x: float) -> dict[str, float]:
        names = [n for n in FEATURE_NAMES if n.startswith("merchant_") and n != "merchant_category"]
        if txn.merchant == 0:
            return dict.fromkeys(names, NAN)
        m = self.merchants.setdefault(txn.merchant, Merchant())
        f = {f"merchant_txn_count_{w}": decayed(m.txns[w], m.as_of, t, TAU_MS[w]) for w in ("10m", "1h", "24h", "7d")}
        f |= {f"merchant_amount_sum_{w}": decayed(m.amounts[w], m.as_of, t, TAU_MS[w]) for w in m.amounts}
        f["merchant_amount_zscore"] = m.moments.zscore(m.count, x)
        f |= {f"merchant_fraud_count_{w}": decayed(v, m.fraud_as_of, t, TAU_MS[w]) for w, v in m.fraud.items()}
        f["merchant_fraud_rate_30d"] = f["merchant_fraud_count_30d"] / (decayed(m.txns["30d"], m.as_of, t,
                                                                                 TAU_MS["30d"]) + 1)
        for w in m.txns:
            m.txns[w] = with_event(m.txns[w], m.as_of, t, TAU_MS[w], 1.0)
        for w in m.amounts:
            m.amounts[w] = with_event(m.amounts[w], m.as_of, t, TAU_MS[w], txn.amount)
        m.moments.add(m.count, x)
        m.count += 1
        m.as_of = max(m.as_of, t)
        assert set(f) == set(names)
        return f

    @staticmethod
    def _small(kind: str, table: dict[int, Small], key: int, txn: Txn, t: float) -> dict[str, float]:
        names = [n for n in FEATURE_NAMES if n.startswith(f"{kind}_")]
        if key == 0:
            return dict.fromkeys(names, NAN)
        e = table.setdefault(key, Small())
        f = {f"{kind}_txn_count_{w}": decayed(v, e.as_of, t, TAU_MS[w]) for w, v in e.txns.items()}
        f |= {f"{kind}_amount_sum_{w}": decayed(v, e.as_of, t, TAU_MS[w]) for w, v in e.amounts.items()}
        f[f"{kind}_card_switches_24h"] = decayed(e.switches, e.as_of, t, TAU_MS["24h"])
        switched = e.last_card not in (0, txn.card)  # a different card than the entity's previous one
        e.txns = {w: with_event(v, e.as_of, t, TAU_MS[w], 1.0) for w, v in e.txns.items()}
        e.amounts = {w: with_event(v, e.as_of, t, TAU_MS[w], txn.amount) for w, v in e.amounts.items()}
        e.switches = with_event(e.switches, e.as_of, t, TAU_MS["24h"], 1.0 if switched else 0.0)
        e.last_card = txn.card
        e.as_of = max(e.as_of, t)
        assert set(f) == set(names)
        return f

    def features(self, events: Sequence[Event]) -> np.ndarray:
        """The feature matrix of the transactions among `events`, in registry order."""
        rows = []
        for event in events:
            if isinstance(event, Report):
                self.report(event)
            else:
                f = self.transaction(event)
                assert sorted(f) == sorted(FEATURE_NAMES)
                rows.append([f[name] for name in FEATURE_NAMES])
        return np.array(rows, dtype=np.float64).reshape(len(rows), NUM_FEATURES)


# --------------------------------------------------------------------------- random streams

_HASHER = KeyHasher(b"test_features")
POOL = 10
KEYS = {kind: [_HASHER.key(f"{kind}-{i}") for i in range(POOL)]
        for kind in ("card", "merchant", "customer", "device", "ip")}
PLACES = ((40.71, -74.01), (51.51, -0.13), (-33.87, 151.21), (0.0, 0.0), (90.0, 0.0), (0.0, 180.0))

amounts = st.one_of(
    st.floats(1e-6, 1.0), st.floats(1.0, 1e5), st.floats(1e5, 1e12), st.sampled_from([0.0, 0.01, 42.0, 1e12]))
gaps_ms = st.one_of(st.just(0), st.integers(0, 10 * MIN_MS), st.integers(0, 3 * DAY_MS), st.integers(0, 60 * DAY_MS))
lateness_ms = st.one_of(st.just(0), st.just(0), st.integers(1, 2 * DAY_MS))
locations = st.one_of(
    st.just((NAN, NAN)), st.tuples(st.just(NAN), st.floats(-180, 180)), st.tuples(st.floats(-90, 90), st.just(NAN)),
    st.sampled_from(PLACES), st.tuples(st.floats(-90, 90), st.floats(-180, 180)))


@st.composite
def event_streams(draw: st.DrawFn, max_events: int = 50) -> list[Event]:
    """Transactions and outcome reports over a few entities: equal times, late events, missing fields."""
    pools = {kind: draw(st.integers(1, POOL)) for kind in KEYS}

    def key(kind: str, *, missing: bool = True) -> int:
        i = draw(st.integers(-1 if missing else 0, pools[kind] - 1))
        return 0 if i < 0 else KEYS[kind][i]

    clock = BASE_MS
    events: list[Event] = []
    for _ in range(draw(st.integers(0, max_events))):
        clock += draw(gaps_ms)
        if draw(st.integers(0, 7)) == 0:
            events.append(Report(key("card"), key("merchant"), clock + draw(st.integers(-5 * DAY_MS, DAY_MS)),
                                 draw(st.sampled_from([1.0, 1.0, 0.0, 0.5]))))
            continue
        lat, lon = draw(locations)
        events.append(Txn(
            card=0 if draw(st.integers(0, 15)) == 0 else key("card", missing=False),
            merchant=key("merchant"), customer=key("customer"), device=key("device"), ip=key("ip"),
            time_ms=clock - draw(lateness_ms), amount=draw(amounts), channel=draw(st.integers(0, 4)),
            mcc=draw(st.sampled_from([-1, 5411, 5999, 0])), country=draw(st.integers(-1, 3)), lat=lat, lon=lon,
        ))
    return events


def assert_matches_reference(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape
    nan_actual, nan_expected = np.isnan(actual), np.isnan(expected)
    ok = np.isclose(actual, expected, rtol=1e-9, atol=1e-12) | (nan_actual & nan_expected)
    if not ok.all():
        i, j = np.argwhere(~ok)[0]
        pytest.fail(f"transaction {i}, {FEATURE_NAMES[j]}: kernels give {actual[i, j]!r}, "
                    f"the reference {expected[i, j]!r}")


# --------------------------------------------------------------------------- kernels against the reference


@settings(max_examples=200, deadline=None)
@given(events=event_streams(), seed=st.integers(0, 2**16))
def test_kernels_match_the_reference_on_random_streams(events: list[Event], seed: int) -> None:
    actual, engine = run_engine(events, seed=seed)
    assert_matches_reference(actual, Reference().features(events))
    assert all(t.evictions == 0 for t in engine.state.tables())  # the reference has no capacity


def test_reference_comparison_covers_every_feature_with_values() -> None:
    # A fixed, busy stream: each feature must take a finite non-zero value somewhere, so no
    # column can pass the comparison by being NaN or zero on both sides.
    rng = random.Random(5)
    events: list[Event] = []
    t = BASE_MS
    for i in range(400):
        t += rng.choice([0, 30_000, 5 * MIN_MS, 2 * HOUR_MS])
        if i % 25 == 24:
            events.append(Report(rng.choice(KEYS["card"][:3]), rng.choice(KEYS["merchant"][:3]), t))
            continue
        lat, lon = rng.choice(PLACES)
        events.append(Txn(card=rng.choice(KEYS["card"][:3]), merchant=rng.choice(KEYS["merchant"][:3]),
                          customer=rng.choice(KEYS["customer"][:3]), device=rng.choice(KEYS["device"][:3]),
                          ip=rng.choice(KEYS["ip"][:3]), time_ms=t - rng.choice([0, 0, 0, HOUR_MS]),
                          amount=rng.lognormvariate(3, 1.5), channel=rng.randrange(5), mcc=5411,
                          country=rng.randrange(3), lat=lat, lon=lon))
    actual, _ = run_engine(events, seed=1)
    assert_matches_reference(actual, Reference().features(events))
    informative = np.isfinite(actual) & (actual != 0)
    assert [n for n, used in zip(FEATURE_NAMES, informative.any(axis=0), strict=True) if not used] == []


def test_decayed_windows_follow_the_documented_formula() -> None:
    card, merchant = KEYS["card"][0], KEYS["merchant"][0]
    events: list[Event] = [Txn(card, merchant, BASE_MS, amount=10.0), Txn(card, merchant, BASE_MS + HOUR_MS),
                           Txn(card, merchant, BASE_MS + 30 * MIN_MS),  # late: reads state as it is
                           Txn(card, merchant, BASE_MS + 2 * HOUR_MS)]
    f, _ = run_engine(events, batch=1)
    e = math.exp
    assert f[1, COL["card_txn_count_1h"]] == pytest.approx(e(-1), rel=1e-12)
    assert f[1, COL["card_txn_count_10m"]] == pytest.approx(e(-6), rel=1e-12)
    assert f[1, COL["card_txn_count_24h"]] == pytest.approx(e(-1 / 24), rel=1e-12)
    assert f[1, COL["card_amount_sum_1h"]] == pytest.approx(10 * e(-1), rel=1e-12)
    assert f[1, COL["card_seconds_since_last"]] == 3600.0
    assert f[2, COL["card_txn_count_1h"]] == pytest.approx(1 + e(-1), rel=1e-12)
    assert f[2, COL["card_seconds_since_last"]] == 0.0
    assert f[3, COL["card_txn_count_1h"]] == pytest.approx((1 + e(-1) + e(-0.5)) * e(-1), rel=1e-12)
    assert f[3, COL["card_seconds_since_last"]] == 3600.0  # state time never went back
    assert f[3, COL["merchant_txn_count_1h"]] == pytest.approx((1 + e(-1) + e(-0.5)) * e(-1), rel=1e-12)
    assert f[0, COL["hour_of_day_utc"]] == 0.0 and f[0, COL["day_of_week_utc"]] == 3.0  # Thursday


def test_amount_zscore_is_against_mean_and_spread_of_earlier_log_amounts() -> None:
    card, merchant = KEYS["card"][0], KEYS["merchant"][0]
    amounts_major = [12.0, 30.0, 7.5, 80.0, 22.0, 15.0, 5000.0]
    f, _ = run_engine([Txn(card, merchant, BASE_MS + i * MIN_MS, amount=a) for i, a in enumerate(amounts_major)])
    logs = np.log1p(amounts_major)
    assert np.isnan(f[:2, COL["card_amount_zscore"]]).all()  # fewer than two earlier transactions
    expected = (logs[-1] - logs[:-1].mean()) / logs[:-1].std()
    assert f[-1, COL["card_amount_zscore"]] == pytest.approx(expected, rel=1e-9)
    assert f[-1, COL["merchant_amount_zscore"]] == pytest.approx(expected, rel=1e-9)
    assert f[-1, COL["card_amount_to_mean_ratio"]] == pytest.approx(5001 / math.exp(logs[:-1].mean()), rel=1e-9)
    same = run_engine([Txn(card, merchant, BASE_MS + i, amount=9.0) for i in range(3)])[0]
    assert same[2, COL["card_amount_zscore"]] == 0.0  # zero spread is floored at MIN_STD, no division by zero


def test_speed_uses_at_least_one_minute() -> None:
    card, merchant = KEYS["card"][0], KEYS["merchant"][0]
    (lat1, lon1), (lat2, lon2) = PLACES[0], PLACES[1]
    events = [Txn(card, merchant, BASE_MS, lat=lat1, lon=lon1), Txn(card, merchant, BASE_MS + 1000, lat=lat2, lon=lon2)]
    f, _ = run_engine(events)
    km = f[1, COL["card_distance_km_from_last"]]
    assert 5500 < km < 5600  # New York to London
    assert f[1, COL["card_speed_kmh_from_last"]] == pytest.approx(km * 60, rel=1e-12)
    assert np.isnan(f[0, COL["card_distance_km_from_last"]])


def test_device_card_switches_decay_while_the_same_card_keeps_using_the_device() -> None:
    # A switch long ago must have decayed even when later transactions on the device (same
    # card, no new switch) moved the device's state time forward.
    a, b, merchant, device = KEYS["card"][0], KEYS["card"][1], KEYS["merchant"][0], KEYS["device"][0]
    events = [Txn(a, merchant, BASE_MS, device=device), Txn(b, merchant, BASE_MS + 1, device=device),
              Txn(b, merchant, BASE_MS + 10 * DAY_MS, device=device), Txn(b, merchant, BASE_MS + 10 * DAY_MS + 1,
                                                                          device=device)]
    f, _ = run_engine(events)
    switches = f[:, COL["device_card_switches_24h"]]
    assert switches[:2].tolist() == [0.0, 0.0]
    assert switches[2] == pytest.approx(math.exp(-(10 * DAY_MS - 1) / DAY_MS), rel=1e-12)
    assert switches[3] == pytest.approx(math.exp(-10), rel=1e-9)


def test_new_merchant_flag_remembers_the_cards_merchants() -> None:
    card, shops = KEYS["card"][0], KEYS["merchant"][:3]
    visits = [shops[0], shops[1], shops[0], shops[2], shops[1]]
    f, _ = run_engine([Txn(card, m, BASE_MS + i * HOUR_MS) for i, m in enumerate(visits)])
    flags = f[:, COL["card_new_merchant"]]
    assert math.isnan(flags[0])  # a new card: nothing to compare with
    assert flags[1:].tolist() == [1.0, 0.0, 1.0, 0.0]


def test_new_merchant_memory_is_forgotten_once_half_full_so_false_seen_stays_bounded() -> None:
    # Merchants with disjoint Bloom positions: after 32 of them (64 bits set), the filter is cleared.
    card = KEYS["card"][0]
    merchants = [1 + i + (i + 64) * 128 for i in range(40)]  # positions i+1 and i+64+... all distinct
    events = [Txn(card, m, BASE_MS + i * MIN_MS) for i, m in enumerate(merchants)]
    events.append(Txn(card, merchants[0], BASE_MS + 41 * MIN_MS))
    f, _ = run_engine(events, batch=1)
    assert_matches_reference(f, Reference().features(events))
    assert f[-1, COL["card_new_merchant"]] == 1.0  # forgotten with the rest at the 33rd merchant


def test_distinct_merchants_and_devices_over_the_current_and_previous_12_hours() -> None:
    card = KEYS["card"][0]
    start = BASE_MS + 12 * HOUR_MS  # buckets are 12 hours from the epoch: this one is 12:00–24:00 UTC
    events: list[Event] = [Txn(card, KEYS["merchant"][i % 5], start + i * MIN_MS, device=KEYS["device"][i % 2])
                           for i in range(10)]
    events.append(Txn(card, KEYS["merchant"][0], start + 11 * HOUR_MS))  # 23:00, the same bucket as the first ten
    events.append(Txn(card, KEYS["merchant"][0], start + 23 * HOUR_MS))  # 11:00 next day: the bucket before counts
    events.append(Txn(card, KEYS["merchant"][0], start + 50 * HOUR_MS))  # two buckets on: all forgotten
    f, _ = run_engine(events)
    assert_matches_reference(f, Reference().features(events))
    merchants, devices = f[:, COL["card_distinct_merchants_24h"]], f[:, COL["card_distinct_devices_24h"]]
    estimate = [64 * math.log(64 / (64 - k)) for k in range(6)]  # linear counting without collisions
    distinct_bits = len({KEYS["merchant"][i] >> 58 for i in range(5)})
    assert merchants[0] == 0.0 and devices[0] == 0.0
    assert merchants[10] == pytest.approx(estimate[distinct_bits], rel=1e-12)
    assert merchants[11] == merchants[10]
    assert devices[10] == pytest.approx(estimate[len({KEYS["device"][i] >> 58 for i in range(2)})], rel=1e-12)
    assert merchants[12] == 0.0 and devices[12] == 0.0


def test_local_hour_follows_longitude() -> None:
    card, merchant = KEYS["card"][0], KEYS["merchant"][0]
    events = [Txn(card, merchant, BASE_MS + 6 * HOUR_MS, lat=0.0, lon=lon) for lon in (0.0, 15.0, -90.0, 180.0)]
    events.append(Txn(card, merchant, BASE_MS + 6 * HOUR_MS))
    f, _ = run_engine(events)
    local = f[:, COL["hour_of_day_local"]]
    assert local[:4].tolist() == pytest.approx([6.0, 7.0, 0.0, 18.0], abs=1e-12)
    assert math.isnan(local[4])


# --------------------------------------------------------------------------- batching


@settings(max_examples=60, deadline=None)
@given(events=event_streams(), seeds=st.lists(st.integers(0, 2**16), min_size=1, max_size=3))
def test_any_batching_gives_bitwise_identical_features_and_state(events: list[Event], seeds: list[int]) -> None:
    one_by_one, ref_engine = run_engine(events, batch=1)
    runs = [run_engine(events, batch=1 << 30)] + [run_engine(events, seed=s) for s in seeds]
    for features, engine in runs:
        assert_bitwise_equal(features, one_by_one)
        assert_same_state(engine.state, ref_engine.state)


# --------------------------------------------------------------------------- edge cases


def test_empty_batch_returns_no_rows_and_changes_nothing() -> None:
    events: list[Event] = [Txn(KEYS["card"][0], KEYS["merchant"][0], BASE_MS, device=KEYS["device"][0])]
    _, engine = run_engine(events)
    before = {name: a.copy() for name, a in state_arrays(engine.state)}
    out = engine.compute(encode([]))
    assert out.shape == (0, NUM_FEATURES) and out.dtype == np.float64
    empty_u64 = np.empty(0, dtype=np.uint64)
    engine.apply_outcomes(empty_u64, empty_u64, np.empty(0, dtype=np.int64), np.empty(0))
    for name, a in state_arrays(engine.state):
        assert_bitwise_equal(a, before[name])


def test_batch_of_one_on_fresh_state() -> None:
    txn = Txn(KEYS["card"][0], KEYS["merchant"][0], BASE_MS + 90 * MIN_MS, amount=99.0, customer=KEYS["customer"][0],
              device=KEYS["device"][0], ip=KEYS["ip"][0], channel=2, mcc=5411, country=7, lat=1.0, lon=2.0)
    out = FeatureEngine(small_state()).compute(encode([txn]))
    assert out.shape == (1, NUM_FEATURES)
    assert_matches_reference(out, Reference().features([txn]))
    f = dict(zip(FEATURE_NAMES, out[0].tolist(), strict=True))
    assert f["card_txn_count_total"] == 0.0 and f["card_txn_count_1h"] == 0.0 and f["ip_txn_count_1h"] == 0.0
    assert f["hour_of_day_utc"] == 1.5 and f["merchant_category"] == 5411.0 and f["channel"] == 2.0
    for name in ("card_seconds_since_last", "card_amount_zscore", "card_new_device", "card_new_country",
                 "card_distance_km_from_last", "merchant_amount_zscore"):
        assert math.isnan(f[name]), name


def test_unknown_identifiers_give_nan_and_create_no_state() -> None:
    engine = FeatureEngine(small_state())
    out = engine.compute(encode([Txn(0, 0, BASE_MS, country=3, lat=1.0, lon=1.0)] * 2))
    unknown = [n for n in FEATURE_NAMES if n.split("_")[0] in ("card", "merchant", "customer", "device", "ip")
               and n != "merchant_category"]
    assert len(unknown) == NUM_FEATURES - 6  # the transaction's own: amount, channel, MCC, three times
    assert np.isnan(out[:, [COL[n] for n in unknown]]).all()
    assert np.isfinite(out[:, [COL[n] for n in FEATURE_NAMES if n not in unknown and n != "merchant_category"]]).all()
    engine.apply_outcomes(np.zeros(1, dtype=np.uint64), np.zeros(1, dtype=np.uint64),
                          np.array([BASE_MS], dtype=np.int64), np.ones(1))
    for t in engine.state.tables():
        assert t.occupancy() == 0 and t.counters.tolist() == [0, 0], t.kind
        assert not t.values.any() and not t.tags.any(), t.kind


def test_missing_device_ip_and_country_leave_the_card_memory_alone() -> None:
    card, merchant, dev = KEYS["card"][0], KEYS["merchant"][0], KEYS["device"][0]
    events = [Txn(card, merchant, BASE_MS, device=dev, country=1), Txn(card, merchant, BASE_MS + 1),
              Txn(card, merchant, BASE_MS + 2, device=dev, country=1)]
    f, _ = run_engine(events)
    assert np.isnan(f[1, [COL["card_new_device"], COL["card_new_ip"], COL["card_new_country"]]]).all()
    assert f[2, COL["card_new_device"]] == 0.0 and f[2, COL["card_new_country"]] == 0.0


# --------------------------------------------------------------------------- bounded state


class TableModel:
    """The documented table policy in plain Python: probe MAX_PROBE slots from key & (capacity - 1),
    take the key's slot or the first empty one, else evict the least recently seen probed entity."""

    def __init__(self, capacity: int) -> None:
        self.keys = [0] * capacity
        self.last_seen = [0] * capacity
        self.count: dict[int, int] = {}
        self.inserts = self.evictions = 0

    def touch(self, key: int, now_ms: int) -> bool:
        """Record a transaction; True when the key arrives as a new entity."""
        cap = len(self.keys)
        probed = [((key & (cap - 1)) + p) & (cap - 1) for p in range(MAX_PROBE)]
        for j in probed:
            if self.keys[j] == key:
                self.last_seen[j] = max(self.last_seen[j], now_ms)
                self.count[key] += 1
                return False
            if self.keys[j] == 0:
                break
        else:
            j = min(probed, key=lambda s: self.last_seen[s])  # the first among equals, like the kernel
            del self.count[self.keys[j]]
            self.evictions += 1
        self.keys[j], self.last_seen[j] = key, now_ms
        self.count[key] = 1
        self.inserts += 1
        return True


@settings(max_examples=40, deadline=None)
@given(capacity=st.sampled_from([16, 32]), num_cards=st.integers(17, 150), num_minutes=st.integers(1, 60),
       seed=st.integers(0, 2**32 - 1))
def test_bounded_table_matches_the_documented_eviction_policy(capacity: int, num_cards: int, num_minutes: int,
                                                              seed: int) -> None:
    # Uniform draws (not hypothesis' small-number bias) keep the table under pressure; times
    # out of order and often equal make ties in last_seen common.
    rng = random.Random(seed)
    stream = [(rng.randrange(num_cards), BASE_MS + rng.randrange(num_minutes) * MIN_MS) for _ in range(200)]
    cards = [_HASHER.key(f"bounded-{i}") for i in range(num_cards)]
    engine = FeatureEngine(EntityState.empty(card_capacity=capacity, merchant_capacity=16, customer_capacity=16,
                                             device_capacity=16, ip_capacity=16))
    table = engine.state.card
    model = TableModel(capacity)
    for card, now in stream:
        f = engine.compute(encode([Txn(cards[card], 0, now)]))
        fresh = model.touch(cards[card], now)
        assert table.occupancy() <= capacity
        # An evicted entity comes back as new: no count, no history.
        assert f[0, COL["card_txn_count_total"]] == model.count[cards[card]] - 1
        assert math.isnan(f[0, COL["card_seconds_since_last"]]) == fresh
    assert table.keys.tolist() == model.keys
    assert table.last_seen_ms.tolist() == model.last_seen
    assert table.counters.tolist() == [model.inserts, model.evictions]
    assert table.evictions >= len({card for card, _ in stream}) - capacity


def test_full_table_evicts_the_least_recently_seen_entity() -> None:
    cards = [_HASHER.key(f"lru-{i}") for i in range(18)]
    engine = FeatureEngine(EntityState.empty(card_capacity=16, merchant_capacity=16, customer_capacity=16,
                                             device_capacity=16, ip_capacity=16))

    def pay(card: int, minute: int) -> np.ndarray:
        row: np.ndarray = engine.compute(encode([Txn(cards[card], 0, BASE_MS + minute * MIN_MS)]))[0]
        return row

    for i in range(16):
        pay(i, i)
    pay(0, 16)  # card 0 is recent again; card 1 is now the least recently seen
    assert engine.state.card.occupancy() == 16 and engine.state.card.evictions == 0
    pay(16, 17)
    tracked = set(engine.state.card.keys.tolist())
    assert cards[1] not in tracked and cards[0] in tracked and cards[16] in tracked
    assert engine.state.card.evictions == 1
    back = pay(1, 18)  # evicts card 2, and card 1 starts over
    assert back[COL["card_txn_count_total"]] == 0.0 and math.isnan(back[COL["card_seconds_since_last"]])
    assert cards[2] not in set(engine.state.card.keys.tolist())
    assert engine.state.card.counters.tolist() == [18, 2]
    assert engine.state.card.occupancy() == 16


def test_a_tracked_card_costs_at_most_256_bytes() -> None:
    table = EntityState.empty(card_capacity=1024, merchant_capacity=16, customer_capacity=16, device_capacity=16,
                              ip_capacity=16).card
    total = table.keys.nbytes + table.last_seen_ms.nbytes + table.values.nbytes + table.tags.nbytes
    assert total / table.capacity <= 256


@pytest.mark.parametrize("capacity", [0, 8, 15, 48, 1000])
def test_capacity_must_be_a_power_of_two_of_at_least_max_probe(capacity: int) -> None:
    with pytest.raises(ValueError, match="power of two"):
        EntityTable.empty("card", capacity, 15, 5)


# --------------------------------------------------------------------------- snapshots


def busy_state(seed: int = 3, n: int = 200) -> tuple[FeatureEngine, list[Event]]:
    """A small engine (tables of 16 and 64) and a stream that fills it, with a report every 17 events."""
    rng = random.Random(seed)
    events: list[Event] = []
    for i in range(n):
        t = BASE_MS + i * MIN_MS
        if i % 17 == 0:
            events.append(Report(rng.choice(KEYS["card"]), rng.choice(KEYS["merchant"]), t))
            continue
        events.append(Txn(rng.choice(KEYS["card"]), rng.choice(KEYS["merchant"]), t, amount=rng.uniform(1, 500),
                          device=rng.choice(KEYS["device"]), ip=rng.choice(KEYS["ip"]),
                          customer=rng.choice(KEYS["customer"]), country=rng.randrange(3),
                          lat=rng.uniform(-60, 60), lon=rng.uniform(-170, 170)))
    engine = FeatureEngine(EntityState.empty(card_capacity=64, merchant_capacity=16, customer_capacity=16,
                                             device_capacity=16, ip_capacity=16))
    return engine, events


@settings(max_examples=15, deadline=None)
@given(split=st.integers(0, 200), seed=st.integers(0, 1000))
def test_snapshot_round_trip_continues_scoring_identically(split: int, seed: int) -> None:
    engine, events = busy_state(seed)
    run_engine(events[:split], engine=engine)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "state" / "entities.npz"
        engine.state.save(path, feature_set_version=FEATURE_SET_VERSION)
        restored = EntityState.load(path, feature_set_version=FEATURE_SET_VERSION)
    assert_same_state(restored, engine.state)
    assert [t.kind for t in restored.tables()] == ["card", "merchant", "customer", "device", "ip"]
    continued, _ = run_engine(events[split:], engine=engine)
    after_restore, _ = run_engine(events[split:], engine=FeatureEngine(restored))
    assert_bitwise_equal(after_restore, continued)
    assert_same_state(restored, engine.state)


@pytest.fixture
def snapshot(tmp_path: Path) -> Path:
    engine, events = busy_state()
    run_engine(events, engine=engine)
    path = tmp_path / "entities.npz"
    engine.state.save(path, feature_set_version=FEATURE_SET_VERSION)
    return path


def rewrite(path: Path, drop: str | None = None, **replace: np.ndarray) -> None:
    with np.load(path) as data:
        arrays = {name: data[name] for name in data.files if name != drop}
    arrays.update(replace)
    with path.open("wb") as f:
        np.savez(f, **arrays)


def load(path: Path) -> EntityState:
    return EntityState.load(path, feature_set_version=FEATURE_SET_VERSION)


def test_garbage_and_truncated_snapshots_are_refused(snapshot: Path) -> None:
    good = snapshot.read_bytes()
    for name, data in [("garbage", b"this is not a snapshot\n" * 40), ("empty", b""),
                       ("truncated", good[:len(good) // 2]), ("tail cut", good[:-10]),
                       ("npy, not npz", b"\x93NUMPY" + b"x" * 64)]:
        snapshot.write_bytes(data)
        with pytest.raises(ValueError, match="unreadable snapshot") as refused:
            load(snapshot)
        assert "allow_pickle" not in str(refused.value), name  # never suggest loading it unsafely


def test_every_corrupted_byte_is_refused_or_harmless(snapshot: Path) -> None:
    # Flip bytes all over the file: the zip checksums and headers must refuse it with a
    # ValueError (the service catches exactly that), or the bytes changed nothing we load.
    good = snapshot.read_bytes()
    original = load(snapshot)
    refused = 0
    for pos in range(0, len(good), max(1, len(good) // 1500)):
        snapshot.write_bytes(good[:pos] + bytes([good[pos] ^ 0xFF]) + good[pos + 1:])
        try:
            state = load(snapshot)
        except ValueError:
            refused += 1
            continue
        assert_same_state(state, original)
    assert refused > 0


def test_snapshot_missing_an_array_is_refused(snapshot: Path) -> None:
    rewrite(snapshot, drop="merchant.values")
    with pytest.raises(ValueError, match=r"merchant\.values"):
        load(snapshot)


def test_snapshot_with_misshaped_arrays_is_refused(snapshot: Path) -> None:
    # The kernels index without bounds checks: a table of the wrong shape must never reach them.
    with np.load(snapshot) as data:
        values, keys = data["card.values"], data["device.keys"]
    for name, bad in [("card.values", values[:, :-1]), ("device.keys", keys[:-1]),
                      ("card.values", values.astype(np.float32)), ("device.keys", keys.view(np.int64))]:
        path = snapshot.with_name(f"bad-{name}.npz")
        path.write_bytes(snapshot.read_bytes())
        rewrite(path, **{name: bad})
        with pytest.raises(ValueError, match=re.escape(name.split(".")[0])):
            load(path)


def test_snapshot_of_another_feature_set_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "entities.npz"
    small_state(16).save(path, feature_set_version="fs-000000000000")
    with pytest.raises(ValueError, match="feature set fs-000000000000"):
        load(path)


def test_snapshot_of_another_format_is_refused(snapshot: Path) -> None:
    rewrite(snapshot, format=np.array([99]))
    with pytest.raises(ValueError, match="format 99"):
        load(snapshot)


def test_failed_save_leaves_the_old_snapshot_intact(snapshot: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = snapshot.read_bytes()

    def disk_full(file: object, **arrays: np.ndarray) -> None:
        file.write(b"PK\x03\x04 half a zip")  # type: ignore[attr-defined]
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", disk_full)
    with pytest.raises(OSError, match="No space"):
        small_state(16).save(snapshot, feature_set_version=FEATURE_SET_VERSION)
    with pytest.raises(OSError, match="No space"):
        small_state(16).save(snapshot.with_name("new.npz"), feature_set_version=FEATURE_SET_VERSION)
    monkeypatch.undo()
    assert sorted(os.listdir(snapshot.parent)) == [snapshot.name]
    assert snapshot.read_bytes() == good
    assert load(snapshot).card.occupancy() > 0


# --------------------------------------------------------------------------- documentation


def test_docs_table_lists_every_feature_in_registry_order() -> None:
    text = (REPO / "docs" / "features.md").read_text()
    listed = re.findall(r"^\|\s*\d+\s*\|\s*`([a-z0-9_]+)`", text, flags=re.MULTILINE)
    assert listed == list(FEATURE_NAMES)


def test_kernel_column_blocks_match_the_registry() -> None:
    # The kernels write without bounds checks, so their column count must be the registry's.
    from core.features import kernels

    assert kernels.KERNEL_FEATURES == NUM_FEATURES
    blocks = {"card": kernels.CARD_COL, "merchant": kernels.MERCHANT_COL, "customer": kernels.CUSTOMER_COL,
              "device": kernels.DEVICE_COL, "ip": kernels.IP_COL}
    for kind, col in blocks.items():
        assert FEATURE_NAMES[col].startswith(f"{kind}_") and not FEATURE_NAMES[col - 1].startswith(f"{kind}_")


def test_compute_into_a_given_array_or_refuse_one_of_the_wrong_shape() -> None:
    events = [Txn(KEYS["card"][i % 3], KEYS["merchant"][0], BASE_MS + i * MIN_MS) for i in range(6)]
    expected, _ = run_engine(events, batch=1 << 30)
    engine = FeatureEngine(small_state())
    whole = np.full((8, NUM_FEATURES), 7.0)
    assert engine.compute(encode(events), out=whole[1:7]) is not None
    assert_bitwise_equal(whole[1:7], expected)
    assert (whole[[0, 7]] == 7.0).all()  # rows outside the range untouched
    for bad in (np.empty((5, NUM_FEATURES)), np.empty((6, NUM_FEATURES), dtype=np.float32),
                np.empty((NUM_FEATURES, 6)).T):
        with pytest.raises(ValueError, match="out must be"):
            engine.compute(encode(events), out=bad)
