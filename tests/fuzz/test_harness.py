"""The atheris harness's promises can fail: its state check sees a change, and fires when refused
input touches the state (tests/e2e/test_fuzz.py runs the harness on hypothesis' inputs)."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
from fraudscore.v1 import fraudscore_pb2 as pb

from core.errors import InvalidInputError
from tests.fuzz import fuzz_score
from tests.fuzz.fuzz_score import _SEED, Harness, _snapshot


@functools.cache
def _harness() -> Harness:
    return Harness()


def _changed(before: list[np.ndarray], after: list[np.ndarray]) -> bool:
    return any(not np.array_equal(a, b, equal_nan=True) for a, b in zip(before, after, strict=True))


def test_a_scored_input_changes_the_state_the_check_compares() -> None:
    harness = _harness()
    before = _snapshot(harness.state)
    harness.one_input(_SEED[:1] + pb.ScoreRequest(transaction=pb.Transaction(
        transaction_id="harness-1", card_id="tok_harness", merchant_id="m_harness", amount_minor=100,
        currency="USD", event_time_ms=1_767_225_600_000)).SerializeToString())
    assert _changed(before, _snapshot(harness.state))


def test_undecodable_bytes_are_refused_naming_request_without_touching_state() -> None:
    harness = _harness()
    before = _snapshot(harness.state)
    harness.one_input(b"\x01\x0a\x05\x0a\x03\xff\xfe\xfd")  # transaction.transaction_id: not UTF-8
    harness.one_input(b"\x00\xff\xff\xff")  # not a message at all
    assert not _changed(before, _snapshot(harness.state))


def test_the_state_check_fires_when_a_refusal_leaves_a_trace(monkeypatch: pytest.MonkeyPatch) -> None:
    harness = _harness()

    def leaky(txn: pb.Transaction, prefix: str = "transaction.", **_: object) -> None:
        table = harness.state.tables()[0]
        array = next(a for a in (getattr(table, f.name) for f in dataclasses.fields(table)) if isinstance(a, np.ndarray))
        array.flat[0] += 1  # a validator that records something, then refuses
        raise InvalidInputError(prefix + "currency", "an ISO 4217 code")

    monkeypatch.setattr(fuzz_score, "validate_transaction", leaky)
    with pytest.raises(AssertionError, match="refused input changed the entity state"):
        harness.one_input(_SEED)


def test_a_refusal_naming_no_request_field_breaks_the_promise(monkeypatch: pytest.MonkeyPatch) -> None:
    def vague(txn: pb.Transaction, prefix: str = "transaction.", **_: object) -> None:
        raise InvalidInputError("something", "unclear")

    monkeypatch.setattr(fuzz_score, "validate_transaction", vague)
    with pytest.raises(AssertionError, match="names no request field"):
        _harness().one_input(_SEED)
