"""Balances and grants: get_balance, add_credits, negative adjustments, idempotency, debt."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from tests.conftest import FakeClock
from tests.contract._checks import all_rows, assert_invariants

from ducto.errors import ErrorCode
from ducto.interface.base import CreditStore

pytestmark = pytest.mark.anyio


async def _into_debt(store: CreditStore, user_id: str, debt: int) -> None:
    """Leave the user with a balance of ``-debt`` through an overrunning settlement."""
    await store.add_credits(user_id, 1, "purchase")
    hold = await store.reserve_credits(user_id, 1, "chat", min_balance=0)
    assert hold.ok
    settled = await store.deduct_credits(user_id, hold.reservation_id, 1 + debt)
    assert settled.ok


async def test_unknown_user_reads_all_zeros(store: CreditStore, user_id: str) -> None:
    """An unknown user has zero balance, no ledger and no lots."""
    balance = await store.get_balance(user_id)

    assert user_id == balance.user_id
    assert (0, 0, 0, 0, 0, 0) == (
        balance.balance,
        balance.lifetime_purchased,
        balance.available,
        balance.reserved,
        balance.expired_unswept,
        balance.allowance_remaining,
    )
    assert [] == await all_rows(store, user_id)
    assert [] == await store.list_lots(user_id)


async def test_purchase_grows_balance_and_lifetime_purchased(
    store: CreditStore, user_id: str
) -> None:
    """Two purchases add up in balance, available and lifetime_purchased."""
    await store.add_credits(user_id, 30, "purchase")
    result = await store.add_credits(user_id, 12, "purchase")
    balance = await store.get_balance(user_id)

    assert result.ok
    assert 42 == result.new_balance
    assert 42 == result.lifetime_purchased
    assert 42 == result.available
    assert (42, 42, 42) == (balance.balance, balance.available, balance.lifetime_purchased)
    await assert_invariants(store, user_id)


@pytest.mark.parametrize("grant_type", ["subscription", "signup_bonus", "adjustment"])
async def test_only_purchase_grows_lifetime_purchased(
    store: CreditStore, user_id: str, grant_type: str
) -> None:
    """Grants other than purchase add to the balance but not to lifetime_purchased."""
    await store.add_credits(user_id, 5, "purchase")
    result = await store.add_credits(user_id, 20, grant_type)
    balance = await store.get_balance(user_id)
    rows = await all_rows(store, user_id)

    assert 5 == result.lifetime_purchased
    assert 25 == balance.balance
    assert 5 == balance.lifetime_purchased
    assert [("purchase", 5, 5), (grant_type, 20, 25)] == [
        (r.type, r.amount, r.balance_after) for r in rows
    ]
    await assert_invariants(store, user_id)


async def test_default_grant_type_is_adjustment(store: CreditStore, user_id: str) -> None:
    """add_credits without a type writes an adjustment row."""
    result = await store.add_credits(user_id, 7)
    rows = await all_rows(store, user_id)

    assert [(result.transaction_id, "adjustment", 7)] == [(r.id, r.type, r.amount) for r in rows]
    await assert_invariants(store, user_id)


async def test_grant_result_names_its_ledger_row(store: CreditStore, user_id: str) -> None:
    """The grant's transaction id is the id of the row it wrote, with its metadata."""
    result = await store.add_credits(user_id, 9, "signup_bonus", {"reference_id": "welcome"})
    rows = await all_rows(store, user_id)

    assert 1 == len(rows)
    assert result.transaction_id == rows[0].id
    assert user_id == rows[0].user_id
    assert "welcome" == rows[0].metadata["reference_id"]
    assert 9 == rows[0].balance_after


async def test_negative_adjustment_takes_credits(store: CreditStore, user_id: str) -> None:
    """A negative adjustment lowers the balance and writes a negative adjustment row."""
    await store.add_credits(user_id, 50, "purchase")
    result = await store.add_credits(user_id, -20, "adjustment")
    balance = await store.get_balance(user_id)
    rows = await all_rows(store, user_id)

    assert result.ok
    assert -20 == result.amount
    assert 30 == result.new_balance
    assert 30 == balance.balance
    assert 50 == balance.lifetime_purchased
    assert ("adjustment", -20, 30) == (rows[-1].type, rows[-1].amount, rows[-1].balance_after)
    await assert_invariants(store, user_id)


async def test_negative_adjustment_may_empty_the_account(store: CreditStore, user_id: str) -> None:
    """A negative adjustment of exactly the available credits leaves zero and no lots."""
    await store.add_credits(user_id, 50, "purchase")
    result = await store.add_credits(user_id, -50)

    assert result.ok
    assert 0 == (await store.get_balance(user_id)).balance
    assert [] == await store.list_lots(user_id)
    await assert_invariants(store, user_id)


async def test_negative_adjustment_beyond_available_is_refused(
    store: CreditStore, user_id: str
) -> None:
    """Taking more than is available is refused with insufficient_credits and changes nothing."""
    await store.add_credits(user_id, 10, "purchase")
    result = await store.add_credits(user_id, -11)

    assert ErrorCode.INSUFFICIENT_CREDITS == result.error
    assert not result.ok
    assert 10 == (await store.get_balance(user_id)).balance
    assert 1 == len(await all_rows(store, user_id))
    await assert_invariants(store, user_id)


async def test_negative_adjustment_on_unknown_user_is_refused(
    store: CreditStore, user_id: str
) -> None:
    """An account with nothing cannot be adjusted below zero."""
    result = await store.add_credits(user_id, -1)

    assert ErrorCode.INSUFFICIENT_CREDITS == result.error
    assert 0 == (await store.get_balance(user_id)).balance
    assert [] == await all_rows(store, user_id)


async def test_negative_adjustment_counts_active_holds(store: CreditStore, user_id: str) -> None:
    """Held credits cannot be adjusted away."""
    await store.add_credits(user_id, 100, "purchase")
    await store.reserve_credits(user_id, 60, "chat", min_balance=0)

    refused = await store.add_credits(user_id, -41)
    accepted = await store.add_credits(user_id, -40)

    assert ErrorCode.INSUFFICIENT_CREDITS == refused.error
    assert accepted.ok
    balance = await store.get_balance(user_id)
    assert (60, 60, 0) == (balance.balance, balance.reserved, balance.available)
    await assert_invariants(store, user_id)


async def test_negative_adjustment_counts_expired_unswept_credits(
    store: CreditStore, user_id: str, clock: FakeClock
) -> None:
    """Expired credits cannot be adjusted away; only the spendable lot is consumed."""
    await store.add_credits(user_id, 50, "purchase", expires_at=clock.now + timedelta(days=1))
    await store.add_credits(user_id, 30, "purchase")
    clock.advance(days=2)

    refused = await store.add_credits(user_id, -31)
    accepted = await store.add_credits(user_id, -30)

    assert ErrorCode.INSUFFICIENT_CREDITS == refused.error
    assert accepted.ok
    balance = await store.get_balance(user_id)
    assert (50, 50, 0) == (balance.balance, balance.expired_unswept, balance.available)
    assert [(50, True)] == [(lot.remaining, lot.expired) for lot in await store.list_lots(user_id)]
    await assert_invariants(store, user_id)


async def test_negative_adjustment_consumes_lots_in_burn_down_order(
    store: CreditStore, user_id: str, clock: FakeClock
) -> None:
    """A negative adjustment drains the soonest-expiring lot first, the non-expiring one last."""
    late = clock.now + timedelta(days=10)
    soon = clock.now + timedelta(days=5)
    await store.add_credits(user_id, 20, "purchase", expires_at=late)
    await store.add_credits(user_id, 20, "purchase")
    await store.add_credits(user_id, 20, "purchase", expires_at=soon)

    await store.add_credits(user_id, -30)

    lots = await store.list_lots(user_id)
    assert [(10, late), (20, None)] == [(lot.remaining, lot.expires_at) for lot in lots]
    await assert_invariants(store, user_id)


async def test_idempotent_grant_replays_the_original(store: CreditStore, user_id: str) -> None:
    """A grant repeated with its key returns the original result and grants once."""
    first = await store.add_credits(user_id, 25, "purchase", idempotency_key="webhook-1")
    second = await store.add_credits(user_id, 25, "purchase", idempotency_key="webhook-1")

    assert not first.idempotent
    assert second.idempotent
    assert first.transaction_id == second.transaction_id
    assert 25 == second.new_balance
    assert "webhook-1" == second.idempotency_key
    balance = await store.get_balance(user_id)
    assert (25, 25) == (balance.balance, balance.lifetime_purchased)
    assert 1 == len(await all_rows(store, user_id))
    await assert_invariants(store, user_id)


async def test_idempotent_grant_replays_after_other_changes(
    store: CreditStore, user_id: str, clock: FakeClock
) -> None:
    """A late replay (days later, inside retention) returns the stored original result."""
    first = await store.add_credits(user_id, 25, "purchase", idempotency_key="webhook-1")
    await store.add_credits(user_id, 100, "purchase")
    clock.advance(days=6, hours=23)

    again = await store.add_credits(user_id, 25, "purchase", idempotency_key="webhook-1")

    assert again.idempotent
    assert first.transaction_id == again.transaction_id
    assert 25 == again.new_balance
    assert 125 == (await store.get_balance(user_id)).balance
    await assert_invariants(store, user_id)


@pytest.mark.parametrize(
    ("amount", "grant_type", "expires_in"),
    [
        pytest.param(26, "purchase", None, id="amount"),
        pytest.param(25, "subscription", None, id="type"),
        pytest.param(25, "purchase", timedelta(days=3), id="expires_at"),
    ],
)
async def test_idempotent_grant_with_different_request_conflicts(
    store: CreditStore,
    user_id: str,
    clock: FakeClock,
    amount: int,
    grant_type: str,
    expires_in: timedelta | None,
) -> None:
    """Reusing a grant key for a different amount, type or expiry is idempotency_conflict."""
    await store.add_credits(user_id, 25, "purchase", idempotency_key="k")
    expires_at = None if expires_in is None else clock.now + expires_in

    result = await store.add_credits(
        user_id, amount, grant_type, expires_at=expires_at, idempotency_key="k"
    )

    assert ErrorCode.IDEMPOTENCY_CONFLICT == result.error
    assert not result.idempotent
    assert 25 == (await store.get_balance(user_id)).balance
    assert 1 == len(await all_rows(store, user_id))
    await assert_invariants(store, user_id)


async def test_refused_grant_does_not_consume_its_key(store: CreditStore, user_id: str) -> None:
    """A refused negative adjustment can be retried with the same key once credits exist."""
    refused = await store.add_credits(user_id, -10, idempotency_key="fix-1")
    await store.add_credits(user_id, 30, "purchase")
    retried = await store.add_credits(user_id, -10, idempotency_key="fix-1")

    assert ErrorCode.INSUFFICIENT_CREDITS == refused.error
    assert retried.ok
    assert not retried.idempotent
    assert 20 == (await store.get_balance(user_id)).balance
    await assert_invariants(store, user_id)


async def test_grant_keys_are_scoped_per_user(
    store: CreditStore, user_id: str, other_user_id: str
) -> None:
    """The same grant key used by two users grants to both."""
    first = await store.add_credits(user_id, 10, "purchase", idempotency_key="order-1")
    second = await store.add_credits(other_user_id, 10, "purchase", idempotency_key="order-1")

    assert not second.idempotent
    assert first.transaction_id != second.transaction_id
    assert 10 == (await store.get_balance(user_id)).balance
    assert 10 == (await store.get_balance(other_user_id)).balance
    await assert_invariants(store, user_id)
    await assert_invariants(store, other_user_id)


async def test_grant_keys_are_scoped_per_operation_kind(store: CreditStore, user_id: str) -> None:
    """One request id may key a grant, a hold and its settlement without conflict."""
    grant = await store.add_credits(user_id, 50, "purchase", idempotency_key="req-1")
    hold = await store.reserve_credits(user_id, 10, "chat", idempotency_key="req-1")
    settled = await store.deduct_credits(user_id, hold.reservation_id, 10, "req-1")

    assert (True, True, True) == (grant.ok, hold.ok, settled.ok)
    assert (False, False, False) == (grant.idempotent, hold.idempotent, settled.idempotent)
    assert 40 == (await store.get_balance(user_id)).balance
    await assert_invariants(store, user_id)


async def test_expires_at_is_kept_on_the_lot(
    store: CreditStore, user_id: str, clock: FakeClock
) -> None:
    """A grant with expires_at reports it and creates a lot that expires then."""
    expires_at = clock.now + timedelta(days=30)
    result = await store.add_credits(user_id, 40, "subscription", expires_at=expires_at)
    lots = await store.list_lots(user_id)

    assert expires_at == result.expires_at
    assert [(40, expires_at, False)] == [
        (lot.remaining, lot.expires_at, lot.expired) for lot in lots
    ]
    await assert_invariants(store, user_id)


async def test_expires_at_in_another_zone_is_returned_in_utc(
    store: CreditStore, user_id: str, clock: FakeClock
) -> None:
    """An aware expires_at in another zone is converted to the same instant in UTC."""
    tokyo = timezone(timedelta(hours=9))
    local = datetime(2026, 4, 1, 9, 0, tzinfo=tokyo)

    result = await store.add_credits(user_id, 40, "purchase", expires_at=local)
    lots = await store.list_lots(user_id)

    assert datetime(2026, 4, 1, 0, 0, tzinfo=UTC) == result.expires_at
    assert result.expires_at is not None
    assert timedelta(0) == result.expires_at.utcoffset()
    assert lots[0].expires_at is not None
    assert timedelta(0) == lots[0].expires_at.utcoffset()
    assert local == lots[0].expires_at


async def test_credits_stop_being_available_at_expires_at(
    store: CreditStore, user_id: str, clock: FakeClock
) -> None:
    """Credits are available until their expiry instant and not from that instant on."""
    expires_at = clock.now + timedelta(days=1)
    await store.add_credits(user_id, 50, "purchase", expires_at=expires_at)
    clock.set(expires_at - timedelta(seconds=1))
    before = await store.get_balance(user_id)
    clock.set(expires_at)
    at = await store.get_balance(user_id)

    assert (50, 50, 0) == (before.balance, before.available, before.expired_unswept)
    assert (50, 0, 50) == (at.balance, at.available, at.expired_unswept)
    await assert_invariants(store, user_id)


async def test_get_balance_subtracts_active_holds(store: CreditStore, user_id: str) -> None:
    """An active hold is reported as reserved and is not available."""
    await store.add_credits(user_id, 100, "purchase")
    await store.reserve_credits(user_id, 30, "chat")
    balance = await store.get_balance(user_id)

    assert (100, 30, 70) == (balance.balance, balance.reserved, balance.available)
    await assert_invariants(store, user_id)


async def test_grant_to_negative_balance_repays_debt_without_a_lot(
    store: CreditStore, user_id: str
) -> None:
    """A grant smaller than the debt only repays it and creates no lot."""
    await _into_debt(store, user_id, 15)
    result = await store.add_credits(user_id, 10, "purchase")

    assert -5 == result.new_balance
    assert [] == await store.list_lots(user_id)
    balance = await store.get_balance(user_id)
    assert (-5, -5) == (balance.balance, balance.available)
    await assert_invariants(store, user_id)


async def test_grant_larger_than_debt_keeps_only_the_rest(
    store: CreditStore, user_id: str, clock: FakeClock
) -> None:
    """A grant repays the debt first; only the rest becomes a lot, with the grant's expiry."""
    await _into_debt(store, user_id, 15)
    expires_at = clock.now + timedelta(days=7)
    result = await store.add_credits(user_id, 20, "purchase", expires_at=expires_at)

    assert 5 == result.new_balance
    assert [(5, expires_at)] == [
        (lot.remaining, lot.expires_at) for lot in await store.list_lots(user_id)
    ]
    balance = await store.get_balance(user_id)
    assert (5, 5, 21) == (balance.balance, balance.available, balance.lifetime_purchased)
    await assert_invariants(store, user_id)


async def test_grant_repaying_debt_exactly_leaves_zero(store: CreditStore, user_id: str) -> None:
    """A grant equal to the debt brings the balance to zero with no lots."""
    await _into_debt(store, user_id, 15)
    await store.add_credits(user_id, 15, "subscription")

    assert 0 == (await store.get_balance(user_id)).balance
    assert [] == await store.list_lots(user_id)
    await assert_invariants(store, user_id)


async def test_reads_do_not_create_accounts_or_rows(store: CreditStore, user_id: str) -> None:
    """Reading an unknown user's balance, lots and ledger writes nothing."""
    await store.get_balance(user_id)
    await store.list_lots(user_id)
    await store.list_transactions(user_id)

    assert [] == (await store.list_transactions(user_id)).items
    assert 0 == (await store.get_balance(user_id)).balance
