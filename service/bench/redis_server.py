"""Debian's `redis-server`, started on a loopback port by the tests and `fraudscore bench store`
(never a system service).

`make test` and `make bench` install the package where it is missing (the Makefile's
`redis-server` target); nothing fakes a Redis: every test that claims shared-state behaviour
talks to one of these.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import redis

from service.bench.serve import _free_port as free_port


class RedisServer:
    """One standalone redis-server process: no persistence, bound to 127.0.0.1."""

    def __init__(self, workdir: Path, *, password: str | None = None, port: int | None = None,
                 extra: tuple[str, ...] = ()) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("this needs Debian's redis-server: `make test` and `make bench` install it "
                               "(apt-get install redis-server, as root)")
        self.binary = binary
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.password = password
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, socket_timeout=5)

    def start(self) -> RedisServer:
        """Start (again, on the same port, after `stop`); returns once it answers PING."""
        log = open(self.workdir / "redis.log", "ab")  # noqa: SIM115  # the process's own, closed with it
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir), "--protected-mode", "yes",
             *(["--requirepass", self.password] if self.password else []), *self.extra],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 10
        while True:
            try:
                if self.client().ping():
                    return self
            except redis.ConnectionError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start: {(self.workdir / 'redis.log').read_text()[-2000:]}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


def _admin(node: RedisServer) -> Any:
    """A client for commands redis-py leaves untyped (CLUSTER …)."""
    return node.client()


def _cluster_port() -> int:
    """A free loopback port whose cluster bus port (port + 10000) is free too."""
    for _ in range(200):
        port = random.randrange(20_000, 30_000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10_000))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a Redis Cluster node in 20000–40000")


class RedisCluster:
    """A Redis Cluster of `masters` redis-server processes (no replicas) on loopback ports, made
    with `redis-cli --cluster create`, as the issue asks; each node a RedisServer to stop and start."""

    def __init__(self, workdir: Path, *, masters: int = 3) -> None:
        self.nodes = [RedisServer(workdir / f"node{k}", port=_cluster_port(),
                                  extra=("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                                         "--cluster-node-timeout", "15000"))
                      for k in range(masters)]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)

    def start(self) -> RedisCluster:
        try:
            return self._start()
        except BaseException:
            self.stop()  # no node left running behind a failed start
            raise

    def _start(self) -> RedisCluster:
        for node in self.nodes:
            node.start()
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RuntimeError("this needs Debian's redis-tools (redis-cli), installed with redis-server")
        made = subprocess.run([cli, "--cluster", "create", *(f"127.0.0.1:{node.port}" for node in self.nodes),
                               "--cluster-replicas", "0", "--cluster-yes"], capture_output=True, text=True, timeout=60)
        if made.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {made.stdout[-2000:]}{made.stderr[-2000:]}")
        self.wait_ok()
        return self

    def wait_ok(self, timeout_s: float = 30.0) -> None:
        """Until every node reports cluster_state:ok and knows every node's slots."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if all(_admin(node).execute_command("CLUSTER INFO").get("cluster_state") == "ok"
                       for node in self.nodes):
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the Redis Cluster did not reach cluster_state:ok")
            time.sleep(0.05)

    def node_of(self, key: bytes) -> RedisServer:
        """The node serving `key`'s slot now."""
        admin = _admin(self.nodes[0])
        slot = admin.execute_command("CLUSTER KEYSLOT", key)
        for first, last, master, *_ in admin.execute_command("CLUSTER SLOTS"):
            if first <= slot <= last:
                return next(node for node in self.nodes if node.port == int(master[1]))
        raise RuntimeError(f"slot {slot} is not served")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


class RedisSentinelSet:
    """A master, one replica of it and one Sentinel watching them (quorum 1), on loopback ports:
    enough to fail over by `SENTINEL FAILOVER` and see a store follow the new master."""

    MASTER_NAME = "fraudscore"

    def __init__(self, workdir: Path) -> None:
        self.master = RedisServer(workdir / "master")
        self.replica = RedisServer(workdir / "replica", extra=("--replicaof", "127.0.0.1", str(self.master.port)))
        self.workdir = workdir / "sentinel"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.port}/{self.MASTER_NAME}/0"

    def sentinel(self) -> Any:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def master_port(self) -> int:
        host_port = self.sentinel().execute_command("SENTINEL GET-MASTER-ADDR-BY-NAME", self.MASTER_NAME)
        return int(host_port[1])

    def start(self) -> RedisSentinelSet:
        try:
            self.master.start()
            self.replica.start()
            conf = self.workdir / "sentinel.conf"  # Sentinel rewrites its own file: one of its own
            conf.write_text(f"port {self.port}\nbind 127.0.0.1\ndir {self.workdir}\n"
                            f"sentinel monitor {self.MASTER_NAME} 127.0.0.1 {self.master.port} 1\n"
                            f"sentinel down-after-milliseconds {self.MASTER_NAME} 1000\n"
                            f"sentinel failover-timeout {self.MASTER_NAME} 5000\n")
            log = open(self.workdir / "sentinel.log", "ab")  # noqa: SIM115  # the process's own
            self.proc = subprocess.Popen([self.master.binary, str(conf), "--sentinel"], stdout=log,
                                         stderr=subprocess.STDOUT)
            log.close()
            deadline = time.monotonic() + 20
            while True:  # until it answers and has found the replica (needed to fail over)
                try:
                    replicas = self.sentinel().execute_command("SENTINEL REPLICAS", self.MASTER_NAME)
                    if replicas and self.replica.client().info("replication").get("master_link_status") == "up":
                        return self
                except redis.RedisError:
                    pass
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis sentinel did not start: {(self.workdir / 'sentinel.log').read_text()[-2000:]}")
                time.sleep(0.05)
        except BaseException:
            self.stop()
            raise

    def fail_over(self, timeout_s: float = 20.0) -> None:
        """Promote the replica (SENTINEL FAILOVER); returns once Sentinel names it master."""
        self.sentinel().execute_command("SENTINEL FAILOVER", self.MASTER_NAME)
        deadline = time.monotonic() + timeout_s
        while self.master_port() != self.replica.port:
            if time.monotonic() > deadline:
                raise RuntimeError("Sentinel did not promote the replica")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.replica.stop()
        self.master.stop()
