"""Overload as the caller sees it (issue 15): a real server under several times its peak, measured
by open-loop generators in processes of their own and a separate low-rate probe, on their clock.
Thresholds are loose: the generators share this machine's cores with the server, and the CI host
stalls processes for tens of ms at times (2026-12-03: a steady 500/s run there saw 33 degraded
answers and refusals with a p99 of 373 ms where this host sees none and ~15 ms). They are set to
tell the failures they guard against (calls held until their deadline, a slow state outlasting
the load, a server degrading by itself) from that noise; `fraudscore bench serve` measures the
goals. Failure messages carry what the server counted and how late the generators sent."""

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
from tests.e2e.helpers import Samples, scrape

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


def _by_reason(samples: Samples) -> dict[str, float]:
    return {f"{name.removeprefix('fraudscore_').removesuffix('_total')}:{labels['reason']}": v
            for name in ("fraudscore_fallbacks_total", "fraudscore_sheds_total")
            for labels, v in samples.get(name, [])}


def server_side(srv: ServerProcess, before: Samples) -> str:
    """What the server counted during a run (fallbacks and sheds by reason), for failure messages:
    a CI log then says whether a degraded answer was the budget watch, the timer or a full queue."""
    old, new = _by_reason(before), _by_reason(scrape(srv))
    return "server counted " + str({k: v - old.get(k, 0.0) for k, v in new.items() if v != old.get(k, 0.0)})


def cpu_times() -> np.ndarray:
    """This host's CPU time so far (/proc/stat, all cores): user, nice, system, idle, iowait, irq,
    softirq, steal."""
    with open("/proc/stat") as f:
        return np.array(f.readline().split()[1:9], dtype=np.float64)


def host(since: np.ndarray, *runs: Calls) -> str:
    """How busy the host was during a run: how late the generators themselves sent (a host that
    stalls them stalls the server too), and the share of CPU time the hypervisor took (steal)."""
    lag = np.concatenate([r.lag_us for r in runs]) / 1000.0
    spent = cpu_times() - since
    return (f"generators sent late by p99 {np.percentile(lag, 99):.1f} ms, max {lag.max():.1f} ms; "
            f"host CPU idle {spent[3] / spent.sum():.0%}, steal {spent[7] / spent.sum():.1%}")


def test_under_overload_callers_get_answers_in_budget_or_fast_refusals_and_recovery_is_at_once(
        generators: Generators, overloaded: ServerProcess) -> None:
    n = int(OVERLOAD_RATE * OVERLOAD_S + CALM_RATE * CALM_S)
    before, cpu = scrape(overloaded), cpu_times()
    bulk, probe, start = generators.run(
        overloaded.target, score_requests(transactions("overload-bulk", n)),
        [(OVERLOAD_RATE, OVERLOAD_S), (CALM_RATE, CALM_S)],
        probe=score_requests(transactions("overload-probe", 1_000)), probe_rate_per_s=100.0, lead_s=1.0)
    seen = f"{server_side(overloaded, before)}; {host(cpu, bulk, probe)}"
    end = start + OVERLOAD_S
    over, probe_over = bulk.between(start, end), probe.between(start, end)
    refused = over.count(REFUSED, CANCELLED)
    # Shed, and shed early: refusals come back within milliseconds, and nothing is held until the
    # caller's deadline (1 s) in a queue no handler sees. (The generators share the cores: a refusal
    # waits in their own loop too, hence the loose tail.)
    assert refused > 0.2 * len(over), f"{refused} of {len(over)} refused: was it overloaded? {seen}"
    refusal_ms = [over.percentile_ms(p, statuses=(REFUSED, CANCELLED)) for p in (50, 99)]
    assert refusal_ms[0] < 50 and refusal_ms[1] < 500, f"refusals p50, p99 {refusal_ms} ms; {seen}"
    assert over.count(DEADLINE, FAILED) <= 0.005 * len(over), seen
    # What the server answered, it answered within the budget on the caller's clock.
    assert int(probe_over.answered.sum()) >= 20, seen
    # (bench serve measures ≥ 99 % on a quiet host; here the bounds only have to tell the old collapse,
    # 3–6 % within 50 ms and everything else timed out, from a noisy shared machine)
    assert probe_over.within() >= 0.6, f"probe p99 {probe_over.percentile_ms(99):.0f} ms; {seen}"
    assert over.within() >= 0.5, f"bulk p99 {over.percentile_ms(99):.0f} ms; {seen}"
    assert over.goodput(OVERLOAD_S) >= 200, seen  # still serving, not busy refusing
    # No slow state after it (the old one outlasted the load by seconds at a p50 of a second): the
    # last second of the calm phase is back in budget.
    tail = Calls.merge([bulk.between(end + CALM_S - 1.0, end + CALM_S), probe.between(end + CALM_S - 1.0, end + CALM_S)])
    assert tail.within() >= 0.95, f"calm p99 {tail.percentile_ms(99):.0f} ms; {seen}"
    assert tail.count(DEADLINE, FAILED) == 0 and tail.count(REFUSED, CANCELLED) <= 0.01 * len(tail), seen


def test_a_steady_load_keeps_a_flat_tail_and_degrades_nothing(generators: Generators,
                                                               overloaded: ServerProcess) -> None:
    # The long run of `fraudscore bench serve --long 300`, short: no drift from caches, GC or timers.
    rate, seconds = 500.0, 12.0
    before, cpu = scrape(overloaded), cpu_times()
    calls, _, start = generators.run(overloaded.target, score_requests(transactions("steady", int(rate * seconds))),
                                     [(rate, seconds)], lead_s=1.0)
    seen = f"{server_side(overloaded, before)}; {host(cpu, calls)}"
    windows = calls.p99_by_window(start, start + seconds, 3.0)
    assert calls.count(DEADLINE, FAILED) == 0, seen
    # Degraded or refused only where the host stalled the server for most of the budget (the watch's
    # answer; gRPC dropping from its short queue, docs/design.md "Overload"): a trace. A server that
    # degrades by itself at a third of its peak (a pessimistic timer, a GC pause, a cache) shows far
    # more: issue 13's timer degraded whole batches.
    assert calls.count(DEGRADED) <= 0.01 * len(calls), seen
    assert calls.count(REFUSED, CANCELLED) <= 0.02 * len(calls), seen
    assert calls.within() >= 0.98, f"p99 by window {windows}; {seen}"
    # Flat: no drift upwards beyond the host's noise.
    assert windows[-1] <= 3 * float(np.median(windows)) + 20, f"{windows}; {seen}"
