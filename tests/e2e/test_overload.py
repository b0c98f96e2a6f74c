"""Overload as the caller sees it (issue 15): a real server under several times its peak, measured
by open-loop generators in processes of their own and a separate low-rate probe, on their clock.

Thresholds are loose: the generators share this machine's cores with the server, and the CI host
stalls processes for tens of ms at times (2026-12-03: a steady 500/s run there saw 33 degraded
answers and refusals with a p99 of 373 ms where this host sees none and ~15 ms; a later run here,
with 17 % of the CPU stolen by the hypervisor, 128 refusals in bursts). They are set to tell the
failures they guard against (calls held until their deadline, a slow state outlasting the load,
a server degrading or refusing by itself, all along) from that noise; `fraudscore bench serve`
measures the goals. Failure messages carry what the server counted, how late the generators
sent and how much CPU the hypervisor took."""

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
    OK,
    REFUSED,
    Calls,
    Generators,
    score_requests,
)
from tests.conftest import ServerProcess, bare_server, start_server
from tests.e2e.helpers import Samples, scrape

pytestmark = pytest.mark.e2e

OVERLOAD_RATE, OVERLOAD_S = 4_000.0, 5.0  # well past this machine's peak (~1,500–1,800/s)
CALM_RATE, CALM_S = 200.0, 3.0  # with the probe's 100/s: a fifth of the peak


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
    # caller's deadline (1 s) in a queue no handler sees. Timed from the moment each call was sent:
    # at 4,000/s the generators share the cores and fall behind their schedule themselves.
    assert refused > 0.2 * len(over), f"{refused} of {len(over)} refused: was it overloaded? {seen}"
    refusal_ms = [over.percentile_ms(p, statuses=(REFUSED, CANCELLED), from_send=True) for p in (50, 99)]
    assert refusal_ms[0] < 50 and refusal_ms[1] < 500, f"refusals p50, p99 {refusal_ms} ms; {seen}"
    assert over.count(DEADLINE, FAILED) <= 0.005 * len(over), seen
    # What the server answered, it answered within the budget. The probe, a caller of its own at
    # 100/s, on its clock; the flood from the moment each call left.
    assert int(probe_over.answered.sum()) >= 20, seen
    # (bench serve measures ≥ 99 % on a quiet host; here the bounds only have to tell the old collapse,
    # 3–6 % within 50 ms and everything else timed out, from a noisy shared machine)
    assert probe_over.within() >= 0.6, f"probe p99 {probe_over.percentile_ms(99):.0f} ms; {seen}"
    assert over.within(from_send=True) >= 0.5, f"bulk p99 {over.percentile_ms(99, from_send=True):.0f} ms; {seen}"
    assert over.goodput(OVERLOAD_S) >= 200, seen  # still serving, not busy refusing
    # No slow state after it (the old one outlasted the load by seconds at a p50 of a second): from a
    # second after the overload, calls are answered in budget again.
    calm = Calls.merge([bulk.between(end + 1.0, end + CALM_S), probe.between(end + 1.0, end + CALM_S)])
    assert calm.within() >= 0.8, f"calm p99 {calm.percentile_ms(99):.0f} ms; {seen}"
    assert calm.count(DEADLINE, FAILED) == 0 and calm.count(REFUSED, CANCELLED) <= 0.05 * len(calm), seen


def test_a_steady_load_keeps_a_flat_tail_and_degrades_nothing(generators: Generators,
                                                               overloaded: ServerProcess) -> None:
    # The long run of `fraudscore bench serve --long 300`, short: no drift from caches, GC or timers.
    # The probe sends the same schedule to the bare gRPC server at the same moments: a control that
    # meets the same host (a stolen CPU stalls both; a server's own fault shows in this one only).
    rate, seconds = 300.0, 12.0  # a fifth of this machine's peak
    requests = score_requests(transactions("steady", int(rate * seconds)))
    before, cpu = scrape(overloaded), cpu_times()
    with bare_server() as bare:
        calls, control, start = generators.run(overloaded.target, requests, [(rate, seconds)], probe=requests,
                                               probe_rate_per_s=rate, probe_target=bare, lead_s=1.0)
    seen = (f"{server_side(overloaded, before)}; {host(cpu, calls)}; control: {control.good_share():.1%} "
            f"within 50 ms, p99 {control.percentile_ms(99):.1f} ms")
    windows = calls.p99_by_window(start, start + seconds, 3.0)
    assert calls.count(DEADLINE, FAILED) == 0, seen
    # Answered by the model within 50 ms nearly as often as the bare server answers in time: the
    # host's stalls cost both (this one more: a stall piles up more work per call, and gRPC refuses
    # past its short queue, docs/design.md "Overload"; with 33 % of the CPU stolen, 91 % against the
    # control's 99.8 %). A server that degrades or refuses by itself at a fifth of its peak (a
    # pessimistic timer, a GC pause, a cache, a limit too tight) does it all along, in most windows:
    # issue 13's timer degraded whole batches.
    assert len(control) == len(calls) and control.count(OK) >= 0.9 * len(control), seen
    assert calls.good_share() >= control.good_share() - 0.1, f"{calls.good_share():.1%} within 50 ms; {seen}"
    troubled = calls.windows_with(DEGRADED, REFUSED, CANCELLED, start=start, stop=start + seconds, window_s=0.1)
    assert troubled <= 0.25, f"degraded or refused in {troubled:.0%} of the 100 ms windows; {seen}"
    # Flat: no drift upwards beyond the host's noise.
    assert windows[-1] <= 3 * float(np.median(windows)) + 20, f"{windows}; {seen}"
