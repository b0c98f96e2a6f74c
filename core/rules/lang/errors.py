"""The one error of the rules language: what was expected, where (a 1-based column), in which text."""

from __future__ import annotations


class ExpressionError(ValueError):
    """A rule's expression cannot be used.

    A ValueError so that `core.rules.ruleset` reports it like every other bad rule (as a RulesLoadError
    naming the rule). `offset` is 0-based into `source`; `column` is what people count (1-based).
    The message ends with the expression and a caret under the offending character, because an
    analyst fixing a rule at 2 a.m. should not have to count columns.
    """

    def __init__(self, message: str, *, source: str, offset: int) -> None:
        self.message = message
        self.source = source
        self.offset = offset
        self.column = offset + 1
        super().__init__(f"column {self.column}: {message}\n    {source}\n    {' ' * offset}^")
