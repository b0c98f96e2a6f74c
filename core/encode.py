"""Encoding: transactions as strings and codes → one columnar batch of numbers.

Identifiers become 64-bit keyed hashes (keyed BLAKE2b, a MAC, truncated to 8 bytes), so
the feature kernels only ever see numbers and no identifier is held in clear past this
point. The same encoding serves a live batch and a whole offline history.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

# ISO 4217 minor-unit exponents that differ from the usual 2. Amounts become major units
# so that "amount 50" means fifty dollars, fifty euros or fifty yen alike — not a
# currency conversion, just the same scale of number (documented in docs/features.md).
_CURRENCY_EXPONENT: dict[str, int] = {
    "BIF": 0, "CLP": 0, "DJF": 0, "GNF": 0, "ISK": 0, "JPY": 0, "KMF": 0, "KRW": 0, "PYG": 0,
    "RWF": 0, "UGX": 0, "UYI": 0, "VND": 0, "VUV": 0, "XAF": 0, "XOF": 0, "XPF": 0,
    "BHD": 3, "IQD": 3, "JOD": 3, "KWD": 3, "LYD": 3, "OMR": 3, "TND": 3,
}

# Identifier columns: a list from protobuf messages, or an object array from a history.
Strings = Sequence[str] | np.ndarray
T = TypeVar("T")
_DEDUP_FROM = 256  # below this many values a table costs more than it saves


@dataclass(frozen=True, slots=True)
class EncodedBatch:
    """One columnar batch, ready for the feature kernels. Every array has length n."""

    card_key: np.ndarray          # uint64
    customer_key: np.ndarray      # uint64, 0 when unknown
    merchant_key: np.ndarray      # uint64
    device_key: np.ndarray        # uint64, 0 when unknown
    ip_key: np.ndarray            # uint64, 0 when unknown
    amount: np.ndarray            # float64, major currency units
    event_time_ms: np.ndarray     # int64
    channel: np.ndarray           # int64 (the Channel enum value)
    merchant_category: np.ndarray  # int64 MCC, -1 when unknown
    country: np.ndarray           # int64 code of the alpha-2 country, -1 when unknown
    latitude: np.ndarray          # float64, NaN when unknown
    longitude: np.ndarray         # float64, NaN when unknown

    def __len__(self) -> int:
        return int(self.card_key.shape[0])

    def slice(self, start: int, stop: int) -> EncodedBatch:
        """Rows [start, stop) as views (no copy)."""
        return EncodedBatch(**{name: getattr(self, name)[start:stop] for name in EncodedBatch.__slots__})


KEY_SCHEME = "blake2b-64"
"""Names how identifiers become state keys; stamped in state snapshots, so keys made by another
scheme (xxh64 before this one) are refused, never mixed. Change it whenever `KeyHasher.key` changes."""
DEVELOPMENT_KEY = b"fraudscore-default-key"  # published: for tests, replay and a laptop, never production
_MAX_KEY_BYTES = 64  # BLAKE2b's longest key
_LONG_KEY_PERSON = b"fs-long-key"
_FINGERPRINT_PERSON = b"fs-key-fp"
_RECORD_PERSON = b"fs-txn-record"
_FINGERPRINT_LABEL = b"fraudscore identifier key fingerprint v1"


class KeyHasher:
    """Keyed 64-bit hashes of identifiers; the empty string maps to 0 (unknown).

    The hash is BLAKE2b in its keyed mode (a MAC by design, RFC 7693) truncated to 8
    bytes: without the secret, a key cannot be computed for a guessed identifier, and
    known identifier/key pairs do not reveal the secret. A secret longer than BLAKE2b's
    64-byte key is first hashed to 64 bytes (as HMAC hashes a key longer than its block).
    docs/security.md, "What is hashed", says why BLAKE2b and not HMAC-SHA256 or xxh64.
    """

    __slots__ = ("_keyed", "_records", "fingerprint")

    fingerprint: str
    """16 hex digits identifying the secret (a MAC of a fixed label under another
    personalization, so it equals no identifier's key): stamped in state snapshots to
    refuse state made with another secret. It reveals nothing about the secret itself."""

    def __init__(self, secret: bytes = DEVELOPMENT_KEY) -> None:
        if not secret:
            raise ValueError("the identifier hash key is empty: a keyed hash needs a secret "
                             "(FRAUDSCORE_ID_HASH_KEY, at least 16 bytes)")
        if len(secret) > _MAX_KEY_BYTES:
            secret = hashlib.blake2b(secret, digest_size=_MAX_KEY_BYTES, person=_LONG_KEY_PERSON).digest()
        # Keyed once here; each key() copies this state (~40% cheaper than re-keying per call).
        self._keyed = hashlib.blake2b(key=secret, digest_size=8)
        self._records = hashlib.blake2b(key=secret, digest_size=16, person=_RECORD_PERSON)
        self.fingerprint = hashlib.blake2b(_FINGERPRINT_LABEL, key=secret, digest_size=8,
                                           person=_FINGERPRINT_PERSON).hexdigest()

    @property
    def scheme(self) -> str:
        """`KEY_SCHEME`: how this hasher makes keys."""
        return KEY_SCHEME

    def key(self, value: str) -> int:
        """The state key of one identifier (0 for the empty string)."""
        if not value:
            return 0
        h = self._keyed.copy()
        h.update(value.encode())
        return int.from_bytes(h.digest(), "little") or 1  # 0 is reserved for "unknown"

    def record_key(self, transaction_id: str) -> bytes:
        """16 bytes naming a transaction id in a shared store (its idempotency record): keyed BLAKE2b
        under its own personalization, so never an identifier's key, and long enough that the ids
        of a day (10⁹ at 10,000/s) collide with a chance of ~10⁻²¹."""
        h = self._records.copy()
        h.update(transaction_id.encode())
        return h.digest()

    def keys(self, values: Strings) -> np.ndarray:
        """Keys of many identifiers as a uint64 array."""
        return mapped(values, self.key, np.uint64)


def mapped(values: Strings, fn: Callable[[str], T], dtype: type) -> np.ndarray:
    """`fn` of every value as an array, computed once per distinct value.

    A long column (a history being replayed) repeats its cards, merchants and countries
    many times: deduplicating in C (`dict.fromkeys`, `map` over a dict lookup) and calling
    `fn` per distinct value made offline encoding several times faster.
    """
    if len(values) < _DEDUP_FROM:
        return np.fromiter(map(fn, values), dtype=dtype, count=len(values))
    table = {v: fn(v) for v in dict.fromkeys(values)}
    return np.fromiter(map(table.__getitem__, values), dtype=dtype, count=len(values))


def currency_exponent(currency: str) -> int:
    """Number of minor units digits of an ISO 4217 currency (2 unless listed otherwise)."""
    return _CURRENCY_EXPONENT.get(currency, 2)


def amount_major(amount_minor: np.ndarray, currency: Strings) -> np.ndarray:
    """Amounts in major units, as float64."""
    scale = mapped(currency, minor_unit, np.float64)
    amount: np.ndarray = np.asarray(amount_minor, dtype=np.float64) * scale
    return amount


_MINOR_UNITS: dict[str, float] = {}


def minor_unit(currency: str) -> float:
    """The value of one minor unit of `currency` in major units (0.01 for USD, 1.0 for JPY)."""
    unit = _MINOR_UNITS.get(currency)
    if unit is None:
        unit = float(10.0 ** -currency_exponent(currency))
        if len(_MINOR_UNITS) < 4096:  # codes are validated (three capitals), but bounded all the same
            _MINOR_UNITS[currency] = unit
    return unit


def mcc_code(category: str) -> int:
    """An MCC string as an integer, -1 when missing or not 4 digits."""
    return int(category) if len(category) == 4 and category.isdigit() else -1


def country_code(country: str) -> int:
    """An ISO 3166 alpha-2 code as an integer in 0..675, -1 when missing."""
    if len(country) != 2 or not country.isalpha():
        return -1
    upper = country.upper()
    return (ord(upper[0]) - 65) * 26 + (ord(upper[1]) - 65)


def encode_columns(
    hasher: KeyHasher,
    *,
    card_id: Strings,
    customer_id: Strings,
    merchant_id: Strings,
    device_id: Strings,
    ip_address: Strings,
    amount_minor: np.ndarray,
    currency: Strings,
    event_time_ms: np.ndarray,
    channel: np.ndarray,
    merchant_category: Strings,
    country: Strings,
    latitude: np.ndarray,
    longitude: np.ndarray,
) -> EncodedBatch:
    """Encode already-validated columns into an `EncodedBatch`."""
    return EncodedBatch(
        card_key=hasher.keys(card_id),
        customer_key=hasher.keys(customer_id),
        merchant_key=hasher.keys(merchant_id),
        device_key=hasher.keys(device_id),
        ip_key=hasher.keys(ip_address),
        amount=amount_major(amount_minor, currency),
        event_time_ms=np.ascontiguousarray(event_time_ms, dtype=np.int64),
        channel=np.ascontiguousarray(channel, dtype=np.int64),
        merchant_category=mapped(merchant_category, mcc_code, np.int64),
        country=mapped(country, country_code, np.int64),
        latitude=np.ascontiguousarray(latitude, dtype=np.float64),
        longitude=np.ascontiguousarray(longitude, dtype=np.float64),
    )
