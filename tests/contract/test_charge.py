"""charge_credits: a hold and its settlement in one step, keyed like reserve + deduct."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio
import pytest
from tests.conftest import FakeClock
from tests.contract._checks import all_rows, assert_invariants

from ducto.errors import ErrorCode
from ducto.interface.base import CreditStore
from ducto.interface.models import (
    ChargeResult,
    CreditMetadata,
    PlanDefinition,
    PricingConfigData,
    SpendCap,
)

pytestmark = pytest.mark.anyio


async def _run_all(calls: list[Callable[[], Awaitable[None]]]) -> None:
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for call in calls:
                tg.start_soon(call)


async def test_charge_writes_one_usage_row(store: CreditStore, user_id: str) -> None:
    """A charge takes the amount at once: one usage row, no hold left behind."""
    await store.add_credits(user_id, 100, "purchase")

    result = await store.charge_credits(user_id, 30, "chat", CreditMetadata(model="m1"))
    balance = await store.get_balance(user_id)
    rows = await all_rows(store, user_id)

    assert result.ok
    assert isinstance(result, ChargeResult)
    assert (-30, 30, 30, 70, 70, 0) == (
        result.amount,
        result.charged,
        result.requested,
        result.balance_after,
        result.available,
        result.shortfall,
    )
    assert (70, 0, 70) == (balance.balance, balance.reserved, balance.available)
    assert [("usage", -30, result.reservation_id)] == [
        (r.type, r.amount, r.reservation_id) for r in rows[1:]
    ]
    assert ("m1", "chat") == (rows[-1].metadata["model"], rows[-1].metadata["operation_type"])
    assert (
        ErrorCode.RESERVATION_ALREADY_SETTLED
        == (await store.release_reservation(user_id, result.reservation_id)).error
    )
    await assert_invariants(store, user_id)


async def test_charge_keeps_the_floor_and_changes_nothing_when_refused(
    store: CreditStore, user_id: str
) -> None:
    """Refused by the floor, exactly as reserve_credits would be: nothing is written."""
    await store.add_credits(user_id, 10, "purchase")
    before = (await store.get_balance(user_id), await all_rows(store, user_id))

    refused = await store.charge_credits(user_id, 6, "chat")

    assert (ErrorCode.INSUFFICIENT_CREDITS, 0, 6, 10, 5) == (
        refused.error,
        refused.amount,
        refused.requested,
        refused.available,
        refused.min_balance,
    )
    assert before == (await store.get_balance(user_id), await all_rows(store, user_id))
    assert (await store.charge_credits(user_id, 10, "chat", min_balance=0)).ok


async def test_charge_is_refused_by_a_deny_cap(store: CreditStore, user_id: str) -> None:
    """A deny cap counts window spend, active holds and the charge, as for a hold."""
    await store.add_credits(user_id, 100, "purchase")
    await store.set_spend_cap(SpendCap(user_id=user_id, cap_type="daily", model="m1", limit=20))
    await store.reserve_credits(user_id, 5, "chat", CreditMetadata(model="m1"), min_balance=0)
    assert (await store.charge_credits(user_id, 10, "chat", {"model": "m1"}, 0)).ok

    refused = await store.charge_credits(user_id, 6, "chat", {"model": "m1"}, 0)
    other_model = await store.charge_credits(user_id, 6, "chat", {"model": "m2"}, 0)

    assert (ErrorCode.SPEND_CAP_EXCEEDED, 20, 10, 5, "m1", "daily") == (
        refused.error,
        refused.cap_limit,
        refused.cap_spend,
        refused.cap_reserved,
        refused.cap_model,
        refused.cap_type,
    )
    assert other_model.ok
    await assert_invariants(store, user_id)


async def test_charge_spends_the_allowance_first(
    store: CreditStore, user_id: str, clock: FakeClock
) -> None:
    """With use_allowance the plan allowance pays first, then the balance."""
    plan = PlanDefinition(id="pro", name="Pro", free_allowance=50)
    await store.set_active_pricing(PricingConfigData(models={"_default": "0"}, plans={"pro": plan}))
    await store.set_user_plan(user_id, "pro")
    await store.add_credits(user_id, 100, "purchase")

    result = await store.charge_credits(user_id, 70, "chat", min_balance=0, use_allowance=True)

    assert (-20, 20, 50, 80, 80) == (
        result.amount,
        result.charged,
        result.allowance_consumed,
        result.balance_after,
        result.available,
    )
    assert 0 == (await store.check_allowance(user_id)).allowance_remaining
    await assert_invariants(store, user_id)


async def test_charge_past_the_balance_is_refused_like_a_hold(
    store: CreditStore, user_id: str
) -> None:
    """Even with no floor, a charge larger than what is spendable is refused, not overdrawn."""
    await store.add_credits(user_id, 10, "purchase")

    refused = await store.charge_credits(user_id, 11, "chat", min_balance=0)
    exact = await store.charge_credits(user_id, 10, "chat", min_balance=0)

    assert ErrorCode.INSUFFICIENT_CREDITS == refused.error
    assert (True, 0, 0) == (exact.ok, exact.balance_after, exact.shortfall)
    await assert_invariants(store, user_id)


async def test_zero_charge_writes_a_zero_usage_row(store: CreditStore, user_id: str) -> None:
    """A charge of 0 still writes a usage row, so every charge has a transaction id."""
    await store.add_credits(user_id, 10, "purchase")

    result = await store.charge_credits(user_id, 0, "chat")

    assert (True, 0, 0) == (result.ok, result.amount, result.charged)
    assert ("usage", 0) == ((rows := await all_rows(store, user_id))[-1].type, rows[-1].amount)


async def test_a_retried_charge_replays_and_charges_once(store: CreditStore, user_id: str) -> None:
    """The same key and request replay the stored result, even after the balance moved."""
    await store.add_credits(user_id, 100, "purchase")
    first = await store.charge_credits(user_id, 30, "chat", idempotency_key="req-1")
    await store.add_credits(user_id, 5, "purchase")

    again = await store.charge_credits(user_id, 30, "chat", idempotency_key="req-1")

    assert (False, True) == (first.idempotent, again.idempotent)
    assert (first.transaction_id, -30, 70) == (
        again.transaction_id,
        again.amount,
        again.balance_after,
    )
    assert 75 == (await store.get_balance(user_id)).balance
    assert 1 == sum(r.type == "usage" for r in await all_rows(store, user_id))


async def test_a_charge_key_reused_for_another_request_conflicts(
    store: CreditStore, user_id: str
) -> None:
    """A different amount under a used key is idempotency_conflict and changes nothing."""
    await store.add_credits(user_id, 100, "purchase")
    await store.charge_credits(user_id, 30, "chat", idempotency_key="req-1")
    before = await all_rows(store, user_id)

    conflict = await store.charge_credits(user_id, 31, "chat", idempotency_key="req-1")

    assert (ErrorCode.IDEMPOTENCY_CONFLICT, 0, 31) == (
        conflict.error,
        conflict.amount,
        conflict.requested,
    )
    assert before == await all_rows(store, user_id)


async def test_a_charge_is_keyed_like_a_hold_and_its_settlement(
    store: CreditStore, user_id: str
) -> None:
    """The key a charge used replays through reserve_credits and deduct_credits too."""
    await store.add_credits(user_id, 100, "purchase")
    charged = await store.charge_credits(user_id, 30, "chat", idempotency_key="req-1")

    hold = await store.reserve_credits(user_id, 30, "chat", idempotency_key="req-1")
    settled = await store.deduct_credits(user_id, hold.reservation_id, 30, "req-1")

    assert (True, charged.reservation_id) == (hold.idempotent, hold.reservation_id)
    assert (True, charged.transaction_id) == (settled.idempotent, settled.transaction_id)
    assert 70 == (await store.get_balance(user_id)).balance


async def test_a_charge_finishes_a_request_whose_hold_was_placed(
    store: CreditStore, user_id: str
) -> None:
    """A request that reserved under its key and never settled is settled by its charge."""
    await store.add_credits(user_id, 100, "purchase")
    hold = await store.reserve_credits(user_id, 30, "chat", idempotency_key="req-1")

    charged = await store.charge_credits(user_id, 30, "chat", idempotency_key="req-1")
    balance = await store.get_balance(user_id)

    assert (True, hold.reservation_id, -30) == (
        charged.ok,
        charged.reservation_id,
        charged.amount,
    )
    assert (70, 0) == (balance.balance, balance.reserved)
    assert 1 == sum(r.type == "usage" for r in await all_rows(store, user_id))


async def test_a_key_that_settled_another_hold_cannot_charge(
    store: CreditStore, user_id: str
) -> None:
    """A key already used to settle some other hold is refused for a new charge."""
    await store.add_credits(user_id, 100, "purchase")
    hold = await store.reserve_credits(user_id, 30, "chat")
    await store.deduct_credits(user_id, hold.reservation_id, 20, "req-1")

    conflict = await store.charge_credits(user_id, 20, "chat", idempotency_key="req-1")

    assert ErrorCode.IDEMPOTENCY_CONFLICT == conflict.error
    assert 80 == (await store.get_balance(user_id)).balance


async def test_concurrent_charges_never_overspend(store: CreditStore, user_id: str) -> None:
    """50 concurrent 1-credit charges against 10 spendable credits: exactly 10 succeed."""
    await store.add_credits(user_id, 10, "purchase")
    results: list[ChargeResult] = []

    async def charge() -> None:
        results.append(await store.charge_credits(user_id, 1, "chat", min_balance=0))

    await _run_all([charge] * 50)

    assert 10 == sum(r.ok for r in results)
    assert {ErrorCode.INSUFFICIENT_CREDITS} == {r.error for r in results if not r.ok}
    assert (0, 0) == ((b := await store.get_balance(user_id)).balance, b.available)
    await assert_invariants(store, user_id)


async def test_concurrent_retries_of_one_charge_apply_it_once(
    store: CreditStore, user_id: str
) -> None:
    """50 concurrent attempts of one keyed charge write one usage row; 49 replay it."""
    await store.add_credits(user_id, 100, "purchase")
    results: list[ChargeResult] = []

    async def charge() -> None:
        results.append(await store.charge_credits(user_id, 12, "chat", idempotency_key="k"))

    await _run_all([charge] * 50)

    assert all(r.ok for r in results)
    assert 1 == sum(not r.idempotent for r in results)
    assert 1 == len({r.transaction_id for r in results})
    assert 88 == (await store.get_balance(user_id)).balance
    await assert_invariants(store, user_id)


async def test_a_cancelled_charge_changed_nothing_or_everything(
    store: CreditStore, user_id: str
) -> None:
    """Charges cancelled at random either happened in full (and a retry replays) or not at all."""
    await store.add_credits(user_id, 1000, "purchase")
    outcomes: dict[str, ChargeResult | None] = {}

    async def charge(key: str, delay: float) -> None:
        outcomes[key] = None
        with anyio.move_on_after(delay):
            outcomes[key] = await store.charge_credits(user_id, 3, "chat", idempotency_key=key)

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for n in range(60):
                tg.start_soon(charge, f"k{n}", (n % 6) * 0.0005)

    rows = {r.idempotency_key: r for r in await all_rows(store, user_id) if r.type == "usage"}
    for key, outcome in outcomes.items():
        if outcome is not None:
            assert rows[key].id == outcome.transaction_id
        retried = await store.charge_credits(user_id, 3, "chat", idempotency_key=key)
        assert retried.ok
        assert retried.idempotent == (key in rows)
    assert 1000 - 3 * 60 == (await store.get_balance(user_id)).balance
    await assert_invariants(store, user_id)
