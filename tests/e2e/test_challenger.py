"""Champion/challenger over real server processes: the challenger (FRAUDSCORE_CHALLENGER_MODEL_DIR)
shows in a real scrape and never changes an answer; a refused one leaves the service running without."""

from __future__ import annotations

from pathlib import Path

import grpc
from fraudscore.v1 import fraudscore_pb2 as pb
from fraudscore.v1 import fraudscore_pb2_grpc as pb_grpc

from core.model import load_model_dir
from tests.conftest import ServerProcess, start_server
from tests.e2e.helpers import BASE_TIME_MS, scrape, txn, value


def _transactions() -> list[pb.Transaction]:
    """A burst on one card (velocity features move) and a few strangers, some large."""
    card, device = "card-challenger", "dev-challenger"
    burst = [txn(card_id=card, device_id=device, amount_minor=amount, event_time_ms=BASE_TIME_MS + 20_000 * i)
             for i, amount in enumerate((1_200, 45_000, 99_000, 250_000, 3_000, 180_000, 75_000, 500))]
    others = [txn(amount_minor=amount, event_time_ms=BASE_TIME_MS + 1_000 * i, country="BR", channel=pb.ECOMMERCE)
              for i, amount in enumerate((900_000, 12, 30_000, 450_000))]
    return burst + others


def _answers(srv: ServerProcess, txns: list[pb.Transaction]) -> list[pb.ScoreResponse]:
    with grpc.insecure_channel(srv.target) as channel:
        stub = pb_grpc.FraudScoringStub(channel)
        return [stub.Score(pb.ScoreRequest(transaction=t), timeout=10) for t in txns]


def test_a_challenger_is_scored_in_shadow_and_never_changes_an_answer(tmp_path: Path, model_dir: Path) -> None:
    txns = _transactions()
    (tmp_path / "with").mkdir()
    (tmp_path / "without").mkdir()
    with_challenger = start_server(tmp_path / "with", model_dir=model_dir,
                                   extra_env={"FRAUDSCORE_CHALLENGER_MODEL_DIR": str(model_dir)})
    try:
        shadowed = _answers(with_challenger, txns)
        samples = scrape(with_challenger)
    finally:
        with_challenger.stop()
    # The same model and transactions on fresh state, with a challenger that is refused (missing):
    # the service starts all the same, and runs without one.
    without = start_server(tmp_path / "without", model_dir=model_dir,
                           extra_env={"FRAUDSCORE_CHALLENGER_MODEL_DIR": str(tmp_path / "no-such-model")})
    try:
        plain = _answers(without, txns)
        plain_samples = scrape(without)
        log = without.log()
    finally:
        without.stop()

    assert [(a.fraud_probability, a.decision, a.source) for a in shadowed] == \
        [(a.fraud_probability, a.decision, a.source) for a in plain]
    assert all(not a.degraded for a in shadowed)
    model = load_model_dir(model_dir)
    assert value(samples, "fraudscore_challenger_info", model_version=model.version) == 1
    assert value(samples, "fraudscore_challenger_probability_count") == len(txns)
    # The challenger is the champion's own model on the same features: its probabilities are the answers'.
    assert abs(value(samples, "fraudscore_challenger_probability_sum")
               - sum(a.fraud_probability for a in shadowed)) < 1e-6
    assert value(samples, "fraudscore_challenger_probability_bucket", le="+Inf") == len(txns)
    # So its decisions (by its thresholds) differ from the answers exactly where a rule moved the answer.
    t = model.thresholds

    def by_thresholds(p: float) -> int:
        return pb.DECLINE if p >= t.decline else pb.REVIEW if p >= t.review else pb.APPROVE

    expected = sum(by_thresholds(a.fraud_probability) != a.decision for a in shadowed)
    assert value(samples, "fraudscore_challenger_disagreements_total") == expected
    assert value(samples, "fraudscore_challenger_errors_total") == 0

    assert "fraudscore_challenger_info" not in plain_samples
    assert value(plain_samples, "fraudscore_challenger_probability_count") == 0
    assert "challenger model directory not found; running without a challenger" in log


def test_a_new_challenger_is_swapped_in_without_a_restart_and_a_bad_one_refused(tmp_path: Path,
                                                                                 model_dir: Path) -> None:
    import signal

    from tests.e2e.test_model_reload import OLD_FEATURE_SET, publish
    from tests.e2e.test_rules_reload import wait_until

    live = tmp_path / "challenger"
    publish(model_dir, live, "C1")
    srv = start_server(tmp_path, model_dir=model_dir, extra_env={
        "FRAUDSCORE_CHALLENGER_MODEL_DIR": str(live), "FRAUDSCORE_MODEL_RELOAD_S": "0"})

    def challengers() -> list[str]:
        return [labels["model_version"] for labels, _ in scrape(srv)["fraudscore_challenger_info"]]

    def reloads(result: str) -> float:
        return value(scrape(srv), "fraudscore_challenger_reloads_total", result=result)

    def shadowed() -> float:
        return value(scrape(srv), "fraudscore_challenger_probability_count")

    champion = load_model_dir(model_dir).version
    txns = _transactions()
    try:
        _answers(srv, txns[:3])
        assert challengers() == ["C1"] and shadowed() == 3
        publish(model_dir, live, "C2")
        srv.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: reloads("ok") == 1, "the challenger reload")
        assert challengers() == ["C2"]
        answers = _answers(srv, txns[3:6])
        assert {a.model_version for a in answers} == {champion}  # the challenger never answers
        assert shadowed() == 6  # and the new one is scored in shadow
        publish(model_dir, live, "C3", feature_set_version=OLD_FEATURE_SET)
        srv.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: reloads("refused") == 1, "the refusal")
        assert challengers() == ["C2"] and reloads("ok") == 1
        _answers(srv, txns[6:8])
        assert shadowed() == 8  # C2 stays in shadow
    finally:
        assert srv.stop() == 0
    log = srv.log()
    assert '"old_model_version":"C1"' in log and '"new_model_version":"C2"' in log
    assert "challenger refused; the previous challenger stays in shadow" in log and OLD_FEATURE_SET in log
