"""
What one LLM call (or one streamed response, or one job) used: the input of pricing.

`UsageMetrics` carries the counters that pricing expressions can read, by the names listed
in `METRIC_VARIABLES`; `ToolCall` records one tool invocation. Both keep ducto 1.x's names
and fields. Counters are strict non-negative ints: a bool, a float or a numeric string is
refused rather than guessed at, and so is an unknown field (a misspelt counter would
otherwise make usage free). Every invalid value raises `InvalidArgumentError` naming the
field.
"""

from __future__ import annotations

from decimal import Decimal
from typing import TYPE_CHECKING, Any, Final

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ducto._shown import shown
from ducto.errors import InvalidArgumentError

__all__ = ["METRIC_VARIABLES", "MAX_COUNT", "ToolCall", "UsageMetrics"]

MAX_COUNT: Final = 2**62
"""Largest value any counter may have."""

METRIC_VARIABLES: Final = (
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "tool_calls",
    "search_queries",
    "search_results",
    "web_search_calls",
    "code_exec_calls",
)
"""The variable names pricing expressions may use, in `UsageMetrics.variables` order."""

_COUNTERS: Final = tuple(name for name in METRIC_VARIABLES if name != "tool_calls")


def _describe(exc: ValidationError) -> str:
    """One line naming every invalid field of a pydantic validation error."""
    return f"invalid {exc.title}: " + "; ".join(_problems(exc, ()))


def _problems(exc: ValidationError, outer: tuple[str | int, ...]) -> list[str]:
    problems = []
    for error in exc.errors(include_url=False):
        loc = (*outer, *error["loc"])
        inner = error.get("ctx", {}).get("error")
        # A nested model of this module raised its own error: report its fields instead.
        if isinstance(inner, InvalidArgumentError) and isinstance(inner.__cause__, ValidationError):
            problems.extend(_problems(inner.__cause__, loc))
            continue
        where = ".".join(str(part) for part in loc) or "value"
        detail = error["msg"]
        if error["type"] not in ("missing", "extra_forbidden"):
            detail += f", got {shown(error['input'])}"
        problems.append(f"{where}: {detail}")
    return problems


class _Checked(BaseModel):
    """A model whose construction and assignment errors are `InvalidArgumentError`s."""

    # Hidden from type checkers so they keep the typed signatures pydantic generates.
    if not TYPE_CHECKING:

        def __init__(self, **data: Any) -> None:
            try:
                super().__init__(**data)
            except ValidationError as exc:
                raise InvalidArgumentError(_describe(exc)) from exc

        def __setattr__(self, name: str, value: Any) -> None:
            try:
                super().__setattr__(name, value)
            except ValidationError as exc:
                raise InvalidArgumentError(_describe(exc)) from exc

        @classmethod
        def model_validate(cls, *args: Any, **kwargs: Any) -> Any:
            try:
                return super().model_validate(*args, **kwargs)
            except ValidationError as exc:
                raise InvalidArgumentError(_describe(exc)) from exc

        @classmethod
        def model_validate_json(cls, *args: Any, **kwargs: Any) -> Any:
            try:
                return super().model_validate_json(*args, **kwargs)
            except ValidationError as exc:
                raise InvalidArgumentError(_describe(exc)) from exc


class ToolCall(_Checked):
    """
    One tool invocation recorded during a call.

    Tools are priced by name through the ``tools`` section of the pricing config.

    Attributes:
        name: The tool's name, non-empty.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, strict=True)


def _counter() -> Any:
    return Field(default=0, ge=0, le=MAX_COUNT, strict=True)


class UsageMetrics(_Checked):
    """
    The usage of one call, or of several calls merged with ``+``.

    Every counter defaults to 0, so a caller sets only what it measured. Assigning to a
    field is validated like construction. ``model`` is None when the call used no model
    (a pure fixed-cost job, say); pricing then uses the ``_default`` model expression.

    Attributes:
        model: The model name as the provider reports it (``"gpt-4o-2024-08-06"``); the
            engine resolves it to a pricing key. None when there is no model.
        input_tokens: Prompt tokens billed at the full rate.
        output_tokens: Completion tokens.
        cache_read_tokens: Prompt tokens served from the provider's cache.
        cache_write_tokens: Prompt tokens written to the provider's cache.
        tool_calls: One `ToolCall` per tool invocation.
        search_queries: Search or retrieval queries run.
        search_results: Search results or retrieved documents consumed.
        web_search_calls: Provider-side web searches.
        code_exec_calls: Provider-side code executions.
        fixed_job: The name of a fixed-cost job (a key of the config's ``fixed`` section)
            whose cost is added to the usage, or None.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    model: str | None = Field(default=None, strict=True)
    input_tokens: int = _counter()
    output_tokens: int = _counter()
    cache_read_tokens: int = _counter()
    cache_write_tokens: int = _counter()
    tool_calls: list[ToolCall] = Field(default_factory=list)
    search_queries: int = _counter()
    search_results: int = _counter()
    web_search_calls: int = _counter()
    code_exec_calls: int = _counter()
    fixed_job: str | None = Field(default=None, min_length=1, strict=True)

    def variables(self) -> dict[str, Decimal | int]:
        """
        The values pricing expressions see, by variable name.

        Returns:
            Each counter under its field name, and ``tool_calls`` as the number of tool
            calls; the keys are `METRIC_VARIABLES`.
        """
        return {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cache_read_tokens": self.cache_read_tokens,
            "cache_write_tokens": self.cache_write_tokens,
            "tool_calls": len(self.tool_calls),
            "search_queries": self.search_queries,
            "search_results": self.search_results,
            "web_search_calls": self.web_search_calls,
            "code_exec_calls": self.code_exec_calls,
        }

    def _environment(self) -> dict[str, Decimal | int]:
        """
        `variables` plus this record's other fields, which no expression can read.

        Pricing calls this once per record: copying the field dict is several times
        faster than building `variables`, and expressions are compiled against
        `METRIC_VARIABLES`, so ``model`` and ``fixed_job`` are never looked up.
        """
        env: dict[str, Any] = self.__dict__.copy()
        env["tool_calls"] = len(self.tool_calls)
        return env

    def __add__(self, other: object) -> UsageMetrics:
        """
        Merge two usage records, for example the chunks of one streamed response.

        Counters are summed and tool calls concatenated (this record's first). The
        records must be for the same model and fixed job; a None ``model`` or
        ``fixed_job`` takes the other record's value.

        Raises:
            InvalidArgumentError: The records name different models or different fixed
                jobs, or a sum exceeds `MAX_COUNT`.
        """
        if not isinstance(other, UsageMetrics):
            return NotImplemented
        fields: dict[str, Any] = {
            name: getattr(self, name) + getattr(other, name) for name in _COUNTERS
        }
        for name in ("model", "fixed_job"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine is not None and theirs is not None and mine != theirs:
                raise InvalidArgumentError(
                    f"cannot add usage with different {name}s: {mine!r} and {theirs!r}"
                )
            fields[name] = mine if mine is not None else theirs
        fields["tool_calls"] = [*self.tool_calls, *other.tool_calls]
        return UsageMetrics(**fields)

    def __radd__(self, other: object) -> UsageMetrics:
        """Let ``sum(records)`` start from 0."""
        if isinstance(other, int) and not isinstance(other, bool) and other == 0:
            return self.model_copy(deep=True)
        return NotImplemented
