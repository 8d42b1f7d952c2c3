"""
The pricing engine: turns `UsageMetrics` into a `CostBreakdown` under a pricing config.

A config (`PricingConfigData`, the ducto 1.x format) holds pricing expressions (see
`ducto.pricing._expr` for the language) in these sections:

- ``models``: one expression per model key. A call's model name is resolved to a key:
  the exact name, else the longest key that is a prefix of the name (``"gpt-4o"`` prices
  ``"gpt-4o-2024-08-06"``), else ``_default``. A name that resolves to nothing cannot be
  priced and is refused: it is never free. Usage with no model is priced by ``_default``;
  a pure fixed-cost job (no model and no tokens) needs no model price at all.
- ``tools``: a tool's own expression prices that tool's calls, evaluated with
  ``tool_calls`` set to the number of calls with that name; ``_default`` prices all the
  calls whose names have no entry, with ``tool_calls`` set to their number. A tool that was
  not called costs nothing and is not evaluated. Calls to a tool that has no entry, when
  there is no ``_default`` either, are refused.
- ``search`` and ``cache``: every expression is evaluated and the results are summed. Cache
  expressions are usually discounts, so negative (``"-cache_read_tokens * 0.0045"``).
- ``fixed``: whole-credit costs of named jobs, added when `UsageMetrics.fixed_job` is set.
- ``plans``: a plan's ``rate_overrides`` replace model expressions for its users. The
  model name is resolved against the override keys first (exact, longest prefix,
  ``_default``) and only then against ``models``.
- ``rounding``: how the total becomes whole credits (``ceil`` unless configured).

Every expression is compiled once, when the engine is built, and may use only the metric
variables (`ducto.pricing.metrics.METRIC_VARIABLES`), so a config that cannot be priced is
refused then, with an error naming the section and key. Components are summed exactly in
`Decimal`; the total is clamped at 0 (a discount never pays the user) and rounded once.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from decimal import (
    ROUND_HALF_EVEN,
    ROUND_HALF_UP,
    Context,
    Decimal,
    InvalidOperation,
    Overflow,
)
from pathlib import Path
from typing import Final, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ducto._shown import shown
from ducto.errors import ConfigError, ConfigExpressionError, ExpressionError, InvalidArgumentError
from ducto.interface.models import PlanDefinition, PricingConfigData, RoundingMode
from ducto.pricing._expr import Expression, compile_expression
from ducto.pricing.metrics import METRIC_VARIABLES, UsageMetrics, _describe

__all__ = [
    "CostBreakdown",
    "PricingEngine",
    "evaluate_expression",
    "validate_expression",
    "validate_pricing_config",
]

_DEFAULT: Final = "_default"
_ZERO: Final = Decimal(0)
_VARIABLES: Final = frozenset(METRIC_VARIABLES)
_ZEROS: Final[Mapping[str, Decimal | int]] = dict.fromkeys(METRIC_VARIABLES, 0)
_TOKEN_COUNTERS: Final = (
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
)

_RESOLVED_LIMIT: Final = 1024
"""Most model names whose resolution one table remembers."""

_ADHOC_PLAN_LIMIT: Final = 64
"""Most plans outside the config whose compiled overrides the engine remembers."""

# Components and results of expressions are finite values of at most 50 digits between
# about 1e-1048 and 1e30, so sums in this context are exact; nothing rounds before credits.
_EXACT: Final = Context(
    prec=4000,
    rounding=ROUND_HALF_EVEN,
    Emax=999_999,
    Emin=-999_999,
    traps=[InvalidOperation, Overflow],
)


def _half_up(value: Decimal) -> int:
    return int(value.to_integral_value(rounding=ROUND_HALF_UP, context=_EXACT))


# Rounding a finite Decimal to an int is exact and signals nothing whatever the thread's
# context, so math.ceil, math.floor and round (half-even) are safe here, and faster.
_TO_CREDITS: Final[Mapping[str, Callable[[Decimal], int]]] = {
    "ceil": math.ceil,
    "floor": math.floor,
    "half_up": _half_up,
    "half_even": round,
}


def _settle(
    model: Decimal,
    tool: Decimal,
    search: Decimal,
    cache: Decimal,
    fixed: Decimal,
    rounding: str,
) -> tuple[Decimal, int]:
    """The clamped total of the components and its credits: the one place both are made."""
    add = _EXACT.add
    total = model
    for part in (tool, search, cache, fixed):
        if part:
            total = add(total, part)
    if total <= 0:
        return _ZERO, 0
    return total, _TO_CREDITS[rounding](total)


# -- results -----------------------------------------------------------------------------------


class CostBreakdown(BaseModel):
    """
    What one usage record costs, component by component.

    ``total`` and ``credits`` are always derived from the components (when built directly,
    a given ``total`` or ``credits`` must agree with them), so no two figures can disagree.

    Attributes:
        model_credits: The model expression's result.
        tool_credits: The sum of the tool expressions' results.
        search_credits: The sum of the search expressions' results.
        cache_savings: The sum of the cache expressions' results. Signed: usually
            negative, since cache expressions are mostly discounts. Also readable as
            ``cache_credits``.
        fixed_credits: The fixed cost of the record's job, if any.
        total: The sum of the components, clamped at 0.
        credits: ``total`` rounded once to whole credits by ``rounding``.
        model: The pricing key the model name resolved to (a key of ``models`` or of the
            plan's ``rate_overrides``), or None when no model was priced.
        rounding: The rounding mode that produced ``credits``.
        breakdown: Every item that added a non-zero amount, by its config path:
            ``models.<key>`` (or ``plans.<plan>.rate_overrides.<key>``), ``tools.<name>``,
            ``tools._default``, ``search.<key>``, ``cache.<key>`` and ``fixed.<job>``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    model_credits: Decimal = _ZERO
    tool_credits: Decimal = _ZERO
    search_credits: Decimal = _ZERO
    cache_savings: Decimal = _ZERO
    fixed_credits: Decimal = _ZERO
    total: Decimal = _ZERO
    credits: int = 0
    model: str | None = None
    rounding: RoundingMode = "ceil"
    breakdown: dict[str, Decimal] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _derive_total(self) -> Self:
        total, credits = _settle(
            self.model_credits,
            self.tool_credits,
            self.search_credits,
            self.cache_savings,
            self.fixed_credits,
            self.rounding,
        )
        given = self.model_fields_set
        if "total" in given and self.total != total:
            raise ValueError(f"total {self.total} disagrees with its components' total {total}")
        if "credits" in given and self.credits != credits:
            raise ValueError(f"credits {self.credits} disagree with the components' {credits}")
        object.__setattr__(self, "total", total)
        object.__setattr__(self, "credits", credits)
        return self

    @property
    def cache_credits(self) -> Decimal:
        """The same value as ``cache_savings``."""
        return self.cache_savings


_BREAKDOWN_FIELDS: Final = frozenset(CostBreakdown.model_fields)
_new_object = object.__new__
_set_attribute = object.__setattr__


def _breakdown(
    model_credits: Decimal,
    tool_credits: Decimal,
    search_credits: Decimal,
    cache_savings: Decimal,
    fixed_credits: Decimal,
    model: str | None,
    rounding: RoundingMode,
    breakdown: dict[str, Decimal],
) -> CostBreakdown:
    """
    Build a `CostBreakdown` from values that are already valid, skipping validation.

    This is what ``CostBreakdown.model_construct`` does, at a fraction of its cost; the
    total and credits still come from `_settle`, like the validator's. The tests check
    that the result equals the validated model.
    """
    total, credits = _settle(
        model_credits, tool_credits, search_credits, cache_savings, fixed_credits, rounding
    )
    result = _new_object(CostBreakdown)
    _set_attribute(
        result,
        "__dict__",
        {
            "model_credits": model_credits,
            "tool_credits": tool_credits,
            "search_credits": search_credits,
            "cache_savings": cache_savings,
            "fixed_credits": fixed_credits,
            "total": total,
            "credits": credits,
            "model": model,
            "rounding": rounding,
            "breakdown": breakdown,
        },
    )
    _set_attribute(result, "__pydantic_fields_set__", _BREAKDOWN_FIELDS)
    _set_attribute(result, "__pydantic_extra__", None)
    _set_attribute(result, "__pydantic_private__", None)
    return result


# -- compiled config ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, eq=False)
class _Item:
    """One compiled expression of the config."""

    label: str  # where it is in the config, for errors: "models['gpt-4']"
    key: str  # the config key: a model key, tool name, search or cache key
    entry: str  # its breakdown entry: "models.gpt-4"
    expression: Expression
    variables: tuple[str, ...]
    at_zero: Decimal | None  # the value when every variable is 0, when that evaluates


def _compile(label: str, key: str, entry: str, source: object) -> _Item:
    if not isinstance(source, str):
        raise ConfigError(f"{label}: expression must be a str, not {type(source).__name__}")
    try:
        expression = compile_expression(source, _VARIABLES)
    except ExpressionError as exc:
        raise _refused(label, exc) from exc
    try:
        at_zero: Decimal | None = expression.evaluate(_ZEROS)
    except ExpressionError as exc:
        if not expression.variables:  # it fails whatever the usage: it can never price
            raise _refused(label, exc) from exc
        at_zero = None
    return _Item(label, key, entry, expression, tuple(sorted(expression.variables)), at_zero)


def _located(label: str, exc: ExpressionError) -> ExpressionError:
    """The same error with the config location in front of its message."""
    return ExpressionError(f"{label}: {exc.reason}", exc.expression, exc.position)


def _refused(label: str, exc: ExpressionError) -> ConfigExpressionError:
    """`_located` for an expression that makes the config invalid (a `ConfigError` too)."""
    return ConfigExpressionError(f"{label}: {exc.reason}", exc.expression, exc.position)


def _evaluate(item: _Item, env: dict[str, Decimal | int]) -> Decimal:
    at_zero = item.at_zero
    if at_zero is not None:
        for name in item.variables:
            if env[name]:
                break
        else:
            return at_zero
    try:
        return item.expression.evaluate(env)
    except ExpressionError as exc:
        raise _located(item.label, exc) from exc


class _Section:
    """The expressions of ``search`` or ``cache``, all evaluated and summed."""

    __slots__ = ("_at_zero", "_items", "_variables", "_zero_entries")

    def __init__(self, section: str, expressions: Mapping[str, str]) -> None:
        _check_keys(section, expressions)
        self._items = tuple(
            _compile(f"{section}[{key!r}]", key, f"{section}.{key}", source)
            for key, source in expressions.items()
        )
        # Most usage leaves every variable of a section at 0 (no search, no cache), and an
        # expression is a function of its variables alone, so that case has a known answer.
        self._at_zero: Decimal | None = None
        self._variables: tuple[str, ...] = ()
        self._zero_entries: dict[str, Decimal] = {}
        if all(item.at_zero is not None for item in self._items):
            total = _ZERO
            for item in self._items:
                assert item.at_zero is not None
                if item.at_zero:
                    total = _EXACT.add(total, item.at_zero)
                    self._zero_entries[item.entry] = item.at_zero
            self._at_zero = total
            self._variables = tuple(sorted({v for item in self._items for v in item.variables}))

    def price(self, env: dict[str, Decimal | int], breakdown: dict[str, Decimal]) -> Decimal:
        """The sum of the section's expressions; each result goes into `breakdown`."""
        at_zero = self._at_zero
        if at_zero is not None:
            for name in self._variables:
                if env[name]:
                    break
            else:
                if self._zero_entries:
                    breakdown.update(self._zero_entries)
                return at_zero
        total = _ZERO
        for item in self._items:
            value = _evaluate(item, env)
            if value:
                breakdown[item.entry] = value
                total = _EXACT.add(total, value)
        return total


def _check_keys(section: str, keys: Iterable[object]) -> None:
    for key in keys:
        if not isinstance(key, str) or not key:
            raise ConfigError(f"{section}: every key must be a non-empty str, got {shown(key)}")


class _Table:
    """A set of model expressions and the resolution of model names against it."""

    __slots__ = ("_default", "_exact", "_prefixes")

    def __init__(self, section: str, entry: str, expressions: Mapping[str, str]) -> None:
        _check_keys(section, expressions)
        self._exact = {
            key: _compile(f"{section}[{key!r}]", key, f"{entry}.{key}", source)
            for key, source in expressions.items()
        }
        self._default = self._exact.get(_DEFAULT)
        self._prefixes = tuple(
            sorted(
                ((key, item) for key, item in self._exact.items() if key != _DEFAULT),
                key=lambda pair: len(pair[0]),
                reverse=True,
            )
        )

    def find(self, name: str | None) -> _Item | None:
        """The item pricing `name`: exact key, longest prefix key, ``_default``, or None."""
        if name is None:
            return self._default
        item = self._exact.get(name)
        if item is not None:
            return item
        for key, item in self._prefixes:
            if name.startswith(key):
                return item
        return self._default


class _Resolver:
    """Model-name resolution over a plan's overrides (if any) then the base models."""

    __slots__ = ("_cache", "_tables")

    def __init__(self, *tables: _Table) -> None:
        self._tables = tables
        self._cache: dict[str | None, _Item] = {}

    def find(self, name: str | None) -> _Item | None:
        item = self._cache.get(name)
        if item is not None:
            return item
        for table in self._tables:
            item = table.find(name)
            if item is not None:
                break
        else:
            return None
        cache = self._cache
        if len(cache) >= _RESOLVED_LIMIT:
            # Another thread may evict at the same time; losing that race is harmless.
            with contextlib.suppress(KeyError, RuntimeError, StopIteration):
                del cache[next(iter(cache))]
        cache[name] = item
        return item


# -- the engine --------------------------------------------------------------------------------


class PricingEngine:
    """
    Prices usage under one pricing config; build once, then call `calculate` many times.

    The engine is immutable and safe to share between tasks and threads.

    Example:
        ```python
        engine = PricingEngine.from_dict({
            "models": {
                "gpt-4o": "input_tokens * 0.0025 + output_tokens * 0.01",
                "_default": "input_tokens * 0.001 + output_tokens * 0.003",
            },
        })
        cost = engine.calculate(UsageMetrics(model="gpt-4o-mini", input_tokens=1000))
        cost.credits  # 3: "gpt-4o" is the longest key prefixing the name
        ```
    """

    def __init__(self, config: PricingConfigData) -> None:
        """
        Compile every expression of `config`.

        Args:
            config: The pricing configuration; the engine keeps its own copy.

        Raises:
            ConfigExpressionError: An expression cannot be compiled (bad syntax, an unknown
                variable or function), or has no variables and fails to evaluate. The
                message starts with the expression's place, e.g. ``models['gpt-4']: ``.
                It is both an `ExpressionError` and a `ConfigError`.
            ConfigError: `config` is not a `PricingConfigData`, or a section has an empty
                key.
        """
        if not isinstance(config, PricingConfigData):
            raise ConfigError(
                f"config must be a PricingConfigData, not {type(config).__name__}; "
                "use PricingEngine.from_dict for a dict"
            )
        config = config.model_copy(deep=True)
        self._config = config
        self._rounding: RoundingMode = config.rounding
        self._models = _Table("models", "models", config.models)
        self._base = _Resolver(self._models)

        _check_keys("tools", config.tools)
        tools = {
            name: _compile(f"tools[{name!r}]", name, f"tools.{name}", source)
            for name, source in config.tools.items()
        }
        self._tool_default = tools.pop(_DEFAULT, None)
        self._tools = tools

        self._search = _Section("search", config.search)
        self._cache = _Section("cache", config.cache)

        _check_keys("fixed", config.fixed)
        self._fixed = {job: (Decimal(cost), f"fixed.{job}") for job, cost in config.fixed.items()}

        self._plans: dict[str, _Resolver | None] = {}
        self._plan_sources: dict[str, dict[str, str]] = {}
        for plan_key, plan in (config.plans or {}).items():
            overrides = plan.rate_overrides or {}
            resolver = self._plan_resolver(f"plans[{plan_key!r}]", plan.id, overrides)
            for name in {plan_key, plan.id}:
                self._plans[name] = resolver
                self._plan_sources[name] = overrides
        self._adhoc: dict[tuple[str, tuple[tuple[str, str], ...]], _Resolver | None] = {}

    def _plan_resolver(
        self, label: str, plan_id: str, overrides: Mapping[str, str]
    ) -> _Resolver | None:
        if not overrides:
            return None
        table = _Table(f"{label}.rate_overrides", f"plans.{plan_id}.rate_overrides", overrides)
        return _Resolver(table, self._models)

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: PricingConfigData) -> PricingEngine:
        """
        Build an engine from a validated config.

        Args:
            config: The pricing configuration.

        Returns:
            The engine.

        Raises:
            ExpressionError: See `PricingEngine`.
            InvalidArgumentError: See `PricingEngine`.
        """
        return cls(config)

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> PricingEngine:
        """
        Build an engine from a config in its dict form, as ducto 1.x wrote them.

        Args:
            data: The config: ``models`` and optionally ``tools``, ``search``, ``cache``,
                ``fixed``, ``min_balance``, ``plans``, ``rounding`` and ``version``.

        Returns:
            The engine.

        Raises:
            ConfigError: The dict is not a valid config (unknown or missing keys, wrong
                types), or an expression is refused (`ConfigExpressionError`).
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"config must be a mapping, not {type(data).__name__}")
        try:
            config = PricingConfigData.model_validate(dict(data))
        except ValidationError as exc:
            raise ConfigError(_describe(exc)) from exc
        return cls(config)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> PricingEngine:
        """
        Build an engine from a YAML (or JSON) file holding a config.

        Needs PyYAML, which ducto does not depend on: ``pip install pyyaml``.

        Args:
            path: The file to read, UTF-8.

        Returns:
            The engine.

        Raises:
            InvalidArgumentError: PyYAML is not installed, the file is not valid YAML, or
                its content is not a valid config.
            OSError: The file cannot be read.
        """
        try:
            yaml = importlib.import_module("yaml")
        except ImportError as exc:
            raise InvalidArgumentError(
                "PricingEngine.from_yaml needs PyYAML: install it with 'pip install pyyaml'"
            ) from exc
        text = Path(path).read_text(encoding="utf-8")
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{os.fspath(path)!r} is not valid YAML: {exc}") from exc
        if not isinstance(data, Mapping):
            raise ConfigError(f"{os.fspath(path)!r} must hold a mapping, not {type(data).__name__}")
        return cls.from_dict(data)

    # -- the config --------------------------------------------------------------------------

    @property
    def config(self) -> PricingConfigData:
        """A copy of the configuration the engine prices with."""
        return self._config.model_copy(deep=True)

    def pricing_schema(self) -> PricingConfigData:
        """The same as `config`; the ducto 1.x name."""
        return self.config

    @property
    def min_balance(self) -> int:
        """The balance users must keep: holds may not take them below it."""
        return self._config.min_balance

    @property
    def rounding(self) -> RoundingMode:
        """How totals become whole credits."""
        return self._rounding

    def has_model(self, name: str) -> bool:
        """
        Whether `name` is a key of ``models`` (an exact match; see `resolve_model`).

        Args:
            name: A model name.

        Returns:
            True when ``models`` has exactly this key.
        """
        return name in self._config.models

    def resolve_model(self, name: str | None) -> str:
        """
        The ``models`` key that prices `name`.

        Args:
            name: A model name as the provider reports it, or None for ``_default``.

        Returns:
            `name` itself when it is a key, else the longest key that is a prefix of it,
            else ``_default``.

        Raises:
            InvalidArgumentError: Nothing prices `name`: no key matches it and there is no
                ``_default``.
        """
        if name is not None and not isinstance(name, str):
            raise InvalidArgumentError(f"model name must be a str, not {type(name).__name__}")
        item = self._base.find(name)
        if item is None:
            raise _unpriced(name)
        return item.key

    def get_fixed_cost(self, job: str) -> int:
        """
        The cost of a fixed-cost job.

        Args:
            job: A key of the ``fixed`` section.

        Returns:
            Its cost in credits.

        Raises:
            InvalidArgumentError: The job is not in the ``fixed`` section.
        """
        fixed = self._fixed.get(job)
        if fixed is None:
            raise _unknown_job(job)
        return int(fixed[0])

    # -- pricing -----------------------------------------------------------------------------

    def _resolver(self, plan: PlanDefinition | str | None) -> _Resolver:
        if plan is None:
            return self._base
        if isinstance(plan, str):
            if plan not in self._plans:
                raise InvalidArgumentError(f"plan {shown(plan)} is not in the pricing config")
            return self._plans[plan] or self._base
        if not isinstance(plan, PlanDefinition):
            raise InvalidArgumentError(
                f"plan must be a PlanDefinition, a plan id or None, not {type(plan).__name__}"
            )
        overrides = plan.rate_overrides or {}
        if plan.id in self._plans and self._plan_sources[plan.id] == overrides:
            return self._plans[plan.id] or self._base
        # A plan this config does not define (or defines differently): compile its own.
        adhoc_key = (plan.id, tuple(overrides.items()))
        if adhoc_key in self._adhoc:
            return self._adhoc[adhoc_key] or self._base
        resolver = self._plan_resolver(f"plans[{plan.id!r}]", plan.id, overrides)
        if len(self._adhoc) >= _ADHOC_PLAN_LIMIT:
            self._adhoc.clear()
        self._adhoc[adhoc_key] = resolver
        return resolver or self._base

    def calculate(
        self, metrics: UsageMetrics, *, plan: PlanDefinition | str | None = None
    ) -> CostBreakdown:
        """
        Price one usage record.

        Args:
            metrics: What the call used.
            plan: The user's plan, or its id in this config's ``plans``; its
                ``rate_overrides`` replace the model expressions. None prices at the base
                rates.

        Returns:
            The components, their clamped total and the credits to charge.

        Raises:
            InvalidArgumentError: The model cannot be priced (no key matches it and there
                is no ``_default``), a tool has no price and there is no tools
                ``_default``, the fixed job is unknown, the plan id is unknown, or the
                arguments have the wrong type.
            ExpressionError: An expression failed on these metrics (division by zero, a
                value out of range); the message names the expression's place.
        """
        if not isinstance(metrics, UsageMetrics):
            raise InvalidArgumentError(
                f"metrics must be UsageMetrics, not {type(metrics).__name__}"
            )
        resolver = self._base if plan is None else self._resolver(plan)
        env = metrics._environment()
        breakdown: dict[str, Decimal] = {}

        name = metrics.model
        item = resolver.find(name)
        if item is not None:
            try:
                model_credits = item.expression.evaluate(env)
            except ExpressionError as exc:
                raise _located(item.label, exc) from exc
            if model_credits:
                breakdown[item.entry] = model_credits
            model_key: str | None = item.key
        elif metrics.fixed_job is not None and not any(env[n] for n in _TOKEN_COUNTERS):
            # A pure fixed-cost job: no model and no tokens, so nothing for a model to price.
            model_credits, model_key = _ZERO, None
        else:
            raise _unpriced(name)

        search_credits = self._search.price(env, breakdown)
        cache_savings = self._cache.price(env, breakdown)

        fixed_credits = _ZERO
        job = metrics.fixed_job
        if job is not None:
            fixed = self._fixed.get(job)
            if fixed is None:
                raise _unknown_job(job)
            fixed_credits, entry = fixed
            if fixed_credits:
                breakdown[entry] = fixed_credits

        tool_credits = _ZERO
        if env["tool_calls"]:
            tool_credits = self._price_tools(metrics, env, breakdown)

        return _breakdown(
            model_credits,
            tool_credits,
            search_credits,
            cache_savings,
            fixed_credits,
            model_key,
            self._rounding,
            breakdown,
        )

    def _price_tools(
        self, metrics: UsageMetrics, env: dict[str, Decimal | int], breakdown: dict[str, Decimal]
    ) -> Decimal:
        """Price each named tool's calls, then the rest with ``_default``; sets tool_calls."""
        counts: dict[str, int] = {}
        try:
            for call in metrics.tool_calls:
                counts[call.name] = counts.get(call.name, 0) + 1
        except (AttributeError, TypeError) as exc:  # the list was changed in place
            raise InvalidArgumentError(f"tool_calls must hold ToolCall objects: {exc}") from exc
        tools = self._tools
        total = _ZERO
        unpriced = 0
        for name, count in counts.items():
            item = tools.get(name)
            if item is None:
                unpriced += count
                continue
            env["tool_calls"] = count
            value = _evaluate(item, env)
            if value:
                breakdown[item.entry] = value
                total = _EXACT.add(total, value)
        if unpriced:
            default = self._tool_default
            if default is None:
                names = sorted(name for name in counts if name not in tools)
                raise InvalidArgumentError(
                    f"no price for tool {', '.join(map(repr, names))}: "
                    "tools has no such key and no '_default'"
                )
            env["tool_calls"] = unpriced
            value = _evaluate(default, env)
            if value:
                breakdown[default.entry] = value
                total = _EXACT.add(total, value)
        return total

    def calculate_batch(
        self, metrics: Iterable[UsageMetrics], *, plan: PlanDefinition | str | None = None
    ) -> list[CostBreakdown]:
        """
        Price several usage records, each on its own (each is rounded separately).

        Use `total_credits` for what the whole batch charges.

        Args:
            metrics: The usage records.
            plan: As for `calculate`, applied to every record.

        Returns:
            One `CostBreakdown` per record, in order.

        Raises:
            InvalidArgumentError: As for `calculate`, for the first record that fails.
            ExpressionError: As for `calculate`.
        """
        return [self.calculate(record, plan=plan) for record in metrics]

    @staticmethod
    def total_credits(breakdowns: Iterable[CostBreakdown]) -> int:
        """
        What a batch charges: the sum of each breakdown's ``credits``.

        Args:
            breakdowns: Results of `calculate` or `calculate_batch`.

        Returns:
            The sum of their credits.
        """
        return sum(breakdown.credits for breakdown in breakdowns)


def _unpriced(name: str | None) -> InvalidArgumentError:
    if name is None:
        return InvalidArgumentError("no price for usage without a model: models has no '_default'")
    return InvalidArgumentError(
        f"no price for model {name!r}: no models key equals or prefixes it "
        "and there is no '_default'"
    )


def _unknown_job(job: str) -> InvalidArgumentError:
    return InvalidArgumentError(f"fixed job {job!r} is not in the pricing config's fixed section")


def validate_pricing_config(config: PricingConfigData | Mapping[str, object]) -> None:
    """
    Check that an engine can price with `config`, by building one.

    Stores and managers call this before publishing a config, so that a config which
    cannot be priced is refused then rather than when usage arrives.

    Args:
        config: The config, validated or in its dict form.

    Raises:
        ConfigExpressionError: An expression is refused; the message names its section
            and key.
        ConfigError: The config is invalid.
    """
    if isinstance(config, PricingConfigData):
        PricingEngine(config)
    else:
        PricingEngine.from_dict(config)


def evaluate_expression(
    expression: str, variables: Mapping[str, Decimal | int | float] | None = None
) -> Decimal:
    """
    Compile and evaluate a pricing expression once (ducto 1.x's helper).

    To evaluate one expression many times, compile it once with `compile_expression`.

    Args:
        expression: The expression text, e.g. ``"input_tokens * 0.005 + 2"``.
        variables: The value of each variable the expression may use; the expression
            may name no others. Ints and `Decimal`s are used as they are; a finite float
            is read as the decimal it prints as (``0.1`` is ``Decimal("0.1")``).

    Returns:
        The exact result, a `Decimal`.

    Raises:
        ExpressionError: The expression is malformed, uses a variable not in `variables`,
            or fails on these values (division by zero, a value out of range).
    """
    env: dict[str, Decimal | int] = {}
    if variables is not None:
        if not isinstance(variables, Mapping):
            raise ExpressionError(
                f"variables must be a mapping of names to numbers, not {type(variables).__name__}"
            )
        for name, value in variables.items():
            if isinstance(value, float) and not isinstance(value, bool):
                if value != value or value in (float("inf"), float("-inf")):
                    raise ExpressionError(f"variable {name!r} is not a finite number")
                env[name] = Decimal(repr(value))
            else:
                env[name] = value
    compiled = compile_expression(expression, env.keys())
    return compiled.evaluate(env)


def validate_expression(
    expression: str, allowed_names: Collection[str] | None = _VARIABLES
) -> None:
    """
    Check that a pricing expression compiles (ducto 1.x's helper); raise if it does not.

    Args:
        expression: The expression text.
        allowed_names: The only variable names it may use: by default the usage counters a
            pricing config's expressions may read; None allows any name.

    Raises:
        ExpressionError: The expression is malformed, too long or too deep, calls an unknown
            function or a function with the wrong number of arguments, or uses a variable
            not in `allowed_names`. ``position`` is the offset of the problem.
    """
    compile_expression(expression, allowed_names)
