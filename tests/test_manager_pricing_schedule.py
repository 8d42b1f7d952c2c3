"""CreditManager and scheduled pricing: the switch at the instant, one price per hold, refresh."""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
from tests._manager_support import usage_rows
from tests.conftest import FakeClock
from tests.test_auto_top_up import peer_stores

from ducto import CreditManager, PricingEngine, UsageMetrics
from ducto.errors import (
    PricingNotLoadedError,
    PricingVersionInEffectError,
    PricingVersionNotFoundError,
    StoreError,
)
from ducto.interface.base import CreditStore

pytestmark = pytest.mark.anyio


def _pricing(rate: int) -> dict[str, Any]:
    return {"models": {"_default": f"input_tokens * {rate}"}, "min_balance": 0}


V1, V2, V3 = _pricing(1), _pricing(2), _pricing(3)
CALL = UsageMetrics(model="m", input_tokens=10)
"""Costs 10 credits under V1, 20 under V2, 30 under V3."""
HOUR = timedelta(hours=1)


class Counting:
    """Forwards to a store, recording the name of every call; can slow or fail the reads
    of the pricing schedule."""

    def __init__(self, inner: CreditStore) -> None:
        self._inner = inner
        self.calls: list[str] = []
        self.history_delay = 0.0
        self.history_failures = 0

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._inner, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            if name == "get_pricing_history":
                if self.history_failures:
                    self.history_failures -= 1
                    raise StoreError("connection lost")
                if self.history_delay:
                    await anyio.sleep(self.history_delay)
            return await method(*args, **kwargs)

        return call

    def pricing_calls(self) -> list[str]:
        """The calls that read pricing."""
        return [name for name in self.calls if "pricing" in name]


async def _versions(store: CreditStore) -> dict[str | None, int]:
    """Version numbers by label."""
    return {item.label: item.version for item in await store.get_pricing_history()}


# -- the switch --------------------------------------------------------------------------------


async def test_a_scheduled_version_takes_effect_at_the_exact_instant(
    store: CreditStore, clock: FakeClock, user_id: str
) -> None:
    """A microsecond before effective_at the old prices apply; at effective_at the new."""
    manager = CreditManager(store, clock=clock)
    await manager.publish_pricing(V1, "v1")
    at = clock.now + HOUR
    await manager.publish_pricing(V2, "v2", effective_at=at)
    await manager.add_credits(user_id, 1000, "purchase")
    versions = await _versions(store)

    clock.set(at - timedelta(microseconds=1))
    before = await manager.deduct(user_id, CALL)
    version_before = manager.pricing_version
    clock.set(at)
    after = await manager.deduct(user_id, CALL)

    assert (10, 20) == (before.charged, after.charged)
    assert (versions["v1"], versions["v2"]) == (version_before, manager.pricing_version)
    rows = await usage_rows(store, user_id)
    assert [versions["v1"], versions["v2"]] == [row.metadata["pricing_version"] for row in rows]
    assert [] == manager.scheduled_pricing
    active = await store.get_active_pricing()
    assert active is not None
    assert versions["v2"] == active.version


async def test_every_pricing_call_follows_the_switch(
    store: CreditStore, clock: FakeClock, user_id: str
) -> None:
    """deduct_fixed, reserve_credits, calculate and the engine switch at the same instant."""
    manager = CreditManager(store, clock=clock)
    await manager.publish_pricing({**V1, "fixed": {"report": 5}}, "v1")
    at = clock.now + HOUR
    v2 = {**V2, "fixed": {"report": 7}, "min_balance": 3}
    await manager.publish_pricing(v2, "v2", effective_at=at)
    await manager.add_credits(user_id, 1000, "purchase")
    versions = await _versions(store)

    before = (manager.calculate(CALL).credits, manager.engine.min_balance)
    clock.set(at)
    fixed = await manager.deduct_fixed(user_id, "report")
    held = await manager.reserve_credits(user_id, CALL)

    assert (10, 0) == before
    assert (20, 3) == (manager.calculate(CALL).credits, manager.engine.min_balance)
    assert (7, 20) == (fixed.charged, held.amount)
    [row] = await usage_rows(store, user_id)
    assert (versions["v2"], "report") == (
        row.metadata["pricing_version"],
        row.metadata["fixed_job"],
    )


async def test_a_hold_is_billed_at_the_prices_in_force_when_it_was_placed(
    store: CreditStore, clock: FakeClock, user_id: str
) -> None:
    """A stream placed before a price change and settled after it pays the old price, as
    does one left without settling; a hold placed after the change pays the new price."""
    manager = CreditManager(store, clock=clock)
    await manager.publish_pricing(V1, "v1")
    at = clock.now + HOUR
    await manager.publish_pricing(V2, "v2", effective_at=at)
    await manager.add_credits(user_id, 1000, "purchase")
    versions = await _versions(store)

    clock.set(at - timedelta(seconds=1))
    async with manager.hold(user_id, CALL) as settled_hold:
        settled_hold.record(CALL)
        clock.set(at + timedelta(seconds=1))
        settled_hold.record(CALL)
        settled = await settled_hold.settle()
    clock.set(at - timedelta(seconds=1))
    async with manager.hold(user_id, CALL) as left_hold:
        left_hold.record(CALL + CALL)
        clock.set(at + timedelta(seconds=1))
    async with manager.hold(user_id, CALL) as new_hold:
        estimate = new_hold.estimate_credits
        new = await new_hold.settle(CALL)

    assert 20 == settled.charged
    assert left_hold.result is not None
    assert 20 == left_hold.result.charged
    assert (20, 20) == (estimate, new.charged)
    rows = await usage_rows(store, user_id)
    assert [versions["v1"], versions["v1"], versions["v2"]] == [
        row.metadata["pricing_version"] for row in rows
    ]


async def test_versions_scheduled_together_take_effect_in_order(
    store: CreditStore, clock: FakeClock, user_id: str
) -> None:
    """Several scheduled versions switch one after the other; a jump past both lands on the
    latest."""
    manager = CreditManager(store, clock=clock)
    await manager.publish_pricing(V1, "v1")
    start = clock.now
    await manager.publish_pricing(V3, "v3", effective_at=start + 2 * HOUR)
    await manager.publish_pricing(V2, "v2", effective_at=start + HOUR)
    versions = await _versions(store)

    scheduled = manager.scheduled_pricing
    clock.set(start + HOUR)
    second = manager.calculate(CALL).credits
    clock.set(start + 3 * HOUR)
    third = manager.calculate(CALL).credits
    other = CreditManager(store, clock=clock)
    await other.load_pricing_from_store()

    assert [(start + HOUR, versions["v2"]), (start + 2 * HOUR, versions["v3"])] == scheduled
    assert (20, 30) == (second, third)
    assert (versions["v3"], versions["v3"]) == (manager.pricing_version, other.pricing_version)


async def test_a_version_effective_now_or_earlier_is_in_force_at_once(
    store: CreditStore, clock: FakeClock
) -> None:
    """publish_pricing with an effective_at not after the clock publishes at once."""
    manager = CreditManager(store, clock=clock)
    await manager.publish_pricing(V1, "v1")
    await manager.publish_pricing_from_dict(V2, "v2", effective_at=clock.now - HOUR)

    assert 20 == manager.calculate(CALL).credits
    assert [] == manager.scheduled_pricing


# -- cancelling --------------------------------------------------------------------------------


async def test_a_cancelled_version_never_takes_effect(
    store: CreditStore, clock: FakeClock, user_id: str
) -> None:
    """A scheduled version cancelled before its time is never priced with."""
    manager = CreditManager(store, clock=clock)
    await manager.publish_pricing(V1, "v1")
    at = clock.now + HOUR
    await manager.publish_pricing(V2, "v2", effective_at=at)
    await manager.add_credits(user_id, 1000, "purchase")
    versions = await _versions(store)

    cancelled = await manager.cancel_pricing(versions["v2"])
    clock.set(at + HOUR)
    result = await manager.deduct(user_id, CALL)

    assert cancelled.cancelled_at is not None
    assert [] == manager.scheduled_pricing
    assert 10 == result.charged
    assert versions["v1"] == manager.pricing_version
    with pytest.raises(PricingVersionInEffectError):
        await manager.cancel_pricing(versions["v1"])
    with pytest.raises(PricingVersionNotFoundError):
        await manager.cancel_pricing(999)


async def test_a_version_another_process_cancels_never_takes_effect_here(
    store: CreditStore, clock: FakeClock, user_id: str, tmp_path: Path
) -> None:
    """A manager that knew of a scheduled version reads the schedule again when it falls
    due, so a cancellation by another process is honoured even within its refresh
    interval."""
    async with peer_stores(store, tmp_path, clock, 2) as (here, there):
        counting = Counting(here)
        manager = CreditManager(counting, clock=clock, pricing_refresh=24 * 3600)  # type: ignore[arg-type]
        other = CreditManager(there, clock=clock)
        await other.publish_pricing(V1, "v1")
        at = clock.now + HOUR
        await other.publish_pricing(V2, "v2", effective_at=at)
        await manager.load_pricing_from_store()
        await manager.add_credits(user_id, 1000, "purchase")
        known = manager.scheduled_pricing
        versions = await _versions(there)
        clock.advance(60)
        await other.cancel_pricing(versions["v2"])
        counting.calls.clear()
        clock.set(at)
        result = await manager.deduct(user_id, CALL)
        later = await manager.deduct(user_id, CALL)

    assert [(at, versions["v2"])] == known
    assert (10, 10) == (result.charged, later.charged)
    assert ["get_pricing_history"] == counting.pricing_calls()
    assert versions["v1"] == manager.pricing_version


# -- refreshing --------------------------------------------------------------------------------


async def test_a_version_another_process_publishes_is_seen_after_the_refresh_interval(
    store: CreditStore, clock: FakeClock, user_id: str, tmp_path: Path
) -> None:
    """A version published elsewhere is priced with once the refresh interval has passed,
    not before; one scheduled elsewhere is learnt the same way and switched to on time."""
    async with peer_stores(store, tmp_path, clock, 2) as (here, there):
        manager = CreditManager(here, clock=clock, pricing_refresh=60)
        other = CreditManager(there, clock=clock)
        await manager.publish_pricing(V1, "v1")
        await other.load_pricing_from_store()
        await manager.add_credits(user_id, 1000, "purchase")
        await other.publish_pricing(V2, "v2")

        at_once = await manager.deduct(user_id, CALL)
        clock.advance(59)
        just_before = await manager.deduct(user_id, CALL)
        clock.advance(1)
        refreshed = await manager.deduct(user_id, CALL)

        at = clock.now + HOUR
        await other.publish_pricing(V3, "v3", effective_at=at)
        unknown = manager.scheduled_pricing
        clock.advance(60)
        await manager.deduct(user_id, CALL)
        learnt = manager.scheduled_pricing
        clock.set(at)
        switched = await manager.deduct(user_id, CALL)
        versions = await _versions(there)

    assert (10, 10, 20) == (at_once.charged, just_before.charged, refreshed.charged)
    assert [] == unknown
    assert [(at, versions["v3"])] == learnt
    assert 30 == switched.charged


async def test_pricing_makes_no_store_call_per_charge(
    store: CreditStore, clock: FakeClock, user_id: str
) -> None:
    """Charges make no pricing call between refreshes, the switch included; a refresh that
    falls due while many charges run is made once."""
    counting = Counting(store)
    manager = CreditManager(counting, clock=clock, pricing_refresh=60)  # type: ignore[arg-type]
    await manager.publish_pricing(V1, "v1")
    await manager.publish_pricing(V2, "v2", effective_at=clock.now + timedelta(seconds=30))
    await manager.add_credits(user_id, 10_000, "purchase")
    counting.calls.clear()

    for _ in range(5):
        await manager.deduct(user_id, CALL)
    steady = list(counting.calls)
    counting.calls.clear()
    clock.advance(30)  # the switch: one read of the schedule, by one of the charges
    counting.history_delay = 0.05
    charged: list[int] = []

    async def charge() -> None:
        charged.append((await manager.deduct(user_id, CALL)).charged)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(charge)
    at_switch = counting.pricing_calls()
    counting.calls.clear()
    clock.advance(29)
    for _ in range(5):
        await manager.deduct(user_id, CALL)
    after_switch = counting.pricing_calls()
    clock.advance(31)
    await manager.deduct(user_id, CALL)
    await manager.deduct(user_id, CALL)

    assert ["charge_credits"] * 5 == steady
    assert ["get_pricing_history"] == at_switch
    assert [20] * 20 == charged
    assert [] == after_switch
    assert ["get_pricing_history"] == counting.pricing_calls()


async def test_a_failed_refresh_keeps_pricing_with_what_the_manager_knows(
    store: CreditStore, clock: FakeClock, user_id: str, caplog: pytest.LogCaptureFixture
) -> None:
    """When the schedule cannot be read, charges go on at the known prices, the known switch
    still happens on time, the failure is logged, and no charge retries it before the next
    interval."""
    counting = Counting(store)
    manager = CreditManager(counting, clock=clock, pricing_refresh=60)  # type: ignore[arg-type]
    await manager.publish_pricing(V1, "v1")
    start = clock.now
    await manager.publish_pricing(V2, "v2", effective_at=start + timedelta(seconds=120))
    await manager.add_credits(user_id, 1000, "purchase")
    counting.history_failures = 100
    counting.calls.clear()

    with caplog.at_level(logging.WARNING, logger="ducto.manager"):
        clock.set(start + timedelta(seconds=61))
        first = await manager.deduct(user_id, CALL)
        clock.set(start + timedelta(seconds=62))
        second = await manager.deduct(user_id, CALL)
        tried = counting.pricing_calls()
        clock.set(start + timedelta(seconds=120))
        switched = await manager.deduct(user_id, CALL)

    assert (10, 10, 20) == (first.charged, second.charged, switched.charged)
    assert ["get_pricing_history"] == tried
    assert ["get_pricing_history"] * 2 == counting.pricing_calls()
    failures = [r for r in caplog.records if "refreshing the pricing schedule failed" in r.message]
    assert 2 == len(failures)


async def test_load_pricing_from_store_loads_the_schedule(
    store: CreditStore, clock: FakeClock, user_id: str, tmp_path: Path
) -> None:
    """A manager that loads pricing learns the scheduled versions too and switches to them
    on time, even with refreshing off."""
    async with peer_stores(store, tmp_path, clock, 2) as (here, there):
        other = CreditManager(there, clock=clock)
        await other.publish_pricing(V1, "v1")
        at = clock.now + HOUR
        await other.publish_pricing(V2, "v2", effective_at=at)
        counting = Counting(here)
        manager = CreditManager(counting, clock=clock, pricing_refresh=None)  # type: ignore[arg-type]
        engine = await manager.load_pricing_from_store()
        await manager.add_credits(user_id, 1000, "purchase")
        counting.calls.clear()
        clock.set(at + 365 * 24 * HOUR)
        result = await manager.deduct(user_id, CALL)

    assert 10 == engine.calculate(CALL).credits
    assert 20 == result.charged
    assert [] == counting.pricing_calls()


async def test_an_engine_given_to_the_manager_is_used_until_pricing_is_loaded(
    store: CreditStore, clock: FakeClock, user_id: str
) -> None:
    """A manager built with an engine does not follow the store until it loads or publishes."""
    publisher = CreditManager(store, clock=clock)
    await publisher.publish_pricing(V2, "v2")
    manager = CreditManager(store, PricingEngine.from_dict(V1), clock=clock, pricing_refresh=1)
    await manager.add_credits(user_id, 1000, "purchase")

    clock.advance(3600)
    given = await manager.deduct(user_id, CALL)
    version = manager.pricing_version
    await manager.load_pricing_from_store()
    loaded = await manager.deduct(user_id, CALL)

    assert (10, None) == (given.charged, version)
    assert 20 == loaded.charged
    assert "pricing_version" not in (await usage_rows(store, user_id))[0].metadata


async def test_a_manager_following_an_empty_store_still_has_no_pricing(
    store: CreditStore, clock: FakeClock, user_id: str
) -> None:
    """load_pricing_from_store on an empty store raises, then a version published elsewhere
    is picked up by the next refresh."""
    manager = CreditManager(store, clock=clock, pricing_refresh=60)

    with pytest.raises(PricingNotLoadedError):
        await manager.load_pricing_from_store()
    await CreditManager(store, clock=clock).publish_pricing(V1, "v1")
    await manager.add_credits(user_id, 100, "purchase")
    with pytest.raises(PricingNotLoadedError):
        await manager.deduct(user_id, CALL)
    clock.advance(60)
    result = await manager.deduct(user_id, CALL)

    assert 10 == result.charged
