"""core.history.times: the times and durations people write, to epoch milliseconds."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.history.times import iso_ms, parse_duration_ms, parse_int, parse_time_ms

MARCH_1 = int(datetime(2026, 3, 1, tzinfo=UTC).timestamp() * 1000)


@pytest.mark.parametrize(("text", "ms"), [
    ("2026-03-01", MARCH_1),
    ("2026-03-01T00:00:00Z", MARCH_1),
    ("2026-03-01T01:00:00+01:00", MARCH_1),
    ("2026-02-28T19:00:00-05:00", MARCH_1),
    ("2026-03-01 00:00:00.250", MARCH_1 + 250),  # no offset: UTC
    ("2024-02-29T12:00:00Z", int(datetime(2024, 2, 29, 12, tzinfo=UTC).timestamp() * 1000)),  # leap day
    (str(MARCH_1), MARCH_1),
    (f" {MARCH_1} ", MARCH_1),
])
def test_parse_time_ms(text: str, ms: int) -> None:
    assert parse_time_ms(text) == ms


@pytest.mark.parametrize("text", ["", "yesterday", "2026-13-01", "2026-02-30", "12:30", "1.5", "1e12"])
def test_parse_time_ms_refuses(text: str) -> None:
    assert parse_time_ms(text) is None


@given(ms=st.integers(-2**40, 2**42), minutes=st.integers(-14 * 60, 14 * 60))
def test_iso_with_any_offset_round_trips(ms: int, minutes: int) -> None:
    moment = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)
    assert parse_time_ms(moment.astimezone(timezone(timedelta(minutes=minutes))).isoformat()) == ms
    assert parse_time_ms(iso_ms(ms)) == ms


@pytest.mark.parametrize(("text", "ms"), [
    ("36h", 36 * 3_600_000), ("2d", 2 * 86_400_000), ("1d12h", 36 * 3_600_000), ("90m", 5_400_000),
    ("45s", 45_000), ("500ms", 500), ("1.5h", 5_400_000), ("0s", 0), (" 2D ", 2 * 86_400_000),
])
def test_parse_duration_ms(text: str, ms: int) -> None:
    assert parse_duration_ms(text) == ms


@pytest.mark.parametrize("text", ["", "2", "2x", "h", "-1h", "1h 2m", "2 days"])
def test_parse_duration_ms_refuses(text: str) -> None:
    assert parse_duration_ms(text) is None


def test_parse_int_bounds() -> None:
    assert parse_int(str(2**63 - 1)) == 2**63 - 1
    assert parse_int(str(2**63)) is None
    assert parse_int("-12") == -12 and parse_int("1.0") is None
