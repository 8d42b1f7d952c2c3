"""
Concurrency: heavy mixed traffic, and races of which exactly N calls may win.

Every test here drives the store through its public API from many concurrent tasks and then
checks the outcome against what serial execution allows: holds never take spendable below the
floor, a hold is settled once, an idempotency key is applied once, a pool or a refundable
amount is never overdrawn. Task counts scale with the store (see `scaled`), so a file-backed
store runs the same tests with fewer tasks.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from typing import Literal

import anyio
import pytest
from anyio.lowlevel import checkpoint
from tests.conftest import FakeClock
from tests.contract._checks import all_rows, all_team_rows, assert_invariants

from ducto.errors import ErrorCode
from ducto.interface.base import CreditStore
from ducto.interface.models import (
    AddCreditsResult,
    DeductionResult,
    RefundResult,
    ReleaseResult,
    ReserveResult,
    TeamDeductionResult,
    TeamTopupResult,
    TransactionRow,
)

pytestmark = pytest.mark.anyio

SCALE: dict[str, float] = {"MemoryStore": 1.0}
"""Task-count factor per store class; a store not listed runs at `DEFAULT_SCALE`."""
DEFAULT_SCALE = 0.2
SCALE_ENV = "DUCTO_STRESS_SCALE"
"""Set to a float to override the factor for every store (e.g. 0.05 for a quick run)."""
TIMEOUT = 60.0


def scaled(store: CreditStore, count: int, minimum: int = 1) -> int:
    """Return `count` sized for `store`: full size in memory, a fraction for slower stores."""
    override = os.environ.get(SCALE_ENV)
    factor = float(override) if override else SCALE.get(type(store).__name__, DEFAULT_SCALE)
    return max(minimum, round(count * factor))


async def _run_all(calls: list[Callable[[], Awaitable[None]]]) -> None:
    """Start every call as its own task at once and wait for all of them."""
    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            for call in calls:
                tg.start_soon(call)


# -- mixed traffic -------------------------------------------------------------------------------

Action = Literal["deduct", "retry", "race", "release", "release_race"]


@dataclass
class _Plan:
    """What one task does: hold `amount`, yield, then settle (or release) it."""

    index: int
    user: str
    amount: int
    min_balance: int
    reserve_copies: int
    action: Action
    charges: list[int]


@dataclass
class _Outcome:
    """Everything one task saw."""

    plan: _Plan
    holds: list[ReserveResult] = field(default_factory=list)
    deducts: list[tuple[str | None, int, DeductionResult]] = field(default_factory=list)
    releases: list[ReleaseResult] = field(default_factory=list)


def _plan(rng: random.Random, index: int, user: str) -> _Plan:
    amount = rng.randint(1, 10)
    action: Action = rng.choices(
        ["deduct", "retry", "race", "release", "release_race"], [50, 15, 15, 10, 10]
    )[0]
    copies = 1 if action in ("deduct", "release") else rng.randint(2, 3)
    charges: list[int] = []
    for _ in range(copies):
        kind = rng.choice(["less", "exact", "more"])
        if kind == "less":
            charges.append(rng.randint(0, amount - 1))
        elif kind == "exact":
            charges.append(amount)
        else:
            charges.append(rng.randint(amount + 1, 2 * amount + 5))
    if action == "retry":
        charges = [charges[0]] * copies
    return _Plan(
        index=index,
        user=user,
        amount=amount,
        min_balance=rng.randint(0, 5),
        reserve_copies=2 if rng.random() < 0.1 else 1,
        action=action,
        charges=charges,
    )


async def _act(store: CreditStore, plan: _Plan, out: _Outcome) -> None:
    """Reserve (maybe twice with one key), yield, then settle or release as planned."""
    reserve_key = f"hold-{plan.index}"

    async def reserve() -> None:
        out.holds.append(
            await store.reserve_credits(
                plan.user,
                plan.amount,
                "chat",
                min_balance=plan.min_balance,
                idempotency_key=reserve_key,
            )
        )

    async with anyio.create_task_group() as tg:
        for _ in range(plan.reserve_copies):
            tg.start_soon(reserve)
    held = [r for r in out.holds if r.ok]
    if not held:
        return
    reservation_id = held[0].reservation_id
    await checkpoint()

    async def deduct(key: str | None, charge: int) -> None:
        result = await store.deduct_credits(plan.user, reservation_id, charge, key)
        out.deducts.append((key, charge, result))

    async def release() -> None:
        out.releases.append(await store.release_reservation(plan.user, reservation_id))

    async with anyio.create_task_group() as tg:
        if plan.action == "release":
            tg.start_soon(release)
        elif plan.action == "deduct":
            tg.start_soon(deduct, f"settle-{plan.index}", plan.charges[0])
        elif plan.action == "retry":
            for charge in plan.charges:
                tg.start_soon(deduct, f"settle-{plan.index}", charge)
        elif plan.action == "race":
            for n, charge in enumerate(plan.charges):
                tg.start_soon(deduct, f"settle-{plan.index}-{n}" if n else None, charge)
        else:  # release_race: a deduct and a release, started in either order
            if plan.index % 2:
                tg.start_soon(release)
            tg.start_soon(deduct, f"settle-{plan.index}", plan.charges[0])
            if not plan.index % 2:
                tg.start_soon(release)


async def _mixed_traffic(store: CreditStore, users: list[str], tasks: int, seed: int) -> None:
    """Run `tasks` hold-and-settle tasks spread over `users` at once, then check the books."""
    rng = random.Random(seed)
    per_user = max(1, tasks // len(users))
    credits = dict.fromkeys(users, 2 * per_user)  # demand averages 5.5 a task: contention
    for user in users:
        await store.add_credits(user, credits[user], "purchase")
    outcomes = [_Outcome(_plan(rng, n, users[n % len(users)])) for n in range(tasks)]
    await _run_all([lambda o=o: _act(store, o.plan, o) for o in outcomes])

    refused = 0
    settled: dict[str, list[tuple[str, int, int, str | None]]] = {user: [] for user in users}
    for out in outcomes:
        plan = out.plan
        assert plan.reserve_copies == len(out.holds)
        held = [r for r in out.holds if r.ok]
        refused += len(out.holds) - len(held)
        assert {ErrorCode.INSUFFICIENT_CREDITS} >= {r.error for r in out.holds if not r.ok}
        # one key, one hold: a single fresh success, every other success a replay of it
        assert len({r.reservation_id for r in held}) <= 1
        assert (1 if held else 0) == sum(not r.idempotent for r in held)
        if not held:
            assert ([], []) == (out.deducts, out.releases)
            continue
        rid = held[0].reservation_id
        wins = [(key, charge, r) for key, charge, r in out.deducts if r.ok and not r.idempotent]
        released = [r for r in out.releases if r.ok]
        assert all(r.released for r in released)
        # one hold, one settlement: either one deduct or (only in a race with it) the release
        assert 1 == len(wins) + len(released), f"hold {rid} resolved {wins} {released}"
        if wins:
            key, charge, win = wins[0]
            assert (charge, rid, key) == (win.charged, win.reservation_id, win.idempotency_key)
            settled[plan.user].append((rid, plan.amount, charge, key))
        for key, charge, r in out.deducts:
            if r.ok and r.idempotent:  # a replay: same key, same stored result
                assert wins
                assert (wins[0][0], wins[0][2].transaction_id, charge) == (
                    key,
                    r.transaction_id,
                    r.charged,
                )
            elif not r.ok:
                expected = {ErrorCode.RESERVATION_ALREADY_SETTLED, ErrorCode.RESERVATION_RELEASED}
                assert r.error in expected, f"unexpected {r}"
        for r in out.releases:
            assert r.ok or ErrorCode.RESERVATION_ALREADY_SETTLED == r.error
        if plan.action == "retry":
            assert len(plan.charges) - 1 == sum(r.idempotent for _, _, r in out.deducts)
    assert refused > 0, "the run never hit the floor: raise the contention"

    for user in users:
        rows = await all_rows(store, user)
        usage = [row for row in rows if row.type == "usage"]
        expected = sorted((rid, -charge, key) for rid, _, charge, key in settled[user])
        assert expected == sorted((r.reservation_id, r.amount, r.idempotency_key) for r in usage)
        keys = [r.idempotency_key for r in usage if r.idempotency_key is not None]
        assert len(keys) == len(set(keys))
        charged = sum(charge for _, _, charge, _ in settled[user])
        balance = await store.get_balance(user)
        assert (credits[user] - charged, 0) == (balance.balance, balance.reserved)
        # The floor, replayed from the books: a hold may only be granted while
        # balance - holds - amount >= min_balance >= 0, and settling a hold of `a` for `d` lowers
        # balance - holds by d - a only when d <= a (an overrun becomes debt the floor allows).
        # So credits minus, for every settled hold, min(charge, hold) can never go below zero.
        assert credits[user] - sum(min(a, d) for _, a, d, _ in settled[user]) >= 0
        await assert_invariants(store, user)


async def test_mixed_traffic_across_many_users(store: CreditStore, user_id: str) -> None:
    """10,000 tasks hold, yield and settle, retry or release across 100 users; the books add up."""
    users = [f"{user_id}-{n}" for n in range(scaled(store, 100))]

    await _mixed_traffic(store, users, scaled(store, 10_000), seed=1)


async def test_mixed_traffic_on_one_hot_user(store: CreditStore, user_id: str) -> None:
    """1,000 tasks hold, yield and settle, retry or release on one user; the books add up."""
    await _mixed_traffic(store, [user_id], scaled(store, 1_000, minimum=50), seed=2)


# -- holds: exactly N succeed ------------------------------------------------------------------


async def test_concurrent_holds_never_overspend(store: CreditStore, user_id: str) -> None:
    """50 concurrent 1-credit holds against 10 spendable credits: exactly 10 succeed."""
    await store.add_credits(user_id, 10, "purchase")
    results: list[ReserveResult] = []

    async def try_reserve() -> None:
        results.append(await store.reserve_credits(user_id, 1, "chat", min_balance=0))

    await _run_all([try_reserve] * 50)

    assert 10 == sum(r.ok for r in results)
    assert {ErrorCode.INSUFFICIENT_CREDITS} == {r.error for r in results if not r.ok}
    balance = await store.get_balance(user_id)
    assert (0, 10) == (balance.available, balance.reserved)
    await assert_invariants(store, user_id)


async def test_concurrent_holds_stop_at_the_floor(store: CreditStore, user_id: str) -> None:
    """200 concurrent 1-credit holds with a floor of 20 against 100 credits: exactly 80 succeed."""
    await store.add_credits(user_id, 100, "purchase")
    results: list[ReserveResult] = []

    async def try_reserve() -> None:
        results.append(await store.reserve_credits(user_id, 1, "chat", min_balance=20))

    await _run_all([try_reserve] * scaled(store, 200, minimum=100))

    assert 80 == sum(r.ok for r in results)
    balance = await store.get_balance(user_id)
    assert (20, 80) == (balance.available, balance.reserved)


async def test_concurrent_reserve_retries_hold_once(store: CreditStore, user_id: str) -> None:
    """50 concurrent reserves with one idempotency key create one hold; the rest replay it."""
    await store.add_credits(user_id, 100, "purchase")
    results: list[ReserveResult] = []

    async def try_reserve() -> None:
        results.append(await store.reserve_credits(user_id, 30, "chat", idempotency_key="req-1"))

    await _run_all([try_reserve] * 50)

    assert all(r.ok for r in results)
    assert 1 == len({r.reservation_id for r in results})
    assert 1 == sum(not r.idempotent for r in results)
    assert 30 == (await store.get_balance(user_id)).reserved


async def test_concurrent_holds_and_top_ups_never_overspend(
    store: CreditStore, user_id: str
) -> None:
    """Holds racing top-ups never hold more than was granted by the time they were granted."""
    await store.add_credits(user_id, 5, "purchase")
    held: list[ReserveResult] = []
    granted: list[AddCreditsResult] = []

    async def try_reserve() -> None:
        held.append(await store.reserve_credits(user_id, 1, "chat", min_balance=0))

    async def top_up() -> None:
        granted.append(await store.add_credits(user_id, 1, "purchase"))

    await _run_all([try_reserve] * 100 + [top_up] * 20)

    assert all(g.ok for g in granted)
    assert 25 >= sum(r.ok for r in held)
    balance = await store.get_balance(user_id)
    assert (25, sum(r.ok for r in held)) == (balance.balance, balance.reserved)
    assert balance.available >= 0


# -- settlement: one hold, one charge ---------------------------------------------------------


async def test_concurrent_deducts_settle_a_hold_once(store: CreditStore, user_id: str) -> None:
    """50 concurrent deducts of one hold under different keys: one charges, 49 find it settled."""
    await store.add_credits(user_id, 100, "purchase")
    hold = await store.reserve_credits(user_id, 10, "chat")
    results: list[DeductionResult] = []

    async def try_deduct(n: int) -> None:
        key = f"attempt-{n}" if n % 2 else None
        results.append(await store.deduct_credits(user_id, hold.reservation_id, 7, key))

    await _run_all([lambda n=n: try_deduct(n) for n in range(50)])

    assert 1 == sum(r.ok for r in results)
    assert {ErrorCode.RESERVATION_ALREADY_SETTLED} == {r.error for r in results if not r.ok}
    usage = [r for r in await all_rows(store, user_id) if r.type == "usage"]
    assert [(-7, hold.reservation_id)] == [(r.amount, r.reservation_id) for r in usage]
    balance = await store.get_balance(user_id)
    assert (93, 0) == (balance.balance, balance.reserved)


async def test_concurrent_deduct_retries_apply_a_key_once(store: CreditStore, user_id: str) -> None:
    """50 concurrent deducts with one key: one fresh success, 49 replays of the same row."""
    await store.add_credits(user_id, 100, "purchase")
    hold = await store.reserve_credits(user_id, 10, "chat")
    results: list[DeductionResult] = []

    async def try_deduct() -> None:
        results.append(await store.deduct_credits(user_id, hold.reservation_id, 12, "settle-1"))

    await _run_all([try_deduct] * 50)

    assert all(r.ok for r in results)
    assert 1 == sum(not r.idempotent for r in results)
    assert 1 == len({r.transaction_id for r in results})
    assert {(-12, 12)} == {(r.amount, r.charged) for r in results}
    usage = [r for r in await all_rows(store, user_id) if r.type == "usage"]
    assert [("settle-1", -12)] == [(r.idempotency_key, r.amount) for r in usage]
    assert 88 == (await store.get_balance(user_id)).balance


async def test_deduct_racing_release_resolves_a_hold_once(store: CreditStore, user_id: str) -> None:
    """A deduct and a release racing for each of 200 holds: exactly one of the two wins."""
    holds = scaled(store, 200, minimum=20)
    await store.add_credits(user_id, 10 * holds, "purchase")
    ids = [
        (await store.reserve_credits(user_id, 10, "chat", min_balance=0)).reservation_id
        for _ in range(holds)
    ]
    deducts: dict[str, DeductionResult] = {}
    releases: dict[str, ReleaseResult] = {}

    async def deduct(rid: str) -> None:
        deducts[rid] = await store.deduct_credits(user_id, rid, 10)

    async def release(rid: str) -> None:
        releases[rid] = await store.release_reservation(user_id, rid)

    calls: list[Callable[[], Awaitable[None]]] = []
    for n, rid in enumerate(ids):
        pair = [lambda rid=rid: deduct(rid), lambda rid=rid: release(rid)]
        calls += pair if n % 2 else pair[::-1]
    await _run_all(calls)

    charged = 0
    for rid in ids:
        d, r = deducts[rid], releases[rid]
        assert 1 == d.ok + r.ok, f"{rid}: deduct {d.error}, release {r.error}"
        if d.ok:
            charged += 1
            assert ErrorCode.RESERVATION_ALREADY_SETTLED == r.error
        else:
            assert ErrorCode.RESERVATION_RELEASED == d.error
    usage = [r for r in await all_rows(store, user_id) if r.type == "usage"]
    assert charged == len(usage)
    balance = await store.get_balance(user_id)
    assert (10 * holds - 10 * charged, 0) == (balance.balance, balance.reserved)


# -- grants and adjustments ---------------------------------------------------------------------


async def test_concurrent_grant_retries_grant_once(store: CreditStore, user_id: str) -> None:
    """A webhook delivered 50 times at once grants once; 49 deliveries replay the grant."""
    results: list[AddCreditsResult] = []

    async def deliver() -> None:
        results.append(await store.add_credits(user_id, 40, "purchase", idempotency_key="evt-1"))

    await _run_all([deliver] * 50)

    assert all(r.ok for r in results)
    assert 1 == sum(not r.idempotent for r in results)
    assert 1 == len({r.transaction_id for r in results})
    balance = await store.get_balance(user_id)
    assert (40, 40) == (balance.balance, balance.lifetime_purchased)
    assert 1 == len(await all_rows(store, user_id))


async def test_concurrent_negative_adjustments_stop_at_zero(
    store: CreditStore, user_id: str
) -> None:
    """100 concurrent -1 adjustments against 70 available (30 held): exactly 70 succeed."""
    await store.add_credits(user_id, 100, "purchase")
    assert (await store.reserve_credits(user_id, 30, "chat", min_balance=0)).ok
    results: list[AddCreditsResult] = []

    async def take_one() -> None:
        results.append(await store.add_credits(user_id, -1, "adjustment"))

    await _run_all([take_one] * 100)

    assert 70 == sum(r.ok for r in results)
    assert {ErrorCode.INSUFFICIENT_CREDITS} == {r.error for r in results if not r.ok}
    balance = await store.get_balance(user_id)
    assert (30, 30, 0) == (balance.balance, balance.reserved, balance.available)
    await assert_invariants(store, user_id)


async def test_concurrent_adjustments_and_holds_share_the_balance(
    store: CreditStore, user_id: str
) -> None:
    """100 credits, 100 holds of 1 and 100 adjustments of -1 at once: exactly 100 succeed."""
    await store.add_credits(user_id, 100, "purchase")
    holds: list[ReserveResult] = []
    takes: list[AddCreditsResult] = []

    async def hold() -> None:
        holds.append(await store.reserve_credits(user_id, 1, "chat", min_balance=0))

    async def take() -> None:
        takes.append(await store.add_credits(user_id, -1, "adjustment"))

    calls: list[Callable[[], Awaitable[None]]] = []
    for _ in range(100):
        calls += [hold, take]
    await _run_all(calls)

    held, taken = sum(r.ok for r in holds), sum(r.ok for r in takes)
    assert 100 == held + taken
    balance = await store.get_balance(user_id)
    assert (100 - taken, held, 0) == (balance.balance, balance.reserved, balance.available)
    await assert_invariants(store, user_id)


# -- refunds ------------------------------------------------------------------------------------


async def _usage(store: CreditStore, user_id: str, amount: int) -> str:
    """Grant, hold and settle `amount`; return the usage transaction id."""
    await store.add_credits(user_id, 1000, "purchase")
    hold = await store.reserve_credits(user_id, amount, "chat", min_balance=0)
    return (await store.deduct_credits(user_id, hold.reservation_id, amount)).transaction_id


async def test_concurrent_partial_refunds_never_exceed_the_debit(
    store: CreditStore, user_id: str
) -> None:
    """60 concurrent refunds of 5 credits of a 100-credit usage: exactly 20 succeed."""
    tx = await _usage(store, user_id, 100)
    results: list[RefundResult] = []

    async def refund() -> None:
        results.append(await store.refund_credits(tx, 5))

    await _run_all([refund] * 60)

    assert 20 == sum(r.ok for r in results)
    assert {ErrorCode.ALREADY_REFUNDED} == {r.error for r in results if not r.ok}
    rows = await all_rows(store, user_id)
    assert 100 == next(r.refunded for r in rows if r.id == tx)
    assert 100 == sum(r.amount for r in rows if r.type == "refund")
    assert 1000 == (await store.get_balance(user_id)).balance
    await assert_invariants(store, user_id)


async def test_concurrent_mixed_refunds_never_exceed_the_debit(
    store: CreditStore, user_id: str
) -> None:
    """Concurrent refunds of 1 to 30 credits and of whatever is left never refund more than 100."""
    tx = await _usage(store, user_id, 100)
    rng = random.Random(3)
    results: list[RefundResult] = []

    async def refund(amount: int | None) -> None:
        results.append(await store.refund_credits(tx, amount))

    amounts = [None if rng.random() < 0.1 else rng.randint(1, 30) for _ in range(80)]
    await _run_all([lambda a=a: refund(a) for a in amounts])

    assert 100 == sum(r.amount for r in results if r.ok)
    refused = {ErrorCode.ALREADY_REFUNDED, ErrorCode.OVER_REFUND}
    assert refused >= {r.error for r in results if not r.ok}
    rows = await all_rows(store, user_id)
    assert 100 == sum(r.amount for r in rows if r.type == "refund")
    assert 1000 == (await store.get_balance(user_id)).balance


async def test_concurrent_refund_retries_apply_a_key_once(store: CreditStore, user_id: str) -> None:
    """50 concurrent refunds with one key refund once; the rest replay it."""
    tx = await _usage(store, user_id, 100)
    results: list[RefundResult] = []

    async def refund() -> None:
        results.append(await store.refund_credits(tx, 30, idempotency_key="refund-1"))

    await _run_all([refund] * 50)

    assert all(r.ok for r in results)
    assert 1 == sum(not r.idempotent for r in results)
    assert 1 == len({r.refund_transaction_id for r in results})
    assert 930 == (await store.get_balance(user_id)).balance


# -- teams --------------------------------------------------------------------------------------


async def _team_ledger(store: CreditStore, team_id: str) -> list[TransactionRow]:
    """A team pool's whole ledger, oldest first, checked to add up to the pool's balance."""
    rows = await all_team_rows(store, team_id)
    running = 0
    for row in rows:
        running += row.amount
        assert running == row.balance_after, f"balance_after broken at {row}"
    assert running == (await store.get_team_balance(team_id)).balance
    return rows


async def _team(store: CreditStore, balance: int, members: list[str], cap: int | None) -> str:
    team = await store.create_team("pool", initial_balance=balance)
    for member in members:
        assert (await store.add_team_member(team.team_id, member, spend_cap=cap)).ok
    return team.team_id


async def test_concurrent_team_deducts_never_overdraw_the_pool(
    store: CreditStore, user_id: str
) -> None:
    """300 concurrent 1-credit team deducts by 3 members against a pool of 100: exactly 100."""
    members = [f"{user_id}-{n}" for n in range(3)]
    team_id = await _team(store, 100, members, None)
    results: list[TeamDeductionResult] = []

    async def spend(member: str) -> None:
        results.append(await store.deduct_team(team_id, member, 1))

    await _run_all([lambda m=members[n % 3]: spend(m) for n in range(300)])

    assert 100 == sum(r.ok for r in results)
    assert {ErrorCode.INSUFFICIENT_TEAM_BALANCE} == {r.error for r in results if not r.ok}
    team = await store.get_team_balance(team_id)
    assert (0, 0) == (team.balance, team.available)
    spent = Counter(r.user_id for r in results if r.ok)
    listed = {m.user_id: m.total_spent for m in await store.get_team_members(team_id)}
    assert {m: spent[m] for m in members} == listed
    rows = await _team_ledger(store, team_id)
    assert 100 == sum(row.type == "team_usage" for row in rows)


async def test_concurrent_team_deducts_respect_the_member_cap(
    store: CreditStore, user_id: str
) -> None:
    """50 concurrent 1-credit team deducts by a member capped at 10: exactly 10 succeed."""
    team_id = await _team(store, 1000, [user_id], 10)
    results: list[TeamDeductionResult] = []

    async def spend() -> None:
        results.append(await store.deduct_team(team_id, user_id, 1))

    await _run_all([spend] * 50)

    assert 10 == sum(r.ok for r in results)
    assert {ErrorCode.SPEND_CAP_EXCEEDED} == {r.error for r in results if not r.ok}
    assert 990 == (await store.get_team_balance(team_id)).balance
    assert [10] == [m.total_spent for m in await store.get_team_members(team_id)]
    assert 10 == sum(row.type == "team_usage" for row in await _team_ledger(store, team_id))


async def test_concurrent_team_deduct_retries_apply_a_key_once(
    store: CreditStore, user_id: str
) -> None:
    """50 concurrent team deducts with one key charge the pool once; the rest replay."""
    team_id = await _team(store, 1000, [user_id], None)
    results: list[TeamDeductionResult] = []

    async def spend() -> None:
        results.append(await store.deduct_team(team_id, user_id, 25, idempotency_key="job-1"))

    await _run_all([spend] * 50)

    assert all(r.ok for r in results)
    assert 1 == sum(not r.idempotent for r in results)
    assert 1 == len({r.transaction_id for r in results})
    assert 975 == (await store.get_team_balance(team_id)).balance
    usage = [r for r in await _team_ledger(store, team_id) if r.type == "team_usage"]
    assert [("job-1", -25)] == [(r.idempotency_key, r.amount) for r in usage]


async def test_concurrent_team_top_up_retries_apply_a_key_once(
    store: CreditStore, user_id: str
) -> None:
    """50 concurrent team top-ups with one key credit the pool once; the rest replay."""
    team_id = await _team(store, 0, [user_id], None)
    results: list[TeamTopupResult] = []

    async def top_up() -> None:
        results.append(await store.add_team_credits(team_id, 500, idempotency_key="inv-1"))

    await _run_all([top_up] * 50)

    assert all(r.ok for r in results)
    assert 1 == sum(not r.idempotent for r in results)
    assert 500 == (await store.get_team_balance(team_id)).balance
    top_ups = [r for r in await _team_ledger(store, team_id) if r.idempotency_key == "inv-1"]
    assert [500] == [r.amount for r in top_ups]


async def test_concurrent_team_usage_refunds_never_exceed_the_debit(
    store: CreditStore, user_id: str
) -> None:
    """60 concurrent refunds of 5 of a 100-credit team usage: exactly 20, back into the pool."""
    team_id = await _team(store, 1000, [user_id], None)
    tx = (await store.deduct_team(team_id, user_id, 100)).transaction_id
    results: list[RefundResult] = []

    async def refund() -> None:
        results.append(await store.refund_credits(tx, 5))

    await _run_all([refund] * 60)

    assert 20 == sum(r.ok for r in results)
    assert {ErrorCode.ALREADY_REFUNDED} == {r.error for r in results if not r.ok}
    assert 1000 == (await store.get_team_balance(team_id)).balance
    assert [0] == [m.total_spent for m in await store.get_team_members(team_id)]
    rows = await _team_ledger(store, team_id)
    assert 100 == next(r.refunded for r in rows if r.id == tx)
    assert [5] * 20 == [r.amount for r in rows if r.type == "refund"]


# -- expiry -------------------------------------------------------------------------------------


LOTS_PER_USER = 10


async def _sweep_race(
    store: CreditStore, users: list[str], clock: FakeClock, rng: random.Random
) -> None:
    """Race sweeps against deducts drawing expired lots; check each lot went one way, once."""
    holds: list[tuple[str, str]] = []
    for user in users:
        for _ in range(LOTS_PER_USER):
            expires_at = clock.now + timedelta(hours=1)
            await store.add_credits(user, 5, "signup_bonus", expires_at=expires_at)
        for _ in range(LOTS_PER_USER):
            hold = await store.reserve_credits(user, 5, "chat", min_balance=0, ttl=86400)
            holds.append((user, hold.reservation_id))
    clock.advance(hours=2)  # every lot expires; the holds still count
    sweeps: list[tuple[int, int]] = []
    deducts: list[DeductionResult] = []

    async def sweep() -> None:
        result = await store.sweep_expired_credits()
        sweeps.append((result.expired_count, result.expired_amount))

    async def deduct(user: str, reservation_id: str, delay: int) -> None:
        for _ in range(delay):
            await checkpoint()
        # nothing live is left: the charge takes one whole expired lot, or runs into debt
        deducts.append(await store.deduct_credits(user, reservation_id, 5))

    calls: list[Callable[[], Awaitable[None]]] = [sweep] * 5
    for user, rid in holds:
        delay = rng.randint(0, 2 * len(users))
        calls.append(lambda u=user, r=rid, d=delay: deduct(u, r, d))
    rng.shuffle(calls)
    await _run_all(calls)

    assert len(holds) == sum(d.ok for d in deducts)
    expiry_rows: list[int] = []
    for user in users:
        expiry = [r.amount for r in await all_rows(store, user) if r.type == "expiry"]
        # a lot the sweep reached first is written off whole; one a deduct reached is not swept
        assert all(-5 == amount for amount in expiry), f"{user}: expiry rows {expiry}"
        expiry_rows += expiry
        balance = await store.get_balance(user)
        # every hold was charged its 5 once; what was swept is gone as well
        assert (sum(expiry), 0, 0) == (
            balance.balance,
            balance.expired_unswept,
            balance.reserved,
        )
        await assert_invariants(store, user)
    assert (len(expiry_rows), -sum(expiry_rows)) == tuple(map(sum, zip(*sweeps, strict=True)))


async def test_sweeps_racing_deducts_write_off_each_credit_once(
    store: CreditStore, user_id: str, clock: FakeClock
) -> None:
    """Sweeps racing deducts that draw expired lots write off only what is left, once."""
    rng = random.Random(4)
    for round_ in range(3):
        users = [f"{user_id}-{round_}-{n}" for n in range(scaled(store, 40, minimum=5))]
        await _sweep_race(store, users, clock, rng)


# -- concurrent reads ----------------------------------------------------------------------------


async def test_concurrent_reads_each_see_their_own_account(
    store: CreditStore, user_id: str
) -> None:
    """Reads of many accounts at once (a store may answer them together) each get their own."""
    users = [f"{user_id}-{n}" for n in range(12)]
    for n, user in enumerate(users):
        for k in range(n % 4 + 1):
            await store.add_credits(user, 10 * n + k + 1, "purchase")
        hold = await store.reserve_credits(user, 1, "chat", min_balance=0)
        await store.deduct_credits(user, hold.reservation_id, 1)

    async def read(user: str) -> tuple[object, ...]:
        return (
            (await store.list_transactions(user, limit=3)).model_dump(),
            (await store.list_transactions(user, types=["purchase"])).model_dump(),
            await store.get_balance(user),
            await store.list_lots(user),
        )

    alone = {user: await read(user) for user in users}
    together: dict[str, tuple[object, ...]] = {}

    async def remember(user: str) -> None:
        together[user] = await read(user)

    for _ in range(3):
        await _run_all([partial(remember, user) for user in users])
        assert alone == together
