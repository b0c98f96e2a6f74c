"""Logs of a real server at DEBUG: JSON lines, a request id per call (the client's
`x-request-id` or a generated one, also in the trailing metadata), and none of the
identifiers, amounts or IPs it was sent, at any level."""

from __future__ import annotations

from pathlib import Path

import grpc
import orjson
import pytest
from fraudscore.v1 import fraudscore_pb2 as pb
from fraudscore.v1 import fraudscore_pb2_grpc as pb_grpc

from service.runtime.logs import carries_pan, valid_request_id
from tests.conftest import start_server
from tests.e2e.helpers import BASE_TIME_MS, txn, uid

# Distinctive values: none of them can turn up in a log line by coincidence.
AMOUNTS = [73_919_357, 61_827_493, 58_392_711, 44_718_263, 93_571_829, 81_264_397, 27_183_649]
IPS = ["198.51.100.213", "203.0.113.177", "192.0.2.219", "198.51.100.94", "203.0.113.58", "192.0.2.141",
       "198.51.100.37"]
PAN_LIKE = "4111111111111111"
PAN_REQUEST_IDS = ["5555555555554444", "req-6011-1111-1111-1117", "trace:378282246310005:7"]


def _trailing_request_id(call: grpc.Call) -> str | None:
    return dict(call.trailing_metadata() or ()).get("x-request-id")


def test_logs_carry_request_ids_and_no_identifier_amount_or_ip(tmp_path: Path, model_dir: Path) -> None:
    sent = [txn(amount_minor=a, ip_address=ip, customer_id=uid("cust"))
            for a, ip in zip(AMOUNTS, IPS, strict=True)]
    srv = start_server(tmp_path, model_dir=model_dir, extra_env={"FRAUDSCORE_LOG_LEVEL": "DEBUG"})
    try:
        with grpc.insecure_channel(srv.target) as ch:
            stub = pb_grpc.FraudScoringStub(ch)
            _, call = stub.Score.with_call(pb.ScoreRequest(transaction=sent[0]), timeout=10,
                                           metadata=(("x-request-id", "req-from-client-42"),))
            assert _trailing_request_id(call) == "req-from-client-42"
            _, call = stub.ScoreBatch.with_call(pb.ScoreBatchRequest(transactions=sent[1:4]), timeout=10,
                                                metadata=(("x-request-id", "bad id; " + "x" * 200),))
            generated = _trailing_request_id(call)
            assert generated and generated != "bad id; " + "x" * 200 and valid_request_id(generated)
            _, call = stub.Score.with_call(pb.ScoreRequest(transaction=sent[4]), timeout=10)
            assert _trailing_request_id(call) not in (None, generated)
            # A request id that carries a card number is replaced: neither echoed nor logged.
            for pan_id in PAN_REQUEST_IDS:
                _, call = stub.Score.with_call(pb.ScoreRequest(transaction=txn()), timeout=10,
                                               metadata=(("x-request-id", pan_id),))
                replaced = _trailing_request_id(call)
                assert replaced and replaced != pan_id and valid_request_id(replaced)
            list(stub.ScoreStream(iter([pb.ScoreRequest(transaction=t) for t in sent[5:]]), timeout=10))
            stub.ReportOutcome(pb.ReportOutcomeRequest(
                transaction_id=sent[0].transaction_id, card_id=sent[0].card_id, merchant_id=sent[0].merchant_id,
                outcome=pb.CHARGEBACK, reported_time_ms=BASE_TIME_MS + 60_000), timeout=10)
            # Refused calls: their (bad) input must not be echoed into the log either.
            for bad in (txn(card_id=PAN_LIKE), txn(currency="XX1", amount_minor=AMOUNTS[0])):
                with pytest.raises(grpc.RpcError) as err:
                    stub.Score(pb.ScoreRequest(transaction=bad), timeout=10,
                               metadata=(("x-request-id", "req-refused-7"),))
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert _trailing_request_id(err.value) == "req-refused-7"  # type: ignore[arg-type]
                sent.append(bad)
    finally:
        assert srv.stop() == 0
    log = srv.log()
    lines = [orjson.loads(line) for line in log.splitlines() if line.strip()]
    assert all(isinstance(entry, dict) and {"ts", "level", "msg"} <= entry.keys() for entry in lines)
    assert any(e["level"] == "DEBUG" for e in lines), "the server did not log at DEBUG"
    finished = [e for e in lines if e["msg"] == "call finished"]
    assert {"req-from-client-42", generated} <= {e.get("request_id") for e in finished}
    assert any(e.get("request_id") == "req-refused-7" and e["code"] == "INVALID_ARGUMENT" for e in finished)
    secrets = {PAN_LIKE, *IPS, *PAN_REQUEST_IDS, "6011-1111-1111-1117", "378282246310005"}
    for t in sent:
        secrets |= {t.transaction_id, t.card_id, t.customer_id, t.merchant_id, t.device_id, t.ip_address}
    for amount in AMOUNTS:
        secrets |= {str(amount), f"{amount / 100:.2f}", f"{amount / 100}"}
    leaked = sorted(s for s in secrets if s and s in log)
    assert not leaked, f"in the log: {leaked}"


def test_the_formatter_redacts_identifier_fields_and_exception_messages() -> None:
    import logging

    from service.runtime.logs import JsonFormatter, request_id

    def line(record_extra: dict[str, object], exc: BaseException | None = None) -> dict[str, object]:
        exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
        record = logging.LogRecord("fraudscore.test", logging.ERROR, __file__, 1, "what happened", None, exc_info)
        record.__dict__.update(record_extra)
        entry = orjson.loads(JsonFormatter().format(record))
        assert isinstance(entry, dict)
        return entry

    entry = line({"card_id": "card-secret", "ip_address": "198.51.100.1", "amount_minor": 73_919_357, "count": 3})
    assert entry["card_id"] == entry["ip_address"] == entry["amount_minor"] == "[redacted]"
    assert entry["count"] == 3 and "request_id" not in entry
    secret = "-".join(("card", "secret"))  # not in the source line the traceback shows
    try:
        raise KeyError(secret)
    except KeyError as exc:
        token = request_id.set("req-1")
        try:
            entry = line({}, exc)
        finally:
            request_id.reset(token)
    assert entry["error"] == "KeyError" and entry["request_id"] == "req-1"
    assert "card-secret" not in orjson.dumps(entry).decode()


@pytest.mark.parametrize(("value", "pan"), [
    ("4111111111111111", True), ("4111-1111-1111-1111", True), ("req-4111111111111111-2", True),
    ("a/6011.1111.1111.1117", True), ("20261126-4111111111111111", True),
    # Every separator the id's alphabet allows, and a card number inside a longer digit run.
    ("4111:1111:1111:1111", True), ("4111+1111+1111+1111", True), ("4111=1111=1111=1111", True),
    ("17000000004111111111111111", True),
    ("4111111111111112", True),  # not Luhn-valid, but 16 digits in a row: a request id never needs them
    ("4111-1111-1111-1112", False),  # grouped like a card number, but the Luhn check fails
    ("123e4567-e89b-12d3-a456-426614174000", False), ("12345678-1234-1234-1234-123456789012", False),
    ("req-from-client-42", False), ("01HZX3K9Q7V5J8M2N4P6R8T0W2", False), ("trace:1234567890ab", False),
    ("411111111111", False),
])
def test_request_ids_that_carry_a_card_number_are_not_valid(value: str, pan: bool) -> None:
    assert carries_pan(value) == pan
    assert valid_request_id(value) == (not pan)
