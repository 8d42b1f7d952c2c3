"""
`CreditManager.deduct` throughput: priced charges per second through a store.

Each charge prices one usage record and charges it with an idempotency key. Prints charges/s,
latency percentiles and the share of the run spent in the cyclic garbage collector (which
walks every object of every task in flight) for USERS x TASKS concurrent tasks, each making
--per-task charges, on asyncio and trio. Uses only the public API, so the same script can
measure another version of ducto (put its ``src`` first on ``PYTHONPATH``) for a same-run
comparison.

    python benchmarks/bench_manager.py --store sqlite --users 1000 --tasks 10
    python benchmarks/bench_manager.py --store memory
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

import anyio

from ducto import CreditManager, UsageMetrics
from ducto.interface import open_store

PRICING = {
    "models": {"_default": "input_tokens * 0.01 + output_tokens * 0.03"},
    "min_balance": 0,
}
CALL = UsageMetrics(model="gpt-4o", input_tokens=1200, output_tokens=300)


class _GcClock:
    """Time spent in the cyclic garbage collector while installed (through `gc.callbacks`)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._started

    def __enter__(self) -> _GcClock:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self)


async def run(url: str, users: int, tasks: int, per_task: int) -> tuple[float, list[float], float]:
    """Charges per second, each charge's latency, and the share of the time spent in GC."""
    options = {"synchronous": "FULL"} if url.startswith("sqlite") else {}
    latencies: list[float] = []
    async with CreditManager(open_store(url, **options)) as manager:
        await manager.store.setup()
        await manager.publish_pricing(PRICING)
        names = [f"user-{n}" for n in range(users)]
        for name in names:
            await manager.add_credits(name, 10**12, "purchase")

        async def worker(name: str, task: int) -> None:
            for step in range(per_task):
                started = time.perf_counter()
                await manager.deduct(name, CALL, idempotency_key=f"{name}-{task}-{step}")
                latencies.append(time.perf_counter() - started)

        with _GcClock() as collector:
            start = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for name in names:
                    for task in range(tasks):
                        tg.start_soon(worker, name, task)
            elapsed = time.perf_counter() - start
    return users * tasks * per_task / elapsed, latencies, collector.seconds / elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--store", choices=["memory", "sqlite"], default="sqlite")
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--per-task", type=int, default=2)
    parser.add_argument("--backends", default="asyncio,trio")
    parser.add_argument("--repeat", type=int, default=3, help="runs per backend (median)")
    args = parser.parse_args(argv)
    import ducto

    print(
        f"ducto {ducto.__version__} from {Path(ducto.__file__).parent}"
        f"  python {sys.version.split()[0]}"
    )
    print(
        f"{'backend':8} {'charges':>8} {'charges/s':>10}  {'p50 ms':>7} {'p99 ms':>8}"
        f"  {'gc':>4}  runs"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for backend in args.backends.split(","):
            rates: list[float] = []
            latencies: list[float] = []
            gc_shares: list[float] = []
            for n in range(args.repeat):
                url = (
                    "memory://" if args.store == "memory" else f"sqlite:///{tmp}/m-{backend}-{n}.db"
                )
                rate, latencies, gc_share = anyio.run(
                    run, url, args.users, args.tasks, args.per_task, backend=backend
                )
                rates.append(rate)
                gc_shares.append(gc_share)
            qs = statistics.quantiles(latencies, n=100)
            print(
                f"{backend:8} {args.users * args.tasks * args.per_task:>8,}"
                f" {statistics.median(rates):>10,.0f}  {qs[49] * 1e3:7.2f} {qs[98] * 1e3:8.2f}"
                f"  {statistics.median(gc_shares):4.0%}"
                f"  {' '.join(f'{r:,.0f}' for r in rates)}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
