"""Static checks of the public API: mypy --strict must accept this file."""

from __future__ import annotations

from ducto import CreditManager, UsageMetrics
from ducto.errors import ErrorCode
from ducto.interface import CreditStore, MemoryStore
from ducto.interface.models import DeductionResult, ReserveResult
from ducto.sync import SyncCreditManager


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


async def manager_calls_are_typed(store: CreditStore) -> int:
    """CreditManager prices usage and returns typed settlements; holds settle once."""
    manager = CreditManager(store)
    done: DeductionResult = await manager.deduct("u", UsageMetrics(model="m", input_tokens=5))
    async with manager.hold("u", UsageMetrics(model="m", output_tokens=9)) as hold:
        hold.record(UsageMetrics(model="m", output_tokens=4))
        settled: DeductionResult = await hold.settle()
    return done.amount + settled.amount


def sync_facade_is_typed(store: CreditStore) -> int:
    """The blocking facade keeps the manager's result types."""
    with SyncCreditManager(CreditManager(store)) as billing:
        done: DeductionResult = billing.deduct("u", UsageMetrics(input_tokens=1))
        return done.amount
