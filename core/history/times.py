"""Times and durations as people write them, to epoch milliseconds.

`parse_time_ms` reads ISO 8601 (`2026-03-01`, `2026-03-01T12:30:00Z`, with an offset, or
without one: read as UTC) or epoch milliseconds; `parse_duration_ms` reads `36h`, `2d`,
`1d12h`, `90m`, `45s`, `500ms`. Both return None for text they cannot read, so callers
word the error for their context (a file's row, a command-line flag).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

_INTEGER = re.compile(r"[+-]?\d+")
# 2000-01-01: an earlier event time is most likely epoch seconds (or a year) read as milliseconds.
EARLIEST_PLAUSIBLE_MS = 946_684_800_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_MS = {"ms": 1, "s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def parse_int(text: str) -> int | None:
    """An int64 from decimal digits (optional sign), else None."""
    if not _INTEGER.fullmatch(text.strip()):
        return None
    value = int(text)
    return value if -(2 ** 63) <= value < 2 ** 63 else None


def parse_time_ms(text: str) -> int | None:
    """Epoch milliseconds from epoch-ms digits or ISO 8601 (no offset: UTC), else None."""
    if _INTEGER.fullmatch(text.strip()):
        return parse_int(text)
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - _EPOCH) // timedelta(milliseconds=1)


def parse_duration_ms(text: str) -> int | None:
    """Milliseconds from `<number><unit>` parts (units ms, s, m, h, d), e.g. `1d12h`; else None."""
    text = text.strip().lower()
    parts = _DURATION_PART.findall(text)
    if not text or "".join(number + unit for number, unit in parts) != text:
        return None
    return round(sum(float(number) * _UNIT_MS[unit] for number, unit in parts))


def iso_ms(ms: int) -> str:
    """ISO 8601 in UTC, to the millisecond, for messages and manifests."""
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
