"""
A small reference model of the store contract (``docs/contract.md``), for the state machine.

It is written from the contract alone, for clarity rather than speed: plain lists, linear
scans, no indexes. It covers user accounts only (no teams, caps, plans or allowance):
balances, lots with expiry and the burn-down order, holds with a TTL, deductions that may
overrun, releases, refunds into the lots a debit drew from, negative adjustments, sweeps and
idempotency keys scoped per account and operation kind.

Every operation returns an *outcome*: a plain dict of the result fields the contract defines,
with the model's own ids (``T1`` for ledger rows, ``R1`` for holds, ``L1`` for lots). The test
turns store results into the same shape, mapping store ids onto model ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from ducto.errors import ErrorCode, InvalidArgumentError
from ducto.interface._retention import DEFAULT_RETENTION

Outcome = dict[str, Any]

REFUNDABLE = ("usage", "team_usage")
KEY_RETENTION = DEFAULT_RETENTION
"""Idempotency records older than this are gone (the stores under test use the default)."""


@dataclass
class Lot:
    """A positive grant's remainder; ``seq`` is its age (lower is older)."""

    id: str
    seq: int
    remaining: int
    expires_at: datetime | None


@dataclass
class Draw:
    """How much a debit took from one lot, and how much refunds have put back since."""

    lot: Lot
    taken: int
    refunded: int = 0


@dataclass
class Hold:
    """A reservation: ``state`` is ``active``, ``settled`` or ``released``."""

    id: str
    user_id: str
    amount: int
    expires_at: datetime
    state: str = "active"


@dataclass
class Row:
    """One ledger row."""

    id: str
    user_id: str
    type: str
    amount: int
    balance_after: int
    created_at: datetime
    reservation_id: str | None = None
    idempotency_key: str | None = None
    draws: list[Draw] = field(default_factory=list)
    refunded: int = 0


@dataclass
class Account:
    """A user's balance, lots, holds, ledger and stored idempotent results."""

    balance: int = 0
    lifetime_purchased: int = 0
    lots: list[Lot] = field(default_factory=list)
    holds: list[Hold] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    keys: dict[tuple[str, str], tuple[tuple[Any, ...], Outcome, datetime]] = field(
        default_factory=dict
    )


class Reference:
    """The contract, executed naively on a few accounts."""

    def __init__(self, now: datetime) -> None:
        self.now = now
        self.accounts: dict[str, Account] = {}
        self.counter = 0

    # -- helpers -----------------------------------------------------------------------------

    def advance(self, seconds: float) -> None:
        """Move the model's clock forward."""
        self.now += timedelta(seconds=seconds)

    def account(self, user_id: str) -> Account:
        """The user's account; an account nobody wrote to reads as zeros."""
        if user_id not in self.accounts:
            self.accounts[user_id] = Account()
        return self.accounts[user_id]

    def _next(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def _expired(self, lot: Lot) -> bool:
        return lot.expires_at is not None and self.now >= lot.expires_at

    def _counting(self, hold: Hold) -> bool:
        return hold.state == "active" and self.now < hold.expires_at

    def reserved(self, acct: Account) -> int:
        """Active holds whose TTL has not passed."""
        return sum(h.amount for h in acct.holds if self._counting(h))

    def expired_unswept(self, acct: Account) -> int:
        """Credits left in expired lots (never spendable, swept or not)."""
        return sum(lot.remaining for lot in acct.lots if self._expired(lot))

    def available(self, acct: Account) -> int:
        """Spendable: balance minus expired-but-unswept credits minus active holds."""
        return acct.balance - self.expired_unswept(acct) - self.reserved(acct)

    def _burn_order(self, acct: Account) -> list[Lot]:
        """Lots holding credits in the order debits consume them."""
        live = [lot for lot in acct.lots if lot.remaining > 0 and not self._expired(lot)]
        dead = [lot for lot in acct.lots if lot.remaining > 0 and self._expired(lot)]
        # soonest-expiring first, non-expiring last, oldest first among equals
        live.sort(key=lambda lot: (lot.expires_at is None, lot.expires_at or self.now, lot.seq))
        # then expired-but-unswept lots, oldest expiry first
        dead.sort(key=lambda lot: (lot.expires_at, lot.seq))
        return live + dead

    def _debit(self, acct: Account, amount: int) -> list[Draw]:
        """Take `amount` from the lots in burn-down order; the rest takes the balance below 0."""
        draws: list[Draw] = []
        left = amount
        for lot in self._burn_order(acct):
            if left == 0:
                break
            take = min(lot.remaining, left)
            lot.remaining -= take
            left -= take
            draws.append(Draw(lot, take))
        acct.balance -= amount
        return draws

    def _new_lot(self, acct: Account, amount: int, expires_at: datetime | None) -> None:
        self.counter += 1
        acct.lots.append(Lot(f"L{self.counter}", self.counter, amount, expires_at))

    def _credit(self, acct: Account, amount: int, expires_at: datetime | None) -> None:
        """A credit first pays any debt; only the rest becomes a lot."""
        debt = min(amount, -acct.balance) if acct.balance < 0 else 0
        acct.balance += amount
        if amount - debt > 0:
            self._new_lot(acct, amount - debt, expires_at)

    def _row(self, user_id: str, type_: str, amount: int, **extra: Any) -> Row:
        acct = self.account(user_id)
        row = Row(self._next("T"), user_id, type_, amount, acct.balance, self.now, **extra)
        acct.rows.append(row)
        return row

    def _replay(self, acct: Account, kind: str, key: str | None, print_: tuple[Any, ...]) -> Any:
        """None when the key is new; the stored outcome (as a replay) or a conflict otherwise."""
        if key is None or (kind, key) not in acct.keys:
            return None
        stored_print, outcome, written = acct.keys[(kind, key)]
        if written < self.now - KEY_RETENTION:
            return None  # past the stores' default retention: a new request
        if stored_print != print_:
            return {"error": ErrorCode.IDEMPOTENCY_CONFLICT, "amount": 0}
        return {**outcome, "idempotent": True}

    def _find_row(self, transaction_id: str) -> Row | None:
        for acct in self.accounts.values():
            for row in acct.rows:
                if row.id == transaction_id:
                    return row
        return None

    # -- reads -------------------------------------------------------------------------------

    def get_balance(self, user_id: str) -> Outcome:
        """What `get_balance` reports."""
        acct = self.account(user_id)
        return {
            "balance": acct.balance,
            "lifetime_purchased": acct.lifetime_purchased,
            "available": self.available(acct),
            "reserved": self.reserved(acct),
            "expired_unswept": self.expired_unswept(acct),
            "allowance_remaining": 0,
        }

    def list_lots(self, user_id: str) -> list[Outcome]:
        """What `list_lots` reports: lots holding credits, in burn-down order."""
        return [
            {
                "id": lot.id,
                "remaining": lot.remaining,
                "expires_at": lot.expires_at,
                "expired": self._expired(lot),
            }
            for lot in self._burn_order(self.account(user_id))
        ]

    def rows(self, user_id: str) -> list[Outcome]:
        """The user's ledger, oldest first."""
        return [
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
            for row in self.account(user_id).rows
        ]

    def row_ids(self) -> list[tuple[str, str]]:
        """Every ledger row of every account, as (id, type)."""
        return [(row.id, row.type) for acct in self.accounts.values() for row in acct.rows]

    def hold_ids(self, user_id: str) -> list[str]:
        """Every hold the user ever made, oldest first."""
        return [hold.id for hold in self.account(user_id).holds]

    # -- operations --------------------------------------------------------------------------

    def add_credits(
        self,
        user_id: str,
        amount: int,
        type_: str,
        expires_at: datetime | None = None,
        key: str | None = None,
    ) -> Outcome:
        """`add_credits`: a grant, or a negative adjustment bounded by what is available."""
        acct = self.account(user_id)
        replay = self._replay(acct, "grant", key, (amount, type_, expires_at))
        if replay is not None:
            return replay
        if expires_at is not None and expires_at <= self.now:
            # checked only for a new grant: a redelivery replays even after the expiry
            raise InvalidArgumentError(f"expires_at must be in the future, got {expires_at}")
        if amount < 0 and self.available(acct) + amount < 0:
            return {
                "error": ErrorCode.INSUFFICIENT_CREDITS,
                "amount": 0,
                "available": self.available(acct),
            }
        if amount > 0:
            self._credit(acct, amount, expires_at)
        else:
            self._debit(acct, -amount)
        if type_ == "purchase":
            acct.lifetime_purchased += amount
        row = self._row(user_id, type_, amount, idempotency_key=key)
        outcome = {
            "error": None,
            "transaction_id": row.id,
            "amount": amount,
            "new_balance": acct.balance,
            "lifetime_purchased": acct.lifetime_purchased,
            "expires_at": expires_at,
            "available": self.available(acct),
            "idempotent": False,
            "idempotency_key": key,
        }
        if key is not None:
            acct.keys[("grant", key)] = ((amount, type_, expires_at), outcome, self.now)
        return outcome

    def reserve(
        self,
        user_id: str,
        amount: int,
        operation_type: str,
        min_balance: int,
        ttl_seconds: int,
        key: str | None = None,
    ) -> Outcome:
        """`reserve_credits` without caps or allowance."""
        acct = self.account(user_id)
        replay = self._replay(acct, "reserve", key, (amount, operation_type, None, False))
        if replay is not None:
            return replay
        spendable = self.available(acct)
        if spendable - amount < min_balance:
            return {"error": ErrorCode.INSUFFICIENT_CREDITS, "amount": 0, "available": spendable}
        hold = Hold(self._next("R"), user_id, amount, self.now + timedelta(seconds=ttl_seconds))
        acct.holds.append(hold)
        outcome = {
            "error": None,
            "reservation_id": hold.id,
            "amount": amount,
            "balance": acct.balance,
            "reserved_total": self.reserved(acct),
            "expires_at": hold.expires_at,
            "available": spendable - amount,
            "idempotent": False,
            "idempotency_key": key,
        }
        if key is not None:
            acct.keys[("reserve", key)] = ((amount, operation_type, None, False), outcome, self.now)
        return outcome

    def _hold(self, user_id: str, reservation_id: str) -> Hold | None:
        for hold in self.account(user_id).holds:
            if hold.id == reservation_id:
                return hold
        return None

    def deduct(
        self, user_id: str, reservation_id: str, amount: int, key: str | None = None
    ) -> Outcome:
        """`deduct_credits`: idempotency, then the hold's state, then the full charge."""
        acct = self.account(user_id)
        replay = self._replay(acct, "deduct", key, (reservation_id, amount))
        if replay is not None:
            return replay
        hold = self._hold(user_id, reservation_id)
        if hold is None:
            return {"error": ErrorCode.RESERVATION_NOT_FOUND, "amount": 0}
        if hold.state == "settled":
            return {"error": ErrorCode.RESERVATION_ALREADY_SETTLED, "amount": 0}
        if hold.state == "released":
            return {"error": ErrorCode.RESERVATION_RELEASED, "amount": 0}
        before = acct.balance
        hold.state = "settled"
        draws = self._debit(acct, amount)
        row = self._row(
            user_id,
            "usage",
            -amount,
            reservation_id=reservation_id,
            idempotency_key=key,
            draws=draws,
        )
        outcome = {
            "error": None,
            "transaction_id": row.id,
            "reservation_id": reservation_id,
            "amount": -amount,
            "charged": amount,
            "balance_after": acct.balance,
            "allowance_consumed": 0,
            "shortfall": max(0, amount - max(before, 0)),
            "idempotent": False,
            "idempotency_key": key,
        }
        if key is not None:
            acct.keys[("deduct", key)] = ((reservation_id, amount), outcome, self.now)
        return outcome

    def release(self, user_id: str, reservation_id: str) -> Outcome:
        """`release_reservation`: releasing twice is fine, a settled hold cannot be released."""
        acct = self.account(user_id)
        hold = self._hold(user_id, reservation_id)
        if hold is None:
            return {"error": ErrorCode.RESERVATION_NOT_FOUND, "amount": 0, "released": False}
        if hold.state == "settled":
            return {
                "error": ErrorCode.RESERVATION_ALREADY_SETTLED,
                "amount": 0,
                "released": False,
            }
        hold.state = "released"
        return {
            "error": None,
            "released": True,
            "amount": hold.amount,
            "available": self.available(acct),
        }

    def refund(self, transaction_id: str, amount: int | None, key: str | None = None) -> Outcome:
        """`refund_credits`: debt first, then the lots the debit drew from, newest-drawn first."""
        original = self._find_row(transaction_id)
        if original is None:
            return {"error": ErrorCode.TRANSACTION_NOT_FOUND, "amount": 0}
        acct = self.account(original.user_id)
        replay = self._replay(acct, "refund", key, (transaction_id, amount))
        if replay is not None:
            return replay
        if original.type not in REFUNDABLE:
            return {"error": ErrorCode.NOT_REFUNDABLE, "amount": 0}
        refundable = -original.amount - original.refunded
        if refundable == 0:
            return {"error": ErrorCode.ALREADY_REFUNDED, "amount": 0}
        if amount is not None and amount > refundable:
            return {"error": ErrorCode.OVER_REFUND, "amount": 0, "refundable": refundable}
        give = refundable if amount is None else amount
        left = give
        if acct.balance < 0:
            debt = min(left, -acct.balance)
            acct.balance += debt
            left -= debt
        for draw in reversed(original.draws):
            put = min(draw.taken - draw.refunded, left)
            draw.refunded += put
            draw.lot.remaining += put
            acct.balance += put
            left -= put
        if left > 0:
            acct.balance += left
            self._new_lot(acct, left, None)
        original.refunded += give
        row = self._row(original.user_id, "refund", give, idempotency_key=key)
        outcome = {
            "error": None,
            "refund_transaction_id": row.id,
            "original_transaction_id": transaction_id,
            "amount": give,
            "new_balance": acct.balance,
            "refundable": refundable - give,
            "idempotent": False,
            "idempotency_key": key,
        }
        if key is not None:
            acct.keys[("refund", key)] = ((transaction_id, amount), outcome, self.now)
        return outcome

    def sweep(self, dry_run: bool) -> Outcome:
        """`sweep_expired_credits`: one expiry row per expired lot with a remainder."""
        count = total = 0
        for user_id, acct in self.accounts.items():
            for lot in sorted(acct.lots, key=lambda lot: lot.seq):
                if self._expired(lot) and lot.remaining > 0:
                    amount = lot.remaining
                    count += 1
                    total += amount
                    if not dry_run:
                        lot.remaining = 0
                        acct.balance -= amount
                        self._row(user_id, "expiry", -amount)
        return {"expired_count": count, "expired_amount": total, "dry_run": dry_run}
