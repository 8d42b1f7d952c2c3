"""Pricing versions, plans, features and the monthly plan allowance."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from tests.conftest import FakeClock
from tests.contract._checks import all_rows, assert_invariants

from ducto.errors import InvalidArgumentError, PricingVersionNotFoundError, StoreError
from ducto.interface.base import CreditStore
from ducto.interface.models import AllowanceResult, PlanDefinition, PricingConfigData

pytestmark = pytest.mark.anyio

FEATURES: dict[str, Any] = {
    "zero": 0,
    "empty": "",
    "none": None,
    "false": False,
    "true": True,
    "limit": 25,
    "models": ["m1", "m2"],
}


def _config(min_balance: int = 5, **allowances: int) -> PricingConfigData:
    """A pricing config whose plans are the given ``plan_id=free_allowance`` pairs."""
    plans = {
        plan_id: PlanDefinition(
            id=plan_id, name=plan_id.title(), free_allowance=allowance, features=FEATURES
        )
        for plan_id, allowance in allowances.items()
    }
    return PricingConfigData(models={"_default": "0"}, min_balance=min_balance, plans=plans)


def _period(result: AllowanceResult) -> tuple[datetime, datetime]:
    """The allowance period as aware datetimes, checking both are UTC."""
    start = datetime.fromisoformat(result.period_start)
    end = datetime.fromisoformat(result.period_end)
    assert timedelta(0) == start.utcoffset()
    assert timedelta(0) == end.utcoffset()
    return start, end


async def _on_plan(store: CreditStore, user_id: str, allowance: int, credits: int) -> None:
    """Publish a ``pro`` plan with `allowance`, put the user on it and grant `credits`."""
    await store.set_active_pricing(_config(pro=allowance))
    await store.set_user_plan(user_id, "pro")
    if credits:
        await store.add_credits(user_id, credits, "purchase")


# -- pricing versions ---------------------------------------------------------------------------


async def test_no_pricing_before_the_first_version(store: CreditStore) -> None:
    """Before anything is published there is no active version and no history."""
    assert await store.get_active_pricing() is None
    assert [] == await store.get_pricing_history()
    assert await store.get_pricing_config(1) is None


async def test_set_active_pricing_publishes_the_next_version(
    store: CreditStore, clock: FakeClock
) -> None:
    """Each publication gets version highest + 1 and becomes active."""
    first_id = await store.set_active_pricing(_config(pro=1), "launch")
    second_id = await store.set_active_pricing(_config(pro=2), "spring")
    active = await store.get_active_pricing()

    assert first_id != second_id
    assert active is not None
    assert (second_id, 2, "spring", True) == (
        active.id,
        active.version,
        active.label,
        active.active,
    )
    assert _config(pro=2) == active.config
    assert clock.now == active.created_at


async def test_activate_pricing_reactivates_without_a_new_version(store: CreditStore) -> None:
    """Re-activating an old version makes it active; the next publication gets a new number."""
    first_id = await store.set_active_pricing(_config(pro=1))
    await store.set_active_pricing(_config(pro=2))

    activated = await store.activate_pricing(1)
    active = await store.get_active_pricing()
    third_id = await store.set_active_pricing(_config(pro=3))
    latest = await store.get_active_pricing()

    assert first_id == activated
    assert active is not None
    assert (1, first_id) == (active.version, active.id)
    assert latest is not None
    assert (3, third_id) == (latest.version, latest.id)
    assert [3, 2, 1] == [item.version for item in await store.get_pricing_history()]


async def test_activate_unknown_version_raises(store: CreditStore) -> None:
    """Activating a version that does not exist raises PricingVersionNotFoundError."""
    await store.set_active_pricing(_config(pro=1))

    with pytest.raises(PricingVersionNotFoundError) as caught:
        await store.activate_pricing(2)

    assert isinstance(caught.value, StoreError)
    assert 2 == caught.value.version
    active = await store.get_active_pricing()
    assert active is not None
    assert 1 == active.version


async def test_pricing_history_is_newest_first(store: CreditStore, clock: FakeClock) -> None:
    """History lists every version newest first, marking the active one."""
    ids = [await store.set_active_pricing(_config(pro=1), "v1")]
    clock.advance(days=1)
    ids.append(await store.set_active_pricing(_config(pro=2), "v2"))
    clock.advance(days=1)
    ids.append(await store.set_active_pricing(_config(pro=3)))
    await store.activate_pricing(2)

    history = await store.get_pricing_history()

    assert [(ids[2], 3, None, False), (ids[1], 2, "v2", True), (ids[0], 1, "v1", False)] == [
        (h.id, h.version, h.label, h.active) for h in history
    ]
    assert [clock.now, clock.now - timedelta(days=1), clock.now - timedelta(days=2)] == [
        h.created_at for h in history
    ]


async def test_get_pricing_config_by_version(store: CreditStore) -> None:
    """A version can be read back by number, active or not; an unknown number reads None."""
    first_id = await store.set_active_pricing(_config(pro=1))
    await store.set_active_pricing(_config(pro=2))

    first = await store.get_pricing_config(1)

    assert first is not None
    assert (first_id, 1, False) == (first.id, first.version, first.active)
    assert _config(pro=1) == first.config
    assert await store.get_pricing_config(3) is None


# -- plans and features -------------------------------------------------------------------------


async def test_user_without_a_plan(store: CreditStore, user_id: str) -> None:
    """A user with no plan has no plan name, allowance or features."""
    await store.set_active_pricing(_config(pro=100))
    plan = await store.get_user_plan(user_id)
    feature = await store.check_feature(user_id, "true")
    allowance = await store.check_allowance(user_id)

    assert (user_id, None, None, 0, {}) == (
        plan.user_id,
        plan.plan_id,
        plan.plan_name,
        plan.free_allowance,
        plan.features,
    )
    assert not feature.has_feature
    assert (0, 0) == (allowance.allowance_remaining, allowance.free_allowance)


async def test_set_user_plan_reads_the_plan_from_the_active_version(
    store: CreditStore, user_id: str
) -> None:
    """The user's plan reports the name, allowance and features the active version defines."""
    await store.set_active_pricing(_config(pro=100, team=500))
    result = await store.set_user_plan(user_id, "team")
    plan = await store.get_user_plan(user_id)

    assert (user_id, "team") == (result.user_id, result.plan_id)
    assert ("team", "Team", 500, FEATURES) == (
        plan.plan_id,
        plan.plan_name,
        plan.free_allowance,
        plan.features,
    )


async def test_set_user_plan_refuses_an_unknown_plan(store: CreditStore, user_id: str) -> None:
    """A plan the active version does not define is an InvalidArgumentError naming plan_id."""
    await store.set_active_pricing(_config(pro=100))

    with pytest.raises(InvalidArgumentError, match="plan_id"):
        await store.set_user_plan(user_id, "enterprise")

    assert (await store.get_user_plan(user_id)).plan_id is None


async def test_set_user_plan_without_pricing_is_refused(store: CreditStore, user_id: str) -> None:
    """With no active pricing version no plan is defined."""
    with pytest.raises(InvalidArgumentError, match="plan_id"):
        await store.set_user_plan(user_id, "pro")


async def test_plan_follows_the_active_version(store: CreditStore, user_id: str) -> None:
    """Publishing or re-activating a version changes what the user's plan means."""
    await store.set_active_pricing(_config(pro=100))
    await store.set_user_plan(user_id, "pro")
    await store.set_active_pricing(_config(pro=200))
    newer = await store.get_user_plan(user_id)
    await store.activate_pricing(1)
    older = await store.get_user_plan(user_id)

    assert 200 == newer.free_allowance
    assert 100 == older.free_allowance


async def test_dropped_plan_keeps_its_id_but_gives_nothing(
    store: CreditStore, user_id: str
) -> None:
    """When the active version drops the plan, the user keeps its id but gets nothing from it."""
    await store.set_active_pricing(_config(pro=100))
    await store.set_user_plan(user_id, "pro")
    await store.set_active_pricing(_config(basic=10))

    dropped = await store.get_user_plan(user_id)
    feature = await store.check_feature(user_id, "true")
    allowance = await store.check_allowance(user_id)
    await store.activate_pricing(1)
    restored = await store.get_user_plan(user_id)

    assert ("pro", None, 0, {}) == (
        dropped.plan_id,
        dropped.plan_name,
        dropped.free_allowance,
        dropped.features,
    )
    assert not feature.has_feature
    assert 0 == allowance.allowance_remaining
    assert ("pro", 100) == (restored.plan_id, restored.free_allowance)


@pytest.mark.parametrize(
    ("feature", "present", "value"),
    [
        ("zero", True, 0),
        ("empty", True, ""),
        ("true", True, True),
        ("limit", True, 25),
        ("models", True, ["m1", "m2"]),
        ("none", False, None),
        ("false", False, False),
        ("missing", False, None),
    ],
)
async def test_check_feature(
    store: CreditStore, user_id: str, feature: str, present: bool, value: object
) -> None:
    """A feature is present when its key exists with a value other than None or False."""
    await store.set_active_pricing(_config(pro=100))
    await store.set_user_plan(user_id, "pro")

    result = await store.check_feature(user_id, feature)

    assert (user_id, feature, present, value) == (
        result.user_id,
        result.feature,
        result.has_feature,
        result.value,
    )


# -- allowance ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("now", "start", "end"),
    [
        pytest.param(
            datetime(2026, 3, 15, 12, tzinfo=UTC),
            datetime(2026, 3, 1, tzinfo=UTC),
            datetime(2026, 4, 1, tzinfo=UTC),
            id="mid-month",
        ),
        pytest.param(
            datetime(2026, 4, 1, tzinfo=UTC),
            datetime(2026, 4, 1, tzinfo=UTC),
            datetime(2026, 5, 1, tzinfo=UTC),
            id="first-instant",
        ),
        pytest.param(
            datetime(2026, 3, 31, 23, 59, 59, 999999, tzinfo=UTC),
            datetime(2026, 3, 1, tzinfo=UTC),
            datetime(2026, 4, 1, tzinfo=UTC),
            id="last-instant",
        ),
        pytest.param(
            datetime(2026, 12, 10, tzinfo=UTC),
            datetime(2026, 12, 1, tzinfo=UTC),
            datetime(2027, 1, 1, tzinfo=UTC),
            id="december",
        ),
    ],
)
async def test_check_allowance_period_is_the_utc_month(
    store: CreditStore,
    user_id: str,
    clock: FakeClock,
    now: datetime,
    start: datetime,
    end: datetime,
) -> None:
    """The allowance period is the half-open UTC calendar month, as ISO UTC instants."""
    await _on_plan(store, user_id, 100, 0)
    clock.set(now)

    result = await store.check_allowance(user_id)

    assert (start, end) == _period(result)


async def test_check_allowance_reports_the_plan_and_usage(store: CreditStore, user_id: str) -> None:
    """check_allowance reports the plan, its allowance, what was used and what is left."""
    await _on_plan(store, user_id, 100, 0)
    await store.increment_usage_window(user_id, "pro", 30)

    result = await store.check_allowance(user_id)

    assert ("pro", 100, 30, 70) == (
        result.plan_id,
        result.free_allowance,
        result.allowance_used,
        result.allowance_remaining,
    )


async def test_increment_usage_window_never_leaves_a_negative_remainder(
    store: CreditStore, user_id: str
) -> None:
    """Usage past the allowance leaves nothing, not a negative remainder."""
    await _on_plan(store, user_id, 100, 0)
    await store.increment_usage_window(user_id, "pro", 70)
    await store.increment_usage_window(user_id, "pro", 70)

    result = await store.check_allowance(user_id)

    assert (140, 0) == (result.allowance_used, result.allowance_remaining)


async def test_switching_plans_does_not_refill_the_allowance(
    store: CreditStore, user_id: str
) -> None:
    """Allowance usage belongs to the user and month, not to the plan."""
    await store.set_active_pricing(_config(pro=100, max=500))
    await store.set_user_plan(user_id, "pro")
    await store.increment_usage_window(user_id, "pro", 80)
    await store.set_user_plan(user_id, "max")
    on_max = await store.check_allowance(user_id)
    await store.set_user_plan(user_id, "pro")
    back_on_pro = await store.check_allowance(user_id)

    assert (80, 420) == (on_max.allowance_used, on_max.allowance_remaining)
    assert (80, 20) == (back_on_pro.allowance_used, back_on_pro.allowance_remaining)


async def test_allowance_resets_next_utc_month(
    store: CreditStore, user_id: str, clock: FakeClock
) -> None:
    """A new UTC month starts with the whole allowance."""
    await _on_plan(store, user_id, 100, 0)
    await store.increment_usage_window(user_id, "pro", 100)
    clock.set(datetime(2026, 4, 1, tzinfo=UTC))

    result = await store.check_allowance(user_id)

    assert (0, 100) == (result.allowance_used, result.allowance_remaining)


async def test_allowance_is_per_user(store: CreditStore, user_id: str, other_user_id: str) -> None:
    """One user's allowance usage does not touch another's."""
    await _on_plan(store, user_id, 100, 0)
    await store.set_user_plan(other_user_id, "pro")
    await store.increment_usage_window(user_id, "pro", 60)

    assert 100 == (await store.check_allowance(other_user_id)).allowance_remaining


async def test_balance_reports_the_allowance_left(store: CreditStore, user_id: str) -> None:
    """get_balance adds the remaining allowance to available and reports it."""
    await _on_plan(store, user_id, 100, 50)
    await store.increment_usage_window(user_id, "pro", 30)

    balance = await store.get_balance(user_id)

    assert (50, 70, 120) == (balance.balance, balance.allowance_remaining, balance.available)
    await assert_invariants(store, user_id)


async def test_deduct_with_allowance_consumes_it_first(store: CreditStore, user_id: str) -> None:
    """A hold made with use_allowance is paid by the allowance before the balance."""
    await _on_plan(store, user_id, 100, 50)
    hold = await store.reserve_credits(user_id, 30, "chat", min_balance=0, use_allowance=True)

    result = await store.deduct_credits(user_id, hold.reservation_id, 30)
    rows = await all_rows(store, user_id)
    allowance = await store.check_allowance(user_id)

    assert (0, 30, 50, 0) == (
        result.amount,
        result.allowance_consumed,
        result.balance_after,
        result.shortfall,
    )
    assert ("usage", 0) == (rows[-1].type, rows[-1].amount)
    assert 30 == rows[-1].metadata["allowance_consumed"]
    assert result.transaction_id == rows[-1].id
    assert (30, 70) == (allowance.allowance_used, allowance.allowance_remaining)
    await assert_invariants(store, user_id)


async def test_deduct_past_the_allowance_charges_the_balance(
    store: CreditStore, user_id: str
) -> None:
    """What the allowance cannot cover is paid by the balance."""
    await _on_plan(store, user_id, 100, 50)
    await store.increment_usage_window(user_id, "pro", 80)
    hold = await store.reserve_credits(user_id, 50, "chat", min_balance=0, use_allowance=True)

    result = await store.deduct_credits(user_id, hold.reservation_id, 50)
    allowance = await store.check_allowance(user_id)

    assert (-30, 30, 20, 20) == (
        result.amount,
        result.charged,
        result.allowance_consumed,
        result.balance_after,
    )
    assert (100, 0) == (allowance.allowance_used, allowance.allowance_remaining)
    assert 20 == (await store.get_balance(user_id)).balance
    await assert_invariants(store, user_id)


async def test_deduct_without_allowance_leaves_it_alone(store: CreditStore, user_id: str) -> None:
    """A hold made without use_allowance is paid by the balance only."""
    await _on_plan(store, user_id, 100, 50)
    hold = await store.reserve_credits(user_id, 30, "chat", min_balance=0)

    result = await store.deduct_credits(user_id, hold.reservation_id, 30)

    assert (-30, 0, 20) == (result.amount, result.allowance_consumed, result.balance_after)
    assert 100 == (await store.check_allowance(user_id)).allowance_remaining
    await assert_invariants(store, user_id)


async def test_allowance_covered_usage_is_neither_spend_nor_refundable(
    store: CreditStore, user_id: str
) -> None:
    """Only the part the balance paid counts as spend and can be refunded."""
    await _on_plan(store, user_id, 100, 50)
    hold = await store.reserve_credits(user_id, 120, "chat", min_balance=0, use_allowance=True)
    usage = await store.deduct_credits(user_id, hold.reservation_id, 120)

    by_user = await store.spend_by_user(
        datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 4, 1, tzinfo=UTC)
    )
    refund = await store.refund_credits(usage.transaction_id)

    assert (-20, 20, 100) == (usage.amount, usage.charged, usage.allowance_consumed)
    assert [(user_id, 20)] == [(r.user_id, r.total_spend) for r in by_user]
    assert 20 == refund.amount
    assert 50 == (await store.get_balance(user_id)).balance
    await assert_invariants(store, user_id)


async def test_idempotent_deduct_replays_the_allowance_split(
    store: CreditStore, user_id: str
) -> None:
    """A replayed settlement reports the original allowance split and consumes nothing more."""
    await _on_plan(store, user_id, 100, 50)
    hold = await store.reserve_credits(user_id, 30, "chat", min_balance=0, use_allowance=True)
    await store.deduct_credits(user_id, hold.reservation_id, 30, "settle-1")

    again = await store.deduct_credits(user_id, hold.reservation_id, 30, "settle-1")

    assert again.idempotent
    assert (0, 30) == (again.amount, again.allowance_consumed)
    assert 70 == (await store.check_allowance(user_id)).allowance_remaining
