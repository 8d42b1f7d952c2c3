"""
Hold estimates from a request body: the prompt's tokens plus the output ceiling.

Nothing here touches the network: the default counter is `heuristic_token_count`, and a
real tokenizer can be plugged in as any ``Callable[[str], int]``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Final

from ducto._shown import shown
from ducto.errors import InvalidArgumentError
from ducto.integrations._usage import Api, TokenCounter, _api, heuristic_token_count
from ducto.pricing import UsageMetrics

__all__ = ["RequestEstimator"]

_OUTPUT_LIMITS: Final = ("max_completion_tokens", "max_output_tokens", "max_tokens")
_IMAGE_PARTS: Final = frozenset({"image_url", "image", "input_image"})
_FILE_PARTS: Final = frozenset({"file", "input_file", "document", "input_audio", "audio"})
_SKIPPED_KEYS: Final = frozenset({"type", "role", "cache_control", "id", "signature", "detail"})


def _positive_int(name: str, value: object, *, allow_zero: bool = False) -> int:
    if type(value) is not int or value < (0 if allow_zero else 1):
        least = 0 if allow_zero else 1
        raise InvalidArgumentError(f"{name} must be an int of at least {least}, got {shown(value)}")
    return value


class RequestEstimator:
    """
    Estimates the usage to hold for a request, before it is sent.

    The estimate is ``input_tokens`` (the prompt, counted by `counter`) plus
    ``output_tokens`` (the request's ``max_completion_tokens``, ``max_output_tokens`` or
    ``max_tokens``, else `default_max_output_tokens`, times ``n`` choices). What is counted
    as prompt:

    - every string in the messages, the system prompt, ``instructions``, ``input`` or
      ``prompt``, plus `message_overhead` tokens per message;
    - the JSON of tool definitions, tool calls and tool results;
    - `image_tokens` per image and `file_tokens` per file, audio or document part (their
      bytes or URLs are not counted as text).

    An Anthropic ``web_search`` tool adds its ``max_uses`` (else 1) to
    ``web_search_calls``; an OpenAI ``web_search`` tool adds 1.

    The estimate only sizes the hold: the charge is always the usage the provider reports.
    """

    def __init__(
        self,
        *,
        counter: TokenCounter = heuristic_token_count,
        default_max_output_tokens: int = 4096,
        image_tokens: int = 1600,
        file_tokens: int = 4000,
        message_overhead: int = 4,
    ) -> None:
        """
        Configure the estimator.

        Args:
            counter: Counts a text's tokens (for example a tiktoken encoding's
                ``lambda text: len(enc.encode(text))``); must not do I/O.
            default_max_output_tokens: The output ceiling for requests that set none.
            image_tokens: Tokens assumed per image (Anthropic charges about 1,600 for a
                1.15-megapixel image; OpenAI's high detail about 1,100 for 1024x1024).
            file_tokens: Tokens assumed per file, document or audio part.
            message_overhead: Tokens added per message for its role and separators.

        Raises:
            InvalidArgumentError: A number is not a positive int (0 allowed for the
                overheads), or `counter` is not callable.
        """
        if not callable(counter):
            raise InvalidArgumentError(f"counter must be callable, got {shown(counter)}")
        self.counter = counter
        self.default_max_output_tokens = _positive_int(
            "default_max_output_tokens", default_max_output_tokens
        )
        self.image_tokens = _positive_int("image_tokens", image_tokens, allow_zero=True)
        self.file_tokens = _positive_int("file_tokens", file_tokens, allow_zero=True)
        self.message_overhead = _positive_int("message_overhead", message_overhead, allow_zero=True)

    def estimate(self, api: Api | str, body: Mapping[str, object]) -> UsageMetrics:
        """
        The usage to hold for a request.

        Args:
            api: The API the request is for.
            body: The parsed JSON request body.

        Returns:
            The estimate, for the request's ``model``.

        Raises:
            InvalidArgumentError: The body is not a JSON object, or its ``model``, output
                limit or ``n`` has the wrong type.
        """
        kind = _api(api)
        if not isinstance(body, Mapping):
            raise InvalidArgumentError(f"body must be a JSON object, got {type(body).__name__}")
        model = body.get("model")
        if model is not None and (not isinstance(model, str) or not model):
            raise InvalidArgumentError(f"model must be a non-empty string, got {shown(model)}")
        return UsageMetrics(
            model=model,
            input_tokens=self.input_tokens(kind, body),
            output_tokens=self.output_tokens(kind, body),
            web_search_calls=self._web_searches(kind, body),
        )

    def input_tokens(self, api: Api | str, body: Mapping[str, object]) -> int:
        """
        The estimated prompt tokens of a request.

        Args:
            api: The API the request is for.
            body: The parsed JSON request body.

        Returns:
            The estimate (at least 1).
        """
        kind = _api(api)
        tokens = 0
        messages = body.get("messages")
        if isinstance(messages, list):
            tokens += self.message_overhead * (len(messages) + 1)
            tokens += self._content(messages)
        for field in ("system", "instructions", "input", "prompt", "tools", "functions"):
            if field in body:
                tokens += self._content(body[field])
        if kind is Api.OPENAI_RESPONSES and isinstance(body.get("input"), list):
            tokens += self.message_overhead * len(body["input"])  # type: ignore[arg-type]
        return max(tokens, 1)

    def output_tokens(self, api: Api | str, body: Mapping[str, object]) -> int:
        """
        The output ceiling of a request: its own limit times ``n``, or the default.

        Args:
            api: The API the request is for.
            body: The parsed JSON request body.

        Returns:
            The ceiling (0 for embeddings).

        Raises:
            InvalidArgumentError: The limit or ``n`` is not a positive int.
        """
        kind = _api(api)
        if kind is Api.OPENAI_EMBEDDINGS:
            return 0
        limit = self.default_max_output_tokens
        for field in _OUTPUT_LIMITS:
            value = body.get(field)
            if value is not None:
                limit = _positive_int(field, value)
                break
        choices = body.get("n", 1)
        if choices is None:
            choices = 1
        return limit * _positive_int("n", choices)

    # -- helpers ------------------------------------------------------------------------------

    def _content(self, value: object) -> int:
        """Tokens of any JSON value: strings counted, media parts at their flat rate."""
        if isinstance(value, str):
            return self.counter(value) if value else 0
        if isinstance(value, list):
            return sum(self._content(item) for item in value)
        if isinstance(value, Mapping):
            kind = value.get("type")
            if kind in _IMAGE_PARTS or (kind is None and "image_url" in value):
                return self.image_tokens
            if kind in _FILE_PARTS:
                return self.file_tokens
            if kind in ("function", "custom") or "parameters" in value or "input_schema" in value:
                # A tool definition: the provider renders its JSON schema into the prompt.
                return self.counter(json.dumps(value, separators=(",", ":")))
            return sum(
                self._content(item) for key, item in value.items() if key not in _SKIPPED_KEYS
            )
        if isinstance(value, int | float) and not isinstance(value, bool):
            return 1
        return 0

    def _web_searches(self, kind: Api, body: Mapping[str, object]) -> int:
        tools = body.get("tools")
        if not isinstance(tools, list):
            return 0
        searches = 0
        for tool in tools:
            if not isinstance(tool, Mapping):
                continue
            tool_type = tool.get("type")
            if not isinstance(tool_type, str) or not tool_type.startswith("web_search"):
                continue
            if kind is Api.ANTHROPIC_MESSAGES:
                uses = tool.get("max_uses")
                searches += uses if type(uses) is int and uses > 0 else 1
            else:
                searches += 1
        return searches
