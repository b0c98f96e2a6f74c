"""Numba feature kernels: one pass over a batch, in arrival order, reading and updating state.

Each transaction's features describe the world *before* it (as of its own event time),
then the transaction is added to its entities' state. Transactions of one batch are
processed in order, so two of the same card in one batch see each other, exactly as
they would one batch apart: online and offline give identical features.

Windows are exponentially decayed counters (time constant τ): O(1) state per window and
exact under any batching. Time comes only from the data. Late events (event time before
the entity's state time) read the state as it is and are added with their own decay
weight; state time never moves backwards.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from core.features.state import (
    CARD_COUNT,
    CARD_COUNTRY,
    CARD_DEV1,
    CARD_DEV2,
    CARD_FRAUD,
    CARD_FRAUD_T,
    CARD_IP1,
    CARD_IP2,
    CARD_LAT,
    CARD_LOC_T,
    CARD_LON,
    CARD_MEAN,
    CARD_N1H,
    CARD_N7D,
    CARD_N10M,
    CARD_N24H,
    CARD_S1H,
    CARD_S24H,
    CARD_T,
    CARD_VAR,
    DEVICE_LAST_CARD,
    MAX_PROBE,
    MERCHANT_COUNT,
    MERCHANT_FRAUD,
    MERCHANT_FRAUD_T,
    MERCHANT_MEAN,
    MERCHANT_N1H,
    MERCHANT_N24H,
    MERCHANT_N30D,
    MERCHANT_T,
    MERCHANT_VAR,
    SMALL_N,
    SMALL_SWITCHES,
    SMALL_T,
)

MIN_MS = 60_000.0
HOUR_MS = 3_600_000.0
DAY_MS = 86_400_000.0
TAU_10M, TAU_1H, TAU_24H, TAU_7D, TAU_30D = 10 * MIN_MS, HOUR_MS, DAY_MS, 7 * DAY_MS, 30 * DAY_MS
# Moments of log amount: a running mean for the first 1/EW_MIN_ALPHA transactions, then an
# exponentially weighted one, so the history adapts when a card's spending changes.
EW_MIN_ALPHA = 1.0 / 64.0
MIN_STD = 0.1
EARTH_RADIUS_KM = 6371.0088
NAN = np.nan


@njit(nogil=True, cache=True)
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


@njit(nogil=True, cache=True)
def _claim(keys: np.ndarray, last_seen: np.ndarray, counters: np.ndarray, values: np.ndarray,
           tags: np.ndarray, key: np.uint64, now_ms: np.int64) -> int:
    """Row of `key` in the table; a fresh entity's row starts from zeros."""
    s = find_slot(keys, last_seen, counters, key, now_ms)
    if s > 0:
        return s - 1
    j = -s - 1
    values[j, :] = 0.0
    tags[j, :] = 0
    return j


@njit(nogil=True, cache=True)
def _decay(dt_ms: float, tau_ms: float) -> float:
    return math.exp(-dt_ms / tau_ms) if dt_ms > 0.0 else 1.0


@njit(nogil=True, cache=True)
def _add_decayed(row: np.ndarray, slot: int, tau_ms: float, t_state: float, t: float, amount: float) -> None:
    # Counter kept as of the state time t_state; an event at t (earlier or later) adds its weight.
    if t >= t_state:
        row[slot] = row[slot] * _decay(t - t_state, tau_ms) + amount
    else:
        row[slot] += amount * _decay(t_state - t, tau_ms)


@njit(nogil=True, cache=True)
def _read_decayed(row: np.ndarray, slot: int, tau_ms: float, t_state: float, t: float) -> float:
    return row[slot] * _decay(t - t_state, tau_ms)


@njit(nogil=True, cache=True)
def _update_moments(row: np.ndarray, mean_slot: int, var_slot: int, count: float, x: float) -> None:
    alpha = max(1.0 / (count + 1.0), EW_MIN_ALPHA)
    delta = x - row[mean_slot]
    row[mean_slot] += alpha * delta
    row[var_slot] = (1.0 - alpha) * (row[var_slot] + alpha * delta * delta)


@njit(nogil=True, cache=True)
def _zscore(row: np.ndarray, mean_slot: int, var_slot: int, count: float, x: float) -> float:
    if count < 2.0:
        return NAN
    return (x - row[mean_slot]) / max(math.sqrt(row[var_slot]), MIN_STD)


@njit(nogil=True, cache=True)
def _haversine_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    p1 = math.radians(lat1)
    p2 = math.radians(lat2)
    a = math.sin((p2 - p1) / 2.0) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(math.radians(lon2 - lon1) / 2.0) ** 2
    return 2.0 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(a)))


@njit(nogil=True, cache=True)
def _novelty(tags: np.ndarray, j: int, first: int, second: int, key: np.uint64, known: bool) -> float:
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


@njit(nogil=True, cache=True)
def _card_features(ck, cls, cc, cv, ct, key, device, ip, country, t_ms, amount, x, lat, lon, out, i, col):  # type: ignore[no-untyped-def]
    if key == 0:
        for c in range(col, col + 16):
            out[i, c] = NAN
        return
    j = _claim(ck, cls, cc, cv, ct, key, t_ms)
    row = cv[j]
    t = float(t_ms)
    ts = row[CARD_T]
    n = row[CARD_COUNT]
    known = n > 0.0
    out[i, col + 0] = _read_decayed(row, CARD_N10M, TAU_10M, ts, t)
    out[i, col + 1] = _read_decayed(row, CARD_N1H, TAU_1H, ts, t)
    out[i, col + 2] = _read_decayed(row, CARD_N24H, TAU_24H, ts, t)
    out[i, col + 3] = _read_decayed(row, CARD_N7D, TAU_7D, ts, t)
    out[i, col + 4] = _read_decayed(row, CARD_S1H, TAU_1H, ts, t)
    out[i, col + 5] = _read_decayed(row, CARD_S24H, TAU_24H, ts, t)
    out[i, col + 6] = max(0.0, t - ts) / 1000.0 if known else NAN
    out[i, col + 7] = _zscore(row, CARD_MEAN, CARD_VAR, n, x)
    out[i, col + 8] = math.exp(x - row[CARD_MEAN]) if known else NAN
    out[i, col + 9] = n
    out[i, col + 10] = _novelty(ct, j, CARD_DEV1, CARD_DEV2, device, known)
    out[i, col + 11] = _novelty(ct, j, CARD_IP1, CARD_IP2, ip, known)
    if country < 0:
        out[i, col + 12] = NAN
    else:
        prev = ct[j, CARD_COUNTRY]
        out[i, col + 12] = NAN if prev == 0 else (0.0 if prev == np.uint64(country + 1) else 1.0)
        ct[j, CARD_COUNTRY] = np.uint64(country + 1)
    located = not (math.isnan(lat) or math.isnan(lon))
    if located and row[CARD_LOC_T] > 0.0:
        dist = _haversine_km(row[CARD_LAT], row[CARD_LON], lat, lon)
        hours = max(abs(t - row[CARD_LOC_T]) / HOUR_MS, 1.0 / 60.0)
        out[i, col + 13] = dist
        out[i, col + 14] = dist / hours
    else:
        out[i, col + 13] = NAN
        out[i, col + 14] = NAN
    out[i, col + 15] = _read_decayed(row, CARD_FRAUD, TAU_30D, row[CARD_FRAUD_T], t) if row[CARD_FRAUD_T] > 0.0 else 0.0
    # Update after reading: this transaction becomes history.
    _add_decayed(row, CARD_N10M, TAU_10M, ts, t, 1.0)
    _add_decayed(row, CARD_N1H, TAU_1H, ts, t, 1.0)
    _add_decayed(row, CARD_N24H, TAU_24H, ts, t, 1.0)
    _add_decayed(row, CARD_N7D, TAU_7D, ts, t, 1.0)
    _add_decayed(row, CARD_S1H, TAU_1H, ts, t, amount)
    _add_decayed(row, CARD_S24H, TAU_24H, ts, t, amount)
    _update_moments(row, CARD_MEAN, CARD_VAR, n, x)
    row[CARD_COUNT] = n + 1.0
    if t > ts:
        row[CARD_T] = t
    if located and t >= row[CARD_LOC_T]:
        row[CARD_LOC_T] = t
        row[CARD_LAT] = lat
        row[CARD_LON] = lon


@njit(nogil=True, cache=True)
def _merchant_features(mk, mls, mc, mv, mt, key, t_ms, x, out, i, col):  # type: ignore[no-untyped-def]
    if key == 0:
        for c in range(col, col + 5):
            out[i, c] = NAN
        return
    j = _claim(mk, mls, mc, mv, mt, key, t_ms)
    row = mv[j]
    t = float(t_ms)
    ts = row[MERCHANT_T]
    n = row[MERCHANT_COUNT]
    out[i, col + 0] = _read_decayed(row, MERCHANT_N1H, TAU_1H, ts, t)
    out[i, col + 1] = _read_decayed(row, MERCHANT_N24H, TAU_24H, ts, t)
    out[i, col + 2] = _zscore(row, MERCHANT_MEAN, MERCHANT_VAR, n, x)
    fraud = _read_decayed(row, MERCHANT_FRAUD, TAU_30D, row[MERCHANT_FRAUD_T], t) if row[MERCHANT_FRAUD_T] > 0.0 else 0.0
    out[i, col + 3] = fraud
    out[i, col + 4] = fraud / (_read_decayed(row, MERCHANT_N30D, TAU_30D, ts, t) + 1.0)
    _add_decayed(row, MERCHANT_N1H, TAU_1H, ts, t, 1.0)
    _add_decayed(row, MERCHANT_N24H, TAU_24H, ts, t, 1.0)
    _add_decayed(row, MERCHANT_N30D, TAU_30D, ts, t, 1.0)
    _update_moments(row, MERCHANT_MEAN, MERCHANT_VAR, n, x)
    row[MERCHANT_COUNT] = n + 1.0
    if t > ts:
        row[MERCHANT_T] = t


@njit(nogil=True, cache=True)
def _counter_feature(k, ls, cnt, v, tg, key, t_ms, tau, card, out, i, col, switch_col):  # type: ignore[no-untyped-def]
    """A small entity (customer, device, IP): a decayed count, and optionally card switches."""
    if key == 0:
        out[i, col] = NAN
        if switch_col >= 0:
            out[i, switch_col] = NAN
        return
    j = _claim(k, ls, cnt, v, tg, key, t_ms)
    row = v[j]
    t = float(t_ms)
    ts = row[SMALL_T]
    out[i, col] = _read_decayed(row, SMALL_N, tau, ts, t)
    _add_decayed(row, SMALL_N, tau, ts, t, 1.0)
    if switch_col >= 0:
        out[i, switch_col] = _read_decayed(row, SMALL_SWITCHES, TAU_24H, ts, t)
        last = tg[j, DEVICE_LAST_CARD]
        switched = last != 0 and last != card
        # Always add (0.0 without a switch): the counter is kept as of SMALL_T, which moves to t below.
        _add_decayed(row, SMALL_SWITCHES, TAU_24H, ts, t, 1.0 if switched else 0.0)
        tg[j, DEVICE_LAST_CARD] = card
    if t > ts:
        row[SMALL_T] = t


@njit(nogil=True, cache=True)
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
        out[i, 0] = x
        out[i, 1] = float(channel[i])
        out[i, 2] = float(merchant_category[i]) if merchant_category[i] >= 0 else NAN
        out[i, 3] = (t_ms % 86_400_000) / HOUR_MS
        out[i, 4] = float(((t_ms // 86_400_000) + 3) % 7)  # 1970-01-01 was a Thursday
        _card_features(ck, cls, cc, cv, ct, card_key[i], device_key[i], ip_key[i], country[i],
                       t_ms, a, x, latitude[i], longitude[i], out, i, 5)
        _merchant_features(mk, mls, mc, mv, mt, merchant_key[i], t_ms, x, out, i, 21)
        _counter_feature(uk, uls, uc, uv, ut, customer_key[i], t_ms, TAU_24H, card_key[i], out, i, 26, -1)
        _counter_feature(dk, dls, dc, dv, dt, device_key[i], t_ms, TAU_1H, card_key[i], out, i, 27, 28)
        _counter_feature(ik, ils, ic, iv, it, ip_key[i], t_ms, TAU_1H, card_key[i], out, i, 29, -1)


@njit(nogil=True, cache=True)
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
            row = cv[j]
            _add_decayed(row, CARD_FRAUD, TAU_30D, row[CARD_FRAUD_T], t, w)
            if t > row[CARD_FRAUD_T]:
                row[CARD_FRAUD_T] = t
        if merchant_key[i] != 0:
            j = _claim(mk, mls, mc, mv, mt, merchant_key[i], t_ms)
            row = mv[j]
            _add_decayed(row, MERCHANT_FRAUD, TAU_30D, row[MERCHANT_FRAUD_T], t, w)
            if t > row[MERCHANT_FRAUD_T]:
                row[MERCHANT_FRAUD_T] = t
