"""core.history.table: the History record, its file formats and the DataError cases."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.errors import DataError
from core.history.read import read_history
from core.history.simulate import simulate
from core.history.table import COLUMNS, COLUMNS_BY_NAME, History, write_history
from core.history.validate import validate_history

FORMATS = ("csv", "csv.gz", "parquet")
HEADER = "transaction_id,card_id,merchant_id,amount_minor,currency,event_time_ms"


def small_history(n: int = 4) -> History:
    return History.from_columns({
        "transaction_id": [f"t{i}" for i in range(n)],
        "card_id": [f"card_{i % 2}" for i in range(n)],
        "merchant_id": ["m_1"] * n,
        "amount_minor": np.arange(1, n + 1) * 100,
        "currency": ["EUR"] * n,
        "event_time_ms": np.arange(n, dtype=np.int64)[::-1] * 1000,
    })


def write_text(tmp_path: Path, text: str, name: str = "h.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_columns_describe_every_history_field() -> None:
    assert [c.name for c in COLUMNS] == list(History.__dataclass_fields__)
    assert {c.name for c in COLUMNS if c.required} == {
        "transaction_id", "card_id", "merchant_id", "amount_minor", "currency", "event_time_ms"}
    assert all(c.doc for c in COLUMNS)
    assert all(c.default is not None for c in COLUMNS if not c.required)


def test_from_columns_fills_defaults_with_documented_dtypes() -> None:
    history = small_history()
    assert len(history) == 4
    assert history.customer_id.tolist() == [""] * 4
    assert history.channel.dtype == np.int8 and history.channel.tolist() == [0] * 4
    assert np.isnan(history.latitude).all() and np.isnan(history.longitude).all()
    assert history.is_fraud.dtype == np.int8 and history.is_fraud.tolist() == [0] * 4
    assert history.fraud_reported_time_ms.tolist() == [-1] * 4
    for spec in COLUMNS:
        array = getattr(history, spec.name)
        expected = object if spec.dtype == "str" else spec.dtype
        assert array.dtype == np.dtype(expected), spec.name
    assert all(type(v) is str for v in history.transaction_id)


def test_from_columns_refuses_missing_and_unknown_columns() -> None:
    columns = {name: getattr(small_history(), name) for name in ("transaction_id", "card_id", "merchant_id")}
    with pytest.raises(ValueError, match="amount_minor"):
        History.from_columns(columns)
    with pytest.raises(ValueError, match="colour"):
        History.from_columns({**small_history().columns(), "colour": ["red"] * 4})


def test_constructor_refuses_wrong_dtype_and_length() -> None:
    columns = small_history().columns()
    with pytest.raises(TypeError, match="amount_minor"):
        History(**{**columns, "amount_minor": columns["amount_minor"].astype(np.float64)})
    with pytest.raises(ValueError, match="channel"):
        History(**{**columns, "channel": columns["channel"][:2]})


def test_slice_take_and_stable_time_sort() -> None:
    history = History.from_columns({
        **small_history(5).columns(), "event_time_ms": np.array([30, 10, 20, 10, 10], dtype=np.int64)})
    assert history.slice(1, 3).transaction_id.tolist() == ["t1", "t2"]
    assert history.take(np.array([4, 0])).transaction_id.tolist() == ["t4", "t0"]
    assert history.take(history.amount_minor > 300).transaction_id.tolist() == ["t3", "t4"]
    ordered = history.sorted_by_time()
    assert ordered.transaction_id.tolist() == ["t1", "t3", "t4", "t2", "t0"]  # ties keep file order
    assert ordered.equals(ordered.take(np.arange(5)))
    assert not ordered.equals(history)


@pytest.mark.parametrize("suffix", FORMATS)
def test_round_trip_of_a_simulated_history(tmp_path: Path, suffix: str) -> None:
    history = simulate(num_days=3, num_cards=300, seed=11)
    path = tmp_path / f"history.{suffix}"
    write_history(history, path)
    assert read_history(path).equals(history)


text = st.text(st.characters(exclude_categories=["Cs"]), max_size=8)
coordinate = st.one_of(st.just(math.nan), st.floats(-90, 90))


@st.composite
def histories(draw: Any) -> History:
    n = draw(st.integers(0, 6))
    ids = draw(st.lists(text, min_size=n, max_size=n, unique=True))
    event_time_ms = np.array(draw(st.lists(st.integers(0, 2**61), min_size=n, max_size=n)), dtype=np.int64)
    # A fraud is reported at or after its transaction (-1: never); anything else is refused.
    report_delay = np.array(draw(st.lists(st.integers(-1, 2**61), min_size=n, max_size=n)), dtype=np.int64)
    return History.from_columns({
        # A suffix that is not a digit keeps ids non-empty and never PAN-shaped.
        "transaction_id": [f"{i}#" for i in ids],
        "card_id": [f"{v}c" for v in draw(st.lists(text, min_size=n, max_size=n))],
        "customer_id": draw(st.lists(text, min_size=n, max_size=n)),
        "merchant_id": [f"0{v}m" for v in draw(st.lists(text, min_size=n, max_size=n))],
        "merchant_category": draw(st.lists(st.sampled_from(["", "0742", "5411"]), min_size=n, max_size=n)),
        "amount_minor": draw(st.lists(st.integers(1, 2**62), min_size=n, max_size=n)),
        "currency": draw(st.lists(st.sampled_from(["USD", "EUR", "JPY"]), min_size=n, max_size=n)),
        "event_time_ms": event_time_ms,
        "channel": draw(st.lists(st.integers(0, 4), min_size=n, max_size=n)),
        "country": draw(st.lists(text, min_size=n, max_size=n)),
        "latitude": draw(st.lists(coordinate, min_size=n, max_size=n)),
        "longitude": draw(st.lists(coordinate, min_size=n, max_size=n)),
        "device_id": draw(st.lists(text, min_size=n, max_size=n)),
        "ip_address": draw(st.lists(text, min_size=n, max_size=n)),
        "is_fraud": draw(st.lists(st.integers(0, 1), min_size=n, max_size=n)),
        "fraud_reported_time_ms": np.where(report_delay < 0, -1, event_time_ms + report_delay),
    }).sorted_by_time()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(history=histories())
def test_round_trip_of_awkward_values(tmp_path: Path, history: History) -> None:
    # Quotes, commas, line breaks, digit-only ids with leading zeros, extreme numbers, NaN.
    for suffix in FORMATS:
        path = tmp_path / f"h.{suffix}"
        write_history(history, path)
        assert read_history(path).equals(history), suffix


def test_csv_ids_stay_text_and_optional_columns_get_defaults(tmp_path: Path) -> None:
    path = write_text(tmp_path, f"{HEADER},merchant_category,extra\n"
                                "007,0042,00912,150,USD,2000,0742,x\n"
                                "8,43,913,99,USD,1000,,y\n")
    history = read_history(path)
    assert history.transaction_id.tolist() == ["8", "007"]  # sorted by time
    assert history.card_id.tolist() == ["43", "0042"]
    assert history.merchant_id.tolist() == ["913", "00912"]
    assert history.merchant_category.tolist() == ["", "0742"]
    assert history.channel.tolist() == [0, 0] and history.is_fraud.tolist() == [0, 0]
    assert history.fraud_reported_time_ms.tolist() == [-1, -1]
    assert np.isnan(history.latitude).all()


def test_parquet_integer_ids_are_read_as_text(tmp_path: Path) -> None:
    path = tmp_path / "h.parquet"
    pq.write_table(pa.table({
        "transaction_id": [1, 2], "card_id": [10, 11], "merchant_id": ["m", "m"],
        "amount_minor": pa.array([5, 6], pa.int32()), "currency": ["USD", "USD"],
        "event_time_ms": [1, 2], "is_fraud": [False, True],
    }), path)
    history = read_history(path)
    assert history.transaction_id.tolist() == ["1", "2"]
    assert history.card_id.tolist() == ["10", "11"]
    assert history.amount_minor.dtype == np.int64 and history.is_fraud.tolist() == [0, 1]


def test_importing_history_does_not_import_pyarrow() -> None:
    code = "import sys, core.history.table, core.history.simulate; sys.exit('pyarrow' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[3], check=False)
    assert result.returncode == 0


def raises_data_error(path: Path, *, column: str | None, row: int | None = None) -> DataError:
    with pytest.raises(DataError) as caught:
        read_history(path)
    error = caught.value
    assert error.path == str(path)
    assert error.column == column
    assert error.row == row
    assert str(path) in str(error)
    return error


def test_missing_required_column(tmp_path: Path) -> None:
    path = write_text(tmp_path, "transaction_id,card_id,merchant_id,currency,event_time_ms\nt1,c1,m1,USD,5\n")
    error = raises_data_error(path, column="amount_minor")
    assert "missing required column" in error.reason


@pytest.mark.parametrize(("column", "value", "expected"), [
    ("amount_minor", "12.5", "whole number"),
    ("amount_minor", "abc", "whole number"),
    ("amount_minor", "99999999999999999999", "whole number"),
    ("event_time_ms", "2026-01-01", "whole number"),
    ("channel", "300", "fits int8"),
])
def test_value_of_the_wrong_type_names_column_and_row(tmp_path: Path, column: str, value: str,
                                                       expected: str) -> None:
    rows = [dict(transaction_id=f"t{i}", card_id="c1", merchant_id="m1", amount_minor="10",
                 currency="USD", event_time_ms=str(i), channel="1") for i in range(5)]
    rows[3][column] = value
    names = list(rows[0])
    path = write_text(tmp_path, ",".join(names) + "\n" + "".join(",".join(r[n] for n in names) + "\n" for r in rows))
    error = raises_data_error(path, column=column, row=4)
    assert expected in error.reason


def test_parquet_column_of_the_wrong_type(tmp_path: Path) -> None:
    path = tmp_path / "h.parquet"
    pq.write_table(pa.table({
        "transaction_id": ["t1"], "card_id": [1.5], "merchant_id": ["m"], "amount_minor": [5],
        "currency": ["USD"], "event_time_ms": [1],
    }), path)
    error = raises_data_error(path, column="card_id")
    assert "expected text" in error.reason


@pytest.mark.parametrize(("column", "value", "reason"), [
    ("amount_minor", "0", "amount > 0"),
    ("amount_minor", "-5", "amount > 0"),
    ("amount_minor", "", "missing value"),
    ("transaction_id", "", "empty id"),
    ("card_id", "", "empty id"),
    ("merchant_id", "", "empty id"),
    ("card_id", "4111111111111111", "raw card number"),
    ("currency", "usd", "ISO 4217"),
    ("merchant_category", "541", "4-digit MCC"),
    ("channel", "7", "ATM"),
    ("latitude", "91", "[-90, 90]"),
    ("is_fraud", "2", "0 or 1"),
])
def test_bad_value_names_column_and_first_bad_row(tmp_path: Path, column: str, value: str, reason: str) -> None:
    names = ["transaction_id", "card_id", "merchant_id", "amount_minor", "currency", "event_time_ms",
             "merchant_category", "channel", "latitude", "is_fraud"]
    good = {"transaction_id": "t", "card_id": "c1", "merchant_id": "m1", "amount_minor": "10",
            "currency": "USD", "event_time_ms": "1", "merchant_category": "5411", "channel": "1",
            "latitude": "45.5", "is_fraud": "0"}
    lines = []
    for i in range(6):
        row = {**good, "transaction_id": f"t{i}", "event_time_ms": str(100 - i)}
        if i in (2, 4):
            row[column] = value
        lines.append(",".join(row[n] for n in names))
    path = write_text(tmp_path, ",".join(names) + "\n" + "\n".join(lines) + "\n")
    error = raises_data_error(path, column=column, row=3)  # file order, before sorting by time
    assert reason in error.reason
    assert "4111111111111111" not in str(error)


def test_duplicate_transaction_id_names_the_repeating_row(tmp_path: Path) -> None:
    path = write_text(tmp_path, f"{HEADER}\nsecret-a,c,m,1,USD,1\nsecret-b,c,m,1,USD,2\n"
                                "secret-c,c,m,1,USD,3\nsecret-b,c,m,1,USD,4\nsecret-a,c,m,1,USD,5\n")
    error = raises_data_error(path, column="transaction_id", row=4)
    assert "row 2" in error.reason
    assert "secret" not in str(error)


def test_unreadable_files(tmp_path: Path) -> None:
    raises_data_error(tmp_path / "absent.csv", column=None)
    raises_data_error(write_text(tmp_path, "whatever", "h.json"), column=None)
    ragged = write_text(tmp_path, f"{HEADER}\nt1,c1,m1,5,USD,1\nt2,c1,m1,5,USD\n")
    assert "the header's number of fields" in raises_data_error(ragged, column=None, row=2).reason
    raises_data_error(write_text(tmp_path, "not parquet", "h.parquet"), column=None)


def test_validate_history_accepts_a_simulated_history_and_names_its_source() -> None:
    history = simulate(num_days=2, num_cards=200, seed=3)
    validate_history(history)
    bad = History(**{**history.columns(), "amount_minor": np.where(np.arange(len(history)) == 7, 0,
                                                                   history.amount_minor)})
    with pytest.raises(DataError) as caught:
        validate_history(bad, source="memory")
    assert (caught.value.path, caught.value.row, caught.value.column) == ("memory", 8, "amount_minor")
    assert COLUMNS_BY_NAME["amount_minor"].required
