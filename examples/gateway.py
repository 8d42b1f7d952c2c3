"""
An LLM gateway billing streamed chat requests with `CreditManager.hold()`.

Concurrent simulated users send chat requests. Each request holds an estimate, streams a
simulated model response (the provider bills the prompt on the first chunk, then output tokens
chunk by chunk) and records the partial usage as it arrives. Some clients disconnect midway
(a timeout cancels the stream), some providers fail mid-stream, some users run out of credits.
Whatever happens, the hold is settled for what was recorded or released: the books always add
up. At the end the script prints balances, spend by model and the outcome counts.

    python examples/gateway.py                      # in memory
    python examples/gateway.py sqlite:///billing.db  # on SQLite (a file in this directory)
"""

from __future__ import annotations

import random
import sys
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import aclosing
from datetime import UTC, datetime, timedelta

import anyio
from anyio.lowlevel import checkpoint

from ducto import (
    CreditEvent,
    CreditEventEmitter,
    CreditEventType,
    CreditManager,
    InsufficientCreditsError,
    UsageMetrics,
    open_store,
)

# Credits are integer minor units: here 1 credit = $0.0001, so gpt-4o's $2.50 per million
# input tokens is 0.025 credits per token. Each charge is rounded up once.
PRICING = {
    "models": {
        "gpt-4o": "input_tokens * 0.025 + output_tokens * 0.1",
        "gpt-4o-mini": "input_tokens * 0.0015 + output_tokens * 0.006",
        "claude-sonnet": "input_tokens * 0.03 + output_tokens * 0.15",
        "_default": "input_tokens * 0.01 + output_tokens * 0.03",
    },
    "cache": {"prompt_cache": "-cache_read_tokens * 0.0125"},
    "min_balance": 0,
    "plans": {
        "free": {"id": "free", "name": "Free", "free_allowance": 0},
        "pro": {
            "id": "pro",
            "name": "Pro",
            "free_allowance": 300,
            "rate_overrides": {"gpt-4o": "input_tokens * 0.02 + output_tokens * 0.08"},
            "features": {"long_context": True},
        },
    },
}
MODELS = ("gpt-4o", "gpt-4o-mini", "claude-sonnet", "llama-3-70b")
USERS = 12
REQUESTS_PER_USER = 8


class ProviderError(Exception):
    """The upstream model provider failed mid-stream."""


async def stream_completion(
    rng: random.Random, model: str, prompt_tokens: int, max_tokens: int
) -> AsyncIterator[UsageMetrics]:
    """A simulated streaming model call: yields each chunk's usage as the provider reports it."""
    yield UsageMetrics(model=model, input_tokens=prompt_tokens)  # the prompt is billed first
    produced = 0
    while produced < max_tokens:
        await anyio.sleep(rng.uniform(0.0005, 0.003))
        step = min(rng.randint(20, 80), max_tokens - produced)
        produced += step
        yield UsageMetrics(model=model, output_tokens=step)
        if rng.random() < 0.03:
            raise ProviderError("upstream connection reset")
        if rng.random() < 0.15:
            return  # the model finished early


async def chat_request(
    manager: CreditManager, user_id: str, number: int, rng: random.Random, outcomes: Counter[str]
) -> None:
    """One request through the gateway: hold, stream, record, settle."""
    model = rng.choice(MODELS)
    prompt_tokens = rng.randint(200, 3000)
    max_tokens = rng.choice([256, 512, 1024])
    estimate = UsageMetrics(model=model, input_tokens=prompt_tokens, output_tokens=max_tokens)
    client_timeout = rng.choice([0.004, 0.02, 1.0, 1.0, 1.0])
    try:
        with anyio.move_on_after(client_timeout) as deadline:
            async with manager.hold(
                user_id, estimate, idempotency_key=f"{user_id}-req-{number}"
            ) as hold:
                # A real gateway forwards each chunk's text to the client here.
                stream = stream_completion(rng, model, prompt_tokens, max_tokens)
                async with aclosing(stream):
                    async for usage in stream:
                        hold.record(usage)
                await hold.settle()  # exactly what was recorded
        timed_out = deadline.cancelled_caught
        outcomes["client timed out (charged for what streamed)" if timed_out else "ok"] += 1
    except ProviderError:
        outcomes["provider failed (charged for what streamed)"] += 1
    except InsufficientCreditsError:
        outcomes["refused: not enough credits"] += 1


async def user_session(
    manager: CreditManager, user_id: str, rng: random.Random, outcomes: Counter[str]
) -> None:
    """A user sending a few requests, two at a time."""
    async with anyio.create_task_group() as tg:
        for number in range(REQUESTS_PER_USER):
            tg.start_soon(chat_request, manager, user_id, number, rng, outcomes)
            if number % 2:
                await anyio.sleep(rng.uniform(0.001, 0.01))


async def main(url: str) -> None:
    rng = random.Random(7)
    alerts: list[str] = []
    counts: Counter[str] = Counter()

    def count(event: CreditEvent) -> None:
        counts[event.type.value] += 1

    async def alert(event: CreditEvent) -> None:
        await checkpoint()  # e.g. an async webhook or e-mail client
        alerts.append(f"{event.user_id} below {event.threshold} ({event.available} left)")

    events = CreditEventEmitter()
    events.on(None, count)
    events.on(CreditEventType.LOW_BALANCE, alert)

    async with CreditManager(
        open_store(url), events=events, low_balance_thresholds=[500, 100]
    ) as manager:
        await manager.store.setup()
        version = await manager.publish_pricing(PRICING, label="launch prices")
        run = f"{datetime.now(UTC):%H%M%S%f}"  # fresh users on every run of a shared database
        users = [f"user-{run}-{n:02d}" for n in range(USERS)]
        for n, user_id in enumerate(users):
            await manager.add_credits(user_id, rng.choice([400, 1_000, 3_000]), "purchase")
            if n % 3 == 0:
                await manager.set_user_plan(user_id, "pro")

        outcomes: Counter[str] = Counter()
        async with anyio.create_task_group() as tg:
            for user_id in users:
                tg.start_soon(user_session, manager, user_id, rng, outcomes)

        print(f"pricing version {version}; {sum(outcomes.values())} requests")
        for outcome, number in sorted(outcomes.items()):
            print(f"  {outcome:45} {number:4}")
        print("balances:")
        for user_id in users:
            balance = await manager.get_balance(user_id)
            plan = (await manager.get_user_plan(user_id)).plan_id or "-"
            assert balance.reserved == 0, "a hold was left open"
            print(f"  user {user_id[-2:]} {plan:4} {balance.balance:>8,} credits")
        now = datetime.now(UTC)
        print("spend by model:")
        for row in await manager.spend_by_model(now - timedelta(days=1), now + timedelta(days=1)):
            calls = row.transaction_count
            print(f"  {row.model:15} {row.total_spend:>8,} credits in {calls} calls")
        print("events:", ", ".join(f"{kind} {n}" for kind, n in sorted(counts.items())))
        print(f"low-balance alerts: {len(alerts)}" + (f", e.g. {alerts[0]}" if alerts else ""))
        print("books: no hold left open")


if __name__ == "__main__":
    anyio.run(main, sys.argv[1] if len(sys.argv) > 1 else "memory://")
