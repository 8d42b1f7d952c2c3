"""
Reserve+deduct throughput of a store, against a plain synchronous baseline.

Prints pairs/s for: one user sequential; 1,000 users x 10 concurrent tasks; one hot user x
1,000 tasks; on asyncio and trio. The baseline is the same pair logic (MemoryStore's own code,
with the same pydantic results) run as plain synchronous Python: no event loop, no locks; the
ratio is store / baseline. Also prints the per-pair cost on an empty store and after N prior ledger
rows on the measured user, and the process's peak memory.

    python benchmarks/bench_store.py --store memory
    python benchmarks/bench_store.py --store sqlite --synchronous NORMAL
    python benchmarks/bench_store.py --store postgres --url postgresql://postgres@127.0.0.1/test
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import sniffio
from anyio.lowlevel import checkpoint

from ducto.interface import CreditStore, MemoryStore, open_store

PAIR_HOLD = 10
PAIR_CHARGE = 7


# -- the baseline ------------------------------------------------------------------------------


class _NoLocks:
    """A lock table that locks nothing."""

    def hold(self, *keys: object) -> _NoLocks:
        return self

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> None:
        return None


def _drive(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine to completion without an event loop, resuming every yield at once."""
    try:
        while True:
            coro.send(None)
    except StopIteration as done:
        return done.value


def baseline_pairs_per_second(pairs: int, users: int) -> float:
    """
    The same pair logic with the async plumbing taken away.

    The very same `MemoryStore` code runs with its lock table replaced by a no-op and each
    coroutine driven to completion synchronously, with no event loop (its one yield is resumed
    at once). What remains is the store's logic and its pydantic results.
    """
    token = sniffio.current_async_library_cvar.set("asyncio")
    try:
        store = MemoryStore()
        store._locks = _NoLocks()  # type: ignore[assignment]
        names = [f"user-{i}" for i in range(users)]
        for name in names:
            _drive(store.add_credits(name, 10**12, "purchase"))
        start = time.perf_counter()
        for i in range(pairs):
            name = names[i % users]
            hold = _drive(store.reserve_credits(name, PAIR_HOLD, "chat", min_balance=0))
            _drive(store.deduct_credits(name, hold.reservation_id, PAIR_CHARGE))
        return pairs / (time.perf_counter() - start)
    finally:
        sniffio.current_async_library_cvar.reset(token)


# -- the store ---------------------------------------------------------------------------------


@dataclass
class Scenario:
    name: str
    users: int
    tasks_per_user: int
    pairs_per_task: int

    @property
    def pairs(self) -> int:
        return self.users * self.tasks_per_user * self.pairs_per_task


async def pair(store: CreditStore, user_id: str, latencies: list[float] | None) -> None:
    started = time.perf_counter()
    hold = await store.reserve_credits(user_id, PAIR_HOLD, "chat", min_balance=0)
    if hold.error is not None:
        raise RuntimeError(f"reserve refused: {hold.error}")
    # A request handler awaits the model between the hold and its settlement.
    await checkpoint()
    result = await store.deduct_credits(user_id, hold.reservation_id, PAIR_CHARGE)
    if result.error is not None:
        raise RuntimeError(f"deduct refused: {result.error}")
    if latencies is not None:
        latencies.append(time.perf_counter() - started)


async def run_scenario(
    make_store: Callable[[], CreditStore], scenario: Scenario
) -> tuple[float, list[float]]:
    latencies: list[float] = []
    async with make_store() as store:
        await store.setup()
        names = [f"user-{i}" for i in range(scenario.users)]
        for name in names:
            await store.add_credits(name, 10**12, "purchase")

        async def worker(name: str) -> None:
            for _ in range(scenario.pairs_per_task):
                await pair(store, name, latencies)

        start = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for name in names:
                for _ in range(scenario.tasks_per_user):
                    tg.start_soon(worker, name)
        elapsed = time.perf_counter() - start
    return scenario.pairs / elapsed, latencies


async def per_pair_cost(
    make_store: Callable[[], CreditStore], history: int, samples: int
) -> tuple[float, float]:
    """Median µs per sequential pair on an empty store, then after `history` ledger rows."""
    async with make_store() as store:
        await store.setup()
        await store.add_credits("hot", 10**15, "purchase")
        empty = await _timed_pairs(store, "hot", samples)
        filled = 1
        while filled < history:
            step = min(10_000, history - filled)
            for _ in range(step):
                await pair(store, "hot", None)
            filled += step
        full = await _timed_pairs(store, "hot", samples)
    return empty, full


async def _timed_pairs(store: CreditStore, user_id: str, samples: int) -> float:
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(samples // 5):
            await pair(store, user_id, None)
        rounds.append((time.perf_counter() - start) / (samples // 5))
    return statistics.median(rounds) * 1e6


def percentiles(latencies: list[float]) -> str:
    if len(latencies) < 2:
        return "n/a"
    qs = statistics.quantiles(latencies, n=100)
    return f"p50 {qs[49] * 1e3:.2f} ms  p99 {qs[98] * 1e3:.2f} ms"


def peak_rss_mb() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return usage / 1024 if sys.platform != "darwin" else usage / 2**20


def store_factory(kind: str, options: dict[str, Any], tmp: Path) -> Callable[[], CreditStore]:
    counter = iter(range(10**9))

    def make() -> CreditStore:
        if kind == "memory":
            return open_store("memory://")
        path = tmp / f"bench-{next(counter)}.db"
        return open_store(f"sqlite:///{path}", **options)

    return make


def sqlite_floor_pairs_per_second(path: Path, synchronous: str, pairs: int) -> float:
    """
    The floor: the same reserve and deduct transactions as plain synchronous sqlite3.

    The engine's reserve and deduct operations run one after the other over SQLiteStore's
    storage on one connection, each in its own ``BEGIN IMMEDIATE`` ... ``COMMIT`` at the same
    durability: no event loop, no thread hop, no batching.
    """
    from ducto.interface import _engine, _ledger
    from ducto.interface._sqlite_storage import SQLiteStorage
    from ducto.interface.sqlite import SQLiteStore

    store = SQLiteStore(path, synchronous=synchronous)  # type: ignore[arg-type]
    conn = store._connect()
    storage = SQLiteStorage(conn, _ledger.utc_now, _ledger.IdSource(), store._retention)
    store._st = storage
    store._migrate()

    def txn(fn: Callable[..., Any], *args: Any) -> Any:
        conn.execute("BEGIN IMMEDIATE")
        result = fn(storage, *args)
        conn.execute("COMMIT")
        return result

    txn(_engine.add_credits, "floor", 10**12, "purchase", None, None, None)
    ttl = _ledger.check_ttl(600.0)
    start = time.perf_counter()
    for _ in range(pairs):
        hold = txn(_engine.reserve, "floor", PAIR_HOLD, "chat", None, 0, ttl, False, None)
        txn(_engine.deduct, "floor", hold.reservation_id, PAIR_CHARGE, None, None, None)
    rate = pairs / (time.perf_counter() - start)
    conn.close()
    return rate


def run_in(backend: str, fn: Callable[[], Awaitable[Any]]) -> Any:
    return anyio.run(fn, backend=backend)


def scenarios_for(scale: float) -> list[Scenario]:
    return [
        Scenario("1 user, sequential", 1, 1, max(1, int(20_000 * scale))),
        Scenario("1,000 users x 10 tasks", 1000, 10, max(1, int(5 * scale))),
        Scenario("1 hot user x 1,000 tasks", 1, 1000, max(1, int(20 * scale))),
    ]


def run_table(
    make: Callable[[], CreditStore],
    backends: list[str],
    scenarios: list[Scenario],
    reference: Callable[[], float],
    label: str,
    repeat: int,
) -> None:
    """
    Run each scenario `repeat` times, each run right after a run of the reference.

    Rates on these machines drift by tens of percent within minutes, so each ratio compares
    two runs made back to back; the table shows the medians.
    """
    print(
        f"{'scenario':30} {'backend':8} {'pairs':>8} {'pairs/s':>10} {label:>6}  "
        f"{'latency (last run)':24} ratios"
    )
    for backend in backends:
        for scenario in scenarios:
            rates: list[float] = []
            ratios: list[float] = []
            lat: list[float] = []
            for _ in range(repeat):
                gc.collect()
                floor = reference()
                gc.collect()
                rate, lat = run_in(backend, lambda s=scenario: run_scenario(make, s))
                rates.append(rate)
                ratios.append(rate / floor)
            print(
                f"{scenario.name:30} {backend:8} {scenario.pairs:>8,} "
                f"{statistics.median(rates):>10,.0f} {statistics.median(ratios):>6.2f}  "
                f"{percentiles(lat):24} {' '.join(f'{r:.2f}' for r in ratios)}"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--store", choices=["memory", "sqlite", "postgres"], default="memory")
    parser.add_argument(
        "--url",
        default=os.environ.get("DUCTO_STORE_URL", "postgresql://postgres@127.0.0.1:5432/test"),
        help="postgres: the database (each run works in schemas of its own, dropped after)",
    )
    parser.add_argument(
        "--synchronous", default="FULL,NORMAL", help="sqlite durability levels to run"
    )
    parser.add_argument("--group-commit", default="on,off", help="sqlite: on, off or both")
    parser.add_argument("--backends", default="asyncio,trio")
    parser.add_argument("--history", type=int, default=1_000_000, help="prior ledger rows")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply pair counts")
    parser.add_argument("--repeat", type=int, default=3, help="runs per scenario (median)")
    args = parser.parse_args(argv)
    backends = args.backends.split(",")
    started = datetime.now(UTC).isoformat(timespec="seconds")
    print(f"ducto bench_store  store={args.store}  python {sys.version.split()[0]}")
    print(f"started {started}  pid {os.getpid()}  cpus {os.cpu_count()}")
    if args.store == "postgres":
        from _postgres_bench import history, run

        run(args.url, backends, args.scale, args.repeat)
        if args.history:
            history(args.url, backends[0], min(args.history, 300_000))
        print(f"peak RSS: {peak_rss_mb():,.0f} MB")
        return 0
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        if args.store == "memory":
            baseline = baseline_pairs_per_second(50_000, 1000)
            print(f"baseline (same logic, synchronous, no loop, no locks): {baseline:,.0f} pairs/s")
            print("ratio: store / the baseline run just before it; median of --repeat runs")
            print()
            make = store_factory("memory", {}, tmp)
            run_table(
                make,
                backends,
                scenarios_for(args.scale),
                lambda: baseline_pairs_per_second(50_000, 1000),
                "ratio",
                args.repeat,
            )
            print()
            if args.history:
                empty, full = run_in(backends[0], lambda: per_pair_cost(make, args.history, 5000))
                print(
                    f"per-pair cost ({backends[0]}): empty {empty:.1f} µs, after "
                    f"{args.history:,} ledger rows {full:.1f} µs (x{full / empty:.2f})"
                )
        else:
            scenarios = scenarios_for(args.scale * 0.1)
            floors = iter(range(10**9))
            for synchronous in args.synchronous.split(","):

                def floor(synchronous: str = synchronous) -> float:
                    path = tmp / f"floor-{next(floors)}.db"
                    return sqlite_floor_pairs_per_second(
                        path, synchronous, max(200, int(2000 * args.scale))
                    )

                print()
                print(f"== synchronous={synchronous}")
                print(f"floor (sqlite3, sequential, same transactions): {floor():,.0f} pairs/s")
                print("/floor: store / the floor run just before it; median of --repeat runs")
                for mode in args.group_commit.split(","):
                    options = {"synchronous": synchronous, "group_commit": mode == "on"}
                    print(f"-- group commit {mode}")
                    run_table(
                        store_factory("sqlite", options, tmp),
                        backends,
                        scenarios,
                        floor,
                        "/floor",
                        args.repeat,
                    )
    print(f"peak RSS: {peak_rss_mb():,.0f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
