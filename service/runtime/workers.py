"""FRAUDSCORE_WORKERS=N: N serving processes on one port, under one supervisor.

The supervisor starts N `fraudscore serve --worker K` processes with the same settings, except
each its own loopback metrics port and state directory (its idempotency records); they bind
the gRPC and health ports together (SO_REUSEPORT: the kernel spreads new connections over
them) and share entity state through `FRAUDSCORE_STATE_URL`, which is why N > 1 needs it.

The supervisor serves the pod's metrics on `FRAUDSCORE_METRICS_PORT`: at each scrape it scrapes
every worker and adds their samples up series by series (counters, histograms and most gauges
are sums; versions, timestamps and "last" values the largest), so dashboards and alerts read
one pod as before. prometheus-client's multiprocess mode was the alternative; it cannot carry
the callback collectors the server uses (state tables, array histograms), so not it.

Signals: SIGTERM and SIGINT are passed on to every worker, which drain as one server does, and
the supervisor exits when they have (0 if every worker did); SIGHUP is passed on (reloads). A
worker that exits on its own takes the others down and the supervisor exits 1: the pod
restarts whole, rather than serving on fewer workers unnoticed.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from service.runtime.config import Settings

log = logging.getLogger("fraudscore.workers")

SCRAPE_TIMEOUT_S = 2.0
# Gauges that are not amounts: the pod's value is the largest worker's (or the smallest, below).
LARGEST = ("_info", "_timestamp_seconds", "fraudscore_model_loaded", "fraudscore_pipeline_expected_seconds",
           "fraudscore_pipeline_busy_seconds", "fraudscore_state_snapshot_duration_seconds")
SMALLEST = ("process_start_time_seconds",)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _combine(name: str, kind: str) -> Any:
    if name.endswith(SMALLEST):
        return min
    if kind in ("gauge", "info", "stateset") and (name.endswith(LARGEST) or name in LARGEST):
        return max
    return lambda a, b: a + b


class WorkersCollector(Collector):
    """The workers' metrics, scraped at each collection and added up series by series."""

    def __init__(self, ports: list[int]) -> None:
        self.ports = ports
        self.failed_scrapes = 0

    def _scrape(self, port: int) -> str | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=SCRAPE_TIMEOUT_S) as resp:
                text: str = resp.read().decode()
                return text
        except OSError:
            self.failed_scrapes += 1
            return None

    def collect(self) -> Iterable[Metric]:
        families: dict[str, Metric] = {}
        values: dict[tuple[str, str, tuple[tuple[str, str], ...]], float] = {}
        for port in self.ports:
            text = self._scrape(port)
            if text is None:
                continue
            for family in text_string_to_metric_families(text):
                if family.name not in families:
                    families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
                combine = _combine(family.name, family.type)
                for sample in family.samples:
                    if sample.name.endswith("_created"):  # a creation time summed means nothing
                        continue
                    key = (family.name, sample.name, tuple(sorted(sample.labels.items())))
                    values[key] = combine(values[key], sample.value) if key in values else sample.value
        for (family_name, sample_name, labels), value in values.items():
            families[family_name].add_sample(sample_name, dict(labels), value)
        yield from families.values()
        failed = Metric("fraudscore_worker_scrape_failures", "Scrapes of a worker's metrics that failed (the "
                        "pod's sums then lack that worker's part)", "counter")
        failed.add_sample("fraudscore_worker_scrape_failures_total", {}, float(self.failed_scrapes))
        yield failed
        workers = Metric("fraudscore_workers", "Serving processes in this pod (FRAUDSCORE_WORKERS)", "gauge")
        workers.add_sample("fraudscore_workers", {}, float(len(self.ports)))
        yield workers


def supervise(settings: Settings, *, model_dir: Path | None, rules_file: Path | None) -> int:
    """Run `settings.workers` workers until a signal ends them, or one exits on its own."""
    n = settings.workers
    ports = [_free_port() for _ in range(n)]
    workers: list[subprocess.Popen[bytes]] = []
    base = {k: v for k, v in os.environ.items()} | {
        "FRAUDSCORE_HOST": settings.host, "FRAUDSCORE_PORT": str(settings.port),
        "FRAUDSCORE_METRICS_HOST": "127.0.0.1", "FRAUDSCORE_WORKERS": str(n),
    }
    if model_dir is not None:
        base["FRAUDSCORE_MODEL_DIR"] = str(model_dir)
    if rules_file is not None:
        base["FRAUDSCORE_RULES_FILE"] = str(rules_file)
    if settings.state_url is not None and "FRAUDSCORE_STATE_URL_FILE" not in base:
        base["FRAUDSCORE_STATE_URL"] = settings.state_url  # a --state-url flag, passed on (never argv)
    for k in range(n):
        env = base | {"FRAUDSCORE_METRICS_PORT": str(ports[k]),
                      "FRAUDSCORE_STATE_DIR": str(settings.state_dir / f"worker-{k}") if settings.state_dir else ""}
        workers.append(subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--worker", str(k)], env=env))
    registry = CollectorRegistry()
    registry.register(WorkersCollector(ports))
    metrics_server = None
    if settings.metrics_port:
        metrics_server, _ = start_http_server(settings.metrics_port, addr=settings.metrics_host, registry=registry)
    stopping = threading.Event()

    def pass_on(signum: int, _frame: object) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping.set()
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM if signum == signal.SIGINT else signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, pass_on)
    log.info("workers started", extra={"workers": n, "port": settings.port, "pids": [w.pid for w in workers],
                                       "metrics_ports": ports})
    try:
        while True:
            exited = [w for w in workers if w.poll() is not None]
            if stopping.is_set() or exited:
                break
            stopping.wait(0.2)
        if not stopping.is_set():
            log.error("a worker exited on its own; stopping the others (the pod restarts whole)",
                      extra={"pid": exited[0].pid, "code": exited[0].returncode})
            for worker in workers:
                if worker.poll() is None:
                    worker.terminate()
        codes = [w.wait() for w in workers]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
        if metrics_server is not None:
            metrics_server.shutdown()
    log.info("workers stopped", extra={"codes": codes})
    return 0 if stopping.is_set() and all(code == 0 for code in codes) else 1
