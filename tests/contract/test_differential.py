"""
Every store gives the same answers: one seeded sequence of mixed operations, run on each.

Prunes and ledger archives are among the operations, over weeks of a moving clock, so replays
past retention, pruned holds, refunds of archived rows and analytics over rollups are compared
too.

The stores run in lockstep. Each step is drawn from a seeded generator and sent to every store;
the results (ids mapped to the order each store first showed them, cursors likewise) must be
equal, and so must the final state: balances, ledgers, lots, caps, teams and analytics.
"""

from __future__ import annotations

import random
import re
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
from pydantic import BaseModel
from tests.conftest import OPENERS, REQUIRED, STORE_KINDS, FakeClock

from ducto.errors import DuctoError
from ducto.interface.base import CreditStore
from ducto.interface.models import CreditMetadata, PlanDefinition, PricingConfigData, SpendCap

pytestmark = pytest.mark.anyio

START = datetime(2026, 3, 30, 22, 0, tzinfo=UTC)  # near a month's end, so windows roll over
USERS = [f"user-{n}" for n in range(6)]
MODELS = [None, "m1", "m2"]
SCOPES = [None, None, "key-1", "key-2"]
_ID = re.compile(r"^(tx|res|lot|team|price|topup)_[0-9a-f]{12}_[0-9a-f]+$")
_CURSOR = re.compile(r"^c1\.[0-9a-f]+$")


class _Names:
    """Maps one store's ids (and cursors) to names in the order it first showed them."""

    def __init__(self) -> None:
        self.names: dict[str, str] = {}
        self.ids: dict[str, str] = {}

    def name(self, value: str) -> str:
        if value not in self.names:
            prefix = "cursor" if value.startswith("c1.") else value.split("_")[0]
            self.names[value] = f"{prefix}#{len(self.names)}"
            self.ids[self.names[value]] = value
        return self.names[value]

    def plain(self, value: object) -> object:
        """A result as plain data with every id replaced by its name."""
        if isinstance(value, BaseModel):
            return {"__type__": type(value).__name__, **self.plain(value.model_dump())}  # type: ignore[dict-item]
        if isinstance(value, dict):
            return {k: self.plain(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.plain(v) for v in value]
        if isinstance(value, str) and (_ID.match(value) or _CURSOR.match(value)):
            return self.name(value)
        return value


@dataclass
class _Refs:
    """What later steps can refer to, by the names the stores agreed on."""

    holds: dict[str, list[str]] = field(default_factory=dict)
    usage: list[str] = field(default_factory=list)
    teams: list[str] = field(default_factory=list)
    members: dict[str, list[str]] = field(default_factory=dict)
    team_holds: list[tuple[str, str, str]] = field(default_factory=list)
    keys: list[tuple[str, str]] = field(default_factory=list)
    claims: list[tuple[str, str, int]] = field(default_factory=list)
    versions: int = 0
    archived: int = 0
    pruned: int = 0
    scheduled: int = 0
    cancelled: int = 0
    top_ups: int = 0
    scoped_refusals: int = 0


Step = Callable[[CreditStore, _Names, datetime], Awaitable[Any]]
"""One operation on a store, given the store's id names and its clock reading."""


class _Script:
    """Draws steps from a seeded generator; the same draws whatever the store."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.refs = _Refs()
        self.keys = 0

    def key(self) -> str | None:
        rng = self.rng
        if self.refs.keys and rng.random() < 0.15:
            return rng.choice(self.refs.keys)[1]  # a retry, or a reuse for another request
        if rng.random() < 0.5:
            return None
        self.keys += 1
        return f"key-{self.keys}"

    def meta(self) -> CreditMetadata | None:
        model = self.rng.choice(MODELS)
        scope = self.rng.choice(SCOPES)
        if model is None and scope is None:
            return None
        return CreditMetadata(model=model, scope=scope)

    def step(self) -> tuple[str, Step | None, int]:
        """The next step: (kind, call or None for a clock move, seconds to move the clock)."""
        rng, refs = self.rng, self.refs
        user = rng.choice(USERS)
        if rng.random() < 0.08:
            return self.billing_step(user)
        roll = rng.random()
        if roll < 0.12:
            amount = rng.choice([rng.randint(1, 200), rng.randint(1, 5000)])
            type_ = rng.choice(["purchase", "purchase", "signup_bonus", "subscription"])
            days = rng.choice([None, None, 1, 3, 40])
            key = self.key()
            meta = self.meta()

            def grant(s: CreditStore, n: _Names, now: datetime) -> Awaitable[Any]:
                expires = None if days is None else now + timedelta(days=days)
                return s.add_credits(user, amount, type_, meta, expires, idempotency_key=key)

            return "grant", grant, 0
        if roll < 0.15:
            amount = -rng.randint(1, 300)
            return "adjust", lambda s, n, now: s.add_credits(user, amount, "adjustment"), 0
        if roll < 0.32:
            amount = rng.randint(1, 400)
            meta = self.meta()
            floor = rng.choice([0, 5, 50])
            ttl = rng.choice([60, 600, 7200])
            allowance = rng.random() < 0.3
            key = self.key()
            return (
                f"reserve:{user}",
                lambda s, n, now: s.reserve_credits(
                    user,
                    amount,
                    "chat",
                    meta,
                    floor,
                    ttl=ttl,
                    use_allowance=allowance,
                    idempotency_key=key,
                ),
                0,
            )
        if roll < 0.45 and refs.holds.get(user):
            hold = rng.choice(refs.holds[user])
            amount = rng.choice([0, rng.randint(1, 300), rng.randint(1, 900)])
            key = self.key()
            meta = self.meta()
            return (
                "deduct",
                lambda s, n, now: s.deduct_credits(user, n.ids[hold], amount, key, meta),
                0,
            )
        if roll < 0.52:
            amount = rng.randint(0, 300)
            meta = self.meta()
            allowance = rng.random() < 0.4
            key = self.key()
            return (
                "charge",
                lambda s, n, now: s.charge_credits(
                    user, amount, "job", meta, 0, use_allowance=allowance, idempotency_key=key
                ),
                0,
            )
        if roll < 0.57 and refs.holds.get(user):
            hold = rng.choice(refs.holds[user])
            return "release", lambda s, n, now: s.release_reservation(user, n.ids[hold]), 0
        if roll < 0.63 and refs.usage:
            tx = rng.choice(refs.usage)
            amount = rng.choice([None, rng.randint(1, 50), rng.randint(1, 500)])
            key = self.key()
            return (
                "refund",
                lambda s, n, now: s.refund_credits(n.ids[tx], amount, "sorry", idempotency_key=key),
                0,
            )
        if roll < 0.65:
            pool = rng.choice([0, 500, 5000])
            return "team", lambda s, n, now: s.create_team(f"team-{self.keys}", pool), 0
        if roll < 0.70 and refs.teams:
            team = rng.choice(refs.teams)
            cap = rng.choice([None, 100, 1000])
            return (
                f"member:{team}:{user}",
                lambda s, n, now: s.add_team_member(n.ids[team], user, spend_cap=cap),
                0,
            )
        if roll < 0.74 and refs.members:
            team = rng.choice(sorted(refs.members))
            member = rng.choice(refs.members[team])
            amount = rng.randint(1, 400)
            key = self.key()
            meta = self.meta()
            return (
                "team_deduct",
                lambda s, n, now: s.deduct_team(
                    n.ids[team], member, amount, meta, idempotency_key=key
                ),
                0,
            )
        if roll < 0.78 and refs.members:
            team = rng.choice(sorted(refs.members))
            member = rng.choice(refs.members[team])
            amount = rng.randint(1, 300)
            key = self.key()
            meta = self.meta()
            return (
                f"team_hold:{team}:{member}",
                lambda s, n, now: s.reserve_team_credits(
                    n.ids[team], member, amount, "chat", meta, idempotency_key=key
                ),
                0,
            )
        if roll < 0.81 and refs.team_holds:
            team, member, hold = rng.choice(refs.team_holds)
            amount = rng.randint(0, 400)
            key = self.key()
            if rng.random() < 0.25:
                return (
                    "team_release",
                    lambda s, n, now: s.release_reservation(
                        member, n.ids[hold], team_id=n.ids[team]
                    ),
                    0,
                )
            return (
                "team_settle",
                lambda s, n, now: s.deduct_credits(
                    member, n.ids[hold], amount, key, team_id=n.ids[team]
                ),
                0,
            )
        if roll < 0.82 and refs.teams:
            team = rng.choice(refs.teams)
            amount = rng.randint(1, 2000)
            return "team_topup", lambda s, n, now: s.add_team_credits(n.ids[team], amount), 0
        if roll < 0.86:
            cap = SpendCap(
                user_id=user,
                cap_type=rng.choice(["daily", "monthly"]),
                model=rng.choice(MODELS),
                limit=rng.choice([50, 300, 2000]),
                action=rng.choice(["deny", "deny", "warn", "notify"]),
                scope=rng.choice(SCOPES),
            )
            if rng.random() < 0.2:
                return (
                    "uncap",
                    lambda s, n, now: s.remove_spend_cap(
                        user, cap.cap_type, cap.model, scope=cap.scope
                    ),
                    0,
                )
            return "cap", lambda s, n, now: s.set_spend_cap(cap), 0
        if roll < 0.87:
            allowance = rng.choice([0, 100, 1000])
            config = PricingConfigData(
                models={"_default": "input_tokens * 0.01"},
                plans={
                    "pro": PlanDefinition(id="pro", name="Pro", free_allowance=allowance),
                    "free": PlanDefinition(id="free", name="Free"),
                },
            )
            return "pricing", lambda s, n, now: s.set_active_pricing(config, "v"), 0
        if roll < 0.89:
            plan = rng.choice(["pro", "free"])
            return "plan", lambda s, n, now: s.set_user_plan(user, plan), 0
        if roll < 0.92:
            model = rng.choice(MODELS)
            amount = rng.randint(0, 500)
            scope = rng.choice(SCOPES)
            return (
                "check_cap",
                lambda s, n, now: s.check_spend_cap(user, model, amount, scope=scope),
                0,
            )
        if roll < 0.95:
            return "balance", lambda s, n, now: _balance_view(s, user), 0
        if roll < 0.97:
            dry = rng.random() < 0.3
            return "sweep", lambda s, n, now: s.sweep_expired_credits(dry), 0
        if roll < 0.98:
            dry = rng.random() < 0.3
            return "prune", lambda s, n, now: s.prune(dry_run=dry), 0
        if roll < 0.985:
            dry = rng.random() < 0.3
            return "archive", lambda s, n, now: _archive(s, now, dry), 0
        return "clock", None, rng.choice([30, 600, 3600, 6 * 3600, 2 * 86400])

    def billing_step(self, user: str) -> tuple[str, Step | None, int]:
        """Scheduled prices, auto top-up claims and scoped spend."""
        rng, refs = self.rng, self.refs
        roll = rng.random()
        if roll < 0.2:
            allowance = rng.choice([0, 100, 1000])
            config = PricingConfigData(
                models={"_default": f"input_tokens * {rng.choice(['0.01', '0.02'])}"},
                plans={"pro": PlanDefinition(id="pro", name="Pro", free_allowance=allowance)},
            )
            later = rng.choice([-60, 600, 3600, 86400])

            def schedule(s: CreditStore, n: _Names, now: datetime) -> Awaitable[Any]:
                at = now + timedelta(seconds=later)
                return s.set_active_pricing(config, "scheduled", effective_at=at)

            return "schedule", schedule, 0
        if roll < 0.3:
            version = rng.randint(1, refs.versions + 1)
            return "cancel_pricing", lambda s, n, now: s.cancel_pricing(version), 0
        if roll < 0.35:
            return "active_pricing", lambda s, n, now: s.get_active_pricing(), 0
        if roll < 0.6:
            threshold = rng.choice([50, 500, 5000])
            amount = rng.choice([100, 1000])
            limit = rng.choice([500, 3000])
            ttl = rng.choice([60, 3600])
            return (
                f"claim:{user}",
                lambda s, n, now: s.claim_top_up(
                    user, threshold=threshold, amount=amount, monthly_limit=limit, ttl=ttl
                ),
                0,
            )
        if roll < 0.8 and refs.claims:
            owner, claim, amount = rng.choice(refs.claims)
            paid = rng.random() < 0.7
            self.keys += 1
            reference = f"pay-{self.keys}" if paid else None
            return (
                "finish_top_up",
                lambda s, n, now: s.finish_top_up(
                    owner, n.ids[claim], amount, payment_reference=reference
                ),
                0,
            )
        scope = rng.choice(SCOPES[2:])
        amount = rng.randint(1, 300)
        if roll < 0.9:
            return (
                f"reserve:{user}",
                lambda s, n, now: s.reserve_credits(
                    user, amount, "chat", CreditMetadata(scope=scope), 0
                ),
                0,
            )
        return (
            "scope_spend",
            lambda s, n, now: _scope_view(s, user, now),
            0,
        )

    def learn(self, kind: str, plain: Any, names: _Names) -> None:
        """Remember what a step made that later steps may use."""
        refs = self.refs
        if kind == "archive" and isinstance(plain, list) and not plain[2]:
            refs.archived += plain[0]
        if kind == "prune" and isinstance(plain, dict) and not plain.get("dry_run", True):
            refs.pruned += plain["idempotency_keys"] + plain["holds"] + plain["windows"]
        if kind in ("pricing", "schedule") and isinstance(plain, str):
            refs.versions += 1
            refs.scheduled += kind == "schedule"
        if kind == "cancel_pricing" and isinstance(plain, dict) and "raised" not in plain:
            refs.cancelled += 1
        if kind == "finish_top_up" and isinstance(plain, dict) and plain.get("grant"):
            refs.top_ups += plain["grant"]["error"] is None
        if (
            isinstance(plain, dict)
            and plain.get("error") == "spend_cap_exceeded"
            and plain.get("cap_scope")
        ):
            refs.scoped_refusals += 1
        if kind.startswith("claim:") and isinstance(plain, dict) and plain.get("claimed"):
            refs.claims.append((kind.split(":")[1], plain["claim_id"], plain["amount"]))
        if not isinstance(plain, dict) or plain.get("error") is not None:
            return
        if kind.startswith("reserve:"):
            refs.holds.setdefault(kind.split(":")[1], []).append(plain["reservation_id"])
        elif kind in ("deduct", "charge", "team_deduct", "team_settle") and plain["transaction_id"]:
            refs.usage.append(plain["transaction_id"])
        elif kind == "team":
            refs.teams.append(plain["team_id"])
        elif kind.startswith("member:"):
            _, team, user = kind.split(":")
            if user not in refs.members.setdefault(team, []):
                refs.members[team].append(user)
        elif kind.startswith("team_hold:"):
            _, team, member = kind.split(":")
            refs.team_holds.append((team, member, plain["reservation_id"]))
        key = plain.get("idempotency_key")
        if key:
            refs.keys.append((kind, key))


_DESTINATIONS: dict[int, Path] = {}
"""Each open store's archive file, by the store's id()."""


async def _archive(store: CreditStore, now: datetime, dry_run: bool) -> Any:
    """Archive what the current month allows: all before its first UTC midnight."""
    before = datetime(now.year, now.month, 1, tzinfo=UTC)
    done = await store.archive_ledger(before, _DESTINATIONS[id(store)], dry_run=dry_run)
    return (done.rows, done.before, done.dry_run, done.bytes_written > 0)


async def _balance_view(store: CreditStore, user: str) -> Any:
    return (await store.get_balance(user), await store.list_lots(user))


async def _scope_view(store: CreditStore, user: str, now: datetime) -> Any:
    """A user's spend by scope over the last whole UTC days (archived days are daily totals)."""
    end = now.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1)
    return await store.spend_by_scope(end - timedelta(days=60), end, user_id=user)


async def _final_state(store: CreditStore, names: _Names, refs: _Refs) -> Any:
    # Whole UTC days: archived days are kept as daily totals.
    midnight = START.replace(hour=0)
    window = (midnight - timedelta(days=40), midnight + timedelta(days=400))
    state: dict[str, Any] = {}
    for user in USERS:
        state[user] = (
            await store.get_balance(user),
            (await store.list_transactions(user, limit=1000)).items,
            await store.list_lots(user),
            await store.list_spend_caps(user),
            await store.check_allowance(user),
            await store.get_user_plan(user),
        )
    for team in refs.teams:
        team_id = names.ids[team]
        state[team] = (
            await store.get_team_balance(team_id),
            await store.get_team_members(team_id),
            (await store.list_team_transactions(team_id, limit=1000)).items,
        )
    state["analytics"] = (
        await store.spend_by_user(*window),
        await store.spend_by_model(*window),
        await store.daily_spend(*window),
        await store.top_users(3, *window),
        await store.aggregate_stats(*window),
        await store.get_pricing_history(),
        await store.spend_by_scope(*window),
    )
    return names.plain(state)


async def _call(step: Step, store: CreditStore, names: _Names, now: datetime) -> Any:
    try:
        return names.plain(await step(store, names, now))
    except DuctoError as exc:  # an invalid request must be refused the same way everywhere
        return {"raised": type(exc).__name__, "message": str(exc)}


@pytest.mark.parametrize("seed", [11, 12])
async def test_every_store_gives_the_same_results(
    anyio_backend: str, tmp_path: Path, seed: int
) -> None:
    """A few thousand seeded mixed operations give identical results and state on every store."""
    kinds = []
    for kind in STORE_KINDS:
        try:
            OPENERS[kind](tmp_path / f"probe-{kind}", FakeClock(START))
        except (ImportError, LookupError) as exc:
            if kind in REQUIRED:
                pytest.fail(f"{kind} store is required: {exc}")
            continue
        kinds.append(kind)
    if len(kinds) < 2:
        pytest.skip("fewer than two stores available")
    script = _Script(seed)
    clocks = {kind: FakeClock(START) for kind in kinds}
    names = {kind: _Names() for kind in kinds}
    async with AsyncExitStack() as stack:
        stores: dict[str, CreditStore] = {}
        for kind in kinds:
            folder = tmp_path / kind
            folder.mkdir()
            stores[kind] = await stack.enter_async_context(OPENERS[kind](folder, clocks[kind]))
            _DESTINATIONS[id(stores[kind])] = folder / "archive.jsonl.gz"
            await stores[kind].setup()
        steps = 0
        with anyio.fail_after(300):
            while steps < 2500:
                kind, step, seconds = script.step()
                if step is None:
                    for clock in clocks.values():
                        clock.advance(seconds)
                    continue
                steps += 1
                outcomes = {}
                for store_kind, store in stores.items():
                    outcomes[store_kind] = await _call(
                        step, store, names[store_kind], clocks[store_kind].now
                    )
                first, *others = kinds
                for other in others:
                    assert outcomes[first] == outcomes[other], (
                        f"step {steps} {kind} {other} {outcomes}"
                    )
                script.learn(kind, outcomes[first], names[first])
        final = {k: await _final_state(stores[k], names[k], script.refs) for k in kinds}
    first, *others = kinds
    for other in others:
        assert final[first] == final[other]
    assert script.refs.usage, "the script never charged anything"
    assert script.refs.team_holds, "the script never placed a team hold"
    assert script.refs.archived, "the script never archived a row"
    assert script.refs.pruned, "the script never pruned a record"
    assert script.refs.scheduled, "the script never scheduled a pricing version"
    assert script.refs.cancelled, "the script never cancelled a scheduled version"
    assert script.refs.top_ups, "the script never finished a paid top-up"
    assert script.refs.scoped_refusals, "no scoped cap ever refused a hold"
