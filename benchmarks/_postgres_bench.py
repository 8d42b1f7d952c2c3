"""
PostgresStore throughput against its floor, for ``bench_store.py --store postgres``.

For each of 1, 8 and 32 concurrent tasks, on one hot user and on 1,000 users, on asyncio and
trio: keyed reserve+deduct pairs per second and pair latency (p50, p99) through PostgresStore,
the client CPU per pair (user + system time of this process over the run, divided by the
pairs) and the round trips per operation, and in the same run the floor: the same pair as one
PL/pgSQL call per operation (``pg_floor.sql``, no keys, no lots, no caps) through psycopg: its
async pool on asyncio, its sync pool on worker threads under trio. Both use a pool of
min(tasks, 16) connections and the server's default durability.
"""

from __future__ import annotations

import resource
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import psycopg
import psycopg_pool

from ducto.interface.postgres import PostgresStore

PAIR_HOLD = 10
PAIR_CHARGE = 7
FLOOR_SQL = (Path(__file__).parent / "pg_floor.sql").read_text(encoding="utf-8")

Pair = Callable[[str, str], Awaitable[None]]


@dataclass
class Run:
    """One measured run: pairs/s, pair latencies, client CPU per pair, round trips per op."""

    rate: float
    latencies: list[float]
    cpu_per_pair: float
    trips_per_op: float = float("nan")


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _drive(pair: Pair, users: list[str], tasks: int, pairs: int) -> Run:
    """Run `pairs` pairs over `tasks` tasks (task i works for users[i % len(users)])."""
    latencies: list[float] = []
    per_task = max(1, pairs // tasks)
    tag = uuid.uuid4().hex[:8]

    async def worker(n: int) -> None:
        for k in range(per_task):
            user = users[(n + k * tasks) % len(users)]
            started = time.perf_counter()
            await pair(user, f"{tag}-{n}-{k}")
            latencies.append(time.perf_counter() - started)

    cpu = _cpu()
    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for n in range(tasks):
            tg.start_soon(worker, n)
    elapsed = time.perf_counter() - start
    done = per_task * tasks
    return Run(done / elapsed, latencies, (_cpu() - cpu) / done)


def _fmt(latencies: list[float]) -> str:
    qs = statistics.quantiles(latencies, n=100)
    return f"{qs[49] * 1e3:6.2f} {qs[98] * 1e3:7.2f}"


async def _store_rate(url: str, schema: str, users: list[str], tasks: int, pairs: int) -> Run:
    pool_size = min(tasks, 16)
    async with PostgresStore(url, schema=schema, min_size=pool_size, max_size=pool_size) as store:
        await store.setup()
        for user in users:
            await store.add_credits(user, 10**12, "purchase")

        async def pair(user: str, key: str) -> None:
            # Keyed, as a gateway's requests are: a retry replays instead of charging twice.
            hold = await store.reserve_credits(
                user, PAIR_HOLD, "chat", min_balance=0, idempotency_key=key
            )
            if not hold.ok:
                raise RuntimeError(f"reserve refused: {hold.error}")
            done = await store.deduct_credits(user, hold.reservation_id, PAIR_CHARGE, key)
            if not done.ok:
                raise RuntimeError(f"deduct refused: {done.error}")

        before = store.statistics()
        run = await _drive(pair, users, tasks, pairs)
        after = store.statistics()
        run.trips_per_op = (after.round_trips - before.round_trips) / (
            after.operations - before.operations
        )
        return run


async def _floor_rate(
    url: str, schema: str, users: list[str], tasks: int, pairs: int, backend: str
) -> Run:
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
) -> Run:
    async def pair(user: str, key: str) -> None:
        hold = await call("SELECT floor_reserve(%s, %s)", (user, PAIR_HOLD))
        if hold is None:
            raise RuntimeError("floor reserve refused")
        await call("SELECT floor_deduct(%s, %s, %s)", (user, hold, PAIR_CHARGE))

    run = await _drive(pair, users, tasks, pairs)
    run.trips_per_op = 1.0
    return run


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
    """Print the table: store and floor pairs/s, latency, CPU, trips and the ratio."""
    print(
        f"{'scenario':18} {'backend':7} {'store/s':>7} {'p50 ms':>6} {'p99 ms':>7}"
        f" {'cpu ms':>6} {'trips':>5} {'floor/s':>7} {'p50 ms':>6} {'p99 ms':>7}"
        f" {'cpu ms':>6}  ratio (runs)"
    )
    print(
        "(cpu ms: client CPU per pair, user+system; trips: round trips per operation;"
        " ratio: store/floor)"
    )
    tag = uuid.uuid4().hex[:8]
    floor_schema, store_schema = f"bench_floor_{tag}", f"bench_store_{tag}"
    try:
        for backend in backends:
            for label, user_count in (("hot user", 1), ("1,000 users", 1000)):
                users = [f"user-{n}" for n in range(user_count)]
                for tasks in (1, 8, 32):
                    pairs = max(50, int((600 if tasks == 1 else 2000) * scale))
                    ratios: list[float] = []
                    stores: list[Run] = []
                    floors: list[Run] = []
                    for _ in range(repeat):
                        _prepare_floor(url, floor_schema, users)
                        floor = anyio.run(
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
                        store = anyio.run(
                            _store_rate, url, store_schema, users, tasks, pairs, backend=backend
                        )
                        ratios.append(store.rate / floor.rate)
                        stores.append(store)
                        floors.append(floor)
                    s, f = stores[-1], floors[-1]
                    print(
                        f"{label + f' x {tasks}':18} {backend:7}"
                        f" {statistics.median(r.rate for r in stores):7,.0f} {_fmt(s.latencies)}"
                        f" {statistics.median(r.cpu_per_pair for r in stores) * 1e3:6.2f}"
                        f" {s.trips_per_op:5.2f}"
                        f" {statistics.median(r.rate for r in floors):7,.0f} {_fmt(f.latencies)}"
                        f" {statistics.median(r.cpu_per_pair for r in floors) * 1e3:6.2f}"
                        f"  {statistics.median(ratios):.2f}"
                        f" ({' '.join(f'{r:.2f}' for r in ratios)})",
                        flush=True,
                    )
    finally:
        _drop(url, floor_schema, store_schema)


# -- cost against history ----------------------------------------------------------------------

_HISTORY: tuple[str, ...] = (
    "INSERT INTO ledger (id, kind, account, amount, type, balance_after, metadata, created_at,"
    " idempotency_key) SELECT 'h' || g, 'u', 'hot', -1, 'usage', 0, '{}', now(), 'hk' || g"
    " FROM generate_series(1, %(n)s) g",
    "INSERT INTO idempotency (kind, account, op, key, fingerprint, result)"
    " SELECT 'u', 'hot', 'deduct', 'hk' || g, '[]', '{}' FROM generate_series(1, %(n)s) g",
    "INSERT INTO holds (id, kind, account, amount, operation_type, use_allowance, expires_at,"
    " state, counted) SELECT 'hh' || g, 'u', 'hot', 1, 'chat', false,"
    " now() + interval '1 day', 1, false FROM generate_series(1, %(n)s) g",
    "INSERT INTO lots (id, kind, account, remaining, expired)"
    " SELECT 'hl' || g, 'u', 'hot', 0, false FROM generate_series(1, %(n)s) g",
    "INSERT INTO accounts (kind, id) SELECT 'u', 'x' || g FROM generate_series(1, %(n)s) g",
)
"""Rows added behind a running store: settled holds, drawn lots, rows and keys of the hot
user, and other accounts."""


async def _timed_pairs(store: PostgresStore, count: int, tag: str) -> float:
    started = time.perf_counter()
    for n in range(count):
        key = f"{tag}-{n}"
        hold = await store.reserve_credits(
            "hot", PAIR_HOLD, "chat", min_balance=0, idempotency_key=key
        )
        await store.deduct_credits("hot", hold.reservation_id, PAIR_CHARGE, key)
    return (time.perf_counter() - started) / count * 1e3


async def _history_cost(url: str, schema: str, rows: int, count: int) -> tuple[float, float]:
    async with PostgresStore(url, schema=schema, min_size=1, max_size=1) as store:
        await store.setup()
        await store.add_credits("hot", 10**15, "purchase")
        await _timed_pairs(store, 50, "warm")
        empty = await _timed_pairs(store, count, "empty")
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"SET search_path TO {schema}")
            for statement in _HISTORY:
                conn.execute(statement, {"n": rows})  # type: ignore[arg-type]
        full = await _timed_pairs(store, count, "full")
    return empty, full


def history(url: str, backend: str, rows: int) -> None:
    """Print the sequential pair's cost before and after `rows` rows land in every table.

    The rows arrive behind the store's back, on its open sessions, with no ANALYZE: the
    plans its sessions made while the tables were small must stay cheap.
    """
    schema = f"bench_hist_{uuid.uuid4().hex[:8]}"
    try:
        empty, full = anyio.run(_history_cost, url, schema, rows, 300, backend=backend)
    finally:
        _drop(url, schema)
    print(
        f"per-pair cost ({backend}, sequential): {empty:.2f} ms, after {rows:,} rows in each"
        f" table on the same sessions {full:.2f} ms (x{full / empty:.2f})"
    )
