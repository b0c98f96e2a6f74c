"""Idempotency: a retried transaction_id gets the first answer and never counts twice.

Each entry holds the payload fingerprint and the future of the first call's answer, so
a retry that arrives while the first is still in flight waits for the same answer.
Entries live `ttl_s` and at most `max_entries` are kept (oldest dropped first). Touched
only from the event loop thread, so lookup-then-register needs no lock.

Answered entries are compacted into plain data that CPython's cyclic garbage collector
does not track: a full collection no longer walks an entry, a future, a protobuf message
and a batcher item for each of the 200,000 answers kept for 24 h (~140 ms a pass before,
~5 ms now). Only the calls in flight or answered since the last `register` stay objects.
Compaction is amortized over `register`, not a done-callback per call (those were a
measurable share of ScoreBatch's CPU).

Completed answers can be taken out (`completed`) and put back (`restore`) packed, with
their expiry as wall-clock epoch seconds, so that the TTL runs on across a restart; the
files themselves are `service/serving/idempotency_store.py`'s.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from core.errors import IdempotencyConflictError
from core.files import Pacer

T = TypeVar("T")  # an answer, as callers see it
P = TypeVar("P")  # an answer packed: an atomic value (bytes, bool, int…), which the GC does not track
A = TypeVar("A")
CAPTURE_CHUNK = 4096  # entries read per event-loop turn by `completed`: a few ms, so calls keep flowing
# Answered entries compacted per `register`: more than the one it adds, so a backlog drains,
# and few, so that no call pays for a whole batch's worth.
COMPACT_PER_REGISTER = 4
ORDER_CHUNK = 256  # expiry-order items sealed per tuple (see `_ExpiryOrder`)


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs 4× as much, once per call
class _Live(Generic[T]):
    """A call not yet compacted: in flight, or answered since the last `register`."""

    transaction_id: str
    fingerprint: int
    future: asyncio.Future[T]
    expires_at: float  # on the cache's clock (monotonic)
    pending: object  # e.g. the queued batcher Item, so that a retry can extend its deadline


class _ExpiryOrder:
    """(transaction_id, expires_at) in registration order, which is expiry order (one TTL for all).

    Sealed in tuples of ORDER_CHUNK items: a tuple of atomic values is untracked at the first
    collection that meets it, and the GC then visits one chunk where a deque of items would
    have it visit every one of 200,000 at each full collection.
    """

    def __init__(self) -> None:
        self._chunks: deque[tuple[tuple[str, float], ...]] = deque()
        self._head = 0  # items of the first chunk already taken
        self._tail: list[tuple[str, float]] = []
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def append(self, transaction_id: str, expires_at: float) -> bool:
        """Add an item at the end; True when that sealed a chunk."""
        tail = self._tail
        tail.append((transaction_id, expires_at))
        self._len += 1
        if len(tail) < ORDER_CHUNK:
            return False
        self._chunks.append(tuple(tail))
        self._tail = []
        return True

    def first(self) -> tuple[str, float] | None:
        if not self._chunks:
            if not self._tail:
                return None
            self._chunks.append(tuple(self._tail))
            self._tail = []
        return self._chunks[0][self._head]

    def popleft(self) -> tuple[str, float] | None:
        item = self.first()
        if item is None:
            return None
        self._len -= 1
        self._head += 1
        if self._head == len(self._chunks[0]):
            self._chunks.popleft()
            self._head = 0
        return item

    def keep(self, wanted: Callable[[str, float], bool]) -> None:
        """Only the items `wanted`, in the same order."""
        items = [item for chunk in self._chunks for item in chunk][self._head:] + self._tail
        self._chunks, self._head, self._tail, self._len = deque(), 0, [], 0
        for item in items:
            if wanted(*item):
                self.append(*item)


@dataclass(frozen=True, slots=True)
class Remembered(Generic[A]):
    """Completed answers as they outlive the process, in columns (index i is one transaction).

    Columns of the values the cache already holds rather than an object per answer: taking
    200,000 answers out of the cache then allocates no new tracked objects, which would bring
    on a full garbage collection while the server is serving. Answers are packed (the
    cache's `pack`: a serialized ScoreResponse for Score answers), as the file stores them.
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


def _same(value: Any) -> Any:
    return value


class IdempotencyCache(Generic[T, P]):
    """transaction_id → (payload fingerprint, future answer), bounded in time and size.

    `pack` turns an answer into an atomic value (bytes, bool, int, str, float) and `unpack`
    back into an equal answer; the defaults keep it as it is, right for answers that already
    are atomic (an outcome report's bool). Anything else kept as it is stays GC-tracked.
    """

    def __init__(self, *, ttl_s: float, max_entries: int, pack: Callable[[T], P] = _same,
                 unpack: Callable[[P], T] = _same, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self._ttl_s = ttl_s
        self._max_entries = max_entries
        self._pack, self._unpack = pack, unpack
        self._clock = clock
        # Wall time only to carry expiry across a restart (monotonic clocks restart with the host).
        self._wall_clock = wall_clock
        # One plain dict for lookups (and C-speed copies in `completed`): a `_Live` entry, or a
        # compacted (fingerprint, expires_at, packed answer) tuple, untracked at the first
        # collection that meets it. The dict itself stays tracked: a full collection still
        # visits each value (~5 ms at 200,000), but no longer walks anything behind it.
        self._entries: dict[str, _Live[T] | tuple[int, float, P]] = {}
        self._recent: deque[_Live[T]] = deque()  # live entries in registration order, to compact from
        # May still hold items of entries forgotten or replaced since (the expiry differs): skipped.
        self._order = _ExpiryOrder()
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._entries)

    def _is_current(self, transaction_id: str, expires_at: float) -> bool:
        entry = self._entries.get(transaction_id)
        if entry is None:
            return False
        return (entry.expires_at if isinstance(entry, _Live) else entry[1]) == expires_at

    def _pop_oldest(self) -> bool:
        """Drop the oldest entry of `_order`; True when it was still live."""
        item = self._order.popleft()
        if item is None or not self._is_current(*item):
            return False
        del self._entries[item[0]]
        return True

    def _expire(self, now: float) -> None:
        while (item := self._order.first()) is not None and item[1] <= now:
            self._pop_oldest()

    def _ordered(self, transaction_id: str, expires_at: float) -> None:
        """Note a new entry's expiry, then keep the bound."""
        entries = self._entries
        if self._order.append(transaction_id, expires_at) and len(self._order) > 2 * len(entries) + 1024:
            # Mostly forgotten entries (failed calls) waiting for their turn: rebuild, amortized O(1).
            self._order.keep(self._is_current)
        while len(entries) > self._max_entries:
            if self._pop_oldest():
                self.evicted += 1

    def _compact(self, limit: int) -> None:
        """Compact up to `limit` answered entries from the head of `_recent`; drop failed ones.

        Stops at the first call still in flight: answers come back about in registration
        order, and the entries behind it are compacted once it has its answer.
        """
        recent, entries = self._recent, self._entries
        while recent and limit:
            live = recent[0]
            txn_id, f = live.transaction_id, live.future
            if entries.get(txn_id) is not live:  # forgotten, replaced, expired or evicted
                recent.popleft()
                continue
            if not f.done():
                return
            recent.popleft()
            limit -= 1
            if f.cancelled() or f.exception() is not None:
                del entries[txn_id]
            else:
                entries[txn_id] = (live.fingerprint, live.expires_at, self._pack(f.result()))

    def lookup(self, transaction_id: str, fingerprint: int) -> asyncio.Future[T] | None:
        """The first call's future, None when unseen; raises IdempotencyConflictError on a different payload.

        A first call that failed without an answer (cancelled, or an error such as its
        deadline passing in the queue) changed nothing: it is forgotten here, and the retry
        is scored as new. A compacted answer comes back in a new, already completed future.
        """
        self._expire(self._clock())
        entry = self._entries.get(transaction_id)
        if entry is None:
            return None
        if isinstance(entry, _Live):
            f = entry.future
            if f.done() and (f.cancelled() or f.exception() is not None):
                del self._entries[transaction_id]
                return None
            if entry.fingerprint != fingerprint:
                raise IdempotencyConflictError()
            return f
        if entry[0] != fingerprint:
            raise IdempotencyConflictError()
        answered: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        answered.set_result(self._unpack(entry[2]))
        return answered

    def register(self, transaction_id: str, fingerprint: int, future: asyncio.Future[T], *,
                 pending: object = None) -> None:
        """Remember a new call's future, and optionally what it waits in (see `pending`)."""
        self._compact(COMPACT_PER_REGISTER)
        live = _Live(transaction_id, fingerprint, future, self._clock() + self._ttl_s, pending)
        self._entries[transaction_id] = live
        self._recent.append(live)
        self._ordered(transaction_id, live.expires_at)

    def pending(self, transaction_id: str) -> object:
        """What `register` was given as `pending` for a call still waiting for its answer, else None."""
        entry = self._entries.get(transaction_id)
        if isinstance(entry, _Live) and not entry.future.done():
            return entry.pending
        return None

    def forget(self, transaction_id: str, future: asyncio.Future[T]) -> None:
        """Drop the entry if it still belongs to `future` (the call failed without scoring)."""
        entry = self._entries.get(transaction_id)
        if isinstance(entry, _Live) and entry.future is future:
            del self._entries[transaction_id]

    async def completed(self, *, chunk: int = CAPTURE_CHUNK, share: float = 1.0) -> Remembered[P]:
        """Every unexpired entry whose call has its answer, packed, captured at the moment of the call.

        Everything completed when it is called is included; an entry completed while the
        copy is being read may be too. Calls still in flight, failed or cancelled are left
        out (they have no answer). The keys and entries are copied at once (C-speed copies,
        in the same order), then read `chunk` at a time, yielding to the event loop in between:
        with a `share` below 1, for long enough that reading takes that share of the loop's time
        (a snapshot's listing of 200,000 entries: ~50 ms of the loop's time either way, spread
        over ~0.3 s at a quarter).
        """
        ids, entries = list(self._entries), list(self._entries.values())
        now = self._clock()
        to_epoch = self._wall_clock() - now
        out: Remembered[P] = Remembered.empty()
        out_ids, fingerprints, expiry, answers = out.transaction_ids, out.fingerprints, out.expires_at_epoch_s, out.answers
        pacer = Pacer(share)
        for start in range(0, len(entries), chunk):
            if start:
                await asyncio.sleep(pacer.pause_s())
            for transaction_id, e in zip(ids[start:start + chunk], entries[start:start + chunk], strict=True):
                if isinstance(e, _Live):
                    f = e.future
                    if e.expires_at <= now or not f.done() or f.cancelled() or f.exception() is not None:
                        continue
                    fingerprint, expires_at, packed = e.fingerprint, e.expires_at, self._pack(f.result())
                else:
                    fingerprint, expires_at, packed = e
                    if expires_at <= now:
                        continue
                out_ids.append(transaction_id)
                fingerprints.append(fingerprint)
                expiry.append(expires_at + to_epoch)
                answers.append(packed)
        return out

    def restore(self, records: Remembered[P]) -> int:
        """Put saved (packed) answers back, before any call is taken; returns how many were kept.

        Expired records are dropped, and beyond `max_entries` the ones expiring first. They
        go in compacted, as `completed` gave them: no future, nothing the GC tracks.
        """
        if self._entries:
            raise RuntimeError("restore() runs once, into an empty cache, before the server takes calls")
        now, wall_now = self._clock(), self._wall_clock()
        expiry = records.expires_at_epoch_s
        live = sorted((i for i in range(len(records)) if expiry[i] > wall_now), key=expiry.__getitem__)
        for i in live[-self._max_entries:]:
            txn_id = records.transaction_ids[i]
            # Never beyond one TTL from now, whatever the file says (a wall clock set back, a hand-made file).
            expires_at = now + min(expiry[i] - wall_now, self._ttl_s)
            self._entries[txn_id] = (records.fingerprints[i], expires_at, records.answers[i])
            self._ordered(txn_id, expires_at)
        return len(self._entries)
