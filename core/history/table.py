"""The columnar history of card transactions: one numpy array per column, in arrival order.

A `History` is what training, backtests and `replay` read, and what `core.history.simulate` makes.
`core.history.read` reads one from a file (with its alternative column forms and the
drop-or-refuse policy); `core.history.validate` holds the documented value rules;
`write_history` writes one to `.csv`, `.csv.gz` or `.parquet`. pyarrow is imported inside
the functions that need it only: it is a training dependency.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from enum import IntEnum
from pathlib import Path
from typing import Any, Literal

import numpy as np

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
    ColumnSpec(
        "received_time_ms", "int64", False, -1,
        "when the service received the authorization, epoch ms (its arrival order); -1 when unknown",
    ),
)
COLUMNS_BY_NAME: dict[str, ColumnSpec] = {c.name: c for c in COLUMNS}
_ID_COLUMNS = ("transaction_id", "card_id", "merchant_id")


@dataclass(frozen=True, slots=True, eq=False)
class History:
    """Transactions as parallel numpy arrays, one per column of `COLUMNS`.

    Readers and `core.history.simulate` return it in arrival order (`sorted_by_time`): by
    `received_time_ms` where known, else by `event_time_ms`. Strings are object arrays of
    `str`. Equality is `equals`, not `==` (arrays do not compare to one bool).
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
    received_time_ms: np.ndarray

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
            raise ValueError(f"unknown columns {unknown}; expected names from core.history.table.COLUMNS")
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

    @property
    def arrival_time_ms(self) -> np.ndarray:
        """When each transaction reached the service: `received_time_ms` where known, else its
        event time (a history without receipt times is taken to have arrived in event order)."""
        received = self.received_time_ms
        return np.where(received >= 0, received, self.event_time_ms)

    def sorted_by_time(self) -> History:
        """The rows in arrival order (`arrival_time_ms`): the order the service met them, and so the
        order `core.offline.replay` feeds them to the kernels. Rows with equal times keep their order;
        without receipt times this is event-time order."""
        return self.take(np.argsort(self.arrival_time_ms, kind="stable"))

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
    "write_history",
    "write_table",
]

# History's fields and COLUMNS are two spellings of one schema; refuse to import if they drift.
if tuple(f.name for f in fields(History)) != tuple(c.name for c in COLUMNS):  # pragma: no cover
    raise ImportError("core.history.table: History fields and COLUMNS disagree; keep them in the same order")
