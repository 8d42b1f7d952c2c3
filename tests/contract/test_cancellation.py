"""
Cancellation: a store call cancelled at any point happened completely or not at all.

Many concurrent tasks grant, adjust, hold, settle, release, refund, spend from a team pool and
top it up, each call under a random kind of cancellation: a deadline of 0, 1e-6 or a few
microseconds, or a scope another task cancels after a random number of checkpoints. Every
call carries an idempotency key (release needs none), so a cancelled call is settled afterwards
by sending it again: a replay says it had happened, a fresh result says it had not. Then the
books must add up exactly: balances, ledger rows, holds, the floor and the team pool.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, get_args

import anyio
import pytest
from anyio.abc import TaskGroup
from anyio.lowlevel import checkpoint
from tests.contract._checks import all_rows, all_team_rows, assert_invariants

from ducto.errors import ErrorCode
from ducto.interface.base import CreditStore
from ducto.interface.models import TransactionRow

pytestmark = pytest.mark.anyio

SCALE: dict[str, float] = {"MemoryStore": 1.0}
"""Task-count factor per store class; a store not listed runs at `DEFAULT_SCALE`."""
DEFAULT_SCALE = 0.2
SCALE_ENV = "DUCTO_STRESS_SCALE"
"""Set to a float to override the factor for every store (e.g. 0.05 for a quick run)."""
TIMEOUT = 60.0
CANCEL_RATE = 0.35
"""Share of calls run under some kind of cancellation."""
CANCEL_AFTER = (0, 0, 1, 2, 3, 5, 8, 13, 21, 34, 55)
"""How many checkpoints the cancelling task waits: at once, mid-queue for a lock, or later."""

T = TypeVar("T")


def scaled(store: CreditStore, count: int, minimum: int = 1) -> int:
    """Return `count` sized for `store`: full size in memory, a fraction for slower stores."""
    override = os.environ.get(SCALE_ENV)
    factor = float(override) if override else SCALE.get(type(store).__name__, DEFAULT_SCALE)
    return max(minimum, round(count * factor))


async def _cancel_after(scope: anyio.CancelScope, checkpoints: int) -> None:
    for _ in range(checkpoints):
        await checkpoint()
    scope.cancel()


async def _maybe_cancelled(
    tg: TaskGroup, rng: random.Random, call: Callable[[], Awaitable[T]]
) -> T | None:
    """Run `call`, perhaps under a tiny deadline or a scope cancelled by another task."""
    if rng.random() >= CANCEL_RATE:
        return await call()
    result: T | None = None
    if rng.random() < 0.5:
        with anyio.move_on_after(rng.choice([0.0, 1e-6, rng.uniform(0.0, 5e-5)])):
            result = await call()
    else:
        with anyio.CancelScope() as scope:
            tg.start_soon(_cancel_after, scope, rng.choice(CANCEL_AFTER))
            result = await call()
    return result


Kind = Literal["grant", "adjust", "reserve", "deduct", "release", "refund", "team", "topup"]
ROW_TYPES: dict[str, str] = {
    "grant": "purchase",
    "adjust": "adjustment",
    "deduct": "usage",
    "refund": "refund",
    "team": "team_usage",
    "topup": "team_topup",
}
"""The ledger row each keyed call writes (a hold writes none)."""


@dataclass
class _Op:
    """One store call: how to send it (again), and its definitive result."""

    kind: Kind
    account: str
    call: Callable[[], Awaitable[Any]]
    key: str | None = None
    member: str = ""
    amount: int = 0
    reservation_id: str = ""
    hold: int = 0
    result: Any = None
    cancelled: bool = False


class _Storm:
    """Concurrent tasks of store calls under random cancellation, and the books they leave."""

    def __init__(self, store: CreditStore, users: list[str], team_id: str, seed: int) -> None:
        self.store = store
        self.users = users
        self.team_id = team_id
        self.seed = seed
        self.ops: list[_Op] = []

    async def run(self, tasks: int) -> None:
        """Run `tasks` tasks at once, then settle every cancelled call by sending it again."""
        with anyio.fail_after(TIMEOUT):
            async with anyio.create_task_group() as tg:
                for n in range(tasks):
                    tg.start_soon(self._task, tg, n)
            for op in self.ops:
                if op.result is None:
                    await self._resolve(op)

    async def _send(self, tg: TaskGroup, rng: random.Random, op: _Op) -> Any:
        self.ops.append(op)
        op.result = await _maybe_cancelled(tg, rng, op.call)
        op.cancelled = op.result is None
        return op.result

    async def _task(self, tg: TaskGroup, n: int) -> None:
        rng = random.Random(self.seed * 1_000_003 + n)
        store, team_id = self.store, self.team_id
        user = rng.choice(self.users)
        key = f"{self.seed}-{n}"
        script = rng.choices(["grant", "adjust", "hold", "team", "topup"], [10, 10, 55, 20, 5])[0]
        if script == "grant":
            amount = rng.randint(1, 50)
            await self._send(
                tg,
                rng,
                _Op(
                    "grant",
                    user,
                    lambda: store.add_credits(user, amount, "purchase", idempotency_key=key),
                    key=key,
                ),
            )
        elif script == "adjust":
            amount = -rng.randint(1, 20)
            await self._send(
                tg,
                rng,
                _Op(
                    "adjust",
                    user,
                    lambda: store.add_credits(user, amount, idempotency_key=key),
                    key=key,
                ),
            )
        elif script == "topup":
            amount = rng.randint(1, 100)
            await self._send(
                tg,
                rng,
                _Op(
                    "topup",
                    team_id,
                    lambda: store.add_team_credits(team_id, amount, idempotency_key=key),
                    key=key,
                ),
            )
        elif script == "team":
            await self._team_script(tg, rng, user, key)
        else:
            await self._hold_script(tg, rng, user, key)

    async def _hold_script(self, tg: TaskGroup, rng: random.Random, user: str, key: str) -> None:
        store = self.store
        amount, floor = rng.randint(1, 20), rng.randint(0, 5)
        reserve = _Op(
            "reserve",
            user,
            lambda: store.reserve_credits(
                user, amount, "chat", min_balance=floor, idempotency_key=key
            ),
            key=key,
            amount=amount,
        )
        held = await self._send(tg, rng, reserve)
        if held is None or not held.ok:
            return
        rid = held.reservation_id
        await checkpoint()
        then = rng.choices(["deduct", "release", "keep"], [65, 20, 15])[0]
        if then == "keep":
            return
        if then == "release":
            release = _Op(
                "release", user, lambda: store.release_reservation(user, rid), reservation_id=rid
            )
            await self._send(tg, rng, release)
            return
        charge = rng.randint(0, 30)
        deduct = _Op(
            "deduct",
            user,
            lambda: store.deduct_credits(user, rid, charge, key),
            key=key,
            amount=charge,
            reservation_id=rid,
            hold=amount,
        )
        settled = await self._send(tg, rng, deduct)
        if settled is not None and settled.ok and settled.charged and rng.random() < 0.4:
            await self._refund(tg, rng, user, settled.transaction_id, settled.charged, key)

    async def _team_script(self, tg: TaskGroup, rng: random.Random, user: str, key: str) -> None:
        store, team_id = self.store, self.team_id
        amount = rng.randint(1, 20)
        spend = _Op(
            "team",
            team_id,
            lambda: store.deduct_team(team_id, user, amount, idempotency_key=key),
            key=key,
            member=user,
        )
        spent = await self._send(tg, rng, spend)
        if spent is not None and spent.ok and rng.random() < 0.4:
            await self._refund(tg, rng, team_id, spent.transaction_id, amount, key, member=user)

    async def _refund(
        self,
        tg: TaskGroup,
        rng: random.Random,
        account: str,
        tx: str,
        paid: int,
        key: str,
        member: str = "",
    ) -> None:
        store = self.store
        amount = None if rng.random() < 0.3 else rng.randint(1, paid)
        refund = _Op(
            "refund",
            account,
            lambda: store.refund_credits(tx, amount, idempotency_key=key),
            key=key,
            member=member,
        )
        await self._send(tg, rng, refund)

    async def _ledger(self, account: str) -> list[TransactionRow]:
        return (
            await all_team_rows(self.store, account)
            if account == self.team_id
            else (await all_rows(self.store, account))
        )

    async def _resolve(self, op: _Op) -> None:
        """Send a cancelled call again and check it happened completely or not at all."""
        row_type = ROW_TYPES.get(op.kind)
        before: list[TransactionRow] = []
        if row_type is not None:
            before = [
                row
                for row in await self._ledger(op.account)
                if row.type == row_type and row.idempotency_key == op.key
            ]
            assert len(before) <= 1, f"one key, several rows: {before}"
        result = await op.call()
        if op.kind == "release":
            assert (True, True) == (result.ok, result.released)
        elif row_type is not None:
            tx = result.refund_transaction_id if op.kind == "refund" else result.transaction_id
            if before:
                # its row is there: the cancelled call happened, and the retry replays it
                assert (True, True, before[0].id) == (result.ok, result.idempotent, tx)
            else:
                # no row: it did not happen, and the retry is a fresh call (applied or refused)
                assert not result.idempotent
                if op.kind == "deduct":
                    assert result.ok, f"retry of a cancelled deduct failed: {result}"
        op.result = result


async def _storm(store: CreditStore, user_id: str, seed: int, accounts: int) -> None:
    users = [f"{user_id}-{n}" for n in range(accounts)]
    initial = {}
    for user in users:
        initial[user] = (await store.add_credits(user, 300, "purchase")).transaction_id
    team = await store.create_team("pool", initial_balance=1000)
    capped = users[0]
    for user in users:
        await store.add_team_member(team.team_id, user, spend_cap=100 if user == capped else None)
    storm = _Storm(store, users, team.team_id, seed)

    await storm.run(scaled(store, 1500, minimum=100))

    ops = storm.ops
    assert all(op.result is not None for op in ops)
    assert any(op.cancelled for op in ops), "nothing was cancelled: raise CANCEL_RATE"
    ok = [op for op in ops if op.result.ok]
    for user in users:
        mine = [op for op in ok if op.account == user]
        credited = sum(op.result.amount for op in mine if op.kind in ("grant", "adjust", "refund"))
        charged = sum(op.result.charged for op in mine if op.kind == "deduct")
        holds = {op.result.reservation_id: op.amount for op in mine if op.kind == "reserve"}
        settled = Counter(op.reservation_id for op in mine if op.kind == "deduct")
        released = {op.reservation_id for op in mine if op.kind == "release"}
        active = {rid: a for rid, a in holds.items() if rid not in settled and rid not in released}
        overruns = sum(max(0, op.result.charged - op.hold) for op in mine if op.kind == "deduct")

        balance = await store.get_balance(user)
        assert (300 + credited - charged, sum(active.values())) == (
            balance.balance,
            balance.reserved,
        )
        # the floor: only an overrun past its hold may take balance - holds below zero
        assert balance.balance - balance.reserved + overruns >= 0
        rows = await all_rows(store, user)
        expected_ids = {initial[user]} | {
            op.result.refund_transaction_id if op.kind == "refund" else op.result.transaction_id
            for op in mine
            if op.kind in ("grant", "adjust", "deduct", "refund")
        }
        assert expected_ids == {row.id for row in rows}
        assert len(expected_ids) == len(rows)
        assert settled == Counter(row.reservation_id for row in rows if row.type == "usage")
        assert all(1 == n for n in settled.values())
        await assert_invariants(store, user)
        # every hold is where the books say: active ones release now, settled ones cannot be
        for rid in holds:
            release = await store.release_reservation(user, rid)
            if rid in settled:
                assert ErrorCode.RESERVATION_ALREADY_SETTLED == release.error
            else:
                assert (True, True) == (release.ok, release.released)
        for rid in released:
            assert (
                ErrorCode.RESERVATION_RELEASED == (await store.deduct_credits(user, rid, 0)).error
            )
        assert 0 == (await store.get_balance(user)).reserved

    team_ops = [op for op in ok if op.account == team.team_id]
    topped = sum(op.result.amount for op in team_ops if op.kind == "topup")
    spent = sum(op.result.charged for op in team_ops if op.kind == "team")
    refunded = sum(op.result.amount for op in team_ops if op.kind == "refund")
    pool = await store.get_team_balance(team.team_id)
    assert (1000 + topped - spent + refunded, pool.balance) == (pool.balance, pool.available)
    assert pool.balance >= 0
    rows = await all_team_rows(store, team.team_id)
    running = 0
    for row in rows:
        running += row.amount
        assert running == row.balance_after
    assert pool.balance == running
    expected_ids = {team.transaction_id} | {
        op.result.refund_transaction_id if op.kind == "refund" else op.result.transaction_id
        for op in team_ops
    }
    assert expected_ids == {row.id for row in rows}
    assert len(expected_ids) == len(rows)
    net: Counter[str] = Counter()
    for op in team_ops:
        if op.kind in ("team", "refund"):
            net[op.member] += -op.result.amount
    members = {m.user_id: m.total_spent for m in await store.get_team_members(team.team_id)}
    assert {user: net[user] for user in users} == members
    assert members[capped] <= 100


@pytest.mark.parametrize(("seed", "accounts"), [(1, 3), (2, 30), (3, 300)])
async def test_random_cancellation_keeps_the_books(
    store: CreditStore, user_id: str, seed: int, accounts: int
) -> None:
    """1,500 tasks under random cancellation leave balances, ledgers, holds and the pool exact."""
    await _storm(store, user_id, seed, scaled(store, accounts, minimum=3))


# -- a call in a cancelled scope ------------------------------------------------------------------

Call = Literal[
    "add_credits",
    "negative_adjustment",
    "reserve_credits",
    "deduct_credits",
    "release_reservation",
    "refund_credits",
    "deduct_team",
    "add_team_credits",
]


@pytest.mark.parametrize("call", get_args(Call))
async def test_a_call_past_its_deadline_changes_nothing(
    store: CreditStore, user_id: str, call: Call
) -> None:
    """Every store call is a checkpoint: under an expired deadline it is cancelled, unapplied."""
    await store.add_credits(user_id, 100, "purchase")
    hold = await store.reserve_credits(user_id, 10, "chat")
    done = await store.reserve_credits(user_id, 10, "chat")
    tx = (await store.deduct_credits(user_id, done.reservation_id, 10)).transaction_id
    team = await store.create_team("pool", initial_balance=50)
    await store.add_team_member(team.team_id, user_id)
    calls: dict[Call, Callable[[], Awaitable[object]]] = {
        "add_credits": lambda: store.add_credits(user_id, 5, "purchase", idempotency_key="k"),
        "negative_adjustment": lambda: store.add_credits(user_id, -5, idempotency_key="k"),
        "reserve_credits": lambda: store.reserve_credits(user_id, 5, "chat", idempotency_key="k"),
        "deduct_credits": lambda: store.deduct_credits(user_id, hold.reservation_id, 5, "k"),
        "release_reservation": lambda: store.release_reservation(user_id, hold.reservation_id),
        "refund_credits": lambda: store.refund_credits(tx, 5, idempotency_key="k"),
        "deduct_team": lambda: store.deduct_team(team.team_id, user_id, 5, idempotency_key="k"),
        "add_team_credits": lambda: store.add_team_credits(team.team_id, 5, idempotency_key="k"),
    }
    before = (
        await store.get_balance(user_id),
        await all_rows(store, user_id),
        await store.list_lots(user_id),
        await store.get_team_balance(team.team_id),
    )

    with anyio.move_on_after(0) as scope:
        await calls[call]()

    assert scope.cancelled_caught
    after = (
        await store.get_balance(user_id),
        await all_rows(store, user_id),
        await store.list_lots(user_id),
        await store.get_team_balance(team.team_id),
    )
    assert before == after
    # the key was not consumed: the same call now applies afresh
    result = await calls[call]()
    assert getattr(result, "ok", True)
    assert not getattr(result, "idempotent", False)


async def test_a_cancelled_call_changed_nothing(store: CreditStore, user_id: str) -> None:
    """Under random deadlines, a hold exists exactly when its reserve call returned."""
    await store.add_credits(user_id, 1_000_000, "purchase")
    rng = random.Random(20261127)
    returned: list[int] = []

    async def reserve_once() -> None:
        with anyio.move_on_after(rng.uniform(0, 0.002)):
            hold = await store.reserve_credits(user_id, 1, "chat", min_balance=0)
            returned.append(hold.amount)

    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            for _ in range(scaled(store, 300, minimum=100)):
                tg.start_soon(reserve_once)

    assert sum(returned) == (await store.get_balance(user_id)).reserved
    await assert_invariants(store, user_id)
