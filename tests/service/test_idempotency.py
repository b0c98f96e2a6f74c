from __future__ import annotations

import asyncio

import pytest

from core.errors import IdempotencyConflictError
from service.idempotency import IdempotencyCache


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_lookup_register_conflict_expiry_and_bound() -> None:
    loop = asyncio.get_running_loop()
    clock = Clock()
    cache: IdempotencyCache[int] = IdempotencyCache(ttl_s=10.0, max_entries=2, clock=clock)
    f1 = loop.create_future()
    assert cache.lookup("a", 1) is None
    cache.register("a", 1, f1)
    assert cache.lookup("a", 1) is f1
    with pytest.raises(IdempotencyConflictError):
        cache.lookup("a", 2)
    clock.now = 11.0
    assert cache.lookup("a", 1) is None and len(cache) == 0
    for key in ("x", "y", "z"):
        cache.register(key, 0, loop.create_future())
    assert len(cache) == 2 and cache.evicted == 1
    assert cache.lookup("x", 0) is None


async def test_forget_only_removes_the_owner() -> None:
    loop = asyncio.get_running_loop()
    cache: IdempotencyCache[int] = IdempotencyCache(ttl_s=10.0, max_entries=10)
    first, second = loop.create_future(), loop.create_future()
    cache.register("a", 1, first)
    cache.forget("a", second)
    assert cache.lookup("a", 1) is first
    cache.forget("a", first)
    assert cache.lookup("a", 1) is None
