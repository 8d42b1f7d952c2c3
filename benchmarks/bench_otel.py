"""
What the OpenTelemetry instrumentation costs: reserve+deduct pairs/s, bare and measured.

Each round runs the same pairs (one user, sequential, keyed) on a bare store and on the same
kind of store wrapped by `CreditMetrics.instrument`, on an SDK meter provider with an
in-memory reader (collected once at the end of each round, so no exporter runs in the loop).
Rounds alternate bare and measured runs; the figure to quote is the median ratio.

    python benchmarks/bench_otel.py --store memory --pairs 20000 --rounds 5
    python benchmarks/bench_otel.py --store sqlite --pairs 2000 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import anyio
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from ducto.interface import CreditStore, open_store
from ducto.otel import CreditMetrics


def _store(kind: str, folder: Path, index: int) -> CreditStore:
    if kind == "memory":
        return open_store("memory://")
    return open_store(f"sqlite:///{folder / f'bench-{index}.db'}", synchronous="NORMAL")


async def _pairs(store: CreditStore, pairs: int) -> float:
    await store.setup()
    await store.add_credits("bench", 10 * pairs + 100, "purchase")
    started = time.perf_counter()
    for i in range(pairs):
        key = f"req-{i}"
        hold = await store.reserve_credits("bench", 10, "chat", idempotency_key=key)
        await store.deduct_credits("bench", hold.reservation_id, 7, key)
    return pairs / (time.perf_counter() - started)


async def _round(kind: str, folder: Path, index: int, pairs: int) -> tuple[float, float]:
    async with _store(kind, folder, 2 * index) as bare:
        bare_rate = await _pairs(bare, pairs)
    reader = InMemoryMetricReader()
    metrics = CreditMetrics(MeterProvider(metric_readers=[reader]))
    async with metrics.instrument(_store(kind, folder, 2 * index + 1)) as measured:
        measured_rate = await _pairs(measured, pairs)
    reader.get_metrics_data()
    return bare_rate, measured_rate


def main() -> None:
    """Parse the options, run the rounds, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", choices=["memory", "sqlite"], default="memory")
    parser.add_argument("--pairs", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    args = parser.parse_args()
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        for index in range(args.rounds):
            bare, measured = anyio.run(
                _round, args.store, Path(tmp), index, args.pairs, backend=args.backend
            )
            ratios.append(measured / bare)
            print(
                f"round {index + 1}: bare {bare:,.0f} pairs/s, measured {measured:,.0f} pairs/s,"
                f" ratio {measured / bare:.3f}"
            )
    print(
        f"{args.store} on {args.backend}, {args.pairs} pairs x {args.rounds} rounds:"
        f" median measured/bare = {statistics.median(ratios):.3f}"
    )


if __name__ == "__main__":
    main()
