"""The one error tree of fraudscore.

    FraudscoreError                      base; never raised itself
    ├── InvalidInputError                a request or a file broke a documented rule (field, rule, value)
    ├── ModelLoadError                   a model file or directory cannot be used (path, reason)
    ├── RulesLoadError                   a rules file cannot be used (path, reason)
    ├── DataError                        a history file cannot be read (path, row, column, reason)
    ├── IdempotencyConflictError         a transaction_id was seen before with a different payload
    └── StateStoreError                  a state store broke its contract, or a batch cannot be worked (kind, reason)

Each subclass carries structured fields; `service/api/errors.py` is the one place that maps
them to gRPC status codes. Messages say what was expected, what arrived and what to do,
and never contain a card, customer, device or IP identifier in clear.
"""

from __future__ import annotations


class FraudscoreError(Exception):
    """Base class of every error fraudscore raises on purpose."""


class InvalidInputError(FraudscoreError):
    """A value broke a documented rule. `field` names it, `rule` says what was expected."""

    def __init__(self, field: str, rule: str, *, got: str | None = None) -> None:
        self.field = field
        self.rule = rule
        self.got = got
        detail = f"{field}: {rule}"
        if got is not None:
            detail += f" (got {got})"
        super().__init__(detail)


class ModelLoadError(FraudscoreError):
    """A model cannot be loaded; `reason` says why and what to do."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"cannot load model {path}: {reason}")


class RulesLoadError(FraudscoreError):
    """A rules file cannot be loaded; `reason` names the rule and the problem."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"cannot load rules {path}: {reason}")


class DataError(FraudscoreError):
    """A history file cannot be used; names the file, and the row and column where known."""

    def __init__(self, path: str, reason: str, *, row: int | None = None, column: str | None = None) -> None:
        self.path = path
        self.reason = reason
        self.row = row
        self.column = column
        where = path
        if row is not None:
            where += f", row {row}"
        if column is not None:
            where += f", column {column!r}"
        super().__init__(f"{where}: {reason}")


class TrainingError(FraudscoreError):
    """Training cannot produce a trustworthy model from this history with these settings."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class IdempotencyConflictError(FraudscoreError):
    """The transaction_id was scored before with a different payload."""

    def __init__(self) -> None:
        super().__init__(
            "transaction_id was already scored with a different payload; "
            "a retry must resend the identical transaction, a new transaction needs a new id"
        )


class InFlightElsewhereError(FraudscoreError):
    """The transaction_id's first call is still being answered by another server (a shared store)."""

    def __init__(self) -> None:
        super().__init__(
            "transaction_id is being scored by another server right now; retry in a moment "
            "(the retry gets that first answer)"
        )


class StateStoreError(FraudscoreError):
    """A state store returned rows the engine cannot use, or a batch's entities cannot be worked on."""

    def __init__(self, kind: str, reason: str) -> None:
        self.kind = kind
        self.reason = reason
        super().__init__(f"{kind} state: {reason}")


class StateStoreUnavailableError(FraudscoreError):
    """The shared state store could not be reached, answered too late, or failed a command.

    The batch's transactions are answered by the fallback rules (degraded, reason
    `state_store_unavailable`) and do not enter the state; the next batch tries again."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"state store unavailable: {reason}")
