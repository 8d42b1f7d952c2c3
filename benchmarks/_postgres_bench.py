"""
PostgresStore throughput against its floor, for ``bench_store.py --store postgres``.

For each of 1, 8 and 32 concurrent tasks, on one hot user and on 1,000 users, on asyncio and
trio: reserve+deduct pairs per second and pair latency (p50, p99) through PostgresStore, and in
the same run the floor, the same pair as one PL/pgSQL call per operation (``pg_floor.sql``)
through the same driver: psycopg's async pool on asyncio, its sync pool on worker threads under
trio. Both use a pool of min(tasks, 16) connections and the server's default durability.
"""

from __future__ import annotations

import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import psycopg
import psycopg_pool

from ducto.interface.postgres import PostgresStore

PAIR_HOLD = 10
PAIR_CHARGE = 7
FLOOR_SQL = (Path(__file__).parent / "pg_floor.sql").read_text(encoding="utf-8")

Pair = Callable[[str], Awaitable[None]]


async def _drive(pair: Pair, users: list[str], tasks: int, pairs: int) -> tuple[float, list[float]]:
    """Run `pairs` pairs over `tasks` tasks (task i works for users[i % len(users)])."""
    latencies: list[float] = []
    per_task = max(1, pairs // tasks)

    async def worker(n: int) -> None:
        for k in range(per_task):
            user = users[(n + k * tasks) % len(users)]
            started = time.perf_counter()
            await pair(user)
            latencies.append(time.perf_counter() - started)

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for n in range(tasks):
            tg.start_soon(worker, n)
    return per_task * tasks / (time.perf_counter() - start), latencies


def _fmt(latencies: list[float]) -> str:
    qs = statistics.quantiles(latencies, n=100)
    return f"{qs[49] * 1e3:6.2f} {qs[98] * 1e3:7.2f}"


async def _store_rate(
    url: str, schema: str, users: list[str], tasks: int, pairs: int
) -> tuple[float, list[float]]:
    pool_size = min(tasks, 16)
    async with PostgresStore(url, schema=schema, min_size=pool_size, max_size=pool_size) as store:
        await store.setup()
        for user in users:
            await store.add_credits(user, 10**12, "purchase")

        async def pair(user: str) -> None:
            hold = await store.reserve_credits(user, PAIR_HOLD, "chat", min_balance=0)
            if not hold.ok:
                raise RuntimeError(f"reserve refused: {hold.error}")
            done = await store.deduct_credits(user, hold.reservation_id, PAIR_CHARGE)
            if not done.ok:
                raise RuntimeError(f"deduct refused: {done.error}")

        return await _drive(pair, users, tasks, pairs)


async def _floor_rate(
    url: str, schema: str, users: list[str], tasks: int, pairs: int, backend: str
) -> tuple[float, list[float]]:
    pool_size = min(tasks, 16)
    options = f"-c search_path={schema}"
    if backend == "asyncio":
        apool = psycopg_pool.AsyncConnectionPool(
            url,
            min_size=pool_size,
            max_size=pool_size,
            kwargs={"autocommit": True, "options": options},
            open=False,
        )
        await apool.open(wait=True)
        try:

            async def call(sql: str, params: tuple[Any, ...]) -> Any:
                async with apool.connection() as conn:
                    cursor = await conn.execute(sql, params)
                    return (await cursor.fetchone())[0]  # type: ignore[index]

            return await _floor_pairs(call, users, tasks, pairs)
        finally:
            await apool.close()
    spool = psycopg_pool.ConnectionPool(
        url,
        min_size=pool_size,
        max_size=pool_size,
        kwargs={"autocommit": True, "options": options},
        open=False,
    )
    spool.open(wait=True)
    limiter = anyio.CapacityLimiter(pool_size)
    try:

        def blocking(sql: str, params: tuple[Any, ...]) -> Any:
            with spool.connection() as conn:
                return conn.execute(sql, params).fetchone()[0]  # type: ignore[index]

        async def call_in_thread(sql: str, params: tuple[Any, ...]) -> Any:
            return await anyio.to_thread.run_sync(blocking, sql, params, limiter=limiter)

        return await _floor_pairs(call_in_thread, users, tasks, pairs)
    finally:
        spool.close()


async def _floor_pairs(
    call: Callable[[str, tuple[Any, ...]], Awaitable[Any]],
    users: list[str],
    tasks: int,
    pairs: int,
) -> tuple[float, list[float]]:
    async def pair(user: str) -> None:
        hold = await call("SELECT floor_reserve(%s, %s)", (user, PAIR_HOLD))
        if hold is None:
            raise RuntimeError("floor reserve refused")
        await call("SELECT floor_deduct(%s, %s, %s)", (user, hold, PAIR_CHARGE))

    return await _drive(pair, users, tasks, pairs)


def _prepare_floor(url: str, schema: str, users: list[str]) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        conn.execute(f"CREATE SCHEMA {schema}")
        conn.execute(f"SET search_path TO {schema}")
        conn.execute(FLOOR_SQL)  # type: ignore[arg-type]
        conn.execute(
            "INSERT INTO floor_accounts (id, balance) SELECT unnest(%s::text[]), %s",
            (users, 10**12),
        )


def _drop(url: str, *schemas: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for schema in schemas:
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def run(url: str, backends: list[str], scale: float, repeat: int) -> None:
    """Print the table: store and floor pairs/s, latency, and the ratio, per scenario."""
    print(
        f"{'scenario':24} {'backend':8} {'store/s':>8} {'p50 ms':>6} {'p99 ms':>7}"
        f" {'floor/s':>8} {'p50 ms':>6} {'p99 ms':>7}  ratio (runs)"
    )
    tag = uuid.uuid4().hex[:8]
    floor_schema, store_schema = f"bench_floor_{tag}", f"bench_store_{tag}"
    try:
        for backend in backends:
            for label, user_count in (("hot user", 1), ("1,000 users", 1000)):
                users = [f"user-{n}" for n in range(user_count)]
                for tasks in (1, 8, 32):
                    pairs = max(50, int((600 if tasks == 1 else 2000) * scale))
                    ratios, store_rates, floor_rates = [], [], []
                    store_lat: list[float] = []
                    floor_lat: list[float] = []
                    for _ in range(repeat):
                        _prepare_floor(url, floor_schema, users)
                        floor, floor_lat = anyio.run(
                            _floor_rate,
                            url,
                            floor_schema,
                            users,
                            tasks,
                            pairs,
                            backend,
                            backend=backend,
                        )
                        _drop(url, store_schema)
                        store, store_lat = anyio.run(
                            _store_rate, url, store_schema, users, tasks, pairs, backend=backend
                        )
                        ratios.append(store / floor)
                        store_rates.append(store)
                        floor_rates.append(floor)
                    print(
                        f"{label + f' x {tasks}':24} {backend:8}"
                        f" {statistics.median(store_rates):8,.0f} {_fmt(store_lat)}"
                        f" {statistics.median(floor_rates):8,.0f} {_fmt(floor_lat)}"
                        f"  {statistics.median(ratios):.2f}"
                        f" ({' '.join(f'{r:.2f}' for r in ratios)})",
                        flush=True,
                    )
    finally:
        _drop(url, floor_schema, store_schema)
