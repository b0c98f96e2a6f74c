from __future__ import annotations

import asyncio
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from service.batcher import Item, MicroBatcher, PipelineTimer
from service.errors import DeadlineExpiredError, NotServingError, OverloadedError


def make_item(loop: asyncio.AbstractEventLoop, payload: int, *, budget_s: float = 5.0,
              client_s: float = math.inf) -> Item:
    now = time.monotonic()
    return Item(payload, now + min(budget_s, client_s), time.perf_counter_ns(), loop.create_future(),
                client_deadline=now + client_s)


class Recorder:
    """A pipeline stand-in: records batches; can be held to let a queue build up."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, items: list[Item]) -> list[int]:
        self.gate.wait(5)
        self.batches.append([i.payload for i in items])
        return [i.payload * 10 for i in items]


@pytest.fixture
def executor():
    with ThreadPoolExecutor(max_workers=1) as ex:
        yield ex


async def test_requests_that_wait_together_share_a_batch(executor) -> None:
    loop = asyncio.get_running_loop()
    rec = Recorder()
    b = MicroBatcher(rec, executor, max_batch=4, max_wait_us=0, max_queue=100)
    b.start()
    rec.gate.clear()
    first = make_item(loop, 0)
    b.submit([first])
    await asyncio.sleep(0.05)  # the pipeline now holds batch [0]
    later = [make_item(loop, i) for i in range(1, 10)]
    for item in later:
        b.submit([item])
    rec.gate.set()
    results = await asyncio.gather(first.future, *(i.future for i in later))
    assert results == [i * 10 for i in range(10)]
    assert rec.batches[0] == [0]
    assert rec.batches[1:] == [[1, 2, 3, 4], [5, 6, 7, 8], [9]]
    await b.drain()


async def test_a_group_is_split_at_max_batch_and_kept_in_order(executor) -> None:
    loop = asyncio.get_running_loop()
    rec = Recorder()
    b = MicroBatcher(rec, executor, max_batch=3, max_wait_us=0, max_queue=100)
    b.start()
    items = [make_item(loop, i) for i in range(7)]
    b.submit(items)
    assert await asyncio.gather(*(i.future for i in items)) == [i * 10 for i in range(7)]
    assert rec.batches == [[0, 1, 2], [3, 4, 5], [6]]
    await b.drain()


class Fallback:
    """The fallback stand-in: answers -payload and records (payloads, reason) per call."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[int], str]] = []

    def __call__(self, items: list[Item], reason: str) -> list[int]:
        self.calls.append(([i.payload for i in items], reason))
        return [-i.payload for i in items]


async def test_expired_and_over_budget_requests_never_reach_the_pipeline(executor) -> None:
    loop = asyncio.get_running_loop()
    rec = Recorder()
    fallback = Fallback()
    # The watch is slowed down here so that the queue meets these items first.
    b = MicroBatcher(rec, executor, max_batch=8, max_wait_us=0, max_queue=100, fallback=fallback,
                     watch_interval_s=10.0)
    b.start()
    rec.gate.clear()
    blocker = make_item(loop, 1)
    b.submit([blocker])
    await asyncio.sleep(0.05)
    client_gone = make_item(loop, 2, client_s=0.01)
    over_budget = make_item(loop, 4, budget_s=0.01)
    alive = make_item(loop, 3)
    b.submit([client_gone])
    b.submit([over_budget])
    b.submit([alive])
    await asyncio.sleep(0.05)
    rec.gate.set()
    assert await alive.future == 30
    with pytest.raises(DeadlineExpiredError):
        await client_gone.future
    assert await over_budget.future == -4
    assert fallback.calls == [([4], "over_budget")]
    assert all(2 not in batch and 4 not in batch for batch in rec.batches)
    await b.drain()


async def test_a_stalled_pipeline_cannot_hold_an_answer_past_its_budget(executor) -> None:
    loop = asyncio.get_running_loop()
    rec = Recorder()
    fallback = Fallback()
    b = MicroBatcher(rec, executor, max_batch=8, max_wait_us=0, max_queue=100, fallback=fallback)
    b.start()
    rec.gate.clear()  # the pipeline thread is stuck on the first batch
    started = time.monotonic()
    in_flight = make_item(loop, 1, budget_s=0.03)
    b.submit([in_flight])
    await asyncio.sleep(0.005)
    queued = [make_item(loop, i, budget_s=0.03) for i in (2, 3)]
    patient = make_item(loop, 5, budget_s=30)
    gone = make_item(loop, 6, client_s=0.0)  # its client has given up already
    for item in (*queued, patient, gone):
        b.submit([item])
    answers = await asyncio.gather(in_flight.future, *(i.future for i in queued))
    assert answers == [-1, -2, -3]
    assert time.monotonic() - started < 0.03  # each within its budget
    with pytest.raises(DeadlineExpiredError):
        await gone.future
    assert {reason for _, reason in fallback.calls} == {"expected_over_budget"}
    assert not patient.future.done()
    rec.gate.set()  # the pipeline recovers: its late answer for item 1 is dropped
    assert await patient.future == 50
    assert await in_flight.future == -1
    assert rec.batches[0] == [1]
    await b.drain()


async def test_calls_the_measured_pipeline_cannot_answer_in_time_get_the_fallback_on_arrival(executor) -> None:
    loop = asyncio.get_running_loop()
    fallback = Fallback()

    def slow(items: list[Item]) -> list[int]:
        time.sleep(0.02)
        return [i.payload * 10 for i in items]

    b = MicroBatcher(slow, executor, max_batch=4, max_wait_us=0, max_queue=100, fallback=fallback)
    b.start()
    warm = make_item(loop, 1)
    b.submit([warm])
    assert await warm.future == 10
    assert b.timer.expected_s(1) >= 0.02
    busy = make_item(loop, 4)
    b.submit([busy])
    await asyncio.sleep(0.001)  # now in the pipeline for ~20 ms
    hurried = make_item(loop, 2, budget_s=0.01)  # cannot be scored in 10 ms behind it
    b.submit([hurried])
    assert hurried.future.done() and hurried.future.result() == -2
    relaxed = make_item(loop, 3, budget_s=1.0)
    b.submit([relaxed])
    assert await relaxed.future == 30
    assert await busy.future == 40
    assert fallback.calls == [([2], "expected_over_budget")]
    # An idle pipeline takes even a hurried call (the watch answers it if the pipeline is slow):
    # that is how a pipeline that got fast again is noticed.
    probe = make_item(loop, 5, budget_s=0.01)
    b.submit([probe])
    assert not probe.future.done()
    assert await probe.future == -5
    assert fallback.calls[-1] == ([5], "expected_over_budget")
    await b.drain()


async def test_past_the_queue_bound_the_fallback_answers_when_configured(executor) -> None:
    loop = asyncio.get_running_loop()
    rec = Recorder()
    fallback = Fallback()
    b = MicroBatcher(rec, executor, max_batch=2, max_wait_us=0, max_queue=2, fallback=fallback,
                     shed_to_fallback=True)
    rec.gate.clear()
    b.start()
    first = [make_item(loop, i) for i in range(2)]
    b.submit(first)
    extra = make_item(loop, 9)
    b.submit([extra])  # no exception: answered at once
    assert extra.future.result() == -9 and b.queued <= 2
    rec.gate.set()
    assert await asyncio.gather(*(i.future for i in first)) == [0, 10]
    assert fallback.calls == [([9], "queue_full")]
    await b.drain()


def test_pipeline_timer_learns_fixed_and_per_item_cost() -> None:
    timer = PipelineTimer(memory=50)
    assert not timer.measured
    timer.observe(4, 0.004)
    assert timer.expected_s(4) == pytest.approx(0.004) and timer.per_item_s == 0.0  # one size: all fixed
    for n in [1, 8, 32, 64] * 100:  # the first, slower call is forgotten
        timer.observe(n, 0.0001 + 0.00002 * n)
    assert timer.fixed_s == pytest.approx(0.0001, rel=0.05)
    assert timer.per_item_s == pytest.approx(0.00002, rel=0.05)
    assert timer.expected_s(100) == pytest.approx(0.0021, rel=0.05)


async def test_the_queue_is_bounded(executor) -> None:
    loop = asyncio.get_running_loop()
    rec = Recorder()
    b = MicroBatcher(rec, executor, max_batch=2, max_wait_us=0, max_queue=4)
    rec.gate.clear()
    b.start()
    b.submit([make_item(loop, i) for i in range(4)])
    with pytest.raises(OverloadedError) as err:
        b.submit([make_item(loop, 9)])
    assert err.value.limit == 4
    assert b.queued == 4  # the refused call queued nothing
    rec.gate.set()
    await b.drain()
    assert sum(len(x) for x in rec.batches) == 4
    with pytest.raises(NotServingError):
        b.submit([make_item(loop, 5)])


async def test_max_wait_lets_a_lone_request_wait_for_company(executor) -> None:
    loop = asyncio.get_running_loop()
    rec = Recorder()
    b = MicroBatcher(rec, executor, max_batch=8, max_wait_us=300_000, max_queue=100)
    b.start()
    items = [make_item(loop, i) for i in range(3)]
    b.submit([items[0]])
    await asyncio.sleep(0.001)
    b.submit([items[1]])
    b.submit([items[2]])
    await asyncio.gather(*(i.future for i in items))
    assert rec.batches == [[0, 1, 2]]
    await b.drain()


async def test_a_wrong_number_of_answers_fails_the_batch_not_the_batcher(executor) -> None:
    loop = asyncio.get_running_loop()
    answers = iter([[], [7]])
    b = MicroBatcher(lambda items: next(answers), executor, max_batch=8, max_wait_us=0, max_queue=100)
    b.start()
    first = make_item(loop, 1)
    b.submit([first])
    with pytest.raises(RuntimeError, match="0 answers for 1"):
        await first.future
    second = make_item(loop, 2)
    b.submit([second])
    assert await second.future == 7
    await b.drain()


async def test_a_pipeline_bug_fails_the_batch_not_the_batcher(executor) -> None:
    loop = asyncio.get_running_loop()
    calls = []

    def flaky(items: list[Item]) -> list[int]:
        calls.append(len(items))
        if len(calls) == 1:
            raise RuntimeError("boom")
        return [0 for _ in items]

    b = MicroBatcher(flaky, executor, max_batch=8, max_wait_us=0, max_queue=100)
    b.start()
    first = make_item(loop, 1)
    b.submit([first])
    with pytest.raises(RuntimeError):
        await first.future
    second = make_item(loop, 2)
    b.submit([second])
    assert await second.future == 0
    await b.drain()


async def test_an_overrunning_batch_still_answers_its_items_within_budget(executor) -> None:
    # Expected 100 ms, this call takes 190 ms: between 1× and 2× its expected time the watch
    # must not think it is about to finish.
    loop = asyncio.get_running_loop()
    fallback = Fallback()

    def slow(items: list[Item]) -> list[int]:
        time.sleep(0.19)
        return [i.payload * 10 for i in items]

    b = MicroBatcher(slow, executor, max_batch=8, max_wait_us=0, max_queue=100, fallback=fallback)
    for _ in range(5):
        b.timer.observe(1, 0.1)
    b.start()
    item = make_item(loop, 7, budget_s=0.15)
    b.submit([item])
    assert await item.future == -7
    assert time.monotonic() <= item.deadline + 0.005  # in time, give or take a loop turn
    await b.drain()


async def test_an_item_already_in_the_pipeline_gets_an_answer_never_an_expiry(executor) -> None:
    # It will enter the state: failing it would let a retry count the transaction twice.
    loop = asyncio.get_running_loop()
    fallback = Fallback()

    def pipeline(items: list[Item]) -> list[int]:
        time.sleep(0.02)
        return [i.payload * 10 for i in items]

    b = MicroBatcher(pipeline, executor, max_batch=8, max_wait_us=0, max_queue=100, fallback=fallback)
    b.timer.observe(1, 0.002)
    b.start()
    hurried = make_item(loop, 3, client_s=0.001)  # an idle pipeline takes it all the same
    b.submit([hurried])
    assert await hurried.future in (-3, 30)
    await b.drain()


async def test_the_watch_survives_a_failing_fallback_and_loses_no_call(executor) -> None:
    loop = asyncio.get_running_loop()
    calls: list[str] = []

    def flaky_fallback(items: list[Item], reason: str) -> list[int]:
        calls.append(reason)
        if len(calls) == 1:
            raise ValueError("fallback broke once")
        return [-i.payload for i in items]

    def slow(items: list[Item]) -> list[int]:
        time.sleep(0.3)
        return [i.payload * 10 for i in items]

    b = MicroBatcher(slow, executor, max_batch=1, max_wait_us=0, max_queue=100, fallback=flaky_fallback)
    b.timer.observe(1, 0.001)  # the pipeline looks fast: later calls are queued, not answered at once
    b.start()
    first = make_item(loop, 1)
    b.submit([first])
    await asyncio.sleep(0.005)
    second = make_item(loop, 2, budget_s=0.05)
    b.submit([second])
    with pytest.raises(ValueError, match="broke once"):
        await asyncio.wait_for(second.future, 1.0)  # failed, not lost
    third = make_item(loop, 3, budget_s=0.05)
    b.submit([third])
    assert await asyncio.wait_for(third.future, 1.0) == -3  # the watch still works
    assert await first.future == 10
    await b.drain()
