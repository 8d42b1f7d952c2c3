"""The engine against an independent reference: 10,000 random usage records, priced twice."""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable
from decimal import (
    ROUND_CEILING,
    ROUND_FLOOR,
    ROUND_HALF_EVEN,
    ROUND_HALF_UP,
    Context,
    Decimal,
    localcontext,
)
from typing import Any

from ducto.pricing import CostBreakdown, PricingEngine, ToolCall, UsageMetrics

D = Decimal
RECORDS = 10_000
SEED = 20240611

CONFIG: dict[str, Any] = {
    "models": {
        "gpt-4o": "input_tokens * 0.0025 + output_tokens * 0.01",
        "gpt-4o-mini": "input_tokens * 0.00015 + output_tokens * 0.0006",
        "gpt-4": "input_tokens * 0.03 + output_tokens * 0.06",
        "claude-3-5-sonnet": "input_tokens * 0.003 + output_tokens * 0.015",
        "claude-3-opus": "input_tokens * 0.015 + output_tokens * 0.075",
        "gemini-1.5-pro": (
            "tier(input_tokens, 128000, input_tokens * 0.00125 + output_tokens * 0.005,"
            " input_tokens * 0.0025 + output_tokens * 0.01)"
        ),
        "o1": "input_tokens * 0.015 + output_tokens * 0.06 + 2",
        "_default": "input_tokens * 0.001 + output_tokens * 0.003",
    },
    "tools": {
        "code_exec": "tool_calls * 0.05",
        "image_gen": "tool_calls * 4",
        "web_fetch": "max(tool_calls * 0.01, 0.02)",
        "_default": "tool_calls * 0.005",
    },
    "search": {
        "queries": "search_queries * 0.5 + web_search_calls",
        "results": "search_results * 0.05",
    },
    "cache": {
        "read": "-cache_read_tokens * 0.0009",
        "write": "cache_write_tokens * 0.00075",
        "exec": "code_exec_calls * 0.25",
    },
    "fixed": {"batch_summary": 100, "daily_report": 10, "free_job": 0},
    "plans": {
        "pro": {
            "id": "pro",
            "name": "Pro",
            "rate_overrides": {
                "gpt-4o": "input_tokens * 0.002 + output_tokens * 0.008",
                "claude": "input_tokens * 0.0025 + output_tokens * 0.0125",
            },
        },
        "free": {
            "id": "free",
            "name": "Free",
            "rate_overrides": {"_default": "input_tokens * 0.004 + output_tokens * 0.012"},
        },
    },
}

# -- the reference: plain Decimal arithmetic over the metrics' fields ---------------------------

Price = Callable[[UsageMetrics], Decimal]


def gemini(m: UsageMetrics) -> Decimal:
    if m.input_tokens <= 128000:
        return m.input_tokens * D("0.00125") + m.output_tokens * D("0.005")
    return m.input_tokens * D("0.0025") + m.output_tokens * D("0.01")


REF_MODELS: dict[str, Price] = {
    "gpt-4o": lambda m: m.input_tokens * D("0.0025") + m.output_tokens * D("0.01"),
    "gpt-4o-mini": lambda m: m.input_tokens * D("0.00015") + m.output_tokens * D("0.0006"),
    "gpt-4": lambda m: m.input_tokens * D("0.03") + m.output_tokens * D("0.06"),
    "claude-3-5-sonnet": lambda m: m.input_tokens * D("0.003") + m.output_tokens * D("0.015"),
    "claude-3-opus": lambda m: m.input_tokens * D("0.015") + m.output_tokens * D("0.075"),
    "gemini-1.5-pro": gemini,
    "o1": lambda m: m.input_tokens * D("0.015") + m.output_tokens * D("0.06") + 2,
    "_default": lambda m: m.input_tokens * D("0.001") + m.output_tokens * D("0.003"),
}
REF_OVERRIDES: dict[str, dict[str, Price]] = {
    "pro": {
        "gpt-4o": lambda m: m.input_tokens * D("0.002") + m.output_tokens * D("0.008"),
        "claude": lambda m: m.input_tokens * D("0.0025") + m.output_tokens * D("0.0125"),
    },
    "free": {
        "_default": lambda m: m.input_tokens * D("0.004") + m.output_tokens * D("0.012"),
    },
}
REF_TOOLS: dict[str, Callable[[int], Decimal]] = {
    "code_exec": lambda n: n * D("0.05"),
    "image_gen": lambda n: n * D(4),
    "web_fetch": lambda n: max(n * D("0.01"), D("0.02")),
}
REF_SEARCH: dict[str, Price] = {
    "queries": lambda m: m.search_queries * D("0.5") + m.web_search_calls,
    "results": lambda m: m.search_results * D("0.05"),
}
REF_CACHE: dict[str, Price] = {
    "read": lambda m: -m.cache_read_tokens * D("0.0009"),
    "write": lambda m: m.cache_write_tokens * D("0.00075"),
    "exec": lambda m: m.code_exec_calls * D("0.25"),
}
REF_FIXED = {"batch_summary": 100, "daily_report": 10, "free_job": 0}
REF_ROUNDING = {
    "ceil": ROUND_CEILING,
    "floor": ROUND_FLOOR,
    "half_up": ROUND_HALF_UP,
    "half_even": ROUND_HALF_EVEN,
}


def ref_resolve(table: dict[str, Price], name: str | None) -> str | None:
    if name is not None:
        if name in table:
            return name
        matches = [key for key in table if key != "_default" and name.startswith(key)]
        if matches:
            return max(matches, key=len)
    return "_default" if "_default" in table else None


def reference(m: UsageMetrics, plan: str | None, rounding: str) -> dict[str, Any]:
    """What the record costs, worked out without the engine or its expression language."""
    breakdown: dict[str, Decimal] = {}
    model_key = None
    entry = ""
    overrides = REF_OVERRIDES.get(plan or "", {})
    key = ref_resolve(overrides, m.model)
    if key is not None:
        model_key, model_credits = key, overrides[key](m)
        entry = f"plans.{plan}.rate_overrides.{key}"
    else:
        key = ref_resolve(REF_MODELS, m.model)
        assert key is not None
        model_key, model_credits = key, REF_MODELS[key](m)
        entry = f"models.{key}"
    breakdown[entry] = model_credits

    tool_credits = D(0)
    counts = Counter(call.name for call in m.tool_calls)
    others = 0
    for name, count in counts.items():
        if name in REF_TOOLS:
            breakdown[f"tools.{name}"] = REF_TOOLS[name](count)
            tool_credits += REF_TOOLS[name](count)
        else:
            others += count
    if others:
        breakdown["tools._default"] = others * D("0.005")
        tool_credits += others * D("0.005")

    sections = []
    for section, prices in (("search", REF_SEARCH), ("cache", REF_CACHE)):
        subtotal = D(0)
        for name, price in prices.items():
            breakdown[f"{section}.{name}"] = price(m)
            subtotal += price(m)
        sections.append(subtotal)
    search_credits, cache_savings = sections

    fixed_credits = D(REF_FIXED[m.fixed_job]) if m.fixed_job else D(0)
    if m.fixed_job:
        breakdown[f"fixed.{m.fixed_job}"] = fixed_credits

    total = model_credits + tool_credits + search_credits + cache_savings + fixed_credits
    total = max(total, D(0))
    credits = int(total.to_integral_value(rounding=REF_ROUNDING[rounding]))
    return {
        "model_credits": model_credits,
        "tool_credits": tool_credits,
        "search_credits": search_credits,
        "cache_savings": cache_savings,
        "fixed_credits": fixed_credits,
        "total": total,
        "credits": credits,
        "model": model_key,
        "rounding": rounding,
        "breakdown": {name: value for name, value in breakdown.items() if value},
    }


# -- random usage ------------------------------------------------------------------------------

MODEL_NAMES = [
    "gpt-4o",
    "gpt-4o-2024-08-06",
    "gpt-4o-mini-2024-07-18",
    "gpt-4-0613",
    "gpt-4-turbo",
    "claude-3-5-sonnet-20241022",
    "claude-3-opus-20240229",
    "claude-3-haiku-20240307",
    "gemini-1.5-pro-002",
    "o1-preview",
    "o1",
    "mistral-large",
    "llama-3.1-405b",
    None,
]
TOOL_NAMES = ["code_exec", "image_gen", "web_fetch", "calculator", "sql", "retriever"]


def count(rng: random.Random, often: float, scale: float) -> int:
    """0 with probability 1 - often, else a long-tailed count (sometimes very large)."""
    if rng.random() >= often:
        return 0
    if rng.random() < 0.02:
        return rng.randint(10**8, 10**10)
    return int(rng.lognormvariate(scale, 1.5))


def random_record(rng: random.Random) -> tuple[UsageMetrics, str | None, str]:
    fields: dict[str, Any] = {
        "model": rng.choice(MODEL_NAMES),
        "input_tokens": count(rng, 0.97, 7.0),
        "output_tokens": count(rng, 0.9, 5.5),
        "cache_read_tokens": count(rng, 0.4, 8.0),
        "cache_write_tokens": count(rng, 0.1, 7.0),
        "search_queries": count(rng, 0.15, 0.5),
        "search_results": count(rng, 0.15, 2.0),
        "web_search_calls": count(rng, 0.05, 0.3),
        "code_exec_calls": count(rng, 0.05, 0.3),
    }
    if rng.random() < 0.05:
        fields["input_tokens"] = rng.choice([127999, 128000, 128001])
    if rng.random() < 0.35:
        fields["tool_calls"] = [
            ToolCall(name=rng.choice(TOOL_NAMES)) for _ in range(rng.randint(1, 12))
        ]
    if rng.random() < 0.05:
        fields["fixed_job"] = rng.choice(list(REF_FIXED))
    plan = rng.choice([None, None, None, "pro", "free"])
    rounding = rng.choice(list(REF_ROUNDING))
    return UsageMetrics(**fields), plan, rounding


def as_fields(cost: CostBreakdown) -> dict[str, Any]:
    return {name: getattr(cost, name) for name in CostBreakdown.model_fields}


def test_engine_matches_the_reference_on_random_usage() -> None:
    """10,000 random records cost exactly what plain Decimal arithmetic says, in every mode."""
    rng = random.Random(SEED)
    engines = {mode: PricingEngine.from_dict({**CONFIG, "rounding": mode}) for mode in REF_ROUNDING}
    started = time.perf_counter()
    mismatches = []
    clamped = 0
    with localcontext(Context(prec=200)):
        for _ in range(RECORDS):
            metrics, plan, rounding = random_record(rng)
            expected = reference(metrics, plan, rounding)
            actual = as_fields(engines[rounding].calculate(metrics, plan=plan))
            if expected != actual:
                mismatches.append((metrics, plan, expected, actual))
            clamped += expected["total"] == 0

    assert [] == mismatches[:3]
    assert clamped > 100  # the discounts really did exceed some costs
    assert time.perf_counter() - started < 10
