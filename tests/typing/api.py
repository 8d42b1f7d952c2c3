"""Static checks of the public API: mypy --strict must accept this file."""

from __future__ import annotations

from ducto.errors import ErrorCode
from ducto.interface import CreditStore, MemoryStore
from ducto.interface.models import DeductionResult, ReserveResult


def memory_store_is_a_credit_store() -> CreditStore:
    """MemoryStore satisfies the CreditStore protocol without subclassing it."""
    store: CreditStore = MemoryStore()
    return store


async def results_are_typed(store: CreditStore) -> int:
    """Results carry int credits and ErrorCode errors."""
    hold: ReserveResult = await store.reserve_credits("u", 10, "chat")
    if hold.error is ErrorCode.INSUFFICIENT_CREDITS:
        return 0
    done: DeductionResult = await store.deduct_credits("u", hold.reservation_id, 7)
    return done.raise_for_error().balance_after
