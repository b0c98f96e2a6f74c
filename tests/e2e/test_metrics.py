"""The /metrics endpoint of a real server, scraped over HTTP after real traffic, against the
list in docs/metrics.md: every metric there, of its type, with its labels and unit suffix,
nothing unlisted, and every label value from its bounded set."""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from fraudscore.v1 import fraudscore_pb2 as pb
from fraudscore.v1 import fraudscore_pb2_grpc as pb_grpc
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from service.runtime.metrics import STAGES
from service.runtime.reload import load_rules
from tests.conftest import ServerProcess, start_server
from tests.e2e.helpers import BASE_TIME_MS, txn, uid
from tests.metrics_doc import documented_metrics, label_values

# Labels whose values are not listed one by one: bounded by configuration, checked below.
_OPEN_LABELS = {"rule", "model_version", "ruleset_version", "feature_set_version"}
_VERSION_LABELS = {"model_version", "ruleset_version", "feature_set_version"}
# Base units only (Prometheus naming): seconds and bytes, never milli/micro or kilo/mega.
_FORBIDDEN_UNITS = re.compile(r"_(ms|us|ns|millis|milliseconds|microseconds|minutes|hours|kb|mb|kib|mib|percent)(_|$)")
_TIME_WORDS = re.compile(r"(duration|latency|_wait|busy|expected|_time|cpu)")


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[dict[str, tuple[str, list[Sample]]]]:
    """A server with a challenger (the same model in shadow), after Score, ScoreBatch, ScoreStream,
    ReportOutcome, a refused call and a rule-hitting burst: its families by parsed name."""
    tmp = tmp_path_factory.mktemp("metrics")
    srv: ServerProcess = start_server(tmp, model_dir=model_dir,
                                      extra_env={"FRAUDSCORE_CHALLENGER_MODEL_DIR": str(model_dir)})
    try:
        with grpc.insecure_channel(srv.target) as ch:
            stub = pb_grpc.FraudScoringStub(ch)
            first = txn()
            stub.Score(pb.ScoreRequest(transaction=first), timeout=10)
            stub.ScoreBatch(pb.ScoreBatchRequest(transactions=[txn() for _ in range(5)]), timeout=10)
            list(stub.ScoreStream(iter([pb.ScoreRequest(transaction=txn()) for _ in range(3)]), timeout=10))
            card = uid("card")  # a card-testing burst: rule hits
            for i in range(7):
                stub.Score(pb.ScoreRequest(transaction=txn(card_id=card, amount_minor=150,
                                                            event_time_ms=BASE_TIME_MS + 1_000 * i)), timeout=10)
            stub.ReportOutcome(pb.ReportOutcomeRequest(
                transaction_id=first.transaction_id, card_id=first.card_id, merchant_id=first.merchant_id,
                outcome=pb.CONFIRMED_FRAUD, reported_time_ms=BASE_TIME_MS + 60_000), timeout=10)
            with pytest.raises(grpc.RpcError):
                stub.Score(pb.ScoreRequest(transaction=txn(currency="")), timeout=10)
        with urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
    finally:
        srv.stop()
    yield {f.name: (f.type, f.samples) for f in text_string_to_metric_families(text)}


def test_every_documented_metric_is_exported_with_its_type_and_labels(
        scraped: dict[str, tuple[str, list[Sample]]]) -> None:
    for metric in documented_metrics().values():
        assert metric.family in scraped, f"{metric.name} is documented but not exported"
        kind, samples = scraped[metric.family]
        assert kind == metric.type, f"{metric.name}: exported as {kind}, documented as {metric.type}"
        # A labelled counter has no series until its first event (a fallback, a reload...).
        assert samples or metric.labels, f"{metric.name} has no samples after the test's traffic"
        for s in samples:
            assert set(s.labels) - {"le"} == metric.labels, f"{s.name}: labels {sorted(s.labels)}"


def test_nothing_is_exported_that_is_not_documented(scraped: dict[str, tuple[str, list[Sample]]]) -> None:
    documented = {m.family for m in documented_metrics().values()}
    ours = {name for name in scraped if name.startswith("fraudscore_")}
    assert ours <= documented, f"exported but not in docs/metrics.md: {sorted(ours - documented)}"


def test_names_follow_the_prometheus_conventions(scraped: dict[str, tuple[str, list[Sample]]]) -> None:
    for metric in documented_metrics().values():
        assert re.fullmatch(r"[a-z][a-z0-9_]*", metric.name), metric.name
        assert (metric.type == "counter") == metric.name.endswith("_total"), \
            f"{metric.name}: counters, and only counters, end in _total"
        assert not _FORBIDDEN_UNITS.search(metric.name), f"{metric.name}: use base units (seconds, bytes)"
        if _TIME_WORDS.search(metric.name):
            assert re.search(r"_seconds(_total)?$", metric.name), f"{metric.name}: a time is in _seconds"
        if "memory" in metric.name:
            assert metric.name.endswith("_bytes"), f"{metric.name}: a size is in _bytes"
        if metric.name.endswith("_info"):
            assert metric.type == "gauge"
            assert all(s.value == 1 for s in scraped[metric.family][1])
        for s in scraped[metric.family][1]:
            if metric.type == "counter":
                assert s.name in (metric.name, metric.family + "_created")


def test_label_values_come_from_bounded_sets(scraped: dict[str, tuple[str, list[Sample]]]) -> None:
    allowed = label_values()
    rules = load_rules(None)  # the packaged defaults, as the test server runs
    rule_names = {r.name for r in (*rules.rules.rules, *rules.fallback.rules)}
    assert allowed["stage"] == set(STAGES), "docs/metrics.md and service.runtime.metrics.STAGES differ"
    assert allowed["code"] == {c.name for c in grpc.StatusCode}
    for metric in documented_metrics().values():
        _, samples = scraped[metric.family]
        for label in metric.labels:
            assert label in allowed, f"{metric.name}: label {label} has no values in docs/metrics.md"
            values = {s.labels[label] for s in samples}
            if label == "rule":
                assert values <= rule_names, f"{metric.name}: unknown rules {values - rule_names}"
            elif label in _VERSION_LABELS:
                assert len(values) <= 1, f"{metric.name}: {label} should have one series, has {values}"
            else:
                assert label not in _OPEN_LABELS
                assert values <= allowed[label], f"{metric.name}{{{label}}}: {sorted(values - allowed[label])}"


def test_the_traffic_shows_in_the_new_metrics(scraped: dict[str, tuple[str, list[Sample]]]) -> None:
    def total(family: str, suffix: str, **labels: str) -> float:
        return sum(s.value for s in scraped[family][1]
                   if s.name == family + suffix and all(s.labels.get(k) == v for k, v in labels.items()))

    for stage in ("queue_wait", "encode", "features", "model_rules", "challenger", "respond"):
        assert total("fraudscore_stage_duration_seconds", "_count", stage=stage) >= 1, stage
    batches = total("fraudscore_batch_size", "_count")
    assert total("fraudscore_stage_duration_seconds", "_count", stage="features") == batches
    assert total("fraudscore_pipeline_duration_seconds", "_count") == batches
    assert total("fraudscore_batch_size", "_sum") == 16  # 1 + 5 + 3 + 7 transactions
    assert total("fraudscore_fraud_probability", "_count") == 16
    assert total("fraudscore_request_duration_seconds", "_count", method="Score", code="INVALID_ARGUMENT") == 1
    assert total("fraudscore_request_duration_seconds", "_count", method="ScoreStream", code="OK") == 1
    assert total("fraudscore_stream_message_duration_seconds", "_count") == 3  # each message of the stream
    assert total("fraudscore_outcomes", "_total", outcome="CONFIRMED_FRAUD") == 1
    assert total("fraudscore_rule_hits", "_total") >= 1
    assert total("fraudscore_challenger_probability", "_count") == 16
    assert total("process_resident_memory_bytes", "") > 0
