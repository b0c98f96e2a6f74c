"""The micro-batcher: concurrent calls share one pipeline call.

While the pipeline thread works on a batch, new requests queue; when it is free, the
next batch takes everything queued (up to `max_batch`). A request that arrives at an
idle pipeline is not held back unless `max_wait_us` > 0 asks it to wait for company.
Queue entries are groups (a ScoreBatch call stays together, split at `max_batch`).
The queue is bounded: past `max_queue` transactions, `submit` raises OverloadedError.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from service.errors import DeadlineExpiredError, NotServingError, OverloadedError


@dataclass(slots=True)
class Item:
    """One transaction waiting to be scored."""

    payload: Any
    deadline: float            # time.monotonic() seconds
    received_ns: int           # time.perf_counter_ns() at arrival, for server_latency_us
    future: asyncio.Future[Any] = field(repr=False)


class MicroBatcher:
    """Feeds queued items to `run_batch` (called in `executor`) one batch at a time."""

    def __init__(
        self,
        run_batch: Callable[[list[Item]], Sequence[Any]],
        executor: Executor,
        *,
        max_batch: int,
        max_wait_us: int,
        max_queue: int,
        on_batch: Callable[[int, int], None] | None = None,
    ) -> None:
        self._run_batch = run_batch
        self._executor = executor
        self._max_batch = max_batch
        self._max_wait_s = max_wait_us / 1e6
        self._max_queue = max_queue
        self._on_batch = on_batch
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
        if not batch:  # cannot happen: groups are split at max_batch; kept for safety of the loop
            batch = self._groups.popleft()
        self._queued -= len(batch)
        return batch

    async def _wait_for_company(self) -> None:
        # Yield to the event loop (so arriving calls can queue) until the batch is full or
        # the oldest item has waited max_wait. sleep(0) because timers are ms-granular.
        oldest = self._groups[0][0].received_ns / 1e9
        while self._queued < self._max_batch and time.perf_counter() - oldest < self._max_wait_s:
            await asyncio.sleep(0)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
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
            now = time.monotonic()
            live = []
            for item in batch:
                if item.future.done():
                    continue  # nobody is waiting any more (cannot happen with shielded futures)
                if item.deadline <= now:
                    item.future.set_exception(DeadlineExpiredError())
                else:
                    live.append(item)
            if not live:
                continue
            started = time.perf_counter_ns()
            try:
                results = await loop.run_in_executor(self._executor, self._run_batch, live)
            except asyncio.CancelledError:
                for item in live:
                    if not item.future.done():
                        item.future.cancel()
                raise
            except Exception as exc:  # the pipeline falls back itself; this is a bug path
                for item in live:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            for item, result in zip(live, results, strict=True):
                if not item.future.done():
                    item.future.set_result(result)
            if self._on_batch is not None:
                self._on_batch(len(live), time.perf_counter_ns() - started)
