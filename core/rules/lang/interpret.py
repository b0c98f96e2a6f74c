"""A plain-Python interpreter of the tree, one row at a time: the reference the compiled VM is
tested against, written from the semantics in docs/rules.md rather than from the kernel."""

from __future__ import annotations

import math
from collections.abc import Mapping

from core.rules.lang.compile import NamedList
from core.rules.lang.nodes import (
    Arithmetic,
    Call,
    Compare,
    Identifier,
    ListMember,
    Member,
    Name,
    Negate,
    Node,
    Not,
    Number,
)


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


def interpret(node: Node, row: Mapping[str, float], lists: Mapping[str, NamedList] | None = None) -> float | bool:
    """The value of `node` for one row; a column missing from `row` reads as NaN, an identifier
    (`row["card"]`, an int key) missing as 0, unknown. `lists` holds the named lists."""
    if isinstance(node, ListMember):
        named = (lists or {})[node.list_name]
        if isinstance(node.operand, Identifier):
            key = int(row.get(node.operand.kind, 0))
            # An unknown identifier (0) is in no list, and "not in" none either.
            return key != 0 and (key in {int(v) for v in named.values.tolist()}) != node.negated
        return interpret(Member(node.operand, tuple(float(v) for v in named.values), node.negated), row, lists)
    if isinstance(node, Identifier):
        raise TypeError(f"{node.kind!r} has no value outside a list test")
    if isinstance(node, Number):
        return node.value
    if isinstance(node, Name):
        return row.get(node.name, math.nan)
    if isinstance(node, Negate):
        return -float(interpret(node.operand, row, lists))
    if isinstance(node, Arithmetic):
        x, y = float(interpret(node.left, row, lists)), float(interpret(node.right, row, lists))
        if node.op == "/":
            return _divide(x, y)
        return x + y if node.op == "+" else x - y if node.op == "-" else x * y
    if isinstance(node, Call):
        values = [float(interpret(a, row, lists)) for a in node.args]
        if node.function == "abs":
            return abs(values[0])
        result = values[0]
        for v in values[1:]:
            result = _min(result, v) if node.function == "min" else _max(result, v)
        return result
    if isinstance(node, Compare):
        x, y = float(interpret(node.left, row, lists)), float(interpret(node.right, row, lists))
        if math.isnan(x) or math.isnan(y):
            return False
        return {"<": x < y, "<=": x <= y, ">": x > y, ">=": x >= y, "==": x == y, "!=": x != y}[node.op]
    if isinstance(node, Member):
        x = float(interpret(node.operand, row, lists))
        if math.isnan(x):
            return False
        return (x in node.members) != node.negated
    if isinstance(node, Not):
        return not interpret(node.operand, row, lists)
    if node.op == "and":
        return bool(interpret(node.left, row, lists)) and bool(interpret(node.right, row, lists))
    return bool(interpret(node.left, row, lists)) or bool(interpret(node.right, row, lists))
