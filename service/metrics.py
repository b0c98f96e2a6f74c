"""Prometheus metrics: names carry units, counters end in _total, label sets are bounded.

One `Metrics` object per server, on its own registry (tests run several side by side).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from core.features import EntityState

_LATENCY_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_PROBABILITY_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


class ArrayHistogram(Collector):
    """A histogram observed a whole array at a time: one searchsorted and bincount a batch,
    not one `Histogram.observe` (a lock and a bucket walk, ~1 µs) per value."""

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...]) -> None:
        self._name, self._documentation = name, documentation
        self._bounds = np.array(buckets, dtype=np.float64)
        self._counts = np.zeros(len(buckets) + 1, dtype=np.int64)  # the last: above every bound (+Inf)
        self._sum = 0.0
        self._lock = threading.Lock()  # a scrape reads counts and sum together

    def observe_many(self, values: np.ndarray) -> None:
        values = values[np.isfinite(values)]
        # side="left": the first bound ≥ the value, Prometheus' `le` semantics.
        counts = np.bincount(np.searchsorted(self._bounds, values, side="left"), minlength=self._counts.shape[0])
        total = float(values.sum())
        with self._lock:
            self._counts += counts
            self._sum += total

    def collect(self) -> Iterable[HistogramMetricFamily]:
        with self._lock:
            cumulative, total = np.cumsum(self._counts).tolist(), self._sum
        bounds = [*(repr(float(b)) for b in self._bounds.tolist()), "+Inf"]
        yield HistogramMetricFamily(self._name, self._documentation,
                                    buckets=list(zip(bounds, cumulative, strict=True)), sum_value=total)


class _StateCollector(Collector):
    """Occupancy and evictions of entity state, read at scrape time (no cost on the hot path)."""

    def __init__(self, state: Callable[[], EntityState | None]) -> None:
        self._state = state

    def collect(self) -> Iterable[GaugeMetricFamily]:
        state = self._state()
        entities = GaugeMetricFamily("fraudscore_state_entities", "Entities tracked in state", labels=["kind"])
        capacity = GaugeMetricFamily("fraudscore_state_capacity", "Entity slots in state", labels=["kind"])
        evictions = GaugeMetricFamily(
            "fraudscore_state_evictions", "Entities evicted since start (least recently seen first)", labels=["kind"])
        if state is not None:
            for table in state.tables():
                entities.add_metric([table.kind], table.occupancy())
                capacity.add_metric([table.kind], table.capacity)
                evictions.add_metric([table.kind], table.evictions)
        yield entities
        yield capacity
        yield evictions


class Metrics:
    def __init__(self, state: Callable[[], EntityState | None] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("fraudscore_requests", "RPCs finished, by method and status code",
                                ["method", "code"], registry=r)
        self.request_duration = Histogram("fraudscore_request_duration_seconds", "RPC latency inside the server",
                                          ["method"], buckets=_LATENCY_BUCKETS_S, registry=r)
        self.batch_size = Histogram("fraudscore_batch_size", "Transactions per pipeline call",
                                    buckets=_BATCH_BUCKETS, registry=r)
        self.pipeline_duration = Histogram("fraudscore_pipeline_duration_seconds", "Wall time of one pipeline call",
                                           buckets=_LATENCY_BUCKETS_S, registry=r)
        self.decisions = Counter("fraudscore_decisions", "Decisions made, by decision and source",
                                 ["decision", "source"], registry=r)
        self.fallbacks = Counter("fraudscore_fallbacks", "Transactions answered by the fallback rules, by reason",
                                 ["reason"], registry=r)
        self.sheds = Counter("fraudscore_sheds", "Calls refused to protect latency, by reason", ["reason"], registry=r)
        self.rule_hits = Counter("fraudscore_rule_hits", "Rule matches (shadow included), by rule, mode and the "
                                 "answer's final decision", ["rule", "mode", "decision"], registry=r)
        self.rules_reloads = Counter("fraudscore_rules_reloads", "Rules reloads, by result (ok, refused)",
                                     ["result"], registry=r)
        self.model_reloads = Counter("fraudscore_model_reloads", "Model reloads, by result (ok, refused)",
                                     ["result"], registry=r)
        self.idempotent_replays = Counter("fraudscore_idempotent_replays",
                                          "Calls answered from an earlier identical call", registry=r)
        self.outcomes = Counter("fraudscore_outcomes", "Outcome reports recorded, by outcome", ["outcome"], registry=r)
        self.model_info = Gauge("fraudscore_model_info", "Versions in use (value 1)",
                                ["model_version", "ruleset_version", "feature_set_version"], registry=r)
        self.model_loaded = Gauge("fraudscore_model_loaded", "1 when a model is loaded, 0 when serving fallback only",
                                  registry=r)
        self.queue_depth = Gauge("fraudscore_queue_depth", "Transactions waiting for the pipeline", registry=r)
        self.pipeline_busy = Gauge("fraudscore_pipeline_busy_seconds",
                                   "How long the batch in the pipeline has been running (0 when idle)", registry=r)
        self.pipeline_expected = Gauge(
            "fraudscore_pipeline_expected_seconds",
            "Expected wall time of a full batch (FRAUDSCORE_MAX_BATCH), learnt from recent batches", registry=r)
        self.idempotency_entries = Gauge("fraudscore_idempotency_entries",
                                         "Answers remembered for identical retries", registry=r)
        self.idempotency_evictions = Gauge(
            "fraudscore_idempotency_evictions",
            "Answers forgotten early because FRAUDSCORE_IDEMPOTENCY_MAX_ENTRIES was reached", registry=r)
        # Champion/challenger (FRAUDSCORE_CHALLENGER_MODEL_DIR): the challenger's scores, never answered.
        self.challenger_probability = ArrayHistogram(
            "fraudscore_challenger_probability",
            "Fraud probability of the challenger model (shadow: never answered), per transaction scored by the model",
            _PROBABILITY_BUCKETS)
        r.register(self.challenger_probability)
        self.challenger_disagreements = Counter(
            "fraudscore_challenger_disagreements",
            "Transactions where the challenger's decision (by its own thresholds) differs from the champion's answer, "
            "by each one's decision", ["champion", "challenger"], registry=r)
        self.challenger_info = Gauge("fraudscore_challenger_info", "The challenger model in shadow (value 1)",
                                     ["model_version"], registry=r)
        self.challenger_errors = Counter("fraudscore_challenger_errors",
                                         "Batches the challenger failed to score (answers unaffected)", registry=r)
        if state is not None:
            r.register(_StateCollector(state))
