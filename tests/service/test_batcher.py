from __future__ import annotations

import asyncio
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from service.batcher import Item, MicroBatcher
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


async def test_expired_and_over_budget_requests_never_reach_the_pipeline(executor) -> None:
    loop = asyncio.get_running_loop()
    rec = Recorder()
    fallback_calls: list[list[int]] = []

    def fallback(items: list[Item]) -> list[int]:
        fallback_calls.append([i.payload for i in items])
        return [-i.payload for i in items]

    b = MicroBatcher(rec, executor, max_batch=8, max_wait_us=0, max_queue=100, answer_over_budget=fallback)
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
    assert fallback_calls == [[4]]
    assert all(2 not in batch and 4 not in batch for batch in rec.batches)
    await b.drain()


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
