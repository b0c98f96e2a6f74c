"""core.history.read: alternative column forms (decimal amounts, ISO 8601 times) and dropping bad rows."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.encode import currency_exponent
from core.errors import DataError
from core.history.read import read_history, read_history_dropping

BASE = {"transaction_id": "t", "card_id": "c1", "merchant_id": "m1", "currency": "USD"}


def csv_file(tmp_path: Path, rows: list[dict[str, str]], name: str = "h.csv") -> Path:
    names = list(rows[0])
    path = tmp_path / name
    path.write_text(",".join(names) + "\n" + "".join(",".join(r[n] for n in names) + "\n" for r in rows))
    return path


def rows_with(column: str, values: list[str], **extra: str) -> list[dict[str, str]]:
    """One valid row per value, ids t0, t1, …, times 1000, 2000, … unless `column` is a time column."""
    rows = []
    for i, value in enumerate(values):
        row = {**BASE, "transaction_id": f"t{i}", "amount_minor": "100", "event_time_ms": str(1000 * (i + 1)),
               **extra}
        if column == "amount":
            del row["amount_minor"]
        if column == "event_time":
            del row["event_time_ms"]
        row[column] = value
        rows.append(row)
    return rows


# --- decimal amounts -----------------------------------------------------------------------------

def test_decimal_amounts_become_exact_minor_units_by_currency(tmp_path: Path) -> None:
    values = ["12.50", "0.01", "7", "1234567.89", "100", "1.234", "19.990000"]
    currencies = ["USD", "EUR", "GBP", "USD", "JPY", "KWD", "USD"]
    rows = rows_with("amount", values)
    for row, currency in zip(rows, currencies, strict=True):
        row["currency"] = currency
    history = read_history(csv_file(tmp_path, rows))
    assert history.amount_minor.tolist() == [1250, 1, 700, 123456789, 100, 1234, 1999]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(minor=st.lists(st.integers(1, 10**11), min_size=1, max_size=8),
       currency=st.sampled_from(["USD", "JPY", "KWD", "EUR"]))
def test_any_minor_amount_written_as_a_decimal_reads_back_equal(tmp_path: Path, minor: list[int],
                                                                  currency: str) -> None:
    exponent = currency_exponent(currency)
    text = [str(Decimal(m).scaleb(-exponent)) if exponent else str(m) for m in minor]
    history = read_history(csv_file(tmp_path, rows_with("amount", text, currency=currency)))
    assert history.amount_minor.tolist() == minor


def test_parquet_amounts_as_floats_and_decimals_are_read_without_float_error(tmp_path: Path) -> None:
    common = {"transaction_id": ["a", "b", "c"], "card_id": ["c"] * 3, "merchant_id": ["m"] * 3,
              "currency": ["USD", "USD", "JPY"], "event_time_ms": [1, 2, 3]}
    floats = tmp_path / "f.parquet"
    pq.write_table(pa.table({**common, "amount": [0.29, 1234.56, 500.0]}), floats)  # 0.29 * 100 = 28.999…
    assert read_history(floats).amount_minor.tolist() == [29, 123456, 500]
    decimals = tmp_path / "d.parquet"
    pq.write_table(pa.table({**common, "amount": pa.array([Decimal("0.29"), Decimal("10.10"), Decimal("7")],
                                                          pa.decimal128(12, 2))}), decimals)
    assert read_history(decimals).amount_minor.tolist() == [29, 1010, 7]  # 7.00 JPY is 7 yen


@pytest.mark.parametrize(("value", "currency", "reason"), [
    ("12.345", "USD", "more decimal places than the currency has"),
    ("1.5", "JPY", "more decimal places than the currency has"),
    ("$12.50", "USD", "decimal amount in major units"),
    ("1e3", "USD", "decimal amount in major units"),
    ("abc", "USD", "decimal amount in major units"),
    ("-3.00", "USD", "amount > 0"),
    ("0.00", "USD", "amount > 0"),
    ("", "USD", "missing value"),
])
def test_a_bad_decimal_amount_names_the_amount_column_and_row(tmp_path: Path, value: str, currency: str,
                                                              reason: str) -> None:
    rows = rows_with("amount", ["1.00", "2.00", value, "3.00"], currency=currency)
    rows[0]["currency"] = rows[1]["currency"] = rows[3]["currency"] = "EUR"
    with pytest.raises(DataError) as caught:
        read_history(csv_file(tmp_path, rows))
    assert (caught.value.row, caught.value.column) == (3, "amount")
    assert reason in caught.value.reason


@pytest.mark.parametrize(("documented", "other"), [("amount_minor", "amount"), ("event_time_ms", "event_time")])
def test_a_file_with_both_forms_of_a_column_is_refused(tmp_path: Path, documented: str, other: str) -> None:
    rows = rows_with(documented, ["1"])
    rows[0][other] = "1"
    with pytest.raises(DataError, match=f"both '{documented}' and '{other}'"):
        read_history(csv_file(tmp_path, rows))


def test_a_missing_column_names_its_alternative_form(tmp_path: Path) -> None:
    rows = [{"transaction_id": "t", "card_id": "c", "merchant_id": "m", "currency": "USD", "event_time_ms": "1"}]
    with pytest.raises(DataError, match=r"missing required column \(or 'amount'\)") as caught:
        read_history(csv_file(tmp_path, rows))
    assert caught.value.column == "amount_minor"


# --- times ---------------------------------------------------------------------------------------

MARCH_1 = int(datetime(2026, 3, 1, 12, 30, tzinfo=UTC).timestamp() * 1000)


@pytest.mark.parametrize("texts", [
    ["2026-03-01T12:30:00Z", "2026-03-01T12:30:00.250Z"],                         # one vectorized cast
    ["2026-03-01T13:30:00+01:00", "2026-03-01T07:30:00.250-05:00"],               # offsets
    ["2026-03-01T12:30:00", "2026-03-01 12:30:00.250"],                          # no offset: UTC
    [str(MARCH_1), str(MARCH_1 + 250)],                                           # epoch ms
    ["2026-03-01T12:30:00Z", str(MARCH_1 + 250)],                                 # mixed: row by row
    ["2026-03-01T14:30:00+02:00", "2026-03-01T12:30:00.250"],                     # mixed offsets
])
def test_event_time_as_iso_8601_or_epoch_ms(tmp_path: Path, texts: list[str]) -> None:
    history = read_history(csv_file(tmp_path, rows_with("event_time", texts)))
    assert history.event_time_ms.tolist() == [MARCH_1, MARCH_1 + 250]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ms=st.lists(st.integers(946_684_800_000, 4_102_444_800_000), min_size=1, max_size=6, unique=True),
       offset_minutes=st.integers(-12 * 60, 14 * 60))
def test_any_time_written_in_iso_8601_with_an_offset_reads_back_as_its_epoch_ms(
        tmp_path: Path, ms: list[int], offset_minutes: int) -> None:
    zone = timezone(timedelta(minutes=offset_minutes))
    texts = [datetime.fromtimestamp(m / 1000, tz=UTC).astimezone(zone).isoformat(timespec="milliseconds")
             for m in ms]
    history = read_history(csv_file(tmp_path, rows_with("event_time", texts)))
    assert sorted(history.event_time_ms.tolist()) == sorted(ms)


def test_parquet_timestamps_and_reported_times(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    when = [datetime(2026, 3, 1, 12, 30, tzinfo=UTC), datetime(2026, 3, 1, 12, 30, 0, 250_000, tzinfo=UTC)]
    pq.write_table(pa.table({
        "transaction_id": ["a", "b"], "card_id": ["c", "c"], "merchant_id": ["m", "m"], "amount_minor": [1, 2],
        "currency": ["USD", "USD"], "event_time": pa.array(when, pa.timestamp("us", tz="UTC")),
        "is_fraud": [1, 0],
        "fraud_reported_time": pa.array([when[1] + timedelta(days=2), None], pa.timestamp("ms", tz="UTC")),
    }), path)
    history = read_history(path)
    assert history.event_time_ms.tolist() == [MARCH_1, MARCH_1 + 250]
    assert history.fraud_reported_time_ms.tolist() == [MARCH_1 + 250 + 2 * 86_400_000, -1]


@pytest.mark.parametrize("value", ["2026-13-01T00:00:00Z", "yesterday", "12:30", "1.5"])
def test_a_bad_time_names_its_row_and_column(tmp_path: Path, value: str) -> None:
    rows = rows_with("event_time", ["2026-03-01T12:30:00Z", value, "2026-03-01T12:31:00Z"])
    with pytest.raises(DataError, match="ISO 8601") as caught:
        read_history(csv_file(tmp_path, rows))
    assert (caught.value.row, caught.value.column) == (2, "event_time")


# --- dropping bad rows ---------------------------------------------------------------------------

def mixed_rows(n: int = 300) -> list[dict[str, str]]:
    """`n` good rows with a few bad ones at known places."""
    rows = rows_with("amount_minor", ["100"] * n, is_fraud="0", fraud_reported_time_ms="-1")
    rows[10]["amount_minor"] = "0"                          # not > 0
    rows[20]["amount_minor"] = "ten"                        # not a number
    rows[21]["currency"] = "usd"                            # not ISO 4217
    rows[30]["transaction_id"] = rows[5]["transaction_id"]  # a repeat: the first occurrence stays
    rows[40]["is_fraud"] = "1"
    rows[40]["fraud_reported_time_ms"] = "5"                # reported before it happened (time 41000)
    rows[50]["merchant_id"] = ""                            # empty id
    rows[50]["currency"] = "dollars"                        # two problems on one row
    return rows


def test_dropping_reports_every_reason_with_counts_and_first_rows(tmp_path: Path) -> None:
    history, report = read_history_dropping(csv_file(tmp_path, mixed_rows()), max_dropped_fraction=0.05)
    assert (report.rows_read, report.rows_kept, report.rows_dropped) == (300, 295, 5)
    assert len(history) == 295
    kept = set(history.transaction_id.tolist())
    assert {"t10", "t20", "t21", "t50"}.isdisjoint(kept)
    assert "t5" in kept and "t30" not in kept  # t30 carried t5's id
    assert list(history.event_time_ms) == sorted(history.event_time_ms)
    by_reason = {(d.column, d.reason.split(";")[0].split(" (")[0]): (d.count, d.first_rows) for d in report.dropped}
    assert by_reason == {
        ("amount_minor", "expected a whole number that fits int64"): (1, (21,)),
        ("amount_minor", "expected an amount > 0 in minor currency units"): (1, (11,)),
        ("currency", "expected a 3-letter upper-case ISO 4217 code such as USD"): (2, (22, 51)),
        ("merchant_id", "empty id"): (1, (51,)),
        ("transaction_id", "duplicate transaction_id: repeats the id of an earlier row"): (1, (31,)),
    }
    # A fraud reported "before" it happened keeps its label as a target, never as a feature.
    (adjusted,) = report.adjusted
    assert (adjusted.column, adjusted.count, adjusted.first_rows) == ("fraud_reported_time_ms", 1, (41,))
    t40 = history.transaction_id.tolist().index("t40")
    assert (history.is_fraud[t40], history.fraud_reported_time_ms[t40]) == (1, -1)
    assert (report.fraud_read, report.fraud_kept) == (1, 1)
    summary = report.summary()
    assert "kept 295, dropped 5" in summary and "rows 22, 51" in summary and "kept, adjusted: 1 rows" in summary
    assert report.as_dict()["rows_dropped"] == 5


def test_too_many_bad_rows_is_a_format_problem_and_raises_with_the_reasons(tmp_path: Path) -> None:
    path = csv_file(tmp_path, mixed_rows())
    with pytest.raises(DataError) as caught:
        read_history_dropping(path, max_dropped_fraction=0.01)
    message = str(caught.value)
    assert "5 of 300 rows have bad values" in message
    assert "ISO 4217" in message and "--max-dropped" in message
    with pytest.raises(DataError, match=r"\(\d+ such rows\)"):
        read_history(path)  # the strict reader stops at the first


def test_the_limit_is_a_share_of_rows_compared_exactly(tmp_path: Path) -> None:
    rows = rows_with("amount_minor", ["0"] * 29 + ["100"] * 71)
    _, report = read_history_dropping(csv_file(tmp_path, rows), max_dropped_fraction=0.29)  # 29/100 is allowed
    assert report.rows_dropped == 29
    with pytest.raises(DataError, match="29 of 100 rows"):
        read_history_dropping(csv_file(tmp_path, rows), max_dropped_fraction=0.28)


def test_dropping_most_of_the_fraud_is_refused_even_under_the_row_limit(tmp_path: Path) -> None:
    rows = rows_with("amount_minor", ["100"] * 1000, is_fraud="0")
    for i in range(10):
        rows[i * 50]["is_fraud"] = "1"
    for i in range(6):
        rows[i * 50]["currency"] = "usd"  # 6 rows: 0.6 % of the file, 60 % of its fraud
    with pytest.raises(DataError, match="6 of the 10 rows labelled fraud have bad values"):
        read_history_dropping(csv_file(tmp_path, rows), max_dropped_fraction=0.01)
    _, report = read_history_dropping(csv_file(tmp_path, rows), max_dropped_fraction=0.6)
    assert (report.fraud_read, report.fraud_kept) == (10, 4)
    assert "(6 of them labelled fraud)" in report.summary()


def test_repeated_ids_are_judged_among_good_rows_and_conflicting_labels_drop_every_copy(tmp_path: Path) -> None:
    rows = rows_with("amount_minor", ["100"] * 200, is_fraud="0")
    rows[50]["transaction_id"] = rows[5]["transaction_id"]   # t5 again, re-exported as fraud
    rows[50]["is_fraud"] = "1"
    rows[7]["amount_minor"] = "oops"                         # t7's first copy is bad ...
    rows[60]["transaction_id"] = rows[7]["transaction_id"]   # ... so its clean repeat is the one kept
    rows[70]["transaction_id"] = rows[9]["transaction_id"]   # a plain repeat: the later copy goes
    history, report = read_history_dropping(csv_file(tmp_path, rows), max_dropped_fraction=1.0)
    ids = history.transaction_id.tolist()
    assert "t5" not in ids  # which copy is right cannot be told
    assert ids.count("t7") == 1 and history.amount_minor[ids.index("t7")] == 100
    assert ids.count("t9") == 1
    reasons = {d.reason.split(":")[0]: (d.count, d.first_rows) for d in report.dropped}
    assert reasons["repeated transaction_id whose copies disagree on is_fraud"] == (2, (6, 51))
    assert reasons["duplicate transaction_id"] == (1, (71,))


def test_a_file_without_a_header_never_shows_its_first_row(tmp_path: Path) -> None:
    path = tmp_path / "h.csv"
    path.write_text("t_0001,4111111111111111,m_77,12.50,USD,2026-03-01T00:00:00Z,0\n"
                    "t_0002,4111111111111112,m_78,13.50,USD,2026-03-01T00:00:01Z,0\n")
    with pytest.raises(DataError, match="is the first line a header") as caught:
        read_history_dropping(path)
    for value in ("4111111111111111", "t_0001", "m_77", "12.50"):
        assert value not in str(caught.value)


def test_a_column_named_twice_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "h.csv"
    path.write_text("transaction_id,card_id,merchant_id,amount,amount,currency,event_time_ms\nt,c,m,1,2,USD,1\n")
    with pytest.raises(DataError, match="more than once") as caught:
        read_history(path)
    assert caught.value.column == "amount"


def test_lines_with_the_wrong_number_of_fields_are_dropped_by_row_and_the_rows_after_keep_their_numbers(
        tmp_path: Path) -> None:
    rows = rows_with("amount_minor", ["100"] * 200)
    rows[90]["amount_minor"] = "0"
    path = csv_file(tmp_path, rows)
    lines = path.read_text().splitlines()
    lines[11] += ",stray"  # row 11
    lines[31] = lines[31].rsplit(",", 1)[0]  # row 31: a field short
    path.write_text("\n".join(lines) + "\n")
    history, report = read_history_dropping(path, max_dropped_fraction=0.05)
    assert (report.rows_read, report.rows_kept) == (200, 197)
    by_column = {d.column: (d.count, d.first_rows) for d in report.dropped}
    assert by_column["(whole line)"] == (2, (11, 31))
    assert by_column["amount_minor"] == (1, (91,))  # still row 91 with two lines skipped before it
    assert {"t10", "t30", "t90"}.isdisjoint(history.transaction_id.tolist())
    with pytest.raises(DataError, match="number of fields") as caught:
        read_history(path)
    assert caught.value.row == 11


def test_labels_blank_or_written_as_floats(tmp_path: Path) -> None:
    rows = rows_with("amount_minor", ["100"] * 100, is_fraud="0.0")
    rows[3]["is_fraud"] = "1.0"   # pandas writes an int column with blanks as floats
    rows[4]["is_fraud"] = ""      # a blank label is not "legitimate"
    history, report = read_history_dropping(csv_file(tmp_path, rows), max_dropped_fraction=0.05)
    assert history.is_fraud.sum() == 1 and "t3" in history.transaction_id[history.is_fraud == 1]
    assert [(d.column, d.reason, d.first_rows) for d in report.dropped] == [
        ("is_fraud", "missing label; expected 0 or 1", (5,))]


def test_epoch_seconds_are_noted(tmp_path: Path) -> None:
    rows = rows_with("amount_minor", ["100"] * 3)
    for i, row in enumerate(rows):
        row["event_time_ms"] = str(1_772_000_000 + i)  # seconds, not milliseconds
    _, report = read_history_dropping(csv_file(tmp_path, rows))
    assert any("3 event times fall before 2000-01-01" in note and "multiply them by 1000" in note
               for note in report.notes)
    assert "note: 3 event times" in report.summary()


def test_parquet_forms_from_other_tools(tmp_path: Path) -> None:
    path = tmp_path / "p.parquet"
    nanoseconds = [MARCH_1 * 1_000_000 + 123_456, (MARCH_1 + 250) * 1_000_000 + 999_000]  # as pandas writes
    pq.write_table(pa.table({
        "transaction_id": ["a", "b"], "card_id": ["c", "c"], "merchant_id": ["m", "m"],
        "merchant_category": pa.array([742, 5411], pa.int64()),                  # lost its leading zero
        "amount": pa.array([Decimal("12.500000000000000000"), Decimal("7")], pa.decimal128(38, 18)),
        "currency": ["USD", "USD"],
        "event_time": pa.array(nanoseconds, pa.timestamp("ns", tz="UTC")),  # finer than a millisecond
        "fraud_reported_time": pa.array([float(MARCH_1 + 10_000), float("nan")]),  # epoch ms as doubles
        "is_fraud": pa.array([1.0, 0.0]),
    }), path)
    history = read_history(path)
    assert history.merchant_category.tolist() == ["0742", "5411"]
    assert history.amount_minor.tolist() == [1250, 700]
    assert history.event_time_ms.tolist() == [MARCH_1, MARCH_1 + 250]
    assert history.fraud_reported_time_ms.tolist() == [MARCH_1 + 10_000, -1]


@pytest.mark.parametrize(("text", "minor"), [(" 12.50 ", 1250), ("12.5000000", 1250), ("0.1", 10), ("3.", 300)])
def test_decimal_amount_text_variants(tmp_path: Path, text: str, minor: int) -> None:
    assert read_history(csv_file(tmp_path, rows_with("amount", [text]))).amount_minor.tolist() == [minor]


def test_float_amounts_with_arithmetic_noise_read_as_meant(tmp_path: Path) -> None:
    path = tmp_path / "f.parquet"
    pq.write_table(pa.table({"transaction_id": ["a"], "card_id": ["c"], "merchant_id": ["m"], "currency": ["USD"],
                             "event_time_ms": [1], "amount": [0.1 + 0.2]}), path)
    assert read_history(path).amount_minor.tolist() == [30]


def test_a_raw_card_number_refuses_the_whole_file_even_when_dropping(tmp_path: Path) -> None:
    rows = mixed_rows()
    rows[7]["card_id"] = "4111111111111111"
    with pytest.raises(DataError, match="raw card number") as caught:
        read_history_dropping(csv_file(tmp_path, rows), max_dropped_fraction=1.0)
    assert caught.value.row == 8
    assert "4111111111111111" not in str(caught.value)


def test_a_clean_file_drops_nothing_and_names_the_forms_it_read(tmp_path: Path) -> None:
    rows = rows_with("amount", ["1.00", "2.50"])
    history, report = read_history_dropping(csv_file(tmp_path, rows))
    assert report.rows_dropped == 0 and report.dropped == ()
    assert report.column_forms == {"amount_minor": "amount"}
    assert history.amount_minor.tolist() == [100, 250]


def test_dropping_every_row_raises_whatever_the_allowance(tmp_path: Path) -> None:
    rows = rows_with("amount_minor", ["0", "-1"])
    with pytest.raises(DataError, match="2 of 2 rows"):
        read_history_dropping(csv_file(tmp_path, rows), max_dropped_fraction=1.0)


def test_the_reader_keeps_a_consistent_order_for_rows_with_equal_times(tmp_path: Path) -> None:
    rows = rows_with("amount_minor", ["1", "2", "3"])
    for row in rows:
        row["event_time_ms"] = "5"
    history = read_history(csv_file(tmp_path, rows))
    assert history.transaction_id.tolist() == ["t0", "t1", "t2"]
    assert np.all(history.event_time_ms == 5)


def test_a_received_time_column_sets_the_arrival_order(tmp_path: Path) -> None:
    # t0 happened first but reached the server 7 minutes later, after t1; t2 has no receipt time
    # (taken to have arrived at its event time).
    rows = rows_with("event_time", ["2026-03-01T12:00:00Z", "2026-03-01T12:05:00Z", "2026-03-01T12:06:00Z"])
    for row, received in zip(rows, ["2026-03-01T12:07:00Z", "2026-03-01T12:05:00.100Z", ""], strict=True):
        row["received_time"] = received
    for reader in (read_history, lambda p: read_history_dropping(p)[0]):
        history = reader(csv_file(tmp_path, rows))
        assert history.transaction_id.tolist() == ["t1", "t2", "t0"]
        assert history.received_time_ms.tolist() == [MARCH_1 - 1_500_000 + 100, -1, MARCH_1 - 1_380_000]
        assert history.event_time_ms.tolist() == [MARCH_1 - 1_500_000, MARCH_1 - 1_440_000, MARCH_1 - 1_800_000]


def test_without_receipt_times_the_order_is_event_time(tmp_path: Path) -> None:
    rows = rows_with("amount_minor", ["1", "2", "3"])
    rows[0]["event_time_ms"] = "9000"
    history = read_history(csv_file(tmp_path, rows))
    assert history.transaction_id.tolist() == ["t1", "t2", "t0"]
    assert (history.received_time_ms == -1).all()


def test_a_bad_receipt_time_names_its_row_and_column(tmp_path: Path) -> None:
    rows = rows_with("amount_minor", ["1", "2"])
    rows[1]["received_time_ms"] = "-5"
    rows[0]["received_time_ms"] = "3000"
    with pytest.raises(DataError, match=r"row 2.*received_time_ms"):
        read_history(csv_file(tmp_path, rows))
