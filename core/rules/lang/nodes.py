"""The typed tree of a rule expression.

Every node is a frozen, slotted record carrying the offset of its first character (for errors).
A node's type is fixed by its class: NUMBER for literals, columns, arithmetic and function calls;
BOOLEAN for comparisons, membership and logic. The checker (core.rules.lang.check) makes sure
each operand has the type its operator needs, so the compiler never meets a mixed tree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import ClassVar


class Type(Enum):
    NUMBER = "a number"
    BOOLEAN = "a condition (true or false)"
    IDENTIFIER = "an identifier (tested only against a named list)"


ARITHMETIC = ("+", "-", "*", "/")
COMPARISONS = ("<", "<=", ">", ">=", "==", "!=")
LOGIC = ("and", "or")
# name: (fewest arguments, most arguments or None for any number).
FUNCTIONS: dict[str, tuple[int, int | None]] = {"abs": (1, 1), "min": (2, None), "max": (2, None)}
# Names that stand for a transaction's identifier (its keyed hash, or its country's code): they can only
# be tested against a named list of the same kind. The order is the rows of the VM's `keys` matrix.
IDENTIFIERS = ("card", "customer", "merchant", "device", "ip", "country")


@dataclass(frozen=True, slots=True)
class Number:
    value: float
    offset: int = field(default=0, compare=False)
    type: ClassVar[Type] = Type.NUMBER


@dataclass(frozen=True, slots=True)
class Name:
    """A column: a feature, `amount` or `fraud_probability` (resolved by the checker)."""

    name: str
    offset: int = field(default=0, compare=False)
    type: ClassVar[Type] = Type.NUMBER


@dataclass(frozen=True, slots=True)
class Identifier:
    """One of IDENTIFIERS: the transaction's card, customer, … (never a number)."""

    kind: str
    offset: int = field(default=0, compare=False)
    type: ClassVar[Type] = Type.IDENTIFIER


@dataclass(frozen=True, slots=True)
class Negate:
    operand: Node
    offset: int = field(default=0, compare=False)
    type: ClassVar[Type] = Type.NUMBER


@dataclass(frozen=True, slots=True)
class Arithmetic:
    op: str  # one of ARITHMETIC
    left: Node
    right: Node
    offset: int = field(default=0, compare=False)
    type: ClassVar[Type] = Type.NUMBER


@dataclass(frozen=True, slots=True)
class Call:
    function: str  # one of FUNCTIONS
    args: tuple[Node, ...]
    offset: int = field(default=0, compare=False)
    type: ClassVar[Type] = Type.NUMBER


@dataclass(frozen=True, slots=True)
class Compare:
    op: str  # one of COMPARISONS
    left: Node
    right: Node
    offset: int = field(default=0, compare=False)
    type: ClassVar[Type] = Type.BOOLEAN


@dataclass(frozen=True, slots=True)
class Member:
    """`operand in {…}` (or `not in` when negated); members are literals, in source order."""

    operand: Node
    members: tuple[float, ...]
    negated: bool = False
    offset: int = field(default=0, compare=False)
    type: ClassVar[Type] = Type.BOOLEAN


@dataclass(frozen=True, slots=True)
class ListMember:
    """`operand in @list` (or `not in` when negated): membership in a named list of the ruleset."""

    operand: Node
    list_name: str
    negated: bool = False
    offset: int = field(default=0, compare=False)
    list_offset: int = field(default=0, compare=False)  # where "@list" starts, for errors
    type: ClassVar[Type] = Type.BOOLEAN


@dataclass(frozen=True, slots=True)
class Not:
    operand: Node
    offset: int = field(default=0, compare=False)
    type: ClassVar[Type] = Type.BOOLEAN


@dataclass(frozen=True, slots=True)
class Logic:
    op: str  # one of LOGIC
    left: Node
    right: Node
    offset: int = field(default=0, compare=False)
    type: ClassVar[Type] = Type.BOOLEAN


Node = Number | Name | Identifier | Negate | Arithmetic | Call | Compare | Member | ListMember | Not | Logic

# Binding strength, loosest first (docs/rules.md): or < and < not < comparison/in < + - < * / < unary -.
_STRENGTH = {"or": 1, "and": 2, "not": 3, "compare": 4, "+": 5, "-": 5, "*": 6, "/": 6, "negate": 7, "atom": 8}


def _strength(node: Node) -> int:
    if isinstance(node, Logic):
        return _STRENGTH[node.op]
    if isinstance(node, Not):
        return _STRENGTH["not"]
    if isinstance(node, Compare | Member | ListMember):
        return _STRENGTH["compare"]
    if isinstance(node, Arithmetic):
        return _STRENGTH[node.op]
    if isinstance(node, Negate) or (isinstance(node, Number) and math.copysign(1.0, node.value) < 0):
        return _STRENGTH["negate"]  # a negative literal reads "-2.5": it binds like a unary minus
    return _STRENGTH["atom"]


def _number(value: float) -> str:
    # repr keeps every digit ("0.1", "1e+300"), so the text parses back to the same float.
    return repr(float(value))


def render(node: Node) -> str:
    """Source text for `node` with only the parentheses precedence needs; parses back to an equal tree."""
    def wrap(child: Node, least: int) -> str:
        text = render(child)
        return f"({text})" if _strength(child) < least else text

    if isinstance(node, Number):
        return _number(node.value)
    if isinstance(node, Name):
        return node.name
    if isinstance(node, Identifier):
        return node.kind
    if isinstance(node, ListMember):
        return f"{wrap(node.operand, _STRENGTH['+'])} {'not in' if node.negated else 'in'} @{node.list_name}"
    if isinstance(node, Negate):
        return "-" + wrap(node.operand, _STRENGTH["negate"])
    if isinstance(node, Call):
        return f"{node.function}({', '.join(render(a) for a in node.args)})"
    if isinstance(node, Member):
        members = ", ".join(_number(m) for m in node.members)
        return f"{wrap(node.operand, _STRENGTH['+'])} {'not in' if node.negated else 'in'} {{{members}}}"
    if isinstance(node, Not):
        return "not " + wrap(node.operand, _STRENGTH["not"])
    if isinstance(node, Compare):
        # Comparisons do not chain: an operand that is itself a comparison needs parentheses.
        return f"{wrap(node.left, _STRENGTH['+'])} {node.op} {wrap(node.right, _STRENGTH['+'])}"
    # Arithmetic and Logic are left-associative: the right operand of equal strength needs parentheses.
    strength = _strength(node)
    return f"{wrap(node.left, strength)} {node.op} {wrap(node.right, strength + 1)}"
