"""The micro-batcher: concurrent calls share one pipeline call, every call gets its answer
inside its budget, and every answered transaction enters the state once, in arrival order.

While the pipeline thread works on a batch, new requests queue; when it is free, the
next batch takes everything queued (up to `max_batch`). A request that arrives at an
idle pipeline is not held back unless `max_wait_us` > 0 asks it to wait for company.
Queue entries are groups (a ScoreBatch call stays together, split at `max_batch`).

Every item carries two deadlines: the client's own, and the service budget (never later).
The batcher measures how long pipeline calls take (`PipelineTimer`) and answers an item
by the `fallback` (the rules alone, degraded) as soon as it can tell the model path would
miss the budget:

- on arrival, when the queue ahead of it and the batch in flight would take longer than
  its budget (reason `expected_over_budget`);
- while it waits, or while its batch is in flight, by a watch that runs every
  `watch_interval_s` while the pipeline is busy: a stalled or slow pipeline thread cannot
  hold an answer past its budget (same reason; a late pipeline answer is then dropped);
- when a batch is taken and the budget has already run out (reason `over_budget`).

A fallback answer does not take the transaction out of the history: the item keeps (or
takes) its place in the queue, marked `answered_by_fallback`, and the pipeline feeds it
into the state in its turn without scoring it (features only, a few µs). Otherwise a
burst that pushes calls into the fallback would erase them from every velocity feature.
Those items are bounded too (`max_answered_backlog`): past it a call is refused.

Past the client's own deadline nobody waits: DeadlineExpiredError, nothing recorded. The
queue is bounded: past `max_queue` transactions waiting for an answer, `submit` raises
OverloadedError, or with `shed_to_fallback` answers the group by the fallback (reason
`queue_full`) and queues it for the state.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor
from typing import Any

from service.api.errors import DeadlineExpiredError, NotServingError, OverloadedError
from service.serving.items import (
    Answer,
    Answered,
    Fallback,
    Item,
    Work,
    fail,
    resolve,
    settle_work,
)
from service.serving.timer import PipelineTimer

log = logging.getLogger("fraudscore.batcher")

WATCH_INTERVAL_S = 0.002  # event-loop timers are millisecond-grained; 2 ms is as fine as they go
# Fallback-answered items waiting for their features-only pass, at most this many times max_queue:
# a features-only item costs a few µs, so 4 × 2,048 of them is ~40 ms of pipeline time.
ANSWERED_BACKLOG_FACTOR = 4
# A pipeline call past its expected time is expected to need as much again, but never more than
# its expected time or this margin, whichever is longer: time enough to answer its items by the
# fallback and let the event loop deliver them before their deadlines if it is stuck, without
# treating every host stall of a few tens of ms as one (docs/design.md, "Budget").
OVERRUN_MARGIN_S = 0.010


class Group(list[Item]):
    """Queued items of one call (up to max_batch of them), and `earliest`: a bound below every one
    of their deadlines, taken when the group is made. An item's deadline only ever moves later (to
    infinity once the fallback has answered it), so the bound holds; the watch's common case then
    looks once per group, not once per item (~70 µs a look at 2,048 queued, every 2 ms)."""

    __slots__ = ("earliest",)

    def __init__(self, items: Iterable[Item] = ()) -> None:
        super().__init__(items)
        self.earliest = min((i.deadline for i in self), default=math.inf)


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
        max_answered_backlog: int | None = None,
    ) -> None:
        self._run_batch = run_batch
        self._executor = executor
        self._max_batch = max_batch
        self._max_wait_s = max_wait_us / 1e6
        self._max_queue = max_queue
        self._max_answered = ANSWERED_BACKLOG_FACTOR * max_queue if max_answered_backlog is None \
            else max_answered_backlog
        self._fallback = fallback
        self._shed_to_fallback = shed_to_fallback and fallback is not None
        self._watch_interval_s = watch_interval_s
        self._groups: deque[Group | Work] = deque()
        self._queued = 0    # items in `_groups`, answered or not
        self._answered = 0  # of those, answered by the fallback (waiting only to enter the state)
        self._wakeup = asyncio.Event()
        self._busy = asyncio.Event()  # set while a batch or work is in the pipeline
        # Set by the pipeline thread when its call returns: the loop may resume the batcher a few
        # turns later, and until then the pipeline is free, not "busy past its expected time".
        self._returned = False
        self._returned_at = 0.0
        self._in_flight: list[Item] = []     # the call in the pipeline: the items it answers,
        self._in_flight_state_only = 0       # how many more it only feeds into the state,
        self._in_flight_work: list[Work] = []  # or the work it runs
        self._in_flight_since = 0.0
        self._closing = False
        self._tasks: list[asyncio.Task[None]] = []
        self.timer = PipelineTimer()

    @property
    def queued(self) -> int:
        """Transactions waiting for an answer from the pipeline."""
        return self._queued - self._answered

    @property
    def answered_backlog(self) -> int:
        """Transactions answered by the fallback, queued to enter the state."""
        return self._answered

    @property
    def busy_s(self) -> float:
        """How long the call in the pipeline (a batch or work) has been running (0 when idle)."""
        return time.monotonic() - self._in_flight_since if self._running() else 0.0

    def _running(self) -> bool:
        return self._busy.is_set() and not self._returned

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._loop(), name="micro-batcher")]
        if self._fallback is not None:
            self._tasks.append(loop.create_task(self._watch(), name="budget-watch"))

    def submit(self, items: list[Item]) -> None:
        """Queue a group, or answer it at once by the fallback when the model path would be late
        (queued all the same, to enter the state).

        Raises OverloadedError (queuing nothing) when the queue is full and shedding refuses,
        or when the fallback would answer but too many answered items already wait for the state.
        """
        if self._closing:
            raise NotServingError("draining")
        if self.queued + len(items) > self._max_queue:
            if not self._shed_to_fallback:
                raise OverloadedError(self.queued, self._max_queue)
            self._answer_and_queue(items, "queue_full")
            return
        # An idle pipeline always gets the call (the watch still answers it in time if the
        # pipeline turns out slow): that is how a recovered pipeline is noticed. Transactions
        # that only wait to enter the state do not make it busy: they cost a few µs each.
        idle = not self._running() and not self.queued
        if self._fallback is not None and self.timer.measured and not idle:
            now = time.monotonic()
            if now + self._wait_s(self.queued, self._answered, len(items)) >= min(i.deadline for i in items):
                self._answer_and_queue(items, "expected_over_budget")
                return
        self._enqueue(items)

    def _answer_and_queue(self, items: list[Item], reason: str) -> None:
        if self._answered + len(items) > self._max_answered:
            raise OverloadedError(self._answered, self._max_answered, reason="answered_backlog_full")
        self._enqueue(items, answered=self._answer_by_fallback(items, reason, queued=True))

    def _enqueue(self, items: list[Item], *, answered: int = 0) -> None:
        for start in range(0, len(items), self._max_batch):
            self._groups.append(Group(items[start:start + self._max_batch]))
        self._queued += len(items)
        self._answered += answered
        self._wakeup.set()

    def submit_work(self, fn: Callable[[], Any], *, kind: str = "work") -> asyncio.Future[Any]:
        """Run `fn` on the pipeline thread in its turn: after every transaction queued so far has
        entered the state (answered by the pipeline or already by the fallback), before any queued
        later. Its future holds what `fn` returns or raises. `kind` names it for the timer
        ("outcome", "snapshot"): the watch predicts its time from earlier ones. Once drained, it
        runs at once."""
        loop = asyncio.get_running_loop()
        if self._tasks and self._tasks[0].done():  # drained: nothing is queued to come before it
            return loop.run_in_executor(self._executor, fn)
        future: asyncio.Future[Any] = loop.create_future()
        self._groups.append(Work(fn, future, kind))
        self._wakeup.set()
        return future

    async def drain(self) -> None:
        """Stop taking work, finish everything queued (answered items enter the state), then return.
        Shielded: a cancelled caller does not strand what is queued."""
        self._closing = True
        self._wakeup.set()
        if self._tasks:
            await asyncio.shield(self._tasks[0])
            for task in self._tasks[1:]:
                task.cancel()
            await asyncio.gather(*self._tasks[1:], return_exceptions=True)

    def _wait_s(self, ahead: int, ahead_state_only: int, own: int) -> float:
        """Expected seconds until `own` items, queued behind `ahead` others waiting for an answer and
        `ahead_state_only` answered ones waiting only to enter the state, have their answers."""
        timer = self.timer
        if self._running():
            elapsed = time.monotonic() - self._in_flight_since
            if self._in_flight_work:
                expected = sum(timer.expected_work_s(w.kind) for w in self._in_flight_work)
            else:
                expected = timer.expected_batch_s(len(self._in_flight), self._in_flight_state_only)
            # A call past its expected time is slow or stuck: expect it to run on a while longer
            # (continuous, never negative: an overrunning call is not "about to finish"). Until
            # 2026-12-03 "as much again" without a bound: a 25 ms host stall of a 1 ms call then
            # sent every queued call of a 50 ms budget to the fallback, answered in time or not.
            current = max(expected - elapsed, min(elapsed - expected, max(expected, OVERRUN_MARGIN_S)))
        else:
            current = 0.0
        full, rest = divmod(ahead + own, self._max_batch)
        return (current + full * timer.expected_s(self._max_batch) + (timer.expected_s(rest) if rest else 0.0)
                + ahead_state_only * timer.state_only_s)

    def _answer_by_fallback(self, items: list[Item], reason: str, *, queued: bool) -> int:
        """Answer the items still waiting by the fallback; returns how many. `queued`: they are not
        in the pipeline, so they are marked to enter the state by a features-only pass (and nobody
        waits on their deadlines)."""
        fallback = self._fallback
        if fallback is None:
            raise RuntimeError("no fallback to answer with")  # callers check first
        waiting = [i for i in items if not i.future.done()]
        if waiting:
            resolve(waiting, fallback(waiting, reason))
        if queued:
            for item in waiting:
                item.answered_by_fallback = True
                # Answered: no deadline applies any more (the watch and `_process` skip it).
                item.deadline = item.client_deadline = math.inf
        return len(waiting)

    async def _watch(self) -> None:
        """While the pipeline is busy, answer by the fallback whatever would otherwise miss its budget."""
        while True:
            await self._busy.wait()
            await asyncio.sleep(self._watch_interval_s)
            if self._running():
                try:
                    self._answer_the_late()
                except Exception:
                    # A failing fallback must not end the watch for the life of the process.
                    log.exception("budget watch failed; it keeps watching")

    def _answer_the_late(self) -> None:
        now = time.monotonic() + self._watch_interval_s  # the next look may come too late
        in_flight_done_by = now + self._wait_s(0, 0, 0)
        if (all(i.deadline > in_flight_done_by or i.future.done() for i in self._in_flight)
                and (not self.queued or now + self._wait_s(self.queued, self._answered, 0) < min(
                    (g.earliest for g in self._groups if isinstance(g, Group)), default=math.inf))):
            return  # the common case, one look per group: nothing is late even at the back
        # In the pipeline already: these will enter the state, so they always get an answer
        # (never DeadlineExpiredError: the idempotency record of a failed call is forgotten,
        # and a retry would then count the transaction twice).
        late = [i for i in self._in_flight if not i.future.done() and i.deadline <= in_flight_done_by]
        late_queued: list[Item] = []
        expired = 0
        ahead = ahead_state_only = 0
        gone = time.monotonic()
        kept: deque[Group | Work] = deque()
        for group in self._groups:
            if isinstance(group, Work):
                kept.append(group)
                continue
            # Items of a group share a deadline (one call's); checked one by one all the same.
            waiting = sum(1 for i in group if not i.answered_by_fallback)
            done_by = now + self._wait_s(ahead, ahead_state_only, waiting)
            if any(i.deadline <= done_by for i in group):
                keep = []
                for item in group:
                    if item.deadline > done_by or item.future.done():
                        keep.append(item)
                    elif item.client_deadline <= gone:  # nobody waits for it: fails, enters nothing
                        item.future.set_exception(DeadlineExpiredError())
                        expired += 1
                    else:  # answered now, and kept in its place to enter the state
                        late_queued.append(item)
                        keep.append(item)
                group = Group(keep)
            if group:
                kept.append(group)
                state_only = sum(1 for i in group if i.answered_by_fallback)
                ahead += len(group) - state_only
                ahead_state_only += state_only
        if expired:
            self._groups = kept
            self._queued -= expired
        if late_queued:
            try:
                marked = self._answer_by_fallback(late_queued, "expected_over_budget", queued=True)
            except Exception as exc:
                # Fail them rather than lose them or retry a broken fallback every 2 ms: they leave
                # the queue having changed nothing, and a retry is scored.
                self._drop(late_queued)
                fail(late_queued, exc)
                raise
            # Already accepted: the backlog bound (for new calls) may be passed by up to max_queue.
            self._answered += marked
        if late:  # a failure here leaves them to the pipeline's own answer
            self._answer_by_fallback(late, "expected_over_budget", queued=False)

    def _drop(self, items: list[Item]) -> None:
        """Take `items` (not answered) out of the queue."""
        leaving = {id(i) for i in items}
        kept: deque[Group | Work] = deque()
        for group in self._groups:
            if isinstance(group, Work):
                kept.append(group)
                continue
            rest = Group(i for i in group if id(i) not in leaving)
            if rest:
                kept.append(rest)
        self._groups = kept
        self._queued -= len(items)

    def _take(self) -> list[Item]:
        """The next batch: groups from the head of the queue up to `max_batch`, stopping at a `Work`."""
        batch: list[Item] = []
        groups = self._groups
        while groups and isinstance(head := groups[0], list) and len(batch) + len(head) <= self._max_batch:
            batch.extend(head)
            groups.popleft()
        self._queued -= len(batch)
        self._answered -= sum(1 for i in batch if i.answered_by_fallback)
        return batch

    def _take_work(self) -> list[Work]:
        """Every `Work` at the head of the queue: consecutive ones run in one pipeline call."""
        works: list[Work] = []
        while self._groups and isinstance(head := self._groups[0], Work):
            works.append(head)
            self._groups.popleft()
        return works

    async def _wait_for_company(self) -> None:
        # Yield to the event loop (so arriving calls can queue) until the batch is full or
        # the oldest item has waited max_wait. sleep(0) because timers are ms-granular.
        head = self._groups[0]
        if isinstance(head, Work):
            return
        oldest = head[0].received_ns / 1e9
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
            if isinstance(self._groups[0], Work):
                await self._run_work(self._take_work())
                continue
            if self._max_wait_s > 0 and not self._closing:
                await self._wait_for_company()
                if not self._groups:  # the watch answered them all meanwhile
                    continue
            batch = self._take()
            try:
                await self._process(batch)
            except asyncio.CancelledError:
                fail(batch, None)
                raise
            except Exception as exc:
                # The pipeline answers model failures itself; reaching here is a bug. Fail this
                # batch's calls (INTERNAL) and keep serving the next ones.
                log.exception("batch failed", extra={"batch_size": len(batch)})
                fail(batch, exc)

    async def _process(self, batch: list[Item]) -> None:
        now = time.monotonic()
        run: list[Item] = []     # in arrival order: every item that enters the state
        live: list[Item] = []    # of those, the ones the pipeline answers
        over_budget: list[Item] = []
        for item in batch:
            if item.answered_by_fallback:
                run.append(item)
            elif item.future.done():  # failed while queued (a bug path); it enters nothing
                continue
            elif item.client_deadline <= now:
                item.future.set_exception(DeadlineExpiredError())
            elif item.deadline <= now and self._fallback is not None:
                over_budget.append(item)
                run.append(item)
            else:
                live.append(item)
                run.append(item)
        if over_budget:
            try:
                self._answer_by_fallback(over_budget, "over_budget", queued=True)
            except Exception as exc:
                # Only these fail (they enter nothing; a retry is scored): the rest of the batch,
                # answered items waiting for the state among them, still runs.
                log.exception("fallback failed", extra={"batch_size": len(over_budget)})
                fail(over_budget, exc)
                failed = {id(i) for i in over_budget}
                run = [i for i in run if id(i) not in failed]
        if not run:
            return
        self._in_flight, self._in_flight_state_only, self._returned = live, len(run) - len(live), False
        self._in_flight_since = self._returned_at = time.monotonic()
        self._busy.set()
        try:
            result = await asyncio.get_running_loop().run_in_executor(self._executor, self._call, run)
        finally:
            self._busy.clear()
            self._in_flight = []
        # Hand-off, the call and its return, not the turns the loop took to resume this task.
        self.timer.observe_batch(len(live), len(run) - len(live), self._returned_at - self._in_flight_since)
        if isinstance(result, Answered):
            result.delivered(resolve(live, result.answers))
        else:
            resolve(live, result)
        for item in run:
            # The idempotency record keeps the item as long as the answer (a retry may extend a
            # queued item's deadline); the transaction itself is not needed after the pipeline
            # (only then: a fallback answer may come while the pipeline thread still reads it).
            item.payload = None

    def _call(self, run: list[Item]) -> Sequence[Any] | Answered:
        """Pipeline thread: the batch, then a note that the thread is free again."""
        try:
            return self._run_batch(run)
        finally:
            self._returned_at = time.monotonic()
            self._returned = True

    async def _run_work(self, works: list[Work]) -> None:
        """Run consecutive `Work` in one pipeline call. Each future is settled from the call's own
        result, even if this task is cancelled meanwhile (an outcome report must not be applied
        and then forgotten, or its retry would apply it twice)."""
        self._in_flight, self._in_flight_work, self._returned = [], works, False
        self._in_flight_since = self._returned_at = time.monotonic()
        self._busy.set()
        call = asyncio.get_running_loop().run_in_executor(self._executor, self._call_work, [w.fn for w in works])
        call.add_done_callback(functools.partial(settle_work, works))
        try:
            await asyncio.shield(call)
        finally:
            self._busy.clear()
            self._in_flight_work = []
        if len({w.kind for w in works}) == 1:
            self.timer.observe_work(works[0].kind, (self._returned_at - self._in_flight_since) / len(works))

    def _call_work(self, fns: list[Callable[[], Any]]) -> list[tuple[bool, Any]]:
        """Pipeline thread: each function in turn, its result or its exception kept apart."""
        out: list[tuple[bool, Any]] = []
        try:
            for fn in fns:
                try:
                    out.append((True, fn()))
                except Exception as exc:
                    out.append((False, exc))
            return out
        finally:
            self._returned_at = time.monotonic()
            self._returned = True
