"""One column of a history file → a numpy array of its documented dtype, and what was wrong.

`core.history.read` reads the file and decides what to do with the problems; this module
turns a pyarrow column (text from a CSV, any of several types from Parquet) into values,
marking per row what could not be read (`ValueProblem`) and noting what was read in a way
the user should know about. Values that cannot be read hold a placeholder; the caller
drops or refuses those rows. pyarrow is imported inside the functions: a training
dependency, never loaded by the server.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from core.encode import currency_exponent, mapped
from core.errors import DataError
from core.history.table import _NUMPY_DTYPES, ColumnSpec
from core.history.times import EARLIEST_PLAUSIBLE_MS, parse_int, parse_time_ms
from core.history.validate import ValueProblem

if TYPE_CHECKING:
    import pyarrow as pa

_AMOUNT_DECIMALS = 6  # decimal amounts are read exactly to this many places (more, if only zeros)
# Sign, up to 12 digits, a point and up to 6 more (then only zeros), blanks around allowed.
AMOUNT_PATTERN = r"^\s*(?P<sign>-?)(?P<whole>\d{1,12})(?:\.(?P<fraction>\d{0,6})0*)?\s*$"
_WHOLE_FLOAT = re.compile(r"\s*[+-]?\d+\.0*\s*")  # 1.0, as pandas writes integer columns with blanks
_TIME_COLUMNS = ("event_time", "fraud_reported_time", "received_time")


@dataclass
class Converted:
    """A column's values (placeholders where unreadable), the rows it could not read, and notes."""

    values: np.ndarray
    problems: list[ValueProblem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def convert_column(column: pa.ChunkedArray, spec: ColumnSpec, name: str, source: str) -> Converted:
    """The column as spec's dtype, nulls as spec's default (a missing required value is a problem)."""
    import pyarrow as pa

    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    if spec.dtype == "str":
        return _text(column, spec, name, source)
    notes: list[str] = []
    if name in _TIME_COLUMNS:
        values, null, bad = _times(column, name, source, notes)
        expected = "ISO 8601 such as 2026-03-01T12:30:00Z, or epoch milliseconds"
    else:
        values, null, bad = _numbers(column, spec, name, source)
        expected = "a number" if spec.dtype == "float64" else f"a whole number that fits {spec.dtype}"
    problems = [ValueProblem(name, f"expected {expected}; fix or remove that value", bad)] if bad.any() else []
    if spec.name == "is_fraud" and null.any():
        # A file with labels and a blank one: 0 would quietly call a possible fraud legitimate.
        problems.append(ValueProblem(name, "missing label; expected 0 or 1", null & ~bad))
        null = np.zeros_like(null)
    converted = _finish(values, null, spec, name, problems)
    if spec.name == "event_time_ms":
        early = int(np.sum(converted.values < EARLIEST_PLAUSIBLE_MS))
        if early:
            notes.append(f"{early} event times fall before 2000-01-01: if they are epoch seconds, "
                         "multiply them by 1000 (epoch milliseconds are expected)")
    converted.notes += notes
    return converted


def _finish(values: np.ndarray, null: np.ndarray, spec: ColumnSpec, name: str,
            problems: list[ValueProblem]) -> Converted:
    if null.any():
        if spec.required:
            problems.append(ValueProblem(name, "missing value in a required column", null))
        values = np.where(null, np.asarray(spec.default if spec.default is not None else 0, values.dtype), values)
    return Converted(values.astype(_NUMPY_DTYPES[spec.dtype], copy=False), problems)


def _text(column: pa.ChunkedArray, spec: ColumnSpec, name: str, source: str) -> Converted:
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_integer(column.type):
        column = pc.cast(column, pa.string())
        if spec.name == "merchant_category":  # a numeric MCC column lost its leading zeros: 742 is 0742
            column = pc.utf8_lpad(column, 4, "0")
    elif not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise DataError(source, f"expected text, got {column.type}; store this column as strings", column=name)
    null = _null_mask(column)
    filled = column.fill_null(spec.default if spec.default is not None else "")
    text: np.ndarray = filled.to_numpy(zero_copy_only=False).astype(object)
    if null.any() and spec.required:
        return Converted(text, [ValueProblem(name, "missing value in a required column", null)])
    return Converted(text)


def _null_mask(array: pa.Array | pa.ChunkedArray) -> np.ndarray:
    import pyarrow.compute as pc

    return np.asarray(pc.is_null(array).to_numpy(zero_copy_only=False), dtype=bool)


def _is_text(kind: pa.DataType) -> bool:
    import pyarrow as pa

    return bool(pa.types.is_string(kind) or pa.types.is_large_string(kind))


def _blank_as_null(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """An empty CSV cell is a missing value."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if _is_text(column.type):
        return pc.if_else(pc.equal(pc.utf8_trim_whitespace(column), ""), pa.scalar(None, column.type), column)
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
    if _is_text(kind):
        values, null, bad = _parse_text(column, target, _parse_float if floating else _parse_whole)
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


def _parse_whole(text: str) -> int | None:
    """An int from digits, or from a float's text with nothing after the point (1.0)."""
    if _WHOLE_FLOAT.fullmatch(text):
        text = text.strip().split(".")[0]
    return parse_int(text)


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


def _times(column: pa.ChunkedArray, name: str, source: str,
           notes: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(epoch ms, null mask, bad mask) of a time column: ISO 8601 or epoch-ms text, numbers, or timestamps."""
    import pyarrow as pa
    import pyarrow.compute as pc

    kind = column.type
    column = _blank_as_null(column)
    if pa.types.is_timestamp(kind):
        # Finer than a millisecond (pandas writes nanoseconds): truncated, as the API's ms are.
        ms = pc.cast(pc.cast(column, pa.timestamp("ms", tz=kind.tz), safe=False), pa.int64())
        if kind.tz is None:
            notes.append(f"column {name!r} holds timestamps without a time zone: read as UTC")
        return ms.fill_null(0).to_numpy(), _null_mask(column), np.zeros(len(column), dtype=bool)
    if pa.types.is_integer(kind) or pa.types.is_floating(kind):
        return _numbers(column, ColumnSpec(name, "int64", False, -1, ""), name, source)
    if not _is_text(kind):
        raise DataError(source, f"expected ISO 8601 text, epoch milliseconds or a timestamp, got {kind}",
                        column=name)
    column = pc.utf8_trim_whitespace(column)
    null = _null_mask(column)
    # The common, clean cases in one vectorized cast each: epoch-ms digits, then ISO 8601
    # with an offset, then without one (read as UTC).
    for target in (pa.int64(), pa.timestamp("ms", tz="UTC"), pa.timestamp("ms")):
        try:
            cast = pc.cast(column, target)
        except pa.ArrowException:
            continue
        if target == pa.timestamp("ms"):
            notes.append(f"column {name!r} holds times without a UTC offset: read as UTC")
        ms = cast if target == pa.int64() else pc.cast(cast, pa.int64())
        return ms.fill_null(0).to_numpy(), null, np.zeros(len(null), dtype=bool)
    return _parse_text(column, None, parse_time_ms)  # mixed forms or bad values: row by row


def convert_decimal_amount(column: pa.ChunkedArray, spec: ColumnSpec, name: str, source: str,
                           currency: np.ndarray) -> Converted:
    """Minor units from decimal amounts, exactly (text, never through a float's rounding)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    kind = column.type
    if pa.types.is_dictionary(kind):
        column, kind = column.cast(kind.value_type), kind.value_type
    if pa.types.is_floating(kind):
        # A float holds 12.34 as 12.339999…; its shortest text after rounding to the places we
        # read is what the exporter meant (0.1 + 0.2 → 0.3).
        column = pc.cast(pc.round(column, _AMOUNT_DECIMALS), pa.string())
    elif pa.types.is_integer(kind) or pa.types.is_decimal(kind):
        column = pc.cast(column, pa.string())
    elif not _is_text(kind):
        raise DataError(source, f"expected a decimal amount, got {kind}", column=name)
    column = _blank_as_null(column)
    null = _null_mask(column)
    parts = pc.extract_regex(column, AMOUNT_PATTERN)
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
        problems.append(ValueProblem(name, "expected a decimal amount in major units such as 12.50 "
                                           "(up to 12 digits before the point, 6 after)", malformed))
    if too_precise.any():
        problems.append(ValueProblem(name, "more decimal places than the currency has (2 for USD, 0 for JPY, "
                                           "3 for KWD)", too_precise))
    minor = np.where(malformed | too_precise, 0, scaled // step)
    return _finish(minor, null, spec, name, problems)
