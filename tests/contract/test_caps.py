"""Spend caps: storage, deny enforcement at reserve, windows, per-model caps, warnings, checks."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

import pytest
from tests.conftest import FakeClock
from tests.contract._checks import assert_invariants

from ducto.errors import ErrorCode
from ducto.interface.base import CreditStore
from ducto.interface.models import CreditMetadata, SpendCap

pytestmark = pytest.mark.anyio


async def _spend(store: CreditStore, user_id: str, amount: int, model: str | None = None) -> None:
    """Record paid usage of `amount` (settled through a 1-credit hold, so no cap blocks it)."""
    hold = await store.reserve_credits(
        user_id, 1, "chat", CreditMetadata(model=model), min_balance=0
    )
    assert hold.ok
    assert (await store.deduct_credits(user_id, hold.reservation_id, amount)).ok


async def _reserve(
    store: CreditStore, user_id: str, amount: int, model: str | None = None
) -> ErrorCode | None:
    """Try a hold with no floor and return its error (None when it was made)."""
    result = await store.reserve_credits(
        user_id, amount, "chat", CreditMetadata(model=model), min_balance=0
    )
    return result.error


async def _funded(store: CreditStore, user_id: str, *caps: SpendCap) -> None:
    await store.add_credits(user_id, 10_000, "purchase")
    for cap in caps:
        await store.set_spend_cap(cap)


# -- storage ------------------------------------------------------------------------------------


async def test_set_spend_cap_returns_the_stored_cap(store: CreditStore, user_id: str) -> None:
    """The stored cap is returned and listed as given."""
    cap = SpendCap(user_id=user_id, cap_type="monthly", model="m1", limit=500, action="warn")

    stored = await store.set_spend_cap(cap)

    assert cap == stored
    assert [cap] == await store.list_spend_caps(user_id)


async def test_set_spend_cap_upserts_by_user_type_and_model(
    store: CreditStore, user_id: str
) -> None:
    """A cap replaces the one with the same type and model; other combinations coexist."""
    await store.set_spend_cap(SpendCap(user_id=user_id, cap_type="daily", limit=50))
    await store.set_spend_cap(SpendCap(user_id=user_id, cap_type="daily", model="m1", limit=20))
    await store.set_spend_cap(SpendCap(user_id=user_id, cap_type="monthly", limit=900))
    await store.set_spend_cap(
        SpendCap(user_id=user_id, cap_type="daily", limit=80, action="notify")
    )

    caps = await store.list_spend_caps(user_id)

    assert {
        ("daily", None): (80, "notify"),
        ("daily", "m1"): (20, "deny"),
        ("monthly", None): (900, "deny"),
    } == {(c.cap_type, c.model): (c.limit, c.action) for c in caps}
    assert 3 == len(caps)


async def test_spend_cap_accepts_type_and_cap_type(store: CreditStore, user_id: str) -> None:
    """SpendCap takes the 1.x ``type=`` and ``cap_type=``; both name the same cap."""
    by_alias = SpendCap(user_id=user_id, type="monthly", limit=10)
    by_name = SpendCap(user_id=user_id, cap_type="monthly", limit=20)

    await store.set_spend_cap(by_alias)
    await store.set_spend_cap(by_name)
    caps = await store.list_spend_caps(user_id)

    assert "monthly" == by_alias.cap_type
    assert [("monthly", 20)] == [(c.cap_type, c.limit) for c in caps]


async def test_caps_belong_to_their_user(
    store: CreditStore, user_id: str, other_user_id: str
) -> None:
    """One user's caps are neither listed for nor enforced on another user."""
    await _funded(store, user_id, SpendCap(user_id=user_id, cap_type="daily", limit=1))
    await _funded(store, other_user_id)

    assert [] == await store.list_spend_caps(other_user_id)
    assert await _reserve(store, other_user_id, 500) is None


async def test_list_spend_caps_of_unknown_user_is_empty(store: CreditStore, user_id: str) -> None:
    """A user without caps lists none."""
    assert [] == await store.list_spend_caps(user_id)


async def test_remove_spend_cap(store: CreditStore, user_id: str) -> None:
    """Removing a cap reports removed once, and only removes the cap with that model."""
    await store.set_spend_cap(SpendCap(user_id=user_id, cap_type="daily", limit=50))
    await store.set_spend_cap(SpendCap(user_id=user_id, cap_type="daily", model="m1", limit=20))

    removed = await store.remove_spend_cap(user_id, "daily", "m1")
    again = await store.remove_spend_cap(user_id, "daily", "m1")
    never = await store.remove_spend_cap(user_id, "monthly")

    assert (user_id, "daily", "m1", True) == (
        removed.user_id,
        removed.cap_type,
        removed.model,
        removed.removed,
    )
    assert not again.removed
    assert not never.removed
    caps = await store.list_spend_caps(user_id)
    assert [("daily", None)] == [(c.cap_type, c.model) for c in caps]


async def test_removed_cap_is_no_longer_enforced(store: CreditStore, user_id: str) -> None:
    """After removal a hold the cap refused is made."""
    await _funded(store, user_id, SpendCap(user_id=user_id, cap_type="daily", limit=10))
    refused = await _reserve(store, user_id, 11)
    await store.remove_spend_cap(user_id, "daily")

    assert ErrorCode.SPEND_CAP_EXCEEDED == refused
    assert await _reserve(store, user_id, 11) is None


# -- deny caps at reserve -----------------------------------------------------------------------


async def test_deny_cap_counts_spend_holds_and_amount(store: CreditStore, user_id: str) -> None:
    """A hold is refused when window spend plus active holds plus its amount passes the limit."""
    await _funded(store, user_id, SpendCap(user_id=user_id, cap_type="daily", limit=100))
    await _spend(store, user_id, 40)
    await _reserve(store, user_id, 30)

    refused = await store.reserve_credits(user_id, 31, "chat", min_balance=0)
    accepted = await store.reserve_credits(user_id, 30, "chat", min_balance=0)

    assert ErrorCode.SPEND_CAP_EXCEEDED == refused.error
    assert (100, 40, None) == (refused.cap_limit, refused.cap_spend, refused.cap_model)
    assert accepted.ok
    assert ErrorCode.SPEND_CAP_EXCEEDED == await _reserve(store, user_id, 1)
    assert 60 == (await store.get_balance(user_id)).reserved
    await assert_invariants(store, user_id)


async def test_deny_cap_of_zero_refuses_every_hold(store: CreditStore, user_id: str) -> None:
    """A deny cap with limit 0 refuses any hold."""
    await _funded(store, user_id, SpendCap(user_id=user_id, cap_type="monthly", limit=0))

    assert ErrorCode.SPEND_CAP_EXCEEDED == await _reserve(store, user_id, 1)


async def test_insufficient_credits_is_checked_before_caps(
    store: CreditStore, user_id: str
) -> None:
    """A hold both unaffordable and over a cap is refused as insufficient_credits."""
    await store.add_credits(user_id, 10, "purchase")
    await store.set_spend_cap(SpendCap(user_id=user_id, cap_type="daily", limit=5))

    assert ErrorCode.INSUFFICIENT_CREDITS == await _reserve(store, user_id, 20)


async def test_per_model_cap_counts_only_that_model(store: CreditStore, user_id: str) -> None:
    """A model's cap counts that model's usage and holds, and covers only holds naming it."""
    await _funded(
        store, user_id, SpendCap(user_id=user_id, cap_type="monthly", model="m1", limit=50)
    )
    await _spend(store, user_id, 400, model="m2")
    await _spend(store, user_id, 20, model="m1")
    await _reserve(store, user_id, 300, model="m2")
    await _reserve(store, user_id, 300)

    refused = await store.reserve_credits(user_id, 31, "chat", {"model": "m1"}, min_balance=0)
    accepted = await _reserve(store, user_id, 30, model="m1")

    assert ErrorCode.SPEND_CAP_EXCEEDED == refused.error
    assert (50, 20, "m1") == (refused.cap_limit, refused.cap_spend, refused.cap_model)
    assert accepted is None
    assert ErrorCode.SPEND_CAP_EXCEEDED == await _reserve(store, user_id, 1, model="m1")
    assert await _reserve(store, user_id, 100, model="m2") is None
    assert await _reserve(store, user_id, 100) is None


async def test_cap_without_model_counts_every_model(store: CreditStore, user_id: str) -> None:
    """A cap without a model counts all usage and all holds, whatever they name."""
    await _funded(store, user_id, SpendCap(user_id=user_id, cap_type="daily", limit=50))
    await _spend(store, user_id, 30, model="m1")
    await _reserve(store, user_id, 15, model="m2")

    assert ErrorCode.SPEND_CAP_EXCEEDED == await _reserve(store, user_id, 6, model="m3")
    assert await _reserve(store, user_id, 5) is None


async def test_lapsed_holds_stop_counting_toward_caps(
    store: CreditStore, user_id: str, clock: FakeClock
) -> None:
    """A hold whose TTL passed no longer uses cap headroom."""
    await _funded(store, user_id, SpendCap(user_id=user_id, cap_type="daily", limit=50))
    await store.reserve_credits(user_id, 50, "chat", min_balance=0, ttl=60)
    refused = await _reserve(store, user_id, 1)
    clock.advance(seconds=60)

    assert ErrorCode.SPEND_CAP_EXCEEDED == refused
    assert await _reserve(store, user_id, 50) is None


async def test_settled_hold_counts_as_its_charge(store: CreditStore, user_id: str) -> None:
    """Once settled, a hold stops counting and its actual charge counts instead."""
    await _funded(store, user_id, SpendCap(user_id=user_id, cap_type="daily", limit=50))
    hold = await store.reserve_credits(user_id, 30, "chat", min_balance=0)
    await store.deduct_credits(user_id, hold.reservation_id, 10)

    assert ErrorCode.SPEND_CAP_EXCEEDED == await _reserve(store, user_id, 41)
    assert await _reserve(store, user_id, 40) is None


async def test_daily_window_rolls_over_at_utc_midnight(
    store: CreditStore, user_id: str, clock: FakeClock
) -> None:
    """A daily cap counts the current UTC day only."""
    await _funded(store, user_id, SpendCap(user_id=user_id, cap_type="daily", limit=50))
    clock.set(datetime(2026, 3, 15, 23, 59, 59, tzinfo=UTC))
    await _spend(store, user_id, 50)
    same_day = await _reserve(store, user_id, 1)
    clock.set(datetime(2026, 3, 16, tzinfo=UTC))

    assert ErrorCode.SPEND_CAP_EXCEEDED == same_day
    assert await _reserve(store, user_id, 50) is None


async def test_monthly_window_spans_days_and_rolls_over(
    store: CreditStore, user_id: str, clock: FakeClock
) -> None:
    """A monthly cap counts every day of the UTC month and resets on the first."""
    await _funded(store, user_id, SpendCap(user_id=user_id, cap_type="monthly", limit=50))
    clock.set(datetime(2026, 3, 1, tzinfo=UTC))
    await _spend(store, user_id, 30)
    clock.set(datetime(2026, 3, 31, 23, 0, tzinfo=UTC))
    await _spend(store, user_id, 20)
    end_of_month = await _reserve(store, user_id, 1)
    clock.set(datetime(2026, 4, 1, tzinfo=UTC))

    assert ErrorCode.SPEND_CAP_EXCEEDED == end_of_month
    assert await _reserve(store, user_id, 50) is None


async def test_usage_counts_in_the_window_it_was_settled_in(
    store: CreditStore, user_id: str, clock: FakeClock
) -> None:
    """A hold made before midnight and settled after it counts in the new day."""
    await _funded(store, user_id, SpendCap(user_id=user_id, cap_type="daily", limit=50))
    clock.set(datetime(2026, 3, 15, 23, 59, tzinfo=UTC))
    hold = await store.reserve_credits(user_id, 40, "chat", min_balance=0)
    clock.set(datetime(2026, 3, 16, 0, 1, tzinfo=UTC))
    await store.deduct_credits(user_id, hold.reservation_id, 40)
    today = await _reserve(store, user_id, 11)
    clock.set(datetime(2026, 3, 17, tzinfo=UTC))

    assert ErrorCode.SPEND_CAP_EXCEEDED == today
    assert await _reserve(store, user_id, 50) is None


async def test_daily_and_monthly_caps_both_apply(
    store: CreditStore, user_id: str, clock: FakeClock
) -> None:
    """With a daily and a monthly cap, whichever would be exceeded refuses."""
    await _funded(
        store,
        user_id,
        SpendCap(user_id=user_id, cap_type="daily", limit=50),
        SpendCap(user_id=user_id, cap_type="monthly", limit=70),
    )
    await _spend(store, user_id, 40)
    over_daily = await _reserve(store, user_id, 11)
    clock.advance(days=1)
    over_monthly = await store.reserve_credits(user_id, 31, "chat", min_balance=0)

    assert ErrorCode.SPEND_CAP_EXCEEDED == over_daily
    assert ErrorCode.SPEND_CAP_EXCEEDED == over_monthly.error
    assert 70 == over_monthly.cap_limit
    assert await _reserve(store, user_id, 30) is None


# -- warn and notify caps -----------------------------------------------------------------------


@pytest.mark.parametrize("action", ["warn", "notify"])
async def test_non_deny_caps_never_refuse_but_warn_on_deduct(
    store: CreditStore, user_id: str, action: Literal["warn", "notify"]
) -> None:
    """warn and notify caps let holds through and name themselves on a deduction past them."""
    await _funded(
        store,
        user_id,
        SpendCap(user_id=user_id, cap_type="daily", limit=10, action=action),
    )
    hold = await store.reserve_credits(user_id, 50, "chat", min_balance=0)
    settled = await store.deduct_credits(user_id, hold.reservation_id, 50)

    assert hold.ok
    assert settled.ok
    assert action == settled.cap_warning
    await assert_invariants(store, user_id)


async def test_cap_warning_only_once_the_limit_is_passed(store: CreditStore, user_id: str) -> None:
    """Reaching a warn cap exactly gives no warning; passing it does."""
    await _funded(
        store, user_id, SpendCap(user_id=user_id, cap_type="daily", limit=10, action="warn")
    )
    first = await store.reserve_credits(user_id, 10, "chat", min_balance=0)
    at_limit = await store.deduct_credits(user_id, first.reservation_id, 10)
    second = await store.reserve_credits(user_id, 1, "chat", min_balance=0)
    past_limit = await store.deduct_credits(user_id, second.reservation_id, 1)

    assert at_limit.cap_warning is None
    assert "warn" == past_limit.cap_warning


async def test_cap_warning_only_for_the_capped_model(store: CreditStore, user_id: str) -> None:
    """A warn cap on one model does not warn about usage of another model."""
    await _funded(
        store,
        user_id,
        SpendCap(user_id=user_id, cap_type="daily", model="m1", limit=10, action="warn"),
    )
    other = await store.reserve_credits(user_id, 50, "chat", {"model": "m2"}, min_balance=0)
    other_settled = await store.deduct_credits(user_id, other.reservation_id, 50)
    same = await store.reserve_credits(user_id, 50, "chat", {"model": "m1"}, min_balance=0)
    same_settled = await store.deduct_credits(user_id, same.reservation_id, 50)

    assert other_settled.cap_warning is None
    assert "warn" == same_settled.cap_warning


async def test_deny_caps_never_set_cap_warning(store: CreditStore, user_id: str) -> None:
    """An overrun past a deny cap is charged in full and carries no cap warning."""
    await _funded(store, user_id, SpendCap(user_id=user_id, cap_type="daily", limit=10))
    hold = await store.reserve_credits(user_id, 10, "chat", min_balance=0)
    settled = await store.deduct_credits(user_id, hold.reservation_id, 30)

    assert settled.ok
    assert (-30, 30) == (settled.amount, settled.charged)
    assert settled.cap_warning is None


# -- check_spend_cap ----------------------------------------------------------------------------


async def test_check_spend_cap_without_caps(store: CreditStore, user_id: str) -> None:
    """With no caps nothing is capped and no action applies."""
    await _funded(store, user_id)

    result = await store.check_spend_cap(user_id, "m1", 1000)

    assert (False, None) == (result.capped, result.action)


async def test_check_spend_cap_counts_spend_holds_and_amount(
    store: CreditStore, user_id: str
) -> None:
    """The advisory check counts like reserve does, and changes nothing."""
    await _funded(store, user_id, SpendCap(user_id=user_id, cap_type="daily", limit=100))
    await _spend(store, user_id, 40)
    await _reserve(store, user_id, 30)

    at_limit = await store.check_spend_cap(user_id, amount=30)
    over = await store.check_spend_cap(user_id, amount=31)

    assert (False, 40, 30, 100, "deny", "daily", None) == (
        at_limit.capped,
        at_limit.current_spend,
        at_limit.reserved,
        at_limit.cap_limit,
        at_limit.action,
        at_limit.cap_type,
        at_limit.model,
    )
    assert over.capped
    assert 30 == (await store.get_balance(user_id)).reserved


async def test_check_spend_cap_reports_a_tripped_deny_cap_first(
    store: CreditStore, user_id: str
) -> None:
    """When both trip, the deny cap is reported rather than the warn cap."""
    await _funded(
        store,
        user_id,
        SpendCap(user_id=user_id, cap_type="daily", limit=10, action="warn"),
        SpendCap(user_id=user_id, cap_type="monthly", limit=100),
    )
    await _spend(store, user_id, 50)

    result = await store.check_spend_cap(user_id, amount=60)

    assert (True, "deny", "monthly") == (result.capped, result.action, result.cap_type)


async def test_check_spend_cap_reports_a_tripped_warn_cap_next(
    store: CreditStore, user_id: str
) -> None:
    """A tripped warn cap is reported before an untripped deny cap with less headroom."""
    await _funded(
        store,
        user_id,
        SpendCap(user_id=user_id, cap_type="daily", limit=60),
        SpendCap(user_id=user_id, cap_type="monthly", limit=55, action="notify"),
    )
    await _spend(store, user_id, 50)

    result = await store.check_spend_cap(user_id, amount=8)

    assert (False, True, "notify", "monthly") == (
        result.capped,
        result.exceeded,
        result.action,
        result.cap_type,
    )


async def test_check_spend_cap_reports_least_headroom_when_nothing_trips(
    store: CreditStore, user_id: str
) -> None:
    """With no cap tripped, the cap with the least headroom left is reported."""
    await _funded(
        store,
        user_id,
        SpendCap(user_id=user_id, cap_type="daily", limit=100),
        SpendCap(user_id=user_id, cap_type="monthly", limit=60, action="warn"),
    )
    await _spend(store, user_id, 50)

    result = await store.check_spend_cap(user_id, amount=1)

    assert (False, "warn", "monthly", 60, 50) == (
        result.capped,
        result.action,
        result.cap_type,
        result.cap_limit,
        result.current_spend,
    )


async def test_check_spend_cap_includes_the_models_cap(store: CreditStore, user_id: str) -> None:
    """A check for a model counts that model's cap; a check without a model does not."""
    await _funded(
        store,
        user_id,
        SpendCap(user_id=user_id, cap_type="daily", limit=1000),
        SpendCap(user_id=user_id, cap_type="daily", model="m1", limit=20),
    )
    await _spend(store, user_id, 15, model="m1")

    for_model = await store.check_spend_cap(user_id, "m1", 10)
    overall = await store.check_spend_cap(user_id, None, 10)

    assert (True, "m1", 15) == (for_model.capped, for_model.model, for_model.current_spend)
    assert (False, None, 1000) == (overall.capped, overall.model, overall.cap_limit)
