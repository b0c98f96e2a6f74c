"""service.state.redis_nodes.Cluster against a real 3-master Redis Cluster: a slot migrated under
the store (ASK while it moves, MOVED once it has), a master that lost its scripts, a master
restarted, and the URL forms; a store behind a real Sentinel through a failover, and one on a
TLS-only Redis with a private CA."""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from fraudscore.v1 import fraudscore_pb2 as pb
from redis.exceptions import AskError

from core.encode import KeyHasher
from core.errors import StateStoreUnavailableError
from core.features import FeatureEngine
from core.scoring import Scorer
from service.bench.redis_server import RedisCluster, RedisSentinelSet, RedisServer, free_port
from service.runtime.metrics import Metrics
from service.runtime.reload import load_rules
from service.serving.items import Item
from service.serving.pipeline import Pipeline
from service.serving.shared_records import fingerprint
from service.state.redis_nodes import Cluster
from service.state.redis_store import RedisStore, open_redis_store, redacted
from tests.certs import CertificateAuthority
from tests.service.state.test_redis_store import rows_of

_namespaces = itertools.count()


def cluster_store(cluster: RedisCluster, timeout_s: float = 5.0) -> RedisStore:
    return RedisStore(Cluster([("127.0.0.1", node.port) for node in cluster.nodes], socket_timeout=timeout_s,
                              socket_connect_timeout=timeout_s),
                      namespace=f"cluster{next(_namespaces)}:".encode())


def node_id(node: RedisServer) -> str:
    return str(node.client().execute_command("CLUSTER MYID").decode())


def test_a_slot_migrated_under_the_store_is_followed_by_ask_then_moved(redis_cluster: RedisCluster) -> None:
    store = cluster_store(redis_cluster)
    card = np.array([42], dtype=np.uint64)
    zero = np.zeros(1, dtype=np.uint64)
    assert store.store_if_unchanged({"card": (rows_of("card", [42], 1), zero)}) == {}
    (name,) = store.keys_of("card", card)
    source = redis_cluster.node_of(name)
    target = next(node for node in redis_cluster.nodes if node is not source)
    slot = source.client().execute_command("CLUSTER KEYSLOT", name)
    target.client().execute_command("CLUSTER SETSLOT", slot, "IMPORTING", node_id(source))
    source.client().execute_command("CLUSTER SETSLOT", slot, "MIGRATING", node_id(target))
    source.client().execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", name)
    with pytest.raises(AskError):  # the row has left the source; the target serves it only after ASKING
        source.client().get(name)

    # Mid-migration: the source answers ASK for the moved row; the store follows it (ASKING).
    rows, versions = store.fetch_versioned({"card": card})["card"]
    assert versions.tolist() == [1] and rows.values.tobytes() == rows_of("card", [42], 1).values.tobytes()
    assert store.store_if_unchanged({"card": (rows_of("card", [42], 2), versions)}) == {}

    # Migration done: the source answers MOVED; the store reads the slot map again.
    for node in redis_cluster.nodes:
        node.client().execute_command("CLUSTER SETSLOT", slot, "NODE", node_id(target))
    redis_cluster.wait_ok()
    rows, versions = store.fetch_versioned({"card": card})["card"]
    assert versions.tolist() == [2] and rows.values.tobytes() == rows_of("card", [42], 2).values.tobytes()
    assert target.client().exists(name) == 1 and redis_cluster.node_of(name) is target
    assert store.store_if_unchanged({"card": (rows_of("card", [42], 3), versions)}) == {}
    # And a store that never saw the old map finds the row where it is.
    assert cluster_store_in(redis_cluster, store.namespace).fetch_versioned({"card": card})["card"][1].tolist() == [3]


def cluster_store_in(cluster: RedisCluster, namespace: bytes) -> RedisStore:
    return RedisStore(Cluster([("127.0.0.1", cluster.nodes[0].port)], socket_timeout=5), namespace=namespace)


def test_a_master_that_lost_its_scripts_gets_them_again(redis_cluster: RedisCluster) -> None:
    store = cluster_store(redis_cluster)
    records = store.records(ttl_s=60.0)
    keys = np.arange(1, 50, dtype=np.uint64)
    zero = np.zeros(len(keys), dtype=np.uint64)
    assert store.store_if_unchanged({"card": (rows_of("card", keys.tolist(), 1), zero)}) == {}
    for node in redis_cluster.nodes:
        node.client().script_flush()
    _, versions = store.fetch_versioned({"card": keys})["card"]
    assert store.store_if_unchanged({"card": (rows_of("card", keys.tolist(), 2), versions)}) == {}
    assert store.fetch_versioned({"card": keys})["card"][1].tolist() == [2] * len(keys)
    for node in redis_cluster.nodes:
        node.client().script_flush()
    assert records.claim([b"k" * 16, b"j" * 16], [1, 2]) == [b"", b""]


def test_a_restarted_master_fails_calls_while_down_then_serves_again(redis_cluster: RedisCluster) -> None:
    """Down: the call fails at once (StateStoreUnavailableError: the batch's fallback), never hangs.
    Back (same port, same nodes.conf: its slots; no persistence in this fixture, so its rows are
    gone, as docs/state-store.md says of a master restarted without AOF): served again, scripts
    loaded again, without a new store."""
    store = cluster_store(redis_cluster, timeout_s=0.05)
    keys = np.arange(1, 200, dtype=np.uint64)
    zero = np.zeros(len(keys), dtype=np.uint64)
    assert store.store_if_unchanged({"card": (rows_of("card", keys.tolist(), 1), zero)}) == {}
    victim = redis_cluster.nodes[1]
    victim.stop()
    try:
        with pytest.raises(StateStoreUnavailableError):
            store.fetch_versioned({"card": keys})
    finally:
        victim.start()
        redis_cluster.wait_ok()
    rows, versions = store.fetch_versioned({"card": keys})["card"]
    lost = {int(k) for k in keys} - {int(k) for k in rows.keys}
    assert lost and all(redis_cluster.node_of(name) is victim
                        for name in store.keys_of("card", np.array(sorted(lost), dtype=np.uint64)))
    assert store.store_if_unchanged({"card": (rows, versions)}) == {}  # the survivors, scripts loaded again


def test_cluster_and_sentinel_urls_parse_and_hide_their_password(redis_cluster: RedisCluster) -> None:
    hosts = ",".join(f"127.0.0.1:{node.port}" for node in redis_cluster.nodes)
    store = open_redis_store(f"redis+cluster://{hosts}", namespace=b"url:", timeout_s=1.0, hold_wait_s=1.0)
    assert isinstance(store.nodes, Cluster)
    assert sorted(port for _, port in store.nodes.masters()) == sorted(node.port for node in redis_cluster.nodes)
    assert redacted("redis+cluster://app:s3cret@h1:6379,h2:6379") == "redis+cluster://app:***@h1:6379,h2:6379"
    assert redacted("redis+sentinel://:s3cret@s1:26379/mymaster/0") == "redis+sentinel://:***@s1:26379/mymaster/0"
    for bad, message in (("redis+cluster://h1", "is not host:port"), ("redis+cluster://", "names no host:port"),
                         ("redis+cluster://h1:1?ssl_verify=no", "unknown parameter 'ssl_verify'"),
                         ("redis+sentinel://:pw@s1:26379", "ends /master-name")):
        with pytest.raises(ValueError, match=message) as caught:
            open_redis_store(bad, namespace=b"url:", timeout_s=1.0, hold_wait_s=1.0)
        assert "pw@" not in str(caught.value)


def test_a_store_behind_sentinel_follows_a_failover(tmp_path: Path) -> None:
    """redis+sentinel://: the master Sentinel names; after SENTINEL FAILOVER, calls to the old
    master fail (the batch's fallback) until the client asks Sentinel again, then the promoted
    replica serves the rows it replicated."""
    sentinels = RedisSentinelSet(tmp_path).start()
    try:
        store = open_redis_store(sentinels.url, namespace=b"sentinel:", timeout_s=0.5, hold_wait_s=0.5)
        keys = np.arange(1, 20, dtype=np.uint64)
        assert store.store_if_unchanged({"card": (rows_of("card", keys.tolist(), 1),
                                                  np.zeros(len(keys), dtype=np.uint64))}) == {}
        sentinels.master.client().execute_command("WAIT", 1, 5000)  # replicated before the failover
        sentinels.fail_over()
        failed = 0
        for _ in range(100):
            try:
                _, versions = store.fetch_versioned({"card": keys})["card"]
                if store.store_if_unchanged({"card": (rows_of("card", keys.tolist(), 2), versions)}) == {}:
                    break
            except StateStoreUnavailableError:
                failed += 1
                time.sleep(0.1)
        else:
            raise AssertionError("the store never wrote to the promoted master")
        assert failed <= 20, failed
        assert versions.tolist() == [1] * len(keys)  # the rows written before the failover, replicated
        (name,) = store.keys_of("card", keys[:1])
        assert sentinels.replica.client().get(name) is not None  # on the promoted replica, now master
        assert sentinels.replica.client().info("replication")["role"] == "master"
    finally:
        sentinels.stop()


def test_a_tls_redis_is_reached_with_the_ca_that_signed_it_and_refused_without(tmp_path: Path) -> None:
    """rediss:// against a real redis-server serving TLS only, its certificate from a private CA:
    with FRAUDSCORE_STATE_CA_FILE's CA the store works; with the system's CAs the handshake fails
    (StateStoreUnavailableError: the fallback, never plaintext)."""
    ca = CertificateAuthority(tmp_path, "redis")
    cert = ca.issue("127.0.0.1", server=True)
    port = free_port()
    log = open(tmp_path / "redis.log", "ab")  # noqa: SIM115  # the process's own
    proc = subprocess.Popen(["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
                             "--tls-cert-file", str(cert.cert), "--tls-key-file", str(cert.key),
                             "--tls-ca-cert-file", str(ca.cert), "--tls-auth-clients", "no", "--save", "",
                             "--dir", str(tmp_path)], stdout=log, stderr=subprocess.STDOUT)
    log.close()
    try:
        url = f"rediss://127.0.0.1:{port}/0"
        store = open_redis_store(url, namespace=b"tls:", timeout_s=2.0, hold_wait_s=2.0, ca_file=ca.cert)
        keys = np.array([7], dtype=np.uint64)
        deadline = time.monotonic() + 10
        while True:  # until the server listens
            try:
                assert store.store_if_unchanged({"card": (rows_of("card", [7], 1), np.zeros(1, np.uint64))}) == {}
                break
            except StateStoreUnavailableError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.05)
        assert store.fetch_versioned({"card": keys})["card"][1].tolist() == [1]
        untrusted = open_redis_store(url, namespace=b"tls:", timeout_s=2.0, hold_wait_s=2.0)
        with pytest.raises(StateStoreUnavailableError):
            untrusted.fetch_versioned({"card": keys})
    finally:
        proc.terminate()
        proc.wait(timeout=10)


class HalfWritten(RedisStore):
    """A Cluster store whose write reaches the rows' masters and then fails on another, as when one
    master goes away in the middle of a batch's write: the rows are written, the call raises."""

    def store_if_unchanged(self, rows: object, extra: object = (), /) -> dict[str, np.ndarray]:  # type: ignore[override]
        super().store_if_unchanged(rows)  # type: ignore[arg-type]
        raise StateStoreUnavailableError("Redis TimeoutError")


def test_a_cluster_write_that_fails_part_way_saves_the_answers_so_a_retry_is_not_counted_again(
        redis_cluster: RedisCluster) -> None:
    store = HalfWritten(Cluster([("127.0.0.1", node.port) for node in redis_cluster.nodes], socket_timeout=5),
                        namespace=f"cluster{next(_namespaces)}:".encode())
    records = store.records(ttl_s=60.0)
    assert not records.atomic
    metrics, hasher = Metrics(), KeyHasher()
    pipeline = Pipeline(engine=FeatureEngine(store), scorer=Scorer(None, load_rules(None)), hasher=hasher,
                        metrics=metrics, records=records)
    txns = [pb.Transaction(transaction_id=f"half-{i}", card_id=f"c{i}", merchant_id="m", amount_minor=1_000,
                           currency="USD", event_time_ms=1_767_225_600_000 + i) for i in range(3)]
    loop = asyncio.new_event_loop()
    try:
        answered = pipeline.run([Item(t, 0.0, 0, loop.create_future()) for t in txns])
    finally:
        loop.close()
    keys = [hasher.record_key(t.transaction_id) for t in txns]
    found = store.records(ttl_s=60.0).claim(keys, [fingerprint(t) for t in txns])
    assert [f[:1] for f in found] == [b"A"] * 3  # a retry anywhere replays the answer given
    assert [f[17:] for f in found] == list(answered.answers)
    assert metrics.state_errors._value.get() == 3 and metrics.records_unsaved._value.get() == 0
