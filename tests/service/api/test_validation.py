from __future__ import annotations

import ipaddress

import pytest
from fraudscore.v1 import fraudscore_pb2 as pb
from hypothesis import given
from hypothesis import strategies as st

from core.errors import InvalidInputError
from core.identifiers import looks_like_pan, luhn_ok
from service.api.validation import in_batch, ip_address_ok, validate_outcome, validate_transaction
from tests.e2e.helpers import BASE_TIME_MS, txn


def _luhn_reference(digits: str) -> bool:
    total = 0
    for i, d in enumerate(int(c) for c in reversed(digits)):
        total += sum(divmod(d * 2, 10)) if i % 2 else d
    return total % 10 == 0


@given(st.text(alphabet="0123456789", min_size=1, max_size=25))
def test_luhn_matches_a_reference(digits: str) -> None:
    assert luhn_ok(digits) == _luhn_reference(digits)


@pytest.mark.parametrize("value", ["4111111111111111", "4111 1111 1111 1111", "4111-1111-1111-1111",
                                   "4111.1111.1111.1111",
                                   "378282246310005", "6011111111111117", "5555555555554444"])
def test_card_numbers_are_recognized(value: str) -> None:
    assert looks_like_pan(value)
    with pytest.raises(InvalidInputError) as err:
        validate_transaction(txn(card_id=value))
    assert err.value.field == "transaction.card_id"
    assert value not in str(err.value) and value.replace(" ", "") not in str(err.value)


@pytest.mark.parametrize("value", ["4111111111111112", "411111111111", "41111111111111111111", "card_0001",
                                   "tok_4111111111111111", "\u0661" * 13])
def test_tokens_are_not_card_numbers(value: str) -> None:
    assert not looks_like_pan(value)


def test_a_valid_transaction_passes() -> None:
    validate_transaction(txn())
    validate_transaction(pb.Transaction(transaction_id="t", card_id="c", merchant_id="m", amount_minor=1,
                                        currency="JPY", event_time_ms=BASE_TIME_MS))


@pytest.mark.parametrize(("overrides", "field"), [
    ({"transaction_id": "x" * 129}, "transaction_id"),
    ({"customer_id": "bad\nid"}, "customer_id"),
    ({"amount_minor": 10**15 + 1}, "amount_minor"),
    ({"currency": "US"}, "currency"),
    ({"event_time_ms": 4_102_444_800_000}, "event_time_ms"),
    ({"longitude": 181.0}, "longitude"),
    ({"latitude": float("nan")}, "latitude"),
])
def test_each_rule_names_its_field(overrides: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidInputError) as err:
        validate_transaction(txn(**overrides))
    assert err.value.field == f"transaction.{field}"


def test_latitude_without_longitude_is_refused() -> None:
    t = txn()
    t.ClearField("longitude")
    with pytest.raises(InvalidInputError, match="together"):
        validate_transaction(t)


def test_outcome_rules() -> None:
    ok = pb.ReportOutcomeRequest(transaction_id="t", card_id="c", merchant_id="m", outcome=pb.CHARGEBACK,
                                 reported_time_ms=BASE_TIME_MS)
    validate_outcome(ok)
    for change, field in (({"outcome": pb.OUTCOME_UNSPECIFIED}, "outcome"), ({"card_id": "4111111111111111"}, "card_id"),
                          ({"reported_time_ms": 5}, "reported_time_ms"), ({"merchant_id": ""}, "merchant_id")):
        bad = pb.ReportOutcomeRequest()
        bad.CopyFrom(ok)
        for k, v in change.items():
            setattr(bad, k, v)
        with pytest.raises(InvalidInputError) as err:
            validate_outcome(bad)
        assert err.value.field == field


def test_times_ahead_of_the_server_clock_are_refused() -> None:
    now_ms = BASE_TIME_MS + 10_000
    validate_transaction(txn(event_time_ms=now_ms), latest_ms=now_ms)
    with pytest.raises(InvalidInputError, match="ahead of the server's clock") as err:
        validate_transaction(txn(event_time_ms=now_ms + 1), latest_ms=now_ms)
    assert err.value.field == "transaction.event_time_ms"
    report = pb.ReportOutcomeRequest(transaction_id="t", card_id="c", merchant_id="m", outcome=pb.CHARGEBACK,
                                     reported_time_ms=now_ms + 1)
    with pytest.raises(InvalidInputError) as err:
        validate_outcome(report, latest_ms=now_ms)
    assert err.value.field == "reported_time_ms"


def test_a_refused_amount_is_not_echoed() -> None:
    with pytest.raises(InvalidInputError) as err:
        validate_transaction(txn(amount_minor=-987654))
    assert "987654" not in str(err.value)


def test_luhn_valid_ids_other_than_the_card_are_accepted() -> None:
    """docs/security.md, "Card numbers": 15-digit merchant ids, numeric switch references, IMEIs
    as device ids (an IMEI's check digit is Luhn by design) and numeric customer numbers are
    ordinary, and some pass the Luhn check; an IP address cannot be a PAN (it must parse as an IP)."""
    luhn_valid_15, imei = "378282246310005", "490154203237518"
    assert looks_like_pan(luhn_valid_15) and looks_like_pan(imei)
    validate_transaction(txn(merchant_id=luhn_valid_15, transaction_id="4111111111111111", device_id=imei,
                             customer_id="4111111111111111"))
    with pytest.raises(InvalidInputError) as err:
        validate_transaction(txn(ip_address="4111111111111111"))
    assert err.value.field == "transaction.ip_address" and "4111111111111111" not in str(err.value)


def _ipaddress_accepts(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


_OCTET = st.one_of(st.integers(0, 300).map(str), st.sampled_from(["00", "01", "010", "0x1", "1 ", "+1", "", "٣", "1e1"]))
_IPV4ISH = st.lists(_OCTET, min_size=3, max_size=5).map(".".join)


@given(st.one_of(_IPV4ISH, st.text(alphabet="0123456789.:abcdefABCDEF%x/ \x00", max_size=45), st.text(max_size=20),
                 st.ip_addresses().map(str)))
def test_the_ip_address_check_accepts_what_ipaddress_accepts(value: str) -> None:
    assert ip_address_ok(value) == _ipaddress_accepts(value)


def test_a_broken_rule_in_a_batch_names_the_transaction() -> None:
    with pytest.raises(InvalidInputError) as err:
        validate_transaction(txn(currency="usd"), prefix="")
    named = in_batch(err.value, "transactions[7].")
    assert named.field == "transactions[7].currency" and str(named).startswith("transactions[7].currency: ")
    assert named.rule == err.value.rule and named.got == err.value.got
