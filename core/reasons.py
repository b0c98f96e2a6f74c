"""Reason codes: what a fraud analyst (or a cardholder's bank) reads instead of feature names.

Each feature maps to one stable reason code; several features can share one (the card's
10-minute and 1-hour velocity are both CARD_VELOCITY_1H). A transaction's model reasons
are the reason codes with the largest positive contribution to its fraud log-odds, the
contributions of their features added up. Codes are a contract: add, never rename.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from core.features import FEATURE_NAMES


@dataclass(frozen=True, slots=True)
class ReasonCode:
    code: str
    description: str


_R = ReasonCode
AMOUNT_HIGH = _R("AMOUNT_HIGH", "Large transaction amount")
CHANNEL_RISK = _R("CHANNEL_RISK", "Riskier payment channel")
MERCHANT_CATEGORY_RISK = _R("MERCHANT_CATEGORY_RISK", "Riskier merchant category")
UNUSUAL_TIME = _R("UNUSUAL_TIME", "Unusual time of day or week")
CARD_VELOCITY_1H = _R("CARD_VELOCITY_1H", "Many transactions on the card in the last hour")
CARD_VELOCITY_24H = _R("CARD_VELOCITY_24H", "Many transactions on the card in the last day")
CARD_VELOCITY_7D = _R("CARD_VELOCITY_7D", "Many transactions on the card in the last week")
CARD_VELOCITY_30D = _R("CARD_VELOCITY_30D", "Many transactions on the card in the last month")
CARD_SPEND_VELOCITY = _R("CARD_SPEND_VELOCITY", "High spending on the card in the last hours")
CARD_RAPID_REUSE = _R("CARD_RAPID_REUSE", "Card used again very soon after its previous transaction")
AMOUNT_UNUSUAL_FOR_CARD = _R("AMOUNT_UNUSUAL_FOR_CARD", "Amount unusual for this card")
CARD_HISTORY_SHORT = _R("CARD_HISTORY_SHORT", "Little history for this card")
NEW_DEVICE_FOR_CARD = _R("NEW_DEVICE_FOR_CARD", "Device not seen before with this card")
NEW_IP_FOR_CARD = _R("NEW_IP_FOR_CARD", "IP address not seen before with this card")
NEW_MERCHANT_FOR_CARD = _R("NEW_MERCHANT_FOR_CARD", "Merchant not seen before with this card")
CARD_MANY_MERCHANTS = _R("CARD_MANY_MERCHANTS", "Card used at many different merchants in the last day")
CARD_MANY_DEVICES = _R("CARD_MANY_DEVICES", "Card used from many different devices in the last day")
NEW_COUNTRY_FOR_CARD = _R("NEW_COUNTRY_FOR_CARD", "Country differs from the card's previous transaction")
LOCATION_JUMP = _R("LOCATION_JUMP", "Far from, or implausibly fast from, the card's previous location")
CARD_RECENT_FRAUD = _R("CARD_RECENT_FRAUD", "Fraud confirmed on this card recently")
MERCHANT_VELOCITY = _R("MERCHANT_VELOCITY", "Unusual transaction volume at the merchant")
AMOUNT_UNUSUAL_FOR_MERCHANT = _R("AMOUNT_UNUSUAL_FOR_MERCHANT", "Amount unusual for this merchant")
MERCHANT_RECENT_FRAUD = _R("MERCHANT_RECENT_FRAUD", "Fraud confirmed at this merchant recently")
CUSTOMER_VELOCITY = _R("CUSTOMER_VELOCITY", "Many recent transactions or high spending by the customer")
CUSTOMER_MANY_CARDS = _R("CUSTOMER_MANY_CARDS", "Customer paying with several different cards")
DEVICE_VELOCITY = _R("DEVICE_VELOCITY", "Many recent transactions or high spending from the device")
DEVICE_SHARED_ACROSS_CARDS = _R("DEVICE_SHARED_ACROSS_CARDS", "Device used with several different cards")
IP_VELOCITY = _R("IP_VELOCITY", "Many recent transactions or high spending from the IP address")
IP_SHARED_ACROSS_CARDS = _R("IP_SHARED_ACROSS_CARDS", "IP address used with several different cards")

_SMALL_WINDOWS = ("txn_count_10m", "txn_count_1h", "txn_count_24h", "amount_sum_1h", "amount_sum_24h")
REASON_OF_FEATURE: dict[str, ReasonCode] = {
    "amount_log": AMOUNT_HIGH,
    "channel": CHANNEL_RISK,
    "merchant_category": MERCHANT_CATEGORY_RISK,
    "hour_of_day_utc": UNUSUAL_TIME,
    "day_of_week_utc": UNUSUAL_TIME,
    "hour_of_day_local": UNUSUAL_TIME,
    "card_txn_count_1m": CARD_VELOCITY_1H,
    "card_txn_count_10m": CARD_VELOCITY_1H,
    "card_txn_count_1h": CARD_VELOCITY_1H,
    "card_txn_count_24h": CARD_VELOCITY_24H,
    "card_txn_count_7d": CARD_VELOCITY_7D,
    "card_txn_count_30d": CARD_VELOCITY_30D,
    "card_amount_sum_1h": CARD_SPEND_VELOCITY,
    "card_amount_sum_24h": CARD_SPEND_VELOCITY,
    "card_amount_sum_7d": CARD_SPEND_VELOCITY,
    "card_seconds_since_last": CARD_RAPID_REUSE,
    "card_amount_zscore": AMOUNT_UNUSUAL_FOR_CARD,
    "card_amount_to_mean_ratio": AMOUNT_UNUSUAL_FOR_CARD,
    "card_txn_count_total": CARD_HISTORY_SHORT,
    "card_new_device": NEW_DEVICE_FOR_CARD,
    "card_new_ip": NEW_IP_FOR_CARD,
    "card_new_country": NEW_COUNTRY_FOR_CARD,
    "card_new_merchant": NEW_MERCHANT_FOR_CARD,
    "card_distinct_merchants_24h": CARD_MANY_MERCHANTS,
    "card_distinct_devices_24h": CARD_MANY_DEVICES,
    "card_distance_km_from_last": LOCATION_JUMP,
    "card_speed_kmh_from_last": LOCATION_JUMP,
    "card_fraud_count_30d": CARD_RECENT_FRAUD,
    "merchant_txn_count_10m": MERCHANT_VELOCITY,
    "merchant_txn_count_1h": MERCHANT_VELOCITY,
    "merchant_txn_count_24h": MERCHANT_VELOCITY,
    "merchant_txn_count_7d": MERCHANT_VELOCITY,
    "merchant_amount_sum_1h": MERCHANT_VELOCITY,
    "merchant_amount_sum_24h": MERCHANT_VELOCITY,
    "merchant_amount_zscore": AMOUNT_UNUSUAL_FOR_MERCHANT,
    "merchant_fraud_count_7d": MERCHANT_RECENT_FRAUD,
    "merchant_fraud_count_30d": MERCHANT_RECENT_FRAUD,
    "merchant_fraud_rate_30d": MERCHANT_RECENT_FRAUD,
    **{f"customer_{w}": CUSTOMER_VELOCITY for w in _SMALL_WINDOWS},
    "customer_card_switches_24h": CUSTOMER_MANY_CARDS,
    **{f"device_{w}": DEVICE_VELOCITY for w in _SMALL_WINDOWS},
    "device_card_switches_24h": DEVICE_SHARED_ACROSS_CARDS,
    **{f"ip_{w}": IP_VELOCITY for w in _SMALL_WINDOWS},
    "ip_card_switches_24h": IP_SHARED_ACROSS_CARDS,
}

REASON_CODES: tuple[ReasonCode, ...] = tuple(dict.fromkeys(REASON_OF_FEATURE[f] for f in FEATURE_NAMES))
# (features × reasons) 0/1 matrix: contributions @ this = contributions per reason code.
FEATURE_TO_REASON: np.ndarray = np.array(
    [[1.0 if REASON_OF_FEATURE[f] == r else 0.0 for r in REASON_CODES] for f in FEATURE_NAMES], dtype=np.float64)


def top_reasons(contributions: np.ndarray, k: int) -> list[list[tuple[ReasonCode, float]]]:
    """Per row, up to `k` reason codes with the largest positive summed contribution, largest first.

    `contributions` is (rows, num_features): per-feature shares of the log-odds.
    """
    per_reason = contributions @ FEATURE_TO_REASON
    order = np.argsort(-per_reason, axis=1, kind="stable")[:, :k]
    out = []
    for row, cols in zip(per_reason, order, strict=True):
        out.append([(REASON_CODES[c], float(row[c])) for c in cols if row[c] > 0.0])
    return out
