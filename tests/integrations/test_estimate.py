"""Hold estimates from request bodies."""

from __future__ import annotations

from typing import Any

import pytest

from ducto import InvalidArgumentError, UsageMetrics
from ducto.integrations import Api, RequestEstimator


def _words(text: str) -> int:
    return len(text.split())


ESTIMATOR = RequestEstimator(counter=_words, message_overhead=2, image_tokens=100)


def test_chat_request_counts_messages_tools_and_max_tokens() -> None:
    """Message text, tool schemas and per-message overhead, plus max_completion_tokens."""
    body = {
        "model": "gpt-4o",
        "messages": [
            {"role": "system", "content": "be brief"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what is this"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                ],
            },
        ],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        "max_completion_tokens": 50,
    }

    estimate = ESTIMATOR.estimate(Api.OPENAI_CHAT, body)

    tool_json = '{"type":"function","function":{"name":"f","parameters":{}}}'
    assert (
        UsageMetrics(
            model="gpt-4o",
            input_tokens=2 + 3 + 100 + 2 * 3 + _words(tool_json),
            output_tokens=50,
        )
        == estimate
    )


def test_output_ceiling_falls_back_to_the_default_and_multiplies_by_n() -> None:
    """No limit in the request: the configured ceiling, once per choice."""
    estimator = RequestEstimator(default_max_output_tokens=300)

    assert 900 == estimator.output_tokens("openai.chat", {"n": 3})
    assert 0 == estimator.output_tokens("openai.embeddings", {"input": "x"})
    assert 7 == estimator.output_tokens("openai.responses", {"max_output_tokens": 7})


def test_anthropic_request_counts_system_and_web_search_uses() -> None:
    """The system prompt counts as prompt; a web search tool holds its max_uses."""
    body = {
        "model": "claude-sonnet-4",
        "max_tokens": 10,
        "system": [
            {"type": "text", "text": "you are terse", "cache_control": {"type": "ephemeral"}}
        ],
        "messages": [{"role": "user", "content": "hi there"}],
        "tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 3}],
    }

    estimate = ESTIMATOR.estimate(Api.ANTHROPIC_MESSAGES, body)

    assert 3 == estimate.web_search_calls
    assert 10 == estimate.output_tokens
    # system 3, messages 2 + overhead 2 x 2, the tool's name and max_uses 1 each
    assert 3 + 2 + 4 + 1 + 1 == estimate.input_tokens


def test_responses_input_items_and_instructions() -> None:
    """Responses input items and instructions are prompt; a web_search tool holds one call."""
    body = {
        "model": "gpt-4.1",
        "instructions": "answer in French",
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "a b c"}]}],
        "tools": [{"type": "web_search"}],
    }

    estimate = ESTIMATOR.estimate("openai.responses", body)

    assert 3 + 3 + 2 == estimate.input_tokens
    assert 1 == estimate.web_search_calls


def test_the_default_counter_needs_nothing_and_errs_high() -> None:
    """The heuristic default estimates a short English prompt at a few tokens."""
    estimate = RequestEstimator().estimate(
        "openai.chat", {"model": "m", "messages": [{"role": "user", "content": "Hello, world!"}]}
    )

    assert 4 + 4 * 2 == estimate.input_tokens  # 13 characters, plus the overheads
    assert 4096 == estimate.output_tokens


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"max_output_tokens": "9"}, "max_output_tokens"),
        ({"n": -1}, "n"),
        ({"model": 3}, "model"),
    ],
)
def test_bad_requests_are_refused(body: dict[str, Any], field: str) -> None:
    """Wrongly typed limits and models raise InvalidArgumentError naming the field."""
    with pytest.raises(InvalidArgumentError, match=field):
        ESTIMATOR.estimate("openai.chat", body)


def test_bad_configuration_is_refused() -> None:
    """The estimator checks its own arguments."""
    with pytest.raises(InvalidArgumentError, match="default_max_output_tokens"):
        RequestEstimator(default_max_output_tokens=0)
    with pytest.raises(InvalidArgumentError, match="counter"):
        RequestEstimator(counter="tiktoken")  # type: ignore[arg-type]
