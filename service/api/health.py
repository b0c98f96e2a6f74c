"""The standard health service (grpc.health.v1) on the main port, and the plaintext health port
(FRAUDSCORE_HEALTH_PORT) that serves only its `Check`, for probes that can do neither TLS nor
tokens. Both report one status, set in one place (`Health.set`)."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from service.runtime.config import Settings

# Probes are few; the bound keeps a flood on the health port from queueing without limit.
HEALTH_PORT_MAX_CONCURRENT_RPCS = 16


class Health:
    """The main port's health servicer (Check and Watch) and the statuses it reports, kept in a
    plain dict as well, which the health port's `Check` reads."""

    def __init__(self) -> None:
        self.servicer = health.aio.HealthServicer()
        self.statuses: dict[str, health_pb2.HealthCheckResponse.ServingStatus.ValueType] = {}

    async def set(self, service: str, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> None:
        self.statuses[service] = status
        await self.servicer.set(service, status)


class CheckOnlyHealth(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    """The health port's servicer: `Check` answers from `Health.statuses` (a dict lookup); `Watch`
    is UNIMPLEMENTED. An open Watch stream would hold one of the port's few call slots for as long
    as its caller likes, and a handful of them would fail every probe."""

    def __init__(self, statuses: dict[str, health_pb2.HealthCheckResponse.ServingStatus.ValueType]) -> None:
        self._statuses = statuses

    async def Check(self, request: health_pb2.HealthCheckRequest,
                    context: grpc.aio.ServicerContext) -> health_pb2.HealthCheckResponse:
        status = self._statuses.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown service")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: health_pb2.HealthCheckRequest,
                    context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED,
                            "Watch is not served on the health port; poll Check (or Watch on the main port)")


def health_port_server(settings: Settings, status: Health) -> grpc.aio.Server | None:
    """FRAUDSCORE_HEALTH_PORT: plaintext, grpc.health.v1.Health/Check only, with the main port's
    status at every moment. Not bound here (the caller binds, as it binds the main port)."""
    if settings.health_port == 0:
        return None
    server = grpc.aio.server(maximum_concurrent_rpcs=HEALTH_PORT_MAX_CONCURRENT_RPCS,
                             options=[("grpc.so_reuseport", 1 if settings.workers > 1 else 0)])
    health_pb2_grpc.add_HealthServicer_to_server(CheckOnlyHealth(status.statuses), server)
    return server
