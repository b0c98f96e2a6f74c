"""Online equals offline: a history streamed through a real server scores bit-identically to replay."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import grpc
import numpy as np
from fraudscore.v1 import fraudscore_pb2 as pb
from fraudscore.v1 import fraudscore_pb2_grpc as pb_grpc

from core.history import History
from core.model import load_model_dir
from core.replay import label_visible_time_ms, score_history
from core.simulate import simulate
from service.app import load_rules
from tests.conftest import start_server


def _transaction(h: History, i: int) -> pb.Transaction:
    t = pb.Transaction(
        transaction_id=h.transaction_id[i], card_id=h.card_id[i], customer_id=h.customer_id[i],
        merchant_id=h.merchant_id[i], merchant_category=h.merchant_category[i], amount_minor=int(h.amount_minor[i]),
        currency=h.currency[i], event_time_ms=int(h.event_time_ms[i]), channel=int(h.channel[i]),
        country=h.country[i], device_id=h.device_id[i], ip_address=h.ip_address[i],
    )
    if not np.isnan(h.latitude[i]):
        t.latitude, t.longitude = float(h.latitude[i]), float(h.longitude[i])
    return t


def test_streaming_a_history_through_the_server_equals_replay(tmp_path: Path, model_dir: Path) -> None:
    history = simulate(num_days=3, num_cards=250, num_merchants=80, seed=5)
    # Report every fraud two hours after it happened, so outcomes feed features inside the window.
    reported = np.where(history.is_fraud == 1, history.event_time_ms + 2 * 3_600_000, -1)
    history = dataclasses.replace(history, fraud_reported_time_ms=reported)
    offline = score_history(history, load_model_dir(model_dir), load_rules(None))

    visible = label_visible_time_ms(history)
    reports = np.flatnonzero(visible >= 0)
    reports = reports[np.argsort(visible[reports], kind="stable")]
    # A report goes out before the first transaction at or after its time, as replay applies it.
    cut = np.searchsorted(history.event_time_ms, visible[reports], side="left")
    assert reports.size >= 5 and (cut < len(history)).sum() >= 5

    srv = start_server(tmp_path, model_dir=model_dir)
    online: dict[str, float] = {}
    decisions: dict[str, int] = {}
    try:
        with grpc.insecure_channel(srv.target) as ch:
            stub = pb_grpc.FraudScoringStub(ch)
            bounds = sorted({0, len(history), *cut.tolist()})
            sent = 0
            for segment, (start, stop) in enumerate(itertools.pairwise(bounds)):
                while sent < reports.size and cut[sent] <= start:
                    i = reports[sent]
                    stub.ReportOutcome(pb.ReportOutcomeRequest(
                        transaction_id=history.transaction_id[i], card_id=history.card_id[i],
                        merchant_id=history.merchant_id[i], outcome=pb.CONFIRMED_FRAUD,
                        reported_time_ms=int(visible[i])), timeout=10)
                    sent += 1
                txns = [_transaction(history, i) for i in range(start, stop)]
                if segment % 3 == 0:  # one by one
                    results = [stub.Score(pb.ScoreRequest(transaction=t), timeout=10) for t in txns]
                elif segment % 3 == 1:  # in batches
                    results = [r for k in range(0, len(txns), 100)
                               for r in stub.ScoreBatch(pb.ScoreBatchRequest(transactions=txns[k:k + 100]),
                                                        timeout=10).results]
                else:  # on a stream
                    results = list(stub.ScoreStream(iter(pb.ScoreRequest(transaction=t) for t in txns), timeout=30))
                for r in results:
                    online[r.transaction_id] = r.fraud_probability
                    decisions[r.transaction_id] = r.decision
    finally:
        assert srv.stop() == 0
    assert len(online) == len(history)
    got = np.array([online[t] for t in history.transaction_id])
    np.testing.assert_array_equal(got, offline["fraud_probability"])  # bit for bit
    names = {pb.APPROVE: "APPROVE", pb.REVIEW: "REVIEW", pb.DECLINE: "DECLINE"}
    assert [names[decisions[t]] for t in history.transaction_id] == offline["decision"].tolist()
    # The reports mattered: they reached the fraud features, and the rule on reported cards.
    no_reports = dataclasses.replace(history, is_fraud=np.zeros_like(history.is_fraud))
    unreported = score_history(no_reports, load_model_dir(model_dir), load_rules(None))
    for column in ("card_fraud_count_30d", "merchant_fraud_count_30d", "decision"):
        assert not np.array_equal(unreported[column], offline[column]), column
