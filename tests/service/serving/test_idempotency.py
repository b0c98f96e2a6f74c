from __future__ import annotations

import asyncio
import gc
import random
import struct
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xxhash
from fraudscore.v1 import fraudscore_pb2 as pb

from core.errors import IdempotencyConflictError
from core.files import Pacer
from service.serving.idempotency import IdempotencyCache, Remembered
from service.serving.idempotency_store import (
    ENCODE_CHUNK,
    FORMAT_VERSION,
    MAGIC,
    RECORDS_FILE,
    SavedRecords,
    load_records,
    save_records,
)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_lookup_register_conflict_expiry_and_bound() -> None:
    loop = asyncio.get_running_loop()
    clock = Clock()
    cache: IdempotencyCache[int, int] = IdempotencyCache(ttl_s=10.0, max_entries=2, clock=clock)
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


async def test_a_first_call_that_failed_is_forgotten_and_its_retry_scored_as_new() -> None:
    loop = asyncio.get_running_loop()
    cache: IdempotencyCache[int, int] = IdempotencyCache(ttl_s=10.0, max_entries=10)
    cancelled, failed, answered = loop.create_future(), loop.create_future(), loop.create_future()
    for key, future in (("c", cancelled), ("f", failed), ("a", answered)):
        cache.register(key, 1, future, pending=f"item-{key}")
    assert cache.pending("a") == "item-a"  # still waiting: a retry can find (and extend) it
    cancelled.cancel()
    failed.set_exception(RuntimeError("deadline passed in the queue"))
    answered.set_result(7)
    assert cache.pending("a") is None  # answered: nothing is waiting any more
    assert cache.lookup("c", 1) is None and cache.lookup("f", 1) is None
    assert cache.lookup("a", 1) is answered
    assert len(cache) == 1


async def test_forget_only_removes_the_owner() -> None:
    loop = asyncio.get_running_loop()
    cache: IdempotencyCache[int, int] = IdempotencyCache(ttl_s=10.0, max_entries=10)
    first, second = loop.create_future(), loop.create_future()
    cache.register("a", 1, first)
    cache.forget("a", second)
    assert cache.lookup("a", 1) is first
    cache.forget("a", first)
    assert cache.lookup("a", 1) is None


# --- Answered entries compacted out of the garbage collector's sight -----------------------

def score_cache(*, ttl_s: float = 100.0, max_entries: int = 100_000,
                clock: Clock | None = None) -> IdempotencyCache[pb.ScoreResponse, bytes]:
    return IdempotencyCache(ttl_s=ttl_s, max_entries=max_entries, clock=clock or Clock(),
                            pack=pb.ScoreResponse.SerializeToString, unpack=pb.ScoreResponse.FromString)


def tracked_objects() -> int:
    gc.collect()  # tuples of atomic values are untracked at the first collection that meets them
    return len(gc.get_objects())


async def test_answered_entries_leave_almost_nothing_for_the_gc_to_track() -> None:
    loop = asyncio.get_running_loop()
    cache = score_cache()
    before = tracked_objects()
    for start in range(0, 10_000, 100):  # as ScoreBatch does: register a batch, then answer it
        futures = [loop.create_future() for _ in range(100)]
        for i, future in enumerate(futures, start):
            cache.register(f"t{i}", i, future, pending=[future])  # (a list: tracked, like a batcher Item)
        for i, future in enumerate(futures, start):
            future.set_result(answer(f"t{i}"))
    del futures, future
    grown = tracked_objects() - before
    # Before compaction: an entry, a future, a message and an item for each of 10,000 answers.
    # Now only the last batch, whose answers came after the last `register`, is still held live.
    assert len(cache) == 10_000 and grown < 1_000, grown
    retry = cache.lookup("t42", 42)
    assert retry is not None and retry.result() == answer("t42")
    with pytest.raises(IdempotencyConflictError):
        cache.lookup("t42", 43)

    saved = await cache.completed()
    del cache, retry
    restored = score_cache()
    before = tracked_objects()
    assert restored.restore(saved) == 10_000
    assert tracked_objects() - before < 100  # restored entries go in compacted: no future, no message


async def test_a_compacted_answer_is_returned_equal_and_nothing_waits_on_it() -> None:
    loop = asyncio.get_running_loop()
    cache = score_cache()
    first: asyncio.Future[pb.ScoreResponse] = loop.create_future()
    cache.register("a", 1, first, pending="item-a")
    first.set_result(answer("a"))
    cache.register("b", 2, loop.create_future())  # compacts "a"
    retry = cache.lookup("a", 1)
    assert retry is not None and retry is not first and retry.done() and retry.result() == answer("a")
    assert cache.pending("a") is None
    cache.forget("a", first)  # only an entry still waiting on `first` is dropped: none is
    assert cache.lookup("a", 1) is not None
    with pytest.raises(IdempotencyConflictError):
        cache.lookup("a", 2)


async def test_compaction_drops_failed_calls_and_waits_behind_one_in_flight() -> None:
    loop = asyncio.get_running_loop()
    cache = score_cache()
    slow, failed, quick = loop.create_future(), loop.create_future(), loop.create_future()
    cache.register("failed", 1, failed)
    cache.register("slow", 2, slow)
    cache.register("quick", 3, quick)
    failed.set_exception(RuntimeError("deadline passed in the queue"))
    quick.set_result(answer("quick"))
    cache.register("next", 4, loop.create_future())
    assert len(cache) == 3  # the failed call was dropped without waiting for a lookup
    assert cache.lookup("quick", 3) is quick  # behind a call in flight: not compacted yet
    slow.set_result(answer("slow"))
    for i in range(5):
        cache.register(f"more-{i}", 5, loop.create_future())
    quick_again, slow_again = cache.lookup("quick", 3), cache.lookup("slow", 2)
    assert quick_again is not quick and quick_again is not None and quick_again.result() == answer("quick")
    assert slow_again is not slow and slow_again is not None and slow_again.result() == answer("slow")


async def test_expiry_and_the_bound_hold_for_compacted_entries() -> None:
    loop = asyncio.get_running_loop()
    clock = Clock()
    cache = score_cache(ttl_s=10.0, max_entries=3, clock=clock)
    for i in range(4):
        clock.now = float(i)
        future: asyncio.Future[pb.ScoreResponse] = loop.create_future()
        future.set_result(answer(f"t{i}"))
        cache.register(f"t{i}", i, future)  # each compacts the ones before
    assert len(cache) == 3 and cache.evicted == 1 and cache.lookup("t0", 0) is None
    clock.now = 11.5  # t1 expired at 11, t2 expires at 12
    assert cache.lookup("t1", 1) is None and cache.lookup("t2", 2) is not None and len(cache) == 2
    future = loop.create_future()
    cache.register("t2", 2, future)  # replaced: its first expiry (at 12) no longer applies
    clock.now = 12.5
    assert cache.lookup("t2", 2) is future and len(cache) == 2
    clock.now = 21.5
    assert cache.lookup("t2", 2) is None and len(cache) == 0  # t3 expired at 13


@pytest.mark.parametrize("seed", range(4))
async def test_random_calls_behave_like_a_plain_ordered_dict(seed: int) -> None:
    """Lookups, registrations, answers and forgets at random, against the plainest model of the
    contract: entries in registration order, expired after the TTL, the oldest evicted first.
    More entries than an expiry-order chunk, answers compacted or not, retries of forgotten ones."""
    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    clock = Clock()
    cache: IdempotencyCache[int, int] = IdempotencyCache(ttl_s=40.0, max_entries=300, clock=clock)
    model: OrderedDict[str, asyncio.Future[int]] = OrderedDict()
    expiry: dict[str, float] = {}
    in_flight: list[asyncio.Future[int]] = []
    evicted = 0
    for _ in range(4000):
        clock.now += rng.uniform(0.001, 0.05)  # strictly increasing: every expiry distinct
        for key in [k for k in model if expiry[k] <= clock.now]:
            del model[key]
        key, op = f"t{rng.randrange(700)}", rng.random()
        if op < 0.6:  # as the server does: look up, register when unseen
            got = cache.lookup(key, 1)
            first = model.get(key)
            if first is None:
                assert got is None
                future: asyncio.Future[int] = loop.create_future()
                cache.register(key, 1, future)
                model[key], expiry[key] = future, clock.now + 40.0
                in_flight.append(future)
                if len(model) > 300:
                    model.popitem(last=False)
                    evicted += 1
            else:  # the first call's own future, or a completed one with an equal answer
                assert got is first or (first.done() and got is not None and got.result() == first.result())
            assert len(cache) == len(model) and cache.evicted == evicted
        elif op < 0.9 and in_flight:
            answered = in_flight.pop(rng.randrange(len(in_flight)))
            if not answered.cancelled():
                answered.set_result(rng.randrange(1000))
        elif (first := model.get(key)) is not None and not first.done():  # failed: forgotten, then cancelled
            cache.forget(key, first)
            del model[key]
            first.cancel()


# --- Persistence across a restart (service/serving/idempotency_store.py) ---------------------------

class Clocks:
    """A monotonic and a wall clock, set independently: a restart resets the first, not the second."""

    def __init__(self, monotonic: float, wall: float) -> None:
        self.monotonic = monotonic
        self.wall = wall

    def cache(self, *, ttl_s: float = 100.0, max_entries: int = 100) -> IdempotencyCache[pb.ScoreResponse, bytes]:
        """A cache of Score answers, kept serialized as the server keeps them (service/runtime/app.py)."""
        return IdempotencyCache(ttl_s=ttl_s, max_entries=max_entries, pack=pb.ScoreResponse.SerializeToString,
                                unpack=pb.ScoreResponse.FromString, clock=lambda: self.monotonic,
                                wall_clock=lambda: self.wall)

    def outcomes(self, *, ttl_s: float = 100.0) -> IdempotencyCache[bool, bool]:
        return IdempotencyCache(ttl_s=ttl_s, max_entries=100, clock=lambda: self.monotonic,
                                wall_clock=lambda: self.wall)


def answer(txn_id: str, probability: float = 0.25) -> pb.ScoreResponse:
    return pb.ScoreResponse(transaction_id=txn_id, fraud_probability=probability, risk_score=250,
                            decision=pb.REVIEW, source=pb.MODEL, model_version="gbm-test",
                            reasons=[pb.Reason(code="CARD_VELOCITY_1H", description="velocity", weight=0.5)])


def packed(txn_id: str) -> bytes:
    return answer(txn_id).SerializeToString()


def done(value: Any) -> asyncio.Future[Any]:
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    future.set_result(value)
    return future


async def save_and_load(tmp_path: Path, answers: IdempotencyCache[pb.ScoreResponse, bytes],
                        outcomes: IdempotencyCache[bool, bool]) -> SavedRecords:
    path = tmp_path / RECORDS_FILE
    save_records(path, answers=await answers.completed(), outcomes=await outcomes.completed())
    return load_records(path)


async def test_round_trip_keeps_completed_answers_and_outcomes_only(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    clocks = Clocks(monotonic=50.0, wall=1_000_000.0)
    answers, outcomes = clocks.cache(), clocks.outcomes()
    answers.register("t-done", 11, done(answer("t-done")))
    answers.register("t-ünïcode", 2**64 - 1, done(answer("t-ünïcode", 0.75)))
    answers.register("t-in-flight", 12, loop.create_future())
    failed: asyncio.Future[Any] = loop.create_future()
    failed.set_exception(RuntimeError("boom"))
    answers.register("t-failed", 13, failed)
    cancelled: asyncio.Future[Any] = loop.create_future()
    cancelled.cancel()
    answers.register("t-cancelled", 14, cancelled)
    outcomes.register("t-fraud", 0, done(True))
    outcomes.register("t-legit", 0, done(False))
    outcomes.register("t-applying", 0, loop.create_future())

    saved = await save_and_load(tmp_path, answers, outcomes)
    assert saved.answers.transaction_ids == ["t-done", "t-ünïcode"]
    assert saved.answers.fingerprints == [11, 2**64 - 1]
    assert [pb.ScoreResponse.FromString(a) for a in saved.answers.answers] == [answer("t-done"),
                                                                               answer("t-ünïcode", 0.75)]
    assert saved.outcomes.transaction_ids == ["t-fraud", "t-legit"] and saved.outcomes.answers == [True, False]
    assert saved.answers.expires_at_epoch_s == saved.outcomes.expires_at_epoch_s[:2] == [1_000_100.0] * 2
    assert failed.exception() is not None  # (retrieved: no "exception was never retrieved" warning)

    restarted = Clocks(monotonic=7.0, wall=1_000_001.0)
    answers2, outcomes2 = restarted.cache(), restarted.outcomes()
    assert answers2.restore(saved.answers) == 2 and outcomes2.restore(saved.outcomes) == 2
    first = answers2.lookup("t-done", 11)
    assert first is not None and first.result() == answer("t-done")
    unicode = answers2.lookup("t-ünïcode", 2**64 - 1)
    assert unicode is not None and unicode.result() == answer("t-ünïcode", 0.75)
    with pytest.raises(IdempotencyConflictError):
        answers2.lookup("t-done", 99)
    assert answers2.lookup("t-in-flight", 12) is None  # it had no answer: a retry scores it
    fraud, legit = outcomes2.lookup("t-fraud", 0), outcomes2.lookup("t-legit", 0)
    assert fraud is not None and fraud.result() is True
    assert legit is not None and legit.result() is False


async def test_the_ttl_runs_on_across_save_and_load(tmp_path: Path) -> None:
    clocks = Clocks(monotonic=1_000.0, wall=5_000.0)
    answers, outcomes = clocks.cache(ttl_s=10.0), clocks.outcomes(ttl_s=10.0)
    answers.register("early", 1, done(answer("early")))      # expires at wall 5_010
    clocks.monotonic, clocks.wall = 1_004.0, 5_004.0
    answers.register("late", 2, done(answer("late")))        # expires at wall 5_014
    saved = await save_and_load(tmp_path, answers, outcomes)
    assert saved.answers.expires_at_epoch_s == [5_010.0, 5_014.0]

    # The host restarted: its monotonic clock starts over; 8 s of wall time passed.
    restarted = Clocks(monotonic=3.0, wall=5_012.0)
    cache = restarted.cache(ttl_s=10.0)
    assert cache.restore(saved.answers) == 1  # "early" expired while the server was down
    assert cache.lookup("early", 1) is None
    restarted.monotonic = 4.9
    assert cache.lookup("late", 2) is not None  # 2 s were left of its 10 s
    restarted.monotonic = 5.0
    assert cache.lookup("late", 2) is None and len(cache) == 0


async def test_restore_never_keeps_an_entry_longer_than_one_ttl() -> None:
    clocks = Clocks(monotonic=0.0, wall=100.0)
    cache = clocks.cache(ttl_s=10.0)
    cache.restore(Remembered(["far"], [1], [1e12], [packed("far")]))  # a wall clock set back, a hand-made file
    clocks.monotonic = 10.0
    assert cache.lookup("far", 1) is None


async def test_restore_respects_the_bound_keeping_the_latest(tmp_path: Path) -> None:
    clocks = Clocks(monotonic=0.0, wall=0.0)
    order = (4, 0, 3, 1, 2)
    records = Remembered([f"t{i}" for i in order], list(order), [100.0 + i for i in order],
                         [packed(f"t{i}") for i in order])
    cache = clocks.cache(max_entries=3)
    assert cache.restore(records) == 3
    assert [k for k in ("t0", "t1", "t2", "t3", "t4") if cache.lookup(k, int(k[1:])) is not None] == ["t2", "t3", "t4"]
    assert cache.evicted == 0
    cache.register("t5", 5, done(answer("t5")))  # the bound still holds, oldest first
    assert cache.lookup("t2", 2) is None and cache.lookup("t5", 5) is not None and cache.evicted == 1


async def test_restore_only_into_an_empty_cache() -> None:
    cache = Clocks(0.0, 0.0).cache()
    cache.register("a", 1, done(answer("a")))
    with pytest.raises(RuntimeError, match="empty cache"):
        cache.restore(Remembered(["b"], [2], [50.0], [packed("b")]))


async def test_completed_reads_in_chunks_and_sees_every_entry() -> None:
    clocks = Clocks(0.0, 0.0)
    cache = clocks.cache(max_entries=1000)
    for i in range(25):
        cache.register(f"t{i}", i, done(answer(f"t{i}")))
    got = await cache.completed(chunk=4)
    assert got.transaction_ids == [f"t{i}" for i in range(25)] and got.fingerprints == list(range(25))


async def test_a_paced_read_gives_the_loop_time_between_chunks_and_sees_the_same() -> None:
    clocks = Clocks(0.0, 0.0)
    cache = clocks.cache(max_entries=1000)
    for i in range(40):
        cache.register(f"t{i}", i, done(answer(f"t{i}")))
    turns = 0

    async def other_work() -> None:  # what the loop does while a snapshot lists the records
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    other = asyncio.get_running_loop().create_task(other_work())
    try:
        paced = await cache.completed(chunk=4, share=0.01)
    finally:
        other.cancel()
    assert paced == await cache.completed(chunk=4)
    assert turns >= 9  # at least one turn of other work between each two of the 10 chunks
    with pytest.raises(ValueError, match=r"share of the time is in \(0, 1\], got 0"):
        await cache.completed(share=0)


@pytest.mark.parametrize("n", [0, 1, ENCODE_CHUNK, 2 * ENCODE_CHUNK + 3])
def test_a_paced_records_file_is_the_same_file_written_in_slices(tmp_path: Path, n: int) -> None:
    rng = random.Random(n)
    answers = Remembered([f"t{i}" + "é" * (i % 3) for i in range(n)], [rng.getrandbits(64) for _ in range(n)],
                         [1e9 + rng.random() for _ in range(n)],
                         [answer(f"t{i}", rng.random()).SerializeToString() for i in range(n)])
    outcomes = Remembered([f"o{i}" for i in range(n)], list(range(n)), [2e9] * n, [i % 2 == 0 for i in range(n)])
    save_records(tmp_path / "plain", answers=answers, outcomes=outcomes)
    slept: list[float] = []
    ticks = iter(range(10**9))
    pacer = Pacer(0.5, clock=lambda: float(next(ticks)), sleep=slept.append)
    save_records(tmp_path / "paced", answers=answers, outcomes=outcomes, pacer=pacer)
    assert (tmp_path / "paced").read_bytes() == (tmp_path / "plain").read_bytes()
    assert load_records(tmp_path / "paced") == SavedRecords(answers, outcomes)
    # A pause after each slice of records encoded and each chunk of the file written, none long.
    assert len(slept) >= 2 * -(-n // ENCODE_CHUNK) + 1 and all(0 < s <= 1 for s in slept)


async def test_forgotten_entries_do_not_pile_up(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    cache = Clocks(0.0, 0.0).cache(max_entries=10)
    for i in range(5000):
        future: asyncio.Future[Any] = loop.create_future()
        cache.register(f"t{i}", i, future)
        cache.forget(f"t{i}", future)
    cache.register("kept", 1, done(answer("kept")))
    assert len(cache) == 1 and cache.evicted == 0
    assert (await cache.completed()).transaction_ids == ["kept"]


async def _valid_file(tmp_path: Path) -> Path:
    clocks = Clocks(0.0, 1_000.0)
    answers, outcomes = clocks.cache(), clocks.outcomes()
    for i in range(3):
        answers.register(f"secret-txn-{i}", i, done(answer(f"secret-txn-{i}")))
    outcomes.register("secret-txn-0", 0, done(True))
    path = tmp_path / RECORDS_FILE
    save_records(path, answers=await answers.completed(), outcomes=await outcomes.completed())
    return path


def _refused(path: Path, match: str | None = None) -> str:
    with pytest.raises(ValueError, match=match) as err:
        load_records(path)
    reason = str(err.value)
    assert "secret-txn" not in reason  # reasons are logged: never an identifier
    return reason


async def test_truncated_files_are_refused_at_every_length(tmp_path: Path) -> None:
    path = await _valid_file(tmp_path)
    data = path.read_bytes()
    cut = tmp_path / "cut.bin"
    for n in range(len(data)):
        cut.write_bytes(data[:n])
        _refused(cut, "truncated|magic")
    cut.write_bytes(data + b"\x00")
    _refused(cut, "padded")


async def test_a_damaged_byte_anywhere_is_refused(tmp_path: Path) -> None:
    path = await _valid_file(tmp_path)
    data = path.read_bytes()
    bad = tmp_path / "bad.bin"
    for i in range(len(data)):
        flipped = bytearray(data)
        flipped[i] ^= 0x10
        bad.write_bytes(bytes(flipped))
        _refused(bad)


async def test_other_versions_and_other_files_are_refused(tmp_path: Path) -> None:
    path = await _valid_file(tmp_path)
    data = bytearray(path.read_bytes())
    data[8:12] = struct.pack("<I", FORMAT_VERSION + 1)
    path.write_bytes(bytes(data))
    assert "format version 2" in _refused(path, "version")
    path.write_bytes(np.random.default_rng(3).bytes(4096))
    _refused(path, "magic")
    path.write_bytes(b"")
    _refused(path, "truncated")
    _refused(tmp_path / "missing.bin", "cannot read")


async def test_a_checksummed_file_with_inconsistent_sections_is_refused(tmp_path: Path) -> None:
    # Well-formed header and checksum around a payload that lies: still refused, no crash.
    for payload in (b"", b"\x00" * 40, struct.pack("<16sQQQ", b"answers", 2**40, 0, 0),
                    struct.pack("<16sQQQ", b"outcomes", 0, 0, 0) * 2):
        path = tmp_path / RECORDS_FILE
        path.write_bytes(struct.pack("<8sIIQQ", MAGIC, FORMAT_VERSION, 2, len(payload),
                                     xxhash.xxh64_intdigest(payload)) + payload)
        _refused(path)


async def test_saving_replaces_the_file_atomically(tmp_path: Path) -> None:
    path = await _valid_file(tmp_path)
    save_records(path, answers=Remembered.empty(), outcomes=Remembered.empty())
    assert load_records(path) == SavedRecords(Remembered.empty(), Remembered.empty())
    assert sorted(p.name for p in tmp_path.iterdir()) == [RECORDS_FILE]  # no temporary file left behind


def test_columns_of_different_lengths_are_refused() -> None:
    with pytest.raises(ValueError, match="every column"):
        Remembered(["a", "b"], [1], [1.0, 2.0], [True, False])
