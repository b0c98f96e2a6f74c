"""`fraudscore bench store`: the feature engine on a shared Redis against the in-process tables,
and the server's ScoreBatch throughput with one worker against two on that Redis.

A redis-server of its own on a loopback port (service/bench/redis_server.py). The engines are fed
the same kind of traffic (200,000 cards, 5,000 merchants, new customers, devices and IPs), timed
in alternating rounds in one run: what a batch's two round trips add, and this process's CPU per
transaction, at batch 1 and 64 (Redis's own CPU is on another core and not counted). The servers
get closed-loop ScoreBatch load from the generator processes of `bench serve`, over several
connections each (the kernel hands a port's workers connections, not calls).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from core.encode import EncodedBatch
from core.features import EntityState, FeatureEngine
from service.bench.openloop import Generators, batch_requests
from service.bench.redis_server import RedisCluster, RedisServer
from service.bench.serve import _free_port, _scrape, _stop, _Traffic, _wait_serving
from service.state.redis_store import RedisStore, open_redis_store

BATCHES = (1, 64)
GOALS_MS = {1: 0.5, 64: 1.5}  # issue 16: added server time per batch against a loopback Redis
ROUNDS, CALLS = 5, 200
BASE_MS = 1_767_225_600_000
WORKERS_SETTLE_S = 5.0
# 2 processes × 2 × 16 = 64 transactions outstanding: ~13 ms of work at 5,000/s. At 32 a request
# (128 outstanding) the CI host, half as fast as this one, reached 5,024 txn/s and the batcher
# rightly answered 448 transactions by the fallback (`expected_over_budget`); with a busy loop
# on one core here the same: 19,424 of them. At 16, 0 with or without the busy loop. The run
# measures the servers inside the budget, not how they shed past it (`bench serve` does that).
WORKERS_BATCH, WORKERS_IN_FLIGHT = 16, 2


def _traffic(rng: np.random.Generator, n: int, t_ms: int) -> EncodedBatch:
    def fresh() -> np.ndarray:
        return rng.integers(1, 2**63, n, dtype=np.uint64)

    return EncodedBatch(card_key=rng.integers(1, 200_000, n).astype(np.uint64), customer_key=fresh(),
                        merchant_key=rng.integers(1, 5_000, n).astype(np.uint64), device_key=fresh(), ip_key=fresh(),
                        amount=rng.random(n) * 100, event_time_ms=np.full(n, t_ms, dtype=np.int64),
                        channel=np.ones(n, dtype=np.int64), merchant_category=np.full(n, 5411, dtype=np.int64),
                        country=np.full(n, 3, dtype=np.int64), latitude=np.full(n, np.nan),
                        longitude=np.full(n, np.nan))


def _round(engine: FeatureEngine, batches: list[EncodedBatch]) -> tuple[list[float], float]:
    """Wall ms of each call, and this process's CPU µs per transaction over the round."""
    took = []
    cpu = time.process_time()
    for batch in batches:
        started = time.perf_counter()
        engine.compute(batch)
        took.append((time.perf_counter() - started) * 1e3)
    return took, (time.process_time() - cpu) * 1e6 / sum(len(b) for b in batches)


def _server_throughput(model_dir: Path, redis_url: str, workers: int, requests: list[bytes], gen: Generators,
                       seconds: float) -> tuple[float, int, str]:
    """ScoreBatch transactions per second of `fraudscore serve --workers N` on the Redis, how many
    answers were degraded, and the fallback reasons the server counted (its /metrics)."""
    port, metrics_port = _free_port(), _free_port()
    target = f"127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRAUDSCORE_")} | {
        "FRAUDSCORE_LOG_LEVEL": "ERROR", "FRAUDSCORE_STATE_URL": redis_url, "FRAUDSCORE_WORKERS": str(workers)}
    with tempfile.TemporaryDirectory() as state_dir:
        proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--model", str(model_dir), "--port",
                                 str(port), "--metrics-port", str(metrics_port), "--state-dir", state_dir], env=env)
        try:
            _wait_serving(target, proc, health=True)
            time.sleep(WORKERS_SETTLE_S)  # every worker warm and bound, not only the first
            result = gen.batches(target, requests, size=WORKERS_BATCH, in_flight=WORKERS_IN_FLIGHT, seconds=seconds,
                                 connections=WORKERS_IN_FLIGHT)
            reasons = {dict(labels)["reason"]: value for (name, labels), value in _scrape(metrics_port).items()
                       if name == "fraudscore_fallbacks_total" and value}
        finally:
            _stop(proc)
    return result.per_s, result.degraded, ", ".join(f"{r} {v:,.0f}" for r, v in sorted(reasons.items())) or "none"


def bench_store(model_dir: Path | None = None, *, seconds: float = 5.0) -> list[str]:
    with tempfile.TemporaryDirectory() as workdir:
        redis = RedisServer(Path(workdir) / "standalone").start()
        cluster = RedisCluster(Path(workdir) / "cluster").start()
        try:
            rng = np.random.default_rng(0)
            engines = {"local": FeatureEngine(EntityState.empty()),
                       "redis": FeatureEngine(RedisStore(redis.client(), namespace=b"bench:")),
                       "cluster": FeatureEngine(open_redis_store(cluster.url, namespace=b"bench:", timeout_s=5.0,
                                                                 hold_wait_s=5.0))}
            lines = ["", "store: the feature engine on a loopback Redis against the in-process tables "
                         "(service/bench/store.py); two round trips a batch (a 3-master Cluster: two to each master)"]
            clock = BASE_MS
            for n in BATCHES:
                times: dict[str, list[float]] = {name: [] for name in engines}
                cpus: dict[str, list[float]] = {name: [] for name in engines}
                for _ in range(ROUNDS):
                    for name, engine in engines.items():
                        batches = [_traffic(rng, n, clock + i) for i in range(CALLS)]
                        clock += CALLS
                        took, cpu_us = _round(engine, batches)
                        times[name] += took
                        cpus[name].append(cpu_us)
                p50 = {name: float(np.percentile(t, 50)) for name, t in times.items()}
                p99 = {name: float(np.percentile(t, 99)) for name, t in times.items()}
                cpu = {name: float(np.median(c)) for name, c in cpus.items()}
                added = p50["redis"] - p50["local"]
                lines.append(f"  batch {n}: in process p50 {p50['local']:.3f} ms, Redis p50 {p50['redis']:.3f} ms "
                             f"(p99 {p99['redis']:.2f}): added {added:.2f} ms (goal ≤ {GOALS_MS[n]} ms); "
                             f"CPU of this process per transaction {cpu['local']:.1f} → {cpu['redis']:.1f} µs "
                             f"({cpu['redis'] / cpu['local']:.1f}×)")
                lines.append(f"  batch {n} on a 3-master Cluster: p50 {p50['cluster']:.3f} ms (p99 "
                             f"{p99['cluster']:.2f}): added {p50['cluster'] - p50['local']:.2f} ms; CPU of this "
                             f"process per transaction {cpu['cluster']:.1f} µs ({cpu['cluster'] / cpu['local']:.1f}×)")
            if model_dir is not None:
                # Built before any server starts (the simulated month takes seconds of CPU): the runs
                # measure the servers, not this process building requests beside them.
                traffic = _Traffic()
                requests = [batch_requests(traffic.txns(int(40_000 * seconds)), WORKERS_BATCH) for _ in range(2)]
                with Generators(2) as gen:
                    one, one_bad, one_why = _server_throughput(model_dir, redis.url, 1, requests[0], gen, seconds)
                    two, two_bad, two_why = _server_throughput(model_dir, redis.url, 2, requests[1], gen, seconds)
                lines.append(f"  ScoreBatch of {WORKERS_BATCH} on Redis, 2 generator processes × {WORKERS_IN_FLIGHT} "
                             f"connections, one request in flight on each, on the same 2 cores: 1 worker {one:,.0f} "
                             f"txn/s, 2 workers {two:,.0f} txn/s (ratio {two / one:.2f}); degraded {one_bad} and "
                             f"{two_bad} (must be 0: the load stays inside the budget; fallback reasons counted by the "
                             f"servers: {one_why}; {two_why})")
            return lines
        finally:
            redis.stop()
            cluster.stop()
