"""
A simulated LLM gateway billing many concurrent users on the embedded SQLite store.

Each request reserves an estimate, "calls a model" (a short random wait), then settles the
actual cost, or releases the hold when the call fails. Some answers are refunded, every user
starts with a purchase plus a promotional grant that expires during the run, and a sweep
writes off what the promotions left unspent. At the end the script prints balances, spend by
model and the books' consistency check.

    python examples/gateway_demo.py                  # a fresh database in a temp directory
    python examples/gateway_demo.py --db billing.db --users 500 --requests 5000 --backend trio
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio

from ducto import CreditMetadata
from ducto.interface import CreditStore, open_store

# Credits per 1,000 tokens (input, output): integer minor units, rounded up per call.
MODELS = {
    "gpt-4o": (5, 15),
    "gpt-4o-mini": (1, 2),
    "claude-sonnet": (3, 15),
    "llama-70b": (1, 1),
}
PROMO_SECONDS = 1.0


@dataclass
class Tally:
    """What happened to the requests."""

    outcomes: Counter[str] = field(default_factory=Counter)
    charged: int = 0
    refunded: int = 0
    latencies: list[float] = field(default_factory=list)


def cost(model: str, input_tokens: int, output_tokens: int) -> int:
    """Whole credits for a call, rounded up so nothing is free by truncation."""
    price_in, price_out = MODELS[model]
    milli = input_tokens * price_in + output_tokens * price_out
    return max(1, -(-milli // 1000))


async def handle_request(
    store: CreditStore, user_id: str, request_id: str, rng: random.Random, tally: Tally
) -> None:
    """One gateway request: hold an estimate, call the model, settle or release."""
    started = time.perf_counter()
    model = rng.choice(list(MODELS))
    input_tokens = rng.randint(200, 4000)
    max_output = rng.choice([256, 512, 1024])
    estimate = cost(model, input_tokens, max_output)
    meta = CreditMetadata(model=model, input_tokens=input_tokens, reference_id=request_id)
    hold = await store.reserve_credits(
        user_id, estimate, "chat", meta, min_balance=0, idempotency_key=request_id
    )
    if not hold.ok:
        tally.outcomes[str(hold.error)] += 1
        return
    await anyio.sleep(rng.uniform(0.001, 0.02))  # the model call
    if rng.random() < 0.05:  # the provider failed: nothing to charge
        await store.release_reservation(user_id, hold.reservation_id)
        tally.outcomes["released (model error)"] += 1
        return
    output_tokens = rng.randint(20, max_output)
    usage = CreditMetadata(model=model, input_tokens=input_tokens, output_tokens=output_tokens)
    result = await store.deduct_credits(
        user_id, hold.reservation_id, cost(model, input_tokens, output_tokens), request_id, usage
    )
    result.raise_for_error()
    tally.charged += result.charged
    tally.outcomes["settled"] += 1
    if rng.random() < 0.03:  # a bad answer, refunded in full
        refund = await store.refund_credits(result.transaction_id, reason="bad answer")
        if refund.ok:
            tally.refunded += refund.amount
            tally.outcomes["refunded"] += 1
    tally.latencies.append(time.perf_counter() - started)


async def run(db: Path, users: int, requests: int, concurrency: int, seed: int) -> int:
    rng = random.Random(seed)
    tally = Tally()
    user_ids = [f"user-{n:04d}" for n in range(users)]
    async with open_store(f"sqlite:///{db}", synchronous="NORMAL") as store:
        await store.setup()
        promo_end = datetime.now(UTC) + timedelta(seconds=PROMO_SECONDS)
        for user_id in user_ids:
            await store.add_credits(
                user_id, rng.randint(20, 400), "purchase", idempotency_key=f"{user_id}-purchase"
            )
            await store.add_credits(
                user_id,
                100,
                "signup_bonus",
                expires_at=promo_end,
                idempotency_key=f"{user_id}-promo",
            )

        queue = iter(range(requests))
        started = time.perf_counter()

        async def worker() -> None:
            for n in queue:
                user_id = rng.choice(user_ids)
                await handle_request(store, user_id, f"req-{seed}-{n}", rng, tally)

        async with anyio.create_task_group() as tg:
            for _ in range(concurrency):
                tg.start_soon(worker)
        elapsed = time.perf_counter() - started

        await anyio.sleep(max(0.0, (promo_end - datetime.now(UTC)).total_seconds()))
        swept = await store.sweep_expired_credits()
        window = (datetime.now(UTC) - timedelta(days=1), datetime.now(UTC) + timedelta(days=1))
        by_model = await store.spend_by_model(*window)
        top = await store.top_users(5, *window)
        stats = await store.aggregate_stats(*window)

        problems = 0
        totals = Counter[str]()
        for user_id in user_ids:
            balance = await store.get_balance(user_id)
            page = await store.list_transactions(user_id, limit=1000)
            ledger_sum = sum(row.amount for row in page.items)
            if page.next_cursor is None and ledger_sum != balance.balance:
                problems += 1
            if balance.reserved:
                problems += 1
            totals["balance"] += balance.balance

    print(f"database: {db}")
    print(
        f"{requests:,} requests from {users:,} users, {concurrency} at a time, "
        f"in {elapsed:.2f} s ({requests / elapsed:,.0f} requests/s)"
    )
    for outcome, count in sorted(tally.outcomes.items()):
        print(f"  {outcome:28} {count:>7,}")
    if tally.latencies:
        tally.latencies.sort()
        p50 = tally.latencies[len(tally.latencies) // 2] * 1000
        p99 = tally.latencies[int(len(tally.latencies) * 0.99)] * 1000
        print(f"  request latency              p50 {p50:.1f} ms, p99 {p99:.1f} ms")
    print(f"charged {tally.charged:,} credits, refunded {tally.refunded:,}")
    print(
        f"expired promotions swept: {swept.expired_count} lots, "
        f"{swept.expired_amount:,} unspent credits"
    )
    print("spend by model:")
    for row in by_model:
        print(
            f"  {row.model:16} {row.total_spend:>9,} credits in {row.transaction_count:>6,} calls"
        )
    print("top spenders:")
    for top_row in top:
        print(f"  {top_row.user_id:16} {top_row.total_spend:>9,} credits")
    print(
        f"total spend {stats.total_credits_consumed:,}; active users {stats.active_users}; "
        f"remaining balances {totals['balance']:,}"
    )
    print(
        "books: every balance equals its ledger, no hold left open"
        if problems == 0
        else f"books: {problems} inconsistencies"
    )
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--db", type=Path, help="database file (default: a temp directory)")
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        db = args.db or Path(tmp) / "ducto-demo.db"
        return anyio.run(
            run, db, args.users, args.requests, args.concurrency, args.seed, backend=args.backend
        )


if __name__ == "__main__":
    sys.exit(main())
