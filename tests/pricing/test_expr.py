"""Tests for the pricing expression language: syntax, functions, limits and errors."""

from __future__ import annotations

import dataclasses
from decimal import Decimal

import pytest

from ducto.errors import ExpressionError, InvalidArgumentError
from ducto.pricing._expr import (
    FUNCTIONS,
    MAX_DEPTH,
    MAX_LENGTH,
    MAX_MAGNITUDE,
    MAX_TOKENS,
    Expression,
    compile_expression,
)


def ev(source: str, **env: Decimal | int) -> Decimal:
    return compile_expression(source).evaluate(env)


def compile_error(source: str, allowed_names: set[str] | None = None) -> ExpressionError:
    with pytest.raises(ExpressionError) as info:
        compile_expression(source, allowed_names)
    return info.value


def eval_error(source: str, **env: Decimal | int) -> ExpressionError:
    expression = compile_expression(source)
    with pytest.raises(ExpressionError) as info:
        expression.evaluate(env)
    return info.value


# --- arithmetic and precedence --------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("12", "12"),
        ("0.005", "0.005"),
        ("1 + 2", "3"),
        ("1 + 2 * 3", "7"),
        ("(1 + 2) * 3", "9"),
        ("10 - 2 - 3", "5"),
        ("100 / 10 / 5", "2"),
        ("2 * 3 % 4", "2"),
        ("7 // 2 * 2", "6"),
        ("-2 * 3", "-6"),
        ("2 - -3", "5"),
        ("+2 - +3", "-1"),
        ("- - 4", "4"),
        ("-(1 + 2) * 2", "-6"),
        ("1 / 4", "0.25"),
        ("0.1 + 0.2", "0.3"),
        ("1.50 * 2", "3.00"),
    ],
)
def test_arithmetic(source: str, expected: str) -> None:
    """Arithmetic follows Python's precedence and left associativity."""
    assert Decimal(expected) == ev(source)


def test_division_rounds_to_fifty_digits() -> None:
    """Division keeps 50 significant digits, rounding half-even."""
    assert Decimal("0." + "3" * 50) == ev("1 / 3")
    assert Decimal("0." + "6" * 49 + "7") == ev("2 / 3")


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("7 // 2", "3"),
        ("-7 // 2", "-4"),
        ("7 // -2", "-4"),
        ("-7 // -2", "3"),
        ("7 % 3", "1"),
        ("-7 % 3", "2"),
        ("7 % -3", "-2"),
        ("-7 % -3", "-1"),
        ("7.5 // 2", "3"),
        ("7.5 % 2", "1.5"),
        ("-4 % 2", "0"),
    ],
)
def test_floor_division_and_modulo_follow_python(source: str, expected: str) -> None:
    """Floor division and modulo use Python's int semantics, not Decimal's truncation."""
    assert Decimal(expected) == ev(source)


def test_negative_zero_is_normalized() -> None:
    """A zero result never carries a minus sign."""
    result = ev("0 * -1")
    assert Decimal(0) == result
    assert False is result.is_signed()


def test_variables() -> None:
    """Variables are read from the environment as Decimals or ints."""
    expression = compile_expression("input_tokens * 0.005 + output_tokens * 0.015")
    assert Decimal("20.000") == expression.evaluate(
        {"input_tokens": 1000, "output_tokens": Decimal(1000)}
    )
    assert frozenset({"input_tokens", "output_tokens"}) == expression.variables


def test_variables_exclude_function_names() -> None:
    """Function names used as calls are not variables."""
    assert frozenset({"x", "y"}) == compile_expression("max(x, min(y, 1))").variables


def test_bool_variables_count_as_ints() -> None:
    """A bool is an int, so True and False read as 1 and 0."""
    assert Decimal(5) == ev("5 * cached", cached=True)
    assert Decimal(0) == ev("5 * cached", cached=False)


def test_extra_environment_keys_are_ignored() -> None:
    """Keys the expression does not use do not matter."""
    assert Decimal(2) == ev("x + 1", x=1, unused=Decimal("NaN"))


def test_expression_source_and_immutability() -> None:
    """The compiled expression keeps its source and cannot be changed."""
    expression = compile_expression("x + 1")
    assert "x + 1" == expression.source
    assert isinstance(expression, Expression)
    with pytest.raises(dataclasses.FrozenInstanceError):
        expression.source = "2"  # type: ignore[misc]


def test_expression_is_reusable() -> None:
    """One compiled expression evaluates many environments."""
    expression = compile_expression("x * 2")
    assert [Decimal(0), Decimal(2), Decimal(4)] == [expression.evaluate({"x": i}) for i in range(3)]


def test_functions_constant() -> None:
    """FUNCTIONS names every built-in function."""
    expected = {"ceil", "clamp", "floor", "if", "max", "min", "percentile", "round", "tier"}
    assert expected == FUNCTIONS


def test_whitespace_is_insignificant() -> None:
    """Spaces, tabs and newlines may separate tokens anywhere."""
    assert Decimal(7) == ev(" 1\t+\n2 *\r\n3 ")
    assert Decimal(3) == ev("max (1, 3)")


# --- comparisons and booleans ---------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("1 < 2", 1),
        ("2 < 1", 0),
        ("2 <= 2", 1),
        ("3 > 2", 1),
        ("2 >= 3", 0),
        ("2 == 2.00", 1),
        ("2 != 2", 0),
        ("1 < 2 < 3", 1),
        ("1 < 3 < 2", 0),
        ("3 > 2 > 2", 0),
        ("1 < 3 > 2", 1),
        ("1 + 1 == 2", 1),
        ("2 and 3", 1),
        ("2 and 0", 0),
        ("0 or 5", 1),
        ("0 or 0", 0),
        ("not 0", 1),
        ("not 7", 0),
        ("not not 7", 1),
        ("not 1 == 2", 1),
        ("1 or 0 and 0", 1),
        ("(1 or 0) and 0", 0),
        ("not 0 and 0", 0),
        ("0.5 and -1", 1),
    ],
)
def test_comparisons_and_booleans(source: str, expected: int) -> None:
    """Comparisons chain like Python's and booleans produce 1 or 0."""
    assert Decimal(expected) == ev(source)


def test_and_or_return_one_or_zero_not_operands() -> None:
    """And/or return 1 or 0 rather than an operand's value."""
    assert Decimal(1) == ev("0 or 42")
    assert Decimal(1) == ev("7 and 42")


def test_and_or_short_circuit() -> None:
    """The right side of and/or is not evaluated when the left decides."""
    assert Decimal(0) == ev("0 and 1 / 0")
    assert Decimal(1) == ev("1 or 1 / 0")
    assert Decimal(1) == ev("1 or missing")


# --- conditionals ---------------------------------------------------------------------


def test_conditional_expression() -> None:
    """``a if c else b`` picks by truthiness and binds loosest."""
    assert Decimal(10) == ev("10 if x else 20", x=1)
    assert Decimal(20) == ev("10 if x else 20", x=0)
    assert Decimal(3) == ev("1 + 2 if 0 else 3")
    assert Decimal(3) == ev("1 if 0 else 2 if 0 else 3")
    assert Decimal(2) == ev("1 if 0 else 2 if 1 else 3")
    assert Decimal(5) == ev("(1 if 1 else 2) + 4")


def test_conditional_expression_is_lazy() -> None:
    """Only the branch taken is evaluated."""
    assert Decimal(0) == ev("10 / x if x != 0 else 0", x=0)
    assert Decimal(5) == ev("10 / x if x != 0 else 0", x=2)
    assert Decimal(1) == ev("1 if 1 else unset_variable")


def test_if_function() -> None:
    """``if(c, a, b)`` returns a when c is non-zero, else b."""
    assert Decimal(2) == ev("if(1, 2, 3)")
    assert Decimal(3) == ev("if(0, 2, 3)")
    assert Decimal(2) == ev("if(-0.001, 2, 3)")


def test_if_function_is_lazy() -> None:
    """``if()`` evaluates only the branch taken."""
    assert Decimal(0) == ev("if(x > 0, 10 / x, 0)", x=0)
    assert Decimal(5) == ev("if(x > 0, 10 / x, 0)", x=2)
    assert Decimal(0) == ev("if(0, unset_variable, 0)")


# --- functions ------------------------------------------------------------------------


def test_min_and_max() -> None:
    """min and max take one or more arguments."""
    assert Decimal(1) == ev("min(3, 1, 2)")
    assert Decimal(3) == ev("max(3, 1, 2)")
    assert Decimal(-5) == ev("min(-5)")
    assert Decimal(4) == ev("max(x, 4)", x=-1)


def test_tier() -> None:
    """tier returns the rate of the first threshold the value does not exceed."""
    source = "tier(v, 1000, 0.01, 10000, 0.008, 0.005)"
    assert Decimal("0.01") == ev(source, v=0)
    assert Decimal("0.01") == ev(source, v=1000)
    assert Decimal("0.008") == ev(source, v=1001)
    assert Decimal("0.008") == ev(source, v=10000)
    assert Decimal("0.005") == ev(source, v=10001)
    assert Decimal(7) == ev("tier(5, 10, 7, 0)")


def test_tier_evaluates_only_the_chosen_rate() -> None:
    """Rates other than the chosen one are not evaluated."""
    assert Decimal(2) == ev("tier(15, 10, 1 / 0, 20, 2, unset_variable)")


def test_tier_with_variable_thresholds() -> None:
    """Thresholds may be expressions; they are tried in argument order."""
    assert Decimal(1) == ev("tier(3, limit, 1, 2)", limit=5)
    assert Decimal(2) == ev("tier(6, limit, 1, 2)", limit=5)


def test_clamp() -> None:
    """clamp limits a value to a closed interval."""
    assert Decimal(3) == ev("clamp(5, 1, 3)")
    assert Decimal(1) == ev("clamp(-5, 1, 3)")
    assert Decimal(2) == ev("clamp(2, 1, 3)")
    assert Decimal(2) == ev("clamp(9, 2, 2)")


def test_clamp_with_lower_above_upper_fails() -> None:
    """clamp with lo > hi fails at evaluation, at the call's position."""
    error = eval_error("1 + clamp(x, 3, 1)", x=2)
    assert 4 == error.position
    assert error.reason.startswith("clamp()")


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("ceil(1.2)", "2"),
        ("ceil(-1.2)", "-1"),
        ("ceil(3)", "3"),
        ("floor(1.8)", "1"),
        ("floor(-1.2)", "-2"),
        ("floor(3)", "3"),
        ("round(2.5)", "3"),
        ("round(-2.5)", "-3"),
        ("round(2.4999)", "2"),
        ("round(3.5)", "4"),
        ("round(1.23456, 2)", "1.23"),
        ("round(0.125, 2)", "0.13"),
        ("round(-0.125, 2)", "-0.13"),
        ("round(1.005, 2)", "1.01"),
        ("round(7, 3)", "7.000"),
        ("round(2.5, 0)", "3"),
        ("round(0.1234567890123456789, 18)", "0.123456789012345679"),
    ],
)
def test_rounding_functions(source: str, expected: str) -> None:
    """ceil, floor and round (half-up) give exact decimal results."""
    result = ev(source)
    assert Decimal(expected) == result
    assert Decimal(expected).as_tuple().exponent == result.as_tuple().exponent


def test_round_digits_from_a_variable() -> None:
    """round's digit count may come from a variable but must be whole and within 0..18."""
    assert Decimal("1.2") == ev("round(1.234, n)", n=1)
    assert 0 == eval_error("round(1.234, n)", n=19).position
    assert 0 == eval_error("round(1.234, n)", n=Decimal("1.5")).position
    assert 0 == eval_error("round(1.234, n)", n=-1).position


@pytest.mark.parametrize("digits", ["19", "-1", "1.5"])
def test_round_literal_digits_are_checked_when_compiling(digits: str) -> None:
    """A literal digit count outside 0..18 is a compile-time error."""
    assert 11 == compile_error(f"round(1.5, {digits})").position


def test_round_largest_value() -> None:
    """Rounding the largest values to 18 places stays exact."""
    big = "9" * 30
    assert Decimal(big) == ev(f"round({big}, 18)")
    assert Decimal(10**30) == ev("round(x)", x=Decimal("999999999999999999999999999999.5"))


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        # rank = p / 100 * (n - 1), then interpolate between the neighbouring sorted values.
        ("percentile(50, 1, 2, 3, 4)", "2.5"),  # rank 1.5: 2 + 0.5 * (3 - 2)
        ("percentile(25, 1, 2, 3, 4)", "1.75"),  # rank 0.75: 1 + 0.75 * (2 - 1)
        ("percentile(90, 10, 20, 30)", "28"),  # rank 1.8: 20 + 0.8 * (30 - 20)
        ("percentile(90, 30, 10, 20)", "28"),  # order does not matter
        ("percentile(0, 5, 1, 3)", "1"),
        ("percentile(100, 5, 1, 3)", "5"),
        ("percentile(50, 1, 2, 3)", "2"),  # rank 1 exactly
        ("percentile(33, 7)", "7"),
        ("percentile(10, -10, 0, 10, 100)", "-7"),  # rank 0.3: -10 + 0.3 * 10
        ("percentile(99.9, 0, 1000)", "999"),
    ],
)
def test_percentile(source: str, expected: str) -> None:
    """percentile interpolates linearly between the closest ranks, like numpy."""
    assert Decimal(expected) == ev(source)


def test_percentile_out_of_range() -> None:
    """percentile's p must lie between 0 and 100."""
    assert 11 == compile_error("percentile(101, 1, 2)").position
    assert 11 == compile_error("percentile(-1, 1, 2)").position
    assert 4 == eval_error("1 + percentile(p, 1, 2)", p=Decimal("100.01")).position
    assert 4 == eval_error("1 + percentile(p, 1, 2)", p=-1).position


# --- compile-time errors --------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "position"),
    [
        ("", 0),
        ("   ", 0),
        ("2 ** 3", 2),
        ("2 ^ 3", 2),
        ("9**9**9", 1),
        ("(1 + 2", 0),
        ("((1)", 0),
        ("1 + 2)", 5),
        ("min(1, 2", 3),
        ("min(1 2)", 6),
        ("min(1,)", 6),
        ("1 2", 2),
        ("x y", 2),
        ("1 +", 3),
        ("* 2", 0),
        ("1 + * 2", 4),
        ("()", 1),
        ("1 if 2", 6),
        ("1 if 2 3", 7),
        ("a = 1", 2),
        ("a & b", 2),
        ("a || b", 2),
        ("1 + $", 4),
        ("1e999", 0),
        ("1E5", 0),
        ("2 * 1e-3", 4),
        (".5", 0),
        ("5.", 0),
        ("1.2.3", 0),
        ("1_000", 0),
        ("12abc", 0),
        ("x.y", 1),
        ("1 + not 0", 4),
        ("and", 0),
        ("else", 0),
        ("if", 0),
        ("if 1", 0),
        ("1 + min", 4),
        ("if + 1", 0),
        ("foo(1)", 0),
        ("2 * foo()", 4),
        ("x(1)", 0),
        ("\u0661", 0),
    ],
)
def test_syntax_errors(source: str, position: int) -> None:
    """Malformed input is rejected at compile time with the offending offset."""
    error = compile_error(source)
    assert position == error.position
    assert source == error.expression


def test_errors_are_value_errors() -> None:
    """ExpressionError is an InvalidArgumentError and a ValueError."""
    error = compile_error("1 +")
    assert isinstance(error, InvalidArgumentError)
    assert isinstance(error, ValueError)


def test_error_messages() -> None:
    """Error messages name the problem."""
    assert "'**' is not supported: there is no power operator" == compile_error("2**3").reason
    assert "unknown function 'foo'" == compile_error("foo(1)").reason
    assert "'(' was never closed" == compile_error("(1").reason
    assert "unexpected ')'" == compile_error("1)").reason
    assert "expression is empty" == compile_error(" ").reason
    assert "scientific notation" in compile_error("1e999").reason


@pytest.mark.parametrize(
    ("source", "position"),
    [
        ("min()", 0),
        ("max()", 0),
        ("1 + if(1, 2)", 4),
        ("if(1, 2, 3, 4)", 0),
        ("2 * clamp(1, 2)", 4),
        ("ceil()", 0),
        ("floor(1, 2)", 0),
        ("round()", 0),
        ("round(1, 2, 3)", 0),
        ("percentile(50)", 0),
        ("tier(1, 2)", 0),
        ("tier(1, 2, 3)", 0),
        ("tier(1, 2, 3, 4, 5)", 0),
    ],
)
def test_wrong_arity(source: str, position: int) -> None:
    """A call with the wrong number of arguments fails at compile time."""
    assert position == compile_error(source).position


def test_tier_literal_thresholds_must_increase() -> None:
    """Literal tier thresholds must be strictly increasing."""
    assert 14 == compile_error("tier(1, 5, 1, 5, 2, 0)").position
    assert 15 == compile_error("tier(1, 10, 1, -5, 2, 0)").position
    assert Decimal(2) == ev("tier(7, -5, 1, 10, 2, 0)")


def test_unknown_variable_with_allowed_names() -> None:
    """With allowed_names, other identifiers fail at their first occurrence."""
    error = compile_error("a + bb * bb", {"a"})
    assert 4 == error.position
    assert "unknown variable 'bb'" == error.reason
    assert frozenset({"a"}) == compile_expression("max(a, 1)", ["a", "b"]).variables


@pytest.mark.parametrize("name", ["True", "False", "None", "NaN", "nan", "Infinity", "inf"])
def test_special_words_are_plain_identifiers(name: str) -> None:
    """Words like NaN or Infinity are variables, never literals."""
    assert 4 == compile_error(f"1 + {name}", {"x"}).position
    assert frozenset({name}) == compile_expression(f"1 + {name}").variables
    assert 4 == eval_error(f"1 + {name}").position
    assert Decimal(3) == ev(f"1 + {name}", **{name: 2})


def test_function_name_without_call_is_an_error() -> None:
    """A function name must be called."""
    error = compile_error("min + 1")
    assert 0 == error.position
    assert "must be called" in error.reason


def test_function_names_are_case_sensitive() -> None:
    """``MIN`` is not ``min``."""
    assert 0 == compile_error("MIN(1, 2)").position


def test_source_must_be_a_string() -> None:
    """A non-str source is an ExpressionError."""
    with pytest.raises(ExpressionError):
        compile_expression(b"1 + 2")  # type: ignore[arg-type]
    with pytest.raises(ExpressionError):
        compile_expression(None)  # type: ignore[arg-type]


# --- limits ---------------------------------------------------------------------------


def test_number_literal_digit_limit() -> None:
    """Number literals have at most 30 digits, leading integer zeros not counted."""
    assert Decimal("9" * 30) == ev("9" * 30)
    assert Decimal("0." + "0" * 29 + "1") == ev("0." + "0" * 29 + "1")
    assert Decimal(5) == ev("0" * 40 + "5")
    assert 4 == compile_error("1 + " + "9" * 31).position
    assert 0 == compile_error("0." + "0" * 30 + "1").position
    assert 0 == compile_error("1" * 400).position


def test_source_length_limit() -> None:
    """Sources longer than MAX_LENGTH are rejected before any parsing."""
    longest = "1" + " " * (MAX_LENGTH - 1)
    assert Decimal(1) == ev(longest)
    assert MAX_LENGTH == compile_error(longest + " ").position


def test_deep_parentheses() -> None:
    """Nesting beyond MAX_DEPTH fails with an ExpressionError, never a RecursionError."""
    ok = MAX_DEPTH - 1
    assert Decimal(1) == ev("(" * ok + "1" + ")" * ok)
    assert MAX_DEPTH == compile_error("(" * MAX_DEPTH + "1" + ")" * MAX_DEPTH).position
    assert "nested" in compile_error("(" * 200 + "1" + ")" * 200).reason
    assert "nested" in compile_error("(" * 499).reason
    assert MAX_LENGTH == compile_error("(" * 10_000 + "1" + ")" * 10_000).position


def test_deep_calls() -> None:
    """Nested function calls count towards MAX_DEPTH."""
    error = compile_error("min(" * 60 + "1" + ")" * 60)
    assert "nested" in error.reason
    assert 4 * MAX_DEPTH == error.position
    assert Decimal(1) == ev("min(" * 40 + "1" + ")" * 40)


def test_long_unary_chains() -> None:
    """Unary chains count towards MAX_DEPTH and huge ones hit the length limit."""
    assert Decimal(-1) == ev("-" * (MAX_DEPTH - 2) + "-1")
    assert MAX_DEPTH - 1 == compile_error("-" * MAX_DEPTH + "1").position
    assert MAX_LENGTH == compile_error("-" * 100_000 + "1").position
    assert "nested" in compile_error("not " * 100 + "1").reason


def test_deep_conditionals() -> None:
    """Right-nested conditionals count towards MAX_DEPTH."""
    assert "nested" in compile_error("1 if 0 else " * 60 + "2").reason
    assert Decimal(2) == ev("1 if 0 else " * 40 + "2")


def test_long_sums() -> None:
    """Long flat sums are fine up to MAX_TOKENS and are rejected beyond it."""
    terms = (MAX_TOKENS + 1) // 2
    assert Decimal(terms) == ev(" + ".join(["1"] * terms))
    error = compile_error("+".join(["1"] * (terms + 1)))
    assert MAX_TOKENS == error.position
    assert "tokens" in error.reason


def test_long_sum_of_variables_evaluates_without_recursion() -> None:
    """A long flat chain evaluates iteratively."""
    source = " - ".join(["x"] * 200)
    assert Decimal(-198) == ev(source, x=1)


# --- evaluation errors ----------------------------------------------------------------


def test_division_by_zero() -> None:
    """Division and modulo by zero fail at the operator's position."""
    assert 1 == eval_error("1/0").position
    assert "division by zero" == eval_error("1/0").reason
    assert 2 == eval_error("x % 0", x=1).position
    assert "modulo by zero" == eval_error("x % 0", x=1).reason
    assert 6 == eval_error("1 + 2 // (x - x)", x=5).position
    assert 2 == eval_error("0 / 0").position


def test_missing_variable() -> None:
    """An unset variable fails at evaluation with its position."""
    error = eval_error("1 + rate")
    assert 4 == error.position
    assert "variable 'rate' is not set" == error.reason


@pytest.mark.parametrize(
    "value",
    [
        Decimal("NaN"),
        Decimal("sNaN"),
        Decimal("Infinity"),
        Decimal("-Infinity"),
        Decimal("1E+31"),
        10**30 + 1,
        -(10**400),
        1.5,
        "3",
        None,
    ],
)
def test_invalid_variable_values(value: object) -> None:
    """Non-finite, out-of-range or non-numeric variable values are rejected."""
    expression = compile_expression("2 * x")
    with pytest.raises(ExpressionError) as info:
        expression.evaluate({"x": value})  # type: ignore[dict-item]
    assert 4 == info.value.position


def test_variable_at_magnitude_limit() -> None:
    """Values of exactly MAX_MAGNITUDE are allowed."""
    assert MAX_MAGNITUDE == ev("x", x=10**30)
    assert -MAX_MAGNITUDE == ev("x", x=Decimal("-1E+30"))


def test_intermediate_results_are_range_checked() -> None:
    """Any intermediate result beyond MAX_MAGNITUDE fails at its operator."""
    big = "9" * 30
    assert Decimal(10**30) == ev(f"{big} + 1")
    assert 31 == eval_error(f"{big} + 2").position
    assert "value out of range" == eval_error(f"{big} + 2").reason
    assert 31 == eval_error(f"{big} * {big} * 0").position
    assert 2 == eval_error("x * x / x", x=10**16).position
    assert MAX_MAGNITUDE == ev("1 / 0.000000000000000000000000000001")
    assert 2 == eval_error("2 / 0.000000000000000000000000000001").position
    assert 2 == eval_error("2 // 0.000000000000000000000000000001").position
    assert 31 == eval_error(f"{big} - -{big}").position


def test_tiny_values_round_instead_of_failing() -> None:
    """Very small values keep working."""
    tiny = "0." + "0" * 29 + "1"
    result = ev(" * ".join([tiny] * 20))
    assert result.is_finite()
    assert Decimal(0) <= result


def test_huge_decimal_variable_exponents() -> None:
    """Extreme exponents in variables give finite results or ExpressionErrors."""
    assert Decimal(1) == ev("x + 1", x=Decimal("1E-999999"))
    assert Decimal(0) == ev("x * 2", x=Decimal("0E+999999"))
    assert 2 == eval_error("1 / x", x=Decimal("1E-999999")).position


def test_evaluation_never_uses_the_global_context() -> None:
    """Results do not depend on the caller's decimal context."""
    import decimal

    with decimal.localcontext() as ctx:
        ctx.prec = 3
        ctx.traps[decimal.Inexact] = True
        assert Decimal("0." + "3" * 50) == ev("1 / 3")
        assert Decimal("1.23456789") == ev("x + 0", x=Decimal("1.23456789"))
