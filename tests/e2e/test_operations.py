"""Operations over real server processes: health, reflection, metrics, fallback, shutdown, restart."""

from __future__ import annotations

import re
import signal
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from fraudscore.v1 import fraudscore_pb2 as pb
from fraudscore.v1 import fraudscore_pb2_grpc as pb_grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from core.encode import KeyHasher
from core.features import FEATURE_SET_VERSION, EntityState
from tests.conftest import REPO, ServerProcess, start_server
from tests.e2e.helpers import BASE_TIME_MS, offline_probabilities, scrape, status_codes, txn, uid, value

SERVICE = "fraudscore.v1.FraudScoring"


def test_health_reports_serving_for_the_server_and_the_service(server: ServerProcess) -> None:
    with grpc.insecure_channel(server.target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for name in ("", SERVICE):
            assert stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status == \
                health_pb2.HealthCheckResponse.SERVING


def test_a_generic_client_can_call_score_through_reflection(server: ServerProcess) -> None:
    """What grpcurl does: discover the service, fetch descriptors, build the request dynamically."""
    with grpc.insecure_channel(server.target) as ch:
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        (listing,) = refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for s in listing.list_services_response.service}
        assert {SERVICE, "grpc.health.v1.Health"} <= names
        (files,) = refl.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE)]))
        pool = descriptor_pool.DescriptorPool()
        for raw in files.file_descriptor_response.file_descriptor_proto:
            pool.Add(descriptor_pb2.FileDescriptorProto.FromString(raw))
        request_cls = message_factory.GetMessageClass(pool.FindMessageTypeByName("fraudscore.v1.ScoreRequest"))
        response_cls = message_factory.GetMessageClass(pool.FindMessageTypeByName("fraudscore.v1.ScoreResponse"))
        request = request_cls()
        request.transaction.transaction_id = uid("t")
        request.transaction.card_id = uid("card")
        request.transaction.merchant_id = uid("m")
        request.transaction.amount_minor = 1999
        request.transaction.currency = "EUR"
        request.transaction.event_time_ms = BASE_TIME_MS
        call = ch.unary_unary(f"/{SERVICE}/Score", request_serializer=lambda m: m.SerializeToString(),
                              response_deserializer=response_cls.FromString)
        response = call(request, timeout=5)
        assert response.transaction_id == request.transaction.transaction_id
        assert 0.0 <= response.fraud_probability <= 1.0


def test_metrics_endpoint_exports_what_the_server_did(server: ServerProcess) -> None:
    with grpc.insecure_channel(server.target) as ch:
        stub = pb_grpc.FraudScoringStub(ch)
        for _ in range(3):
            stub.Score(pb.ScoreRequest(transaction=txn()), timeout=5)
        with pytest.raises(grpc.RpcError):
            stub.Score(pb.ScoreRequest(transaction=txn(currency="")), timeout=5)
    s = scrape(server)
    assert value(s, "fraudscore_requests_total", method="Score", code="OK") >= 3
    assert value(s, "fraudscore_requests_total", method="Score", code="INVALID_ARGUMENT") >= 1
    assert value(s, "fraudscore_request_duration_seconds_count", method="Score") >= 4
    assert value(s, "fraudscore_batch_size_count") >= 1
    assert value(s, "fraudscore_decisions_total", source="MODEL") >= 3
    assert value(s, "fraudscore_model_loaded") == 1
    (info,) = s["fraudscore_model_info"]
    assert info[0]["model_version"].startswith("gbm-") and info[0]["feature_set_version"].startswith("fs-")
    assert value(s, "fraudscore_state_entities", kind="card") >= 3
    assert value(s, "fraudscore_state_capacity", kind="card") == 4096


def _fallback_checks(srv: ServerProcess, reason: str) -> None:
    with grpc.insecure_channel(srv.target) as ch:
        stub = pb_grpc.FraudScoringStub(ch)
        card = uid("card")
        small = [txn(card_id=card, amount_minor=150, event_time_ms=BASE_TIME_MS + 1_000 * i) for i in range(7)]
        answers = [stub.Score(pb.ScoreRequest(transaction=t), timeout=5) for t in small]
    for r in answers:
        assert r.degraded and r.source == pb.RULES_FALLBACK
        assert r.model_version == ""
        assert r.ruleset_version
    # The fallback ruleset is a considered policy: a card-testing burst gets declined.
    assert answers[0].decision == pb.APPROVE
    assert answers[-1].decision == pb.DECLINE
    assert any(x.code == "R_CARD_TESTING" for x in answers[-1].reasons)
    assert value(scrape(srv), "fraudscore_fallbacks_total", reason=reason) >= len(small)


def test_rules_fallback_answers_when_the_model_path_raises(tmp_path: Path, model_dir: Path) -> None:
    srv = start_server(tmp_path, model_dir=model_dir, extra_env={"FRAUDSCORE_FAULT_INJECTION": "model-raise"})
    try:
        _fallback_checks(srv, "model_error")
        assert "model path failed" in srv.log()
    finally:
        assert srv.stop() == 0


def test_without_a_model_the_service_still_answers_from_rules(tmp_path: Path) -> None:
    srv = start_server(tmp_path, model_dir=None)
    try:
        _fallback_checks(srv, "no_model")
        assert value(scrape(srv), "fraudscore_model_loaded") == 0
    finally:
        assert srv.stop() == 0


def test_sigterm_drains_snapshots_state_and_a_restart_restores_it(tmp_path: Path, model_dir: Path) -> None:
    state_dir = tmp_path / "state"
    srv = start_server(tmp_path, model_dir=model_dir, state_dir=state_dir)
    card = uid("card")
    a = txn(card_id=card, amount_minor=1_000, event_time_ms=BASE_TIME_MS)
    # Same card, device, IP and merchant: b's features depend on a through every entity kind, so
    # `expected != as_if_new` below holds whatever the test model learnt (a small model may
    # ignore a card's history alone, as one trained on other key bits did).
    b = txn(card_id=card, amount_minor=90_000, event_time_ms=BASE_TIME_MS + 30_000, device_id=a.device_id,
            ip_address=a.ip_address, merchant_id=a.merchant_id)
    results: list[grpc.StatusCode] = []

    def load() -> None:
        # Eight calls in flight at a time, so there is queued work when SIGTERM arrives.
        with grpc.insecure_channel(srv.target) as ch:
            stub = pb_grpc.FraudScoringStub(ch)
            for _ in range(100):
                calls = [stub.Score.future(pb.ScoreRequest(transaction=txn()), timeout=10) for _ in range(8)]
                results.extend(status_codes(calls))
                if any(code != grpc.StatusCode.OK for code in results):
                    return

    try:
        with grpc.insecure_channel(srv.target) as ch:
            pb_grpc.FraudScoringStub(ch).Score(pb.ScoreRequest(transaction=a), timeout=5)
        worker = threading.Thread(target=load)
        worker.start()
        deadline = time.monotonic() + 60
        while len(results) < 40 and worker.is_alive() and time.monotonic() < deadline:
            worker.join(0.01)
        assert len(results) >= 40, f"load did not get going: {results}"
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(timeout=30) == 0
        worker.join(30)
        assert not worker.is_alive()
    finally:
        srv.stop()
    # Calls finished or were refused as the server closed: UNAVAILABLE from our handler, or
    # CANCELLED from grpc itself for a call that raced the listener's close. Nothing else.
    assert results.count(grpc.StatusCode.OK) >= 40
    assert set(results) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}
    log = srv.log()
    assert "draining" in log and "state snapshot written" in log and "stopped" in log
    assert (state_dir / "state.npz").exists()

    again = start_server(tmp_path, model_dir=model_dir, state_dir=state_dir)
    try:
        assert "state restored" in again.log()
        with grpc.insecure_channel(again.target) as ch:
            p_b = pb_grpc.FraudScoringStub(ch).Score(pb.ScoreRequest(transaction=b), timeout=5).fraud_probability
    finally:
        assert again.stop() == 0
    expected = offline_probabilities(model_dir, [a, b])[1]
    as_if_new = offline_probabilities(model_dir, [b])[0]
    assert expected != as_if_new
    assert p_b == pytest.approx(expected, abs=1e-12)


def test_a_corrupt_snapshot_is_refused_and_the_server_starts_empty(tmp_path: Path, model_dir: Path) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / "state.npz").write_bytes(np.random.default_rng(1).bytes(4096))
    srv = start_server(tmp_path, model_dir=model_dir, state_dir=state_dir)
    try:
        assert "state snapshot refused" in srv.log()
        with grpc.insecure_channel(srv.target) as ch:
            r = pb_grpc.FraudScoringStub(ch).Score(pb.ScoreRequest(transaction=txn()), timeout=5)
        assert r.source == pb.MODEL
    finally:
        assert srv.stop() == 0


def test_a_burst_beyond_the_queue_bound_is_shed_and_counted(tmp_path: Path, model_dir: Path) -> None:
    srv = start_server(tmp_path, model_dir=model_dir, extra_env={
        "FRAUDSCORE_MAX_BATCH": "1", "FRAUDSCORE_MAX_QUEUE": "4", "FRAUDSCORE_MAX_BATCH_REQUEST": "4",
        "FRAUDSCORE_FAULT_INJECTION": "model-slow"})  # 200 ms per batch of one: the queue stays full
    try:
        with grpc.insecure_channel(srv.target) as ch:
            stub = pb_grpc.FraudScoringStub(ch)
            first = [txn() for _ in range(4)]
            refused = [txn() for _ in range(4)]
            running = stub.ScoreBatch.future(pb.ScoreBatchRequest(transactions=first), timeout=30)
            time.sleep(0.1)
            with pytest.raises(grpc.RpcError) as err:
                stub.ScoreBatch(pb.ScoreBatchRequest(transactions=refused), timeout=30)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "retry with backoff" in err.value.details()
            assert [r.transaction_id for r in running.result().results] == [t.transaction_id for t in first]
            assert value(scrape(srv), "fraudscore_sheds_total", reason="queue_full") == 4
            # Refused whole and recorded nothing: the same transactions are scored later, as new.
            later = stub.ScoreBatch(pb.ScoreBatchRequest(transactions=refused), timeout=30).results
            assert [r.transaction_id for r in later] == [t.transaction_id for t in refused]
            assert value(scrape(srv), "fraudscore_idempotent_replays_total") == 0
            # A burst of concurrent calls: each one is answered or shed, nothing else. Shed by the
            # handler past the queue bound (counted), or by gRPC past its call slots or its own short
            # queue (RESOURCE_EXHAUSTED or CANCELLED, before any handler: no server metric sees those).
            calls = [stub.Score.future(pb.ScoreRequest(transaction=txn()), timeout=60) for _ in range(40)]
            codes = status_codes(calls)
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED}
        assert grpc.StatusCode.OK in codes
        by_handler = value(scrape(srv), "fraudscore_sheds_total", reason="queue_full") - 4
        assert by_handler > 0
        assert value(scrape(srv), "fraudscore_requests_total", method="Score", code="RESOURCE_EXHAUSTED") == by_handler
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= by_handler
    finally:
        assert srv.stop() == 0


def test_alert_rules_refer_only_to_exported_metrics(server: ServerProcess) -> None:
    import yaml

    rules = yaml.safe_load((REPO / "deploy" / "prometheus" / "alerts.yaml").read_text())
    exprs = [r["expr"] for group in rules["groups"] for r in group["rules"]]
    assert len(exprs) >= 5
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5) as resp:
        families = {f.name for f in text_string_to_metric_families(resp.read().decode())}
    used = {name for e in exprs for name in re.findall(r"\bfraudscore_[a-z0-9_]+", e)}
    for name in used:
        family = re.sub(r"_(total|bucket|count|sum)$", "", name)
        assert family in families, f"{name} is not exported"


def test_requests_past_the_budget_get_the_fallback_at_once_and_still_enter_the_state(tmp_path: Path,
                                                                                       model_dir: Path) -> None:
    # A 1 µs budget has always run out by the time a batch is taken.
    srv = start_server(tmp_path, model_dir=model_dir, extra_env={"FRAUDSCORE_BUDGET_MS": "0.001"})
    try:
        with grpc.insecure_channel(srv.target) as ch:
            stub = pb_grpc.FraudScoringStub(ch)
            big = stub.Score(pb.ScoreRequest(transaction=txn(amount_minor=900_000)), timeout=10)
            batch = stub.ScoreBatch(pb.ScoreBatchRequest(transactions=[txn() for _ in range(3)]), timeout=10)
        for r in (big, *batch.results):
            assert r.degraded and r.source == pb.RULES_FALLBACK
        assert big.decision == pb.REVIEW  # the fallback's very-large-amount rule, not a constant
        s = scrape(srv)
        assert value(s, "fraudscore_fallbacks_total", reason="over_budget") == 4
        assert value(s, "fraudscore_decisions_total") == 4  # each answer counted once
        # Answered by the fallback, and in the state all the same: features only, no model.
        assert value(s, "fraudscore_state_entities", kind="card") == 4
        assert value(s, "fraudscore_features_only_total") == 4
        assert value(s, "fraudscore_answered_backlog") == 0
    finally:
        assert srv.stop() == 0


def test_a_retry_while_the_first_call_runs_waits_for_the_same_answer(tmp_path: Path, model_dir: Path) -> None:
    srv = start_server(tmp_path, model_dir=model_dir, extra_env={"FRAUDSCORE_FAULT_INJECTION": "model-slow"})
    try:
        with grpc.insecure_channel(srv.target) as ch:
            stub = pb_grpc.FraudScoringStub(ch)
            t = txn()
            first = stub.Score.future(pb.ScoreRequest(transaction=t), timeout=30)
            time.sleep(0.05)
            retry = stub.Score.future(pb.ScoreRequest(transaction=t), timeout=30)
            assert first.result() == retry.result()
        s = scrape(srv)
        assert value(s, "fraudscore_idempotent_replays_total") == 1
        assert value(s, "fraudscore_decisions_total") == 1  # scored once
    finally:
        assert srv.stop() == 0


def test_calls_the_slow_model_path_cannot_answer_in_time_get_the_fallback_before_their_deadline(
        tmp_path: Path, model_dir: Path) -> None:
    srv = start_server(tmp_path, model_dir=model_dir, extra_env={
        "FRAUDSCORE_FAULT_INJECTION": "model-slow", "FRAUDSCORE_MAX_BATCH": "1"})  # 200 ms per transaction
    try:
        with grpc.insecure_channel(srv.target) as ch:
            stub = pb_grpc.FraudScoringStub(ch)
            started = time.monotonic()
            calls = [stub.Score.future(pb.ScoreRequest(transaction=txn()), timeout=0.3) for _ in range(5)]
            answers = [c.result() for c in calls]  # five calls of 200 ms each: no DEADLINE_EXCEEDED all the same
            took = time.monotonic() - started
        assert took < 0.3
        degraded = [a for a in answers if a.degraded]
        assert len(degraded) >= 3 and all(a.source == pb.RULES_FALLBACK for a in degraded)
        assert all(a.source != pb.RULES_FALLBACK for a in answers if not a.degraded)
        s = scrape(srv)
        assert value(s, "fraudscore_fallbacks_total", reason="expected_over_budget") == len(degraded)
        assert value(s, "fraudscore_requests_total", method="Score", code="OK") == 5
    finally:
        assert srv.stop() == 0
    assert "Traceback" not in srv.log()


def test_a_stalled_pipeline_thread_does_not_stop_the_answers_and_the_model_path_comes_back(
        tmp_path: Path, model_dir: Path) -> None:
    srv = start_server(tmp_path, model_dir=model_dir, extra_env={
        "FRAUDSCORE_FAULT_INJECTION": "pipeline-stall", "FRAUDSCORE_BUDGET_MS": "50"})  # the first batch: 2 s
    try:
        with grpc.insecure_channel(srv.target) as ch:
            stub = pb_grpc.FraudScoringStub(ch)
            stuck = stub.Score.future(pb.ScoreRequest(transaction=txn()), timeout=10)
            time.sleep(0.2)
            during = []
            for _ in range(10):
                t0 = time.monotonic()
                during.append(stub.Score(pb.ScoreRequest(transaction=txn()), timeout=10))
                assert time.monotonic() - t0 < 0.25  # the budget plus a loaded machine's slack
            first = stuck.result()
            assert first.degraded  # answered by the fallback within its budget, not after the stall
            assert all(a.degraded and a.source == pb.RULES_FALLBACK for a in during)
            time.sleep(2.0)  # the stall ends; the next calls go through the model again
            after = stub.Score(pb.ScoreRequest(transaction=txn()), timeout=10)
        assert not after.degraded and after.source in (pb.MODEL, pb.RULES)
        s = scrape(srv)
        assert value(s, "fraudscore_fallbacks_total", reason="expected_over_budget") == 11
        # Every one of the 12 entered the state once: the stalled batch's (its late model answer
        # dropped, and not counted), the 10 answered by the fallback meanwhile, and the last.
        assert value(s, "fraudscore_state_entities", kind="card") == 12
        assert value(s, "fraudscore_features_only_total") == 10
        assert value(s, "fraudscore_decisions_total") == 12
        assert value(s, "fraudscore_decisions_total", source="RULES_FALLBACK") == 11
    finally:
        assert srv.stop() == 0


def test_a_stream_past_its_message_limit_ends_with_resource_exhausted_after_answering_the_rest(
        tmp_path: Path, model_dir: Path) -> None:
    srv = start_server(tmp_path, model_dir=model_dir, extra_env={"FRAUDSCORE_MAX_STREAM_MESSAGES": "3"})
    try:
        with grpc.insecure_channel(srv.target) as ch:
            stub = pb_grpc.FraudScoringStub(ch)
            sent = [txn() for _ in range(5)]
            answers = []
            with pytest.raises(grpc.RpcError) as err:
                for answer in stub.ScoreStream(iter(pb.ScoreRequest(transaction=t) for t in sent), timeout=30):
                    answers.append(answer)
        assert [a.transaction_id for a in answers] == [t.transaction_id for t in sent[:3]]
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "FRAUDSCORE_MAX_STREAM_MESSAGES" in err.value.details()
    finally:
        assert srv.stop() == 0


def test_with_shed_mode_fallback_a_full_queue_answers_degraded_instead_of_refusing(
        tmp_path: Path, model_dir: Path) -> None:
    srv = start_server(tmp_path, model_dir=model_dir, extra_env={
        "FRAUDSCORE_MAX_BATCH": "1", "FRAUDSCORE_MAX_QUEUE": "2", "FRAUDSCORE_MAX_BATCH_REQUEST": "2",
        "FRAUDSCORE_FAULT_INJECTION": "model-slow", "FRAUDSCORE_SHED_MODE": "fallback"})
    try:
        with grpc.insecure_channel(srv.target) as ch:
            stub = pb_grpc.FraudScoringStub(ch)
            calls = [stub.Score.future(pb.ScoreRequest(transaction=txn()), timeout=30) for _ in range(8)]
            answers = [c.result() for c in calls]  # nothing refused
        shed = [a for a in answers if a.degraded]
        assert shed and all(a.source == pb.RULES_FALLBACK for a in shed)
        s = scrape(srv)
        assert value(s, "fraudscore_fallbacks_total", reason="queue_full") == len(shed)
        assert value(s, "fraudscore_requests_total", method="Score", code="RESOURCE_EXHAUSTED") == 0
    finally:
        assert srv.stop() == 0


def test_a_stream_keeps_several_messages_in_flight(tmp_path: Path, model_dir: Path) -> None:
    srv = start_server(tmp_path, model_dir=model_dir, extra_env={"FRAUDSCORE_FAULT_INJECTION": "model-slow"})
    try:
        seq = [txn() for _ in range(12)]
        with grpc.insecure_channel(srv.target) as ch:
            results = list(pb_grpc.FraudScoringStub(ch).ScoreStream(
                iter(pb.ScoreRequest(transaction=t) for t in seq), timeout=60))
        assert [r.transaction_id for r in results] == [t.transaction_id for t in seq]
        s = scrape(srv)
        # One message per round trip would take 12 pipeline calls of 200 ms each.
        assert value(s, "fraudscore_batch_size_sum") == 12
        assert value(s, "fraudscore_batch_size_count") <= 6
    finally:
        assert srv.stop() == 0


def test_a_client_cancelling_mid_batch_loses_nothing_and_its_retry_counts_nothing_twice(
        tmp_path: Path, model_dir: Path) -> None:
    srv = start_server(tmp_path, model_dir=model_dir, extra_env={"FRAUDSCORE_FAULT_INJECTION": "model-slow"})
    try:
        with grpc.insecure_channel(srv.target) as ch:
            stub = pb_grpc.FraudScoringStub(ch)
            batch = [txn() for _ in range(3)]
            call = stub.ScoreBatch.future(pb.ScoreBatchRequest(transactions=batch), timeout=30)
            time.sleep(0.05)  # in the pipeline now (200 ms a batch)
            assert call.cancel()
            with pytest.raises(grpc.FutureCancelledError):
                call.result()
            # Accepted work is finished even when its caller leaves; the retry gets those answers.
            retry = stub.ScoreBatch(pb.ScoreBatchRequest(transactions=batch), timeout=30)
        assert [r.transaction_id for r in retry.results] == [t.transaction_id for t in batch]
        assert not any(r.degraded for r in retry.results)
        deadline = time.monotonic() + 10
        while value(scrape(srv), "fraudscore_requests_total", method="ScoreBatch", code="CANCELLED") < 1:
            assert time.monotonic() < deadline, "the cancelled call was not counted"
            time.sleep(0.05)
        s = scrape(srv)
        assert value(s, "fraudscore_idempotent_replays_total") == 3
        assert value(s, "fraudscore_decisions_total") == 3  # scored once each
        assert value(s, "fraudscore_state_entities", kind="card") == 3
        assert value(s, "fraudscore_requests_total", method="ScoreBatch", code="OK") == 1
    finally:
        assert srv.stop() == 0


def test_a_message_over_the_size_limit_is_refused_with_a_status_and_the_server_keeps_serving(
        tmp_path: Path, model_dir: Path) -> None:
    srv = start_server(tmp_path, model_dir=model_dir, extra_env={"FRAUDSCORE_MAX_MESSAGE_BYTES": "4096"})
    try:
        with grpc.insecure_channel(srv.target) as ch:
            stub = pb_grpc.FraudScoringStub(ch)
            with pytest.raises(grpc.RpcError) as err:
                stub.ScoreBatch(pb.ScoreBatchRequest(transactions=[txn() for _ in range(60)]), timeout=10)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert stub.Score(pb.ScoreRequest(transaction=txn()), timeout=10).transaction_id
        assert value(scrape(srv), "fraudscore_state_entities", kind="card") == 1  # the refused batch changed nothing
    finally:
        assert srv.stop() == 0


def test_state_keyed_otherwise_is_refused_at_restart_and_the_server_starts_empty(tmp_path: Path,
                                                                                  model_dir: Path) -> None:
    # Keys made with another FRAUDSCORE_ID_HASH_KEY, or by xxh64 before keyed BLAKE2b, would never
    # match a card again: the snapshot is refused whole, saying why, never mixed in.
    state_dir, snapshot = tmp_path / "state", tmp_path / "state" / "state.npz"
    first_key, second_key = "first-secret-0123456789abcdef", "second-secret-0123456789abcdef"
    logs: list[str] = []

    def serve(key: str, *, score: bool = False) -> str:
        srv = start_server(tmp_path, model_dir=model_dir, state_dir=state_dir,
                           extra_env={"FRAUDSCORE_ID_HASH_KEY": key})
        try:
            if score:
                with grpc.insecure_channel(srv.target) as ch:
                    pb_grpc.FraudScoringStub(ch).Score(pb.ScoreRequest(transaction=txn()), timeout=5)
        finally:
            assert srv.stop() == 0  # SIGTERM: a final snapshot, stamped with this key
        logs.append(srv.log())
        return logs[-1]

    serve(first_key, score=True)
    assert "state restored" in serve(first_key)  # the same key: restored
    log = serve(second_key)
    assert "state snapshot refused; starting with empty state" in log and "state restored" not in log
    assert "another FRAUDSCORE_ID_HASH_KEY" in log
    assert "state restored" in serve(second_key)  # the snapshot written at that shutdown is the new key's

    EntityState.empty(card_capacity=4096, merchant_capacity=4096, customer_capacity=4096, device_capacity=4096,
                      ip_capacity=4096).save(snapshot, feature_set_version=FEATURE_SET_VERSION)
    log = serve(second_key)
    assert "state snapshot refused; starting with empty state" in log and "xxh64" in log

    for text in logs:  # never the key, nor its fingerprint
        assert first_key not in text and second_key not in text
        assert KeyHasher(first_key.encode()).fingerprint not in text
        assert KeyHasher(second_key.encode()).fingerprint not in text
