"""Load generation against a FraudScoring server on this machine, and a bare baseline server.

Open loop: requests are sent on a fixed schedule whatever the server does, and each
latency is measured from the request's *intended* send time, so a server that falls
behind shows its queueing instead of hiding it (coordinated omission). Closed loop
(N calls always in flight) finds peak throughput. Targets must be loopback addresses.

    python -m service.bench.loadgen bare --port 50070     # the baseline: Score returns a constant
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import ipaddress
import itertools
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
from fraudscore.v1 import fraudscore_pb2 as pb
from fraudscore.v1 import fraudscore_pb2_grpc as pb_grpc
from hdrh.histogram import HdrHistogram

BUDGET_US = 50_000
_run_ids = itertools.count()


def check_loopback(target: str) -> None:
    """Refuse any target that is not this machine: load is only ever sent to loopback."""
    host = target.rsplit(":", 1)[0].strip("[]")
    if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"load targets must be loopback addresses (127.0.0.0/8, ::1, localhost), got {host!r}")


POOL_DAYS, POOL_CARDS, POOL_MERCHANTS, POOL_SEED = 30, 20_000, 2_000, 5
WEEK_MS = 7 * 86_400_000


@dataclass(frozen=True, slots=True)
class Label:
    """The simulator's truth about one payment handed out by `SimulatedTraffic`."""

    is_fraud: bool
    # The traffic position (`SimulatedTraffic.next`) from which its fraud report is due, and the
    # report's time on the traffic's clock; -1 for a legitimate payment.
    report_due_at: int
    reported_time_ms: int


class SimulatedTraffic:
    """Payments from the built-in simulator (core.history.simulate: normal spending plus its four fraud
    patterns), its clock shifted by whole weeks to end in the week before it was built; handed out
    in order, so event times advance as they would in production. Past its end it starts again
    with new cards (ids prefixed by lap). The default is a simulated month (~790,000 payments,
    1 % fraud); `fraud_scale` multiplies the fraud (core.history.simulate).

    Load must look like the traffic the model was trained for: synthetic calls that all
    share a timestamp, an IP or a handful of merchants look like an attack to the model,
    and a run would measure the cost of explaining declines instead of the common path.
    Shared by `fraudscore bench serve` and the locust file (loadtest/locustfile.py).
    """

    def __init__(self, *, num_days: int = POOL_DAYS, num_cards: int = POOL_CARDS,
                 num_merchants: int = POOL_MERCHANTS, seed: int = POOL_SEED, fraud_scale: float = 1.0) -> None:
        from core.history.simulate import simulate

        h = simulate(num_days=num_days, num_cards=num_cards, num_merchants=num_merchants, seed=seed,
                     fraud_scale=fraud_scale)
        # Whole weeks, so hour of day and day of week stay as simulated (an arbitrary shift moves the
        # daily rhythm: with the default model, 5.4 % instead of 3.5 % of a first day's legitimate
        # payments land in REVIEW or DECLINE). The last event falls within the week before now.
        shift = (int(time.time() * 1000) - int(h.event_time_ms[-1])) // WEEK_MS * WEEK_MS
        self.columns: dict[str, list[Any]] = {
            name: getattr(h, name).tolist() for name in (
                "card_id", "customer_id", "merchant_id", "merchant_category", "amount_minor", "currency",
                "channel", "country", "latitude", "longitude", "device_id", "ip_address")}
        self.columns["event_time_ms"] = (h.event_time_ms + shift).tolist()
        reported = h.fraud_reported_time_ms
        fraud = (h.is_fraud != 0) & (reported >= 0)
        # A report is due once the replay reaches its time (a month's last reports: in the next lap).
        self._is_fraud: list[bool] = fraud.tolist()
        self._report_due: list[int] = np.where(fraud, np.searchsorted(h.event_time_ms, reported), -1).tolist()
        self._reported_ms: list[int] = np.where(fraud, reported + shift, -1).tolist()
        self.size = len(h)
        self.next = 0

    def take(self, prefix: str, n: int) -> list[pb.Transaction]:
        """The next `n` payments, with transaction ids `prefix-k`."""
        return self._take(prefix, n, None)

    def take_labelled(self, prefix: str, n: int) -> tuple[list[pb.Transaction], list[Label]]:
        """The next `n` payments and what the simulator knows about each (fraud, and when reported)."""
        labels: list[Label] = []
        return self._take(prefix, n, labels), labels

    def _take(self, prefix: str, n: int, labels: list[Label] | None) -> list[pb.Transaction]:
        c = self.columns
        out = []
        for k in range(self.next, self.next + n):
            lap, i = divmod(k, self.size)
            card = c["card_id"][i] if lap == 0 else f"lap{lap}-{c['card_id'][i]}"
            txn = pb.Transaction(
                transaction_id=f"{prefix}-{k}", card_id=card, customer_id=c["customer_id"][i],
                merchant_id=c["merchant_id"][i], merchant_category=c["merchant_category"][i],
                amount_minor=c["amount_minor"][i], currency=c["currency"][i], event_time_ms=c["event_time_ms"][i],
                channel=c["channel"][i], country=c["country"][i], device_id=c["device_id"][i],
                ip_address=c["ip_address"][i])
            lat, lon = c["latitude"][i], c["longitude"][i]
            if lat == lat and lon == lon:  # not NaN
                txn.latitude, txn.longitude = lat, lon
            out.append(txn)
            if labels is not None:
                fraud = self._is_fraud[i]
                labels.append(Label(fraud, lap * self.size + self._report_due[i] if fraud else -1,
                                    self._reported_ms[i]))
        self.next += n
        return out


_pool: SimulatedTraffic | None = None


def transactions(prefix: str, n: int) -> list[pb.Transaction]:
    """The next `n` payments of the simulated month (see `SimulatedTraffic`), with ids `prefix-k`.

    Built ahead of a run so the client spends its CPU on calls; then moved out of the
    garbage collector's sight (gc.freeze), whose full passes over a few hundred thousand
    messages would otherwise stall the client for tens of milliseconds at a time.
    """
    global _pool
    if _pool is None:
        _pool = SimulatedTraffic()
    out = _pool.take(prefix, n)
    gc.freeze()
    return out


@dataclass
class Result:
    """What one load run saw. Latencies in µs, from the intended send time (open loop)."""

    duration_s: float
    answered: int = 0
    degraded: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    latency_us: HdrHistogram = field(default_factory=lambda: HdrHistogram(1, 60_000_000, 3))
    # How late the client itself sent calls against the schedule: when this grows, the
    # client, not the server, was the bottleneck, and latencies include its backlog.
    send_lag_us: HdrHistogram = field(default_factory=lambda: HdrHistogram(1, 60_000_000, 3))

    @property
    def throughput(self) -> float:
        return self.answered / self.duration_s

    def percentile_ms(self, p: float) -> float:
        return float(self.latency_us.get_value_at_percentile(p)) / 1000.0

    def within(self, limit_us: int) -> float:
        """Share of answered calls answered within `limit_us`."""
        h = self.latency_us
        below = sum(item.count_at_value_iterated_to for item in h.get_recorded_iterator()
                    if item.value_iterated_to <= limit_us)
        return below / h.get_total_count() if h.get_total_count() else 0.0


async def _score(stub: pb_grpc.FraudScoringStub, txn: pb.Transaction, started: float, timeout_s: float,
                 result: Result) -> None:
    try:
        reply = await stub.Score(pb.ScoreRequest(transaction=txn), timeout=timeout_s)
    except grpc.aio.AioRpcError as exc:
        result.errors[exc.code().name] += 1
        return
    result.answered += 1
    result.degraded += reply.degraded
    result.latency_us.record_value(max(1, int((time.perf_counter() - started) * 1e6)))


@contextlib.contextmanager
def _few_collections() -> Iterator[None]:
    """The measuring client must not pause either: its own full garbage collections (over
    the calls in flight and the histogram) showed up as 100 ms server 'latency'."""
    before = gc.get_threshold()
    gc.set_threshold(50_000, 50, 1000)
    try:
        yield
    finally:
        gc.set_threshold(*before)


async def open_loop(target: str, rate_per_s: float, duration_s: float, *, timeout_s: float = 1.0) -> Result:
    """Send Score at a fixed rate for `duration_s`; latency counts from each intended send time."""
    check_loopback(target)
    n = int(rate_per_s * duration_s)
    txns = transactions(f"ol{next(_run_ids)}-{time.time_ns()}", n)
    result = Result(duration_s=duration_s)
    with _few_collections():
        await _send_open_loop(target, txns, rate_per_s, timeout_s, result)
    return result


async def _send_open_loop(target: str, txns: list[pb.Transaction], rate_per_s: float, timeout_s: float,
                          result: Result) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.FraudScoringStub(channel)
        await channel.channel_ready()
        start = time.perf_counter()
        tasks = set()
        for i, txn in enumerate(txns):
            intended = start + i / rate_per_s
            delay = intended - time.perf_counter()
            if delay > 0.001:
                await asyncio.sleep(delay)
            result.send_lag_us.record_value(max(1, int((time.perf_counter() - intended) * 1e6)))
            task = asyncio.ensure_future(_score(stub, txn, intended, timeout_s, result))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)


async def closed_loop(target: str, concurrency: int, duration_s: float,
                      call: Callable[[pb_grpc.FraudScoringStub, Iterator[pb.Transaction]], Any] | None = None) -> float:
    """Transactions per second with `concurrency` callers each waiting for its answer before the next
    (calls refused for overload are not counted and are not errors here)."""
    check_loopback(target)
    pool = itertools.cycle(transactions(f"cl{next(_run_ids)}-{time.time_ns()}", 20_000))
    counter = itertools.count(1)

    async def one_score(stub: pb_grpc.FraudScoringStub, txns: Iterator[pb.Transaction]) -> int:
        txn = pb.Transaction()
        txn.CopyFrom(next(txns))
        txn.transaction_id = f"{txn.transaction_id}-{next(counter)}"
        try:
            await stub.Score(pb.ScoreRequest(transaction=txn), timeout=10)
        except grpc.aio.AioRpcError as exc:
            # Refused when the callers outnumber the server's call slots: only answers count.
            if exc.code() not in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED):
                raise
            await asyncio.sleep(0.001)
            return 0
        return 1

    run = call or one_score
    with _few_collections():
        return await _run_closed_loop(target, concurrency, duration_s, run, pool)


async def _run_closed_loop(target: str, concurrency: int, duration_s: float,
                           run: Callable[[pb_grpc.FraudScoringStub, Iterator[pb.Transaction]], Any],
                           pool: Iterator[pb.Transaction]) -> float:
    done = 0
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.FraudScoringStub(channel)
        await channel.channel_ready()
        end = time.perf_counter() + duration_s

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < end:
                n = await run(stub, pool)  # not `done += await …`: that reads `done` before awaiting
                done += n

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return done / (time.perf_counter() - start)


class _BareScoring(pb_grpc.FraudScoringServicer):
    """The baseline: the same API and message sizes, no work."""

    def __init__(self) -> None:
        self._reply = pb.ScoreResponse(fraud_probability=0.01, risk_score=10, decision=pb.APPROVE, source=pb.MODEL,
                                       model_version="bare", ruleset_version="bare", feature_set_version="bare")

    def _answer(self, txn: pb.Transaction) -> pb.ScoreResponse:
        reply = pb.ScoreResponse()
        reply.CopyFrom(self._reply)
        reply.transaction_id = txn.transaction_id
        return reply

    async def Score(self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext) -> pb.ScoreResponse:
        return self._answer(request.transaction)

    async def ScoreBatch(self, request: pb.ScoreBatchRequest,
                         context: grpc.aio.ServicerContext) -> pb.ScoreBatchResponse:
        return pb.ScoreBatchResponse(results=[self._answer(txn) for txn in request.transactions])

    async def ScoreStream(self, request_iterator: AsyncIterator[pb.ScoreRequest],
                          context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ScoreResponse]:
        async for request in request_iterator:
            yield self._answer(request.transaction)


async def serve_bare(host: str, port: int) -> None:
    server = grpc.aio.server()
    # ReportOutcome keeps the generated servicer's UNIMPLEMENTED answer.
    pb_grpc.add_FraudScoringServicer_to_server(_BareScoring(), server)  # type: ignore[abstract]
    server.add_insecure_port(f"{host}:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)


def main(argv: list[str] | None = None) -> int:
    import uvloop

    p = argparse.ArgumentParser(prog="python -m service.bench.loadgen")
    sub = p.add_subparsers(dest="command", required=True)
    bare = sub.add_parser("bare", help="serve the constant-answer baseline")
    bare.add_argument("--host", default="127.0.0.1")
    bare.add_argument("--port", type=int, required=True)
    args = p.parse_args(argv)
    check_loopback(f"{args.host}:{args.port}")
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(serve_bare(args.host, args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
