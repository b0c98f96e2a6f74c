"""Builders shared by the end-to-end tests."""

from __future__ import annotations

import itertools
import threading
import urllib.request
import uuid
from collections.abc import Sequence
from pathlib import Path

import grpc
import numpy as np
from fraudscore.v1 import fraudscore_pb2 as pb
from fraudscore.v1 import fraudscore_pb2_grpc as pb_grpc
from prometheus_client.parser import text_string_to_metric_families

from core.history.table import History
from core.model import load_model_dir
from core.offline.replay import replay_features
from tests.conftest import ServerProcess

BASE_TIME_MS = 1_767_225_600_000
_ips = itertools.count(1)


def unique_ip() -> str:
    """A documentation-range-free, never-repeated IPv4 string (data only; nothing connects to it)."""
    i = next(_ips)
    return f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def txn(**overrides: object) -> pb.Transaction:
    """A valid transaction with fresh identifiers; override any field."""
    fields: dict[str, object] = {
        "transaction_id": uid("t"), "card_id": uid("card"), "customer_id": uid("cust"), "merchant_id": uid("m"),
        "merchant_category": "5411", "amount_minor": 4_250, "currency": "USD", "event_time_ms": BASE_TIME_MS,
        "channel": pb.ECOMMERCE, "country": "US", "latitude": 40.71, "longitude": -74.0,
        "device_id": uid("dev"), "ip_address": unique_ip(),
    }
    fields.update(overrides)
    return pb.Transaction(**fields)  # type: ignore[arg-type]


def history_of(txns: Sequence[pb.Transaction]) -> History:
    """The transactions as an offline history (unlabelled)."""
    n = len(txns)
    def strings(name: str) -> np.ndarray:
        return np.array([getattr(t, name) for t in txns], dtype=object)
    return History(
        transaction_id=strings("transaction_id"), card_id=strings("card_id"), customer_id=strings("customer_id"),
        merchant_id=strings("merchant_id"), merchant_category=strings("merchant_category"),
        amount_minor=np.array([t.amount_minor for t in txns], dtype=np.int64), currency=strings("currency"),
        event_time_ms=np.array([t.event_time_ms for t in txns], dtype=np.int64),
        channel=np.array([t.channel for t in txns], dtype=np.int8), country=strings("country"),
        latitude=np.array([t.latitude if t.HasField("latitude") else np.nan for t in txns]),
        longitude=np.array([t.longitude if t.HasField("longitude") else np.nan for t in txns]),
        device_id=strings("device_id"), ip_address=strings("ip_address"),
        is_fraud=np.zeros(n, dtype=np.int8), fraud_reported_time_ms=np.full(n, -1, dtype=np.int64),
        received_time_ms=np.full(n, -1, dtype=np.int64),
    )


def offline_probabilities(model_dir: Path, txns: Sequence[pb.Transaction]) -> np.ndarray:
    """What the offline path (replay + forest) says for these transactions from empty state."""
    model = load_model_dir(model_dir)
    features = replay_features(history_of(txns))
    return model.forest.predict(features)


def status_codes(calls: Sequence[grpc.Future]) -> list[grpc.StatusCode]:
    """The status code each finished call ended with (OK for an answer)."""
    codes = []
    for call in calls:
        try:
            call.result()
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as exc:
            codes.append(exc.code())
    return codes


Samples = dict[str, list[tuple[dict[str, str], float]]]


def scrape(srv: ServerProcess) -> Samples:
    """Samples by name from a real HTTP scrape of /metrics, parsed by Prometheus' own parser."""
    with urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append((s.labels, s.value))
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    return sum(v for lab, v in samples.get(name, []) if all(lab.get(k) == w for k, w in labels.items()))


class BackgroundLoad:
    """Score and ScoreBatch calls kept in flight from a thread while a test changes the server
    (six unary calls and a batch of eight at a time, so batches run during the change).
    `answers` collects every answer; `failures` any exception; stopped on leaving the block."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.answers: list[pb.ScoreResponse] = []
        self.failures: list[BaseException] = []
        self._done = threading.Event()
        self._worker = threading.Thread(target=self._run)

    def _run(self) -> None:
        try:
            with grpc.insecure_channel(self.target) as ch:
                stub = pb_grpc.FraudScoringStub(ch)
                while not self._done.is_set():
                    calls = [stub.Score.future(pb.ScoreRequest(transaction=txn()), timeout=10) for _ in range(6)]
                    batch = stub.ScoreBatch.future(pb.ScoreBatchRequest(transactions=[txn() for _ in range(8)]),
                                                   timeout=10)
                    self.answers.extend(c.result() for c in calls)
                    self.answers.extend(batch.result().results)
        except BaseException as exc:  # reported by the test
            self.failures.append(exc)

    def __enter__(self) -> BackgroundLoad:
        self._worker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._worker.join(30)
        assert not self._worker.is_alive(), "the load thread did not stop"
