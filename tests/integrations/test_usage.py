"""Usage adapters on the providers' documented payload shapes, streamed and not."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest

from ducto import InvalidArgumentError, PricingEngine, UsageMetrics
from ducto.integrations import (
    Api,
    StreamUsage,
    heuristic_token_count,
    usage_from_anthropic,
    usage_from_openai,
    usage_from_response,
)

# -- OpenAI shapes (the API reference's examples, with the prompt-caching guide's figures) ----

CHAT_COMPLETION = {
    "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
    "object": "chat.completion",
    "created": 1741570283,
    "model": "gpt-4o-2024-08-06",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "The image shows a wooden boardwalk.",
                "refusal": None,
                "annotations": [],
            },
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {
        "prompt_tokens": 2006,
        "completion_tokens": 300,
        "total_tokens": 2306,
        "prompt_tokens_details": {"cached_tokens": 1920, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    },
    "service_tier": "default",
    "system_fingerprint": "fp_fc9f1d7035",
}

REASONING_COMPLETION = {
    "id": "chatcmpl-AZc7fmRRhtLzmHYSLPCkcvxCiELwG",
    "object": "chat.completion",
    "model": "o1-2024-12-17",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "42"}, "finish_reason": "stop"}
    ],
    "usage": {
        "prompt_tokens": 75,
        "completion_tokens": 1186,
        "total_tokens": 1261,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 1024,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    },
}

CHAT_STREAM = [
    {
        "id": "chatcmpl-123",
        "object": "chat.completion.chunk",
        "created": 1694268190,
        "model": "gpt-4o-mini",
        "system_fingerprint": "fp_44709d6fcb",
        "choices": [
            {
                "index": 0,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
        ],
        "usage": None,
    },
    {
        "id": "chatcmpl-123",
        "object": "chat.completion.chunk",
        "created": 1694268190,
        "model": "gpt-4o-mini",
        "system_fingerprint": "fp_44709d6fcb",
        "choices": [
            {"index": 0, "delta": {"content": "Hello"}, "logprobs": None, "finish_reason": None}
        ],
        "usage": None,
    },
    {
        "id": "chatcmpl-123",
        "object": "chat.completion.chunk",
        "created": 1694268190,
        "model": "gpt-4o-mini",
        "system_fingerprint": "fp_44709d6fcb",
        "choices": [
            {"index": 0, "delta": {"content": " there"}, "logprobs": None, "finish_reason": None}
        ],
        "usage": None,
    },
    {
        "id": "chatcmpl-123",
        "object": "chat.completion.chunk",
        "created": 1694268190,
        "model": "gpt-4o-mini",
        "system_fingerprint": "fp_44709d6fcb",
        "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}],
        "usage": None,
    },
    # The final chunk when the request sets stream_options: {"include_usage": true}.
    {
        "id": "chatcmpl-123",
        "object": "chat.completion.chunk",
        "created": 1694268190,
        "model": "gpt-4o-mini",
        "system_fingerprint": "fp_44709d6fcb",
        "choices": [],
        "usage": {
            "prompt_tokens": 9,
            "completion_tokens": 12,
            "total_tokens": 21,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        },
    },
]

RESPONSE = {
    "id": "resp_67ccd3a9da748190baa7f1570fe91ac604becb25c45c1d41",
    "object": "response",
    "created_at": 1741476777,
    "status": "completed",
    "model": "gpt-4o-2024-08-06",
    "output": [
        {
            "type": "web_search_call",
            "id": "ws_67c9fa0502748190b7dd390736892e100be649c1a5ff9609",
            "status": "completed",
        },
        {
            "type": "message",
            "id": "msg_67ccd3acc8d48190a77525dc6de64b4104becb25c45c1d41",
            "status": "completed",
            "role": "assistant",
            "content": [
                {
                    "type": "output_text",
                    "text": "The image depicts a scenic landscape.",
                    "annotations": [],
                }
            ],
        },
    ],
    "usage": {
        "input_tokens": 328,
        "input_tokens_details": {"cached_tokens": 128},
        "output_tokens": 52,
        "output_tokens_details": {"reasoning_tokens": 20},
        "total_tokens": 380,
    },
}

RESPONSES_STREAM = [
    {
        "type": "response.created",
        "sequence_number": 0,
        "response": {
            "id": "resp_67c9fdcecf488190bdd9a0409de3a1ec07b8b0ad4e5eb654",
            "object": "response",
            "status": "in_progress",
            "model": "gpt-4.1-2025-04-14",
            "output": [],
            "usage": None,
        },
    },
    {
        "type": "response.output_item.added",
        "output_index": 0,
        "sequence_number": 1,
        "item": {
            "id": "msg_67c9fdcf37fc8190ba82116e33fb28c507b8b0ad4e5eb654",
            "status": "in_progress",
            "type": "message",
            "role": "assistant",
            "content": [],
        },
    },
    {
        "type": "response.output_text.delta",
        "item_id": "msg_67c9",
        "output_index": 0,
        "content_index": 0,
        "delta": "Hi",
        "sequence_number": 2,
    },
    {
        "type": "response.output_text.delta",
        "item_id": "msg_67c9",
        "output_index": 0,
        "content_index": 0,
        "delta": " there!",
        "sequence_number": 3,
    },
    {
        "type": "response.completed",
        "sequence_number": 4,
        "response": {
            "id": "resp_67c9fdcecf488190bdd9a0409de3a1ec07b8b0ad4e5eb654",
            "object": "response",
            "status": "completed",
            "model": "gpt-4.1-2025-04-14",
            "output": [
                {
                    "type": "message",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": "Hi there!"}],
                }
            ],
            "usage": {
                "input_tokens": 37,
                "output_tokens": 11,
                "total_tokens": 48,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens_details": {"reasoning_tokens": 0},
            },
        },
    },
]

# -- Anthropic shapes (the Messages API reference, prompt caching and web search guides) ------

MESSAGE = {
    "id": "msg_013Zva2CMHLNnXjNJJKqJ2EF",
    "type": "message",
    "role": "assistant",
    "model": "claude-sonnet-4-20250514",
    "content": [{"type": "text", "text": "Hi! My name is Claude."}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {
        "input_tokens": 21,
        "cache_creation_input_tokens": 188086,
        "cache_read_input_tokens": 0,
        "output_tokens": 393,
        "server_tool_use": {"web_search_requests": 0},
        "service_tier": "standard",
    },
}

MESSAGE_STREAM = [
    {
        "type": "message_start",
        "message": {
            "id": "msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY",
            "type": "message",
            "role": "assistant",
            "content": [],
            "model": "claude-sonnet-4-20250514",
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 25, "output_tokens": 1},
        },
    },
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "ping"},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hello"}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "!"}},
    {"type": "content_block_stop", "index": 0},
    {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        "usage": {"output_tokens": 15},
    },
    {"type": "message_stop"},
]

WEB_SEARCH_STREAM = [
    {
        "type": "message_start",
        "message": {
            "id": "msg_01G...",
            "type": "message",
            "role": "assistant",
            "model": "claude-opus-4-1-20250805",
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {
                "input_tokens": 2679,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
                "output_tokens": 3,
            },
        },
    },
    {
        "type": "content_block_start",
        "index": 0,
        "content_block": {
            "type": "server_tool_use",
            "id": "srvtoolu_014hJH82Qum7Td6UV8gDXThB",
            "name": "web_search",
            "input": {},
        },
    },
    {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "input_json_delta", "partial_json": '{"query": "weather NYC today"}'},
    },
    {"type": "content_block_stop", "index": 0},
    {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        "usage": {
            "input_tokens": 10682,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": 510,
            "server_tool_use": {"web_search_requests": 1},
        },
    },
    {"type": "message_stop"},
]


def _objects(payload: Any) -> Any:
    """The payload as nested attribute objects, as the provider SDKs return it."""
    return json.loads(json.dumps(payload), object_hook=lambda d: SimpleNamespace(**d))


def _usage(model: str | None, **counts: int) -> UsageMetrics:
    return UsageMetrics(model=model, **counts)


# -- OpenAI ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [dict, _objects], ids=["dict", "sdk-object"])
def test_chat_completion_moves_cached_tokens_out_of_input(shape: Any) -> None:
    """2006 prompt tokens with 1920 cached bill 86 at the full rate and 1920 as cache reads."""
    usage = usage_from_openai(shape(CHAT_COMPLETION))

    assert (
        _usage("gpt-4o-2024-08-06", input_tokens=86, output_tokens=300, cache_read_tokens=1920)
        == usage
    )


def test_reasoning_tokens_stay_in_the_output_count() -> None:
    """Reasoning tokens are already part of completion_tokens and are not added twice."""
    usage = usage_from_openai(REASONING_COMPLETION)

    assert _usage("o1-2024-12-17", input_tokens=75, output_tokens=1186) == usage


def test_openai_sdk_types_are_read_by_attribute() -> None:
    """The openai package's own ChatCompletion and ResponseUsage types convert like dicts."""
    chat_types = pytest.importorskip("openai.types.chat")
    response_types = pytest.importorskip("openai.types.responses")
    completion = chat_types.ChatCompletion.model_validate(CHAT_COMPLETION)
    usage = response_types.ResponseUsage.model_validate(
        {
            **RESPONSE["usage"],
            "input_tokens_details": {"cached_tokens": 128, "cache_write_tokens": 0},
        }
    )
    response = SimpleNamespace(**{**RESPONSE, "usage": usage})

    assert usage_from_openai(CHAT_COMPLETION) == usage_from_openai(completion)
    assert usage_from_openai(RESPONSE) == usage_from_openai(response)


def test_openai_cache_writes_are_moved_out_of_input() -> None:
    """Prompt tokens written to the cache are billed as cache writes, not as input."""
    usage = usage_from_openai(
        {
            "prompt_tokens": 1000,
            "completion_tokens": 10,
            "prompt_tokens_details": {"cached_tokens": 200, "cache_write_tokens": 700},
        },
        model="gpt-5",
    )

    assert (
        _usage(
            "gpt-5",
            input_tokens=100,
            output_tokens=10,
            cache_read_tokens=200,
            cache_write_tokens=700,
        )
        == usage
    )


def test_responses_api_usage_and_web_search_calls() -> None:
    """The Responses API's input and output counts, its cache reads, and one web search."""
    usage = usage_from_openai(RESPONSE)

    assert (
        _usage(
            "gpt-4o-2024-08-06",
            input_tokens=200,
            output_tokens=52,
            cache_read_tokens=128,
            web_search_calls=1,
        )
        == usage
    )


def test_model_override_wins_over_the_response_model() -> None:
    """A gateway bills under the model the request named."""
    assert "gpt-4o" == usage_from_openai(CHAT_COMPLETION, model="gpt-4o").model


def test_chat_stream_with_final_usage_chunk_is_exact() -> None:
    """The include_usage chunk's figures replace what was counted from the text."""
    stream = StreamUsage(Api.OPENAI_CHAT, model="gpt-4o-mini", input_estimate=50)
    for chunk in CHAT_STREAM[:-1]:
        stream.feed(chunk)
    counted = stream.usage
    stream.feed(CHAT_STREAM[-1])

    assert _usage("gpt-4o-mini", input_tokens=50, output_tokens=2 + 2) == counted
    assert not StreamUsage(Api.OPENAI_CHAT).complete
    assert stream.complete
    assert _usage("gpt-4o-mini", input_tokens=9, output_tokens=12) == stream.usage


def test_chat_stream_without_usage_is_never_zero() -> None:
    """A stream sent without include_usage bills the estimated prompt and the counted text."""
    stream = StreamUsage(
        Api.OPENAI_CHAT,
        model="gpt-4o-mini",
        input_estimate=40,
        counter=lambda text: len(text.split()),
    )
    for chunk in CHAT_STREAM[:-1]:
        stream.feed(_objects(chunk))

    assert not stream.complete
    assert _usage("gpt-4o-mini", input_tokens=40, output_tokens=2) == stream.usage


def test_a_stream_that_never_started_has_no_usage() -> None:
    """Before the first event there is nothing to bill."""
    assert StreamUsage(Api.ANTHROPIC_MESSAGES, input_estimate=10).usage is None


def test_chat_stream_counts_tool_call_arguments() -> None:
    """Streamed tool-call arguments are output the model produced."""
    stream = StreamUsage("openai.chat", input_estimate=1, counter=len)
    stream.feed(
        {
            "choices": [
                {
                    "delta": {
                        "tool_calls": [
                            {
                                "index": 0,
                                "function": {"name": "get_weather", "arguments": '{"city":'},
                            }
                        ]
                    }
                }
            ]
        }
    )
    stream.feed(
        {
            "choices": [
                {"delta": {"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}}
            ]
        }
    )

    assert 8 + 8 == stream.usage.output_tokens  # type: ignore[union-attr]


def test_responses_stream_is_exact_on_completion() -> None:
    """Text deltas are counted until response.completed brings the real usage."""
    stream = StreamUsage(Api.OPENAI_RESPONSES, model="gpt-4.1", input_estimate=30, counter=len)
    for event in RESPONSES_STREAM[:-1]:
        stream.feed(event)
    partial = stream.usage
    stream.feed(RESPONSES_STREAM[-1])

    assert _usage("gpt-4.1", input_tokens=30, output_tokens=9) == partial
    assert _usage("gpt-4.1", input_tokens=37, output_tokens=11) == stream.usage


def test_responses_stream_counts_web_searches_before_completion() -> None:
    """A web search call started mid-stream is billed even if the stream is cut."""
    stream = StreamUsage(Api.OPENAI_RESPONSES, input_estimate=5)
    stream.feed(
        {
            "type": "response.output_item.added",
            "output_index": 0,
            "item": {"type": "web_search_call", "id": "ws_1", "status": "in_progress"},
        }
    )

    assert 1 == stream.usage.web_search_calls  # type: ignore[union-attr]


# -- Anthropic ---------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [dict, _objects], ids=["dict", "sdk-object"])
def test_message_copies_input_and_cache_counts(shape: Any) -> None:
    """Anthropic's input_tokens already excludes the cache; cache fields are copied."""
    usage = usage_from_anthropic(shape(MESSAGE))

    assert (
        _usage(
            "claude-sonnet-4-20250514",
            input_tokens=21,
            output_tokens=393,
            cache_write_tokens=188086,
        )
        == usage
    )


def test_message_stream_is_exact_at_message_stop() -> None:
    """message_start's prompt, message_delta's cumulative output, final at message_stop."""
    stream = StreamUsage(Api.ANTHROPIC_MESSAGES, input_estimate=999, counter=lambda t: 1)
    for event in MESSAGE_STREAM[:5]:
        stream.feed(event)
    partial = stream.usage
    for event in MESSAGE_STREAM[5:]:
        stream.feed(event)

    assert _usage("claude-sonnet-4-20250514", input_tokens=25, output_tokens=2) == partial
    assert stream.complete
    assert _usage("claude-sonnet-4-20250514", input_tokens=25, output_tokens=15) == stream.usage


def test_message_stream_web_search_usage_from_message_delta() -> None:
    """A cumulative message_delta carrying input and server tool use updates every count."""
    stream = StreamUsage(Api.ANTHROPIC_MESSAGES)
    for event in WEB_SEARCH_STREAM:
        stream.feed(_objects(event))

    assert (
        _usage(
            "claude-opus-4-1-20250805", input_tokens=10682, output_tokens=510, web_search_calls=1
        )
        == stream.usage
    )


def test_message_start_event_converts_alone() -> None:
    """usage_from_anthropic reads a message_start event's message."""
    usage = usage_from_anthropic(MESSAGE_STREAM[0])

    assert _usage("claude-sonnet-4-20250514", input_tokens=25, output_tokens=1) == usage


# -- one convention, one price -----------------------------------------------------------------


def test_one_pricing_config_bills_both_providers_alike() -> None:
    """The same tokens, reported each provider's way, cost the same credits."""
    engine = PricingEngine.from_dict(
        {
            "models": {"_default": "input_tokens * 3 + output_tokens * 15"},
            "cache": {"read": "cache_read_tokens * 0.3", "write": "cache_write_tokens * 3.75"},
        }
    )
    openai = usage_from_openai(
        {
            "prompt_tokens": 1000 + 800 + 100,
            "completion_tokens": 50,
            "prompt_tokens_details": {"cached_tokens": 800, "cache_write_tokens": 100},
        },
        model="m",
    )
    anthropic = usage_from_anthropic(
        {
            "input_tokens": 1000,
            "cache_read_input_tokens": 800,
            "cache_creation_input_tokens": 100,
            "output_tokens": 50,
        },
        model="m",
    )

    assert openai == anthropic
    assert 3000 + 750 + 240 + 375 == engine.calculate(openai).credits


def test_usage_from_response_dispatches_on_the_api() -> None:
    """usage_from_response picks the adapter by API."""
    assert usage_from_anthropic(MESSAGE) == usage_from_response("anthropic.messages", MESSAGE)
    assert usage_from_openai(RESPONSE) == usage_from_response(Api.OPENAI_RESPONSES, RESPONSE)


# -- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"usage": {"prompt_tokens": -1, "completion_tokens": 2}}, "prompt_tokens"),
        ({"usage": {"prompt_tokens": "12", "completion_tokens": 2}}, "prompt_tokens"),
        ({"usage": {"prompt_tokens": 1.5, "completion_tokens": 2}}, "prompt_tokens"),
        ({"usage": {"prompt_tokens": True, "completion_tokens": 2}}, "prompt_tokens"),
        ({"usage": {"prompt_tokens": float("nan"), "completion_tokens": 2}}, "prompt_tokens"),
        ({"usage": {"prompt_tokens": 1, "completion_tokens": float("inf")}}, "completion_tokens"),
        ({"usage": {"prompt_tokens": 10**5000, "completion_tokens": 2}}, "input_tokens"),
        ({"choices": []}, "usage"),
    ],
)
def test_bad_openai_payloads_are_refused(payload: dict[str, Any], field: str) -> None:
    """A missing usage or a count that is not a whole non-negative number is refused."""
    with pytest.raises(InvalidArgumentError, match=field):
        usage_from_openai(payload)


def test_bad_api_is_refused() -> None:
    """An unknown API name is refused, naming the parameter."""
    with pytest.raises(InvalidArgumentError, match="api"):
        StreamUsage("openai.audio")


def test_heuristic_token_count() -> None:
    """Four ASCII characters per token rounded up; every other character a token."""
    assert 0 == heuristic_token_count("")
    assert 1 == heuristic_token_count("abcd")
    assert 2 == heuristic_token_count("abcde")
    assert 2 + 3 == heuristic_token_count("hello日本語")
