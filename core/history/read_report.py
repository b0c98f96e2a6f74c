"""What reading a history file kept, dropped and adjusted (`ReadReport`): printed by `train` and
`evaluate`, kept in the model's manifest and report. Row numbers count data rows from 1 in file order."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True, slots=True)
class DroppedRows:
    """Rows dropped (or adjusted) for one reason: how many, and the first few row numbers
    (from 1, in file order: row N of a CSV is on line N + 1 unless quoted values hold line breaks)."""

    column: str
    reason: str
    count: int
    first_rows: tuple[int, ...]

    def describe(self) -> str:
        rows = ", ".join(map(str, self.first_rows)) + (", …" if self.count > len(self.first_rows) else "")
        return f"{self.count} rows, column {self.column!r}: {self.reason} (rows {rows})"


@dataclass(frozen=True, slots=True)
class ReadReport:
    """What reading a file kept, dropped and adjusted; a row with several problems counts under each."""

    source: str
    rows_read: int
    rows_kept: int
    dropped: tuple[DroppedRows, ...]
    column_forms: dict[str, str]  # documented name → the file's column, where the file used another form
    fraud_read: int = 0
    fraud_kept: int = 0
    adjusted: tuple[DroppedRows, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def rows_dropped(self) -> int:
        return self.rows_read - self.rows_kept

    def summary(self) -> str:
        """A few lines for a person: counts, then each reason with its first rows."""
        fraud = f" ({self.fraud_read - self.fraud_kept} of them labelled fraud)" if self.fraud_read > self.fraud_kept else ""
        lines = [f"read {self.rows_read} rows from {self.source}: kept {self.rows_kept}, "
                 f"dropped {self.rows_dropped}{fraud}"]
        for form, name in sorted(self.column_forms.items()):
            lines.append(f"  column {name!r} read as {form}")
        lines += [f"  note: {note}" for note in self.notes]
        lines += [f"  dropped: {d.describe()}" for d in self.dropped]
        lines += [f"  kept, adjusted: {d.describe()}" for d in self.adjusted]
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        def rows(entries: tuple[DroppedRows, ...]) -> list[dict[str, Any]]:
            return [{"column": d.column, "reason": d.reason, "rows": d.count, "first_rows": list(d.first_rows)}
                    for d in entries]

        return {
            "source": Path(self.source).name,
            "rows_read": self.rows_read,
            "rows_kept": self.rows_kept,
            "rows_dropped": self.rows_dropped,
            "fraud_read": self.fraud_read,
            "fraud_kept": self.fraud_kept,
            "column_forms": dict(self.column_forms),
            "notes": list(self.notes),
            "dropped": rows(self.dropped),
            "adjusted": rows(self.adjusted),
        }
