"""The feature registry: every model input with a stable name, a unit and a description.

The column order of the feature matrix is the order of `FEATURES`. The feature-set
version is a hash of this registry and of the kernel source, stamped on every model and
every response, so a model never meets features computed differently from its training.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Feature:
    name: str
    unit: str
    description: str
    categorical: bool = False


def _small(kind: str, who: str) -> tuple[Feature, ...]:
    """The block every customer, device and IP address gets (same kernel, same layout)."""
    return (
        Feature(f"{kind}_txn_count_10m", "transactions", f"{who}'s earlier transactions (all cards), decayed 10 min."),
        Feature(f"{kind}_txn_count_1h", "transactions", f"{who}'s earlier transactions (all cards), decayed 1 h."),
        Feature(f"{kind}_txn_count_24h", "transactions", f"{who}'s earlier transactions (all cards), decayed 24 h."),
        Feature(f"{kind}_amount_sum_1h", "major units", f"{who}'s earlier amounts (all cards), decayed 1 h."),
        Feature(f"{kind}_amount_sum_24h", "major units", f"{who}'s earlier amounts (all cards), decayed 24 h."),
        Feature(f"{kind}_card_switches_24h", "switches",
                f"Times the {who.lower()} moved to a different card than its previous transaction's, decayed 24 h."),
    )


FEATURES: tuple[Feature, ...] = (
    Feature("amount_log", "log(1 + major units)", "The transaction amount, log-scaled."),
    Feature("channel", "enum", "Channel enum value (card present, e-commerce, other CNP, ATM).", categorical=True),
    Feature("merchant_category", "MCC", "ISO 18245 merchant category code; missing is negative.", categorical=True),
    Feature("hour_of_day_utc", "hours", "Hour of the day of event_time_ms in UTC, fractional."),
    Feature("day_of_week_utc", "days", "Day of the week in UTC, Monday = 0."),
    Feature("hour_of_day_local", "hours", "Local solar hour at the transaction's longitude (UTC + lon/15 h); NaN "
                                          "without a location."),
    # Card: velocity, amounts, novelty, place, fraud history.
    Feature("card_txn_count_1m", "transactions", "Card's earlier transactions, exponentially decayed, time constant 1 min."),
    Feature("card_txn_count_10m", "transactions", "Card's earlier transactions, decayed, time constant 10 min."),
    Feature("card_txn_count_1h", "transactions", "Card's earlier transactions, decayed, time constant 1 h."),
    Feature("card_txn_count_24h", "transactions", "Card's earlier transactions, decayed, time constant 24 h."),
    Feature("card_txn_count_7d", "transactions", "Card's earlier transactions, decayed, time constant 7 d."),
    Feature("card_txn_count_30d", "transactions", "Card's earlier transactions, decayed, time constant 30 d."),
    Feature("card_amount_sum_1h", "major units", "Card's earlier amounts, decayed, time constant 1 h."),
    Feature("card_amount_sum_24h", "major units", "Card's earlier amounts, decayed, time constant 24 h."),
    Feature("card_amount_sum_7d", "major units", "Card's earlier amounts, decayed, time constant 7 d."),
    Feature("card_seconds_since_last", "seconds", "Time since the card's previous transaction; NaN for a new card."),
    Feature("card_amount_zscore", "standard deviations", "Log amount against the card's own history (mean and spread)."),
    Feature("card_amount_to_mean_ratio", "ratio", "Amount over the card's typical (geometric mean) amount."),
    Feature("card_txn_count_total", "transactions", "All transactions seen for the card (within state retention)."),
    Feature("card_new_device", "flag", "1 when the device is not one of the card's last two devices; NaN when unknown."),
    Feature("card_new_ip", "flag", "1 when the IP is not one of the card's last two IPs; NaN when unknown."),
    Feature("card_new_country", "flag", "1 when the country differs from the card's previous one; NaN when unknown."),
    Feature("card_new_merchant", "flag", "1 when the card has not paid at this merchant before (Bloom filter); NaN "
                                         "for a new card."),
    Feature("card_distinct_merchants_24h", "merchants", "Distinct merchants of the card's earlier transactions in "
                                                        "the last 12–24 h (64-bit sketch)."),
    Feature("card_distinct_devices_24h", "devices", "Distinct devices of the card's earlier transactions in the "
                                                    "last 12–24 h (64-bit sketch)."),
    Feature("card_distance_km_from_last", "km", "Great-circle distance from the card's previous located transaction."),
    Feature("card_speed_kmh_from_last", "km/h", "Implied speed from the card's previous located transaction."),
    Feature("card_fraud_count_30d", "reports", "Confirmed fraud reported on the card, decayed, time constant 30 d."),
    # Merchant: velocity, amounts, what its customers' payments turned out to be.
    Feature("merchant_txn_count_10m", "transactions", "Merchant's earlier transactions, decayed, time constant 10 min."),
    Feature("merchant_txn_count_1h", "transactions", "Merchant's earlier transactions, decayed, time constant 1 h."),
    Feature("merchant_txn_count_24h", "transactions", "Merchant's earlier transactions, decayed, time constant 24 h."),
    Feature("merchant_txn_count_7d", "transactions", "Merchant's earlier transactions, decayed, time constant 7 d."),
    Feature("merchant_amount_sum_1h", "major units", "Merchant's earlier amounts, decayed, time constant 1 h."),
    Feature("merchant_amount_sum_24h", "major units", "Merchant's earlier amounts, decayed, time constant 24 h."),
    Feature("merchant_amount_zscore", "standard deviations", "Log amount against the merchant's history."),
    Feature("merchant_fraud_count_7d", "reports", "Confirmed fraud reported at the merchant, decayed, time constant 7 d."),
    Feature("merchant_fraud_count_30d", "reports", "Confirmed fraud reported at the merchant, decayed, time constant 30 d."),
    Feature("merchant_fraud_rate_30d", "ratio", "Merchant's fraud reports over its transactions, both decayed 30 d."),
    *_small("customer", "Customer"),
    *_small("device", "Device"),
    *_small("ip", "IP address"),
)

FEATURE_NAMES: tuple[str, ...] = tuple(f.name for f in FEATURES)
FEATURE_INDEX: dict[str, int] = {name: i for i, name in enumerate(FEATURE_NAMES)}
CATEGORICAL_FEATURES: tuple[str, ...] = tuple(f.name for f in FEATURES if f.categorical)
NUM_FEATURES = len(FEATURES)


def _feature_set_version() -> str:
    digest = hashlib.sha256()
    for f in FEATURES:
        digest.update(f"{f.name}|{f.unit}|{f.description}|{f.categorical}\n".encode())
    here = Path(__file__).resolve().parent
    for module in ("kernels.py", "state.py"):
        digest.update((here / module).read_bytes())
    return "fs-" + digest.hexdigest()[:12]


FEATURE_SET_VERSION: str = _feature_set_version()
