"""Shared fixtures: a small trained model (once per session) and real server processes."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from core.history.simulate import simulate
from core.history.table import History
from service.bench.redis_server import RedisCluster, RedisServer

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def small_history() -> History:
    """Ten simulated days of a small world: enough fraud of every pattern to train on."""
    return simulate(num_days=10, num_cards=800, num_merchants=150, seed=11)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory, small_history: History) -> Path:
    from core.offline.train import train

    out = tmp_path_factory.mktemp("model")
    train(small_history, out, num_boost_round=60, early_stopping_rounds=20, progress=False)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProcess:
    proc: subprocess.Popen[bytes]
    port: int
    metrics_port: int
    log_path: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(timeout=timeout)


def start_server(tmp: Path, *, model_dir: Path | None, state_dir: Path | None = None,
                 extra_env: dict[str, str] | None = None, timeout_s: float = 120.0,
                 credentials: grpc.ChannelCredentials | None = None) -> ServerProcess:
    """Start `fraudscore serve` as a real process and wait until health says SERVING
    (asked over TLS with `credentials` when given, for a server whose port serves TLS)."""
    port, metrics_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRAUDSCORE_")}
    env.update({
        "FRAUDSCORE_CARD_CAPACITY": "4096",
        "FRAUDSCORE_ENTITY_CAPACITY": "4096",
        "FRAUDSCORE_SHUTDOWN_GRACE_S": "5",
        # A generous budget: a loaded 2-core CI machine must not turn answers into fallbacks.
        # Tests of the budget itself set their own.
        "FRAUDSCORE_BUDGET_MS": "5000",
        **(extra_env or {}),
    })
    args = [sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--metrics-port", str(metrics_port),
            "--model", str(model_dir if model_dir is not None else tmp / "no-model"),
            "--state-dir", str(state_dir if state_dir is not None else tmp / "state")]
    log_path = tmp / f"server-{port}.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    server = ServerProcess(proc, port, metrics_port, log_path)
    deadline = time.monotonic() + timeout_s
    channel = (grpc.insecure_channel(server.target) if credentials is None
               else grpc.secure_channel(server.target, credentials))
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log()}")
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return server
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    server.stop()
    raise TimeoutError(f"server did not report SERVING within {timeout_s}s:\n{server.log()}")


@contextlib.contextmanager
def bare_server() -> Iterator[str]:
    """The bare grpc.aio server of `fraudscore bench serve` (a constant answer), as a control; its target."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "service.bench.loadgen", "bare", "--port", str(port)], cwd=REPO)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[ServerProcess]:
    """One real server with the test model, shared by a test module."""
    tmp = tmp_path_factory.mktemp("server")
    srv = start_server(tmp, model_dir=model_dir)
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A standalone redis-server for the session (service/bench/redis_server.py); tests keep to
    namespaces of their own."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """A 3-master Redis Cluster for the session (redis-cli --cluster create); tests keep to
    namespaces of their own, and one that moves slots or restarts a node leaves it serving."""
    cluster = RedisCluster(tmp_path_factory.mktemp("redis-cluster")).start()
    try:
        yield cluster
    finally:
        cluster.stop()
