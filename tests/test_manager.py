"""CreditManager: pricing versions, charges, retries, typed refusals, teams, events, alerts."""

from __future__ import annotations

import gc
import logging
import uuid
from collections import Counter
from datetime import timedelta
from decimal import Decimal
from typing import Any

import anyio
import pytest
from anyio.lowlevel import checkpoint
from tests._manager_support import ProxyStore, Recorder, usage_rows
from tests.conftest import FakeClock
from tests.contract._checks import all_rows

from ducto import CreditManager, MemoryStore, PricingEngine, UsageMetrics
from ducto.errors import (
    DuctoError,
    ExpressionError,
    IdempotencyConflictError,
    InsufficientCreditsError,
    InvalidArgumentError,
    OverRefundError,
    PricingNotLoadedError,
    SpendCapExceededError,
    StoreError,
    UserNotInTeamError,
)
from ducto.events import CreditEvent, CreditEventEmitter, CreditEventType
from ducto.interface.base import CreditStore
from ducto.interface.models import SpendCap

pytestmark = pytest.mark.anyio

PRICING: dict[str, Any] = {
    "models": {
        "gpt-4o": "input_tokens * 0.01 + output_tokens * 0.03",
        "_default": "input_tokens * 0.001 + output_tokens * 0.002",
    },
    "fixed": {"image": 25},
    "min_balance": 0,
    "plans": {
        "pro": {
            "id": "pro",
            "name": "Pro",
            "free_allowance": 30,
            "rate_overrides": {"gpt-4o": "input_tokens * 0.005 + output_tokens * 0.01"},
            "features": {"priority": True},
        },
        "basic": {"id": "basic", "name": "Basic"},
    },
}
CALL = UsageMetrics(model="gpt-4o", input_tokens=1000, output_tokens=1000)
"""Costs 40 credits at base rates, 15 on the pro plan."""


@pytest.fixture
def recorder() -> Recorder:
    """A handler registered for nothing yet."""
    return Recorder()


@pytest.fixture
async def manager(store: CreditStore, recorder: Recorder) -> CreditManager:
    """A manager over the store under test, with PRICING published and every event recorded."""
    events = CreditEventEmitter()
    events.on(None, recorder)
    new_manager = CreditManager(store, events=events)
    await new_manager.publish_pricing(PRICING, label="test")
    return new_manager


# -- pricing -----------------------------------------------------------------------------------


async def test_publish_pricing_stores_and_activates_a_version(
    store: CreditStore, manager: CreditManager
) -> None:
    """Publishing stores the config as the active version and prices with it at once."""
    active = await store.get_active_pricing()

    assert active is not None
    assert "test" == active.label
    assert {"gpt-4o", "_default"} == set(active.config.models)
    assert 40 == manager.calculate(CALL).credits
    assert 15 == manager.calculate(CALL, plan="pro").credits


async def test_unpriceable_config_is_refused_before_the_store(store: CreditStore) -> None:
    """A config the engine cannot price raises and nothing reaches the store."""
    manager = CreditManager(store)

    with pytest.raises(ExpressionError, match="models\\['gpt-4o'\\]"):
        await manager.publish_pricing({"models": {"gpt-4o": "input_tokens * price"}})
    with pytest.raises(InvalidArgumentError):
        await manager.publish_pricing({"models": {"_default": "1"}, "surprise": True})

    assert await store.get_active_pricing() is None
    assert [] == await store.get_pricing_history()
    with pytest.raises(InvalidArgumentError, match="no pricing loaded"):
        _ = manager.engine


async def test_load_pricing_from_store(store: CreditStore, manager: CreditManager) -> None:
    """A second manager loads the active version; an empty store raises, as in ducto 1.x."""
    other = CreditManager(store)
    engine = await other.load_pricing_from_store()
    empty = CreditManager(MemoryStore())

    assert engine is other.engine
    assert 40 == other.calculate(CALL).credits
    with pytest.raises(PricingNotLoadedError, match="no pricing version"):
        await empty.load_pricing_from_store()
    with pytest.raises(PricingNotLoadedError):
        _ = empty.engine


async def test_publishing_a_new_version_changes_prices(
    store: CreditStore, manager: CreditManager, user_id: str
) -> None:
    """After a new version without plans, a pro user is charged base rates."""
    await manager.add_credits(user_id, 500, "purchase")
    await manager.set_user_plan(user_id, "pro")
    await manager.publish_pricing({"models": PRICING["models"], "min_balance": 0})

    result = await manager.deduct(user_id, CALL)

    assert 40 == result.charged
    assert 2 == len(await store.get_pricing_history())


# -- deductions --------------------------------------------------------------------------------


async def test_deduct_charges_the_priced_cost(
    store: CreditStore, manager: CreditManager, user_id: str
) -> None:
    """deduct prices the usage, charges it and records the usage on the row."""
    await manager.add_credits(user_id, 100, "purchase")

    result = await manager.deduct(
        user_id, CALL, metadata={"request": "r-1", "model": "spoofed", "input_tokens": 1}
    )

    assert 40 == result.charged
    assert 60 == result.balance_after
    [row] = await usage_rows(store, user_id)
    assert result.transaction_id == row.id
    assert result.reservation_id == row.reservation_id
    assert -40 == row.amount
    assert "gpt-4o" == row.metadata["model"]
    assert 1000 == row.metadata["input_tokens"]
    assert 1000 == row.metadata["output_tokens"]
    assert Decimal(40) == Decimal(row.metadata["cost_total"])
    assert manager.pricing_version is not None
    assert manager.pricing_version == row.metadata["pricing_version"]
    assert "r-1" == row.metadata["request"]
    balance = await manager.get_balance(user_id)
    assert (60, 0) == (balance.balance, balance.reserved)


async def test_deduct_uses_plan_overrides_and_allowance_first(
    manager: CreditManager, user_id: str
) -> None:
    """A pro user pays the override price, from the plan allowance before the balance."""
    await manager.add_credits(user_id, 100, "purchase")
    await manager.set_user_plan(user_id, "pro")

    first = await manager.deduct(user_id, CALL)
    second = await manager.deduct(user_id, CALL)
    third = await manager.deduct(user_id, CALL)

    assert (0, 15) == (first.charged, first.allowance_consumed)
    assert (0, 15) == (second.charged, second.allowance_consumed)
    assert (15, 0) == (third.charged, third.allowance_consumed)
    assert 85 == (await manager.get_balance(user_id)).balance


async def test_plan_without_overrides_prices_at_base_rates(
    manager: CreditManager, user_id: str
) -> None:
    """A plan that overrides nothing charges base rates."""
    await manager.add_credits(user_id, 100, "purchase")
    await manager.set_user_plan(user_id, "basic")

    result = await manager.deduct(user_id, CALL)

    assert 40 == result.charged


async def test_retry_with_the_same_key_charges_once(
    store: CreditStore, manager: CreditManager, user_id: str, recorder: Recorder
) -> None:
    """The same request id, sent again, replays the original charge."""
    await manager.add_credits(user_id, 100, "purchase")

    first = await manager.deduct(user_id, CALL, idempotency_key="req-1")
    again = await manager.deduct(user_id, CALL, idempotency_key="req-1")

    assert first.transaction_id == again.transaction_id
    assert (False, True) == (first.idempotent, again.idempotent)
    assert 60 == (await manager.get_balance(user_id)).balance
    assert 1 == len(await usage_rows(store, user_id))
    assert 1 == len(recorder.of(CreditEventType.CREDITS_DEDUCTED))


async def test_concurrent_retries_with_the_same_key_charge_once(
    store: CreditStore, manager: CreditManager, user_id: str
) -> None:
    """Ten copies of one request at once charge it once."""
    await manager.add_credits(user_id, 1000, "purchase")

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(manager.deduct, user_id, CALL, "req-2")

    balance = await manager.get_balance(user_id)
    assert (960, 0) == (balance.balance, balance.reserved)
    assert 1 == len(await usage_rows(store, user_id))


async def test_different_usage_under_a_used_key_is_a_conflict(
    manager: CreditManager, user_id: str
) -> None:
    """Reusing a request id for different usage raises IdempotencyConflictError."""
    await manager.add_credits(user_id, 1000, "purchase")
    await manager.deduct(user_id, CALL, idempotency_key="req-3")

    with pytest.raises(IdempotencyConflictError) as info:
        await manager.deduct(user_id, CALL + CALL, idempotency_key="req-3")

    assert "req-3" == info.value.idempotency_key
    balance = await manager.get_balance(user_id)
    assert (960, 0) == (balance.balance, balance.reserved)


async def test_retry_after_a_failed_charge_charges_once(store: CreditStore, user_id: str) -> None:
    """A charge the store failed changed nothing; retries with the key then charge once."""
    proxy = ProxyStore(store)
    recorder = Recorder()
    events = CreditEventEmitter()
    events.on(None, recorder)
    manager = CreditManager(proxy, events=events)  # type: ignore[arg-type]
    await manager.publish_pricing(PRICING)
    await manager.add_credits(user_id, 100, "purchase")
    proxy.charge_failures = 1

    with pytest.raises(StoreError):
        await manager.deduct(user_id, CALL, idempotency_key="req-4")
    after_failure = await store.get_balance(user_id)
    retried = await manager.deduct(user_id, CALL, idempotency_key="req-4")
    replayed = await manager.deduct(user_id, CALL, idempotency_key="req-4")

    assert (100, 0) == (after_failure.balance, after_failure.reserved)
    [failed] = recorder.of(CreditEventType.DEDUCT_FAILED)
    assert ("StoreError", 40, user_id) == (failed.error, failed.amount, failed.user_id)
    assert (False, True) == (retried.idempotent, replayed.idempotent)
    assert retried.transaction_id == replayed.transaction_id
    balance = await store.get_balance(user_id)
    assert (60, 0) == (balance.balance, balance.reserved)
    assert [-40] == [row.amount for row in await usage_rows(store, user_id)]


async def test_a_cancellation_during_a_charge_lets_it_finish(
    store: CreditStore, user_id: str
) -> None:
    """A timeout that fires while the store charges takes effect once the charge is done."""
    proxy = ProxyStore(store)
    manager = CreditManager(proxy)  # type: ignore[arg-type]
    await manager.publish_pricing(PRICING)
    await manager.add_credits(user_id, 100, "purchase")
    proxy.charge_delay = 0.05
    result = None

    with anyio.move_on_after(0.01) as scope:
        result = await manager.deduct(user_id, CALL, idempotency_key="req-5")
        await checkpoint()

    assert scope.cancelled_caught is True
    assert result is not None
    assert 40 == result.charged
    balance = await store.get_balance(user_id)
    assert (60, 0) == (balance.balance, balance.reserved)


async def test_deduct_and_deduct_fixed_are_one_store_call_each(
    store: CreditStore, user_id: str
) -> None:
    """A charge is one charge_credits call: no hold is placed, settled or released."""
    proxy = ProxyStore(store)
    manager = CreditManager(proxy)  # type: ignore[arg-type]
    await manager.publish_pricing(PRICING)
    await manager.add_credits(user_id, 100, "purchase")
    proxy.calls.clear()

    await manager.deduct(user_id, CALL, idempotency_key="one-call")
    await manager.deduct_fixed(user_id, "image")

    # The plan lookup (the pricing has plan rate overrides) is the only other call.
    assert ["get_user_plan", "charge_credits", "charge_credits"] == proxy.calls
    assert 35 == (await store.get_balance(user_id)).balance


async def test_a_request_first_tried_as_a_hold_is_charged_once_by_deduct(
    store: CreditStore, manager: CreditManager, user_id: str
) -> None:
    """deduct() with the key of a released hold() attempt charges once, and replays."""
    await manager.add_credits(user_id, 100, "purchase")

    with pytest.raises(RuntimeError):
        async with manager.hold(user_id, CALL, idempotency_key="req-mixed"):
            raise RuntimeError("provider down")
    charged = await manager.deduct(user_id, CALL, idempotency_key="req-mixed")
    again = await manager.deduct(user_id, CALL, idempotency_key="req-mixed")

    assert (40, False, True) == (charged.charged, charged.idempotent, again.idempotent)
    assert charged.transaction_id == again.transaction_id
    assert [-40] == [row.amount for row in await usage_rows(store, user_id)]
    balance = await store.get_balance(user_id)
    assert (60, 0) == (balance.balance, balance.reserved)


async def test_a_deduct_cancelled_before_its_hold_charges_nothing(
    store: CreditStore, manager: CreditManager, user_id: str
) -> None:
    """A deduct cancelled at once (while it looks up the plan) changes nothing."""
    await manager.add_credits(user_id, 100, "purchase")

    with anyio.move_on_after(0) as scope:
        await manager.deduct(user_id, CALL)

    assert scope.cancelled_caught is True
    balance = await store.get_balance(user_id)
    assert (100, 0) == (balance.balance, balance.reserved)
    assert [] == await usage_rows(store, user_id)


async def test_insufficient_credits_raise_a_typed_error(
    store: CreditStore, manager: CreditManager, user_id: str
) -> None:
    """A user who cannot pay gets InsufficientCreditsError with the figures; nothing changes."""
    await manager.add_credits(user_id, 30, "purchase")

    with pytest.raises(InsufficientCreditsError) as info:
        await manager.deduct(user_id, CALL)

    assert (user_id, 40, 30) == (info.value.user_id, info.value.needed, info.value.available)
    balance = await manager.get_balance(user_id)
    assert (30, 0) == (balance.balance, balance.reserved)
    assert [] == await usage_rows(store, user_id)


async def test_min_balance_comes_from_the_pricing_config(
    manager: CreditManager, user_id: str
) -> None:
    """The config's min_balance is the floor a charge's hold must leave."""
    await manager.publish_pricing({**PRICING, "min_balance": 20})
    await manager.add_credits(user_id, 50, "purchase")

    with pytest.raises(InsufficientCreditsError):
        await manager.deduct(user_id, CALL)


async def test_per_model_spend_cap_raises_a_typed_error(
    store: CreditStore, manager: CreditManager, user_id: str
) -> None:
    """The hold names the model, so a per-model deny cap applies and raises with its figures."""
    await manager.add_credits(user_id, 1000, "purchase")
    await store.set_spend_cap(
        SpendCap(user_id=user_id, cap_type="daily", model="gpt-4o", limit=50, action="deny")
    )
    await manager.deduct(user_id, CALL)

    with pytest.raises(SpendCapExceededError) as info:
        await manager.deduct(user_id, CALL)
    other_model = await manager.deduct(user_id, UsageMetrics(model="llama", input_tokens=10000))

    error = info.value
    assert (user_id, "gpt-4o", 50, 40) == (
        error.user_id,
        error.model,
        error.limit,
        error.current_spend,
    )
    assert 10 == other_model.charged
    assert 0 == (await manager.get_balance(user_id)).reserved


async def test_deduct_fixed_charges_the_job(
    store: CreditStore, manager: CreditManager, user_id: str
) -> None:
    """A fixed job costs its configured credits and is named on the row."""
    await manager.add_credits(user_id, 100, "purchase")

    result = await manager.deduct_fixed(user_id, "image", idempotency_key="img-1")
    again = await manager.deduct_fixed(user_id, "image", idempotency_key="img-1")

    assert 25 == result.charged
    assert again.idempotent is True
    [row] = await usage_rows(store, user_id)
    assert "image" == row.metadata["fixed_job"]
    assert 75 == (await manager.get_balance(user_id)).balance


async def test_unknown_fixed_job_is_never_free(
    store: CreditStore, manager: CreditManager, user_id: str
) -> None:
    """An unknown job raises InvalidArgumentError and writes nothing."""
    await manager.add_credits(user_id, 100, "purchase")

    with pytest.raises(InvalidArgumentError, match="video"):
        await manager.deduct_fixed(user_id, "video")

    assert [] == await usage_rows(store, user_id)
    assert 0 == (await manager.get_balance(user_id)).reserved


async def test_free_usage_still_writes_a_usage_row(
    store: CreditStore, manager: CreditManager, user_id: str
) -> None:
    """Usage that prices to 0 settles for 0 and still has a transaction."""
    await manager.add_credits(user_id, 10, "purchase")

    result = await manager.deduct(user_id, UsageMetrics(model="gpt-4o"))

    assert 0 == result.charged
    assert [0] == [row.amount for row in await usage_rows(store, user_id)]
    balance = await manager.get_balance(user_id)
    assert (10, 0) == (balance.balance, balance.reserved)


async def test_bad_calls_raise_before_anything_changes(
    store: CreditStore, manager: CreditManager, user_id: str
) -> None:
    """Wrong argument types, unpriceable models and a missing engine raise at once."""
    await manager.add_credits(user_id, 100, "purchase")
    no_pricing = CreditManager(store)

    with pytest.raises(InvalidArgumentError, match="metrics"):
        await manager.deduct(user_id, {"input_tokens": 3})  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="metadata"):
        await manager.deduct(user_id, CALL, metadata=["not", "a", "dict"])  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="no pricing loaded"):
        await no_pricing.deduct(user_id, CALL)
    with pytest.raises(InvalidArgumentError):
        CreditManager(store, hold_ttl=0)
    with pytest.raises(InvalidArgumentError):
        CreditManager(store, low_balance_thresholds=[True])

    assert [] == await usage_rows(store, user_id)


async def test_team_charges(
    store: CreditStore, manager: CreditManager, user_id: str, other_user_id: str, recorder: Recorder
) -> None:
    """deduct_team prices usage or takes credits from the pool, for members only."""
    team = await store.create_team("research", 100)
    await store.add_team_member(team.team_id, user_id)

    priced = await manager.deduct_team(team.team_id, user_id, CALL, {"ticket": "t-1"})
    fixed = await manager.deduct_team(team.team_id, user_id, 5, idempotency_key="t-2")
    with pytest.raises(UserNotInTeamError) as info:
        await manager.deduct_team(team.team_id, other_user_id, 5)

    assert (40, 60) == (priced.charged, priced.team_balance_after)
    assert (5, 55) == (fixed.charged, fixed.team_balance_after)
    assert (team.team_id, other_user_id) == (info.value.team_id, info.value.user_id)
    assert 55 == (await store.get_team_balance(team.team_id)).balance
    charged = recorder.of(CreditEventType.CREDITS_DEDUCTED)
    assert [(team.team_id, user_id, 40), (team.team_id, user_id, 5)] == [
        (e.team_id, e.user_id, e.amount) for e in charged
    ]
    assert "gpt-4o" == charged[0].metadata["model"]


# -- events ------------------------------------------------------------------------------------


async def test_events_report_each_change(
    manager: CreditManager, user_id: str, recorder: Recorder
) -> None:
    """Grants, charges, refunds and adjustments each emit one event with their figures."""
    added = await manager.add_credits(user_id, 100, "purchase", idempotency_key="pay-1")
    await manager.add_credits(user_id, 100, "purchase", idempotency_key="pay-1")
    charged = await manager.deduct(user_id, CALL)
    refunded = await manager.refund_credits(charged.transaction_id, 10, "slow answer")
    await manager.add_credits(user_id, -5, "adjustment")

    kinds = [e.type for e in recorder.events]
    assert [
        CreditEventType.CREDITS_ADDED,
        CreditEventType.CREDITS_DEDUCTED,
        CreditEventType.CREDITS_REFUNDED,
        CreditEventType.CREDITS_DEDUCTED,
    ] == kinds
    grant, charge, refund, adjustment = recorder.events
    assert (user_id, 100, 100, 100, added.transaction_id, "pay-1") == (
        grant.user_id,
        grant.amount,
        grant.balance_after,
        grant.available,
        grant.transaction_id,
        grant.idempotency_key,
    )
    assert (40, 60, charged.transaction_id, charged.reservation_id) == (
        charge.amount,
        charge.balance_after,
        charge.transaction_id,
        charge.reservation_id,
    )
    assert {"model": "gpt-4o", "input_tokens": 1000, "output_tokens": 1000}.items() <= (
        charge.metadata.items()
    )
    assert (10, 70, refunded.refund_transaction_id) == (
        refund.amount,
        refund.balance_after,
        refund.transaction_id,
    )
    assert (5, 65, "adjustment") == (
        adjustment.amount,
        adjustment.balance_after,
        adjustment.metadata["transaction_type"],
    )
    assert all(e.timestamp.tzinfo is not None for e in recorder.events)


async def test_refund_failures_are_reported(
    manager: CreditManager, user_id: str, recorder: Recorder
) -> None:
    """A refused refund raises its typed error and emits refund_failed."""
    await manager.add_credits(user_id, 100, "purchase")
    charged = await manager.deduct(user_id, CALL)

    with pytest.raises(OverRefundError):
        await manager.refund_credits(charged.transaction_id, 41)

    [failed] = recorder.of(CreditEventType.REFUND_FAILED)
    assert (charged.transaction_id, 41, "over_refund") == (
        failed.transaction_id,
        failed.amount,
        failed.error,
    )


async def test_cap_warning_event(
    store: CreditStore, manager: CreditManager, user_id: str, recorder: Recorder
) -> None:
    """A charge that takes spend past a warn cap emits cap_warning."""
    await manager.add_credits(user_id, 1000, "purchase")
    await store.set_spend_cap(SpendCap(user_id=user_id, cap_type="daily", limit=50, action="warn"))

    await manager.deduct(user_id, CALL)
    second = await manager.deduct(user_id, CALL)

    [warning] = recorder.of(CreditEventType.CAP_WARNING)
    assert ("warn", second.transaction_id) == (warning.metadata["action"], warning.transaction_id)


async def test_sweep_emits_credits_expired(
    manager: CreditManager, user_id: str, recorder: Recorder, clock: FakeClock
) -> None:
    """A real sweep that wrote credits off emits one credits_expired; a dry run emits none."""
    await manager.add_credits(
        user_id, 70, "signup_bonus", expires_at=clock.now + timedelta(hours=1)
    )
    clock.advance(hours=2)

    dry = await manager.sweep_expired_credits(dry_run=True)
    real = await manager.sweep_expired_credits()

    assert (70, 70) == (dry.expired_amount, real.expired_amount)
    [expired] = recorder.of(CreditEventType.CREDITS_EXPIRED)
    assert (None, 70, 1) == (expired.user_id, expired.amount, expired.metadata["expired_count"])


async def test_failing_handlers_never_break_billing(
    manager: CreditManager, user_id: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A sync and an async handler that raise are logged; the charge still succeeds."""

    def broken_sync(event: CreditEvent) -> None:
        raise RuntimeError("sync handler bug")

    async def broken_async(event: CreditEvent) -> None:
        await checkpoint()
        raise RuntimeError("async handler bug")

    manager.events.on(CreditEventType.CREDITS_DEDUCTED, broken_sync)
    manager.events.on(CreditEventType.CREDITS_DEDUCTED, broken_async)
    await manager.add_credits(user_id, 100, "purchase")

    with caplog.at_level(logging.ERROR, logger="ducto.events"):
        result = await manager.deduct(user_id, CALL)

    assert 60 == result.balance_after
    messages = sorted(str(r.exc_info[1]) for r in caplog.records if r.exc_info)
    assert ["async handler bug", "sync handler bug"] == messages


# -- low-balance alerts ------------------------------------------------------------------------


async def _low_balance_manager(
    store: CreditStore, thresholds: list[int]
) -> tuple[CreditManager, Recorder]:
    recorder = Recorder()
    events = CreditEventEmitter()
    events.on(CreditEventType.LOW_BALANCE, recorder)
    manager = CreditManager(store, events=events, low_balance_thresholds=thresholds)
    await manager.publish_pricing(PRICING)
    return manager, recorder


async def test_low_balance_fires_once_per_downward_crossing(
    store: CreditStore, user_id: str
) -> None:
    """Each threshold fires when crossed down, and again only after going back above it."""
    manager, recorder = await _low_balance_manager(store, [100, 50])
    await manager.add_credits(user_id, 200, "purchase")
    ten = UsageMetrics(model="gpt-4o", input_tokens=1000)

    async def charge(tens: int) -> None:
        for _ in range(tens):
            await manager.deduct(user_id, ten)

    await charge(6)  # 140
    fired_above = len(recorder.events)
    await charge(5)  # 90: crosses 100
    await charge(1)  # 80: still below 100
    await charge(4)  # 40: crosses 50
    await manager.add_credits(user_id, 100, "purchase")  # 140: re-arms both
    await charge(5)  # 90: crosses 100 again

    assert 0 == fired_above
    assert [(100, 90), (50, 40), (100, 90)] == [(e.threshold, e.available) for e in recorder.events]
    assert {user_id} == {e.user_id for e in recorder.events}


async def test_low_balance_crossing_several_thresholds_at_once(
    store: CreditStore, user_id: str
) -> None:
    """One charge through two thresholds fires both, highest first."""
    manager, recorder = await _low_balance_manager(store, [50, 100])
    await manager.add_credits(user_id, 120, "purchase")

    await manager.deduct(user_id, CALL + CALL)  # 80 credits: 120 -> 40

    assert [100, 50] == [e.threshold for e in recorder.events]


async def test_low_balance_for_a_user_seen_first_in_a_charge(
    store: CreditStore, user_id: str
) -> None:
    """A user this manager never saw fires from the balance just before the charge."""
    await store.add_credits(user_id, 120, "purchase")
    manager, recorder = await _low_balance_manager(store, [100])

    await manager.deduct(user_id, CALL)

    assert [(100, 80)] == [(e.threshold, e.available) for e in recorder.events]


# -- pass-throughs and lifecycle ---------------------------------------------------------------


async def test_plans_features_and_analytics_pass_through(
    manager: CreditManager, user_id: str, clock: FakeClock
) -> None:
    """Plan, feature, allowance and analytics calls return the store's answers."""
    await manager.add_credits(user_id, 500, "purchase")
    await manager.set_user_plan(user_id, "pro")
    await manager.deduct(user_id, CALL + CALL + CALL)  # 45 at pro rates: 30 allowance + 15
    start, end = clock.now - timedelta(days=1), clock.now + timedelta(days=1)

    plan = await manager.get_user_plan(user_id)
    feature = await manager.check_feature(user_id, "priority")
    allowance = await manager.check_allowance(user_id)
    by_model = await manager.spend_by_model(start, end)
    by_user = await manager.spend_by_user(start, end)
    top = await manager.top_users(5, start, end)
    daily = await manager.daily_spend(start, end)
    stats = await manager.aggregate_stats(start, end)

    assert ("pro", "Pro", 30) == (plan.plan_id, plan.plan_name, plan.free_allowance)
    assert feature.has_feature is True
    assert 0 == allowance.allowance_remaining
    assert [("gpt-4o", 15)] == [(r.model, r.total_spend) for r in by_model]
    assert [(user_id, 15)] == [(r.user_id, r.total_spend) for r in by_user]
    assert [user_id] == [r.user_id for r in top]
    assert [15] == [r.total_spend for r in daily]
    assert 15 == stats.total_credits_consumed


async def test_manager_opens_and_closes_its_store() -> None:
    """async with CreditManager(store) opens the store and closes it on exit."""
    async with CreditManager(MemoryStore()) as manager:
        await manager.store.setup()
        await manager.add_credits("alice", 5, "purchase")
        inside = await manager.get_balance("alice")

    assert 5 == inside.balance
    with pytest.raises(StoreError):
        await manager.get_balance("alice")


# -- arguments ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        ({"hold_ttl": 10**400}, "hold_ttl"),
        ({"hold_ttl": float("nan")}, "hold_ttl"),
        ({"hold_ttl": timedelta(days=400)}, "hold_ttl"),
        ({"low_balance_thresholds": 5}, "low_balance_thresholds"),
        ({"low_balance_thresholds": "100"}, "low_balance_thresholds"),
        ({"low_balance_thresholds": [2**63]}, "low_balance_thresholds"),
        ({"clock": "now"}, "clock"),
        ({"handler_timeout": 0}, "handler_timeout"),
        ({"handler_timeout": True}, "handler_timeout"),
        ({"event_buffer": 0}, "event_buffer"),
        ({"events": object()}, "events"),
        ({"emitter": "log"}, "emitter"),
        ({"engine": {"models": {}}}, "engine"),
        ({"pricing_refresh": 0}, "pricing_refresh"),
        ({"pricing_refresh": "60"}, "pricing_refresh"),
        ({"pricing_refresh": float("inf")}, "pricing_refresh"),
        ({"pricing_refresh": timedelta(days=400)}, "pricing_refresh"),
        ({"auto_top_up": 5}, "auto_top_up"),
    ],
)
def test_bad_constructor_arguments_name_the_parameter(
    arguments: dict[str, Any], named: str
) -> None:
    """Each invalid constructor argument raises InvalidArgumentError naming it."""
    with pytest.raises(InvalidArgumentError, match=named):
        CreditManager(MemoryStore(), **arguments)


def test_a_store_that_is_not_one_is_refused() -> None:
    """CreditManager(None) raises InvalidArgumentError naming the store."""
    with pytest.raises(InvalidArgumentError, match="store"):
        CreditManager(None)  # type: ignore[arg-type]


async def test_bad_hold_arguments_raise_at_once(manager: CreditManager, user_id: str) -> None:
    """A ttl beyond any float, NaN or a bool raises InvalidArgumentError naming ttl."""
    for ttl in (10**400, float("nan"), float("inf"), True, -1, "10"):
        with pytest.raises(InvalidArgumentError, match="ttl"):
            manager.hold(user_id, 5, ttl=ttl)  # type: ignore[arg-type]


BAD_VALUES: list[object] = [
    None,
    1.5,
    float("nan"),
    "",
    object(),
    -1,
    10**400,
    True,
    [],
    {"a": 1},
    b"x",
    2**63,
    10**5000,  # too long for Python to print: the message must still be built
]


async def test_bad_input_on_every_manager_method_raises_invalid_argument(
    store: CreditStore, manager: CreditManager, user_id: str, clock: FakeClock
) -> None:
    """Every argument of every method, given junk, raises a DuctoError (never a bare Python
    error) or, where the junk happens to be valid, works."""
    await manager.add_credits(user_id, 1000, "purchase")
    charge = await manager.deduct(user_id, CALL)
    team = await store.create_team("bad-input", 100)
    await store.add_team_member(team.team_id, user_id)
    start, end = clock.now - timedelta(days=1), clock.now + timedelta(days=1)
    calls: dict[str, tuple[list[Any], dict[str, Any]]] = {
        "publish_pricing_from_dict": ([PRICING, None], {}),
        "publish_pricing": ([PRICING, None], {"effective_at": None}),
        "cancel_pricing": ([1], {}),
        "calculate": ([CALL], {"plan": None}),
        "get_balance": ([user_id], {}),
        "add_credits": (
            [user_id, 5, "purchase", None, None],
            {"idempotency_key": None, "tx_type": None},
        ),
        "refund_credits": ([charge.transaction_id, 1, None, None], {"idempotency_key": None}),
        "set_user_plan": ([user_id, "pro"], {}),
        "get_user_plan": ([user_id], {}),
        "check_feature": ([user_id, "priority"], {}),
        "check_allowance": ([user_id], {}),
        "spend_by_user": ([start, end], {}),
        "top_users": ([3, start, end], {}),
        "deduct": ([user_id, CALL, None, None], {"operation_type": "chat"}),
        "deduct_fixed": ([user_id, "image", None, None], {}),
        "reserve_credits": (
            [user_id, 5, "chat", None, None],
            {"ttl": None, "use_allowance": False, "idempotency_key": None},
        ),
        "deduct_team": ([team.team_id, user_id, 5, None], {"idempotency_key": None}),
        "hold": ([user_id, 5], {"operation_type": "chat", "idempotency_key": None, "ttl": None}),
    }
    leaks: list[str] = []
    for name, (arguments, keywords) in calls.items():
        method = getattr(manager, name)
        places = [*range(len(arguments)), *keywords]
        for place in places:
            for number, bad in enumerate(BAD_VALUES):
                args, kwargs = list(arguments), dict(keywords)
                if isinstance(place, int):
                    args[place] = bad
                else:
                    kwargs[place] = bad
                try:
                    outcome = method(*args, **kwargs)
                    if name == "hold":
                        async with outcome as hold:
                            await hold.settle(0)
                    elif hasattr(outcome, "__await__"):
                        await outcome
                except DuctoError:
                    continue
                except Exception as exc:
                    leaks.append(f"{name}({place}=BAD_VALUES[{number}]): {type(exc).__name__}")

    assert [] == leaks


# -- low-balance alerts under load -------------------------------------------------------------


async def test_every_downward_crossing_fires_exactly_once_under_load(store: CreditStore) -> None:
    """400 concurrent charges over 8 users: each user's 800 and 600 alerts fire once."""
    recorder = Recorder()
    events = CreditEventEmitter()
    events.on(CreditEventType.LOW_BALANCE, recorder)
    manager = CreditManager(store, events=events, low_balance_thresholds=[800, 600])
    await manager.publish_pricing(PRICING)
    users = [f"load-{n}-{uuid.uuid4().hex[:8]}" for n in range(8)]
    for user in users:
        await store.add_credits(user, 1000, "purchase")  # never observed by the manager
    ten = UsageMetrics(model="gpt-4o", input_tokens=1000)

    async def charge(user: str) -> None:
        await manager.deduct(user, ten)

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            for number in range(400):
                tg.start_soon(charge, users[number % len(users)])

    fired = Counter((e.user_id, e.threshold) for e in recorder.events)
    assert {(user, t): 1 for user in users for t in (800, 600)} == dict(fired)
    for user in users:
        assert 500 == (await store.get_balance(user)).available


async def test_low_balance_counts_holds_and_refills(store: CreditStore, user_id: str) -> None:
    """A hold down through a threshold fires; a refill above it and a new fall fire again."""
    manager, recorder = await _low_balance_manager(store, [800])
    await manager.add_credits(user_id, 1000, "purchase")

    async with manager.hold(user_id, 400) as hold:  # 1000 -> 600: fires
        await hold.settle(100)  # 600 -> 900: back above
    await manager.deduct(user_id, UsageMetrics(model="gpt-4o", input_tokens=20_000))  # -> 700
    await manager.add_credits(user_id, -50, "adjustment")  # 700 -> 650: still below

    assert [(800, 600), (800, 700)] == [(e.threshold, e.available) for e in recorder.events]


# -- event delivery ----------------------------------------------------------------------------


async def test_an_open_manager_never_waits_for_a_slow_handler(
    store: CreditStore, user_id: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Inside async with, a handler blocked on an event does not hold up the charge."""
    release = anyio.Event()
    delivered: list[CreditEventType] = []

    async def slow(event: CreditEvent) -> None:
        await release.wait()
        delivered.append(event.type)
        raise RuntimeError("webhook down")

    manager = CreditManager(store, handler_timeout=30)
    manager.events.on(CreditEventType.CREDITS_DEDUCTED, slow)
    await manager.publish_pricing(PRICING)
    await manager.add_credits(user_id, 100, "purchase")

    with caplog.at_level(logging.ERROR, logger="ducto.events"):
        async with manager:
            with anyio.fail_after(10):  # a wait for the handler would never end
                result = await manager.deduct(user_id, CALL)
            waiting = list(delivered)
            release.set()

    assert (40, []) == (result.charged, waiting)
    assert [CreditEventType.CREDITS_DEDUCTED] == delivered
    assert ["webhook down"] == [str(r.exc_info[1]) for r in caplog.records if r.exc_info]


async def test_a_slow_handler_never_delays_the_callers_cancellation(
    store: CreditStore, user_id: str
) -> None:
    """Outside async with, a caller's timeout cancels a handler that would never finish."""
    never = anyio.Event()

    async def hung(event: CreditEvent) -> None:
        await never.wait()

    manager = CreditManager(store, handler_timeout=60)
    await manager.publish_pricing(PRICING)
    await manager.add_credits(user_id, 100, "purchase")
    manager.events.on(CreditEventType.CREDITS_DEDUCTED, hung)
    later: list[CreditEvent] = []

    async def never_started(event: CreditEvent) -> None:
        later.append(event)

    manager.events.on(CreditEventType.CREDITS_DEDUCTED, never_started)

    with anyio.fail_after(10), anyio.move_on_after(0.3) as scope:
        await manager.deduct(user_id, CALL)
    gc.collect()  # a handler coroutine left unawaited would warn (an error in this suite)

    assert scope.cancelled_caught is True
    assert [] == later
    balance = await store.get_balance(user_id)
    assert (60, 0) == (balance.balance, balance.reserved)


async def test_handlers_that_overrun_are_cancelled_and_logged(
    store: CreditStore, user_id: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A hung handler is cancelled after handler_timeout, so closing ends; later events drop."""
    never = anyio.Event()
    seen: list[int] = []

    async def hung(event: CreditEvent) -> None:
        seen.append(event.amount)
        await never.wait()

    manager = CreditManager(store, handler_timeout=0.2, event_buffer=1)
    await manager.publish_pricing(PRICING)
    manager.events.on(CreditEventType.CREDITS_ADDED, hung)

    with caplog.at_level(logging.ERROR, logger="ducto.events"), anyio.fail_after(10):
        async with manager:
            for amount in (1, 2, 3, 4):
                await manager.add_credits(user_id, amount, "purchase")
            balance = await store.get_balance(user_id)

    assert 10 == balance.balance
    assert seen[0] == 1
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "dropped a credits_added event" in messages
    assert "cancel" in messages


async def test_the_manager_cannot_be_opened_twice(store: CreditStore) -> None:
    """Entering an open manager again raises InvalidArgumentError."""
    manager = CreditManager(store)

    async with manager:
        with pytest.raises(InvalidArgumentError, match="open already"):
            await manager.__aenter__()


# -- spend caps that refuse --------------------------------------------------------------------


async def test_a_deny_cap_refusal_emits_cap_reached(
    store: CreditStore, manager: CreditManager, user_id: str, recorder: Recorder
) -> None:
    """A charge or hold a deny cap refuses emits cap_reached (1.x's credits.cap_reached)."""
    old_style: list[CreditEvent] = []
    manager.events.on("credits.cap_reached", old_style.append)
    await manager.add_credits(user_id, 1000, "purchase")
    await store.set_spend_cap(
        SpendCap(user_id=user_id, cap_type="daily", model="gpt-4o", limit=50, action="deny")
    )
    await manager.deduct(user_id, CALL)

    with pytest.raises(SpendCapExceededError):
        await manager.deduct(user_id, CALL)
    with pytest.raises(SpendCapExceededError):
        async with manager.hold(user_id, 20, metadata={"model": "gpt-4o"}):
            pass

    reached = recorder.of(CreditEventType.CAP_REACHED)
    assert reached == old_style
    assert [(user_id, 40), (user_id, 20)] == [(e.user_id, e.amount) for e in reached]
    assert {"limit": 50, "current_spend": 40, "model": "gpt-4o", "action": "deny"}.items() <= (
        reached[0].metadata.items()
    )
    assert {"spend_cap_exceeded"} == {e.error for e in reached}


# -- ducto 1.x spellings -----------------------------------------------------------------------


async def test_the_1x_spellings_work_on_every_store(store: CreditStore, user_id: str) -> None:
    """Positional engine and emitter, setup, tx_type, job_name and reserve_credits."""
    seen: list[CreditEvent] = []
    emitter = CreditEventEmitter()
    emitter.on("credits.added", seen.append)
    manager = CreditManager(store, PricingEngine.from_dict(PRICING), emitter)
    await manager.setup()
    version = await manager.publish_pricing_from_dict(PRICING)

    await manager.add_credits(user_id, 200, tx_type="purchase")
    fixed = await manager.deduct_fixed(user_id, job_name="image", idempotency_key="img-1")
    again = await manager.deduct_fixed(user_id, "image", "img-1")
    hold = await manager.reserve_credits(user_id, CALL, "chat", {"ticket": "t-9"})
    with pytest.raises(InvalidArgumentError, match="job must be"):
        await manager.deduct_fixed(user_id)
    with pytest.raises(InvalidArgumentError, match="not both"):
        await manager.add_credits(user_id, 1, "purchase", tx_type="purchase")

    assert (await store.get_active_pricing()) is not None
    assert version == (await store.get_active_pricing()).id  # type: ignore[union-attr]
    assert manager.emitter is emitter
    assert [200] == [e.amount for e in seen]
    assert (25, True) == (fixed.charged, again.idempotent)
    assert (40, 135) == (hold.amount, hold.available)
    [purchase] = [r for r in await all_rows(store, user_id) if r.type == "purchase"]
    assert 200 == purchase.amount
