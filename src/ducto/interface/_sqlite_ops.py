"""
The store operations of `SQLiteStore`, as synchronous functions over one `sqlite3` connection.

They run on the connection's thread, inside the transaction (and savepoint) the store opened,
and call the shared rules in `_ledger` for every decision. Nothing here awaits: an operation is
one trip to the connection thread.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal

from ducto.errors import ErrorCode, InvalidArgumentError, PricingVersionNotFoundError
from ducto.interface import _ledger as L
from ducto.interface.models import (
    AddCreditsResult,
    AddTeamMemberResult,
    AllowanceResult,
    BalanceResult,
    CapCheckResult,
    CreateTeamResult,
    CreditLot,
    CreditMetadata,
    DeductionResult,
    GetUserPlanResult,
    PlanDefinition,
    PricingConfigData,
    PricingConfigHistoryItem,
    PricingConfigResult,
    RefundResult,
    ReleaseResult,
    RemoveSpendCapResult,
    RemoveTeamMemberResult,
    ReserveResult,
    SpendCap,
    SweepResult,
    TeamBalanceResult,
    TeamDeductionResult,
    TeamMember,
    TeamTopupResult,
    TransactionPage,
    TransactionRow,
)

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_NEVER_US: Final = 9223372036854775807
_ALL_MODELS: Final = ""


def to_us(moment: datetime) -> int:
    """An aware datetime as integer microseconds since the Unix epoch."""
    delta = moment - _EPOCH
    return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_us(value: int) -> datetime:
    """Integer microseconds since the Unix epoch as an aware UTC datetime."""
    return _EPOCH + timedelta(microseconds=value)


def _opt_dt(value: int | None) -> datetime | None:
    return None if value is None else from_us(value)


_LIVE_LOTS: Final = (
    "SELECT id, seq, remaining, expires_us FROM lots INDEXED BY lots_live"
    " WHERE kind = ? AND account = ? AND remaining > 0 AND expired = 0"
    f" ORDER BY coalesce(expires_us, {_NEVER_US}), seq"
)
_EXPIRED_LOTS: Final = (
    "SELECT id, seq, remaining, expires_us FROM lots INDEXED BY lots_expired"
    " WHERE kind = ? AND account = ? AND remaining > 0 AND expired = 1"
    " ORDER BY expires_us, seq"
)


def _dumps(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))


@dataclass(slots=True, eq=False)
class Account:
    """An account row, loaded once per operation and written back once if it changed."""

    kind: str
    id: str
    balance: int = 0
    lifetime_purchased: int = 0
    reserved: int = 0
    expired_unswept: int = 0
    hold_check_us: int = _NEVER_US
    lot_check_us: int = _NEVER_US
    plan_id: str | None = None
    name: str | None = None
    caps: int = 0
    exists: bool = False

    @property
    def available(self) -> int:
        return L.spendable(self.balance, self.expired_unswept, self.reserved)


class Ops:
    """
    Every store operation against one connection; methods run on the connection thread.

    Args:
        conn: The connection (autocommit off; the store opens the transactions).
        clock: The store clock.
        ids: The id source.
    """

    def __init__(
        self, conn: sqlite3.Connection, clock: Callable[[], datetime], ids: L.IdSource
    ) -> None:
        self.conn = conn
        self.clock = clock
        self.ids = ids
        self._configs: dict[int, PricingConfigData] = {}

    # -- plumbing ----------------------------------------------------------------------------

    def now(self) -> tuple[datetime, int]:
        now = L.read_clock(self.clock)
        return now, to_us(now)

    def one(self, sql: str, params: Sequence[object] = ()) -> Any:
        return self.conn.execute(sql, params).fetchone()

    def load(self, kind: str, account_id: str, now_us: int | None = None) -> Account:
        """Load an account (a blank one if it does not exist), lapsing it at `now_us`."""
        row = self.one(
            "SELECT balance, lifetime_purchased, reserved, expired_unswept, hold_check_us,"
            " lot_check_us, plan_id, name, caps FROM accounts WHERE kind = ? AND id = ?",
            (kind, account_id),
        )
        if row is None:
            acct = Account(kind, account_id)
        else:
            acct = Account(
                kind,
                account_id,
                balance=row[0],
                lifetime_purchased=row[1],
                reserved=row[2],
                expired_unswept=row[3],
                hold_check_us=row[4],
                lot_check_us=row[5],
                plan_id=row[6],
                name=row[7],
                caps=row[8],
                exists=True,
            )
        if now_us is not None and row is not None and self.lapse(acct, now_us):
            # Written at once, so every way out of the operation leaves the row consistent.
            self.save(acct, now_us)
        return acct

    def save(self, acct: Account, now_us: int) -> None:
        values = (
            acct.balance,
            acct.lifetime_purchased,
            acct.reserved,
            acct.expired_unswept,
            acct.hold_check_us,
            acct.lot_check_us,
            acct.plan_id,
            acct.name,
            acct.caps,
        )
        if acct.exists:
            self.conn.execute(
                "UPDATE accounts SET balance = ?, lifetime_purchased = ?, reserved = ?,"
                " expired_unswept = ?, hold_check_us = ?, lot_check_us = ?, plan_id = ?,"
                " name = ?, caps = ? WHERE kind = ? AND id = ?",
                (*values, acct.kind, acct.id),
            )
        else:
            self.conn.execute(
                "INSERT INTO accounts (balance, lifetime_purchased, reserved, expired_unswept,"
                " hold_check_us, lot_check_us, plan_id, name, caps, kind, id, created_us)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (*values, acct.kind, acct.id, now_us),
            )
            acct.exists = True

    def lapse(self, acct: Account, now_us: int) -> bool:
        """Stop counting holds whose TTL passed and set aside lots that expired."""
        kind, account_id = acct.kind, acct.id
        changed = False
        if now_us >= acct.hold_check_us:
            changed = True
            for hold_id, amount, model in self.conn.execute(
                "SELECT id, amount, model FROM holds"
                " WHERE kind = ? AND account = ? AND counted = 1 AND expires_us <= ?",
                (kind, account_id, now_us),
            ).fetchall():
                self.conn.execute("UPDATE holds SET counted = 0 WHERE id = ?", (hold_id,))
                self.uncount(acct, amount, model)
            acct.hold_check_us = self.one(
                "SELECT coalesce(min(expires_us), ?) FROM holds"
                " WHERE kind = ? AND account = ? AND counted = 1",
                (_NEVER_US, kind, account_id),
            )[0]
        if now_us >= acct.lot_check_us:
            changed = True
            expired = self.conn.execute(
                "UPDATE lots SET expired = 1 WHERE kind = ? AND account = ? AND remaining > 0"
                " AND expired = 0 AND expires_us <= ? RETURNING remaining",
                (kind, account_id, now_us),
            ).fetchall()
            acct.expired_unswept += sum(row[0] for row in expired)
            acct.lot_check_us = self.one(
                f"SELECT coalesce(min(coalesce(expires_us, {_NEVER_US})), {_NEVER_US})"
                " FROM lots INDEXED BY lots_live"
                " WHERE kind = ? AND account = ? AND remaining > 0 AND expired = 0",
                (kind, account_id),
            )[0]
        return changed

    def uncount(self, acct: Account, amount: int, model: str | None) -> None:
        acct.reserved -= amount
        if model is not None:
            self.conn.execute(
                "UPDATE reserved_by_model SET amount = amount - ?"
                " WHERE kind = ? AND account = ? AND model = ?",
                (amount, acct.kind, acct.id, model),
            )
            self.conn.execute(
                "DELETE FROM reserved_by_model WHERE kind = ? AND account = ? AND model = ?"
                " AND amount = 0",
                (acct.kind, acct.id, model),
            )

    def _lots(self, kind: str, account_id: str, expired: bool) -> Iterator[L.Lot]:
        cursor = self.conn.execute(_EXPIRED_LOTS if expired else _LIVE_LOTS, (kind, account_id))
        while rows := cursor.fetchmany(8):
            for lot_id, seq, remaining, expires_us in rows:
                yield L.Lot(lot_id, seq, remaining, _opt_dt(expires_us))

    def debit(self, acct: Account, amount: int) -> list[tuple[str, int]]:
        """Take `amount` from the lots in burn-down order; the rest takes the balance below 0."""
        draws: list[tuple[L.Lot, int]] = []
        late: list[tuple[L.Lot, int]] = []
        if amount > 0 and acct.balance > 0:
            draws, rest = L.draw(list(_take(self._lots(acct.kind, acct.id, False), amount)), amount)
            if rest and acct.expired_unswept:
                late, rest = L.draw(list(_take(self._lots(acct.kind, acct.id, True), rest)), rest)
            for lot, _ in draws + late:
                self.conn.execute(
                    "UPDATE lots SET remaining = ? WHERE id = ?", (lot.remaining, lot.id)
                )
        acct.balance -= amount
        acct.expired_unswept -= sum(taken for _, taken in late)
        return [(lot.id, taken) for lot, taken in draws + late]

    def credit(self, acct: Account, amount: int, expires_us: int | None, now_us: int) -> None:
        """Add `amount`: first pay a negative balance, then the rest becomes a new lot."""
        _, lot_credit = L.split_credit(acct.balance, amount)
        acct.balance += amount
        if lot_credit:
            self.save(acct, now_us)  # the lot refers to the account row
            expired = expires_us is not None and expires_us <= now_us
            self.conn.execute(
                "INSERT INTO lots (id, kind, account, remaining, expires_us, expired)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (self.ids.next("lot"), acct.kind, acct.id, lot_credit, expires_us, int(expired)),
            )
            if expired:
                acct.expired_unswept += lot_credit
            elif expires_us is not None:
                acct.lot_check_us = min(acct.lot_check_us, expires_us)

    def refill(self, acct: Account, lot_id: str, amount: int, now_us: int) -> None:
        """Return `amount` to a lot, keeping its expiry (an expired lot stays expired)."""
        expires_us = self.one("SELECT expires_us FROM lots WHERE id = ?", (lot_id,))[0]
        expired = expires_us is not None and expires_us <= now_us
        self.conn.execute(
            "UPDATE lots SET remaining = remaining + ?, expired = ? WHERE id = ?",
            (amount, int(expired), lot_id),
        )
        acct.balance += amount
        if expired:
            acct.expired_unswept += amount
        elif expires_us is not None:
            acct.lot_check_us = min(acct.lot_check_us, expires_us)

    def append_row(
        self,
        acct: Account,
        amount: int,
        type_: str,
        metadata: dict[str, Any],
        now_us: int,
        **extra: Any,
    ) -> str:
        """Write the account back, then its ledger row (with the balance after)."""
        self.save(acct, now_us)
        row_id = self.ids.next("tx")
        columns = "".join(f", {name}" for name in extra)
        marks = ", ?" * len(extra)
        self.conn.execute(
            "INSERT INTO ledger (id, kind, account, amount, type, balance_after, metadata,"
            f" created_us{columns}) VALUES (?, ?, ?, ?, ?, ?, ?, ?{marks})",
            (
                row_id,
                acct.kind,
                acct.id,
                amount,
                type_,
                acct.balance,
                _dumps(metadata),
                now_us,
                *extra.values(),
            ),
        )
        return row_id

    def idem(
        self, acct: Account, op: str, key: str | None, fingerprint: str
    ) -> tuple[bool, str | None]:
        """Return ``(True, stored result JSON)`` for a replay, ``(True, None)`` for a conflict."""
        if key is None or not acct.exists:
            return False, None
        row = self.one(
            "SELECT fingerprint, result FROM idempotency"
            " WHERE kind = ? AND account = ? AND op = ? AND key = ?",
            (acct.kind, acct.id, op, key),
        )
        if row is None:
            return False, None
        return True, (row[1] if row[0] == fingerprint else None)

    def remember(
        self, acct: Account, op: str, key: str | None, fingerprint: str, result: Any
    ) -> None:
        if key is not None:
            self.conn.execute(
                "INSERT INTO idempotency (kind, account, op, key, fingerprint, result)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (acct.kind, acct.id, op, key, fingerprint, result.model_dump_json()),
            )

    def active_pricing(self) -> tuple[int, str, str, str | None, int] | None:
        row = self.one("SELECT value FROM settings WHERE key = 'active_pricing'")
        if row is None:
            return None
        result: tuple[int, str, str, str | None, int] = self.one(
            "SELECT version, id, config, label, created_us FROM pricing WHERE version = ?",
            (int(row[0]),),
        )
        return result

    def plan(self, plan_id: str | None) -> PlanDefinition | None:
        if plan_id is None:
            return None
        active = self.active_pricing()
        if active is None:
            return None
        config = self._configs.get(active[0])
        if config is None:
            # Versions never change once written, so a parsed one can be kept.
            config = self._configs[active[0]] = PricingConfigData.model_validate_json(active[2])
        return (config.plans or {}).get(plan_id)

    def allowance(self, acct: Account, now: datetime) -> tuple[PlanDefinition | None, int, int]:
        """The user's plan, allowance left and allowance used in `now`'s month."""
        plan = self.plan(acct.plan_id)
        used = 0
        if acct.exists:
            used_row = self.one(
                "SELECT amount FROM allowance_used WHERE user_id = ? AND month = ?",
                (acct.id, L.month_key(now)),
            )
            used = used_row[0] if used_row else 0
        if plan is None:
            return None, 0, used
        return plan, max(0, plan.free_allowance - used), used

    def use_allowance(self, user_id: str, now: datetime, amount: int) -> None:
        self.conn.execute(
            "INSERT INTO allowance_used (user_id, month, amount) VALUES (?, ?, ?)"
            " ON CONFLICT (user_id, month) DO UPDATE SET amount = amount + excluded.amount",
            (user_id, L.month_key(now), amount),
        )

    def window_spend(self, user_id: str, cap_type: str, model: str | None, now: datetime) -> int:
        row = self.one(
            "SELECT amount FROM spend WHERE user_id = ? AND cap_type = ? AND period = ?"
            " AND model = ?",
            (user_id, cap_type, L.cap_window_key(cap_type, now), model or _ALL_MODELS),
        )
        return row[0] if row else 0

    def add_spend(self, user_id: str, model: str | None, at: datetime, amount: int) -> None:
        rows = [
            (user_id, cap_type, L.cap_window_key(cap_type, at), key, amount)
            for cap_type in ("daily", "monthly")
            for key in ((_ALL_MODELS, model) if model is not None else (_ALL_MODELS,))
        ]
        self.conn.execute(
            "INSERT INTO spend (user_id, cap_type, period, model, amount) VALUES"
            + ", ".join(["(?, ?, ?, ?, ?)"] * len(rows))
            + " ON CONFLICT (user_id, cap_type, period, model)"
            " DO UPDATE SET amount = amount + excluded.amount",
            [value for row in rows for value in row],
        )

    def held_for(self, acct: Account, model: str | None) -> int:
        if model is None:
            return acct.reserved
        row = self.one(
            "SELECT amount FROM reserved_by_model WHERE kind = ? AND account = ? AND model = ?",
            (acct.kind, acct.id, model),
        )
        return row[0] if row else 0

    def caps(self, acct: Account) -> list[SpendCap]:
        if not acct.caps:
            return []
        return [
            SpendCap(
                user_id=acct.id, cap_type=cap_type, model=model or None, limit=limit, action=action
            )
            for cap_type, model, limit, action in self.conn.execute(
                "SELECT cap_type, model, cap_limit, action FROM caps WHERE user_id = ?"
                " ORDER BY cap_type, model",
                (acct.id,),
            )
        ]

    # -- balances and grants -----------------------------------------------------------------

    def get_balance(self, user_id: str) -> BalanceResult:
        now, now_us = self.now()
        acct = self.load("u", user_id, now_us)
        if not acct.exists:
            return BalanceResult(user_id=user_id)
        allowance = self.allowance(acct, now)[1]
        return BalanceResult(
            user_id=user_id,
            balance=acct.balance,
            lifetime_purchased=acct.lifetime_purchased,
            available=acct.available + allowance,
            reserved=acct.reserved,
            expired_unswept=acct.expired_unswept,
            allowance_remaining=allowance,
        )

    def add_credits(
        self,
        user_id: str,
        amount: int,
        type_: str,
        meta: CreditMetadata | None,
        expiry: datetime | None,
        key: str | None,
    ) -> AddCreditsResult:
        now, now_us = self.now()
        acct = self.load("u", user_id, now_us)
        fp = L.fingerprint(amount, type_, expiry) if key is not None else ""
        replay, stored = self.idem(acct, "grant", key, fp)
        if replay:
            return _replayed(AddCreditsResult, stored) or AddCreditsResult(
                user_id=user_id,
                amount=amount,
                idempotency_key=key,
                error=ErrorCode.IDEMPOTENCY_CONFLICT,
            )
        L.check_future("expires_at", expiry, now)
        if amount < 0 and acct.available + amount < 0:
            return AddCreditsResult(
                user_id=user_id,
                amount=amount,
                new_balance=acct.balance,
                available=acct.available,
                error=ErrorCode.INSUFFICIENT_CREDITS,
            )
        L.check_balance_bound("balance", acct.balance + amount)
        if type_ == "purchase":
            L.check_balance_bound("lifetime_purchased", acct.lifetime_purchased + amount)
        if amount > 0:
            self.credit(acct, amount, None if expiry is None else to_us(expiry), now_us)
        else:
            self.debit(acct, -amount)
        if type_ == "purchase":
            acct.lifetime_purchased += amount
        tx = self.append_row(
            acct,
            amount,
            type_,
            L.row_metadata(meta, {"idempotency_key": key, "expires_at": L.iso(expiry)}),
            now_us,
            idempotency_key=key,
        )
        result = AddCreditsResult(
            transaction_id=tx,
            user_id=user_id,
            amount=amount,
            new_balance=acct.balance,
            lifetime_purchased=acct.lifetime_purchased,
            expires_at=expiry,
            available=acct.available,
            idempotency_key=key,
        )
        self.remember(acct, "grant", key, fp, result)
        return result

    # -- holds -------------------------------------------------------------------------------

    def reserve_credits(
        self,
        user_id: str,
        amount: int,
        operation_type: str,
        model: str | None,
        min_balance: int,
        lifetime: timedelta,
        use_allowance: bool,
        key: str | None,
    ) -> ReserveResult:
        now, now_us = self.now()
        acct = self.load("u", user_id, now_us)
        fp = L.fingerprint(amount, operation_type, model, use_allowance) if key is not None else ""
        replay, stored = self.idem(acct, "reserve", key, fp)
        if replay:
            return _replayed(ReserveResult, stored) or ReserveResult(
                user_id=user_id,
                amount=amount,
                idempotency_key=key,
                error=ErrorCode.IDEMPOTENCY_CONFLICT,
            )
        allowance = self.allowance(acct, now)[1] if use_allowance else 0
        available = acct.available + allowance
        refusal = self.refuse_hold(acct, amount, min_balance, model, available, now)
        if refusal is not None:
            return ReserveResult(
                user_id=user_id,
                amount=amount,
                balance=acct.balance,
                reserved_total=acct.reserved,
                available=available,
                idempotency_key=key,
                **refusal,
            )
        hold_id = self.ids.next("res")
        expires_at = now + lifetime
        expires_us = to_us(expires_at)
        acct.reserved += amount
        acct.hold_check_us = min(acct.hold_check_us, expires_us)
        self.save(acct, now_us)
        self.conn.execute(
            "INSERT INTO holds (id, kind, account, amount, operation_type, model, use_allowance,"
            " expires_us) VALUES (?, 'u', ?, ?, ?, ?, ?, ?)",
            (hold_id, user_id, amount, operation_type, model, int(use_allowance), expires_us),
        )
        if model is not None:
            self.conn.execute(
                "INSERT INTO reserved_by_model (kind, account, model, amount)"
                " VALUES ('u', ?, ?, ?) ON CONFLICT (kind, account, model)"
                " DO UPDATE SET amount = amount + excluded.amount",
                (user_id, model, amount),
            )
        result = ReserveResult(
            reservation_id=hold_id,
            user_id=user_id,
            amount=amount,
            balance=acct.balance,
            reserved_total=acct.reserved,
            expires_at=expires_at,
            available=available - amount,
            idempotency_key=key,
        )
        self.remember(acct, "reserve", key, fp, result)
        return result

    def refuse_hold(
        self,
        acct: Account,
        amount: int,
        min_balance: int,
        model: str | None,
        available: int,
        now: datetime,
    ) -> dict[str, Any] | None:
        if available - amount < min_balance:
            return {"error": ErrorCode.INSUFFICIENT_CREDITS}
        return L.hold_cap_refusal(
            self.caps(acct), model, amount, self._spend_of(acct, now), self._held_of(acct)
        )

    def _spend_of(self, acct: Account, now: datetime) -> L.SpendOf:
        return lambda cap: self.window_spend(acct.id, cap.cap_type, cap.model, now)

    def _held_of(self, acct: Account) -> L.HeldOf:
        return lambda model: self.held_for(acct, model)

    def deduct_credits(
        self,
        user_id: str,
        reservation_id: str,
        amount: int,
        key: str | None,
        meta: CreditMetadata | None,
    ) -> DeductionResult:
        now, now_us = self.now()
        acct = self.load("u", user_id, now_us)
        fp = L.fingerprint(reservation_id, amount) if key is not None else ""
        replay, stored = self.idem(acct, "deduct", key, fp)
        hold = self.one(
            "SELECT amount, operation_type, model, use_allowance, state, counted FROM holds"
            " WHERE id = ? AND kind = 'u' AND account = ?",
            (reservation_id, user_id),
        )
        error = None if replay else L.hold_error(None if hold is None else hold[4])
        if replay or error is not None:
            return _replayed(DeductionResult, stored) or DeductionResult(
                user_id=user_id,
                reservation_id=reservation_id,
                amount=amount,
                idempotency_key=key,
                error=error or ErrorCode.IDEMPOTENCY_CONFLICT,
            )
        held, operation_type, hold_model, use_allowance, _, counted = hold
        L.check_balance_bound("balance", acct.balance - amount)
        if counted:
            self.uncount(acct, held, hold_model)
        self.conn.execute(
            "UPDATE holds SET state = ?, counted = 0 WHERE id = ?",
            (L.HOLD_SETTLED, reservation_id),
        )
        covered = 0
        if use_allowance and amount:
            covered = L.allowance_split(amount, self.allowance(acct, now)[1])[0]
            if covered:
                self.use_allowance(user_id, now, covered)
        paid = amount - covered
        short = L.shortfall(acct.balance, paid)
        draws = self.debit(acct, paid)
        model = (meta.model if meta is not None else None) or hold_model
        system = {
            "model": model,
            "operation_type": operation_type,
            "reservation_id": reservation_id,
            "idempotency_key": key,
            "allowance_consumed": covered or None,
        }
        tx = self.append_row(
            acct,
            -paid,
            "usage",
            L.row_metadata(meta, system),
            now_us,
            reservation_id=reservation_id,
            idempotency_key=key,
            draws=_dumps(draws),
            spender=user_id,
            model=model,
            operation_type=operation_type,
            allowance=covered,
        )
        self.add_spend(user_id, model, now, paid)
        result = DeductionResult(
            transaction_id=tx,
            user_id=user_id,
            reservation_id=reservation_id,
            amount=paid,
            charged=paid,
            balance_after=acct.balance,
            available=acct.available + (self.allowance(acct, now)[1] if use_allowance else 0),
            allowance_consumed=covered,
            shortfall=short,
            idempotency_key=key,
            cap_warning=self.cap_warning(acct, model, now),
        )
        self.remember(acct, "deduct", key, fp, result)
        return result

    def cap_warning(self, acct: Account, model: str | None, now: datetime) -> str | None:
        return L.cap_warning(self.caps(acct), model, self._spend_of(acct, now))

    def release_reservation(self, user_id: str, reservation_id: str) -> ReleaseResult:
        _, now_us = self.now()
        hold = self.one(
            "SELECT amount, model, state FROM holds WHERE id = ? AND kind = 'u' AND account = ?",
            (reservation_id, user_id),
        )
        if hold is None:
            return ReleaseResult(
                reservation_id=reservation_id,
                user_id=user_id,
                error=ErrorCode.RESERVATION_NOT_FOUND,
            )
        acct = self.load("u", user_id, now_us)
        amount, model, state = hold
        if state == L.HOLD_OPEN:
            counted = self.one("SELECT counted FROM holds WHERE id = ?", (reservation_id,))[0]
            if counted:
                self.uncount(acct, amount, model)
            self.conn.execute(
                "UPDATE holds SET state = ?, counted = 0 WHERE id = ?",
                (L.HOLD_RELEASED, reservation_id),
            )
            self.save(acct, now_us)
        return ReleaseResult(
            reservation_id=reservation_id,
            user_id=user_id,
            amount=amount,
            released=state != L.HOLD_SETTLED,
            available=acct.available,
            error=ErrorCode.RESERVATION_ALREADY_SETTLED if state == L.HOLD_SETTLED else None,
        )

    # -- refunds and expiry ------------------------------------------------------------------

    def refund_credits(
        self,
        transaction_id: str,
        amount: int | None,
        reason: str | None,
        meta: CreditMetadata | None,
        key: str | None,
    ) -> RefundResult:
        _, now_us = self.now()
        original = self.one(
            "SELECT kind, account, amount, type, created_us, draws, refunded, draw_refunds,"
            " spender, model FROM ledger WHERE id = ?",
            (transaction_id,),
        )
        if original is None:
            return RefundResult(
                original_transaction_id=transaction_id,
                amount=amount or 0,
                idempotency_key=key,
                error=ErrorCode.TRANSACTION_NOT_FOUND,
            )
        kind, account_id, debit, tx_type, created_us, draws_json, refunded, draw_refunds = original[
            :8
        ]
        spender, model = original[8] or account_id, original[9]
        team_id = account_id if kind == "t" else None
        acct = self.load(kind, account_id, now_us)
        fp = L.fingerprint(transaction_id, amount) if key is not None else ""
        replay, stored = self.idem(acct, "refund", key, fp)
        refundable = -debit - refunded
        error = (
            ErrorCode.IDEMPOTENCY_CONFLICT
            if replay
            else L.refund_error(tx_type, refundable, amount)
        )
        give = amount if amount is not None else refundable
        if replay or error is not None:
            return _replayed(RefundResult, stored) or RefundResult(
                original_transaction_id=transaction_id,
                user_id=spender,
                team_id=team_id,
                amount=amount or refundable,
                new_balance=acct.balance,
                refundable=0 if error is ErrorCode.NOT_REFUNDABLE else refundable,
                idempotency_key=key,
                error=error,
            )
        L.check_balance_bound("balance", acct.balance + give)
        draws = [(str(d[0]), int(d[1])) for d in json.loads(draws_json)] if draws_json else []
        totals = json.loads(draw_refunds) if draw_refunds else [0] * (1 + len(draws))
        plan = L.plan_refund(draws, totals, give, acct.balance)
        acct.balance += plan.debt_paid
        for lot_id, credit in plan.into_lots:
            self.refill(acct, lot_id, credit, now_us)
        if plan.new_lot:
            self.credit(acct, plan.new_lot, None, now_us)
        self.conn.execute(
            "UPDATE ledger SET refunded = ?, draw_refunds = ? WHERE id = ?",
            (totals[0], _dumps(totals), transaction_id),
        )
        created_at = from_us(created_us)
        self.add_spend(spender, model, created_at, -give)
        if kind == "t":
            self.conn.execute(
                "UPDATE member_spend SET amount = amount - ?"
                " WHERE team_id = ? AND user_id = ? AND month = ?",
                (give, account_id, spender, L.month_key(created_at)),
            )
        system = {
            "original_transaction_id": transaction_id,
            "reason": reason,
            "idempotency_key": key,
            "model": model,
            "user_id": spender if team_id else None,
        }
        tx = self.append_row(
            acct, give, "refund", L.row_metadata(meta, system), now_us, idempotency_key=key
        )
        result = RefundResult(
            refund_transaction_id=tx,
            original_transaction_id=transaction_id,
            user_id=spender,
            team_id=team_id,
            amount=give,
            new_balance=acct.balance,
            refundable=refundable - give,
            idempotency_key=key,
        )
        self.remember(acct, "refund", key, fp, result)
        return result

    def sweep_expired_credits(self, dry_run: bool) -> SweepResult:
        _, now_us = self.now()
        due = self.conn.execute(
            "SELECT id, kind, account, remaining, expires_us FROM lots INDEXED BY lots_sweep"
            " WHERE remaining > 0 AND expires_us IS NOT NULL AND expires_us <= ?"
            " ORDER BY kind, account, seq",
            (now_us,),
        ).fetchall()
        count = sum(1 for _ in due)
        total = sum(row[3] for row in due)
        if dry_run:
            return SweepResult(expired_count=count, expired_amount=total, dry_run=True)
        acct: Account | None = None
        for lot_id, kind, account_id, _, expires_us in due:
            if acct is None or (acct.kind, acct.id) != (kind, account_id):
                acct = self.load(kind, account_id, now_us)
            remaining = self.one("SELECT remaining FROM lots WHERE id = ?", (lot_id,))[0]
            self.conn.execute("UPDATE lots SET remaining = 0 WHERE id = ?", (lot_id,))
            acct.balance -= remaining
            acct.expired_unswept -= remaining
            self.append_row(
                acct,
                -remaining,
                "expiry",
                {"lot_id": lot_id, "expires_at": from_us(expires_us).isoformat()},
                now_us,
            )
        return SweepResult(expired_count=count, expired_amount=total, dry_run=False)

    # -- ledger ------------------------------------------------------------------------------

    def page(
        self,
        kind: str,
        account_id: str,
        limit: int,
        before: int | None,
        types: frozenset[str] | None,
        start: datetime | None,
        end: datetime | None,
    ) -> TransactionPage:
        where = ["kind = ?", "account = ?"]
        params: list[object] = [kind, account_id]
        if before is not None:
            where.append("seq < ?")
            params.append(before)
        if types is not None:
            where.append(f"type IN ({', '.join('?' * len(types))})")
            params.extend(sorted(types))
        if start is not None:
            where.append("created_us >= ?")
            params.append(to_us(start))
        if end is not None:
            where.append("created_us < ?")
            params.append(to_us(end))
        rows = self.conn.execute(
            "SELECT seq, id, kind, account, amount, type, balance_after, metadata, created_us,"
            " reservation_id, idempotency_key, refunded, model, operation_type, allowance"
            f" FROM ledger WHERE {' AND '.join(where)} ORDER BY seq DESC LIMIT ?",
            (*params, limit + 1),
        ).fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        return TransactionPage(
            items=[_public_row(row) for row in rows],
            next_cursor=L.encode_cursor(rows[-1][0]) if more else None,
        )

    def list_lots(self, user_id: str) -> list[CreditLot]:
        _, now_us = self.now()
        acct = self.load("u", user_id, now_us)
        if not acct.exists:
            return []
        return [
            CreditLot(id=lot.id, remaining=lot.remaining, expires_at=lot.expires_at, expired=gone)
            for gone in (False, True)
            for lot in self._lots("u", user_id, gone)
        ]

    # -- pricing -----------------------------------------------------------------------------

    def _pricing_result(self, row: Sequence[Any], active: int | None) -> PricingConfigResult:
        version, pricing_id, config, label, created_us = row
        return PricingConfigResult(
            id=pricing_id,
            config=PricingConfigData.model_validate_json(config),
            version=version,
            label=label,
            active=version == active,
            created_at=from_us(created_us),
        )

    def active_version(self) -> int | None:
        row = self.one("SELECT value FROM settings WHERE key = 'active_pricing'")
        return None if row is None else int(row[0])

    def get_active_pricing(self) -> PricingConfigResult | None:
        active = self.active_pricing()
        return None if active is None else self._pricing_result(active, active[0])

    def set_active_pricing(self, config: PricingConfigData, label: str | None) -> str:
        _, now_us = self.now()
        version = self.one("SELECT coalesce(max(version), 0) + 1 FROM pricing")[0]
        pricing_id = self.ids.next("price")
        self.conn.execute(
            "INSERT INTO pricing (version, id, config, label, created_us) VALUES (?, ?, ?, ?, ?)",
            (version, pricing_id, config.model_dump_json(), label, now_us),
        )
        self._activate(version)
        return pricing_id

    def _activate(self, version: int) -> None:
        self.conn.execute(
            "INSERT INTO settings (key, value) VALUES ('active_pricing', ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (str(version),),
        )

    def activate_pricing(self, version: int) -> str:
        row = self.one("SELECT id FROM pricing WHERE version = ?", (version,))
        if row is None:
            raise PricingVersionNotFoundError(version)
        self._activate(version)
        return str(row[0])

    def get_pricing_config(self, version: int) -> PricingConfigResult | None:
        row = self.one(
            "SELECT version, id, config, label, created_us FROM pricing WHERE version = ?",
            (version,),
        )
        return None if row is None else self._pricing_result(row, self.active_version())

    def get_pricing_history(self) -> list[PricingConfigHistoryItem]:
        active = self.active_version()
        return [
            PricingConfigHistoryItem(
                id=pricing_id,
                version=version,
                label=label,
                active=version == active,
                created_at=from_us(created_us),
            )
            for version, pricing_id, label, created_us in self.conn.execute(
                "SELECT version, id, label, created_us FROM pricing ORDER BY version DESC"
            )
        ]

    # -- plans -------------------------------------------------------------------------------

    def get_user_plan(self, user_id: str) -> GetUserPlanResult:
        acct = self.load("u", user_id)
        if acct.plan_id is None:
            return GetUserPlanResult(user_id=user_id)
        plan = self.plan(acct.plan_id)
        if plan is None:
            return GetUserPlanResult(user_id=user_id, plan_id=acct.plan_id)
        return GetUserPlanResult(
            user_id=user_id,
            plan_id=acct.plan_id,
            plan_name=plan.name,
            free_allowance=plan.free_allowance,
            features=dict(plan.features or {}),
        )

    def set_user_plan(self, user_id: str, plan_id: str) -> None:
        _, now_us = self.now()
        if self.plan(plan_id) is None:
            raise InvalidArgumentError(
                f"plan_id {plan_id!r} is not defined by the active pricing version"
            )
        acct = self.load("u", user_id, now_us)
        acct.plan_id = plan_id
        self.save(acct, now_us)

    def check_allowance(self, user_id: str) -> AllowanceResult:
        now, _ = self.now()
        acct = self.load("u", user_id)
        plan, remaining, used = self.allowance(acct, now)
        start, end = L.month_bounds(now)
        return AllowanceResult(
            plan_id=acct.plan_id or "",
            allowance_remaining=remaining,
            period_start=start.isoformat(),
            period_end=end.isoformat(),
            free_allowance=plan.free_allowance if plan is not None else 0,
            allowance_used=used,
        )

    def increment_usage_window(self, user_id: str, amount: int) -> None:
        now, now_us = self.now()
        acct = self.load("u", user_id, now_us)
        self.save(acct, now_us)
        self.use_allowance(user_id, now, amount)

    # -- spend caps --------------------------------------------------------------------------

    def check_spend_cap(self, user_id: str, model: str | None, extra: int) -> CapCheckResult:
        now, now_us = self.now()
        acct = self.load("u", user_id, now_us)
        return L.check_caps(
            self.caps(acct), model, extra, self._spend_of(acct, now), self._held_of(acct)
        )

    def _count_caps(self, acct: Account, now_us: int) -> None:
        acct.caps = self.one("SELECT count(*) FROM caps WHERE user_id = ?", (acct.id,))[0]
        self.save(acct, now_us)

    def set_spend_cap(self, cap: SpendCap) -> None:
        _, now_us = self.now()
        acct = self.load("u", cap.user_id, now_us)
        self.conn.execute(
            "INSERT INTO caps (user_id, cap_type, model, cap_limit, action) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (user_id, cap_type, model)"
            " DO UPDATE SET cap_limit = excluded.cap_limit, action = excluded.action",
            (cap.user_id, cap.cap_type, cap.model or _ALL_MODELS, cap.limit, cap.action),
        )
        self._count_caps(acct, now_us)

    def list_spend_caps(self, user_id: str) -> list[SpendCap]:
        return self.caps(self.load("u", user_id))

    def remove_spend_cap(
        self, user_id: str, cap_type: Literal["daily", "monthly"], model: str | None
    ) -> RemoveSpendCapResult:
        _, now_us = self.now()
        removed = self.conn.execute(
            "DELETE FROM caps WHERE user_id = ? AND cap_type = ? AND model = ?",
            (user_id, cap_type, model or _ALL_MODELS),
        ).rowcount
        if removed:
            self._count_caps(self.load("u", user_id, now_us), now_us)
        return RemoveSpendCapResult(
            user_id=user_id, cap_type=cap_type, model=model, removed=removed > 0
        )

    # -- teams -------------------------------------------------------------------------------

    def create_team(self, name: str, initial_balance: int) -> CreateTeamResult:
        _, now_us = self.now()
        team = Account("t", self.ids.next("team"), name=name)
        self.save(team, now_us)
        tx = None
        if initial_balance:
            self.credit(team, initial_balance, None, now_us)
            tx = self.append_row(
                team, initial_balance, "team_topup", {"initial_balance": True}, now_us
            )
        return CreateTeamResult(team_id=team.id, name=name, balance=team.balance, transaction_id=tx)

    def team(self, team_id: str, now_us: int | None = None) -> Account | None:
        team = self.load("t", team_id, now_us)
        return team if team.exists else None

    def add_team_member(
        self, team_id: str, user_id: str, role: str, spend_cap: int | None
    ) -> AddTeamMemberResult:
        if self.team(team_id) is None:
            return AddTeamMemberResult(
                team_id=team_id,
                user_id=user_id,
                role=role,
                spend_cap=spend_cap,
                error=ErrorCode.TEAM_NOT_FOUND,
            )
        self.conn.execute(
            "INSERT INTO team_members (team_id, user_id, role, spend_cap) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (team_id, user_id)"
            " DO UPDATE SET role = excluded.role, spend_cap = excluded.spend_cap",
            (team_id, user_id, role, spend_cap),
        )
        return AddTeamMemberResult(team_id=team_id, user_id=user_id, role=role, spend_cap=spend_cap)

    def remove_team_member(self, team_id: str, user_id: str) -> RemoveTeamMemberResult:
        if self.team(team_id) is None:
            return RemoveTeamMemberResult(
                team_id=team_id, user_id=user_id, error=ErrorCode.TEAM_NOT_FOUND
            )
        removed = self.conn.execute(
            "DELETE FROM team_members WHERE team_id = ? AND user_id = ?", (team_id, user_id)
        ).rowcount
        return RemoveTeamMemberResult(team_id=team_id, user_id=user_id, removed=removed > 0)

    def add_team_credits(
        self,
        team_id: str,
        amount: int,
        meta: CreditMetadata | None,
        expiry: datetime | None,
        key: str | None,
    ) -> TeamTopupResult:
        now, now_us = self.now()
        team = self.team(team_id, now_us)
        if team is None:
            return TeamTopupResult(team_id=team_id, amount=amount, error=ErrorCode.TEAM_NOT_FOUND)
        fp = L.fingerprint(amount, expiry) if key is not None else ""
        replay, stored = self.idem(team, "team_topup", key, fp)
        if replay:
            return _replayed(TeamTopupResult, stored) or TeamTopupResult(
                team_id=team_id,
                amount=amount,
                idempotency_key=key,
                error=ErrorCode.IDEMPOTENCY_CONFLICT,
            )
        L.check_future("expires_at", expiry, now)
        L.check_balance_bound("balance", team.balance + amount)
        self.credit(team, amount, None if expiry is None else to_us(expiry), now_us)
        tx = self.append_row(
            team,
            amount,
            "team_topup",
            L.row_metadata(meta, {"idempotency_key": key, "expires_at": L.iso(expiry)}),
            now_us,
            idempotency_key=key,
        )
        result = TeamTopupResult(
            transaction_id=tx,
            team_id=team_id,
            amount=amount,
            team_balance_after=team.balance,
            idempotency_key=key,
        )
        self.remember(team, "team_topup", key, fp, result)
        return result

    def get_team_balance(self, team_id: str) -> TeamBalanceResult:
        _, now_us = self.now()
        team = self.team(team_id, now_us)
        if team is None:
            return TeamBalanceResult(team_id=team_id, error=ErrorCode.TEAM_NOT_FOUND)
        members = self.one("SELECT count(*) FROM team_members WHERE team_id = ?", (team_id,))[0]
        return TeamBalanceResult(
            team_id=team_id,
            name=team.name or "",
            balance=team.balance,
            member_count=members,
            available=team.available,
        )

    def get_team_members(self, team_id: str) -> list[TeamMember]:
        now, _ = self.now()
        return [
            TeamMember(user_id=user_id, role=role, spend_cap=cap, total_spent=spent or 0)
            for user_id, role, cap, spent in self.conn.execute(
                "SELECT m.user_id, m.role, m.spend_cap, s.amount FROM team_members m"
                " LEFT JOIN member_spend s ON s.team_id = m.team_id AND s.user_id = m.user_id"
                " AND s.month = ? WHERE m.team_id = ? ORDER BY m.user_id",
                (L.month_key(now), team_id),
            )
        ]

    def deduct_team(
        self,
        team_id: str,
        user_id: str,
        amount: int,
        meta: CreditMetadata | None,
        key: str | None,
    ) -> TeamDeductionResult:
        now, now_us = self.now()
        base: dict[str, Any] = {
            "team_id": team_id,
            "user_id": user_id,
            "amount": amount,
            "idempotency_key": key,
        }
        team = self.team(team_id, now_us)
        if team is None:
            return TeamDeductionResult(**base, error=ErrorCode.TEAM_NOT_FOUND)
        fp = L.fingerprint(user_id, amount) if key is not None else ""
        replay, stored = self.idem(team, "team_deduct", key, fp)
        member = self.one(
            "SELECT spend_cap FROM team_members WHERE team_id = ? AND user_id = ?",
            (team_id, user_id),
        )
        month = L.month_key(now)
        spent_row = self.one(
            "SELECT amount FROM member_spend WHERE team_id = ? AND user_id = ? AND month = ?",
            (team_id, user_id, month),
        )
        spent = spent_row[0] if spent_row else 0
        available = team.available
        base.update(team_balance_after=team.balance, available=available)
        cap = member[0] if member is not None else None
        error = (
            ErrorCode.IDEMPOTENCY_CONFLICT
            if replay
            else L.team_deduct_error(member is not None, available, amount, spent, cap)
        )
        if error is ErrorCode.SPEND_CAP_EXCEEDED:
            base.update(cap_limit=cap, cap_spend=spent)
        if error is not None:
            return _replayed(TeamDeductionResult, stored) or TeamDeductionResult(
                **base, error=error
            )
        draws = self.debit(team, amount)
        model = L.metadata_model(meta)
        system = {"model": model, "user_id": user_id, "idempotency_key": key}
        tx = self.append_row(
            team,
            -amount,
            "team_usage",
            L.row_metadata(meta, system),
            now_us,
            idempotency_key=key,
            draws=_dumps(draws),
            spender=user_id,
            model=model,
        )
        self.conn.execute(
            "INSERT INTO member_spend (team_id, user_id, month, amount) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (team_id, user_id, month)"
            " DO UPDATE SET amount = amount + excluded.amount",
            (team_id, user_id, month, amount),
        )
        member_acct = self.load("u", user_id, now_us)
        self.save(member_acct, now_us)
        self.add_spend(user_id, model, now, amount)
        result = TeamDeductionResult(
            transaction_id=tx,
            team_id=team_id,
            user_id=user_id,
            amount=amount,
            charged=amount,
            team_balance_after=team.balance,
            available=team.available,
            idempotency_key=key,
        )
        self.remember(team, "team_deduct", key, fp, result)
        return result

    # -- analytics ---------------------------------------------------------------------------

    def spend_events(self, start: datetime, end: datetime) -> list[L.SpendEvent]:
        return [
            L.SpendEvent(spender or account, model or L.UNKNOWN_MODEL, from_us(created), net)
            for spender, account, model, created, net in self.conn.execute(
                "SELECT spender, account, model, created_us, -amount - refunded FROM ledger"
                " INDEXED BY ledger_usage WHERE type IN ('usage', 'team_usage')"
                " AND created_us >= ? AND created_us < ? ORDER BY seq",
                (to_us(start), to_us(end)),
            )
        ]


def _take(lots: Iterator[L.Lot], amount: int) -> Iterable[L.Lot]:
    """The lots a draw of `amount` touches, read lazily from the cursor."""
    need = amount
    for lot in lots:
        if need <= 0:
            return
        yield lot
        need -= lot.remaining


def _replayed(model: type[Any], stored: str | None) -> Any:
    if stored is None:
        return None
    return model.model_validate_json(stored).model_copy(update={"idempotent": True})


def _public_row(row: Sequence[Any]) -> TransactionRow:
    (
        _,
        row_id,
        kind,
        account,
        amount,
        type_,
        balance_after,
        metadata,
        created_us,
        reservation_id,
        idempotency_key,
        refunded,
        _,
        _,
        _,
    ) = row
    return TransactionRow(
        id=row_id,
        user_id=account,
        account_type="team" if kind == "t" else "user",
        amount=amount,
        type=type_,
        balance_after=balance_after,
        metadata=json.loads(metadata),
        created_at=from_us(created_us),
        reservation_id=reservation_id,
        idempotency_key=idempotency_key,
        refunded=refunded,
    )
