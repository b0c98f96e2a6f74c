"""The four RPCs over a real channel against a real server process."""

from __future__ import annotations

import math
import re
import time
from pathlib import Path

import grpc
import orjson
import pytest
from fraudscore.v1 import fraudscore_pb2 as pb
from fraudscore.v1 import fraudscore_pb2_grpc as pb_grpc

from core.features import FEATURE_SET_VERSION
from tests.conftest import ServerProcess
from tests.e2e.helpers import BASE_TIME_MS, offline_probabilities, scrape, txn, uid, value


@pytest.fixture(scope="module")
def channel(server: ServerProcess):
    with grpc.insecure_channel(server.target) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> pb_grpc.FraudScoringStub:
    return pb_grpc.FraudScoringStub(channel)


def score(stub: pb_grpc.FraudScoringStub, t: pb.Transaction, timeout: float = 5.0) -> pb.ScoreResponse:
    return stub.Score(pb.ScoreRequest(transaction=t), timeout=timeout)


def test_score_answers_from_the_model_with_versions(stub, model_dir: Path) -> None:
    manifest = orjson.loads((model_dir / "manifest.json").read_bytes())
    t = txn()
    r = score(stub, t)
    assert r.transaction_id == t.transaction_id
    assert 0.0 <= r.fraud_probability <= 1.0
    assert r.risk_score == min(999, math.floor(r.fraud_probability * 1000))
    assert r.decision in (pb.APPROVE, pb.REVIEW, pb.DECLINE)
    assert r.source == pb.MODEL and not r.degraded
    assert r.model_version == manifest["model_version"]
    assert r.feature_set_version == FEATURE_SET_VERSION == manifest["feature_set_version"]
    assert r.ruleset_version
    assert r.server_latency_us > 0
    thresholds = manifest["thresholds"]
    expected = pb.DECLINE if r.fraud_probability >= thresholds["decline"] else (
        pb.REVIEW if r.fraud_probability >= thresholds["review"] else pb.APPROVE)
    assert r.decision == expected


def test_online_scores_equal_the_offline_replay(stub, model_dir: Path) -> None:
    card, merchant, device = uid("card"), uid("m"), uid("dev")
    seq = [
        txn(card_id=card, merchant_id=merchant, device_id=device, amount_minor=2_000 + 150 * i,
            event_time_ms=BASE_TIME_MS + 45_000 * i, latitude=40.7 + i, longitude=-74.0 + 2 * i)
        for i in range(6)
    ]
    online = [score(stub, t).fraud_probability for t in seq]
    offline = offline_probabilities(model_dir, seq)
    assert online == pytest.approx(list(offline), abs=1e-12, rel=0)


def test_retry_gets_the_identical_answer_and_counts_once(stub, model_dir: Path) -> None:
    card, merchant = uid("card"), uid("m")
    a = txn(card_id=card, merchant_id=merchant, amount_minor=900, event_time_ms=BASE_TIME_MS)
    b = txn(card_id=card, merchant_id=merchant, amount_minor=95_000, event_time_ms=BASE_TIME_MS + 60_000)
    first = score(stub, a)
    assert score(stub, a) == first
    batch_retry = stub.ScoreBatch(pb.ScoreBatchRequest(transactions=[a]), timeout=5).results[0]
    assert batch_retry == first
    p_b = score(stub, b).fraud_probability
    counted_once = offline_probabilities(model_dir, [a, b])[1]
    a_again = pb.Transaction()
    a_again.CopyFrom(a)
    a_again.transaction_id = uid("t")
    counted_twice = offline_probabilities(model_dir, [a, a_again, b])[2]
    assert counted_once != counted_twice  # the check below can tell the two apart
    assert p_b == pytest.approx(counted_once, abs=1e-12, rel=0)


def test_same_id_with_a_different_payload_is_refused(stub) -> None:
    a = txn()
    score(stub, a)
    changed = pb.Transaction()
    changed.CopyFrom(a)
    changed.amount_minor += 1
    with pytest.raises(grpc.RpcError) as err:
        score(stub, changed)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "different payload" in err.value.details()


@pytest.mark.parametrize(
    ("field", "overrides"),
    [
        ("transaction_id", {"transaction_id": ""}),
        ("card_id", {"card_id": ""}),
        ("card_id", {"card_id": "4111 1111 1111 1111"}),
        ("merchant_id", {"merchant_id": ""}),
        ("amount_minor", {"amount_minor": 0}),
        ("amount_minor", {"amount_minor": -5}),
        ("currency", {"currency": "usd"}),
        ("event_time_ms", {"event_time_ms": 0}),
        ("event_time_ms", {"event_time_ms": BASE_TIME_MS // 1000}),
        ("country", {"country": "USA"}),
        ("channel", {"channel": 99}),
        ("latitude", {"latitude": 91.0}),
        ("ip_address", {"ip_address": "not-an-ip"}),
        ("merchant_category", {"merchant_category": "54x1"}),
    ],
)
def test_bad_input_is_refused_naming_the_field_and_changes_nothing(stub, model_dir: Path, field, overrides) -> None:
    card = uid("card")
    bad = txn(card_id=overrides.pop("card_id", card), **overrides)
    with pytest.raises(grpc.RpcError) as err:
        score(stub, bad)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"transaction.{field}" in err.value.details()
    assert "4111" not in err.value.details()
    # No state changed: the card's next valid transaction is scored as its first.
    good = txn(card_id=card, event_time_ms=BASE_TIME_MS + 1_000)
    assert score(stub, good).fraud_probability == pytest.approx(offline_probabilities(model_dir, [good])[0], abs=1e-12)


def test_missing_transaction_is_refused(stub) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stub.Score(pb.ScoreRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_deadline_already_passed_gets_deadline_exceeded_and_changes_nothing(stub, model_dir: Path) -> None:
    # A negative timeout is a deadline already in the past. (grpc's Python client does not
    # reliably enforce positive sub-millisecond timeouts, so none is used here; the batcher's
    # drop of requests that expire in the queue is tested in tests/service/serving/test_batcher.py.)
    t = txn()
    with pytest.raises(grpc.RpcError) as err:
        score(stub, t, timeout=-1.0)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # Not recorded: the same transaction is scored afresh, as the card's first.
    r = score(stub, t)
    assert r.fraud_probability == pytest.approx(offline_probabilities(model_dir, [t])[0], abs=1e-12)


def test_score_batch_keeps_request_order(stub, model_dir: Path) -> None:
    card = uid("card")
    seq = [txn(card_id=card, event_time_ms=BASE_TIME_MS + 10_000 * i, amount_minor=500 + i) for i in range(5)]
    results = stub.ScoreBatch(pb.ScoreBatchRequest(transactions=seq), timeout=5).results
    assert [r.transaction_id for r in results] == [t.transaction_id for t in seq]
    assert [r.fraud_probability for r in results] == pytest.approx(
        list(offline_probabilities(model_dir, seq)), abs=1e-12, rel=0)


def test_score_batch_limits_and_bad_items(stub) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stub.ScoreBatch(pb.ScoreBatchRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        stub.ScoreBatch(pb.ScoreBatchRequest(transactions=[txn() for _ in range(1001)]), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "1000" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        stub.ScoreBatch(pb.ScoreBatchRequest(transactions=[txn(), txn(currency="")]), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "transactions[1].currency" in err.value.details()


def test_score_stream_answers_in_order(stub, model_dir: Path) -> None:
    card = uid("card")
    seq = [txn(card_id=card, event_time_ms=BASE_TIME_MS + 5_000 * i) for i in range(8)]
    results = list(stub.ScoreStream(iter(pb.ScoreRequest(transaction=t) for t in seq), timeout=10))
    assert [r.transaction_id for r in results] == [t.transaction_id for t in seq]
    assert [r.fraud_probability for r in results] == pytest.approx(
        list(offline_probabilities(model_dir, seq)), abs=1e-12, rel=0)


def test_score_stream_ends_with_the_status_of_a_bad_message(stub) -> None:
    requests = [pb.ScoreRequest(transaction=txn()), pb.ScoreRequest(transaction=txn(amount_minor=0))]
    responses = stub.ScoreStream(iter(requests), timeout=10)
    first = next(responses)
    assert first.transaction_id == requests[0].transaction.transaction_id
    with pytest.raises(grpc.RpcError) as err:
        next(responses)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "stream[1].transaction.amount_minor" in err.value.details()


def _report(t: pb.Transaction, outcome: int, at_ms: int) -> pb.ReportOutcomeRequest:
    return pb.ReportOutcomeRequest(transaction_id=t.transaction_id, card_id=t.card_id, merchant_id=t.merchant_id,
                                   outcome=outcome, reported_time_ms=at_ms)  # type: ignore[arg-type]


def test_report_outcome_feeds_the_features_once(stub, server: ServerProcess) -> None:
    card, merchant = uid("card"), uid("m")
    a = txn(card_id=card, merchant_id=merchant, event_time_ms=BASE_TIME_MS)
    assert not any(r.code == "R_CARD_REPORTED_FRAUD" for r in score(stub, a).reasons)
    before = value(scrape(server), "fraudscore_outcomes_total", outcome="CONFIRMED_FRAUD")
    report = _report(a, pb.CONFIRMED_FRAUD, BASE_TIME_MS + 3_600_000)
    assert stub.ReportOutcome(report, timeout=5).accepted is True
    assert stub.ReportOutcome(report, timeout=5).accepted is False
    assert stub.ReportOutcome(_report(a, pb.CHARGEBACK, BASE_TIME_MS + 9_000_000), timeout=5).accepted is False
    assert value(scrape(server), "fraudscore_outcomes_total", outcome="CONFIRMED_FRAUD") == before + 1
    later = score(stub, txn(card_id=card, merchant_id=uid("m"), event_time_ms=BASE_TIME_MS + 7_200_000))
    assert later.decision == pb.DECLINE
    assert any(r.code == "R_CARD_REPORTED_FRAUD" for r in later.reasons)


def test_a_chargeback_after_a_legitimate_report_still_counts(stub) -> None:
    a = txn(event_time_ms=BASE_TIME_MS)
    score(stub, a)
    assert stub.ReportOutcome(_report(a, pb.CONFIRMED_LEGITIMATE, BASE_TIME_MS + 1_000), timeout=5).accepted
    after_legit = score(stub, txn(card_id=a.card_id, event_time_ms=BASE_TIME_MS + 2_000))
    assert not any(r.code == "R_CARD_REPORTED_FRAUD" for r in after_legit.reasons)
    assert stub.ReportOutcome(_report(a, pb.CHARGEBACK, BASE_TIME_MS + 3_000), timeout=5).accepted
    after_chargeback = score(stub, txn(card_id=a.card_id, event_time_ms=BASE_TIME_MS + 4_000))
    assert any(r.code == "R_CARD_REPORTED_FRAUD" for r in after_chargeback.reasons)


def test_times_ahead_of_the_server_clock_are_refused(stub) -> None:
    ahead_ms = int((time.time() + 3600) * 1000)
    with pytest.raises(grpc.RpcError) as err:
        score(stub, txn(event_time_ms=ahead_ms))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "transaction.event_time_ms" in err.value.details() and "clock" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        stub.ReportOutcome(_report(txn(), pb.CHARGEBACK, ahead_ms), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_duplicate_id_inside_one_batch(stub) -> None:
    a = txn()
    results = stub.ScoreBatch(pb.ScoreBatchRequest(transactions=[a, txn(), a]), timeout=5).results
    assert results[0] == results[2] and results[0].transaction_id == a.transaction_id
    changed = pb.Transaction()
    changed.CopyFrom(a)
    changed.transaction_id = uid("t")
    other = pb.Transaction()
    other.CopyFrom(changed)
    other.amount_minor += 1
    with pytest.raises(grpc.RpcError) as err:
        stub.ScoreBatch(pb.ScoreBatchRequest(transactions=[changed, other]), timeout=5)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    # Refused whole: the first one was not recorded either.
    assert score(stub, other).transaction_id == other.transaction_id


def test_a_score_batch_at_its_maximum_size(stub) -> None:
    seq = [txn() for _ in range(1000)]
    results = stub.ScoreBatch(pb.ScoreBatchRequest(transactions=seq), timeout=60).results
    assert [r.transaction_id for r in results] == [t.transaction_id for t in seq]
    assert all(r.source == pb.MODEL for r in results)


def test_report_outcome_validation(stub) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stub.ReportOutcome(pb.ReportOutcomeRequest(transaction_id="x", card_id="c", merchant_id="m",
                                                   reported_time_ms=BASE_TIME_MS), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "outcome" in err.value.details()


def test_the_server_log_holds_no_identifier(stub, server: ServerProcess) -> None:
    # Runs after the tests above in this module: plenty of identifiers, refusals and a PAN went by.
    score(stub, txn())
    log = server.log()
    assert '"msg":"serving"' in log
    for marker in ("card-", "cust-", "dev-", "4111"):
        assert marker not in log
    assert not re.search(r"\b10\.\d+\.\d+\.\d+\b", log)
