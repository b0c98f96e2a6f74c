"""The micro-batcher: concurrent calls share one pipeline call, and every call gets its
answer inside its budget.

While the pipeline thread works on a batch, new requests queue; when it is free, the
next batch takes everything queued (up to `max_batch`). A request that arrives at an
idle pipeline is not held back unless `max_wait_us` > 0 asks it to wait for company.
Queue entries are groups (a ScoreBatch call stays together, split at `max_batch`).

Every item carries two deadlines: the client's own, and the service budget (never later).
The batcher measures how long pipeline calls take (`PipelineTimer`) and answers an item
by the `fallback` (the rules alone, degraded, touching no state) as soon as it can tell
the model path would miss the budget:

- on arrival, when the queue ahead of it and the batch in flight would take longer than
  its budget (reason `expected_over_budget`);
- while it waits, or while its batch is in flight, by a watch that runs every
  `watch_interval_s` while the pipeline is busy: a stalled or slow pipeline thread cannot
  hold an answer past its budget (same reason; a late pipeline answer is then dropped);
- when a batch is taken and the budget has already run out (reason `over_budget`).

Past the client's own deadline nobody waits: DeadlineExpiredError, nothing recorded. The
queue is bounded: past `max_queue` transactions, `submit` raises OverloadedError, or with
`shed_to_fallback` answers the group by the fallback (reason `queue_full`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from service.errors import DeadlineExpiredError, NotServingError, OverloadedError

log = logging.getLogger("fraudscore.batcher")

WATCH_INTERVAL_S = 0.002  # event-loop timers are millisecond-grained; 2 ms is as fine as they go


@dataclass(slots=True)
class Item:
    """One transaction waiting to be scored."""

    payload: Any
    deadline: float            # time.monotonic() seconds: the service budget (≤ client_deadline)
    received_ns: int           # time.perf_counter_ns() at arrival, for server_latency_us
    future: asyncio.Future[Any] = field(repr=False)
    client_deadline: float = math.inf  # time.monotonic() seconds; inf when the client set none


Answer = Callable[[list[Item]], Sequence[Any]]
Fallback = Callable[[list[Item], str], Sequence[Any]]


class PipelineTimer:
    """Expected wall time of a pipeline call of n transactions, learnt from the calls made.

    A line `fixed + per_item · n` fitted by least squares with exponential forgetting (the
    last ~`memory` calls count), so it follows the load (batch sizes) and the machine.
    """

    __slots__ = ("_decay", "_s1", "_sd", "_sn", "_snd", "_snn", "fixed_s", "per_item_s")

    def __init__(self, *, memory: int = 100) -> None:
        self._decay = 1.0 - 1.0 / memory
        self._s1 = self._sn = self._sd = self._snn = self._snd = 0.0
        self.fixed_s = 0.0
        self.per_item_s = 0.0

    @property
    def measured(self) -> bool:
        return self._s1 > 0.0

    def observe(self, n: int, seconds: float) -> None:
        if self.measured:
            # One stalled call must not make every later one look hopeless (calls predicted
            # late skip the pipeline, so no fast call would ever correct it): a call counts
            # as at most four times what was expected; a lasting slowdown is learnt in a few.
            seconds = min(seconds, 4.0 * self.expected_s(n) + 0.001)
        k = self._decay
        self._s1 = self._s1 * k + 1.0
        self._sn = self._sn * k + n
        self._sd = self._sd * k + seconds
        self._snn = self._snn * k + n * n
        self._snd = self._snd * k + n * seconds
        spread = self._s1 * self._snn - self._sn * self._sn
        slope = (self._s1 * self._snd - self._sn * self._sd) / spread if spread > 1e-9 * self._s1 * self._snn else 0.0
        if slope <= 0.0:  # one batch size seen so far, or noise: the mean call, all of it fixed
            self.fixed_s, self.per_item_s = self._sd / self._s1, 0.0
        else:
            self.per_item_s = slope
            self.fixed_s = max(0.0, (self._sd - slope * self._sn) / self._s1)

    def expected_s(self, n: int) -> float:
        return self.fixed_s + self.per_item_s * n


class MicroBatcher:
    """Feeds queued items to `run_batch` (called in `executor`) one batch at a time."""

    def __init__(
        self,
        run_batch: Answer,
        executor: Executor,
        *,
        max_batch: int,
        max_wait_us: int,
        max_queue: int,
        fallback: Fallback | None = None,
        shed_to_fallback: bool = False,
        watch_interval_s: float = WATCH_INTERVAL_S,
    ) -> None:
        self._run_batch = run_batch
        self._executor = executor
        self._max_batch = max_batch
        self._max_wait_s = max_wait_us / 1e6
        self._max_queue = max_queue
        self._fallback = fallback
        self._shed_to_fallback = shed_to_fallback and fallback is not None
        self._watch_interval_s = watch_interval_s
        self._groups: deque[list[Item]] = deque()
        self._queued = 0
        self._wakeup = asyncio.Event()
        self._busy = asyncio.Event()  # set while a batch is in the pipeline
        self._in_flight: list[Item] = []
        self._in_flight_since = 0.0
        self._closing = False
        self._tasks: list[asyncio.Task[None]] = []
        self.timer = PipelineTimer()

    @property
    def queued(self) -> int:
        return self._queued

    @property
    def busy_s(self) -> float:
        """How long the batch in the pipeline has been running (0 when idle)."""
        return time.monotonic() - self._in_flight_since if self._busy.is_set() else 0.0

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._loop(), name="micro-batcher")]
        if self._fallback is not None:
            self._tasks.append(loop.create_task(self._watch(), name="budget-watch"))

    def submit(self, items: list[Item]) -> None:
        """Queue a group, or answer it at once by the fallback when the model path would be late.

        Raises OverloadedError (queuing nothing) when the queue is full and shedding refuses.
        """
        if self._closing:
            raise NotServingError("draining")
        if self._queued + len(items) > self._max_queue:
            if not self._shed_to_fallback:
                raise OverloadedError(self._queued, self._max_queue)
            self._answer_by_fallback(items, "queue_full")
            return
        # An idle pipeline always gets the call (the watch still answers it in time if the
        # pipeline turns out slow): that is how a recovered pipeline is noticed.
        idle = not self._busy.is_set() and not self._groups
        if self._fallback is not None and self.timer.measured and not idle:
            now = time.monotonic()
            if now + self._wait_s(self._queued, len(items)) >= min(i.deadline for i in items):
                self._answer_by_fallback(items, "expected_over_budget")
                return
        for start in range(0, len(items), self._max_batch):
            self._groups.append(items[start:start + self._max_batch])
        self._queued += len(items)
        self._wakeup.set()

    async def drain(self) -> None:
        """Stop taking work, finish everything queued, then return."""
        self._closing = True
        self._wakeup.set()
        if self._tasks:
            await self._tasks[0]
            for task in self._tasks[1:]:
                task.cancel()
            await asyncio.gather(*self._tasks[1:], return_exceptions=True)

    def _wait_s(self, ahead: int, own: int) -> float:
        """Expected seconds until `own` items queued behind `ahead` others have their answers."""
        timer = self.timer
        if self._busy.is_set():
            elapsed = time.monotonic() - self._in_flight_since
            expected = timer.expected_s(len(self._in_flight))
            # A call past its expected time is slow or stuck: expect it to overrun as much again
            # (continuous, never negative: an overrunning call is not "about to finish").
            current = max(expected - elapsed, elapsed - expected)
        else:
            current = 0.0
        full, rest = divmod(ahead + own, self._max_batch)
        return current + full * timer.expected_s(self._max_batch) + (timer.expected_s(rest) if rest else 0.0)

    def _answer_by_fallback(self, items: list[Item], reason: str) -> None:
        fallback = self._fallback
        if fallback is None:
            raise RuntimeError("no fallback to answer with")  # callers check first
        waiting = [i for i in items if not i.future.done()]
        if waiting:
            _resolve(waiting, fallback(waiting, reason))

    async def _watch(self) -> None:
        """While a batch runs, answer by the fallback whatever would otherwise miss its budget."""
        while True:
            await self._busy.wait()
            await asyncio.sleep(self._watch_interval_s)
            if self._busy.is_set():
                try:
                    self._answer_the_late()
                except Exception:
                    # A failing fallback must not end the watch for the life of the process.
                    log.exception("budget watch failed; it keeps watching")

    def _answer_the_late(self) -> None:
        now = time.monotonic() + self._watch_interval_s  # the next look may come too late
        in_flight_done_by = now + self._wait_s(0, 0)
        if (all(i.deadline > in_flight_done_by or i.future.done() for i in self._in_flight)
                and (not self._groups or now + self._wait_s(0, self._queued) < min(
                    i.deadline for g in self._groups for i in g))):
            return  # the common case, checked in C-speed passes: nothing is late even at the back
        # In the pipeline already: these will enter the state, so they always get an answer
        # (never DeadlineExpiredError: the idempotency record of a failed call is forgotten,
        # and a retry would then count the transaction twice).
        late = [i for i in self._in_flight if not i.future.done() and i.deadline <= in_flight_done_by]
        late_queued: list[Item] = []
        ahead = 0
        kept: deque[list[Item]] = deque()
        for group in self._groups:
            # Items of a group share a deadline (one call's); checked one by one all the same.
            done_by = now + self._wait_s(ahead, len(group))
            on_time = [i for i in group if i.deadline > done_by]
            if len(on_time) < len(group):
                late_queued.extend(i for i in group if i.deadline <= done_by)
                self._queued -= len(group) - len(on_time)
            if on_time:
                kept.append(on_time)
                ahead += len(on_time)
        if late_queued:
            self._groups = kept
            gone = time.monotonic()
            for item in late_queued:  # nobody waits for a queued call past its client's own deadline
                if item.client_deadline <= gone and not item.future.done():
                    item.future.set_exception(DeadlineExpiredError())
        if late or late_queued:
            try:
                self._answer_by_fallback(late + late_queued, "expected_over_budget")
            except Exception as exc:
                # The queued ones left the queue: fail them rather than lose them (they changed
                # nothing; a retry is scored). Those in the pipeline get its answer.
                _fail(late_queued, exc)
                raise

    def _take(self) -> list[Item]:
        batch: list[Item] = []
        while self._groups and len(batch) + len(self._groups[0]) <= self._max_batch:
            batch.extend(self._groups.popleft())
        self._queued -= len(batch)
        return batch

    async def _wait_for_company(self) -> None:
        # Yield to the event loop (so arriving calls can queue) until the batch is full or
        # the oldest item has waited max_wait. sleep(0) because timers are ms-granular.
        oldest = self._groups[0][0].received_ns / 1e9
        while self._queued < self._max_batch and time.perf_counter() - oldest < self._max_wait_s:
            await asyncio.sleep(0)

    async def _loop(self) -> None:
        while True:
            if not self._groups:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self._max_wait_s > 0 and not self._closing:
                await self._wait_for_company()
                if not self._groups:  # the watch answered them all meanwhile
                    continue
            batch = self._take()
            try:
                await self._process(batch)
            except asyncio.CancelledError:
                _fail(batch, None)
                raise
            except Exception as exc:
                # The pipeline answers model failures itself; reaching here is a bug. Fail this
                # batch's calls (INTERNAL) and keep serving the next ones.
                log.exception("batch failed", extra={"batch_size": len(batch)})
                _fail(batch, exc)

    async def _process(self, batch: list[Item]) -> None:
        now = time.monotonic()
        live, over_budget = [], []
        for item in batch:
            if item.future.done():
                continue
            if item.client_deadline <= now:
                item.future.set_exception(DeadlineExpiredError())
            elif item.deadline <= now and self._fallback is not None:
                over_budget.append(item)
            else:
                live.append(item)
        if over_budget:
            self._answer_by_fallback(over_budget, "over_budget")
        if not live:
            return
        self._in_flight, self._in_flight_since = live, time.monotonic()
        self._busy.set()
        try:
            results = await asyncio.get_running_loop().run_in_executor(self._executor, self._run_batch, live)
        finally:
            self._busy.clear()
            self._in_flight = []
        self.timer.observe(len(live), time.monotonic() - self._in_flight_since)
        _resolve(live, results, release=True)


def _resolve(items: list[Item], results: Sequence[Any], *, release: bool = False) -> None:
    if len(results) != len(items):
        raise RuntimeError(f"pipeline returned {len(results)} answers for {len(items)} transactions")
    for item, result in zip(items, results, strict=True):
        if not item.future.done():  # answered already by the fallback (the pipeline was late)
            item.future.set_result(result)
        if release:
            # The idempotency record keeps the item (a retry may extend a queued item's
            # deadline) as long as the answer; the transaction itself is not needed after
            # the pipeline (`release` only then: a fallback answer may come while the
            # pipeline thread still reads the item).
            item.payload = None


def _fail(items: list[Item], exc: BaseException | None) -> None:
    for item in items:
        if not item.future.done():
            if exc is None:
                item.future.cancel()
            else:
                item.future.set_exception(exc)
