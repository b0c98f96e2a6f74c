"""The `objective=` line of a LightGBM text model: which output transform `predict` applies."""

from __future__ import annotations

import math
from dataclasses import dataclass

# Objectives whose ConvertOutput is the identity (absent the `sqrt` flag, refused below).
IDENTITY_OBJECTIVES = frozenset({"regression", "regression_l1", "huber", "fair", "quantile", "mape"})


@dataclass(frozen=True, slots=True)
class Objective:
    """A supported objective: `name` as LightGBM writes it, `sigmoid` > 0 only for `binary`."""

    name: str
    sigmoid: float


class UnsupportedObjective(ValueError):
    """The objective line names something fraudscore cannot serve; the message says what."""


def parse_objective(line: str | None) -> Objective:
    """Parse the value of the `objective=` header line, e.g. ``binary sigmoid:1``.

    Raises UnsupportedObjective naming the objective or flag that cannot be served.
    """
    if line is None or not line.strip():
        raise UnsupportedObjective(
            "the model has no objective= line (trained with a custom objective?); "
            "retrain with objective='binary' or a regression objective"
        )
    name, *options = line.split()
    if name == "binary":
        sigmoid = -1.0
        for option in options:
            key, _, value = option.partition(":")
            if key == "sigmoid":
                sigmoid = lightgbm_atof(value)
        if not sigmoid > 0.0 or not math.isfinite(sigmoid):
            raise UnsupportedObjective(f"objective=binary needs sigmoid:<positive number>, got {line!r}")
        return Objective(name, sigmoid)
    if name in IDENTITY_OBJECTIVES:
        if "sqrt" in options:
            raise UnsupportedObjective(
                f"objective={name} with reg_sqrt=True (flag 'sqrt') is not supported; retrain without reg_sqrt"
            )
        return Objective(name, 0.0)
    supported = ", ".join(["binary", *sorted(IDENTITY_OBJECTIVES)])
    raise UnsupportedObjective(f"objective={name!r} is not supported (supported: {supported})")


def lightgbm_atof(text: str) -> float:
    """Parse a number the way LightGBM's `Common::Atof` does when it loads objective parameters.

    That parser is not correctly rounded (it adds the fraction as digits / 10**n), so Python's
    float() may differ from it in the last bit; matching it keeps `predict` bit-exact.
    """
    s = text.strip()
    sign = 1.0
    if s[:1] in ("-", "+"):
        sign = -1.0 if s[0] == "-" else 1.0
        s = s[1:]
    mantissa, _, exponent = s.replace("E", "e").partition("e")
    whole, _, fraction = mantissa.partition(".")
    if not (whole + fraction).isdigit() or not (exponent == "" or exponent.lstrip("+-").isdigit()):
        # Not plain decimal notation (inf, nan, ...): LightGBM falls back to its token table too.
        return sign * float(s)
    value = 0.0
    for digit in whole:
        value = value * 10.0 + int(digit)
    if fraction:
        right = 0.0
        for digit in fraction:
            right = int(digit) + right * 10.0
        value += right / _lightgbm_pow(10.0, len(fraction))
    if exponent:
        negative = exponent.startswith("-")
        count = int(exponent.lstrip("+-"))
        scale = 1.0
        while count >= 50:
            scale *= 1e50
            count -= 50
        while count >= 8:
            scale *= 1e8
            count -= 8
        while count > 0:
            scale *= 10.0
            count -= 1
        value = value / scale if negative else value * scale
    return sign * value


def _lightgbm_pow(base: float, power: int) -> float:
    """`Common::Pow(base, power)`, with the same order of multiplications as the C++ recursion."""
    if power == 0:
        return 1.0
    if power % 2 == 0:
        return _lightgbm_pow(base * base, power // 2)
    if power % 3 == 0:
        return _lightgbm_pow(base * base * base, power // 3)
    return base * _lightgbm_pow(base, power - 1)
