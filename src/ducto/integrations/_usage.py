"""
Provider usage payloads turned into `UsageMetrics`, one convention for every provider.

The convention (see ``docs/integrations.md``): a prompt token is counted exactly once, in
the field that says how it is billed.

- ``input_tokens``: prompt tokens billed at the full input rate, that is neither read
  from nor written to the provider's prompt cache;
- ``cache_read_tokens``: prompt tokens read from the cache;
- ``cache_write_tokens``: prompt tokens written to the cache;
- ``output_tokens``: every generated token, reasoning (thinking) tokens included;
- ``web_search_calls``: provider-side web searches.

OpenAI counts cached tokens inside its input count (``prompt_tokens`` /
``input_tokens``), so its adapter subtracts them; Anthropic reports them beside
``input_tokens``, so its adapter copies them. One pricing config then bills both right.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from enum import StrEnum
from typing import Final

from ducto._shown import shown
from ducto.errors import InvalidArgumentError
from ducto.pricing import UsageMetrics

__all__ = [
    "Api",
    "StreamUsage",
    "TokenCounter",
    "heuristic_token_count",
    "usage_from_anthropic",
    "usage_from_openai",
    "usage_from_response",
]

TokenCounter = Callable[[str], int]
"""Counts the tokens of a text; `heuristic_token_count` is the default."""


class Api(StrEnum):
    """The request and response shapes ducto bills."""

    OPENAI_CHAT = "openai.chat"
    """``POST /v1/chat/completions``."""
    OPENAI_COMPLETIONS = "openai.completions"
    """``POST /v1/completions`` (the legacy text completions)."""
    OPENAI_EMBEDDINGS = "openai.embeddings"
    """``POST /v1/embeddings``."""
    OPENAI_RESPONSES = "openai.responses"
    """``POST /v1/responses``."""
    ANTHROPIC_MESSAGES = "anthropic.messages"
    """``POST /v1/messages``."""


_OPENAI: Final = frozenset(
    {Api.OPENAI_CHAT, Api.OPENAI_COMPLETIONS, Api.OPENAI_EMBEDDINGS, Api.OPENAI_RESPONSES}
)


def heuristic_token_count(text: str) -> int:
    """
    Estimate the tokens of a text without a tokenizer, erring high.

    Each run of ASCII characters counts one token per 4 characters (rounded up; English
    averages about 4 characters per token with OpenAI's and Anthropic's tokenizers), and
    every other character counts one token (CJK text averages 1 to 1.5 characters per
    token, other scripts more). The estimate is meant for holds, where a little too much
    is safe and too little is not. It needs no network and no data files.

    Args:
        text: Any text.

    Returns:
        The estimated number of tokens, 0 for an empty text.
    """
    if text.isascii():
        return (len(text) + 3) // 4
    ascii_chars = sum(1 for char in text if char < "\x80")
    return (ascii_chars + 3) // 4 + len(text) - ascii_chars


# -- reading SDK objects and dicts alike -------------------------------------------------------


def _get(obj: object, name: str) -> object:
    """``obj[name]`` for a mapping, ``obj.name`` otherwise; None when absent."""
    if type(obj) is dict:  # parsed JSON, the hot path
        return obj.get(name)
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


def _count(obj: object, name: str, where: str) -> int:
    value = _get(obj, name)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgumentError(f"{where}.{name} must be a number of tokens, got {shown(value)}")
    if value < 0 or (isinstance(value, float) and not math.isfinite(value)) or value != int(value):
        raise InvalidArgumentError(
            f"{where}.{name} must be a non-negative whole number, got {shown(value)}"
        )
    return int(value)


def _model(obj: object, override: str | None) -> str | None:
    if override is not None:
        return override
    name = _get(obj, "model")
    return name if isinstance(name, str) and name else None


def _usage_metrics(
    model: str | None,
    *,
    input_tokens: int,
    output_tokens: int,
    cache_read: int = 0,
    cache_write: int = 0,
    web_search_calls: int = 0,
) -> UsageMetrics:
    return UsageMetrics(
        model=model,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cache_read_tokens=cache_read,
        cache_write_tokens=cache_write,
        web_search_calls=web_search_calls,
    )


# -- OpenAI ------------------------------------------------------------------------------------


def _openai_usage(usage: object, model: str | None, web_search_calls: int = 0) -> UsageMetrics:
    """Convert an OpenAI usage object (Chat Completions or Responses shape)."""
    if _get(usage, "input_tokens") is not None and _get(usage, "prompt_tokens") is None:
        where = "usage"
        prompt = _count(usage, "input_tokens", where)
        output = _count(usage, "output_tokens", where)
        details = _get(usage, "input_tokens_details")
    else:
        where = "usage"
        prompt = _count(usage, "prompt_tokens", where)
        output = _count(usage, "completion_tokens", where)
        details = _get(usage, "prompt_tokens_details")
    cache_read = _count(details, "cached_tokens", f"{where}.details")
    # OpenAI reports cache writes as ``cache_write_tokens``; LiteLLM's OpenAI-shaped usage
    # of Anthropic calls as ``cache_creation_tokens`` or ``cache_creation_input_tokens``.
    cache_write = (
        _count(details, "cache_write_tokens", f"{where}.details")
        or _count(details, "cache_creation_tokens", f"{where}.details")
        or _count(usage, "cache_creation_input_tokens", where)
    )
    # Both cache counts are part of the prompt count; never let a provider's rounding
    # make the full-rate remainder negative.
    full_rate = max(prompt - cache_read - cache_write, 0)
    server_tools = _get(usage, "server_tool_use")
    web_search_calls += _count(server_tools, "web_search_requests", "usage.server_tool_use")
    return _usage_metrics(
        model,
        input_tokens=full_rate,
        output_tokens=output,
        cache_read=cache_read,
        cache_write=cache_write,
        web_search_calls=web_search_calls,
    )


def _responses_web_searches(response: object) -> int:
    output = _get(response, "output")
    if not isinstance(output, list | tuple):
        return 0
    return sum(1 for item in output if _get(item, "type") == "web_search_call")


def usage_from_openai(payload: object, *, model: str | None = None) -> UsageMetrics:
    """
    The usage of an OpenAI response, converted to ducto's convention.

    Accepts a Chat Completions or Completions response, an Embeddings response, a Responses
    API response, the final usage chunk of a stream, or a bare usage object; SDK objects
    and plain dicts alike. Cached prompt tokens (``cached_tokens``) are moved out of the
    input count into ``cache_read_tokens`` and cache writes into ``cache_write_tokens``;
    reasoning tokens are already part of the output count and stay there. A Responses API
    response also counts its ``web_search_call`` output items as ``web_search_calls``.

    Args:
        payload: The response, chunk or usage object.
        model: The model to bill under; by default the response's ``model``.

    Returns:
        The usage.

    Raises:
        InvalidArgumentError: The payload has no usage, or a count is not a whole,
            non-negative number.
    """
    if _get(payload, "prompt_tokens") is not None or _get(payload, "input_tokens") is not None:
        return _openai_usage(payload, model)
    usage = _get(payload, "usage")
    if usage is None:
        raise InvalidArgumentError("payload has no usage (did the stream end early?)")
    return _openai_usage(usage, _model(payload, model), _responses_web_searches(payload))


# -- Anthropic ---------------------------------------------------------------------------------


def _anthropic_usage(usage: object, model: str | None) -> UsageMetrics:
    server_tools = _get(usage, "server_tool_use")
    return _usage_metrics(
        model,
        input_tokens=_count(usage, "input_tokens", "usage"),
        output_tokens=_count(usage, "output_tokens", "usage"),
        cache_read=_count(usage, "cache_read_input_tokens", "usage"),
        cache_write=_count(usage, "cache_creation_input_tokens", "usage"),
        web_search_calls=_count(server_tools, "web_search_requests", "usage.server_tool_use"),
    )


def usage_from_anthropic(payload: object, *, model: str | None = None) -> UsageMetrics:
    """
    The usage of an Anthropic Messages response, converted to ducto's convention.

    Accepts a Message, a bare usage object, or the ``message_start`` / ``message_delta``
    events of a stream (whose counts are cumulative; use `StreamUsage` to follow a whole
    stream). Anthropic's ``input_tokens`` already leaves out cached tokens, so it is copied;
    ``cache_read_input_tokens`` and ``cache_creation_input_tokens`` become
    ``cache_read_tokens`` and ``cache_write_tokens`` (both cache lifetimes together), and
    ``server_tool_use.web_search_requests`` becomes ``web_search_calls``.

    Args:
        payload: The message, event or usage object.
        model: The model to bill under; by default the message's ``model``.

    Returns:
        The usage.

    Raises:
        InvalidArgumentError: The payload has no usage, or a count is not a whole,
            non-negative number.
    """
    if _get(payload, "output_tokens") is not None or _get(payload, "input_tokens") is not None:
        return _anthropic_usage(payload, model)
    message = _get(payload, "message")
    if message is not None and _get(payload, "type") == "message_start":
        payload = message
    usage = _get(payload, "usage")
    if usage is None:
        raise InvalidArgumentError("payload has no usage")
    return _anthropic_usage(usage, _model(payload, model))


def usage_from_response(
    api: Api | str, payload: object, *, model: str | None = None
) -> UsageMetrics:
    """
    The usage of a complete (not streamed) response of the given API.

    Args:
        api: The API the response came from.
        payload: The response body (a dict) or SDK object.
        model: The model to bill under; by default the response's ``model``.

    Returns:
        The usage, by `usage_from_openai` or `usage_from_anthropic`.

    Raises:
        InvalidArgumentError: Unknown API, no usage, or a bad count.
    """
    kind = _api(api)
    if kind is Api.ANTHROPIC_MESSAGES:
        return usage_from_anthropic(payload, model=model)
    return usage_from_openai(payload, model=model)


def _api(api: Api | str) -> Api:
    if type(api) is Api:
        return api
    try:
        return Api(api)
    except ValueError:
        known = ", ".join(kind.value for kind in Api)
        raise InvalidArgumentError(f"api must be one of {known}, got {shown(api)}") from None


# -- streams -----------------------------------------------------------------------------------


_TEXT_FIELDS: Final = ("content", "refusal", "reasoning_content", "reasoning")


def _text_of_choices(choices: object, counter: TokenCounter) -> int:
    """Tokens of the text a chunk's (or a response's) choices carry."""
    if not isinstance(choices, list | tuple):
        return 0
    tokens = 0
    for choice in choices:
        text = _get(choice, "text")  # legacy completions
        if isinstance(text, str) and text:
            tokens += counter(text)
        for part_name in ("delta", "message"):
            part = _get(choice, part_name)
            if part is None:
                continue
            for field in _TEXT_FIELDS:
                value = _get(part, field)
                if value and type(value) is str:
                    tokens += counter(value)
            calls = _get(part, "tool_calls")
            if isinstance(calls, list | tuple):
                for call in calls:
                    arguments = _get(_get(call, "function"), "arguments")
                    if isinstance(arguments, str) and arguments:
                        tokens += counter(arguments)
    return tokens


def _text_of_output(output: object, counter: TokenCounter) -> int:
    """Tokens of the text in a Responses API ``output`` or an Anthropic ``content`` list."""
    if not isinstance(output, list | tuple):
        return 0
    tokens = 0
    for item in output:
        for field in ("text", "thinking", "arguments"):
            value = _get(item, field)
            if isinstance(value, str) and value:
                tokens += counter(value)
        content = _get(item, "content")
        if isinstance(content, list | tuple):
            tokens += _text_of_output(content, counter)
    return tokens


_RESPONSES_TEXT_EVENTS: Final = frozenset(
    {
        "response.output_text.delta",
        "response.refusal.delta",
        "response.function_call_arguments.delta",
        "response.reasoning_text.delta",
        "response.reasoning_summary_text.delta",
    }
)
_RESPONSES_FINAL_EVENTS: Final = frozenset(
    {"response.completed", "response.incomplete", "response.failed"}
)


class StreamUsage:
    """
    Follows the events of one streamed response and knows its usage at every moment.

    Feed it each event (a parsed SSE ``data`` payload or an SDK event object) in order.
    `usage` is then the best figure for what the stream has used so far:

    - once the provider reported the final usage (OpenAI's last chunk with ``usage``, a
      Responses ``response.completed``, Anthropic's ``message_stop`` after the cumulative
      ``message_delta``), exactly that, converted like `usage_from_response`;
    - before that (a stream cut short, or an OpenAI stream sent without
      ``stream_options: {"include_usage": true}``), the prompt as the provider reported it
      (Anthropic's ``message_start``) or as estimated from the request, plus the larger of
      the output the provider reported and the output counted from the streamed text.

    So a stream is never recorded at zero: what it streamed is counted even when the
    provider's usage never arrives.
    """

    __slots__ = (
        "_anthropic_start",
        "_api",
        "_counted",
        "_final",
        "_input_estimate",
        "_model",
        "_reported",
        "_searches",
        "_started",
        "counter",
    )

    def __init__(
        self,
        api: Api | str,
        *,
        model: str | None = None,
        input_estimate: int = 0,
        counter: TokenCounter = heuristic_token_count,
    ) -> None:
        """
        Start following a stream.

        Args:
            api: The API of the stream.
            model: The model to bill under; by default the one the stream names.
            input_estimate: The prompt tokens to assume until the provider reports them
                (see `RequestEstimator.input_tokens`).
            counter: Counts the tokens of streamed text.

        Raises:
            InvalidArgumentError: Unknown API or a negative estimate.
        """
        self._api = _api(api)
        if type(input_estimate) is not int or input_estimate < 0:
            raise InvalidArgumentError(
                f"input_estimate must be a non-negative int, got {shown(input_estimate)}"
            )
        self._model = model
        self._input_estimate = input_estimate
        self.counter = counter
        self._reported: UsageMetrics | None = None
        self._anthropic_start: object = None
        self._final = False
        self._started = False
        self._counted = 0
        self._searches = 0

    @property
    def api(self) -> Api:
        """The API of the stream."""
        return self._api

    @property
    def complete(self) -> bool:
        """Whether the provider's final usage arrived (so `usage` is exact)."""
        return self._final

    @property
    def usage(self) -> UsageMetrics | None:
        """What the stream has used so far, or None before its first event (see above)."""
        if not self._started:
            return None
        reported = self._reported
        if self._final and reported is not None:
            return reported
        if reported is None:
            reported = UsageMetrics(model=self._model, input_tokens=self._input_estimate)
        output = max(reported.output_tokens, self._counted)
        searches = max(reported.web_search_calls, self._searches)
        if output == reported.output_tokens and searches == reported.web_search_calls:
            return reported
        return _usage_metrics(
            reported.model,
            input_tokens=reported.input_tokens,
            output_tokens=output,
            cache_read=reported.cache_read_tokens,
            cache_write=reported.cache_write_tokens,
            web_search_calls=searches,
        )

    def feed(self, event: object) -> None:
        """
        Take the next event of the stream.

        Events without usage or text (pings, ``[DONE]`` already stripped) are ignored.

        Args:
            event: A parsed ``data`` payload (dict) or an SDK event object.

        Raises:
            InvalidArgumentError: The event carries a count that is not a whole,
                non-negative number.
        """
        self._started = True
        if self._final:
            return
        if self._api is Api.ANTHROPIC_MESSAGES:
            self._feed_anthropic(event)
        elif self._api is Api.OPENAI_RESPONSES:
            self._feed_responses(event)
        else:
            self._feed_chat(event)

    def feed_response(self, body: object) -> None:
        """
        Take a complete (not streamed) response body.

        Its usage becomes final. A body without usage counts as text, like a stream whose
        usage never arrived.

        Args:
            body: The parsed JSON body or SDK object.

        Raises:
            InvalidArgumentError: A count is not a whole, non-negative number.
        """
        self._started = True
        if _get(body, "usage") is not None:
            self._reported = usage_from_response(self._api, body, model=self._model)
            self._final = True
            return
        if self._api is Api.ANTHROPIC_MESSAGES:
            self._counted += _text_of_output(_get(body, "content"), self.counter)
        elif self._api is Api.OPENAI_RESPONSES:
            self._counted += _text_of_output(_get(body, "output"), self.counter)
            self._searches += _responses_web_searches(body)
        else:
            self._counted += _text_of_choices(_get(body, "choices"), self.counter)

    # -- per API -----------------------------------------------------------------------------

    def _feed_chat(self, event: object) -> None:
        self._counted += _text_of_choices(_get(event, "choices"), self.counter)
        usage = _get(event, "usage")
        if usage is not None:
            # Sent once, on the last chunk, when the request asked for it.
            self._reported = _openai_usage(usage, _model(event, self._model))
            self._final = True

    def _feed_responses(self, event: object) -> None:
        kind = _get(event, "type")
        if kind in _RESPONSES_TEXT_EVENTS:
            delta = _get(event, "delta")
            if isinstance(delta, str) and delta:
                self._counted += self.counter(delta)
        elif kind == "response.output_item.added":
            if _get(_get(event, "item"), "type") == "web_search_call":
                self._searches += 1
        elif kind in _RESPONSES_FINAL_EVENTS:
            response = _get(event, "response")
            if _get(response, "usage") is not None:
                self._reported = usage_from_openai(response, model=self._model)
                self._final = True

    def _feed_anthropic(self, event: object) -> None:
        kind = _get(event, "type")
        if kind == "content_block_delta":
            delta = _get(event, "delta")
            for field in ("text", "thinking", "partial_json"):
                value = _get(delta, field)
                if isinstance(value, str) and value:
                    self._counted += self.counter(value)
        elif kind == "message_start":
            message = _get(event, "message")
            usage = _get(message, "usage")
            if usage is not None:
                self._anthropic_start = usage
                self._reported = _anthropic_usage(usage, _model(message, self._model))
        elif kind == "message_delta":
            usage = _get(event, "usage")
            if usage is not None:
                self._reported = self._merge_anthropic(usage)
        elif kind == "message_stop" and self._reported is not None:
            self._final = True

    def _merge_anthropic(self, delta: object) -> UsageMetrics:
        """The cumulative usage of a ``message_delta``, over what ``message_start`` said."""
        start = self._anthropic_start
        previous = self._reported
        model = previous.model if previous is not None else self._model

        def latest(name: str, where: object) -> int:
            # A field the delta carries is cumulative and wins; else keep the start's.
            if _get(delta, name) is not None:
                return _count(delta, name, "usage")
            return _count(where, name, "usage")

        server_tools = _get(delta, "server_tool_use")
        if server_tools is None:
            server_tools = _get(start, "server_tool_use")
        return _usage_metrics(
            model,
            input_tokens=latest("input_tokens", start),
            output_tokens=latest("output_tokens", start),
            cache_read=latest("cache_read_input_tokens", start),
            cache_write=latest("cache_creation_input_tokens", start),
            web_search_calls=_count(server_tools, "web_search_requests", "usage.server_tool_use"),
        )


def _provider_of(api: Api) -> str:
    """``"openai"`` or ``"anthropic"``: whose error and usage shapes the API uses."""
    return "openai" if api in _OPENAI else "anthropic"
