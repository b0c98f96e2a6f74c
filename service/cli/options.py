"""What the offline commands share: argument types (durations, moments, bounded numbers), the
options several commands take, and the server's identifier key read as the server reads it."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from core.encode import KeyHasher


def duration(text: str) -> int:
    """argparse type: a duration such as 36h, 2d or 1d12h (or 0), in milliseconds."""
    from core.history.times import parse_duration_ms

    ms = 0 if text.strip() == "0" else parse_duration_ms(text)
    if ms is None:
        raise argparse.ArgumentTypeError(f"expected a duration such as 36h, 2d, 1d12h or 90m, got {text!r}")
    return ms


def moment(text: str) -> int:
    """argparse type: ISO 8601 (UTC when no offset) or epoch milliseconds, as epoch milliseconds."""
    from core.history.times import EARLIEST_PLAUSIBLE_MS, parse_time_ms

    ms = parse_time_ms(text)
    if ms is None:
        raise argparse.ArgumentTypeError(
            f"expected ISO 8601 such as 2026-03-01 or 2026-03-01T12:00:00Z, or epoch milliseconds, got {text!r}")
    if text.strip().lstrip("+-").isdigit() and ms < EARLIEST_PLAUSIBLE_MS:
        raise argparse.ArgumentTypeError(
            f"{text!r} read as epoch milliseconds is before 2000: a year or epoch seconds? Write ISO 8601 "
            "such as 2026-10-15, or epoch milliseconds")
    return ms


def number_in(low: float, high: float, *, high_included: bool, example: str) -> Callable[[str], float]:
    """argparse type: a finite number in [low, high) or [low, high]."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not (low <= value < high or (high_included and value == high)):
            bounds = f"[{low:g}, {high:g}{']' if high_included else ')'}"
            raise argparse.ArgumentTypeError(f"expected a number in {bounds} such as {example}, got {text!r}")
        return value
    return parse


rate = number_in(0.0, 1.0, high_included=False, example="0.005")


def id_hasher(args: argparse.Namespace, command: str) -> tuple[KeyHasher, str]:
    """The server's identifier key, read as the server reads it: --id-hash-key-file, else
    FRAUDSCORE_ID_HASH_KEY_FILE or FRAUDSCORE_ID_HASH_KEY, else the published development key;
    and a line saying which (never the key), for stderr once the inputs have loaded. Features
    depend on the key (seen-before flags, distinct counts, shared table slots), so offline work
    must use the server's. Exits 2 on a bad setting."""
    from core.encode import KeyHasher
    from service.runtime.config import DEFAULT_ID_HASH_KEY, ENV_PREFIX, Settings

    try:
        settings = Settings.load(id_hash_key_file=getattr(args, "id_hash_key_file", None))
    except ValueError as exc:
        print(f"fraudscore {command}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if settings.id_hash_key == DEFAULT_ID_HASH_KEY:
        note = (f"note: identifiers hashed with the published development key; a server with {ENV_PREFIX}ID_HASH_KEY "
                "set computes other features: set the same key here (or --id-hash-key-file)")
    else:
        where = "ID_HASH_KEY_FILE" if settings.id_hash_key_file is not None else "ID_HASH_KEY"
        note = f"identifiers hashed with the key from {ENV_PREFIX}{where}"
    return KeyHasher(settings.id_hash_key.encode()), note


def key_file_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--id-hash-key-file", type=Path, metavar="FILE",
                   help="file holding the server's identifier key (as FRAUDSCORE_ID_HASH_KEY_FILE); default: "
                        "FRAUDSCORE_ID_HASH_KEY_FILE or FRAUDSCORE_ID_HASH_KEY, else the published development "
                        "key. Features depend on it: use the server's")


def label_delay_arg(p: argparse.ArgumentParser, default: str = "at their fraud_reported_time only") -> None:
    p.add_argument("--label-delay", type=duration, metavar="DURATION",
                   help=f"fraud labels feed the features this long after the transaction at the earliest, "
                        f"e.g. 48h or 2d (default: {default})")


def max_dropped_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-dropped", type=number_in(0.0, 1.0, high_included=True, example="0.01"), default=0.01,
                   metavar="FRACTION",
                   help="rows with bad values are dropped and summarised; more than this share of the file "
                        "is refused as a format problem (default 0.01)")


def world_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--days", type=int, default=30, help="simulated days (default 30)")
    p.add_argument("--cards", type=int, default=5000, help="simulated cards (default 5000)")
    p.add_argument("--merchants", type=int, default=800, help="simulated merchants (default 800)")
    p.add_argument("--seed", type=int, default=7, help="random seed (default 7)")
