"""
Pricing versions that take effect at a time: scheduling, the version in force, cancelling, and
rollbacks, by the store's clock.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from tests.conftest import FakeClock
from tests.contract._checks import all_rows

from ducto.errors import InvalidArgumentError, PricingVersionInEffectError
from ducto.errors import PricingVersionNotFoundError as NotFound
from ducto.interface.base import CreditStore
from ducto.interface.models import PlanDefinition, PricingConfigData

pytestmark = pytest.mark.anyio


def _config(rate: str, *plans: str) -> PricingConfigData:
    return PricingConfigData(
        models={"_default": f"input_tokens * {rate}"},
        plans={p: PlanDefinition(id=p, name=p.title(), free_allowance=100) for p in plans},
    )


async def _in_force(store: CreditStore) -> int | None:
    active = await store.get_active_pricing()
    return None if active is None else active.version


async def test_a_scheduled_version_takes_effect_at_its_instant(
    store: CreditStore, clock: FakeClock
) -> None:
    """Until `effective_at` the earlier version is in force; from that instant, the new one."""
    await store.set_active_pricing(_config("1"), "now")
    at = clock.now + timedelta(hours=2)
    scheduled_id = await store.set_active_pricing(_config("2"), "later", effective_at=at)

    before = await _in_force(store)
    clock.set(at - timedelta(microseconds=1))
    just_before = await _in_force(store)
    clock.set(at)
    active = await store.get_active_pricing()

    assert (1, 1) == (before, just_before)
    assert active is not None
    assert (2, scheduled_id, at, "2") == (
        active.version,
        active.id,
        active.effective_at,
        active.config.models["_default"].split(" * ")[1],
    )


async def test_history_shows_when_each_version_takes_effect(
    store: CreditStore, clock: FakeClock
) -> None:
    """Each version lists its effective time, whether it is scheduled, and which is in force."""
    start = clock.now
    await store.set_active_pricing(_config("1"))
    later = start + timedelta(days=1)
    await store.set_active_pricing(_config("2"), effective_at=later)
    await store.set_active_pricing(_config("3"), effective_at=start + timedelta(days=2))

    history = await store.get_pricing_history()
    clock.set(later)
    moved = await store.get_pricing_history()

    assert [
        (3, start + timedelta(days=2), True, False),
        (2, later, True, False),
        (1, start, False, True),
    ] == [(h.version, h.effective_at, h.scheduled, h.active) for h in history]
    assert [(3, True, False), (2, False, True), (1, False, False)] == [
        (h.version, h.scheduled, h.active) for h in moved
    ]


async def test_the_latest_effective_version_wins_whatever_the_publication_order(
    store: CreditStore, clock: FakeClock
) -> None:
    """A version scheduled earlier but published later takes effect first, and gives way."""
    start = clock.now
    await store.set_active_pricing(_config("1"), effective_at=start + timedelta(hours=3))
    await store.set_active_pricing(_config("2"), effective_at=start + timedelta(hours=1))

    seen = []
    for hours in (0, 1, 2, 3, 4):
        clock.set(start + timedelta(hours=hours))
        seen.append(await _in_force(store))

    assert [None, 2, 2, 1, 1] == seen


async def test_a_past_or_present_effective_at_is_in_force_at_once(
    store: CreditStore, clock: FakeClock
) -> None:
    """Only a later instant schedules; an earlier one publishes now (effective from now)."""
    await store.set_active_pricing(_config("1"), effective_at=clock.now - timedelta(days=3))
    active = await store.get_active_pricing()

    assert active is not None
    assert (1, clock.now) == (active.version, active.effective_at)


async def test_an_immediate_publication_does_not_cancel_a_schedule(
    store: CreditStore, clock: FakeClock
) -> None:
    """A version published now is in force until an earlier-scheduled one takes effect."""
    at = clock.now + timedelta(hours=1)
    await store.set_active_pricing(_config("1"), effective_at=at)
    await store.set_active_pricing(_config("2"))

    now = await _in_force(store)
    clock.set(at)

    assert (2, 1) == (now, await _in_force(store))


async def test_a_rollback_holds_until_the_next_scheduled_version(
    store: CreditStore, clock: FakeClock
) -> None:
    """Activating an old version puts it in force now; a later schedule still takes effect."""
    await store.set_active_pricing(_config("1"))
    await store.set_active_pricing(_config("2"))
    at = clock.now + timedelta(hours=1)
    await store.set_active_pricing(_config("3"), effective_at=at)

    clock.advance(60)
    await store.activate_pricing(1)
    rolled_back = await _in_force(store)
    clock.set(at)

    assert (1, 3) == (rolled_back, await _in_force(store))


async def test_a_cancelled_version_never_takes_effect(store: CreditStore, clock: FakeClock) -> None:
    """Cancelling before the instant keeps the version in force; cancelling again is a no-op;
    a cancelled version cannot be activated."""
    await store.set_active_pricing(_config("1"))
    at = clock.now + timedelta(hours=1)
    await store.set_active_pricing(_config("2"), effective_at=at)
    clock.advance(10)

    cancelled = await store.cancel_pricing(2)
    again = await store.cancel_pricing(2)
    clock.set(at + timedelta(days=1))

    assert (2, clock.now - timedelta(days=1, hours=1) + timedelta(seconds=10)) == (
        cancelled.version,
        cancelled.cancelled_at,
    )
    assert again.cancelled_at == cancelled.cancelled_at
    assert 1 == await _in_force(store)
    with pytest.raises(PricingVersionInEffectError, match="version 2"):
        await store.activate_pricing(2)
    history = await store.get_pricing_history()
    assert [(2, False, cancelled.cancelled_at), (1, True, None)] == [
        (h.version, h.active, h.cancelled_at) for h in history
    ]


async def test_a_version_in_force_cannot_be_cancelled(store: CreditStore, clock: FakeClock) -> None:
    """Only a scheduled version can be cancelled: one in force, or that was, is refused and
    nothing changes."""
    await store.set_active_pricing(_config("1"))
    at = clock.now + timedelta(hours=1)
    await store.set_active_pricing(_config("2"), effective_at=at)
    await store.set_active_pricing(_config("3"), effective_at=at + timedelta(hours=1))
    await store.activate_pricing(3)  # early: in force now, so no longer cancellable

    for version in (1, 3):
        with pytest.raises(PricingVersionInEffectError, match=f"version {version}"):
            await store.cancel_pricing(version)
    clock.set(at)
    with pytest.raises(PricingVersionInEffectError):
        await store.cancel_pricing(2)
    with pytest.raises(NotFound):
        await store.cancel_pricing(4)

    assert [None, None, None] == [h.cancelled_at for h in await store.get_pricing_history()]


async def test_plans_follow_the_version_in_force(store: CreditStore, clock: FakeClock) -> None:
    """A plan only a scheduled version defines exists from its instant on."""
    await store.set_active_pricing(_config("1", "free"))
    at = clock.now + timedelta(hours=1)
    await store.set_active_pricing(_config("2", "free", "pro"), effective_at=at)

    with pytest.raises(InvalidArgumentError, match="plan_id"):
        await store.set_user_plan("u1", "pro")
    clock.set(at)
    await store.set_user_plan("u1", "pro")

    assert "Pro" == (await store.get_user_plan("u1")).plan_name


@pytest.mark.parametrize(
    ("value", "match"),
    [("tomorrow", "effective_at"), (0, "effective_at")],
)
async def test_a_bad_effective_at_is_refused_by_name(
    store: CreditStore, value: object, match: str
) -> None:
    """A non-datetime (or naive) `effective_at` names itself and publishes nothing."""
    with pytest.raises(InvalidArgumentError, match=match):
        await store.set_active_pricing(_config("1"), effective_at=value)  # type: ignore[arg-type]

    assert [] == await store.get_pricing_history()


# -- through a manager --------------------------------------------------------------------------


async def test_a_stream_across_a_price_switch_is_billed_at_one_price(
    store: CreditStore, user_id: str, clock: FakeClock
) -> None:
    """
    A manager prices each charge with the version in force when it is made: a stream held
    before a scheduled switch settles after it at the old price, a call made after it pays
    the new one, and each usage row names the version that priced it.
    """
    from ducto import CreditManager, UsageMetrics

    manager = CreditManager(store, clock=clock)
    await store.add_credits(user_id, 100_000, "purchase")
    await manager.publish_pricing({"models": {"_default": "input_tokens * 1"}})
    at = clock.now + timedelta(minutes=5)
    await manager.publish_pricing({"models": {"_default": "input_tokens * 3"}}, effective_at=at)
    chunk = UsageMetrics(model="m", input_tokens=10)

    async with manager.hold(user_id, UsageMetrics(model="m", input_tokens=50)) as stream:
        stream.record(chunk)
        clock.set(at)  # the price changes while the stream runs
        stream.record(chunk)
        streamed = await stream.settle()
    after = await manager.deduct(user_id, UsageMetrics(model="m", input_tokens=20))

    assert (20, 60) == (streamed.charged, after.charged)
    rows = [r for r in await all_rows(store, user_id) if r.type == "usage"]
    assert [1, 2] == [r.metadata["pricing_version"] for r in rows]
