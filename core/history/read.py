"""Reading a labelled history: a CSV or Parquet file → a validated `History`, in arrival order.

Columns are those of `core.history.table.COLUMNS`, and three alternative forms a payment
team's export is likely to have instead:

- `amount`: a decimal in major units (`12.50`), with no more decimal places than its
  currency has (`core.encode.currency_exponent`: 2 for USD, 0 for JPY, 3 for KWD),
  instead of `amount_minor`;
- `event_time`: ISO 8601 with a UTC offset or `Z` (a time without one is read as UTC),
  epoch milliseconds, or a Parquet timestamp, instead of `event_time_ms`;
- `fraud_reported_time` and `received_time`, likewise, instead of `fraud_reported_time_ms`
  and `received_time_ms`.

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

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from core.errors import DataError
from core.history.convert import Converted, convert_column, convert_decimal_amount
from core.history.read_report import DroppedRows, ReadReport
from core.history.table import COLUMNS, COLUMNS_BY_NAME, History
from core.history.validate import DUPLICATE_ID, REPORTED_BEFORE, ValueProblem, problem_error, value_problems

if TYPE_CHECKING:
    import pyarrow as pa

# Alternative column names: documented name → the form a file may use instead.
ALTERNATIVES: dict[str, str] = {
    "amount_minor": "amount",
    "event_time_ms": "event_time",
    "fraud_reported_time_ms": "fraud_reported_time",
    "received_time_ms": "received_time",
}
DEFAULT_MAX_DROPPED_FRACTION = 0.01
_FIRST_ROWS = 5  # row numbers quoted per reason in a summary
CONFLICTING_LABELS = ("repeated transaction_id whose copies disagree on is_fraud: every copy dropped, "
                      "since which one is right cannot be told")
REPORT_TIME_IGNORED = ("fraud reported before the transaction happened (a date without a time?): the report "
                       "time is ignored, so this label never feeds the features; the row still trains")


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
    `max_dropped_fraction` of the rows, or of the fraud rows, (or all of them) would go.
    """
    if not 0.0 <= max_dropped_fraction <= 1.0:
        raise ValueError(f"max_dropped_fraction must be in [0, 1], got {max_dropped_fraction}")
    return _read(Path(path), max_dropped_fraction=max_dropped_fraction)


@dataclass(frozen=True, slots=True)
class _Table:
    """A file's table, the lines that did not parse as a row (file row numbers), and the file row
    of each table row."""

    table: pa.Table
    unparsed: np.ndarray  # file row numbers (from 1) of lines with the wrong number of fields
    row_numbers: np.ndarray  # file row number of each table row


def _read(path: Path, *, max_dropped_fraction: float | None) -> tuple[History, ReadReport]:
    source = str(path)
    strict = max_dropped_fraction is None
    if not path.is_file():
        raise DataError(source, "no such file; expected a .csv, .csv.gz or .parquet history file")
    read = _read_table(path, source)
    if strict and read.unparsed.size:
        raise DataError(source, "this line does not have the header's number of fields (a stray comma or "
                        "quote?)", row=int(read.unparsed[0]))
    table = read.table
    names = _column_names(table.column_names, source)
    converted: dict[str, Converted] = {}
    for spec in COLUMNS:
        name = names.get(spec.name)
        if name is not None and spec.name != "amount_minor":  # absent: default; amounts need the currency
            converted[spec.name] = convert_column(table.column(name), spec, name, source)
    name = names["amount_minor"]
    amount_spec = COLUMNS_BY_NAME["amount_minor"]
    converted["amount_minor"] = (
        convert_decimal_amount(table.column(name), amount_spec, name, source, converted["currency"].values)
        if name == "amount" else convert_column(table.column(name), amount_spec, name, source))
    history = History.from_columns({column: c.values for column, c in converted.items()})
    problems = [p for c in converted.values() for p in c.problems]
    renamed = {canonical: name for canonical, name in names.items() if name != canonical}
    # A value that could not be read holds a placeholder: judge only the values that were read.
    unread: dict[str, np.ndarray] = {}
    for p in problems:
        unread[p.column] = unread.get(p.column, False) | p.rows
    for p in value_problems(history, duplicates=strict):
        column = renamed.get(p.column, p.column)
        rows = p.rows & ~unread[column] if column in unread else p.rows
        if rows.any():
            problems.append(ValueProblem(column, p.reason, rows, p.fatal))
    fatal = [p for p in problems if p.fatal]
    if fatal:
        raise problem_error(fatal[0], history, source, read.row_numbers)
    notes = tuple(note for c in converted.values() for note in c.notes)
    if strict:
        if problems:
            raise problem_error(problems[0], history, source, read.row_numbers)
        return history.sorted_by_time(), ReadReport(source, len(history), len(history), (), renamed, notes=notes)
    assert max_dropped_fraction is not None
    return _drop(history, problems, read, renamed, notes, source, max_dropped_fraction)


def _drop(history: History, problems: list[ValueProblem], read: _Table, renamed: dict[str, str],
          notes: tuple[str, ...], source: str, max_dropped_fraction: float) -> tuple[History, ReadReport]:
    """Drop the rows with problems (and conflicting or repeated ids among the rest), report, check the limits."""
    adjust = [p for p in problems if p.reason == REPORTED_BEFORE]
    problems = [p for p in problems if p.reason != REPORTED_BEFORE]
    keep = ~np.logical_or.reduce([p.rows for p in problems]) if problems else np.ones(len(history), dtype=bool)
    problems += _repeats(history.transaction_id, history.is_fraud, keep)
    keep = ~np.logical_or.reduce([p.rows for p in problems]) if problems else keep

    def entries(found: list[ValueProblem]) -> tuple[DroppedRows, ...]:
        return tuple(DroppedRows(p.column, p.reason if p.reason != REPORTED_BEFORE else REPORT_TIME_IGNORED,
                                 int(p.rows.sum()), tuple(int(read.row_numbers[r]) for r in
                                                          np.flatnonzero(p.rows)[:_FIRST_ROWS]))
                     for p in found)

    unparsed = (DroppedRows("(whole line)", "the line does not have the header's number of fields (a stray comma "
                                            "or quote?)", int(read.unparsed.size),
                            tuple(int(r) for r in read.unparsed[:_FIRST_ROWS])),) if read.unparsed.size else ()
    fraud = history.is_fraud == 1
    report = ReadReport(
        source=source, rows_read=len(history) + int(read.unparsed.size), rows_kept=int(keep.sum()),
        dropped=unparsed + entries(problems), column_forms=renamed, fraud_read=int(fraud.sum()),
        fraud_kept=int((fraud & keep).sum()), adjusted=entries([ValueProblem(
            p.column, p.reason, p.rows & keep) for p in adjust if (p.rows & keep).any()]), notes=notes)
    _check_limits(report, source, max_dropped_fraction)
    if adjust:
        ignored = np.logical_or.reduce([p.rows for p in adjust])
        history = History(**{**history.columns(), "fraud_reported_time_ms": np.where(
            ignored, np.int64(-1), history.fraud_reported_time_ms)})
    if report.rows_dropped:
        history = history.take(keep)
    return history.sorted_by_time(), report


def _check_limits(report: ReadReport, source: str, max_dropped_fraction: float) -> None:
    """More than the allowed share of rows (or of fraud rows) dropped is a format problem: refuse."""
    worst = "; ".join(d.describe() for d in sorted(report.dropped, key=lambda d: -d.count)[:3])
    if report.rows_kept == 0 or report.rows_dropped / report.rows_read > max_dropped_fraction:
        raise DataError(source, (
            f"{report.rows_dropped} of {report.rows_read} rows have bad values, more than the "
            f"{max_dropped_fraction:.2%} that may be dropped; this looks like a format problem, not a few bad rows. "
            f"{worst}. Fix the file, or allow more with --max-dropped"))
    fraud_dropped = report.fraud_read - report.fraud_kept
    if fraud_dropped and fraud_dropped / report.fraud_read > max_dropped_fraction:
        raise DataError(source, (
            f"{fraud_dropped} of the {report.fraud_read} rows labelled fraud have bad values, more than the "
            f"{max_dropped_fraction:.2%} that may be dropped: the model would learn from a biased sample of "
            f"fraud. {worst}. Fix the file, or allow more with --max-dropped"))


def _repeats(ids: np.ndarray, is_fraud: np.ndarray, good: np.ndarray) -> list[ValueProblem]:
    """Among the `good` rows: every copy of an id whose copies disagree on the label, and the
    later copies of the other repeated ids (the first stays)."""
    rows = np.flatnonzero(good)
    if rows.size < 2:
        return []
    order = rows[np.argsort(ids[rows], kind="stable")]  # equal ids keep file order
    same = ids[order][1:] == ids[order][:-1]
    if not same.any():
        return []
    group = np.concatenate(([0], np.cumsum(~same)))  # group number of each row in `order`
    labels = is_fraud[order].astype(np.int64)
    size = np.bincount(group)
    disagree = (np.bincount(group, weights=labels) % size != 0)[group]  # some copies fraud, some not
    conflicting = np.zeros(len(ids), dtype=bool)
    conflicting[order[disagree & (size[group] > 1)]] = True
    repeat = np.zeros(len(ids), dtype=bool)
    repeat[order[1:][same & ~disagree[1:]]] = True
    found = []
    if conflicting.any():
        found.append(ValueProblem("transaction_id", CONFLICTING_LABELS, conflicting))
    if repeat.any():
        found.append(ValueProblem("transaction_id", DUPLICATE_ID, repeat))
    return found


def _column_names(present: list[str], source: str) -> dict[str, str]:
    """Documented column name → the file's column holding it; raises for a missing or doubled one.

    Messages name only documented columns: a file without a header has its first row as
    column names, and that row may hold identifiers.
    """
    doubled = sorted(name for name, count in Counter(present).items() if count > 1 and _documented(name))
    if doubled:
        raise DataError(source, "the header names this column more than once; keep one", column=doubled[0])
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
            known = sorted(name for name in have if _documented(name))
            raise DataError(source, f"missing required column{either}; of the documented columns the header has "
                                    f"{known or 'none'} (and {len(have) - len(known)} others: is the first line a "
                                    "header?); see docs/training.md", column=spec.name)
    return names


def _documented(name: str) -> bool:
    return name in COLUMNS_BY_NAME or name in ALTERNATIVES.values()


def _read_table(path: Path, source: str) -> _Table:
    import pyarrow as pa
    import pyarrow.parquet as pq

    name = path.name.lower()
    try:
        if name.endswith(".parquet") or name.endswith(".pq"):
            table = pq.read_table(path)
            return _Table(table, np.empty(0, np.int64), np.arange(1, table.num_rows + 1))
        if name.endswith(".csv") or name.endswith(".csv.gz"):
            return _read_csv(path)
    except (pa.ArrowException, OSError) as exc:
        # Arrow quotes the offending row in its message; keep only the part before it,
        # since a row holds identifiers.
        summary = str(exc).split(": ")[:2]
        raise DataError(source, f"cannot parse the file ({': '.join(summary)}); "
                        "check that it is a well-formed CSV or Parquet file") from exc
    raise DataError(source, "unknown file type; expected a name ending in .csv, .csv.gz or .parquet")


def _read_csv(path: Path) -> _Table:
    """Every column as text (converted later, so ids and MCCs keep leading zeros and a bad number is
    reported with its row). Lines with the wrong number of fields are skipped and numbered."""
    import pyarrow as pa
    import pyarrow.csv as pa_csv

    text = {c.name: pa.string() for c in COLUMNS} | {alt: pa.string() for alt in ALTERNATIVES.values()}
    convert = pa_csv.ConvertOptions(column_types=text, strings_can_be_null=False)
    skipped: list[int | None] = []

    def skip(row: Any) -> str:
        skipped.append(row.number)  # the physical line: None when read in parallel
        return "skip"

    def read(threads: bool) -> pa.Table:
        skipped.clear()
        # Quoted values may hold line breaks; write_history quotes them, so read them back.
        parse = pa_csv.ParseOptions(newlines_in_values=True, invalid_row_handler=skip)
        return pa_csv.read_csv(path, read_options=pa_csv.ReadOptions(use_threads=threads),
                               parse_options=parse, convert_options=convert)

    table = read(True)
    if not skipped:
        return _Table(table, np.empty(0, np.int64), np.arange(1, table.num_rows + 1))
    table = read(False)  # once more, in one thread, which numbers the lines it skips
    unparsed = np.array([n - 1 for n in skipped if n is not None], dtype=np.int64)  # line 1 is the header
    every = np.arange(1, table.num_rows + unparsed.size + 1)
    return _Table(table, unparsed, np.setdiff1d(every, unparsed, assume_unique=True))


__all__ = [
    "ALTERNATIVES",
    "DEFAULT_MAX_DROPPED_FRACTION",
    "DroppedRows",
    "ReadReport",
    "problem_error",
    "read_history",
    "read_history_dropping",
]
