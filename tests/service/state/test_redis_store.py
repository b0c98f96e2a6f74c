"""service.state.redis_store against a real redis-server (tests/redis_server.py): rows round-trip bit
for bit, compare-and-set per row, TTLs, namespaces, and the feature engine on it — the local path's
features exactly, and no update lost to writers in other processes."""

from __future__ import annotations

import itertools
import multiprocessing
from collections.abc import Sequence

import numpy as np
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.errors import StateStoreError
from core.features import FEATURE_SET_VERSION, EntityState, FeatureEngine
from core.features.registry import FEATURE_NAMES
from core.features.store import ROW_LAYOUT, StoredRows
from service.bench.redis_server import RedisCluster, RedisServer
from service.state.redis_nodes import Cluster, Standalone
from service.state.redis_store import DEFAULT_TTL_S, RedisStore, namespace_for, open_redis_store
from tests.core.features.test_features import Report, Txn, encode, event_streams, run_engine
from tests.core.features.test_store import KEYS, assert_bitwise_equal, small_state, table_rows

Event = Txn | Report
_namespaces = itertools.count()
BASE_MS = 1_767_225_600_000


class Backend:
    """One standalone redis-server or the 3-master Cluster, as the tests below see either."""

    def __init__(self, server: RedisServer | RedisCluster) -> None:
        self.server = server
        self.url = server.url

    def nodes(self) -> Standalone | Cluster:
        if isinstance(self.server, RedisServer):
            return Standalone(self.server.client())
        return Cluster([("127.0.0.1", node.port) for node in self.server.nodes], socket_timeout=5)

    def client_for(self, key: bytes) -> redis.Redis:
        """A client of the node holding `key`."""
        return self.server.client() if isinstance(self.server, RedisServer) else self.server.node_of(key).client()

    def clients(self) -> list[redis.Redis]:
        return [self.server.client()] if isinstance(self.server, RedisServer) else [
            node.client() for node in self.server.nodes]


@pytest.fixture(params=["standalone", "cluster"])
def backend(request: pytest.FixtureRequest) -> Backend:
    return Backend(request.getfixturevalue("redis_server" if request.param == "standalone" else "redis_cluster"))


def fresh_store(server: RedisServer | Backend, **kw: float) -> RedisStore:
    """A store in a namespace no other test uses."""
    nodes = server.nodes() if isinstance(server, Backend) else Standalone(server.client())
    return RedisStore(nodes, namespace=f"test{next(_namespaces)}:".encode(), **kw)


def rows_of(kind: str, keys: Sequence[int], seed: int) -> StoredRows:
    rng = np.random.default_rng(seed)
    v, t = ROW_LAYOUT[kind]
    values = rng.standard_normal((len(keys), v))
    values.flat[:4] = [np.nan, -0.0, 5e-324, np.inf][: values.size]  # NaN, a negative zero, a subnormal
    return StoredRows(np.array(keys, dtype=np.uint64), rng.integers(0, 2**62, len(keys), dtype=np.int64),
                      values, rng.integers(0, 2**64 - 1, (len(keys), t), dtype=np.uint64, endpoint=True))


def test_rows_round_trip_bit_for_bit_and_count_versions(backend: Backend) -> None:
    store = fresh_store(backend)
    cards, merchants = rows_of("card", [11, 12, 13], 1), rows_of("merchant", [21], 2)
    zero = np.zeros(3, dtype=np.uint64)
    assert store.store_if_unchanged({"card": (cards, zero), "merchant": (merchants, zero[:1])}) == {}
    got = store.fetch_versioned({"card": np.array([11, 12, 13, 14], dtype=np.uint64),
                                 "merchant": np.array([21], dtype=np.uint64)})
    rows, versions = got["card"]
    assert rows.keys.tolist() == [11, 12, 13] and versions.tolist() == [1, 1, 1]  # 14 is not held
    for name in ("last_seen_ms", "values", "tags"):
        assert_bitwise_equal(getattr(rows, name), getattr(cards, name))
    assert_bitwise_equal(got["merchant"][0].values, merchants.values)
    again = rows_of("card", [11, 12, 13], 3)
    assert store.store_if_unchanged({"card": (again, versions)}) == {}
    assert store.fetch_versioned({"card": np.array([12], dtype=np.uint64)})["card"][1].tolist() == [2]


def test_a_row_changed_since_it_was_read_is_not_written_and_the_others_are(backend: Backend) -> None:
    store = fresh_store(backend)
    keys = np.array([1, 2, 3], dtype=np.uint64)
    store.store_if_unchanged({"card": (rows_of("card", [1, 2, 3], 1), np.zeros(3, dtype=np.uint64))})
    _, read = store.fetch_versioned({"card": keys})["card"]
    # Another writer changes card 2 after our read.
    store.store_if_unchanged({"card": (rows_of("card", [2], 7), read[1:2])})
    ours = rows_of("card", [1, 2, 3], 9)
    assert store.store_if_unchanged({"card": (ours, read)})["card"].tolist() == [2]
    rows, versions = store.fetch_versioned({"card": keys})["card"]
    assert versions.tolist() == [2, 2, 2]
    assert_bitwise_equal(rows.values[[0, 2]], ours.values[[0, 2]])
    assert_bitwise_equal(rows.values[1:2], rows_of("card", [2], 7).values)  # the other writer's, kept
    # A key written as new (expected version 0) by someone else first is a change too.
    late = store.store_if_unchanged({"merchant": (rows_of("merchant", [5], 1), np.zeros(1, dtype=np.uint64))})
    assert late == {}
    assert store.store_if_unchanged({"merchant": (rows_of("merchant", [5], 2),
                                                  np.zeros(1, dtype=np.uint64))})["merchant"].tolist() == [5]


def test_extra_entries_are_written_with_the_rows_only_when_every_row_is(backend: Backend) -> None:
    store = fresh_store(backend)
    zero = np.zeros(1, dtype=np.uint64)
    assert store.store_if_unchanged({"card": (rows_of("card", [1], 1), zero)}, [(b"test-extra:a", b"A1")]) == {}
    client = backend.client_for(b"test-extra:a")
    assert client.get(b"test-extra:a") == b"A1" and 0 < client.pttl(b"test-extra:a") <= store.extra_ttl_ms
    # Card 1 is at version 1 now: offered as new (0) it is refused, and the extra entry not written.
    refused = store.store_if_unchanged({"card": (rows_of("card", [1, 2], 2), np.zeros(2, dtype=np.uint64))},
                                       [(b"test-extra:b", b"B1")])
    assert refused["card"].tolist() == [1] and backend.client_for(b"test-extra:b").get(b"test-extra:b") is None


def test_every_row_expires_after_the_ttl_from_its_last_write(backend: Backend) -> None:
    store = fresh_store(backend, ttl_s=3600.0)
    store.store_if_unchanged({"card": (rows_of("card", [1, 2], 1), np.zeros(2, dtype=np.uint64))})
    ttls = [backend.client_for(name).pttl(name) for name in store.keys_of("card", np.array([1, 2], dtype=np.uint64))]
    assert all(3_590_000 < t <= 3_600_000 for t in ttls), ttls
    assert DEFAULT_TTL_S >= 30 * 24 * 3600  # beyond the longest feature window
    with pytest.raises(ValueError, match="positive"):
        fresh_store(backend, ttl_s=0)


def test_another_feature_set_or_identifier_key_reads_nothing(redis_server: RedisServer) -> None:
    a = namespace_for(FEATURE_SET_VERSION, "0123456789abcdef")
    assert a != namespace_for("fs-other", "0123456789abcdef") and a != namespace_for(FEATURE_SET_VERSION, "fedcba9876543210")
    ours = RedisStore(redis_server.client(), namespace=a)
    ours.store_if_unchanged({"card": (rows_of("card", [1], 1), np.zeros(1, dtype=np.uint64))})
    theirs = RedisStore(redis_server.client(), namespace=namespace_for("fs-other", "0123456789abcdef"))
    assert len(theirs.fetch_versioned({"card": np.array([1], dtype=np.uint64)})["card"][0]) == 0


def test_rows_of_another_size_are_refused(redis_server: RedisServer) -> None:
    store = fresh_store(redis_server)
    (name,) = store.keys_of("card", np.array([1], dtype=np.uint64))
    redis_server.client().set(name, b"\x01" * 24)
    with pytest.raises(StateStoreError, match=r"not \d+ bytes each"):
        store.fetch_versioned({"card": np.array([1], dtype=np.uint64)})


# --------------------------------------------------------------------------- the engine on Redis


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(events=event_streams(), seed=st.integers(0, 2**16))
def test_the_engine_on_redis_gives_the_local_paths_features_and_rows(backend: Backend,
                                                                     events: list[Event], seed: int) -> None:
    expected, local = run_engine(events, seed=seed)
    assert all(t.evictions == 0 for t in local.state.tables())
    store = fresh_store(backend)
    actual, engine = run_engine(events, seed=seed, engine=FeatureEngine(store))
    assert_bitwise_equal(actual, expected)
    assert engine.store_conflicts == 0
    held = {kind: np.array(sorted(rows), dtype=np.uint64) for kind, rows in table_rows(local.state).items()}
    got = store.fetch_versioned(held)
    for kind, rows in table_rows(local.state).items():
        stored = got[kind][0]
        assert {int(k): (int(stored.last_seen_ms[i]), stored.values[i].tobytes(), stored.tags[i].tobytes())
                for i, k in enumerate(stored.keys)} == rows


def test_every_key_a_stream_of_new_entities_leaves_expires(backend: Backend) -> None:
    """Memory stays bounded: rows, their records and holds all carry a TTL, so a stream of cards
    never seen again leaves nothing behind for good."""
    store = fresh_store(backend, ttl_s=3600.0)
    records = store.records(ttl_s=600.0)
    engine = FeatureEngine(store)
    rng = np.random.default_rng(3)
    for i in range(20):
        batch = [Txn(int(rng.integers(1, 2**63)), int(rng.integers(1, 2**63)), BASE_MS + i, customer=int(rng.integers(1, 2**63)),
                     device=int(rng.integers(1, 2**63)), ip=int(rng.integers(1, 2**63))) for _ in range(8)]
        keys = [bytes(rng.integers(0, 256, 16, dtype=np.uint8)) for _ in batch]
        assert all(v == b"" for v in records.claim(keys, list(range(8))))
        _, commit = engine.compute_deferred(encode(batch))
        commit(records.entries(keys, list(range(8)), [b"answer"] * 8))
    ttls = [client.pttl(name) for client in backend.clients()
            for name in client.scan_iter(match=store.namespace + b"*", count=1000)]
    assert len(ttls) == 20 * 8 * 6  # five rows and one record per transaction, nothing else
    assert all(0 < t <= 3_600_000 for t in ttls), sorted(set(ttls))[:5]
    assert sum(t <= 600_000 for t in ttls) == 20 * 8  # the records: 10 minutes


def test_a_released_claim_is_free_at_once_and_release_touches_nothing_else(backend: Backend) -> None:
    store = fresh_store(backend)
    ours, theirs = store.records(ttl_s=600.0), store.records(ttl_s=600.0)
    k1, k2, k3 = b"k1".ljust(16, b"."), b"k2".ljust(16, b"."), b"k3".ljust(16, b".")
    assert ours.claim([k1, k2], [1, 2]) == [b"", b""]
    assert theirs.claim([k3], [3]) == [b""]
    store.store_if_unchanged({}, ours.entries([k2], [2], [b"answer"]))  # k2 answered, k1 still a claim
    ours.release([k1, k2, k3])
    again = theirs.claim([k1, k2, k3], [1, 2, 3])
    assert again[0] == b""  # released: free at once, not after the lease
    assert again[1].startswith(b"A") and again[1].endswith(b"answer")  # an answer is never released
    assert again[2][:1] == b"C" and again[2][9:17] == theirs.owner  # another owner's claim is left alone


class RacedStore(RedisStore):
    """Before each of its first `races` writes, another engine scores `rival` on the same Redis."""

    def __init__(self, backend: Backend, namespace: bytes, rival: list[Txn], races: int) -> None:
        super().__init__(backend.nodes(), namespace=namespace)
        self.rival_engine = FeatureEngine(RedisStore(backend.nodes(), namespace=namespace))
        self.rival, self.races = rival, races

    def store_if_unchanged(self, rows: object, /) -> dict[str, np.ndarray]:  # type: ignore[override]
        if self.races:
            self.races -= 1
            self.rival_engine.compute(encode(self.rival))
        return super().store_if_unchanged(rows)  # type: ignore[arg-type]


def test_rows_another_writer_changed_meanwhile_are_recomputed_and_nothing_is_lost(backend: Backend) -> None:
    card, merchant, other = KEYS["card"][0], KEYS["merchant"][0], KEYS["card"][1]
    ours = [Txn(card, merchant, BASE_MS + 1_000, amount=25.0), Txn(other, 0, BASE_MS + 1_500)]
    rival = [Txn(card, merchant, BASE_MS, amount=700.0)]
    store = RacedStore(backend, f"test{next(_namespaces)}:".encode(), rival, races=2)
    features = FeatureEngine(store).compute(encode(ours))
    # The rival wrote twice (before our first and second rounds), then we: the state is the history
    # rival, rival, ours; our answer's features saw both of the rival's (the last round's).
    reference = FeatureEngine(small_state())
    reference.compute(encode(rival))
    reference.compute(encode(rival))
    assert_bitwise_equal(features, reference.compute(encode(ours)))
    assert FeatureEngine(store).store_conflicts == 0  # a new engine counts its own
    got = store.fetch_versioned({"card": np.array(sorted([card, other]), dtype=np.uint64)})["card"]
    local = table_rows(reference.state)["card"]
    assert {int(k): got[0].values[i].tobytes() for i, k in enumerate(got[0].keys)} == {
        k: v for k, (_, v, _) in local.items()}


# --------------------------------------------------------------------------- writers in other processes


HOT_CARD, HOT_MERCHANT = KEYS["card"][2], KEYS["merchant"][2]


def _hammer(url: str, namespace: bytes, txns: list[Txn], batch: int, conflicts: object, start_line: object) -> None:
    engine = FeatureEngine(open_redis_store(url, namespace=namespace, timeout_s=5.0, hold_wait_s=5.0))
    engine.compute(encode([Txn(1, 1, BASE_MS)]))  # compiled and connected before the start
    start_line.wait()  # type: ignore[attr-defined]  # all four at once
    for start in range(0, len(txns), batch):
        engine.compute(encode(txns[start:start + batch]))
    conflicts.put(engine.store_conflicts)  # type: ignore[attr-defined]


def test_four_processes_on_one_card_and_merchant_lose_no_update(backend: Backend) -> None:
    # Every transaction has the same event time, so the order they are applied in changes no decay:
    # counts must come out exact and sums equal to rounding.
    rng = np.random.default_rng(5)
    txns = [Txn(HOT_CARD if rng.random() < 0.3 else int(rng.integers(1, 2**63)),
                HOT_MERCHANT if rng.random() < 0.3 else int(rng.integers(1, 2**63)),
                BASE_MS, amount=float(rng.integers(1, 500))) for _ in range(1_200)]
    namespace = f"test{next(_namespaces)}:".encode()
    ctx = multiprocessing.get_context("spawn")
    conflicts, start_line = ctx.Queue(), ctx.Barrier(4)
    workers = [ctx.Process(target=_hammer, args=(backend.url, namespace, txns[k::4], 8, conflicts, start_line))
               for k in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
        assert w.exitcode == 0
    recomputed = sum(conflicts.get(timeout=5) for _ in workers)
    probe = [Txn(HOT_CARD, HOT_MERCHANT, BASE_MS, amount=1.0)]
    shared = FeatureEngine(RedisStore(backend.nodes(), namespace=namespace)).compute(encode(probe))[0]
    alone = FeatureEngine(EntityState.empty(card_capacity=4096, merchant_capacity=4096, customer_capacity=16,
                                            device_capacity=16, ip_capacity=16))
    alone.compute(encode([Txn(1, 1, BASE_MS)] * 4))  # the workers' warm-up transactions
    alone.compute(encode(txns))
    expected = alone.compute(encode(probe))[0]
    counts = [i for i, name in enumerate(FEATURE_NAMES) if "count" in name]
    assert len(counts) > 10
    np.testing.assert_array_equal(shared[counts], expected[counts])  # exact (NaN where both are)
    # The amount's exponentially weighted mean and variance weigh later transactions more, so they
    # depend on the order of arrival, as in one process fed another order (the z-score, the ratio to
    # the mean); every other feature is a count or a sum: equal up to the rounding of the additions.
    ordered = [i for i, name in enumerate(FEATURE_NAMES) if "zscore" in name or "to_mean" in name]
    rest = [i for i in range(len(FEATURE_NAMES)) if i not in ordered]
    np.testing.assert_allclose(shared[rest], expected[rest], rtol=1e-12, atol=0)
    assert recomputed > 0  # the writers did collide, and nothing was lost for it
    print(f"rows recomputed: {recomputed} for {len(txns)} transactions")


def test_a_claim_sent_ahead_rides_on_the_next_read_and_finds_what_claim_finds(backend: Backend) -> None:
    store = fresh_store(backend)
    records = store.records(ttl_s=60.0)
    other = store.records(ttl_s=60.0)
    k1, k2 = b"a1".ljust(16, b"."), b"a2".ljust(16, b".")
    assert other.claim([k2], [2]) == [b""]  # k2 is another server's claim already
    ticket = records.claim_ahead([k1, k2], [1, 2])
    assert ticket is not None and ticket.found is None  # nothing sent yet
    for client in backend.clients():
        client.script_flush()  # the claim script must be loaded again on the way
    store.store_if_unchanged({"card": (rows_of("card", [5], 1), np.zeros(1, dtype=np.uint64))})
    rows, versions = store.fetch_versioned({"card": np.array([5, 6], dtype=np.uint64)})["card"]
    assert rows.keys.tolist() == [5] and versions.tolist() == [1]
    assert ticket.found is not None and ticket.found[0] == b""  # k1 claimed now, by us
    assert ticket.found[1][:1] == b"C" and ticket.found[1][9:17] == other.owner
    assert other.claim([k1], [1])[0][9:17] == records.owner
    # Sent once: the next read carries no claim.
    store.fetch_versioned({"card": np.array([5], dtype=np.uint64)})
    withdrawn = records.claim_ahead([b"a3".ljust(16, b".")], [3])
    assert withdrawn is not None
    withdrawn.withdraw()
    store.fetch_versioned({"card": np.array([5], dtype=np.uint64)})
    assert withdrawn.found is None and other.claim([b"a3".ljust(16, b".")], [3]) == [b""]
