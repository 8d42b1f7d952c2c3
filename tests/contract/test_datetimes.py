"""Datetimes: naive inputs are local time, aware inputs any zone, every output aware UTC."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone

import pytest
from tests.conftest import FakeClock

from ducto.errors import InvalidArgumentError
from ducto.interface.base import CreditStore

pytestmark = pytest.mark.anyio

ZONES = {
    # POSIX TZ strings: no time zone database needed.
    "tokyo": ("JST-9", timedelta(hours=9)),
    "new_york": ("EST5EDT,M3.2.0,M11.1.0", timedelta(hours=-4)),  # EDT on 2026-03-15
}


@pytest.fixture(params=sorted(ZONES))
def local_offset(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[timedelta]:
    """Run the test with the process's local time zone set to Tokyo or New York."""
    tz, offset = ZONES[request.param]
    monkeypatch.setenv("TZ", tz)
    time.tzset()
    yield offset
    monkeypatch.undo()
    time.tzset()


def _local(moment: datetime, offset: timedelta) -> datetime:
    """The naive local wall time of an aware instant in the zone of `offset`."""
    return (moment + offset).replace(tzinfo=None)


async def test_naive_expires_at_is_local_time(
    store: CreditStore, user_id: str, clock: FakeClock, local_offset: timedelta
) -> None:
    """``datetime.now() + timedelta(hours=1)`` written as a naive local time means in one hour."""
    in_an_hour = _local(clock.now, local_offset) + timedelta(hours=1)

    result = await store.add_credits(user_id, 10, "purchase", expires_at=in_an_hour)
    (lot,) = await store.list_lots(user_id)

    assert clock.now + timedelta(hours=1) == result.expires_at == lot.expires_at
    assert lot.expires_at is not None
    assert timedelta(0) == lot.expires_at.utcoffset()
    clock.advance(hours=1)
    assert 0 == (await store.get_balance(user_id)).available


async def test_naive_past_expires_at_is_refused(
    store: CreditStore, user_id: str, clock: FakeClock, local_offset: timedelta
) -> None:
    """A naive local time one minute ago is in the past, wherever the process runs."""
    a_minute_ago = _local(clock.now, local_offset) - timedelta(minutes=1)

    with pytest.raises(InvalidArgumentError, match="expires_at must be in the future"):
        await store.add_credits(user_id, 10, "purchase", expires_at=a_minute_ago)

    assert 0 == (await store.get_balance(user_id)).balance


async def test_naive_team_expires_at_is_local_time(
    store: CreditStore, clock: FakeClock, local_offset: timedelta
) -> None:
    """A naive team top-up expiry is local time: the credits stop at that instant."""
    team = await store.create_team("research")
    expiry = clock.now + timedelta(minutes=30)
    await store.add_team_credits(team.team_id, 10, expires_at=_local(expiry, local_offset))
    clock.set(expiry - timedelta(seconds=1))
    before = await store.get_team_balance(team.team_id)
    clock.set(expiry)
    after = await store.get_team_balance(team.team_id)

    assert (10, 10) == (before.balance, before.available)
    assert (10, 0) == (after.balance, after.available)


async def test_naive_ledger_and_analytics_windows_are_local_time(
    store: CreditStore, user_id: str, clock: FakeClock, local_offset: timedelta
) -> None:
    """Naive window bounds of the ledger and the analytics are local instants."""
    await store.add_credits(user_id, 10, "purchase")
    hold = await store.reserve_credits(user_id, 1, "chat", min_balance=0)
    await store.deduct_credits(user_id, hold.reservation_id, 4)
    now = _local(clock.now, local_offset)

    inside = await store.list_transactions(user_id, start=now, end=now + timedelta(seconds=1))
    before = await store.list_transactions(user_id, end=now)
    spent = await store.spend_by_user(now, now + timedelta(seconds=1))
    earlier = await store.spend_by_user(now - timedelta(hours=1), now)

    assert 2 == len(inside.items)
    assert [] == before.items
    assert [(user_id, 4)] == [(row.user_id, row.total_spend) for row in spent]
    assert [] == earlier


async def test_aware_inputs_in_any_zone_are_converted(
    store: CreditStore, user_id: str, clock: FakeClock
) -> None:
    """An aware expiry in another zone is the same instant, returned in UTC."""
    zone = timezone(timedelta(hours=5, minutes=30))
    expiry = (clock.now + timedelta(hours=2)).astimezone(zone)

    result = await store.add_credits(user_id, 10, "purchase", expires_at=expiry)

    assert expiry == result.expires_at
    assert result.expires_at is not None
    assert UTC == result.expires_at.tzinfo


async def test_naive_extremes_are_refused_with_the_parameter_named(
    store: CreditStore, user_id: str, local_offset: timedelta
) -> None:
    """A naive local time outside UTC's range is an InvalidArgumentError, never OverflowError."""
    extreme = datetime.min if local_offset > timedelta(0) else datetime.max

    with pytest.raises(InvalidArgumentError, match="start"):
        await store.spend_by_model(extreme, datetime.now())
    with pytest.raises(InvalidArgumentError, match="expires_at"):
        await store.add_credits(user_id, 10, "purchase", expires_at=extreme)

    assert 0 == (await store.get_balance(user_id)).balance
