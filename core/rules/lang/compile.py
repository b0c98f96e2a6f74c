"""From checked trees to the flat postfix program that core.rules.lang.vm runs.

All rules of a ruleset become one program (the instructions of rule r are
rule_start[r]:rule_start[r + 1]), so a batch costs one kernel call whatever the number of rules.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from core.rules.lang import vm
from core.rules.lang.nodes import (
    IDENTIFIERS,
    Arithmetic,
    Call,
    Compare,
    Identifier,
    ListMember,
    Logic,
    Member,
    Name,
    Negate,
    Node,
    Not,
    Number,
)

_COMPARE = {"<": vm.LT, "<=": vm.LE, ">": vm.GT, ">=": vm.GE, "==": vm.EQ, "!=": vm.NE}
# `3 < x` is `x > 3`: the mirror lets a literal on the left use the fused instruction too.
_MIRROR = {"<": ">", "<=": ">=", ">": "<", ">=": "<=", "==": "==", "!=": "!="}
_ARITHMETIC = {"+": vm.ADD, "-": vm.SUB, "*": vm.MUL, "/": vm.DIV}
_FUNCTIONS = {"min": vm.MIN, "max": vm.MAX}


@dataclass(frozen=True, slots=True)
class NamedList:
    """A named list as the compiler takes it: `kind` is one of IDENTIFIERS (`values` are uint64 keys,
    0 never among them) or a column's name such as merchant_category (`values` are float64 codes)."""

    name: str
    kind: str
    values: np.ndarray = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class Program:
    """A compiled ruleset for core.rules.lang.vm.evaluate (its docstring describes the arrays)."""

    program: npt.NDArray[np.int64]      # (instructions, PROGRAM_WIDTH)
    rule_start: npt.NDArray[np.int64]   # (rules + 1,)
    constants: npt.NDArray[np.float64]
    depth: int                          # the deepest the stack gets
    key_members: npt.NDArray[np.uint64]  # the members of each identifier list used, sorted, unique, no 0


def compile_program(trees: Sequence[Node], columns: Mapping[str, int],
                    lists: Mapping[str, NamedList] | None = None) -> Program:
    """One program for `trees` (checked conditions, in rule order); `columns` maps a name to its column,
    `lists` a list's name to its members."""
    emitter = _Emitter(columns, lists or {})
    rule_start = [0]
    for tree in trees:
        emitter.emit(tree)
        emitter.depth = 0
        rule_start.append(len(emitter.code))
    # Explicit dtypes and shapes even when empty: Numba types the kernel by them.
    return Program(
        program=np.array(emitter.code, dtype=np.int64).reshape(len(emitter.code), vm.PROGRAM_WIDTH),
        rule_start=np.array(rule_start, dtype=np.int64),
        constants=np.array(emitter.constants, dtype=np.float64),
        depth=emitter.deepest,
        key_members=np.concatenate([np.empty(0, dtype=np.uint64), *emitter.key_members]).astype(np.uint64),
    )


class _Emitter:
    __slots__ = ("code", "columns", "constants", "deepest", "depth", "key_count", "key_members", "key_slices",
                 "lists")

    def __init__(self, columns: Mapping[str, int], lists: Mapping[str, NamedList]) -> None:
        self.columns = columns
        self.lists = lists
        self.key_members: list[npt.NDArray[np.uint64]] = []
        self.key_slices: dict[str, tuple[int, int]] = {}  # a list used by several rules is stored once
        self.key_count = 0
        self.code: list[list[int]] = []
        self.constants: list[float] = []
        self.depth = 0     # stack depth after the instructions so far
        self.deepest = 0

    def op(self, opcode: int, a: int = 0, b: int = 0, c: int = 0, *, pushes: int) -> int:
        """Append one instruction that changes the stack depth by `pushes`; its index."""
        self.code.append([opcode, a, b, c])
        self.depth += pushes
        self.deepest = max(self.deepest, self.depth)
        return len(self.code) - 1

    def constant(self, value: float) -> int:
        self.constants.append(float(value))
        return len(self.constants) - 1

    def members(self, values: tuple[float, ...]) -> tuple[int, int]:
        # Sorted and unique for the kernel's binary search; NaN equals nothing, so it never counts.
        unique = np.unique(np.asarray(values, dtype=np.float64))
        lo = len(self.constants)
        self.constants.extend(unique[~np.isnan(unique)].tolist())
        return lo, len(self.constants)

    def key_list(self, named: NamedList) -> tuple[int, int]:
        known = self.key_slices.get(named.name)
        if known is not None:
            return known
        values = np.unique(np.asarray(named.values, dtype=np.uint64))
        values = values[values != 0]  # 0 is "unknown", which no list holds
        self.key_members.append(values)
        self.key_slices[named.name] = span = (self.key_count, self.key_count + len(values))
        self.key_count += len(values)
        return span

    def list_member(self, node: ListMember) -> None:
        named = self.lists[node.list_name]
        if isinstance(node.operand, Identifier):
            lo, hi = self.key_list(named)
            self.op(vm.KEY_NOT_IN if node.negated else vm.KEY_IN, IDENTIFIERS.index(node.operand.kind), lo, hi,
                    pushes=1)
        else:  # a list of codes (merchant_category): the same as a literal set
            self.emit(Member(node.operand, tuple(float(v) for v in named.values), node.negated, node.offset))

    def emit(self, node: Node) -> None:
        if isinstance(node, Number):
            self.op(vm.CONST, self.constant(node.value), pushes=1)
        elif isinstance(node, Name):
            self.op(vm.LOAD, self.columns[node.name], pushes=1)
        elif isinstance(node, Compare):
            self.compare(node)
        elif isinstance(node, Member):
            lo, hi = self.members(node.members)
            if isinstance(node.operand, Name):
                self.op(vm.NOT_IN_COLUMN if node.negated else vm.IN_COLUMN, self.columns[node.operand.name], lo, hi,
                        pushes=1)
            else:
                self.emit(node.operand)
                self.op(vm.NOT_IN if node.negated else vm.IN, lo, hi, pushes=0)
        elif isinstance(node, ListMember):
            self.list_member(node)
        elif isinstance(node, Logic):
            self.emit(node.left)
            jump = self.op(vm.AND_JUMP if node.op == "and" else vm.OR_JUMP, pushes=-1)
            self.emit(node.right)
            self.code[jump][1] = len(self.code)  # past the right operand: the left's value decides
        elif isinstance(node, Not):
            self.emit(node.operand)
            self.op(vm.NOT, pushes=0)
        elif isinstance(node, Negate):
            self.emit(node.operand)
            self.op(vm.NEG, pushes=0)
        elif isinstance(node, Arithmetic):
            self.emit(node.left)
            self.emit(node.right)
            self.op(_ARITHMETIC[node.op], pushes=-1)
        elif isinstance(node, Call):
            self.emit(node.args[0])
            if node.function == "abs":
                self.op(vm.ABS, pushes=0)
            for arg in node.args[1:]:  # min(a, b, c) is min(min(a, b), c)
                self.emit(arg)
                self.op(_FUNCTIONS[node.function], pushes=-1)

    def compare(self, node: Compare) -> None:
        left, right, op = node.left, node.right, node.op
        if isinstance(left, Number) and isinstance(right, Name):
            left, right, op = right, left, _MIRROR[op]
        if isinstance(left, Name) and isinstance(right, Number):
            self.op(vm.COMPARE_COLUMN, self.columns[left.name], self.constant(right.value), _COMPARE[op], pushes=1)
            return
        self.emit(left)
        self.emit(right)
        self.op(_COMPARE[op], pushes=-1)
