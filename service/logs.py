"""Structured logs: one JSON object per line on stderr, via orjson, with the request id of
the call a line is about (`request_id`, from the `x-request-id` metadata or generated).

Never pass identifiers (card, customer, merchant, device, IP, transaction id) or amounts to
a log call; log counts, codes and hashed ids only. As a second line of defence, fields
passed under those names are written as "[redacted]".
"""

from __future__ import annotations

import itertools
import logging
import re
import secrets
import sys
import traceback
from contextvars import ContextVar
from datetime import UTC, datetime

import orjson

from core.identifiers import looks_like_pan

_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}
_SENSITIVE = frozenset({"card_id", "customer_id", "merchant_id", "device_id", "ip_address", "transaction_id",
                        "amount", "amount_minor", "latitude", "longitude", "transaction", "request"})

# The id of the call being handled (set by service/calls.py for the handler's task); None elsewhere,
# e.g. on the pipeline thread, whose lines are about batches of many calls.
request_id: ContextVar[str | None] = ContextVar("fraudscore_request_id", default=None)
REQUEST_ID_HEADER = "x-request-id"
# What a client may send: a UUID, a trace id, a ULID… Anything else is replaced, not echoed.
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:+=/-]{1,128}")
# Runs of 13 or more digits, separators allowed between them (as core.identifiers reads a PAN).
_DIGIT_RUN = re.compile(r"[0-9][0-9._/-]{11,}[0-9]")
_DIGITS = re.compile(r"[0-9]{13,19}")
# Generated ids: a random per-process prefix and a counter (unique, and cheaper than uuid4 per call).
_GENERATED_PREFIX = secrets.token_hex(6)
_generated = itertools.count(1)


def valid_request_id(value: str) -> bool:
    """Whether a client-sent request id is usable: 1–128 characters of [A-Za-z0-9._:+=/-], with
    nothing in it that looks like a card number (it is logged and echoed: `carries_pan`)."""
    return _VALID_REQUEST_ID.fullmatch(value) is not None and not carries_pan(value)


def carries_pan(value: str) -> bool:
    """Whether `value`, or a run of digits in it (whole, or split at its separators), looks like a
    PAN (core.identifiers.looks_like_pan: 13–19 digits passing the Luhn check)."""
    if len(value) < 13:
        return False
    for run in _DIGIT_RUN.findall(value):
        if looks_like_pan(run) or any(looks_like_pan(d) for d in _DIGITS.findall(run)):
            return True
    return False


def new_request_id() -> str:
    return f"{_GENERATED_PREFIX}-{next(_generated):x}"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = request_id.get()
        if rid is not None:
            entry["request_id"] = rid
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = "[redacted]" if key in _SENSITIVE else value
        if record.exc_info and record.exc_info[0] is not None:
            # The frames and the exception's class, not its message: a message may quote input
            # (`KeyError('card-…')`), and input never reaches the log.
            entry["error"] = record.exc_info[0].__name__
            entry["traceback"] = "".join(traceback.format_tb(record.exc_info[2])) + record.exc_info[0].__name__
        return orjson.dumps(entry, default=str).decode()


def configure(level: str) -> None:
    """Send every fraudscore log line to stderr as JSON."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
