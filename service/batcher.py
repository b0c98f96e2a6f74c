"""The micro-batcher: concurrent calls share one pipeline call.

While the pipeline thread works on a batch, new requests queue; when it is free, the
next batch takes everything queued (up to `max_batch`). A request that arrives at an
idle pipeline is not held back unless `max_wait_us` > 0 asks it to wait for company.
Queue entries are groups (a ScoreBatch call stays together, split at `max_batch`).
The queue is bounded: past `max_queue` transactions, `submit` raises OverloadedError.

When a batch is taken, each item is checked against two clocks: past the client's own
deadline nobody waits for it (DeadlineExpiredError, nothing recorded); past the service
budget it is answered at once by `answer_over_budget` (the fallback rules, degraded)
without entering the pipeline or its state.
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


@dataclass(slots=True)
class Item:
    """One transaction waiting to be scored."""

    payload: Any
    deadline: float            # time.monotonic() seconds: the service budget (≤ client_deadline)
    received_ns: int           # time.perf_counter_ns() at arrival, for server_latency_us
    future: asyncio.Future[Any] = field(repr=False)
    client_deadline: float = math.inf  # time.monotonic() seconds; inf when the client set none


Answer = Callable[[list[Item]], Sequence[Any]]


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
        answer_over_budget: Answer | None = None,
    ) -> None:
        self._run_batch = run_batch
        self._executor = executor
        self._max_batch = max_batch
        self._max_wait_s = max_wait_us / 1e6
        self._max_queue = max_queue
        self._answer_over_budget = answer_over_budget
        self._groups: deque[list[Item]] = deque()
        self._queued = 0
        self._wakeup = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    @property
    def queued(self) -> int:
        return self._queued

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="micro-batcher")

    def submit(self, items: list[Item]) -> None:
        """Queue a group; raises OverloadedError (and queues nothing) when it does not fit."""
        if self._closing:
            raise NotServingError("draining")
        if self._queued + len(items) > self._max_queue:
            raise OverloadedError(self._queued, self._max_queue)
        for start in range(0, len(items), self._max_batch):
            self._groups.append(items[start:start + self._max_batch])
        self._queued += len(items)
        self._wakeup.set()

    async def drain(self) -> None:
        """Stop taking work, finish everything queued, then return."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task

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
            elif item.deadline <= now and self._answer_over_budget is not None:
                over_budget.append(item)
            else:
                live.append(item)
        if over_budget and self._answer_over_budget is not None:
            _resolve(over_budget, self._answer_over_budget(over_budget))
        if live:
            results = await asyncio.get_running_loop().run_in_executor(self._executor, self._run_batch, live)
            _resolve(live, results)


def _resolve(items: list[Item], results: Sequence[Any]) -> None:
    if len(results) != len(items):
        raise RuntimeError(f"pipeline returned {len(results)} answers for {len(items)} transactions")
    for item, result in zip(items, results, strict=True):
        if not item.future.done():
            item.future.set_result(result)


def _fail(items: list[Item], exc: BaseException | None) -> None:
    for item in items:
        if not item.future.done():
            if exc is None:
                item.future.cancel()
            else:
                item.future.set_exception(exc)
