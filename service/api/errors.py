"""Service-side errors and the one table that maps every error to a gRPC status code. (Calls past
FRAUDSCORE_MAX_CONCURRENT_RPCS are refused by gRPC itself, before any handler: RESOURCE_EXHAUSTED.)

    FraudscoreError (core.errors)
    ├── InvalidInputError ............ INVALID_ARGUMENT   (bad request; nothing changed)
    ├── IdempotencyConflictError ..... FAILED_PRECONDITION (same id, different payload)
    ├── InFlightElsewhereError ....... ABORTED            (same id, first call still in flight on another server; retry)
    ├── OverloadedError .............. RESOURCE_EXHAUSTED (shed: queue full; retry with backoff)
    ├── StreamTooLongError ........... RESOURCE_EXHAUSTED (a stream past its message limit; open a new one)
    ├── DeadlineExpiredError ......... DEADLINE_EXCEEDED  (deadline passed before any work)
    ├── NotServingError .............. UNAVAILABLE        (starting or draining; retry elsewhere)
    ├── StateStoreUnavailableError ... UNAVAILABLE        (an outcome report the shared store could not take; retry)
    └── anything else ................ INTERNAL           (text never sent: it may hold identifiers)
"""

from __future__ import annotations

import grpc

from core.errors import (
    FraudscoreError,
    IdempotencyConflictError,
    InFlightElsewhereError,
    InvalidInputError,
    StateStoreUnavailableError,
)


class OverloadedError(FraudscoreError):
    """Shed: `reason` is the `fraudscore_sheds_total` label ("queue_full": transactions waiting for
    an answer; "answered_backlog_full": transactions answered by the fallback still waiting to enter
    the state)."""

    def __init__(self, queued: int, limit: int, *, reason: str = "queue_full") -> None:
        self.queued = queued
        self.limit = limit
        self.reason = reason
        what = ("transactions answered by the fallback waiting to enter the state" if reason == "answered_backlog_full"
                else "transactions queued")
        super().__init__(f"server overloaded: {queued} {what}, limit {limit}; retry with backoff")


class StreamTooLongError(FraudscoreError):
    def __init__(self, limit: int) -> None:
        self.limit = limit
        super().__init__(f"a ScoreStream carries at most {limit} messages (FRAUDSCORE_MAX_STREAM_MESSAGES); "
                         "every message before this one was answered: open a new stream for the rest")


class DeadlineExpiredError(FraudscoreError):
    def __init__(self) -> None:
        super().__init__("deadline passed before scoring started; nothing was scored or recorded")


class NotServingError(FraudscoreError):
    def __init__(self, why: str) -> None:
        super().__init__(f"not serving: {why}; retry on another replica or later")


_STATUS: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (InvalidInputError, grpc.StatusCode.INVALID_ARGUMENT),
    (IdempotencyConflictError, grpc.StatusCode.FAILED_PRECONDITION),
    (InFlightElsewhereError, grpc.StatusCode.ABORTED),
    (OverloadedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (StreamTooLongError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (DeadlineExpiredError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (NotServingError, grpc.StatusCode.UNAVAILABLE),
    (StateStoreUnavailableError, grpc.StatusCode.UNAVAILABLE),
)


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status and the message safe to send to the caller."""
    for cls, code in _STATUS:
        if isinstance(exc, cls):
            return code, str(exc)
    return grpc.StatusCode.INTERNAL, "internal error; the server log has the details"
