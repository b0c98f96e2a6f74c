"""FRAUDSCORE_WORKERS: several serving processes on one port under a supervisor, sharing state through a
real redis-server; the pod's metrics summed at the supervisor's endpoint; signals and a dying worker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from fraudscore.v1 import fraudscore_pb2 as pb
from fraudscore.v1 import fraudscore_pb2_grpc as pb_grpc
from prometheus_client.parser import text_string_to_metric_families

from service.bench.redis_server import RedisServer
from tests.conftest import REPO, ServerProcess, start_server
from tests.e2e.helpers import scrape, txn, value


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()


def started(srv: ServerProcess) -> dict[str, object]:
    for line in srv.log().splitlines():
        if '"workers started"' in line:
            entry: dict[str, object] = json.loads(line)
            return entry
    raise AssertionError(f"no 'workers started' line:\n{srv.log()}")


def worker_requests(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "fraudscore_requests_total" and s.labels.get("method") == "Score")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_two_workers_share_the_port_and_the_pod_metrics_are_their_sums(tmp_path: Path, model_dir: Path,
                                                                        redis: RedisServer) -> None:
    srv = start_server(tmp_path, model_dir=model_dir,
                       extra_env={"FRAUDSCORE_STATE_URL": redis.url, "FRAUDSCORE_WORKERS": "2"})
    try:
        info = started(srv)
        deadline = time.monotonic() + 60
        while srv.log().count('"msg":"serving"') < 2:  # both bound: a worker binds the port once warm
            assert time.monotonic() < deadline, srv.log()
            time.sleep(0.1)
        answers = []
        for _ in range(30):  # a connection each: the kernel spreads connections, not calls
            with grpc.insecure_channel(srv.target) as ch:
                answers.append(pb_grpc.FraudScoringStub(ch).Score(pb.ScoreRequest(transaction=txn()), timeout=10))
        per_worker = [worker_requests(port) for port in info["metrics_ports"]]  # type: ignore[attr-defined]
        pod = scrape(srv)
        pids = info["pids"]
        srv.proc.send_signal(signal.SIGTERM)
        code = srv.proc.wait(timeout=60)
    finally:
        srv.stop()
    assert all(not a.degraded for a in answers)
    assert value(pod, "fraudscore_requests_total", method="Score", code="OK") == 30 == sum(per_worker)
    assert all(n > 0 for n in per_worker), f"calls per worker {per_worker}: one worker served everything"
    assert value(pod, "fraudscore_workers") == 2 and value(pod, "fraudscore_worker_scrape_failures_total") == 0
    assert value(pod, "fraudscore_model_loaded") == 1  # a flag, not summed
    assert code == 0 and not any(alive(pid) for pid in pids)  # type: ignore[attr-defined]
    assert srv.log().count('"msg":"serving"') == 2 and '"codes":[0,0]' in srv.log()


def test_a_worker_that_dies_takes_the_pod_down(tmp_path: Path, model_dir: Path, redis: RedisServer) -> None:
    srv = start_server(tmp_path, model_dir=model_dir,
                       extra_env={"FRAUDSCORE_STATE_URL": redis.url, "FRAUDSCORE_WORKERS": "2"})
    try:
        first, second = started(srv)["pids"]  # type: ignore[misc]
        os.kill(first, signal.SIGKILL)
        code = srv.proc.wait(timeout=60)
    finally:
        srv.stop()
    assert code == 1 and not alive(second)
    assert "a worker exited on its own" in srv.log()


def test_workers_without_a_shared_store_are_refused(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRAUDSCORE_")} | {"FRAUDSCORE_WORKERS": "2"}
    out = subprocess.run([sys.executable, "-m", "service.cli", "serve", "--port", "50099"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "FRAUDSCORE_WORKERS=2 needs FRAUDSCORE_STATE_URL" in out.stderr
