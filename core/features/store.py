"""The state store interface: entity rows as plain arrays in, plain arrays out.

The feature kernels run on in-process hash tables (`EntityState`). A `StateStore` is
anything that can hand out the rows of some entities and take them back, so state can
later live in a shared store (Redis, say) when replicas must share it. `FeatureEngine`
fetches the rows a batch needs, runs the same kernels on a small working copy, and
stores every row back (see docs/state-store.md). `LocalStore` puts an `EntityState`
behind the interface, for tests and as the model of what a store must do.

A row is one entity of one kind: its key, `last_seen_ms`, and its `values` and `tags`
slots in the layout of `core.features.state` (V and T per kind, read from the arrays).

`save_snapshot` / `load_snapshot` persist the local store, stamped with the scheme and key
fingerprint of the `KeyHasher` that made its keys, so state keyed otherwise is refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

import numpy as np
from numba import njit

from core.encode import KeyHasher
from core.features.kernels import find_slot

# The snapshot layout's private helpers: the keyed snapshot lives here, not in state.py,
# because state.py's bytes are part of FEATURE_SET_VERSION, and the hash of identifiers
# is no part of what a model learnt (every deployment has its own key anyway).
from core.features.state import (
    _LAYOUT,
    _TABLE_ARRAYS,
    MAX_PROBE,
    EntityState,
    EntityTable,
    _checked_table,
    _read_snapshot,
)
from core.files import Pacer, write_atomically, write_npz

KEYED_SNAPSHOT_FORMAT = 2
"""Format 2 is format 1 (`EntityState.save`) plus `key_scheme` and `key_fingerprint`. A build
that reads only format 1 refuses it, so a rollback cannot read these keys as its own either."""

_U64, _I64, _F64 = np.dtype(np.uint64), np.dtype(np.int64), np.dtype(np.float64)
ROW_LAYOUT: Mapping[str, tuple[int, int]] = MappingProxyType(_LAYOUT)
"""Each entity kind's (V values, T tags) per row: what a store outside the process lays out."""


@dataclass(frozen=True, slots=True)
class StoredRows:
    """Rows of m entities of one kind; row i of every array belongs to `keys[i]`.

    `keys` uint64 (m,), unique and non-zero; `last_seen_ms` int64 (m,); `values` float64
    (m, V); `tags` uint64 (m, T). With m = 0 the column counts V and T are not read.
    """

    keys: np.ndarray
    last_seen_ms: np.ndarray
    values: np.ndarray
    tags: np.ndarray

    def __post_init__(self) -> None:
        # Rows may come from another process: the kernels index without bounds checks.
        m = self.keys.shape[0] if self.keys.ndim == 1 else -1
        if not (self.keys.dtype == _U64 and self.keys.ndim == 1
                and self.last_seen_ms.dtype == _I64 and self.last_seen_ms.shape == (m,)
                and self.values.dtype == _F64 and self.values.ndim == 2 and self.values.shape[0] == m
                and self.tags.dtype == _U64 and self.tags.ndim == 2 and self.tags.shape[0] == m):
            got = ", ".join(f"{name} {a.dtype} {a.shape}" for name, a in (
                ("keys", self.keys), ("last_seen_ms", self.last_seen_ms), ("values", self.values),
                ("tags", self.tags)))
            raise ValueError(f"StoredRows expects keys uint64 (m,), last_seen_ms int64 (m,), values float64 "
                             f"(m, V) and tags uint64 (m, T); got {got}")

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    @classmethod
    def empty(cls, num_values: int = 0, num_tags: int = 0) -> StoredRows:
        """No rows: what `fetch` returns when the store has none of the keys."""
        return cls(np.empty(0, dtype=np.uint64), np.empty(0, dtype=np.int64),
                   np.empty((0, num_values), dtype=np.float64), np.empty((0, num_tags), dtype=np.uint64))

    @classmethod
    def of_table(cls, table: EntityTable) -> StoredRows:
        """Every entity of `table`, copied out (the table may change afterwards; these rows do not)."""
        occupied = np.flatnonzero(table.keys)
        return cls(table.keys[occupied], table.last_seen_ms[occupied], table.values[occupied],
                   table.tags[occupied])


class StateStore(Protocol):
    """Where entity rows live between batches.

    The contract an implementation (a remote one included) must keep:

    - `fetch(kind, keys)` returns the stored row of every key it holds, each once, in any
      order; keys it does not hold are left out (the engine starts them from zeros). `keys`
      are unique and non-zero. The returned arrays are only read by the caller.
    - `store(kind, rows)` makes those rows the stored state of their keys, replacing
      whatever was there, whole rows at once. The caller does not touch the arrays again,
      so the store may keep them.
    - One writer per key: between a `fetch` of a key and the `store` of its new row nobody
      else writes that key (the engine does a read-modify-write). A store shared by
      writers that can touch the same key must add compare-and-set; this interface does
      not carry versions yet.
    - Atomicity across kinds, and across the calls of one batch, is the caller's: the
      engine fetches everything first and stores only after the kernels succeeded, but a
      crash between two `store` calls leaves the kinds stored so far.
    - Retention (eviction, a TTL on `last_seen_ms`) is the store's: an entity it drops
      simply comes back new, as after an eviction from the local tables.
    """

    def fetch(self, kind: str, keys: np.ndarray, /) -> StoredRows:
        """The stored rows of those of `keys` (uint64, unique, non-zero) the store holds."""
        ...

    def store(self, kind: str, rows: StoredRows, /) -> None:
        """Replace the stored rows of `rows.keys` with `rows`."""
        ...


class VersionedStore(Protocol):
    """A store shared by writers in other processes: reads carry a version per row, writes are
    compare-and-set per row (docs/state-store.md, "A shared store").

    - `fetch_versioned({kind: keys})` returns, per kind asked, the stored rows (as `fetch`) and
      their versions, uint64 aligned with `rows.keys`; a key not held has version 0.
    - `store_if_unchanged({kind: (rows, expected)})` writes each row whose stored version is still
      `expected[i]` (0: the key must be absent), as version expected + 1, and leaves every other
      row unwritten; it returns, per kind, the keys it did not write (empty arrays, or kinds left
      out, when all were written). Each row is checked and written atomically; rows are
      independent (the kernels update an entity's row from its own row and the transaction only),
      so a batch whose rows were partly written is finished by recomputing only the others.
    - Optionally `hold({kind: keys})`: blocks until no other writer can write those rows before
      this one writes them next (or a lease runs out). The engine calls it for the rows a round
      failed to write, before reading them again, so a hot row cannot be lost round after round
      (optimistic first, a hold only on conflict).
    """

    def fetch_versioned(self, wanted: Mapping[str, np.ndarray], /) -> dict[str, tuple[StoredRows, np.ndarray]]:
        ...

    def store_if_unchanged(self, rows: Mapping[str, tuple[StoredRows, np.ndarray]],
                           extra: Sequence[tuple[bytes, bytes]] = (), /) -> dict[str, np.ndarray]:
        """`extra` (key, value) entries, the caller's, are written in the same atomic step only when
        every row of this call was: with the last round of a batch."""
        ...


class LocalStore:
    """An `EntityState` behind the `StateStore` interface.

    `fetch` only reads; `store` claims slots as the kernels do, so it may evict the least
    recently seen entity of a full probe window (counted in the table's `evictions`).
    An engine built on the `EntityState` itself runs the kernels in place instead, which
    is the fast path; this adapter serves the generic path and its tests.
    """

    __slots__ = ("_tables",)

    def __init__(self, state: EntityState) -> None:
        self._tables = {t.kind: t for t in state.tables()}

    def fetch(self, kind: str, keys: np.ndarray, /) -> StoredRows:
        """The rows of those of `keys` that the tables hold (copies)."""
        t = self._table(kind)
        slots = _find_slots(t.keys, np.ascontiguousarray(keys, dtype=np.uint64))
        slots = slots[slots >= 0]
        return StoredRows(t.keys[slots], t.last_seen_ms[slots], t.values[slots], t.tags[slots])

    def store(self, kind: str, rows: StoredRows, /) -> None:
        """Write `rows` into the tables, claiming a slot for each new key."""
        write_rows(self._table(kind), rows)

    def _table(self, kind: str) -> EntityTable:
        try:
            return self._tables[kind]
        except KeyError:
            raise ValueError(f"unknown entity kind {kind!r}; expected one of {', '.join(self._tables)}") from None


def write_rows(table: EntityTable, rows: StoredRows) -> None:
    """Put `rows` into `table`, each in the slot `find_slot` gives its key, with its own `last_seen_ms`.

    Refuses rows of another layout or with key 0 (the empty-slot marker): the kernels index
    the tables without bounds checks.
    """
    if not len(rows):
        return
    layout = (table.values.shape[1], table.tags.shape[1])
    if (rows.values.shape[1], rows.tags.shape[1]) != layout:
        raise ValueError(f"{table.kind} rows have {rows.values.shape[1]} values and {rows.tags.shape[1]} tags, "
                         f"the tables {layout[0]} and {layout[1]}: a store of another feature set?")
    if not rows.keys.all():
        raise ValueError(f"{table.kind} rows include key 0, which marks an empty slot")
    _write_rows(table.keys, table.last_seen_ms, table.counters, table.values, table.tags,
                np.ascontiguousarray(rows.keys), np.ascontiguousarray(rows.last_seen_ms),
                np.ascontiguousarray(rows.values), np.ascontiguousarray(rows.tags))


@njit(nogil=True, cache=True)
def _write_rows(keys: np.ndarray, last_seen: np.ndarray, counters: np.ndarray, values: np.ndarray,
                tags: np.ndarray, row_keys: np.ndarray, row_last_seen: np.ndarray, row_values: np.ndarray,
                row_tags: np.ndarray) -> None:
    for i in range(row_keys.shape[0]):
        s = find_slot(keys, last_seen, counters, row_keys[i], row_last_seen[i])
        j = s - 1 if s > 0 else -s - 1
        # find_slot never moves last_seen backwards; a stored row is taken as it is.
        last_seen[j] = row_last_seen[i]
        values[j, :] = row_values[i, :]
        tags[j, :] = row_tags[i, :]


@njit(nogil=True, cache=True)
def _find_slots(keys: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Slot of each query key, -1 when absent; `find_slot`'s probe sequence, without inserting."""
    mask = np.uint64(keys.shape[0] - 1)
    slots = np.full(query.shape[0], -1, dtype=np.int64)
    for i in range(query.shape[0]):
        key = query[i]
        if key == 0:
            continue
        start = key & mask
        for p in range(MAX_PROBE):
            j = np.intp((start + np.uint64(p)) & mask)
            if keys[j] == key:
                slots[i] = j
                break
            # Slots are never emptied (eviction overwrites), so a key is always before the first empty one.
            if keys[j] == 0:
                break
    return slots


def save_snapshot(state: EntityState, path: Path, *, feature_set_version: str, hasher: KeyHasher,
                  pacer: Pacer | None = None) -> None:
    """Write a snapshot of `state`, whose keys `hasher` made, atomically (temporary file, fsync, rename).

    Stamped with the hasher's scheme and key fingerprint (never the key). With a `pacer`,
    written in slices with pauses between (`core.files.Pacer`).
    """
    arrays: dict[str, Any] = {
        "format": np.array([KEYED_SNAPSHOT_FORMAT]),
        "feature_set_version": np.array([feature_set_version]),
        "key_scheme": np.array([hasher.scheme]),
        "key_fingerprint": np.array([hasher.fingerprint]),
    }
    for t in state.tables():
        for name in _TABLE_ARRAYS:
            arrays[f"{t.kind}.{name}"] = getattr(t, name)
    write_atomically(path, lambda f: write_npz(f, arrays, pacer=pacer))


def load_snapshot(path: Path, *, feature_set_version: str, hasher: KeyHasher) -> EntityState:
    """Read a snapshot written by `save_snapshot` with the same key scheme and key as `hasher`.

    Raises ValueError saying what is wrong when the snapshot is corrupt, from other kernels,
    or keyed otherwise: by an older scheme (format 1, xxh64 keys), another scheme, or another
    FRAUDSCORE_ID_HASH_KEY. Such keys mean nothing to `hasher`; mixed into its state they would
    never match a card again, so the whole snapshot is refused.
    """
    arrays = _read_snapshot(path)  # the format-1 arrays: opened, checked and refused alike
    found_format = arrays["format"].ravel().tolist()
    if found_format == [1]:
        raise ValueError("snapshot format 1 carries no key stamp (written before keyed BLAKE2b, when identifiers "
                         f"were hashed with xxh64): its keys mean nothing to key scheme {hasher.scheme}")
    if found_format != [KEYED_SNAPSHOT_FORMAT]:
        raise ValueError(f"snapshot format {', '.join(map(str, found_format))}, expected {KEYED_SNAPSHOT_FORMAT}")
    scheme, fingerprint = _read_key_stamp(path)
    if scheme != hasher.scheme:
        raise ValueError(f"snapshot keys were made by key scheme {scheme}, this server's are {hasher.scheme}")
    if fingerprint != hasher.fingerprint:
        # Neither fingerprint is said: a log reader could test guessed keys against one.
        raise ValueError("snapshot keys were made with another FRAUDSCORE_ID_HASH_KEY (the key fingerprints "
                         "differ): they mean nothing under this key")
    found = [str(v) for v in arrays["feature_set_version"].ravel().tolist()]
    if found != [feature_set_version]:
        raise ValueError(f"snapshot is for feature set {', '.join(found)}, these kernels are {feature_set_version}")
    return EntityState(**{kind: _checked_table(kind, arrays) for kind in _LAYOUT})


def _read_key_stamp(path: Path) -> tuple[str, str]:
    try:
        with open(path, "rb") as f, np.load(f, allow_pickle=False) as data:
            scheme, fingerprint = data["key_scheme"].ravel().tolist(), data["key_fingerprint"].ravel().tolist()
    except Exception as exc:  # as _read_snapshot: every way damaged bytes fail is one ValueError
        raise ValueError(f"unreadable snapshot key stamp: {exc.__class__.__name__}: {exc}") from exc
    if len(scheme) != 1 or len(fingerprint) != 1:
        raise ValueError("snapshot key stamp is not one scheme and one fingerprint")
    return str(scheme[0]), str(fingerprint[0])
