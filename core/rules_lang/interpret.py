"""A plain-Python interpreter of the tree, one row at a time: the reference the compiled VM is
tested against, written from the semantics in docs/rules.md rather than from the kernel."""

from __future__ import annotations

import math
from collections.abc import Mapping

from core.rules_lang.nodes import Arithmetic, Call, Compare, Member, Name, Negate, Node, Not, Number


def _divide(x: float, y: float) -> float:
    """IEEE division: Python raises on x / 0 where IEEE gives ±inf (or NaN for 0/0 and NaN/0)."""
    if y != 0.0:
        return x / y
    if x == 0.0 or math.isnan(x):
        return math.nan
    return math.copysign(math.inf, x) * math.copysign(1.0, y)


def _min(x: float, y: float) -> float:
    return math.nan if math.isnan(x) or math.isnan(y) else (y if y < x else x)


def _max(x: float, y: float) -> float:
    return math.nan if math.isnan(x) or math.isnan(y) else (y if y > x else x)


def interpret(node: Node, row: Mapping[str, float]) -> float | bool:
    """The value of `node` for one row; a column missing from `row` reads as NaN."""
    if isinstance(node, Number):
        return node.value
    if isinstance(node, Name):
        return row.get(node.name, math.nan)
    if isinstance(node, Negate):
        return -float(interpret(node.operand, row))
    if isinstance(node, Arithmetic):
        x, y = float(interpret(node.left, row)), float(interpret(node.right, row))
        if node.op == "/":
            return _divide(x, y)
        return x + y if node.op == "+" else x - y if node.op == "-" else x * y
    if isinstance(node, Call):
        values = [float(interpret(a, row)) for a in node.args]
        if node.function == "abs":
            return abs(values[0])
        result = values[0]
        for v in values[1:]:
            result = _min(result, v) if node.function == "min" else _max(result, v)
        return result
    if isinstance(node, Compare):
        x, y = float(interpret(node.left, row)), float(interpret(node.right, row))
        if math.isnan(x) or math.isnan(y):
            return False
        return {"<": x < y, "<=": x <= y, ">": x > y, ">=": x >= y, "==": x == y, "!=": x != y}[node.op]
    if isinstance(node, Member):
        x = float(interpret(node.operand, row))
        if math.isnan(x):
            return False
        return (x in node.members) != node.negated
    if isinstance(node, Not):
        return not interpret(node.operand, row)
    if node.op == "and":
        return bool(interpret(node.left, row)) and bool(interpret(node.right, row))
    return bool(interpret(node.left, row)) or bool(interpret(node.right, row))
