"""The rules expression language: text → tokens → typed tree → checked → postfix program → Numba VM.
On the request path: may import numpy, numba and core.features' registry; nothing offline.

    lexer.py      tokens with offsets; refuses strings, attribute access and stray characters
    parser.py     recursive descent into nodes.py's frozen tree (grammar in its docstring)
    check.py      names, functions, arity and types, with "did you mean" for near misses
    compile.py    all rules of a ruleset into one flat program (opcodes + operands + constants)
    vm.py         the Numba kernel: every rule over the whole batch in one call
    interpret.py  a plain per-row interpreter: the reference the VM is tested against

No Python `eval`, no attribute access, no imports: the only names are columns, identifiers
(card, customer, merchant, device, ip, country: tested only against named lists `@name`) and
three functions, and the only values numbers and conditions. Semantics are in docs/rules.md.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from core.rules.lang.check import check
from core.rules.lang.compile import NamedList, Program, compile_program
from core.rules.lang.errors import ExpressionError
from core.rules.lang.nodes import Node, render
from core.rules.lang.parser import parse

__all__ = ["ExpressionError", "NamedList", "Node", "Program", "compile_program", "parse_condition", "render"]


def parse_condition(source: str, *, columns: Collection[str], lists: Mapping[str, str] | None = None) -> Node:
    """The checked tree of a rule's condition; raises ExpressionError (position, what was expected).

    `lists` maps each named list the rule may use (`@name`) to its kind."""
    tree = parse(source)
    check(tree, columns=columns, source=source, lists=lists)
    return tree
