"""Open-loop load from processes of its own, measured on the caller's clock.

The generator must not share the server's process or event loop, and one Python process
cannot offer several thousand calls a second and keep its schedule, so calls are sent by
`Generators`: worker processes started once (spawned, so no gRPC state crosses a fork),
each sending its share of a rate on a fixed schedule from a common start instant and
timing every call from its *intended* send time (a server that falls behind shows its
queue, it cannot hide it: no coordinated omission). A low-rate probe runs in a process of
its own beside the bulk load, so what a well-behaved caller sees under overload is
measured apart from the flood. Requests are serialized before the run and sent as bytes:
the generators spend their CPU on calls, not on building messages.

Every call is one row of `Calls`: intended send time (CLOCK_MONOTONIC, shared by every
process on the machine), latency, outcome. Windows of rows give the latency over time
(recovery after an overload), the share within the budget, and goodput.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
import multiprocessing
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import numpy as np
from fraudscore.v1 import fraudscore_pb2 as pb

from service.bench.loadgen import BUDGET_US, check_loopback

SCORE = "/fraudscore.v1.FraudScoring/Score"
R = TypeVar("R")
# Outcomes of a call, as `Calls.status` holds them. CANCELLED: the server cancelled the call (gRPC
# does that to calls it had to drop from its queue of calls no handler had taken yet).
OK, DEGRADED, REFUSED, DEADLINE, FAILED, CANCELLED = range(6)
_STATUS = {grpc.StatusCode.RESOURCE_EXHAUSTED: REFUSED, grpc.StatusCode.DEADLINE_EXCEEDED: DEADLINE,
           grpc.StatusCode.CANCELLED: CANCELLED}


@dataclass(frozen=True, slots=True)
class Calls:
    """One row per call: its intended send time (monotonic s), latency (µs, to its answer or error)
    and outcome (OK, DEGRADED, REFUSED, DEADLINE, FAILED, CANCELLED), and how late the generator sent it."""

    sent_at: np.ndarray     # float64
    latency_us: np.ndarray  # int64
    status: np.ndarray      # int8
    lag_us: np.ndarray      # int64

    @classmethod
    def merge(cls, parts: Sequence[Calls]) -> Calls:
        if not parts:
            return cls(np.empty(0), np.empty(0, np.int64), np.empty(0, np.int8), np.empty(0, np.int64))
        order = np.argsort(np.concatenate([p.sent_at for p in parts]), kind="stable")
        return cls(*(np.concatenate([getattr(p, name) for p in parts])[order]
                     for name in ("sent_at", "latency_us", "status", "lag_us")))

    def __len__(self) -> int:
        return int(self.sent_at.shape[0])

    def between(self, start: float, stop: float) -> Calls:
        """The calls intended to be sent in [start, stop)."""
        rows = (self.sent_at >= start) & (self.sent_at < stop)
        return Calls(self.sent_at[rows], self.latency_us[rows], self.status[rows], self.lag_us[rows])

    @property
    def answered(self) -> np.ndarray:
        answered: np.ndarray = (self.status == OK) | (self.status == DEGRADED)
        return answered

    def count(self, *statuses: int) -> int:
        return int(np.isin(self.status, statuses).sum())

    def _latency(self, from_send: bool) -> np.ndarray:
        # From the intended send time (the caller's clock), or with `from_send` from the moment the
        # generator actually sent: what the server and the network took, less the generator's lag.
        latency: np.ndarray = self.latency_us - self.lag_us if from_send else self.latency_us
        return latency

    def percentile_ms(self, p: float, *, statuses: tuple[int, ...] = (OK, DEGRADED), from_send: bool = False) -> float:
        """The p-th percentile of the latency of calls with these outcomes (NaN when none)."""
        rows = np.isin(self.status, statuses)
        return float(np.percentile(self._latency(from_send)[rows], p)) / 1000.0 if rows.any() else float("nan")

    def within(self, limit_us: int = BUDGET_US, *, from_send: bool = False) -> float:
        """The share of answered calls answered within `limit_us` of their send time (NaN when none)."""
        answered = self.answered
        return float((self._latency(from_send)[answered] <= limit_us).mean()) if answered.any() else float("nan")

    def good_share(self, limit_us: int = BUDGET_US) -> float:
        """The share of all calls answered by the model path (not degraded) within `limit_us` (NaN when none)."""
        return float(((self.status == OK) & (self.latency_us <= limit_us)).mean()) if len(self) else float("nan")

    def goodput(self, duration_s: float, limit_us: int = BUDGET_US, *, model_only: bool = False) -> float:
        """Answers within `limit_us` per second (with `model_only`, not degraded ones)."""
        good = (self.status == OK) if model_only else self.answered
        return float((good & (self.latency_us <= limit_us)).sum()) / duration_s

    def windows_with(self, *statuses: int, start: float, stop: float, window_s: float) -> float:
        """The share of the windows of `window_s` in [start, stop) holding a call with one of these
        outcomes: a host's stall shows in a window or two, a server in a bad state in most of them."""
        n = max(math.ceil((stop - start) / window_s - 1e-9), 1)
        rows = np.isin(self.status, statuses) & (self.sent_at >= start) & (self.sent_at < stop)
        hit = np.unique(((self.sent_at[rows] - start) // window_s).astype(np.int64))
        return float(len(hit)) / n

    def p99_by_window(self, start: float, stop: float, window_s: float) -> list[float]:
        """The p99 of answered calls per window of `window_s` from `start` (ms; NaN for an empty window)."""
        out = []
        t = start
        while t < stop - 1e-9:
            out.append(self.between(t, t + window_s).percentile_ms(99))
            t += window_s
        return out


def score_requests(txns: Sequence[pb.Transaction]) -> list[bytes]:
    """Serialized ScoreRequests, built before a run."""
    return [pb.ScoreRequest(transaction=t).SerializeToString() for t in txns]


def schedule(start_at: float, phases: Sequence[tuple[float, float]]) -> np.ndarray:
    """Intended send times (monotonic s) of an open loop from `start_at`: per phase (rate per s,
    seconds), evenly spaced calls; the phases follow each other without a gap."""
    times = []
    t = start_at
    for rate, seconds in phases:
        n = round(rate * seconds)
        times.append(t + np.arange(n) / rate)
        t += seconds
    return np.concatenate(times) if times else np.empty(0)


def _in_worker(run: Callable[..., Coroutine[Any, Any, R]], *args: Any) -> R:
    """Worker process: one run (`_send`, `_batches`, `_streams`) on uvloop, without the garbage
    collector (a collection pause would read as server latency; the worker's life is one run)."""
    import uvloop

    gc.disable()
    try:
        return uvloop.run(run(*args))
    finally:
        gc.enable()


async def _send(target: str, requests: list[bytes], sent_at: np.ndarray, timeout_s: float) -> Calls:
    """Send `requests[k]` at monotonic time `sent_at[k]`; one row per call."""
    n = len(requests)
    latency = np.zeros(n, dtype=np.int64)
    status = np.full(n, FAILED, dtype=np.int8)
    lag = np.zeros(n, dtype=np.int64)
    parse = pb.ScoreResponse.FromString
    async with grpc.aio.insecure_channel(target) as channel:
        score = channel.unary_unary(SCORE, request_serializer=None, response_deserializer=parse)
        await channel.channel_ready()

        async def one(k: int, request: bytes, intended: float) -> None:
            try:
                reply = await score(request, timeout=timeout_s)
                status[k] = DEGRADED if reply.degraded else OK
            except grpc.aio.AioRpcError as exc:
                status[k] = _STATUS.get(exc.code(), FAILED)
            latency[k] = int((time.monotonic() - intended) * 1e6)

        tasks = set()
        schedule = sent_at.tolist()
        for k, request in enumerate(requests):
            intended = schedule[k]
            delay = intended - time.monotonic()
            if delay > 0.0005:
                await asyncio.sleep(delay)
            lag[k] = max(0, int((time.monotonic() - intended) * 1e6))
            task = asyncio.ensure_future(one(k, request, intended))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)
    return Calls(sent_at, latency, status, lag)


class Generators:
    """`processes` worker processes for bulk load and one for a probe, started once and reused."""

    def __init__(self, processes: int = 2) -> None:
        self.processes = processes
        ctx = multiprocessing.get_context("spawn")
        self._bulk = ProcessPoolExecutor(processes, mp_context=ctx)
        self._probe = ProcessPoolExecutor(1, mp_context=ctx)
        # Start the workers now (a spawned interpreter takes a second to import gRPC and numpy).
        for f in [self._bulk.submit(_ready) for _ in range(processes)] + [self._probe.submit(_ready)]:
            f.result()

    def __enter__(self) -> Generators:
        return self

    def __exit__(self, *exc: object) -> None:
        self._bulk.shutdown(cancel_futures=True)
        self._probe.shutdown(cancel_futures=True)

    def run(self, target: str, requests: Sequence[bytes], phases: Sequence[tuple[float, float]], *,
            probe: Sequence[bytes] = (), probe_rate_per_s: float = 100.0, timeout_s: float = 1.0,
            lead_s: float = 0.5, probe_target: str | None = None) -> tuple[Calls, Calls, float]:
        """Send the bulk `requests` on the schedule of `phases` ((rate per s, seconds) each, one after
        the other), split over the bulk processes, and the `probe` requests at `probe_rate_per_s`
        from the same start, `lead_s` from now, to `probe_target` (default: `target`; another
        server there makes the probe a control run at the same moments). Returns the bulk's calls,
        the probe's, and the start instant. Needs as many requests as the phases send (raises
        ValueError otherwise)."""
        check_loopback(target)
        probe_target = probe_target or target
        check_loopback(probe_target)
        start_at = time.monotonic() + lead_s
        times = schedule(start_at, phases)
        if len(requests) < len(times):
            raise ValueError(f"the phases send {len(times)} calls, {len(requests)} requests given")
        total_s = sum(seconds for _, seconds in phases)
        bulk: list[Future[Calls]] = [
            # Process k sends every processes-th call of the one schedule.
            self._bulk.submit(_in_worker, _send, target, list(requests[k:len(times):self.processes]),
                              times[k::self.processes], timeout_s)
            for k in range(self.processes)]
        probed = None
        if probe:
            probe_times = schedule(start_at, [(probe_rate_per_s, total_s)])
            probed = self._probe.submit(_in_worker, _send, probe_target, list(probe[:len(probe_times)]), probe_times[:len(probe)],
                                        timeout_s)
        calls = Calls.merge([f.result() for f in bulk])
        return calls, (probed.result() if probed is not None else Calls.merge([])), start_at

    def batches(self, target: str, requests: Sequence[bytes], *, size: int, in_flight: int, seconds: float,
                lead_s: float = 0.5, connections: int = 1) -> Throughput:
        """ScoreBatch requests (of `size` transactions), `in_flight` per bulk process, for `seconds`;
        each process over `connections` connections of its own (several workers on one port are
        handed connections, not calls)."""
        check_loopback(target)
        start_at = time.monotonic() + lead_s
        return Throughput.merge([f.result() for f in [
            self._bulk.submit(_in_worker, _batches, target, list(requests[k::self.processes]), size, in_flight, start_at,
                              seconds, connections) for k in range(self.processes)]])

    def streams(self, target: str, streams: Sequence[list[bytes]], *, in_flight: int,
                lead_s: float = 0.5) -> Throughput:
        """One ScoreStream per message list, spread over the bulk processes, each keeping at most
        `in_flight` messages unanswered."""
        check_loopback(target)
        start_at = time.monotonic() + lead_s
        return Throughput.merge([f.result() for f in [
            self._bulk.submit(_in_worker, _streams, target, list(streams[k::self.processes]), in_flight, start_at)
            for k in range(self.processes)]])


def _ready() -> bool:
    return True


@contextlib.contextmanager
def server_cpu(pid: int) -> Iterator[list[float]]:
    """CPU seconds (user + system) `pid` used inside the block: the list's one item, set on leaving."""
    import os

    def cpu_s() -> float:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    used = [0.0]
    before = cpu_s()
    try:
        yield used
    finally:
        used[0] = cpu_s() - before


SCORE_BATCH = "/fraudscore.v1.FraudScoring/ScoreBatch"
SCORE_STREAM = "/fraudscore.v1.FraudScoring/ScoreStream"


@dataclass(frozen=True, slots=True)
class Throughput:
    """What a closed-loop throughput run saw: transactions answered, degraded answers, calls refused
    or failed, the seconds it ran and each call's latency (µs; a stream's: each message's)."""

    answered: int
    degraded: int
    errors: int
    seconds: float
    latency_us: np.ndarray

    @classmethod
    def merge(cls, parts: Sequence[Throughput]) -> Throughput:
        return cls(sum(p.answered for p in parts), sum(p.degraded for p in parts), sum(p.errors for p in parts),
                   max((p.seconds for p in parts), default=0.0),
                   np.concatenate([p.latency_us for p in parts]) if parts else np.empty(0, np.int64))

    @property
    def per_s(self) -> float:
        return self.answered / self.seconds if self.seconds else 0.0

    def percentile_ms(self, p: float) -> float:
        return float(np.percentile(self.latency_us, p)) / 1000.0 if self.latency_us.size else float("nan")


async def _batches(target: str, requests: list[bytes], size: int, in_flight: int, start_at: float,
                   seconds: float, connections: int = 1) -> Throughput:
    """ScoreBatch requests of `size` transactions, `in_flight` at a time over `connections`
    connections (a subchannel pool of each channel's own), for `seconds`."""
    answered = degraded = errors = 0
    latencies: list[int] = []
    queue = iter(requests)
    options = [("grpc.use_local_subchannel_pool", 1)] if connections > 1 else []
    channels = [grpc.aio.insecure_channel(target, options=options) for _ in range(connections)]
    try:
        calls = [channel.unary_unary(SCORE_BATCH, request_serializer=None,
                                     response_deserializer=pb.ScoreBatchResponse.FromString) for channel in channels]
        for channel in channels:
            await channel.channel_ready()
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        end = start_at + seconds

        async def worker(call: Any) -> None:
            nonlocal answered, degraded, errors
            for request in queue:
                if time.monotonic() >= end:
                    return
                sent = time.monotonic()
                try:
                    reply = await call(request, timeout=30)
                except grpc.aio.AioRpcError:
                    errors += 1
                    continue
                latencies.append(int((time.monotonic() - sent) * 1e6))
                answered += len(reply.results)
                degraded += sum(1 for r in reply.results if r.degraded)

        await asyncio.gather(*(worker(calls[k % connections]) for k in range(in_flight)))
        took = time.monotonic() - start_at
    finally:
        for channel in channels:
            await channel.close()
    return Throughput(answered, degraded, errors, took, np.array(latencies, dtype=np.int64))


async def _streams(target: str, streams: list[list[bytes]], in_flight: int, start_at: float) -> Throughput:
    """One ScoreStream per list of messages, all at once, each keeping at most `in_flight` messages
    unanswered; latency per message from its send to its answer."""
    answered = degraded = errors = 0
    latencies: list[int] = []
    async with grpc.aio.insecure_channel(target) as channel:
        await channel.channel_ready()
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))

        async def one(messages: list[bytes]) -> None:
            nonlocal answered, degraded, errors
            call = channel.stream_stream(SCORE_STREAM, request_serializer=None,
                                         response_deserializer=pb.ScoreResponse.FromString)(timeout=300)
            window = asyncio.Semaphore(in_flight)
            sent_at: list[float] = []

            async def write() -> None:
                for message in messages:
                    await window.acquire()
                    sent_at.append(time.monotonic())
                    await call.write(message)
                await call.done_writing()

            writer = asyncio.ensure_future(write())
            try:
                k = 0
                async for reply in call:
                    latencies.append(int((time.monotonic() - sent_at[k]) * 1e6))
                    k += 1
                    answered += 1
                    degraded += reply.degraded
                    window.release()
            except grpc.aio.AioRpcError:
                errors += 1  # refused or ended by the server: the writer's failure says nothing more
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError, grpc.aio.UsageError):
                await writer

        await asyncio.gather(*(one(m) for m in streams))
        took = time.monotonic() - start_at
    return Throughput(answered, degraded, errors, took, np.array(latencies, dtype=np.int64))


def batch_requests(txns: Sequence[pb.Transaction], size: int) -> list[bytes]:
    """Serialized ScoreBatchRequests of `size` transactions each."""
    return [pb.ScoreBatchRequest(transactions=txns[k:k + size]).SerializeToString()
            for k in range(0, len(txns) - size + 1, size)]
