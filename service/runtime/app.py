"""The server's parts wired together: settings → rules, model, state → pipeline, batcher, metrics.

Snapshots: the entity state and, beside it, the idempotency records (answers and outcome
reports seen), written together periodically and at shutdown (`App.snapshot`), restored at
start (service/runtime/restore.py). Why the two stay consistent: `App.snapshot` and docs/design.md
("Idempotency across restarts").
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import Executor
from pathlib import Path
from typing import Any, TypeVar

from fraudscore.v1 import fraudscore_pb2 as pb
from prometheus_client import start_http_server

from core.encode import KeyHasher
from core.features import FEATURE_SET_VERSION, EntityState, FeatureEngine
from core.files import Pacer
from core.scoring import Scorer
from service.runtime.challenger_reload import ChallengerReload
from service.runtime.config import DEFAULT_ID_HASH_KEY, Settings
from service.runtime.metrics import Metrics
from service.runtime.reload import Reloader, load_rules, loaded_stamp, model_stamp, rules_stamp
from service.runtime.restore import (
    SNAPSHOT_FILE,
    load_challenger,
    load_model,
    open_state,
    restore_idempotency,
    write_snapshot,
)
from service.serving.batcher import MicroBatcher
from service.serving.idempotency import IdempotencyCache
from service.serving.items import Answered, Item
from service.serving.pipeline import Pipeline
from service.serving.timer import PipelineTimer, bucket_sizes
from service.serving.warm import trial_pipeline, warm_transactions, warm_up

log = logging.getLogger("fraudscore.app")
# How long a snapshot waits for answers already in its state copy to reach their calls. They
# arrive within a few event-loop turns; running out means a bug, and the snapshot is skipped.
DELIVERY_TIMEOUT_S = 10.0
# The share of the wall clock a periodic snapshot's listing, encoding and writing may take, in
# slices (core.files.Pacer). At 1,000 calls/s on 2 cores, snapshots at full speed cost ~10 calls
# dropped by gRPC's queue each and a p99 of 20–50 ms in their second (docs/benchmarks.md); paced
# at a quarter, ~0 and 9–19 ms. The final snapshot at shutdown goes at full speed.
SNAPSHOT_SHARE = 0.25
T = TypeVar("T")


class App:
    """Everything a running server holds. Built on the event loop thread; state is the pipeline thread's."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.serving = False
        # Stamped before loading: a change in between is then seen by the first poll.
        rules_seen = rules_stamp(settings.rules_file) if settings.rules_file is not None else None
        # Named lists are hashed with the server's key, so they match the keys of its requests.
        self.hasher = KeyHasher(settings.id_hash_key.encode())
        ruleset = load_rules(settings.rules_file, hasher=self.hasher)
        if rules_seen is not None:
            rules_seen = loaded_stamp(rules_seen, ruleset)
        model_seen = model_stamp(settings.model_dir) if settings.model_dir is not None else None
        model, reason = load_model(settings.model_dir, self.hasher)
        challenger_dir = settings.challenger_model_dir
        challenger_seen = model_stamp(challenger_dir) if challenger_dir is not None else None
        challenger = load_challenger(challenger_dir, self.hasher)
        state = open_state(settings, self.hasher)
        self.engine = FeatureEngine(state)
        # With a shared store, idempotency records are shared too (service/serving/shared_records.py).
        records = state.records(ttl_s=settings.idempotency_ttl_s) if hasattr(state, "records") else None
        # A shared store's engine has no in-process tables: no table gauges (getattr's None).
        self.metrics = Metrics(state=lambda: getattr(self.engine, "state", None))
        self.pipeline = Pipeline(engine=self.engine, scorer=Scorer(model, ruleset, reasons_method=settings.reasons_method),
                                 hasher=self.hasher, metrics=self.metrics,
                                 fault_injection=settings.fault_injection, fallback_reason=reason,
                                 challenger=challenger, records=records)
        # The challenger's directory is watched like the champion's, on the same reload task.
        extra = {} if challenger_dir is None else {"challenger": (settings.model_reload_s, ChallengerReload(
            challenger_dir, challenger_seen, pipeline=self.pipeline, metrics=self.metrics).check)}
        self.reloader = Reloader(settings.rules_file, rules_seen, pipeline=self.pipeline, hasher=self.hasher,
                                 metrics=self.metrics, interval_s=settings.rules_reload_s,
                                 reasons_method=settings.reasons_method, model_dir=settings.model_dir,
                                 model_seen=model_seen, model_interval_s=settings.model_reload_s, extra_checks=extra)
        # Answers are serialized ScoreResponses from birth (service/serving/responses.py), kept as they
        # are (as the records file holds them): a compacted entry is plain data that the garbage
        # collector does not walk (service/serving/idempotency.py).
        self.idempotency: IdempotencyCache[bytes, bytes] = IdempotencyCache(
            ttl_s=settings.idempotency_ttl_s, max_entries=settings.idempotency_max_entries)
        # Whether an outcome report counted: a bool, kept as it is.
        self.outcomes_seen: IdempotencyCache[bool, bool] = IdempotencyCache(
            ttl_s=settings.idempotency_ttl_s, max_entries=settings.idempotency_max_entries)
        restore_idempotency(settings, self.idempotency, self.outcomes_seen)
        # Pipeline thread only: the work in state whose answers may not have reached the loop yet.
        self._last_batch: list[Item] = []
        self._outcomes_applied: list[asyncio.Future[Any]] = []
        # Event loop only: those futures, handed over by a snapshot copy, not yet seen settled.
        self._undelivered: list[asyncio.Future[Any]] = []
        self.outcomes_in_flight = 0
        self.metrics_port = 0
        self._snapshot_lock = asyncio.Lock()
        if settings.id_hash_key == DEFAULT_ID_HASH_KEY:
            log.warning("FRAUDSCORE_ID_HASH_KEY is the published default: identifiers in state snapshots can be "
                        "brute-forced back; set a secret key in production")
        elif len(settings.id_hash_key.encode()) < 16:  # the key's length only, never the key
            log.warning("FRAUDSCORE_ID_HASH_KEY is shorter than 16 bytes: a short secret can be guessed, and with "
                        "it identifiers in state snapshots; set at least 16 random bytes")
        self._executor: Executor | None = None
        self._batcher: MicroBatcher | None = None
        self._snapshot_task: asyncio.Task[None] | None = None
        self._metrics_server: Any = None
        m = self.metrics
        m.idempotency_entries.set_function(lambda: len(self.idempotency))
        m.idempotency_evicted = lambda: self.idempotency.evicted
        m.model_loaded.set(1 if model else 0)
        m.model_info.labels(self.model_version, self.ruleset_version, self.feature_set_version).set(1)
        if challenger is not None:
            m.challenger_info.labels(challenger.version).set(1)

    @property
    def scorer(self) -> Scorer:
        """The scorer in use now: a rules or model reload swaps it whole (service/runtime/reload.py)."""
        return self.pipeline.scorer

    @property
    def model_version(self) -> str:
        return self.scorer.model.version if self.scorer.model else ""

    @property
    def ruleset_version(self) -> str:
        return self.scorer.ruleset.version

    @property
    def feature_set_version(self) -> str:
        return FEATURE_SET_VERSION

    @property
    def batcher(self) -> MicroBatcher:
        if self._batcher is None:
            raise RuntimeError("App.start() has not run")
        return self._batcher

    async def run_on_pipeline(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn` on the pipeline thread, after every batch already handed to it."""
        if self._executor is None:
            raise RuntimeError("App.start() has not run")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def start(self, executor: Executor) -> None:
        """Warm the kernels on the pipeline thread, then open for calls."""
        self._executor = executor
        s = self.settings
        await self.run_on_pipeline(self.pipeline.touch_state)
        await self.run_on_pipeline(warm_up, self.scorer, self.hasher, self.pipeline.challenger)
        self._batcher = MicroBatcher(self._run_batch, executor, max_batch=s.max_batch, max_wait_us=s.max_wait_us,
                                     max_queue=s.max_queue, fallback=self.pipeline.answer_fallback,
                                     shed_to_fallback=s.shed_mode == "fallback")
        await self._seed_timer(self._batcher.timer)
        self._batcher.start()
        self.reloader.start()
        self.metrics.queue_depth.set_function(lambda: self.batcher.queued)
        self.metrics.answered_backlog.set_function(lambda: self.batcher.answered_backlog)
        self.metrics.pipeline_busy.set_function(lambda: self.batcher.busy_s)
        self.metrics.pipeline_expected.set_function(lambda: self.batcher.timer.expected_s(s.max_batch))
        if s.metrics_port:
            self._metrics_server, _ = start_http_server(s.metrics_port, addr=s.metrics_host,
                                                        registry=self.metrics.registry)
            self.metrics_port = self._metrics_server.server_port
        if s.state_dir is not None and s.snapshot_interval_s > 0:
            self._snapshot_task = asyncio.get_running_loop().create_task(self._snapshot_every(s.snapshot_interval_s))
        self.serving = True

    async def _seed_timer(self, timer: PipelineTimer, *, runs: int = 3) -> None:
        """Time pipeline calls as the batcher times them (hand-off to the pipeline thread included),
        on a throwaway state, and seed the batcher's timer with the median of `runs` each: a call of
        every batch-size bucket up to max_batch (1, 2, 4, …, max_batch), a batch of max_batch
        transactions that only enter the state, and, with snapshots on, a copy of the real state
        (taken between nothing: nothing is served yet). Without this the first real calls were
        predicted from a warm-up of two transactions, stretched to whatever size came next."""
        trial = trial_pipeline(self.pipeline)
        loop = asyncio.get_running_loop()

        async def median_s(fn: Callable[..., Any], *args: Any, times: int = runs) -> float:
            took = []
            for _ in range(times):
                started = time.monotonic()
                await self.run_on_pipeline(fn, *args)
                took.append(time.monotonic() - started)
            return sorted(took)[times // 2]

        def items(size: int, *, answered: bool = False) -> list[Item]:
            return [Item(t, math.inf, time.perf_counter_ns(), loop.create_future(), answered_by_fallback=answered)
                    for t in warm_transactions(size)]

        max_batch = self.settings.max_batch
        for size in bucket_sizes(max_batch):
            timer.observe(size, await median_s(trial.run, items(size)))
        timer.observe_batch(0, max_batch, await median_s(trial.run, items(max_batch, answered=True)))
        if self.settings.state_dir is not None and self.settings.snapshot_interval_s > 0:
            with contextlib.suppress(AttributeError):  # a state kept elsewhere has no copy to take
                # The first copy allocates the arrays the later ones reuse: the median is a reuse.
                timer.observe_work("snapshot", await median_s(self.pipeline.snapshot_copy))

    def latest_event_time_ms(self) -> int:
        """The latest event or report time accepted now: the server's clock plus the allowed skew."""
        return int((time.time() + self.settings.max_clock_skew_s) * 1000)

    def _run_batch(self, items: list[Item]) -> Answered:
        """Pipeline thread: score a batch, and note it as the latest work in state."""
        try:
            return self.pipeline.run(items)
        finally:
            self._last_batch = items

    def apply_outcome(self, request: pb.ReportOutcomeRequest, recorded: asyncio.Future[Any]) -> None:
        """Pipeline thread: feed an outcome report into state; `recorded` is its outcomes_seen future."""
        try:
            self.pipeline.apply_outcome(request)
        finally:
            self._outcomes_applied.append(recorded)  # only kept here; settled and read on the loop

    def _copy_between_batches(self) -> tuple[EntityState | None, list[asyncio.Future[Any]]]:
        """Pipeline thread: a copy of state (None when a shared store holds it), and the futures of
        the work in it that may be unsettled."""
        applied, self._outcomes_applied = self._outcomes_applied, []
        copy = self.pipeline.snapshot_copy() if self.settings.state_url is None else None
        return copy, [item.future for item in self._last_batch] + applied

    async def snapshot(self, *, share: float = SNAPSHOT_SHARE) -> None:
        """Copy state between batches on the pipeline thread; write records, then state, from another thread.

        Every transaction and outcome report in the copy has its idempotency record saved:
        the copy runs on the pipeline thread after all earlier work, and returns the futures
        of the last batch and of the outcome reports applied since the previous copy. The
        batcher settles a batch's futures before it hands over the next batch, so once those
        have settled on the loop, everything in the copy has, and the caches, read after
        that, hold a record for each (a superset: work done after the copy may be in too).
        The records file is renamed into place before the state file, so a crash between the
        two leaves newer records with older state, never the reverse.

        One at a time (the lock), and a write runs to its end even if its caller is cancelled
        (the shield), so an older snapshot can never replace a newer one.
        """
        state_dir = self.settings.state_dir
        if state_dir is None:
            return
        started = time.monotonic()
        try:
            answers, outcomes, cards = await self._snapshot(state_dir, share)
        except Exception:  # a cancelled caller is no failure: the shielded write runs on
            self.metrics.snapshots.labels("failed").inc()
            raise
        took = time.monotonic() - started
        self.metrics.snapshots.labels("ok").inc()
        self.metrics.snapshot_written_at.set(time.time())
        self.metrics.snapshot_duration.set(took)
        log.info("state snapshot written", extra={"path": str(state_dir / SNAPSHOT_FILE), "cards": cards,
                                                  "answers": answers, "outcomes": outcomes,
                                                  "seconds": round(took, 3)})

    async def _snapshot(self, state_dir: Path, share: float) -> tuple[int, int, int]:
        async with self._snapshot_lock:
            # In its turn in the queue: the copy holds every transaction queued before it, those
            # answered by the fallback and still waiting for the state included.
            copy, applied = await self.batcher.submit_work(self._copy_between_batches, kind="snapshot")
            self._undelivered.extend(applied)
            await self._until_settled()
            answers = await self.idempotency.completed(share=share)
            outcomes = await self.outcomes_seen.completed(share=share)
            write = functools.partial(write_snapshot, state_dir, copy, self.hasher, answers, outcomes, Pacer(share))
            await asyncio.shield(asyncio.to_thread(write))
        return len(answers), len(outcomes), copy.card.occupancy() if copy is not None else 0

    async def _until_settled(self) -> None:
        pending = [f for f in self._undelivered if not f.done()]
        if pending:
            _, late = await asyncio.wait(pending, timeout=DELIVERY_TIMEOUT_S)
            if late:
                self._undelivered.clear()
                raise RuntimeError(f"{len(late)} answers in the state copy were not delivered within "
                                   f"{DELIVERY_TIMEOUT_S} s; snapshot skipped")
        self._undelivered.clear()

    async def _snapshot_every(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.snapshot()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.error("state snapshot failed", extra={"error": exc.__class__.__name__, "reason": str(exc)})

    async def stop(self) -> None:
        """Finish queued work, take the final snapshot, close the metrics endpoint."""
        self.serving = False
        await self.reloader.stop()
        if self._snapshot_task is not None:
            self._snapshot_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._snapshot_task
        if self._batcher is not None:
            await self._batcher.drain()
        try:
            await self.snapshot(share=1.0)  # nothing is served any more: no need to spread it
        except Exception as exc:
            log.error("final state snapshot failed", extra={"error": exc.__class__.__name__, "reason": str(exc)})
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
