"""`fraudscore bench serve`: the real service against a bare gRPC server, same port, same machine.

Both servers run in their own process; this process is the client. On a 2-core machine
client and server share the CPU, so absolute numbers are low; the ratios are the point.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc
from fraudscore.v1 import fraudscore_pb2 as pb
from fraudscore.v1 import fraudscore_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.bench.loadgen import BUDGET_US, closed_loop, open_loop, transactions

CONCURRENCY = 32


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _wait_serving(target: str, proc: subprocess.Popen[bytes], *, health: bool, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as channel:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}")
            try:
                if not health:
                    grpc.channel_ready_future(channel).result(timeout=1)
                    return
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except (grpc.RpcError, grpc.FutureTimeoutError):
                pass
            time.sleep(0.1)
    raise TimeoutError(f"server on {target} not ready after {timeout_s}s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


async def _batch_throughput(target: str, size: int, duration_s: float) -> float:
    async def one(stub: pb_grpc.FraudScoringStub, _: object) -> int:
        txns = transactions(f"b{time.time_ns()}", size)
        reply = await stub.ScoreBatch(pb.ScoreBatchRequest(transactions=txns), timeout=30)
        return len(reply.results)
    return await closed_loop(target, 2, duration_s, call=one)


async def _stream_throughput(target: str, streams: int, per_stream: int) -> float:
    """Transactions per second over `streams` concurrent ScoreStreams of `per_stream` messages each."""
    async def one(k: int) -> int:
        txns = transactions(f"s{k}-{time.time_ns()}", per_stream)
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.FraudScoringStub(channel)
            answers = 0
            requests = (pb.ScoreRequest(transaction=t) for t in txns)
            async for _ in stub.ScoreStream(iter(requests), timeout=300):
                answers += 1
            return answers

    start = time.perf_counter()
    answered = await asyncio.gather(*(one(k) for k in range(streams)))
    return sum(answered) / (time.perf_counter() - start)


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the server's /metrics, keyed by (name, sorted labels)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def _server_side(before: dict[tuple[str, tuple[tuple[str, str], ...]], float],
                 after: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> str:
    """What the server itself saw between two scrapes: Score calls by code, fallbacks by reason,
    and the share of answered Score calls inside the budget by its own clock."""
    def delta(name: str, **labels: str) -> float:
        """Change of `name`, summed over every series carrying these labels (e.g. all codes)."""
        def total(seen: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> float:
            wanted = labels.items()
            return sum(v for (n, ls), v in seen.items() if n == name and wanted <= dict(ls).items())
        return total(after) - total(before)

    codes = {dict(labels)["code"]: after[(name, labels)] - before.get((name, labels), 0.0)
             for (name, labels) in after if name == "fraudscore_requests_total" and ("method", "Score") in labels}
    codes = {code: n for code, n in codes.items() if n}
    fallbacks = {dict(labels)["reason"]: after[(name, labels)] - before.get((name, labels), 0.0)
                 for (name, labels) in after if name == "fraudscore_fallbacks_total"}
    fallbacks = {reason: n for reason, n in fallbacks.items() if n}
    within = delta("fraudscore_request_duration_seconds_bucket", method="Score", le="0.05")
    total = delta("fraudscore_request_duration_seconds_count", method="Score")
    return (f"server saw {int(total)} Score calls: {({c: int(n) for c, n in codes.items()})}, "
            f"{100 * within / total if total else 0:.1f}% within 50 ms by its clock, "
            f"fallbacks {({r: int(n) for r, n in fallbacks.items()}) or 0}")


def bench_serve(model_dir: Path, *, seconds: float = 5.0) -> list[str]:
    """Run the comparison; returns the table's lines."""
    port = _free_port()
    target = f"127.0.0.1:{port}"
    bare = subprocess.Popen([sys.executable, "-m", "service.bench.loadgen", "bare", "--port", str(port)])
    try:
        _wait_serving(target, bare, health=False)
        asyncio.run(closed_loop(target, CONCURRENCY, 1.0))  # warm the connection and both sides
        bare_peak = asyncio.run(closed_loop(target, CONCURRENCY, seconds))
    finally:
        _stop(bare)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRAUDSCORE_")} | {"FRAUDSCORE_LOG_LEVEL": "ERROR"}
    with tempfile.TemporaryDirectory() as state_dir:
        metrics_port = _free_port()
        real = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--model", str(model_dir),
                                 "--port", str(port), "--metrics-port", str(metrics_port), "--state-dir", state_dir],
                                env=env)
        try:
            _wait_serving(target, real, health=True)
            asyncio.run(closed_loop(target, CONCURRENCY, 1.0))
            real_peak = asyncio.run(closed_loop(target, CONCURRENCY, seconds))
            half = asyncio.run(open_loop(target, 0.5 * bare_peak, 2 * seconds))
            # Half of this server's own peak: a healthy server there must answer nothing degraded.
            half_real = asyncio.run(open_loop(target, 0.5 * real_peak, 2 * seconds))
            rss_before, seen_before = _rss_mib(real.pid), _scrape(metrics_port)
            over = asyncio.run(open_loop(target, 3 * real_peak, 4 * seconds))
            rss_after, server_view = _rss_mib(real.pid), _server_side(seen_before, _scrape(metrics_port))
            batch_tps = asyncio.run(_batch_throughput(target, 256, seconds))
            stream_tps = asyncio.run(_stream_throughput(target, 8, 500))
        finally:
            _stop(real)
    overload_calls = over.answered + sum(over.errors.values())
    return [
        f"serve: bare gRPC vs the real service, {CONCURRENCY} calls in flight, one process each, loopback",
        f"  peak Score throughput   bare {bare_peak:8.0f}/s   real {real_peak:8.0f}/s   "
        f"ratio {real_peak / bare_peak:.2f}  (goal ≥ 0.80)",
        f"  at 50% of bare peak ({0.5 * bare_peak:.0f}/s, open loop): p50 {half.percentile_ms(50):.2f} ms  "
        f"p99 {half.percentile_ms(99):.2f} ms  p99.9 {half.percentile_ms(99.9):.2f} ms  "
        f"(goal p99 ≤ 10, p99.9 ≤ 25); errors {dict(half.errors) or 0}, degraded {half.degraded}",
        f"  at 50% of real peak ({0.5 * real_peak:.0f}/s, open loop): p99 {half_real.percentile_ms(99):.2f} ms, "
        f"degraded {half_real.degraded} of {half_real.answered} answered "
        f"({100 * half_real.degraded / max(half_real.answered, 1):.2f} %, must be 0); "
        f"errors {dict(half_real.errors) or 0}",
        f"  at 3× real peak ({3 * real_peak:.0f}/s offered, {over.duration_s:.0f} s): {overload_calls} calls, "
        f"answered {over.answered}, within 50 ms {100 * over.within(BUDGET_US):.1f}% of answered, "
        f"degraded {over.degraded}, refused {dict(over.errors) or 0}; server RSS {rss_before:.0f} → {rss_after:.0f} MiB",
        f"    client sending lag p50 {over.send_lag_us.get_value_at_percentile(50) / 1000:.1f} ms, "
        f"p99 {over.send_lag_us.get_value_at_percentile(99) / 1000:.1f} ms (large: the client, sharing the "
        f"cores, could not keep the schedule); {server_view}",
        f"  ScoreBatch of 256: {batch_tps:,.0f} transactions/s (goal ≥ 100,000)   "
        f"ScoreStream ×8: {stream_tps:,.0f} transactions/s (goal ≥ 50,000)",
    ]
