"""Property tests for the pricing expression language: hostile input and a reference model."""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Context, Decimal
from fractions import Fraction

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from ducto.errors import ExpressionError
from ducto.pricing._expr import MAX_MAGNITUDE, Expression, compile_expression

TIME_LIMIT = 0.05

# --- hostile input --------------------------------------------------------------------

TOKENS = [
    *[
        "+",
        "-",
        "*",
        "/",
        "//",
        "%",
        "**",
        "^",
        "<",
        "<=",
        ">",
        ">=",
        "==",
        "!=",
        "=",
        "!",
        "(",
        ")",
        ",",
        ".",
        "_",
    ],
    *["0", "1", "2", "7", "0.005", "2.5", "12", "100", "0.000000000000000000000000000001"],
    "9" * 30,
    "1" * 40,
    "1e5",
    "1e999",
    ".5",
    "5.",
    *[
        "x",
        "y",
        "input_tokens",
        "output_tokens",
        "True",
        "False",
        "None",
        "NaN",
        "nan",
        "Infinity",
        "inf",
    ],
    *["min", "max", "if", "tier", "clamp", "ceil", "floor", "round", "percentile", "foo", "MIN"],
    *["and", "or", "not", "if", "else"],
    "\t",
    "\n",
    "é",
    "\u0661",
    "\x00",
]

variable_values: st.SearchStrategy[Decimal | int] = st.one_of(
    st.integers(min_value=-(10**31), max_value=10**31),
    st.decimals(allow_nan=True, allow_infinity=True),
    st.decimals(min_value=-(10**6), max_value=10**6, places=4),
    st.sampled_from([0, 1, -1, Decimal("0E+999999"), Decimal("1E-999999"), Decimal(10**30)]),
)

token_soup = st.lists(st.sampled_from(TOKENS), max_size=80).flatmap(
    lambda tokens: st.sampled_from(["", " "]).map(lambda sep: sep.join(tokens))
)

PATTERNS = {
    "parens": ("(", "1", ")"),
    "unclosed": ("(", "1", ""),
    "minus": ("-", "1", ""),
    "not": ("not ", "1", ""),
    "calls": ("min(", "1", ")"),
    "rounds": ("round(", "9" * 30, ", 18)"),
    "conditionals": ("1 if 0 else ", "2", ""),
    "sums": ("9" * 30 + " + ", "1", ""),
    "products": ("9" * 30 + " * ", "1", ""),
    "quotients": ("1 / 0." + "0" * 29 + "1 / ", "1", ""),
    "floors": ("x // 0." + "0" * 29 + "1 % ", "1", ""),
    "percentiles": ("percentile(50, ", "1", ", 2)"),
    "tiers": ("tier(x, 1, ", "2", ", 3)"),
}

nested = st.builds(
    lambda pattern, count: (
        PATTERNS[pattern][0] * count + PATTERNS[pattern][1] + PATTERNS[pattern][2] * count
    ),
    st.sampled_from(sorted(PATTERNS)),
    st.integers(min_value=0, max_value=3000),
)


def timed(work: Callable[[], object]) -> float:
    """Seconds `work` took, with the collector paused so only the work itself is timed."""
    gc.disable()
    try:
        start = time.perf_counter()
        work()
        return time.perf_counter() - start
    finally:
        gc.enable()


def check_bounded(source: str, values: st.DataObject) -> None:
    outcome: list[Expression | Decimal | ExpressionError] = []

    def attempt(work: Callable[[], Expression | Decimal]) -> None:
        try:
            outcome.append(work())
        except ExpressionError as error:
            outcome.append(error)

    assert timed(lambda: attempt(lambda: compile_expression(source))) < TIME_LIMIT
    expression = outcome.pop()
    if not isinstance(expression, Expression):
        return
    env = {name: values.draw(variable_values) for name in sorted(expression.variables)}
    assert timed(lambda: attempt(lambda: expression.evaluate(env))) < TIME_LIMIT
    result = outcome.pop()
    if isinstance(result, Decimal):
        assert result.is_finite()
        assert result.copy_abs() <= MAX_MAGNITUDE
    else:
        assert isinstance(result, ExpressionError)


@settings(deadline=None, max_examples=300)
@given(source=st.text(max_size=300), values=st.data())
def test_random_text_is_rejected_or_evaluated_quickly(source: str, values: st.DataObject) -> None:
    """Arbitrary text compiles and evaluates to a finite Decimal or an ExpressionError."""
    check_bounded(source, values)


@settings(deadline=None, max_examples=300)
@given(
    source=st.text(alphabet="0123456789.+-*/%<>=!(), _abcexyz\t", max_size=300),
    values=st.data(),
)
def test_operator_text_is_rejected_or_evaluated_quickly(source: str, values: st.DataObject) -> None:
    """Text made of the language's own characters never escapes as another error."""
    check_bounded(source, values)


@settings(deadline=None, max_examples=400)
@given(source=token_soup, values=st.data())
def test_token_soup_is_rejected_or_evaluated_quickly(source: str, values: st.DataObject) -> None:
    """Random sequences of tokens compile and evaluate safely within a time bound."""
    check_bounded(source, values)


@settings(deadline=None, max_examples=150)
@given(source=nested, values=st.data())
def test_deep_and_long_input_is_bounded(source: str, values: st.DataObject) -> None:
    """Deep nesting and long chains are rejected or evaluated safely within a time bound."""
    check_bounded(source, values)


# --- well-formed trees against a reference model --------------------------------------


@dataclass(frozen=True)
class Lit:
    value: Decimal


@dataclass(frozen=True)
class Var:
    name: str


@dataclass(frozen=True)
class Neg:
    operand: Node


@dataclass(frozen=True)
class Not:
    operand: Node


@dataclass(frozen=True)
class Bin:
    op: str
    left: Node
    right: Node


@dataclass(frozen=True)
class Cond:
    body: Node
    test: Node
    orelse: Node
    as_call: bool


@dataclass(frozen=True)
class Call:
    name: str
    args: tuple[Node, ...]


Node = Lit | Var | Neg | Not | Bin | Cond | Call

VARIABLES = ("a", "b", "input_tokens")
ARITHMETIC = ("+", "-", "*", "/", "//", "%")
COMPARISONS = ("<", "<=", ">", ">=", "==", "!=")

COND, OR, AND, NOT, CMP, SUM, TERM, UNARY, ATOM = range(1, 10)
PRECEDENCE = {
    "or": OR,
    "and": AND,
    **dict.fromkeys(COMPARISONS, CMP),
    "+": SUM,
    "-": SUM,
    **dict.fromkeys(("*", "/", "//", "%"), TERM),
}


def precedence(node: Node) -> int:
    if isinstance(node, Lit):
        return UNARY if node.value.is_signed() else ATOM
    if isinstance(node, Neg):
        return UNARY
    if isinstance(node, Not):
        return NOT
    if isinstance(node, Bin):
        return PRECEDENCE[node.op]
    if isinstance(node, Cond) and not node.as_call:
        return COND
    return ATOM


def render(node: Node, lowest: int = COND) -> str:
    """Source text for the tree, with only the parentheses precedence requires."""
    text = render_bare(node)
    return f"({text})" if precedence(node) < lowest else text


def render_bare(node: Node) -> str:
    if isinstance(node, Lit):
        text = format(node.value.copy_abs(), "f")
        return "-" + text if node.value.is_signed() else text
    if isinstance(node, Var):
        return node.name
    if isinstance(node, Neg):
        return "-" + render(node.operand, UNARY)
    if isinstance(node, Not):
        return "not " + render(node.operand, NOT)
    if isinstance(node, Bin):
        level = PRECEDENCE[node.op]
        # Comparisons would chain, so a nested one is parenthesized on either side.
        left_level = level + 1 if level == CMP else level
        return f"{render(node.left, left_level)} {node.op} {render(node.right, level + 1)}"
    if isinstance(node, Cond):
        if node.as_call:
            return f"if({render(node.test)}, {render(node.body)}, {render(node.orelse)})"
        return f"{render(node.body, OR)} if {render(node.test, OR)} else {render(node.orelse)}"
    return f"{node.name}({', '.join(render(arg) for arg in node.args)})"


class ModelError(Exception):
    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


REFERENCE = Context(prec=50, rounding=ROUND_HALF_EVEN, Emax=999_999, Emin=-999_999)
LIMIT = Fraction(10**30)


def rounded(value: Fraction, *, check: bool = True) -> Fraction:
    """The exact value rounded once to 50 significant digits, half-even."""
    result = Fraction(REFERENCE.divide(Decimal(value.numerator), Decimal(value.denominator)))
    if check and abs(result) > LIMIT:
        raise ModelError("range")
    return result


def truth(value: object) -> Fraction:
    return Fraction(1) if value else Fraction(0)


def reference(node: Node, env: Mapping[str, Decimal | int]) -> Fraction:
    """Evaluate the tree exactly with fractions, rounding each operation's result once."""
    if isinstance(node, Lit):
        return Fraction(node.value)
    if isinstance(node, Var):
        return Fraction(env[node.name])
    if isinstance(node, Neg):
        return -reference(node.operand, env)
    if isinstance(node, Not):
        return truth(not reference(node.operand, env))
    if isinstance(node, Cond):
        taken = node.body if reference(node.test, env) else node.orelse
        return reference(taken, env)
    if isinstance(node, Bin):
        return reference_binary(node, env)
    return reference_call(node, env)


def reference_binary(node: Bin, env: Mapping[str, Decimal | int]) -> Fraction:
    if node.op == "and":
        return truth(bool(reference(node.left, env)) and bool(reference(node.right, env)))
    if node.op == "or":
        return truth(bool(reference(node.left, env)) or bool(reference(node.right, env)))
    a = reference(node.left, env)
    b = reference(node.right, env)
    comparisons = {
        "<": a < b,
        "<=": a <= b,
        ">": a > b,
        ">=": a >= b,
        "==": a == b,
        "!=": a != b,
    }
    if node.op in comparisons:
        return truth(comparisons[node.op])
    if node.op == "+":
        return rounded(a + b)
    if node.op == "-":
        return rounded(a - b)
    if node.op == "*":
        return rounded(a * b)
    if not b:
        raise ModelError("modulo by zero" if node.op == "%" else "division by zero")
    if node.op == "/":
        return rounded(a / b)
    # Documented limit: // and % need the quotient's integer part to fit in 50 digits.
    if abs(math.trunc(a / b)) >= 10**50:
        raise ModelError("range")
    quotient = math.floor(a / b)
    if node.op == "//":
        return rounded(Fraction(quotient))
    return rounded(a - b * quotient)


def reference_call(node: Call, env: Mapping[str, Decimal | int]) -> Fraction:
    name = node.name
    if name == "tier":
        value = reference(node.args[0], env)
        rest = node.args[1:-1]
        for threshold, rate in zip(rest[::2], rest[1::2], strict=True):
            if value <= reference(threshold, env):
                return reference(rate, env)
        return reference(node.args[-1], env)
    args = [reference(arg, env) for arg in node.args]
    if name == "min":
        return min(args)
    if name == "max":
        return max(args)
    if name == "clamp":
        x, lo, hi = args
        if lo > hi:
            raise ModelError("clamp")
        return min(max(x, lo), hi)
    if name == "ceil":
        return Fraction(math.ceil(args[0]))
    if name == "floor":
        return Fraction(math.floor(args[0]))
    if name == "round":
        scale = 10 ** int(args[1]) if len(args) == 2 else 1
        magnitude = Fraction(math.floor(abs(args[0]) * scale + Fraction(1, 2)), scale)
        return -magnitude if args[0] < 0 else magnitude
    assert "percentile" == name
    p, values = args[0], sorted(args[1:])
    rank = p * (len(values) - 1) / 100
    low = math.floor(rank)
    fraction = rank - low
    if not fraction:
        return values[low]
    spread = rounded(values[low + 1] - values[low], check=False)
    return rounded(values[low] + rounded(spread * fraction, check=False))


def error_kind(error: ExpressionError) -> str:
    if error.reason == "value out of range":
        return "range"
    if error.reason.startswith("clamp()"):
        return "clamp"
    return error.reason


literals = st.one_of(
    st.decimals(min_value=-10_000, max_value=10_000, places=4),
    st.sampled_from([Decimal(0), Decimal("0.0001"), Decimal("99999999999999999999")]),
).map(Lit)
leaves = st.one_of(literals, st.sampled_from(VARIABLES).map(Var))


def make_tier(value: Node, pairs: list[tuple[Decimal, Node]], default: Node) -> Call:
    thresholds = dict(pairs)
    args: list[Node] = [value]
    for threshold in sorted(thresholds):
        args += [Lit(threshold), thresholds[threshold]]
    return Call("tier", (*args, default))


def extend(children: st.SearchStrategy[Node]) -> st.SearchStrategy[Node]:
    def call(name: str, *args: st.SearchStrategy[Node]) -> st.SearchStrategy[Node]:
        return st.tuples(*args).map(lambda values: Call(name, values))

    return st.one_of(
        st.builds(Bin, st.sampled_from(ARITHMETIC), children, children),
        st.builds(Bin, st.sampled_from((*COMPARISONS, "and", "or")), children, children),
        st.builds(Neg, children),
        st.builds(Not, children),
        st.builds(Cond, children, children, children, st.booleans()),
        st.builds(
            Call,
            st.sampled_from(["min", "max"]),
            st.lists(children, min_size=1, max_size=3).map(tuple),
        ),
        call("clamp", children, children, children),
        st.builds(
            lambda name, x: Call(name, (x,)), st.sampled_from(["ceil", "floor", "round"]), children
        ),
        st.builds(lambda x, n: Call("round", (x, Lit(Decimal(n)))), children, st.integers(0, 6)),
        st.builds(
            lambda p, values: Call("percentile", (Lit(p), *values)),
            st.decimals(min_value=0, max_value=100, places=2),
            st.lists(children, min_size=1, max_size=4),
        ),
        st.builds(
            make_tier,
            children,
            st.lists(
                st.tuples(st.decimals(min_value=-100, max_value=100, places=1), children),
                min_size=1,
                max_size=3,
            ),
            children,
        ),
    )


trees = st.recursive(leaves, extend, max_leaves=20)
environments = st.fixed_dictionaries(
    {
        name: st.one_of(
            st.integers(min_value=-(10**6), max_value=10**6),
            st.decimals(min_value=-(10**6), max_value=10**6, places=3),
        )
        for name in VARIABLES
    }
)


@settings(deadline=None, max_examples=400)
@given(tree=trees, env=environments)
def test_trees_match_the_reference_model(tree: Node, env: dict[str, Decimal | int]) -> None:
    """Well-formed expressions evaluate exactly as an independent fraction-based model."""
    source = render(tree)
    try:
        expression = compile_expression(source, VARIABLES)
    except ExpressionError as error:
        # Only the size limits may reject a well-formed tree.
        assume("nested" not in error.reason and "tokens" not in error.reason)
        raise
    try:
        expected: Fraction | str = reference(tree, env)
    except ModelError as error:
        expected = error.kind
    try:
        actual: Fraction | str = Fraction(expression.evaluate(env))
    except ExpressionError as error:
        actual = error_kind(error)
    assert expected == actual, source
