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

from core.identifiers import luhn_ok

_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}
_SENSITIVE = frozenset({"card_id", "customer_id", "merchant_id", "device_id", "ip_address", "transaction_id",
                        "amount", "amount_minor", "latitude", "longitude", "transaction", "request"})

# The id of the call being handled (set by service/api/calls.py for the handler's task); None elsewhere,
# e.g. on the pipeline thread, whose lines are about batches of many calls.
request_id: ContextVar[str | None] = ContextVar("fraudscore_request_id", default=None)
REQUEST_ID_HEADER = "x-request-id"
# What a client may send: a UUID, a trace id, a ULID… Anything else is replaced, not echoed.
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:+=/-]{1,128}")
# 13 or more digits in a row: as long as the shortest PAN, whole or inside a longer run.
_DIGIT_RUN = re.compile(r"[0-9]{13,}")
# Digits in groups of at most 6 between separators, as card numbers are written (4111-1111-…,
# 3782-822463-10005); a UUID's 8- and 12-character groups never match.
_GROUPED = re.compile(r"(?<![0-9])[0-9]{1,6}(?:[._:+=/-][0-9]{1,6})+(?![0-9])")
_SEPARATORS = str.maketrans("", "", "._:+=/-")
# Generated ids: a random per-process prefix and a counter (unique, and cheaper than uuid4 per call).
_GENERATED_PREFIX = secrets.token_hex(6)
_generated = itertools.count(1)


def valid_request_id(value: str) -> bool:
    """Whether a client-sent request id is usable: 1–128 characters of [A-Za-z0-9._:+=/-], with
    nothing in it that could be a card number (it is logged and echoed: `carries_pan`)."""
    return _VALID_REQUEST_ID.fullmatch(value) is not None and not carries_pan(value)


def carries_pan(value: str) -> bool:
    """Whether `value` could carry a card number: 13 or more digits in a row (a request id never
    needs them; a long decimal id is replaced too, docs/security.md), or digits grouped as a card
    number is written whose 13–19 digits pass the Luhn check."""
    if len(value) < 13:
        return False
    if _DIGIT_RUN.search(value):
        return True
    for grouped in _GROUPED.findall(value):
        digits = grouped.translate(_SEPARATORS)
        if 13 <= len(digits) <= 19 and luhn_ok(digits):
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
