"""Teams: pools, members, top-ups, team deductions, member caps and team refunds."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from tests.conftest import FakeClock
from tests.contract._checks import all_rows, assert_invariants

from ducto.errors import ErrorCode
from ducto.interface.base import CreditStore
from ducto.interface.models import CreditMetadata, SpendCap

pytestmark = pytest.mark.anyio


async def _team(store: CreditStore, balance: int, *members: tuple[str, int | None]) -> str:
    """Create a team with `balance` and the given (user id, monthly cap) members."""
    team = await store.create_team("research", balance)
    for member_id, cap in members:
        added = await store.add_team_member(team.team_id, member_id, spend_cap=cap)
        assert added.ok
    return team.team_id


async def _team_balance(store: CreditStore, team_id: str) -> int:
    result = await store.get_team_balance(team_id)
    assert result.ok
    return result.balance


async def _spent(store: CreditStore, team_id: str) -> dict[str, int]:
    return {m.user_id: m.total_spent for m in await store.get_team_members(team_id)}


async def test_create_team_without_initial_balance(store: CreditStore) -> None:
    """A new team has its name, an empty pool, no members and no ledger row."""
    created = await store.create_team("research")
    balance = await store.get_team_balance(created.team_id)

    assert "" != created.team_id
    assert ("research", 0, None) == (created.name, created.balance, created.transaction_id)
    assert balance.ok
    assert (created.team_id, "research", 0, 0, 0) == (
        balance.team_id,
        balance.name,
        balance.balance,
        balance.member_count,
        balance.available,
    )
    assert [] == await store.get_team_members(created.team_id)


async def test_create_team_with_initial_balance(store: CreditStore) -> None:
    """An initial balance is a team top-up with its own transaction."""
    created = await store.create_team("research", 500)
    balance = await store.get_team_balance(created.team_id)

    assert 500 == created.balance
    assert created.transaction_id is not None
    assert (500, 500) == (balance.balance, balance.available)


async def test_teams_with_the_same_name_are_distinct(store: CreditStore) -> None:
    """Each create_team call makes a new team, whatever its name."""
    first = await store.create_team("research", 10)
    second = await store.create_team("research", 20)

    assert first.team_id != second.team_id
    assert 10 == await _team_balance(store, first.team_id)
    assert 20 == await _team_balance(store, second.team_id)


async def test_add_team_member_records_role_and_cap(
    store: CreditStore, user_id: str, other_user_id: str
) -> None:
    """Members are listed with their role, cap and zero spend."""
    team_id = (await store.create_team("research", 100)).team_id
    added = await store.add_team_member(team_id, user_id, "admin", 50)
    await store.add_team_member(team_id, other_user_id)
    listed = await store.get_team_members(team_id)

    members = {m.user_id: (m.role, m.spend_cap, m.total_spent) for m in listed}

    assert (team_id, user_id, "admin", 50) == (
        added.team_id,
        added.user_id,
        added.role,
        added.spend_cap,
    )
    assert {user_id: ("admin", 50, 0), other_user_id: ("member", None, 0)} == members
    assert 2 == (await store.get_team_balance(team_id)).member_count


async def test_add_team_member_again_updates_role_and_cap(store: CreditStore, user_id: str) -> None:
    """Re-adding a member replaces its role and cap instead of adding it twice."""
    team_id = await _team(store, 100, (user_id, 50))
    updated = await store.add_team_member(team_id, user_id, "owner", None)
    members = await store.get_team_members(team_id)

    assert ("owner", None) == (updated.role, updated.spend_cap)
    assert [(user_id, "owner", None)] == [(m.user_id, m.role, m.spend_cap) for m in members]
    assert 1 == (await store.get_team_balance(team_id)).member_count


async def test_add_member_to_unknown_team_is_team_not_found(
    store: CreditStore, user_id: str
) -> None:
    """Members can only join teams that exist."""
    result = await store.add_team_member("team-does-not-exist", user_id)

    assert ErrorCode.TEAM_NOT_FOUND == result.error
    assert [] == await store.get_team_members("team-does-not-exist")


async def test_remove_team_member(store: CreditStore, user_id: str, other_user_id: str) -> None:
    """Removing a member reports removed; removing a non-member reports not removed."""
    team_id = await _team(store, 100, (user_id, None), (other_user_id, None))

    removed = await store.remove_team_member(team_id, user_id)
    again = await store.remove_team_member(team_id, user_id)

    assert (True, True) == (removed.ok, removed.removed)
    assert (True, False) == (again.ok, again.removed)
    assert [other_user_id] == [m.user_id for m in await store.get_team_members(team_id)]


async def test_remove_member_of_unknown_team_is_team_not_found(
    store: CreditStore, user_id: str
) -> None:
    """Removing from a team that does not exist is team_not_found."""
    result = await store.remove_team_member("team-does-not-exist", user_id)

    assert ErrorCode.TEAM_NOT_FOUND == result.error
    assert not result.removed


async def test_removed_member_can_no_longer_spend(store: CreditStore, user_id: str) -> None:
    """After removal the user is not in the team."""
    team_id = await _team(store, 100, (user_id, None))
    await store.remove_team_member(team_id, user_id)

    result = await store.deduct_team(team_id, user_id, 10)

    assert ErrorCode.USER_NOT_IN_TEAM == result.error
    assert 100 == await _team_balance(store, team_id)


async def test_unknown_team_balance_is_team_not_found(store: CreditStore) -> None:
    """Reading a team that does not exist is team_not_found."""
    result = await store.get_team_balance("team-does-not-exist")

    assert ErrorCode.TEAM_NOT_FOUND == result.error


async def test_add_team_credits_tops_up_the_pool(store: CreditStore) -> None:
    """A top-up grows the team balance and reports it."""
    team_id = (await store.create_team("research", 100)).team_id
    result = await store.add_team_credits(team_id, 50, {"reference_id": "inv-1"})

    assert result.ok
    assert "" != result.transaction_id
    assert (team_id, 50, 150) == (result.team_id, result.amount, result.team_balance_after)
    assert 150 == await _team_balance(store, team_id)


async def test_add_team_credits_to_unknown_team_is_team_not_found(store: CreditStore) -> None:
    """Topping up a team that does not exist is team_not_found."""
    result = await store.add_team_credits("team-does-not-exist", 50)

    assert ErrorCode.TEAM_NOT_FOUND == result.error


async def test_idempotent_team_top_up_replays(store: CreditStore) -> None:
    """A top-up repeated with its key returns the original and tops up once."""
    team_id = (await store.create_team("research")).team_id
    first = await store.add_team_credits(team_id, 50, idempotency_key="inv-1")
    second = await store.add_team_credits(team_id, 50, idempotency_key="inv-1")

    assert not first.idempotent
    assert second.idempotent
    assert first.transaction_id == second.transaction_id
    assert 50 == await _team_balance(store, team_id)


async def test_idempotent_team_top_up_with_different_request_conflicts(
    store: CreditStore, clock: FakeClock
) -> None:
    """A top-up key reused with another amount or expiry is idempotency_conflict."""
    team_id = (await store.create_team("research")).team_id
    await store.add_team_credits(team_id, 50, idempotency_key="inv-1")

    other_amount = await store.add_team_credits(team_id, 51, idempotency_key="inv-1")
    other_expiry = await store.add_team_credits(
        team_id, 50, expires_at=clock.now + timedelta(days=1), idempotency_key="inv-1"
    )

    assert ErrorCode.IDEMPOTENCY_CONFLICT == other_amount.error
    assert ErrorCode.IDEMPOTENCY_CONFLICT == other_expiry.error
    assert 50 == await _team_balance(store, team_id)


async def test_team_top_up_keys_are_scoped_per_team(store: CreditStore) -> None:
    """The same top-up key on two teams tops up both."""
    first = (await store.create_team("a")).team_id
    second = (await store.create_team("b")).team_id
    await store.add_team_credits(first, 50, idempotency_key="inv-1")
    result = await store.add_team_credits(second, 50, idempotency_key="inv-1")

    assert result.ok
    assert not result.idempotent
    assert 50 == await _team_balance(store, second)


async def test_deduct_team_charges_the_pool_not_the_user(store: CreditStore, user_id: str) -> None:
    """A team deduction lowers the team balance and leaves the member's own account alone."""
    await store.add_credits(user_id, 20, "purchase")
    team_id = await _team(store, 100, (user_id, None))

    result = await store.deduct_team(team_id, user_id, 30, {"model": "m1"})

    assert result.ok
    assert "" != result.transaction_id
    assert (team_id, user_id, -30, 30, 70, 70) == (
        result.team_id,
        result.user_id,
        result.amount,
        result.charged,
        result.team_balance_after,
        result.available,
    )
    assert 70 == await _team_balance(store, team_id)
    assert 20 == (await store.get_balance(user_id)).balance
    assert ["purchase"] == [r.type for r in await all_rows(store, user_id)]
    await assert_invariants(store, user_id)


async def test_deduct_team_may_empty_the_pool_but_not_overdraw(
    store: CreditStore, user_id: str
) -> None:
    """A team can spend its whole balance; one credit more is insufficient_team_balance."""
    team_id = await _team(store, 100, (user_id, None))
    refused = await store.deduct_team(team_id, user_id, 101)
    accepted = await store.deduct_team(team_id, user_id, 100)
    after = await store.deduct_team(team_id, user_id, 1)

    assert ErrorCode.INSUFFICIENT_TEAM_BALANCE == refused.error
    assert accepted.ok
    assert ErrorCode.INSUFFICIENT_TEAM_BALANCE == after.error
    assert 0 == await _team_balance(store, team_id)


async def test_deduct_team_on_unknown_team_is_team_not_found(
    store: CreditStore, user_id: str
) -> None:
    """The team is checked first: an unknown team is team_not_found."""
    result = await store.deduct_team("team-does-not-exist", user_id, 10, idempotency_key="k")

    assert ErrorCode.TEAM_NOT_FOUND == result.error


async def test_deduct_team_checks_idempotency_before_membership(
    store: CreditStore, user_id: str, other_user_id: str
) -> None:
    """A used key with another member is idempotency_conflict, even for a non-member."""
    team_id = await _team(store, 100, (user_id, None))
    await store.deduct_team(team_id, user_id, 10, idempotency_key="job-1")

    result = await store.deduct_team(team_id, other_user_id, 10, idempotency_key="job-1")

    assert ErrorCode.IDEMPOTENCY_CONFLICT == result.error
    assert 90 == await _team_balance(store, team_id)


async def test_deduct_team_checks_membership_before_balance(
    store: CreditStore, user_id: str
) -> None:
    """A non-member asking for more than the pool holds is user_not_in_team."""
    team_id = (await store.create_team("research", 10)).team_id

    result = await store.deduct_team(team_id, user_id, 1000)

    assert ErrorCode.USER_NOT_IN_TEAM == result.error


async def test_deduct_team_checks_balance_before_the_member_cap(
    store: CreditStore, user_id: str
) -> None:
    """An amount over both the pool and the member's cap is insufficient_team_balance."""
    team_id = await _team(store, 10, (user_id, 5))

    result = await store.deduct_team(team_id, user_id, 20)

    assert ErrorCode.INSUFFICIENT_TEAM_BALANCE == result.error


async def test_member_cap_allows_exactly_the_limit(store: CreditStore, user_id: str) -> None:
    """A member may spend up to its monthly cap; one credit past it is spend_cap_exceeded."""
    team_id = await _team(store, 1000, (user_id, 50))
    await store.deduct_team(team_id, user_id, 40)

    refused = await store.deduct_team(team_id, user_id, 11)
    accepted = await store.deduct_team(team_id, user_id, 10)
    after = await store.deduct_team(team_id, user_id, 1)

    assert ErrorCode.SPEND_CAP_EXCEEDED == refused.error
    assert (50, 40) == (refused.cap_limit, refused.cap_spend)
    assert accepted.ok
    assert ErrorCode.SPEND_CAP_EXCEEDED == after.error
    assert 950 == await _team_balance(store, team_id)
    assert {user_id: 50} == await _spent(store, team_id)


async def test_member_cap_of_zero_refuses_everything(store: CreditStore, user_id: str) -> None:
    """A member with a cap of zero cannot spend from the team."""
    team_id = await _team(store, 1000, (user_id, 0))

    result = await store.deduct_team(team_id, user_id, 1)

    assert ErrorCode.SPEND_CAP_EXCEEDED == result.error


async def test_member_caps_are_per_member(
    store: CreditStore, user_id: str, other_user_id: str
) -> None:
    """One member's spend does not use another member's cap."""
    team_id = await _team(store, 1000, (user_id, 50), (other_user_id, 50))
    await store.deduct_team(team_id, user_id, 50)

    result = await store.deduct_team(team_id, other_user_id, 50)

    assert result.ok
    assert {user_id: 50, other_user_id: 50} == await _spent(store, team_id)


async def test_member_cap_resets_next_utc_month(
    store: CreditStore, user_id: str, clock: FakeClock
) -> None:
    """The member cap counts the current UTC month only."""
    team_id = await _team(store, 1000, (user_id, 50))
    await store.deduct_team(team_id, user_id, 50)
    clock.set(datetime(2026, 3, 31, 23, 59, 59, tzinfo=UTC))
    late_march = await store.deduct_team(team_id, user_id, 1)
    clock.set(datetime(2026, 4, 1, tzinfo=UTC))
    spent_in_april = await _spent(store, team_id)
    april = await store.deduct_team(team_id, user_id, 50)

    assert ErrorCode.SPEND_CAP_EXCEEDED == late_march.error
    assert {user_id: 0} == spent_in_april
    assert april.ok
    assert {user_id: 50} == await _spent(store, team_id)


async def test_idempotent_team_deduct_replays(store: CreditStore, user_id: str) -> None:
    """A team deduction repeated with its key returns the original and charges once."""
    team_id = await _team(store, 100, (user_id, None))
    first = await store.deduct_team(team_id, user_id, 30, idempotency_key="job-1")
    second = await store.deduct_team(team_id, user_id, 30, idempotency_key="job-1")

    assert not first.idempotent
    assert second.idempotent
    assert first.transaction_id == second.transaction_id
    assert 70 == await _team_balance(store, team_id)
    assert {user_id: 30} == await _spent(store, team_id)


async def test_idempotent_team_deduct_with_other_amount_conflicts(
    store: CreditStore, user_id: str
) -> None:
    """A team deduction key reused with another amount is idempotency_conflict."""
    team_id = await _team(store, 100, (user_id, None))
    await store.deduct_team(team_id, user_id, 30, idempotency_key="job-1")

    result = await store.deduct_team(team_id, user_id, 31, idempotency_key="job-1")

    assert ErrorCode.IDEMPOTENCY_CONFLICT == result.error
    assert 70 == await _team_balance(store, team_id)


async def test_refused_team_deduct_does_not_consume_its_key(
    store: CreditStore, user_id: str
) -> None:
    """A team deduction refused for lack of balance can be retried with its key after a top-up."""
    team_id = await _team(store, 10, (user_id, None))
    refused = await store.deduct_team(team_id, user_id, 30, idempotency_key="job-1")
    await store.add_team_credits(team_id, 50)
    retried = await store.deduct_team(team_id, user_id, 30, idempotency_key="job-1")

    assert ErrorCode.INSUFFICIENT_TEAM_BALANCE == refused.error
    assert retried.ok
    assert not retried.idempotent
    assert 30 == await _team_balance(store, team_id)


async def test_get_team_members_reports_net_spend_this_month(
    store: CreditStore, user_id: str, other_user_id: str, clock: FakeClock
) -> None:
    """total_spent is each member's team spend this UTC month, net of refunds."""
    team_id = await _team(store, 1000, (user_id, None), (other_user_id, None))
    await store.deduct_team(team_id, user_id, 100)
    clock.set(datetime(2026, 4, 2, tzinfo=UTC))
    first = await store.deduct_team(team_id, user_id, 30)
    await store.deduct_team(team_id, other_user_id, 20)
    await store.refund_credits(first.transaction_id, 10)

    assert {user_id: 20, other_user_id: 20} == await _spent(store, team_id)


async def test_team_refund_goes_back_to_the_team(store: CreditStore, user_id: str) -> None:
    """Refunding team usage credits the team pool, not the member, and frees cap headroom."""
    team_id = await _team(store, 100, (user_id, 40))
    usage = await store.deduct_team(team_id, user_id, 40)

    refund = await store.refund_credits(usage.transaction_id, 15)
    accepted = await store.deduct_team(team_id, user_id, 15)

    assert refund.ok
    assert (team_id, user_id, 15, 75, 25) == (
        refund.team_id,
        refund.user_id,
        refund.amount,
        refund.new_balance,
        refund.refundable,
    )
    assert accepted.ok
    assert 60 == await _team_balance(store, team_id)
    assert 0 == (await store.get_balance(user_id)).balance
    assert [] == await all_rows(store, user_id)


async def test_team_usage_refund_is_cumulative_and_bounded(
    store: CreditStore, user_id: str
) -> None:
    """Team usage refunds follow the same rules as user usage refunds."""
    team_id = await _team(store, 100, (user_id, None))
    usage = await store.deduct_team(team_id, user_id, 40)

    over = await store.refund_credits(usage.transaction_id, 41)
    whole = await store.refund_credits(usage.transaction_id)
    again = await store.refund_credits(usage.transaction_id)

    assert ErrorCode.OVER_REFUND == over.error
    assert 40 == whole.amount
    assert ErrorCode.ALREADY_REFUNDED == again.error
    assert 100 == await _team_balance(store, team_id)


async def test_team_top_up_is_not_refundable(store: CreditStore) -> None:
    """A team top-up is not a usage debit."""
    created = await store.create_team("research", 100)
    assert created.transaction_id is not None

    result = await store.refund_credits(created.transaction_id)

    assert ErrorCode.NOT_REFUNDABLE == result.error


async def test_team_usage_counts_toward_the_members_user_caps(
    store: CreditStore, user_id: str
) -> None:
    """A member's team spend counts in the member's own daily window for user spend caps."""
    await store.add_credits(user_id, 1000, "purchase")
    await store.set_spend_cap(SpendCap(user_id=user_id, cap_type="daily", limit=50))
    team_id = await _team(store, 1000, (user_id, None))
    await store.deduct_team(team_id, user_id, 45)

    refused = await store.reserve_credits(user_id, 6, "chat", min_balance=0)
    accepted = await store.reserve_credits(user_id, 5, "chat", min_balance=0)
    check = await store.check_spend_cap(user_id)

    assert ErrorCode.SPEND_CAP_EXCEEDED == refused.error
    assert 45 == refused.cap_spend
    assert accepted.ok
    assert 45 == check.current_spend
    await assert_invariants(store, user_id)


async def test_team_usage_counts_toward_the_members_model_caps(
    store: CreditStore, user_id: str
) -> None:
    """Team usage naming a model counts toward the member's cap for that model only."""
    await store.add_credits(user_id, 1000, "purchase")
    await store.set_spend_cap(SpendCap(user_id=user_id, cap_type="monthly", model="m1", limit=50))
    team_id = await _team(store, 1000, (user_id, None))
    await store.deduct_team(team_id, user_id, 45, CreditMetadata(model="m1"))
    await store.deduct_team(team_id, user_id, 45, CreditMetadata(model="m2"))

    refused = await store.reserve_credits(user_id, 6, "chat", {"model": "m1"}, min_balance=0)
    other_model = await store.reserve_credits(user_id, 500, "chat", {"model": "m2"}, min_balance=0)

    assert ErrorCode.SPEND_CAP_EXCEEDED == refused.error
    assert other_model.ok


async def test_team_usage_is_attributed_to_the_member_in_analytics(
    store: CreditStore, user_id: str, other_user_id: str
) -> None:
    """Analytics report team usage under the member who spent it, not the team."""
    team_id = await _team(store, 1000, (user_id, None), (other_user_id, None))
    await store.deduct_team(team_id, user_id, 30, CreditMetadata(model="m1"))
    await store.deduct_team(team_id, other_user_id, 10)
    window = (datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 4, 1, tzinfo=UTC))

    by_user = await store.spend_by_user(*window)
    by_model = await store.spend_by_model(*window)

    assert {user_id: 30, other_user_id: 10} == {r.user_id: r.total_spend for r in by_user}
    assert {"m1": 30, "unknown": 10} == {r.model: r.total_spend for r in by_model}


async def test_team_credits_expire_and_are_swept(store: CreditStore, clock: FakeClock) -> None:
    """A top-up with expires_at stops being available then, and a sweep writes it off."""
    team = await store.create_team("research", 10)
    await store.add_team_credits(team.team_id, 50, expires_at=clock.now + timedelta(days=1))
    clock.advance(days=1)
    member = "member-of-" + team.team_id
    await store.add_team_member(team.team_id, member)

    balance = await store.get_team_balance(team.team_id)
    refused = await store.deduct_team(team.team_id, member, 11)
    sweep = await store.sweep_expired_credits()

    assert (60, 10) == (balance.balance, balance.available)
    assert ErrorCode.INSUFFICIENT_TEAM_BALANCE == refused.error
    assert (1, 50) == (sweep.expired_count, sweep.expired_amount)
    assert 10 == await _team_balance(store, team.team_id)


async def test_team_ledger_is_listed_under_the_team_id(store: CreditStore, user_id: str) -> None:
    """The team's rows are paged by its id, as team rows with a running balance_after."""
    team_id = await _team(store, 100, (user_id, None))
    await store.add_team_credits(team_id, 50)
    usage = await store.deduct_team(team_id, user_id, 30)
    await store.refund_credits(usage.transaction_id, 10)

    page = await store.list_team_transactions(team_id)
    rows = page.items[::-1]

    assert [
        ("team_topup", 100, 100),
        ("team_topup", 50, 150),
        ("team_usage", -30, 120),
        ("refund", 10, 130),
    ] == [(r.type, r.amount, r.balance_after) for r in rows]
    assert {(team_id, "team")} == {(r.user_id, r.account_type) for r in rows}
