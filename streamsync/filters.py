"""Row filters such as ``active = true and price < 40``: parsed once at config load, run per row.

A mapping rule's ``where:`` selects which change-event rows the rule applies to. The language is
the small subset of SQL's ``WHERE`` a cache rule needs, and it is built to be *safe*, *exact* and
to *agree with the database*:

Safety
    The text is read by a hand-written tokenizer and recursive-descent parser into a tree of a
    few node types, then compiled into plain closures. Nothing is ever handed to ``eval``,
    ``exec`` or Python's ``ast``: a filter can compare column values with literals, nothing
    else. Nesting is bounded, so no input can exhaust the stack.

Exactness
    Debezium delivers ``numeric``/``decimal`` columns as strings such as ``"10.50"`` (with
    ``decimal.handling.mode=string``). Such strings, ints, floats and the number literals of the
    filter are all compared as :class:`decimal.Decimal`, so ``"0.30000000000000001" > 0.3`` is
    true, as it is in the database, where binary floating point would say it is not. A float
    value is taken at its shortest decimal spelling (``0.1`` is 0.1), which is how PostgreSQL
    compares a ``double precision`` column with a numeric literal.

Three-valued logic
    A rule must select exactly the rows ``SELECT ... WHERE <filter>`` selects in PostgreSQL. So a
    comparison with a null value (``None``) is UNKNOWN, ``not``/``and``/``or`` follow SQL's truth
    tables, ``x not in (...)`` is ``not (x in (...))``, and a row matches only when the whole
    filter is TRUE: ``not (price < 40)`` does *not* match a row whose price is null.

Grammar (keywords are case-insensitive; ``not`` binds tighter than ``and``, ``and`` than ``or``)::

    expr       := or
    or         := and ('or' and)*
    and        := not ('and' not)*
    not        := 'not' not | primary
    primary    := '(' expr ')' | comparison
    comparison := column op literal
                | column ['not'] 'in' '(' literal (',' literal)* ')'
                | column 'is' ['not'] 'null'
    op         := '=' | '!=' | '<>' | '<' | '<=' | '>' | '>='
    column     := [A-Za-z_][A-Za-z0-9_]*  |  "any text" (with "" for a double quote)
    literal    := number (-3, 4.25, .5, 1e3) | 'text' (with '' for a quote) | true | false

Column names are case-sensitive and taken verbatim, as everywhere else in the configuration
(PostgreSQL would fold an unquoted ``Price`` to ``price``). A name that is a keyword, or that is
not a plain identifier, is written in double quotes: ``"order" = 1``, ``"Unit Price" > 3``.

Refused when the filter is parsed, because they are always a mistake: comparing with ``null``
(``x = null`` is never true: write ``x is null``), ``null`` inside an ``in`` list, ordering
booleans (``active < true``), and mixing numbers, strings and booleans in one ``in`` list.

Refused when a row is evaluated, with :class:`FilterError`: a named column absent from the row,
and a value whose type does not fit the literal: a number literal needs an int, a float, a
:class:`~decimal.Decimal` or a numeric string; a string literal needs a string; ``true``/``false``
need a boolean. Strings are ordered by code point, which may differ from the database's
collation for ``<``/``>`` on text (equality agrees); ISO-8601 timestamps of the same format and
zone order correctly as strings.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import MAX_EMAX, MAX_PREC, MIN_EMIN, Context, Decimal, InvalidOperation
from typing import Any, Final

from streamsync.errors import FilterError, excerpt

__all__ = [
    "And",
    "Comparison",
    "FilterError",
    "InList",
    "IsNull",
    "Node",
    "Not",
    "Or",
    "RowFilter",
    "Scalar",
]

#: A literal of the filter: a number (exact), a string or a boolean.
Scalar = Decimal | str | bool

#: Evaluates a compiled (sub)filter on a row: True, False or None for UNKNOWN.
_Evaluator = Callable[[Mapping[str, Any]], bool | None]

#: Deeper nesting of parentheses and ``not`` is refused, so parsing cannot exhaust the stack.
MAX_DEPTH: Final = 100

_KEYWORDS: Final = frozenset({"and", "or", "not", "in", "is", "null", "true", "false"})
_IDENT_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TOKEN_RE: Final = re.compile(
    r"""
    (?P<space>\s+)
    | (?P<number>-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)
    | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
    | (?P<string>'(?:[^']|'')*+')
    | (?P<qident>"(?:[^"]|"")*+")
    | (?P<op><>|!=|<=|>=|==|=|<|>)
    | (?P<punct>[(),])
    """,
    re.VERBOSE,
)
_WORD_CHARS: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.")

_COMPARE: Final[dict[str, Callable[[Any, Any], bool]]] = {
    "=": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}
#: What a NaN value compares as: PostgreSQL sorts NaN above every number (no literal is NaN).
_NAN_RESULT: Final = {"=": False, "!=": True, "<": False, "<=": False, ">": True, ">=": True}

#: Converts numeric strings exactly (no rounding), refusing anything that is not a number
#: whatever the calling thread's decimal context says.
_EXACT: Final = Context(prec=MAX_PREC, Emax=MAX_EMAX, Emin=MIN_EMIN, traps=[InvalidOperation])

#: Integral number literals up to this many digits are compared as ints (faster with int values).
_INT_DIGITS: Final = 30


# ---------------------------------------------------------------------------------------------
# The tree


def _render_column(name: str) -> str:
    if _IDENT_RE.fullmatch(name) and name.lower() not in _KEYWORDS:
        return name
    return '"' + name.replace('"', '""') + '"'


def _render_literal(value: Scalar) -> str:
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return str(value)


@dataclass(frozen=True, slots=True)
class Comparison:
    """``column op value``; ``op`` is one of ``= != < <= > >=`` (``<>`` is read as ``!=``)."""

    column: str
    op: str
    value: Scalar

    def __str__(self) -> str:
        return f"{_render_column(self.column)} {self.op} {_render_literal(self.value)}"


@dataclass(frozen=True, slots=True)
class InList:
    """``column in (values...)``, or ``column not in (...)`` when ``negated``."""

    column: str
    values: tuple[Scalar, ...]
    negated: bool = False

    def __str__(self) -> str:
        values = ", ".join(_render_literal(v) for v in self.values)
        return f"{_render_column(self.column)} {'not in' if self.negated else 'in'} ({values})"


@dataclass(frozen=True, slots=True)
class IsNull:
    """``column is null``, or ``column is not null`` when ``negated``."""

    column: str
    negated: bool = False

    def __str__(self) -> str:
        return f"{_render_column(self.column)} is {'not null' if self.negated else 'null'}"


@dataclass(frozen=True, slots=True)
class Not:
    """``not operand``."""

    operand: Node

    def __str__(self) -> str:
        return f"(not {self.operand})"


@dataclass(frozen=True, slots=True)
class And:
    """``operands[0] and operands[1] and ...`` (at least two, none of them an ``And``)."""

    operands: tuple[Node, ...]

    def __str__(self) -> str:
        return "(" + " and ".join(str(o) for o in self.operands) + ")"


@dataclass(frozen=True, slots=True)
class Or:
    """``operands[0] or operands[1] or ...`` (at least two, none of them an ``Or``)."""

    operands: tuple[Node, ...]

    def __str__(self) -> str:
        return "(" + " or ".join(str(o) for o in self.operands) + ")"


#: A node of a parsed filter; ``str(node)`` is its canonical, fully parenthesized text.
Node = Comparison | InList | IsNull | Not | And | Or


def _columns_in_order(node: Node, out: dict[str, None]) -> None:
    if isinstance(node, Comparison | InList | IsNull):
        out.setdefault(node.column)
    elif isinstance(node, Not):
        _columns_in_order(node.operand, out)
    else:
        for operand in node.operands:
            _columns_in_order(operand, out)


# ---------------------------------------------------------------------------------------------
# Parsing


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # number, ident, string, qident, op, punct, end
    text: str
    pos: int

    @property
    def keyword(self) -> str | None:
        """The keyword this token is (lower case), if it is one."""
        if self.kind == "ident":
            word = self.text.lower()
            if word in _KEYWORDS:
                return word
        return None

    def describe(self) -> str:
        return "the end of the filter" if self.kind == "end" else repr(self.text)


class _Parser:
    __slots__ = ("depth", "i", "source", "tokens")

    def __init__(self, source: str) -> None:
        self.source = source
        self.tokens = self._tokenize()
        self.i = 0
        self.depth = 0

    def fail(self, message: str) -> ValueError:
        return ValueError(f"invalid filter {self.source!r}: {message}")

    def _tokenize(self) -> list[_Token]:
        source = self.source
        tokens: list[_Token] = []
        pos = 0
        while pos < len(source):
            m = _TOKEN_RE.match(source, pos)
            if m is None:
                char = source[pos]
                if char in "'\"":
                    what = "string" if char == "'" else "quoted column name"
                    raise self.fail(f"unterminated {what} starting at position {pos}")
                raise self.fail(f"unexpected character {char!r} at position {pos}")
            kind = m.lastgroup
            assert kind is not None
            text = m.group()
            end = m.end()
            if kind == "number" and end < len(source) and source[end] in _WORD_CHARS:
                stop = end
                while stop < len(source) and source[stop] in _WORD_CHARS:
                    stop += 1
                raise self.fail(f"invalid number {source[pos:stop]!r} at position {pos}")
            if kind == "op" and text == "==":
                raise self.fail(f"'==' at position {pos}: write '=' to test equality")
            if kind == "qident" and text == '""':
                raise self.fail(f"empty quoted column name at position {pos}")
            if kind != "space":
                tokens.append(_Token(kind, text, pos))
            pos = end
        tokens.append(_Token("end", "", len(source)))
        return tokens

    # -- helpers

    def peek(self) -> _Token:
        return self.tokens[self.i]

    def advance(self) -> _Token:
        token = self.tokens[self.i]
        if token.kind != "end":
            self.i += 1
        return token

    def accept_keyword(self, word: str) -> bool:
        if self.peek().keyword == word:
            self.i += 1
            return True
        return False

    def expect(self, what: str, token: _Token | None = None) -> ValueError:
        token = self.peek() if token is None else token
        return self.fail(f"expected {what} at position {token.pos}, found {token.describe()}")

    def expect_punct(self, char: str, after: str = "") -> None:
        token = self.peek()
        if token.kind == "punct" and token.text == char:
            self.i += 1
            return
        raise self.expect(f"{char!r}{after}")

    def enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.fail(
                f"nested more than {MAX_DEPTH} levels deep at position {self.peek().pos}"
            )

    # -- grammar

    def parse(self) -> Node:
        node = self.parse_or()
        token = self.peek()
        if token.kind != "end":
            if token.kind == "punct" and token.text == ")":
                raise self.fail(f"unmatched ')' at position {token.pos}")
            raise self.expect("'and', 'or' or the end of the filter")
        return node

    def parse_or(self) -> Node:
        operands = [self.parse_and()]
        while self.accept_keyword("or"):
            operands.append(self.parse_and())
        return _join(Or, operands)

    def parse_and(self) -> Node:
        operands = [self.parse_not()]
        while self.accept_keyword("and"):
            operands.append(self.parse_not())
        return _join(And, operands)

    def parse_not(self) -> Node:
        if self.accept_keyword("not"):
            self.enter()
            node: Node = Not(self.parse_not())
            self.depth -= 1
            return node
        return self.parse_primary()

    def parse_primary(self) -> Node:
        token = self.peek()
        if token.kind == "punct" and token.text == "(":
            self.i += 1
            self.enter()
            node = self.parse_or()
            self.depth -= 1
            self.expect_punct(")")
            return node
        return self.parse_comparison()

    def parse_column(self) -> str:
        token = self.peek()
        if token.kind == "qident":
            self.i += 1
            return token.text[1:-1].replace('""', '"')
        if token.kind == "ident":
            if token.keyword is None:
                self.i += 1
                return token.text
            following = self.tokens[self.i + 1]
            if following.kind == "op" or following.keyword in ("is", "in"):
                # it reads like a comparison of a column named like a keyword
                raise self.expect(
                    f'a column name (write "{token.text}" for a column named like a keyword)'
                )
        raise self.expect("a column name")

    def parse_comparison(self) -> Node:
        column = self.parse_column()
        token = self.advance()
        if token.kind == "op":
            op = "!=" if token.text == "<>" else token.text
            value = self.parse_value()
            if value is None:
                name = _render_column(column)
                raise self.fail(
                    f"'{token.text} null' at position {token.pos} is never true: "
                    f"write '{name} is null' or '{name} is not null'"
                )
            if isinstance(value, bool) and op not in ("=", "!="):
                raise self.fail(
                    f"{token.text!r} at position {token.pos} cannot order booleans: "
                    "compare them with =, != or <>"
                )
            return Comparison(column, op, value)
        keyword = token.keyword
        if keyword == "is":
            negated = self.accept_keyword("not")
            if not self.accept_keyword("null"):
                if self.peek().keyword in ("true", "false"):
                    word = self.peek().text.lower()
                    raise self.expect(f"'null' (write '{_render_column(column)} = {word}')")
                raise self.expect("'null'")
            return IsNull(column, negated)
        if keyword == "not":
            if not self.accept_keyword("in"):
                raise self.expect("'in'")
            return self.parse_in_list(column, negated=True)
        if keyword == "in":
            return self.parse_in_list(column, negated=False)
        raise self.expect("an operator (=, !=, <>, <, <=, >, >=), 'in', 'not in' or 'is'", token)

    def parse_in_list(self, column: str, *, negated: bool) -> Node:
        self.expect_punct("(", " after 'in'")
        values: list[Scalar] = []
        first_kind: type | None = None
        while True:
            token = self.peek()
            value = self.parse_value()
            if value is None:
                name = _render_column(column)
                raise self.fail(
                    f"null in an 'in' list at position {token.pos} never matches: "
                    f"test for it with '{name} is null' instead"
                )
            kind = type(value)
            if first_kind is None:
                first_kind = kind
            elif kind is not first_kind:
                raise self.fail(
                    f"{_KIND_NAMES[kind]} {token.text} at position {token.pos} in a list of "
                    f"{_KIND_NAMES[first_kind]}s: an 'in' list holds values of one kind"
                )
            values.append(value)
            token = self.peek()
            if token.kind == "punct" and token.text == ",":
                self.i += 1
                continue
            self.expect_punct(")", " or ','")
            return InList(column, tuple(values), negated)

    def parse_value(self) -> Scalar | None:
        token = self.peek()
        if token.kind == "number":
            self.i += 1
            return Decimal(token.text)
        if token.kind == "string":
            self.i += 1
            return token.text[1:-1].replace("''", "'")
        keyword = token.keyword
        if keyword in ("true", "false", "null"):
            self.i += 1
            return None if keyword == "null" else keyword == "true"
        if token.kind == "ident":
            raise self.expect(f"a value (write '{token.text}' in single quotes for a string)")
        if token.kind == "qident":
            raise self.expect(
                "a value (double quotes name a column: write strings in single quotes)"
            )
        raise self.expect("a value")


_KIND_NAMES: Final[dict[type, str]] = {Decimal: "number", str: "string", bool: "boolean"}


def _join(cls: type[And] | type[Or], operands: list[Node]) -> Node:
    if len(operands) == 1:
        return operands[0]
    flat: list[Node] = []
    for operand in operands:
        if isinstance(operand, cls):
            flat.extend(operand.operands)
        else:
            flat.append(operand)
    return cls(tuple(flat))


# ---------------------------------------------------------------------------------------------
# Compiling to closures


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {excerpt(value)}"


def _mismatch(source: str, column: str, value: Any, what: str) -> FilterError:
    return FilterError(
        f"filter {source!r}: cannot compare column {column!r}, {_describe(value)}, with {what}"
    )


def _to_decimal(value: Any, source: str, column: str, what: str) -> Decimal:
    """``value`` as an exact Decimal, or FilterError if it is not a number (nor a numeric string).

    Called for values other than plain ints and None, which the callers handle first.
    """
    if isinstance(value, str):
        if value.isascii():
            try:
                number = _EXACT.create_decimal(value)
            except InvalidOperation:
                pass
            else:
                if not number.is_snan():
                    return number
        raise _mismatch(source, column, value, what)
    if isinstance(value, float):
        return Decimal(repr(value))
    if isinstance(value, Decimal):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return Decimal(value)
    raise _mismatch(source, column, value, what)


def _compile(node: Node, source: str) -> _Evaluator:
    if isinstance(node, Comparison):
        return _compile_comparison(node, source)
    if isinstance(node, InList):
        return _compile_in(node, source)
    if isinstance(node, IsNull):
        return _compile_is_null(node)
    if isinstance(node, Not):
        return _compile_not(_compile(node.operand, source))
    operands = tuple(_compile(o, source) for o in node.operands)
    if isinstance(node, And):
        return _compile_and(operands)
    return _compile_or(operands)


def _compile_is_null(node: IsNull) -> _Evaluator:
    column = node.column
    if node.negated:
        return lambda row: row[column] is not None
    return lambda row: row[column] is None


def _compile_not(operand: _Evaluator) -> _Evaluator:
    def not_(row: Mapping[str, Any]) -> bool | None:
        result = operand(row)
        return None if result is None else not result

    return not_


def _compile_and(operands: tuple[_Evaluator, ...]) -> _Evaluator:
    def and_(row: Mapping[str, Any]) -> bool | None:
        result: bool | None = True
        for operand in operands:
            value = operand(row)
            if value is False:
                return False
            if value is None:
                result = None
        return result

    return and_


def _compile_or(operands: tuple[_Evaluator, ...]) -> _Evaluator:
    def or_(row: Mapping[str, Any]) -> bool | None:
        result: bool | None = False
        for operand in operands:
            value = operand(row)
            if value is True:
                return True
            if value is None:
                result = None
        return result

    return or_


def _compile_comparison(node: Comparison, source: str) -> _Evaluator:
    literal = node.value
    if isinstance(literal, bool):
        return _compare_boolean(node.column, node.op, literal, source)
    if isinstance(literal, str):
        return _compare_string(node.column, node.op, literal, source)
    return _compare_number(node.column, node.op, literal, source)


def _compare_boolean(column: str, op: str, literal: bool, source: str) -> _Evaluator:
    wanted = literal if op == "=" else not literal
    what = _render_literal(literal)

    def boolean(row: Mapping[str, Any]) -> bool | None:
        value = row[column]
        if value is True or value is False:
            return value is wanted
        if value is None:
            return None
        raise _mismatch(source, column, value, what)

    return boolean


def _compare_string(column: str, op: str, literal: str, source: str) -> _Evaluator:
    compare = _COMPARE[op]
    what = f"the string {_render_literal(literal)}"

    def string(row: Mapping[str, Any]) -> bool | None:
        value = row[column]
        if type(value) is str:
            return compare(value, literal)
        if value is None:
            return None
        if isinstance(value, str):
            return compare(str(value), literal)
        raise _mismatch(source, column, value, what)

    return string


def _compare_number(column: str, op: str, literal: Decimal, source: str) -> _Evaluator:
    compare = _COMPARE[op]
    what = f"the number {literal}"
    # ints compare exactly with ints and with Decimals; an int literal is the faster of the two
    fast: int | Decimal = literal
    if literal.is_finite() and literal.adjusted() < _INT_DIGITS and literal == int(literal):
        fast = int(literal)
    nan_result = _NAN_RESULT[op]

    def number(row: Mapping[str, Any]) -> bool | None:
        value = row[column]
        if type(value) is int:
            return compare(value, fast)
        if value is None:
            return None
        exact = _to_decimal(value, source, column, what)
        if exact.is_nan():
            return nan_result
        return compare(exact, literal)

    return number


def _compile_in(node: InList, source: str) -> _Evaluator:
    negated = node.negated
    # hashing agrees with equality across int and Decimal, so one set serves both
    members = frozenset(node.values)
    first = node.values[0]

    def found(result: bool) -> bool:
        return result is not negated

    if isinstance(first, bool):
        return _in_booleans(node.column, members, found, source)
    if isinstance(first, str):
        return _in_strings(node.column, members, found, source)
    return _in_numbers(node.column, members, found, source)


def _in_booleans(
    column: str, members: frozenset[Scalar], found: Callable[[bool], bool], source: str
) -> _Evaluator:
    what = "a list of booleans"

    def booleans(row: Mapping[str, Any]) -> bool | None:
        value = row[column]
        if value is True or value is False:
            return found(value in members)
        if value is None:
            return None
        raise _mismatch(source, column, value, what)

    return booleans


def _in_strings(
    column: str, members: frozenset[Scalar], found: Callable[[bool], bool], source: str
) -> _Evaluator:
    what = "a list of strings"

    def strings(row: Mapping[str, Any]) -> bool | None:
        value = row[column]
        if isinstance(value, str):
            return found(value in members)
        if value is None:
            return None
        raise _mismatch(source, column, value, what)

    return strings


def _in_numbers(
    column: str, members: frozenset[Scalar], found: Callable[[bool], bool], source: str
) -> _Evaluator:
    what = "a list of numbers"

    def numbers(row: Mapping[str, Any]) -> bool | None:
        value = row[column]
        if type(value) is int:
            return found(value in members)
        if value is None:
            return None
        exact = _to_decimal(value, source, column, what)
        # a NaN equals no literal (and must not reach the set: NaNs hash by identity)
        return found(not exact.is_nan() and exact in members)

    return numbers


# ---------------------------------------------------------------------------------------------
# The public face


@dataclass(frozen=True, slots=True)
class RowFilter:
    """A parsed, compiled row filter. Build it with :meth:`RowFilter.parse`.

    ``source`` is the text as written, ``columns`` the column names it reads and ``tree`` its
    parsed form (``str(tree)`` is a canonical, fully parenthesized spelling).
    """

    source: str
    columns: frozenset[str]
    tree: Node
    _order: tuple[str, ...] = field(init=False, repr=False, compare=False)
    _evaluate: _Evaluator = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        order: dict[str, None] = {}
        _columns_in_order(self.tree, order)
        object.__setattr__(self, "_order", tuple(order))
        object.__setattr__(self, "_evaluate", _compile(self.tree, self.source))

    @classmethod
    def parse(cls, source: str) -> RowFilter:
        """Parse and compile ``source``; ValueError with the position of the first problem."""
        if not source.strip():
            raise ValueError(f"invalid filter {source!r}: it is empty")
        tree = _Parser(source).parse()
        order: dict[str, None] = {}
        _columns_in_order(tree, order)
        return cls(source, frozenset(order), tree)

    def evaluate(self, row: Mapping[str, Any]) -> bool | None:
        """The filter's three-valued result on ``row``: True, False, or None for UNKNOWN.

        Raises FilterError when a column the filter names is absent from ``row`` (whatever the
        other values, so a misnamed column never goes unnoticed) or when a value's type cannot
        be compared with its literal.
        """
        for column in self._order:
            if column not in row:
                raise self._absent(column, row)
        return self._evaluate(row)

    def matches(self, row: Mapping[str, Any]) -> bool:
        """True when the filter is TRUE for ``row`` (not when it is FALSE or UNKNOWN).

        Raises FilterError as :meth:`evaluate` does.
        """
        for column in self._order:
            if column not in row:
                raise self._absent(column, row)
        return self._evaluate(row) is True

    def _absent(self, column: str, row: Mapping[str, Any]) -> FilterError:
        message = f"filter {self.source!r} names column {column!r}, absent from the row"
        near = [name for name in row if isinstance(name, str) and name.lower() == column.lower()]
        if near:
            message += f" (column names are case-sensitive: did you mean {near[0]!r}?)"
        return FilterError(message)

    def __reduce__(self) -> tuple[Callable[[str], RowFilter], tuple[str]]:
        # the compiled closures cannot be pickled: rebuild from the source instead
        return (RowFilter.parse, (self.source,))
