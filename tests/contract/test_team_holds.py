"""Team holds: reserve_team_credits, settled and released with team_id=, member caps."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import anyio
import pytest
from tests.conftest import FakeClock
from tests.contract._checks import all_team_rows, assert_invariants

from ducto.errors import ErrorCode
from ducto.interface.base import CreditStore
from ducto.interface.models import CreditMetadata, ReserveResult, SpendCap

pytestmark = pytest.mark.anyio


async def _team(store: CreditStore, pool: int, *members: tuple[str, int | None]) -> str:
    team = await store.create_team("research", pool)
    for user, cap in members:
        await store.add_team_member(team.team_id, user, spend_cap=cap)
    return team.team_id


async def _run_all(calls: list[Callable[[], Awaitable[None]]]) -> None:
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for call in calls:
                tg.start_soon(call)


async def test_a_team_hold_reserves_the_pool(store: CreditStore, user_id: str) -> None:
    """The hold lowers the pool's available credits and leaves the member's own account alone."""
    team_id = await _team(store, 100, (user_id, None))

    hold = await store.reserve_team_credits(team_id, user_id, 30, "chat", {"model": "m1"})
    pool = await store.get_team_balance(team_id)

    assert hold.ok
    assert (team_id, user_id, 30, 30, 100, 70) == (
        hold.team_id,
        hold.user_id,
        hold.amount,
        hold.requested,
        hold.balance,
        hold.available,
    )
    assert (100, 30, 70) == (pool.balance, pool.reserved, pool.available)
    assert 0 == (await store.get_balance(user_id)).balance
    assert [] == [r for r in await all_team_rows(store, team_id) if r.type != "team_topup"]


async def test_settling_a_team_hold_charges_the_pool_for_the_member(
    store: CreditStore, user_id: str, clock: FakeClock
) -> None:
    """The settlement is a team_usage row on the pool, counted as the member's spend."""
    team_id = await _team(store, 100, (user_id, None))
    hold = await store.reserve_team_credits(team_id, user_id, 30, "chat", {"model": "m1"})

    settled = await store.deduct_credits(
        user_id,
        hold.reservation_id,
        25,
        "req-1",
        CreditMetadata(reference_id="r1"),
        team_id=team_id,
    )
    pool = await store.get_team_balance(team_id)
    rows = await all_team_rows(store, team_id)
    (member,) = await store.get_team_members(team_id)
    spend = await store.spend_by_user(clock.now, datetime(2027, 1, 1, tzinfo=UTC))

    assert settled.ok
    assert (team_id, user_id, -25, 25, 75, 75) == (
        settled.team_id,
        settled.user_id,
        settled.amount,
        settled.charged,
        settled.balance_after,
        settled.available,
    )
    assert (75, 0, 75) == (pool.balance, pool.reserved, pool.available)
    assert ("team_usage", -25, hold.reservation_id) == (
        rows[-1].type,
        rows[-1].amount,
        rows[-1].reservation_id,
    )
    assert {"model": "m1", "user_id": user_id, "operation_type": "chat", "reference_id": "r1"} == {
        k: rows[-1].metadata[k] for k in ("model", "user_id", "operation_type", "reference_id")
    }
    assert 25 == member.total_spent
    assert [(user_id, 25)] == [(r.user_id, r.total_spend) for r in spend]
    assert 0 == (await store.get_balance(user_id)).balance


async def test_a_team_hold_overrun_is_charged_in_full(store: CreditStore, user_id: str) -> None:
    """Like any hold, the actual cost is charged in full, even past the pool (shortfall)."""
    team_id = await _team(store, 50, (user_id, None))
    hold = await store.reserve_team_credits(team_id, user_id, 40, "chat")

    settled = await store.deduct_credits(user_id, hold.reservation_id, 70, team_id=team_id)

    assert (-70, -20, 20) == (settled.amount, settled.balance_after, settled.shortfall)
    assert -20 == (await store.get_team_balance(team_id)).balance
    refused = await store.reserve_team_credits(team_id, user_id, 1, "chat")
    assert ErrorCode.INSUFFICIENT_TEAM_BALANCE == refused.error


async def test_releasing_a_team_hold_frees_the_pool(store: CreditStore, user_id: str) -> None:
    """Release frees the hold; twice is fine; a settled or released hold behaves as a user's."""
    team_id = await _team(store, 100, (user_id, None))
    first = await store.reserve_team_credits(team_id, user_id, 30, "chat")
    second = await store.reserve_team_credits(team_id, user_id, 20, "chat")
    await store.deduct_credits(user_id, second.reservation_id, 5, team_id=team_id)

    released = await store.release_reservation(user_id, first.reservation_id, team_id=team_id)
    again = await store.release_reservation(user_id, first.reservation_id, team_id=team_id)
    settled = await store.release_reservation(user_id, second.reservation_id, team_id=team_id)
    late = await store.deduct_credits(user_id, first.reservation_id, 5, team_id=team_id)

    assert (True, 30, team_id) == (released.released, released.amount, released.team_id)
    assert (True, True) == (again.ok, again.released)
    assert ErrorCode.RESERVATION_ALREADY_SETTLED == settled.error
    assert ErrorCode.RESERVATION_RELEASED == late.error
    assert (95, 0, 95) == (
        (pool := await store.get_team_balance(team_id)).balance,
        pool.reserved,
        pool.available,
    )


async def test_a_team_hold_belongs_to_its_member_and_pool(
    store: CreditStore, user_id: str, other_user_id: str
) -> None:
    """Another member, the user's own account, or no team id cannot settle or release it."""
    team_id = await _team(store, 100, (user_id, None), (other_user_id, None))
    hold = await store.reserve_team_credits(team_id, user_id, 30, "chat")
    rid = hold.reservation_id

    attempts = [
        await store.deduct_credits(other_user_id, rid, 5, team_id=team_id),
        await store.deduct_credits(user_id, rid, 5),
        await store.release_reservation(other_user_id, rid, team_id=team_id),
        await store.release_reservation(user_id, rid),
    ]

    assert [ErrorCode.RESERVATION_NOT_FOUND] * 4 == [r.error for r in attempts]
    assert 30 == (await store.get_team_balance(team_id)).reserved


async def test_team_hold_refusals_in_order(
    store: CreditStore, user_id: str, other_user_id: str
) -> None:
    """team_not_found, user_not_in_team, insufficient_team_balance, then the member's cap."""
    team_id = await _team(store, 100, (user_id, 40))
    await store.reserve_team_credits(team_id, user_id, 30, "chat")

    results = [
        await store.reserve_team_credits("team-nope", user_id, 5, "chat"),
        await store.reserve_team_credits(team_id, other_user_id, 5, "chat"),
        await store.reserve_team_credits(team_id, user_id, 71, "chat"),
        await store.reserve_team_credits(team_id, user_id, 11, "chat"),
    ]

    assert [
        ErrorCode.TEAM_NOT_FOUND,
        ErrorCode.USER_NOT_IN_TEAM,
        ErrorCode.INSUFFICIENT_TEAM_BALANCE,
        ErrorCode.SPEND_CAP_EXCEEDED,
    ] == [r.error for r in results]
    assert (40, 0, 30) == (results[3].cap_limit, results[3].cap_spend, results[3].cap_reserved)
    assert all(0 == r.amount for r in results)
    assert (await store.reserve_team_credits(team_id, user_id, 10, "chat")).ok


async def test_member_cap_counts_spend_and_open_holds(store: CreditStore, user_id: str) -> None:
    """A member's cap counts this month's team spend plus its open team holds, for holds and
    for deduct_team alike; a released hold stops counting."""
    team_id = await _team(store, 1000, (user_id, 50))
    await store.deduct_team(team_id, user_id, 20)
    hold = await store.reserve_team_credits(team_id, user_id, 25, "chat")

    over_hold = await store.reserve_team_credits(team_id, user_id, 6, "chat")
    over_charge = await store.deduct_team(team_id, user_id, 6)
    await store.release_reservation(user_id, hold.reservation_id, team_id=team_id)
    fits = await store.deduct_team(team_id, user_id, 30)

    assert (ErrorCode.SPEND_CAP_EXCEEDED, ErrorCode.SPEND_CAP_EXCEEDED) == (
        over_hold.error,
        over_charge.error,
    )
    assert fits.ok


async def test_a_lapsed_team_hold_stops_counting(
    store: CreditStore, user_id: str, clock: FakeClock
) -> None:
    """Past its TTL a team hold no longer counts toward the pool or the cap, yet can settle."""
    team_id = await _team(store, 100, (user_id, 40))
    hold = await store.reserve_team_credits(team_id, user_id, 40, "chat", ttl=10)
    clock.advance(seconds=11)

    pool = await store.get_team_balance(team_id)
    another = await store.reserve_team_credits(team_id, user_id, 30, "chat")
    settled = await store.deduct_credits(user_id, hold.reservation_id, 10, team_id=team_id)

    assert (0, 100) == (pool.reserved, pool.available)
    assert another.ok
    assert (True, 90) == (settled.ok, settled.balance_after)


async def test_team_hold_keys_replay(store: CreditStore, user_id: str) -> None:
    """A retried hold and a retried settlement replay; a reused key conflicts."""
    team_id = await _team(store, 100, (user_id, None))
    hold = await store.reserve_team_credits(team_id, user_id, 30, "chat", idempotency_key="req")
    again = await store.reserve_team_credits(team_id, user_id, 30, "chat", idempotency_key="req")
    other = await store.reserve_team_credits(team_id, user_id, 31, "chat", idempotency_key="req")
    settle = await store.deduct_credits(user_id, hold.reservation_id, 9, "req", team_id=team_id)
    resettle = await store.deduct_credits(user_id, hold.reservation_id, 9, "req", team_id=team_id)

    assert (True, hold.reservation_id) == (again.idempotent, again.reservation_id)
    assert ErrorCode.IDEMPOTENCY_CONFLICT == other.error
    assert (True, settle.transaction_id) == (resettle.idempotent, resettle.transaction_id)
    assert (91, 0) == ((p := await store.get_team_balance(team_id)).balance, p.reserved)


async def test_refunding_a_team_hold_settlement(store: CreditStore, user_id: str) -> None:
    """A refund goes back to the pool and off the member's monthly spend."""
    team_id = await _team(store, 100, (user_id, 50))
    hold = await store.reserve_team_credits(team_id, user_id, 30, "chat")
    settled = await store.deduct_credits(user_id, hold.reservation_id, 30, team_id=team_id)

    refund = await store.refund_credits(settled.transaction_id, 10)
    (member,) = await store.get_team_members(team_id)

    assert (True, team_id, user_id, 10) == (
        refund.ok,
        refund.team_id,
        refund.user_id,
        refund.amount,
    )
    assert (80, 20) == ((await store.get_team_balance(team_id)).balance, member.total_spent)


async def test_team_holds_feed_the_members_user_caps(store: CreditStore, user_id: str) -> None:
    """Settled team usage counts toward the member's own spend caps, as deduct_team does."""
    team_id = await _team(store, 100, (user_id, None))
    await store.set_spend_cap(SpendCap(user_id=user_id, cap_type="daily", limit=30))
    hold = await store.reserve_team_credits(team_id, user_id, 25, "chat")
    await store.deduct_credits(user_id, hold.reservation_id, 25, team_id=team_id)

    check = await store.check_spend_cap(user_id, amount=10)

    assert (True, 25) == (check.capped, check.current_spend)


async def test_members_racing_a_pool_never_overspend_it(store: CreditStore) -> None:
    """50 members each holding 1 credit from a pool of 10: exactly 10 holds are placed."""
    users = [f"racer-{n}" for n in range(50)]
    team_id = await _team(store, 10, *((u, None) for u in users))
    results: list[ReserveResult] = []

    async def hold(user: str) -> None:
        results.append(await store.reserve_team_credits(team_id, user, 1, "chat"))

    await _run_all([lambda u=u: hold(u) for u in users])

    assert 10 == sum(r.ok for r in results)
    assert {ErrorCode.INSUFFICIENT_TEAM_BALANCE} == {r.error for r in results if not r.ok}
    assert (10, 0) == ((p := await store.get_team_balance(team_id)).reserved, p.available)


async def test_a_member_racing_its_cap_never_passes_it(store: CreditStore, user_id: str) -> None:
    """50 concurrent 1-credit holds by a member capped at 10: exactly 10 are placed, and the
    pool's other members are not held back."""
    team_id = await _team(store, 1000, (user_id, 10), ("free-member", None))
    results: list[ReserveResult] = []

    async def hold() -> None:
        results.append(await store.reserve_team_credits(team_id, user_id, 1, "chat"))

    await _run_all([hold] * 50)

    assert 10 == sum(r.ok for r in results)
    assert {ErrorCode.SPEND_CAP_EXCEEDED} == {r.error for r in results if not r.ok}
    assert (await store.reserve_team_credits(team_id, "free-member", 500, "chat")).ok


async def test_concurrent_settles_of_one_team_hold_charge_once(
    store: CreditStore, user_id: str
) -> None:
    """50 concurrent retries of one keyed settlement write one team_usage row."""
    team_id = await _team(store, 100, (user_id, None))
    hold = await store.reserve_team_credits(team_id, user_id, 30, "chat")
    results = []

    async def settle() -> None:
        results.append(
            await store.deduct_credits(user_id, hold.reservation_id, 12, "k", team_id=team_id)
        )

    await _run_all([settle] * 50)

    assert 1 == sum(r.ok and not r.idempotent for r in results)
    assert all(r.ok for r in results)
    assert 1 == sum(r.type == "team_usage" for r in await all_team_rows(store, team_id))
    assert 88 == (await store.get_team_balance(team_id)).balance


async def test_cancelled_team_holds_leave_consistent_books(
    store: CreditStore, user_id: str
) -> None:
    """Team holds and settlements cancelled at random: every hold is accounted for."""
    team_id = await _team(store, 10_000, (user_id, None))
    placed: list[str] = []

    async def flow(n: int) -> None:
        with anyio.move_on_after((n % 5) * 0.0004):
            hold = await store.reserve_team_credits(
                team_id, user_id, 10, "chat", idempotency_key=f"h{n}"
            )
            placed.append(hold.reservation_id)
            await store.deduct_credits(user_id, hold.reservation_id, 7, f"s{n}", team_id=team_id)

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for n in range(60):
                tg.start_soon(flow, n)

    rows = await all_team_rows(store, team_id)
    usage = [r for r in rows if r.type == "team_usage"]
    pool = await store.get_team_balance(team_id)
    open_holds = 0
    for n in range(60):
        again = await store.reserve_team_credits(
            team_id, user_id, 10, "chat", idempotency_key=f"h{n}"
        )
        if again.idempotent and not any(r.reservation_id == again.reservation_id for r in usage):
            open_holds += 1
    running = 0
    for row in rows:
        running += row.amount
        assert running == row.balance_after
    assert (running, 10 * open_holds) == (pool.balance, pool.reserved)
    assert 10_000 - 7 * len(usage) == pool.balance
    await assert_invariants(store, user_id)
