"""The ledger (one row per balance change, paged newest first) and the spend analytics."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pytest
from tests.conftest import FakeClock
from tests.contract._checks import all_rows, assert_invariants

from ducto.errors import InvalidArgumentError
from ducto.interface.base import CreditStore
from ducto.interface.models import CreditMetadata, TransactionRow

pytestmark = pytest.mark.anyio

MARCH = (datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 4, 1, tzinfo=UTC))


async def _usage(store: CreditStore, user_id: str, amount: int, model: str | None = None) -> str:
    """Settle a charge of `amount` (through a 1-credit hold) and return its usage row id."""
    hold = await store.reserve_credits(
        user_id, 1, "chat", CreditMetadata(model=model), min_balance=0
    )
    assert hold.ok
    settled = await store.deduct_credits(user_id, hold.reservation_id, amount)
    assert settled.ok
    return settled.transaction_id


async def _grants(store: CreditStore, user_id: str, count: int) -> list[str]:
    """Write `count` grants of 1, 2, 3, ... credits and return their ids, oldest first."""
    return [
        (await store.add_credits(user_id, n, "purchase")).transaction_id
        for n in range(1, count + 1)
    ]


def _ids(rows: list[TransactionRow]) -> list[str]:
    return [row.id for row in rows]


# -- the ledger ---------------------------------------------------------------------------------


async def test_every_balance_change_writes_one_row(
    store: CreditStore, user_id: str, clock: FakeClock
) -> None:
    """Grants, usage, refunds, adjustments and expiry each write one row; holds write none."""
    start = clock.now
    await store.add_credits(user_id, 100, "purchase")
    await store.add_credits(user_id, 50, "subscription", expires_at=start + timedelta(days=1))
    hold = await store.reserve_credits(user_id, 30, "chat")
    usage = await store.deduct_credits(user_id, hold.reservation_id, 30)
    await store.refund_credits(usage.transaction_id, 10)
    await store.add_credits(user_id, -5)
    spare = await store.reserve_credits(user_id, 10, "chat")
    await store.release_reservation(user_id, spare.reservation_id)
    clock.advance(days=2)
    await store.sweep_expired_credits()

    rows = await all_rows(store, user_id)

    assert [
        ("purchase", 100, 100),
        ("subscription", 50, 150),
        ("usage", -30, 120),
        ("refund", 10, 130),
        ("adjustment", -5, 125),
        ("expiry", -25, 100),
    ] == [(r.type, r.amount, r.balance_after) for r in rows]
    assert [start] * 5 + [start + timedelta(days=2)] == [r.created_at for r in rows]
    assert {(user_id, "user")} == {(r.user_id, r.account_type) for r in rows}
    await assert_invariants(store, user_id)


async def test_usage_row_names_its_hold_and_key(store: CreditStore, user_id: str) -> None:
    """A usage row records the reservation it settled and its idempotency key."""
    await store.add_credits(user_id, 100, "purchase", idempotency_key="grant-1")
    hold = await store.reserve_credits(user_id, 30, "chat")
    await store.deduct_credits(user_id, hold.reservation_id, 30, "settle-1")

    grant, usage = await all_rows(store, user_id)

    assert (None, "grant-1") == (grant.reservation_id, grant.idempotency_key)
    assert (hold.reservation_id, "settle-1") == (usage.reservation_id, usage.idempotency_key)


async def test_ledger_rows_are_returned_in_utc(
    store: CreditStore, user_id: str, clock: FakeClock
) -> None:
    """created_at is the clock's instant, as an aware UTC datetime."""
    clock.set(datetime(2026, 3, 15, 20, 0, tzinfo=timezone(timedelta(hours=8))))
    await store.add_credits(user_id, 10, "purchase")

    (row,) = await all_rows(store, user_id)

    assert datetime(2026, 3, 15, 12, 0, tzinfo=UTC) == row.created_at
    assert timedelta(0) == row.created_at.utcoffset()


async def test_ledger_is_per_user(store: CreditStore, user_id: str, other_user_id: str) -> None:
    """A user's ledger holds only that user's rows."""
    mine = await _grants(store, user_id, 2)
    await _grants(store, other_user_id, 3)

    assert mine == _ids(await all_rows(store, user_id))


async def test_unknown_user_has_an_empty_ledger(store: CreditStore, user_id: str) -> None:
    """Paging an unknown user's ledger gives an empty last page."""
    page = await store.list_transactions(user_id)

    assert ([], None) == (page.items, page.next_cursor)


async def test_list_transactions_pages_newest_first(store: CreditStore, user_id: str) -> None:
    """Pages run newest first and the last page has no cursor."""
    ids = await _grants(store, user_id, 7)

    first = await store.list_transactions(user_id, limit=3)
    second = await store.list_transactions(user_id, limit=3, cursor=first.next_cursor)
    third = await store.list_transactions(user_id, limit=3, cursor=second.next_cursor)

    assert ids[:3:-1] == _ids(first.items)
    assert ids[3:0:-1] == _ids(second.items)
    assert ids[:1] == _ids(third.items)
    assert first.next_cursor is not None
    assert second.next_cursor is not None
    assert third.next_cursor is None


async def test_list_transactions_last_full_page_has_no_cursor(
    store: CreditStore, user_id: str
) -> None:
    """When the rows fill the last page exactly, it carries no cursor."""
    ids = await _grants(store, user_id, 6)

    first = await store.list_transactions(user_id, limit=3)
    second = await store.list_transactions(user_id, limit=3, cursor=first.next_cursor)

    assert ids[2::-1] == _ids(second.items)
    assert second.next_cursor is None


async def test_cursor_is_stable_under_inserts(store: CreditStore, user_id: str) -> None:
    """Rows written between pages do not shift the next page; they lead a fresh first page."""
    ids = await _grants(store, user_id, 5)
    first = await store.list_transactions(user_id, limit=3)
    newer = await _grants(store, user_id, 2)

    second = await store.list_transactions(user_id, limit=3, cursor=first.next_cursor)
    fresh = await store.list_transactions(user_id, limit=3)

    assert ids[:4:-1] + ids[4:1:-1] == _ids(first.items)
    assert ids[1::-1] == _ids(second.items)
    assert second.next_cursor is None
    assert newer[::-1] + ids[4:3:-1] == _ids(fresh.items)


async def test_list_transactions_filters_by_type(store: CreditStore, user_id: str) -> None:
    """types keeps only rows of those types, paging through them newest first."""
    await store.add_credits(user_id, 100, "purchase")
    first_usage = await _usage(store, user_id, 10)
    second_usage = await _usage(store, user_id, 10)
    refund = await store.refund_credits(first_usage, 5)
    await store.add_credits(user_id, 3)

    page = await store.list_transactions(user_id, limit=2, types=["usage", "refund"])
    rest = await store.list_transactions(
        user_id, limit=2, types=["usage", "refund"], cursor=page.next_cursor
    )

    assert [refund.refund_transaction_id, second_usage] == _ids(page.items)
    assert [first_usage] == _ids(rest.items)
    assert rest.next_cursor is None


async def test_list_transactions_window_is_half_open(
    store: CreditStore, user_id: str, clock: FakeClock
) -> None:
    """start includes rows at that instant; end excludes them."""
    ids = []
    for _ in range(4):
        ids.append((await store.add_credits(user_id, 1, "purchase")).transaction_id)
        clock.advance(hours=1)
    start = datetime(2026, 3, 15, 13, tzinfo=UTC)
    end = datetime(2026, 3, 15, 15, tzinfo=UTC)

    window = await store.list_transactions(user_id, start=start, end=end)
    since = await store.list_transactions(user_id, start=start)
    until = await store.list_transactions(user_id, end=end)

    assert [ids[2], ids[1]] == _ids(window.items)
    assert [ids[3], ids[2], ids[1]] == _ids(since.items)
    assert [ids[2], ids[1], ids[0]] == _ids(until.items)


async def test_list_transactions_refuses_a_foreign_cursor(store: CreditStore, user_id: str) -> None:
    """A cursor the store did not return is an InvalidArgumentError naming cursor."""
    await _grants(store, user_id, 2)

    with pytest.raises(InvalidArgumentError, match="cursor"):
        await store.list_transactions(user_id, cursor="not-a-cursor")


# -- analytics ----------------------------------------------------------------------------------


async def test_spend_by_user_is_net_of_refunds_and_sorted(
    store: CreditStore, user_id: str, other_user_id: str
) -> None:
    """Users are ranked by net paid usage descending, then by user id."""
    third = f"{user_id}-third"
    for who in (user_id, other_user_id, third):
        await store.add_credits(who, 1000, "purchase")
    first_usage = await _usage(store, user_id, 50)
    await _usage(store, user_id, 20)
    await _usage(store, other_user_id, 60)
    await _usage(store, third, 100)
    await store.refund_credits(first_usage, 10)

    rows = await store.spend_by_user(*MARCH)

    tied = sorted([user_id, other_user_id])
    assert [(third, 100, 1), (tied[0], 60), (tied[1], 60)] == [
        (rows[0].user_id, rows[0].total_spend, rows[0].transaction_count),
        (rows[1].user_id, rows[1].total_spend),
        (rows[2].user_id, rows[2].total_spend),
    ]
    assert 2 == next(r.transaction_count for r in rows if r.user_id == user_id)


async def test_spend_by_model_reports_unknown_and_sorts(store: CreditStore, user_id: str) -> None:
    """Models rank by spend descending then name; usage without a model is ``unknown``."""
    await store.add_credits(user_id, 1000, "purchase")
    await _usage(store, user_id, 30, "b-model")
    await _usage(store, user_id, 30, "a-model")
    await _usage(store, user_id, 10)
    await _usage(store, user_id, 40)
    await _usage(store, user_id, 5, "c-model")

    rows = await store.spend_by_model(*MARCH)

    assert [("unknown", 50, 2), ("a-model", 30, 1), ("b-model", 30, 1), ("c-model", 5, 1)] == [
        (r.model, r.total_spend, r.transaction_count) for r in rows
    ]


async def test_top_users_takes_the_biggest_spenders(
    store: CreditStore, user_id: str, other_user_id: str
) -> None:
    """top_users returns at most `limit` users, biggest spend first."""
    third = f"{user_id}-third"
    for who, amount in ((user_id, 10), (other_user_id, 30), (third, 20)):
        await store.add_credits(who, 1000, "purchase")
        await _usage(store, who, amount)

    top = await store.top_users(2, *MARCH)

    assert [(other_user_id, 30), (third, 20)] == [(r.user_id, r.total_spend) for r in top]


async def test_daily_spend_uses_utc_days_oldest_first(
    store: CreditStore, user_id: str, clock: FakeClock
) -> None:
    """Spend is grouped by UTC calendar day, and days are listed by date."""
    await store.add_credits(user_id, 1000, "purchase")
    clock.set(datetime(2026, 3, 15, 23, 59, 59, tzinfo=UTC))
    await _usage(store, user_id, 10)
    clock.set(datetime(2026, 3, 16, 0, 0, tzinfo=UTC))
    await _usage(store, user_id, 50)
    await _usage(store, user_id, 20)
    clock.set(datetime(2026, 3, 18, 9, 0, tzinfo=timezone(timedelta(hours=-10))))
    await _usage(store, user_id, 5)

    days = await store.daily_spend(*MARCH)

    assert [("2026-03-15", 10, 1), ("2026-03-16", 70, 2), ("2026-03-18", 5, 1)] == [
        (d.date, d.total_spend, d.transaction_count) for d in days
    ]


async def test_analytics_windows_are_half_open(
    store: CreditStore, user_id: str, clock: FakeClock
) -> None:
    """Usage at a window's start is inside it; usage at its end is outside."""
    await store.add_credits(user_id, 1000, "purchase")
    start = datetime(2026, 3, 16, tzinfo=UTC)
    end = datetime(2026, 3, 17, tzinfo=UTC)
    clock.set(start)
    await _usage(store, user_id, 10)
    clock.set(end)
    await _usage(store, user_id, 100)

    by_user = await store.spend_by_user(start, end)
    stats = await store.aggregate_stats(start, end)

    assert [(user_id, 10)] == [(r.user_id, r.total_spend) for r in by_user]
    assert (10, 1) == (stats.total_credits_consumed, stats.transaction_count)


async def test_analytics_accept_windows_in_any_zone(
    store: CreditStore, user_id: str, clock: FakeClock
) -> None:
    """An aware window in another zone means the same UTC instants; a naive one is UTC."""
    await store.add_credits(user_id, 1000, "purchase")
    clock.set(datetime(2026, 3, 16, 1, 0, tzinfo=UTC))
    await _usage(store, user_id, 10)
    plus_two = timezone(timedelta(hours=2))

    aware = await store.spend_by_user(
        datetime(2026, 3, 16, 2, 0, tzinfo=plus_two), datetime(2026, 3, 16, 3, 1, tzinfo=plus_two)
    )
    missed = await store.spend_by_user(
        datetime(2026, 3, 16, 3, 1, tzinfo=plus_two), datetime(2026, 3, 17, tzinfo=plus_two)
    )
    naive = await store.spend_by_user(datetime(2026, 3, 16, 1), datetime(2026, 3, 16, 2))

    assert [10] == [r.total_spend for r in aware]
    assert [] == missed
    assert [10] == [r.total_spend for r in naive]


async def test_aggregate_stats(store: CreditStore, user_id: str, other_user_id: str) -> None:
    """Totals over the window: spend, active users, average per day, top model and user."""
    for who in (user_id, other_user_id):
        await store.add_credits(who, 1000, "purchase")
    refunded = await _usage(store, user_id, 40, "m1")
    await _usage(store, user_id, 10, "m2")
    await _usage(store, other_user_id, 35, "m2")
    await store.refund_credits(refunded, 20)

    stats = await store.aggregate_stats(*MARCH)

    assert (65, 2, 3, "m2", other_user_id) == (
        stats.total_credits_consumed,
        stats.active_users,
        stats.transaction_count,
        stats.top_model,
        stats.top_user,
    )
    assert Decimal("2.10") == stats.avg_daily_spend


@pytest.mark.parametrize(
    ("start", "end", "spend", "average"),
    [
        pytest.param(
            datetime(2026, 3, 10, tzinfo=UTC),
            datetime(2026, 3, 18, tzinfo=UTC),
            1,
            Decimal("0.12"),
            id="half-even-down",
        ),
        pytest.param(
            datetime(2026, 3, 10, tzinfo=UTC),
            datetime(2026, 3, 18, tzinfo=UTC),
            3,
            Decimal("0.38"),
            id="half-even-up",
        ),
        pytest.param(
            datetime(2026, 3, 15, 6, tzinfo=UTC),
            datetime(2026, 3, 16, 6, tzinfo=UTC),
            5,
            Decimal("2.50"),
            id="two-partial-days",
        ),
        pytest.param(
            datetime(2026, 3, 15, 6, tzinfo=UTC),
            datetime(2026, 3, 16, tzinfo=UTC),
            5,
            Decimal("5.00"),
            id="one-partial-day",
        ),
    ],
)
async def test_avg_daily_spend_divides_by_utc_days_touched(
    store: CreditStore,
    user_id: str,
    start: datetime,
    end: datetime,
    spend: int,
    average: Decimal,
) -> None:
    """avg_daily_spend is spend over the UTC days the window touches, rounded half-even."""
    await store.add_credits(user_id, 1000, "purchase")
    await _usage(store, user_id, spend)

    stats = await store.aggregate_stats(start, end)

    assert spend == stats.total_credits_consumed
    assert average == stats.avg_daily_spend
    assert -2 == stats.avg_daily_spend.as_tuple().exponent


async def test_empty_window_has_no_spend(store: CreditStore, user_id: str) -> None:
    """A window without usage reports empty lists and zero totals."""
    await store.add_credits(user_id, 1000, "purchase")
    await _usage(store, user_id, 10)
    april = (datetime(2026, 4, 1, tzinfo=UTC), datetime(2026, 5, 1, tzinfo=UTC))

    stats = await store.aggregate_stats(*april)

    assert [] == await store.spend_by_user(*april)
    assert [] == await store.spend_by_model(*april)
    assert [] == await store.daily_spend(*april)
    assert [] == await store.top_users(10, *april)
    assert (0, 0, 0, "", "") == (
        stats.total_credits_consumed,
        stats.active_users,
        stats.transaction_count,
        stats.top_model,
        stats.top_user,
    )
    assert Decimal(0) == stats.avg_daily_spend


async def test_grants_and_expiry_are_not_spend(
    store: CreditStore, user_id: str, clock: FakeClock
) -> None:
    """Only usage is spend: grants, negative adjustments and expiry write-offs are not."""
    await store.add_credits(user_id, 100, "purchase", expires_at=clock.now + timedelta(hours=1))
    await store.add_credits(user_id, 50, "purchase")
    await store.add_credits(user_id, -20)
    clock.advance(hours=2)
    await store.sweep_expired_credits()

    assert [] == await store.spend_by_user(*MARCH)
    assert 0 == (await store.aggregate_stats(*MARCH)).total_credits_consumed


async def test_team_usage_counts_for_the_member_in_aggregates(
    store: CreditStore, user_id: str, other_user_id: str
) -> None:
    """Team usage counts for the member who spent it in the totals and top user."""
    team = await store.create_team("research", 1000)
    await store.add_team_member(team.team_id, user_id)
    await store.deduct_team(team.team_id, user_id, 80, CreditMetadata(model="m1"))
    await store.add_credits(other_user_id, 1000, "purchase")
    await _usage(store, other_user_id, 30)

    stats = await store.aggregate_stats(*MARCH)
    top = await store.top_users(5, *MARCH)

    assert (110, 2, user_id, "m1") == (
        stats.total_credits_consumed,
        stats.active_users,
        stats.top_user,
        stats.top_model,
    )
    assert [user_id, other_user_id] == [r.user_id for r in top]
