"""Names, functions and types of a parsed expression, checked once at load.

After `check` passes, every name is a known column, every call a known function with an
allowed number of arguments, every operand has the type its operator needs, and the whole is
a condition: the compiler and the kernel never have to refuse anything at run time.
"""

from __future__ import annotations

import difflib
from collections.abc import Collection, Mapping

from core.rules.lang.errors import ExpressionError
from core.rules.lang.nodes import (
    FUNCTIONS,
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
    Type,
)


def check(node: Node, *, columns: Collection[str], source: str, lists: Mapping[str, str] | None = None) -> None:
    """Refuse `node` (parsed from `source`) unless it is a well-typed condition over `columns` and
    `lists` (a named list's name → its kind: one of IDENTIFIERS, or a column such as merchant_category)."""
    _Checker(columns, source, lists or {}).expect(node, Type.BOOLEAN, "a rule's \"when\"")


def _suggest(name: str, choices: Collection[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.75)
    return f"; did you mean {close[0]!r}?" if close else ""


class _Checker:
    __slots__ = ("columns", "lists", "source")

    def __init__(self, columns: Collection[str], source: str, lists: Mapping[str, str]) -> None:
        self.columns = columns
        self.source = source
        self.lists = lists

    def error(self, message: str, node: Node, *, offset: int | None = None) -> ExpressionError:
        return ExpressionError(message, source=self.source, offset=node.offset if offset is None else offset)

    def expect(self, node: Node, wanted: Type, role: str) -> None:
        """Check `node` and that it is of type `wanted`, as `role` says it must be."""
        self.visit(node)
        if node.type is not wanted:
            raise self.error(f"{role} must be {wanted.value}, got {node.type.value}", node)

    def visit(self, node: Node) -> None:
        if isinstance(node, Number):
            return
        if isinstance(node, Name):
            if node.name in FUNCTIONS:
                raise self.error(f"{node.name!r} is a function: call it, as in {node.name}(amount)", node)
            if node.name not in self.columns:
                raise self.error(f"unknown name {node.name!r}{_suggest(node.name, self.columns)} "
                                 "(expected a feature, 'amount' or 'fraud_probability'; see docs/features.md)", node)
        elif isinstance(node, Identifier):
            raise self.error(f"{node.kind!r} is an identifier, not a number: it can only be tested against a "
                             f"named list of {node.kind} values, as in {node.kind} in @some_list", node)
        elif isinstance(node, ListMember):
            self.list_member(node)
        elif isinstance(node, Negate):
            self.expect(node.operand, Type.NUMBER, "the operand of unary '-'")
        elif isinstance(node, Arithmetic):
            self.expect(node.left, Type.NUMBER, f"the left operand of {node.op!r}")
            self.expect(node.right, Type.NUMBER, f"the right operand of {node.op!r}")
        elif isinstance(node, Call):
            self.call(node)
        elif isinstance(node, Compare):
            self.expect(node.left, Type.NUMBER, f"the left side of {node.op!r}")
            self.expect(node.right, Type.NUMBER, f"the right side of {node.op!r}")
        elif isinstance(node, Member):
            self.expect(node.operand, Type.NUMBER, f"the left side of {'not in' if node.negated else 'in'!r}")
        elif isinstance(node, Not):
            self.expect(node.operand, Type.BOOLEAN, "the operand of 'not'")
        elif isinstance(node, Logic):
            self.expect(node.left, Type.BOOLEAN, f"the left operand of {node.op!r}")
            self.expect(node.right, Type.BOOLEAN, f"the right operand of {node.op!r}")

    def list_member(self, node: ListMember) -> None:
        kind = self.lists.get(node.list_name)
        if kind is None:
            known = ", ".join(f"@{n}" for n in sorted(self.lists)) or "none"
            raise self.error(f"unknown list @{node.list_name}{_suggest(node.list_name, self.lists)} "
                             f"(the lists defined in the file's \"lists\": {known})", node, offset=node.list_offset)
        operand = node.operand
        if isinstance(operand, Identifier):
            if operand.kind != kind:
                raise self.error(f"@{node.list_name} holds {kind} values; {operand.kind!r} cannot be in it "
                                 f"(write {kind} in @{node.list_name})", operand)
        elif kind in IDENTIFIERS:
            raise self.error(f"@{node.list_name} holds {kind} identifiers: only {kind!r} can be tested "
                             f"against it, as in {kind} in @{node.list_name}", operand)
        else:
            self.expect(operand, Type.NUMBER, f"the left side of {'not in' if node.negated else 'in'!r}")

    def call(self, node: Call) -> None:
        known = ", ".join(FUNCTIONS)
        if node.function in self.columns:
            raise self.error(f"{node.function!r} is a column, not a function; the functions are {known}", node)
        arity = FUNCTIONS.get(node.function)
        if arity is None:
            raise self.error(f"unknown function {node.function!r}{_suggest(node.function, FUNCTIONS)} "
                             f"(the functions are {known})", node)
        fewest, most = arity
        if len(node.args) < fewest or (most is not None and len(node.args) > most):
            wanted = f"exactly {fewest}" if fewest == most else f"at least {fewest}"
            raise self.error(f"{node.function}() takes {wanted} argument{'s' if fewest != 1 else ''}, "
                             f"got {len(node.args)}", node)
        for i, arg in enumerate(node.args):
            self.expect(arg, Type.NUMBER, f"argument {i + 1} of {node.function}()")
