"""The columnar history of card transactions: one numpy array per column, sorted by time.

A `History` is what training, backtests and `replay` read, and what `core.simulate` makes.
`read_history` / `write_history` move it to and from `.csv`, `.csv.gz` and `.parquet`
files through pyarrow, which is imported inside those two functions only: pyarrow is a
training dependency and the serving path imports this module without it.

Row numbers in `DataError` count data rows from 1 in file order (the CSV header is not
a row), so row N of a CSV file is on line N + 1. Messages never quote an identifier.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from enum import IntEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from core.identifiers import looks_like_pan as is_pan

if TYPE_CHECKING:
    import pyarrow as pa

DType = Literal["str", "int64", "int8", "float64"]

_NUMPY_DTYPES: dict[str, np.dtype[Any]] = {
    "str": np.dtype(object),
    "int64": np.dtype(np.int64),
    "int8": np.dtype(np.int8),
    "float64": np.dtype(np.float64),
}


class Channel(IntEnum):
    """How the card was used (the `channel` column)."""

    UNSPECIFIED = 0
    CARD_PRESENT = 1
    ECOMMERCE = 2
    CARD_NOT_PRESENT_OTHER = 3
    ATM = 4


@dataclass(frozen=True, slots=True)
class ColumnSpec:
    """One documented column of a history file."""

    name: str
    dtype: DType
    required: bool
    default: str | int | float | None
    doc: str


COLUMNS: tuple[ColumnSpec, ...] = (
    ColumnSpec("transaction_id", "str", True, None, "unique id of the authorization"),
    ColumnSpec("card_id", "str", True, None, "card token or keyed hash, never a PAN"),
    ColumnSpec("customer_id", "str", False, "", "customer owning the card; empty when unknown"),
    ColumnSpec("merchant_id", "str", True, None, "merchant (acceptor) id"),
    ColumnSpec("merchant_category", "str", False, "", "4-digit MCC such as 5411; empty when unknown"),
    ColumnSpec("amount_minor", "int64", True, None, "amount in minor currency units, > 0"),
    ColumnSpec("currency", "str", True, None, "ISO 4217 code of amount_minor, e.g. USD"),
    ColumnSpec("event_time_ms", "int64", True, None, "authorization time, Unix epoch milliseconds"),
    ColumnSpec("channel", "int8", False, 0, "0 unspecified, 1 card present, 2 e-commerce, 3 other CNP, 4 ATM"),
    ColumnSpec("country", "str", False, "", "ISO 3166 alpha-2 country where it happened; empty when unknown"),
    ColumnSpec("latitude", "float64", False, float("nan"), "degrees north; NaN when unknown"),
    ColumnSpec("longitude", "float64", False, float("nan"), "degrees east; NaN when unknown"),
    ColumnSpec("device_id", "str", False, "", "device fingerprint for e-commerce; empty when unknown"),
    ColumnSpec("ip_address", "str", False, "", "buyer IP for e-commerce; empty when unknown"),
    ColumnSpec("is_fraud", "int8", False, 0, "label: 1 fraud, 0 not fraud (all 0 when unlabelled)"),
    ColumnSpec(
        "fraud_reported_time_ms", "int64", False, -1,
        "when the fraud became known, epoch ms; -1 when not fraud or never reported",
    ),
)
COLUMNS_BY_NAME: dict[str, ColumnSpec] = {c.name: c for c in COLUMNS}
_ID_COLUMNS = ("transaction_id", "card_id", "merchant_id")


@dataclass(frozen=True, slots=True, eq=False)
class History:
    """Transactions as parallel numpy arrays, one per column of `COLUMNS`.

    Readers and `core.simulate` return it sorted by `event_time_ms`. Strings are object
    arrays of `str`. Equality is `equals`, not `==` (arrays do not compare to one bool).
    """

    transaction_id: np.ndarray
    card_id: np.ndarray
    customer_id: np.ndarray
    merchant_id: np.ndarray
    merchant_category: np.ndarray
    amount_minor: np.ndarray
    currency: np.ndarray
    event_time_ms: np.ndarray
    channel: np.ndarray
    country: np.ndarray
    latitude: np.ndarray
    longitude: np.ndarray
    device_id: np.ndarray
    ip_address: np.ndarray
    is_fraud: np.ndarray
    fraud_reported_time_ms: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.transaction_id)
        for spec in COLUMNS:
            array = getattr(self, spec.name)
            if not isinstance(array, np.ndarray) or array.ndim != 1:
                raise TypeError(f"History.{spec.name}: expected a 1-D numpy array, got {type(array).__name__}")
            if array.dtype != _NUMPY_DTYPES[spec.dtype]:
                raise TypeError(
                    f"History.{spec.name}: expected dtype {spec.dtype}, got {array.dtype}; "
                    "build it with History.from_columns, which converts"
                )
            if len(array) != n:
                raise ValueError(
                    f"History.{spec.name}: expected {n} rows like transaction_id, got {len(array)}"
                )

    @classmethod
    def from_columns(cls, columns: Mapping[str, Any]) -> History:
        """Build a History from array-likes, filling absent optional columns with their defaults.

        Raises ValueError for an unknown or missing required column.
        """
        unknown = sorted(set(columns) - set(COLUMNS_BY_NAME))
        if unknown:
            raise ValueError(f"unknown columns {unknown}; expected names from core.history.COLUMNS")
        missing = [c.name for c in COLUMNS if c.required and c.name not in columns]
        if missing:
            raise ValueError(f"missing required columns {missing}")
        n = len(columns["transaction_id"])
        arrays: dict[str, np.ndarray] = {}
        for spec in COLUMNS:
            if spec.name in columns:
                arrays[spec.name] = _to_numpy(columns[spec.name], spec.dtype)
            else:
                arrays[spec.name] = np.full(n, spec.default, dtype=_NUMPY_DTYPES[spec.dtype])
        return cls(**arrays)

    def __len__(self) -> int:
        return len(self.transaction_id)

    def columns(self) -> dict[str, np.ndarray]:
        """The arrays by column name, in `COLUMNS` order (the arrays themselves, not copies)."""
        return {spec.name: getattr(self, spec.name) for spec in COLUMNS}

    def take(self, indices: np.ndarray) -> History:
        """Rows at `indices` (integer positions or a boolean mask), in that order."""
        return History(**{name: array[indices] for name, array in self.columns().items()})

    def slice(self, start: int, stop: int) -> History:
        """Rows `start` to `stop` (exclusive), as views on the same memory."""
        return History(**{name: array[start:stop] for name, array in self.columns().items()})

    def sorted_by_time(self) -> History:
        """The rows sorted by `event_time_ms`; rows with equal times keep their order."""
        return self.take(np.argsort(self.event_time_ms, kind="stable"))

    def equals(self, other: History) -> bool:
        """True when both hold the same rows in the same order (NaN equals NaN)."""
        for spec in COLUMNS:
            mine, theirs = getattr(self, spec.name), getattr(other, spec.name)
            equal_nan = spec.dtype == "float64"
            if not np.array_equal(mine, theirs, equal_nan=equal_nan):
                return False
        return True


def _to_numpy(values: Any, dtype: DType) -> np.ndarray:
    if dtype == "str":
        # `astype(object)` on a numpy unicode array yields Python str objects.
        return np.asarray(values).astype(object) if len(values) else np.empty(0, dtype=object)
    return np.asarray(values, dtype=_NUMPY_DTYPES[dtype])


def looks_like_pan(values: np.ndarray) -> np.ndarray:
    """Boolean mask: which strings look like a raw card number (the API's rule, core.identifiers)."""
    return np.fromiter((isinstance(v, str) and is_pan(v) for v in values), dtype=bool, count=len(values))


def validate_history(history: History, *, source: str = "<in-memory history>") -> None:
    """Check the documented value rules; raise `DataError` naming `source`, the column and first bad row.

    Rows are counted from 1 in the order of `history` (for a file: before sorting).
    """
    from core.errors import DataError

    def fail(column: str, bad: np.ndarray, reason: str) -> None:
        rows = np.flatnonzero(bad)
        if len(rows):
            raise DataError(source, f"{reason} ({len(rows)} such rows)", row=int(rows[0]) + 1, column=column)

    for name in _ID_COLUMNS:
        fail(name, getattr(history, name) == "", "empty id; every row needs one")
    fail("card_id", looks_like_pan(history.card_id),
         "value looks like a raw card number (13-19 digits); send a token or keyed hash instead")
    fail("amount_minor", history.amount_minor <= 0,
         "expected an amount > 0 in minor currency units; refunds and reversals do not belong here")
    currency = history.currency
    fail("currency", np.fromiter((not (len(c) == 3 and c.isascii() and c.isalpha() and c.isupper()) for c in currency),
                                 dtype=bool, count=len(currency)),
         "expected a 3-letter upper-case ISO 4217 code such as USD")
    mcc = history.merchant_category
    fail("merchant_category", np.fromiter((m != "" and not (len(m) == 4 and m.isascii() and m.isdigit()) for m in mcc),
                                          dtype=bool, count=len(mcc)),
         "expected a 4-digit MCC such as 5411 (keep leading zeros) or an empty value")
    fail("channel", (history.channel < 0) | (history.channel > 4),
         "expected 0 unspecified, 1 card present, 2 e-commerce, 3 other card-not-present or 4 ATM")
    fail("latitude", np.abs(history.latitude) > 90, "expected degrees in [-90, 90] or empty (NaN)")
    fail("longitude", np.abs(history.longitude) > 180, "expected degrees in [-180, 180] or empty (NaN)")
    fail("is_fraud", (history.is_fraud != 0) & (history.is_fraud != 1), "expected 0 or 1")
    fail("fraud_reported_time_ms", history.fraud_reported_time_ms < -1,
         "expected epoch milliseconds, or -1 when not fraud or never reported")
    _check_unique_ids(history.transaction_id, source)


def _check_unique_ids(ids: np.ndarray, source: str) -> None:
    from core.errors import DataError

    if len(ids) < 2:
        return
    order = np.argsort(ids, kind="stable")
    ordered = ids[order]
    repeated = np.flatnonzero(ordered[1:] == ordered[:-1])
    if len(repeated):
        # The stable sort puts each first occurrence before its repeats, so the smallest
        # file position among the repeats is the first row that reuses an id.
        positions = order[repeated + 1]
        first_repeat = int(positions.min())
        first_seen = int(order[repeated[np.argmin(positions)]])
        raise DataError(
            source,
            f"duplicate transaction_id: this row repeats the id of row {first_seen + 1}; "
            "each transaction must appear once",
            row=first_repeat + 1,
            column="transaction_id",
        )


def read_history(path: str | Path) -> History:
    """Read a `.csv`, `.csv.gz` or `.parquet` (or `.pq`) history file, validate it and sort it by time.

    Absent optional columns get their defaults, unknown columns are ignored, id-like
    columns are read as text even when they hold digits. Raises `DataError` naming the
    file, the column and, for a bad value, the first bad row.
    """
    from core.errors import DataError

    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise DataError(source, "no such file; expected a .csv, .csv.gz or .parquet history file")
    table = _read_table(path, source)
    present = set(table.column_names)
    missing = [c.name for c in COLUMNS if c.required and c.name not in present]
    if missing:
        raise DataError(
            source,
            f"missing required column; the file has {sorted(present)}; "
            "see core.history.COLUMNS for the documented names",
            column=missing[0],
        )
    columns: dict[str, np.ndarray] = {}
    for spec in COLUMNS:
        if spec.name in present:
            columns[spec.name] = _convert(table.column(spec.name), spec, source)
    history = History.from_columns(columns)
    validate_history(history, source=source)
    return history.sorted_by_time()


def _read_table(path: Path, source: str) -> pa.Table:
    import pyarrow as pa
    import pyarrow.csv as pa_csv
    import pyarrow.parquet as pq

    from core.errors import DataError

    name = path.name.lower()
    try:
        if name.endswith(".parquet") or name.endswith(".pq"):
            return pq.read_table(path)
        if name.endswith(".csv") or name.endswith(".csv.gz"):
            # Every documented column comes in as text and is converted below, so ids and
            # MCCs keep leading zeros and a bad number is reported with its row.
            convert = pa_csv.ConvertOptions(
                column_types={c.name: pa.string() for c in COLUMNS},
                strings_can_be_null=False,
            )
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


def _convert(column: pa.ChunkedArray, spec: ColumnSpec, source: str) -> np.ndarray:
    import pyarrow as pa
    import pyarrow.compute as pc

    from core.errors import DataError

    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    kind = column.type
    if spec.dtype == "str":
        if pa.types.is_integer(kind):
            column = pc.cast(column, pa.string())
        elif not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise DataError(source, f"expected text, got {kind}; store this column as strings", column=spec.name)
        text: np.ndarray = _fill_nulls(column, spec, source).to_numpy(zero_copy_only=False).astype(object)
        return text

    target = pa.int8() if spec.dtype == "int8" else pa.int64() if spec.dtype == "int64" else pa.float64()
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        # An empty CSV cell is a missing value: the default for optional columns.
        column = pc.if_else(pc.equal(column, ""), pa.scalar(None, kind), column)
    elif pa.types.is_floating(kind) and spec.dtype != "float64":
        column = pc.if_else(pc.is_nan(column), pa.scalar(None, kind), column)
    elif not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)):
        raise DataError(source, f"expected {spec.dtype}, got {kind}", column=spec.name)
    try:
        converted = pc.cast(column, target)
    except pa.ArrowException:
        bad = _first_failing_row(column, target)
        expected = "a number" if spec.dtype == "float64" else f"a whole number that fits {spec.dtype}"
        raise DataError(source, f"expected {expected}; fix or remove that value", row=bad + 1,
                        column=spec.name) from None
    filled = _fill_nulls(converted, spec, source)
    numbers: np.ndarray = filled.to_numpy().astype(_NUMPY_DTYPES[spec.dtype], copy=False)
    return numbers


def _fill_nulls(column: pa.ChunkedArray, spec: ColumnSpec, source: str) -> pa.ChunkedArray:
    from core.errors import DataError

    if column.null_count == 0:
        return column
    if spec.required:
        import pyarrow.compute as pc

        first = int(pc.index(pc.is_null(column), True).as_py())
        raise DataError(source, "missing value in a required column", row=first + 1, column=spec.name)
    return column.fill_null(spec.default)


def _first_failing_row(column: pa.ChunkedArray, target: pa.DataType) -> int:
    """Position of the first value that does not cast, by bisection (about 20 casts for 1M rows)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    lo, hi = 0, len(column)  # invariant: column[:lo] casts, column[:hi] does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            pc.cast(column.slice(0, mid), target)
            lo = mid
        except pa.ArrowException:
            hi = mid
    return lo


def write_history(history: History, path: str | Path) -> None:
    """Write `history` to `.csv`, `.csv.gz` or `.parquet` (by the name's ending), all columns.

    NaN coordinates are written as empty CSV cells; `read_history` reads the file back equal.
    """
    write_table({spec.name: getattr(history, spec.name) for spec in COLUMNS}, path)


def write_table(columns: Mapping[str, np.ndarray], path: str | Path) -> None:
    """Write named numpy columns to `.csv`, `.csv.gz` or `.parquet` (by the name's ending).

    Object arrays are written as strings, float NaN as null (an empty CSV cell), integers as is.
    """
    import pyarrow as pa
    import pyarrow.csv as pa_csv
    import pyarrow.parquet as pq

    path = Path(path)
    name = path.name.lower()
    arrays = []
    for values in columns.values():
        if values.dtype == object:
            arrays.append(pa.array(values, type=pa.string()))
        elif values.dtype.kind == "f":
            arrays.append(pa.array(values, type=pa.float64(), from_pandas=True))  # NaN -> null
        else:
            arrays.append(pa.array(values))
    table = pa.Table.from_arrays(arrays, names=list(columns))
    if name.endswith(".parquet") or name.endswith(".pq"):
        pq.write_table(table, path)
    elif name.endswith(".csv") or name.endswith(".csv.gz"):
        with pa.output_stream(path) as stream:  # compresses when the name ends in .gz
            pa_csv.write_csv(table, stream)
    else:
        raise ValueError(f"cannot write {path}: expected a name ending in .csv, .csv.gz or .parquet")


__all__ = [
    "COLUMNS",
    "COLUMNS_BY_NAME",
    "Channel",
    "ColumnSpec",
    "History",
    "looks_like_pan",
    "read_history",
    "validate_history",
    "write_history",
    "write_table",
]

# History's fields and COLUMNS are two spellings of one schema; refuse to import if they drift.
if tuple(f.name for f in fields(History)) != tuple(c.name for c in COLUMNS):  # pragma: no cover
    raise ImportError("core.history: History fields and COLUMNS disagree; keep them in the same order")
