"""The load generator and the bare baseline server it measures against."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from service.bench.loadgen import Result, check_loopback, closed_loop, open_loop
from tests.conftest import REPO, free_port


@pytest.mark.parametrize("target", ["10.0.0.1:50051", "192.168.1.5:1", "8.8.8.8:53", "[2001:db8::1]:80"])
def test_only_loopback_targets_are_accepted(target: str) -> None:
    with pytest.raises(ValueError, match="loopback"):
        check_loopback(target)


@pytest.mark.parametrize("target", ["127.0.0.1:50051", "127.8.9.10:1", "localhost:50051", "[::1]:50051"])
def test_loopback_targets_pass(target: str) -> None:
    check_loopback(target)


def test_result_shares_and_percentiles() -> None:
    r = Result(duration_s=2.0)
    for us in (1_000, 2_000, 60_000, 80_000):
        r.answered += 1
        r.latency_us.record_value(us)
    assert r.throughput == 2.0
    assert r.within(50_000) == 0.5
    assert 59.0 <= r.percentile_ms(75) <= 61.0


@pytest.fixture
def bare_server(tmp_path: Path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "service.bench.loadgen", "bare", "--port", str(port)], cwd=REPO)
    yield f"127.0.0.1:{port}"
    proc.terminate()
    assert proc.wait(timeout=10) == 0


async def test_open_and_closed_loop_against_the_bare_server(bare_server: str) -> None:
    import grpc

    async with grpc.aio.insecure_channel(bare_server) as channel:
        await channel.channel_ready()
    result = await open_loop(bare_server, 200, 1.0, timeout_s=5.0)
    assert result.answered == 200 and not result.errors
    assert 0 < result.percentile_ms(50) < 1000
    assert await closed_loop(bare_server, 4, 0.5) > 10
