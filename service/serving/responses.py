"""Answers as bytes: each ScoreResponse is serialized once, on the pipeline thread, where it is made.

The event loop is the server's busiest thread; the pipeline thread has room. An answer born as
bytes costs the loop nothing more: the idempotency record keeps the bytes as they are (it kept
serialized responses already, serializing each on the loop), a Score or ScoreStream answer is
sent as they are, and a ScoreBatch's answer is their concatenation, each framed as field 1 of
ScoreBatchResponse (`batch_response`), instead of a message copied and serialized again.

The encoding is protobuf's wire format for fraudscore.v1.ScoreResponse, field by field in
field-number order with proto3's rule for fields without presence (a zero value is left out; a
double only when all of its bits are zero, so -0.0 is written): byte for byte what
`ScoreResponse.SerializeToString()` gives (tests/service/serving/test_responses.py checks it
against protobuf for arbitrary answers). The API's field numbers never change (the .proto's
contract), and a test fails if a field is added to the message without being added here.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

_DOUBLE = struct.Struct("<d").pack
_ZERO_DOUBLE = bytes(8)
_SMALL = [bytes([n]) for n in range(0x80)]


def varint(n: int) -> bytes:
    """`n` (≥ 0, < 2**64) as a protobuf varint."""
    if n < 0x80:
        return _SMALL[n]
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_VARINTS = [varint(n) for n in range(1 << 14)]  # risk scores, enums and most latencies in µs: a lookup


def _varint_field(tag: bytes, n: int) -> bytes:
    """A varint field (proto3, no presence: nothing when 0)."""
    if not n:
        return b""
    return tag + (_VARINTS[n] if n < 1 << 14 else varint(n))


def _text_field(tag: bytes, text: str) -> bytes:
    if not text:
        return b""
    raw = text.encode()
    return tag + varint(len(raw)) + raw


def _double_field(tag: bytes, value: float) -> bytes:
    raw = _DOUBLE(value)
    return b"" if raw == _ZERO_DOUBLE else tag + raw


def batch_response(answers: Sequence[bytes]) -> bytes:
    """A serialized ScoreBatchResponse of serialized ScoreResponses (field 1, repeated, in order)."""
    return b"".join([b"\n" + varint(len(a)) + a for a in answers])


class ResponseWriter:
    """Serializes the ScoreResponses of a batch. One per pipeline; the pipeline thread's (a
    fallback answer on the event loop uses its own: `_reasons` is a cache, not thread-safe)."""

    __slots__ = ("_reasons", "_shared")

    def __init__(self) -> None:
        # (code, description) → the Reason's first two fields: reason codes come from a short list.
        self._reasons: dict[tuple[str, str], bytes] = {}
        # The fields a batch shares (degraded, the three versions): a model or rules reload adds one.
        self._shared: dict[tuple[bool, str, str, str], bytes] = {}

    def _batch_fields(self, degraded: bool, model_version: str, ruleset_version: str, feature_set_version: str) -> bytes:
        key = (degraded, model_version, ruleset_version, feature_set_version)
        shared = self._shared.get(key)
        if shared is None:
            if len(self._shared) >= 64:  # reloads over a long life: start over rather than grow
                self._shared.clear()
            shared = self._shared[key] = (b"8\x01" if degraded else b"") + _text_field(b"B", model_version) \
                + _text_field(b"J", ruleset_version) + _text_field(b"R", feature_set_version)
        return shared

    def _reason(self, code: str, description: str, weight: float) -> bytes:
        head = self._reasons.get((code, description))
        if head is None:
            head = self._reasons[(code, description)] = _text_field(b"\n", code) + _text_field(b"\x12", description)
        body = head + _double_field(b"\x19", weight)
        return b"*" + varint(len(body)) + body

    def write(self, transaction_ids: Sequence[str], probabilities: Sequence[float], risk_scores: Sequence[int],
              decisions: Sequence[int], sources: Sequence[int], reasons: Sequence[Sequence[object]], *,
              degraded: bool, model_version: str, ruleset_version: str, feature_set_version: str,
              latencies_us: Sequence[int]) -> list[bytes]:
        """One serialized ScoreResponse per transaction. `reasons[i]`: objects with `code`,
        `description` and `weight`. Fields shared by the batch are encoded once."""
        shared = self._batch_fields(degraded, model_version, ruleset_version, feature_set_version)
        out = []
        for i, txn_id in enumerate(transaction_ids):
            why = reasons[i]
            out.append(b"".join((
                _text_field(b"\n", txn_id),
                _double_field(b"\x11", probabilities[i]),
                _varint_field(b"\x18", risk_scores[i]),
                _varint_field(b" ", decisions[i]),
                b"".join([self._reason(r.code, r.description, r.weight) for r in why]) if why else b"",  # type: ignore[attr-defined]
                _varint_field(b"0", sources[i]),
                shared,
                _varint_field(b"X", latencies_us[i]),
            )))
        return out
