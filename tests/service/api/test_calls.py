"""Waiting for a call's answers: in order, the first error in that order, and never cancelling the work."""

from __future__ import annotations

import asyncio

import pytest

from service.api.calls import answers


def test_answers_come_in_order_whatever_order_they_are_settled_in() -> None:
    async def main() -> list[int]:
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in range(5)]
        for k in (3, 1, 4, 0, 2):
            loop.call_later(0.001 * k, futures[k].set_result, k * 10)
        return await answers(futures)

    assert asyncio.run(main()) == [0, 10, 20, 30, 40]


def test_the_first_error_in_order_is_raised_once_all_are_settled() -> None:
    async def main() -> list[asyncio.Future[int]]:
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in range(3)]
        loop.call_later(0.001, futures[2].set_exception, ValueError("third"))
        loop.call_later(0.002, futures[1].set_exception, KeyError("second"))
        loop.call_later(0.003, futures[0].set_result, 0)
        with pytest.raises(KeyError):
            await answers(futures)
        return futures

    futures = asyncio.run(main())
    assert all(f.done() for f in futures)


def test_cancelling_the_call_leaves_its_futures_to_be_answered() -> None:
    async def main() -> tuple[asyncio.Future[int], asyncio.Future[int]]:
        loop = asyncio.get_running_loop()
        first, second = loop.create_future(), loop.create_future()
        waiting = asyncio.ensure_future(answers([first, second]))
        await asyncio.sleep(0.001)
        first.set_result(1)
        await asyncio.sleep(0.001)  # now waiting on the second
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        second.set_result(2)  # still settable: nobody cancelled it
        return first, second

    first, second = asyncio.run(main())
    assert not first.cancelled() and not second.cancelled() and second.result() == 2
