"""The documented value rules of a history's rows, and the errors naming the first row that breaks one.

Row numbers in `DataError` count data rows from 1 in file order (the CSV header is not a row),
so row N of a CSV file is on line N + 1. Messages never quote an identifier.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from core.encode import mapped
from core.errors import DataError
from core.history.table import _ID_COLUMNS, History
from core.identifiers import looks_like_pan as is_pan


def looks_like_pan(values: np.ndarray) -> np.ndarray:
    """Boolean mask: which strings look like a raw card number (the API's rule, core.identifiers)."""
    return mapped(values, lambda v: isinstance(v, str) and is_pan(v), bool)


@dataclass(frozen=True, slots=True, eq=False)
class ValueProblem:
    """Rows of a history that break one documented value rule.

    `fatal` problems make the whole file unusable (a raw card number means the export
    is wrong, not one row); the others can be dropped row by row.
    """

    column: str
    reason: str
    rows: np.ndarray  # boolean mask over the history's rows
    fatal: bool = False


REPORTED_BEFORE = "fraud reported before the transaction happened; check both times' units and time zones"
DUPLICATE_ID = "duplicate transaction_id: repeats the id of an earlier row; each transaction must appear once"


def value_problems(history: History, *, duplicates: bool = True) -> list[ValueProblem]:
    """Every documented value rule the rows of `history` break, in column order (empty: all good).

    With `duplicates`, repeated transaction ids are flagged on the repeats; the first
    occurrence stays (core.history.read judges repeats itself, among otherwise good rows).
    """
    problems: list[ValueProblem] = []

    def check(column: str, bad: np.ndarray, reason: str, *, fatal: bool = False) -> None:
        if bad.any():
            problems.append(ValueProblem(column, reason, bad, fatal))

    def each(values: np.ndarray, test: Callable[[str], bool]) -> np.ndarray:
        return mapped(values, test, bool)  # once per distinct value

    for name in _ID_COLUMNS:
        check(name, getattr(history, name) == "", "empty id; every row needs one")
    if duplicates:
        check("transaction_id", repeated_ids(history.transaction_id), DUPLICATE_ID)
    # As the API refuses them, in card_id only (docs/security.md says why not the other ids).
    check("card_id", looks_like_pan(history.card_id),
          "value looks like a raw card number (13-19 digits); send a token or keyed hash instead", fatal=True)
    check("amount_minor", history.amount_minor <= 0,
          "expected an amount > 0 in minor currency units; refunds and reversals do not belong here")
    check("currency", each(history.currency, lambda c: not (len(c) == 3 and c.isascii() and c.isalpha()
                                                            and c.isupper())),
          "expected a 3-letter upper-case ISO 4217 code such as USD")
    check("merchant_category", each(history.merchant_category,
                                    lambda m: m != "" and not (len(m) == 4 and m.isascii() and m.isdigit())),
          "expected a 4-digit MCC such as 5411 (keep leading zeros) or an empty value")
    check("channel", (history.channel < 0) | (history.channel > 4),
          "expected 0 unspecified, 1 card present, 2 e-commerce, 3 other card-not-present or 4 ATM")
    check("latitude", np.abs(history.latitude) > 90, "expected degrees in [-90, 90] or empty (NaN)")
    check("longitude", np.abs(history.longitude) > 180, "expected degrees in [-180, 180] or empty (NaN)")
    check("is_fraud", (history.is_fraud != 0) & (history.is_fraud != 1), "expected 0 or 1")
    reported = history.fraud_reported_time_ms
    check("fraud_reported_time_ms", reported < -1,
          "expected epoch milliseconds, or -1 when not fraud or never reported")
    check("fraud_reported_time_ms", (reported >= 0) & (reported < history.event_time_ms) & (history.is_fraud == 1),
          REPORTED_BEFORE)
    check("received_time_ms", history.received_time_ms < -1,
          "expected epoch milliseconds, or -1 (or empty) when unknown")
    return problems


def repeated_ids(ids: np.ndarray) -> np.ndarray:
    """Mask of rows whose id appeared on an earlier row."""
    repeat = np.zeros(len(ids), dtype=bool)
    if len(ids) < 2:
        return repeat
    order = np.argsort(ids, kind="stable")  # equal ids keep file order: the first stays unmarked
    ordered = ids[order]
    repeat[order[1:][ordered[1:] == ordered[:-1]]] = True
    return repeat


def problem_error(problem: ValueProblem, history: History, source: str,
                  row_numbers: np.ndarray | None = None) -> DataError:
    """The `DataError` for `problem`'s first row. `row_numbers` maps a row of `history` to its
    row in the file (default: position + 1)."""
    def row_of(position: int) -> int:
        return int(row_numbers[position]) if row_numbers is not None else position + 1

    rows = np.flatnonzero(problem.rows)
    first = int(rows[0])
    reason = f"{problem.reason} ({len(rows)} such rows)"
    if problem.reason == DUPLICATE_ID:
        seen = int(np.flatnonzero(history.transaction_id == history.transaction_id[first])[0])
        reason = (f"duplicate transaction_id: this row repeats the id of row {row_of(seen)}; "
                  f"each transaction must appear once ({len(rows)} such rows)")
    return DataError(source, reason, row=row_of(first), column=problem.column)


def validate_history(history: History, *, source: str = "<in-memory history>") -> None:
    """Check the documented value rules; raise `DataError` naming `source`, the column and first bad row.

    Rows are counted from 1 in the order of `history` (for a file: before sorting).
    """
    problems = value_problems(history)
    if problems:
        raise problem_error(problems[0], history, source)
