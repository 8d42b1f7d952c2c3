"""Holds: reserve_credits, deduct_credits and release_reservation."""

from __future__ import annotations

from datetime import timedelta

import pytest
from tests.conftest import FakeClock
from tests.contract._checks import all_rows, assert_invariants

from ducto.errors import ErrorCode
from ducto.interface.base import CreditStore
from ducto.interface.models import CreditMetadata, PlanDefinition, PricingConfigData

pytestmark = pytest.mark.anyio


async def _funded_hold(store: CreditStore, user_id: str, credits: int, hold: int) -> str:
    """Grant `credits`, hold `hold` of them with no floor, and return the hold's id."""
    await store.add_credits(user_id, credits, "purchase")
    result = await store.reserve_credits(user_id, hold, "chat", min_balance=0)
    assert result.ok
    return result.reservation_id


# -- reserve ------------------------------------------------------------------------------------


async def test_reserve_creates_a_hold(store: CreditStore, user_id: str, clock: FakeClock) -> None:
    """A hold reports itself, counts as reserved and lowers available, writing no ledger row."""
    await store.add_credits(user_id, 100, "purchase")
    result = await store.reserve_credits(user_id, 30, "chat")
    balance = await store.get_balance(user_id)

    assert result.ok
    assert "" != result.reservation_id
    assert (user_id, 30, 100, 30, 70) == (
        result.user_id,
        result.amount,
        result.balance,
        result.reserved_total,
        result.available,
    )
    assert clock.now + timedelta(seconds=600) == result.expires_at
    assert (100, 30, 70) == (balance.balance, balance.reserved, balance.available)
    assert 1 == len(await all_rows(store, user_id))
    await assert_invariants(store, user_id)


@pytest.mark.parametrize(
    "ttl",
    [30, 30.0, timedelta(seconds=30)],
    ids=["int", "float", "timedelta"],
)
async def test_reserve_ttl_sets_expires_at(
    store: CreditStore, user_id: str, clock: FakeClock, ttl: float | timedelta
) -> None:
    """The ttl, in seconds or as a timedelta, sets when the hold stops counting."""
    await store.add_credits(user_id, 100, "purchase")
    result = await store.reserve_credits(user_id, 10, "chat", ttl=ttl)

    assert clock.now + timedelta(seconds=30) == result.expires_at


async def test_reserve_keeps_the_default_floor_of_five(store: CreditStore, user_id: str) -> None:
    """By default spendable must stay at least 5 after the hold."""
    await store.add_credits(user_id, 10, "purchase")
    refused = await store.reserve_credits(user_id, 6, "chat")
    accepted = await store.reserve_credits(user_id, 5, "chat")

    assert ErrorCode.INSUFFICIENT_CREDITS == refused.error
    assert accepted.ok
    assert 5 == accepted.available
    await assert_invariants(store, user_id)


async def test_reserve_with_zero_floor_can_hold_everything(
    store: CreditStore, user_id: str
) -> None:
    """With min_balance=0 the whole balance can be held, and not one credit more."""
    await store.add_credits(user_id, 10, "purchase")
    accepted = await store.reserve_credits(user_id, 10, "chat", min_balance=0)
    refused = await store.reserve_credits(user_id, 1, "chat", min_balance=0)

    assert accepted.ok
    assert 0 == accepted.available
    assert ErrorCode.INSUFFICIENT_CREDITS == refused.error
    await assert_invariants(store, user_id)


async def test_reserve_with_a_high_floor(store: CreditStore, user_id: str) -> None:
    """A custom floor is kept: spendable minus the amount must stay at or above it."""
    await store.add_credits(user_id, 100, "purchase")
    refused = await store.reserve_credits(user_id, 51, "chat", min_balance=50)
    accepted = await store.reserve_credits(user_id, 50, "chat", min_balance=50)

    assert ErrorCode.INSUFFICIENT_CREDITS == refused.error
    assert accepted.ok
    await assert_invariants(store, user_id)


async def test_refused_reserve_reports_and_changes_nothing(
    store: CreditStore, user_id: str
) -> None:
    """A refused hold reports the balance and what is available, and holds nothing."""
    await store.add_credits(user_id, 40, "purchase")
    await store.reserve_credits(user_id, 10, "chat")
    refused = await store.reserve_credits(user_id, 100, "chat")
    balance = await store.get_balance(user_id)

    assert ErrorCode.INSUFFICIENT_CREDITS == refused.error
    assert "" == refused.reservation_id
    assert (40, 10, 30) == (refused.balance, refused.reserved_total, refused.available)
    assert (10, 30) == (balance.reserved, balance.available)
    await assert_invariants(store, user_id)


async def test_reserve_on_unknown_user_is_refused(store: CreditStore, user_id: str) -> None:
    """A user with no credits cannot hold any, even with no floor."""
    result = await store.reserve_credits(user_id, 1, "chat", min_balance=0)

    assert ErrorCode.INSUFFICIENT_CREDITS == result.error
    assert 0 == (await store.get_balance(user_id)).reserved


async def test_reserve_counts_other_active_holds(store: CreditStore, user_id: str) -> None:
    """Holds add up: a hold cannot take credits another hold already took."""
    await store.add_credits(user_id, 100, "purchase")
    first = await store.reserve_credits(user_id, 60, "chat", min_balance=0)
    refused = await store.reserve_credits(user_id, 41, "chat", min_balance=0)
    second = await store.reserve_credits(user_id, 40, "chat", min_balance=0)

    assert first.ok
    assert ErrorCode.INSUFFICIENT_CREDITS == refused.error
    assert second.ok
    assert 100 == second.reserved_total
    assert first.reservation_id != second.reservation_id
    await assert_invariants(store, user_id)


async def test_reserve_cannot_use_expired_credits(
    store: CreditStore, user_id: str, clock: FakeClock
) -> None:
    """Credits past their expiry do not count toward spendable, even before a sweep."""
    await store.add_credits(user_id, 100, "purchase", expires_at=clock.now + timedelta(hours=1))
    await store.add_credits(user_id, 10, "purchase")
    clock.advance(hours=1)

    refused = await store.reserve_credits(user_id, 11, "chat", min_balance=0)
    accepted = await store.reserve_credits(user_id, 10, "chat", min_balance=0)

    assert ErrorCode.INSUFFICIENT_CREDITS == refused.error
    assert accepted.ok
    await assert_invariants(store, user_id)


async def test_lapsed_hold_stops_counting_at_once(
    store: CreditStore, user_id: str, clock: FakeClock
) -> None:
    """A hold counts until its TTL passes and not from that instant on, with no sweep."""
    await store.add_credits(user_id, 50, "purchase")
    await store.reserve_credits(user_id, 50, "chat", min_balance=0, ttl=60)
    clock.advance(seconds=59)
    before = await store.get_balance(user_id)
    refused = await store.reserve_credits(user_id, 1, "chat", min_balance=0)
    clock.advance(seconds=1)
    after = await store.get_balance(user_id)
    accepted = await store.reserve_credits(user_id, 50, "chat", min_balance=0)

    assert (50, 0) == (before.reserved, before.available)
    assert ErrorCode.INSUFFICIENT_CREDITS == refused.error
    assert (0, 50) == (after.reserved, after.available)
    assert accepted.ok
    await assert_invariants(store, user_id)


async def test_reserve_with_allowance_counts_the_plan_allowance(
    store: CreditStore, user_id: str
) -> None:
    """use_allowance adds the remaining plan allowance to spendable; without it, it does not."""
    plan = PlanDefinition(id="pro", name="Pro", free_allowance=100)
    await store.set_active_pricing(PricingConfigData(models={"_default": "0"}, plans={"pro": plan}))
    await store.set_user_plan(user_id, "pro")
    await store.add_credits(user_id, 20, "purchase")

    without = await store.reserve_credits(user_id, 50, "chat", min_balance=0)
    with_allowance = await store.reserve_credits(
        user_id, 120, "chat", min_balance=0, use_allowance=True
    )

    assert ErrorCode.INSUFFICIENT_CREDITS == without.error
    assert with_allowance.ok
    assert 0 == with_allowance.available
    await assert_invariants(store, user_id)


async def test_reserve_accepts_metadata_as_a_dict(store: CreditStore, user_id: str) -> None:
    """Metadata may be a plain dict; its model is carried onto the settled usage row."""
    await store.add_credits(user_id, 100, "purchase")
    hold = await store.reserve_credits(user_id, 10, "chat", {"model": "gpt-x"})
    settled = await store.deduct_credits(user_id, hold.reservation_id, 10)
    rows = await all_rows(store, user_id)

    assert settled.ok
    assert "gpt-x" == rows[-1].metadata["model"]


async def test_idempotent_reserve_replays_the_hold(store: CreditStore, user_id: str) -> None:
    """A hold repeated with its key returns the same hold and holds once."""
    await store.add_credits(user_id, 100, "purchase")
    first = await store.reserve_credits(user_id, 30, "chat", idempotency_key="req-1")
    second = await store.reserve_credits(user_id, 30, "chat", idempotency_key="req-1")

    assert not first.idempotent
    assert second.idempotent
    assert first.reservation_id == second.reservation_id
    assert 30 == (await store.get_balance(user_id)).reserved
    await assert_invariants(store, user_id)


@pytest.mark.parametrize(
    ("amount", "operation_type", "model", "use_allowance"),
    [
        pytest.param(31, "chat", "m1", False, id="amount"),
        pytest.param(30, "embed", "m1", False, id="operation_type"),
        pytest.param(30, "chat", "m2", False, id="model"),
        pytest.param(30, "chat", None, False, id="no-model"),
        pytest.param(30, "chat", "m1", True, id="use_allowance"),
    ],
)
async def test_idempotent_reserve_with_different_request_conflicts(
    store: CreditStore,
    user_id: str,
    amount: int,
    operation_type: str,
    model: str | None,
    use_allowance: bool,
) -> None:
    """Reusing a hold key for a different request is idempotency_conflict and holds nothing."""
    await store.add_credits(user_id, 100, "purchase")
    await store.reserve_credits(
        user_id, 30, "chat", CreditMetadata(model="m1"), idempotency_key="req-1"
    )

    result = await store.reserve_credits(
        user_id,
        amount,
        operation_type,
        CreditMetadata(model=model),
        use_allowance=use_allowance,
        idempotency_key="req-1",
    )

    assert ErrorCode.IDEMPOTENCY_CONFLICT == result.error
    assert 30 == (await store.get_balance(user_id)).reserved
    await assert_invariants(store, user_id)


async def test_refused_reserve_does_not_consume_its_key(store: CreditStore, user_id: str) -> None:
    """A hold refused for lack of credits can be retried with its key after a top-up."""
    refused = await store.reserve_credits(user_id, 30, "chat", idempotency_key="req-1")
    await store.add_credits(user_id, 100, "purchase")
    retried = await store.reserve_credits(user_id, 30, "chat", idempotency_key="req-1")

    assert ErrorCode.INSUFFICIENT_CREDITS == refused.error
    assert retried.ok
    assert not retried.idempotent
    assert 30 == (await store.get_balance(user_id)).reserved
    await assert_invariants(store, user_id)


# -- deduct -------------------------------------------------------------------------------------


async def test_deduct_settles_the_hold_and_charges(store: CreditStore, user_id: str) -> None:
    """Settling charges the amount, frees the hold and writes one usage row."""
    reservation_id = await _funded_hold(store, user_id, 100, 30)
    result = await store.deduct_credits(user_id, reservation_id, 25)
    balance = await store.get_balance(user_id)
    rows = await all_rows(store, user_id)

    assert result.ok
    assert (-25, 25, 25, 75, 0, 0) == (
        result.amount,
        result.charged,
        result.requested,
        result.balance_after,
        result.shortfall,
        result.allowance_consumed,
    )
    assert (75, 0, 75) == (balance.balance, balance.reserved, balance.available)
    assert [("purchase", 100), ("usage", -25)] == [(r.type, r.amount) for r in rows]
    assert result.transaction_id == rows[-1].id
    assert reservation_id == rows[-1].reservation_id
    await assert_invariants(store, user_id)


async def test_deduct_more_than_held_charges_in_full(store: CreditStore, user_id: str) -> None:
    """An overrun past the hold is charged in full from the balance."""
    reservation_id = await _funded_hold(store, user_id, 100, 10)
    result = await store.deduct_credits(user_id, reservation_id, 40)

    assert (-40, 40, 60, 0) == (
        result.amount,
        result.charged,
        result.balance_after,
        result.shortfall,
    )
    await assert_invariants(store, user_id)


async def test_deduct_beyond_the_balance_goes_negative(store: CreditStore, user_id: str) -> None:
    """A charge larger than the balance takes it below zero and reports the shortfall."""
    reservation_id = await _funded_hold(store, user_id, 20, 20)
    result = await store.deduct_credits(user_id, reservation_id, 50)
    balance = await store.get_balance(user_id)

    assert result.ok
    assert (-50, 50, -30, 30) == (
        result.amount,
        result.charged,
        result.balance_after,
        result.shortfall,
    )
    assert (-30, -30) == (balance.balance, balance.available)
    assert [] == await store.list_lots(user_id)
    await assert_invariants(store, user_id)


async def test_shortfall_counts_only_this_charge(store: CreditStore, user_id: str) -> None:
    """When the balance is already negative, the whole new charge is shortfall, not the debt."""
    await store.add_credits(user_id, 20, "purchase")
    first = await store.reserve_credits(user_id, 10, "chat", min_balance=0)
    second = await store.reserve_credits(user_id, 10, "chat", min_balance=0)

    overrun = await store.deduct_credits(user_id, first.reservation_id, 30)
    more = await store.deduct_credits(user_id, second.reservation_id, 5)

    assert (-10, 10) == (overrun.balance_after, overrun.shortfall)
    assert (-15, 5) == (more.balance_after, more.shortfall)
    await assert_invariants(store, user_id)


async def test_new_holds_refused_until_back_above_the_floor(
    store: CreditStore, user_id: str
) -> None:
    """After a charge takes the balance negative, holds are refused until it is topped up."""
    reservation_id = await _funded_hold(store, user_id, 20, 20)
    await store.deduct_credits(user_id, reservation_id, 50)

    while_negative = await store.reserve_credits(user_id, 1, "chat", min_balance=0)
    await store.add_credits(user_id, 35, "purchase")
    below_floor = await store.reserve_credits(user_id, 1, "chat")
    accepted = await store.reserve_credits(user_id, 1, "chat", min_balance=0)

    assert ErrorCode.INSUFFICIENT_CREDITS == while_negative.error
    assert ErrorCode.INSUFFICIENT_CREDITS == below_floor.error
    assert accepted.ok
    await assert_invariants(store, user_id)


async def test_deduct_zero_settles_without_charging(store: CreditStore, user_id: str) -> None:
    """A zero amount settles the hold and still writes a usage row of amount 0."""
    reservation_id = await _funded_hold(store, user_id, 100, 30)
    result = await store.deduct_credits(user_id, reservation_id, 0)
    again = await store.deduct_credits(user_id, reservation_id, 0)
    rows = await all_rows(store, user_id)
    balance = await store.get_balance(user_id)

    assert result.ok
    assert (0, 100) == (result.amount, result.balance_after)
    assert result.transaction_id == rows[-1].id
    assert ("usage", 0) == (rows[-1].type, rows[-1].amount)
    assert ErrorCode.RESERVATION_ALREADY_SETTLED == again.error
    assert (100, 0, 100) == (balance.balance, balance.reserved, balance.available)
    await assert_invariants(store, user_id)


async def test_deduct_unknown_reservation_is_not_found(store: CreditStore, user_id: str) -> None:
    """Settling a hold that never existed is reservation_not_found."""
    await store.add_credits(user_id, 100, "purchase")
    result = await store.deduct_credits(user_id, "res-does-not-exist", 10)

    assert ErrorCode.RESERVATION_NOT_FOUND == result.error
    assert "res-does-not-exist" == result.reservation_id
    assert 100 == (await store.get_balance(user_id)).balance
    await assert_invariants(store, user_id)


async def test_deduct_for_a_user_with_no_account_is_not_found(
    store: CreditStore, user_id: str
) -> None:
    """An unknown user has no holds to settle."""
    result = await store.deduct_credits(user_id, "res-does-not-exist", 10)

    assert ErrorCode.RESERVATION_NOT_FOUND == result.error
    assert [] == await all_rows(store, user_id)


async def test_deduct_another_users_hold_is_not_found(
    store: CreditStore, user_id: str, other_user_id: str
) -> None:
    """A user cannot settle someone else's hold, and the owner's hold is left intact."""
    reservation_id = await _funded_hold(store, user_id, 100, 30)
    await store.add_credits(other_user_id, 100, "purchase")

    stolen = await store.deduct_credits(other_user_id, reservation_id, 30)
    owner = await store.deduct_credits(user_id, reservation_id, 30)

    assert ErrorCode.RESERVATION_NOT_FOUND == stolen.error
    assert 100 == (await store.get_balance(other_user_id)).balance
    assert owner.ok
    assert 70 == (await store.get_balance(user_id)).balance
    await assert_invariants(store, user_id)
    await assert_invariants(store, other_user_id)


async def test_deduct_settled_hold_is_refused(store: CreditStore, user_id: str) -> None:
    """A hold can be settled once; again is reservation_already_settled and charges nothing."""
    reservation_id = await _funded_hold(store, user_id, 100, 30)
    await store.deduct_credits(user_id, reservation_id, 30)
    again = await store.deduct_credits(user_id, reservation_id, 30)

    assert ErrorCode.RESERVATION_ALREADY_SETTLED == again.error
    assert 70 == (await store.get_balance(user_id)).balance
    assert 2 == len(await all_rows(store, user_id))
    await assert_invariants(store, user_id)


async def test_deduct_released_hold_is_refused(store: CreditStore, user_id: str) -> None:
    """A released hold cannot be settled: reservation_released."""
    reservation_id = await _funded_hold(store, user_id, 100, 30)
    await store.release_reservation(user_id, reservation_id)
    result = await store.deduct_credits(user_id, reservation_id, 30)

    assert ErrorCode.RESERVATION_RELEASED == result.error
    assert 100 == (await store.get_balance(user_id)).balance
    await assert_invariants(store, user_id)


async def test_idempotent_deduct_replays_the_settlement(store: CreditStore, user_id: str) -> None:
    """A settlement repeated with its key returns the stored result and charges once."""
    reservation_id = await _funded_hold(store, user_id, 100, 30)
    first = await store.deduct_credits(user_id, reservation_id, 25, "settle-1")
    await store.add_credits(user_id, 10, "purchase")
    second = await store.deduct_credits(user_id, reservation_id, 25, "settle-1")

    assert not first.idempotent
    assert second.idempotent
    assert first.transaction_id == second.transaction_id
    assert (-25, 25, 75) == (second.amount, second.charged, second.balance_after)
    assert 85 == (await store.get_balance(user_id)).balance
    assert 1 == sum(r.type == "usage" for r in await all_rows(store, user_id))
    await assert_invariants(store, user_id)


async def test_idempotent_deduct_with_different_amount_conflicts(
    store: CreditStore, user_id: str
) -> None:
    """Reusing a settlement key with another amount is idempotency_conflict."""
    reservation_id = await _funded_hold(store, user_id, 100, 30)
    await store.deduct_credits(user_id, reservation_id, 25, "settle-1")
    result = await store.deduct_credits(user_id, reservation_id, 26, "settle-1")

    assert ErrorCode.IDEMPOTENCY_CONFLICT == result.error
    assert 75 == (await store.get_balance(user_id)).balance
    await assert_invariants(store, user_id)


async def test_idempotent_deduct_on_another_hold_conflicts_and_leaves_it_active(
    store: CreditStore, user_id: str
) -> None:
    """Reusing a settlement key on another hold is idempotency_conflict; that hold stays active."""
    await store.add_credits(user_id, 100, "purchase")
    first = await store.reserve_credits(user_id, 10, "chat", min_balance=0)
    second = await store.reserve_credits(user_id, 10, "chat", min_balance=0)
    await store.deduct_credits(user_id, first.reservation_id, 10, "settle-1")

    result = await store.deduct_credits(user_id, second.reservation_id, 10, "settle-1")

    assert ErrorCode.IDEMPOTENCY_CONFLICT == result.error
    assert 10 == (await store.get_balance(user_id)).reserved
    assert (await store.deduct_credits(user_id, second.reservation_id, 10)).ok
    await assert_invariants(store, user_id)


async def test_deduct_checks_idempotency_before_the_reservation(
    store: CreditStore, user_id: str
) -> None:
    """A used key names its request: an unknown hold with it is a conflict, not a miss."""
    reservation_id = await _funded_hold(store, user_id, 100, 30)
    await store.deduct_credits(user_id, reservation_id, 30, "settle-1")

    unknown = await store.deduct_credits(user_id, "res-does-not-exist", 30, "settle-1")
    replay = await store.deduct_credits(user_id, reservation_id, 30, "settle-1")

    assert ErrorCode.IDEMPOTENCY_CONFLICT == unknown.error
    assert replay.ok
    assert replay.idempotent


async def test_refused_deduct_does_not_consume_its_key(store: CreditStore, user_id: str) -> None:
    """A settlement refused as not found leaves its key free for the right hold."""
    reservation_id = await _funded_hold(store, user_id, 100, 30)
    refused = await store.deduct_credits(user_id, "res-does-not-exist", 30, "settle-1")
    accepted = await store.deduct_credits(user_id, reservation_id, 30, "settle-1")

    assert ErrorCode.RESERVATION_NOT_FOUND == refused.error
    assert accepted.ok
    assert not accepted.idempotent
    await assert_invariants(store, user_id)


async def test_lapsed_hold_can_still_be_settled_in_full(
    store: CreditStore, user_id: str, clock: FakeClock
) -> None:
    """A hold whose TTL passed can still be settled, and is charged in full."""
    await store.add_credits(user_id, 100, "purchase")
    hold = await store.reserve_credits(user_id, 30, "chat", ttl=10)
    clock.advance(seconds=3600)
    result = await store.deduct_credits(user_id, hold.reservation_id, 45)

    assert result.ok
    assert (-45, 45, 55) == (result.amount, result.charged, result.balance_after)
    balance = await store.get_balance(user_id)
    assert (55, 0, 55) == (balance.balance, balance.reserved, balance.available)
    await assert_invariants(store, user_id)


async def test_usage_row_metadata_has_system_keys_on_top(store: CreditStore, user_id: str) -> None:
    """Caller metadata is kept, but the system keys win over caller keys of the same name."""
    await store.add_credits(user_id, 100, "purchase")
    hold = await store.reserve_credits(user_id, 30, "chat", CreditMetadata(model="hold-model"))
    caller = {
        "customer": "acme",
        "input_tokens": 120,
        "model": "deduct-model",
        "operation_type": "spoofed",
        "reservation_id": "spoofed",
        "idempotency_key": "spoofed",
    }
    result = await store.deduct_credits(user_id, hold.reservation_id, 20, "settle-1", caller)
    row = (await all_rows(store, user_id))[-1]

    assert result.ok
    assert "acme" == row.metadata["customer"]
    assert 120 == row.metadata["input_tokens"]
    assert "deduct-model" == row.metadata["model"]
    assert "chat" == row.metadata["operation_type"]
    assert hold.reservation_id == row.metadata["reservation_id"]
    assert "settle-1" == row.metadata["idempotency_key"]
    assert "settle-1" == row.idempotency_key


async def test_usage_row_model_falls_back_to_the_holds_model(
    store: CreditStore, user_id: str
) -> None:
    """When the settlement names no model, the usage row takes the hold's."""
    await store.add_credits(user_id, 100, "purchase")
    hold = await store.reserve_credits(user_id, 30, "summarize", CreditMetadata(model="hold-model"))
    await store.deduct_credits(user_id, hold.reservation_id, 20, metadata={"customer": "acme"})
    row = (await all_rows(store, user_id))[-1]

    assert "hold-model" == row.metadata["model"]
    assert "summarize" == row.metadata["operation_type"]
    assert "acme" == row.metadata["customer"]


# -- release ------------------------------------------------------------------------------------


async def test_release_frees_the_hold(store: CreditStore, user_id: str) -> None:
    """Releasing makes the held credits available again and writes no ledger row."""
    reservation_id = await _funded_hold(store, user_id, 100, 30)
    result = await store.release_reservation(user_id, reservation_id)
    balance = await store.get_balance(user_id)

    assert result.ok
    assert result.released
    assert (reservation_id, user_id, 30, 100) == (
        result.reservation_id,
        result.user_id,
        result.amount,
        result.available,
    )
    assert (100, 0, 100) == (balance.balance, balance.reserved, balance.available)
    assert 1 == len(await all_rows(store, user_id))
    await assert_invariants(store, user_id)


async def test_release_twice_succeeds(store: CreditStore, user_id: str) -> None:
    """Releasing a released hold succeeds again and frees nothing more."""
    await store.add_credits(user_id, 100, "purchase")
    first = await store.reserve_credits(user_id, 30, "chat")
    await store.reserve_credits(user_id, 20, "chat")
    await store.release_reservation(user_id, first.reservation_id)
    again = await store.release_reservation(user_id, first.reservation_id)

    assert again.ok
    assert again.released
    assert 20 == (await store.get_balance(user_id)).reserved
    await assert_invariants(store, user_id)


async def test_release_lapsed_hold_succeeds(
    store: CreditStore, user_id: str, clock: FakeClock
) -> None:
    """A hold whose TTL passed can still be released, after which it cannot be settled."""
    await store.add_credits(user_id, 100, "purchase")
    hold = await store.reserve_credits(user_id, 30, "chat", ttl=10)
    clock.advance(seconds=11)
    released = await store.release_reservation(user_id, hold.reservation_id)
    settled = await store.deduct_credits(user_id, hold.reservation_id, 30)

    assert released.released
    assert ErrorCode.RESERVATION_RELEASED == settled.error
    assert 100 == (await store.get_balance(user_id)).available
    await assert_invariants(store, user_id)


async def test_release_settled_hold_is_refused(store: CreditStore, user_id: str) -> None:
    """A settled hold cannot be released: reservation_already_settled."""
    reservation_id = await _funded_hold(store, user_id, 100, 30)
    await store.deduct_credits(user_id, reservation_id, 30)
    result = await store.release_reservation(user_id, reservation_id)

    assert ErrorCode.RESERVATION_ALREADY_SETTLED == result.error
    assert not result.released
    assert 70 == (await store.get_balance(user_id)).balance
    await assert_invariants(store, user_id)


async def test_release_unknown_hold_is_not_found(store: CreditStore, user_id: str) -> None:
    """Releasing a hold that never existed is reservation_not_found."""
    await store.add_credits(user_id, 100, "purchase")
    known = await store.release_reservation(user_id, "res-does-not-exist")
    stranger = await store.release_reservation(f"{user_id}-nobody", "res-does-not-exist")

    assert ErrorCode.RESERVATION_NOT_FOUND == known.error
    assert ErrorCode.RESERVATION_NOT_FOUND == stranger.error
    assert not known.released


async def test_release_another_users_hold_is_not_found(
    store: CreditStore, user_id: str, other_user_id: str
) -> None:
    """A user cannot release someone else's hold; it keeps counting for its owner."""
    reservation_id = await _funded_hold(store, user_id, 100, 30)
    await store.add_credits(other_user_id, 100, "purchase")
    result = await store.release_reservation(other_user_id, reservation_id)

    assert ErrorCode.RESERVATION_NOT_FOUND == result.error
    assert 30 == (await store.get_balance(user_id)).reserved
    await assert_invariants(store, user_id)
