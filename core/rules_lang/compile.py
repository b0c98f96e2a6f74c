"""From checked trees to the flat postfix program that core.rules_lang.vm runs.

All rules of a ruleset become one program (the instructions of rule r are
rule_start[r]:rule_start[r + 1]), so a batch costs one kernel call whatever the number of rules.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from core.rules_lang import vm
from core.rules_lang.nodes import Arithmetic, Call, Compare, Logic, Member, Name, Negate, Node, Not, Number

_COMPARE = {"<": vm.LT, "<=": vm.LE, ">": vm.GT, ">=": vm.GE, "==": vm.EQ, "!=": vm.NE}
# `3 < x` is `x > 3`: the mirror lets a literal on the left use the fused instruction too.
_MIRROR = {"<": ">", "<=": ">=", ">": "<", ">=": "<=", "==": "==", "!=": "!="}
_ARITHMETIC = {"+": vm.ADD, "-": vm.SUB, "*": vm.MUL, "/": vm.DIV}
_FUNCTIONS = {"min": vm.MIN, "max": vm.MAX}


@dataclass(frozen=True, slots=True)
class Program:
    """A compiled ruleset for core.rules_lang.vm.evaluate (its docstring describes the arrays)."""

    program: npt.NDArray[np.int64]      # (instructions, PROGRAM_WIDTH)
    rule_start: npt.NDArray[np.int64]   # (rules + 1,)
    constants: npt.NDArray[np.float64]
    depth: int                          # the deepest the stack gets


def compile_program(trees: Sequence[Node], columns: Mapping[str, int]) -> Program:
    """One program for `trees` (checked conditions, in rule order); `columns` maps a name to its column."""
    emitter = _Emitter(columns)
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
    )


class _Emitter:
    __slots__ = ("code", "columns", "constants", "deepest", "depth")

    def __init__(self, columns: Mapping[str, int]) -> None:
        self.columns = columns
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
