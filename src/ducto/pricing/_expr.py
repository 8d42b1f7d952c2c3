"""
The pricing expression language: a small, safe arithmetic language over `decimal.Decimal`.

Source text is tokenized, parsed by recursive descent into an immutable AST, checked, and
compiled into nested Python closures, so evaluating an expression is a plain walk over
pre-built functions with every constant already converted to a `Decimal`. Nothing is ever
handed to ``eval``, ``exec``, ``compile`` or the ``ast`` module.

Grammar, lowest precedence first (Python's precedence and associativity)::

    expression  := or_expr ["if" or_expr "else" expression]      (right-associative)
    or_expr     := and_expr ("or" and_expr)*
    and_expr    := not_expr ("and" not_expr)*
    not_expr    := "not" not_expr | comparison
    comparison  := sum (("<" | "<=" | ">" | ">=" | "==" | "!=") sum)*
    sum         := term (("+" | "-") term)*
    term        := unary (("*" | "/" | "//" | "%") unary)*
    unary       := ("-" | "+") unary | primary
    primary     := NUMBER | NAME | NAME "(" expression ("," expression)* ")"
                 | "(" expression ")"

Semantics:

- Numbers are ``DIGITS`` or ``DIGITS.DIGITS`` (``12``, ``0.005``). ``.5``, ``5.``, scientific
  notation (``1e5``), underscores and any other suffix are errors. ``True``, ``False``,
  ``None``, ``NaN``, ``inf`` and ``Infinity`` are ordinary identifiers, not literals.
- Comparisons chain like Python's: ``a < b <= c`` means ``a < b and b <= c`` with ``b``
  evaluated once.
- Comparisons, ``and``, ``or`` and ``not`` produce ``Decimal(1)`` or ``Decimal(0)``; a value is
  true when it is not zero. ``and`` and ``or`` short-circuit and return 1 or 0, never an
  operand's value.
- ``//`` and ``%`` follow Python's rules for ints (floor division; the remainder has the
  divisor's sign), not `Decimal`'s truncating ones.
- There is no power operator: ``**`` and ``^`` are errors.
- ``a if c else b``, ``if(c, a, b)`` and the rates of ``tier`` evaluate only the branch taken.
- Arithmetic runs in a private `decimal.Context` (50 significant digits, half-even), never
  the caller's: each operation's result is rounded once, so ``1 / 3`` has 50 digits, and
  values below about ``1e-1000`` underflow towards zero. ``//`` and ``%`` are out of range
  when the quotient's integer part would have more than 50 digits.
- A literal has at most `MAX_LITERAL_DIGITS` digits, leading zeros of its integer part not
  counted (so also at most 30 decimal places).
- Variables may be any finite `Decimal` or int (bools count as 0 and 1) with a magnitude of
  at most `MAX_MAGNITUDE`; anything else fails when the variable is read.

Functions: ``min(a, ...)``, ``max(a, ...)``, ``if(c, a, b)``, ``clamp(x, lo, hi)``,
``ceil(x)``, ``floor(x)``, ``round(x)`` and ``round(x, n)`` (half-up, ``n`` from 0 to 18),
``tier(v, t1, r1, ..., tn, rn, default)`` (at least one threshold/rate pair; the rate of the
first threshold, in argument order, with ``v <= t``, else ``default``; literal thresholds
must be strictly increasing) and ``percentile(p, v1, ...)`` (linear interpolation between
the closest ranks, like numpy's default method, ``0 <= p <= 100``). ``min``, ``max``,
``clamp``, ``ceil``, ``floor``, ``round`` and ``percentile`` evaluate all their arguments.
A call with the wrong number of arguments is a compile-time error.

Work is bounded for any input: see `MAX_LENGTH`, `MAX_TOKENS`, `MAX_DEPTH`,
`MAX_LITERAL_DIGITS` and `MAX_MAGNITUDE`. Every failure, while compiling or evaluating,
is an `ExpressionError` carrying the source and, when known, the offending offset.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import (
    ROUND_CEILING,
    ROUND_FLOOR,
    ROUND_HALF_EVEN,
    ROUND_HALF_UP,
    Context,
    Decimal,
    DecimalException,
    DivisionByZero,
    InvalidOperation,
    Overflow,
)
from typing import Final, NamedTuple, TypeAlias

from ducto.errors import ExpressionError

__all__ = [
    "FUNCTIONS",
    "MAX_DEPTH",
    "MAX_LENGTH",
    "MAX_LITERAL_DIGITS",
    "MAX_MAGNITUDE",
    "MAX_ROUND_DIGITS",
    "MAX_TOKENS",
    "Expression",
    "compile_expression",
]

MAX_LENGTH: Final = 2000
"""Longest accepted source, in characters."""

MAX_TOKENS: Final = 500
"""Most tokens an expression may have."""

MAX_DEPTH: Final = 50
"""Deepest nesting of parentheses, calls, conditionals and unary operators."""

MAX_LITERAL_DIGITS: Final = 30
"""Most digits in a number literal, leading zeros of its integer part not counted."""

MAX_MAGNITUDE: Final = Decimal(10**30)
"""Largest absolute value any variable, literal or intermediate result may have."""

MAX_ROUND_DIGITS: Final = 18
"""Most decimal places ``round(x, n)`` accepts."""

FUNCTIONS: Final = frozenset(
    {"ceil", "clamp", "floor", "if", "max", "min", "percentile", "round", "tier"}
)
"""The names of the built-in functions."""

_KEYWORDS: Final = frozenset({"and", "else", "if", "not", "or"})

# A value whose adjusted exponent is below this is within MAX_MAGNITUDE, which lets the
# hot path skip the exact comparison.
_MAX_ADJUSTED: Final = 30

# prec 50 holds any in-range value rounded to MAX_ROUND_DIGITS places (31 + 18 digits) and
# keeps divmod exact; Emax is only a backstop because every result is range-checked.
_CONTEXT: Final = Context(
    prec=50,
    rounding=ROUND_HALF_EVEN,
    Emax=99,
    Emin=-999,
    capitals=1,
    clamp=0,
    flags=[],
    traps=[InvalidOperation, DivisionByZero, Overflow],
)

_ZERO: Final = Decimal(0)
_ONE: Final = Decimal(1)
_HUNDRED: Final = Decimal(100)
_MAX_INT: Final = 10**30
_QUANTUMS: Final = tuple(
    Decimal(1).scaleb(-n, context=_CONTEXT) for n in range(MAX_ROUND_DIGITS + 1)
)

_Env: TypeAlias = Mapping[str, Decimal | int]
_Fn: TypeAlias = Callable[[_Env], Decimal]


# --- tokens ---------------------------------------------------------------------------


class _Token(NamedTuple):
    kind: str  # "num", "name", "op" or "end"
    text: str
    pos: int


_TOKEN_RE: Final = re.compile(
    r"""
    (?P<ws>[ \t\r\n]+)
    | (?P<num>\.?[0-9][0-9A-Za-z_.]*)
    | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
    | (?P<op>\*\*|//|<=|>=|==|!=|[-+*/%<>(),^])
    """,
    re.VERBOSE | re.ASCII,
)
_NUMBER_RE: Final = re.compile(r"([0-9]+)(?:\.([0-9]+))?\Z", re.ASCII)
_COMPARISONS: Final = frozenset({"<", "<=", ">", ">=", "==", "!="})
_SUM_OPS: Final = frozenset({"+", "-"})
_TERM_OPS: Final = frozenset({"*", "/", "//", "%"})


def _tokenize(source: str) -> list[_Token]:
    tokens: list[_Token] = []
    pos = 0
    end = len(source)
    while pos < end:
        match = _TOKEN_RE.match(source, pos)
        if match is None:
            char = source[pos]
            hint = " (use '==' to compare)" if char == "=" else ""
            raise ExpressionError(f"unexpected character {char!r}{hint}", source, pos)
        kind = match.lastgroup
        text = match.group()
        if kind != "ws":
            if len(tokens) == MAX_TOKENS:
                raise ExpressionError(f"expression has more than {MAX_TOKENS} tokens", source, pos)
            if kind == "op" and text in ("**", "^"):
                raise ExpressionError(
                    f"{text!r} is not supported: there is no power operator", source, pos
                )
            tokens.append(_Token(kind or "", text, pos))
        pos = match.end()
    tokens.append(_Token("end", "", end))
    return tokens


def _number(token: _Token, source: str) -> Decimal:
    match = _NUMBER_RE.match(token.text)
    if match is None:
        hint = ""
        if token.text.startswith(".") or token.text.endswith("."):
            hint = " (write digits on both sides of the decimal point)"
        elif any(c in "eE" for c in token.text):
            hint = " (scientific notation is not supported)"
        raise ExpressionError(f"invalid number {token.text!r}{hint}", source, token.pos)
    whole, fraction = match.groups()
    if len(whole.lstrip("0")) + len(fraction or "") > MAX_LITERAL_DIGITS:
        raise ExpressionError(
            f"number has more than {MAX_LITERAL_DIGITS} digits", source, token.pos
        )
    return Decimal(token.text)


# --- syntax tree ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Number:
    value: Decimal
    pos: int


@dataclass(frozen=True, slots=True)
class _Name:
    name: str
    pos: int


@dataclass(frozen=True, slots=True)
class _Unary:
    op: str  # "-", "+" or "not"
    operand: _Node
    pos: int


@dataclass(frozen=True, slots=True)
class _Chain:
    """
    A left-to-right run of same-precedence operators: arithmetic or comparisons.

    Runs are kept flat so that long sums deepen neither the tree nor the recursion.
    """

    first: _Node
    rest: tuple[tuple[str, int, _Node], ...]  # (operator, its offset, right operand)


@dataclass(frozen=True, slots=True)
class _BoolOp:
    op: str  # "and" or "or"
    operands: tuple[_Node, ...]


@dataclass(frozen=True, slots=True)
class _Conditional:
    body: _Node
    test: _Node
    orelse: _Node


@dataclass(frozen=True, slots=True)
class _Call:
    name: str
    args: tuple[_Node, ...]
    pos: int


_Node: TypeAlias = _Number | _Name | _Unary | _Chain | _BoolOp | _Conditional | _Call

# (fewest, most) arguments; None means no upper bound.
_ARITY: Final[dict[str, tuple[int, int | None]]] = {
    "ceil": (1, 1),
    "clamp": (3, 3),
    "floor": (1, 1),
    "if": (3, 3),
    "max": (1, None),
    "min": (1, None),
    "percentile": (2, None),
    "round": (1, 2),
    "tier": (4, None),
}


def _literal(node: _Node) -> Decimal | None:
    """The value of a number literal, optionally signed, else None."""
    if isinstance(node, _Number):
        return node.value
    if isinstance(node, _Unary) and node.op != "not":
        value = _literal(node.operand)
        if value is not None:
            return _CONTEXT.minus(value) if node.op == "-" else _CONTEXT.plus(value)
    return None


# --- parser ---------------------------------------------------------------------------


class _Parser:
    """Recursive descent over the token list; every nesting step goes through `_enter`."""

    def __init__(self, source: str, tokens: list[_Token]) -> None:
        self._source = source
        self._tokens = tokens
        self._index = 0
        self._depth = 0
        self.names: dict[str, int] = {}

    def parse(self) -> _Node:
        node = self._expression()
        token = self._tokens[self._index]
        if token.kind != "end":
            raise self._unexpected(token)
        return node

    def _error(self, message: str, pos: int) -> ExpressionError:
        return ExpressionError(message, self._source, pos)

    def _unexpected(self, token: _Token) -> ExpressionError:
        if token.kind == "end":
            return self._error("unexpected end of expression", token.pos)
        return self._error(f"unexpected {token.text!r}", token.pos)

    def _enter(self, pos: int) -> None:
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise self._error(f"expression is nested more than {MAX_DEPTH} levels deep", pos)

    def _peek(self) -> _Token:
        return self._tokens[self._index]

    def _next(self) -> _Token:
        token = self._tokens[self._index]
        self._index += 1
        return token

    def _at_keyword(self, word: str) -> bool:
        token = self._tokens[self._index]
        return token.kind == "name" and token.text == word

    def _expression(self) -> _Node:
        self._enter(self._peek().pos)
        body = self._or()
        if self._at_keyword("if"):
            self._next()
            test = self._or()
            if not self._at_keyword("else"):
                token = self._peek()
                if token.kind == "end":
                    raise self._error("expected 'else'", token.pos)
                raise self._error(f"expected 'else', found {token.text!r}", token.pos)
            self._next()
            body = _Conditional(body, test, self._expression())
        self._depth -= 1
        return body

    def _or(self) -> _Node:
        return self._bool("or", self._and)

    def _and(self) -> _Node:
        return self._bool("and", self._not)

    def _bool(self, word: str, operand: Callable[[], _Node]) -> _Node:
        first = operand()
        if not self._at_keyword(word):
            return first
        operands = [first]
        while self._at_keyword(word):
            self._next()
            operands.append(operand())
        return _BoolOp(word, tuple(operands))

    def _not(self) -> _Node:
        if not self._at_keyword("not"):
            return self._chain(_COMPARISONS, self._sum)
        token = self._next()
        self._enter(token.pos)
        node = _Unary("not", self._not(), token.pos)
        self._depth -= 1
        return node

    def _sum(self) -> _Node:
        return self._chain(_SUM_OPS, self._term)

    def _term(self) -> _Node:
        return self._chain(_TERM_OPS, self._unary)

    def _chain(self, ops: frozenset[str], operand: Callable[[], _Node]) -> _Node:
        first = operand()
        rest: list[tuple[str, int, _Node]] = []
        while (token := self._peek()).kind == "op" and token.text in ops:
            self._next()
            rest.append((token.text, token.pos, operand()))
        return _Chain(first, tuple(rest)) if rest else first

    def _unary(self) -> _Node:
        token = self._peek()
        if token.kind != "op" or token.text not in _SUM_OPS:
            return self._primary()
        self._next()
        self._enter(token.pos)
        node = _Unary(token.text, self._unary(), token.pos)
        self._depth -= 1
        return node

    def _primary(self) -> _Node:
        token = self._next()
        if token.kind == "num":
            return _Number(_number(token, self._source), token.pos)
        if token.kind == "op" and token.text == "(":
            node = self._expression()
            self._close(token)
            return node
        if token.kind != "name":
            raise self._unexpected(token)
        name = token.text
        calling = self._peek().text == "(" and self._peek().kind == "op"
        if name in FUNCTIONS and calling:
            return self._call(token)
        if name in _KEYWORDS:
            raise self._unexpected(token)
        if name in FUNCTIONS:
            raise self._error(f"function {name!r} must be called, as in {name}(...)", token.pos)
        if calling:
            raise self._error(f"unknown function {name!r}", token.pos)
        self.names.setdefault(name, token.pos)
        return _Name(name, token.pos)

    def _close(self, opening: _Token) -> None:
        token = self._next()
        if token.kind == "op" and token.text == ")":
            return
        if token.kind == "end":
            raise self._error("'(' was never closed", opening.pos)
        raise self._error(f"expected ')', found {token.text!r}", token.pos)

    def _call(self, name: _Token) -> _Call:
        opening = self._next()
        args: list[_Node] = []
        if self._peek().text == ")" and self._peek().kind == "op":
            self._next()
        else:
            while True:
                args.append(self._expression())
                token = self._peek()
                if token.kind == "op" and token.text == ",":
                    self._next()
                    continue
                self._close(opening)
                break
        call = _Call(name.text, tuple(args), name.pos)
        self._check_call(call)
        return call

    def _check_call(self, call: _Call) -> None:
        fewest, most = _ARITY[call.name]
        count = len(call.args)
        if count < fewest or (most is not None and count > most):
            if most is None:
                wanted = f"at least {fewest} arguments"
            elif fewest == most:
                wanted = f"exactly {fewest} argument{'s' if fewest > 1 else ''}"
            else:
                wanted = f"{fewest} to {most} arguments"
            raise self._error(f"{call.name}() takes {wanted}, got {count}", call.pos)
        if call.name == "tier" and count % 2:
            raise self._error(
                "tier() takes a value, threshold/rate pairs and a default: an even number "
                f"of arguments, got {count}",
                call.pos,
            )
        if call.name == "tier":
            previous: Decimal | None = None
            for threshold in call.args[1:-1:2]:
                value = _literal(threshold)
                if value is None:
                    continue
                if previous is not None and value <= previous:
                    raise self._error(
                        "tier() thresholds must be strictly increasing", _position(threshold)
                    )
                previous = value
        elif call.name == "round" and count == 2:
            digits = _literal(call.args[1])
            if digits is not None and not _valid_digits(digits):
                raise self._error(_ROUND_DIGITS_MESSAGE, _position(call.args[1]))
        elif call.name == "percentile":
            p = _literal(call.args[0])
            if p is not None and not 0 <= p <= _HUNDRED:
                raise self._error(_PERCENTILE_MESSAGE, _position(call.args[0]))


def _position(node: _Node) -> int:
    while True:
        if isinstance(node, _Chain):
            node = node.first
        elif isinstance(node, _BoolOp):
            node = node.operands[0]
        elif isinstance(node, _Conditional):
            node = node.body
        else:
            return node.pos


_ROUND_DIGITS_MESSAGE: Final = f"round() digits must be a whole number from 0 to {MAX_ROUND_DIGITS}"
_PERCENTILE_MESSAGE: Final = "percentile() p must be between 0 and 100"


def _valid_digits(digits: Decimal) -> bool:
    return 0 <= digits <= MAX_ROUND_DIGITS and digits == digits.to_integral_value(context=_CONTEXT)


# --- compilation to closures ----------------------------------------------------------


def _out_of_range(source: str, pos: int | None) -> ExpressionError:
    return ExpressionError("value out of range", source, pos)


def _build(node: _Node, source: str) -> _Fn:
    constant = _literal(node)
    if constant is not None:
        return _build_constant(constant)
    if isinstance(node, _Name):
        return _build_name(node, source)
    if isinstance(node, _Unary):
        return _build_unary(node, source)
    if isinstance(node, _Chain):
        if node.rest[0][0] in _COMPARISONS:
            return _build_comparison(node, source)
        return _build_arithmetic(node, source)
    if isinstance(node, _BoolOp):
        return _build_bool(node, source)
    if isinstance(node, _Conditional):
        return _build_conditional(
            _build(node.test, source), _build(node.body, source), _build(node.orelse, source)
        )
    if isinstance(node, _Call):
        return _build_call(node, source)
    raise AssertionError(f"unhandled node {node!r}")  # pragma: no cover


def _build_constant(value: Decimal) -> _Fn:
    def constant(env: _Env) -> Decimal:
        return value

    return constant


def _coerce(value: object, name: str, source: str, pos: int) -> Decimal:
    """Convert a variable's value to an in-range finite `Decimal`, or raise."""
    if isinstance(value, int):
        if -_MAX_INT <= value <= _MAX_INT:
            return Decimal(value)
        raise ExpressionError(f"variable {name!r} is out of range", source, pos)
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise ExpressionError(f"variable {name!r} is not a finite number", source, pos)
        if value.copy_abs() > MAX_MAGNITUDE:
            raise ExpressionError(f"variable {name!r} is out of range", source, pos)
        return value
    raise ExpressionError(
        f"variable {name!r} must be a Decimal or an int, not {type(value).__name__}",
        source,
        pos,
    )


def _build_name(node: _Name, source: str) -> _Fn:
    name, pos = node.name, node.pos

    def load(env: _Env) -> Decimal:
        try:
            value = env[name]
        except KeyError:
            raise ExpressionError(f"variable {name!r} is not set", source, pos) from None
        if type(value) is Decimal:
            if value.is_finite() and (
                value.adjusted() < _MAX_ADJUSTED or value.copy_abs() <= MAX_MAGNITUDE
            ):
                return value
        elif type(value) is int and -_MAX_INT <= value <= _MAX_INT:
            return Decimal(value)
        return _coerce(value, name, source, pos)

    return load


def _build_unary(node: _Unary, source: str) -> _Fn:
    operand = _build(node.operand, source)
    if node.op == "not":

        def negation(env: _Env) -> Decimal:
            return _ZERO if operand(env) else _ONE

        return negation

    apply = _CONTEXT.minus if node.op == "-" else _CONTEXT.plus

    def sign(env: _Env) -> Decimal:
        return apply(operand(env))

    return sign


_Binary: TypeAlias = Callable[[Decimal, Decimal], Decimal]


def _floor_divmod(a: Decimal, b: Decimal) -> tuple[Decimal, Decimal]:
    quotient, remainder = _CONTEXT.divmod(a, b)
    if remainder and remainder.is_signed() != b.is_signed():
        quotient = _CONTEXT.subtract(quotient, _ONE)
        remainder = _CONTEXT.add(remainder, b)
    return quotient, remainder


def _binary(op: str, source: str, pos: int) -> _Binary:
    """The checked operation for one arithmetic operator at offset `pos`."""
    if op in ("+", "-", "*"):
        raw = {"+": _CONTEXT.add, "-": _CONTEXT.subtract, "*": _CONTEXT.multiply}[op]

        def simple(a: Decimal, b: Decimal) -> Decimal:
            result = raw(a, b)
            if result.adjusted() >= _MAX_ADJUSTED and result.copy_abs() > MAX_MAGNITUDE:
                raise _out_of_range(source, pos)
            return result

        return simple

    zero_message = "modulo by zero" if op == "%" else "division by zero"

    def division(a: Decimal, b: Decimal) -> Decimal:
        if not b:
            raise ExpressionError(zero_message, source, pos)
        try:
            if op == "/":
                result = _CONTEXT.divide(a, b)
            elif op == "//":
                result = _floor_divmod(a, b)[0]
            else:
                result = _floor_divmod(a, b)[1]
                if not result:
                    result = result.copy_abs()
        except DecimalException:
            raise _out_of_range(source, pos) from None
        if result.adjusted() >= _MAX_ADJUSTED and result.copy_abs() > MAX_MAGNITUDE:
            raise _out_of_range(source, pos)
        return result

    return division


def _build_arithmetic(node: _Chain, source: str) -> _Fn:
    first = _build(node.first, source)
    steps = tuple(
        (_binary(op, source, pos), _build(operand, source)) for op, pos, operand in node.rest
    )
    if len(steps) > 1:

        def chain(env: _Env) -> Decimal:
            value = first(env)
            for apply, operand in steps:
                value = apply(value, operand(env))
            return value

        return chain

    ((apply, second),) = steps
    op, pos, right = node.rest[0]
    constant = _literal(right)
    if op in ("+", "-", "*"):
        # The most common shapes (``tokens * 0.005``, ``a + b``) skip one call level.
        raw = {"+": _CONTEXT.add, "-": _CONTEXT.subtract, "*": _CONTEXT.multiply}[op]
        if constant is not None:
            c = constant

            def with_constant(env: _Env) -> Decimal:
                result = raw(first(env), c)
                if result.adjusted() >= _MAX_ADJUSTED and result.copy_abs() > MAX_MAGNITUDE:
                    raise _out_of_range(source, pos)
                return result

            return with_constant

        def pair(env: _Env) -> Decimal:
            result = raw(first(env), second(env))
            if result.adjusted() >= _MAX_ADJUSTED and result.copy_abs() > MAX_MAGNITUDE:
                raise _out_of_range(source, pos)
            return result

        return pair

    def binary(env: _Env) -> Decimal:
        return apply(first(env), second(env))

    return binary


_COMPARE: Final[dict[str, Callable[[Decimal, Decimal], bool]]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
}


def _build_comparison(node: _Chain, source: str) -> _Fn:
    first = _build(node.first, source)
    steps = tuple((_COMPARE[op], _build(operand, source)) for op, _, operand in node.rest)
    if len(steps) == 1:
        ((test, second),) = steps

        def compare(env: _Env) -> Decimal:
            return _ONE if test(first(env), second(env)) else _ZERO

        return compare

    def chain(env: _Env) -> Decimal:
        left = first(env)
        for test, operand in steps:
            right = operand(env)
            if not test(left, right):
                return _ZERO
            left = right
        return _ONE

    return chain


def _build_bool(node: _BoolOp, source: str) -> _Fn:
    operands = tuple(_build(operand, source) for operand in node.operands)
    if node.op == "and":

        def conjunction(env: _Env) -> Decimal:
            for operand in operands:
                if not operand(env):
                    return _ZERO
            return _ONE

        return conjunction

    def disjunction(env: _Env) -> Decimal:
        for operand in operands:
            if operand(env):
                return _ONE
        return _ZERO

    return disjunction


def _build_conditional(test: _Fn, body: _Fn, orelse: _Fn) -> _Fn:
    def conditional(env: _Env) -> Decimal:
        return body(env) if test(env) else orelse(env)

    return conditional


def _build_call(node: _Call, source: str) -> _Fn:
    args = [_build(arg, source) for arg in node.args]
    name, pos = node.name, node.pos
    if name == "if":
        return _build_conditional(args[0], args[1], args[2])
    if name in ("min", "max"):
        return _build_extreme(min if name == "min" else max, args)
    if name == "tier":
        return _build_tier(args)
    if name == "clamp":
        return _build_clamp(args, source, pos)
    if name in ("ceil", "floor"):
        return _build_integral(ROUND_CEILING if name == "ceil" else ROUND_FLOOR, args[0])
    if name == "round":
        return _build_round(args, source, pos)
    return _build_percentile(args, source, pos)


def _build_extreme(pick: Callable[[Sequence[Decimal]], Decimal], args: list[_Fn]) -> _Fn:
    if len(args) == 1:
        return args[0]
    funcs = tuple(args)

    def extreme(env: _Env) -> Decimal:
        return pick([f(env) for f in funcs])

    return extreme


def _build_tier(args: list[_Fn]) -> _Fn:
    value_of, default = args[0], args[-1]
    pairs = tuple(zip(args[1:-1:2], args[2:-1:2], strict=True))

    def tier(env: _Env) -> Decimal:
        value = value_of(env)
        for threshold, rate in pairs:
            if value <= threshold(env):
                return rate(env)
        return default(env)

    return tier


def _build_clamp(args: list[_Fn], source: str, pos: int) -> _Fn:
    x_of, lo_of, hi_of = args

    def clamp(env: _Env) -> Decimal:
        x, lo, hi = x_of(env), lo_of(env), hi_of(env)
        if lo > hi:
            raise ExpressionError(f"clamp() lower bound {lo} exceeds upper bound {hi}", source, pos)
        if x < lo:
            return lo
        if x > hi:
            return hi
        return x

    return clamp


def _build_integral(rounding: str, arg: _Fn) -> _Fn:
    def integral(env: _Env) -> Decimal:
        return arg(env).to_integral_value(rounding=rounding, context=_CONTEXT)

    return integral


def _build_round(args: list[_Fn], source: str, pos: int) -> _Fn:
    value_of = args[0]
    if len(args) == 1:
        quantum = _QUANTUMS[0]

        def round_whole(env: _Env) -> Decimal:
            try:
                return value_of(env).quantize(quantum, rounding=ROUND_HALF_UP, context=_CONTEXT)
            except DecimalException:
                raise _out_of_range(source, pos) from None

        return round_whole

    digits_of = args[1]

    def round_places(env: _Env) -> Decimal:
        value = value_of(env)
        digits = digits_of(env)
        if not _valid_digits(digits):
            raise ExpressionError(_ROUND_DIGITS_MESSAGE, source, pos)
        try:
            return value.quantize(_QUANTUMS[int(digits)], rounding=ROUND_HALF_UP, context=_CONTEXT)
        except DecimalException:
            raise _out_of_range(source, pos) from None

    return round_places


def _build_percentile(args: list[_Fn], source: str, pos: int) -> _Fn:
    p_of = args[0]
    values_of = tuple(args[1:])
    last = Decimal(len(values_of) - 1)

    def percentile(env: _Env) -> Decimal:
        p = p_of(env)
        if not 0 <= p <= _HUNDRED:
            raise ExpressionError(_PERCENTILE_MESSAGE, source, pos)
        values = sorted([f(env) for f in values_of])
        try:
            rank = _CONTEXT.divide(_CONTEXT.multiply(p, last), _HUNDRED)
            low = int(rank.to_integral_value(rounding=ROUND_FLOOR, context=_CONTEXT))
            fraction = _CONTEXT.subtract(rank, low)
            if not fraction:
                return values[low]
            below, above = values[low], values[low + 1]
            result = _CONTEXT.add(
                below, _CONTEXT.multiply(_CONTEXT.subtract(above, below), fraction)
            )
        except DecimalException:
            raise _out_of_range(source, pos) from None
        if result.copy_abs() > MAX_MAGNITUDE:
            raise _out_of_range(source, pos)
        return result

    return percentile


# --- public API -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True, eq=False)
class Expression:
    """
    A compiled pricing expression; build one with `compile_expression`.

    Attributes:
        source: The expression text it was compiled from.
        variables: The variable names the expression references (function names excluded).
    """

    source: str
    variables: frozenset[str]
    _run: _Fn = field(repr=False)

    def evaluate(self, env: Mapping[str, Decimal | int]) -> Decimal:
        """
        Evaluate the expression with the given variable values.

        Only the variables on the branches actually taken are looked up, so a variable
        that an untaken ``if`` branch names may be missing from `env`.

        Args:
            env: A value for each variable the evaluation reaches: a finite `Decimal` or an
                int, with magnitude at most `MAX_MAGNITUDE`. Extra keys are ignored.

        Returns:
            The finite result (a zero result never carries a negative sign).

        Raises:
            ExpressionError: A variable is missing or invalid, a division or modulo by zero,
                a function argument out of its domain, or a value beyond `MAX_MAGNITUDE`.
        """
        try:
            result = self._run(env)
        except ArithmeticError as exc:
            raise _out_of_range(self.source, None) from exc
        except RecursionError as exc:  # pragma: no cover - MAX_DEPTH keeps recursion shallow
            raise ExpressionError("expression is nested too deeply", self.source) from exc
        return result if result else result.copy_abs()


def compile_expression(source: str, allowed_names: Collection[str] | None = None) -> Expression:
    """
    Parse and check a pricing expression, ready for repeated evaluation.

    Args:
        source: The expression text, e.g. ``"input_tokens * 0.005 + output_tokens * 0.015"``.
        allowed_names: If given, the only variable names the expression may use.

    Returns:
        The compiled `Expression`.

    Raises:
        ExpressionError: The source is not a str, is empty, too long, has too many tokens
            or too deep a nesting, is malformed, calls an unknown function or a function
            with the wrong number of arguments, or uses a variable not in `allowed_names`.
            `ExpressionError.position` is the offset of the problem.
    """
    if not isinstance(source, str):
        raise ExpressionError(f"expression must be a str, not {type(source).__name__}")
    if len(source) > MAX_LENGTH:
        raise ExpressionError(
            f"expression is longer than {MAX_LENGTH} characters",
            source[:60] + "...",
            MAX_LENGTH,
        )
    if not source.strip():
        raise ExpressionError("expression is empty", source, 0)
    parser = _Parser(source, _tokenize(source))
    try:
        tree = parser.parse()
    except RecursionError as exc:  # pragma: no cover - MAX_DEPTH keeps recursion shallow
        raise ExpressionError("expression is nested too deeply", source) from exc
    if allowed_names is not None:
        allowed = frozenset(allowed_names)
        for name, pos in parser.names.items():
            if name not in allowed:
                raise ExpressionError(f"unknown variable {name!r}", source, pos)
    return Expression(source, frozenset(parser.names), _build(tree, source))
