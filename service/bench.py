"""`fraudscore bench`: timings measured side by side in one run, printed as ratios.

The machine is shared and noisy, so absolute times drift; each ratio compares two things
timed in the same run, interleaved. Needs the `train` extra (LightGBM is the baseline).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from core.encode import KeyHasher
from core.features import EntityState, FeatureEngine
from core.model import MODEL_FILE, load_model_dir
from core.replay import encode_history, replay_features
from core.simulate import simulate

BATCH_SIZES = (1, 8, 64, 256, 1024)


def _best_us(fn: Callable[[], object], *, min_time_s: float = 0.2, repeats: int = 5) -> float:
    """Best-of-`repeats` mean microseconds per call (the least disturbed estimate)."""
    fn()
    calls = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        if time.perf_counter() - t0 >= min_time_s / repeats:
            break
        calls *= 2
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best * 1e6


def bench_forest(model_dir: Path, X: np.ndarray) -> list[str]:
    import lightgbm as lgb

    forest = load_model_dir(model_dir).forest
    booster = lgb.Booster(model_file=str(model_dir / MODEL_FILE))
    lines = [f"forest: {forest.num_trees} trees, {forest.num_features} features",
             f"{'batch':>6} {'lightgbm µs':>12} {'forest µs':>10} {'µs/row':>8} {'speed-up':>9}"]
    for n in BATCH_SIZES:
        rows = np.ascontiguousarray(X[:n])
        lgb_us = _best_us(functools.partial(booster.predict, rows, num_threads=1))
        our_us = _best_us(functools.partial(forest.predict, rows))
        lines.append(f"{n:>6} {lgb_us:>12.1f} {our_us:>10.1f} {our_us / n:>8.2f} {lgb_us / our_us:>8.1f}×")
    one = np.ascontiguousarray(X[:1])
    lgb_us = _best_us(lambda: booster.predict(one, num_threads=1, pred_contrib=True))
    our_us = _best_us(lambda: forest.path_attributions(one))
    lines.append(f"reasons, 1 row: lightgbm pred_contrib {lgb_us:.1f} µs, forest path attributions {our_us:.1f} µs "
                 f"({lgb_us / our_us:.1f}×)")
    return lines


def bench_features(n_history: int = 20_000) -> tuple[list[str], np.ndarray]:
    history = simulate(num_days=7, num_cards=2_000, num_merchants=300, seed=3)
    history = history.slice(0, min(n_history, len(history)))
    X = replay_features(history)
    batch = encode_history(history, KeyHasher())
    lines = [f"features: {len(history)} simulated transactions replayed"]
    for n in (1, 64, 1024):
        def run(n: int = n) -> None:
            engine = FeatureEngine(EntityState.empty(card_capacity=1 << 14, merchant_capacity=1 << 12,
                                                     customer_capacity=1 << 14, device_capacity=1 << 14,
                                                     ip_capacity=1 << 14))
            for start in range(0, 4096, n):
                engine.compute(batch.slice(start, start + n))
        us = _best_us(run, repeats=3)
        lines.append(f"  batch {n:>5}: {us / 4096:.3f} µs per transaction (4096 transactions, fresh state)")
    return lines, X


def main(model_dir: Path) -> int:
    lines, X = bench_features()
    lines += bench_forest(model_dir, X)
    print("\n".join(lines))
    return 0
