"""Fuzzing decode → validate → score with random and malformed requests (hypothesis).

Against one real server over a real channel, and in process through the atheris harness's
`one_input` (tests/fuzz/fuzz_score.py, which atheris drives coverage-guided; see its
docstring — atheris 3.0 installs from PyPI as a manylinux wheel on CPython 3.11, no clang
needed). Every call must come back within its deadline with an answer or a documented
status; a refusal is INVALID_ARGUMENT naming the field (or FAILED_PRECONDITION for a
reused id); refused input must change nothing (features, idempotency, outcomes); and the
server answers a good request afterwards.

Bytes that do not decode as the request message (corrupt wire format, invalid UTF-8 in a
string field) are refused INVALID_ARGUMENT naming `request` (the fuzzing first found them
answered UNKNOWN by grpc.aio itself, before any handler; service.api.validation.lenient).
"""

from __future__ import annotations

import functools
import itertools
import math
import time
from collections.abc import Iterator

import grpc
import pytest
from fraudscore.v1 import fraudscore_pb2 as pb
from fraudscore.v1 import fraudscore_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.errors import InvalidInputError
from service.api.validation import validate_outcome, validate_transaction
from tests.conftest import ServerProcess
from tests.e2e.helpers import BASE_TIME_MS, txn, uid, unique_ip
from tests.fuzz.fuzz_score import Harness

CALL_TIMEOUT_S = 10.0  # far above any answer: reaching it means a hang
SKEW_MS = 300_000  # FRAUDSCORE_MAX_CLOCK_SKEW_S's default
TXN_FIELDS = frozenset(f.name for f in pb.Transaction.DESCRIPTOR.fields)
# Each example is a few local calls (~1 ms each): the whole module runs in seconds after the server starts.
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_seconds = itertools.count(1)

# Text a payment switch should never send: control and format characters, separators,
# lone combining marks, very long strings (surrogates cannot be encoded by protobuf at all).
weird_text = st.one_of(
    st.text(st.characters(exclude_categories=["Cs"]), max_size=40),
    st.sampled_from(["", " ", "\x00", "a\x00b", "\n", "\t", "\u200b", "\u2028", "\ufeff", "\u202e",
                     "x" * 129, "x" * 10_000, "💳" * 129, "\u0301"]),
)


@st.composite
def pan(draw: st.DrawFn) -> str:
    """A 13–19 digit number passing the Luhn check: what a raw card number looks like."""
    digits = draw(st.lists(st.integers(0, 9), min_size=12, max_size=18))
    total = 0
    for i, d in enumerate(reversed(digits)):
        total += (d * 2 - 9 if d * 2 > 9 else d * 2) if i % 2 == 0 else d
    return "".join(map(str, digits)) + str((10 - total % 10) % 10)


INT64 = st.integers(-(2**63), 2**63 - 1)
BAD: dict[str, st.SearchStrategy[object]] = {
    "transaction_id": st.sampled_from(["", "x" * 129, "a\nb", "\x00", "\u2028"]),
    "card_id": st.one_of(pan(), st.sampled_from(["", "x" * 129, "tok\x7f"])),
    "merchant_id": st.sampled_from(["", "m" * 129, "m\tx"]),
    "customer_id": st.sampled_from(["c" * 129, "c\x1bx"]),
    "device_id": st.sampled_from(["d" * 129, "d\rx"]),
    "amount_minor": st.one_of(st.integers(-(2**63), 0), st.integers(10**15 + 1, 2**63 - 1)),
    "currency": st.one_of(st.sampled_from(["", "usd", "US", "USDX", "€€€", "ÜSD", "U D", "123"]),
                          st.text(max_size=6).filter(lambda s: not (len(s) == 3 and s.isascii() and s.isupper()
                                                                    and s.isalpha()))),
    "event_time_ms": st.sampled_from([0, -1, 1_767_225_600, 1_767_225_600_000_000, 2**63 - 1, -(2**63),
                                      int(time.time() * 1000) + 86_400_000]),
    "channel": st.one_of(st.integers(5, 2**31 - 1), st.integers(-(2**31), -1)),
    "country": st.sampled_from(["usa", "u", "12", "us", "ÜS"]),
    "merchant_category": st.sampled_from(["541", "54111", "abcd", "５４１１"]),
    "latitude": st.sampled_from([math.nan, math.inf, -math.inf, 90.0001, -1e300]),
    "longitude": st.sampled_from([math.nan, math.inf, -math.inf, 180.5, 1e300]),
    "ip_address": st.sampled_from(["999.1.1.1", "not-an-ip", "::g", "1.2.3", "10.0.0.1/24"]),
}
# Random values of every field: valid or not, validate_transaction is the oracle.
RANDOM: dict[str, st.SearchStrategy[object]] = {
    "transaction_id": weird_text, "card_id": st.one_of(weird_text, pan()), "merchant_id": weird_text,
    "customer_id": weird_text, "device_id": weird_text, "amount_minor": INT64, "currency": weird_text,
    "event_time_ms": INT64, "channel": st.integers(-(2**31), 2**31 - 1), "country": weird_text,
    "merchant_category": weird_text, "latitude": st.floats(), "longitude": st.floats(),
    "ip_address": st.one_of(weird_text, st.ip_addresses().map(str)),
}


@pytest.fixture(scope="module")
def stub(server: ServerProcess) -> Iterator[pb_grpc.FraudScoringStub]:
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.FraudScoringStub(channel)


def _good(**overrides: object) -> pb.Transaction:
    """A valid transaction, a fresh second of event time after the last (time runs forward per card)."""
    fields: dict[str, object] = {"event_time_ms": BASE_TIME_MS + next(_seconds) * 1000}
    fields.update(overrides)
    return txn(**fields)


def _with(base: pb.Transaction, field: str, value: object) -> pb.Transaction:
    t = pb.Transaction()
    t.CopyFrom(base)
    if field in ("latitude", "longitude") and value is None:
        t.ClearField(field)
    else:
        setattr(t, field, value)
    return t


def _call(fn: grpc.UnaryUnaryMultiCallable, request: object) -> tuple[grpc.StatusCode, object]:
    try:
        return grpc.StatusCode.OK, fn(request, timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as exc:
        assert exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED, "the call hung"
        return exc.code(), exc.details()


def _expected_refusal(t: pb.Transaction, prefix: str = "transaction.") -> InvalidInputError | None:
    try:
        validate_transaction(t, prefix=prefix, latest_ms=int(time.time() * 1000) + SKEW_MS)
    except InvalidInputError as exc:
        return exc
    return None


def _assert_refused(code: grpc.StatusCode, details: object, field: str) -> None:
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    assert isinstance(details, str) and details.startswith(f"{field}:"), (field, details)


def _assert_healthy(server: ServerProcess, stub: pb_grpc.FraudScoringStub) -> None:
    assert server.proc.poll() is None, server.log()
    with grpc.insecure_channel(server.target) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    good = _good()
    assert stub.Score(pb.ScoreRequest(transaction=good), timeout=CALL_TIMEOUT_S).transaction_id == good.transaction_id


def _answer_key(r: pb.ScoreResponse) -> tuple[object, ...]:
    return (r.fraud_probability, r.decision, r.source, r.degraded, tuple((x.code, x.weight) for x in r.reasons))


@FUZZ
@given(field=st.sampled_from(sorted(BAD)), data=st.data())
def test_each_malformed_field_is_refused_by_name(stub: pb_grpc.FraudScoringStub, field: str,
                                                 data: st.DataObject) -> None:
    value = data.draw(BAD[field], label=field)
    t = _with(_good(), field, value)
    code, details = _call(stub.Score, pb.ScoreRequest(transaction=t))
    _assert_refused(code, details, f"transaction.{field}")
    # The same transaction at index 2 of a batch refuses the whole batch, naming the index.
    batch = [_good(), _good(), t]
    code, details = _call(stub.ScoreBatch, pb.ScoreBatchRequest(transactions=batch))
    _assert_refused(code, details, f"transactions[2].{field}")


@FUZZ
@given(values=st.fixed_dictionaries({}, optional=RANDOM), drop_location=st.booleans())
def test_random_transactions_are_answered_or_refused_as_validation_says(
        stub: pb_grpc.FraudScoringStub, values: dict[str, object], drop_location: bool) -> None:
    t = _good()
    if drop_location:
        t = _with(_with(t, "latitude", None), "longitude", None)
    for field, value in values.items():
        t = _with(t, field, value)
    expected = _expected_refusal(t)
    code, answer = _call(stub.Score, pb.ScoreRequest(transaction=t))
    if expected is None and code == grpc.StatusCode.FAILED_PRECONDITION and "transaction_id" in values:
        return  # hypothesis drew an id it had used before, with another payload: a conflict, as documented
    if expected is None:
        assert code == grpc.StatusCode.OK, (code, answer)
        assert isinstance(answer, pb.ScoreResponse) and answer.transaction_id == t.transaction_id
        assert 0.0 <= answer.fraud_probability <= 1.0 and not answer.degraded
    else:
        _assert_refused(code, answer, expected.field)
        assert expected.field.rsplit(".", 1)[1] in TXN_FIELDS


def _world() -> dict[str, object]:
    """Fresh identifiers for every entity, so two worlds start from identical (empty) state."""
    return {"card_id": uid("card"), "customer_id": uid("cust"), "merchant_id": uid("m"), "device_id": uid("dev"),
            "ip_address": unique_ip()}


@settings(max_examples=40, deadline=None)
@given(refused=st.lists(st.sampled_from(sorted(set(BAD) - {"card_id"})).flatmap(
    lambda f: st.tuples(st.just(f), BAD[f])), min_size=1, max_size=4))
def test_refused_input_changes_no_state(stub: pb_grpc.FraudScoringStub,
                                        refused: list[tuple[str, object]]) -> None:
    """A card scored, then sent refused transactions, then scored again, answers exactly like a
    control card that never saw the refused ones; their ids and outcome reports stay unused."""
    start = BASE_TIME_MS + next(_seconds) * 1000
    answers = []
    refused_ids = []
    for world, send_refused in ((_world(), True), (_world(), False)):
        first = txn(**world, event_time_ms=start, amount_minor=3_000)
        answers.append([stub.Score(pb.ScoreRequest(transaction=first), timeout=CALL_TIMEOUT_S)])
        if send_refused:
            for k, (field, value) in enumerate(refused):
                bad = _with(txn(**world, event_time_ms=start + 1_000 * (k + 1), amount_minor=90_000), field, value)
                code, details = _call(stub.Score, pb.ScoreRequest(transaction=bad))
                _assert_refused(code, details, f"transaction.{field}")
                ok = txn(**_world(), event_time_ms=start)  # refused with its batch: not recorded either
                code, details = _call(stub.ScoreBatch, pb.ScoreBatchRequest(transactions=[ok, bad]))
                _assert_refused(code, details, f"transactions[1].{field}")
                refused_ids += [ok.transaction_id] if field == "transaction_id" else [bad.transaction_id,
                                                                                       ok.transaction_id]
            for report in _bad_reports(first):
                code, details = _call(stub.ReportOutcome, report)
                assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
        second = txn(**world, event_time_ms=start + 60_000, amount_minor=3_000)
        answers[-1].append(stub.Score(pb.ScoreRequest(transaction=second), timeout=CALL_TIMEOUT_S))
        report = pb.ReportOutcomeRequest(transaction_id=first.transaction_id, card_id=first.card_id,
                                         merchant_id=first.merchant_id, outcome=pb.CONFIRMED_FRAUD,
                                         reported_time_ms=start + 120_000)
        assert stub.ReportOutcome(report, timeout=CALL_TIMEOUT_S).accepted  # no refused report was recorded
    assert [_answer_key(a) for a in answers[0]] == [_answer_key(a) for a in answers[1]]
    # The ids of refused transactions (and of good ones refused with their batch) were not remembered:
    # a different payload under the same id is a new transaction, not a conflict.
    for txn_id in refused_ids:
        code, answer = _call(stub.Score, pb.ScoreRequest(transaction=_good(transaction_id=txn_id)))
        assert code == grpc.StatusCode.OK, (code, answer)


def _bad_reports(t: pb.Transaction) -> list[pb.ReportOutcomeRequest]:
    good = pb.ReportOutcomeRequest(transaction_id=t.transaction_id, card_id=t.card_id, merchant_id=t.merchant_id,
                                   outcome=pb.CONFIRMED_FRAUD, reported_time_ms=t.event_time_ms + 1_000)
    bad = []
    for field, value in (("outcome", 0), ("outcome", 9), ("reported_time_ms", 0),
                         ("reported_time_ms", int(time.time() * 1000) + 86_400_000), ("card_id", "4111111111111111"),
                         ("merchant_id", ""), ("card_id", "x" * 129)):
        r = pb.ReportOutcomeRequest()
        r.CopyFrom(good)
        setattr(r, field, value)
        try:
            validate_outcome(r, latest_ms=int(time.time() * 1000) + SKEW_MS)
        except InvalidInputError as exc:
            assert exc.field == field
        else:
            raise AssertionError(f"{field}={value!r} should be refused")
        bad.append(r)
    return bad


def test_reused_ids_with_other_payloads_conflict_and_record_nothing(stub: pb_grpc.FraudScoringStub) -> None:
    first = _good()
    answer = stub.Score(pb.ScoreRequest(transaction=first), timeout=CALL_TIMEOUT_S)
    assert stub.Score(pb.ScoreRequest(transaction=first), timeout=CALL_TIMEOUT_S) == answer  # a retry
    changed = _with(first, "amount_minor", first.amount_minor + 1)
    code, _ = _call(stub.Score, pb.ScoreRequest(transaction=changed))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    # Two payloads under one id inside a batch: the whole batch is refused, its other member unrecorded.
    twin, other = _good(), _good()
    code, _ = _call(stub.ScoreBatch, pb.ScoreBatchRequest(
        transactions=[twin, other, _with(twin, "merchant_category", "5999")]))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    code, _ = _call(stub.Score, pb.ScoreRequest(transaction=_with(other, "amount_minor", 1)))
    assert code == grpc.StatusCode.OK


def test_oversized_and_empty_batches_and_messages(server: ServerProcess, stub: pb_grpc.FraudScoringStub) -> None:
    for n in (0, 1001, 5000):
        code, details = _call(stub.ScoreBatch, pb.ScoreBatchRequest(transactions=[_good() for _ in range(n)]))
        _assert_refused(code, details, "transactions")
    code, details = _call(stub.Score, pb.ScoreRequest())
    _assert_refused(code, details, "transaction")
    # A 1 MB identifier is refused by validation; a message over gRPC's 4 MB receive limit by gRPC itself.
    code, details = _call(stub.Score, pb.ScoreRequest(transaction=_good(merchant_id="m" * 1_000_000)))
    _assert_refused(code, details, "transaction.merchant_id")
    code, _ = _call(stub.Score, pb.ScoreRequest(transaction=_good(merchant_id="m" * 5_000_000)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    _assert_healthy(server, stub)


# What the server may answer to bytes that are a message: an answer or the service's refusal.
RAW_CODES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.OK}


def _mutated(at: int, junk: bytes, overwrite: bool) -> bytes:
    """A valid serialized ScoreRequest (the same wire layout as a ScoreBatchRequest of one) with
    bytes inserted or overwritten: broken lengths, tags, varints and UTF-8."""
    good = pb.ScoreRequest(transaction=_good()).SerializeToString()
    at %= len(good)
    return good[:at] + junk + good[at + len(junk) if overwrite else at:]


@FUZZ
@given(method=st.sampled_from(["Score", "ScoreBatch", "ReportOutcome"]),
       body=st.one_of(st.binary(max_size=300),
                      st.builds(_mutated, st.integers(0, 10_000), st.binary(min_size=1, max_size=8), st.booleans())))
def test_random_bytes_as_messages(server: ServerProcess, method: str, body: bytes) -> None:
    with grpc.insecure_channel(server.target) as channel:
        call = channel.unary_unary(f"/fraudscore.v1.FraudScoring/{method}")  # bytes in, bytes out
        code, details = _call(call, body)
    assert code in RAW_CODES, (code, details)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        assert isinstance(details, str) and details.split(":", 1)[0].rsplit(".", 1)[-1].split("[")[0] in (
            TXN_FIELDS | {"transaction", "transactions", "outcome", "reported_time_ms", "request"}), details


@settings(max_examples=200, deadline=None)
@given(body=st.binary(max_size=400))
def test_atheris_harness_on_random_bytes(body: bytes) -> None:
    """The in-process harness (decode → validate → Pipeline.run) holds its promises on random input."""
    _harness().one_input(body)


@settings(max_examples=150, deadline=None)
@given(t=st.fixed_dictionaries({}, optional=RANDOM).map(lambda v: _apply(_good(), v)), kind=st.sampled_from([0, 1]))
def test_atheris_harness_on_random_transactions(t: pb.Transaction, kind: int) -> None:
    message = pb.ScoreBatchRequest(transactions=[t]) if kind == 0 else pb.ScoreRequest(transaction=t)
    _harness().one_input(bytes([kind]) + message.SerializeToString())


def _apply(t: pb.Transaction, values: dict[str, object]) -> pb.Transaction:
    for field, value in values.items():
        t = _with(t, field, value)
    return t


def test_invalid_utf8_in_a_string_field(server: ServerProcess, stub: pb_grpc.FraudScoringStub) -> None:
    body = pb.ScoreRequest(transaction=_good(card_id="\x01\x02\x03")).SerializeToString()
    assert body.count(b"\x01\x02\x03") == 1
    with grpc.insecure_channel(server.target) as channel:
        code, details = _call(channel.unary_unary("/fraudscore.v1.FraudScoring/Score"),
                              body.replace(b"\x01\x02\x03", b"\xff\xfe\xc3"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    assert str(details).startswith("request: a serialized fraudscore.v1.ScoreRequest (got bytes that do not parse"), details
    _assert_healthy(server, stub)


def test_a_stream_message_that_does_not_parse_ends_the_stream_naming_its_index(
        server: ServerProcess, stub: pb_grpc.FraudScoringStub) -> None:
    good = pb.ScoreRequest(transaction=_good()).SerializeToString()
    bad = pb.ScoreRequest(transaction=_good(card_id="\x01\x02\x03")).SerializeToString().replace(
        b"\x01\x02\x03", b"\xff\xfe\xc3")
    with grpc.insecure_channel(server.target) as channel:
        call = channel.stream_stream("/fraudscore.v1.FraudScoring/ScoreStream")(iter([good, bad]), timeout=CALL_TIMEOUT_S)
        first = pb.ScoreResponse.FromString(next(call))
        with pytest.raises(grpc.RpcError) as caught:
            next(call)
    assert first.decision in (pb.APPROVE, pb.REVIEW, pb.DECLINE)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert str(caught.value.details()).startswith("stream[1]: a serialized fraudscore.v1.ScoreRequest")
    _assert_healthy(server, stub)


@functools.cache
def _harness() -> Harness:
    return Harness()


def test_server_still_healthy_after_fuzzing(server: ServerProcess, stub: pb_grpc.FraudScoringStub) -> None:
    _assert_healthy(server, stub)
    assert "Traceback" not in server.log(), server.log()[-4000:]
