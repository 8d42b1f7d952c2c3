"""Refunds: what is refundable, cumulative amounts, where credits go back, idempotency, windows."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from tests.conftest import FakeClock
from tests.contract._checks import all_rows, assert_invariants

from ducto.errors import ErrorCode
from ducto.interface.base import CreditStore
from ducto.interface.models import CreditMetadata, SpendCap

pytestmark = pytest.mark.anyio


async def _usage(store: CreditStore, user_id: str, amount: int, model: str | None = None) -> str:
    """Settle a charge of `amount` (through a 1-credit hold) and return its usage row id."""
    hold = await store.reserve_credits(
        user_id, 1, "chat", CreditMetadata(model=model), min_balance=0
    )
    assert hold.ok
    settled = await store.deduct_credits(user_id, hold.reservation_id, amount)
    assert settled.ok
    return settled.transaction_id


async def _grant(store: CreditStore, user_id: str, amount: int, expires_at: datetime | None) -> str:
    """Grant a lot and return its id."""
    before = {lot.id for lot in await store.list_lots(user_id)}
    await store.add_credits(user_id, amount, "purchase", expires_at=expires_at)
    (new,) = [lot.id for lot in await store.list_lots(user_id) if lot.id not in before]
    return new


async def _lots(store: CreditStore, user_id: str) -> dict[str, tuple[int, datetime | None]]:
    return {lot.id: (lot.remaining, lot.expires_at) for lot in await store.list_lots(user_id)}


async def test_refund_returns_credits_and_writes_a_refund_row(
    store: CreditStore, user_id: str
) -> None:
    """A partial refund credits the balance and writes one refund row linked to the usage."""
    await store.add_credits(user_id, 100, "purchase")
    usage_id = await _usage(store, user_id, 30)

    result = await store.refund_credits(usage_id, 10, "bad answer")
    rows = await all_rows(store, user_id)

    assert result.ok
    assert (usage_id, user_id, None, 10, 80, 20) == (
        result.original_transaction_id,
        result.user_id,
        result.team_id,
        result.amount,
        result.new_balance,
        result.refundable,
    )
    assert result.refund_transaction_id == rows[-1].id
    assert ("refund", 10, 80) == (rows[-1].type, rows[-1].amount, rows[-1].balance_after)
    assert usage_id == rows[-1].metadata["original_transaction_id"]
    assert "bad answer" == rows[-1].metadata["reason"]
    assert 10 == next(r.refunded for r in rows if r.id == usage_id)
    await assert_invariants(store, user_id)


async def test_refunds_are_cumulative(store: CreditStore, user_id: str) -> None:
    """Partial refunds add up to the usage amount and no further."""
    await store.add_credits(user_id, 100, "purchase")
    usage_id = await _usage(store, user_id, 30)

    first = await store.refund_credits(usage_id, 10)
    second = await store.refund_credits(usage_id, 20)
    third = await store.refund_credits(usage_id, 1)

    assert (20, 0) == (first.refundable, second.refundable)
    assert ErrorCode.ALREADY_REFUNDED == third.error
    assert 100 == (await store.get_balance(user_id)).balance
    await assert_invariants(store, user_id)


async def test_refund_without_amount_refunds_what_is_left(store: CreditStore, user_id: str) -> None:
    """amount=None refunds the rest of the usage."""
    await store.add_credits(user_id, 100, "purchase")
    usage_id = await _usage(store, user_id, 30)
    await store.refund_credits(usage_id, 12)

    result = await store.refund_credits(usage_id)

    assert (18, 0, 100) == (result.amount, result.refundable, result.new_balance)
    assert [12, 18] == [r.amount for r in await all_rows(store, user_id) if r.type == "refund"]
    await assert_invariants(store, user_id)


async def test_refund_of_a_fully_refunded_usage_is_already_refunded(
    store: CreditStore, user_id: str
) -> None:
    """Once nothing is left, both a full and a partial refund are already_refunded."""
    await store.add_credits(user_id, 100, "purchase")
    usage_id = await _usage(store, user_id, 30)
    await store.refund_credits(usage_id)

    full = await store.refund_credits(usage_id)
    partial = await store.refund_credits(usage_id, 1)

    assert ErrorCode.ALREADY_REFUNDED == full.error
    assert ErrorCode.ALREADY_REFUNDED == partial.error
    assert 100 == (await store.get_balance(user_id)).balance
    await assert_invariants(store, user_id)


async def test_refund_of_more_than_is_left_is_over_refund(store: CreditStore, user_id: str) -> None:
    """Asking for more than is left is over_refund, reports what is left, and changes nothing."""
    await store.add_credits(user_id, 100, "purchase")
    usage_id = await _usage(store, user_id, 30)
    whole = await store.refund_credits(usage_id, 31)
    await store.refund_credits(usage_id, 10)
    rest = await store.refund_credits(usage_id, 21)

    assert (ErrorCode.OVER_REFUND, 30) == (whole.error, whole.refundable)
    assert (ErrorCode.OVER_REFUND, 20) == (rest.error, rest.refundable)
    assert 80 == (await store.get_balance(user_id)).balance
    await assert_invariants(store, user_id)


async def test_refund_of_an_unknown_transaction_is_not_found(store: CreditStore) -> None:
    """Refunding a transaction that does not exist is transaction_not_found."""
    result = await store.refund_credits("tx-does-not-exist", 5)

    assert ErrorCode.TRANSACTION_NOT_FOUND == result.error
    assert "tx-does-not-exist" == result.original_transaction_id


@pytest.mark.parametrize("kind", ["purchase", "adjustment", "negative_adjustment", "refund"])
async def test_only_usage_is_refundable(store: CreditStore, user_id: str, kind: str) -> None:
    """Grants, adjustments and refunds themselves are not_refundable."""
    grant = await store.add_credits(user_id, 100, "purchase")
    usage_id = await _usage(store, user_id, 30)
    refund = await store.refund_credits(usage_id, 5)
    ids = {
        "purchase": grant.transaction_id,
        "adjustment": (await store.add_credits(user_id, 7)).transaction_id,
        "negative_adjustment": (await store.add_credits(user_id, -7)).transaction_id,
        "refund": refund.refund_transaction_id,
    }
    balance = (await store.get_balance(user_id)).balance

    result = await store.refund_credits(ids[kind])

    assert ErrorCode.NOT_REFUNDABLE == result.error
    assert balance == (await store.get_balance(user_id)).balance
    await assert_invariants(store, user_id)


async def test_expiry_rows_are_not_refundable(
    store: CreditStore, user_id: str, clock: FakeClock
) -> None:
    """An expiry write-off cannot be refunded."""
    await store.add_credits(user_id, 10, "purchase", expires_at=clock.now + timedelta(hours=1))
    clock.advance(hours=2)
    await store.sweep_expired_credits()
    expiry_id = (await all_rows(store, user_id))[-1].id

    result = await store.refund_credits(expiry_id)

    assert ErrorCode.NOT_REFUNDABLE == result.error
    assert 0 == (await store.get_balance(user_id)).balance


async def test_zero_usage_has_nothing_to_refund(store: CreditStore, user_id: str) -> None:
    """A usage row of amount 0 paid nothing, so there is nothing to refund."""
    await store.add_credits(user_id, 100, "purchase")
    usage_id = await _usage(store, user_id, 0)

    result = await store.refund_credits(usage_id)

    assert ErrorCode.ALREADY_REFUNDED == result.error
    assert 100 == (await store.get_balance(user_id)).balance


async def test_refund_pays_the_debt_first(store: CreditStore, user_id: str) -> None:
    """A refund to a negative balance first repays the debt; only the rest returns to a lot."""
    lot_id = await _grant(store, user_id, 20, None)
    usage_id = await _usage(store, user_id, 50)

    small = await store.refund_credits(usage_id, 10)
    lots_after_small = await _lots(store, user_id)
    rest = await store.refund_credits(usage_id, 30)

    assert -20 == small.new_balance
    assert {} == lots_after_small
    assert 10 == rest.new_balance
    assert {lot_id: (10, None)} == await _lots(store, user_id)
    await assert_invariants(store, user_id)


async def test_refund_returns_to_lots_newest_drawn_first_keeping_expiry(
    store: CreditStore, user_id: str, clock: FakeClock
) -> None:
    """Credits go back into the lots the debit drew from, newest-drawn first, with their expiry."""
    soon = clock.now + timedelta(days=5)
    late = clock.now + timedelta(days=10)
    soon_lot = await _grant(store, user_id, 10, soon)
    late_lot = await _grant(store, user_id, 10, late)
    never_lot = await _grant(store, user_id, 10, None)
    usage_id = await _usage(store, user_id, 25)

    await store.refund_credits(usage_id, 12)
    after_first = await _lots(store, user_id)
    await store.refund_credits(usage_id, 13)

    assert {late_lot: (7, late), never_lot: (10, None)} == after_first
    assert {soon_lot: (10, soon), late_lot: (10, late), never_lot: (10, None)} == await _lots(
        store, user_id
    )
    await assert_invariants(store, user_id)


async def test_refund_beyond_the_drawn_lots_becomes_a_non_expiring_lot(
    store: CreditStore, user_id: str, clock: FakeClock
) -> None:
    """What no drawn lot can take back (the debit ran past every lot) becomes a new lot."""
    expires_at = clock.now + timedelta(days=5)
    lot_id = await _grant(store, user_id, 10, expires_at)
    usage_id = await _usage(store, user_id, 30)
    await store.add_credits(user_id, 20, "subscription")

    result = await store.refund_credits(usage_id)
    lots = await _lots(store, user_id)

    assert 30 == result.new_balance
    assert (10, expires_at) == lots.pop(lot_id)
    assert [(20, None)] == list(lots.values())
    await assert_invariants(store, user_id)


async def test_refund_into_an_expired_lot_is_immediately_expired(
    store: CreditStore, user_id: str, clock: FakeClock
) -> None:
    """Credits returned to an expired, unswept lot are expired at once and swept next time."""
    await _grant(store, user_id, 50, clock.now + timedelta(days=1))
    usage_id = await _usage(store, user_id, 20)
    clock.advance(days=2)

    await store.refund_credits(usage_id)
    balance = await store.get_balance(user_id)
    sweep = await store.sweep_expired_credits()

    assert (50, 50, 0) == (balance.balance, balance.expired_unswept, balance.available)
    assert (1, 50) == (sweep.expired_count, sweep.expired_amount)
    assert 0 == (await store.get_balance(user_id)).balance
    await assert_invariants(store, user_id)


async def test_refund_into_an_already_swept_lot_is_swept_again(
    store: CreditStore, user_id: str, clock: FakeClock
) -> None:
    """Credits returned to an already swept lot are expired and the next sweep takes them."""
    await _grant(store, user_id, 50, clock.now + timedelta(days=1))
    usage_id = await _usage(store, user_id, 20)
    clock.advance(days=2)
    first_sweep = await store.sweep_expired_credits()

    await store.refund_credits(usage_id)
    balance = await store.get_balance(user_id)
    second_sweep = await store.sweep_expired_credits()

    assert (1, 30) == (first_sweep.expired_count, first_sweep.expired_amount)
    assert (20, 20, 0) == (balance.balance, balance.expired_unswept, balance.available)
    assert (1, 20) == (second_sweep.expired_count, second_sweep.expired_amount)
    assert 0 == (await store.get_balance(user_id)).balance
    await assert_invariants(store, user_id)


async def test_idempotent_refund_replays(store: CreditStore, user_id: str) -> None:
    """A refund repeated with its key returns the original and refunds once."""
    await store.add_credits(user_id, 100, "purchase")
    usage_id = await _usage(store, user_id, 30)

    first = await store.refund_credits(usage_id, 10, idempotency_key="rf-1")
    second = await store.refund_credits(usage_id, 10, idempotency_key="rf-1")

    assert not first.idempotent
    assert second.idempotent
    assert first.refund_transaction_id == second.refund_transaction_id
    assert 80 == (await store.get_balance(user_id)).balance
    assert 1 == sum(r.type == "refund" for r in await all_rows(store, user_id))
    await assert_invariants(store, user_id)


async def test_idempotent_refund_with_different_request_conflicts(
    store: CreditStore, user_id: str
) -> None:
    """A refund key reused for another amount or another usage is idempotency_conflict."""
    await store.add_credits(user_id, 100, "purchase")
    usage_id = await _usage(store, user_id, 30)
    other_usage_id = await _usage(store, user_id, 30)
    await store.refund_credits(usage_id, 10, idempotency_key="rf-1")

    other_amount = await store.refund_credits(usage_id, 11, idempotency_key="rf-1")
    whole = await store.refund_credits(usage_id, idempotency_key="rf-1")
    other_usage = await store.refund_credits(other_usage_id, 10, idempotency_key="rf-1")

    assert ErrorCode.IDEMPOTENCY_CONFLICT == other_amount.error
    assert ErrorCode.IDEMPOTENCY_CONFLICT == whole.error
    assert ErrorCode.IDEMPOTENCY_CONFLICT == other_usage.error
    assert 50 == (await store.get_balance(user_id)).balance
    await assert_invariants(store, user_id)


async def test_refused_refund_does_not_consume_its_key(store: CreditStore, user_id: str) -> None:
    """A refund refused as over_refund leaves its key free for a valid refund."""
    await store.add_credits(user_id, 100, "purchase")
    usage_id = await _usage(store, user_id, 30)

    refused = await store.refund_credits(usage_id, 31, idempotency_key="rf-1")
    accepted = await store.refund_credits(usage_id, 30, idempotency_key="rf-1")

    assert ErrorCode.OVER_REFUND == refused.error
    assert accepted.ok
    assert not accepted.idempotent
    await assert_invariants(store, user_id)


async def test_refund_keys_are_scoped_per_debited_account(
    store: CreditStore, user_id: str, other_user_id: str
) -> None:
    """The same refund key on two users' usage refunds both."""
    for who in (user_id, other_user_id):
        await store.add_credits(who, 100, "purchase")
    mine = await _usage(store, user_id, 30)
    theirs = await _usage(store, other_user_id, 30)

    first = await store.refund_credits(mine, 10, idempotency_key="rf-1")
    second = await store.refund_credits(theirs, 10, idempotency_key="rf-1")

    assert (True, True) == (first.ok, second.ok)
    assert not second.idempotent
    assert 80 == (await store.get_balance(other_user_id)).balance
    await assert_invariants(store, other_user_id)


async def test_refund_frees_cap_headroom(store: CreditStore, user_id: str) -> None:
    """A refund lowers the window spend a deny cap counts."""
    await store.add_credits(user_id, 1000, "purchase")
    await store.set_spend_cap(SpendCap(user_id=user_id, cap_type="daily", limit=50))
    usage_id = await _usage(store, user_id, 40)

    refused = await store.reserve_credits(user_id, 20, "chat", min_balance=0)
    await store.refund_credits(usage_id, 15)
    accepted = await store.reserve_credits(user_id, 25, "chat", min_balance=0)

    assert ErrorCode.SPEND_CAP_EXCEEDED == refused.error
    assert accepted.ok
    await assert_invariants(store, user_id)


async def test_refund_counts_in_the_window_of_the_refunded_usage(
    store: CreditStore, user_id: str, clock: FakeClock
) -> None:
    """Refunding yesterday's usage does not free today's daily cap, and moves yesterday's spend."""
    await store.add_credits(user_id, 1000, "purchase")
    await store.set_spend_cap(SpendCap(user_id=user_id, cap_type="daily", limit=50))
    yesterday_usage = await _usage(store, user_id, 40)
    clock.advance(days=1)
    await _usage(store, user_id, 44)

    await store.refund_credits(yesterday_usage)
    refused = await store.reserve_credits(user_id, 7, "chat", min_balance=0)
    accepted = await store.reserve_credits(user_id, 6, "chat", min_balance=0)
    days = await store.daily_spend(
        datetime(2026, 3, 15, tzinfo=UTC), datetime(2026, 3, 17, tzinfo=UTC)
    )

    assert ErrorCode.SPEND_CAP_EXCEEDED == refused.error
    assert accepted.ok
    assert [("2026-03-15", 0), ("2026-03-16", 44)] == [(d.date, d.total_spend) for d in days]
    await assert_invariants(store, user_id)


async def test_refund_lowers_analytics_of_the_usage(
    store: CreditStore, user_id: str, clock: FakeClock
) -> None:
    """Spend by user and by model is net of refunds, made in any later window."""
    await store.add_credits(user_id, 1000, "purchase")
    usage_id = await _usage(store, user_id, 40, model="m1")
    clock.advance(days=20)
    await store.refund_credits(usage_id, 15)
    march = (datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 4, 1, tzinfo=UTC))
    april = (datetime(2026, 4, 1, tzinfo=UTC), datetime(2026, 5, 1, tzinfo=UTC))

    by_user = await store.spend_by_user(*march)
    by_model = await store.spend_by_model(*march)
    later = await store.spend_by_user(*april)

    assert [(user_id, 25)] == [(r.user_id, r.total_spend) for r in by_user]
    assert [("m1", 25)] == [(r.model, r.total_spend) for r in by_model]
    assert [] == later
