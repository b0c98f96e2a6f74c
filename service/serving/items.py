"""What waits in the batcher's queue and how it is settled: a transaction (`Item`), work that runs
on the pipeline thread in its turn (`Work`), and what a pipeline call answers (`Answered`)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Item:
    """One transaction waiting to be scored (or, answered by the fallback, to enter the state)."""

    payload: Any
    deadline: float            # time.monotonic() seconds: the service budget (≤ client_deadline)
    received_ns: int           # time.perf_counter_ns() at arrival, for server_latency_us
    future: asyncio.Future[Any] = field(repr=False)
    client_deadline: float = math.inf  # time.monotonic() seconds; inf when the client set none
    # Answered by the fallback before the pipeline took it: the pipeline only feeds it into the
    # state (features, no model). Set on the event loop, only while the item is queued.
    answered_by_fallback: bool = False


@dataclass(frozen=True, slots=True)
class Answered:
    """What a pipeline call may return instead of a plain sequence: the answers, and a hook the
    batcher runs on the event loop once they are handed to their calls, with a mask of those
    that reached their call (None: all did; False where the fallback had answered first). So
    metrics count the answers sent, never a late one that was dropped."""

    answers: Sequence[Any]
    delivered: Callable[[list[bool] | None], None]


@dataclass(slots=True)
class Work:
    """A call that runs on the pipeline thread in its turn in the queue: after every transaction
    queued before it has entered the state (an outcome report, a snapshot's copy of the state)."""

    fn: Callable[[], Any]
    future: asyncio.Future[Any] = field(repr=False)
    kind: str = "work"  # for the timer: "outcome", "snapshot"


# `run_batch(items)` returns one answer per item not `answered_by_fallback`, in order.
Answer = Callable[[list[Item]], "Sequence[Any] | Answered"]
Fallback = Callable[[list[Item], str], Sequence[Any]]


def settle_work(works: list[Work], call: asyncio.Future[list[tuple[bool, Any]]]) -> None:
    if call.cancelled() or call.exception() is not None:
        fail_futures([w.future for w in works], None if call.cancelled() else call.exception())
        return
    for work, (ok, value) in zip(works, call.result(), strict=True):
        if not work.future.done():
            if ok:
                work.future.set_result(value)
            else:
                work.future.set_exception(value)


def resolve(items: list[Item], results: Sequence[Any]) -> list[bool] | None:
    """Hand each item its result unless it has one already (the fallback answered it first, the
    pipeline being late). Returns which got this result, or None when all did."""
    if len(results) != len(items):
        raise RuntimeError(f"pipeline returned {len(results)} answers for {len(items)} transactions")
    delivered: list[bool] | None = None
    for k, (item, result) in enumerate(zip(items, results, strict=True)):
        if not item.future.done():
            if isinstance(result, BaseException):  # this item's own refusal (a shared store's verdict)
                item.future.set_exception(result)
            else:
                item.future.set_result(result)
        else:  # a pipeline answer that came too late: dropped, and not counted as sent
            if delivered is None:
                delivered = [True] * len(items)
            delivered[k] = False
    return delivered


def fail(items: list[Item], exc: BaseException | None) -> None:
    fail_futures([item.future for item in items], exc)


def fail_futures(futures: list[asyncio.Future[Any]], exc: BaseException | None) -> None:
    """Settle the futures not yet done: with `exc`, or cancelled when None."""
    for future in futures:
        if not future.done():
            if exc is None:
                future.cancel()
            else:
                future.set_exception(exc)
