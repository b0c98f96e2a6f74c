"""The pipeline: one call into core/ per batch, on the single pipeline thread.

That thread owns the feature engine and all entity state, and runs batches in arrival
order. The model path is guarded: if it raises, the batch is answered by the fallback
rules (degraded, source RULES_FALLBACK) and the next batch tries the model again.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import mmap
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from fraudscore.v1 import fraudscore_pb2 as pb

from core.encode import EncodedBatch, KeyHasher, amount_major
from core.errors import StateStoreError, StateStoreUnavailableError
from core.features import FEATURE_SET_VERSION, EntityState, FeatureEngine
from core.model import LoadedModel
from core.rules.named_lists import identifier_keys
from core.rules.ruleset import Decision
from core.scoring import ScoredBatch, Scorer, Source, risk_score
from service.runtime.metrics import (
    CHALLENGER,
    DECISION_LABELS,
    DECISION_VALUES,
    ENCODE,
    FALLBACK_RULES,
    FEATURES,
    MODEL_RULES,
    QUEUE_WAIT,
    RESPOND,
    Metrics,
)
from service.serving.challenger import record_challenger
from service.serving.encode import encode_transactions
from service.serving.items import Answered, Item
from service.serving.responses import ResponseWriter
from service.serving.shared_records import SharedRecords, fingerprint, verdict

log = logging.getLogger("fraudscore.pipeline")

_DECISION_NAMES = {int(d): d.name for d in Decision}
_SOURCE_NAMES = {int(s): s.name for s in Source}
_OUTCOME_FRAUD_WEIGHT = {pb.CONFIRMED_FRAUD: 1.0, pb.CHARGEBACK: 1.0, pb.CONFIRMED_LEGITIMATE: 0.0}


_MAX_UINT32 = 2**32 - 1
FAULT_SLOW_S = 0.2  # the `model-slow` hook: each model call takes this much longer
FAULT_STALL_S = 2.0  # the `pipeline-stall` hook: the first batch holds the pipeline thread this long
CHALLENGER_ERROR_LOG_S = 60.0  # a failing challenger is logged at most once a minute
STORE_ERROR_LOG_S = 60.0  # a shared store down is logged at most once a minute (counted in metrics throughout)


class InjectedFault(RuntimeError):
    """Raised by the `model-raise` fault-injection hook."""


_SOURCES = max(int(s) for s in Source) + 1
_SMALL_BATCH = 64  # below it, Counter over Python ints beats numpy's fixed cost per call (measured)


@dataclass(frozen=True, slots=True)
class Tally:
    """What a batch's answers add to the decision and rule-hit counters."""

    decisions: list[tuple[int, int, int]]  # (Decision value, Source value, answers)
    rule_hits: list[tuple[int, int, int]]  # (index in DECISION_LABELS, index in the batch's rules, hits)

    @classmethod
    def of(cls, scored: ScoredBatch) -> Tally:
        if len(scored) < _SMALL_BATCH:
            pairs = Counter(zip(scored.decision.tolist(), scored.source.tolist(), strict=True))
            decisions = [(d, s, n) for (d, s), n in pairs.items()]
        else:  # one bincount over decision × source
            counts = np.bincount(scored.decision.astype(np.int64) * _SOURCES + scored.source)
            seen = np.flatnonzero(counts)
            decision, source = divmod(seen, _SOURCES)
            decisions = list(zip(decision.tolist(), source.tolist(), counts[seen].tolist(), strict=True))
        hits = scored.hits.hits
        rule_hits: list[tuple[int, int, int]] = []
        if hits.size and hits.any():  # hits are few: counted one by one
            rows, rules = np.nonzero(hits)
            by = Counter(zip(np.searchsorted(DECISION_VALUES, scored.decision[rows]).tolist(), rules.tolist(),
                             strict=True))
            rule_hits = [(d, r, n) for (d, r), n in by.items()]
        return cls(decisions, rule_hits)


class Pipeline:
    """Everything the pipeline thread does. Not thread-safe by design: one thread calls it."""

    def __init__(self, *, engine: FeatureEngine, scorer: Scorer, hasher: KeyHasher, metrics: Metrics,
                 fault_injection: str = "", fallback_reason: str = "", challenger: LoadedModel | None = None,
                 records: SharedRecords | None = None) -> None:
        self.engine = engine
        self.scorer = scorer
        self.hasher = hasher
        self.metrics = metrics
        self.fault_injection = fault_injection
        # Why the model path is unavailable before trying it (e.g. "no_model"); empty when it is loaded.
        self.fallback_reason = fallback_reason
        self._stalled = False
        # Champion/challenger: a second model scored in shadow on the champion's batches, for metrics only.
        self.challenger = challenger
        self._challenger_logged_at = -math.inf
        self._store_logged_at = -math.inf
        # Idempotency records shared with other servers (a shared store), or None. They are written
        # with the batch's rows, so they need an engine on that shared store.
        if records is not None and not engine.deferrable:
            raise ValueError("shared idempotency records need the engine's state in the same shared store")
        self.records = records
        self._claims_failed = False
        self._defer = False  # `run` with shared records: `_enter_state` defers the write to it
        self._commit: Callable[[Sequence[tuple[bytes, bytes]]], Any] | None = None
        self._snapshot: EntityState | None = None  # snapshot_copy's arrays, reused
        # Answers are serialized where they are made: one writer per thread (its cache is not shared).
        self._writer, self._loop_writer = ResponseWriter(), ResponseWriter()
        self._decision_counters: dict[tuple[int, int], Any] = {}  # `fraudscore_decisions_total`'s children

    def _score(self, batch: EncodedBatch, scorer: Scorer, stages: list[tuple[int, int]], *,
               rows: list[int] | None = None) -> tuple[ScoredBatch, str, np.ndarray | None]:
        """Advance the state by the whole batch, in order, and score its `rows` (None: all). Returns
        the answers, the fallback reason (empty on the model path) and the scored rows' features
        (None if not computed); appends the stages' (index, ns) timings to `stages`."""
        amount = batch.amount if rows is None else batch.amount[rows]
        # For named lists (`card in @blocked_cards`); ~4 µs a batch, so only when the rules use any.
        keys = identifier_keys(batch) if scorer.ruleset.lists else None
        if keys is not None and rows is not None:
            keys = np.ascontiguousarray(keys[:, rows])
        clock = time.perf_counter_ns
        started = clock()
        features, failure = self._enter_state(batch)
        computed = clock()
        stages.append((FEATURES, computed - started))
        if features is None:
            scored = scorer.fallback(None, amount, keys=keys)
            stages.append((FALLBACK_RULES, clock() - computed))
            return scored, failure, None
        if rows is not None:
            features = features[rows]  # a C-contiguous copy of the rows to score
        try:
            if scorer.model is None:
                scored = scorer.fallback(features, amount, keys=keys)
                stages.append((FALLBACK_RULES, clock() - computed))
                return scored, self.fallback_reason or "no_model", features
            if self.fault_injection == "model-raise":
                raise InjectedFault("fault injection: model-raise")
            if self.fault_injection == "model-slow":
                time.sleep(FAULT_SLOW_S)
            if self.fault_injection == "pipeline-stall" and not self._stalled:
                self._stalled = True
                time.sleep(FAULT_STALL_S)
            scored = scorer.score(features, amount, keys=keys)
            stages.append((MODEL_RULES, clock() - computed))
            return scored, "", features
        except Exception as exc:
            log.error("model path failed; answering from fallback rules", extra={
                "reason": "model_error", "error": exc.__class__.__name__, "batch_size": len(amount)})
            failed = clock()
            scored = scorer.fallback(features, amount, keys=keys)
            stages.append((FALLBACK_RULES, clock() - failed))
            return scored, "model_error", features

    def _enter_state(self, batch: EncodedBatch) -> tuple[np.ndarray | None, str]:
        """The batch's features, its transactions entered into the state in order; None and the
        fallback reason when the kernels or the state store failed: then they did not enter it
        (logged, and counted in `fraudscore_state_errors_total`: the one way an answered
        transaction misses the state). A shared store's outage is logged at most once a minute
        (every batch meets it), its reason `state_store_unavailable`."""
        if self._claims_failed:  # the shared records could not be claimed: nothing enters unclaimed
            self.metrics.state_errors.inc(len(batch))
            return None, "state_store_unavailable"
        try:
            if self._defer:  # read and computed now, written by `run` with the answers' records
                features, self._commit = self.engine.compute_deferred(batch)
                return features, ""
            return self.engine.compute(batch), ""
        except StateStoreUnavailableError as exc:
            self.metrics.state_errors.inc(len(batch))
            self._store_unavailable(exc, len(batch))
            return None, "state_store_unavailable"
        except Exception as exc:
            self.metrics.state_errors.inc(len(batch))
            log.error("features failed: these transactions did not enter the state", extra={
                "reason": "features_error", "error": exc.__class__.__name__, "batch_size": len(batch)})
            return None, "features_error"

    def run(self, items: list[Item]) -> Answered:
        """`_run`, with the batch's transactions claimed in the shared records when there are any
        (service/serving/shared_records.py) — the claim sent with the batch's read of its rows, so
        it is made before anything is written: only the fresh ones enter the state and are scored;
        the others get the first answer or their refusal (an exception, which the batcher raises in
        their calls). The fresh ones' rows are written after scoring, with their answers' records."""
        records = self.records
        if records is None:
            return self._run(items)
        txns = [item.payload for item in items]
        keys = [self.hasher.record_key(t.transaction_id) for t in txns]
        prints = [fingerprint(t) for t in txns]
        # The claim rides on the batch's read of its rows: one round trip for both. The batch is
        # computed on the assumption every transaction is fresh (nearly always true); when the
        # claim says otherwise, that computation is dropped unwritten and the fresh ones run again
        # (its answers never delivered, so never counted; its stage timings are, a second time).
        first: Answered | None = None
        first_commit: Callable[[list[tuple[bytes, bytes]]], None] | None = None
        ticket = records.claim_ahead(keys, prints)
        if ticket is not None:
            self._defer = True
            try:
                first = self._run(items)
                first_commit = self._commit
            finally:
                self._defer, self._commit = False, None
                ticket.withdraw()
            if ticket.error is not None:  # the read and the claim failed together: `_run` answered
                return first  # every transaction by the fallback, and none entered the state
        if ticket is not None and ticket.found is not None:
            found = ticket.found
        else:  # no read to ride on (or no store to ride with): a claim of its own
            first = None
            try:
                found = records.claim(keys, prints)
            except StateStoreUnavailableError as exc:
                # Nothing enters the state unclaimed (a retry elsewhere would count it again): the
                # whole batch is answered by the fallback rules, as when the state itself is down.
                self._store_unavailable(exc, len(items))
                self._claims_failed = True
                try:
                    return self._run(items)
                finally:
                    self._claims_failed = False
        verdicts = [verdict(f, p, records.owner) for f, p in zip(found, prints, strict=True)]
        fresh = [k for k, v in enumerate(verdicts) if v is None]
        if first is not None and len(fresh) == len(items):
            answered, commit = first, first_commit
        else:
            # The batch's rows are written after its answers are made, with their records, in one
            # step (`FeatureEngine.compute_deferred`): a server that dies in between wrote neither.
            self._defer = True
            try:
                answered = self._run(items if len(fresh) == len(items) else [items[k] for k in fresh])
                commit = self._commit
            finally:
                self._defer, self._commit = False, None
        ours = iter(answered.answers)
        results: list[Any] = []  # one per item not answered by the fallback, as the batcher expects
        fresh_live: list[int] = []  # positions in `results` of the pipeline's own answers
        record: list[tuple[bytes, int, bytes]] = []
        replays = 0
        for k, item in enumerate(items):
            v = verdicts[k]
            if item.answered_by_fallback:
                f = item.future  # done before the batch was handed over: read, never changed, here
                if v is None and f.done() and not f.cancelled() and f.exception() is None:
                    record.append((keys[k], prints[k], f.result()))
                continue
            if v is None:
                answer = next(ours)
                fresh_live.append(len(results))
                results.append(answer)
                record.append((keys[k], prints[k], answer))
            else:
                replays += isinstance(v, bytes)
                results.append(v)
        columns: list[list[Any]] = [list(c) for c in zip(*record, strict=True)] if record else [[], [], []]
        entered = False
        if commit is not None:
            entries = records.entries(*columns)
            try:
                commit(entries)
                entered = True
            except (StateStoreUnavailableError, StateStoreError) as exc:
                # Answered from the features read, but neither in the state nor recorded: a retry is
                # scored afresh, and counts once. In a Cluster the write may have reached some
                # masters' rows: the records are saved by themselves, so a retry gets this answer
                # rather than counting it again there (the failed master's rows lack it).
                entered = not records.atomic and self._save_records(records, entries)
                self.metrics.state_errors.inc(len(fresh))
                if not entered:
                    self.metrics.records_unsaved.inc(len(record))
                if isinstance(exc, StateStoreUnavailableError):
                    self._store_unavailable(exc, len(fresh))
                else:
                    log.error("features failed: these transactions did not enter the state", extra={
                        "reason": "features_error", "error": exc.__class__.__name__, "batch_size": len(fresh)})
        if fresh and not entered:  # nothing of the batch was written: its claims go now, not in 2 s
            with contextlib.suppress(StateStoreUnavailableError):
                records.release([keys[k] for k in fresh])
        if replays:
            self.metrics.idempotent_replays.inc(replays)
        if len(fresh_live) == len(results):
            return answered
        inner = answered.delivered

        def delivered(mask: list[bool] | None) -> None:
            inner(None if mask is None else [mask[j] for j in fresh_live])

        return Answered(results, delivered)

    @staticmethod
    def _save_records(records: SharedRecords, entries: list[tuple[bytes, bytes]]) -> bool:
        try:
            records.save(entries)
        except StateStoreUnavailableError:
            return False
        return True

    def _store_unavailable(self, exc: StateStoreUnavailableError, n: int) -> None:
        """Logged at most once a minute: every batch meets an outage (its metrics count each)."""
        now = time.monotonic()
        if now - self._store_logged_at >= STORE_ERROR_LOG_S:
            self._store_logged_at = now
            log.error("state store unavailable: these transactions were answered by the fallback rules and did "
                      "not enter the state (logged at most once a minute)", extra={
                          "reason": "state_store_unavailable", "error": exc.reason, "batch_size": n})

    def _run(self, items: list[Item]) -> Answered:
        """Feed a batch into the state, in order, and score the items not `answered_by_fallback`
        (those only enter the state: features, no model). One serialized ScoreResponse per scored item, in
        order; never raises for a model failure. Metrics of the answers are counted by
        `Answered.delivered`, on the event loop, for the answers that reached their calls."""
        # Stage timings: a clock read between stages and one histogram update a batch, never per transaction.
        clock = time.perf_counter_ns
        started = clock()
        scored_rows: list[int] | None = None  # None: every item is scored (the common case)
        if any(item.answered_by_fallback for item in items):
            scored_rows = [k for k, item in enumerate(items) if not item.answered_by_fallback]
        first = items[scored_rows[0]] if scored_rows else items[0] if items else None
        stages = [(QUEUE_WAIT, started - first.received_ns)] if first is not None else []
        txns = [item.payload for item in items]
        batch = encode_transactions(self.hasher, txns)
        encoded = clock()
        stages.append((ENCODE, encoded - started))
        # Read once: a rules reload swaps `self.scorer` from the event loop, and the whole batch
        # (model path and its fallback alike) must answer from one ruleset.
        scorer = self.scorer
        if scored_rows is None:
            scored, fallback_reason, features = self._score(batch, scorer, stages)
            answered = items
        else:
            self.metrics.features_only.inc(len(items) - len(scored_rows))
            if not scored_rows:  # every one answered already: into the state, and done
                self._enter_state(batch)
                stages.append((FEATURES, clock() - encoded))
                self.metrics.pipeline.record(stages, len(items), clock() - started)
                return Answered((), _nothing_delivered)
            scored, fallback_reason, features = self._score(batch, scorer, stages, rows=scored_rows)
            answered = [items[k] for k in scored_rows]
        responding = clock()
        responses = self._responses(answered, scored, self._writer)
        shadow_started = clock()
        stages.append((RESPOND, shadow_started - responding))
        challenger = self.challenger  # once: a reload may swap it (service/runtime/challenger_reload.py)
        if challenger is not None and features is not None and not fallback_reason and len(scored):
            self._shadow(challenger, features, scored)
            stages.append((CHALLENGER, clock() - shadow_started))
        self.metrics.pipeline.record(stages, len(items), clock() - started)
        # Tallied here, on the pipeline thread: the event loop then only adds a few counts.
        return Answered(responses, functools.partial(self._count_answers, scored, fallback_reason, Tally.of(scored)))

    def _count_answers(self, scored: ScoredBatch, fallback_reason: str, tally: Tally,
                       delivered: list[bool] | None) -> None:
        """Event loop: the metrics of the answers that reached their calls (`delivered`: None for all,
        then `tally`, counted on the pipeline thread, holds). A pipeline answer dropped because the
        fallback answered first was never sent: not counted."""
        if delivered is not None:
            scored = scored.take(np.flatnonzero(delivered))
            tally = Tally.of(scored)
        n = len(scored)
        if not n:
            return
        m = self.metrics
        if fallback_reason:
            m.fallbacks.labels(fallback_reason).inc(n)
        else:
            m.pipeline.record_probabilities(scored.fraud_probability)
        self._count(scored, tally)

    def _shadow(self, challenger: LoadedModel, features: np.ndarray, scored: ScoredBatch) -> None:
        """The challenger on the batch the champion answered (after the answers are made): metrics only.
        A failure is counted, logged at most once a minute, and changes nothing."""
        try:
            record_challenger(challenger, features, scored.decision, self.metrics)
        except Exception as exc:
            self.metrics.challenger_errors.inc()
            now = time.monotonic()
            if now - self._challenger_logged_at >= CHALLENGER_ERROR_LOG_S:
                self._challenger_logged_at = now
                log.error("challenger model failed; answers are unaffected (logged at most once a minute)", extra={
                    # The class only: an error's text is not ours to judge (it may quote input).
                    "model_version": challenger.version, "error": exc.__class__.__name__, "batch_size": len(scored)})

    def _count(self, scored: ScoredBatch, tally: Tally) -> None:
        """`fraudscore_decisions_total` by (decision, source), and `fraudscore_rule_hits_total{rule, mode,
        decision}`: each rule's hits by the answer's final decision, shadow rules included, so an analyst
        sees what a shadow rule would have changed. One increment per pair seen, not per transaction."""
        rule_hits, rules, children = self.metrics.rule_hits, scored.hits.rules, self._decision_counters
        for decision, source, count in tally.decisions:
            child = children.get((decision, source))
            if child is None:  # a label lookup costs more than the count: once per pair
                child = children[decision, source] = self.metrics.decisions.labels(
                    _DECISION_NAMES[decision], _SOURCE_NAMES[source])
            child.inc(count)
        for d, r, count in tally.rule_hits:
            rule = rules[r]
            rule_hits.labels(rule.name, "shadow" if rule.shadow else "enforce", DECISION_LABELS[d]).inc(count)

    def _responses(self, items: list[Item], scored: ScoredBatch, writer: ResponseWriter) -> list[bytes]:
        """The serialized ScoreResponses (service/serving/responses.py); what a batch shares, once."""
        now_ns = time.perf_counter_ns()
        return writer.write(
            [item.payload.transaction_id for item in items], scored.fraud_probability.tolist(),
            risk_score(scored.fraud_probability).tolist(), scored.decision.tolist(), scored.source.tolist(),
            scored.reasons, degraded=scored.degraded, model_version=scored.model_version,
            ruleset_version=scored.ruleset_version, feature_set_version=FEATURE_SET_VERSION,
            latencies_us=[min((now_ns - item.received_ns) // 1000, _MAX_UINT32) for item in items])

    def apply_outcome(self, req: pb.ReportOutcomeRequest) -> None:
        """Feed one outcome report into state (fraud and chargebacks count; legitimate does not)."""
        self.engine.apply_outcomes(
            np.array([self.hasher.key(req.card_id)], dtype=np.uint64),
            np.array([self.hasher.key(req.merchant_id)], dtype=np.uint64),
            np.array([req.reported_time_ms], dtype=np.int64),
            np.array([_OUTCOME_FRAUD_WEIGHT[req.outcome]], dtype=np.float64),
        )

    def answer_fallback(self, items: list[Item], reason: str) -> list[bytes]:
        """Fallback answers (degraded) for items the model path cannot answer within their budget,
        counted by `reason`. Runs on the event loop and touches no state: the batcher keeps the items
        queued, and the pipeline feeds them into the state in their turn (`run`). Their identifiers
        are encoded here only when the ruleset has named lists (so that a blocklist holds here too),
        a cost the event loop pays only then."""
        txns = [item.payload for item in items]
        scorer = self.scorer  # one read: a reload may swap it between calls
        if scorer.ruleset.lists:
            batch = encode_transactions(self.hasher, txns)
            scored = scorer.fallback(None, batch.amount, keys=identifier_keys(batch))
        else:
            amount = amount_major(np.fromiter((t.amount_minor for t in txns), dtype=np.int64, count=len(txns)),
                                  [t.currency for t in txns])
            scored = scorer.fallback(None, amount)
        responses = self._responses(items, scored, self._loop_writer)
        # Counted once the answers exist: a fallback that raised answered nobody.
        self.metrics.fallbacks.labels(reason).inc(len(items))
        self._count(scored, Tally.of(scored))
        return responses

    def touch_state(self) -> None:
        """Write one byte of every memory page of the in-process state tables (rewriting what is
        there), before serving. Fresh tables are zero pages the kernel has not mapped yet; without
        this, the first transactions of each new entity pay those page faults on the serving path
        (~70 ms in the first batches of a fresh server, measured). Restored tables were written by
        the load already; this costs them one pass. A store other than the process's own: nothing."""
        try:
            state = self.engine.state
        except AttributeError:
            return
        for table in state.tables():
            for array in (table.keys, table.last_seen_ms, table.values, table.tags):
                flat = array.reshape(-1).view(np.uint8)
                flat[::mmap.PAGESIZE] = flat[::mmap.PAGESIZE].copy()

    def snapshot_copy(self) -> EntityState:
        """A copy of state, taken between batches, to be written to disk off this thread.

        Copied into the same arrays every time, allocated (and so page-faulted) by the first
        call, which start-up makes: a fresh copy of the default 108 MiB of tables took ~250 ms
        on the pipeline thread, against ~30 ms into arrays already in memory. The copy is valid
        until the next call (`App.snapshot` copies and writes under one lock)."""
        s = self.engine.state
        copy = self._snapshot
        if copy is None or any(mine.keys.shape != theirs.keys.shape or mine.values.shape != theirs.values.shape
                               for mine, theirs in zip(copy.tables(), s.tables(), strict=True)):
            copy = self._snapshot = EntityState(*(type(t)(
                t.kind, t.keys.copy(), t.last_seen_ms.copy(), t.values.copy(), t.tags.copy(), t.counters.copy())
                for t in s.tables()))
            return copy
        for mine, theirs in zip(copy.tables(), s.tables(), strict=True):
            for name in ("keys", "last_seen_ms", "values", "tags", "counters"):
                np.copyto(getattr(mine, name), getattr(theirs, name))
        return copy


def _nothing_delivered(delivered: list[bool] | None) -> None:
    """The `Answered.delivered` of a batch that answered nobody."""
