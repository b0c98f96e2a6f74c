"""A healthy server never degrades: no fallback answer while no pipeline call is over its budget,
from the first call after start, with another process busy on the machine."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
from fraudscore.v1 import fraudscore_pb2 as pb
from fraudscore.v1 import fraudscore_pb2_grpc as pb_grpc

from core.features.state import DEFAULT_CARD_CAPACITY, DEFAULT_ENTITY_CAPACITY
from core.history.simulate import simulate
from tests.conftest import start_server
from tests.e2e.helpers import scrape, value
from tests.e2e.test_parity import _transaction


def test_a_fresh_server_beside_a_busy_core_answers_its_first_calls_from_the_model(tmp_path: Path,
                                                                                 model_dir: Path) -> None:
    # The seen failures: an idle server answered a whole ScoreBatch of 50 from the fallback (a timer
    # fitted on calls of one or two transactions, stretched to 50), and the first batches after a
    # start with fresh state spent ~70 ms in the features stage (the tables' first-touch page faults).
    history = simulate(num_days=2, num_cards=400, num_merchants=80, seed=17)
    txns = [_transaction(history, i) for i in range(64 + 500 + 200)]
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])  # one core taken
    try:
        srv = start_server(tmp_path, model_dir=model_dir, state_dir=tmp_path / "fresh-state", extra_env={
            # The production defaults, not the suite's generous budget and small tables.
            "FRAUDSCORE_BUDGET_MS": "50", "FRAUDSCORE_CARD_CAPACITY": str(DEFAULT_CARD_CAPACITY),
            "FRAUDSCORE_ENTITY_CAPACITY": str(DEFAULT_ENTITY_CAPACITY)})
        try:
            with grpc.insecure_channel(srv.target) as ch:
                stub = pb_grpc.FraudScoringStub(ch)
                batch = list(stub.ScoreBatch(pb.ScoreBatchRequest(transactions=txns[:64]), timeout=10).results)
                stream = list(stub.ScoreStream(iter(pb.ScoreRequest(transaction=t) for t in txns[64:564]),
                                               timeout=60))
                unary = [stub.Score(pb.ScoreRequest(transaction=t), timeout=10) for t in txns[564:]]
            seen = scrape(srv)
        finally:
            assert srv.stop() == 0
    finally:
        burner.kill()
        burner.wait()
    answers = batch + stream + unary
    assert len(answers) == len(txns)
    degraded = [a for a in answers if a.degraded]
    assert not degraded, f"{len(degraded)} of {len(answers)} answers degraded: " \
        f"{ {r: value(seen, 'fraudscore_fallbacks_total', reason=r) for r in ('expected_over_budget', 'over_budget')} }"
    assert value(seen, "fraudscore_fallbacks_total") == 0
    assert value(seen, "fraudscore_decisions_total", source="MODEL") + value(
        seen, "fraudscore_decisions_total", source="RULES") == len(txns)
