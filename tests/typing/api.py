"""Static checks of the public API: mypy --strict must accept this file."""

from __future__ import annotations

from ducto import CreditEventEmitter, CreditManager, PricingEngine, UsageMetrics
from ducto.errors import ErrorCode
from ducto.interface import CreditStore, MemoryStore
from ducto.interface.models import AddCreditsResult, DeductionResult, ReserveResult
from ducto.sync import SyncCreditManager, SyncCreditStore


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


async def v1_spellings_are_typed(store: CreditStore) -> int:
    """ducto 1.x's positional constructor and keyword spellings type-check."""
    engine = PricingEngine.from_dict({"models": {"_default": "1"}, "fixed": {"image": 3}})
    manager = CreditManager(store, engine, CreditEventEmitter())
    await manager.setup()
    await manager.publish_pricing_from_dict({"models": {"_default": "1"}})
    granted: AddCreditsResult = await manager.add_credits("u", 5, tx_type="purchase")
    fixed: DeductionResult = await manager.deduct_fixed("u", job_name="image")
    hold: ReserveResult = await manager.reserve_credits("u", 5)
    loaded: PricingEngine = await manager.load_pricing_from_store()
    return granted.amount + fixed.charged + hold.amount + loaded.min_balance


def sync_store_is_typed(store: CreditStore) -> int:
    """The generated blocking store methods keep the store's parameter and result types."""
    with SyncCreditStore(store, backend="trio") as blocking:
        hold: ReserveResult = blocking.reserve_credits("u", 10, "chat", ttl=30.0)
        done: DeductionResult = blocking.deduct_credits("u", hold.reservation_id, 7)
        return done.charged
