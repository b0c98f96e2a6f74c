"""The feature engine: one object, one call per batch, the same online and offline.

Built on an `EntityState`, the kernels run in place on the process's own tables (the
fast path). Built on any other `StateStore`, each batch fetches the rows of its entities
into a small working `EntityState`, runs the same kernels there and stores every row
back (docs/state-store.md), so both give the same features.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Generic, TypeVar

import numpy as np

from core.encode import EncodedBatch
from core.errors import StateStoreError
from core.features import kernels
from core.features.registry import NUM_FEATURES
from core.features.state import MAX_PROBE, EntityState, EntityTable
from core.features.store import LocalStore, StateStore, StoredRows, VersionedStore, write_rows

_T = TypeVar("_T")
_KINDS: tuple[str, ...] = tuple(f.name for f in fields(EntityState))
# A working table that evicted is rebuilt 4× larger; keys that still collide after this many
# tries share their low bits far beyond chance (keys are keyed hashes), and no size will do.
_WORKING_TRIES = 4
# Rounds of compare-and-set a batch may take against a shared store before it gives up (its
# answers then come from the fallback, and the transactions are counted in state_errors). Each
# round writes every row nobody else changed meanwhile, so rounds only continue for rows that
# other writers keep changing within one round trip: a merchant in every batch of every process.
CONFLICT_ROUNDS = 8


def _arrays(t: EntityTable) -> tuple[np.ndarray, ...]:
    return (t.keys, t.last_seen_ms, t.counters, t.values, t.tags)


class FeatureEngine:
    """Computes the registry's features for a batch and advances the entity state.

    `state` is an `EntityState` (kernels in place) or any `StateStore` (fetch, work, store
    back per batch; a `LocalStore` takes this path too, which is how its tests check it).
    `working_headroom` sizes the store path's working tables: at least this many slots per
    entity of the batch, so they never need to evict.

    Not thread-safe by design: exactly one thread (the pipeline thread, or the offline
    replay loop) owns an engine and its state, so no locks are needed and every feature
    is deterministic for a given order of events.
    """

    __slots__ = ("_conflicts", "_state", "_store", "_versioned", "_working_headroom")

    def __init__(self, state: EntityState | StateStore | VersionedStore, *, working_headroom: int = 4) -> None:
        if working_headroom < 1:
            raise ValueError(f"working_headroom must be at least 1 slot per entity, got {working_headroom}")
        self._working_headroom = working_headroom
        # `_state` is set when the kernels may work on the tables in place; the hot path tests
        # only that (`is None` is the cheapest branch there is). `_store` is always where the
        # state lives, so the store path needs no None check of its own.
        self._state: EntityState | None = None
        self._store: StateStore | VersionedStore
        self._versioned: VersionedStore | None = None  # set when writes are compare-and-set
        self._conflicts = [0]
        if isinstance(state, EntityState):
            self._state = state
            self._store = LocalStore(state)
        elif callable(getattr(state, "fetch_versioned", None)) and callable(getattr(state, "store_if_unchanged", None)):
            self._store = self._versioned = state  # type: ignore[assignment]  # checked just above
        elif callable(getattr(state, "fetch", None)) and callable(getattr(state, "store", None)):
            self._store = state
        else:
            raise TypeError(f"FeatureEngine needs an EntityState, a StateStore or a VersionedStore, "
                            f"got {type(state).__name__}")

    @property
    def store_conflicts(self) -> int:
        """Rows recomputed because another writer changed them first (a shared store only)."""
        return self._conflicts[0]

    @property
    def state(self) -> EntityState:
        """The in-process tables, for snapshots and metrics.

        Only an engine built on an `EntityState` has them; on another store this raises
        AttributeError (so `hasattr(engine, "state")` is false): its state, snapshots and
        retention are that store's.
        """
        if self._state is None:
            raise AttributeError(f"this FeatureEngine keeps its state in a {type(self._store).__name__}, "
                                 "not in process; snapshots and table metrics belong to that store")
        return self._state

    def compute(self, batch: EncodedBatch, *, out: np.ndarray | None = None) -> np.ndarray:
        """Features of every transaction, as of its moment, in registry order: float64 (n, NUM_FEATURES).

        `out`, when given, receives them (a C-contiguous float64 array of that shape, such as
        a row range of a whole history's matrix) and is returned, saving a copy.
        """
        s = self._state
        if s is None:
            features = self._compute_through_store(batch)
            if out is None:
                return features
            out[...] = features
            return out
        if out is None:
            out = np.empty((len(batch), NUM_FEATURES), dtype=np.float64)
        elif out.shape != (len(batch), NUM_FEATURES) or out.dtype != np.float64 or not out.flags.c_contiguous:
            # The kernels write without bounds checks: a wrong `out` must never reach them.
            raise ValueError(f"out must be C-contiguous float64 of shape {(len(batch), NUM_FEATURES)}, "
                             f"got {out.dtype} {out.shape}")
        kernels.compute_features(  # type: ignore[call-arg, unused-ignore]
            batch.card_key, batch.customer_key, batch.merchant_key, batch.device_key, batch.ip_key,
            batch.amount, batch.event_time_ms, batch.channel, batch.merchant_category, batch.country,
            batch.latitude, batch.longitude,
            *_arrays(s.card), *_arrays(s.merchant), *_arrays(s.customer), *_arrays(s.device), *_arrays(s.ip),
            out,
        )
        return out

    def apply_outcomes(self, card_key: np.ndarray, merchant_key: np.ndarray,
                       reported_time_ms: np.ndarray, fraud_weight: np.ndarray) -> None:
        """Feed outcome reports (fraud_weight 1.0 for fraud or chargeback, 0.0 for legitimate)."""
        s = self._state
        if s is None:
            self._apply_outcomes_through_store(card_key, merchant_key, reported_time_ms, fraud_weight)
            return
        kernels.apply_outcomes(
            np.ascontiguousarray(card_key, dtype=np.uint64), np.ascontiguousarray(merchant_key, dtype=np.uint64),
            np.ascontiguousarray(reported_time_ms, dtype=np.int64), np.ascontiguousarray(fraud_weight, dtype=np.float64),
            *_arrays(s.card), *_arrays(s.merchant),
        )

    # The store paths live in their own methods: a closure over the fast paths' arguments
    # would turn them into cell variables and cost those paths ~30 ns a call.

    def _compute_through_store(self, batch: EncodedBatch) -> np.ndarray:
        keys = {"card": batch.card_key, "merchant": batch.merchant_key, "customer": batch.customer_key,
                "device": batch.device_key, "ip": batch.ip_key}
        return self._through(keys, lambda working: FeatureEngine(working).compute(batch))

    def _apply_outcomes_through_store(self, card_key: np.ndarray, merchant_key: np.ndarray,
                                      reported_time_ms: np.ndarray, fraud_weight: np.ndarray) -> None:
        keys = {"card": np.asarray(card_key, dtype=np.uint64), "merchant": np.asarray(merchant_key, dtype=np.uint64)}
        self._through(keys, lambda working: FeatureEngine(working).apply_outcomes(
            card_key, merchant_key, reported_time_ms, fraud_weight))

    @property
    def deferrable(self) -> bool:
        """Whether `compute_deferred` applies: the state is in a shared (versioned) store."""
        return self._versioned is not None

    def compute_deferred(self, batch: EncodedBatch) -> tuple[np.ndarray, Callable[[Sequence[tuple[bytes, bytes]]],
                                                                                 np.ndarray]]:
        """Features as `compute` gives them, and the function that then writes the batch into the
        shared store together with `extra` (key, value) entries of the caller's (its answers'
        records), in one call when no other writer got in between (`_commit`); it returns the
        features of the round that wrote (those of the first, unless another writer got in)."""
        store = self._versioned
        if store is None:
            raise TypeError("compute_deferred needs a shared (versioned) store; use compute")
        keys = {"card": batch.card_key, "merchant": batch.merchant_key, "customer": batch.customer_key,
                "device": batch.device_key, "ip": batch.ip_key}
        prepared = _prepare(store, keys, lambda working: FeatureEngine(working).compute(batch), self._working_headroom)
        conflicts = self._conflicts
        return prepared.result, lambda extra: _commit(store, prepared, conflicts=conflicts, extra=extra)

    def _through(self, keys: Mapping[str, np.ndarray], run: Callable[[EntityState], _T]) -> _T:
        if self._versioned is not None:
            return _through_versioned_store(self._versioned, keys, run, headroom=self._working_headroom,
                                            conflicts=self._conflicts)
        return _through_store(self._store, keys, run, headroom=self._working_headroom)  # type: ignore[arg-type]


def _through_store(store: StateStore, batch_keys: Mapping[str, np.ndarray], run: Callable[[EntityState], _T], *,
                   headroom: int) -> _T:
    """Fetch the batch's entities from `store`, `run` the kernels on a working copy, store every row back."""
    wanted = _wanted(batch_keys)
    fetched = {kind: _checked(kind, store.fetch(kind, keys), keys) for kind, keys in wanted.items()}
    working, result = _run_working(wanted, fetched, run, headroom)
    for t in working.tables():
        if t.kind in wanted:
            store.store(t.kind, StoredRows.of_table(t))
    return result


def _through_versioned_store(store: VersionedStore, batch_keys: Mapping[str, np.ndarray],
                             run: Callable[[EntityState], _T], *, headroom: int, conflicts: list[int]) -> _T:
    """As `_through_store`, with compare-and-set: rows another writer changed since they were read
    are read again and the batch recomputed, and only those rows written, until none is left.
    (`_prepare`, then `_commit`: a caller may do its own work in between, `compute_deferred`.)"""
    return _commit(store, _prepare(store, batch_keys, run, headroom), conflicts=conflicts)


@dataclass(slots=True)
class _Prepared(Generic[_T]):
    """A batch read and computed on a working copy, nothing written yet."""

    wanted: dict[str, np.ndarray]
    fetched: dict[str, tuple[StoredRows, np.ndarray]]
    run: Callable[[EntityState], _T]
    headroom: int
    working: EntityState
    result: _T


def _prepare(store: VersionedStore, batch_keys: Mapping[str, np.ndarray], run: Callable[[EntityState], _T],
             headroom: int) -> _Prepared[_T]:
    wanted = _wanted(batch_keys)
    fetched = _checked_versioned(store.fetch_versioned(wanted), wanted)
    working, result = _run_working(wanted, {kind: rows for kind, (rows, _) in fetched.items()}, run, headroom)
    return _Prepared(wanted, fetched, run, headroom, working, result)


def _commit(store: VersionedStore, prepared: _Prepared[_T], *, conflicts: list[int],
            extra: Sequence[tuple[bytes, bytes]] = ()) -> _T:
    """Write a prepared batch's rows by compare-and-set, with `extra` (key, value) entries written
    in the same call as the round that leaves no row unwritten.

    Each round writes every row whose version still matches; the others' new values were computed
    from stale rows, so they are fetched afresh, the kernels run on the batch again (the rows
    already written go in as they were read, and come out as they were written: each row depends
    only on itself and the batch), and only those are offered again. The result is the last
    round's. `conflicts[0]` counts the rows that had to be recomputed.
    """
    wanted, fetched, working, result = prepared.wanted, prepared.fetched, prepared.working, prepared.result
    pending = wanted
    for _ in range(CONFLICT_ROUNDS):
        offered = {}
        for t in working.tables():
            if t.kind in pending:
                rows = StoredRows.of_table(t)  # the first round offers every row of the batch
                rows = rows if pending is wanted else _only(rows, pending[t.kind])
                offered[t.kind] = (rows, _versions_of(rows.keys, *fetched[t.kind]))
        written = store.store_if_unchanged(offered, extra) if extra else store.store_if_unchanged(offered)
        left = {kind: np.unique(keys) for kind, keys in written.items() if len(keys)}
        if not left:
            return result
        conflicts[0] += sum(len(keys) for keys in left.values())
        hold = getattr(store, "hold", None)
        if hold is not None:  # so that the next round cannot lose these rows again
            hold(left)
        fresh = _checked_versioned(store.fetch_versioned(left), left)
        for kind, keys in left.items():
            fetched[kind] = _merged(fetched[kind], keys, fresh[kind])
        pending = left
        working, result = _run_working(wanted, {kind: rows for kind, (rows, _) in fetched.items()}, prepared.run,
                                       prepared.headroom)
    raise StateStoreError(", ".join(pending), f"rows kept changing under this batch through {CONFLICT_ROUNDS} "
                          "rounds of compare-and-set; is one entity far hotter than the rest?")


def _wanted(batch_keys: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each kind's distinct non-zero keys, sorted; kinds with none left out."""
    wanted = {kind: _unique_keys(keys) for kind, keys in batch_keys.items()}
    return {kind: keys for kind, keys in wanted.items() if keys.size}


def _run_working(wanted: Mapping[str, np.ndarray], fetched: Mapping[str, StoredRows],
                 run: Callable[[EntityState], _T], headroom: int) -> tuple[EntityState, _T]:
    """`run` on working tables holding `fetched`, `headroom` slots per wanted entity.

    The working tables must not evict (an evicted row would be lost to the store); if one did,
    the batch runs again on 4× larger ones (nothing was stored yet, so that is safe).
    """
    for _ in range(_WORKING_TRIES):
        working = _working_state(wanted, fetched, headroom)
        result = run(working)
        crowded = [t.kind for t in working.tables() if t.evictions]
        if not crowded:
            return working, result
        headroom *= 4
    raise StateStoreError(", ".join(crowded), f"the batch's keys collide in working tables of up to "
                          f"{headroom // 4}× their number of slots; are the keys hashed?")


def _only(rows: StoredRows, keys: np.ndarray) -> StoredRows:
    """The rows of `keys` (sorted) among `rows`."""
    keep = np.isin(rows.keys, keys, assume_unique=True)
    return StoredRows(rows.keys[keep], rows.last_seen_ms[keep], rows.values[keep], rows.tags[keep])


def _versions_of(keys: np.ndarray, fetched: StoredRows, versions: np.ndarray) -> np.ndarray:
    """The version read for each of `keys`: its fetched row's, 0 where none was fetched (a new entity)."""
    out = np.zeros(keys.shape[0], dtype=np.uint64)
    if len(fetched):
        order = np.argsort(fetched.keys)
        at = np.minimum(np.searchsorted(fetched.keys, keys, sorter=order), len(fetched) - 1)
        found = fetched.keys[order[at]] == keys
        out[found] = versions[order[at[found]]]
    return out


def _merged(old: tuple[StoredRows, np.ndarray], keys: np.ndarray,
            fresh: tuple[StoredRows, np.ndarray]) -> tuple[StoredRows, np.ndarray]:
    """`old` with the rows of `keys` replaced by what `fresh` holds of them (dropped where it holds none)."""
    rows, versions = old
    new_rows, new_versions = fresh
    keep = ~np.isin(rows.keys, keys, assume_unique=True)
    if not keep.any():  # (an empty side may be StoredRows.empty(), whose column counts mean nothing)
        return fresh
    kept = StoredRows(rows.keys[keep], rows.last_seen_ms[keep], rows.values[keep], rows.tags[keep])
    if not len(new_rows):
        return kept, versions[keep]
    merged = StoredRows(*(np.concatenate([getattr(kept, name), getattr(new_rows, name)])
                          for name in ("keys", "last_seen_ms", "values", "tags")))
    return merged, np.concatenate([versions[keep], new_versions])


def _checked_versioned(got: object, asked: Mapping[str, np.ndarray]) -> dict[str, tuple[StoredRows, np.ndarray]]:
    """What `fetch_versioned` returned, checked as `_checked` checks a `fetch`, versions aligned with rows."""
    if not isinstance(got, dict) or set(got) != set(asked):
        raise StateStoreError(", ".join(asked), "fetch_versioned did not return exactly the kinds asked for")
    out = {}
    for kind, keys in asked.items():
        rows, versions = got[kind]
        rows = _checked(kind, rows, keys)
        if not (isinstance(versions, np.ndarray) and versions.dtype == np.uint64 and versions.shape == (len(rows),)):
            raise StateStoreError(kind, "fetch_versioned returned versions that are not uint64, one per row")
        if len(rows) and not versions.all():
            raise StateStoreError(kind, "fetch_versioned returned version 0 for a stored row")
        out[kind] = (rows, versions)
    return out


def _unique_keys(keys: np.ndarray) -> np.ndarray:
    unique = np.unique(keys)
    return unique[1:] if unique.size and unique[0] == 0 else unique


def _capacity(entities: int) -> int:
    return max(MAX_PROBE, 1 << max(entities - 1, 0).bit_length())


def _checked(kind: str, rows: object, asked: np.ndarray) -> StoredRows:
    """`rows` if they are StoredRows of keys among `asked` (sorted, as np.unique gives them)."""
    if not isinstance(rows, StoredRows):
        raise StateStoreError(kind, f"fetch returned {type(rows).__name__}, expected StoredRows")
    at = np.searchsorted(asked, rows.keys)
    if len(rows) and (at.max() >= asked.size or (asked[at] != rows.keys).any()):
        raise StateStoreError(kind, "fetch returned keys it was not asked for")
    return rows


def _working_state(wanted: Mapping[str, np.ndarray], fetched: Mapping[str, StoredRows],
                   headroom: int) -> EntityState:
    """Tables sized for `headroom` slots per wanted entity, holding the fetched rows."""
    capacities = {f"{kind}_capacity": _capacity(headroom * wanted[kind].size if kind in wanted else 0)
                  for kind in _KINDS}
    working = EntityState.empty(**capacities)
    for t in working.tables():
        if t.kind in fetched:
            rows = fetched[t.kind]
            try:
                write_rows(t, rows)
            except ValueError as exc:
                raise StateStoreError(t.kind, str(exc)) from None
            if t.counters[0] != len(rows):  # each new key is one insert; a repeated key is not
                raise StateStoreError(t.kind, "fetch returned a key twice")
    return working
