"""Entity state: bounded hash tables of plain arrays, one per entity kind.

A table is `keys` (uint64, 0 = empty slot), `last_seen_ms` (int64, for eviction) and two
matrices of per-entity slots: `values` (float64) and `tags` (uint64, identities such as a
card's last device). The kernels read and write these arrays directly; nothing else
holds state, so a shared store can later back the same arrays.

Capacity is fixed; an entity that finds no free slot within `MAX_PROBE` probes takes
the place of the least recently seen entity among them (an approximate LRU), counted in
`evictions`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.files import write_atomically

# Slot layouts. The kernels index with these constants; changing them changes the
# feature-set version (this file is part of its hash).
# Card values: state time; decayed counts (1 min .. 30 d) and amount sums; log-amount
# moments; the latest location; confirmed fraud.
(CARD_T, CARD_N1M, CARD_N10M, CARD_N1H, CARD_N24H, CARD_N7D, CARD_N30D, CARD_S1H, CARD_S24H, CARD_S7D,
 CARD_MEAN, CARD_VAR, CARD_COUNT, CARD_LOC_T, CARD_LAT, CARD_LON, CARD_FRAUD, CARD_FRAUD_T) = range(18)
CARD_VALUES = 18
# Card tags: the last two devices and IPs, the last country, a 128-bit Bloom filter of merchants
# (two words), and 64-bit distinct-count sketches of merchants and devices for the current and
# the previous 12-hour bucket.
(CARD_DEV1, CARD_DEV2, CARD_IP1, CARD_IP2, CARD_COUNTRY, CARD_MERCHANT_BLOOM_LO, CARD_MERCHANT_BLOOM_HI,
 CARD_MERCHANTS_NOW, CARD_MERCHANTS_BEFORE, CARD_DEVICES_NOW, CARD_DEVICES_BEFORE) = range(11)
CARD_TAGS = 11

(MERCHANT_T, MERCHANT_N10M, MERCHANT_N1H, MERCHANT_N24H, MERCHANT_N7D, MERCHANT_N30D, MERCHANT_S1H, MERCHANT_S24H,
 MERCHANT_MEAN, MERCHANT_VAR, MERCHANT_COUNT, MERCHANT_FRAUD7, MERCHANT_FRAUD30, MERCHANT_FRAUD_T) = range(14)
MERCHANT_VALUES = 14
MERCHANT_TAGS = 0

# Customer, device and IP share one layout: decayed counts and sums, and card switches.
SMALL_T, SMALL_N10M, SMALL_N1H, SMALL_N24H, SMALL_S1H, SMALL_S24H, SMALL_SWITCHES = range(7)
SMALL_VALUES = 7
SMALL_LAST_CARD = 0
SMALL_TAGS = 1

MAX_PROBE = 16
DEFAULT_CARD_CAPACITY = 1 << 18
DEFAULT_ENTITY_CAPACITY = 1 << 17
SNAPSHOT_FORMAT = 1


@dataclass(slots=True)
class EntityTable:
    """One entity kind's state: `capacity` slots (a power of two)."""

    kind: str
    keys: np.ndarray
    last_seen_ms: np.ndarray
    values: np.ndarray
    tags: np.ndarray
    counters: np.ndarray = field(default_factory=lambda: np.zeros(2, dtype=np.int64))  # [inserts, evictions]

    @classmethod
    def empty(cls, kind: str, capacity: int, num_values: int, num_tags: int) -> EntityTable:
        if capacity < MAX_PROBE or capacity & (capacity - 1):
            raise ValueError(f"{kind} capacity must be a power of two ≥ {MAX_PROBE}, got {capacity}")
        return cls(
            kind=kind,
            keys=np.zeros(capacity, dtype=np.uint64),
            last_seen_ms=np.zeros(capacity, dtype=np.int64),
            values=np.zeros((capacity, num_values), dtype=np.float64),
            tags=np.zeros((capacity, num_tags), dtype=np.uint64),
        )

    @property
    def capacity(self) -> int:
        return int(self.keys.shape[0])

    def occupancy(self) -> int:
        """Entities tracked now."""
        return int(np.count_nonzero(self.keys))

    @property
    def evictions(self) -> int:
        return int(self.counters[1])


@dataclass(slots=True)
class EntityState:
    """All entity tables of one process. Owned by exactly one thread at a time."""

    card: EntityTable
    merchant: EntityTable
    customer: EntityTable
    device: EntityTable
    ip: EntityTable

    @classmethod
    def empty(cls, *, card_capacity: int = DEFAULT_CARD_CAPACITY, merchant_capacity: int = DEFAULT_ENTITY_CAPACITY,
              customer_capacity: int = DEFAULT_ENTITY_CAPACITY, device_capacity: int = DEFAULT_ENTITY_CAPACITY,
              ip_capacity: int = DEFAULT_ENTITY_CAPACITY) -> EntityState:
        """Empty tables. The defaults are the service's, so offline replay evicts as serving does."""
        capacities = {"card": card_capacity, "merchant": merchant_capacity, "customer": customer_capacity,
                      "device": device_capacity, "ip": ip_capacity}
        return cls(**{kind: EntityTable.empty(kind, capacities[kind], *_LAYOUT[kind]) for kind in _LAYOUT})

    def tables(self) -> tuple[EntityTable, ...]:
        return (self.card, self.merchant, self.customer, self.device, self.ip)

    def save(self, path: Path, *, feature_set_version: str) -> None:
        """Write a snapshot atomically (temporary file, fsync, rename)."""
        arrays: dict[str, Any] = {
            "format": np.array([SNAPSHOT_FORMAT]),
            "feature_set_version": np.array([feature_set_version]),
        }
        for t in self.tables():
            for name in _TABLE_ARRAYS:
                arrays[f"{t.kind}.{name}"] = getattr(t, name)
        write_atomically(path, lambda f: np.savez(f, **arrays))

    @classmethod
    def load(cls, path: Path, *, feature_set_version: str) -> EntityState:
        """Read a snapshot; raises ValueError when it is corrupt or from other kernels."""
        arrays = _read_snapshot(path)
        found_format = arrays["format"].ravel().tolist()
        if found_format != [SNAPSHOT_FORMAT]:
            raise ValueError(f"snapshot format {', '.join(map(str, found_format))}, expected {SNAPSHOT_FORMAT}")
        found = [str(v) for v in arrays["feature_set_version"].ravel().tolist()]
        if found != [feature_set_version]:
            raise ValueError(f"snapshot is for feature set {', '.join(found)}, these kernels are {feature_set_version}")
        return cls(**{kind: _checked_table(kind, arrays) for kind in _LAYOUT})


_LAYOUT = {  # kind: (values, tags) per entity, in EntityState field order
    "card": (CARD_VALUES, CARD_TAGS), "merchant": (MERCHANT_VALUES, MERCHANT_TAGS),
    "customer": (SMALL_VALUES, SMALL_TAGS),
    "device": (SMALL_VALUES, SMALL_TAGS), "ip": (SMALL_VALUES, SMALL_TAGS),
}
_TABLE_ARRAYS = ("keys", "last_seen_ms", "values", "tags", "counters")
_SNAPSHOT_ARRAYS = ("format", "feature_set_version", *(f"{k}.{a}" for k in _LAYOUT for a in _TABLE_ARRAYS))


def _read_snapshot(path: Path) -> dict[str, np.ndarray]:
    try:
        # Our own file object: np.load leaks the one it opens when the zip turns out broken.
        with open(path, "rb") as f:
            if f.read(4) != b"PK\x03\x04":
                # Checked here: for other bytes numpy would try pickle and suggest allow_pickle.
                raise ValueError("not an .npz archive")
            f.seek(0)
            with np.load(f, allow_pickle=False) as data:
                return {name: data[name] for name in _SNAPSHOT_ARRAYS}
    except Exception as exc:
        # Damaged bytes fail in many ways inside zipfile and numpy (BadZipFile, KeyError,
        # EOFError, NotImplementedError for a garbled compression field, zlib errors, a
        # MemoryError for a garbled shape); all mean one thing, and callers catch ValueError.
        raise ValueError(f"unreadable snapshot: {exc.__class__.__name__}: {exc}") from exc


def _checked_table(kind: str, arrays: dict[str, np.ndarray]) -> EntityTable:
    # The kernels index without bounds checks, so a table of the wrong shape or dtype must
    # never reach them (the zip checksums catch damaged bytes, not a badly written file).
    num_values, num_tags = _LAYOUT[kind]
    keys = arrays[f"{kind}.keys"]
    capacity = int(keys.shape[0]) if keys.ndim == 1 else -1
    expected = {"keys": (np.uint64, (capacity,)), "last_seen_ms": (np.int64, (capacity,)),
                "values": (np.float64, (capacity, num_values)), "tags": (np.uint64, (capacity, num_tags)),
                "counters": (np.int64, (2,))}
    for name, (dtype, shape) in expected.items():
        a = arrays[f"{kind}.{name}"]
        if a.dtype != np.dtype(dtype) or a.shape != shape:
            raise ValueError(f"snapshot {kind}.{name} is {a.dtype} {a.shape}, expected {np.dtype(dtype)} {shape}")
    if capacity < MAX_PROBE or capacity & (capacity - 1):
        raise ValueError(f"snapshot {kind} capacity {capacity} is not a power of two ≥ {MAX_PROBE}")
    return EntityTable(kind=kind, **{name: arrays[f"{kind}.{name}"].copy()  # a C-ordered copy
                                     for name in _TABLE_ARRAYS})
