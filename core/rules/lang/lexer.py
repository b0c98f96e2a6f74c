"""Tokens of the rules language, with the offset of each in the source.

The lexer is where most unsafe input dies early: strings, attribute access, indexing, lambdas and
every other character outside the grammar are refused here with a message saying why.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from core.rules.lang.errors import ExpressionError


class Kind(Enum):
    NUMBER = "a number"
    NAME = "a name"
    LIST = "a named list"
    OP = "an operator"
    KEYWORD = "a keyword"
    PUNCT = "punctuation"
    END = "the end of the expression"


KEYWORDS = frozenset({"and", "or", "not", "in"})


@dataclass(frozen=True, slots=True)
class Token:
    kind: Kind
    text: str
    offset: int

    def describe(self) -> str:
        """How an error message names this token."""
        if self.kind is Kind.LIST:
            return repr("@" + self.text)
        return "the end of the expression" if self.kind is Kind.END else repr(self.text)


# Longest operators first, so that "<=" is not read as "<" then "=".
_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<list>@[A-Za-z_][A-Za-z0-9_]*)
  | (?P<op><=|>=|==|!=|<|>|\+|-|\*|/)
  | (?P<punct>[(),{}\[\]])
""", re.VERBOSE | re.ASCII)  # ASCII: "١٢" is not 12, a no-break space is not a space

# Characters people will try, and why each is refused.
_REFUSED = {
    '"': "string literals are not supported: every column is numeric today "
         "(country and merchant category are numeric codes: write merchant_category in {5967, 7995})",
    "'": "string literals are not supported: every column is numeric today "
         "(country and merchant category are numeric codes: write merchant_category in {5967, 7995})",
    ".": "attribute access is not part of the language; expected a number such as 0.5",
    "=": "a single '=' is not an operator; expected '==' to compare",
    "!": "expected '!=' (or 'not' to negate a condition)",
    "&": "expected 'and'", "|": "expected 'or'", "~": "expected 'not'",
    "%": "the operators are + - * /", "^": "the operators are + - * /",
    ":": "expected an operator; lambdas, slices and annotations are not part of the language",
    ";": "a rule is one expression",
    "@": "expected a list's name right after '@', as in card in @blocked_cards", "#": "comments belong in the rule's \"note\"",
}


def tokenize(source: str) -> list[Token]:
    """The tokens of `source`, ending with one END token; raises ExpressionError at a bad character."""
    tokens: list[Token] = []
    offset = 0
    while offset < len(source):
        match = _TOKEN.match(source, offset)
        if match is None:
            char = source[offset]
            why = _REFUSED.get(char, "expected a name, a number, an operator or a parenthesis")
            raise ExpressionError(f"unexpected character {char!r}: {why}", source=source, offset=offset)
        kind = match.lastgroup
        text = match.group()
        if kind == "number" and match.end() < len(source) and (source[match.end()].isalpha()
                                                               or source[match.end()] in "_."):
            # "1.x", "2abc": a number run into a name is a typo, never two tokens.
            raise ExpressionError(f"expected an operator after the number {text!r}",
                                  source=source, offset=match.end())
        if kind == "number":
            tokens.append(Token(Kind.NUMBER, text, offset))
        elif kind == "name":
            tokens.append(Token(Kind.KEYWORD if text in KEYWORDS else Kind.NAME, text, offset))
        elif kind == "list":
            tokens.append(Token(Kind.LIST, text[1:], offset))
        elif kind == "op":
            tokens.append(Token(Kind.OP, text, offset))
        elif kind == "punct":
            tokens.append(Token(Kind.PUNCT, text, offset))
        offset = match.end()
    tokens.append(Token(Kind.END, "", len(source)))
    return tokens
