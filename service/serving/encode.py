"""A batch of Transaction messages as the columns the feature kernels read (`core.encode.EncodedBatch`).

The serving path's encoder: the same numbers as `core.encode.encode_columns`, which replay and
training use for whole histories (tests/service/serving/test_pipeline.py holds them equal),
made the way a small batch is cheapest.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from fraudscore.v1 import fraudscore_pb2 as pb

from core.encode import EncodedBatch, KeyHasher, country_code, mcc_code, minor_unit


def encode_transactions(hasher: KeyHasher, txns: Sequence[pb.Transaction]) -> EncodedBatch:
    """Columns of validated Transaction messages: the same EncodedBatch as `core.encode.encode_columns`
    of their fields (tests/service/serving/test_pipeline.py compares them), in three passes over the
    messages and three arrays instead of a list and an array per column: a batch of one is what a
    unary call costs, and each array made has a fixed cost of about a µs."""
    n = len(txns)
    nan = math.nan
    key = hasher.key
    # Transposed copies: each row of these is one C-contiguous column.
    keys = np.fromiter(map(key, [v for t in txns for v in (t.card_id, t.customer_id, t.merchant_id, t.device_id,
                                                           t.ip_address)]),
                       dtype=np.uint64, count=5 * n).reshape(n, 5).T.copy()
    ints = np.array([(t.event_time_ms, t.channel, mcc_code(t.merchant_category), country_code(t.country))
                     for t in txns], dtype=np.int64).reshape(n, 4).T.copy()
    # amount_minor × the currency's minor unit: the product numpy makes in `amount_major` (an int64
    # below 2**53 becomes its float exactly), in Python.
    floats = np.array([(t.amount_minor * minor_unit(t.currency), t.latitude if t.HasField("latitude") else nan,
                        t.longitude if t.HasField("longitude") else nan) for t in txns],
                      dtype=np.float64).reshape(n, 3).T.copy()
    return EncodedBatch(card_key=keys[0], customer_key=keys[1], merchant_key=keys[2], device_key=keys[3],
                        ip_key=keys[4], amount=floats[0], event_time_ms=ints[0], channel=ints[1],
                        merchant_category=ints[2], country=ints[3], latitude=floats[1], longitude=floats[2])
