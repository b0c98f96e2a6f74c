"""Idempotency: a retried transaction_id gets the first answer and never counts twice.

Each entry holds the payload fingerprint and the future of the first call's answer, so
a retry that arrives while the first is still in flight waits for the same answer.
Entries live `ttl_s` and at most `max_entries` are kept (oldest dropped first). Touched
only from the event loop thread, so lookup-then-register needs no lock.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from core.errors import IdempotencyConflictError

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class _Entry(Generic[T]):
    fingerprint: int
    future: asyncio.Future[T]
    expires_at: float


class IdempotencyCache(Generic[T]):
    """transaction_id → (payload fingerprint, future answer), bounded in time and size."""

    def __init__(self, *, ttl_s: float, max_entries: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl_s = ttl_s
        self._max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[str, _Entry[T]] = OrderedDict()
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._entries)

    def _expire(self, now: float) -> None:
        entries = self._entries
        while entries:
            first = next(iter(entries.values()))
            if first.expires_at > now:
                break
            entries.popitem(last=False)

    def lookup(self, transaction_id: str, fingerprint: int) -> asyncio.Future[T] | None:
        """The first call's future, None when unseen; raises IdempotencyConflictError on a different payload."""
        self._expire(self._clock())
        entry = self._entries.get(transaction_id)
        if entry is None:
            return None
        if entry.fingerprint != fingerprint:
            raise IdempotencyConflictError()
        return entry.future

    def register(self, transaction_id: str, fingerprint: int, future: asyncio.Future[T]) -> None:
        """Remember a new call's future."""
        self._entries[transaction_id] = _Entry(fingerprint, future, self._clock() + self._ttl_s)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)
            self.evicted += 1

    def forget(self, transaction_id: str, future: asyncio.Future[T]) -> None:
        """Drop the entry if it still belongs to `future` (the call failed without scoring)."""
        entry = self._entries.get(transaction_id)
        if entry is not None and entry.future is future:
            del self._entries[transaction_id]
