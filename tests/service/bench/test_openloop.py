"""Open-loop load from processes of its own: the schedule, what a run's rows say, and a real run."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from service.bench.loadgen import transactions
from service.bench.openloop import (
    CANCELLED,
    DEADLINE,
    DEGRADED,
    OK,
    REFUSED,
    Calls,
    Generators,
    batch_requests,
    schedule,
    score_requests,
)
from tests.conftest import ServerProcess, bare_server


def test_a_schedule_spaces_calls_evenly_and_phases_follow_without_a_gap() -> None:
    times = schedule(100.0, [(10.0, 1.0), (4.0, 0.5)])
    assert len(times) == 12
    np.testing.assert_allclose(times[:10], 100.0 + np.arange(10) / 10)
    np.testing.assert_allclose(times[10:], [101.0, 101.25])


def calls(rows: list[tuple[float, int, int]]) -> Calls:
    sent, latency, status = (np.array(column) for column in zip(*rows, strict=True))
    return Calls(sent.astype(float), latency.astype(np.int64), status.astype(np.int8), np.zeros(len(rows), np.int64))


def test_what_the_rows_of_a_run_say() -> None:
    run = calls([(0.0, 1_000, OK), (0.1, 60_000, OK), (0.2, 2_000, DEGRADED), (0.3, 3_000, REFUSED),
                 (1.0, 900_000, DEADLINE), (1.1, 5_000, CANCELLED), (1.2, 40_000, OK)])
    assert run.count(OK, DEGRADED) == 4 and int(run.answered.sum()) == 4
    assert run.within(50_000) == 0.75  # answered only: refusals and timeouts are not answers
    assert run.goodput(2.0) == 1.5 and run.goodput(2.0, model_only=True) == 1.0
    assert run.percentile_ms(100, statuses=(REFUSED,)) == 3.0
    assert len(run.between(0.0, 1.0)) == 4
    assert run.p99_by_window(0.0, 2.0, 1.0)[0] == pytest.approx(np.percentile([1_000, 60_000, 2_000], 99) / 1000)
    merged = Calls.merge([run.between(1.0, 2.0), run.between(0.0, 1.0)])
    assert merged.sent_at.tolist() == sorted(run.sent_at.tolist())
    assert np.isnan(calls([(0.0, 1, REFUSED)]).within())
    # Refusals and timeouts in 2 of the 4 half-second windows of [0, 2); degraded answers in 1.
    assert run.windows_with(REFUSED, DEADLINE, start=0.0, stop=2.0, window_s=0.5) == 0.5
    assert run.windows_with(DEGRADED, start=0.0, stop=2.0, window_s=0.5) == 0.25
    assert run.windows_with(DEGRADED, start=0.5, stop=2.0, window_s=0.5) == 0.0


@pytest.fixture(scope="module")
def generators() -> Iterator[Generators]:
    with Generators(2) as gen:
        yield gen


@pytest.fixture
def bare() -> Iterator[str]:
    with bare_server() as target:
        yield target


def test_generators_send_on_schedule_from_their_own_processes(generators: Generators, bare: str) -> None:
    requests = score_requests(transactions("openloop-test", 400))
    bulk, probe, start = generators.run(bare, requests, [(200.0, 1.0), (100.0, 1.0)], probe=requests[:100],
                                        probe_rate_per_s=40.0, lead_s=1.5, timeout_s=5.0)
    assert len(bulk) == 300 and bulk.count(OK) == 300 and len(probe) == 80 and probe.count(OK) == 80
    np.testing.assert_allclose(np.diff(bulk.sent_at), np.r_[np.full(199, 0.005), 0.005, np.full(99, 0.01)])
    assert bulk.sent_at[0] == pytest.approx(start)
    assert 0 < bulk.percentile_ms(50) < 1000
    with pytest.raises(ValueError, match="send 300 calls"):
        generators.run(bare, requests[:10], [(300.0, 1.0)])


def test_batches_and_streams_count_transactions_and_degraded_answers(generators: Generators,
                                                                     server: ServerProcess) -> None:
    txns = transactions("openloop-batch", 640)
    batches = generators.batches(server.target, batch_requests(txns, 64), size=64, in_flight=2, seconds=3.0)
    assert batches.answered == 640 and batches.errors == 0 and batches.degraded == 0
    streams = generators.streams(server.target, [score_requests(transactions(f"openloop-stream{k}", 50))
                                                 for k in range(3)], in_flight=8)
    assert streams.answered == 150 and streams.errors == 0 and streams.latency_us.size == 150
