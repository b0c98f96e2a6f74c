"""The gRPC server: FraudScoring (service/api/scoring.py), health and reflection on grpc.aio
over uvloop.

Start-up: load rules, model and state → bind the port with health NOT_SERVING →
compile and warm the kernels on the pipeline thread → SERVING. SIGTERM or SIGINT:
NOT_SERVING → stop taking calls → finish in-flight work within the grace → final
state snapshot → exit 0. SIGHUP: reload the rules file and the model directory (service/runtime/reload.py),
the bearer tokens file (service/security/auth.py) and the TLS files (service/security/tls.py).

Security (service/security/auth.py, service/security/tls.py, docs/security.md): the port serves plaintext, TLS or
mutual TLS (renewed certificates are served without a restart); with a tokens file an interceptor
refuses calls without an accepted bearer token, except Health/Check; FRAUDSCORE_HEALTH_PORT adds a
plaintext port serving Health/Check only (service/api/health.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service.api.calls import refused_call
from service.api.health import Health, health_port_server
from service.api.scoring import SERVICE_NAME, FraudScoringService, add_scoring_service
from service.runtime.app import App
from service.runtime.config import Settings
from service.security.auth import load_security

log = logging.getLogger("fraudscore.server")


GC_THRESHOLDS = (10_000, 10, 100)


def _tune_gc() -> None:
    """Once started: what start-up built (modules, model, kernels) is moved out of the GC's
    sight for good, and collections run less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def _bind(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None, what: str) -> int:
    port: int = (server.add_insecure_port(address) if credentials is None
                 else server.add_secure_port(address, credentials))
    if port == 0:
        raise OSError(f"cannot bind {what} {address}; is another server running there?")
    return port


def server_options(settings: Settings) -> list[tuple[str, int]]:
    """The main port's channel arguments, each knob from its setting."""
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        # Off, so that a second server on the port fails loudly; on for the workers of one pod,
        # which share the port (the kernel spreads new connections over them).
        ("grpc.so_reuseport", 1 if settings.workers > 1 else 0),
        # gRPC's queue of calls waiting for one of the max_concurrent_rpcs slots, before any handler:
        # random early drops from half of max_pending_rpcs, every new call past it. Measured under 3×
        # overload (docs/design.md, "Overload"): with gRPC's defaults (1,000 and 3,000) calls waited
        # there until their clients timed out and almost nothing was answered within 50 ms.
        ("grpc.server.max_pending_requests", settings.max_pending_rpcs // 2),
        ("grpc.server.max_pending_requests_hard_limit", settings.max_pending_rpcs),
    ]
    if settings.max_connection_age_s > 0:
        # GOAWAY after the age (gRPC adds ±10 % jitter, so pods do not all reconnect at once), then
        # as long as the drain grace for the calls in flight: clients reconnect through the load
        # balancer, and pods an autoscaler adds get their share of the long-lived connections.
        options += [("grpc.max_connection_age_ms", round(settings.max_connection_age_s * 1000)),
                    # At least 5 s for the calls in flight on an aged connection, even with no drain grace.
                    ("grpc.max_connection_age_grace_ms", round(max(settings.shutdown_grace_s, 5.0) * 1000))]
    return options


async def serve(settings: Settings, *, ready: Callable[[int], None] | None = None) -> None:
    """Run the server until SIGTERM/SIGINT, then drain and return."""
    security = load_security(settings)  # first: a bad certificate or tokens file fails before any work
    app = App(settings)
    service = FraudScoringService(app)
    ours = {f"/{SERVICE_NAME}/{name}": calls for name, calls in service.calls.items()}

    def refused(method: str, context: grpc.aio.ServicerContext, started: float) -> None:
        # Counted (a bounded label set: our own methods only) and given a request id.
        refused_call(ours.get(method), context, started, grpc.StatusCode.UNAUTHENTICATED)

    # The limit is gRPC's, enforced before any Python runs: a refusal there costs the event loop
    # nothing, where one in a handler costs most of a call (docs/design.md, "Overload").
    server = grpc.aio.server(maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
                             options=server_options(settings), interceptors=security.interceptors(on_refused=refused))
    health = Health()
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    add_scoring_service(service, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    for name in ("", SERVICE_NAME):
        await health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_server = health_port_server(settings, health)
    # One process binds at once and says NOT_SERVING while it warms up. A worker of several binds
    # only once warm: the kernel hands a bound worker its share of new connections, and one still
    # warming up would refuse them all UNAVAILABLE while the pod's probe reached a ready one.
    late_bind = settings.workers > 1

    def bind() -> int:
        bound = _bind(server, f"{settings.host}:{settings.port}", security.server_credentials(), "gRPC port")
        if health_server is not None:
            _bind(health_server, f"{settings.host}:{settings.health_port}", None, "health port")
        return bound

    port = 0 if late_bind else bind()
    log.info("security", extra={
        "transport": security.transport, "auth": "bearer" if security.tokens is not None else "off",
        "auth_tokens": len(security.tokens.digests) if security.tokens is not None else 0,
        "health_port": settings.health_port})
    if security.tokens is not None and security.tls is None:
        log.warning("bearer tokens over plaintext: anyone on the network path can read them; set "
                    "FRAUDSCORE_TLS_CERT_FILE and FRAUDSCORE_TLS_KEY_FILE")
    if not late_bind:
        await server.start()
        if health_server is not None:
            await health_server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watchers = security.watchers

    def reload_requested() -> None:  # SIGHUP: rules and model (service/runtime/reload.py), the tokens and TLS files
        app.reloader.request()
        for watcher in watchers:
            watcher.request()

    loop.add_signal_handler(signal.SIGHUP, reload_requested)
    for watcher in watchers:
        watcher.start()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pipeline") as executor:
        await app.start(executor)
        _tune_gc()
        for name in ("", SERVICE_NAME):
            await health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if late_bind:
            port = bind()
            await server.start()
            if health_server is not None:
                await health_server.start()
        log.info("serving", extra={"port": port, "metrics_port": app.metrics_port, "health_port": settings.health_port,
                                   "transport": security.transport, "model_version": app.model_version,
                                   "ruleset_version": app.ruleset_version, "feature_set_version": app.feature_set_version})
        if ready is not None:
            ready(port)
        await stop.wait()
        log.info("draining", extra={"grace_s": settings.shutdown_grace_s})
        for name in ("", SERVICE_NAME):
            await health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        app.serving = False
        await server.stop(settings.shutdown_grace_s)
        for watcher in watchers:
            await watcher.stop()
        await app.stop()
        if health_server is not None:  # last: probes see NOT_SERVING, not a refused connection, while draining
            await health_server.stop(0)
    with contextlib.suppress(Exception):
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    log.info("stopped")
