"""The gRPC server: FraudScoring, health and reflection on grpc.aio over uvloop.

Start-up: load rules, model and state → bind the port with health NOT_SERVING →
compile and warm the kernels on the pipeline thread → SERVING. SIGTERM or SIGINT:
NOT_SERVING → stop taking calls → finish in-flight work within the grace → final
state snapshot → exit 0. SIGHUP: reload the rules file and the model directory (service/reload.py),
and the bearer tokens file (service/security.py).

Security (service/security.py, docs/security.md): the port serves plaintext, TLS or mutual TLS;
with a tokens file an interceptor refuses calls without an accepted bearer token, except health
and reflection; FRAUDSCORE_HEALTH_PORT adds a plaintext port serving health only.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import math
import signal
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import xxhash
from fraudscore.v1 import fraudscore_pb2 as pb
from fraudscore.v1 import fraudscore_pb2_grpc as pb_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from core.errors import IdempotencyConflictError, InvalidInputError
from service.app import App
from service.batcher import Item
from service.calls import Calls, answers, observed, unary
from service.config import Settings
from service.errors import (
    DeadlineExpiredError,
    NotServingError,
    OverloadedError,
    StreamTooLongError,
)
from service.security import load_security
from service.validation import decoded, lenient, validate_outcome, validate_transaction

log = logging.getLogger("fraudscore.server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["FraudScoring"].full_name
STREAM_WINDOW = 64  # messages of one ScoreStream in flight at once


def _fingerprint(txn: pb.Transaction) -> int:
    return xxhash.xxh64_intdigest(txn.SerializeToString(deterministic=True))


class FraudScoringService(pb_grpc.FraudScoringServicer):
    def __init__(self, app: App) -> None:
        self.app = app
        self.calls = {m: Calls(app.metrics, m) for m in ("Score", "ScoreBatch", "ScoreStream", "ReportOutcome")}

    def _submit(self, txns: list[pb.Transaction], context: grpc.aio.ServicerContext) -> list[asyncio.Future[Any]]:
        """Idempotency check, then queue the new transactions. All-or-nothing; runs without awaiting."""
        app = self.app
        if not app.serving:
            raise NotServingError("starting or draining")
        received_ns = time.perf_counter_ns()
        now = time.monotonic()
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            raise DeadlineExpiredError()
        client_deadline = math.inf if remaining is None else now + remaining
        # The budget covers one pipeline call; a ScoreBatch larger than max_batch takes several.
        calls = -(-len(txns) // app.settings.max_batch)
        deadline = min(client_deadline, now + calls * app.settings.budget_ms / 1000.0)
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Any]] = []
        fresh: dict[str, tuple[int, asyncio.Future[Any], Item]] = {}
        items: list[Item] = []
        for txn in txns:
            fp = _fingerprint(txn)
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
            except OverloadedError:
                app.metrics.sheds.labels("queue_full").inc(len(items))
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
    async def Score(self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext) -> pb.ScoreResponse:
        request = decoded(request)
        if not request.HasField("transaction"):
            raise InvalidInputError("transaction", "required")
        validate_transaction(request.transaction, latest_ms=self.app.latest_event_time_ms())
        (future,) = self._submit([request.transaction], context)
        (result,) = await answers([future])
        answer: pb.ScoreResponse = result
        return answer

    @unary("ScoreBatch")
    async def ScoreBatch(self, request: pb.ScoreBatchRequest, context: grpc.aio.ServicerContext) -> pb.ScoreBatchResponse:
        txns = list(decoded(request).transactions)
        limit = self.app.settings.max_batch_request
        if not txns or len(txns) > limit:
            raise InvalidInputError("transactions", f"between 1 and {limit} transactions", got=str(len(txns)))
        latest_ms = self.app.latest_event_time_ms()
        for i, txn in enumerate(txns):
            validate_transaction(txn, prefix=f"transactions[{i}].", latest_ms=latest_ms)
        futures = self._submit(txns, context)
        results = await answers(futures)
        return pb.ScoreBatchResponse(results=results)

    async def ScoreStream(self, request_iterator: AsyncIterator[pb.ScoreRequest],
                          context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ScoreResponse]:
        """Responses in request order; a bad message ends the stream with its status and index.

        Up to STREAM_WINDOW messages of one stream are in flight at once, so a busy stream
        shares batches instead of waiting a round trip per message.
        """
        window: asyncio.Queue[asyncio.Future[Any] | BaseException | None] = asyncio.Queue(STREAM_WINDOW)

        async def read() -> None:
            index = 0
            limit = self.app.settings.max_stream_messages
            try:
                async for request in request_iterator:
                    if index >= limit:
                        raise StreamTooLongError(limit)
                    request = decoded(request, f"stream[{index}]")
                    if not request.HasField("transaction"):
                        raise InvalidInputError(f"stream[{index}].transaction", "required")
                    validate_transaction(request.transaction, prefix=f"stream[{index}].transaction.",
                                         latest_ms=self.app.latest_event_time_ms())
                    (future,) = self._submit([request.transaction], context)
                    await window.put(future)
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
                    yield entry.result() if entry.done() else (await answers([entry]))[0]
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
        job = asyncio.ensure_future(app.run_on_pipeline(app.apply_outcome, request, done))
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
GC_THRESHOLDS = (10_000, 10, 100)


def _tune_gc() -> None:
    """Once started: what start-up built (modules, model, kernels) is moved out of the GC's
    sight for good, and collections run less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def add_scoring_service(service: FraudScoringService, server: grpc.aio.Server) -> None:
    """As the generated add_FraudScoringServicer_to_server, with request deserializers that hand a
    request that does not parse to its handler (service.validation.lenient), to be refused
    INVALID_ARGUMENT like any other bad input."""
    def handler(kind: Callable[..., grpc.RpcMethodHandler], fn: Callable[..., Any], request: type,
                response: Any) -> grpc.RpcMethodHandler:
        return kind(fn, request_deserializer=lenient(request), response_serializer=response.SerializeToString)

    handlers = {
        "Score": handler(grpc.unary_unary_rpc_method_handler, service.Score, pb.ScoreRequest, pb.ScoreResponse),
        "ScoreBatch": handler(grpc.unary_unary_rpc_method_handler, service.ScoreBatch, pb.ScoreBatchRequest,
                              pb.ScoreBatchResponse),
        "ScoreStream": handler(grpc.stream_stream_rpc_method_handler, service.ScoreStream, pb.ScoreRequest,
                               pb.ScoreResponse),
        "ReportOutcome": handler(grpc.unary_unary_rpc_method_handler, service.ReportOutcome,
                                 pb.ReportOutcomeRequest, pb.ReportOutcomeResponse),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def _bind(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None, what: str) -> int:
    port: int = (server.add_insecure_port(address) if credentials is None
                 else server.add_secure_port(address, credentials))
    if port == 0:
        raise OSError(f"cannot bind {what} {address}; is another server running there?")
    return port


def _health_server(settings: Settings, health_servicer: health.aio.HealthServicer) -> grpc.aio.Server | None:
    """FRAUDSCORE_HEALTH_PORT: plaintext, grpc.health.v1 only, sharing the main health servicer
    (so its status is the main port's at every moment), for probes that can do neither TLS nor tokens."""
    if settings.health_port == 0:
        return None
    # Probes are few; the bound keeps a flood on this port from queueing without limit.
    server = grpc.aio.server(maximum_concurrent_rpcs=16, options=[("grpc.so_reuseport", 0)])
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    _bind(server, f"{settings.host}:{settings.health_port}", None, "health port")
    return server


async def serve(settings: Settings, *, ready: Callable[[int], None] | None = None) -> None:
    """Run the server until SIGTERM/SIGINT, then drain and return."""
    security = load_security(settings)  # first: a bad certificate or tokens file fails before any work
    app = App(settings)
    requests = app.metrics.requests

    def refused(method: str) -> None:
        service_name, _, name = method.lstrip("/").partition("/")
        if service_name == SERVICE_NAME:  # a bounded label set: only our own methods are counted
            requests.labels(name, grpc.StatusCode.UNAUTHENTICATED.name).inc()

    server = grpc.aio.server(maximum_concurrent_rpcs=settings.max_concurrent_rpcs, options=[
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ], interceptors=security.interceptors(on_refused=refused))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    add_scoring_service(FraudScoringService(app), server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    credentials = security.tls.server_credentials() if security.tls is not None else None
    port = _bind(server, f"{settings.host}:{settings.port}", credentials, "gRPC port")
    health_server = _health_server(settings, health_servicer)
    log.info("security", extra={
        "transport": security.transport, "auth": "bearer" if security.tokens is not None else "off",
        "auth_tokens": len(security.tokens.digests) if security.tokens is not None else 0,
        "health_port": settings.health_port})
    if security.tokens is not None and security.tls is None:
        log.warning("bearer tokens over plaintext: anyone on the network path can read them; set "
                    "FRAUDSCORE_TLS_CERT_FILE and FRAUDSCORE_TLS_KEY_FILE")
    await server.start()
    if health_server is not None:
        await health_server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watcher = security.watcher

    def reload_requested() -> None:  # SIGHUP: rules and model (service/reload.py), and the tokens file
        app.reloader.request()
        if watcher is not None:
            watcher.request()

    loop.add_signal_handler(signal.SIGHUP, reload_requested)
    if watcher is not None:
        watcher.start()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pipeline") as executor:
        await app.start(executor)
        _tune_gc()
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving", extra={"port": port, "metrics_port": app.metrics_port, "health_port": settings.health_port,
                                   "transport": security.transport, "model_version": app.model_version,
                                   "ruleset_version": app.ruleset_version, "feature_set_version": app.feature_set_version})
        if ready is not None:
            ready(port)
        await stop.wait()
        log.info("draining", extra={"grace_s": settings.shutdown_grace_s})
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        app.serving = False
        await server.stop(settings.shutdown_grace_s)
        if watcher is not None:
            await watcher.stop()
        await app.stop()
        if health_server is not None:  # last: probes see NOT_SERVING, not a refused connection, while draining
            await health_server.stop(0)
    with contextlib.suppress(Exception):
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    log.info("stopped")
