"""Idempotency across a restart, over real server processes: SIGTERM, restart on the same state.

Whether something counted twice is read from the answers themselves: the tests serve a
ruleset with two extra rules that fire only when the card's exact transaction count, or its
confirmed-fraud count, has reached two. A control in the same server shows each rule firing.
"""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import orjson
import pytest
from fraudscore.v1 import fraudscore_pb2 as pb
from fraudscore.v1 import fraudscore_pb2_grpc as pb_grpc

from service.serving.idempotency_store import RECORDS_FILE
from tests.conftest import REPO, ServerProcess, start_server
from tests.e2e.helpers import BASE_TIME_MS, offline_probabilities, scrape, txn, uid, value

SEEN_TWICE = "R_TEST_CARD_SEEN_TWICE"
FRAUD_TWICE = "R_TEST_CARD_FRAUD_TWICE"
HOUR_MS = 3_600_000


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """The packaged rules plus two that make a double count visible in the reasons."""
    rules = orjson.loads((REPO / "service" / "defaults" / "rules.json").read_bytes())
    rules["version"] = "restart-test"
    rules["rules"] += [
        {"name": "test_card_seen_twice", "when": [{"field": "card_txn_count_total", "op": ">=", "value": 1.5}],
         "action": "REVIEW", "reason_code": SEEN_TWICE, "description": "two earlier transactions", "priority": 50},
        {"name": "test_card_fraud_twice", "when": [{"field": "card_fraud_count_30d", "op": ">=", "value": 1.5}],
         "action": "REVIEW", "reason_code": FRAUD_TWICE, "description": "two fraud reports", "priority": 51},
    ]
    path = tmp_path / "rules.json"
    path.write_bytes(orjson.dumps(rules))
    return {"FRAUDSCORE_RULES_FILE": str(path)}


def score(srv: ServerProcess, t: pb.Transaction) -> pb.ScoreResponse:
    with grpc.insecure_channel(srv.target) as ch:
        result: pb.ScoreResponse = pb_grpc.FraudScoringStub(ch).Score(pb.ScoreRequest(transaction=t), timeout=10)
        return result


def report(srv: ServerProcess, t: pb.Transaction, outcome: int, at_ms: int) -> bool:
    request = pb.ReportOutcomeRequest(transaction_id=t.transaction_id, card_id=t.card_id, merchant_id=t.merchant_id,
                                      outcome=outcome, reported_time_ms=at_ms)  # type: ignore[arg-type]
    with grpc.insecure_channel(srv.target) as ch:
        accepted: bool = pb_grpc.FraudScoringStub(ch).ReportOutcome(request, timeout=10).accepted
        return accepted


def codes(r: pb.ScoreResponse) -> set[str]:
    return {reason.code for reason in r.reasons}


def two_of_one_card() -> tuple[str, pb.Transaction, pb.Transaction]:
    """A card and two of its transactions, a small one and a large one 30 s later."""
    card = uid("card")
    return (card, txn(card_id=card, amount_minor=1_000, event_time_ms=BASE_TIME_MS),
            txn(card_id=card, amount_minor=90_000, event_time_ms=BASE_TIME_MS + 30_000))


def restart(srv: ServerProcess, tmp_path: Path, model_dir: Path, state_dir: Path,
            env: dict[str, str]) -> ServerProcess:
    """SIGTERM (a clean exit, final snapshot), then a new process on the same state directory."""
    assert srv.stop() == 0
    assert "state snapshot written" in srv.log()
    assert (state_dir / RECORDS_FILE).exists()
    return start_server(tmp_path, model_dir=model_dir, state_dir=state_dir, extra_env=env)


def test_a_retry_after_a_restart_gets_the_first_answer_and_counts_once(
        tmp_path: Path, model_dir: Path, env: dict[str, str]) -> None:
    state_dir = tmp_path / "state"
    card, a, b = two_of_one_card()
    srv = start_server(tmp_path, model_dir=model_dir, state_dir=state_dir, extra_env=env)
    try:
        first = score(srv, a)
        again = restart(srv, tmp_path, model_dir, state_dir, env)
    finally:
        srv.stop()
    try:
        assert "state restored" in again.log() and "idempotency records restored" in again.log()
        retry = score(again, a)
        later = score(again, b)
        s = scrape(again)
        # Control: a card with two earlier transactions does fire the rule.
        other = uid("card")
        for i in range(2):
            score(again, txn(card_id=other, event_time_ms=BASE_TIME_MS + 1_000 * i))
        control = score(again, txn(card_id=other, event_time_ms=BASE_TIME_MS + 2_000))
    finally:
        assert again.stop() == 0
    assert retry == first  # the identical answer, server_latency_us included
    assert value(s, "fraudscore_idempotent_replays_total") == 1
    assert value(s, "fraudscore_decisions_total") == 1  # only b was scored after the restart
    assert SEEN_TWICE not in codes(later) and SEEN_TWICE in codes(control)
    # b's features are those of a stream in which a counted once.
    assert later.fraud_probability == pytest.approx(offline_probabilities(model_dir, [a, b])[1], abs=1e-12)
    for log in (srv.log(), again.log()):
        assert a.transaction_id not in log and card not in log


def test_a_periodic_snapshot_alone_carries_state_and_answers_across_a_crash(
        tmp_path: Path, model_dir: Path, env: dict[str, str]) -> None:
    # The periodic snapshots are the paced ones (the final one at SIGTERM is not): SIGKILL after
    # one was written leaves only them to restore from.
    state_dir = tmp_path / "state"
    _, a, b = two_of_one_card()
    periodic = env | {"FRAUDSCORE_SNAPSHOT_INTERVAL_S": "0.3"}
    srv = start_server(tmp_path, model_dir=model_dir, state_dir=state_dir, extra_env=periodic)
    try:
        first = score(srv, a)
        # The one being written as `a` was answered may have copied the state before it: the next.
        written = value(scrape(srv), "fraudscore_state_snapshots_total", result="ok")
        deadline = time.monotonic() + 30
        while value(s := scrape(srv), "fraudscore_state_snapshots_total", result="ok") < written + 2:
            assert time.monotonic() < deadline, "no snapshot written within 30 s"
            time.sleep(0.1)
        srv.proc.kill()
        srv.proc.wait(timeout=10)
    finally:
        srv.stop()
    assert value(s, "fraudscore_state_snapshots_total", result="failed") == 0
    assert value(s, "fraudscore_state_snapshot_last_written_timestamp_seconds") > time.time() - 60
    assert 0 < value(s, "fraudscore_state_snapshot_duration_seconds") < 30
    again = start_server(tmp_path, model_dir=model_dir, state_dir=state_dir, extra_env=env)
    try:
        assert "state restored" in again.log() and "idempotency records restored" in again.log()
        retry = score(again, a)
        later = score(again, b)
    finally:
        assert again.stop() == 0
    assert retry == first
    assert later.fraud_probability == pytest.approx(offline_probabilities(model_dir, [a, b])[1], abs=1e-12)


def test_a_repeated_outcome_report_after_a_restart_counts_once(
        tmp_path: Path, model_dir: Path, env: dict[str, str]) -> None:
    state_dir = tmp_path / "state"
    card, merchant = uid("card"), uid("m")
    a = txn(card_id=card, merchant_id=merchant, event_time_ms=BASE_TIME_MS)
    legit = txn(event_time_ms=BASE_TIME_MS)
    srv = start_server(tmp_path, model_dir=model_dir, state_dir=state_dir, extra_env=env)
    try:
        score(srv, a)
        score(srv, legit)
        assert report(srv, a, pb.CONFIRMED_FRAUD, BASE_TIME_MS + HOUR_MS) is True
        assert report(srv, legit, pb.CONFIRMED_LEGITIMATE, BASE_TIME_MS + HOUR_MS) is True
        again = restart(srv, tmp_path, model_dir, state_dir, env)
    finally:
        srv.stop()
    try:
        assert report(again, a, pb.CONFIRMED_FRAUD, BASE_TIME_MS + HOUR_MS) is False
        assert report(again, a, pb.CHARGEBACK, BASE_TIME_MS + HOUR_MS) is False
        assert report(again, legit, pb.CONFIRMED_LEGITIMATE, BASE_TIME_MS + HOUR_MS) is False
        assert value(scrape(again), "fraudscore_outcomes_total") == 0
        later = score(again, txn(card_id=card, merchant_id=uid("m"), event_time_ms=BASE_TIME_MS + 2 * HOUR_MS))
        # A fraud report after a remembered legitimate one still counts.
        assert report(again, legit, pb.CHARGEBACK, BASE_TIME_MS + HOUR_MS) is True
        # Control: two reports on one card do fire the rule.
        other = txn(event_time_ms=BASE_TIME_MS)
        score(again, other)
        for _ in range(2):
            assert report(again, txn(card_id=other.card_id, merchant_id=other.merchant_id), pb.CONFIRMED_FRAUD,
                          BASE_TIME_MS + HOUR_MS) is True
        control = score(again, txn(card_id=other.card_id, event_time_ms=BASE_TIME_MS + 2 * HOUR_MS))
    finally:
        assert again.stop() == 0
    assert "R_CARD_REPORTED_FRAUD" in codes(later)  # the one report survived in state
    assert FRAUD_TWICE not in codes(later) and FRAUD_TWICE in codes(control)


def test_a_damaged_records_file_is_refused_and_the_state_still_restored(
        tmp_path: Path, model_dir: Path, env: dict[str, str]) -> None:
    state_dir = tmp_path / "state"
    a = txn()
    srv = start_server(tmp_path, model_dir=model_dir, state_dir=state_dir, extra_env=env)
    try:
        score(srv, a)
    finally:
        assert srv.stop() == 0
    records = state_dir / RECORDS_FILE
    records.write_bytes(records.read_bytes()[:-7])
    again = start_server(tmp_path, model_dir=model_dir, state_dir=state_dir, extra_env=env)
    try:
        log = again.log()
        assert "idempotency records refused; starting with no idempotency records" in log
        assert "truncated" in log and "state restored" in log
        score(again, a)  # scored again: the documented cost of losing the records
        assert value(scrape(again), "fraudscore_idempotent_replays_total") == 0
    finally:
        assert again.stop() == 0
    assert a.transaction_id not in again.log()
