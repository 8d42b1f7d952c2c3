"""
PostgresStore under a storm of cancellations: a cancelled caller gets its cancellation and
nothing else, no pooled connection is lost to it, and the books stay exact.

Tasks make every kind of mutating call, most of them under a deadline drawn at random across
the few milliseconds a call takes (so cancellations land while waiting for a connection, while
a round trip is on the wire, between the two round trips and after the commit), or in a scope
another task cancels after a random number of checkpoints. Each call carries an idempotency key
where the API takes one. Afterwards every cancelled keyed call is sent again: a replay says it
had happened whole, a fresh result says it had not happened at all.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import anyio
import pytest
from anyio.abc import TaskGroup
from anyio.lowlevel import checkpoint
from tests.contract._checks import all_team_rows, assert_invariants
from tests.contract.test_cancellation import _cancel_after

from ducto.errors import ErrorCode
from ducto.interface.models import SpendCap

pytestmark = pytest.mark.postgres

psycopg = pytest.importorskip("psycopg")

from ducto.interface.postgres import PostgresStore  # noqa: E402

POOL = 4
TASKS = 48
CALLS = 1_700
MIN_CANCELLED = 1_000
PRICING = {
    "models": {"_default": "input_tokens * 1 + output_tokens * 2"},
    "plans": {"pro": {"id": "pro", "name": "Pro", "free_allowance": 50}},
}


@pytest.fixture
async def store(anyio_backend: str, url: str, schema: str) -> AsyncIterator[PostgresStore]:
    """A store with a fixed pool, so that a connection lost would show in its statistics."""
    async with PostgresStore(url, schema=schema, min_size=POOL, max_size=POOL) as opened:
        await opened.setup()
        yield opened


@dataclass
class _Call:
    """One mutating call: how to send it (again), and what became of it."""

    kind: str
    send: Callable[[], Awaitable[Any]]
    key: str | None = None
    account: str = ""
    member: str = ""
    result: Any = None
    cancelled: bool = False


class _Storm:
    """Concurrent tasks making every kind of mutating call, mostly under cancellation."""

    def __init__(self, store: PostgresStore, users: list[str], team_id: str, seed: int) -> None:
        self.store = store
        self.users = users
        self.team_id = team_id
        self.rng = random.Random(seed)
        self.calls: list[_Call] = []
        self.holds: dict[str, tuple[str, str | None]] = {}  # reservation id -> (user, team)
        self.debits: list[str] = []
        self.sent = 0

    async def run(self) -> None:
        with anyio.fail_after(240):
            async with anyio.create_task_group() as tg:
                for n in range(TASKS):
                    tg.start_soon(self._task, tg, n)

    async def _send(self, tg: TaskGroup, call: _Call) -> Any:
        """Send `call`, most often under a random deadline or a scope cancelled by another task."""
        self.calls.append(call)
        rng = self.rng
        roll = rng.random()
        if roll < 0.12:
            call.result = await call.send()
            return call.result
        if roll < 0.75:
            # Across the whole life of a call: queued, on the wire, between round trips.
            scope = anyio.move_on_after(rng.choice([0.0, rng.uniform(0, 0.006)]))
        else:
            scope = anyio.CancelScope()
            tg.start_soon(_cancel_after, scope, rng.randint(0, 12))
        with scope:
            call.result = await call.send()
        call.cancelled = scope.cancel_called
        return call.result

    async def _task(self, tg: TaskGroup, n: int) -> None:
        rng = random.Random(self.rng.random())
        while self.sent < CALLS:
            self.sent += 1
            user = rng.choice(self.users)
            key = f"k{n}-{self.sent}"
            kind = rng.choices(
                ["grant", "adjust", "hold", "charge", "team", "team hold", "topup", "admin"],
                [8, 5, 30, 12, 10, 10, 5, 8],
            )[0]
            if kind == "hold":
                await self._hold(tg, rng, user, key, None)
            elif kind == "team hold":
                await self._hold(tg, rng, user, key, self.team_id)
            else:
                await self._one(tg, rng, kind, user, key)

    async def _one(self, tg: TaskGroup, rng: random.Random, kind: str, user: str, key: str) -> None:
        store, team = self.store, self.team_id
        if kind == "grant":
            amount = rng.randint(1, 40)
            expires = None if rng.random() < 0.8 else _soon(rng)
            call = _Call(
                kind if expires is None else "expiring grant",
                lambda: store.add_credits(
                    user, amount, "purchase", expires_at=expires, idempotency_key=key
                ),
                None if expires is not None else key,  # not sent again once it has expired
                user,
            )
        elif kind == "adjust":
            amount = -rng.randint(1, 10)
            call = _Call(
                kind, lambda: store.add_credits(user, amount, idempotency_key=key), key, user
            )
        elif kind == "charge":
            amount = rng.randint(0, 15)
            call = _Call(
                kind,
                lambda: store.charge_credits(
                    user, amount, "chat", min_balance=0, use_allowance=True, idempotency_key=key
                ),
                key,
                user,
            )
        elif kind == "team":
            amount = rng.randint(1, 10)
            call = _Call(
                kind,
                lambda: store.deduct_team(team, user, amount, idempotency_key=key),
                key,
                team,
                user,
            )
        elif kind == "topup":
            amount = rng.randint(1, 50)
            call = _Call(
                kind, lambda: store.add_team_credits(team, amount, idempotency_key=key), key, team
            )
        else:
            call = self._admin(rng, user)
        result = await self._send(tg, call)
        if (
            kind in ("charge", "team")
            and result is not None
            and result.ok
            and result.charged
            and rng.random() < 0.5
        ):
            await self._refund(tg, rng, result.transaction_id, key)

    def _admin(self, rng: random.Random, user: str) -> _Call:
        """A call that changes settings rather than balances (no key in the API)."""
        store, team = self.store, self.team_id
        choice = rng.randrange(9)
        if choice == 0:
            cap = SpendCap(user_id=user, cap_type="daily", limit=rng.randint(50, 500))
            return _Call("set cap", lambda: store.set_spend_cap(cap))
        if choice == 1:
            return _Call("remove cap", lambda: store.remove_spend_cap(user, "daily"))
        if choice == 2:
            return _Call("plan", lambda: store.set_user_plan(user, "pro"))
        if choice == 3:
            amount = rng.randint(1, 5)
            return _Call("usage window", lambda: store.increment_usage_window(user, "pro", amount))
        if choice == 4:
            cap_limit = rng.choice([None, 400])
            return _Call("member", lambda: store.add_team_member(team, user, spend_cap=cap_limit))
        if choice == 5:
            return _Call("new team", lambda: store.create_team("side", initial_balance=5))
        if choice == 6:
            return _Call("publish", lambda: store.set_active_pricing(PRICING, "storm"))
        if choice == 7:
            return _Call("activate", lambda: store.activate_pricing(1))
        return _Call("sweep", lambda: store.sweep_expired_credits())

    async def _hold(
        self, tg: TaskGroup, rng: random.Random, user: str, key: str, team: str | None
    ) -> None:
        store = self.store
        amount = rng.randint(1, 15)
        if team is None:
            reserve = _Call(
                "reserve",
                lambda: store.reserve_credits(
                    user, amount, "chat", min_balance=0, idempotency_key=key
                ),
                key,
                user,
            )
        else:
            reserve = _Call(
                "team reserve",
                lambda: store.reserve_team_credits(team, user, amount, "chat", idempotency_key=key),
                key,
                team,
                user,
            )
        held = await self._send(tg, reserve)
        if held is None or not held.ok:
            return
        rid = held.reservation_id
        self.holds[rid] = (user, team)
        await checkpoint()
        if rng.random() < 0.25:
            await self._send(
                tg,
                _Call("release", lambda: store.release_reservation(user, rid, team_id=team)),
            )
            return
        charge = rng.randint(0, amount + 5)
        settled = await self._send(
            tg,
            _Call(
                "deduct",
                lambda: store.deduct_credits(user, rid, charge, key, team_id=team),
                key,
                team or user,
                user,
            ),
        )
        if settled is not None and settled.ok and settled.charged and rng.random() < 0.4:
            await self._refund(tg, rng, settled.transaction_id, key)

    async def _refund(self, tg: TaskGroup, rng: random.Random, tx: str, key: str) -> None:
        store = self.store
        amount = None if rng.random() < 0.4 else rng.randint(1, 3)
        await self._send(
            tg,
            _Call(
                "refund",
                lambda: store.refund_credits(tx, amount, idempotency_key=key),
                key,
            ),
        )


def _soon(rng: random.Random) -> datetime:
    # Lots that expire while the storm runs, for the sweeps to write off.
    return datetime.now().astimezone() + timedelta(seconds=rng.uniform(0.2, 2.0))


async def test_a_thousand_cancellations_lose_no_connection_and_keep_the_books(
    store: PostgresStore, url: str, schema: str
) -> None:
    """Over 1,000 randomly timed cancellations of every kind of mutating call: no caller sees
    anything but its cancellation, no pooled connection is lost, every cancelled keyed call
    happened whole or not at all, and every ledger sums to its balance with no hold left open."""
    await store.set_active_pricing(PRICING, "start")
    users = [f"user-{n}" for n in range(12)]
    for user in users:
        await store.add_credits(user, 500, "purchase")
    team = await store.create_team("pool", initial_balance=2_000)
    for user in users:
        await store.add_team_member(team.team_id, user)
    before = store.statistics()
    storm = _Storm(store, users, team.team_id, seed=20261205)

    await storm.run()  # any exception but a cancellation, a ducto error included, fails here

    cancelled = [call for call in storm.calls if call.cancelled]
    after = store.statistics()
    assert len(cancelled) >= MIN_CANCELLED
    assert len({call.kind for call in cancelled}) >= 15
    # some were cancelled with a round trip on the wire: they completed, then saw the cancel
    assert sum(call.result is not None for call in cancelled) >= 100
    assert (POOL, 0, 0) == (
        after.connections_opened,
        after.connections_lost,
        after.connections_closed,
    )
    assert after.connections_opened == before.connections_opened

    # A cancelled keyed call, sent again, replays what it did or does it now for the first time.
    for call in cancelled:
        if call.key is None or call.kind == "refund":
            continue
        again = await call.send()
        if call.result is not None and getattr(call.result, "ok", False):
            assert again.idempotent, f"{call.kind} returned, yet its key did not replay: {again}"
        if call.kind == "reserve" and again.ok:
            storm.holds[again.reservation_id] = (call.account, None)
        elif call.kind == "team reserve" and again.ok:
            storm.holds[again.reservation_id] = (call.member, call.account)

    # Every hold is settled or released now; none is left open.
    for rid, (user, team_id) in storm.holds.items():
        released = await store.release_reservation(user, rid, team_id=team_id)
        assert released.ok or released.error is ErrorCode.RESERVATION_ALREADY_SETTLED
    with psycopg.connect(url, autocommit=True) as conn:
        open_holds = conn.execute(
            f"SELECT kind, account, id, member FROM {schema}.holds WHERE state = 0"
        ).fetchall()
    for kind, account, rid, member in open_holds:
        if kind == "t":
            assert (await store.release_reservation(member, rid, team_id=account)).ok
        else:
            assert (await store.release_reservation(account, rid)).ok

    for user in users:
        await assert_invariants(store, user)
        assert 0 == (await store.get_balance(user)).reserved
    pool = await store.get_team_balance(team.team_id)
    running = 0
    for row in await all_team_rows(store, team.team_id):
        running += row.amount
        assert running == row.balance_after
    assert (running, 0) == (pool.balance, pool.reserved)
    with psycopg.connect(url, autocommit=True) as conn:
        assert [(0,)] == conn.execute(
            f"SELECT count(*) FROM {schema}.holds WHERE state = 0"
        ).fetchall()
        # each key applied at most once per kind of row
        assert (
            []
            == conn.execute(
                f"SELECT kind, account, type, idempotency_key FROM {schema}.ledger"
                " WHERE idempotency_key IS NOT NULL"
                " GROUP BY 1, 2, 3, 4 HAVING count(*) > 1"
            ).fetchall()
        )
