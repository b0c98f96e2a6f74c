"""Prometheus metrics: names carry units, counters end in _total, label sets are bounded.

One `Metrics` object per server, on its own registry (tests run several side by side).
"""

from __future__ import annotations

import math
import threading
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterable, Sequence

import numpy as np
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from core.features import EntityState
from core.rules.ruleset import Decision

# No `<counter>_created` gauge beside every counter and histogram series: it doubles the series
# count, and in the text format it reads as a metric of its own (process-wide setting).
disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped in prometheus_client

_LATENCY_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_PROBABILITY_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
_STAGE_BUCKETS_S = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                    0.1, 0.25, 1.0)
# Up to this many values, a Python loop over `bisect` beats numpy's per-call overheads (~1 µs each).
_SMALL_ARRAY = 16

# `fraudscore_stage_duration_seconds{stage}`: the stages of a pipeline call, observed once a batch each.
STAGES = (
    "queue_wait",      # the batch's oldest transaction: arrival → the pipeline thread starts the batch
    "encode",          # columns and keyed hashes of identifiers
    "features",        # feature kernels (entity state read and written)
    "model_rules",     # the model path: forest, rules, decision, reasons (one call into core/)
    "fallback_rules",  # the fallback ruleset, when the model path is unavailable or failed
    "challenger",      # the challenger's shadow scoring (FRAUDSCORE_CHALLENGER_MODEL_DIR)
    "respond",         # response messages and the per-batch decision and rule metrics
)
QUEUE_WAIT, ENCODE, FEATURES, MODEL_RULES, FALLBACK_RULES, CHALLENGER, RESPOND = range(len(STAGES))
# The `decision` label's values, in Decision order: index k of DECISION_LABELS names DECISION_VALUES[k].
DECISION_VALUES = np.array(sorted(int(d) for d in Decision), dtype=np.int8)
DECISION_LABELS = [Decision(int(d)).name for d in DECISION_VALUES]


class ArrayHistogram(Collector):
    """A histogram observed a whole array at a time: one searchsorted and bincount a batch,
    not one `Histogram.observe` (a lock and a bucket walk, ~1 µs) per value."""

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...]) -> None:
        self._name, self._documentation = name, documentation
        self._bounds = np.array(buckets, dtype=np.float64)
        self._bounds_list = [float(b) for b in buckets]
        self._counts = np.zeros(len(buckets) + 1, dtype=np.int64)  # the last: above every bound (+Inf)
        self._sum = 0.0
        self._lock = threading.Lock()  # a scrape reads counts and sum together

    def observe_many(self, values: np.ndarray) -> None:
        if values.shape[0] <= _SMALL_ARRAY:
            self._observe_few(values.tolist())
            return
        values = values[np.isfinite(values)]
        # side="left": the first bound ≥ the value, Prometheus' `le` semantics.
        counts = np.bincount(np.searchsorted(self._bounds, values, side="left"), minlength=self._counts.shape[0])
        total = float(values.sum())
        with self._lock:
            self._counts += counts
            self._sum += total

    def _observe_few(self, values: list[float]) -> None:
        bounds, counts = self._bounds_list, self._counts
        with self._lock:
            for v in values:
                if math.isfinite(v):
                    counts[bisect_left(bounds, v)] += 1
                    self._sum += v

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

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        state = self._state()
        entities = GaugeMetricFamily("fraudscore_state_entities", "Entities tracked in state", labels=["kind"])
        capacity = GaugeMetricFamily("fraudscore_state_capacity", "Entity slots in state", labels=["kind"])
        evictions = CounterMetricFamily(  # exposed as fraudscore_state_evictions_total
            "fraudscore_state_evictions", "Entities evicted since start (least recently seen first)", labels=["kind"])
        if state is not None:
            for table in state.tables():
                entities.add_metric([table.kind], table.occupancy())
                capacity.add_metric([table.kind], table.capacity)
                evictions.add_metric([table.kind], table.evictions)
        yield entities
        yield capacity
        yield evictions


class PipelineHistograms(Collector):
    """The per-batch histograms of the pipeline thread: `fraudscore_stage_duration_seconds{stage}`,
    `fraudscore_batch_size`, `fraudscore_pipeline_duration_seconds` and `fraudscore_fraud_probability`.

    A batch is recorded as one deque append (~0.1 µs); the pending batches are folded into the
    buckets with a few numpy calls at scrape time, or by the recording thread every `FOLD_EVERY`
    batches (so memory stays bounded without scrapes). Bucketing each value as it comes, even
    with `bisect`, cost ~2–4 µs a batch: 5–10 % of a batch of one.
    """

    FOLD_EVERY = 1024

    def __init__(self, stages: Sequence[str]) -> None:
        self._stages = tuple(stages)
        self._pending: deque[tuple[list[tuple[int, int]], int, int]] = deque()
        self._pending_probabilities: deque[np.ndarray] = deque()
        self._stage_bounds_ns = np.array([round(b * 1e9) for b in _STAGE_BUCKETS_S], dtype=np.int64)
        self._stage_counts = np.zeros((len(self._stages), len(_STAGE_BUCKETS_S) + 1), dtype=np.int64)
        self._stage_sums_ns = np.zeros(len(self._stages), dtype=np.int64)
        self._batch_bounds = np.array(_BATCH_BUCKETS, dtype=np.int64)
        self._batch_counts = np.zeros(len(_BATCH_BUCKETS) + 1, dtype=np.int64)
        self._batch_sum = 0
        self._duration_bounds_ns = np.array([round(b * 1e9) for b in _LATENCY_BUCKETS_S], dtype=np.int64)
        self._duration_counts = np.zeros(len(_LATENCY_BUCKETS_S) + 1, dtype=np.int64)
        self._duration_sum_ns = 0
        self.probability = ArrayHistogram(
            "fraudscore_fraud_probability",
            "Fraud probability answered on the model path (the champion), per transaction", _PROBABILITY_BUCKETS)
        self._lock = threading.Lock()  # one fold at a time (the pipeline thread's or a scrape's)

    def record(self, stages: list[tuple[int, int]], size: int, duration_ns: int) -> None:
        """One batch: its (stage index, nanoseconds) pairs, size and whole wall time."""
        self._pending.append((stages, size, duration_ns))
        if len(self._pending) >= self.FOLD_EVERY:
            self._fold()

    def record_probabilities(self, probabilities: np.ndarray) -> None:
        """The fraud probabilities a batch answered on the model path (those its calls received).
        Keeps a reference: pass an array nobody writes to afterwards."""
        self._pending_probabilities.append(probabilities)
        if len(self._pending_probabilities) >= self.FOLD_EVERY:
            self._fold()

    def _fold(self) -> None:
        with self._lock:
            pending, batches = self._pending, []
            while pending:  # deque.popleft is atomic: a batch appended meanwhile waits for the next fold
                batches.append(pending.popleft())
            answered, probabilities = self._pending_probabilities, []
            while answered:
                probabilities.append(answered.popleft())
            if probabilities:
                self.probability.observe_many(np.concatenate(probabilities))
            if not batches:
                return
            pairs = [pair for stages, _, _ in batches for pair in stages]
            if pairs:
                stage, ns = np.array(pairs, dtype=np.int64).T
                # side="left": the first bound ≥ the value, Prometheus' `le` semantics.
                flat = stage * self._stage_counts.shape[1] + np.searchsorted(self._stage_bounds_ns, ns, side="left")
                self._stage_counts += np.bincount(flat, minlength=self._stage_counts.size).reshape(
                    self._stage_counts.shape)
                # float64 weights are exact here: a fold's sums stay far below 2**53 ns.
                self._stage_sums_ns += np.bincount(stage, weights=ns, minlength=len(self._stages)).astype(np.int64)
            sizes = np.array([b[1] for b in batches], dtype=np.int64)
            durations = np.array([b[2] for b in batches], dtype=np.int64)
            self._batch_counts += np.bincount(np.searchsorted(self._batch_bounds, sizes, side="left"),
                                              minlength=self._batch_counts.shape[0])
            self._batch_sum += int(sizes.sum())
            self._duration_counts += np.bincount(np.searchsorted(self._duration_bounds_ns, durations, side="left"),
                                                 minlength=self._duration_counts.shape[0])
            self._duration_sum_ns += int(durations.sum())

    def collect(self) -> Iterable[HistogramMetricFamily]:
        self._fold()
        with self._lock:
            stage_counts, stage_sums = self._stage_counts.copy(), self._stage_sums_ns.tolist()
            batch_counts, batch_sum = self._batch_counts.copy(), self._batch_sum
            duration_counts, duration_sum = self._duration_counts.copy(), self._duration_sum_ns
        stages = HistogramMetricFamily(
            "fraudscore_stage_duration_seconds",
            "Wall time of each stage of a pipeline call, one observation per batch (queue_wait: the batch's "
            "oldest transaction)", labels=["stage"])
        for name, counts, total_ns in zip(self._stages, stage_counts, stage_sums, strict=True):
            stages.add_metric([name], buckets=_cumulative(_STAGE_BUCKETS_S, counts), sum_value=total_ns / 1e9)
        yield stages
        yield HistogramMetricFamily("fraudscore_batch_size", "Transactions per pipeline call",
                                    buckets=_cumulative(_BATCH_BUCKETS, batch_counts), sum_value=batch_sum)
        yield HistogramMetricFamily("fraudscore_pipeline_duration_seconds", "Wall time of one pipeline call",
                                    buckets=_cumulative(_LATENCY_BUCKETS_S, duration_counts),
                                    sum_value=duration_sum / 1e9)
        yield from self.probability.collect()


def _cumulative(bounds: Sequence[float], counts: np.ndarray) -> list[tuple[str, float]]:
    return list(zip([*(repr(float(b)) for b in bounds), "+Inf"], np.cumsum(counts).tolist(), strict=True))


class CallbackCounter(Collector):
    """A counter whose value is read at scrape time from `read` (a count kept elsewhere)."""

    def __init__(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        self._name, self._documentation, self._read = name, documentation, read

    def collect(self) -> Iterable[CounterMetricFamily]:
        yield CounterMetricFamily(self._name, self._documentation, value=self._read())


class Metrics:
    def __init__(self, state: Callable[[], EntityState | None] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("fraudscore_requests", "RPCs finished, by method and status code",
                                ["method", "code"], registry=r)
        self.request_duration = Histogram("fraudscore_request_duration_seconds",
                                          "RPC latency inside the server, by method and status code",
                                          ["method", "code"], buckets=_LATENCY_BUCKETS_S, registry=r)
        # A ScoreStream's request_duration is the stream's lifetime; this is each of its messages.
        self.stream_message_duration = Histogram(
            "fraudscore_stream_message_duration_seconds",
            "ScoreStream: one message's latency inside the server, from its arrival (decoded) to its answer "
            "handed to gRPC", buckets=_LATENCY_BUCKETS_S, registry=r)
        # fraudscore_stage_duration_seconds{stage}, fraudscore_batch_size, fraudscore_pipeline_duration_seconds,
        # fraudscore_fraud_probability: recorded once a batch by the pipeline thread.
        self.pipeline = PipelineHistograms(STAGES)
        r.register(self.pipeline)
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
        self.calls_in_flight = Gauge(
            "fraudscore_calls_in_flight", "FraudScoring calls in the server now (an open ScoreStream counts once)",
            registry=r)
        self.calls_in_flight_limit = Gauge(
            "fraudscore_calls_in_flight_limit",
            "FRAUDSCORE_MAX_CONCURRENT_RPCS: calls past it wait in gRPC's queue or are refused by gRPC", registry=r)
        self.queue_depth = Gauge("fraudscore_queue_depth", "Transactions waiting for the pipeline's answer",
                                 registry=r)
        self.answered_backlog = Gauge(
            "fraudscore_answered_backlog",
            "Transactions answered by the fallback before the pipeline, queued to enter the state", registry=r)
        self.state_errors = Counter(
            "fraudscore_state_errors",
            "Transactions answered (by the fallback) that did not enter the state because the feature kernels "
            "or the state store failed (logged)", registry=r)
        self.features_only = Counter(
            "fraudscore_features_only",
            "Transactions fed into the state without scoring (features only), having been answered by the "
            "fallback while queued", registry=r)
        self.records_unsaved = Counter(
            "fraudscore_shared_records_unsaved",
            "Answers sent whose batch the shared store then failed to write (neither the state nor the "
            "records: a retry is scored afresh and counts once)", registry=r)
        self.snapshots = Counter("fraudscore_state_snapshots",
                                 "State snapshots (state.npz and idempotency.bin) taken, by result (ok, failed)",
                                 ["result"], registry=r)
        for result in ("ok", "failed"):
            self.snapshots.labels(result)  # 0 from the start, so that increase() sees the first
        self.snapshot_written_at = Gauge(
            "fraudscore_state_snapshot_last_written_timestamp_seconds",
            "Unix time at which the last state snapshot was written (0: none yet)", registry=r)
        self.snapshot_duration = Gauge(
            "fraudscore_state_snapshot_duration_seconds",
            "Wall time of the last state snapshot written, from its copy to its files in place (paced: "
            "most of it is pauses)", registry=r)
        self.pipeline_busy = Gauge("fraudscore_pipeline_busy_seconds",
                                   "How long the batch in the pipeline has been running (0 when idle)", registry=r)
        self.pipeline_expected = Gauge(
            "fraudscore_pipeline_expected_seconds",
            "Expected wall time of a full batch (FRAUDSCORE_MAX_BATCH), learnt from recent batches", registry=r)
        self.idempotency_entries = Gauge("fraudscore_idempotency_entries",
                                         "Answers remembered for identical retries", registry=r)
        self.idempotency_evicted: Callable[[], float] = lambda: 0.0  # App points it at its cache
        r.register(CallbackCounter(  # exposed as fraudscore_idempotency_evictions_total
            "fraudscore_idempotency_evictions",
            "Answers forgotten early because FRAUDSCORE_IDEMPOTENCY_MAX_ENTRIES was reached",
            lambda: self.idempotency_evicted()))
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
        self.challenger_reloads = Counter("fraudscore_challenger_reloads",
                                          "Challenger reloads, by result (ok, refused)", ["result"], registry=r)
        if state is not None:
            r.register(_StateCollector(state))
        # process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds… (Linux; read at scrape).
        ProcessCollector(registry=r)
