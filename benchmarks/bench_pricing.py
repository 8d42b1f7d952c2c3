"""
Throughput of `PricingEngine.calculate` on a realistic config and a realistic mix of usage.

The config has several models resolved by prefix (provider names carry dates and
suffixes), a long-context ``tier()`` price, per-tool prices with a ``_default``, search,
a cache discount, fixed jobs and a plan with rate overrides. The usage records are
generated up front (seeded), so only pricing is timed. Everything runs in one thread
(``--cpu N`` also pins it to one CPU). Prints the median calls/s and µs/call over several
runs, and the median time to build the engine.

    python benchmarks/bench_pricing.py
    python benchmarks/bench_pricing.py --records 50000 --runs 9
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import sys
import time
from typing import Any

from ducto.pricing import PricingEngine, ToolCall, UsageMetrics

CONFIG: dict[str, Any] = {
    "version": 1,
    "models": {
        "gpt-4o": "input_tokens * 0.0025 + output_tokens * 0.01",
        "gpt-4o-mini": "input_tokens * 0.00015 + output_tokens * 0.0006",
        "gpt-4.1": "input_tokens * 0.002 + output_tokens * 0.008",
        "o3": "input_tokens * 0.002 + output_tokens * 0.008 + 1",
        "claude-3-5-sonnet": "input_tokens * 0.003 + output_tokens * 0.015",
        "claude-3-opus": "input_tokens * 0.015 + output_tokens * 0.075",
        "claude-3-5-haiku": "input_tokens * 0.0008 + output_tokens * 0.004",
        "gemini-1.5-pro": (
            "tier(input_tokens, 128000, input_tokens * 0.00125 + output_tokens * 0.005,"
            " input_tokens * 0.0025 + output_tokens * 0.01)"
        ),
        "_default": "input_tokens * 0.001 + output_tokens * 0.003",
    },
    "tools": {
        "code_exec": "tool_calls * 0.05",
        "image_gen": "tool_calls * 4",
        "web_fetch": "tool_calls * 0.01",
        "_default": "tool_calls * 0.005",
    },
    "search": {
        "queries": "search_queries * 0.5 + web_search_calls * 1",
        "results": "search_results * 0.05",
    },
    "cache": {
        "read_discount": "-cache_read_tokens * 0.0009",
        "write": "cache_write_tokens * 0.00075",
    },
    "fixed": {"batch_summary": 100, "daily_report": 10},
    "min_balance": 5,
    "plans": {
        "pro": {
            "id": "pro",
            "name": "Pro",
            "free_allowance": 500_000,
            "rate_overrides": {
                "gpt-4o": "input_tokens * 0.002 + output_tokens * 0.008",
                "claude-3": "input_tokens * 0.0025 + output_tokens * 0.0125",
            },
        },
    },
}

MODEL_NAMES = [
    "gpt-4o-2024-08-06",
    "gpt-4o-2024-11-20",
    "gpt-4o-mini-2024-07-18",
    "gpt-4o-mini",
    "gpt-4.1-2025-04-14",
    "o3-2025-04-16",
    "claude-3-5-sonnet-20241022",
    "claude-3-opus-20240229",
    "claude-3-5-haiku-20241022",
    "gemini-1.5-pro-002",
    "mistral-large-latest",
    "llama-3.1-70b-instruct",
]
MODEL_WEIGHTS = [20, 6, 25, 5, 6, 3, 14, 2, 6, 5, 4, 4]
TOOL_NAMES = ["code_exec", "web_fetch", "image_gen", "calculator", "retriever", "sql"]


def make_records(count: int, seed: int) -> list[tuple[UsageMetrics, str | None]]:
    """`count` usage records with the plan each is priced under (None: base rates)."""
    rng = random.Random(seed)
    records: list[tuple[UsageMetrics, str | None]] = []
    for _ in range(count):
        fields: dict[str, Any] = {
            "model": rng.choices(MODEL_NAMES, MODEL_WEIGHTS)[0],
            "input_tokens": int(rng.lognormvariate(7.0, 1.3)),
            "output_tokens": int(rng.lognormvariate(5.5, 1.1)),
        }
        if rng.random() < 0.4:
            fields["cache_read_tokens"] = int(rng.lognormvariate(7.5, 1.0))
        if rng.random() < 0.1:
            fields["cache_write_tokens"] = int(rng.lognormvariate(7.0, 1.0))
        if rng.random() < 0.3:
            fields["tool_calls"] = [
                ToolCall(name=rng.choice(TOOL_NAMES)) for _ in range(rng.randint(1, 4))
            ]
        if rng.random() < 0.15:
            fields["search_queries"] = rng.randint(1, 3)
            fields["search_results"] = rng.randint(0, 20)
        if rng.random() < 0.05:
            fields["web_search_calls"] = rng.randint(1, 2)
        if rng.random() < 0.02:
            fields["fixed_job"] = rng.choice(["batch_summary", "daily_report"])
        plan = "pro" if rng.random() < 0.2 else None
        records.append((UsageMetrics(**fields), plan))
    return records


def time_calculate(engine: PricingEngine, records: list[tuple[UsageMetrics, str | None]]) -> float:
    """Seconds to price every record once."""
    calculate = engine.calculate
    start = time.perf_counter()
    for metrics, plan in records:
        calculate(metrics, plan=plan)
    return time.perf_counter() - start


def time_build(runs: int) -> float:
    """Median seconds to build the engine from the dict (validation and compilation)."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        PricingEngine.from_dict(CONFIG)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(description="Throughput of PricingEngine.calculate.")
    parser.add_argument("--records", type=int, default=20_000, help="usage records per run")
    parser.add_argument("--runs", type=int, default=7, help="timed runs; the median is shown")
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--cpu", type=int, help="pin the process to this CPU (Linux)")
    args = parser.parse_args(argv)

    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})

    records = make_records(args.records, args.seed)
    engine = PricingEngine.from_dict(CONFIG)
    time_calculate(engine, records[: min(len(records), 2000)])  # warm the resolution caches

    gc.collect()  # the collector stays on, as in an application
    runs = [time_calculate(engine, records) for _ in range(args.runs)]
    build = time_build(max(args.runs, 20))

    median = statistics.median(runs)
    rates = sorted(len(records) / t for t in runs)
    where = "one thread" if args.cpu is None else f"one thread on CPU {args.cpu}"
    print(f"python {sys.version.split()[0]}, {where}, {len(records):,} records x {args.runs} runs")
    print(
        f"calculate: {len(records) / median:,.0f} calls/s median "
        f"(min {rates[0]:,.0f}, max {rates[-1]:,.0f}), {median / len(records) * 1e6:.2f} µs/call"
    )
    print(
        f"engine build (validate + compile {_expression_count()} expressions): {build * 1e3:.2f} ms"
    )
    return 0


def _expression_count() -> int:
    sections = ("models", "tools", "search", "cache")
    count = sum(len(CONFIG[section]) for section in sections)
    return count + sum(len(plan["rate_overrides"]) for plan in CONFIG["plans"].values())


if __name__ == "__main__":
    sys.exit(main())
