"""Call plumbing shared by the RPC handlers: per-method metrics, the request id, the one place
errors become status codes, and waiting for answers without cancelling the work behind them."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import wraps
from typing import Any, Protocol, TypeVar

import grpc

from core.errors import FraudscoreError
from service.api.errors import status_of
from service.runtime import logs
from service.runtime.metrics import Metrics

log = logging.getLogger("fraudscore.server")
R = TypeVar("R")
# grpc's deadline timer may cancel a handler a hair before our clock says the deadline passed.
DEADLINE_SLACK_S = 0.01


class HasCalls(Protocol):
    calls: dict[str, Calls]


class Gate:
    """The FraudScoring calls in the server now (`fraudscore_calls_in_flight`). The limit is gRPC's
    (FRAUDSCORE_MAX_CONCURRENT_RPCS), enforced before any handler runs, so a call past it never
    reaches this count. Event loop only (plain int arithmetic: ~0.01 µs a call)."""

    __slots__ = ("in_flight",)

    def __init__(self) -> None:
        self.in_flight = 0

    def enter(self) -> None:
        self.in_flight += 1

    def leave(self) -> None:
        self.in_flight -= 1


class Calls:
    """One method's request metrics, their children looked up once (a label lookup per call
    costs more than the count itself), and the server's `Gate`."""

    __slots__ = ("_by_code", "_duration", "_requests", "gate", "method")

    def __init__(self, metrics: Metrics, method: str, gate: Gate) -> None:
        self._requests, self._duration, self.method = metrics.requests, metrics.request_duration, method
        self._by_code: dict[grpc.StatusCode, tuple[Any, Any]] = {}
        self.gate = gate

    def count(self, code: grpc.StatusCode, started: float) -> None:
        children = self._by_code.get(code)
        if children is None:
            children = self._by_code[code] = (self._requests.labels(self.method, code.name),
                                              self._duration.labels(self.method, code.name))
        took = time.perf_counter() - started
        children[0].inc()
        children[1].observe(took)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("call finished", extra={"method": self.method, "code": code.name,
                                              "duration_ms": round(took * 1000, 3)})


def start_call(context: grpc.aio.ServicerContext) -> contextvars.Token[str | None]:
    """The call's request id: the client's `x-request-id` if it sent a valid one, else a new one.
    Set for the handler's log lines and sent back in the trailing metadata."""
    rid = None
    for key, value in context.invocation_metadata() or ():
        if key == logs.REQUEST_ID_HEADER:
            if isinstance(value, str) and logs.valid_request_id(value):
                rid = value
            break
    if rid is None:
        rid = logs.new_request_id()
    context.set_trailing_metadata(((logs.REQUEST_ID_HEADER, rid),))
    return logs.request_id.set(rid)


def end_call(token: contextvars.Token[str | None]) -> None:
    # A stream's generator may be closed from another task (its context then differs): nothing to undo there.
    with contextlib.suppress(ValueError):
        logs.request_id.reset(token)


def refused_call(calls: Calls | None, context: grpc.aio.ServicerContext, started: float,
                 code: grpc.StatusCode) -> None:
    """A call refused before its handler (no accepted token): its request id, and, for a method of
    ours (`calls`; None for health or reflection: a bounded label set), its count and duration."""
    token = start_call(context)
    try:
        if calls is not None:
            calls.count(code, started)
    finally:
        end_call(token)


async def _failed(exc: BaseException, calls: Calls, started: float, context: grpc.aio.ServicerContext) -> None:
    """The one place errors become status codes. Counts the call, then ends it (re-raising a
    cancellation). An error is counted before `context.abort` sends its status: a client
    that reads the metrics right after its error must find it there."""
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        # grpc cancels the handler (or closes a stream's generator) when the client goes away
        # or its deadline passes.
        _count_gone(calls, started, context)
        raise exc
    if not isinstance(exc, FraudscoreError):
        log.exception("unexpected error in %s", calls.method, exc_info=exc)
    code, message = status_of(exc)
    if log.isEnabledFor(logging.DEBUG):  # the class only: an error's text may quote the input
        log.debug("call refused", extra={"method": calls.method, "code": code.name, "error": type(exc).__name__})
    calls.count(code, started)
    await _abort(context, code, message)


@contextlib.asynccontextmanager
async def observed(calls: Calls, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
    """`_failed` around a streaming call, with its request id; counts it OK when it ends without error."""
    started = time.perf_counter()
    token = start_call(context)
    entered = False
    try:
        calls.gate.enter()
        entered = True
        yield
    except BaseException as exc:  # _failed re-raises what it does not answer
        await _failed(exc, calls, started, context)
    else:
        if context.cancelled():  # a stream the client left while we were still sending: not OK
            _count_gone(calls, started, context)
        else:
            calls.count(grpc.StatusCode.OK, started)
    finally:
        if entered:
            calls.gate.leave()
        end_call(token)


def _count_gone(calls: Calls, started: float, context: grpc.aio.ServicerContext) -> None:
    """Count a call whose client went away: DEADLINE_EXCEEDED if its deadline passed, else CANCELLED."""
    remaining = context.time_remaining()
    expired = remaining is not None and remaining <= DEADLINE_SLACK_S
    calls.count(grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED, started)


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> None:
    """End the call with a status; a call already ended (the client's deadline passed or it
    went away) has no one to tell, and grpc would log a failed send for every such call."""
    if context.done():
        raise asyncio.CancelledError
    await context.abort(code, message)


def unary(method: str) -> Callable[[Callable[..., Awaitable[R]]], Callable[..., Awaitable[R]]]:
    def decorate(fn: Callable[..., Awaitable[R]]) -> Callable[..., Awaitable[R]]:
        @wraps(fn)
        async def handler(self: HasCalls, request: Any, context: grpc.aio.ServicerContext) -> R:
            calls = self.calls[method]
            started = time.perf_counter()
            token = start_call(context)
            try:
                try:
                    calls.gate.enter()
                    try:
                        result = await fn(self, request, context)
                    finally:
                        calls.gate.leave()
                except BaseException as exc:  # _failed re-raises what it does not answer
                    await _failed(exc, calls, started, context)
                    raise AssertionError("unreachable: errors end in context.abort, which raises") from exc
                calls.count(grpc.StatusCode.OK, started)
                return result
            finally:
                end_call(token)
        return handler
    return decorate


async def answers(futures: list[asyncio.Future[Any]]) -> list[Any]:
    """The results of `futures`, in order, once all are done (the first error in that order raised).

    Cancelling the waiting call leaves the futures alone: accepted work is finished and
    remembered for a retry. Waits in order, for one future at a time: the pipeline answers a
    batch's futures together, so a ScoreBatch of 256 waits about once per pipeline batch, not once
    per transaction (a done-callback per future was a tenth of the event loop's time under
    ScoreBatch load; `gather` of `shield`s before that, two futures and four callbacks each).
    """
    loop = asyncio.get_running_loop()
    for f in futures:
        if not f.done():
            waiter = loop.create_future()  # cancelled with the call; `f` is not
            f.add_done_callback(functools.partial(_wake, waiter))
            await waiter
    return [f.result() for f in futures]


def _wake(waiter: asyncio.Future[None], _: asyncio.Future[Any]) -> None:
    if not waiter.done():
        waiter.set_result(None)
