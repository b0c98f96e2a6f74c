"""A recursive-descent parser from rule text to the tree of core.rules.lang.nodes.

Grammar, loosest binding first (one function per line below):

    expression := conjunction ("or" conjunction)*
    conjunction:= negation ("and" negation)*
    negation   := "not" negation | comparison
    comparison := sum [("<" | "<=" | ">" | ">=" | "==" | "!=") sum | ["not"] "in" (set | LIST)]
    sum        := product (("+" | "-") product)*
    product    := unary (("*" | "/") unary)*
    unary      := "-" unary | primary
    primary    := NUMBER | IDENTIFIER | NAME | NAME "(" [expression ("," expression)*] ")" | "(" expression ")"
    set        := "{" [member ("," member)*] "}" | "[" … "]"        member := ["-"] NUMBER
    LIST       := "@" NAME (a named list of the ruleset)      IDENTIFIER := one of nodes.IDENTIFIERS

Comparisons do not chain: `a < b < c` is refused (Python reads it as `a < b and b < c`, most other
languages as `(a < b) < c`; an analyst should write what they mean). Syntax only: names, functions
and types are the checker's business, so that each error names the first problem from the left.
"""

from __future__ import annotations

import math

from core.rules.lang.errors import ExpressionError
from core.rules.lang.lexer import Kind, Token, tokenize
from core.rules.lang.nodes import (
    COMPARISONS,
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

# Deep enough for any rule a person writes; shallow enough that Python's own stack never overflows.
MAX_DEPTH = 64
# A chain `a or b or c …` nests as deep as it is long in the tree the checker and compiler walk:
# ~500 links overflowed Python's stack there. A longer rule belongs in a set or a named list.
MAX_OPERATORS = 256


def parse(source: str) -> Node:
    """The tree of `source`; raises ExpressionError with the offset of the first syntax error."""
    return _Parser(source).parse()


class _Parser:
    __slots__ = ("depth", "operators", "position", "source", "tokens")

    def __init__(self, source: str) -> None:
        self.source = source
        self.tokens = tokenize(source)
        self.position = 0
        self.depth = 0
        self.operators = 0

    # --- helpers ---

    def peek(self) -> Token:
        return self.tokens[self.position]

    def advance(self) -> Token:
        token = self.tokens[self.position]
        if token.kind is not Kind.END:
            self.position += 1
        return token

    def at(self, *texts: str) -> bool:
        token = self.peek()
        return token.kind in (Kind.OP, Kind.KEYWORD, Kind.PUNCT) and token.text in texts

    def error(self, message: str, token: Token | None = None) -> ExpressionError:
        token = token or self.peek()
        return ExpressionError(message, source=self.source, offset=token.offset)

    def finite(self, token: Token) -> float:
        value = float(token.text)
        if not math.isfinite(value):
            raise self.error(f"number {token.text} is too large for a float64", token)
        return value

    def descend(self) -> None:
        """One level deeper (the caller steps back up); refuse past MAX_DEPTH."""
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.error(f"expression nested too deeply (more than {MAX_DEPTH} levels); split the rule")

    def chained(self, token: Token) -> None:
        """Count one more binary operator; refuse a rule with too many."""
        self.operators += 1
        if self.operators > MAX_OPERATORS:
            raise self.error(f"expression too long (more than {MAX_OPERATORS} operators); use a set "
                             "(x in {1, 2, 3}) or a named list, or split the rule", token)

    def expect(self, text: str, why: str) -> Token:
        if not self.at(text):
            raise self.error(f"expected {text!r} {why}, got {self.peek().describe()}")
        return self.advance()

    # --- grammar ---

    def parse(self) -> Node:
        if self.peek().kind is Kind.END:
            raise self.error("expected an expression, got nothing")
        node = self.expression()
        token = self.peek()
        if token.kind is not Kind.END:
            if token.text == ")":
                raise self.error("unmatched ')'")
            if token.text in ("[", "{"):
                raise self.error("indexing is not part of the language (a set of values only follows 'in')")
            if token.text == "(":
                raise self.error("only abs, min and max can be called, by name")
            raise self.error(f"expected an operator, 'and', 'or' or the end of the expression, "
                             f"got {token.describe()}")
        return node

    def expression(self) -> Node:
        self.descend()
        node = self.conjunction()
        while self.at("or"):
            self.chained(self.advance())
            node = Logic("or", node, self.conjunction(), node.offset)
        self.depth -= 1
        return node

    def conjunction(self) -> Node:
        node = self.negation()
        while self.at("and"):
            self.chained(self.advance())
            node = Logic("and", node, self.negation(), node.offset)
        return node

    def negation(self) -> Node:
        if self.at("not"):
            token = self.advance()
            self.descend()
            node = Not(self.negation(), token.offset)
            self.depth -= 1
            return node
        return self.comparison()

    def comparison(self) -> Node:
        left = self.sum()
        token = self.peek()
        node: Node
        if self.at(*COMPARISONS):
            self.advance()
            node = Compare(token.text, left, self.sum(), left.offset)
        elif self.at("in"):
            self.advance()
            node = self.membership(left, negated=False)
        elif self.at("not") and self.tokens[self.position + 1].text == "in":
            self.advance()
            self.advance()
            node = self.membership(left, negated=True)
        else:
            return left
        if self.at(*COMPARISONS, "in") or (self.at("not") and self.tokens[self.position + 1].text == "in"):
            raise self.error(f"comparisons do not chain: write 'a < b and b < c', not 'a < b < c' "
                             f"(got {self.peek().describe()} after a comparison)")
        return node

    def membership(self, left: Node, *, negated: bool) -> Node:
        token = self.peek()
        if token.kind is Kind.LIST:
            self.advance()
            return ListMember(left, token.text, negated, left.offset, token.offset)
        return Member(left, self.set(), negated, left.offset)

    def sum(self) -> Node:
        node = self.product()
        while self.at("+", "-"):
            token = self.advance()
            self.chained(token)
            node = Arithmetic(token.text, node, self.product(), node.offset)
        return node

    def product(self) -> Node:
        node = self.unary()
        while self.at("*", "/"):
            token = self.advance()
            self.chained(token)
            node = Arithmetic(token.text, node, self.unary(), node.offset)
        return node

    def unary(self) -> Node:
        if self.at("-"):
            token = self.advance()
            if self.peek().kind is Kind.NUMBER:
                # A negative literal is a constant, not an operation at run time.
                return Number(-self.finite(self.advance()), token.offset)
            self.descend()
            node = Negate(self.unary(), token.offset)
            self.depth -= 1
            return node
        return self.primary()

    def primary(self) -> Node:
        token = self.peek()
        if token.kind is Kind.NUMBER:
            self.advance()
            return Number(self.finite(token), token.offset)
        if token.kind is Kind.NAME:
            self.advance()
            if token.text in IDENTIFIERS and not self.at("("):
                return Identifier(token.text, token.offset)
            if not self.at("("):
                return Name(token.text, token.offset)
            self.advance()
            args: list[Node] = []
            if not self.at(")"):
                args.append(self.expression())
                while self.at(","):
                    self.advance()
                    args.append(self.expression())
            self.expect(")", f"to close the call of {token.text!r} at column {token.offset + 1}")
            return Call(token.text, tuple(args), token.offset)
        if self.at("("):
            self.advance()
            node = self.expression()
            self.expect(")", f"to close the '(' at column {token.offset + 1}")
            return node
        if self.at("{", "["):
            raise self.error("a set of values only follows 'in' or 'not in'")
        if token.kind is Kind.LIST:
            raise self.error("a named list only follows 'in' or 'not in', as in card in @blocked_cards")
        what = "nothing" if token.kind is Kind.END else token.describe()
        raise self.error(f"expected a number, a name, '-', 'not' or '(', got {what}")

    def set(self) -> tuple[float, ...]:
        opening = self.peek()
        if not self.at("{", "["):
            raise self.error(f"expected a set of numbers such as {{1, 2, 3}} after 'in', got {opening.describe()} "
                             "(or a named list, such as @blocked_cards)")
        self.advance()
        closing = "}" if opening.text == "{" else "]"
        members: list[float] = []
        while not self.at(closing):
            if members:
                self.expect(",", f"or {closing!r} between the members of the set at column {opening.offset + 1}")
            sign = 1.0
            if self.at("-"):
                self.advance()
                sign = -1.0
            token = self.peek()
            if token.kind is not Kind.NUMBER:
                unclosed = f" (the set at column {opening.offset + 1} is not closed)" if token.kind is Kind.END else ""
                raise self.error(f"a set holds number literals only; got {token.describe()}{unclosed}")
            self.advance()
            members.append(sign * self.finite(token))
        self.advance()
        return tuple(members)
