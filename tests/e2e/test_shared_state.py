"""Servers that share one entity state through a real redis-server (tests/redis_server.py): one
card's history across processes, the store's outage answered by the fallback rules without a gRPC
error and recovered from without a restart, and the URL's password kept out of every log."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import orjson
import pytest
from fraudscore.v1 import fraudscore_pb2 as pb
from fraudscore.v1 import fraudscore_pb2_grpc as pb_grpc

from service.bench.redis_server import RedisServer
from tests.conftest import REPO, ServerProcess, start_server
from tests.e2e.helpers import BASE_TIME_MS, offline_probabilities, scrape, txn, uid, value

PASSWORD = "s3cret-redis-password"


@pytest.fixture
def redis_with_password(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis", password=PASSWORD).start()
    try:
        yield server
    finally:
        server.stop()


SEEN_BEFORE = "R_TEST_CARD_SEEN_BEFORE"


def shared(tmp_path: Path, model_dir: Path, url: str, name: str) -> ServerProcess:
    """A server on the shared store, with the packaged rules plus one that fires on a card's second
    transaction: whether a server saw the card's first one shows in the reasons."""
    (tmp_path / name).mkdir()
    rules = orjson.loads((REPO / "service" / "defaults" / "rules.json").read_bytes())
    rules["rules"].append({"name": "test_card_seen_before", "when": [
        {"field": "card_txn_count_total", "op": ">=", "value": 0.5}], "action": "REVIEW",
        "reason_code": SEEN_BEFORE, "description": "an earlier transaction", "priority": 50})
    (tmp_path / name / "rules.json").write_bytes(orjson.dumps(rules))
    return start_server(tmp_path / name, model_dir=model_dir, state_dir=tmp_path / name / "state",
                        extra_env={"FRAUDSCORE_STATE_URL": url,
                                   "FRAUDSCORE_RULES_FILE": str(tmp_path / name / "rules.json")})


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
