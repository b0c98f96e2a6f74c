"""The verdict a shared idempotency record gives a transaction (service/serving/shared_records.py)."""

from __future__ import annotations

from core.errors import IdempotencyConflictError, InFlightElsewhereError
from service.serving.shared_records import verdict

ME, OTHER = b"\x01" * 8, b"\x02" * 8


def record(status: bytes, fingerprint: int, owner: bytes, answer: bytes = b"") -> bytes:
    return status + fingerprint.to_bytes(8, "little") + owner + answer


def test_each_kind_of_record_gives_its_verdict() -> None:
    assert verdict(b"", 7, ME) is None  # none: claimed now, fresh
    assert verdict(record(b"A", 7, OTHER, b"first answer"), 7, ME) == b"first answer"
    assert verdict(record(b"A", 7, ME, b""), 7, ME) == b""  # an empty answer is still an answer
    assert isinstance(verdict(record(b"A", 8, OTHER, b"x"), 7, ME), IdempotencyConflictError)
    assert isinstance(verdict(record(b"C", 8, OTHER), 7, ME), IdempotencyConflictError)
    assert isinstance(verdict(record(b"C", 7, OTHER), 7, ME), InFlightElsewhereError)
    assert verdict(record(b"C", 7, ME), 7, ME) is None  # this server's own claim: a batch run again
    assert verdict(record(b"C", 2**64 - 1, OTHER), 2**64 - 1, OTHER) is None
