"""Reading a labelled history: a CSV or Parquet file → a validated `History`, sorted by time.

Columns are those of `core.history.COLUMNS`, and three alternative forms a payment
team's export is likely to have instead:

- `amount`: a decimal in major units (`12.50`), with no more decimal places than its
  currency has (`core.encode.currency_exponent`: 2 for USD, 0 for JPY, 3 for KWD),
  instead of `amount_minor`;
- `event_time`: ISO 8601 with a UTC offset or `Z` (a time without one is read as UTC),
  epoch milliseconds, or a Parquet timestamp, instead of `event_time_ms`;
- `fraud_reported_time`, likewise, instead of `fraud_reported_time_ms`.

Two policies for rows with a bad value:

- `read_history` (replay, backtest: one output row per input row): the first bad value
  raises `DataError` naming its row and column.
- `read_history_dropping` (train, evaluate): such rows are dropped, counted per column and
  reason in a `ReadReport` the caller prints and keeps; if more than
  `max_dropped_fraction` of the rows would go, it raises instead, since that is a format
  problem (wrong units, a shifted column) rather than a few bad rows.

Problems of the file as a whole always raise: no such file, unparseable, a missing or
doubled column, a column of the wrong type, and a raw card number anywhere (an export
holding PANs is wrong as a whole and must be tokenised before anything reads it).

Row numbers count data rows from 1 in file order (row N of a CSV is on line N + 1);
messages never quote a value from the file.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from core.encode import currency_exponent, mapped
from core.errors import DataError
from core.history import (
    _NUMPY_DTYPES,
    COLUMNS,
    COLUMNS_BY_NAME,
    ColumnSpec,
    History,
    ValueProblem,
    first_occurrence,
    value_problems,
)
from core.times import parse_int, parse_time_ms

if TYPE_CHECKING:
    import pyarrow as pa

# Alternative column names: documented name → the form a file may use instead.
ALTERNATIVES: dict[str, str] = {
    "amount_minor": "amount",
    "event_time_ms": "event_time",
    "fraud_reported_time_ms": "fraud_reported_time",
}
DEFAULT_MAX_DROPPED_FRACTION = 0.01
_FIRST_ROWS = 5  # row numbers quoted per reason in a summary
_AMOUNT_DECIMALS = 6  # decimal amounts are read exactly to this many places
_AMOUNT = re.compile(r"^(?P<sign>-?)(?P<whole>\d{1,12})(?:\.(?P<fraction>\d{0,6}))?$")


@dataclass(frozen=True, slots=True)
class DroppedRows:
    """Rows dropped for one reason: how many, and the first few row numbers (from 1, file order)."""

    column: str
    reason: str
    count: int
    first_rows: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ReadReport:
    """What reading a file kept and dropped; a row with several problems counts under each."""

    source: str
    rows_read: int
    rows_kept: int
    dropped: tuple[DroppedRows, ...]
    column_forms: dict[str, str]  # documented name → the file's column, where the file used another form

    @property
    def rows_dropped(self) -> int:
        return self.rows_read - self.rows_kept

    def summary(self) -> str:
        """A few lines for a person: counts, then each reason with its first rows."""
        lines = [f"read {self.rows_read} rows from {self.source}: kept {self.rows_kept}, "
                 f"dropped {self.rows_dropped}"]
        for form, name in sorted(self.column_forms.items()):
            lines.append(f"  column {name!r} read as {form}")
        lines += [f"  dropped: {_describe(d)}" for d in self.dropped]
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": Path(self.source).name,
            "rows_read": self.rows_read,
            "rows_kept": self.rows_kept,
            "rows_dropped": self.rows_dropped,
            "column_forms": dict(self.column_forms),
            "dropped": [{"column": d.column, "reason": d.reason, "rows": d.count, "first_rows": list(d.first_rows)}
                        for d in self.dropped],
        }


def _describe(d: DroppedRows) -> str:
    rows = ", ".join(map(str, d.first_rows)) + (", …" if d.count > len(d.first_rows) else "")
    return f"{d.count} rows, column {d.column!r}: {d.reason} (rows {rows})"


def read_history(path: str | Path) -> History:
    """Read a `.csv`, `.csv.gz` or `.parquet` (or `.pq`) history, validate it and sort it by time.

    Absent optional columns get their defaults, unknown columns are ignored, id-like
    columns are read as text even when they hold digits. The first bad value raises
    `DataError` naming the file, the column and the row.
    """
    return _read(Path(path), max_dropped_fraction=None)[0]


def read_history_dropping(
    path: str | Path, *, max_dropped_fraction: float = DEFAULT_MAX_DROPPED_FRACTION
) -> tuple[History, ReadReport]:
    """Like `read_history`, but drops rows with bad values and reports them.

    Raises `DataError` for a problem of the whole file, or when more than
    `max_dropped_fraction` of the rows (or all of them) would be dropped.
    """
    if not 0.0 <= max_dropped_fraction <= 1.0:
        raise ValueError(f"max_dropped_fraction must be in [0, 1], got {max_dropped_fraction}")
    return _read(Path(path), max_dropped_fraction=max_dropped_fraction)


def _read(path: Path, *, max_dropped_fraction: float | None) -> tuple[History, ReadReport]:
    source = str(path)
    if not path.is_file():
        raise DataError(source, "no such file; expected a .csv, .csv.gz or .parquet history file")
    table = _read_table(path, source)
    names = _column_names(table.column_names, source)
    problems: list[ValueProblem] = []
    columns: dict[str, np.ndarray] = {}
    for spec in COLUMNS:
        name = names.get(spec.name)
        if name is None or spec.name == "amount_minor":
            continue  # absent: default; amounts need the currency first
        values, found = _convert(table.column(name), spec, name, source)
        columns[spec.name], problems = values, problems + found
    name = names["amount_minor"]
    convert_amount = _decimal_amount if name == "amount" else _convert
    columns["amount_minor"], found = convert_amount(table.column(name), COLUMNS_BY_NAME["amount_minor"], name, source,
                                                    currency=columns["currency"])
    problems += found
    history = History.from_columns(columns)
    renamed = {canonical: name for canonical, name in names.items() if name != canonical}
    # A value that could not be read holds a placeholder: judge only the values that were read.
    unread: dict[str, np.ndarray] = {}
    for p in problems:
        unread[p.column] = unread.get(p.column, False) | p.rows
    for p in value_problems(history):
        column = renamed.get(p.column, p.column)
        rows = p.rows & ~unread[column] if column in unread else p.rows
        if rows.any():
            problems.append(ValueProblem(column, p.reason, rows, p.fatal))
    fatal = [p for p in problems if p.fatal]
    if fatal:
        raise problem_error(fatal[0], history, source)
    if max_dropped_fraction is None:
        if problems:
            raise problem_error(problems[0], history, source)
        keep = np.ones(len(history), dtype=bool)
    else:
        keep = ~np.logical_or.reduce([p.rows for p in problems]) if problems else np.ones(len(history), bool)
    report = ReadReport(
        source=source, rows_read=len(history), rows_kept=int(keep.sum()), column_forms=renamed,
        dropped=tuple(DroppedRows(p.column, p.reason, int(p.rows.sum()),
                                  tuple(int(r) + 1 for r in np.flatnonzero(p.rows)[:_FIRST_ROWS]))
                      for p in problems),
    )
    if max_dropped_fraction is not None and report.rows_dropped:
        if report.rows_kept == 0 or report.rows_dropped > max_dropped_fraction * report.rows_read:
            worst = sorted(report.dropped, key=lambda d: -d.count)[:3]
            raise DataError(source, (
                f"{report.rows_dropped} of {report.rows_read} rows have bad values, more than the "
                f"{max_dropped_fraction:.2%} that may be dropped; this looks like a format problem, not a few bad rows. "
                + "; ".join(_describe(d) for d in worst)
                + ". Fix the file, or allow more with --max-dropped"))
        history = history.take(keep)
    return history.sorted_by_time(), report


def problem_error(problem: ValueProblem, history: History, source: str) -> DataError:
    """The `DataError` for `problem`'s first row, as `validate_history` words it."""
    rows = np.flatnonzero(problem.rows)
    first = int(rows[0])
    reason = f"{problem.reason} ({len(rows)} such rows)"
    if problem.reason.startswith("duplicate transaction_id"):
        seen = first_occurrence(history.transaction_id, first)
        reason = (f"duplicate transaction_id: this row repeats the id of row {seen + 1}; "
                  f"each transaction must appear once ({len(rows)} such rows)")
    return DataError(source, reason, row=first + 1, column=problem.column)


def _column_names(present: list[str], source: str) -> dict[str, str]:
    """Documented column name → the file's column holding it; raises for a missing or doubled one."""
    names: dict[str, str] = {}
    have = set(present)
    for spec in COLUMNS:
        other = ALTERNATIVES.get(spec.name)
        if other in have and spec.name in have:
            raise DataError(source, f"the file has both {spec.name!r} and {other!r}, which hold the same thing "
                                    "in two forms; keep one", column=other)
        if spec.name in have or other in have:
            names[spec.name] = spec.name if spec.name in have else str(other)
        elif spec.required:
            either = f" (or {other!r})" if other else ""
            raise DataError(source, f"missing required column{either}; the file has {sorted(have)}; "
                                    "see docs/training.md for the documented names", column=spec.name)
    return names


def _read_table(path: Path, source: str) -> pa.Table:
    import pyarrow as pa
    import pyarrow.csv as pa_csv
    import pyarrow.parquet as pq

    name = path.name.lower()
    try:
        if name.endswith(".parquet") or name.endswith(".pq"):
            return pq.read_table(path)
        if name.endswith(".csv") or name.endswith(".csv.gz"):
            # Every column comes in as text and is converted below, so ids and MCCs keep
            # leading zeros and a bad number is reported with its row.
            text = {c.name: pa.string() for c in COLUMNS} | {alt: pa.string() for alt in ALTERNATIVES.values()}
            convert = pa_csv.ConvertOptions(column_types=text, strings_can_be_null=False)
            # Quoted values may hold line breaks; write_history quotes them, so read them back.
            parse = pa_csv.ParseOptions(newlines_in_values=True)
            return pa_csv.read_csv(path, parse_options=parse, convert_options=convert)
    except (pa.ArrowException, OSError) as exc:
        # Arrow quotes the offending row in its message; keep only the part before it,
        # since a row holds identifiers.
        summary = str(exc).split(": ")[:2]
        raise DataError(source, f"cannot parse the file ({': '.join(summary)}); "
                        "check that it is a well-formed CSV or Parquet file") from exc
    raise DataError(source, "unknown file type; expected a name ending in .csv, .csv.gz or .parquet")


# --- one column --------------------------------------------------------------------------------

def _convert(column: pa.ChunkedArray, spec: ColumnSpec, name: str, source: str,
             currency: np.ndarray | None = None) -> tuple[np.ndarray, list[ValueProblem]]:
    """The column as spec's dtype, nulls as spec's default, and its unparseable or missing rows."""
    import pyarrow as pa

    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    if spec.dtype == "str":
        return _text(column, spec, name, source)
    if name in ("event_time", "fraud_reported_time"):
        values, null, bad = _times(column, name, source)
        expected = "ISO 8601 such as 2026-03-01T12:30:00Z, or epoch milliseconds"
    else:
        values, null, bad = _numbers(column, spec, name, source)
        expected = "a number" if spec.dtype == "float64" else f"a whole number that fits {spec.dtype}"
    problems = [ValueProblem(name, f"expected {expected}; fix or remove that value", bad)] if bad.any() else []
    return _finish(values, null, spec, name, problems)


def _finish(values: np.ndarray, null: np.ndarray, spec: ColumnSpec, name: str,
            problems: list[ValueProblem]) -> tuple[np.ndarray, list[ValueProblem]]:
    if null.any():
        if spec.required:
            problems.append(ValueProblem(name, "missing value in a required column", null))
        values = np.where(null, np.asarray(spec.default if spec.default is not None else 0, values.dtype), values)
    return values.astype(_NUMPY_DTYPES[spec.dtype], copy=False), problems


def _text(column: pa.ChunkedArray, spec: ColumnSpec, name: str,
          source: str) -> tuple[np.ndarray, list[ValueProblem]]:
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_integer(column.type):
        column = pc.cast(column, pa.string())
    elif not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise DataError(source, f"expected text, got {column.type}; store this column as strings", column=name)
    null = np.asarray(pc.is_null(column).to_numpy(zero_copy_only=False), dtype=bool)
    filled = column.fill_null(spec.default if spec.default is not None else "")
    text: np.ndarray = filled.to_numpy(zero_copy_only=False).astype(object)
    if null.any() and spec.required:
        return text, [ValueProblem(name, "missing value in a required column", null)]
    return text, []


def _null_mask(array: pa.Array | pa.ChunkedArray) -> np.ndarray:
    import pyarrow.compute as pc

    return np.asarray(pc.is_null(array).to_numpy(zero_copy_only=False), dtype=bool)


def _blank_as_null(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """An empty CSV cell is a missing value."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return pc.if_else(pc.equal(column, ""), pa.scalar(None, column.type), column)
    return column


def _numbers(column: pa.ChunkedArray, spec: ColumnSpec, name: str,
             source: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values, null mask, bad mask) of a numeric column given as numbers or text."""
    import pyarrow as pa
    import pyarrow.compute as pc

    kind = column.type
    floating = spec.dtype == "float64"
    target = pa.float64() if floating else pa.int64()
    column = _blank_as_null(column)
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        values, null, bad = _parse_text(column, target, _parse_float if floating else parse_int)
    elif pa.types.is_integer(kind) or pa.types.is_boolean(kind) or (floating and pa.types.is_floating(kind)):
        null = _null_mask(column)
        values = pc.cast(column, target).fill_null(0).to_numpy()
        bad = np.zeros(len(values), dtype=bool)
    elif pa.types.is_floating(kind):  # whole numbers stored as floats (NaN: missing)
        column = pc.if_else(pc.is_nan(column), pa.scalar(None, kind), column)
        null = _null_mask(column)
        real = column.fill_null(0).to_numpy()
        bad = (real != np.round(real)) | (np.abs(real) >= 2.0 ** 63)
        values = np.where(bad, 0, real).astype(np.int64)
    else:
        raise DataError(source, f"expected {spec.dtype}, got {kind}", column=name)
    if spec.dtype == "int8":
        out_of_range = (values < -128) | (values > 127)
        bad, values = bad | out_of_range, np.where(out_of_range, 0, values)
    return values, null, bad


def _parse_float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _parse_text(column: pa.ChunkedArray, target: pa.DataType | None,
                parse_one: Callable[[str], Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cast text to `target` in one vectorized pass; where any value fails (or without a
    target), parse each value with `parse_one` to find which (None: unparseable)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    null = _null_mask(column)
    if target is not None:
        try:
            cast = pc.cast(column, target)
            return cast.fill_null(0).to_numpy(), null, np.zeros(len(null), dtype=bool)
        except pa.ArrowException:
            pass
    dtype = np.float64 if target is not None and pa.types.is_floating(target) else np.int64
    values = np.zeros(len(null), dtype=dtype)
    bad = np.zeros(len(null), dtype=bool)
    for i, text in enumerate(column.to_pylist()):
        if text is None:
            continue
        parsed = parse_one(text)
        if parsed is None:
            bad[i] = True
        else:
            values[i] = parsed
    return values, null, bad


def _times(column: pa.ChunkedArray, name: str, source: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(epoch ms, null mask, bad mask) of a time column: ISO 8601 or epoch-ms text, numbers, or timestamps."""
    import pyarrow as pa
    import pyarrow.compute as pc

    kind = column.type
    column = _blank_as_null(column)
    if pa.types.is_timestamp(kind):
        ms = pc.cast(pc.cast(column, pa.timestamp("ms", tz=kind.tz)), pa.int64())
        return ms.fill_null(0).to_numpy(), _null_mask(column), np.zeros(len(column), dtype=bool)
    if pa.types.is_integer(kind):
        return _numbers(column, ColumnSpec(name, "int64", False, -1, ""), name, source)
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataError(source, f"expected ISO 8601 text, epoch milliseconds or a timestamp, got {kind}",
                        column=name)
    null = _null_mask(column)
    # The common, clean cases in one vectorized cast each: epoch-ms digits, then ISO 8601
    # with an offset, then without one (read as UTC).
    for target in (pa.int64(), pa.timestamp("ms", tz="UTC"), pa.timestamp("ms")):
        try:
            cast = pc.cast(column, target)
        except pa.ArrowException:
            continue
        ms = cast if target == pa.int64() else pc.cast(cast, pa.int64())
        return ms.fill_null(0).to_numpy(), null, np.zeros(len(null), dtype=bool)
    return _parse_text(column, None, parse_time_ms)  # mixed forms or bad values: row by row


def _decimal_amount(column: pa.ChunkedArray, spec: ColumnSpec, name: str, source: str,
                    currency: np.ndarray | None = None) -> tuple[np.ndarray, list[ValueProblem]]:
    """Minor units from decimal amounts, exactly (text, never through a float's rounding)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    assert currency is not None
    kind = column.type
    if pa.types.is_dictionary(kind):
        column, kind = column.cast(kind.value_type), kind.value_type
    if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind):
        # Numbers become their shortest exact text (12.34, not 12.3399999…), read like a CSV's.
        column = pc.cast(column, pa.string())
    elif not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataError(source, f"expected a decimal amount, got {kind}", column=name)
    column = _blank_as_null(column)
    null = _null_mask(column)
    parts = pc.extract_regex(column, _AMOUNT.pattern)
    malformed = ~null & _null_mask(parts)
    sign = pc.struct_field(parts, [0]).fill_null("")
    whole = pc.cast(pc.struct_field(parts, [1]).fill_null("0"), pa.int64())
    fraction = pc.cast(pc.utf8_rpad(pc.struct_field(parts, [2]).fill_null(""), _AMOUNT_DECIMALS, "0"), pa.int64())
    scaled = whole.to_numpy() * 10 ** _AMOUNT_DECIMALS + fraction.to_numpy()
    scaled = np.where(np.asarray(pc.equal(sign, "-").to_numpy(zero_copy_only=False), bool), -scaled, scaled)
    step = 10 ** (_AMOUNT_DECIMALS - mapped(currency, currency_exponent, np.int64))
    too_precise = ~malformed & ~null & (scaled % step != 0)
    problems = []
    if malformed.any():
        problems.append(ValueProblem(name, "expected a decimal amount in major units such as 12.50 (up to 12 digits before the point, 6 after)", malformed))
    if too_precise.any():
        problems.append(ValueProblem(name, "more decimal places than the currency has (2 for USD, 0 for JPY, "
                                           "3 for KWD)", too_precise))
    minor = np.where(malformed | too_precise, 0, scaled // step)
    return _finish(minor, null, spec, name, problems)


__all__ = [
    "ALTERNATIVES",
    "DEFAULT_MAX_DROPPED_FRACTION",
    "DroppedRows",
    "ReadReport",
    "problem_error",
    "read_history",
    "read_history_dropping",
]
