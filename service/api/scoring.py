"""The FraudScoring service: Score, ScoreBatch, ScoreStream and ReportOutcome.

Each call is validated whole before anything is recorded, checked against the idempotency
records, and queued for the pipeline (service/serving/batcher.py); its answer comes back through a
future. `add_scoring_service` registers it with request deserializers that hand bytes that
do not parse to the handler, to be refused INVALID_ARGUMENT like any bad input.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from fraudscore.v1 import fraudscore_pb2 as pb

from core.errors import IdempotencyConflictError, InvalidInputError
from service.api.calls import Calls, Gate, answers, observed, unary
from service.api.errors import (
    DeadlineExpiredError,
    NotServingError,
    OverloadedError,
    StreamTooLongError,
)
from service.api.validation import decoded, in_batch, lenient, validate_outcome, validate_transaction
from service.runtime.app import App
from service.serving.items import Item
from service.serving.responses import batch_response
from service.serving.shared_records import fingerprint

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["FraudScoring"].full_name
STREAM_WINDOW = 64  # messages of one ScoreStream in flight at once


def _client_deadline(context: grpc.aio.ServicerContext, now: float) -> float:
    """The call's deadline on the time.monotonic() clock (inf without one)."""
    remaining = context.time_remaining()
    return math.inf if remaining is None else now + remaining


class FraudScoringService:
    """The four RPCs. Not the generated servicer's subclass: its handlers answer bytes (answers are
    serialized on the pipeline thread), registered by `add_scoring_service` without serializers."""

    def __init__(self, app: App) -> None:
        self.app = app
        gate = Gate()
        app.metrics.calls_in_flight.set_function(lambda: gate.in_flight)
        app.metrics.calls_in_flight_limit.set(app.settings.max_concurrent_rpcs)
        self.calls = {m: Calls(app.metrics, m, gate) for m in ("Score", "ScoreBatch", "ScoreStream", "ReportOutcome")}

    def _submit(self, txns: list[pb.Transaction], context: grpc.aio.ServicerContext,
                client_deadline: float | None = None) -> list[asyncio.Future[Any]]:
        """Idempotency check, then queue the new transactions. All-or-nothing; runs without awaiting.
        `client_deadline`: the call's, when the caller has it already (a stream's messages share it)."""
        app = self.app
        if not app.serving:
            raise NotServingError("starting or draining")
        received_ns = time.perf_counter_ns()
        now = time.monotonic()
        if client_deadline is None:
            client_deadline = _client_deadline(context, now)
        if client_deadline <= now:
            raise DeadlineExpiredError()
        # The budget covers one pipeline call; a ScoreBatch larger than max_batch takes several.
        calls = -(-len(txns) // app.settings.max_batch)
        deadline = min(client_deadline, now + calls * app.settings.budget_ms / 1000.0)
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Any]] = []
        fresh: dict[str, tuple[int, asyncio.Future[Any], Item]] = {}
        items: list[Item] = []
        for txn in txns:
            fp = fingerprint(txn)
            future = app.idempotency.lookup(txn.transaction_id, fp)
            if future is None and txn.transaction_id in fresh:
                first_fp, future, _ = fresh[txn.transaction_id]
                if first_fp != fp:
                    raise IdempotencyConflictError()
            if future is None:
                future = loop.create_future()
                item = Item(txn, deadline, received_ns, future, client_deadline=client_deadline)
                fresh[txn.transaction_id] = (fp, future, item)
                items.append(item)
            else:
                app.metrics.idempotent_replays.inc()
                self._extend(client_deadline, txn.transaction_id)
            futures.append(future)
        if items:
            try:
                app.batcher.submit(items)  # refuses whole, before anything is registered
            except OverloadedError as exc:
                app.metrics.sheds.labels(exc.reason).inc(len(items))
                raise
            register = app.idempotency.register
            for txn_id, (fp, future, item) in fresh.items():  # the batcher may have answered some already
                register(txn_id, fp, future, pending=item)
        return futures

    def _extend(self, client_deadline: float, txn_id: str) -> None:
        # A retry waiting on a still-queued first call: the first must not be dropped as
        # expired while the retry's client still waits. Its budget stays the first call's:
        # the first caller must get its answer in time (the retry shares that answer).
        item = self.app.idempotency.pending(txn_id)
        if isinstance(item, Item):
            item.client_deadline = max(item.client_deadline, client_deadline)

    @unary("Score")
    async def Score(self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext) -> bytes:
        """The answer is a serialized ScoreResponse (service/serving/responses.py), sent as it is."""
        request = decoded(request)
        if not request.HasField("transaction"):
            raise InvalidInputError("transaction", "required")
        validate_transaction(request.transaction, latest_ms=self.app.latest_event_time_ms())
        (future,) = self._submit([request.transaction], context)
        (result,) = await answers([future])
        answer: bytes = result
        return answer

    @unary("ScoreBatch")
    async def ScoreBatch(self, request: pb.ScoreBatchRequest, context: grpc.aio.ServicerContext) -> bytes:
        """A serialized ScoreBatchResponse: the answers' bytes, each framed as one of its results."""
        txns = list(decoded(request).transactions)
        limit = self.app.settings.max_batch_request
        if not txns or len(txns) > limit:
            raise InvalidInputError("transactions", f"between 1 and {limit} transactions", got=str(len(txns)))
        latest_ms = self.app.latest_event_time_ms()
        for i, txn in enumerate(txns):
            try:
                validate_transaction(txn, prefix="", latest_ms=latest_ms)
            except InvalidInputError as exc:
                raise in_batch(exc, f"transactions[{i}].") from None
        futures = self._submit(txns, context)
        return batch_response(await answers(futures))

    async def ScoreStream(self, request_iterator: AsyncIterator[pb.ScoreRequest],
                          context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        """Responses (serialized) in request order; a bad message ends the stream with its status and index.

        Up to STREAM_WINDOW messages of one stream are in flight at once, so a busy stream
        shares batches instead of waiting a round trip per message.
        """
        window: asyncio.Queue[tuple[float, asyncio.Future[Any]] | BaseException | None] = asyncio.Queue(STREAM_WINDOW)
        observe_message = self.app.metrics.stream_message_duration.observe

        async def read() -> None:
            index = 0
            limit = self.app.settings.max_stream_messages
            # Read once: the stream's deadline is every message's (asking gRPC per message cost ~7 %
            # of the event loop under stream load).
            client_deadline = _client_deadline(context, time.monotonic())
            try:
                async for request in request_iterator:
                    received = time.perf_counter()
                    if index >= limit:
                        raise StreamTooLongError(limit)
                    request = decoded(request, f"stream[{index}]")
                    if not request.HasField("transaction"):
                        raise InvalidInputError(f"stream[{index}].transaction", "required")
                    try:
                        validate_transaction(request.transaction, prefix="", latest_ms=self.app.latest_event_time_ms())
                    except InvalidInputError as exc:
                        raise in_batch(exc, f"stream[{index}].transaction.") from None
                    (future,) = self._submit([request.transaction], context, client_deadline)
                    await window.put((received, future))
                    index += 1
            except Exception as exc:  # answered in order: after the answers to the messages before it
                await window.put(exc)
                return
            await window.put(None)

        async with observed(self.calls["ScoreStream"], context):
            reader = asyncio.get_running_loop().create_task(read())
            try:
                while (entry := await window.get()) is not None:
                    if isinstance(entry, BaseException):
                        raise entry
                    received, future = entry
                    answer = future.result() if future.done() else (await answers([future]))[0]
                    if context.cancelled():  # the client left: nobody to answer (counted by `observed`)
                        return
                    observe_message(time.perf_counter() - received)  # the message's latency, not the stream's
                    yield answer
            finally:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader

    @unary("ReportOutcome")
    async def ReportOutcome(self, request: pb.ReportOutcomeRequest,
                            context: grpc.aio.ServicerContext) -> pb.ReportOutcomeResponse:
        """Fraud and chargebacks count once per transaction; a legitimate report counts nothing,
        and a fraud report after it still counts. Repeats are acknowledged with accepted=false."""
        app = self.app
        request = decoded(request)
        validate_outcome(request, latest_ms=app.latest_event_time_ms())
        if not app.serving:
            raise NotServingError("starting or draining")
        txn_id = request.transaction_id
        fraud = request.outcome in (pb.CONFIRMED_FRAUD, pb.CHARGEBACK)
        earlier = app.outcomes_seen.lookup(txn_id, 0)
        if earlier is not None:
            counted = await asyncio.shield(earlier)  # an earlier report may still be applying
            if counted or not fraud:
                return pb.ReportOutcomeResponse(accepted=False)
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        if not fraud:
            done.set_result(False)
            app.outcomes_seen.register(txn_id, 0, done)
            app.metrics.outcomes.labels(pb.Outcome.Name(request.outcome)).inc()
            return pb.ReportOutcomeResponse(accepted=True)
        if app.outcomes_in_flight >= app.settings.max_queue:
            app.metrics.sheds.labels("outcome_queue_full").inc()
            raise OverloadedError(app.outcomes_in_flight, app.settings.max_queue)
        app.outcomes_seen.register(txn_id, 0, done)
        app.outcomes_in_flight += 1
        # In its turn in the batcher's queue: after every transaction that arrived before it has
        # entered the state (those answered by the fallback too), as replay applies it.
        job = app.batcher.submit_work(functools.partial(app.apply_outcome, request, done), kind="outcome")
        job.add_done_callback(functools.partial(self._outcome_applied, txn_id, done))
        # Shielded: once queued, the report is applied even if this caller goes away, and
        # a retry finds it recorded instead of applying it twice.
        await asyncio.shield(done)
        app.metrics.outcomes.labels(pb.Outcome.Name(request.outcome)).inc()
        return pb.ReportOutcomeResponse(accepted=True)

    def _outcome_applied(self, txn_id: str, done: asyncio.Future[bool], job: asyncio.Future[None]) -> None:
        self.app.outcomes_in_flight -= 1
        failure = asyncio.CancelledError() if job.cancelled() else job.exception()
        if failure is not None:
            self.app.outcomes_seen.forget(txn_id, done)
            done.set_exception(failure)
        else:
            done.set_result(True)


# CPython's cyclic GC, left at its defaults (700, 10, 10), ran ~1,200 collections in a 12 s
# ScoreBatch benchmark: 9 % of the server's CPU, pauses up to 200 ms (full collections over
# every long-lived object). Collecting young objects 14× less often and old ones rarely
# cut that to ~90 collections, 1.5 % of CPU, pauses under 25 ms (docs/benchmarks.md).
def add_scoring_service(service: FraudScoringService, server: grpc.aio.Server) -> None:
    """As the generated add_FraudScoringServicer_to_server, with request deserializers that hand a
    request that does not parse to its handler (service.api.validation.lenient), to be refused
    INVALID_ARGUMENT like any other bad input."""
    def handler(kind: Callable[..., grpc.RpcMethodHandler], fn: Callable[..., Any], request: type,
                response: Any) -> grpc.RpcMethodHandler:
        # response None: the handler answers bytes, serialized already (service/serving/responses.py).
        return kind(fn, request_deserializer=lenient(request),
                    response_serializer=None if response is None else response.SerializeToString)

    handlers = {
        "Score": handler(grpc.unary_unary_rpc_method_handler, service.Score, pb.ScoreRequest, None),
        "ScoreBatch": handler(grpc.unary_unary_rpc_method_handler, service.ScoreBatch, pb.ScoreBatchRequest, None),
        "ScoreStream": handler(grpc.stream_stream_rpc_method_handler, service.ScoreStream, pb.ScoreRequest, None),
        "ReportOutcome": handler(grpc.unary_unary_rpc_method_handler, service.ReportOutcome,
                                 pb.ReportOutcomeRequest, pb.ReportOutcomeResponse),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
