"""
Bounded growth: idempotency retention, `prune` and `archive_ledger`, on every store.

The stores keep the default retentions (7 days for idempotency records and for finished
holds). Boundaries are tested to the microsecond: a record written at t replays while
``now - t <= 7 days`` and is a new request from ``t + 7 days + 1 µs`` on, whether or not
`prune` ran in between; a finished hold is pruned once ``now - expires_at > 7 days``.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import OPENERS, REQUIRED, STORES, FakeClock
from tests.contract._checks import (
    all_rows,
    all_team_rows,
    assert_archived_invariants,
    assert_invariants,
    read_archive,
)

from ducto.errors import ErrorCode, InvalidArgumentError
from ducto.interface._retention import DEFAULT_RETENTION
from ducto.interface.base import CreditStore
from ducto.interface.models import (
    ArchiveResult,
    CreditMetadata,
    PlanDefinition,
    PricingConfigData,
    PruneResult,
    SpendCap,
    TransactionRow,
)

pytestmark = pytest.mark.anyio

RETENTION = DEFAULT_RETENTION
TICK = timedelta(microseconds=1)
PRUNED = [pytest.param(False, id="unpruned"), pytest.param(True, id="pruned")]


async def _edge(
    store: CreditStore, clock: FakeClock, written: datetime, *, past: bool, prune: bool, keys: int
) -> None:
    """
    Move to the retention edge of records written at `written` (`past`: 1 µs beyond it).

    With `prune`, run it there: at the edge it must delete no idempotency record, past it
    exactly the `keys` written at `written`.
    """
    clock.set(written + RETENTION + (TICK if past else timedelta(0)))
    if prune:
        done = await store.prune()
        assert (keys if past else 0) == done.idempotency_keys


async def _usage(store: CreditStore, user_id: str, amount: int, model: str | None = None) -> str:
    """Settle a charge of `amount` (through a 1-credit hold) and return its usage row id."""
    hold = await store.reserve_credits(
        user_id, 1, "chat", CreditMetadata(model=model), min_balance=0
    )
    assert hold.ok
    settled = await store.deduct_credits(user_id, hold.reservation_id, amount)
    assert settled.ok
    return settled.transaction_id


async def _team(store: CreditStore, member: str, balance: int) -> str:
    """A team with `member` (no cap) and `balance` credits in its pool."""
    team = (await store.create_team("research")).team_id
    assert (await store.add_team_member(team, member)).ok
    assert (await store.add_team_credits(team, balance)).ok
    return team


# -- retention settings -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", STORES)
async def test_retention_settings_are_checked_and_none_keeps_for_ever(
    anyio_backend: str, tmp_path: Path, clock: FakeClock, kind: str
) -> None:
    """Both keywords are refused when bad, naming them; None keeps keys and holds for ever."""
    for name, bad in [
        ("idempotency_retention", 0),
        ("idempotency_retention", -1.5),
        ("hold_retention", "7d"),
        ("hold_retention", timedelta(0)),
        ("idempotency_retention", float("nan")),
    ]:
        with pytest.raises(InvalidArgumentError, match=name):
            _opener(kind)(tmp_path, clock, **{name: bad})
    opened = _opener(kind)(tmp_path, clock, idempotency_retention=None, hold_retention=None)
    async with opened as store:
        await store.setup()
        first = await store.add_credits("u", 25, "purchase", idempotency_key="k")
        hold = await store.reserve_credits("u", 5, "chat", min_balance=0)
        assert (await store.release_reservation("u", hold.reservation_id)).ok
        clock.advance(days=400)
        again = await store.add_credits("u", 25, "purchase", idempotency_key="k")
        assert again.idempotent
        assert again.transaction_id == first.transaction_id
        assert PruneResult() == await store.prune()
        gone = await store.deduct_credits("u", hold.reservation_id, 1)
        assert ErrorCode.RESERVATION_RELEASED == gone.error
    short = _opener(kind)(tmp_path, clock, idempotency_retention=60, hold_retention=60.0)
    async with short as store:
        await store.setup()
        first = await store.add_credits("v", 25, "purchase", idempotency_key="k")
        clock.advance(seconds=61)
        again = await store.add_credits("v", 25, "purchase", idempotency_key="k")
        assert not again.idempotent
        assert again.transaction_id != first.transaction_id


def _opener(kind: str) -> Callable[..., CreditStore]:
    try:
        OPENERS[kind](Path("/nonexistent"), FakeClock(datetime(2026, 1, 1, tzinfo=UTC)))
    except (ImportError, LookupError) as exc:
        if kind in REQUIRED:
            pytest.fail(f"{kind} store is required: {exc}")
        pytest.skip(f"{kind} store unavailable: {exc}")
    except Exception:  # a store that checks its path only when opened
        pass
    return OPENERS[kind]


# -- idempotency retention ----------------------------------------------------------------------


@pytest.mark.parametrize("prune", PRUNED)
async def test_grant_key_replays_inside_retention_and_grants_again_past_it(
    store: CreditStore, user_id: str, clock: FakeClock, prune: bool
) -> None:
    """A keyed grant replays up to exactly 7 days later; 1 µs after that it grants again."""
    written = clock.now
    first = await store.add_credits(user_id, 10, "purchase", idempotency_key="grant")

    await _edge(store, clock, written, past=False, prune=prune, keys=1)
    replay = await store.add_credits(user_id, 10, "purchase", idempotency_key="grant")
    conflict = await store.add_credits(user_id, 11, "purchase", idempotency_key="grant")
    inside = (await store.get_balance(user_id)).balance
    await _edge(store, clock, written, past=True, prune=prune, keys=1)
    again = await store.add_credits(user_id, 10, "purchase", idempotency_key="grant")
    replay_again = await store.add_credits(user_id, 10, "purchase", idempotency_key="grant")

    assert first.ok
    assert not first.idempotent
    assert (True, first.transaction_id, 10) == (
        replay.idempotent,
        replay.transaction_id,
        replay.new_balance,
    )
    assert ErrorCode.IDEMPOTENCY_CONFLICT == conflict.error
    assert 10 == inside
    assert again.ok
    assert not again.idempotent
    assert first.transaction_id != again.transaction_id
    assert 20 == again.new_balance
    assert (True, again.transaction_id) == (replay_again.idempotent, replay_again.transaction_id)
    assert [first.transaction_id, again.transaction_id] == [
        r.id for r in await all_rows(store, user_id)
    ]
    await assert_invariants(store, user_id)


@pytest.mark.parametrize("prune", PRUNED)
async def test_reserve_key_replays_inside_retention_and_holds_again_past_it(
    store: CreditStore, user_id: str, clock: FakeClock, prune: bool
) -> None:
    """A keyed hold replays up to exactly 7 days later; 1 µs after that it is a new hold."""
    await store.add_credits(user_id, 100, "purchase")
    written = clock.now
    first = await store.reserve_credits(user_id, 5, "chat", idempotency_key="hold")

    await _edge(store, clock, written, past=False, prune=prune, keys=1)
    replay = await store.reserve_credits(user_id, 5, "chat", idempotency_key="hold")
    conflict = await store.reserve_credits(user_id, 6, "chat", idempotency_key="hold")
    await _edge(store, clock, written, past=True, prune=prune, keys=1)
    again = await store.reserve_credits(user_id, 5, "chat", idempotency_key="hold")
    replay_again = await store.reserve_credits(user_id, 5, "chat", idempotency_key="hold")
    balance = await store.get_balance(user_id)

    assert first.ok
    assert (True, first.reservation_id) == (replay.idempotent, replay.reservation_id)
    assert ErrorCode.IDEMPOTENCY_CONFLICT == conflict.error
    assert again.ok
    assert not again.idempotent
    assert first.reservation_id != again.reservation_id
    assert (True, again.reservation_id) == (replay_again.idempotent, replay_again.reservation_id)
    # The first hold's TTL (600 s) is long gone: only the new hold counts.
    assert (100, 5, 95) == (balance.balance, balance.reserved, balance.available)
    await assert_invariants(store, user_id)


@pytest.mark.parametrize("prune", PRUNED)
async def test_deduct_key_replays_inside_retention_and_is_new_past_it(
    store: CreditStore, user_id: str, clock: FakeClock, prune: bool
) -> None:
    """
    A keyed settlement replays up to exactly 7 days later, and the key conflicts with another
    hold; 1 µs later the key settles the other hold, and the first request is refused by its
    hold's state, not replayed.
    """
    await store.add_credits(user_id, 100, "purchase")
    hold = await store.reserve_credits(user_id, 10, "chat")
    other = await store.reserve_credits(user_id, 10, "chat", ttl=timedelta(days=30))
    written = clock.now
    first = await store.deduct_credits(user_id, hold.reservation_id, 8, "settle")

    await _edge(store, clock, written, past=False, prune=prune, keys=1)
    replay = await store.deduct_credits(user_id, hold.reservation_id, 8, "settle")
    conflict = await store.deduct_credits(user_id, other.reservation_id, 8, "settle")
    await _edge(store, clock, written, past=True, prune=prune, keys=1)
    again = await store.deduct_credits(user_id, other.reservation_id, 8, "settle")
    stale = await store.deduct_credits(user_id, hold.reservation_id, 8, "stale")
    original = await store.deduct_credits(user_id, hold.reservation_id, 9, "settle")

    assert first.ok
    assert (True, first.transaction_id) == (replay.idempotent, replay.transaction_id)
    assert ErrorCode.IDEMPOTENCY_CONFLICT == conflict.error
    assert again.ok
    assert not again.idempotent
    assert first.transaction_id != again.transaction_id
    assert ErrorCode.RESERVATION_ALREADY_SETTLED == stale.error
    # The key now belongs to the second settlement: another request with it conflicts.
    assert ErrorCode.IDEMPOTENCY_CONFLICT == original.error
    assert [("usage", -8), ("usage", -8)] == [
        (r.type, r.amount) for r in (await all_rows(store, user_id))[1:]
    ]
    assert 84 == (await store.get_balance(user_id)).balance
    await assert_invariants(store, user_id)


@pytest.mark.parametrize("prune", PRUNED)
async def test_refund_key_replays_inside_retention_and_refunds_again_past_it(
    store: CreditStore, user_id: str, clock: FakeClock, prune: bool
) -> None:
    """A keyed partial refund replays up to exactly 7 days later; 1 µs after, it refunds again."""
    await store.add_credits(user_id, 100, "purchase")
    usage = await _usage(store, user_id, 10)
    written = clock.now
    first = await store.refund_credits(usage, 3, idempotency_key="refund")

    await _edge(store, clock, written, past=False, prune=prune, keys=1)
    replay = await store.refund_credits(usage, 3, idempotency_key="refund")
    conflict = await store.refund_credits(usage, 4, idempotency_key="refund")
    await _edge(store, clock, written, past=True, prune=prune, keys=1)
    again = await store.refund_credits(usage, 3, idempotency_key="refund")

    assert (True, 3, 7) == (first.ok, first.amount, first.refundable)
    assert (True, first.refund_transaction_id) == (
        replay.idempotent,
        replay.refund_transaction_id,
    )
    assert ErrorCode.IDEMPOTENCY_CONFLICT == conflict.error
    assert again.ok
    assert not again.idempotent
    assert first.refund_transaction_id != again.refund_transaction_id
    assert (3, 4, 96) == (again.amount, again.refundable, again.new_balance)
    rows = await all_rows(store, user_id)
    assert 6 == next(r.refunded for r in rows if r.id == usage)
    assert ["purchase", "usage", "refund", "refund"] == [r.type for r in rows]
    await assert_invariants(store, user_id)


@pytest.mark.parametrize("prune", PRUNED)
async def test_team_deduct_key_replays_inside_retention_and_charges_again_past_it(
    store: CreditStore, user_id: str, clock: FakeClock, prune: bool
) -> None:
    """A keyed team charge replays up to exactly 7 days later; 1 µs after, it charges again."""
    team = await _team(store, user_id, 100)
    written = clock.now
    first = await store.deduct_team(team, user_id, 5, idempotency_key="team")

    await _edge(store, clock, written, past=False, prune=prune, keys=1)
    replay = await store.deduct_team(team, user_id, 5, idempotency_key="team")
    conflict = await store.deduct_team(team, user_id, 6, idempotency_key="team")
    await _edge(store, clock, written, past=True, prune=prune, keys=1)
    again = await store.deduct_team(team, user_id, 5, idempotency_key="team")

    assert first.ok
    assert (True, first.transaction_id, 95) == (
        replay.idempotent,
        replay.transaction_id,
        replay.team_balance_after,
    )
    assert ErrorCode.IDEMPOTENCY_CONFLICT == conflict.error
    assert again.ok
    assert not again.idempotent
    assert first.transaction_id != again.transaction_id
    assert 90 == again.team_balance_after
    rows = await all_team_rows(store, team)
    assert [("team_topup", 100), ("team_usage", -5), ("team_usage", -5)] == [
        (r.type, r.amount) for r in rows
    ]
    assert 90 == (await store.get_team_balance(team)).balance
    await assert_archived_invariants(store, team, [], team=True)


# -- prune --------------------------------------------------------------------------------------


def _counts(result: PruneResult) -> tuple[int, int, int, bool]:
    return (result.idempotency_keys, result.holds, result.windows, result.dry_run)


async def test_prune_counts_each_kind_and_a_dry_run_deletes_nothing(
    store: CreditStore, user_id: str, other_user_id: str, clock: FakeClock
) -> None:
    """
    Three keys, three finished holds (settled, released, lapsed) and two closed daily windows
    are pruned 8 days on; a dry run reports the same counts twice and deletes nothing; an open
    hold and a hold still counted stay; a second prune finds nothing.
    """
    start = clock.now
    await store.add_credits(user_id, 100, "purchase", idempotency_key="grant")
    settled = await store.reserve_credits(
        user_id, 10, "chat", CreditMetadata(model="m"), ttl=60, idempotency_key="hold"
    )
    assert (await store.deduct_credits(user_id, settled.reservation_id, 10, "settle")).ok
    released = await store.reserve_credits(user_id, 5, "chat", ttl=60)
    assert (await store.release_reservation(user_id, released.reservation_id)).ok
    lapsed = await store.reserve_credits(user_id, 5, "chat", ttl=60)
    open_hold = await store.reserve_credits(user_id, 5, "chat", ttl=timedelta(days=30))
    await store.add_credits(other_user_id, 50, "purchase")
    counted = await store.reserve_credits(other_user_id, 5, "chat", ttl=60)
    clock.advance(seconds=61)
    assert 5 == (await store.get_balance(user_id)).reserved  # the lapsed hold stops counting
    await assert_invariants(store, user_id)
    clock.set(start + timedelta(days=8))

    dry = await store.prune(dry_run=True)
    dry_again = await store.prune(dry_run=True)
    still_settled = await store.deduct_credits(user_id, settled.reservation_id, 1)
    still_released = await store.deduct_credits(user_id, released.reservation_id, 1)
    await assert_invariants(store, user_id)
    real = await store.prune()
    await assert_invariants(store, user_id)
    second = await store.prune()

    assert (3, 3, 2, True) == _counts(dry)
    assert (3, 3, 2, True) == _counts(dry_again)
    assert ErrorCode.RESERVATION_ALREADY_SETTLED == still_settled.error
    assert ErrorCode.RESERVATION_RELEASED == still_released.error
    assert (3, 3, 2, False) == _counts(real)
    assert (0, 0, 0, False) == _counts(second)
    for gone in (settled, released, lapsed):
        settle = await store.deduct_credits(user_id, gone.reservation_id, 1)
        assert ErrorCode.RESERVATION_NOT_FOUND == settle.error
        release = await store.release_reservation(user_id, gone.reservation_id)
        assert ErrorCode.RESERVATION_NOT_FOUND == release.error
    # The pruned keys are new requests now (they were already past retention).
    regrant = await store.add_credits(user_id, 100, "purchase", idempotency_key="grant")
    assert (True, False) == (regrant.ok, regrant.idempotent)
    assert (190, 5) == (regrant.new_balance, (await store.get_balance(user_id)).reserved)
    assert (await store.deduct_credits(user_id, open_hold.reservation_id, 5)).ok
    await assert_invariants(store, user_id)

    # The other user's hold lapsed unseen, so it was still counted and stayed. Reading the
    # balance lapses it; then it goes.
    assert 0 == (await store.get_balance(other_user_id)).reserved
    assert 1 == (await store.prune()).holds
    gone = await store.deduct_credits(other_user_id, counted.reservation_id, 5)
    assert ErrorCode.RESERVATION_NOT_FOUND == gone.error
    other = await store.get_balance(other_user_id)
    assert (50, 0, 50) == (other.balance, other.reserved, other.available)
    await assert_invariants(store, other_user_id)


@pytest.mark.parametrize("finish", ["settled", "released", "lapsed", "team-settled"])
async def test_finished_hold_is_pruned_just_past_expiry_plus_retention(
    store: CreditStore, user_id: str, clock: FakeClock, finish: str
) -> None:
    """A finished hold stays until exactly expires_at + 7 days and is pruned 1 µs later."""
    await store.add_credits(user_id, 100, "purchase")
    team_id: str | None = None
    if finish == "team-settled":
        team_id = await _team(store, user_id, 100)
        hold = await store.reserve_team_credits(team_id, user_id, 10, "chat", ttl=60)
    else:
        hold = await store.reserve_credits(user_id, 10, "chat", ttl=60)
    assert hold.ok
    assert clock.now + timedelta(seconds=60) == hold.expires_at
    if finish in ("settled", "team-settled"):
        assert (await store.deduct_credits(user_id, hold.reservation_id, 7, team_id=team_id)).ok
    elif finish == "released":
        assert (await store.release_reservation(user_id, hold.reservation_id)).ok
    else:
        clock.advance(seconds=61)
        assert 0 == (await store.get_balance(user_id)).reserved
    before = await store.get_balance(user_id)

    clock.set(hold.expires_at + RETENTION)
    at_edge = await store.prune()
    kept = await store.prune(dry_run=True)
    clock.advance(microseconds=1)
    past = await store.prune()
    settle = await store.deduct_credits(user_id, hold.reservation_id, 1, team_id=team_id)
    release = await store.release_reservation(user_id, hold.reservation_id, team_id=team_id)

    assert 0 == at_edge.holds
    assert 0 == kept.holds
    assert 1 == past.holds
    assert ErrorCode.RESERVATION_NOT_FOUND == settle.error
    assert ErrorCode.RESERVATION_NOT_FOUND == release.error
    after = await store.get_balance(user_id)
    assert (before.balance, before.reserved) == (after.balance, after.reserved)
    await assert_invariants(store, user_id)
    if team_id is not None:
        assert 93 == (await store.get_team_balance(team_id)).balance


async def test_open_hold_within_its_ttl_is_never_pruned(
    store: CreditStore, user_id: str, clock: FakeClock
) -> None:
    """A hold whose TTL has not passed is kept however long ago it was placed."""
    await store.add_credits(user_id, 100, "purchase")
    hold = await store.reserve_credits(user_id, 10, "chat", ttl=timedelta(days=30))
    assert hold.expires_at is not None
    clock.set(hold.expires_at - TICK)

    pruned = await store.prune()
    settled = await store.deduct_credits(user_id, hold.reservation_id, 10)

    assert 0 == pruned.holds
    assert settled.ok
    assert 90 == settled.balance_after
    await assert_invariants(store, user_id)


async def test_prune_deletes_closed_windows_and_caps_read_the_same(
    store: CreditStore, user_id: str, clock: FakeClock
) -> None:
    """
    In a new month, closed spend-cap days and months, allowance months and team-member months
    are deleted; cap checks, team spend this month and the allowance read as before.
    """
    plan = PlanDefinition(id="pro", name="Pro", free_allowance=15)
    await store.set_active_pricing(PricingConfigData(models={"_default": "0"}, plans={"pro": plan}))
    await store.add_credits(user_id, 200, "purchase")
    await store.set_user_plan(user_id, "pro")
    await store.set_spend_cap(SpendCap(user_id=user_id, cap_type="daily", limit=100))
    await store.set_spend_cap(SpendCap(user_id=user_id, cap_type="monthly", model="m", limit=50))
    team = (await store.create_team("research", 100)).team_id
    assert (await store.add_team_member(team, user_id, spend_cap=100)).ok
    model = CreditMetadata(model="m")
    # 2026-03-15: usage partly paid by the allowance, and a team charge.
    march = await store.charge_credits(user_id, 20, "chat", model, use_allowance=True)
    assert (15, 5) == (march.allowance_consumed, march.charged)
    assert (await store.deduct_team(team, user_id, 7)).ok
    clock.set(datetime(2026, 4, 3, 10, tzinfo=UTC))
    assert (await store.deduct_team(team, user_id, 4)).ok
    assert (await store.charge_credits(user_id, 6, "chat", model)).charged == 6
    clock.set(datetime(2026, 4, 5, 12, tzinfo=UTC))
    today = await store.charge_credits(user_id, 20, "chat", model, use_allowance=True)
    assert (15, 5) == (today.allowance_consumed, today.charged)

    async def caps_view() -> Any:
        return (
            await store.check_spend_cap(user_id),
            await store.check_spend_cap(user_id, "m"),
            await store.check_spend_cap(user_id, "m", 39),
            await store.check_spend_cap(user_id, "m", 40),
            await store.get_team_members(team),
            await store.check_allowance(user_id),
        )

    before = await caps_view()
    dry = await store.prune(dry_run=True)
    pruned = await store.prune()
    after = await caps_view()
    second = await store.prune()
    refused = await store.reserve_credits(user_id, 40, "chat", model, min_balance=0)
    allowed = await store.reserve_credits(user_id, 39, "chat", model, min_balance=0)

    # Closed: 03-15 daily (all, m), 2026-03 monthly (all, m), 04-03 daily (all, m), the
    # March allowance month and the March team-member month. The hold: March's one-step
    # charge (settled, expiring at once, more than 7 days ago).
    assert (0, 1, 8, True) == _counts(dry)
    assert (0, 1, 8, False) == _counts(pruned)
    assert (0, 0, 0, False) == _counts(second)
    assert before == after
    daily, monthly_m, at_limit, over = after[:4]
    assert ("daily", 5, 100) == (daily.cap_type, daily.current_spend, daily.cap_limit)
    assert ("monthly", "m", 11, 50) == (
        monthly_m.cap_type,
        monthly_m.model,
        monthly_m.current_spend,
        monthly_m.cap_limit,
    )
    assert (False, True) == (at_limit.exceeded, over.exceeded)
    assert [(user_id, 4)] == [(m.user_id, m.total_spent) for m in after[4]]
    assert (15, 0) == (after[5].allowance_used, after[5].allowance_remaining)
    assert ErrorCode.SPEND_CAP_EXCEEDED == refused.error
    assert (11, 50) == (refused.cap_spend, refused.cap_limit)
    assert allowed.ok
    await assert_invariants(store, user_id)


async def test_prune_reports_progress_and_refuses_bad_arguments(
    store: CreditStore, user_id: str, clock: FakeClock
) -> None:
    """dry_run must be a bool and progress callable (nothing pruned); progress sees totals."""
    await store.add_credits(user_id, 10, "purchase", idempotency_key="grant")
    clock.advance(days=8)

    with pytest.raises(InvalidArgumentError, match="dry_run"):
        await store.prune(dry_run="yes")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="dry_run"):
        await store.prune(dry_run=1)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="progress"):
        await store.prune(progress=5)  # type: ignore[arg-type]
    seen: list[PruneResult] = []
    result = await store.prune(progress=seen.append)

    assert (1, 0, 0, False) == _counts(result)
    assert seen
    assert result == seen[-1]
    await assert_invariants(store, user_id)


# -- archive_ledger -----------------------------------------------------------------------------

CUTOFF = datetime(2026, 5, 1, tzinfo=UTC)
"""The start of the current month once `_history` has run (the latest cutoff allowed)."""
NOW = datetime(2026, 5, 20, 12, tzinfo=UTC)
WINDOWS = {
    "archived-days": (datetime(2026, 3, 15, tzinfo=UTC), datetime(2026, 4, 11, tzinfo=UTC)),
    "up-to-horizon": (datetime(2026, 4, 10, tzinfo=UTC), CUTOFF),
    "straddling": (datetime(2026, 4, 30, tzinfo=UTC), datetime(2026, 5, 3, tzinfo=UTC)),
    "all-time": (datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 6, 1, tzinfo=UTC)),
    "after-horizon": (datetime(2026, 5, 2, 6, tzinfo=UTC), datetime(2026, 5, 20, 13, tzinfo=UTC)),
    "empty": (datetime(2026, 4, 20, tzinfo=UTC), datetime(2026, 4, 20, tzinfo=UTC)),
}


@dataclass
class History:
    """Three months of two users and a team; the clock ends at `NOW`."""

    a: str
    b: str
    team: str
    usage_a1: str
    """2026-03-15, model m1, refunded 4 in April (archived)."""
    usage_b2: str
    """2026-04-30 23:00, model m1, refunded 2 in May (archived)."""
    usage_a4: str
    """2026-05-20, model m1 (kept)."""


async def _history(store: CreditStore, clock: FakeClock, a: str, b: str) -> History:
    """
    Grants, usage with and without models, team usage, partial refunds and an expiry from
    2026-03-15 to 2026-05-20; rows before 2026-05-01 are old enough to archive.
    """
    start = clock.now
    assert datetime(2026, 3, 15, 12, tzinfo=UTC) == start
    await store.add_credits(a, 100, "purchase", CreditMetadata(reference_id="order-1"))
    await store.add_credits(a, 30, "subscription", expires_at=start + timedelta(days=2))
    usage_a1 = await _usage(store, a, 12, "m1")
    assert (await store.charge_credits(a, 5, "summary", min_balance=0)).ok
    await store.add_credits(b, 50, "purchase", idempotency_key="b-grant")
    await _usage(store, b, 9, "m2")
    team = (await store.create_team("research")).team_id
    assert (await store.add_team_member(team, a)).ok
    assert (await store.add_team_credits(team, 80)).ok
    assert (await store.deduct_team(team, a, 6, CreditMetadata(model="m1"))).ok
    clock.set(datetime(2026, 3, 18, tzinfo=UTC))
    assert 1 == (await store.sweep_expired_credits()).expired_count
    clock.set(datetime(2026, 4, 10, 9, tzinfo=UTC))
    await _usage(store, a, 7, "m2")
    assert (await store.refund_credits(usage_a1, 4, "partial")).ok
    await store.add_credits(b, 20, "purchase")
    assert (await store.deduct_team(team, a, 3)).ok
    clock.set(datetime(2026, 4, 30, 23, tzinfo=UTC))
    usage_b2 = await _usage(store, b, 8, "m1")
    clock.set(CUTOFF)
    await store.add_credits(a, 1, "purchase")
    clock.set(datetime(2026, 5, 2, 10, tzinfo=UTC))
    assert (await store.refund_credits(usage_b2, 2)).ok
    clock.set(NOW)
    usage_a4 = await _usage(store, a, 4, "m1")
    return History(a, b, team, usage_a1, usage_b2, usage_a4)


async def _ledgers(store: CreditStore, h: History) -> dict[str, list[TransactionRow]]:
    return {
        h.a: await all_rows(store, h.a),
        h.b: await all_rows(store, h.b),
        h.team: await all_team_rows(store, h.team),
    }


async def _accounts(store: CreditStore, h: History) -> Any:
    """Balances, lots and the team pool: what archiving must leave alone."""
    return (
        await store.get_balance(h.a),
        await store.get_balance(h.b),
        await store.list_lots(h.a),
        await store.list_lots(h.b),
        await store.get_team_balance(h.team),
        await store.get_team_members(h.team),
    )


async def _analytics(store: CreditStore, start: datetime, end: datetime) -> Any:
    return (
        await store.spend_by_user(start, end),
        await store.spend_by_model(start, end),
        await store.daily_spend(start, end),
        await store.top_users(10, start, end),
        await store.aggregate_stats(start, end),
    )


async def _pages(store: CreditStore, account: str, team: bool) -> list[TransactionRow]:
    """A ledger newest first, read 2 rows a page through cursors."""
    rows: list[TransactionRow] = []
    cursor: str | None = None
    list_page = store.list_team_transactions if team else store.list_transactions
    while True:
        page = await list_page(account, limit=2, cursor=cursor)
        rows.extend(page.items)
        if page.next_cursor is None:
            return rows
        cursor = page.next_cursor


def _old(ledgers: dict[str, list[TransactionRow]]) -> list[TransactionRow]:
    return [r for rows in ledgers.values() for r in rows if r.created_at < CUTOFF]


async def test_archive_moves_old_rows_to_the_file_and_keeps_the_rest_exact(
    store: CreditStore, user_id: str, other_user_id: str, clock: FakeClock, tmp_path: Path
) -> None:
    """
    Every row created before the cutoff goes to the gzip'd JSON Lines file as it was shown,
    and leaves the ledger; balances, lots, kept rows and paging are unchanged.
    """
    h = await _history(store, clock, user_id, other_user_id)
    accounts = await _accounts(store, h)
    ledgers = await _ledgers(store, h)
    old = _old(ledgers)
    destination = tmp_path / "archive.jsonl.gz"

    result = await store.archive_ledger(CUTOFF, destination)
    lines = read_archive(destination)

    assert {
        "purchase",
        "subscription",
        "usage",
        "expiry",
        "refund",
        "team_topup",
        "team_usage",
    } == {r.type for r in old}
    assert 14 == len(old)
    assert (len(old), CUTOFF, str(destination), False) == (
        result.rows,
        result.before,
        result.destination,
        result.dry_run,
    )
    assert destination.stat().st_size == result.bytes_written > 0
    assert sorted(r.id for r in old) == sorted(line["id"] for line in lines)
    shown = {r.id: r.model_dump(mode="json") for r in old}
    extra = {"seq", "spender", "model", "operation_type", "allowance", "scope"}
    for line in lines:
        assert shown[line["id"]] == {k: line[k] for k in TransactionRow.model_fields}
        assert set(TransactionRow.model_fields) | extra == set(line)
        assert datetime.fromisoformat(line["created_at"]) < CUTOFF
    assert [line["seq"] for line in lines] == sorted({line["seq"] for line in lines})
    by_id = {line["id"]: line for line in lines}
    first = by_id[h.usage_a1]
    assert ("usage", -12, 4, "m1", "chat", h.a) == (
        first["type"],
        first["amount"],
        first["refunded"],
        first["model"],
        first["operation_type"],
        first["spender"],
    )
    team_usage = [line for line in lines if line["type"] == "team_usage"]
    assert [(h.team, "team", h.a, "m1", -6), (h.team, "team", h.a, None, -3)] == [
        (u["user_id"], u["account_type"], u["spender"], u["model"], u["amount"]) for u in team_usage
    ]
    assert 2 == by_id[h.usage_b2]["refunded"]

    kept = {
        account: [r for r in rows if r.created_at >= CUTOFF] for account, rows in ledgers.items()
    }
    assert kept == await _ledgers(store, h)
    assert [2, 1, 0] == [len(rows) for rows in kept.values()]
    assert kept[h.a][::-1] == await _pages(store, h.a, team=False)
    assert kept[h.b][::-1] == await _pages(store, h.b, team=False)
    assert [] == await _pages(store, h.team, team=True)
    assert accounts == await _accounts(store, h)
    await assert_archived_invariants(store, h.a, lines)
    await assert_archived_invariants(store, h.b, lines)
    await assert_archived_invariants(store, h.team, lines, team=True)


async def test_archived_usage_keeps_every_analytics_answer(
    store: CreditStore, user_id: str, other_user_id: str, clock: FakeClock, tmp_path: Path
) -> None:
    """
    Analytics over whole UTC days (inside the archived range, straddling the cutoff, all time)
    and over windows after the horizon answer as before; a bound inside an archived day is
    refused after archiving (and was fine before).
    """
    h = await _history(store, clock, user_id, other_user_id)
    before = {name: await _analytics(store, *window) for name, window in WINDOWS.items()}
    odd_start = datetime(2026, 4, 10, 12, tzinfo=UTC)
    odd_end = datetime(2026, 4, 30, 23, 30, tzinfo=UTC)
    assert await store.spend_by_user(odd_start, NOW)
    assert await store.daily_spend(WINDOWS["all-time"][0], odd_end)

    archived = await store.archive_ledger(CUTOFF, tmp_path / "archive.jsonl.gz")
    after = {name: await _analytics(store, *window) for name, window in WINDOWS.items()}

    assert 14 == archived.rows
    for name in WINDOWS:
        assert before[name] == after[name], name
    total = after["all-time"][4]
    # a1 12-4, a2 5, b1 9, team 6, a3 7, team 3, b2 8-2, a4 4
    assert (48, 8, 2) == (total.total_credits_consumed, total.transaction_count, total.active_users)
    by_user = {
        row.user_id: (row.total_spend, row.transaction_count) for row in after["all-time"][0]
    }
    assert {h.a: (33, 6), h.b: (15, 2)} == by_user
    assert [
        ("2026-03-15", 28, 4),
        ("2026-04-10", 10, 2),
        ("2026-04-30", 6, 1),
        ("2026-05-20", 4, 1),
    ] == [(d.date, d.total_spend, d.transaction_count) for d in after["all-time"][2]]
    with pytest.raises(InvalidArgumentError, match="start"):
        await store.spend_by_user(odd_start, NOW)
    with pytest.raises(InvalidArgumentError, match="end"):
        await store.daily_spend(WINDOWS["all-time"][0], odd_end)
    with pytest.raises(InvalidArgumentError, match="start"):
        await store.aggregate_stats(odd_start, NOW)
    with pytest.raises(InvalidArgumentError, match="end"):
        await store.top_users(5, WINDOWS["all-time"][0], odd_end)
    with pytest.raises(InvalidArgumentError, match="start"):
        await store.spend_by_model(odd_start, NOW)


async def test_refund_of_an_archived_row_is_refused_as_archived(
    store: CreditStore, user_id: str, other_user_id: str, clock: FakeClock, tmp_path: Path
) -> None:
    """An archived debit refunds as transaction_archived; an unknown id is still not found."""
    h = await _history(store, clock, user_id, other_user_id)
    await store.archive_ledger(CUTOFF, tmp_path / "archive.jsonl.gz")
    balances = (await store.get_balance(h.a), await store.get_balance(h.b))

    archived = await store.refund_credits(h.usage_a1, 1)
    archived_rest = await store.refund_credits(h.usage_b2, idempotency_key="late")
    unknown = await store.refund_credits("tx-never-written", 1)
    kept = await store.refund_credits(h.usage_a4, 1)

    assert ErrorCode.TRANSACTION_ARCHIVED == archived.error == "transaction_archived"
    assert ErrorCode.TRANSACTION_ARCHIVED == archived_rest.error
    assert ErrorCode.TRANSACTION_NOT_FOUND == unknown.error
    assert kept.ok
    assert balances[1] == await store.get_balance(h.b)
    assert balances[0].balance + 1 == (await store.get_balance(h.a)).balance
    lines = read_archive(tmp_path / "archive.jsonl.gz")
    await assert_archived_invariants(store, h.a, lines)
    await assert_archived_invariants(store, h.b, lines)


async def test_archive_dry_run_counts_and_changes_nothing(
    store: CreditStore, user_id: str, other_user_id: str, clock: FakeClock, tmp_path: Path
) -> None:
    """A dry run reports what would go and writes no file; the same cutoff in another zone's
    clothes is accepted; a second archive with the cutoff finds nothing left."""
    h = await _history(store, clock, user_id, other_user_id)
    ledgers = await _ledgers(store, h)
    destination = tmp_path / "archive.jsonl.gz"
    seen: list[ArchiveResult] = []

    dry = await store.archive_ledger(CUTOFF, destination, dry_run=True, progress=seen.append)
    unchanged = await _ledgers(store, h)
    exists_after_dry = destination.exists()
    east = datetime(2026, 5, 1, 2, tzinfo=timezone(timedelta(hours=2)))
    real = await store.archive_ledger(east, destination)
    size = destination.stat().st_size
    again = await store.archive_ledger(CUTOFF, destination)

    assert (14, True, 0, CUTOFF) == (dry.rows, dry.dry_run, dry.bytes_written, dry.before)
    assert seen
    assert dry == seen[-1]
    assert ledgers == unchanged
    assert not exists_after_dry
    assert (14, False, CUTOFF) == (real.rows, real.dry_run, real.before)
    assert (0, 0) == (again.rows, again.bytes_written)
    assert size == destination.stat().st_size
    assert 14 == len(read_archive(destination))


async def test_archiving_twice_into_one_file_appends(
    store: CreditStore, user_id: str, other_user_id: str, clock: FakeClock, tmp_path: Path
) -> None:
    """March goes first, April next: the file holds both, in order, each row once."""
    h = await _history(store, clock, user_id, other_user_id)
    old = _old(await _ledgers(store, h))
    destination = tmp_path / "archive.jsonl.gz"
    april = datetime(2026, 4, 1, tzinfo=UTC)

    first = await store.archive_ledger(april, destination)
    first_lines = read_archive(destination)
    second = await store.archive_ledger(CUTOFF, destination)
    lines = read_archive(destination)

    march = [r.id for r in old if r.created_at < april]
    assert (len(march), len(old) - len(march)) == (first.rows, second.rows)
    assert 0 < first.rows < len(old)
    assert sorted(march) == sorted(line["id"] for line in first_lines)
    assert first_lines == lines[: first.rows]
    assert sorted(r.id for r in old) == sorted(line["id"] for line in lines)
    assert len(lines) == len({line["id"] for line in lines})
    assert destination.stat().st_size == first.bytes_written + second.bytes_written
    await assert_archived_invariants(store, h.a, lines)
    await assert_archived_invariants(store, h.b, lines)
    await assert_archived_invariants(store, h.team, lines, team=True)


ArchiveCall = Callable[[CreditStore, Path], Awaitable[Any]]


def _archive_call(before: Any, name: str = "archive.jsonl.gz", **options: Any) -> ArchiveCall:
    def call(store: CreditStore, folder: Path) -> Awaitable[Any]:
        return store.archive_ledger(before, folder / name, **options)

    return call


def _archive_to(destination: Callable[[Path], Any]) -> ArchiveCall:
    def call(store: CreditStore, folder: Path) -> Awaitable[Any]:
        return store.archive_ledger(CUTOFF, destination(folder))

    return call


@pytest.mark.parametrize(
    ("call", "name"),
    [
        pytest.param(_archive_call(datetime(2026, 5, 1)), "before", id="naive"),
        pytest.param(_archive_call("2026-05-01T00:00:00Z"), "before", id="text"),
        pytest.param(_archive_call(datetime(2026, 5, 1, tzinfo=UTC).date()), "before", id="date"),
        pytest.param(
            _archive_call(datetime(2026, 4, 30, 12, tzinfo=UTC)), "before", id="not-midnight"
        ),
        pytest.param(
            _archive_call(datetime(2026, 5, 1, tzinfo=timezone(timedelta(hours=2)))),
            "before",
            id="midnight-elsewhere",
        ),
        pytest.param(_archive_call(datetime(2026, 5, 2, tzinfo=UTC)), "before", id="this-month"),
        pytest.param(_archive_call(datetime(2026, 6, 1, tzinfo=UTC)), "before", id="next-month"),
        pytest.param(_archive_to(lambda f: f / "missing" / "a.gz"), "destination", id="no-folder"),
        pytest.param(_archive_to(lambda f: f), "destination", id="a-folder"),
        pytest.param(_archive_to(lambda f: 7), "destination", id="an-int"),
        pytest.param(_archive_to(lambda f: ""), "destination", id="empty"),
        pytest.param(_archive_call(CUTOFF, dry_run="yes"), "dry_run", id="dry-run-text"),
        pytest.param(_archive_call(CUTOFF, progress=5), "progress", id="progress-int"),
    ],
)
async def test_archive_misuse_raises_and_changes_nothing(
    store: CreditStore,
    user_id: str,
    clock: FakeClock,
    tmp_path: Path,
    call: ArchiveCall,
    name: str,
) -> None:
    """A bad argument raises InvalidArgumentError naming it; no file, every row kept."""
    await store.add_credits(user_id, 50, "purchase")
    await _usage(store, user_id, 5, "m1")
    clock.set(NOW)
    folder = tmp_path / "out"
    folder.mkdir()
    rows = await all_rows(store, user_id)

    with pytest.raises(InvalidArgumentError, match=re.escape(name)):
        await call(store, folder)

    assert [] == list(folder.iterdir())
    assert rows == await all_rows(store, user_id)
    done = await store.archive_ledger(CUTOFF, folder / "archive.jsonl.gz", dry_run=True)
    assert 2 == done.rows
    await assert_invariants(store, user_id)
