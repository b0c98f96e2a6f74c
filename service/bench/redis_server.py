"""Debian's `redis-server`, started on a loopback port by the tests and `fraudscore bench store`
(never a system service).

`make test` and `make bench` install the package where it is missing (the Makefile's
`redis-server` target); nothing fakes a Redis: every test that claims shared-state behaviour
talks to one of these.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import redis

from service.bench.serve import _free_port as free_port


class RedisServer:
    """One standalone redis-server process: no persistence, bound to 127.0.0.1."""

    def __init__(self, workdir: Path, *, password: str | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("this needs Debian's redis-server: `make test` and `make bench` install it "
                               "(apt-get install redis-server, as root)")
        self.binary = binary
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.password = password
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
             *(["--requirepass", self.password] if self.password else [])],
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
