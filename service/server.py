"""The gRPC server: FraudScoring, health and reflection on grpc.aio over uvloop.

Start-up: bind the port with health NOT_SERVING → load rules, model and state →
compile and warm the kernels on the pipeline thread → SERVING. SIGTERM or SIGINT:
NOT_SERVING → stop taking calls → finish in-flight work within the grace → final
state snapshot → exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from functools import wraps
from typing import Any, TypeVar

import grpc
import xxhash
from fraudscore.v1 import fraudscore_pb2 as pb
from fraudscore.v1 import fraudscore_pb2_grpc as pb_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from core.errors import FraudscoreError, IdempotencyConflictError, InvalidInputError
from service.app import App
from service.batcher import Item
from service.config import Settings
from service.errors import DeadlineExpiredError, NotServingError, OverloadedError, status_of
from service.metrics import Metrics
from service.validation import validate_outcome, validate_transaction

log = logging.getLogger("fraudscore.server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["FraudScoring"].full_name
R = TypeVar("R")


def _fingerprint(txn: pb.Transaction) -> int:
    return xxhash.xxh64_intdigest(txn.SerializeToString(deterministic=True))


@contextlib.asynccontextmanager
async def _observed(metrics: Metrics, method: str, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
    """The one place errors become status codes; counts every call by method and code."""
    started = time.perf_counter()
    code = grpc.StatusCode.OK
    try:
        yield
    except FraudscoreError as exc:
        code, message = status_of(exc)
        await context.abort(code, message)
    except asyncio.CancelledError:
        code = grpc.StatusCode.CANCELLED
        raise
    except Exception as exc:
        log.exception("unexpected error in %s", method)
        code, message = status_of(exc)
        await context.abort(code, message)
    finally:
        metrics.requests.labels(method, code.name).inc()
        metrics.request_duration.labels(method).observe(time.perf_counter() - started)


def _unary(method: str) -> Callable[[Callable[..., Awaitable[R]]], Callable[..., Awaitable[R]]]:
    def decorate(fn: Callable[..., Awaitable[R]]) -> Callable[..., Awaitable[R]]:
        @wraps(fn)
        async def handler(self: FraudScoringService, request: Any, context: grpc.aio.ServicerContext) -> R:
            async with _observed(self.app.metrics, method, context):
                return await fn(self, request, context)
            raise AssertionError("unreachable: errors end in context.abort, which raises")
        return handler
    return decorate


class FraudScoringService(pb_grpc.FraudScoringServicer):
    def __init__(self, app: App) -> None:
        self.app = app

    def _submit(self, txns: list[pb.Transaction], context: grpc.aio.ServicerContext) -> list[asyncio.Future[Any]]:
        """Idempotency check, then queue the new transactions. All-or-nothing; runs without awaiting."""
        app = self.app
        if not app.serving:
            raise NotServingError("starting or draining")
        received_ns = time.perf_counter_ns()
        now = time.monotonic()
        budget_s = app.settings.budget_ms / 1000.0
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            raise DeadlineExpiredError()
        deadline = now + (budget_s if remaining is None else min(remaining, budget_s))
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Any]] = []
        fresh: dict[str, tuple[int, asyncio.Future[Any]]] = {}
        items: list[Item] = []
        for txn in txns:
            fp = _fingerprint(txn)
            future = app.idempotency.lookup(txn.transaction_id, fp)
            if future is None and txn.transaction_id in fresh:
                first_fp, future = fresh[txn.transaction_id]
                if first_fp != fp:
                    raise IdempotencyConflictError()
            if future is None:
                future = loop.create_future()
                fresh[txn.transaction_id] = (fp, future)
                items.append(Item(txn, deadline, received_ns, future))
            else:
                app.metrics.idempotent_replays.inc()
            futures.append(future)
        if items:
            try:
                app.batcher.submit(items)  # refuses whole, before anything is registered
            except OverloadedError:
                app.metrics.sheds.labels("queue_full").inc(len(items))
                raise
            for txn_id, (fp, future) in fresh.items():
                app.idempotency.register(txn_id, fp, future)
                future.add_done_callback(functools.partial(self._forget_failed, txn_id))
        return futures

    def _forget_failed(self, txn_id: str, future: asyncio.Future[Any]) -> None:
        # A call that failed before scoring (expired, cancelled) changed no state: let a retry score it.
        if future.cancelled() or future.exception() is not None:
            self.app.idempotency.forget(txn_id, future)

    @_unary("Score")
    async def Score(self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext) -> pb.ScoreResponse:
        if not request.HasField("transaction"):
            raise InvalidInputError("transaction", "required")
        validate_transaction(request.transaction)
        (future,) = self._submit([request.transaction], context)
        result: pb.ScoreResponse = await asyncio.shield(future)
        return result

    @_unary("ScoreBatch")
    async def ScoreBatch(self, request: pb.ScoreBatchRequest, context: grpc.aio.ServicerContext) -> pb.ScoreBatchResponse:
        txns = list(request.transactions)
        limit = self.app.settings.max_batch_request
        if not txns or len(txns) > limit:
            raise InvalidInputError("transactions", f"between 1 and {limit} transactions", got=str(len(txns)))
        for i, txn in enumerate(txns):
            validate_transaction(txn, prefix=f"transactions[{i}].")
        futures = self._submit(txns, context)
        results = await asyncio.gather(*(asyncio.shield(f) for f in futures))
        return pb.ScoreBatchResponse(results=results)

    async def ScoreStream(self, request_iterator: AsyncIterator[pb.ScoreRequest],
                          context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ScoreResponse]:
        """Responses in request order; a bad message ends the stream with its status and index."""
        index = 0
        async with _observed(self.app.metrics, "ScoreStream", context):
            async for request in request_iterator:
                if not request.HasField("transaction"):
                    raise InvalidInputError(f"stream[{index}].transaction", "required")
                validate_transaction(request.transaction, prefix=f"stream[{index}].transaction.")
                (future,) = self._submit([request.transaction], context)
                yield await asyncio.shield(future)
                index += 1

    @_unary("ReportOutcome")
    async def ReportOutcome(self, request: pb.ReportOutcomeRequest,
                            context: grpc.aio.ServicerContext) -> pb.ReportOutcomeResponse:
        validate_outcome(request)
        app = self.app
        if not app.serving:
            raise NotServingError("starting or draining")
        if app.outcomes_seen.lookup(request.transaction_id, 0) is not None:
            return pb.ReportOutcomeResponse(accepted=False)
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        app.outcomes_seen.register(request.transaction_id, 0, done)
        try:
            await app.run_on_pipeline(app.pipeline.apply_outcome, request)
        except BaseException:
            app.outcomes_seen.forget(request.transaction_id, done)
            raise
        done.set_result(True)
        return pb.ReportOutcomeResponse(accepted=True)


async def serve(settings: Settings, *, ready: Callable[[int], None] | None = None) -> None:
    """Run the server until SIGTERM/SIGINT, then drain and return."""
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ])
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    app = App(settings)
    pb_grpc.add_FraudScoringServicer_to_server(FraudScoringService(app), server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    port = server.add_insecure_port(f"{settings.host}:{settings.port}")
    if port == 0:
        raise OSError(f"cannot bind gRPC port {settings.host}:{settings.port}; is another server running there?")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pipeline") as executor:
        await app.start(executor)
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving", extra={"port": port, "metrics_port": app.metrics_port, "model_version": app.model_version,
                                   "ruleset_version": app.ruleset_version, "feature_set_version": app.feature_set_version})
        if ready is not None:
            ready(port)
        await stop.wait()
        log.info("draining", extra={"grace_s": settings.shutdown_grace_s})
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        app.serving = False
        await server.stop(settings.shutdown_grace_s)
        await app.stop()
    with contextlib.suppress(Exception):
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    log.info("stopped")
