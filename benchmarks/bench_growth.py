"""
How much a store grows under a steady keyed workload, with `prune` between phases and without.

Each phase runs --pairs-per-phase keyed reserve+deduct pairs over --users users (--tasks at a
time; every user has a daily spend cap, as a gateway would set), then moves the store's clock
on by --days-per-phase days, then (unless it is the run without pruning) calls `prune()`. The
stores keep idempotency records and finished holds for --retention-days days, so with pruning
only the ledger grows once the first phases have aged out: what a pair costs falls to the cost
of its ledger row.

Prints per phase the store's size: the SQLite file and its WAL after a checkpoint (and the
pages in use); the Postgres schema's tables (pg_total_relation_size, after a plain VACUUM as
autovacuum would run between two days); or MemoryStore's process resident memory
(/proc/self/statm). Then the growth of the last phase against the first, and bytes per pair
with pruning against without. Each run is a fresh process (memory freed by one run must not
flatter the next) and a fresh store: a new SQLite file, a new Postgres schema dropped after.

    python benchmarks/bench_growth.py --store memory
    python benchmarks/bench_growth.py --store sqlite --phases 20 --pairs-per-phase 2000
    python benchmarks/bench_growth.py --store postgres    # DUCTO_BENCH_POSTGRES_URL or the default
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio

from ducto.interface import CreditStore, open_store
from ducto.interface.models import SpendCap

PAIR_HOLD = 10
PAIR_CHARGE = 7
START = datetime(2026, 1, 20, 12, 0, tzinfo=UTC)
DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
SUMMARY = "SUMMARY "
RUNS = ("prune", "no-prune")


class MovingClock:
    """The store's clock: the benchmark moves it on between phases."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now


@dataclass
class Phase:
    """One phase's figures."""

    number: int
    size: int
    detail: str
    seconds: float
    pruned: str = ""


@dataclass
class Summary:
    """A run's figures, handed from the child process to the parent."""

    run: str
    pairs_per_phase: int
    baseline: int
    sizes: list[int] = field(default_factory=list)


# -- sizes -------------------------------------------------------------------------------------


def rss_bytes() -> int:
    """Resident memory of this process, from /proc/self/statm (Linux)."""
    with open("/proc/self/statm", encoding="ascii") as statm:
        resident_pages = int(statm.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def sqlite_size(path: Path) -> tuple[int, str]:
    """
    The database file plus its WAL, after a checkpoint, and a note of the pages in use.

    The checkpoint (which SQLite runs by itself every 1,000 WAL pages) keeps the WAL's fill
    level, which depends only on when the last one ran, out of the phase's growth.
    """
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    finally:
        conn.close()
    wal = Path(f"{path}-wal")
    main = path.stat().st_size
    log = wal.stat().st_size if wal.exists() else 0
    used = (pages - free) * page_size
    return main + log, f"file {main:>13,}  wal {log:>9,}  pages in use {used:>13,}"


def postgres_size(url: str, schema: str, vacuum: bool) -> tuple[int, str]:
    """The schema's tables with their indexes and TOAST (after a plain VACUUM if asked)."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        tables = [
            row[0]
            for row in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = %s ORDER BY tablename",
                (schema,),
            )
        ]
        if vacuum:
            for table in tables:
                conn.execute(f'VACUUM "{schema}"."{table}"')
        sizes = {
            table: conn.execute(
                "SELECT pg_total_relation_size(format('%%I.%%I', %s::text, %s::text))",
                (schema, table),
            ).fetchone()[0]  # type: ignore[index]
            for table in tables
        }
    biggest = sorted(sizes.items(), key=lambda item: -item[1])[:3]
    return sum(sizes.values()), "  ".join(f"{name} {size:,}" for name, size in biggest)


def _nothing() -> None:
    return None


# -- the workload ------------------------------------------------------------------------------


async def pair(store: CreditStore, user_id: str, key: str) -> None:
    """One keyed reserve+deduct pair, as a gateway's request makes it."""
    hold = await store.reserve_credits(
        user_id, PAIR_HOLD, "chat", min_balance=0, idempotency_key=f"{key}-r"
    )
    if hold.error is not None:
        raise RuntimeError(f"reserve refused: {hold.error}")
    done = await store.deduct_credits(
        user_id, hold.reservation_id, PAIR_CHARGE, idempotency_key=f"{key}-d"
    )
    if done.error is not None:
        raise RuntimeError(f"deduct refused: {done.error}")


async def phase_pairs(
    store: CreditStore, users: list[str], pairs: int, tasks: int, tag: str
) -> None:
    """`pairs` pairs over `tasks` tasks, users taken in turn."""
    counter = iter(range(pairs))

    async def worker() -> None:
        for n in counter:
            await pair(store, users[n % len(users)], f"{tag}-{n}")

    async with anyio.create_task_group() as tg:
        for _ in range(tasks):
            tg.start_soon(worker)


async def run(args: argparse.Namespace, kind: str) -> Summary:
    """One run (with or without pruning) in this process; prints a line per phase."""
    clock = MovingClock(START)
    retention = timedelta(days=args.retention_days)
    options: dict[str, Any] = {
        "clock": clock,
        "idempotency_retention": retention,
        "hold_retention": retention,
    }
    prune = kind == "prune"
    with tempfile.TemporaryDirectory() as tmp:
        measure: Callable[[], tuple[int, str]]
        cleanup: Callable[[], None] = _nothing
        if args.store == "memory":
            store = open_store("memory://", **options)

            def measure() -> tuple[int, str]:
                gc.collect()
                size = rss_bytes()
                return size, f"rss {size:,}"

        elif args.store == "sqlite":
            path = Path(tmp) / "growth.db"
            store = open_store(f"sqlite:///{path}", synchronous="NORMAL", **options)

            def measure() -> tuple[int, str]:
                return sqlite_size(path)

        else:
            from ducto.interface.postgres import PostgresStore

            url: str = args.url
            schema = f"bench_growth_{uuid.uuid4().hex[:8]}"
            store = PostgresStore(url, schema=schema, min_size=1, max_size=args.tasks, **options)

            def measure() -> tuple[int, str]:
                return postgres_size(url, schema, vacuum=not args.no_vacuum)

            def cleanup() -> None:
                import psycopg

                with psycopg.connect(url, autocommit=True) as conn:
                    conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')

        try:
            async with store:
                await store.setup()
                users = [f"user-{i}" for i in range(args.users)]
                for user in users:
                    (await store.add_credits(user, 10**15, "purchase")).raise_for_error()
                    await store.set_spend_cap(SpendCap(user_id=user, period="daily", limit=10**12))
                baseline, detail = measure()
                summary = Summary(kind, args.pairs_per_phase, baseline)
                print(f"-- {kind}: {args.store}, {args.users:,} users, {args.tasks} tasks")
                print(
                    f"{'phase':>5} {'pairs/s':>8} {'size':>14} {'growth':>12} {'B/pair':>8}  "
                    f"{'pruned (keys, holds, windows) in ms':36} detail"
                )
                print(f"{0:>5} {'':>8} {baseline:>14,} {'':>12} {'':>8}  {'':36} {detail}")
                previous = baseline
                for number in range(1, args.phases + 1):
                    started = time.perf_counter()
                    await phase_pairs(store, users, args.pairs_per_phase, args.tasks, f"p{number}")
                    seconds = time.perf_counter() - started
                    clock.now += timedelta(days=args.days_per_phase)
                    pruned = ""
                    if prune:
                        pruning = time.perf_counter()
                        result = await store.prune()
                        pruned = (
                            f"{result.idempotency_keys:,}, {result.holds:,}, {result.windows:,}"
                            f" in {(time.perf_counter() - pruning) * 1e3:,.0f}"
                        )
                    size, detail = measure()
                    summary.sizes.append(size)
                    growth = size - previous
                    per_pair = (size - baseline) / (number * args.pairs_per_phase)
                    print(
                        f"{number:>5} {args.pairs_per_phase / seconds:>8,.0f} {size:>14,} "
                        f"{growth:>12,} {per_pair:>8,.0f}  {pruned:36} {detail}",
                        flush=True,
                    )
                    previous = size
        finally:
            cleanup()
    return summary


# -- the report --------------------------------------------------------------------------------


def report(summaries: dict[str, Summary], phases: int) -> None:
    """
    Growth of the last phase against the first, and bytes per pair with and without prune.

    A single phase's growth is noisy where a table or index is reused or truncated in steps
    (Postgres), so the mean of the last quarter of the phases is printed too, and the steady
    bytes per pair are those of the second half.
    """
    print()
    per_pair: dict[str, float] = {}
    steady_per_pair: dict[str, float] = {}
    tail = max(1, phases // 4)
    half = phases - phases // 2
    for kind, summary in summaries.items():
        sizes = [summary.baseline, *summary.sizes]
        growths = [after - before for before, after in itertools.pairwise(sizes)]
        first, last = growths[0], growths[-1]
        recent = sum(growths[-tail:]) / tail
        per_pair[kind] = (sizes[-1] - sizes[0]) / (summary.pairs_per_phase * phases)
        steady_per_pair[kind] = sum(growths[-half:]) / (half * summary.pairs_per_phase)
        print(
            f"{kind:8}  growth of phase 1 {first:,}; of phase {phases} {last:,} "
            f"({_times(last, first)}); mean of the last {tail} phases {recent:,.0f} "
            f"({_times(recent, first)})"
        )
        print(
            f"{'':8}  bytes per pair: over the run {per_pair[kind]:,.0f}, "
            f"over the last {half} phases {steady_per_pair[kind]:,.0f}"
        )
    if set(per_pair) == set(RUNS):
        for label, figures in (("over the run", per_pair), ("last phases", steady_per_pair)):
            print(
                f"bytes per pair {label}, with pruning / without: "
                f"{figures['prune']:,.0f} / {figures['no-prune']:,.0f} "
                f"({_times(figures['prune'], figures['no-prune'])})"
            )


def _times(value: float, reference: float) -> str:
    return f"x{value / reference:.2f}" if reference else "x n/a"


def child_argv(args: argparse.Namespace, kind: str) -> list[str]:
    argv = [
        sys.executable,
        __file__,
        "--child",
        kind,
        "--store",
        args.store,
        "--phases",
        str(args.phases),
        "--pairs-per-phase",
        str(args.pairs_per_phase),
        "--users",
        str(args.users),
        "--tasks",
        str(args.tasks),
        "--days-per-phase",
        str(args.days_per_phase),
        "--retention-days",
        str(args.retention_days),
        "--url",
        args.url,
    ]
    if args.no_vacuum:
        argv.append("--no-vacuum")
    return [*argv, "--backend", args.backend]


def run_child(args: argparse.Namespace, kind: str) -> Summary:
    """Run one kind in a fresh process, echoing its lines; its summary."""
    found: Summary | None = None
    with subprocess.Popen(child_argv(args, kind), stdout=subprocess.PIPE, text=True) as child:
        assert child.stdout is not None
        for line in child.stdout:
            if line.startswith(SUMMARY):
                found = Summary(**json.loads(line[len(SUMMARY) :]))
            else:
                print(line, end="", flush=True)
    if child.returncode != 0 or found is None:
        raise SystemExit(f"the {kind} run failed (exit status {child.returncode})")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--store", choices=["memory", "sqlite", "postgres"], default="memory")
    parser.add_argument("--phases", type=int, default=20)
    parser.add_argument("--pairs-per-phase", type=int, default=2000)
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--tasks", type=int, default=8, help="pairs in flight at once")
    parser.add_argument("--days-per-phase", type=float, default=1.0)
    parser.add_argument(
        "--retention-days", type=float, default=2.0, help="idempotency and hold retention"
    )
    parser.add_argument(
        "--runs",
        default=",".join(RUNS),
        help="prune, no-prune or both (default), each in a fresh process",
    )
    parser.add_argument("--no-prune", action="store_true", help="the run without pruning only")
    parser.add_argument(
        "--url",
        default=os.environ.get("DUCTO_BENCH_POSTGRES_URL", DEFAULT_POSTGRES_URL),
        help="postgres: the database (each run works in a fresh schema, dropped after)",
    )
    parser.add_argument(
        "--no-vacuum", action="store_true", help="postgres: measure without a VACUUM per phase"
    )
    parser.add_argument("--child", choices=RUNS, help=argparse.SUPPRESS)
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    args = parser.parse_args(argv)
    if args.child is not None:
        summary = anyio.run(run, args, args.child, backend=args.backend)
        print(SUMMARY + json.dumps(asdict(summary)), flush=True)
        return 0
    kinds = ["no-prune"] if args.no_prune else [k for k in args.runs.split(",") if k]
    if not set(kinds) <= set(RUNS):
        parser.error(f"--runs takes prune and no-prune, got {args.runs!r}")
    started = datetime.now(UTC).isoformat(timespec="seconds")
    print(f"ducto bench_growth  store={args.store}  python {sys.version.split()[0]}")
    print(
        f"started {started}  phases {args.phases} x {args.pairs_per_phase:,} keyed pairs, "
        f"{args.days_per_phase:g} day(s) per phase, retention {args.retention_days:g} days"
    )
    summaries = {kind: run_child(args, kind) for kind in kinds}
    report(summaries, args.phases)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
