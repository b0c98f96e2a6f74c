"""Idempotency: a retried transaction_id gets the first answer and never counts twice.

Each entry holds the payload fingerprint and the future of the first call's answer, so
a retry that arrives while the first is still in flight waits for the same answer.
Entries live `ttl_s` and at most `max_entries` are kept (oldest dropped first). Touched
only from the event loop thread, so lookup-then-register needs no lock.

Completed answers can be taken out (`completed`) and put back (`restore`) with their
expiry as wall-clock epoch seconds, so that the TTL runs on across a restart; the
files themselves are `service/idempotency_store.py`'s.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from core.errors import IdempotencyConflictError

T = TypeVar("T")
A = TypeVar("A")
CAPTURE_CHUNK = 4096  # entries read per event-loop turn by `completed`: a few ms, so calls keep flowing


@dataclass(frozen=True, slots=True)
class _Entry(Generic[T]):
    transaction_id: str
    fingerprint: int
    future: asyncio.Future[T]
    expires_at: float  # on the cache's clock (monotonic)
    pending: object = None  # e.g. the queued batcher Item, so that a retry can extend its deadline


@dataclass(frozen=True, slots=True)
class Remembered(Generic[A]):
    """Completed answers as they outlive the process, in columns (index i is one transaction).

    Columns rather than an object per answer: taking 200,000 answers out of the cache then
    allocates no new tracked objects, which would bring on a full garbage collection (a
    ~0.1 s pause of the event loop) while the server is serving.
    """

    transaction_ids: list[str]
    fingerprints: list[int]
    expires_at_epoch_s: list[float]  # wall-clock epoch seconds
    answers: list[A]

    def __post_init__(self) -> None:
        n = len(self.transaction_ids)
        if not len(self.fingerprints) == len(self.expires_at_epoch_s) == len(self.answers) == n:
            raise ValueError("Remembered: every column needs one value per transaction id")

    def __len__(self) -> int:
        return len(self.transaction_ids)

    @classmethod
    def empty(cls) -> Remembered[A]:
        return cls([], [], [], [])


class IdempotencyCache(Generic[T]):
    """transaction_id → (payload fingerprint, future answer), bounded in time and size."""

    def __init__(self, *, ttl_s: float, max_entries: int, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self._ttl_s = ttl_s
        self._max_entries = max_entries
        self._clock = clock
        # Wall time only to carry expiry across a restart (monotonic clocks restart with the host).
        self._wall_clock = wall_clock
        # A plain dict for lookups (and a C-speed copy of its values in `completed`), and the
        # entries in registration order, which is expiry order as every entry gets the same TTL.
        # `_order` may still hold entries since forgotten or replaced; they are skipped.
        self._entries: dict[str, _Entry[T]] = {}
        self._order: deque[_Entry[T]] = deque()
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._entries)

    def _pop_oldest(self) -> bool:
        """Drop the oldest entry of `_order`; True when it was still live."""
        entry = self._order.popleft()
        if self._entries.get(entry.transaction_id) is entry:
            del self._entries[entry.transaction_id]
            return True
        return False

    def _expire(self, now: float) -> None:
        order = self._order
        while order and order[0].expires_at <= now:
            self._pop_oldest()

    def _append(self, entry: _Entry[T]) -> None:
        self._entries[entry.transaction_id] = entry
        self._order.append(entry)
        while len(self._entries) > self._max_entries:
            if self._pop_oldest():
                self.evicted += 1
        if len(self._order) > 2 * len(self._entries) + 1024:
            # Mostly forgotten entries (failed calls) waiting for their turn: compact, amortized O(1).
            self._order = deque(e for e in self._order if self._entries.get(e.transaction_id) is e)

    def lookup(self, transaction_id: str, fingerprint: int) -> asyncio.Future[T] | None:
        """The first call's future, None when unseen; raises IdempotencyConflictError on a different payload.

        A first call that failed without an answer (cancelled, or an error such as its
        deadline passing in the queue) changed nothing: it is forgotten here, and the retry
        is scored as new.
        """
        self._expire(self._clock())
        entry = self._entries.get(transaction_id)
        if entry is None:
            return None
        f = entry.future
        if f.done() and (f.cancelled() or f.exception() is not None):
            del self._entries[transaction_id]
            return None
        if entry.fingerprint != fingerprint:
            raise IdempotencyConflictError()
        return f

    def register(self, transaction_id: str, fingerprint: int, future: asyncio.Future[T], *,
                 pending: object = None) -> None:
        """Remember a new call's future, and optionally what it waits in (see `pending`)."""
        self._append(_Entry(transaction_id, fingerprint, future, self._clock() + self._ttl_s, pending))

    def pending(self, transaction_id: str) -> object:
        """What `register` was given as `pending` for a call still waiting for its answer, else None."""
        entry = self._entries.get(transaction_id)
        if entry is None or entry.future.done():
            return None
        return entry.pending

    def forget(self, transaction_id: str, future: asyncio.Future[T]) -> None:
        """Drop the entry if it still belongs to `future` (the call failed without scoring)."""
        entry = self._entries.get(transaction_id)
        if entry is not None and entry.future is future:
            del self._entries[transaction_id]

    async def completed(self, *, chunk: int = CAPTURE_CHUNK) -> Remembered[T]:
        """Every unexpired entry whose call has its answer, captured at the moment of the call.

        Everything completed when it is called is included; an entry completed while the
        copy is being read may be too. Calls still in flight, failed or cancelled are left
        out (they have no answer). The entries are copied at once (a C-speed copy), then read
        `chunk` at a time, yielding to the event loop in between.
        """
        entries = list(self._entries.values())
        now = self._clock()
        to_epoch = self._wall_clock() - now
        out: Remembered[T] = Remembered.empty()
        ids, fingerprints, expiry, answers = out.transaction_ids, out.fingerprints, out.expires_at_epoch_s, out.answers
        for start in range(0, len(entries), chunk):
            if start:
                await asyncio.sleep(0)
            for e in entries[start:start + chunk]:
                f = e.future
                if e.expires_at > now and f.done() and not f.cancelled() and f.exception() is None:
                    ids.append(e.transaction_id)
                    fingerprints.append(e.fingerprint)
                    expiry.append(e.expires_at + to_epoch)
                    answers.append(f.result())
        return out

    def restore(self, records: Remembered[T]) -> int:
        """Put saved answers back, before any call is taken; returns how many were kept.

        Expired records are dropped, and beyond `max_entries` the ones expiring first. Must
        run on the event loop (each answer becomes a completed future of that loop).
        """
        if self._entries:
            raise RuntimeError("restore() runs once, into an empty cache, before the server takes calls")
        now, wall_now = self._clock(), self._wall_clock()
        expiry = records.expires_at_epoch_s
        live = sorted((i for i in range(len(records)) if expiry[i] > wall_now), key=expiry.__getitem__)
        loop = asyncio.get_running_loop()
        for i in live[-self._max_entries:]:
            future: asyncio.Future[T] = loop.create_future()
            future.set_result(records.answers[i])
            # Never beyond one TTL from now, whatever the file says (a wall clock set back, a hand-made file).
            remaining_s = min(expiry[i] - wall_now, self._ttl_s)
            self._append(_Entry(records.transaction_ids[i], records.fingerprints[i], future, now + remaining_s))
        return len(self._entries)
