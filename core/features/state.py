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

import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# Slot layouts. The kernels index with these constants; changing them changes the
# feature-set version (this file is part of its hash).
CARD_T, CARD_N10M, CARD_N1H, CARD_N24H, CARD_N7D, CARD_S1H, CARD_S24H = 0, 1, 2, 3, 4, 5, 6
CARD_MEAN, CARD_VAR, CARD_COUNT, CARD_LOC_T, CARD_LAT, CARD_LON, CARD_FRAUD, CARD_FRAUD_T = (
    7, 8, 9, 10, 11, 12, 13, 14)
CARD_VALUES = 15
CARD_DEV1, CARD_DEV2, CARD_IP1, CARD_IP2, CARD_COUNTRY = 0, 1, 2, 3, 4
CARD_TAGS = 5

MERCHANT_T, MERCHANT_N1H, MERCHANT_N24H, MERCHANT_N30D = 0, 1, 2, 3
MERCHANT_MEAN, MERCHANT_VAR, MERCHANT_COUNT, MERCHANT_FRAUD, MERCHANT_FRAUD_T = 4, 5, 6, 7, 8
MERCHANT_VALUES = 9

SMALL_T, SMALL_N, SMALL_SWITCHES = 0, 1, 2  # customer, device, IP: a time and one or two counters
SMALL_VALUES = 3
DEVICE_LAST_CARD = 0
SMALL_TAGS = 1

MAX_PROBE = 16
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
    def empty(cls, *, card_capacity: int = 1 << 20, merchant_capacity: int = 1 << 17,
              customer_capacity: int = 1 << 20, device_capacity: int = 1 << 20,
              ip_capacity: int = 1 << 20) -> EntityState:
        return cls(
            card=EntityTable.empty("card", card_capacity, CARD_VALUES, CARD_TAGS),
            merchant=EntityTable.empty("merchant", merchant_capacity, MERCHANT_VALUES, 1),
            customer=EntityTable.empty("customer", customer_capacity, SMALL_VALUES, SMALL_TAGS),
            device=EntityTable.empty("device", device_capacity, SMALL_VALUES, SMALL_TAGS),
            ip=EntityTable.empty("ip", ip_capacity, SMALL_VALUES, SMALL_TAGS),
        )

    def tables(self) -> tuple[EntityTable, ...]:
        return (self.card, self.merchant, self.customer, self.device, self.ip)

    def save(self, path: Path, *, feature_set_version: str) -> None:
        """Write a snapshot atomically (temporary file, fsync, rename)."""
        arrays: dict[str, np.ndarray] = {
            "format": np.array([SNAPSHOT_FORMAT]),
            "feature_set_version": np.array([feature_set_version]),
        }
        for t in self.tables():
            for name in ("keys", "last_seen_ms", "values", "tags", "counters"):
                arrays[f"{t.kind}.{name}"] = getattr(t, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: Path, *, feature_set_version: str) -> EntityState:
        """Read a snapshot; raises ValueError when it is corrupt or from other kernels."""
        try:
            with np.load(path, allow_pickle=False) as data:
                if int(data["format"][0]) != SNAPSHOT_FORMAT:
                    raise ValueError(f"snapshot format {int(data['format'][0])}, expected {SNAPSHOT_FORMAT}")
                found = str(data["feature_set_version"][0])
                if found != feature_set_version:
                    raise ValueError(f"snapshot is for feature set {found}, these kernels are {feature_set_version}")
                tables = {}
                for kind in ("card", "merchant", "customer", "device", "ip"):
                    tables[kind] = EntityTable(kind=kind, **{
                        name: data[f"{kind}.{name}"].copy()
                        for name in ("keys", "last_seen_ms", "values", "tags", "counters")
                    })
        except (OSError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            raise ValueError(f"unreadable snapshot: {exc.__class__.__name__}: {exc}") from exc
        return cls(**tables)
