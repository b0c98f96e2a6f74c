"""The pipeline timer: predictions by size bucket, never extrapolated, with the features-only and work costs."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.serving.timer import PipelineTimer, bucket_sizes


def test_pipeline_timer_learns_each_size_bucket_and_forgets_old_calls() -> None:
    timer = PipelineTimer(memory=10)
    assert not timer.measured and timer.expected_s(64) == 0.0
    timer.observe(4, 0.004)
    # One bucket measured: every size takes it (never stretched by a slope).
    assert timer.measured and timer.expected_s(1) == timer.expected_s(4) == timer.expected_s(64) == 0.004
    for n in [1, 8, 32, 64] * 100:  # the first, slower call is forgotten
        timer.observe(n, 0.0001 + 0.00002 * n)
    assert timer.expected_s(1) == pytest.approx(0.00012)
    assert timer.expected_s(64) == pytest.approx(0.00138)
    assert timer.expected_s(3) == timer.expected_s(4) == 0.004  # no call of 3–4 since: kept
    assert timer.expected_s(5) == timer.expected_s(8) == pytest.approx(0.00026)
    # A size no call has had takes the nearest measured bucket above it (a larger call bounds it).
    assert timer.expected_s(16) == timer.expected_s(32) == pytest.approx(0.00074)
    # Above every measured size: the largest measured, not an extrapolation.
    assert timer.expected_s(1000) == timer.expected_s(64)


def test_small_calls_are_never_stretched_into_a_slow_large_one() -> None:
    # The seen failure: a warm-up of 2 (5 ms) and a call of 1 (0.3 ms) fitted a line that put a
    # ScoreBatch of 50 at 235 ms, and an idle server answered all 50 from the fallback.
    timer = PipelineTimer()
    timer.observe(2, 0.005)
    timer.observe(1, 0.0003)
    assert timer.expected_s(50) <= 0.005


def test_one_stalled_call_does_not_make_a_bucket_look_hopeless() -> None:
    timer = PipelineTimer(memory=10)
    for _ in range(20):
        timer.observe(8, 0.001)
    timer.observe(8, 2.0)  # a 2 s stall counts as at most 4 × expected + 1 ms
    assert timer.expected_s(8) < 0.002


@settings(max_examples=300, deadline=None)
@given(calls=st.lists(st.tuples(st.integers(1, 512), st.floats(1e-6, 0.05)), min_size=1, max_size=200),
       memory=st.integers(2, 200))
def test_no_prediction_exceeds_the_slowest_call_measured(calls: list[tuple[int, float]], memory: int) -> None:
    # So a server whose every pipeline call fits in its budget never predicts one that does not:
    # no spurious "expected over budget", whatever the history of batch sizes and durations.
    timer = PipelineTimer(memory=memory)
    for n, seconds in calls:
        timer.observe(n, seconds)
    slowest = max(seconds for _, seconds in calls)
    for n in range(1, 513):
        assert timer.expected_s(n) <= slowest


@given(max_batch=st.integers(1, 65536))
def test_bucket_sizes_measure_every_bucket_a_batch_can_fall_in(max_batch: int) -> None:
    sizes = bucket_sizes(max_batch)
    assert sizes[-1] == max_batch and sizes == sorted(set(sizes))
    timer = PipelineTimer()
    for size in sizes:
        timer.observe(size, size * 1e-6)  # a distinct time per seeded size
    # Every size up to max_batch is predicted from its own bucket's seed: the smallest seed ≥ it.
    for n in {1, max_batch, max(1, max_batch // 2), max(1, max_batch - 1), min(max_batch, 3)}:
        assert timer.expected_s(n) == min(s for s in sizes if s >= n) * 1e-6


def test_transactions_that_only_enter_the_state_are_costed_apart() -> None:
    timer = PipelineTimer(memory=10)
    timer.observe(64, 0.0015)
    assert timer.state_only_s == 0.0  # not measured yet: nothing assumed
    timer.observe_batch(0, 64, 64 * 5e-6)  # a batch of 64 that only entered the state
    assert timer.state_only_s == pytest.approx(5e-6)
    # A mixed call: its state-only part at that cost, the rest teaches the scored size's bucket.
    timer.observe_batch(8, 100, 0.0004 + 100 * 5e-6)
    assert timer.expected_s(8) == pytest.approx(0.0004)
    assert timer.expected_batch_s(8, 100) == pytest.approx(0.0004 + 100 * 5e-6)
    assert timer.expected_batch_s(0, 3000) == pytest.approx(0.015)
    assert timer.expected_s(64) == 0.0015  # untouched by the others


def test_work_is_timed_by_kind() -> None:
    timer = PipelineTimer(memory=10)
    assert timer.expected_work_s("snapshot") == 0.0
    timer.observe_work("snapshot", 0.035)
    timer.observe_work("outcome", 0.00002)
    assert timer.expected_work_s("snapshot") == 0.035 and timer.expected_work_s("outcome") == 0.00002


@settings(max_examples=200, deadline=None)
@given(calls=st.lists(st.tuples(st.integers(0, 256), st.integers(0, 256), st.floats(1e-6, 0.05)).filter(
    lambda c: c[0] + c[1] > 0), min_size=1, max_size=100))
def test_with_state_only_rows_no_batch_prediction_exceeds_the_slowest_call(
        calls: list[tuple[int, int, float]]) -> None:
    timer = PipelineTimer()
    for scored, state_only, seconds in calls:
        timer.observe_batch(scored, state_only, seconds)
    slowest = max(seconds for *_, seconds in calls)
    for n in range(1, 257):
        assert timer.expected_s(n) <= slowest
    assert timer.state_only_s <= slowest
