"""Locust load test for the FraudScoring API.

    locust -f loadtest/locustfile.py --host 127.0.0.1:50051            # web UI on :8089
    locust -f loadtest/locustfile.py --host 127.0.0.1:50051 --headless -u 50 -r 10 -t 1m

Each simulated user is a payment switch: mostly single Score calls over a realistic pool
of cards, merchants and devices (so the features see repeat customers), some ScoreBatch
calls, and occasional ReportOutcome. Calls carry a 50 ms deadline like a real switch;
a deadline miss counts as a failure. Point it only at servers you run.
"""

from __future__ import annotations

import random
import time
import uuid
from typing import Any

import grpc
import grpc.experimental.gevent as grpc_gevent
from fraudscore.v1 import fraudscore_pb2 as pb
from fraudscore.v1 import fraudscore_pb2_grpc as pb_grpc
from locust import User, between, events, task

grpc_gevent.init_gevent()  # grpc must cooperate with locust's gevent loop

DEADLINE_S = 0.05
CARDS = [f"card_lt_{i:06d}" for i in range(20_000)]
MERCHANTS = [(f"m_lt_{i:04d}", random.Random(i).choice(["5411", "5812", "5732", "5999", "4111", "6011"]))
             for i in range(800)]
CHANNELS = [pb.CARD_PRESENT, pb.ECOMMERCE, pb.ECOMMERCE, pb.CARD_NOT_PRESENT_OTHER, pb.ATM]


@events.init_command_line_parser.add_listener  # type: ignore[untyped-decorator]
def _options(parser: Any) -> None:
    parser.add_argument("--deadline-ms", type=float, default=DEADLINE_S * 1000, help="per-call deadline")


def transaction(rng: random.Random) -> pb.Transaction:
    card = rng.randrange(len(CARDS))
    merchant, mcc = MERCHANTS[rng.randrange(len(MERCHANTS))]
    return pb.Transaction(
        transaction_id=uuid.uuid4().hex,
        card_id=CARDS[card],
        customer_id=f"cust_lt_{card:06d}",
        merchant_id=merchant,
        merchant_category=mcc,
        amount_minor=max(100, int(rng.lognormvariate(8.0, 1.0))),
        currency="USD",
        event_time_ms=int(time.time() * 1000),
        channel=rng.choice(CHANNELS),
        country="US",
        latitude=40.7 + rng.uniform(-0.5, 0.5),
        longitude=-74.0 + rng.uniform(-0.5, 0.5),
        device_id=f"dev_lt_{card:06d}" if rng.random() < 0.95 else uuid.uuid4().hex[:12],
        ip_address=f"10.{card % 256}.{(card // 256) % 256}.{rng.randrange(1, 255)}",
    )


class PaymentSwitch(User):
    """One switch connection. Host is `address:port` of the gRPC server."""

    wait_time = between(0.005, 0.02)

    def on_start(self) -> None:
        self.rng = random.Random()
        self.deadline_s = self.environment.parsed_options.deadline_ms / 1000 if self.environment.parsed_options \
            else DEADLINE_S
        self.channel = grpc.insecure_channel(self.host)
        self.stub = pb_grpc.FraudScoringStub(self.channel)
        self.scored: list[pb.Transaction] = []

    def on_stop(self) -> None:
        self.channel.close()

    def _call(self, name: str, fn: Any, request: Any, size: int) -> Any:
        start = time.perf_counter()
        exception: Exception | None = None
        response = None
        try:
            response = fn(request, timeout=self.deadline_s)
        except grpc.RpcError as exc:
            exception = exc
        self.environment.events.request.fire(
            request_type="grpc", name=name, response_time=(time.perf_counter() - start) * 1000,
            response_length=size, exception=exception, context={})
        return response

    @task(40)
    def score(self) -> None:
        txn = transaction(self.rng)
        if self._call("Score", self.stub.Score, pb.ScoreRequest(transaction=txn), 1) is not None:
            self.scored.append(txn)
            del self.scored[:-100]

    @task(2)
    def score_batch(self) -> None:
        txns = [transaction(self.rng) for _ in range(self.rng.randint(2, 20))]
        self._call("ScoreBatch", self.stub.ScoreBatch, pb.ScoreBatchRequest(transactions=txns), len(txns))

    @task(1)
    def report_outcome(self) -> None:
        if not self.scored:
            return
        txn = self.rng.choice(self.scored)
        request = pb.ReportOutcomeRequest(
            transaction_id=txn.transaction_id, card_id=txn.card_id, merchant_id=txn.merchant_id,
            outcome=pb.CONFIRMED_FRAUD if self.rng.random() < 0.3 else pb.CONFIRMED_LEGITIMATE,
            reported_time_ms=int(time.time() * 1000))
        self._call("ReportOutcome", self.stub.ReportOutcome, request, 1)
