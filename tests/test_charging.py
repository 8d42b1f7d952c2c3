"""The charging core's usage check: the fast path accepts exactly what validation accepts."""

from __future__ import annotations

from typing import Any

import pytest

from ducto import InvalidArgumentError, UsageMetrics
from ducto._charging import checked_usage
from ducto.pricing import ToolCall
from ducto.pricing.metrics import MAX_COUNT

VALID: list[dict[str, Any]] = [
    {},
    {"model": "gpt-4o", "input_tokens": 12, "output_tokens": 3},
    {"model": "", "cache_read_tokens": MAX_COUNT, "cache_write_tokens": 0},
    {"tool_calls": [ToolCall(name="search"), ToolCall(name="code")], "search_queries": 2},
    {"fixed_job": "report", "web_search_calls": 1, "code_exec_calls": 4, "search_results": 9},
    {"tool_calls": [{"name": "search"}]},  # a dict where a ToolCall belongs: validation's work
]


class _Str(str):
    pass


INVALID: list[dict[str, Any]] = [
    {"input_tokens": -1},
    {"output_tokens": True},
    {"cache_read_tokens": 2.0},
    {"web_search_calls": MAX_COUNT + 1},
    {"search_queries": "3"},
    {"model": 4},
    {"fixed_job": ""},
    {"tool_calls": [ToolCall.model_construct(name="")]},
    {"tool_calls": [ToolCall.model_construct(name=7)]},
    {"tool_calls": ("search",)},
]


@pytest.mark.parametrize("fields", VALID)
def test_valid_usage_comes_back_as_an_equal_independent_copy(fields: dict[str, Any]) -> None:
    """The result equals full validation's, shares nothing mutable and leaves the input alone."""
    record = UsageMetrics.model_construct(**fields)
    validated = UsageMetrics.model_validate(dict(record.__dict__))

    checked = checked_usage("usage", record)
    record.input_tokens = 99
    record.tool_calls.append(ToolCall(name="late"))

    assert validated == checked
    assert checked is not record
    assert type(checked) is UsageMetrics
    assert "late" not in [call.name for call in checked.tool_calls]


@pytest.mark.parametrize("fields", INVALID, ids=repr)
def test_usage_validation_would_refuse_is_refused(fields: dict[str, Any]) -> None:
    """A record built without validation, with a value validation refuses, raises."""
    record = UsageMetrics.model_construct(**fields)

    with pytest.raises(InvalidArgumentError, match=r"^usage is not valid usage"):
        checked_usage("usage", record)


def test_missing_and_extra_fields_are_refused() -> None:
    """A record whose fields were removed or added after construction is validated in full."""
    missing = UsageMetrics(input_tokens=1)
    del missing.__dict__["output_tokens"]
    extra = UsageMetrics(input_tokens=1)
    extra.__dict__["input_tokenz"] = 5

    assert 0 == checked_usage("usage", missing).output_tokens
    with pytest.raises(InvalidArgumentError, match="input_tokenz"):
        checked_usage("usage", extra)


def test_a_str_subclass_model_and_a_subclass_record_are_validated() -> None:
    """Anything but the exact types takes the validating path and comes back as UsageMetrics."""

    class Tagged(UsageMetrics):
        pass

    record = Tagged(model="m", input_tokens=2)
    named = UsageMetrics.model_construct(model=_Str("m"), input_tokens=2)

    assert (UsageMetrics, "m", 2) == (
        type(checked_usage("usage", record)),
        checked_usage("usage", record).model,
        checked_usage("usage", record).input_tokens,
    )
    assert "m" == checked_usage("usage", named).model
