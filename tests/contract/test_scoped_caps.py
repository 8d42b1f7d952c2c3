"""
Spend caps scoped to a budget scope (an API key, a project) on one balance.

A hold or charge names its scope in ``metadata.scope``; a cap with a scope counts and refuses
only that scope's usage, at hold time, atomically, like every other cap. Refusals and checks
say when the cap's window resets.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import pytest
from tests.conftest import FakeClock
from tests.contract._checks import all_rows, assert_invariants
from tests.contract._peers import peers

from ducto.errors import ErrorCode, InvalidArgumentError, SpendCapExceededError
from ducto.interface.base import CreditStore
from ducto.interface.models import CreditMetadata, ReserveResult, SpendCap

pytestmark = pytest.mark.anyio

NOON = datetime(2026, 3, 15, 12, 0, tzinfo=UTC)  # the `clock` fixture's start
MIDNIGHT = datetime(2026, 3, 16, tzinfo=UTC)
NEXT_MONTH = datetime(2026, 4, 1, tzinfo=UTC)


def _in(scope: str | None, model: str | None = None) -> CreditMetadata:
    return CreditMetadata(scope=scope, model=model)


async def _spend(store: CreditStore, user_id: str, amount: int, scope: str | None) -> None:
    """Paid usage of `amount` in `scope` (through a 1-credit hold that no cap blocks)."""
    hold = await store.reserve_credits(user_id, 1, "chat", _in(scope), min_balance=0)
    assert hold.ok, hold
    assert (await store.deduct_credits(user_id, hold.reservation_id, amount)).ok


async def _hold(
    store: CreditStore, user_id: str, amount: int, scope: str | None, model: str | None = None
) -> ReserveResult:
    return await store.reserve_credits(user_id, amount, "chat", _in(scope, model), min_balance=0)


async def _funded(store: CreditStore, user_id: str, *caps: SpendCap) -> None:
    await store.add_credits(user_id, 100_000, "purchase")
    for cap in caps:
        await store.set_spend_cap(cap)


# -- storage ------------------------------------------------------------------------------------


async def test_caps_are_keyed_by_scope_too(store: CreditStore, user_id: str) -> None:
    """A scoped cap lives beside the unscoped one and other scopes' caps; each is removed
    on its own, and the list orders the unscoped cap first, then by scope."""
    caps = [
        SpendCap(user_id=user_id, cap_type="daily", limit=900),
        SpendCap(user_id=user_id, cap_type="daily", limit=50, scope="key_b"),
        SpendCap(user_id=user_id, cap_type="daily", limit=20, scope="key_a"),
        SpendCap(user_id=user_id, cap_type="daily", model="m1", limit=10, scope="key_a"),
    ]
    for cap in caps:
        await store.set_spend_cap(cap)
    await store.set_spend_cap(SpendCap(user_id=user_id, cap_type="daily", limit=30, scope="key_a"))

    listed = await store.list_spend_caps(user_id)
    removed = await store.remove_spend_cap(user_id, "daily", scope="key_b")
    missing = await store.remove_spend_cap(user_id, "daily", scope="key_c")

    assert [(None, None, 900), (None, "key_a", 30), (None, "key_b", 50), ("m1", "key_a", 10)] == [
        (c.model, c.scope, c.limit) for c in listed
    ]
    assert (True, "key_b") == (removed.removed, removed.scope)
    assert not missing.removed
    assert 3 == len(await store.list_spend_caps(user_id))


async def test_bad_scopes_are_refused_by_name(store: CreditStore, user_id: str) -> None:
    """An empty or NUL scope is refused, naming where it was, and changes nothing."""
    with pytest.raises(InvalidArgumentError, match=r"cap\.scope"):
        await store.set_spend_cap(SpendCap(user_id=user_id, limit=1, scope=""))
    with pytest.raises(InvalidArgumentError, match=r"metadata\.scope"):
        await store.reserve_credits(user_id, 1, "chat", CreditMetadata(scope="a\x00b"))
    with pytest.raises(InvalidArgumentError, match="scope"):
        await store.check_spend_cap(user_id, scope="")
    with pytest.raises(InvalidArgumentError, match="scope"):
        await store.remove_spend_cap(user_id, "daily", scope="")

    assert [] == await store.list_spend_caps(user_id)
    assert 0 == (await store.get_balance(user_id)).reserved


# -- enforcement --------------------------------------------------------------------------------


async def test_a_scoped_cap_refuses_only_its_scope(store: CreditStore, user_id: str) -> None:
    """One key's daily budget runs out; the user's other keys and unscoped calls still spend
    from the same balance."""
    await _funded(store, user_id, SpendCap(user_id=user_id, cap_type="daily", limit=100, scope="a"))
    await _spend(store, user_id, 80, "a")

    refused = await _hold(store, user_id, 30, "a")
    other_key = await _hold(store, user_id, 500, "b")
    unscoped = await _hold(store, user_id, 500, None)
    fits = await _hold(store, user_id, 20, "a")

    assert ErrorCode.SPEND_CAP_EXCEEDED is refused.error
    assert (100, 80, "a", "daily", 0, MIDNIGHT) == (
        refused.cap_limit,
        refused.cap_spend,
        refused.cap_scope,
        refused.cap_type,
        refused.cap_reserved,
        refused.cap_resets_at,
    )
    assert other_key.ok
    assert unscoped.ok
    assert fits.ok
    with pytest.raises(SpendCapExceededError, match="in scope 'a'") as raised:
        refused.raise_for_error()
    assert ("a", MIDNIGHT) == (raised.value.scope, raised.value.resets_at)
    await assert_invariants(store, user_id)


async def test_an_unscoped_cap_counts_every_scope(store: CreditStore, user_id: str) -> None:
    """The user's own cap sees all of its keys' usage and holds."""
    await _funded(store, user_id, SpendCap(user_id=user_id, cap_type="monthly", limit=100))
    await _spend(store, user_id, 40, "a")
    held = await _hold(store, user_id, 40, "b")

    refused = await _hold(store, user_id, 30, "c")

    assert held.ok
    assert ErrorCode.SPEND_CAP_EXCEEDED is refused.error
    assert (None, 40, 40, NEXT_MONTH) == (
        refused.cap_scope,
        refused.cap_spend,
        refused.cap_reserved,
        refused.cap_resets_at,
    )


async def test_holds_in_a_scope_count_against_its_cap(store: CreditStore, user_id: str) -> None:
    """Open holds in the scope count, those of other scopes do not; a released hold frees it."""
    await _funded(store, user_id, SpendCap(user_id=user_id, cap_type="daily", limit=100, scope="a"))
    first = await _hold(store, user_id, 60, "a")
    await _hold(store, user_id, 90, "b")

    refused = await _hold(store, user_id, 50, "a")
    await store.release_reservation(user_id, first.reservation_id)
    after_release = await _hold(store, user_id, 50, "a")

    assert ErrorCode.SPEND_CAP_EXCEEDED is refused.error
    assert 60 == refused.cap_reserved
    assert after_release.ok


async def test_a_scoped_cap_on_a_model_needs_both(store: CreditStore, user_id: str) -> None:
    """A cap with a model and a scope covers that model in that scope only."""
    cap = SpendCap(user_id=user_id, cap_type="daily", model="m1", limit=50, scope="a")
    await _funded(store, user_id, cap)
    first = await _hold(store, user_id, 40, "a", "m1")

    same = await _hold(store, user_id, 20, "a", "m1")
    other_model = await _hold(store, user_id, 20, "a", "m2")
    other_scope = await _hold(store, user_id, 20, "b", "m1")

    assert first.ok
    assert ErrorCode.SPEND_CAP_EXCEEDED is same.error
    assert (40, "m1", "a") == (same.cap_reserved, same.cap_model, same.cap_scope)
    assert other_model.ok
    assert other_scope.ok


async def test_a_one_step_charge_is_capped_by_its_scope(store: CreditStore, user_id: str) -> None:
    """`charge_credits` checks the scoped cap too, and its usage counts in the scope."""
    await _funded(store, user_id, SpendCap(user_id=user_id, cap_type="daily", limit=100, scope="a"))

    first = await store.charge_credits(user_id, 70, "job", _in("a"), 0)
    refused = await store.charge_credits(user_id, 40, "job", _in("a"), 0)
    elsewhere = await store.charge_credits(user_id, 40, "job", _in("b"), 0)

    assert first.ok
    assert ErrorCode.SPEND_CAP_EXCEEDED is refused.error
    assert ("a", 70, MIDNIGHT) == (refused.cap_scope, refused.cap_spend, refused.cap_resets_at)
    assert elsewhere.ok


async def test_the_window_resets_when_it_says(
    store: CreditStore, user_id: str, clock: FakeClock
) -> None:
    """At ``resets_at`` the scope's daily spend starts again from 0."""
    await _funded(store, user_id, SpendCap(user_id=user_id, cap_type="daily", limit=100, scope="a"))
    await _spend(store, user_id, 100, "a")
    refused = await _hold(store, user_id, 1, "a")
    assert refused.cap_resets_at is not None

    clock.set(refused.cap_resets_at - timedelta(microseconds=1))
    still = await _hold(store, user_id, 1, "a")
    clock.set(refused.cap_resets_at)
    reset = await _hold(store, user_id, 100, "a")

    assert ErrorCode.SPEND_CAP_EXCEEDED is still.error
    assert reset.ok


async def test_a_refund_gives_the_scope_its_spend_back(store: CreditStore, user_id: str) -> None:
    """A refunded usage row no longer counts against its scope's cap."""
    await _funded(store, user_id, SpendCap(user_id=user_id, cap_type="daily", limit=100, scope="a"))
    hold = await _hold(store, user_id, 1, "a")
    usage = await store.deduct_credits(user_id, hold.reservation_id, 100)

    before = await _hold(store, user_id, 50, "a")
    await store.refund_credits(usage.transaction_id, 60)
    after = await _hold(store, user_id, 50, "a")

    assert ErrorCode.SPEND_CAP_EXCEEDED is before.error
    assert after.ok


async def test_check_spend_cap_sees_the_scope_and_says_when_it_resets(
    store: CreditStore, user_id: str
) -> None:
    """The advisory check counts the scope's spend and holds and names the window's end."""
    await _funded(
        store,
        user_id,
        SpendCap(user_id=user_id, cap_type="daily", limit=100, scope="a"),
        SpendCap(user_id=user_id, cap_type="monthly", limit=10_000),
    )
    await _spend(store, user_id, 70, "a")
    await _hold(store, user_id, 20, "a")

    in_scope = await store.check_spend_cap(user_id, amount=20, scope="a")
    other = await store.check_spend_cap(user_id, amount=20, scope="b")

    assert (True, True, 70, 20, "a", "daily", MIDNIGHT) == (
        in_scope.capped,
        in_scope.exceeded,
        in_scope.current_spend,
        in_scope.reserved,
        in_scope.scope,
        in_scope.cap_type,
        in_scope.resets_at,
    )
    assert (False, None, "monthly", NEXT_MONTH) == (
        other.capped,
        other.scope,
        other.cap_type,
        other.resets_at,
    )


async def test_warn_caps_in_a_scope_warn_on_its_usage_only(
    store: CreditStore, user_id: str
) -> None:
    """A scoped warn cap warns when its scope passes the limit, not for other scopes."""
    await _funded(
        store,
        user_id,
        SpendCap(user_id=user_id, cap_type="daily", limit=10, scope="a", action="warn"),
    )
    other = await store.charge_credits(user_id, 50, "job", _in("b"), 0)
    mine = await store.charge_credits(user_id, 50, "job", _in("a"), 0)

    assert other.cap_warning is None
    assert "warn" == mine.cap_warning


# -- the ledger and analytics -------------------------------------------------------------------


async def test_usage_rows_and_analytics_carry_the_scope(store: CreditStore, user_id: str) -> None:
    """The scope is on the usage row; spend by scope is net of refunds, per user and scope."""
    await store.add_credits(user_id, 10_000, "purchase")
    await _spend(store, user_id, 100, "a")
    await _spend(store, user_id, 30, "a")
    hold = await _hold(store, user_id, 1, "b")
    usage = await store.deduct_credits(user_id, hold.reservation_id, 200)
    await store.refund_credits(usage.transaction_id, 50)
    await store.charge_credits(user_id, 5, "job", None, 0)
    other = f"{user_id}-2"
    await store.add_credits(other, 100, "purchase")
    await _spend(store, other, 7, "a")

    rows = [r for r in await all_rows(store, user_id) if r.type == "usage"]
    window = (NOON - timedelta(days=1), NOON + timedelta(days=1))
    mine = await store.spend_by_scope(*window, user_id=user_id)
    everyone = await store.spend_by_scope(*window)

    assert ["a", "a", "b", None] == [r.metadata.get("scope") for r in rows]
    assert [("b", 150, 1), ("a", 130, 2), (None, 5, 1)] == [
        (r.scope, r.total_spend, r.transaction_count) for r in mine
    ]
    assert {(other, "a", 7, 1)} <= {
        (r.user_id, r.scope, r.total_spend, r.transaction_count) for r in everyone
    }
    with pytest.raises(InvalidArgumentError, match="user_id"):
        await store.spend_by_scope(*window, user_id="")


async def test_spend_by_scope_keeps_archived_days(
    store: CreditStore, user_id: str, clock: FakeClock, tmp_path: Path
) -> None:
    """Archived usage keeps its scope in the daily rollups: the analytics do not change."""
    clock.set(datetime(2026, 1, 10, 12, tzinfo=UTC))
    await store.add_credits(user_id, 10_000, "purchase")
    await _spend(store, user_id, 100, "a")
    await _spend(store, user_id, 40, None)
    window = (datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 3, 1, tzinfo=UTC))
    before = await store.spend_by_scope(*window)
    clock.set(datetime(2026, 3, 15, tzinfo=UTC))

    archived = await store.archive_ledger(datetime(2026, 2, 1, tzinfo=UTC), tmp_path / "a.gz")
    after = await store.spend_by_scope(*window)

    assert archived.rows >= 3
    assert before == after
    assert [("a", 100), (None, 40)] == [(r.scope, r.total_spend) for r in after]


# -- concurrency --------------------------------------------------------------------------------


async def test_a_scoped_cap_holds_against_200_concurrent_holds(
    store: CreditStore, user_id: str, tmp_path: Path, clock: FakeClock
) -> None:
    """
    200 holds on one key at once against its daily cap, from several processes, while the
    user's other keys keep placing holds: exactly as many of the key's holds as its budget
    allows are placed, and every other key's hold is.
    """
    await _funded(
        store, user_id, SpendCap(user_id=user_id, cap_type="daily", limit=1_000, scope="key_1")
    )
    capped: list[ReserveResult] = []
    free: list[ReserveResult] = []

    async def hold(peer: CreditStore, scope: str, into: list[ReserveResult]) -> None:
        into.append(await _hold(peer, user_id, 30, scope))

    async with peers(store, tmp_path, clock, 4) as fleet:
        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                for n in range(200):
                    tg.start_soon(hold, fleet[n % len(fleet)], "key_1", capped)
                    if n % 4 == 0:
                        tg.start_soon(hold, fleet[n % len(fleet)], f"key_{2 + n % 3}", free)

    placed = [r for r in capped if r.ok]
    assert 1_000 // 30 == len(placed)
    assert {ErrorCode.SPEND_CAP_EXCEEDED} == {r.error for r in capped if not r.ok}
    assert 50 == len(free)
    assert all(r.ok for r in free)
    check = await store.check_spend_cap(user_id, scope="key_1")
    assert (1_000 // 30) * 30 == check.reserved
    await assert_invariants(store, user_id)
