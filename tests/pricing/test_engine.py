"""Tests for the pricing engine: 1.x configs, every section, resolution, rounding and errors."""

from __future__ import annotations

import re
import sys
import types
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from ducto.errors import ExpressionError, InvalidArgumentError
from ducto.interface.models import PlanDefinition, PricingConfigData
from ducto.pricing import (
    CostBreakdown,
    PricingEngine,
    ToolCall,
    UsageMetrics,
    validate_pricing_config,
)
from ducto.pricing.metrics import METRIC_VARIABLES

# The flat example of the ducto 1.x documentation, unchanged.
FLAT_1X: dict[str, Any] = {
    "version": 1,
    "models": {
        "gpt-4": "input_tokens * 0.01 + output_tokens * 0.03",
        "_default": "input_tokens * 0.001 + output_tokens * 0.003",
    },
    "tools": {
        "_default": "tool_calls * 5 / 1000",
        "code_exec": "tool_calls * 10 / 1000",
    },
    "search": {"costs": "search_queries * 0.5 + search_results * 0.05"},
    "cache": {"discount": "-cache_read_tokens * 0.0045"},
    "fixed": {"batch_train": 100, "daily_report": 10},
    "min_balance": 5,
}

# The plan-based example of the ducto 1.x documentation, with a gpt-4 model added.
PLANS_1X: dict[str, Any] = {
    "version": 1,
    "models": {
        "gpt-4": "input_tokens * (0.03 / 1000) + output_tokens * (0.06 / 1000)",
        "_default": "input_tokens * (0.01 / 1000) + output_tokens * (0.03 / 1000)",
    },
    "plans": {
        "free": {
            "id": "free",
            "name": "Free Tier",
            "free_allowance": 50000,
            "rate_overrides": {
                "_default": "input_tokens * (0.02 / 1000) + output_tokens * (0.06 / 1000)"
            },
            "features": {"max_concurrency": 1, "max_context": 4096},
        },
        "pro": {
            "id": "pro",
            "name": "Pro Plan",
            "free_allowance": 500000,
            "rate_overrides": {
                "gpt-4": "input_tokens * (0.005 / 1000) + output_tokens * (0.015 / 1000)"
            },
        },
    },
}


def engine_for(models: dict[str, str], **sections: Any) -> PricingEngine:
    return PricingEngine.from_dict({"models": models, **sections})


def calls(*names: str) -> list[ToolCall]:
    return [ToolCall(name=name) for name in names]


# -- ducto 1.x configs -------------------------------------------------------------------------


def test_flat_1x_config_prices_the_documented_call() -> None:
    """The 1.x README call (gpt-4, 500 in, 200 out) costs exactly 11 credits."""
    engine = PricingEngine.from_dict(FLAT_1X)

    cost = engine.calculate(UsageMetrics(model="gpt-4", input_tokens=500, output_tokens=200))

    assert Decimal("11") == cost.model_credits
    assert Decimal("11") == cost.total
    assert 11 == cost.credits
    assert "gpt-4" == cost.model
    assert {"models.gpt-4": Decimal("11")} == cost.breakdown


def test_flat_1x_config_prices_every_section_at_once() -> None:
    """A call using a prefixed model, tools, search and cache sums every component exactly."""
    engine = PricingEngine.from_dict(FLAT_1X)
    metrics = UsageMetrics(
        model="gpt-4-0613",
        input_tokens=500,
        output_tokens=200,
        cache_read_tokens=1000,
        tool_calls=calls("code_exec", "browser", "code_exec", "calculator", "browser"),
        search_queries=2,
        search_results=10,
    )

    cost = engine.calculate(metrics)

    assert Decimal("11") == cost.model_credits
    assert Decimal("0.035") == cost.tool_credits
    assert Decimal("1.5") == cost.search_credits
    assert Decimal("-4.5") == cost.cache_savings
    assert Decimal("0") == cost.fixed_credits
    assert Decimal("8.035") == cost.total
    assert 9 == cost.credits
    assert {
        "models.gpt-4": Decimal("11"),
        "tools.code_exec": Decimal("0.02"),
        "tools._default": Decimal("0.015"),
        "search.costs": Decimal("1.5"),
        "cache.discount": Decimal("-4.5"),
    } == cost.breakdown


def test_flat_1x_config_defaults_other_models() -> None:
    """A model with no key of its own is priced by ``_default``."""
    engine = PricingEngine.from_dict(FLAT_1X)

    cost = engine.calculate(
        UsageMetrics(model="claude-opus-4", input_tokens=1000, output_tokens=2000)
    )

    assert Decimal("7") == cost.total
    assert 7 == cost.credits
    assert "_default" == cost.model


def test_flat_1x_config_fixed_job() -> None:
    """A fixed job adds its whole-credit cost to whatever else the record used."""
    engine = PricingEngine.from_dict(FLAT_1X)

    cost = engine.calculate(UsageMetrics(model="gpt-4", input_tokens=100, fixed_job="daily_report"))

    assert Decimal("10") == cost.fixed_credits
    assert Decimal("11") == cost.total
    assert 11 == cost.credits
    assert Decimal("10") == cost.breakdown["fixed.daily_report"]
    assert 100 == engine.get_fixed_cost("batch_train")
    assert 5 == engine.min_balance


def test_1x_configs_load_unchanged() -> None:
    """Both documented 1.x configs build, and their engines keep the config."""
    flat = PricingEngine.from_dict(FLAT_1X)
    plans = PricingEngine.from_dict(PLANS_1X)

    assert PricingConfigData.model_validate(FLAT_1X) == flat.config
    assert PricingConfigData.model_validate(PLANS_1X) == plans.pricing_schema()
    assert "ceil" == flat.rounding


def test_omitted_tools_section_makes_tools_free() -> None:
    """Without a tools section, the 1.x default ``tool_calls * 0`` prices every tool at 0."""
    engine = engine_for({"_default": "input_tokens * 1"})

    cost = engine.calculate(UsageMetrics(input_tokens=3, tool_calls=calls("a", "b")))

    assert Decimal("0") == cost.tool_credits
    assert 3 == cost.credits


# -- model resolution --------------------------------------------------------------------------

PREFIX_MODELS = {
    "gpt-4o-mini": "input_tokens * 1",
    "gpt-4": "input_tokens * 3",
    "_default": "input_tokens * 4",
    "gpt-4o": "input_tokens * 2",
}


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("gpt-4o-mini", "gpt-4o-mini"),
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("gpt-4o", "gpt-4o"),
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("gpt-4-turbo", "gpt-4"),
        ("gpt-4", "gpt-4"),
        ("gpt-3.5-turbo", "_default"),
        ("gpt", "_default"),
        ("_default", "_default"),
        (None, "_default"),
    ],
)
def test_resolution_is_exact_then_longest_prefix_then_default(
    name: str | None, expected: str
) -> None:
    """Whatever the key order, the exact key wins, then the longest prefix, then _default."""
    engine = engine_for(PREFIX_MODELS)
    rates = {"gpt-4o-mini": 1, "gpt-4o": 2, "gpt-4": 3, "_default": 4}

    cost = engine.calculate(UsageMetrics(model=name, input_tokens=10))

    assert expected == engine.resolve_model(name)
    assert expected == cost.model
    assert Decimal(10 * rates[expected]) == cost.model_credits


def test_has_model_is_an_exact_match() -> None:
    """has_model answers for config keys only, not for names a prefix would price."""
    engine = engine_for(PREFIX_MODELS)

    assert True is engine.has_model("gpt-4o")
    assert False is engine.has_model("gpt-4o-2024-08-06")


@pytest.mark.parametrize("name", ["claude-3", "gpt", None])
def test_unknown_model_without_default_is_refused(name: str | None) -> None:
    """A model nothing prices raises rather than being free."""
    engine = engine_for({"gpt-4": "input_tokens * 1"})

    with pytest.raises(InvalidArgumentError, match="no price for"):
        engine.calculate(UsageMetrics(model=name, input_tokens=1))
    with pytest.raises(InvalidArgumentError, match="no price for"):
        engine.resolve_model(name)


def test_pure_fixed_job_needs_no_model_price() -> None:
    """A job with no model and no tokens is priced by its fixed cost alone."""
    engine = engine_for({"gpt-4": "input_tokens * 1"}, fixed={"nightly": 40})

    cost = engine.calculate(UsageMetrics(fixed_job="nightly"))

    assert Decimal("40") == cost.total
    assert 40 == cost.credits
    assert None is cost.model


def test_fixed_job_with_unpriced_tokens_is_refused() -> None:
    """Tokens without a model price are refused even when the record names a fixed job."""
    engine = engine_for({"gpt-4": "input_tokens * 1"}, fixed={"nightly": 40})

    with pytest.raises(InvalidArgumentError, match="no price for usage without a model"):
        engine.calculate(UsageMetrics(fixed_job="nightly", input_tokens=5))


def test_resolution_cache_is_bounded() -> None:
    """Pricing many distinct model names keeps a bounded resolution cache."""
    engine = engine_for(PREFIX_MODELS)

    for i in range(3000):
        engine.calculate(UsageMetrics(model=f"gpt-4o-{i}", input_tokens=1))

    assert 1024 >= len(engine._base._cache)
    assert "gpt-4o" == engine.resolve_model("gpt-4o-7")


# -- tools -------------------------------------------------------------------------------------


def test_each_tool_is_priced_once_by_its_own_or_the_default_expression() -> None:
    """Named tools see their own call count; the rest are priced together by _default."""
    engine = engine_for(
        {"_default": "input_tokens * 0"},
        tools={
            "search": "tool_calls * 2",
            "image": "tier(tool_calls, 1, 10, 7)",
            "_default": "tool_calls * 100",
        },
    )
    metrics = UsageMetrics(tool_calls=calls("search", "x", "search", "image", "y", "x", "search"))

    cost = engine.calculate(metrics)

    assert {
        "tools.search": Decimal("6"),
        "tools.image": Decimal("10"),
        "tools._default": Decimal("300"),
    } == cost.breakdown
    assert Decimal("316") == cost.tool_credits
    assert 316 == cost.credits


def test_tools_that_were_not_called_are_not_evaluated() -> None:
    """A tool with no calls costs nothing, even if its expression would fail or cost a constant."""
    engine = engine_for(
        {"_default": "input_tokens * 1"},
        tools={"ratio": "10 / tool_calls", "flat": "25", "_default": "1 / tool_calls"},
    )

    cost = engine.calculate(UsageMetrics(input_tokens=2))

    assert Decimal("0") == cost.tool_credits
    assert {"models._default": Decimal("2")} == cost.breakdown


def test_other_expressions_see_the_total_tool_call_count() -> None:
    """Model, search and cache expressions read tool_calls as the number of all calls."""
    engine = engine_for(
        {"_default": "tool_calls * 1"},
        tools={"_default": "tool_calls * 0"},
        search={"per_call": "tool_calls * 10"},
    )

    cost = engine.calculate(UsageMetrics(tool_calls=calls("a", "b", "a")))

    assert Decimal("3") == cost.model_credits
    assert Decimal("30") == cost.search_credits


def test_unpriced_tool_without_default_is_refused() -> None:
    """A tool with no entry and no tools _default raises rather than being free."""
    engine = engine_for({"_default": "input_tokens * 1"}, tools={"search": "tool_calls * 2"})

    assert 2 == engine.calculate(UsageMetrics(tool_calls=calls("search"))).credits
    with pytest.raises(InvalidArgumentError, match="no price for tool 'browser'"):
        engine.calculate(UsageMetrics(tool_calls=calls("search", "browser")))


# -- search, cache, fixed ----------------------------------------------------------------------


def test_search_and_cache_sum_all_their_expressions() -> None:
    """Every search and cache expression is evaluated and the results are summed."""
    engine = engine_for(
        {"_default": "input_tokens * 0.01"},
        search={
            "queries": "search_queries * 0.5",
            "results": "search_results * 0.05",
            "web": "web_search_calls * 2 + code_exec_calls * 3",
        },
        cache={"read": "-cache_read_tokens * 0.001", "write": "cache_write_tokens * 0.002"},
    )
    metrics = UsageMetrics(
        input_tokens=1000,
        search_queries=3,
        search_results=7,
        web_search_calls=1,
        code_exec_calls=2,
        cache_read_tokens=2000,
        cache_write_tokens=500,
    )

    cost = engine.calculate(metrics)

    assert Decimal("9.85") == cost.search_credits
    assert Decimal("-1") == cost.cache_savings
    assert Decimal("-1") == cost.cache_credits
    assert Decimal("18.85") == cost.total
    assert 19 == cost.credits


def test_constant_search_price_applies_without_usage() -> None:
    """A search expression with a constant part charges it even when nothing was searched."""
    engine = engine_for({"_default": "input_tokens * 0"}, search={"base": "0.5 + search_queries"})

    cost = engine.calculate(UsageMetrics())

    assert Decimal("0.5") == cost.search_credits
    assert {"search.base": Decimal("0.5")} == cost.breakdown
    assert 1 == cost.credits


def test_unknown_fixed_job_is_refused() -> None:
    """A fixed job that the config does not list raises rather than being free."""
    engine = PricingEngine.from_dict(FLAT_1X)

    with pytest.raises(InvalidArgumentError, match="'weekly'"):
        engine.get_fixed_cost("weekly")
    with pytest.raises(InvalidArgumentError, match="'weekly'"):
        engine.calculate(UsageMetrics(model="gpt-4", fixed_job="weekly"))


def test_discount_larger_than_the_cost_clamps_the_total_at_zero() -> None:
    """A negative sum is charged as 0, never paid out; the components stay as computed."""
    engine = PricingEngine.from_dict(FLAT_1X)

    cost = engine.calculate(UsageMetrics(model="gpt-4", input_tokens=10, cache_read_tokens=1000))

    assert Decimal("0.1") == cost.model_credits
    assert Decimal("-4.5") == cost.cache_savings
    assert Decimal("0") == cost.total
    assert 0 == cost.credits


# -- plans -------------------------------------------------------------------------------------


def test_plan_override_replaces_the_model_expression() -> None:
    """A pro user's gpt-4 call is priced by the pro override, not by the base expression."""
    engine = PricingEngine.from_dict(PLANS_1X)
    metrics = UsageMetrics(model="gpt-4-32k", input_tokens=10_000, output_tokens=2_000)

    base = engine.calculate(metrics)
    pro = engine.calculate(metrics, plan="pro")

    assert Decimal("0.42") == base.model_credits
    assert Decimal("0.08") == pro.model_credits
    assert "gpt-4" == pro.model
    assert {"plans.pro.rate_overrides.gpt-4": Decimal("0.08")} == pro.breakdown
    assert 1 == pro.credits


def test_plan_without_a_matching_override_uses_the_base_models() -> None:
    """A pro user's call to a model the plan does not override costs the base rate."""
    engine = PricingEngine.from_dict(PLANS_1X)
    metrics = UsageMetrics(model="claude-3", input_tokens=10_000, output_tokens=2_000)

    assert engine.calculate(metrics) == engine.calculate(metrics, plan="pro")


def test_override_default_applies_before_base_keys() -> None:
    """Override keys resolve first, so a plan's _default prices even a model with a base key."""
    engine = PricingEngine.from_dict(PLANS_1X)
    metrics = UsageMetrics(model="gpt-4", input_tokens=10_000, output_tokens=2_000)

    free = engine.calculate(metrics, plan="free")

    assert Decimal("0.32") == free.model_credits
    assert "_default" == free.model
    assert {"plans.free.rate_overrides._default": Decimal("0.32")} == free.breakdown


def test_override_replaces_a_base_expression_that_would_fail() -> None:
    """The base expression is not evaluated at all when an override prices the model."""
    engine = engine_for(
        {"_default": "input_tokens / output_tokens"},
        plans={"p": {"id": "p", "name": "P", "rate_overrides": {"_default": "input_tokens * 1"}}},
    )
    metrics = UsageMetrics(input_tokens=5)

    with pytest.raises(ExpressionError, match="models\\['_default'\\]: division by zero"):
        engine.calculate(metrics)
    assert 5 == engine.calculate(metrics, plan="p").credits


def test_plan_can_be_given_as_definition_or_id() -> None:
    """A config plan, its id, and an equal PlanDefinition price the same."""
    engine = PricingEngine.from_dict(PLANS_1X)
    pro = PlanDefinition.model_validate(PLANS_1X["plans"]["pro"])
    metrics = UsageMetrics(model="gpt-4", input_tokens=10_000)

    assert engine.calculate(metrics, plan="pro") == engine.calculate(metrics, plan=pro)


def test_plan_outside_the_config_uses_its_own_overrides() -> None:
    """A PlanDefinition that differs from the config's is priced by its own overrides."""
    engine = PricingEngine.from_dict(PLANS_1X)
    custom = PlanDefinition(id="pro", name="Pro", rate_overrides={"gpt": "input_tokens * 1"})
    bare = PlanDefinition(id="team", name="Team")
    metrics = UsageMetrics(model="gpt-4", input_tokens=7)

    assert Decimal("7") == engine.calculate(metrics, plan=custom).model_credits
    assert engine.calculate(metrics) == engine.calculate(metrics, plan=bare)


def test_bad_override_of_a_plan_outside_the_config_names_it() -> None:
    """An ad hoc plan's override that does not compile is refused with its place named."""
    engine = PricingEngine.from_dict(PLANS_1X)
    custom = PlanDefinition(id="x", name="X", rate_overrides={"gpt": "input_tokens +"})

    with pytest.raises(ExpressionError, match=r"plans\['x'\]\.rate_overrides\['gpt'\]"):
        engine.calculate(UsageMetrics(model="gpt-4"), plan=custom)


def test_unknown_plan_id_is_refused() -> None:
    """A plan id that the config does not define raises."""
    engine = PricingEngine.from_dict(PLANS_1X)

    with pytest.raises(InvalidArgumentError, match="'enterprise'"):
        engine.calculate(UsageMetrics(model="gpt-4"), plan="enterprise")


# -- rounding ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rounding", "tokens", "expected"),
    [
        ("ceil", 1, 1),
        ("ceil", 30000, 3),
        ("ceil", 30001, 4),
        ("ceil", 25000, 3),
        ("floor", 29999, 2),
        ("floor", 30000, 3),
        ("half_up", 25000, 3),
        ("half_up", 35000, 4),
        ("half_up", 24999, 2),
        ("half_even", 25000, 2),
        ("half_even", 35000, 4),
        ("half_even", 25001, 3),
        ("floor", 0, 0),
    ],
)
def test_rounding_modes(rounding: str, tokens: int, expected: int) -> None:
    """The total (tokens / 10000) becomes credits once, by the configured mode."""
    engine = engine_for({"_default": "input_tokens * 0.0001"}, rounding=rounding)

    cost = engine.calculate(UsageMetrics(input_tokens=tokens))

    assert Decimal(tokens) / 10000 == cost.total
    assert expected == cost.credits
    assert rounding == cost.rounding


def test_ceil_of_the_smallest_cost_is_one_credit() -> None:
    """A cost of 0.0001 credits is charged as 1 credit under the default rounding."""
    engine = engine_for({"_default": "input_tokens * 0.0001"})

    cost = engine.calculate(UsageMetrics(input_tokens=1))

    assert Decimal("0.0001") == cost.total
    assert 1 == cost.credits


def test_components_are_summed_exactly_before_rounding() -> None:
    """Components 59 orders of magnitude apart add up exactly, so ceil still sees the excess."""
    engine = engine_for(
        {"_default": "input_tokens * 1000000000000"},
        search={"tiny": "search_queries * 0.000000000000000000000000000001"},
    )

    cost = engine.calculate(UsageMetrics(input_tokens=10**17, search_queries=1))

    assert Decimal(f"{10**29}.{'0' * 29}1") == cost.total
    assert 10**29 + 1 == cost.credits


# -- config errors -----------------------------------------------------------------------------


def bad(section: str, key: str, source: str) -> dict[str, Any]:
    config: dict[str, Any] = {"models": {"_default": "input_tokens * 1"}}
    if section == "plans":
        config["plans"] = {"pro": {"id": "pro", "name": "Pro", "rate_overrides": {key: source}}}
    else:
        config.setdefault(section, {})[key] = source
    return config


@pytest.mark.parametrize(
    ("config", "message", "position"),
    [
        (
            bad("models", "gpt-4", "input_tokens * foo"),
            "models['gpt-4']: unknown variable 'foo' at position 15",
            15,
        ),
        (bad("models", "gpt-4", "input_tokens *"), "models['gpt-4']: unexpected end", 14),
        (bad("tools", "code_exec", "tool_calls ** 2"), "tools['code_exec']: '**'", 11),
        (bad("search", "web", "searches * 2"), "search['web']: unknown variable 'searches'", 0),
        (bad("cache", "discount", "-1 / 0"), "cache['discount']: division by zero", 3),
        (
            bad("plans", "gpt-4", "output_tokens * (0.1"),
            "plans['pro'].rate_overrides['gpt-4']: '(' was never closed",
            16,
        ),
        (bad("models", "x", "sqrt(input_tokens)"), "models['x']: unknown function 'sqrt'", 0),
    ],
)
def test_bad_expression_is_refused_at_build_naming_its_place(
    config: dict[str, Any], message: str, position: int
) -> None:
    """An expression the engine cannot price is refused when the engine is built."""
    with pytest.raises(ExpressionError) as info:
        PricingEngine.from_dict(config)

    assert str(info.value).startswith(message)
    assert position == info.value.position
    with pytest.raises(ExpressionError, match=re.escape(message)):
        validate_pricing_config(PricingConfigData.model_validate(config))


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"models": {}}, "models"),
        ({"models": {"": "input_tokens"}}, "models: every key must be a non-empty str"),
        ({"models": {"a": "1"}, "tools": {"": "1"}}, "tools: every key"),
        ({"models": {"a": "1"}, "fixed": {"": 1}}, "fixed: every key"),
        ({"modelz": {"a": "1"}}, "modelz: Extra inputs are not permitted"),
        ({"models": {"a": 1}}, "models.a: Input should be a valid string"),
        ({"models": {"a": "1"}, "rounding": "up"}, "rounding"),
        ({"models": {"a": "1"}, "fixed": {"job": -1}}, "fixed"),
    ],
)
def test_invalid_config_is_refused(config: dict[str, Any], message: str) -> None:
    """A config that is not well-formed raises InvalidArgumentError naming the problem."""
    with pytest.raises(InvalidArgumentError, match=re.escape(message)):
        PricingEngine.from_dict(config)
    with pytest.raises(InvalidArgumentError):
        validate_pricing_config(config)


def test_validate_pricing_config_accepts_priceable_configs() -> None:
    """validate_pricing_config accepts, without raising, configs the engine can price."""
    validate_pricing_config(PricingConfigData.model_validate(FLAT_1X))
    validate_pricing_config(PLANS_1X)


def test_engine_refuses_a_config_that_is_not_pricing_config_data() -> None:
    """The constructor takes a PricingConfigData; dicts go through from_dict."""
    with pytest.raises(InvalidArgumentError, match="from_dict"):
        PricingEngine(FLAT_1X)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError):
        PricingEngine.from_dict([("models", {})])  # type: ignore[arg-type]


def test_expression_failing_on_usage_names_its_place() -> None:
    """An expression that fails for one record raises an error naming it, at calculate time."""
    engine = engine_for({"gpt": "input_tokens / output_tokens"})

    assert 2 == engine.calculate(UsageMetrics(model="gpt", input_tokens=4, output_tokens=2)).credits
    with pytest.raises(ExpressionError, match=r"models\['gpt'\]: division by zero"):
        engine.calculate(UsageMetrics(model="gpt", input_tokens=4))


def test_engine_is_isolated_from_later_config_changes() -> None:
    """Changing the config object after building does not change the engine."""
    config = PricingConfigData.model_validate(FLAT_1X)
    engine = PricingEngine.from_config(config)
    config.models["gpt-4"] = "input_tokens * 1000"
    engine.config.models["gpt-4"] = "input_tokens * 1000"

    cost = engine.calculate(UsageMetrics(model="gpt-4", input_tokens=100))

    assert Decimal("1") == cost.total
    assert "input_tokens * 0.01 + output_tokens * 0.03" == engine.config.models["gpt-4"]


# -- YAML --------------------------------------------------------------------------------------


def test_from_yaml_without_pyyaml_explains_what_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Without PyYAML, from_yaml raises InvalidArgumentError naming the package."""
    monkeypatch.setitem(sys.modules, "yaml", None)
    path = tmp_path / "pricing.yaml"
    path.write_text("models: {_default: input_tokens}\n")

    with pytest.raises(InvalidArgumentError, match="pip install pyyaml"):
        PricingEngine.from_yaml(path)


def test_from_yaml_loads_with_safe_load(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """from_yaml passes the file to yaml.safe_load and builds the engine from the mapping."""
    seen: list[str] = []

    class YAMLError(Exception):
        pass

    def safe_load(text: str) -> object:
        seen.append(text)
        if text == "broken":
            raise YAMLError("bad indent")
        if text == "list":
            return [1]
        return FLAT_1X

    fake = types.ModuleType("yaml")
    fake.safe_load = safe_load  # type: ignore[attr-defined]
    fake.YAMLError = YAMLError  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "yaml", fake)
    path = tmp_path / "pricing.yaml"
    path.write_text("the text")

    engine = PricingEngine.from_yaml(str(path))

    assert ["the text"] == seen
    assert PricingConfigData.model_validate(FLAT_1X) == engine.config
    path.write_text("broken")
    with pytest.raises(InvalidArgumentError, match="not valid YAML: bad indent"):
        PricingEngine.from_yaml(path)
    path.write_text("list")
    with pytest.raises(InvalidArgumentError, match="must hold a mapping"):
        PricingEngine.from_yaml(path)


# -- metrics -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"input_tokens": -1}, "input_tokens"),
        ({"output_tokens": True}, "output_tokens"),
        ({"cache_read_tokens": 1.0}, "cache_read_tokens"),
        ({"cache_write_tokens": "5"}, "cache_write_tokens"),
        ({"search_queries": None}, "search_queries"),
        ({"search_results": 2**62 + 1}, "search_results"),
        ({"web_search_calls": -5}, "web_search_calls"),
        ({"code_exec_calls": 0.5}, "code_exec_calls"),
        ({"model": 4}, "model"),
        ({"fixed_job": ""}, "fixed_job"),
        ({"tool_calls": ["search"]}, "tool_calls.0"),
        ({"tool_calls": [{"name": ""}]}, "tool_calls.0.name"),
        ({"input_token": 5}, "input_token"),
    ],
)
def test_invalid_metrics_raise_naming_the_field(fields: dict[str, Any], field: str) -> None:
    """Bad counters (negative, bool, float, str, unknown) raise InvalidArgumentError naming them."""
    with pytest.raises(InvalidArgumentError, match=re.escape(f"{field}: ")):
        UsageMetrics(**fields)
    with pytest.raises(InvalidArgumentError, match=re.escape(f"{field}: ")):
        UsageMetrics.model_validate(fields)


def test_metrics_assignment_is_validated() -> None:
    """Assigning an invalid counter raises like construction does, and valid ones are kept."""
    metrics = UsageMetrics(input_tokens=1)
    metrics.input_tokens += 4

    with pytest.raises(InvalidArgumentError, match="output_tokens: "):
        metrics.output_tokens = -1
    assert 5 == metrics.input_tokens
    assert 0 == metrics.output_tokens


def test_tool_call_is_frozen_and_needs_a_name() -> None:
    """A ToolCall cannot be changed and refuses an empty name."""
    call = ToolCall(name="search")

    with pytest.raises(InvalidArgumentError, match="name: "):
        ToolCall(name="")
    with pytest.raises(InvalidArgumentError, match="frozen"):
        call.name = "other"  # type: ignore[misc]


def test_metric_variables() -> None:
    """variables() exposes every counter and the number of tool calls."""
    metrics = UsageMetrics(
        model="m",
        input_tokens=1,
        output_tokens=2,
        cache_read_tokens=3,
        cache_write_tokens=4,
        tool_calls=calls("a", "b"),
        search_queries=5,
        search_results=6,
        web_search_calls=7,
        code_exec_calls=8,
    )

    variables = metrics.variables()

    assert list(METRIC_VARIABLES) == list(variables)
    assert [1, 2, 3, 4, 2, 5, 6, 7, 8] == list(variables.values())
    assert variables == {k: metrics._environment()[k] for k in METRIC_VARIABLES}


def test_adding_metrics_merges_streamed_usage() -> None:
    """Adding usage records sums counters and concatenates tool calls."""
    first = UsageMetrics(model="gpt-4", input_tokens=100, tool_calls=calls("a"))
    second = UsageMetrics(output_tokens=20, search_queries=1, tool_calls=calls("b"))

    merged = first + second

    assert (
        UsageMetrics(
            model="gpt-4",
            input_tokens=100,
            output_tokens=20,
            search_queries=1,
            tool_calls=calls("a", "b"),
        )
        == merged
    )
    assert merged == sum([first, second])
    with pytest.raises(InvalidArgumentError, match="different models"):
        first + UsageMetrics(model="claude")
    with pytest.raises(InvalidArgumentError, match="different fixed_jobs"):
        UsageMetrics(fixed_job="a") + UsageMetrics(fixed_job="b")
    with pytest.raises(TypeError):
        first + 1


def test_calculate_refuses_anything_but_usage_metrics() -> None:
    """calculate needs a UsageMetrics instance and a plan of a known kind."""
    engine = PricingEngine.from_dict(FLAT_1X)

    with pytest.raises(InvalidArgumentError, match="UsageMetrics"):
        engine.calculate({"model": "gpt-4"})  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="plan must be"):
        engine.calculate(UsageMetrics(model="gpt-4"), plan=3)  # type: ignore[arg-type]


def test_tool_calls_changed_in_place_are_refused() -> None:
    """A tool_calls list given a non-ToolCall after validation is refused when priced."""
    engine = PricingEngine.from_dict(FLAT_1X)
    metrics = UsageMetrics(model="gpt-4", tool_calls=calls("a"))
    metrics.tool_calls.append("b")  # type: ignore[arg-type]

    with pytest.raises(InvalidArgumentError, match="ToolCall"):
        engine.calculate(metrics)


# -- results -----------------------------------------------------------------------------------


def test_engine_results_equal_validated_models() -> None:
    """A computed breakdown equals the same values validated by pydantic, and round-trips."""
    engine = PricingEngine.from_dict(FLAT_1X)
    metrics = UsageMetrics(
        model="gpt-4", input_tokens=7, cache_read_tokens=3, tool_calls=calls("code_exec")
    )

    cost = engine.calculate(metrics)
    validated = CostBreakdown.model_validate(cost.model_dump())

    assert validated == cost
    assert validated.model_dump() == cost.model_dump()
    assert CostBreakdown.model_validate_json(cost.model_dump_json()) == cost
    assert repr(validated) == repr(cost)
    assert validated.model_fields_set == cost.model_fields_set


def test_cost_breakdown_derives_total_and_credits() -> None:
    """Built directly, a breakdown computes its total and credits from its components."""
    cost = CostBreakdown(
        model_credits=Decimal("2.5"), cache_savings=Decimal("-0.7"), rounding="floor"
    )

    assert Decimal("1.8") == cost.total
    assert 1 == cost.credits
    assert Decimal(0) == CostBreakdown(cache_savings=Decimal("-3")).total


def test_cost_breakdown_refuses_a_total_that_disagrees() -> None:
    """A given total or credits must match the components."""
    assert 2 == CostBreakdown(model_credits=Decimal("1.5"), total=Decimal("1.5")).credits
    with pytest.raises(ValueError, match="total"):
        CostBreakdown(model_credits=Decimal("1.5"), total=Decimal("3"))
    with pytest.raises(ValueError, match="credits"):
        CostBreakdown(model_credits=Decimal("1.5"), credits=1)


def test_cost_breakdown_is_frozen() -> None:
    """A breakdown cannot be changed after it is made."""
    cost = PricingEngine.from_dict(FLAT_1X).calculate(UsageMetrics(model="gpt-4"))

    with pytest.raises(ValueError, match="frozen"):
        cost.total = Decimal(100)  # type: ignore[misc]


def test_calculate_batch_and_total_credits() -> None:
    """A batch is priced record by record, and total_credits sums the rounded credits."""
    engine = engine_for({"_default": "input_tokens * 0.1"})
    records = [UsageMetrics(input_tokens=n) for n in (1, 2, 30)]

    costs = engine.calculate_batch(records)

    assert [1, 1, 3] == [cost.credits for cost in costs]
    assert 5 == PricingEngine.total_credits(costs)
    assert [] == engine.calculate_batch([])
