"""The README quickstart, runnable as it stands."""

from __future__ import annotations

import anyio

from ducto import CreditMetadata
from ducto.interface import open_store


async def main() -> None:
    async with open_store("sqlite:///billing.db") as store:
        await store.setup()  # idempotent; safe on every deploy
        await store.add_credits("alice", 1_000, "purchase", idempotency_key="stripe-evt-1")

        hold = await store.reserve_credits(
            "alice", 120, "chat", CreditMetadata(model="gpt-4o"), idempotency_key="req-42"
        )
        hold.raise_for_error()  # InsufficientCreditsError, SpendCapExceededError, ...
        try:
            actual = 87  # ... call the model, price the usage ...
        except BaseException:
            with anyio.CancelScope(shield=True):
                await store.release_reservation("alice", hold.reservation_id)
            raise
        charged = await store.deduct_credits("alice", hold.reservation_id, actual, "req-42")
        print(charged.balance_after, (await store.get_balance("alice")).available)


anyio.run(main)  # or anyio.run(main, backend="trio")
