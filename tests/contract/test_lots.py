"""Lots and expiry: the burn-down order, expired credits, sweeps and list_lots."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from tests.conftest import FakeClock
from tests.contract._checks import all_rows, assert_invariants

from ducto.interface.base import CreditStore

pytestmark = pytest.mark.anyio


async def _grant(store: CreditStore, user_id: str, amount: int, expires_at: datetime | None) -> str:
    """Grant a lot and return its id (the only lot list_lots does not already know)."""
    before = {lot.id for lot in await store.list_lots(user_id)}
    await store.add_credits(user_id, amount, "purchase", expires_at=expires_at)
    (new,) = [lot.id for lot in await store.list_lots(user_id) if lot.id not in before]
    return new


async def _charge(store: CreditStore, user_id: str, amount: int) -> None:
    """Settle a charge of `amount` against a 1-credit hold (an overrun when amount > 1)."""
    hold = await store.reserve_credits(user_id, 1, "chat", min_balance=0)
    assert hold.ok
    assert (await store.deduct_credits(user_id, hold.reservation_id, amount)).ok


async def _remaining(store: CreditStore, user_id: str) -> dict[str, int]:
    return {lot.id: lot.remaining for lot in await store.list_lots(user_id)}


async def test_list_lots_is_in_burn_down_order(
    store: CreditStore, user_id: str, clock: FakeClock
) -> None:
    """Lots list soonest-expiring first, oldest first among equals, non-expiring last."""
    soon = clock.now + timedelta(days=5)
    late = clock.now + timedelta(days=10)
    never_old = await _grant(store, user_id, 10, None)
    late_lot = await _grant(store, user_id, 10, late)
    soon_old = await _grant(store, user_id, 10, soon)
    never_new = await _grant(store, user_id, 10, None)
    soon_new = await _grant(store, user_id, 10, soon)

    lots = await store.list_lots(user_id)

    assert [soon_old, soon_new, late_lot, never_old, never_new] == [lot.id for lot in lots]
    assert [soon, soon, late, None, None] == [lot.expires_at for lot in lots]
    assert not any(lot.expired for lot in lots)
    await assert_invariants(store, user_id)


async def test_debits_consume_lots_in_burn_down_order(
    store: CreditStore, user_id: str, clock: FakeClock
) -> None:
    """A debit drains the soonest-expiring lots first and the non-expiring ones last."""
    never_old = await _grant(store, user_id, 10, None)
    late_lot = await _grant(store, user_id, 10, clock.now + timedelta(days=10))
    soon_old = await _grant(store, user_id, 10, clock.now + timedelta(days=5))
    never_new = await _grant(store, user_id, 10, None)
    soon_new = await _grant(store, user_id, 10, clock.now + timedelta(days=5))

    await _charge(store, user_id, 25)
    after_first = await _remaining(store, user_id)
    await _charge(store, user_id, 20)
    after_second = await _remaining(store, user_id)

    assert {late_lot: 5, never_old: 10, never_new: 10} == after_first
    assert soon_old not in after_first
    assert soon_new not in after_first
    assert {never_new: 5} == after_second
    await assert_invariants(store, user_id)


async def test_expired_lots_are_listed_last_and_marked(
    store: CreditStore, user_id: str, clock: FakeClock
) -> None:
    """Expired-but-unswept lots come after every unexpired lot, oldest expiry first."""
    first = await _grant(store, user_id, 10, clock.now + timedelta(hours=2))
    second = await _grant(store, user_id, 10, clock.now + timedelta(hours=1))
    never = await _grant(store, user_id, 10, None)
    later = await _grant(store, user_id, 10, clock.now + timedelta(days=30))
    clock.advance(hours=3)

    lots = await store.list_lots(user_id)

    assert [later, never, second, first] == [lot.id for lot in lots]
    assert [False, False, True, True] == [lot.expired for lot in lots]
    assert 20 == (await store.get_balance(user_id)).expired_unswept
    await assert_invariants(store, user_id)


async def test_overrun_draws_expired_lots_before_going_negative(
    store: CreditStore, user_id: str, clock: FakeClock
) -> None:
    """A charge past every live lot takes expired-unswept lots, oldest expiry first."""
    expired_late = await _grant(store, user_id, 10, clock.now + timedelta(hours=2))
    expired_early = await _grant(store, user_id, 10, clock.now + timedelta(hours=1))
    await _grant(store, user_id, 5, None)
    clock.advance(hours=3)

    await _charge(store, user_id, 18)

    lots = await store.list_lots(user_id)
    balance = await store.get_balance(user_id)
    assert [(expired_late, 7, True)] == [(lot.id, lot.remaining, lot.expired) for lot in lots]
    assert expired_early not in {lot.id for lot in lots}
    assert (7, 7, 0) == (balance.balance, balance.expired_unswept, balance.available)
    await assert_invariants(store, user_id)


async def test_overrun_past_every_lot_goes_negative(
    store: CreditStore, user_id: str, clock: FakeClock
) -> None:
    """Only after live and expired lots are empty does a charge take the balance below zero."""
    await _grant(store, user_id, 10, clock.now + timedelta(hours=1))
    await _grant(store, user_id, 5, None)
    clock.advance(hours=2)

    await _charge(store, user_id, 20)
    balance = await store.get_balance(user_id)
    sweep = await store.sweep_expired_credits()

    assert (-5, 0, -5) == (balance.balance, balance.expired_unswept, balance.available)
    assert [] == await store.list_lots(user_id)
    assert (0, 0) == (sweep.expired_count, sweep.expired_amount)
    await assert_invariants(store, user_id)


async def test_expired_credits_are_never_spendable(
    store: CreditStore, user_id: str, clock: FakeClock
) -> None:
    """From its expiry on, a lot's credits cannot be held or adjusted away, swept or not."""
    await _grant(store, user_id, 50, clock.now + timedelta(days=1))
    clock.advance(days=1)

    unswept = await store.get_balance(user_id)
    hold = await store.reserve_credits(user_id, 1, "chat", min_balance=0)
    adjustment = await store.add_credits(user_id, -1)
    await store.sweep_expired_credits()
    swept = await store.get_balance(user_id)

    assert (50, 0) == (unswept.balance, unswept.available)
    assert not hold.ok
    assert not adjustment.ok
    assert (0, 0, 0) == (swept.balance, swept.available, swept.expired_unswept)
    await assert_invariants(store, user_id)


async def test_sweep_writes_off_only_the_unspent_remainder(
    store: CreditStore, user_id: str, clock: FakeClock
) -> None:
    """A sweep writes one expiry row for what is left of an expired lot, not its original size."""
    lot_id = await _grant(store, user_id, 50, clock.now + timedelta(days=1))
    await _grant(store, user_id, 5, None)
    await _charge(store, user_id, 20)
    clock.advance(days=2)

    result = await store.sweep_expired_credits()
    rows = await all_rows(store, user_id)
    balance = await store.get_balance(user_id)

    assert (1, 30, False) == (result.expired_count, result.expired_amount, result.dry_run)
    assert ("expiry", -30, 5) == (rows[-1].type, rows[-1].amount, rows[-1].balance_after)
    assert lot_id not in await _remaining(store, user_id)
    assert (5, 5) == (balance.balance, balance.available)
    await assert_invariants(store, user_id)


async def test_sweep_at_the_exact_expiry_instant(
    store: CreditStore, user_id: str, clock: FakeClock
) -> None:
    """A lot is expired from its expires_at on, so a sweep at that instant takes it."""
    expires_at = clock.now + timedelta(days=1)
    await _grant(store, user_id, 50, expires_at)
    clock.set(expires_at - timedelta(microseconds=1))
    early = await store.sweep_expired_credits()
    clock.set(expires_at)
    on_time = await store.sweep_expired_credits()

    assert (0, 0) == (early.expired_count, early.expired_amount)
    assert (1, 50) == (on_time.expired_count, on_time.expired_amount)
    await assert_invariants(store, user_id)


async def test_second_sweep_finds_nothing(
    store: CreditStore, user_id: str, clock: FakeClock
) -> None:
    """Once swept, a lot is not swept again."""
    await _grant(store, user_id, 50, clock.now + timedelta(days=1))
    clock.advance(days=2)
    await store.sweep_expired_credits()
    clock.advance(days=2)
    again = await store.sweep_expired_credits()

    assert (0, 0) == (again.expired_count, again.expired_amount)
    assert 1 == sum(r.type == "expiry" for r in await all_rows(store, user_id))
    await assert_invariants(store, user_id)


async def test_dry_run_reports_the_same_and_changes_nothing(
    store: CreditStore, user_id: str, clock: FakeClock
) -> None:
    """A dry run reports what a sweep would write off, and a real sweep then does exactly that."""
    await _grant(store, user_id, 50, clock.now + timedelta(days=1))
    await _grant(store, user_id, 20, clock.now + timedelta(days=1))
    clock.advance(days=2)
    rows_before = await all_rows(store, user_id)
    balance_before = await store.get_balance(user_id)

    dry = await store.sweep_expired_credits(dry_run=True)
    dry_again = await store.sweep_expired_credits(dry_run=True)
    rows_after_dry = await all_rows(store, user_id)
    balance_after_dry = await store.get_balance(user_id)
    real = await store.sweep_expired_credits()

    assert (2, 70, True) == (dry.expired_count, dry.expired_amount, dry.dry_run)
    assert dry == dry_again
    assert rows_before == rows_after_dry
    assert balance_before == balance_after_dry
    assert (2, 70, False) == (real.expired_count, real.expired_amount, real.dry_run)
    assert 0 == (await store.get_balance(user_id)).balance
    await assert_invariants(store, user_id)


async def test_expired_count_counts_lots_across_users(
    store: CreditStore, user_id: str, other_user_id: str, clock: FakeClock
) -> None:
    """Each expired lot with a remainder counts once and gets its own expiry row."""
    await _grant(store, user_id, 10, clock.now + timedelta(hours=1))
    await _grant(store, user_id, 20, clock.now + timedelta(hours=2))
    await _grant(store, other_user_id, 30, clock.now + timedelta(hours=1))
    await _grant(store, user_id, 40, clock.now + timedelta(days=30))
    clock.advance(hours=3)

    result = await store.sweep_expired_credits()
    mine = [r.amount for r in await all_rows(store, user_id) if r.type == "expiry"]
    theirs = [r.amount for r in await all_rows(store, other_user_id) if r.type == "expiry"]

    assert (3, 60) == (result.expired_count, result.expired_amount)
    assert [-10, -20] == sorted(mine, reverse=True)
    assert [-30] == theirs
    assert 40 == (await store.get_balance(user_id)).balance
    await assert_invariants(store, user_id)
    await assert_invariants(store, other_user_id)


async def test_sweep_skips_fully_spent_expired_lots(
    store: CreditStore, user_id: str, clock: FakeClock
) -> None:
    """A lot spent to zero before it expired has nothing to write off."""
    await _grant(store, user_id, 10, clock.now + timedelta(hours=1))
    await _grant(store, user_id, 10, None)
    await _charge(store, user_id, 10)
    clock.advance(hours=2)

    result = await store.sweep_expired_credits()

    assert (0, 0) == (result.expired_count, result.expired_amount)
    assert [] == [r for r in await all_rows(store, user_id) if r.type == "expiry"]
    await assert_invariants(store, user_id)


async def test_sweep_with_nothing_expired(store: CreditStore, user_id: str) -> None:
    """A sweep with no expired lots reports zeros and echoes dry_run."""
    await store.add_credits(user_id, 10, "purchase")

    real = await store.sweep_expired_credits()
    dry = await store.sweep_expired_credits(dry_run=True)

    assert (0, 0, False) == (real.expired_count, real.expired_amount, real.dry_run)
    assert (0, 0, True) == (dry.expired_count, dry.expired_amount, dry.dry_run)
    assert 10 == (await store.get_balance(user_id)).balance


async def test_list_lots_of_unknown_user_is_empty(store: CreditStore, user_id: str) -> None:
    """A user with no grants has no lots."""
    assert [] == await store.list_lots(user_id)
