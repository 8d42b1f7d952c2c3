"""
The store against an independent reference model, step by step, under hypothesis.

A `RuleBasedStateMachine` sends the same random history of grants (with and without expiry
and keys), negative adjustments, holds, deductions, releases, refunds, sweeps and clock jumps
to a fresh store and to the pure-Python model in ``_reference.py``, and compares every result
(error codes, amounts, balances, available, reserved, shortfall, refundable, sweep figures)
and, after every step, each user's balance, lots and ledger rows. Store ids are mapped onto
the model's ids as they first appear, so the comparison is exact apart from the ids.

The machine is synchronous; it drives the async store through an anyio blocking portal on
asyncio and on trio. Stores come from the same `OPENERS` the `store` fixture uses, so a new
store kind joins this test when it joins the fixture.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from tests.conftest import OPENERS, REQUIRED, STORES, FakeClock
from tests.contract._checks import all_rows, assert_invariants
from tests.contract._reference import Outcome, Reference

from ducto.errors import ErrorCode, InvalidArgumentError
from ducto.interface.base import CreditStore
from ducto.interface.models import (
    AddCreditsResult,
    DeductionResult,
    RefundResult,
    ReleaseResult,
    ReserveResult,
    SweepResult,
)

START = datetime(2026, 3, 15, 12, 0, tzinfo=UTC)
USERS = ("user-a", "user-b")
UNKNOWN_HOLD = "R-unknown"
UNKNOWN_TX = "T-unknown"
STORE_FACTORIES: dict[str, Callable[[Path, FakeClock], CreditStore]] = OPENERS
"""Store kind -> opener(directory, clock); shared with the `store` fixture."""
EXAMPLES: dict[str, int] = {"memory": 60}
"""Random histories per loop and store kind; a kind not listed runs `DEFAULT_EXAMPLES`."""
DEFAULT_EXAMPLES = 25
EXAMPLES_ENV = "DUCTO_STATEFUL_EXAMPLES"
"""Set to an int to run that many histories for every store kind instead."""


def _settings(kind: str) -> settings:
    override = os.environ.get(EXAMPLES_ENV)
    examples = int(override) if override else EXAMPLES.get(kind, DEFAULT_EXAMPLES)
    return settings(max_examples=examples, stateful_step_count=40, deadline=None)


users = st.sampled_from(USERS)
keys = st.sampled_from([None, None, None, "k1", "k2", "k3"])
whose = st.sampled_from(["active"] * 4 + ["own"] * 2 + ["other", "unknown"])
ttls = st.sampled_from([1, 30, 600, 3600, 86400, 3 * 86400])
charges = st.sampled_from(["zero", "less", "exact", "exact", "more", "much_more"])
ID_FIELDS = (
    "id",
    "transaction_id",
    "refund_transaction_id",
    "original_transaction_id",
    "reservation_id",
)

Call = tuple[Any, ...]


def _charge(kind: str, hold: int, delta: int) -> int:
    """A deduction amount relative to the hold: none, less, exactly, more or far more."""
    if kind == "zero":
        return 0
    if kind == "less":
        return max(0, hold - delta)
    if kind == "exact":
        return hold
    if kind == "more":
        return hold + delta
    return hold + 10 * delta


class IdMap:
    """A one-to-one map between store ids and model ids, filled in as ids first appear."""

    def __init__(self) -> None:
        self.to_model: dict[str, str] = {}
        self.to_store: dict[str, str] = {}

    def link(self, store_id: str, model_id: str) -> None:
        """Record that `store_id` stands for `model_id`; fail if either already means another."""
        known = self.to_model.get(store_id)
        if known is None:
            assert model_id not in self.to_store, (
                f"{self.to_store.get(model_id)!r} and {store_id!r} both stand for {model_id}"
            )
            self.to_model[store_id] = model_id
            self.to_store[model_id] = store_id
        else:
            assert model_id == known, f"{store_id!r} stood for {known}, now for {model_id}"

    def model(self, value: Any) -> Any:
        """A store id as the model's id (unmapped ids are marked, so they never compare equal)."""
        if not isinstance(value, str):
            return value
        return self.to_model.get(value, f"store:{value}")

    def store(self, model_id: str) -> str:
        """A model id as the store's id (ids the model made up pass through unchanged)."""
        return self.to_store.get(model_id, model_id)


# -- store results in the model's shape ---------------------------------------------------------


def _add(r: AddCreditsResult) -> Outcome:
    if r.error is None:
        return {
            "error": None,
            "transaction_id": r.transaction_id,
            "amount": r.amount,
            "new_balance": r.new_balance,
            "lifetime_purchased": r.lifetime_purchased,
            "expires_at": r.expires_at,
            "available": r.available,
            "idempotent": r.idempotent,
            "idempotency_key": r.idempotency_key,
        }
    if r.error == ErrorCode.INSUFFICIENT_CREDITS:
        return {"error": r.error, "amount": r.amount, "available": r.available}
    return {"error": r.error, "amount": r.amount}


def _reserve(r: ReserveResult) -> Outcome:
    if r.error is None:
        return {
            "error": None,
            "reservation_id": r.reservation_id,
            "amount": r.amount,
            "balance": r.balance,
            "reserved_total": r.reserved_total,
            "expires_at": r.expires_at,
            "available": r.available,
            "idempotent": r.idempotent,
            "idempotency_key": r.idempotency_key,
        }
    if r.error == ErrorCode.INSUFFICIENT_CREDITS:
        return {"error": r.error, "amount": r.amount, "available": r.available}
    return {"error": r.error, "amount": r.amount}


def _deduct(r: DeductionResult) -> Outcome:
    if r.error is None:
        return {
            "error": None,
            "transaction_id": r.transaction_id,
            "reservation_id": r.reservation_id,
            "amount": r.amount,
            "charged": r.charged,
            "balance_after": r.balance_after,
            "allowance_consumed": r.allowance_consumed,
            "shortfall": r.shortfall,
            "idempotent": r.idempotent,
            "idempotency_key": r.idempotency_key,
        }
    return {"error": r.error, "amount": r.amount}


def _release(r: ReleaseResult) -> Outcome:
    if r.error is None:
        return {"error": None, "released": r.released, "amount": r.amount, "available": r.available}
    return {"error": r.error, "amount": r.amount, "released": r.released}


def _refund(r: RefundResult) -> Outcome:
    if r.error is None:
        return {
            "error": None,
            "refund_transaction_id": r.refund_transaction_id,
            "original_transaction_id": r.original_transaction_id,
            "amount": r.amount,
            "new_balance": r.new_balance,
            "refundable": r.refundable,
            "idempotent": r.idempotent,
            "idempotency_key": r.idempotency_key,
        }
    if r.error == ErrorCode.OVER_REFUND:
        return {"error": r.error, "amount": r.amount, "refundable": r.refundable}
    return {"error": r.error, "amount": r.amount}


def _sweep(r: SweepResult) -> Outcome:
    return {
        "expired_count": r.expired_count,
        "expired_amount": r.expired_amount,
        "dry_run": r.dry_run,
    }


# -- the machine --------------------------------------------------------------------------------


class StoreVsReference(RuleBasedStateMachine):
    """Send every step to the store and to the model; they must agree on everything."""

    portal: ClassVar[BlockingPortal]
    opener: ClassVar[Callable[[Path, FakeClock], CreditStore]]

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock(START)
        self.model = Reference(START)
        self.ids = IdMap()
        self.sent: list[Call] = []
        self.directory = tempfile.TemporaryDirectory()
        self.store = self.opener(Path(self.directory.name), self.clock)
        self.opened: AbstractContextManager[CreditStore] = self.portal.wrap_async_context_manager(
            self.store
        )
        self.opened.__enter__()
        self.portal.call(self.store.setup)

    def teardown(self) -> None:
        """Close the store and drop its files."""
        self.opened.__exit__(None, None, None)
        self.directory.cleanup()

    # -- plumbing ------------------------------------------------------------------------------

    def _send(self, call: Call) -> None:
        if call[0] in ("add", "reserve", "deduct", "refund") and call[-1] is not None:
            self.sent.append(call)
        try:
            expected = self._expect(call)
        except InvalidArgumentError as exc:
            expected = {"raises": type(exc).__name__}
        try:
            actual = self.portal.call(self._perform, call)
        except InvalidArgumentError as exc:
            actual = {"raises": type(exc).__name__}
        if expected.get("error") is None and actual.get("error") is None:
            for name in ID_FIELDS:
                if name in expected and name in actual:
                    self.ids.link(actual[name], expected[name])
        assert expected == self._in_model_ids(actual), f"{call}"

    def _in_model_ids(self, outcome: Outcome) -> Outcome:
        return {k: self.ids.model(v) if k in ID_FIELDS else v for k, v in outcome.items()}

    def _expect(self, call: Call) -> Outcome:
        model = self.model
        match call:
            case ("add", user, amount, type_, expires_at, key):
                return model.add_credits(user, amount, type_, expires_at, key)
            case ("reserve", user, amount, min_balance, ttl, key):
                return model.reserve(user, amount, "chat", min_balance, ttl, key)
            case ("deduct", user, reservation_id, amount, key):
                return model.deduct(user, reservation_id, amount, key)
            case ("release", user, reservation_id):
                return model.release(user, reservation_id)
            case ("refund", transaction_id, amount, key):
                return model.refund(transaction_id, amount, key)
            case ("sweep", dry_run):
                return model.sweep(dry_run)
        raise AssertionError(f"unknown call {call}")

    async def _perform(self, call: Call) -> Outcome:
        store, sid = self.store, self.ids.store
        match call:
            case ("add", user, amount, type_, expires_at, key):
                return _add(
                    await store.add_credits(
                        user, amount, type_, expires_at=expires_at, idempotency_key=key
                    )
                )
            case ("reserve", user, amount, min_balance, ttl, key):
                return _reserve(
                    await store.reserve_credits(
                        user, amount, "chat", min_balance=min_balance, ttl=ttl, idempotency_key=key
                    )
                )
            case ("deduct", user, reservation_id, amount, key):
                return _deduct(await store.deduct_credits(user, sid(reservation_id), amount, key))
            case ("release", user, reservation_id):
                return _release(await store.release_reservation(user, sid(reservation_id)))
            case ("refund", transaction_id, amount, key):
                return _refund(
                    await store.refund_credits(sid(transaction_id), amount, idempotency_key=key)
                )
            case ("sweep", dry_run):
                return _sweep(await store.sweep_expired_credits(dry_run=dry_run))
        raise AssertionError(f"unknown call {call}")

    async def _observe(self) -> dict[str, tuple[Outcome, list[Outcome], list[Outcome]]]:
        seen: dict[str, tuple[Outcome, list[Outcome], list[Outcome]]] = {}
        for user in USERS:
            await assert_invariants(self.store, user)
            b = await self.store.get_balance(user)
            balance = {
                "balance": b.balance,
                "lifetime_purchased": b.lifetime_purchased,
                "available": b.available,
                "reserved": b.reserved,
                "expired_unswept": b.expired_unswept,
                "allowance_remaining": b.allowance_remaining,
            }
            lots = [
                {
                    "id": lot.id,
                    "remaining": lot.remaining,
                    "expires_at": lot.expires_at,
                    "expired": lot.expired,
                }
                for lot in await self.store.list_lots(user)
            ]
            rows = [
                {
                    "id": row.id,
                    "type": row.type,
                    "amount": row.amount,
                    "balance_after": row.balance_after,
                    "created_at": row.created_at,
                    "reservation_id": row.reservation_id,
                    "idempotency_key": row.idempotency_key,
                    "refunded": row.refunded,
                }
                for row in await all_rows(self.store, user)
            ]
            seen[user] = (balance, lots, rows)
        return seen

    def _hold(self, user: str, whose: str, index: int) -> tuple[str, int]:
        """Pick a hold (preferably an active one of the user's, or any) and its amount."""
        owner = user if whose in ("own", "active") else next(u for u in USERS if u != user)
        holds = self.model.account(owner).holds
        if whose == "active":
            holds = [hold for hold in holds if hold.state == "active"] or holds
        if whose == "unknown" or not holds:
            return UNKNOWN_HOLD, 10
        hold = holds[index % len(holds)]
        return hold.id, hold.amount

    def _any_holds(self) -> bool:
        return any(self.model.hold_ids(user) for user in USERS)

    def _any_usage(self) -> bool:
        return any(t == "usage" for _, t in self.model.row_ids())

    # -- rules ---------------------------------------------------------------------------------

    @initialize(
        purchases=st.lists(st.integers(0, 500), min_size=len(USERS), max_size=len(USERS)),
        bonus=st.integers(1, 300),
        expiry=st.sampled_from([60, 600, 3600, 86400]),
    )
    def open_accounts(self, purchases: list[int], bonus: int, expiry: int) -> None:
        """Start each user with a purchase (maybe none) and an expiring bonus."""
        for user, amount in zip(USERS, purchases, strict=True):
            if amount:
                self._send(("add", user, amount, "purchase", None, None))
            expires_at = self.clock.now + timedelta(seconds=expiry)
            self._send(("add", user, bonus, "signup_bonus", expires_at, None))

    @rule(
        user=users,
        amount=st.integers(1, 500),
        type_=st.sampled_from(["purchase", "subscription", "signup_bonus", "adjustment"]),
        expiry=st.sampled_from([None, None, 1, 60, 600, 3600, 86400, 7 * 86400]),
        key=keys,
    )
    def add_credits(
        self, user: str, amount: int, type_: str, expiry: int | None, key: str | None
    ) -> None:
        """Grant credits, maybe expiring, maybe keyed."""
        expires_at = None if expiry is None else self.clock.now + timedelta(seconds=expiry)
        self._send(("add", user, amount, type_, expires_at, key))

    @rule(user=users, amount=st.integers(1, 300), key=keys)
    def take_credits(self, user: str, amount: int, key: str | None) -> None:
        """Take credits back with a negative adjustment."""
        self._send(("add", user, -amount, "adjustment", None, key))

    @rule(
        user=users,
        amount=st.integers(1, 150),
        min_balance=st.integers(0, 10),
        ttl=ttls,
        key=keys,
    )
    def reserve(self, user: str, amount: int, min_balance: int, ttl: int, key: str | None) -> None:
        """Hold credits with a floor and a TTL."""
        self._send(("reserve", user, amount, min_balance, ttl, key))

    @rule(
        user=users,
        amount=st.integers(1, 150),
        ttl=ttls,
        charge=charges,
        delta=st.integers(1, 100),
        key=keys,
    )
    def reserve_and_deduct(
        self, user: str, amount: int, ttl: int, charge: str, delta: int, key: str | None
    ) -> None:
        """Hold credits and settle the new hold at once."""
        self._send(("reserve", user, amount, 0, ttl, key))
        holds = self.model.account(user).holds
        if holds:
            self._send(
                ("deduct", user, holds[-1].id, _charge(charge, holds[-1].amount, delta), key)
            )

    @rule(
        user=users,
        amount=st.integers(1, 150),
        ttl=st.sampled_from([1, 60, 600]),
        settle=st.booleans(),
        charge=charges,
        delta=st.integers(1, 100),
    )
    def outlive_hold(
        self, user: str, amount: int, ttl: int, settle: bool, charge: str, delta: int
    ) -> None:
        """Hold credits, let exactly the TTL pass, then settle or release the lapsed hold."""
        self._send(("reserve", user, amount, 0, ttl, None))
        self.agrees_with_reference()
        self.advance(ttl)
        self.agrees_with_reference()
        holds = self.model.account(user).holds
        if not holds:
            return
        hold = holds[-1]
        if settle:
            self._send(("deduct", user, hold.id, _charge(charge, hold.amount, delta), None))
        else:
            self._send(("release", user, hold.id))

    @rule(
        user=users,
        delta=st.integers(0, 50),
        then=st.sampled_from(["settle", "release", "keep"]),
        charge=charges,
        key=keys,
    )
    def overrun(self, user: str, delta: int, then: str, charge: str, key: str | None) -> None:
        """Settle a 1-credit hold for everything and more, then settle a second hold in debt."""
        acct = self.model.account(user)
        self._send(("reserve", user, 1, 0, 600, key))
        self._send(("reserve", user, 1, 0, 600, None))
        if len(acct.holds) < 2:
            return
        first, second = acct.holds[-2], acct.holds[-1]
        self._send(("deduct", user, first.id, max(acct.balance, 0) + delta, key))
        if then == "settle":
            self._send(("deduct", user, second.id, _charge(charge, second.amount, delta), None))
        elif then == "release":
            self._send(("release", user, second.id))

    @precondition(_any_holds)
    @rule(
        user=users,
        whose=whose,
        index=st.integers(0, 50),
        charge=charges,
        delta=st.integers(1, 100),
        key=keys,
    )
    def deduct(
        self, user: str, whose: str, index: int, charge: str, delta: int, key: str | None
    ) -> None:
        """Settle a hold (the user's, another's or an unknown one) for less, as much or more."""
        reservation_id, amount = self._hold(user, whose, index)
        self._send(("deduct", user, reservation_id, _charge(charge, amount, delta), key))

    @precondition(_any_holds)
    @rule(user=users, whose=whose, index=st.integers(0, 50))
    def release(self, user: str, whose: str, index: int) -> None:
        """Release a hold."""
        self._send(("release", user, self._hold(user, whose, index)[0]))

    @precondition(_any_usage)
    @rule(
        which=st.sampled_from(["usage"] * 6 + ["any", "unknown"]),
        index=st.integers(0, 50),
        amount=st.one_of(st.none(), st.integers(1, 20), st.integers(1, 400)),
        key=keys,
    )
    def refund(self, which: str, index: int, amount: int | None, key: str | None) -> None:
        """Refund (part of) a usage row, or try another row or an unknown id."""
        rows = [i for i, t in self.model.row_ids() if which == "any" or t == "usage"]
        target = UNKNOWN_TX if which == "unknown" else rows[index % len(rows)]
        self._send(("refund", target, amount, key))

    @rule(dry_run=st.booleans())
    def sweep(self, dry_run: bool) -> None:
        """Sweep expired lots, or just report what a sweep would take."""
        self._send(("sweep", dry_run))

    @rule(seconds=st.sampled_from([1, 29, 59, 60, 599, 600, 3600, 86400, 3 * 86400]))
    def advance(self, seconds: int) -> None:
        """Move time forward on the store's clock and the model's."""
        self.clock.advance(seconds)
        self.model.advance(seconds)

    @precondition(lambda self: bool(self.sent))
    @rule(index=st.integers(0, 1000))
    def send_again(self, index: int) -> None:
        """Send an earlier keyed call again, unchanged: a replay, or a conflict-free retry."""
        # a grant whose expires_at has passed since replays if its key was used, else raises
        self._send(self.sent[index % len(self.sent)])

    @invariant()
    def agrees_with_reference(self) -> None:
        """Balances, lots and ledgers match the model, and the store's own invariants hold."""
        seen = self.portal.call(self._observe)
        for user in USERS:
            balance, lots, rows = seen[user]
            assert self.model.get_balance(user) == balance, user
            expected_rows = self.model.rows(user)
            for want, got in zip(expected_rows, rows, strict=False):
                self.ids.link(got["id"], want["id"])
            assert expected_rows == [self._in_model_ids(r) for r in rows], user
            expected_lots = self.model.list_lots(user)
            for want, got in zip(expected_lots, lots, strict=False):
                self.ids.link(got["id"], want["id"])
            assert expected_lots == [self._in_model_ids(lot) for lot in lots], user


@pytest.mark.parametrize("kind", STORES)
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_store_matches_the_reference_model(backend: str, kind: str) -> None:
    """Random histories give identical results, balances, lots and ledgers in store and model."""
    opener = STORE_FACTORIES[kind]
    try:
        opener(Path(tempfile.gettempdir()), FakeClock(START))  # constructors do no I/O
    except (ImportError, LookupError) as exc:
        if kind in REQUIRED:
            pytest.fail(f"{kind} store is required: {exc}")
        pytest.skip(f"{kind} store unavailable: {exc}")
    with start_blocking_portal(backend) as portal:
        machine = type(
            f"StoreVsReference_{kind}_{backend}",
            (StoreVsReference,),
            {"portal": portal, "opener": staticmethod(opener)},
        )

        run_state_machine_as_test(machine, settings=_settings(kind))
