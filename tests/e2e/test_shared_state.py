"""Servers that share one entity state through a real redis-server (tests/redis_server.py): one
card's history across processes, the store's outage answered by the fallback rules without a gRPC
error and recovered from without a restart, and the URL's password kept out of every log."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import orjson
import pytest
from fraudscore.v1 import fraudscore_pb2 as pb
from fraudscore.v1 import fraudscore_pb2_grpc as pb_grpc

from service.bench.redis_server import RedisCluster, RedisServer
from tests.conftest import REPO, ServerProcess, start_server
from tests.e2e.helpers import BASE_TIME_MS, BackgroundLoad, offline_probabilities, scrape, txn, uid, value

PASSWORD = "s3cret-redis-password"


@pytest.fixture
def redis_with_password(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis", password=PASSWORD).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["standalone", "cluster"])
def store_url(request: pytest.FixtureRequest) -> str:
    """The URL of a password-protected redis-server of the test's own, or of the session's 3-master
    Cluster (redis+cluster://)."""
    if request.param == "cluster":
        cluster: RedisCluster = request.getfixturevalue("redis_cluster")
        return cluster.url
    server: RedisServer = request.getfixturevalue("redis_with_password")
    return server.url


SEEN_BEFORE = "R_TEST_CARD_SEEN_BEFORE"
SEEN_TWICE = "R_TEST_CARD_SEEN_TWICE"


def shared(tmp_path: Path, model_dir: Path, url: str, name: str, **env: str) -> ServerProcess:
    """A server on the shared store, with the packaged rules plus one that fires on a card's second
    transaction: whether a server saw the card's first one shows in the reasons."""
    (tmp_path / name).mkdir()
    rules = orjson.loads((REPO / "service" / "defaults" / "rules.json").read_bytes())
    rules["rules"].append({"name": "test_card_seen_before", "when": [
        {"field": "card_txn_count_total", "op": ">=", "value": 0.5}], "action": "REVIEW",
        "reason_code": SEEN_BEFORE, "description": "an earlier transaction", "priority": 50})
    rules["rules"].append({"name": "test_card_seen_twice", "when": [
        {"field": "card_txn_count_total", "op": ">=", "value": 1.5}], "action": "REVIEW",
        "reason_code": SEEN_TWICE, "description": "two earlier transactions", "priority": 51})
    (tmp_path / name / "rules.json").write_bytes(orjson.dumps(rules))
    return start_server(tmp_path / name, model_dir=model_dir, state_dir=tmp_path / name / "state",
                        extra_env={"FRAUDSCORE_STATE_URL": url,
                                   "FRAUDSCORE_RULES_FILE": str(tmp_path / name / "rules.json"), **env})


def score(srv: ServerProcess, t: pb.Transaction) -> pb.ScoreResponse:
    with grpc.insecure_channel(srv.target) as ch:
        answer: pb.ScoreResponse = pb_grpc.FraudScoringStub(ch).Score(pb.ScoreRequest(transaction=t), timeout=10)
        return answer


def test_two_servers_on_one_redis_score_on_one_history(tmp_path: Path, model_dir: Path,
                                                       redis_with_password: RedisServer) -> None:
    card = uid("card")
    a = txn(card_id=card, amount_minor=1_000, event_time_ms=BASE_TIME_MS)
    b = txn(card_id=card, amount_minor=90_000, event_time_ms=BASE_TIME_MS + 30_000)
    one = shared(tmp_path, model_dir, redis_with_password.url, "one")
    two = shared(tmp_path, model_dir, redis_with_password.url, "two")
    try:
        first = score(one, a)
        second = score(two, b)  # another process: sees a only through Redis
    finally:
        logs = [srv.log() for srv in (one, two)]
        assert one.stop() == 0 and two.stop() == 0
    expected = offline_probabilities(model_dir, [a, b])
    assert not first.degraded and not second.degraded
    assert first.fraud_probability == pytest.approx(expected[0], abs=1e-12)
    assert second.fraud_probability == pytest.approx(expected[1], abs=1e-12)
    assert SEEN_BEFORE not in {r.code for r in first.reasons} and SEEN_BEFORE in {r.code for r in second.reasons}
    for log in logs:
        assert "entity state in a shared store" in log and PASSWORD not in log and "***" in log
        assert card not in log


def test_an_outage_of_the_store_is_answered_by_the_fallback_and_recovered_from(tmp_path: Path, model_dir: Path,
                                                                                redis_with_password: RedisServer) -> None:
    srv = shared(tmp_path, model_dir, redis_with_password.url, "srv")
    try:
        assert not score(srv, txn()).degraded
        redis_with_password.stop()
        down = [score(srv, txn()) for _ in range(3)]  # never a gRPC error
        s = scrape(srv)
        redis_with_password.start()  # the same port, empty (no persistence): no restart of the server
        deadline = time.monotonic() + 10
        while (back := score(srv, txn())).degraded:
            assert time.monotonic() < deadline, "still degraded 10 s after Redis came back"
            time.sleep(0.1)
        # Outcome reports need the store: refused UNAVAILABLE while it is down, not lost silently.
        redis_with_password.stop()
        t = txn()
        with grpc.insecure_channel(srv.target) as ch, pytest.raises(grpc.RpcError) as refused:
            pb_grpc.FraudScoringStub(ch).ReportOutcome(pb.ReportOutcomeRequest(
                transaction_id=t.transaction_id, card_id=t.card_id, merchant_id=t.merchant_id,
                outcome=pb.CONFIRMED_FRAUD, reported_time_ms=BASE_TIME_MS), timeout=10)
        redis_with_password.start()
    finally:
        log = srv.log()
        assert srv.stop() == 0
    assert all(r.degraded and r.source == pb.RULES_FALLBACK for r in down)
    assert value(s, "fraudscore_fallbacks_total", reason="state_store_unavailable") == 3
    assert value(s, "fraudscore_state_errors_total") == 3
    assert not back.degraded
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert log.count("state store unavailable") == 1  # logged once a minute, not per batch
    assert PASSWORD not in log


def codes(r: pb.ScoreResponse) -> set[str]:
    return {reason.code for reason in r.reasons}


def test_a_retry_on_another_server_gets_the_first_answer_and_counts_once(tmp_path: Path, model_dir: Path,
                                                                          store_url: str) -> None:
    card, other = uid("card"), uid("card")
    a = txn(card_id=card, amount_minor=1_000, event_time_ms=BASE_TIME_MS)
    b = txn(card_id=card, amount_minor=2_000, event_time_ms=BASE_TIME_MS + 60_000)
    c = txn(card_id=uid("card"), event_time_ms=BASE_TIME_MS)
    changed = pb.Transaction()
    changed.CopyFrom(a)
    changed.amount_minor = 1_001
    one = shared(tmp_path, model_dir, store_url, "one")
    two = shared(tmp_path, model_dir, store_url, "two")
    try:
        first = score(one, a)
        retry = score(two, a)  # another server: answered from the shared record
        with grpc.insecure_channel(two.target) as ch:
            batch = pb_grpc.FraudScoringStub(ch).ScoreBatch(pb.ScoreBatchRequest(transactions=[a, c]), timeout=10)
            with pytest.raises(grpc.RpcError) as conflict:
                pb_grpc.FraudScoringStub(ch).Score(pb.ScoreRequest(transaction=changed), timeout=10)
        later = score(one, b)
        for i in range(2):  # control: a card with two transactions does fire the twice-rule
            score(two, txn(card_id=other, event_time_ms=BASE_TIME_MS + i))
        control = score(one, txn(card_id=other, event_time_ms=BASE_TIME_MS + 5))
        s = scrape(two)
    finally:
        assert one.stop() == 0 and two.stop() == 0
    assert retry == first  # the identical answer, server_latency_us included
    assert batch.results[0] == first and batch.results[1].transaction_id == c.transaction_id
    assert conflict.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert SEEN_BEFORE in codes(later) and SEEN_TWICE not in codes(later)  # a counted once, not three times
    assert SEEN_TWICE in codes(control)
    assert value(s, "fraudscore_idempotent_replays_total") == 2
    assert value(s, "fraudscore_shared_records_unsaved_total") == 0


def test_a_retry_while_the_first_is_in_flight_elsewhere_is_told_to_retry(tmp_path: Path, model_dir: Path,
                                                                          redis_with_password: RedisServer) -> None:
    a = txn()
    slow = shared(tmp_path, model_dir, redis_with_password.url, "slow", FRAUDSCORE_FAULT_INJECTION="model-slow")
    two = shared(tmp_path, model_dir, redis_with_password.url, "two")
    try:
        with grpc.insecure_channel(slow.target) as ch:
            pending = pb_grpc.FraudScoringStub(ch).Score.future(pb.ScoreRequest(transaction=a), timeout=10)
            time.sleep(0.1)  # the model takes 200 ms more there: claimed, not yet answered
            with pytest.raises(grpc.RpcError) as busy:
                score(two, a)
            first = pending.result()
        retry = score(two, a)
    finally:
        assert slow.stop() == 0 and two.stop() == 0
    assert busy.value.code() == grpc.StatusCode.ABORTED and "retry" in (busy.value.details() or "")
    assert retry == first


def test_three_servers_on_one_redis_answer_as_one_embedded_server(tmp_path: Path, model_dir: Path,
                                                                  store_url: str) -> None:
    """A seeded stream in random chunks (unary and ScoreBatch, outcome reports between) sent one call
    at a time to any of three servers on Redis, and the same calls to one server with its state in
    process: every answer the same bit for bit (the server's latency aside), and so every feature."""
    rng = random.Random(16)
    cards, merchants = [uid("card") for _ in range(4)], [uid("m") for _ in range(3)]
    stream = [txn(card_id=rng.choice(cards), merchant_id=rng.choice(merchants),
                  amount_minor=rng.randint(100, 200_000), event_time_ms=BASE_TIME_MS + 7_000 * i) for i in range(60)]
    calls: list[tuple[str, list[pb.Transaction]]] = []
    at = 0
    while at < len(stream):
        n = rng.randint(1, 4)
        calls.append(("batch" if n > 1 or rng.random() < 0.3 else "score", stream[at:at + n]))
        at += n
        if rng.random() < 0.2:
            calls.append(("report", [rng.choice(stream[:at])]))
    servers = [shared(tmp_path, model_dir, store_url, f"s{k}") for k in range(3)]
    (tmp_path / "alone").mkdir()
    alone = start_server(tmp_path / "alone", model_dir=model_dir, state_dir=tmp_path / "alone" / "state",
                         extra_env={"FRAUDSCORE_RULES_FILE": str(tmp_path / "s0" / "rules.json")})

    def send(srv: ServerProcess, kind: str, txns: list[pb.Transaction]) -> list[pb.ScoreResponse]:
        with grpc.insecure_channel(srv.target) as ch:
            stub = pb_grpc.FraudScoringStub(ch)
            if kind == "score":
                return [stub.Score(pb.ScoreRequest(transaction=txns[0]), timeout=10)]
            if kind == "batch":
                return list(stub.ScoreBatch(pb.ScoreBatchRequest(transactions=txns), timeout=10).results)
            t = txns[0]
            stub.ReportOutcome(pb.ReportOutcomeRequest(
                transaction_id=t.transaction_id, card_id=t.card_id, merchant_id=t.merchant_id,
                outcome=pb.CONFIRMED_FRAUD, reported_time_ms=t.event_time_ms + 1_000), timeout=10)
            return []

    try:
        pairs = []
        for kind, txns in calls:
            pairs += zip(send(rng.choice(servers), kind, txns), send(alone, kind, txns), strict=True)
    finally:
        for srv in (*servers, alone):
            assert srv.stop() == 0
    assert len(pairs) == len(stream)
    for ours, reference in pairs:
        assert not ours.degraded
        ours.server_latency_us = reference.server_latency_us = 0
        assert ours == reference  # fraud_probability bit for bit, decision, reasons, versions


def test_a_server_killed_mid_batch_wrote_nothing_and_its_claim_is_taken_over(tmp_path: Path, model_dir: Path,
                                                                           redis_with_password: RedisServer) -> None:
    card = uid("card")
    a = txn(card_id=card, event_time_ms=BASE_TIME_MS)
    b = txn(card_id=card, event_time_ms=BASE_TIME_MS + 60_000)
    slow = shared(tmp_path, model_dir, redis_with_password.url, "slow", FRAUDSCORE_FAULT_INJECTION="model-slow")
    two = shared(tmp_path, model_dir, redis_with_password.url, "two")
    try:
        with grpc.insecure_channel(slow.target) as ch:
            pending = pb_grpc.FraudScoringStub(ch).Score.future(pb.ScoreRequest(transaction=a), timeout=10)
            time.sleep(0.1)  # claimed and computed, its model 200 ms from done: nothing written yet
            slow.proc.kill()
            slow.proc.wait(timeout=10)
            with pytest.raises(grpc.RpcError):
                pending.result()
        with pytest.raises(grpc.RpcError) as held:
            score(two, a)  # the dead server's claim, until it runs out
        time.sleep(2.2)
        retry = score(two, a)
        later = score(two, b)
    finally:
        slow.stop()
        assert two.stop() == 0
    assert held.value.code() == grpc.StatusCode.ABORTED
    assert not retry.degraded
    assert SEEN_BEFORE in codes(later) and SEEN_TWICE not in codes(later)  # a counted once, by the retry


def test_redis_stopped_and_restarted_under_load_costs_no_call(tmp_path: Path, model_dir: Path,
                                                              redis_with_password: RedisServer) -> None:
    """Calls keep coming (unary and batches in flight) while Redis goes away for a second and comes
    back: every call is answered, by the fallback rules while it is gone, by the model again after."""
    outage_under_load(tmp_path, model_dir, redis_with_password.url, redis_with_password)


def test_a_cluster_master_restarted_under_load_costs_no_call(tmp_path: Path, model_dir: Path,
                                                             redis_cluster: RedisCluster) -> None:
    """The same with one master of three restarted (its script cache and, without persistence, its
    rows lost): the slot map read again, the scripts loaded again, no restart of the server."""
    outage_under_load(tmp_path, model_dir, redis_cluster.url, redis_cluster.nodes[2], after=redis_cluster.wait_ok)


def outage_under_load(tmp_path: Path, model_dir: Path, url: str, redis: RedisServer,
                      after: Callable[[], None] = lambda: None) -> None:
    srv = shared(tmp_path, model_dir, url, "srv")
    try:
        with BackgroundLoad(srv.target) as load:
            time.sleep(1.0)
            before = len(load.answers)
            redis.stop()
            time.sleep(1.0)
            during = len(load.answers)
            redis.start()
            after()
            time.sleep(2.0)
            settled = len(load.answers)
            time.sleep(1.0)
        s = scrape(srv)
    finally:
        assert srv.stop() == 0
    assert load.failures == []  # never a gRPC error
    assert before > 20 and during > before and len(load.answers) > settled
    outage = load.answers[before:during]
    assert any(a.degraded for a in outage), "nothing was degraded while Redis was down"
    assert all(a.source == pb.RULES_FALLBACK for a in outage if a.degraded)
    assert not any(a.degraded for a in load.answers[settled:]), "still degraded after Redis came back"
    assert value(s, "fraudscore_fallbacks_total", reason="state_store_unavailable") > 0
