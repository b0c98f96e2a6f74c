"""Overload as the caller sees it (issue 15): a real server under several times its peak, measured
by open-loop generators in processes of their own and a separate low-rate probe, on their clock.
Thresholds are loose: the generators share this machine's cores with the server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from service.bench.loadgen import transactions
from service.bench.openloop import (
    CANCELLED,
    DEADLINE,
    DEGRADED,
    FAILED,
    REFUSED,
    Calls,
    Generators,
    score_requests,
)
from tests.conftest import ServerProcess, start_server

pytestmark = pytest.mark.e2e

OVERLOAD_RATE, OVERLOAD_S = 4_000.0, 5.0  # well past this machine's peak (~1,500–1,800/s)
CALM_RATE, CALM_S = 300.0, 3.0


@pytest.fixture(scope="module")
def generators() -> Iterator[Generators]:
    with Generators(2) as gen:
        yield gen


@pytest.fixture(scope="module")
def overloaded(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[ServerProcess]:
    srv = start_server(tmp_path_factory.mktemp("overload"), model_dir=model_dir,
                       extra_env={"FRAUDSCORE_BUDGET_MS": "50"})  # the production budget, not the suite's
    yield srv
    srv.stop()


def test_under_overload_callers_get_answers_in_budget_or_fast_refusals_and_recovery_is_at_once(
        generators: Generators, overloaded: ServerProcess) -> None:
    n = int(OVERLOAD_RATE * OVERLOAD_S + CALM_RATE * CALM_S)
    bulk, probe, start = generators.run(
        overloaded.target, score_requests(transactions("overload-bulk", n)),
        [(OVERLOAD_RATE, OVERLOAD_S), (CALM_RATE, CALM_S)],
        probe=score_requests(transactions("overload-probe", 1_000)), probe_rate_per_s=100.0, lead_s=1.0)
    end = start + OVERLOAD_S
    over, probe_over = bulk.between(start, end), probe.between(start, end)
    refused = over.count(REFUSED, CANCELLED)
    # Shed, and shed early: refusals come back within milliseconds, and nothing is held until the
    # caller's deadline (1 s) in a queue no handler sees.
    assert refused > 0.2 * len(over), f"{refused} of {len(over)} refused: was it overloaded?"
    assert over.percentile_ms(99, statuses=(REFUSED, CANCELLED)) < 200
    assert over.count(DEADLINE, FAILED) <= 0.005 * len(over)
    # What the server answered, it answered within the budget on the caller's clock.
    assert int(probe_over.answered.sum()) >= 20
    # (bench serve measures ≥ 99 % on a quiet host; here the bound only has to tell the old collapse,
    # 3–6 % within 50 ms and everything else timed out, from a noisy shared machine)
    assert probe_over.within() >= 0.75, f"probe p99 {probe_over.percentile_ms(99):.0f} ms"
    assert over.within() >= 0.75
    assert over.goodput(OVERLOAD_S) >= 200  # still serving, not busy refusing
    # No slow state after it: the last second of the calm phase is back in budget.
    tail = Calls.merge([bulk.between(end + CALM_S - 1.0, end + CALM_S), probe.between(end + CALM_S - 1.0, end + CALM_S)])
    assert tail.percentile_ms(99) < 50 and tail.count(REFUSED, CANCELLED, DEADLINE, FAILED) == 0


def test_a_steady_load_keeps_a_flat_tail_and_degrades_nothing(generators: Generators,
                                                               overloaded: ServerProcess) -> None:
    # The long run of `fraudscore bench serve --long 300`, short: no drift from caches, GC or timers.
    rate, seconds = 500.0, 12.0
    calls, _, start = generators.run(overloaded.target, score_requests(transactions("steady", int(rate * seconds))),
                                     [(rate, seconds)], lead_s=1.0)
    windows = calls.p99_by_window(start, start + seconds, 3.0)
    assert calls.count(DEADLINE, FAILED) == 0
    # Degraded only where the host stalled the server past the budget (the watch's answer): a trace.
    assert calls.count(DEGRADED) <= 0.001 * len(calls)
    # gRPC may drop a few calls from its short queue when the host stalls the loop (docs/design.md,
    # "Overload"): never more than a trace at this rate.
    assert calls.count(REFUSED, CANCELLED) <= 0.01 * len(calls)
    assert max(windows) < 50, windows  # in budget throughout, and no drift upwards beyond the host's noise
    assert windows[-1] <= 3 * float(np.median(windows)) + 20, windows
