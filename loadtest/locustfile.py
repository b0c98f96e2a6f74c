"""Locust load test for the FraudScoring API, driven by the built-in simulator's traffic.

    make loadtest                                  # headless, 127.0.0.1:50051, CSV in loadtest/results/
    locust -f loadtest/locustfile.py --host 127.0.0.1:50051            # web UI on :8089
    locust -f loadtest/locustfile.py --host 127.0.0.1:50051 --headless -u 50 -r 10 -t 1m \\
        --csv loadtest/results/run

Each simulated user is a payment switch. The payments come from core.history.simulate, replayed
in time order (service.bench.loadgen.SimulatedTraffic, the same traffic as `fraudscore bench
serve`): repeat customers, merchants, devices and IPs, with the simulator's fraud patterns
(card testing, account takeover, compromised merchant, large amounts) mixed in at its
natural ~1 % (`--fraud-scale` multiplies it). Mostly single Score calls, some ScoreBatch
calls, and ReportOutcome: CONFIRMED_FRAUD for the simulator's fraud once the replay reaches
its report time (1–30 days later, as chargebacks come), else CONFIRMED_LEGITIMATE.

Calls carry a deadline (`--deadline-ms`, 50 ms like a real switch); a deadline miss, like
any other error status, counts as a failure. Latency percentiles are locust's own (its
`_stats.csv` and `_stats_history.csv`). With `--csv PREFIX`, `PREFIX_decisions.csv` adds
the answers by traffic kind (normal / fraud-like, by the simulator's label) and decision.

Against a server with TLS (`--grpc-tls-ca`, and `--grpc-tls-cert`/`--grpc-tls-key` for mutual TLS;
locust's own `--tls-cert`/`--tls-key` are its web UI's) and bearer
tokens (`--token-file`: the first token of a file in the server's format, one a line, blank and
`#` lines skipped), every call goes over TLS and carries `authorization: Bearer <token>`.

Several serving processes (`fraudscore serve` on one shared Redis, each on its own port): give
`--host` a comma-separated list, `--host 127.0.0.1:50051,127.0.0.1:50052`; users are dealt to
them in turn, each keeping its own connection (as switches each hold one to a pod), and outcome
reports go wherever their user's calls go. (`--workers N` behind one port needs no list: the
kernel spreads the users' connections over the workers.)

Load is only ever sent to this machine: a host that is not a loopback address is refused.
"""

from __future__ import annotations

import csv
import heapq
import itertools
import logging
import os
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import grpc.experimental.gevent as grpc_gevent
from fraudscore.v1 import fraudscore_pb2 as pb
from fraudscore.v1 import fraudscore_pb2_grpc as pb_grpc
from locust import User, between, events, task
from locust.env import Environment

from service.bench.loadgen import Label, SimulatedTraffic, check_loopback

grpc_gevent.init_gevent()  # grpc must cooperate with locust's gevent loop

DEFAULT_HOST = "127.0.0.1:50051"
DEADLINE_S = 0.05
KINDS = ("normal", "fraud-like")

_traffic: SimulatedTraffic | None = None
_run_prefix = f"lt{os.getpid()}-{time.time_ns()}"
# (traffic kind, decision name or "degraded") -> answers; a degraded answer also counts its decision.
decisions: Counter[tuple[str, str]] = Counter()
# Fraud reports not yet sent: (traffic position from which due, tie-break, reported time, transaction).
_reports: list[tuple[int, int, int, pb.Transaction]] = []
_report_seq = itertools.count()
# Set from the options once per process (`_start`): None for plaintext; call metadata, empty without a token.
_credentials: grpc.ChannelCredentials | None = None
_channel_options: list[tuple[str, str]] = []
_metadata: tuple[tuple[str, str], ...] = ()


@events.init_command_line_parser.add_listener  # type: ignore[untyped-decorator]
def _options(parser: Any) -> None:
    parser.add_argument("--deadline-ms", type=float, default=DEADLINE_S * 1000,
                        help="per-call gRPC deadline; a miss counts as a failure (default 50)")
    parser.add_argument("--fraud-scale", type=float, default=1.0,
                        help="multiplies the simulator's fraud incidence (1: ~1 %% of payments; 20: ~20 %%)")
    parser.add_argument("--sim-days", type=int, default=30, help="days of simulated traffic replayed in order")
    parser.add_argument("--sim-cards", type=int, default=20_000, help="cards in the simulated world (merchants: a tenth of it, at least 100)")
    parser.add_argument("--sim-seed", type=int, default=5, help="seed of the simulated world")
    parser.add_argument("--grpc-tls-ca", default="", help="call over TLS, trusting this PEM CA bundle")
    parser.add_argument("--grpc-tls-cert", default="", help="client certificate (PEM) for mutual TLS; with --grpc-tls-key")
    parser.add_argument("--grpc-tls-key", default="", help="client private key (PEM) for mutual TLS; with --grpc-tls-cert")
    parser.add_argument("--grpc-tls-server-name", default="",
                        help="name to verify the server certificate against, when it does not cover the host")
    parser.add_argument("--token-file", default="",
                        help="send `authorization: Bearer` with the first token of this file (one a line, "
                             "blank and # lines skipped, as FRAUDSCORE_AUTH_TOKENS_FILE)")


def _read(option: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SystemExit(f"loadtest: {option} {path}: cannot read ({exc.strerror})") from None


def _security(opts: Any) -> None:
    """TLS credentials and the bearer token from the options, read once before any user starts."""
    global _credentials, _channel_options, _metadata
    if bool(opts.grpc_tls_cert) != bool(opts.grpc_tls_key) or (opts.grpc_tls_cert and not opts.grpc_tls_ca):
        raise SystemExit("loadtest: --grpc-tls-cert and --grpc-tls-key go together, and with --grpc-tls-ca")
    if opts.grpc_tls_ca:
        key = _read("--grpc-tls-key", opts.grpc_tls_key) if opts.grpc_tls_key else None
        cert = _read("--grpc-tls-cert", opts.grpc_tls_cert) if opts.grpc_tls_cert else None
        _credentials = grpc.ssl_channel_credentials(_read("--grpc-tls-ca", opts.grpc_tls_ca), key, cert)
        _channel_options = [("grpc.ssl_target_name_override", opts.grpc_tls_server_name)] if opts.grpc_tls_server_name else []
    if opts.token_file:
        lines = _read("--token-file", opts.token_file).decode(errors="replace").splitlines()
        tokens = [t.strip() for t in lines if t.strip() and not t.strip().startswith("#")]
        if not tokens:
            raise SystemExit(f"loadtest: --token-file {opts.token_file}: no token in it (one a line)")
        _metadata = (("authorization", f"Bearer {tokens[0]}"),)


def _host(environment: Environment) -> str:
    return environment.host or DEFAULT_HOST


def _targets(host: str) -> list[str]:
    """`--host`'s addresses (one, or several comma-separated), each checked to be loopback."""
    targets = [item.strip() for item in host.split(",") if item.strip()]
    if not targets:
        raise ValueError("no address given")
    for target in targets:
        check_loopback(target)
    return targets


_users = itertools.count()  # deals users to the --host addresses in turn


@events.init.add_listener  # type: ignore[untyped-decorator]
def _start(environment: Environment, **_: Any) -> None:
    """Refuse a remote host; build the simulated history once per process, before any user calls."""
    global _traffic
    try:
        _targets(_host(environment))
    except ValueError as exc:
        raise SystemExit(f"loadtest: refused --host {_host(environment)!r}: {exc}. Run the server on this "
                         "machine and point the load test at 127.0.0.1:PORT.") from None
    if environment.parsed_options:
        _security(environment.parsed_options)
    if _traffic is None:
        opts = environment.parsed_options
        _traffic = SimulatedTraffic(num_days=opts.sim_days, num_cards=opts.sim_cards,
                                    num_merchants=max(100, opts.sim_cards // 10), seed=opts.sim_seed,
                                    fraud_scale=opts.fraud_scale) if opts else SimulatedTraffic()


@events.quitting.add_listener  # type: ignore[untyped-decorator]
def _write_decisions(environment: Environment, **_: Any) -> None:
    names = [pb.Decision.Name(d) for d in (pb.APPROVE, pb.REVIEW, pb.DECLINE)] + ["degraded"]
    for kind in KINDS:
        counts = ", ".join(f"{name} {decisions[kind, name]}" for name in names)
        logging.info("loadtest answers for %s traffic: %s", kind, counts)
    prefix = environment.parsed_options.csv_prefix if environment.parsed_options else None
    if prefix:
        with open(f"{prefix}_decisions.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["Traffic", *names])
            writer.writerows([kind, *(decisions[kind, name] for name in names)] for kind in KINDS)


class CallFailed(Exception):
    """A call that ended with an error status (a deadline miss: DEADLINE_EXCEEDED)."""


def _next(n: int) -> tuple[list[pb.Transaction], list[Label]]:
    if _traffic is None:  # a user started without the init event (e.g. a locust library run)
        raise RuntimeError("the simulated traffic was not built: run through locust")
    return _traffic.take_labelled(_run_prefix, n)


class PaymentSwitch(User):
    """One switch connection. Host is `address:port` of the gRPC server, or several comma-separated
    (loopback only): this user's is one of them, dealt in turn."""

    host = DEFAULT_HOST
    wait_time = between(0.005, 0.02)

    def on_start(self) -> None:
        targets = _targets(self.host)  # also guards users started without the init check
        self.target = targets[next(_users) % len(targets)]
        opts = self.environment.parsed_options
        self.deadline_s = opts.deadline_ms / 1000 if opts else DEADLINE_S
        self.rng = random.Random()
        self.channel = (grpc.insecure_channel(self.target) if _credentials is None
                        else grpc.secure_channel(self.target, _credentials, options=_channel_options))
        self.stub = pb_grpc.FraudScoringStub(self.channel)
        self.legitimate: list[pb.Transaction] = []  # recent answered ones, for CONFIRMED_LEGITIMATE reports

    def on_stop(self) -> None:
        self.channel.close()

    def _call(self, name: str, fn: Any, request: Any, size: int) -> Any:
        start = time.perf_counter()
        exception: Exception | None = None
        response = None
        try:
            response = fn(request, timeout=self.deadline_s, metadata=_metadata or None)
        except grpc.RpcError as exc:  # one line per status in locust's failure table and CSV
            exception = CallFailed(f"{exc.code().name}: {exc.details()}")
        took_s = time.perf_counter() - start
        if exception is None and took_s > self.deadline_s:
            # gRPC may still deliver an answer that arrives just past a (sub-millisecond) deadline.
            exception = CallFailed(f"DEADLINE_EXCEEDED: answered after the {self.deadline_s * 1000:g} ms deadline")
        self.environment.events.request.fire(
            request_type="grpc", name=name, response_time=took_s * 1000,
            response_length=size, exception=exception, context={})
        return response

    def _count(self, answers: list[pb.ScoreResponse], txns: list[pb.Transaction], labels: list[Label]) -> None:
        for answer, txn, label in zip(answers, txns, labels, strict=True):
            kind = KINDS[label.is_fraud]
            decisions[kind, pb.Decision.Name(answer.decision)] += 1
            decisions[kind, "degraded"] += answer.degraded
            if label.is_fraud:
                heapq.heappush(_reports, (label.report_due_at, next(_report_seq), label.reported_time_ms, txn))
            else:
                self.legitimate.append(txn)
        del self.legitimate[:-200]

    @task(40)
    def score(self) -> None:
        txns, labels = _next(1)
        reply = self._call("Score", self.stub.Score, pb.ScoreRequest(transaction=txns[0]), 1)
        if reply is not None:
            self._count([reply], txns, labels)

    @task(2)
    def score_batch(self) -> None:
        txns, labels = _next(self.rng.randint(2, 20))
        reply = self._call("ScoreBatch", self.stub.ScoreBatch, pb.ScoreBatchRequest(transactions=txns), len(txns))
        if reply is not None:
            self._count(list(reply.results), txns, labels)

    @task(1)
    def report_outcome(self) -> None:
        """A fraud report once the replay reaches the simulator's report time (1–30 days after the
        fraud, as chargebacks come), else a legitimate confirmation (which counts nothing)."""
        now_ms = int(time.time() * 1000)
        if _reports and _traffic is not None and _reports[0][0] <= _traffic.next:
            _, _, reported_ms, txn = heapq.heappop(_reports)
            outcome, reported_ms = pb.CONFIRMED_FRAUD, min(reported_ms, now_ms)
        elif self.legitimate:
            txn = self.legitimate.pop(self.rng.randrange(len(self.legitimate)))
            outcome, reported_ms = pb.CONFIRMED_LEGITIMATE, now_ms
        else:
            return
        request = pb.ReportOutcomeRequest(transaction_id=txn.transaction_id, card_id=txn.card_id,
                                          merchant_id=txn.merchant_id, outcome=outcome, reported_time_ms=reported_ms)
        self._call("ReportOutcome", self.stub.ReportOutcome, request, 1)
