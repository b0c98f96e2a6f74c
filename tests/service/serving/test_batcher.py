from __future__ import annotations

import asyncio
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from service.api.errors import DeadlineExpiredError, NotServingError, OverloadedError
from service.serving.batcher import MicroBatcher
from service.serving.items import Answered, Item


def make_item(loop: asyncio.AbstractEventLoop, payload: int, *, budget_s: float = 5.0,
              client_s: float = math.inf) -> Item:
    now = time.monotonic()
    return Item(payload, now + min(budget_s, client_s), time.perf_counter_ns(), loop.create_future(),
                client_deadline=now + client_s)


def scored(items: list[Item]) -> list[Item]:
    """The items a pipeline call answers: those the fallback has not answered already."""
    return [i for i in items if not i.answered_by_fallback]


class Recorder:
    """A pipeline stand-in: records every batch (what entered the state, in order) and the items
    that came only to enter the state; answers payload × 10; can be held to let a queue build up."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.state_only: list[int] = []
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, items: list[Item]) -> list[int]:
        self.gate.wait(5)
        self.batches.append([i.payload for i in items])
        self.state_only += [i.payload for i in items if i.answered_by_fallback]
        return [i.payload * 10 for i in scored(items)]

    @property
    def entered(self) -> list[int]:
        """Every payload that entered the state, in order."""
        return [p for batch in self.batches for p in batch]


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


async def test_expired_requests_never_reach_the_pipeline_and_over_budget_ones_enter_the_state_unscored(
        executor) -> None:
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
    await b.drain()
    # The client that left before scoring: nothing recorded. The over-budget one: answered by the
    # fallback, and in the state all the same, in its place, without a second answer.
    assert rec.entered == [1, 4, 3] and rec.state_only == [4]


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
    answered_at: dict[int, float] = {}
    for item in (in_flight, *queued):
        item.future.add_done_callback(lambda _, k=item.payload: answered_at.setdefault(k, time.monotonic()))
    answers = await asyncio.gather(in_flight.future, *(i.future for i in queued))
    assert answers == [-1, -2, -3]
    for item in (in_flight, *queued):  # each within its budget (answered items no longer carry it)
        assert answered_at[item.payload] - started < 0.03 + (0.005 if item in queued else 0.0)
    with pytest.raises(DeadlineExpiredError):
        await gone.future
    assert {reason for _, reason in fallback.calls} == {"expected_over_budget"}
    assert not patient.future.done()
    rec.gate.set()  # the pipeline recovers: its late answer for item 1 is dropped
    assert await patient.future == 50
    assert await in_flight.future == -1
    await b.drain()
    # Every answered item entered the state once, in arrival order; the one whose client left did not.
    assert rec.batches[0] == [1]
    assert rec.entered == [1, 2, 3, 5] and rec.state_only == [2, 3]


async def test_calls_the_measured_pipeline_cannot_answer_in_time_get_the_fallback_on_arrival(executor) -> None:
    loop = asyncio.get_running_loop()
    fallback = Fallback()

    entered: list[int] = []

    def slow(items: list[Item]) -> list[int]:
        time.sleep(0.02)
        entered.extend(i.payload for i in items)
        return [i.payload * 10 for i in scored(items)]

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
    assert entered == [1, 4, 2, 3, 5]  # the hurried call too, in its place


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
    assert rec.entered == [0, 1, 9] and rec.state_only == [9]


async def test_fallback_answers_waiting_for_the_state_are_bounded(executor) -> None:
    # Past the bound the process could not record more transactions: it refuses, recording nothing.
    loop = asyncio.get_running_loop()
    rec = Recorder()
    b = MicroBatcher(rec, executor, max_batch=2, max_wait_us=0, max_queue=2, fallback=Fallback(),
                     shed_to_fallback=True, max_answered_backlog=3)
    rec.gate.clear()
    b.start()
    b.submit([make_item(loop, i) for i in range(2)])
    await asyncio.sleep(0.02)  # [0, 1] in the pipeline
    b.submit([make_item(loop, i) for i in range(2, 4)])  # queued
    shed = [make_item(loop, i) for i in range(10, 13)]
    b.submit(shed)  # the queue is full: answered by the fallback, queued for the state
    assert all(i.future.done() for i in shed) and b.answered_backlog == 3
    refused = make_item(loop, 20)
    with pytest.raises(OverloadedError) as err:
        b.submit([refused])
    assert err.value.reason == "answered_backlog_full" and err.value.limit == 3
    assert not refused.future.done() and b.answered_backlog == 3 and b.queued == 2
    rec.gate.set()
    await b.drain()
    assert rec.entered == [0, 1, 2, 3, 10, 11, 12] and b.answered_backlog == 0


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


def timed_batcher(executor, fallback: Fallback, *, expected_s: float, takes_s: list[float]) -> MicroBatcher:
    """A started batcher whose timer expects `expected_s` a call, over a pipeline whose k-th call takes
    `takes_s[k]` (the last one from then on) and answers payload × 10."""
    durations = iter(takes_s)
    took = takes_s[-1]

    def pipeline(items: list[Item]) -> list[int]:
        nonlocal took
        took = next(durations, took)
        time.sleep(took)
        return [i.payload * 10 for i in items]

    b = MicroBatcher(pipeline, executor, max_batch=8, max_wait_us=0, max_queue=100, fallback=fallback)
    for _ in range(5):
        b.timer.observe(1, expected_s)
    b.start()
    return b


async def test_an_overrunning_batch_still_answers_its_items_within_budget(executor) -> None:
    # Expected 100 ms, this call takes 190 ms: between 1× and 2× its expected time the watch
    # must not think it is about to finish.
    loop = asyncio.get_running_loop()
    fallback = Fallback()

    b = timed_batcher(executor, fallback, expected_s=0.1, takes_s=[0.19])
    item = make_item(loop, 7, budget_s=0.15)
    b.submit([item])
    assert await item.future == -7
    assert time.monotonic() <= item.deadline + 0.005  # in time, give or take a loop turn
    await b.drain()


async def test_a_short_stall_of_a_fast_pipeline_does_not_send_the_queue_to_the_fallback(executor) -> None:
    # Expected 1 ms, this call stalls 60 ms (a host taking the CPU): the calls queued behind it, with
    # 100 ms budgets, are still answered by the pipeline in time. (Expecting "as much again" without
    # a bound answered them all by the fallback once the stall passed half the budget.)
    loop = asyncio.get_running_loop()
    fallback = Fallback()
    b = timed_batcher(executor, fallback, expected_s=0.001, takes_s=[0.06, 0.001])
    first = make_item(loop, 1, budget_s=0.1)
    b.submit([first])
    await asyncio.sleep(0.001)
    queued = [make_item(loop, k, budget_s=0.1) for k in (2, 3, 4)]
    for item in queued:
        b.submit([item])
    assert await asyncio.gather(first.future, *(i.future for i in queued)) == [10, 20, 30, 40]
    assert fallback.calls == []
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


async def test_every_answered_item_enters_the_state_once_in_arrival_order(executor) -> None:
    # Calls answered on arrival, by the watch while queued, when taken over budget, and by the
    # pipeline, mixed in one queue: the pipeline sees each exactly once, in submit order.
    loop = asyncio.get_running_loop()
    rec = Recorder()
    fallback = Fallback()
    b = MicroBatcher(rec, executor, max_batch=4, max_wait_us=0, max_queue=100, fallback=fallback)
    b.timer.observe(1, 0.001)
    b.start()
    rec.gate.clear()
    items = [make_item(loop, 0)]
    b.submit(items[:1])
    await asyncio.sleep(0.01)  # 0 holds the pipeline
    for k in range(1, 13):
        # Every third has a budget the held pipeline cannot meet: the watch answers it while queued.
        item = make_item(loop, k, budget_s=0.03 if k % 3 == 0 else 5.0)
        items.append(item)
        b.submit([item])
    await asyncio.sleep(0.1)
    rec.gate.set()
    answers = await asyncio.gather(*(i.future for i in items))
    await b.drain()
    assert answers == [-k if k % 3 == 0 else 10 * k for k in range(13)]
    assert rec.entered == list(range(13))
    assert rec.state_only == [3, 6, 9, 12]
    assert b.answered_backlog == 0 and b.queued == 0


async def test_a_late_pipeline_answer_is_reported_undelivered(executor) -> None:
    # The watch answered the call in the pipeline; the pipeline's answer is dropped and its metrics
    # hook learns which answers reached their calls.
    loop = asyncio.get_running_loop()
    seen: list[list[bool] | None] = []

    def slow(items: list[Item]) -> Answered:
        time.sleep(0.15)
        return Answered([i.payload * 10 for i in scored(items)], seen.append)

    b = MicroBatcher(slow, executor, max_batch=8, max_wait_us=0, max_queue=100, fallback=Fallback())
    b.start()
    hurried, patient = make_item(loop, 1, budget_s=0.05), make_item(loop, 2, budget_s=5.0)
    b.submit([hurried, patient])
    assert await hurried.future == -1  # the watch, in time
    assert await patient.future == 20
    await b.drain()
    assert seen == [[False, True]]
    calm = make_item(loop, 3)
    b2 = MicroBatcher(slow, executor, max_batch=8, max_wait_us=0, max_queue=100, fallback=Fallback())
    b2.start()
    b2.submit([calm])
    assert await calm.future == 30
    await b2.drain()
    assert seen[-1] is None  # all delivered


async def test_a_pipeline_that_has_returned_is_free_before_the_loop_resumes_the_batcher(executor) -> None:
    # The seen failure: a batch judged still running while its answers were being settled, expected
    # to "overrun as much again", and the next call answered by the fallback from an idle server.
    loop = asyncio.get_running_loop()
    returned = threading.Event()

    def pipeline(items: list[Item]) -> list[int]:
        returned.set()
        return [i.payload * 10 for i in scored(items)]

    fallback = Fallback()
    # The watch is slowed down here: this is about the judgement on arrival.
    b = MicroBatcher(pipeline, executor, max_batch=8, max_wait_us=0, max_queue=100, fallback=fallback,
                     watch_interval_s=10.0)
    b.timer.observe(1, 1.0)  # calls look slow: a call judged behind one would miss a 50 ms budget
    b.start()
    first = make_item(loop, 1)
    b.submit([first])
    while not returned.is_set():
        await asyncio.sleep(0.001)
    time.sleep(0.02)  # the loop is held: the batcher task has not resumed, the thread is done
    assert b.busy_s == 0.0
    second = make_item(loop, 2, budget_s=0.05)
    b.submit([second])
    assert await first.future == 10 and await second.future == 20
    assert fallback.calls == []
    await b.drain()


async def test_transactions_waiting_only_for_the_state_are_costed_as_such(executor) -> None:
    # 3,000 answered transactions queued cost ~15 ms to feed into the state: a call with a 50 ms
    # budget behind them is queued, not answered by the fallback (costed as 3,000 to score they
    # would have been ~70 ms, and every new call would have joined the backlog).
    loop = asyncio.get_running_loop()
    rec = Recorder()
    fallback = Fallback()
    b = MicroBatcher(rec, executor, max_batch=64, max_wait_us=0, max_queue=1000, fallback=fallback)
    b.timer.observe(1, 0.0003)
    b.timer.observe(64, 0.0015)
    b.timer.observe_batch(0, 64, 64 * 5e-6)
    b.start()
    rec.gate.clear()
    first = make_item(loop, 0)
    b.submit([first])
    await asyncio.sleep(0.005)  # 0 holds the pipeline
    hurried = [make_item(loop, k, budget_s=1e-4) for k in range(1, 3001)]
    for start in range(0, 3000, 500):  # six calls of 500
        b.submit(hurried[start:start + 500])
    assert all(i.future.done() for i in hurried) and b.answered_backlog == 3000 and b.queued == 0
    patient = make_item(loop, 5000, budget_s=0.05)
    b.submit([patient])
    assert not patient.future.done() and b.queued == 1
    rec.gate.set()
    assert await patient.future == 50000  # the pipeline's answer
    await b.drain()
    assert rec.entered == [*range(3001), 5000]
    assert [payload for payloads, _ in fallback.calls for payload in payloads] == list(range(1, 3001))
    assert {reason for _, reason in fallback.calls} == {"expected_over_budget"}


async def test_work_runs_in_its_turn_between_the_transactions_around_it(executor) -> None:
    # An outcome report sent after a call answered by the fallback is applied after that call's
    # transaction entered the state, and before the next one's: as replay applies it.
    loop = asyncio.get_running_loop()
    rec = Recorder()
    b = MicroBatcher(rec, executor, max_batch=8, max_wait_us=0, max_queue=100, fallback=Fallback())
    b.timer.observe(1, 0.001)
    b.start()
    rec.gate.clear()
    b.submit([make_item(loop, 0)])
    await asyncio.sleep(0.005)
    late = make_item(loop, 1, budget_s=1e-4)
    b.submit([late])  # answered by the fallback, queued for the state
    assert late.future.done()
    seen: list[list[int]] = []
    works = [b.submit_work(lambda: seen.append(rec.entered), kind="outcome") for _ in range(2)]
    after = make_item(loop, 2)
    b.submit([after])
    rec.gate.set()
    await asyncio.gather(*works)
    assert seen == [[0, 1], [0, 1]]  # both after 0 and 1 entered, before 2
    assert await after.future == 20
    await b.drain()
    assert rec.entered == [0, 1, 2]
    failing = b.submit_work(lambda: 1 / 0)  # drained: runs at once, its error in its future
    with pytest.raises(ZeroDivisionError):
        await failing


async def test_a_cancelled_drain_does_not_strand_what_is_queued(executor) -> None:
    loop = asyncio.get_running_loop()
    rec = Recorder()
    b = MicroBatcher(rec, executor, max_batch=2, max_wait_us=0, max_queue=100, fallback=Fallback())
    b.start()
    rec.gate.clear()
    items = [make_item(loop, k) for k in range(5)]
    b.submit(items)
    await asyncio.sleep(0.005)
    stopping = loop.create_task(b.drain())
    await asyncio.sleep(0.005)
    stopping.cancel()  # the caller gave up; the queued work goes on
    with pytest.raises(asyncio.CancelledError):
        await stopping
    rec.gate.set()
    assert await asyncio.gather(*(i.future for i in items)) == [k * 10 for k in range(5)]
    await b.drain()
    assert rec.entered == list(range(5))
