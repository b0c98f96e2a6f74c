"""core.features.store: the generic store path gives the local path's features and rows, bit for bit.

`DictStore` below stands in for a remote store: plain dicts per kind, rows copied in and
out as a network round trip would, and the interface contract checked on every call.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.encode import KeyHasher
from core.errors import StateStoreError
from core.features import FEATURE_SET_VERSION, NUM_FEATURES, EntityState, FeatureEngine, kernels
from core.features.state import EntityTable
from core.features.store import (
    KEYED_SNAPSHOT_FORMAT,
    LocalStore,
    StateStore,
    StoredRows,
    load_snapshot,
    save_snapshot,
)
from tests.core.features.test_features import (
    Report,
    Txn,
    assert_same_state,
    busy_state,
    encode,
    event_streams,
    rewrite,
    run_engine,
)

Event = Txn | Report
BASE_MS = 1_767_225_600_000
_HASHER = KeyHasher(b"test_store")
KEYS = {kind: [_HASHER.key(f"{kind}-{i}") for i in range(3)] for kind in ("card", "merchant", "device")}
Rows = dict[str, dict[int, tuple[int, bytes, bytes]]]  # kind → key → (last_seen_ms, values, tags)


class DictStore:
    """A `StateStore` of Python dicts that checks the caller keeps the contract."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[int, tuple[int, np.ndarray, np.ndarray]]] = defaultdict(dict)
        self.calls: list[tuple[str, str]] = []  # (fetch or store, kind)

    def fetch(self, kind: str, keys: np.ndarray, /) -> StoredRows:
        assert keys.dtype == np.uint64 and keys.ndim == 1
        assert keys.all() and np.unique(keys).size == keys.size, "keys must be unique and non-zero"
        self.calls.append(("fetch", kind))
        found = [int(k) for k in keys if int(k) in self.rows[kind]]
        if not found:
            return StoredRows.empty()
        rows = [self.rows[kind][k] for k in found]
        return StoredRows(np.array(found, dtype=np.uint64), np.array([r[0] for r in rows], dtype=np.int64),
                          np.stack([r[1] for r in rows]), np.stack([r[2] for r in rows]))

    def store(self, kind: str, rows: StoredRows, /) -> None:
        assert rows.keys.all() and np.unique(rows.keys).size == len(rows), "rows must have unique non-zero keys"
        self.calls.append(("store", kind))
        for i, key in enumerate(rows.keys.tolist()):
            self.rows[kind][key] = (int(rows.last_seen_ms[i]), rows.values[i].copy(), rows.tags[i].copy())

    def snapshot(self) -> Rows:
        return {kind: {k: (t, v.tobytes(), g.tobytes()) for k, (t, v, g) in rows.items()}
                for kind, rows in self.rows.items() if rows}


def table_rows(state: EntityState) -> Rows:
    """Every entity of the local tables, by kind and key (slots do not matter, rows do)."""
    out: Rows = {}
    for t in state.tables():
        rows = StoredRows.of_table(t)
        if len(rows):
            out[t.kind] = {int(k): (int(rows.last_seen_ms[i]), rows.values[i].tobytes(), rows.tags[i].tobytes())
                           for i, k in enumerate(rows.keys)}
    return out


def small_state(capacity: int = 1024) -> EntityState:
    return EntityState.empty(card_capacity=capacity, merchant_capacity=capacity, customer_capacity=capacity,
                             device_capacity=capacity, ip_capacity=capacity)


def assert_bitwise_equal(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype
    assert a.tobytes() == b.tobytes()


StoreFactory = Callable[[], tuple[StateStore, Callable[[], Rows]]]


def dict_store() -> tuple[StateStore, Callable[[], Rows]]:
    store = DictStore()
    return store, store.snapshot


def local_store() -> tuple[StateStore, Callable[[], Rows]]:
    state = small_state()
    return LocalStore(state), lambda: table_rows(state)


STORES = pytest.mark.parametrize("make_store", [dict_store, local_store], ids=["dict", "local"])


# --------------------------------------------------------------------------- the generic path against the local


@settings(max_examples=200, deadline=None)
@given(events=event_streams(), seed=st.integers(0, 2**16), use_dict=st.booleans())
def test_store_path_matches_local_path_on_random_streams(events: list[Event], seed: int, use_dict: bool) -> None:
    expected, local = run_engine(events, seed=seed)
    assert all(t.evictions == 0 for t in local.state.tables())  # else the paths may rightly differ
    store, rows = dict_store() if use_dict else local_store()
    actual, _ = run_engine(events, seed=seed, engine=FeatureEngine(store))
    assert_bitwise_equal(actual, expected)
    assert rows() == table_rows(local.state)


@STORES
def test_repeated_keys_in_one_batch_see_each_other_and_are_stored_once(make_store: StoreFactory) -> None:
    card, merchant, device = KEYS["card"][0], KEYS["merchant"][0], KEYS["device"][0]
    txns = [Txn(card, merchant, BASE_MS + i * 60_000, amount=10.0 + i, device=device) for i in range(5)]
    txns.append(Txn(KEYS["card"][1], merchant, BASE_MS + 400_000, device=device))
    store, rows = make_store()
    local = FeatureEngine(small_state())
    engine = FeatureEngine(store)
    for engine_ in (local, engine):
        engine_.apply_outcomes(np.array([card, card], dtype=np.uint64), np.array([merchant, 0], dtype=np.uint64),
                               np.array([BASE_MS - 1, BASE_MS - 2], dtype=np.int64), np.ones(2))
    assert_bitwise_equal(engine.compute(encode(txns)), local.compute(encode(txns)))
    assert rows() == table_rows(local.state)
    assert len(rows()["card"]) == 2 and len(rows()["device"]) == 1


@STORES
def test_empty_batch_touches_no_store(make_store: StoreFactory) -> None:
    store, rows = make_store()
    engine = FeatureEngine(store)
    out = engine.compute(encode([]))
    assert out.shape == (0, NUM_FEATURES) and out.dtype == np.float64
    empty_u64 = np.empty(0, dtype=np.uint64)
    engine.apply_outcomes(empty_u64, empty_u64, np.empty(0, dtype=np.int64), np.empty(0))
    assert rows() == {}
    if isinstance(store, DictStore):
        assert store.calls == []


def test_unknown_keys_are_neither_fetched_nor_stored() -> None:
    store = DictStore()
    engine = FeatureEngine(store)
    engine.compute(encode([Txn(KEYS["card"][0], 0, BASE_MS)]))  # no merchant, customer, device or IP
    assert store.calls == [("fetch", "card"), ("store", "card")]
    engine.apply_outcomes(np.array([0], dtype=np.uint64), np.array([KEYS["merchant"][0]], dtype=np.uint64),
                          np.array([BASE_MS], dtype=np.int64), np.ones(1))
    assert store.calls[2:] == [("fetch", "merchant"), ("store", "merchant")]  # outcomes touch card and merchant


# --------------------------------------------------------------------------- working tables never evict


def colliding_cards(n: int, low_bits: int) -> list[int]:
    """`n` card keys whose lowest `low_bits` bits are all zero: one start slot in any table of ≤ 2**low_bits."""
    return [i << low_bits for i in range(1, n + 1)]


def test_a_crowded_working_table_is_rebuilt_larger_before_anything_is_stored() -> None:
    cards = colliding_cards(17, 5)  # 17 entities at headroom 1: a table of 32 slots, every key starting at slot 0
    probe = EntityTable.empty("card", 32, 1, 0)
    for key in cards:
        kernels.find_slot(probe.keys, probe.last_seen_ms, probe.counters, np.uint64(key), np.int64(BASE_MS))
    assert probe.evictions == 1  # so the first try must evict, and only a retry keeps all 17 cards

    events: list[Event] = [Txn(c, KEYS["merchant"][0], BASE_MS + i) for i, c in enumerate(cards)]
    events += [Report(cards[0], 0, BASE_MS + 100)]
    events += [Txn(c, KEYS["merchant"][1], BASE_MS + 200 + i) for i, c in enumerate(reversed(cards))]
    expected, local = run_engine(events, batch=len(cards))
    store = DictStore()
    actual, _ = run_engine(events, batch=len(cards), engine=FeatureEngine(store, working_headroom=1))
    assert_bitwise_equal(actual, expected)
    assert store.snapshot() == table_rows(local.state)
    assert len(store.rows["card"]) == 17


def test_keys_that_collide_at_every_size_are_refused_and_nothing_is_stored() -> None:
    store = DictStore()
    engine = FeatureEngine(store, working_headroom=1)
    txns = [Txn(c, KEYS["merchant"][0], BASE_MS) for c in colliding_cards(17, 40)]
    with pytest.raises(StateStoreError, match="collide") as caught:
        engine.compute(encode(txns))
    assert caught.value.kind == "card"
    assert not any(op == "store" for op, _ in store.calls)


def test_working_headroom_must_be_at_least_one() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        FeatureEngine(DictStore(), working_headroom=0)


# --------------------------------------------------------------------------- the interface and its adapter


@STORES
def test_fetch_returns_only_the_keys_the_store_holds(make_store: StoreFactory) -> None:
    store, _ = make_store()
    nothing = store.fetch("card", np.array(KEYS["card"][:3], dtype=np.uint64))
    assert len(nothing) == 0
    engine = FeatureEngine(store)
    engine.compute(encode([Txn(KEYS["card"][1], KEYS["merchant"][0], BASE_MS, amount=5.0)]))
    some = store.fetch("card", np.array(KEYS["card"][:3], dtype=np.uint64))
    assert some.keys.tolist() == [KEYS["card"][1]] and some.last_seen_ms.tolist() == [BASE_MS]
    assert len(store.fetch("card", np.empty(0, dtype=np.uint64))) == 0


def test_local_store_round_trips_rows_and_replaces_them_whole() -> None:
    state = small_state()
    store = LocalStore(state)
    v, t = state.card.values.shape[1], state.card.tags.shape[1]
    keys = np.array(KEYS["card"][:2], dtype=np.uint64)
    first = StoredRows(keys, np.array([5, 6], dtype=np.int64), np.arange(2.0 * v).reshape(2, v),
                       np.arange(2 * t, dtype=np.uint64).reshape(2, t))
    store.store("card", first)
    again = StoredRows(keys[:1], np.array([3], dtype=np.int64), np.full((1, v), 7.0), np.ones((1, t), np.uint64))
    store.store("card", again)  # an older last_seen_ms too: the store takes the row as it is
    got = store.fetch("card", keys[::-1].copy())
    order = np.argsort(got.keys)
    assert got.keys[order].tolist() == sorted(keys.tolist())
    by_key = {int(k): i for i, k in enumerate(got.keys)}
    i0, i1 = by_key[int(keys[0])], by_key[int(keys[1])]
    assert got.last_seen_ms[i0] == 3 and got.last_seen_ms[i1] == 6
    assert_bitwise_equal(got.values[i0], again.values[0])
    assert_bitwise_equal(got.values[i1], first.values[1])
    assert_bitwise_equal(got.tags[i1], first.tags[1])
    assert state.card.counters.tolist() == [2, 0]


def test_local_store_refuses_key_zero_another_layout_and_unknown_kinds() -> None:
    state = small_state()
    store = LocalStore(state)
    v, t = state.card.values.shape[1], state.card.tags.shape[1]
    with pytest.raises(ValueError, match="key 0"):
        store.store("card", StoredRows(np.zeros(1, np.uint64), np.zeros(1, np.int64), np.zeros((1, v)),
                                       np.zeros((1, t), np.uint64)))
    with pytest.raises(ValueError, match="another feature set"):
        store.store("card", StoredRows(np.ones(1, np.uint64), np.zeros(1, np.int64), np.zeros((1, v + 1)),
                                       np.zeros((1, t), np.uint64)))
    with pytest.raises(ValueError, match="unknown entity kind"):
        store.fetch("issuer", np.ones(1, np.uint64))
    assert state.card.occupancy() == 0


def test_stored_rows_refuse_mismatched_arrays() -> None:
    with pytest.raises(ValueError, match=r"got keys uint64 \(2,\), last_seen_ms int64 \(1,\)"):
        StoredRows(np.ones(2, np.uint64), np.zeros(1, np.int64), np.zeros((2, 1)), np.zeros((2, 0), np.uint64))
    with pytest.raises(ValueError, match=r"values float32 \(2, 1\)"):
        StoredRows(np.ones(2, np.uint64), np.zeros(2, np.int64), np.zeros((2, 1), np.float32),
                   np.zeros((2, 0), np.uint64))
    with pytest.raises(ValueError, match=r"got keys uint64 \(\)"):
        StoredRows(np.ones((), np.uint64), np.zeros(1, np.int64), np.zeros((1, 1)),
                   np.zeros((1, 0), np.uint64))


class LyingStore(DictStore):
    """Returns a row for a key nobody asked for, or one row twice."""

    def __init__(self, lie: str) -> None:
        super().__init__()
        self.lie = lie

    def fetch(self, kind: str, keys: np.ndarray, /) -> StoredRows:
        r = super().fetch(kind, keys)
        if self.lie == "other key":
            return StoredRows(r.keys + np.uint64(1), r.last_seen_ms, r.values, r.tags)
        twice = np.r_[np.arange(len(r)), np.arange(len(r))]
        return StoredRows(r.keys[twice], r.last_seen_ms[twice], r.values[twice], r.tags[twice])


@pytest.mark.parametrize(("lie", "message"), [("other key", "not asked for"), ("twice", "a key twice")])
def test_rows_a_store_should_not_have_returned_are_refused_before_anything_is_stored(lie: str, message: str) -> None:
    store = LyingStore(lie)
    engine = FeatureEngine(store)
    txn = Txn(KEYS["card"][0], 0, BASE_MS)
    engine.compute(encode([txn]))
    before = store.snapshot()
    with pytest.raises(StateStoreError, match=message):
        engine.compute(encode([txn]))
    assert store.snapshot() == before


def test_an_engine_on_a_store_has_no_in_process_state() -> None:
    engine = FeatureEngine(DictStore())
    assert not hasattr(engine, "state")
    with pytest.raises(AttributeError, match="DictStore"):
        engine.state  # noqa: B018
    state = small_state()
    assert FeatureEngine(state).state is state
    with pytest.raises(TypeError, match="EntityState, a StateStore or a VersionedStore"):
        FeatureEngine(object())  # type: ignore[arg-type]


# --------------------------------------------------------------------------- keyed snapshots


@pytest.fixture
def keyed_snapshot(tmp_path: Path) -> tuple[Path, EntityState]:
    engine, events = busy_state()
    run_engine(events, engine=engine)
    path = tmp_path / "state.npz"
    save_snapshot(engine.state, path, feature_set_version=FEATURE_SET_VERSION, hasher=_HASHER)
    return path, engine.state


def test_keyed_snapshot_round_trips(keyed_snapshot: tuple[Path, EntityState]) -> None:
    path, state = keyed_snapshot
    restored = load_snapshot(path, feature_set_version=FEATURE_SET_VERSION, hasher=KeyHasher(b"test_store"))
    assert_same_state(restored, state)
    with np.load(path) as data:  # a fingerprint, never the key
        assert data["key_fingerprint"].tolist() == [_HASHER.fingerprint]
        assert b"test_store" not in b"".join(data[name].tobytes() for name in data.files)


def test_snapshot_made_with_another_key_is_refused(keyed_snapshot: tuple[Path, EntityState]) -> None:
    other = KeyHasher(b"another-key-0123456789")
    with pytest.raises(ValueError, match="another FRAUDSCORE_ID_HASH_KEY") as refused:
        load_snapshot(keyed_snapshot[0], feature_set_version=FEATURE_SET_VERSION, hasher=other)
    # Neither fingerprint is in the message (a log reader could test guessed keys against one).
    assert other.fingerprint not in str(refused.value) and _HASHER.fingerprint not in str(refused.value)


def test_snapshot_of_another_key_scheme_is_refused(keyed_snapshot: tuple[Path, EntityState]) -> None:
    path = keyed_snapshot[0]
    rewrite(path, key_scheme=np.array(["sha3-64"]))
    with pytest.raises(ValueError, match="key scheme sha3-64, this server's are blake2b-64"):
        load_snapshot(path, feature_set_version=FEATURE_SET_VERSION, hasher=_HASHER)
    rewrite(path, drop="key_scheme")
    with pytest.raises(ValueError, match="unreadable snapshot key stamp"):
        load_snapshot(path, feature_set_version=FEATURE_SET_VERSION, hasher=_HASHER)


def test_unstamped_format_1_snapshot_is_refused_as_xxh64_keyed(tmp_path: Path) -> None:
    # What every snapshot before keyed BLAKE2b is: xxh64 keys that would never match again.
    engine, events = busy_state()
    run_engine(events, engine=engine)
    path = tmp_path / "state.npz"
    engine.state.save(path, feature_set_version=FEATURE_SET_VERSION)
    with pytest.raises(ValueError, match=r"format 1 carries no key stamp .*xxh64"):
        load_snapshot(path, feature_set_version=FEATURE_SET_VERSION, hasher=_HASHER)


def test_keyed_snapshot_is_refused_by_a_format_1_reader(keyed_snapshot: tuple[Path, EntityState]) -> None:
    # A rollback to a build that hashed with xxh64 must not take these keys for its own.
    with pytest.raises(ValueError, match=f"format {KEYED_SNAPSHOT_FORMAT}, expected 1"):
        EntityState.load(keyed_snapshot[0], feature_set_version=FEATURE_SET_VERSION)


def test_keyed_snapshot_of_another_feature_set_or_damaged_is_refused(
        keyed_snapshot: tuple[Path, EntityState]) -> None:
    path = keyed_snapshot[0]
    with pytest.raises(ValueError, match="feature set"):
        load_snapshot(path, feature_set_version="fs-000000000000", hasher=_HASHER)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="unreadable snapshot"):
        load_snapshot(path, feature_set_version=FEATURE_SET_VERSION, hasher=_HASHER)
