"""Online equals offline: a history streamed through a real server scores bit-identically to replay,
with the server's own identifier key, whatever was degraded, shed, stalled, retried, late or
restarted around it; and the server's final state tables equal replay's."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from fraudscore.v1 import fraudscore_pb2 as pb
from fraudscore.v1 import fraudscore_pb2_grpc as pb_grpc

from core.encode import KeyHasher, amount_major
from core.features import FEATURE_SET_VERSION, EntityState
from core.features.store import load_snapshot
from core.history.simulate import simulate
from core.history.table import History
from core.model import load_model_dir
from core.offline.replay import encode_history, label_visible_time_ms, replay_features, score_history
from core.rules.named_lists import identifier_keys
from core.scoring import Scorer
from service.runtime.reload import load_rules
from tests.conftest import ServerProcess, start_server
from tests.e2e.helpers import scrape, value

KEY = "parity-test-key-0123456789abcdef"  # a server's own key: replay must use it, not the default
CAPACITY = 4096  # start_server's table sizes: replay's tables must match them slot for slot
HOUR_MS = 3_600_000


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


def _reported(history: History, after_ms: int = 2 * HOUR_MS) -> History:
    """Every fraud reported `after_ms` after it happened, so outcomes feed features inside the window."""
    reported = np.where(history.is_fraud == 1, history.event_time_ms + after_ms, -1)
    return dataclasses.replace(history, fraud_reported_time_ms=reported)


def late_history(seed: int, *, num_cards: int = 400) -> History:
    """A simulated history with equal timestamps and late arrivals: 4 % of the transactions reach
    the server up to 5 minutes after later-stamped ones (`received_time_ms`), in arrival order."""
    h = _reported(simulate(num_days=3, num_cards=num_cards, num_merchants=80, seed=seed))
    rng = np.random.default_rng(seed)
    event = h.event_time_ms.copy()
    same = np.flatnonzero(rng.random(len(h)) < 0.03)
    event[same[same > 0]] = event[same[same > 0] - 1]  # equal to the one before: still sorted
    late = rng.random(len(h)) < 0.04
    received = event + np.where(late, rng.integers(1_000, 300_000, len(h)), 0)
    h = dataclasses.replace(h, event_time_ms=event, received_time_ms=received)
    return h.sorted_by_time()


@dataclasses.dataclass
class Replayed:
    """What replay says for a history: per transaction, the probability and decision, and the final state."""

    probability: np.ndarray
    decision: np.ndarray
    state: EntityState


def replayed(history: History, model_dir: Path, hasher: KeyHasher) -> Replayed:
    state = EntityState.empty(card_capacity=CAPACITY, merchant_capacity=CAPACITY, customer_capacity=CAPACITY,
                              device_capacity=CAPACITY, ip_capacity=CAPACITY)
    features = replay_features(history, state=state, hasher=hasher)
    ruleset = load_rules(None, hasher=hasher)
    keys = identifier_keys(encode_history(history, hasher)) if ruleset.lists else None
    scored = Scorer(load_model_dir(model_dir), ruleset).score(
        features, amount_major(history.amount_minor, history.currency), keys=keys)
    return Replayed(scored.fraud_probability, scored.decision, state)


def report_plan(history: History) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The fraud reports replay applies, in the order it applies them, each with its report time and
    the arrival position it goes before (replay's rule: before the first transaction to arrive at or
    after its visibility). Reports visible after the last transaction are not sent: replay never
    applies them either."""
    visible = label_visible_time_ms(history)
    reports = np.flatnonzero(visible >= 0)
    reports = reports[np.argsort(visible[reports], kind="stable")]
    cut = np.searchsorted(history.arrival_time_ms, visible[reports], side="left")
    keep = cut < len(history)
    return reports[keep], visible[reports][keep], cut[keep]


Send = Callable[[pb_grpc.FraudScoringStub, list[pb.Transaction]], list[pb.ScoreResponse]]


def _unary(stub: pb_grpc.FraudScoringStub, txns: list[pb.Transaction]) -> list[pb.ScoreResponse]:
    out = []
    for k, t in enumerate(txns):
        answer = stub.Score(pb.ScoreRequest(transaction=t), timeout=30)
        if k % 7 == 3:  # a retry: the first answer again, and the transaction counted once
            assert stub.Score(pb.ScoreRequest(transaction=t), timeout=30) == answer
        out.append(answer)
    return out


def _batches(stub: pb_grpc.FraudScoringStub, txns: list[pb.Transaction], size: int = 24) -> list[pb.ScoreResponse]:
    out: list[pb.ScoreResponse] = []
    for k in range(0, len(txns), size):
        chunk = txns[k:k + size]
        retried = [out[-1].transaction_id] if out else []  # the previous chunk's last, retried in this one
        again = [t for t in txns[:k] if t.transaction_id in retried]
        results = stub.ScoreBatch(pb.ScoreBatchRequest(transactions=again + chunk), timeout=30).results
        assert [r.transaction_id for r in results[len(again):]] == [t.transaction_id for t in chunk]
        if again:
            assert results[0] == out[-1]
        out.extend(results[len(again):])
    return out


def _stream(stub: pb_grpc.FraudScoringStub, txns: list[pb.Transaction]) -> list[pb.ScoreResponse]:
    return list(stub.ScoreStream(iter(pb.ScoreRequest(transaction=t) for t in txns), timeout=120))


MODES: tuple[Send, ...] = (_stream, _batches, _unary)


def stream_through(history: History, start: Callable[[], ServerProcess], *, restart_at: int | None = None,
                   segment: int = 150) -> tuple[dict[str, pb.ScoreResponse], ServerProcess]:
    """Send `history` in its arrival order, one segment at a time over ScoreStream, ScoreBatch (with a
    retry per chunk) and Score (with retries), each fraud report between the transactions replay puts
    it between; with `restart_at`, SIGTERM and start again before that position. Returns every answer
    by transaction id and the server (still running)."""
    reports, report_ms, cut = report_plan(history)
    bounds = sorted({0, len(history), *cut.tolist(), *range(0, len(history), segment),
                     *([restart_at] if restart_at else [])})
    online: dict[str, pb.ScoreResponse] = {}
    srv = start()
    sent = 0
    modes: Iterator[Send] = itertools.cycle(MODES)
    try:
        for first, stop in itertools.pairwise(bounds):
            if first == restart_at:
                assert srv.stop() == 0  # SIGTERM: drain, final snapshot; the next server restores it
                srv = start()
            with grpc.insecure_channel(srv.target) as ch:
                stub = pb_grpc.FraudScoringStub(ch)
                while sent < reports.size and cut[sent] <= first:
                    i = reports[sent]
                    stub.ReportOutcome(pb.ReportOutcomeRequest(
                        transaction_id=history.transaction_id[i], card_id=history.card_id[i],
                        merchant_id=history.merchant_id[i], outcome=pb.CONFIRMED_FRAUD,
                        reported_time_ms=int(report_ms[sent])), timeout=30)
                    sent += 1
                for r in next(modes)(stub, [_transaction(history, i) for i in range(first, stop)]):
                    online[r.transaction_id] = r
    except BaseException:
        srv.stop()
        raise
    assert sent == reports.size
    return online, srv


def assert_parity(history: History, online: dict[str, pb.ScoreResponse], offline: Replayed,
                  state_dir: Path, hasher: KeyHasher) -> int:
    """Every non-degraded answer equals replay bit for bit; the server's final state (its shutdown
    snapshot) equals replay's table by table. Returns how many answers were degraded."""
    assert len(online) == len(history)
    answers = [online[t] for t in history.transaction_id]
    fine = np.array([not a.degraded for a in answers])
    got = np.array([a.fraud_probability for a in answers])
    np.testing.assert_array_equal(got[fine], offline.probability[fine])  # bit for bit
    assert np.array([a.decision for a in answers])[fine].tolist() == offline.decision[fine].tolist()
    served = load_snapshot(state_dir / "state.npz", feature_set_version=FEATURE_SET_VERSION, hasher=hasher)
    for mine, theirs in zip(served.tables(), offline.state.tables(), strict=True):
        for name in ("keys", "last_seen_ms", "values", "tags", "counters"):
            np.testing.assert_array_equal(getattr(mine, name), getattr(theirs, name), err_msg=f"{mine.kind}.{name}")
    return int((~fine).sum())


def test_streaming_a_history_through_the_server_equals_replay(tmp_path: Path, model_dir: Path) -> None:
    history = _reported(simulate(num_days=3, num_cards=250, num_merchants=80, seed=5))
    hasher = KeyHasher(KEY.encode())
    offline = score_history(history, load_model_dir(model_dir), load_rules(None, hasher=hasher), hasher=hasher)
    reports, _, cut = report_plan(history)
    assert reports.size >= 5 and (cut < len(history)).sum() >= 5

    online, srv = stream_through(history, lambda: start_server(tmp_path, model_dir=model_dir,
                                                               extra_env={"FRAUDSCORE_ID_HASH_KEY": KEY}))
    assert srv.stop() == 0
    got = np.array([online[t].fraud_probability for t in history.transaction_id])
    np.testing.assert_array_equal(got, offline["fraud_probability"])  # bit for bit
    names = {pb.APPROVE: "APPROVE", pb.REVIEW: "REVIEW", pb.DECLINE: "DECLINE"}
    assert [names[online[t].decision] for t in history.transaction_id] == offline["decision"].tolist()
    # The key matters: under the published key, replay's hash-dependent features come out otherwise
    # (here the seen-merchant sketch), so a model trained on them would see another world.
    default_key = score_history(history, load_model_dir(model_dir), load_rules(None))
    assert not np.array_equal(default_key["card_distinct_merchants_24h"], offline["card_distinct_merchants_24h"])
    # The reports mattered: they reached the fraud features, and the rule on reported cards.
    no_reports = dataclasses.replace(history, is_fraud=np.zeros_like(history.is_fraud))
    unreported = score_history(no_reports, load_model_dir(model_dir), load_rules(None, hasher=hasher), hasher=hasher)
    for column in ("card_fraud_count_30d", "merchant_fraud_count_30d", "decision"):
        assert not np.array_equal(unreported[column], offline[column]), column


def test_late_arrivals_and_a_restart_keep_parity(tmp_path: Path, model_dir: Path) -> None:
    # Replay goes in arrival order (received_time_ms): a late event sees, online and offline, the
    # state its later-stamped predecessors left. The restart half-way keeps it all (snapshot).
    history = late_history(seed=21)
    arrival_order_is_not_event_order = np.diff(history.event_time_ms) < 0
    assert arrival_order_is_not_event_order.sum() >= 20
    hasher = KeyHasher(KEY.encode())
    offline = replayed(history, model_dir, hasher)
    state_dir = tmp_path / "state"
    online, srv = stream_through(history, lambda: start_server(
        tmp_path, model_dir=model_dir, state_dir=state_dir, extra_env={"FRAUDSCORE_ID_HASH_KEY": KEY}),
        restart_at=len(history) // 2)
    assert srv.stop() == 0
    assert assert_parity(history, online, offline, state_dir, hasher) == 0  # a healthy server: none degraded
    # Replayed in event order instead, the late ones (and those after them) would differ.
    by_event = replayed(dataclasses.replace(history, received_time_ms=np.full(len(history), -1)).sorted_by_time(),
                        model_dir, hasher)
    assert not np.array_equal(np.sort(by_event.probability), np.sort(offline.probability))


FAULTS = {
    # The first batch holds the pipeline thread 2 s: the watch answers it and everything behind it.
    "pipeline-stall": ({"FRAUDSCORE_FAULT_INJECTION": "pipeline-stall", "FRAUDSCORE_BUDGET_MS": "50"},
                       ("expected_over_budget",)),
    # A 1.5 ms budget: calls that queue at all run out of it (over budget, expected over budget).
    "tiny-budget": ({"FRAUDSCORE_BUDGET_MS": "1.5"}, ("over_budget", "expected_over_budget")),
    # A queue of 32 behind a stalled pipeline, shedding to the fallback: the stream's calls beyond it.
    "saturated-queue": ({"FRAUDSCORE_FAULT_INJECTION": "pipeline-stall", "FRAUDSCORE_MAX_QUEUE": "32",
                         "FRAUDSCORE_MAX_BATCH": "8", "FRAUDSCORE_MAX_BATCH_REQUEST": "32",
                         "FRAUDSCORE_SHED_MODE": "fallback"}, ("queue_full",)),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_parity_survives_fallbacks(tmp_path: Path, model_dir: Path, fault: str) -> None:
    # Every transaction answered, by the model or by the fallback for whatever reason, entered the
    # state once in arrival order: so every answer that is not degraded equals replay of the whole
    # stream, and so do the final tables. (Before, each fallback answer left a hole in the history.)
    env, reasons = FAULTS[fault]
    history = late_history(seed=31, num_cards=300)
    hasher = KeyHasher(KEY.encode())
    offline = replayed(history, model_dir, hasher)
    state_dir = tmp_path / "state"
    online, srv = stream_through(history, lambda: start_server(
        tmp_path, model_dir=model_dir, state_dir=state_dir, extra_env={"FRAUDSCORE_ID_HASH_KEY": KEY, **env}))
    try:
        seen = scrape(srv)
    finally:
        assert srv.stop() == 0
    degraded = assert_parity(history, online, offline, state_dir, hasher)
    assert 0 < degraded < len(history), degraded  # the fault answered some from the fallback, not all
    assert sum(value(seen, "fraudscore_fallbacks_total", reason=r) for r in reasons) > 0
    assert value(seen, "fraudscore_features_only_total") > 0
    # Each answer counted once, degraded ones included; none shed with an error.
    assert value(seen, "fraudscore_decisions_total") == len(history)
    assert value(seen, "fraudscore_decisions_total", source="RULES_FALLBACK") == degraded
