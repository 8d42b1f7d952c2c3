"""Misuse raises InvalidArgumentError naming the parameter and changes nothing; error results."""

from __future__ import annotations

import math
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from tests.conftest import FakeClock
from tests.contract._checks import all_rows, assert_invariants

from ducto.errors import (
    AlreadyRefundedError,
    CreditError,
    DuctoError,
    ErrorCode,
    IdempotencyConflictError,
    InsufficientCreditsError,
    InsufficientTeamBalanceError,
    InvalidArgumentError,
    NotRefundableError,
    OverRefundError,
    ReservationAlreadySettledError,
    ReservationNotFoundError,
    ReservationReleasedError,
    SpendCapExceededError,
    TeamNotFoundError,
    TransactionNotFoundError,
    UserNotInTeamError,
)
from ducto.interface.base import CreditStore
from ducto.interface.models import CreditMetadata, PlanDefinition, PricingConfigData, SpendCap

pytestmark = pytest.mark.anyio

TOO_BIG = 2**62 + 1
UNPRINTABLE = 10**5000
"""An int Python refuses to turn into text (``sys.get_int_max_str_digits()`` is 4,300)."""
LONG_ID = "x" * 257
_EXTREME_MAX = datetime.max.replace(tzinfo=timezone(timedelta(hours=-5)))
"""An aware instant past the end of UTC's datetime range."""
_EXTREME_MIN = datetime.min.replace(tzinfo=timezone(timedelta(hours=5)))
"""An aware instant before the start of UTC's datetime range."""
_BIG = "c1." + "f" * 20


@dataclass(frozen=True)
class World:
    """A user with a plan, credits, a live hold, settled and released holds, a cap and a team."""

    user: str
    now: datetime
    usage: str
    grant: str
    hold: str
    settled: str
    released: str
    team: str


async def _world(store: CreditStore, user_id: str, clock: FakeClock) -> World:
    plan = PlanDefinition(id="pro", name="Pro", free_allowance=0, features={"x": True})
    await store.set_active_pricing(PricingConfigData(models={"_default": "0"}, plans={"pro": plan}))
    await store.set_user_plan(user_id, "pro")
    grant = await store.add_credits(user_id, 100, "purchase", idempotency_key="grant-1")
    settled = await store.reserve_credits(user_id, 30, "chat", CreditMetadata(model="m1"))
    usage = await store.deduct_credits(user_id, settled.reservation_id, 20)
    released = await store.reserve_credits(user_id, 5, "chat")
    await store.release_reservation(user_id, released.reservation_id)
    hold = await store.reserve_credits(user_id, 10, "chat")
    await store.set_spend_cap(SpendCap(user_id=user_id, cap_type="daily", model="m1", limit=25))
    team = await store.create_team("research", 100)
    await store.add_team_member(team.team_id, user_id, spend_cap=50)
    assert all(r.ok for r in (grant, settled, usage, released, hold))
    return World(
        user=user_id,
        now=clock.now,
        usage=usage.transaction_id,
        grant=grant.transaction_id,
        hold=hold.reservation_id,
        settled=settled.reservation_id,
        released=released.reservation_id,
        team=team.team_id,
    )


async def _snapshot(store: CreditStore, w: World) -> tuple[object, ...]:
    """Everything the world's operations could change, read through the public API."""
    return (
        await store.get_balance(w.user),
        await all_rows(store, w.user),
        await store.list_lots(w.user),
        await store.list_spend_caps(w.user),
        await store.get_user_plan(w.user),
        await store.check_allowance(w.user),
        await store.get_pricing_history(),
        await store.get_team_balance(w.team),
        await store.get_team_members(w.team),
        (await store.list_transactions(w.team)).items,
    )


Call = Callable[[CreditStore, World], Awaitable[Any]]


def bad(id_: str, names: str, call: Call) -> Any:
    """A misuse case: `call` must raise InvalidArgumentError whose message contains `names`."""
    return pytest.param(call, names, id=id_)


def _past(w: World) -> datetime:
    return w.now - timedelta(seconds=1)


def _window(w: World) -> tuple[datetime, datetime]:
    return w.now - timedelta(days=1), w.now


BAD_CALLS = [
    # values that used to leak Python errors: huge ints, unhashables, extreme instants
    bad("reserve-ttl-huge-int", "ttl", lambda s, w: s.reserve_credits(w.user, 5, "c", ttl=10**400)),
    # ints too long for Python to print (more than 4,300 digits) are still reported by name
    bad(
        "add_credits-unprintable",
        "amount",
        lambda s, w: s.add_credits(w.user, UNPRINTABLE, "purchase"),
    ),
    bad(
        "reserve-ttl-unprintable",
        "ttl",
        lambda s, w: s.reserve_credits(w.user, 5, "c", ttl=UNPRINTABLE),
    ),
    bad(
        "reserve-min_balance-unprintable",
        "min_balance",
        lambda s, w: s.reserve_credits(w.user, 5, "c", min_balance=UNPRINTABLE),
    ),
    bad(
        "deduct-unprintable", "amount", lambda s, w: s.deduct_credits(w.user, w.hold, -UNPRINTABLE)
    ),
    bad("charge-unprintable", "amount", lambda s, w: s.charge_credits(w.user, UNPRINTABLE, "c")),
    bad("refund-unprintable", "amount", lambda s, w: s.refund_credits(w.usage, UNPRINTABLE)),
    bad(
        "list-limit-unprintable",
        "limit",
        lambda s, w: s.list_transactions(w.user, limit=UNPRINTABLE),
    ),
    bad("activate-unprintable", "version", lambda s, w: s.activate_pricing(UNPRINTABLE)),
    bad("team-topup-unprintable", "amount", lambda s, w: s.add_team_credits(w.team, UNPRINTABLE)),
    bad("list-types-unhashable", "types", lambda s, w: s.list_transactions(w.user, types=[[1]])),
    bad("add_credits-type-unhashable", "type", lambda s, w: s.add_credits(w.user, 5, ["x"])),
    bad(
        "add_credits-expires-max-west",
        "expires_at",
        lambda s, w: s.add_credits(w.user, 5, "purchase", expires_at=_EXTREME_MAX),
    ),
    bad(
        "add_credits-expires-min-east",
        "expires_at",
        lambda s, w: s.add_credits(w.user, 5, "purchase", expires_at=_EXTREME_MIN),
    ),
    bad(
        "add_team_credits-expires-max-west",
        "expires_at",
        lambda s, w: s.add_team_credits(w.team, 5, expires_at=_EXTREME_MAX),
    ),
    bad("spend_by_user-end-max-west", "end", lambda s, w: s.spend_by_user(w.now, _EXTREME_MAX)),
    bad("daily_spend-start-min-east", "start", lambda s, w: s.daily_spend(_EXTREME_MIN, w.now)),
    bad("aggregate_stats-end-max-west", "end", lambda s, w: s.aggregate_stats(w.now, _EXTREME_MAX)),
    bad(
        "list_transactions-start-max-west",
        "start",
        lambda s, w: s.list_transactions(w.user, start=_EXTREME_MAX),
    ),
    bad("activate_pricing-beyond-64-bits", "version", lambda s, w: s.activate_pricing(2**63)),
    bad("get_pricing_config-beyond-64-bits", "version", lambda s, w: s.get_pricing_config(2**63)),
    bad("cursor-beyond-64-bits", "cursor", lambda s, w: s.list_transactions(w.user, cursor=_BIG)),
    bad("cursor-leading-space", "cursor", lambda s, w: s.list_transactions(w.user, cursor="c1. 1")),
    bad(
        "cursor-trailing-newline",
        "cursor",
        lambda s, w: s.list_transactions(w.user, cursor="c1.1\n"),
    ),
    bad("cursor-plus-sign", "cursor", lambda s, w: s.list_transactions(w.user, cursor="c1.+1")),
    bad("cursor-underscore", "cursor", lambda s, w: s.list_transactions(w.user, cursor="c1.1_0")),
    bad(
        "add_credits-metadata-nan",
        "metadata",
        lambda s, w: s.add_credits(w.user, 5, "purchase", {"score": math.nan}),
    ),
    bad(
        "reserve-metadata-infinity",
        "metadata",
        lambda s, w: s.reserve_credits(w.user, 5, "chat", {"score": math.inf}),
    ),
    bad(
        "deduct-metadata-nested-nan",
        "metadata",
        lambda s, w: s.deduct_credits(w.user, w.hold, 5, None, {"x": [1.0, -math.inf]}),
    ),
    bad(
        "set_active_pricing-unparseable-expression",
        "models",
        lambda s, w: s.set_active_pricing(PricingConfigData(models={"_default": "input_tokens *"})),
    ),
    bad(
        "set_active_pricing-unknown-variable",
        "models",
        lambda s, w: s.set_active_pricing(PricingConfigData(models={"_default": "tokenz * 2"})),
    ),
    bad("charge-negative", "amount", lambda s, w: s.charge_credits(w.user, -1, "chat")),
    bad("charge-float", "amount", lambda s, w: s.charge_credits(w.user, 1.0, "chat")),
    bad("charge-empty-operation", "operation_type", lambda s, w: s.charge_credits(w.user, 1, "")),
    bad(
        "charge-min-balance", "min_balance", lambda s, w: s.charge_credits(w.user, 1, "c", None, -1)
    ),
    bad(
        "charge-use-allowance",
        "use_allowance",
        lambda s, w: s.charge_credits(w.user, 1, "c", use_allowance=1),
    ),
    bad(
        "charge-key",
        "idempotency_key",
        lambda s, w: s.charge_credits(w.user, 1, "c", idempotency_key=""),
    ),
    bad("reserve_team-zero", "amount", lambda s, w: s.reserve_team_credits(w.team, w.user, 0, "c")),
    bad("reserve_team-team-id", "team_id", lambda s, w: s.reserve_team_credits("", w.user, 1, "c")),
    bad("reserve_team-user-id", "user_id", lambda s, w: s.reserve_team_credits(w.team, 7, 1, "c")),
    bad(
        "reserve_team-ttl",
        "ttl",
        lambda s, w: s.reserve_team_credits(w.team, w.user, 1, "c", ttl=0),
    ),
    bad("deduct-team-id", "team_id", lambda s, w: s.deduct_credits(w.user, w.hold, 1, team_id="")),
    bad(
        "release-team-id", "team_id", lambda s, w: s.release_reservation(w.user, w.hold, team_id=3)
    ),
    # get_balance / list_lots: ids
    bad("get_balance-int-id", "user_id", lambda s, w: s.get_balance(123)),
    bad("get_balance-none-id", "user_id", lambda s, w: s.get_balance(None)),
    bad("get_balance-bytes-id", "user_id", lambda s, w: s.get_balance(b"user")),
    bad("get_balance-empty-id", "user_id", lambda s, w: s.get_balance("")),
    bad("get_balance-long-id", "user_id", lambda s, w: s.get_balance(LONG_ID)),
    bad("get_balance-nul-id", "user_id", lambda s, w: s.get_balance("a\x00b")),
    bad("list_lots-empty-id", "user_id", lambda s, w: s.list_lots("")),
    # add_credits
    bad("add_credits-float", "amount", lambda s, w: s.add_credits(w.user, 10.0, "purchase")),
    bad("add_credits-bool", "amount", lambda s, w: s.add_credits(w.user, True, "purchase")),
    bad(
        "add_credits-decimal",
        "amount",
        lambda s, w: s.add_credits(w.user, Decimal(10), "purchase"),
    ),
    bad("add_credits-str", "amount", lambda s, w: s.add_credits(w.user, "10", "purchase")),
    bad("add_credits-zero", "amount", lambda s, w: s.add_credits(w.user, 0, "purchase")),
    bad("add_credits-negative", "amount", lambda s, w: s.add_credits(w.user, -1, "purchase")),
    bad("add_credits-too-big", "amount", lambda s, w: s.add_credits(w.user, TOO_BIG, "purchase")),
    bad("add_credits-zero-adjustment", "amount", lambda s, w: s.add_credits(w.user, 0)),
    bad("add_credits-too-negative", "amount", lambda s, w: s.add_credits(w.user, -TOO_BIG)),
    bad("add_credits-overflow", "balance", lambda s, w: s.add_credits(w.user, 2**62)),
    bad("add_credits-empty-id", "user_id", lambda s, w: s.add_credits("", 10, "purchase")),
    bad("add_credits-int-id", "user_id", lambda s, w: s.add_credits(7, 10, "purchase")),
    bad("add_credits-unknown-type", "type", lambda s, w: s.add_credits(w.user, 10, "gift")),
    bad("add_credits-ledger-type", "type", lambda s, w: s.add_credits(w.user, 10, "usage")),
    bad(
        "add_credits-str-expiry",
        "expires_at",
        lambda s, w: s.add_credits(w.user, 10, "purchase", expires_at="2027-01-01T00:00:00Z"),
    ),
    bad(
        "add_credits-date-expiry",
        "expires_at",
        lambda s, w: s.add_credits(w.user, 10, "purchase", expires_at=date(2027, 1, 1)),
    ),
    bad(
        "add_credits-past-expiry",
        "expires_at",
        lambda s, w: s.add_credits(w.user, 10, "purchase", expires_at=_past(w)),
    ),
    bad(
        "add_credits-now-expiry",
        "expires_at",
        lambda s, w: s.add_credits(w.user, 10, "purchase", expires_at=w.now),
    ),
    bad(
        "add_credits-expiry-on-debit",
        "expires_at",
        lambda s, w: s.add_credits(w.user, -10, expires_at=w.now + timedelta(days=1)),
    ),
    bad(
        "add_credits-bad-metadata",
        "metadata",
        lambda s, w: s.add_credits(w.user, 10, "purchase", 5),
    ),
    bad(
        "add_credits-invalid-metadata",
        "metadata",
        lambda s, w: s.add_credits(w.user, 10, "purchase", {"input_tokens": "many"}),
    ),
    bad(
        "add_credits-empty-key",
        "idempotency_key",
        lambda s, w: s.add_credits(w.user, 10, "purchase", idempotency_key=""),
    ),
    bad(
        "add_credits-long-key",
        "idempotency_key",
        lambda s, w: s.add_credits(w.user, 10, "purchase", idempotency_key=LONG_ID),
    ),
    bad(
        "add_credits-int-key",
        "idempotency_key",
        lambda s, w: s.add_credits(w.user, 10, "purchase", idempotency_key=5),
    ),
    # reserve_credits
    bad("reserve-zero", "amount", lambda s, w: s.reserve_credits(w.user, 0, "chat")),
    bad("reserve-negative", "amount", lambda s, w: s.reserve_credits(w.user, -5, "chat")),
    bad("reserve-float", "amount", lambda s, w: s.reserve_credits(w.user, 1.5, "chat")),
    bad("reserve-bool", "amount", lambda s, w: s.reserve_credits(w.user, True, "chat")),
    bad("reserve-str", "amount", lambda s, w: s.reserve_credits(w.user, "5", "chat")),
    bad("reserve-decimal", "amount", lambda s, w: s.reserve_credits(w.user, Decimal(5), "chat")),
    bad("reserve-too-big", "amount", lambda s, w: s.reserve_credits(w.user, TOO_BIG, "chat")),
    bad("reserve-empty-id", "user_id", lambda s, w: s.reserve_credits("", 5, "chat")),
    bad("reserve-empty-op", "operation_type", lambda s, w: s.reserve_credits(w.user, 5, "")),
    bad("reserve-none-op", "operation_type", lambda s, w: s.reserve_credits(w.user, 5, None)),
    bad("reserve-long-op", "operation_type", lambda s, w: s.reserve_credits(w.user, 5, LONG_ID)),
    bad("reserve-bad-metadata", "metadata", lambda s, w: s.reserve_credits(w.user, 5, "chat", "m")),
    bad(
        "reserve-negative-floor",
        "min_balance",
        lambda s, w: s.reserve_credits(w.user, 5, "chat", min_balance=-1),
    ),
    bad(
        "reserve-float-floor",
        "min_balance",
        lambda s, w: s.reserve_credits(w.user, 5, "chat", min_balance=1.5),
    ),
    bad(
        "reserve-bool-floor",
        "min_balance",
        lambda s, w: s.reserve_credits(w.user, 5, "chat", min_balance=True),
    ),
    bad(
        "reserve-huge-floor",
        "min_balance",
        lambda s, w: s.reserve_credits(w.user, 5, "chat", min_balance=TOO_BIG),
    ),
    bad("reserve-zero-ttl", "ttl", lambda s, w: s.reserve_credits(w.user, 5, "chat", ttl=0)),
    bad("reserve-negative-ttl", "ttl", lambda s, w: s.reserve_credits(w.user, 5, "chat", ttl=-1)),
    bad("reserve-str-ttl", "ttl", lambda s, w: s.reserve_credits(w.user, 5, "chat", ttl="60")),
    bad("reserve-none-ttl", "ttl", lambda s, w: s.reserve_credits(w.user, 5, "chat", ttl=None)),
    bad("reserve-bool-ttl", "ttl", lambda s, w: s.reserve_credits(w.user, 5, "chat", ttl=True)),
    bad("reserve-nan-ttl", "ttl", lambda s, w: s.reserve_credits(w.user, 5, "chat", ttl=math.nan)),
    bad("reserve-inf-ttl", "ttl", lambda s, w: s.reserve_credits(w.user, 5, "chat", ttl=math.inf)),
    bad(
        "reserve-long-ttl",
        "ttl",
        lambda s, w: s.reserve_credits(w.user, 5, "chat", ttl=366 * 86400 + 1),
    ),
    bad(
        "reserve-zero-timedelta",
        "ttl",
        lambda s, w: s.reserve_credits(w.user, 5, "chat", ttl=timedelta(0)),
    ),
    bad(
        "reserve-long-timedelta",
        "ttl",
        lambda s, w: s.reserve_credits(w.user, 5, "chat", ttl=timedelta(days=367)),
    ),
    bad(
        "reserve-str-allowance",
        "use_allowance",
        lambda s, w: s.reserve_credits(w.user, 5, "chat", use_allowance="yes"),
    ),
    bad(
        "reserve-int-allowance",
        "use_allowance",
        lambda s, w: s.reserve_credits(w.user, 5, "chat", use_allowance=1),
    ),
    bad(
        "reserve-empty-key",
        "idempotency_key",
        lambda s, w: s.reserve_credits(w.user, 5, "chat", idempotency_key=""),
    ),
    # deduct_credits
    bad("deduct-negative", "amount", lambda s, w: s.deduct_credits(w.user, w.hold, -1)),
    bad("deduct-float", "amount", lambda s, w: s.deduct_credits(w.user, w.hold, 1.5)),
    bad("deduct-bool", "amount", lambda s, w: s.deduct_credits(w.user, w.hold, True)),
    bad("deduct-str", "amount", lambda s, w: s.deduct_credits(w.user, w.hold, "5")),
    bad("deduct-decimal", "amount", lambda s, w: s.deduct_credits(w.user, w.hold, Decimal(5))),
    bad("deduct-too-big", "amount", lambda s, w: s.deduct_credits(w.user, w.hold, TOO_BIG)),
    bad("deduct-empty-id", "user_id", lambda s, w: s.deduct_credits("", w.hold, 5)),
    bad("deduct-empty-hold", "reservation_id", lambda s, w: s.deduct_credits(w.user, "", 5)),
    bad("deduct-int-hold", "reservation_id", lambda s, w: s.deduct_credits(w.user, 5, 5)),
    bad(
        "deduct-empty-key",
        "idempotency_key",
        lambda s, w: s.deduct_credits(w.user, w.hold, 5, ""),
    ),
    bad(
        "deduct-bad-metadata",
        "metadata",
        lambda s, w: s.deduct_credits(w.user, w.hold, 5, None, ["model"]),
    ),
    # release_reservation
    bad("release-empty-hold", "reservation_id", lambda s, w: s.release_reservation(w.user, "")),
    bad("release-none-hold", "reservation_id", lambda s, w: s.release_reservation(w.user, None)),
    bad("release-int-id", "user_id", lambda s, w: s.release_reservation(5, w.hold)),
    # refund_credits
    bad("refund-empty-tx", "transaction_id", lambda s, w: s.refund_credits("")),
    bad("refund-int-tx", "transaction_id", lambda s, w: s.refund_credits(5)),
    bad("refund-zero", "amount", lambda s, w: s.refund_credits(w.usage, 0)),
    bad("refund-negative", "amount", lambda s, w: s.refund_credits(w.usage, -1)),
    bad("refund-float", "amount", lambda s, w: s.refund_credits(w.usage, 1.5)),
    bad("refund-bool", "amount", lambda s, w: s.refund_credits(w.usage, True)),
    bad("refund-str", "amount", lambda s, w: s.refund_credits(w.usage, "5")),
    bad("refund-too-big", "amount", lambda s, w: s.refund_credits(w.usage, TOO_BIG)),
    bad("refund-int-reason", "reason", lambda s, w: s.refund_credits(w.usage, 5, 5)),
    bad("refund-bad-metadata", "metadata", lambda s, w: s.refund_credits(w.usage, 5, None, 5)),
    bad(
        "refund-empty-key",
        "idempotency_key",
        lambda s, w: s.refund_credits(w.usage, 5, idempotency_key=""),
    ),
    # sweep_expired_credits
    bad("sweep-str-dry-run", "dry_run", lambda s, w: s.sweep_expired_credits("yes")),
    bad("sweep-int-dry-run", "dry_run", lambda s, w: s.sweep_expired_credits(1)),
    bad("sweep-none-dry-run", "dry_run", lambda s, w: s.sweep_expired_credits(None)),
    # list_transactions
    bad("ledger-zero-limit", "limit", lambda s, w: s.list_transactions(w.user, limit=0)),
    bad("ledger-huge-limit", "limit", lambda s, w: s.list_transactions(w.user, limit=1001)),
    bad("ledger-float-limit", "limit", lambda s, w: s.list_transactions(w.user, limit=1.5)),
    bad("ledger-bool-limit", "limit", lambda s, w: s.list_transactions(w.user, limit=True)),
    bad("ledger-str-limit", "limit", lambda s, w: s.list_transactions(w.user, limit="10")),
    bad("ledger-bad-cursor", "cursor", lambda s, w: s.list_transactions(w.user, cursor="bad")),
    bad("ledger-empty-cursor", "cursor", lambda s, w: s.list_transactions(w.user, cursor="")),
    bad("ledger-int-cursor", "cursor", lambda s, w: s.list_transactions(w.user, cursor=5)),
    bad("ledger-str-types", "types", lambda s, w: s.list_transactions(w.user, types="usage")),
    bad("ledger-unknown-type", "types", lambda s, w: s.list_transactions(w.user, types=["gift"])),
    bad("ledger-empty-types", "types", lambda s, w: s.list_transactions(w.user, types=[])),
    bad("ledger-str-start", "start", lambda s, w: s.list_transactions(w.user, start="2026")),
    bad("ledger-int-end", "end", lambda s, w: s.list_transactions(w.user, end=5)),
    bad("ledger-empty-id", "user_id", lambda s, w: s.list_transactions("")),
    # pricing
    bad("pricing-str-config", "config", lambda s, w: s.set_active_pricing("config")),
    bad("pricing-bad-dict", "config", lambda s, w: s.set_active_pricing({"models": {}})),
    bad(
        "pricing-int-label",
        "label",
        lambda s, w: s.set_active_pricing(PricingConfigData(models={"_default": "0"}), 5),
    ),
    # NUL: no SQL text column holds it, so every store refuses it in every text argument
    bad(
        "pricing-nul-label",
        "label",
        lambda s, w: s.set_active_pricing(PricingConfigData(models={"_default": "0"}), "a\x00b"),
    ),
    bad(
        "refund-nul-reason",
        "reason",
        lambda s, w: s.refund_credits(w.usage, 1, reason="a\x00b"),
    ),
    bad(
        "add_credits-nul-metadata",
        "metadata",
        lambda s, w: s.add_credits(w.user, 5, "purchase", {"note": "a\x00b"}),
    ),
    bad(
        "reserve-nul-metadata-model",
        "metadata",
        lambda s, w: s.reserve_credits(w.user, 5, "chat", CreditMetadata(model="m\x00")),
    ),
    bad(
        "deduct-nul-metadata-key",
        "metadata",
        lambda s, w: s.deduct_credits(w.user, w.hold, 5, metadata={"a\x00b": 1}),
    ),
    bad(
        "team_deduct-nul-nested-metadata",
        "metadata",
        lambda s, w: s.deduct_team(w.team, w.user, 5, {"tags": ["ok", {"x": "\x00"}]}),
    ),
    bad("activate-zero", "version", lambda s, w: s.activate_pricing(0)),
    bad("activate-negative", "version", lambda s, w: s.activate_pricing(-1)),
    bad("activate-str", "version", lambda s, w: s.activate_pricing("1")),
    bad("activate-float", "version", lambda s, w: s.activate_pricing(1.0)),
    bad("activate-bool", "version", lambda s, w: s.activate_pricing(True)),
    bad("pricing-config-zero", "version", lambda s, w: s.get_pricing_config(0)),
    bad("pricing-config-str", "version", lambda s, w: s.get_pricing_config("1")),
    # plans
    bad("get_user_plan-empty-id", "user_id", lambda s, w: s.get_user_plan("")),
    bad("set_user_plan-empty-id", "user_id", lambda s, w: s.set_user_plan("", "pro")),
    bad("set_user_plan-empty-plan", "plan_id", lambda s, w: s.set_user_plan(w.user, "")),
    bad("set_user_plan-int-plan", "plan_id", lambda s, w: s.set_user_plan(w.user, 5)),
    bad("set_user_plan-unknown-plan", "plan_id", lambda s, w: s.set_user_plan(w.user, "gold")),
    bad("check_feature-empty-id", "user_id", lambda s, w: s.check_feature("", "x")),
    bad("check_feature-empty-feature", "feature", lambda s, w: s.check_feature(w.user, "")),
    bad("check_feature-int-feature", "feature", lambda s, w: s.check_feature(w.user, 5)),
    bad("check_allowance-empty-id", "user_id", lambda s, w: s.check_allowance("")),
    bad("usage_window-zero", "amount", lambda s, w: s.increment_usage_window(w.user, "pro", 0)),
    bad(
        "usage_window-negative", "amount", lambda s, w: s.increment_usage_window(w.user, "pro", -1)
    ),
    bad("usage_window-float", "amount", lambda s, w: s.increment_usage_window(w.user, "pro", 1.5)),
    bad("usage_window-bool", "amount", lambda s, w: s.increment_usage_window(w.user, "pro", True)),
    bad(
        "usage_window-too-big",
        "amount",
        lambda s, w: s.increment_usage_window(w.user, "pro", TOO_BIG),
    ),
    bad("usage_window-empty-plan", "plan_id", lambda s, w: s.increment_usage_window(w.user, "", 5)),
    bad("usage_window-empty-id", "user_id", lambda s, w: s.increment_usage_window("", "pro", 5)),
    # spend caps
    bad("check_cap-empty-id", "user_id", lambda s, w: s.check_spend_cap("")),
    bad("check_cap-empty-model", "model", lambda s, w: s.check_spend_cap(w.user, "")),
    bad("check_cap-negative", "amount", lambda s, w: s.check_spend_cap(w.user, None, -1)),
    bad("check_cap-float", "amount", lambda s, w: s.check_spend_cap(w.user, None, 1.5)),
    bad("check_cap-bool", "amount", lambda s, w: s.check_spend_cap(w.user, None, True)),
    bad("check_cap-too-big", "amount", lambda s, w: s.check_spend_cap(w.user, None, TOO_BIG)),
    bad("set_cap-str", "cap", lambda s, w: s.set_spend_cap("daily")),
    bad("set_cap-dict", "cap", lambda s, w: s.set_spend_cap({"user_id": w.user, "limit": 5})),
    bad("set_cap-no-user", "user_id", lambda s, w: s.set_spend_cap(SpendCap(limit=5))),
    bad(
        "set_cap-empty-model",
        "model",
        lambda s, w: s.set_spend_cap(SpendCap(user_id=w.user, model="", limit=5)),
    ),
    bad(
        "set_cap-negative-limit",
        "limit",
        lambda s, w: s.set_spend_cap(
            SpendCap.model_construct(user_id=w.user, cap_type="daily", limit=-1, action="deny")
        ),
    ),
    bad(
        "set_cap-float-limit",
        "limit",
        lambda s, w: s.set_spend_cap(
            SpendCap.model_construct(user_id=w.user, cap_type="daily", limit=1.5, action="deny")
        ),
    ),
    bad(
        "set_cap-too-big-limit",
        "limit",
        lambda s, w: s.set_spend_cap(
            SpendCap.model_construct(user_id=w.user, cap_type="daily", limit=TOO_BIG, action="deny")
        ),
    ),
    bad(
        "set_cap-unknown-type",
        "cap_type",
        lambda s, w: s.set_spend_cap(
            SpendCap.model_construct(user_id=w.user, cap_type="weekly", limit=5, action="deny")
        ),
    ),
    bad(
        "set_cap-unknown-action",
        "action",
        lambda s, w: s.set_spend_cap(
            SpendCap.model_construct(user_id=w.user, cap_type="daily", limit=5, action="block")
        ),
    ),
    bad("list_caps-empty-id", "user_id", lambda s, w: s.list_spend_caps("")),
    bad("remove_cap-empty-id", "user_id", lambda s, w: s.remove_spend_cap("", "daily")),
    bad("remove_cap-bad-type", "cap_type", lambda s, w: s.remove_spend_cap(w.user, "weekly")),
    bad("remove_cap-none-type", "cap_type", lambda s, w: s.remove_spend_cap(w.user, None)),
    bad("remove_cap-empty-model", "model", lambda s, w: s.remove_spend_cap(w.user, "daily", "")),
    # teams
    bad("create_team-empty-name", "name", lambda s, w: s.create_team("")),
    bad("create_team-int-name", "name", lambda s, w: s.create_team(5)),
    bad("create_team-long-name", "name", lambda s, w: s.create_team(LONG_ID)),
    bad("create_team-negative", "initial_balance", lambda s, w: s.create_team("t", -1)),
    bad("create_team-float", "initial_balance", lambda s, w: s.create_team("t", 1.5)),
    bad("create_team-bool", "initial_balance", lambda s, w: s.create_team("t", True)),
    bad("create_team-str", "initial_balance", lambda s, w: s.create_team("t", "10")),
    bad("create_team-too-big", "initial_balance", lambda s, w: s.create_team("t", TOO_BIG)),
    bad("add_member-empty-team", "team_id", lambda s, w: s.add_team_member("", w.user)),
    bad("add_member-empty-user", "user_id", lambda s, w: s.add_team_member(w.team, "")),
    bad("add_member-empty-role", "role", lambda s, w: s.add_team_member(w.team, w.user, "")),
    bad("add_member-int-role", "role", lambda s, w: s.add_team_member(w.team, w.user, 5)),
    bad(
        "add_member-negative-cap",
        "spend_cap",
        lambda s, w: s.add_team_member(w.team, w.user, "member", -1),
    ),
    bad(
        "add_member-float-cap",
        "spend_cap",
        lambda s, w: s.add_team_member(w.team, w.user, "member", 1.5),
    ),
    bad(
        "add_member-bool-cap",
        "spend_cap",
        lambda s, w: s.add_team_member(w.team, w.user, "member", True),
    ),
    bad(
        "add_member-too-big-cap",
        "spend_cap",
        lambda s, w: s.add_team_member(w.team, w.user, "member", TOO_BIG),
    ),
    bad("remove_member-empty-team", "team_id", lambda s, w: s.remove_team_member("", w.user)),
    bad("remove_member-empty-user", "user_id", lambda s, w: s.remove_team_member(w.team, "")),
    bad("team_topup-zero", "amount", lambda s, w: s.add_team_credits(w.team, 0)),
    bad("team_topup-negative", "amount", lambda s, w: s.add_team_credits(w.team, -1)),
    bad("team_topup-float", "amount", lambda s, w: s.add_team_credits(w.team, 1.5)),
    bad("team_topup-bool", "amount", lambda s, w: s.add_team_credits(w.team, True)),
    bad("team_topup-too-big", "amount", lambda s, w: s.add_team_credits(w.team, TOO_BIG)),
    bad("team_topup-overflow", "balance", lambda s, w: s.add_team_credits(w.team, 2**62)),
    bad("team_topup-empty-team", "team_id", lambda s, w: s.add_team_credits("", 10)),
    bad("team_topup-bad-metadata", "metadata", lambda s, w: s.add_team_credits(w.team, 10, 5)),
    bad(
        "team_topup-past-expiry",
        "expires_at",
        lambda s, w: s.add_team_credits(w.team, 10, expires_at=_past(w)),
    ),
    bad(
        "team_topup-str-expiry",
        "expires_at",
        lambda s, w: s.add_team_credits(w.team, 10, expires_at="2027-01-01"),
    ),
    bad(
        "team_topup-empty-key",
        "idempotency_key",
        lambda s, w: s.add_team_credits(w.team, 10, idempotency_key=""),
    ),
    bad("team_balance-empty-team", "team_id", lambda s, w: s.get_team_balance("")),
    bad("team_members-empty-team", "team_id", lambda s, w: s.get_team_members("")),
    bad("team_deduct-zero", "amount", lambda s, w: s.deduct_team(w.team, w.user, 0)),
    bad("team_deduct-negative", "amount", lambda s, w: s.deduct_team(w.team, w.user, -1)),
    bad("team_deduct-float", "amount", lambda s, w: s.deduct_team(w.team, w.user, 1.5)),
    bad("team_deduct-bool", "amount", lambda s, w: s.deduct_team(w.team, w.user, True)),
    bad("team_deduct-str", "amount", lambda s, w: s.deduct_team(w.team, w.user, "5")),
    bad("team_deduct-too-big", "amount", lambda s, w: s.deduct_team(w.team, w.user, TOO_BIG)),
    bad("team_deduct-empty-team", "team_id", lambda s, w: s.deduct_team("", w.user, 5)),
    bad("team_deduct-empty-user", "user_id", lambda s, w: s.deduct_team(w.team, "", 5)),
    bad(
        "team_deduct-bad-metadata",
        "metadata",
        lambda s, w: s.deduct_team(w.team, w.user, 5, "m"),
    ),
    bad(
        "team_deduct-empty-key",
        "idempotency_key",
        lambda s, w: s.deduct_team(w.team, w.user, 5, idempotency_key=""),
    ),
    # analytics
    bad("spend_by_user-str-start", "start", lambda s, w: s.spend_by_user("2026", w.now)),
    bad("spend_by_user-none-end", "end", lambda s, w: s.spend_by_user(w.now, None)),
    bad(
        "spend_by_user-reversed",
        "end",
        lambda s, w: s.spend_by_user(*reversed(_window(w))),
    ),
    bad("spend_by_model-int-start", "start", lambda s, w: s.spend_by_model(5, w.now)),
    bad(
        "spend_by_model-reversed",
        "end",
        lambda s, w: s.spend_by_model(*reversed(_window(w))),
    ),
    bad("daily_spend-date-start", "start", lambda s, w: s.daily_spend(date(2026, 3, 1), w.now)),
    bad("daily_spend-reversed", "end", lambda s, w: s.daily_spend(*reversed(_window(w)))),
    bad("aggregate-str-end", "end", lambda s, w: s.aggregate_stats(w.now, "now")),
    bad("aggregate-reversed", "end", lambda s, w: s.aggregate_stats(*reversed(_window(w)))),
    bad("top_users-zero", "limit", lambda s, w: s.top_users(0, *_window(w))),
    bad("top_users-negative", "limit", lambda s, w: s.top_users(-1, *_window(w))),
    bad("top_users-float", "limit", lambda s, w: s.top_users(1.5, *_window(w))),
    bad("top_users-bool", "limit", lambda s, w: s.top_users(True, *_window(w))),
    bad("top_users-str-start", "start", lambda s, w: s.top_users(5, "x", w.now)),
    bad("top_users-reversed", "end", lambda s, w: s.top_users(5, *reversed(_window(w)))),
]


@pytest.mark.parametrize(("call", "name"), BAD_CALLS)
async def test_misuse_raises_and_changes_nothing(
    store: CreditStore, user_id: str, clock: FakeClock, call: Call, name: str
) -> None:
    """A bad argument raises InvalidArgumentError naming the parameter, and nothing changes."""
    w = await _world(store, user_id, clock)
    before = await _snapshot(store, w)

    with pytest.raises(InvalidArgumentError, match=re.escape(name)) as caught:
        await call(store, w)

    assert isinstance(caught.value, ValueError)
    assert isinstance(caught.value, DuctoError)
    assert before == await _snapshot(store, w)
    await assert_invariants(store, user_id)


@pytest.mark.parametrize(
    ("call", "shown"),
    [
        pytest.param(lambda s, w: s.add_credits(w.user, 1.5, "purchase"), "1.5", id="float"),
        pytest.param(
            lambda s, w: s.add_credits(w.user, TOO_BIG, "purchase"), str(TOO_BIG), id="big"
        ),
        pytest.param(lambda s, w: s.reserve_credits(w.user, -7, "chat"), "-7", id="negative"),
        pytest.param(lambda s, w: s.get_balance(""), "''", id="empty-id"),
        pytest.param(
            lambda s, w: s.add_credits(w.user, UNPRINTABLE, "purchase"),
            "an int of about 5001 digits",
            id="unprintable",
        ),
        pytest.param(
            lambda s, w: s.get_balance("u" * 10_000),
            "'" + "u" * 76 + "...",  # a long value is cut, not copied whole into the message
            id="long-id",
        ),
        pytest.param(lambda s, w: s.add_credits(w.user, 5, "gift"), "gift", id="type"),
        pytest.param(lambda s, w: s.reserve_credits(w.user, 5, "chat", ttl=-3), "-3", id="ttl"),
        pytest.param(
            lambda s, w: s.list_transactions(w.user, cursor="bogus-cursor"),
            "bogus-cursor",
            id="cursor",
        ),
        pytest.param(
            lambda s, w: s.add_credits(w.user, 5, "purchase", expires_at=_past(w)),
            "2026-03-15",
            id="expires_at",
        ),
    ],
)
async def test_misuse_message_shows_the_value(
    store: CreditStore, user_id: str, clock: FakeClock, call: Call, shown: str
) -> None:
    """The InvalidArgumentError message shows the offending value."""
    w = await _world(store, user_id, clock)

    with pytest.raises(InvalidArgumentError) as caught:
        await call(store, w)

    assert shown in str(caught.value)


async def test_largest_amounts_are_accepted(store: CreditStore, user_id: str) -> None:
    """2**62 itself is a valid amount, and the balance may reach exactly 2**62."""
    result = await store.add_credits(user_id, 2**62, "purchase")

    assert result.ok
    assert 2**62 == (await store.get_balance(user_id)).balance
    with pytest.raises(InvalidArgumentError, match="balance"):
        await store.add_credits(user_id, 1, "purchase")
    assert 2**62 == (await store.get_balance(user_id)).balance
    await assert_invariants(store, user_id)


async def test_settlement_beyond_the_balance_range_is_refused(
    store: CreditStore, user_id: str
) -> None:
    """A charge that would take the balance below -2**62 is refused and the hold stays active."""
    await store.add_credits(user_id, 2, "purchase")
    first = await store.reserve_credits(user_id, 1, "chat", min_balance=0)
    second = await store.reserve_credits(user_id, 1, "chat", min_balance=0)
    assert (await store.deduct_credits(user_id, first.reservation_id, 2**62)).ok
    before = (await store.get_balance(user_id), await all_rows(store, user_id))

    with pytest.raises(InvalidArgumentError, match="balance"):
        await store.deduct_credits(user_id, second.reservation_id, 2**62)

    assert before == (await store.get_balance(user_id), await all_rows(store, user_id))
    assert 1 == before[0].reserved
    await assert_invariants(store, user_id)


async def test_ids_of_256_characters_are_accepted(store: CreditStore) -> None:
    """An id of exactly 256 characters is valid."""
    user_id = "u" * 256

    result = await store.add_credits(user_id, 10, "purchase", idempotency_key="k" * 256)

    assert result.ok
    assert 10 == (await store.get_balance(user_id)).balance


# -- error results ------------------------------------------------------------------------------


async def _already_refunded(s: CreditStore, w: World) -> Any:
    await s.refund_credits(w.usage)
    return await s.refund_credits(w.usage)


Expect = Callable[[World], dict[str, object]]

ERROR_RESULTS = [
    pytest.param(
        lambda s, w: s.reserve_credits(w.user, 1000, "chat"),
        InsufficientCreditsError,
        lambda w: {"user_id": w.user, "needed": 1000, "available": 70, "min_balance": 5},
        id="insufficient_credits",
    ),
    pytest.param(
        lambda s, w: s.charge_credits(w.user, 1000, "chat"),
        InsufficientCreditsError,
        lambda w: {"user_id": w.user, "needed": 1000, "available": 70, "min_balance": 5},
        id="charge_insufficient_credits",
    ),
    pytest.param(
        lambda s, w: s.reserve_credits(w.user, 6, "chat", {"model": "m1"}, min_balance=0),
        SpendCapExceededError,
        lambda w: {
            "user_id": w.user,
            "amount": 6,
            "limit": 25,
            "current_spend": 20,
            "model": "m1",
            "reserved": 0,
            "cap_type": "daily",
        },
        id="spend_cap_exceeded",
    ),
    pytest.param(
        lambda s, w: s.charge_credits(w.user, 6, "chat", {"model": "m1"}, min_balance=0),
        SpendCapExceededError,
        lambda w: {"user_id": w.user, "amount": 6, "limit": 25, "current_spend": 20},
        id="charge_spend_cap_exceeded",
    ),
    pytest.param(
        lambda s, w: s.reserve_team_credits(w.team, w.user, 51, "chat"),
        SpendCapExceededError,
        lambda w: {"user_id": w.user, "amount": 51, "limit": 50, "current_spend": 0},
        id="team_hold_member_cap",
    ),
    pytest.param(
        lambda s, w: s.reserve_team_credits(w.team, w.user, 101, "chat"),
        InsufficientTeamBalanceError,
        lambda w: {"team_id": w.team, "needed": 101, "available": 100},
        id="team_hold_insufficient_team_balance",
    ),
    pytest.param(
        lambda s, w: s.reserve_team_credits(w.team, "stranger", 5, "chat"),
        UserNotInTeamError,
        lambda w: {"team_id": w.team, "user_id": "stranger"},
        id="team_hold_user_not_in_team",
    ),
    pytest.param(
        lambda s, w: s.reserve_team_credits("team-nope", w.user, 5, "chat"),
        TeamNotFoundError,
        lambda w: {"team_id": "team-nope"},
        id="team_hold_team_not_found",
    ),
    pytest.param(
        lambda s, w: s.deduct_credits(w.user, "res-nope", 5),
        ReservationNotFoundError,
        lambda w: {"user_id": w.user, "reservation_id": "res-nope"},
        id="reservation_not_found",
    ),
    pytest.param(
        lambda s, w: s.release_reservation(w.user, "res-nope"),
        ReservationNotFoundError,
        lambda w: {"user_id": w.user, "reservation_id": "res-nope"},
        id="release_not_found",
    ),
    pytest.param(
        lambda s, w: s.deduct_credits(w.user, w.settled, 5),
        ReservationAlreadySettledError,
        lambda w: {"reservation_id": w.settled},
        id="reservation_already_settled",
    ),
    pytest.param(
        lambda s, w: s.release_reservation(w.user, w.settled),
        ReservationAlreadySettledError,
        lambda w: {"reservation_id": w.settled},
        id="release_already_settled",
    ),
    pytest.param(
        lambda s, w: s.deduct_credits(w.user, w.released, 5),
        ReservationReleasedError,
        lambda w: {"reservation_id": w.released},
        id="reservation_released",
    ),
    pytest.param(
        lambda s, w: s.add_credits(w.user, 5, "purchase", idempotency_key="grant-1"),
        IdempotencyConflictError,
        lambda w: {"idempotency_key": "grant-1"},
        id="idempotency_conflict",
    ),
    pytest.param(
        lambda s, w: s.refund_credits("tx-nope"),
        TransactionNotFoundError,
        lambda w: {"transaction_id": "tx-nope"},
        id="transaction_not_found",
    ),
    pytest.param(
        lambda s, w: s.refund_credits(w.grant),
        NotRefundableError,
        lambda w: {"transaction_id": w.grant},
        id="not_refundable",
    ),
    pytest.param(
        _already_refunded,
        AlreadyRefundedError,
        lambda w: {"transaction_id": w.usage},
        id="already_refunded",
    ),
    pytest.param(
        lambda s, w: s.refund_credits(w.usage, 21),
        OverRefundError,
        lambda w: {"transaction_id": w.usage, "requested": 21, "refundable": 20},
        id="over_refund",
    ),
    pytest.param(
        lambda s, w: s.deduct_team("team-nope", w.user, 5),
        TeamNotFoundError,
        lambda w: {"team_id": "team-nope"},
        id="team_not_found",
    ),
    pytest.param(
        lambda s, w: s.get_team_balance("team-nope"),
        TeamNotFoundError,
        lambda w: {"team_id": "team-nope"},
        id="team_balance_not_found",
    ),
    pytest.param(
        lambda s, w: s.add_team_credits("team-nope", 5),
        TeamNotFoundError,
        lambda w: {"team_id": "team-nope"},
        id="team_topup_not_found",
    ),
    pytest.param(
        lambda s, w: s.add_team_member("team-nope", w.user),
        TeamNotFoundError,
        lambda w: {"team_id": "team-nope"},
        id="add_member_team_not_found",
    ),
    pytest.param(
        lambda s, w: s.remove_team_member("team-nope", w.user),
        TeamNotFoundError,
        lambda w: {"team_id": "team-nope"},
        id="remove_member_team_not_found",
    ),
    pytest.param(
        lambda s, w: s.deduct_team(w.team, "stranger", 5),
        UserNotInTeamError,
        lambda w: {"team_id": w.team, "user_id": "stranger"},
        id="user_not_in_team",
    ),
    pytest.param(
        lambda s, w: s.deduct_team(w.team, w.user, 101),
        InsufficientTeamBalanceError,
        lambda w: {"team_id": w.team, "needed": 101, "available": 100},
        id="insufficient_team_balance",
    ),
    pytest.param(
        lambda s, w: s.deduct_team(w.team, w.user, 51),
        SpendCapExceededError,
        lambda w: {"user_id": w.user, "amount": 51, "limit": 50, "current_spend": 0},
        id="team_member_cap",
    ),
]


@pytest.mark.parametrize(("call", "error", "expect"), ERROR_RESULTS)
async def test_raise_for_error_raises_the_matching_credit_error(
    store: CreditStore,
    user_id: str,
    clock: FakeClock,
    call: Call,
    error: type[CreditError],
    expect: Expect,
) -> None:
    """An error result is not ok, and raise_for_error raises its CreditError with the details."""
    w = await _world(store, user_id, clock)
    result = await call(store, w)

    with pytest.raises(error) as caught:
        result.raise_for_error()

    assert not result.ok
    assert 0 == getattr(result, "amount", 0)  # a refused call wrote no row
    assert ErrorCode(result.error) == error.code
    assert error.code == caught.value.code
    assert isinstance(caught.value, DuctoError)
    assert expect(w) == {name: getattr(caught.value, name) for name in expect(w)}


async def test_raise_for_error_returns_an_ok_result(store: CreditStore, user_id: str) -> None:
    """A successful result is ok, and raise_for_error returns it unchanged."""
    result = await store.add_credits(user_id, 10, "purchase")

    assert result.ok
    assert result is result.raise_for_error()


async def test_floor_refusal_names_the_minimum_balance(store: CreditStore, user_id: str) -> None:
    """A hold refused only by the floor says which minimum balance it would break."""
    await store.add_credits(user_id, 10, "purchase")
    result = await store.reserve_credits(user_id, 6, "chat")

    with pytest.raises(InsufficientCreditsError) as caught:
        result.raise_for_error()

    assert (0, 6, 10, 5) == (result.amount, result.requested, result.available, result.min_balance)
    assert "minimum balance of 5" in str(caught.value)
    assert "leave 4" in str(caught.value)


async def test_cap_refusal_reports_the_real_overage(store: CreditStore, user_id: str) -> None:
    """The message says by how much the cap would be passed: spend + holds + amount - limit."""
    await store.add_credits(user_id, 100, "purchase")
    await store.set_spend_cap(SpendCap(user_id=user_id, cap_type="daily", limit=10))
    spent = await store.reserve_credits(user_id, 8, "chat", min_balance=0)
    await store.deduct_credits(user_id, spent.reservation_id, 6)
    await store.reserve_credits(user_id, 2, "chat", min_balance=0)

    result = await store.reserve_credits(user_id, 8, "chat", min_balance=0)
    with pytest.raises(SpendCapExceededError) as caught:
        result.raise_for_error()

    assert (10, 6, 2, "daily") == (
        result.cap_limit,
        result.cap_spend,
        result.cap_reserved,
        result.cap_type,
    )
    assert "daily spend cap of 10 by 6 (6 spent, 2 held, 8 more requested)" in str(caught.value)
