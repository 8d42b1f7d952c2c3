"""
PostgresStore's batches: many operations in one transaction, on one shared snapshot, give the
results those operations give one at a time.

A seeded script draws batches of operations on two users and one team pool (so operations
share accounts all the time: holds settled next to new holds, refunds beside charges, caps set
before the holds they limit, scoped caps set before the scoped holds they limit, top-ups
claimed and finished beside charges, members added before they spend). Each batch runs as one
PostgresStore transaction; MemoryStore then runs the same operations one at a time, in the
serial order the batch reports. Every result, and the final state, must be the same.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import pytest
from tests.conftest import FakeClock
from tests.contract.test_differential import _Names

from ducto.errors import DuctoError, ErrorCode
from ducto.interface._group import Job
from ducto.interface.base import CreditStore
from ducto.interface.memory import MemoryStore
from ducto.interface.models import CreditMetadata, PlanDefinition, PricingConfigData, SpendCap

pytestmark = pytest.mark.postgres

pytest.importorskip("psycopg")

from ducto.interface.postgres import PostgresStore  # noqa: E402

START = datetime(2026, 3, 31, 20, 0, tzinfo=UTC)  # the month ends during the run
USERS = ("ann", "bob")
PRICING = PricingConfigData(
    models={"_default": "input_tokens * 1"},
    plans={"pro": PlanDefinition(id="pro", name="Pro", free_allowance=3000)},
)

Call = Callable[[CreditStore, _Names], Awaitable[Any]]


class _Script:
    """Draws operations on a few accounts; each refers only to what earlier batches made."""

    def __init__(self, seed: int, team: str) -> None:
        self.rng = random.Random(seed)
        self.team = team
        self.holds: list[tuple[str, str]] = []  # (user, hold name)
        self.team_holds: list[tuple[str, str]] = []
        self.debits: list[str] = []
        self.claims: list[tuple[str, str, int]] = []  # (user, claim name, amount)
        self.keys = 0

    def key(self) -> str | None:
        rng = self.rng
        if self.keys and rng.random() < 0.2:
            return f"k{rng.randint(1, self.keys)}"  # a retry, or a reuse for another request
        if rng.random() < 0.3:
            return None
        self.keys += 1
        return f"k{self.keys}"

    def draw(self) -> tuple[str, Call]:
        rng, team = self.rng, self.team
        user = rng.choice(USERS)
        meta = rng.choice(
            [
                None,
                CreditMetadata(model="m1"),
                CreditMetadata(model="m2"),
                CreditMetadata(scope="k1"),
                CreditMetadata(model="m1", scope="k1"),
                CreditMetadata(model="m2", scope="k2"),
            ]
        )
        key = self.key()
        roll = rng.randrange(26)
        if roll < 2:
            amount = rng.randint(1, 300)
            expires = rng.choice([None, START + timedelta(hours=rng.randint(1, 30))])
            return "grant", lambda s, n: s.add_credits(
                user, amount, "purchase", meta, expires, idempotency_key=key
            )
        if roll == 2:
            amount = -rng.randint(1, 60)
            return "adjust", lambda s, n: s.add_credits(user, amount, idempotency_key=key)
        if roll < 6:
            amount = rng.randint(1, 120)
            allowance = rng.random() < 0.5
            floor = rng.choice([0, 5])
            return f"reserve:{user}", lambda s, n: s.reserve_credits(
                user, amount, "chat", meta, floor, use_allowance=allowance, idempotency_key=key
            )
        if roll < 9 and self.holds:
            owner, hold = rng.choice(self.holds)
            amount = rng.choice([0, rng.randint(1, 150)])
            return "deduct", lambda s, n: s.deduct_credits(owner, n.ids[hold], amount, key, meta)
        if roll == 9 and self.holds:
            owner, hold = rng.choice(self.holds)
            return "release", lambda s, n: s.release_reservation(owner, n.ids[hold])
        if roll < 12:
            amount = rng.randint(0, 90)
            allowance = rng.random() < 0.5
            return "charge", lambda s, n: s.charge_credits(
                user, amount, "job", meta, 0, use_allowance=allowance, idempotency_key=key
            )
        if roll == 12 and self.debits:
            tx = rng.choice(self.debits)
            amount = rng.choice([None, rng.randint(1, 40)])
            return "refund", lambda s, n: s.refund_credits(
                n.ids[tx], amount, "sorry", idempotency_key=key
            )
        if roll == 13:
            cap = SpendCap(
                user_id=user,
                cap_type=rng.choice(["daily", "monthly"]),
                model=rng.choice([None, "m1"]),
                limit=rng.choice([60, 200, 900]),
                action=rng.choice(["deny", "warn"]),
                scope=rng.choice([None, None, "k1", "k2"]),
            )
            if rng.random() < 0.3:
                return "uncap", lambda s, n: s.remove_spend_cap(
                    user, cap.cap_type, cap.model, scope=cap.scope
                )
            return "cap", lambda s, n: s.set_spend_cap(cap)
        if roll == 14:
            model = rng.choice([None, "m1"])
            extra = rng.randint(0, 100)
            scope = rng.choice([None, "k1", "k2"])
            return "check_cap", lambda s, n: s.check_spend_cap(user, model, extra, scope=scope)
        if roll == 15:
            return "balance", lambda s, n: s.get_balance(user)
        if roll == 16:
            return "lots", lambda s, n: s.list_lots(user)
        if roll == 17:
            return "ledger", lambda s, n: s.list_transactions(user, limit=5)
        if roll == 18:
            cap_limit = rng.choice([None, 80, 400])
            if rng.random() < 0.2:
                return "unmember", lambda s, n: s.remove_team_member(n.ids[team], user)
            return "member", lambda s, n: s.add_team_member(n.ids[team], user, spend_cap=cap_limit)
        if roll == 19:
            amount = rng.randint(1, 80)
            return "team_deduct", lambda s, n: s.deduct_team(
                n.ids[team], user, amount, meta, idempotency_key=key
            )
        if roll == 20:
            amount = rng.randint(1, 80)
            return f"team_hold:{user}", lambda s, n: s.reserve_team_credits(
                n.ids[team], user, amount, "chat", meta, idempotency_key=key
            )
        if roll == 21 and self.team_holds:
            member, hold = rng.choice(self.team_holds)
            amount = rng.randint(0, 100)
            if rng.random() < 0.3:
                return "team_release", lambda s, n: s.release_reservation(
                    member, n.ids[hold], team_id=n.ids[team]
                )
            return "team_settle", lambda s, n: s.deduct_credits(
                member, n.ids[hold], amount, key, team_id=n.ids[team]
            )
        if roll == 23:
            threshold = rng.choice([300, 4000, 6000])  # available counts the plan allowance
            amount = rng.choice([50, 200])
            limit = rng.choice([300, 1000])
            return f"claim:{user}", lambda s, n: s.claim_top_up(
                user, threshold=threshold, amount=amount, monthly_limit=limit, ttl=600
            )
        if roll == 24 and self.claims:
            owner, claim, amount = rng.choice(self.claims)
            paid = rng.random() < 0.6
            reference = f"pay-{claim}" if paid else None
            return "finish", lambda s, n: s.finish_top_up(
                owner, n.ids[claim], amount, payment_reference=reference
            )
        if roll == 22:
            which = rng.randrange(3)
            if which == 0:
                return "team_balance", lambda s, n: s.get_team_balance(n.ids[team])
            if which == 1:
                return "team_members", lambda s, n: s.get_team_members(n.ids[team])
            amount = rng.randint(1, 200)
            return "team_topup", lambda s, n: s.add_team_credits(n.ids[team], amount)
        which = rng.randrange(3)
        if which == 0:
            return "plan", lambda s, n: s.set_user_plan(user, "pro")
        if which == 1:
            amount = rng.randint(1, 20)
            return "window", lambda s, n: s.increment_usage_window(user, "pro", amount)
        return "allowance", lambda s, n: s.check_allowance(user)

    def learn(self, kind: str, outcome: Any) -> None:
        if not isinstance(outcome, dict) or outcome.get("error") is not None:
            return
        if kind.startswith("reserve:"):
            self.holds.append((kind.split(":")[1], outcome["reservation_id"]))
        elif kind.startswith("team_hold:"):
            self.team_holds.append((kind.split(":")[1], outcome["reservation_id"]))
        elif kind.startswith("claim:") and outcome.get("claimed"):
            self.claims.append((kind.split(":")[1], outcome["claim_id"], outcome["amount"]))
        elif kind in ("deduct", "charge", "team_deduct", "team_settle") and outcome.get(
            "transaction_id"
        ):
            self.debits.append(outcome["transaction_id"])


class _Later:
    """What a recorded call will return once its batch has run."""

    def __init__(self, job: Job) -> None:
        self.job = job


def _recording(store: PostgresStore, jobs: list[Job]) -> None:
    """Make the store queue each call's operation as a job instead of running it."""
    from ducto.interface import postgres as P

    async def record(op: Any, keys: Any, *args: Any, write: bool = True) -> _Later:
        job = Job(op, args, write, sorted(set(keys)), op in P._ALONE)
        jobs.append(job)
        return _Later(job)

    store._run = record  # type: ignore[method-assign]


def _outcome(names: _Names, value: Any) -> Any:
    if isinstance(value, BaseException):
        return {"raised": type(value).__name__, "message": str(value)}
    return names.plain(value)


def _value(recorded: Any, job: Job | None) -> Any:
    """What a recorded call returned (or raised) once its job ran."""
    if job is not None and job.error is not None:
        return job.error
    return job.result if isinstance(recorded, _Later) and job is not None else recorded


async def _memory_call(call: Call, store: CreditStore, names: _Names) -> Any:
    try:
        return await call(store, names)
    except DuctoError as exc:
        return exc


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_batches_give_the_results_of_one_operation_at_a_time(
    anyio_backend: str, url: str, schema: str, seed: int
) -> None:
    """Hundreds of random batches on a few accounts: each operation's result and the final
    state are MemoryStore's, run one at a time in the order the batch reports."""
    pg_clock, mem_clock = FakeClock(START), FakeClock(START)
    pg_names, mem_names = _Names(), _Names()
    async with (
        PostgresStore(url, schema=schema, clock=pg_clock, max_batch=1000) as pg,
        MemoryStore(clock=mem_clock) as mem,
    ):
        await pg.setup()
        for store, names in ((pg, pg_names), (mem, mem_names)):
            await store.set_active_pricing(PRICING)
            for user in USERS:
                await store.add_credits(user, 500, "purchase")
            await store.set_user_plan(USERS[0], "pro")  # the other gets it on the way
            team = await store.create_team("pool", initial_balance=300)
            pool = names.name(team.team_id)
        script = _Script(seed, pool)
        jobs: list[Job] = []
        real_run = pg._run
        for _ in range(150):
            batch = [script.draw() for _ in range(script.rng.randint(1, 12))]
            # PostgresStore: every call queued, then run as one transaction.
            jobs.clear()
            _recording(pg, jobs)
            recorded: list[Any] = []
            made: list[Job | None] = []
            for _, call in batch:
                queued = len(jobs)
                try:
                    recorded.append(await call(pg, pg_names))
                except DuctoError as exc:  # refused by the argument checks: no job
                    recorded.append(exc)
                made.append(jobs[queued] if len(jobs) > queued else None)
            pg._run = real_run  # type: ignore[method-assign]
            if jobs:
                with anyio.fail_after(60):
                    await pg._transact(lambda: pg._steps(list(jobs)))
            pg_out = [
                _outcome(pg_names, _value(value, job))
                for value, job in zip(recorded, made, strict=True)
            ]
            # MemoryStore: the same calls one at a time, in the batch's serial order.
            order = sorted(
                range(len(batch)), key=lambda i: made[i].order if made[i] is not None else 0
            )
            raw: list[Any] = [None] * len(batch)
            for i in order:
                raw[i] = await _memory_call(batch[i][1], mem, mem_names)
            # ids are named in the order the steps were drawn, on both sides
            mem_out = [_outcome(mem_names, value) for value in raw]
            for (kind, _), mine, theirs in zip(batch, pg_out, mem_out, strict=True):
                assert theirs == mine, kind
            for (kind, _), outcome in zip(batch, pg_out, strict=True):
                script.learn(kind, outcome)
            seconds = script.rng.choice([0, 0, 60, 3600, 4 * 3600])
            pg_clock.advance(seconds)
            mem_clock.advance(seconds)

        team_id = pg_names.ids[script.team]
        final = []
        for store, names in ((pg, pg_names), (mem, mem_names)):
            tid = names.ids[script.team]
            state = [
                await store.get_team_balance(tid),
                await store.get_team_members(tid),
                (await store.list_team_transactions(tid, limit=1000)).items,
            ]
            for user in USERS:
                state += [
                    await store.get_balance(user),
                    (await store.list_transactions(user, limit=1000)).items,
                    await store.list_lots(user),
                    await store.list_spend_caps(user),
                    await store.check_allowance(user),
                    await store.check_spend_cap(user, "m1", scope="k1"),
                ]
            state.append(await store.spend_by_scope(START - timedelta(days=1), pg_clock.now))
            final.append(names.plain(state))
        assert final[0] == final[1]
        assert team_id
        assert script.debits, "the script never charged anything"
        assert script.claims, "the script never claimed a top-up"


async def _one_batch(store: PostgresStore, calls: list[Callable[[], Awaitable[Any]]]) -> list[Any]:
    """Run `calls` as one batch (one transaction); their results in call order."""
    jobs: list[Job] = []
    real_run = store._run
    _recording(store, jobs)
    try:
        recorded = [await call() for call in calls]
    finally:
        store._run = real_run  # type: ignore[method-assign]
    with anyio.fail_after(60):
        await store._transact(lambda: store._steps(list(jobs)))
    return [_value(value, job) for value, job in zip(recorded, jobs, strict=True)]


@pytest.mark.parametrize("capped_before", [False, True])
async def test_a_scoped_cap_set_in_a_batch_limits_the_holds_after_it(
    anyio_backend: str, url: str, schema: str, capped_before: bool
) -> None:
    """A scoped cap set in a batch counts the scoped holds made before it in the batch and in
    earlier ones, for a user with no caps before and for one with only an unscoped cap."""
    k1 = CreditMetadata(model="m1", scope="k1")
    async with PostgresStore(url, schema=schema, clock=FakeClock(START)) as store:
        await store.setup()
        await store.add_credits("ann", 1000, "purchase")
        if capped_before:
            await store.set_spend_cap(SpendCap(user_id="ann", cap_type="daily", limit=900))
        earlier = await store.reserve_credits("ann", 30, "chat", k1, 0)
        results = await _one_batch(
            store,
            [
                lambda: store.reserve_credits("ann", 40, "chat", k1, 0),
                lambda: store.set_spend_cap(
                    SpendCap(user_id="ann", cap_type="daily", limit=100, scope="k1")
                ),
                lambda: store.reserve_credits("ann", 31, "chat", k1, 0),
                lambda: store.reserve_credits("ann", 30, "chat", CreditMetadata(scope="k1"), 0),
                lambda: store.reserve_credits("ann", 500, "chat", CreditMetadata(scope="k2"), 0),
                lambda: store.check_spend_cap("ann", "m1", 0, scope="k1"),
            ],
        )
        settled = await store.deduct_credits("ann", earlier.reservation_id, 30)
        after = await store.check_spend_cap("ann", "m2", 0, scope="k1")

    first, _, refused, fits, elsewhere, check = results
    assert (True, False, True, True) == (first.ok, refused.ok, fits.ok, elsewhere.ok)
    assert ErrorCode.SPEND_CAP_EXCEEDED == refused.error
    assert ("k1", 70) == (refused.cap_scope, refused.cap_reserved)
    assert (100, 0, "k1") == (check.reserved, check.current_spend, check.scope)
    assert settled.ok
    assert (30, 70) == (after.current_spend, after.reserved)
