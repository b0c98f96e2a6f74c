"""Identifier rules shared by the API boundary and offline histories: one definition of a PAN.

Card numbers never enter fraudscore; `card_id` is a token or keyed hash made upstream.
"""

from __future__ import annotations

_PAN_SEPARATORS = str.maketrans("", "", " -._/\t\n\r\u00a0")  # whatever a person or a spreadsheet puts between digits


def luhn_ok(digits: str) -> bool:
    """The Luhn checksum of a string of digits."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def looks_like_pan(value: str) -> bool:
    """True for 13–19 digits (spaces, tabs, dashes, dots, underscores, slashes ignored) passing the Luhn check."""
    if len(value) < 13:  # every call on the serving path: most tokens are shorter than any PAN
        return False
    digits = value.translate(_PAN_SEPARATORS)
    return 13 <= len(digits) <= 19 and digits.isdigit() and digits.isascii() and luhn_ok(digits)
