"""Numba feature kernels: one pass over a batch, in arrival order, reading and updating state.

Each transaction's features describe the world *before* it (as of its own event time),
then the transaction is added to its entities' state. Transactions of one batch are
processed in order, so two of the same card in one batch see each other, exactly as
they would one batch apart: online and offline give identical features.

Windows are exponentially decayed counters (time constant τ): O(1) state per window and
exact under any batching. Time comes only from the data. Late events (event time before
the entity's state time) read the state as it is and are added with their own decay
weight; state time never moves backwards.

Speed: every helper is inlined into the one loop and indexes the 2-D state arrays with
(row, slot). The two batch kernels are compiled without Numba's reference counting
(`_nrt=False`, fine because they allocate nothing): with it, each inlined helper that takes
an array paid an atomic increment and decrement per array per transaction, about 300 ns
a transaction, more than the features themselves. One exponential per window and entity
serves both the read and the update.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numba import njit

from core.features.state import (
    CARD_COUNT,
    CARD_COUNTRY,
    CARD_DEV1,
    CARD_DEV2,
    CARD_DEVICES_BEFORE,
    CARD_DEVICES_NOW,
    CARD_FRAUD,
    CARD_FRAUD_T,
    CARD_IP1,
    CARD_IP2,
    CARD_LAT,
    CARD_LOC_T,
    CARD_LON,
    CARD_MEAN,
    CARD_MERCHANT_BLOOM_HI,
    CARD_MERCHANT_BLOOM_LO,
    CARD_MERCHANTS_BEFORE,
    CARD_MERCHANTS_NOW,
    CARD_N1H,
    CARD_N1M,
    CARD_N7D,
    CARD_N10M,
    CARD_N24H,
    CARD_N30D,
    CARD_S1H,
    CARD_S7D,
    CARD_S24H,
    CARD_T,
    CARD_VAR,
    MAX_PROBE,
    MERCHANT_COUNT,
    MERCHANT_FRAUD7,
    MERCHANT_FRAUD30,
    MERCHANT_FRAUD_T,
    MERCHANT_MEAN,
    MERCHANT_N1H,
    MERCHANT_N7D,
    MERCHANT_N10M,
    MERCHANT_N24H,
    MERCHANT_N30D,
    MERCHANT_S1H,
    MERCHANT_S24H,
    MERCHANT_T,
    MERCHANT_VAR,
    SMALL_LAST_CARD,
    SMALL_N1H,
    SMALL_N10M,
    SMALL_N24H,
    SMALL_S1H,
    SMALL_S24H,
    SMALL_SWITCHES,
    SMALL_T,
)

MIN_MS = 60_000.0
HOUR_MS = 3_600_000.0
DAY_MS = 86_400_000.0
TAU_1M, TAU_10M, TAU_1H, TAU_24H, TAU_7D, TAU_30D = MIN_MS, 10 * MIN_MS, HOUR_MS, DAY_MS, 7 * DAY_MS, 30 * DAY_MS
# Moments of log amount: a running mean for the first 1/EW_MIN_ALPHA transactions, then an
# exponentially weighted one, so the history adapts when a card's spending changes.
EW_MIN_ALPHA = 1.0 / 64.0
MIN_STD = 0.1
EARTH_RADIUS_KM = 6371.0088
SOLAR_MS_PER_DEGREE = 240_000.0  # the sun crosses 15° of longitude an hour
# Distinct-count sketches: one bit of 64 per key (its top six hash bits) in a word per 12-hour
# bucket; the current and the previous bucket together cover the last 12 to 24 hours.
SKETCH_BUCKET_MS = 12 * 3_600_000
SKETCH_BITS = 64.0
# Merchants seen by a card: a 128-bit Bloom filter with two bits per merchant, cleared once
# half its bits are set, so a false "seen" is at most about 1 in 4 (far less for most cards).
BLOOM_RESET_FILL = 64
NAN = np.nan
# Numba's (underscored) switch that compiles a function without reference counting.
_NO_REFCOUNT: dict[str, Any] = {"_nrt": False}

# Each entity's block of columns in the feature matrix, in registry order.
BASE_FEATURES, CARD_FEATURES, MERCHANT_FEATURES, SMALL_FEATURES = 6, 22, 10, 6
CARD_COL = BASE_FEATURES
MERCHANT_COL = CARD_COL + CARD_FEATURES
CUSTOMER_COL = MERCHANT_COL + MERCHANT_FEATURES
DEVICE_COL = CUSTOMER_COL + SMALL_FEATURES
IP_COL = DEVICE_COL + SMALL_FEATURES
KERNEL_FEATURES = IP_COL + SMALL_FEATURES

_U0, _U1, _U2, _U4, _U7, _U56, _U58 = (np.uint64(v) for v in (0, 1, 2, 4, 7, 56, 58))
_U63, _U127 = np.uint64(63), np.uint64(127)
_M1, _M2, _M4 = np.uint64(0x5555555555555555), np.uint64(0x3333333333333333), np.uint64(0x0F0F0F0F0F0F0F0F)
_H01 = np.uint64(0x0101010101010101)


@njit(nogil=True, cache=True, inline="always")
def find_slot(keys: np.ndarray, last_seen: np.ndarray, counters: np.ndarray, key: np.uint64, now_ms: np.int64) -> int:
    """Slot of `key`, inserting it (evicting the least recently seen among the probed) when absent.

    Returns slot + 1 for a known entity and -(slot + 1) for a fresh one (its row must be reset).
    """
    mask = np.uint64(keys.shape[0] - 1)
    start = key & mask
    oldest = -1
    oldest_t = np.int64(np.iinfo(np.int64).max)
    for p in range(MAX_PROBE):
        j = np.intp((start + np.uint64(p)) & mask)
        k = keys[j]
        if k == key:
            if now_ms > last_seen[j]:
                last_seen[j] = now_ms
            return j + 1
        if k == 0:
            keys[j] = key
            last_seen[j] = now_ms
            counters[0] += 1
            return -(j + 1)
        if last_seen[j] < oldest_t:
            oldest_t = last_seen[j]
            oldest = j
    keys[oldest] = key
    last_seen[oldest] = now_ms
    counters[0] += 1
    counters[1] += 1
    return -(oldest + 1)


@njit(nogil=True, cache=True, inline="always")
def _claim(keys, last_seen, counters, values, tags, key, now_ms):  # type: ignore[no-untyped-def]
    """Row of `key` in the table; a fresh entity's row starts from zeros."""
    s = find_slot(keys, last_seen, counters, key, now_ms)
    if s > 0:
        return s - 1
    j = -s - 1
    for c in range(values.shape[1]):
        values[j, c] = 0.0
    for c in range(tags.shape[1]):
        tags[j, c] = 0
    return j


@njit(nogil=True, cache=True, inline="always", error_model="numpy")
def _window(values, j, slot, g, late, weight):  # type: ignore[no-untyped-def]
    """The decayed counter as of the event, before it; then the event is added with `weight`.

    `g` is exp(−|t − t_state| / τ): the decay from the state time to the event or, for a late
    event, that event's own weight as of the state time (which does not move back).
    """
    v = values[j, slot]
    if late:
        values[j, slot] = v + weight * g
        return v
    v = v * g
    values[j, slot] = v + weight
    return v


@njit(nogil=True, cache=True, inline="always", error_model="numpy")
def _decayed(v: float, t_state: float, t: float, tau: float) -> float:
    """A counter kept as of `t_state`, read at `t` (as it is when `t` is earlier)."""
    return v * math.exp(-(t - t_state) / tau) if t > t_state else v


@njit(nogil=True, cache=True, inline="always", error_model="numpy")
def _update_moments(values, j, mean_slot, var_slot, count, x):  # type: ignore[no-untyped-def]
    alpha = max(1.0 / (count + 1.0), EW_MIN_ALPHA)
    delta = x - values[j, mean_slot]
    values[j, mean_slot] += alpha * delta
    values[j, var_slot] = (1.0 - alpha) * (values[j, var_slot] + alpha * delta * delta)


@njit(nogil=True, cache=True, inline="always", error_model="numpy")
def _zscore(values, j, mean_slot, var_slot, count, x):  # type: ignore[no-untyped-def]
    if count < 2.0:
        return NAN
    return (x - values[j, mean_slot]) / max(math.sqrt(values[j, var_slot]), MIN_STD)


@njit(nogil=True, cache=True, inline="always", error_model="numpy")
def _haversine_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    p1 = math.radians(lat1)
    p2 = math.radians(lat2)
    a = math.sin((p2 - p1) / 2.0) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(math.radians(lon2 - lon1) / 2.0) ** 2
    return 2.0 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(a)))


@njit(nogil=True, cache=True, inline="always")
def _popcount(x: np.uint64) -> int:
    x = x - ((x >> _U1) & _M1)
    x = (x & _M2) + ((x >> _U2) & _M2)
    x = (x + (x >> _U4)) & _M4
    return int((x * _H01) >> _U56)


@njit(nogil=True, cache=True, inline="always")
def _novelty(tags, j, first, second, key, known):  # type: ignore[no-untyped-def]
    """1.0 when `key` is neither of the two remembered keys, then remembers it."""
    if key == 0:
        return NAN
    seen = tags[j, first] == key or tags[j, second] == key
    if tags[j, first] != key:
        tags[j, second] = tags[j, first]
        tags[j, first] = key
    if not known:
        return NAN
    return 0.0 if seen else 1.0


@njit(nogil=True, cache=True, inline="always")
def _bloom_bit(lo: np.uint64, hi: np.uint64, b: np.uint64) -> bool:
    word = lo if b < np.uint64(64) else hi
    return (word >> (b & _U63)) & _U1 == _U1


@njit(nogil=True, cache=True, inline="always")
def _merchant_novelty(tags, j, key, known):  # type: ignore[no-untyped-def]
    """1.0 when the card's Bloom filter has not seen `key` (certainly new), then adds it."""
    if key == 0:
        return NAN
    lo = tags[j, CARD_MERCHANT_BLOOM_LO]
    hi = tags[j, CARD_MERCHANT_BLOOM_HI]
    b1 = key & _U127
    b2 = (key >> _U7) & _U127
    seen = _bloom_bit(lo, hi, b1) and _bloom_bit(lo, hi, b2)
    if _popcount(lo) + _popcount(hi) >= BLOOM_RESET_FILL:
        lo = _U0
        hi = _U0
    for b in (b1, b2):
        if b < np.uint64(64):
            lo |= _U1 << b
        else:
            hi |= _U1 << (b & _U63)
    tags[j, CARD_MERCHANT_BLOOM_LO] = lo
    tags[j, CARD_MERCHANT_BLOOM_HI] = hi
    if not known:
        return NAN
    return 0.0 if seen else 1.0


@njit(nogil=True, cache=True, inline="always", error_model="numpy")
def _distinct(tags, j, now_slot, before_slot, key, bucket, state_bucket):  # type: ignore[no-untyped-def]
    """Distinct keys in the event's 12-hour bucket and the one before (linear counting on 64
    bits), as of the event; then the buckets advance to the event's and `key` is added."""
    now = tags[j, now_slot]
    before = tags[j, before_slot]
    if bucket <= state_bucket:
        bits = now | before
    elif bucket == state_bucket + 1:
        bits = now
    else:
        bits = _U0
    zeros = SKETCH_BITS - float(_popcount(bits))
    estimate = SKETCH_BITS * math.log(SKETCH_BITS / max(zeros, 1.0))
    if bucket > state_bucket:
        before = now if bucket == state_bucket + 1 else _U0
        now = _U0
        tags[j, before_slot] = before
    if key != 0:
        bit = _U1 << (key >> _U58)
        if bucket >= state_bucket:
            now |= bit
        elif bucket == state_bucket - 1:
            tags[j, before_slot] = before | bit
    tags[j, now_slot] = now
    return estimate


@njit(nogil=True, cache=True, inline="always", error_model="numpy")
def _card_features(ck, cls, cc, cv, ct, key, merchant, device, ip, country, t_ms, amount, x, lat, lon, out, i):  # type: ignore[no-untyped-def]
    col = CARD_COL
    if key == 0:
        for c in range(col, col + CARD_FEATURES):
            out[i, c] = NAN
        return
    j = _claim(ck, cls, cc, cv, ct, key, t_ms)
    t = float(t_ms)
    ts = cv[j, CARD_T]
    n = cv[j, CARD_COUNT]
    known = n > 0.0
    late = t < ts
    dt = abs(t - ts)
    g1h = math.exp(-dt / TAU_1H)
    g24h = math.exp(-dt / TAU_24H)
    g7d = math.exp(-dt / TAU_7D)
    out[i, col + 0] = _window(cv, j, CARD_N1M, math.exp(-dt / TAU_1M), late, 1.0)
    out[i, col + 1] = _window(cv, j, CARD_N10M, math.exp(-dt / TAU_10M), late, 1.0)
    out[i, col + 2] = _window(cv, j, CARD_N1H, g1h, late, 1.0)
    out[i, col + 3] = _window(cv, j, CARD_N24H, g24h, late, 1.0)
    out[i, col + 4] = _window(cv, j, CARD_N7D, g7d, late, 1.0)
    out[i, col + 5] = _window(cv, j, CARD_N30D, math.exp(-dt / TAU_30D), late, 1.0)
    out[i, col + 6] = _window(cv, j, CARD_S1H, g1h, late, amount)
    out[i, col + 7] = _window(cv, j, CARD_S24H, g24h, late, amount)
    out[i, col + 8] = _window(cv, j, CARD_S7D, g7d, late, amount)
    out[i, col + 9] = max(0.0, t - ts) / 1000.0 if known else NAN
    out[i, col + 10] = _zscore(cv, j, CARD_MEAN, CARD_VAR, n, x)
    out[i, col + 11] = math.exp(x - cv[j, CARD_MEAN]) if known else NAN
    out[i, col + 12] = n
    out[i, col + 13] = _novelty(ct, j, CARD_DEV1, CARD_DEV2, device, known)
    out[i, col + 14] = _novelty(ct, j, CARD_IP1, CARD_IP2, ip, known)
    if country < 0:
        out[i, col + 15] = NAN
    else:
        prev = ct[j, CARD_COUNTRY]
        out[i, col + 15] = NAN if prev == 0 else (0.0 if prev == np.uint64(country + 1) else 1.0)
        ct[j, CARD_COUNTRY] = np.uint64(country + 1)
    out[i, col + 16] = _merchant_novelty(ct, j, merchant, known)
    bucket = t_ms // SKETCH_BUCKET_MS
    state_bucket = np.int64(ts) // SKETCH_BUCKET_MS
    out[i, col + 17] = _distinct(ct, j, CARD_MERCHANTS_NOW, CARD_MERCHANTS_BEFORE, merchant, bucket, state_bucket)
    out[i, col + 18] = _distinct(ct, j, CARD_DEVICES_NOW, CARD_DEVICES_BEFORE, device, bucket, state_bucket)
    located = not (math.isnan(lat) or math.isnan(lon))
    if located and cv[j, CARD_LOC_T] > 0.0:
        dist = _haversine_km(cv[j, CARD_LAT], cv[j, CARD_LON], lat, lon)
        hours = max(abs(t - cv[j, CARD_LOC_T]) / HOUR_MS, 1.0 / 60.0)
        out[i, col + 19] = dist
        out[i, col + 20] = dist / hours
    else:
        out[i, col + 19] = NAN
        out[i, col + 20] = NAN
    fraud_t = cv[j, CARD_FRAUD_T]
    out[i, col + 21] = _decayed(cv[j, CARD_FRAUD], fraud_t, t, TAU_30D) if fraud_t > 0.0 else 0.0
    # The counters took this transaction above; the rest of its history follows.
    _update_moments(cv, j, CARD_MEAN, CARD_VAR, n, x)
    cv[j, CARD_COUNT] = n + 1.0
    if t > ts:
        cv[j, CARD_T] = t
    if located and t >= cv[j, CARD_LOC_T]:
        cv[j, CARD_LOC_T] = t
        cv[j, CARD_LAT] = lat
        cv[j, CARD_LON] = lon


@njit(nogil=True, cache=True, inline="always", error_model="numpy")
def _merchant_features(mk, mls, mc, mv, mt, key, t_ms, amount, x, out, i):  # type: ignore[no-untyped-def]
    col = MERCHANT_COL
    if key == 0:
        for c in range(col, col + MERCHANT_FEATURES):
            out[i, c] = NAN
        return
    j = _claim(mk, mls, mc, mv, mt, key, t_ms)
    t = float(t_ms)
    ts = mv[j, MERCHANT_T]
    n = mv[j, MERCHANT_COUNT]
    late = t < ts
    dt = abs(t - ts)
    g1h = math.exp(-dt / TAU_1H)
    g24h = math.exp(-dt / TAU_24H)
    out[i, col + 0] = _window(mv, j, MERCHANT_N10M, math.exp(-dt / TAU_10M), late, 1.0)
    out[i, col + 1] = _window(mv, j, MERCHANT_N1H, g1h, late, 1.0)
    out[i, col + 2] = _window(mv, j, MERCHANT_N24H, g24h, late, 1.0)
    out[i, col + 3] = _window(mv, j, MERCHANT_N7D, math.exp(-dt / TAU_7D), late, 1.0)
    out[i, col + 4] = _window(mv, j, MERCHANT_S1H, g1h, late, amount)
    out[i, col + 5] = _window(mv, j, MERCHANT_S24H, g24h, late, amount)
    out[i, col + 6] = _zscore(mv, j, MERCHANT_MEAN, MERCHANT_VAR, n, x)
    txns_30d = _window(mv, j, MERCHANT_N30D, math.exp(-dt / TAU_30D), late, 1.0)
    fraud_t = mv[j, MERCHANT_FRAUD_T]
    fraud_7d = _decayed(mv[j, MERCHANT_FRAUD7], fraud_t, t, TAU_7D) if fraud_t > 0.0 else 0.0
    fraud_30d = _decayed(mv[j, MERCHANT_FRAUD30], fraud_t, t, TAU_30D) if fraud_t > 0.0 else 0.0
    out[i, col + 7] = fraud_7d
    out[i, col + 8] = fraud_30d
    out[i, col + 9] = fraud_30d / (txns_30d + 1.0)
    _update_moments(mv, j, MERCHANT_MEAN, MERCHANT_VAR, n, x)
    mv[j, MERCHANT_COUNT] = n + 1.0
    if t > ts:
        mv[j, MERCHANT_T] = t


@njit(nogil=True, cache=True, inline="always", error_model="numpy")
def _small_features(k, ls, cnt, v, tg, key, card, t_ms, amount, out, i, col):  # type: ignore[no-untyped-def]
    """A customer, device or IP: decayed counts and sums, and switches between cards."""
    if key == 0:
        for c in range(col, col + SMALL_FEATURES):
            out[i, c] = NAN
        return
    j = _claim(k, ls, cnt, v, tg, key, t_ms)
    t = float(t_ms)
    ts = v[j, SMALL_T]
    late = t < ts
    dt = abs(t - ts)
    g1h = math.exp(-dt / TAU_1H)
    g24h = math.exp(-dt / TAU_24H)
    out[i, col + 0] = _window(v, j, SMALL_N10M, math.exp(-dt / TAU_10M), late, 1.0)
    out[i, col + 1] = _window(v, j, SMALL_N1H, g1h, late, 1.0)
    out[i, col + 2] = _window(v, j, SMALL_N24H, g24h, late, 1.0)
    out[i, col + 3] = _window(v, j, SMALL_S1H, g1h, late, amount)
    out[i, col + 4] = _window(v, j, SMALL_S24H, g24h, late, amount)
    last = tg[j, SMALL_LAST_CARD]
    switched = last != 0 and last != card
    # Always added (0.0 without a switch): the counter is kept as of SMALL_T, which moves to t below.
    out[i, col + 5] = _window(v, j, SMALL_SWITCHES, g24h, late, 1.0 if switched else 0.0)
    tg[j, SMALL_LAST_CARD] = card
    if t > ts:
        v[j, SMALL_T] = t


@njit(nogil=True, cache=True, error_model="numpy", **_NO_REFCOUNT)
def compute_features(
    card_key, customer_key, merchant_key, device_key, ip_key, amount, event_time_ms, channel,
    merchant_category, country, latitude, longitude,
    ck, cls, cc, cv, ct, mk, mls, mc, mv, mt, uk, uls, uc, uv, ut, dk, dls, dc, dv, dt, ik, ils, ic, iv, it,
    out,
):  # type: ignore[no-untyped-def]
    """Fill `out` (n, NUM_FEATURES) in registry order and advance every entity's state."""
    for i in range(card_key.shape[0]):
        t_ms = event_time_ms[i]
        a = amount[i]
        x = math.log1p(a)
        lon = longitude[i]
        out[i, 0] = x
        out[i, 1] = float(channel[i])
        out[i, 2] = float(merchant_category[i]) if merchant_category[i] >= 0 else NAN
        out[i, 3] = (t_ms % 86_400_000) / HOUR_MS
        out[i, 4] = float(((t_ms // 86_400_000) + 3) % 7)  # 1970-01-01 was a Thursday
        if math.isnan(lon):
            out[i, 5] = NAN
        else:
            local = float(t_ms) + lon * SOLAR_MS_PER_DEGREE
            out[i, 5] = (local % DAY_MS) / HOUR_MS
        card = card_key[i]
        _card_features(ck, cls, cc, cv, ct, card, merchant_key[i], device_key[i], ip_key[i], country[i],
                       t_ms, a, x, latitude[i], lon, out, i)
        _merchant_features(mk, mls, mc, mv, mt, merchant_key[i], t_ms, a, x, out, i)
        _small_features(uk, uls, uc, uv, ut, customer_key[i], card, t_ms, a, out, i, CUSTOMER_COL)
        _small_features(dk, dls, dc, dv, dt, device_key[i], card, t_ms, a, out, i, DEVICE_COL)
        _small_features(ik, ils, ic, iv, it, ip_key[i], card, t_ms, a, out, i, IP_COL)


@njit(nogil=True, cache=True, error_model="numpy", **_NO_REFCOUNT)
def apply_outcomes(card_key, merchant_key, reported_time_ms, weight,
                   ck, cls, cc, cv, ct, mk, mls, mc, mv, mt):  # type: ignore[no-untyped-def]
    """Add confirmed-fraud reports (weight 1.0; 0.0 for a legitimate outcome) to card and merchant."""
    for i in range(card_key.shape[0]):
        w = weight[i]
        if w == 0.0:
            continue
        t_ms = reported_time_ms[i]
        t = float(t_ms)
        if card_key[i] != 0:
            j = _claim(ck, cls, cc, cv, ct, card_key[i], t_ms)
            ft = cv[j, CARD_FRAUD_T]
            _window(cv, j, CARD_FRAUD, math.exp(-abs(t - ft) / TAU_30D), t < ft, w)
            if t > ft:
                cv[j, CARD_FRAUD_T] = t
        if merchant_key[i] != 0:
            j = _claim(mk, mls, mc, mv, mt, merchant_key[i], t_ms)
            ft = mv[j, MERCHANT_FRAUD_T]
            dt = abs(t - ft)
            _window(mv, j, MERCHANT_FRAUD7, math.exp(-dt / TAU_7D), t < ft, w)
            _window(mv, j, MERCHANT_FRAUD30, math.exp(-dt / TAU_30D), t < ft, w)
            if t > ft:
                mv[j, MERCHANT_FRAUD_T] = t
