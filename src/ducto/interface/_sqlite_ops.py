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

    def account(self, kind: str, account_id: str) -> Any:
        return self.one(
            "SELECT balance, lifetime_purchased, reserved, expired_unswept, plan_id, name"
            " FROM accounts WHERE kind = ? AND id = ?",
            (kind, account_id),
        )

    def ensure_account(self, kind: str, account_id: str, now_us: int) -> None:
        self.conn.execute(
            "INSERT INTO accounts (kind, id, created_us) VALUES (?, ?, ?)"
            " ON CONFLICT (kind, id) DO NOTHING",
            (kind, account_id, now_us),
        )

    def add_to_account(self, kind: str, account_id: str, **deltas: int) -> None:
        sets = ", ".join(f"{column} = {column} + ?" for column in deltas)
        self.conn.execute(
            f"UPDATE accounts SET {sets} WHERE kind = ? AND id = ?",
            (*deltas.values(), kind, account_id),
        )

    def lapse(self, kind: str, account_id: str, now_us: int) -> None:
        """Stop counting holds whose TTL passed and set aside lots that expired."""
        conn = self.conn
        lapsed = conn.execute(
            "SELECT id, amount, model FROM holds"
            " WHERE kind = ? AND account = ? AND counted = 1 AND expires_us <= ?",
            (kind, account_id, now_us),
        ).fetchall()
        for hold_id, amount, model in lapsed:
            self.uncount(kind, account_id, hold_id, amount, model)
        expired = conn.execute(
            "UPDATE lots SET expired = 1 WHERE kind = ? AND account = ? AND remaining > 0"
            " AND expired = 0 AND expires_us <= ? RETURNING remaining",
            (kind, account_id, now_us),
        ).fetchall()
        total = sum(row[0] for row in expired)
        if total:
            self.add_to_account(kind, account_id, expired_unswept=total)

    def uncount(
        self, kind: str, account_id: str, hold_id: str, amount: int, model: str | None
    ) -> None:
        self.conn.execute("UPDATE holds SET counted = 0 WHERE id = ?", (hold_id,))
        self.add_to_account(kind, account_id, reserved=-amount)
        if model is not None:
            self.conn.execute(
                "UPDATE reserved_by_model SET amount = amount - ?"
                " WHERE kind = ? AND account = ? AND model = ?",
                (amount, kind, account_id, model),
            )
            self.conn.execute(
                "DELETE FROM reserved_by_model WHERE kind = ? AND account = ? AND model = ?"
                " AND amount = 0",
                (kind, account_id, model),
            )

    def _lots(self, kind: str, account_id: str, expired: bool) -> Iterator[L.Lot]:
        cursor = self.conn.execute(_EXPIRED_LOTS if expired else _LIVE_LOTS, (kind, account_id))
        while rows := cursor.fetchmany(8):
            for lot_id, seq, remaining, expires_us in rows:
                yield L.Lot(lot_id, seq, remaining, _opt_dt(expires_us))

    def debit(self, kind: str, account_id: str, amount: int) -> list[tuple[str, int]]:
        """Take `amount` from the lots in burn-down order; the rest takes the balance below 0."""
        draws, rest = L.draw(list(_take(self._lots(kind, account_id, False), amount)), amount)
        late: list[tuple[L.Lot, int]] = []
        if rest:
            late, rest = L.draw(list(_take(self._lots(kind, account_id, True), rest)), rest)
        for lot, _ in draws + late:
            self.conn.execute("UPDATE lots SET remaining = ? WHERE id = ?", (lot.remaining, lot.id))
        self.add_to_account(
            kind, account_id, balance=-amount, expired_unswept=-sum(t for _, t in late)
        )
        return [(lot.id, taken) for lot, taken in draws + late]

    def credit(
        self, kind: str, account_id: str, amount: int, expires_us: int | None, now_us: int
    ) -> None:
        """Add `amount`: first pay a negative balance, then the rest becomes a new lot."""
        balance = self.one(
            "SELECT balance FROM accounts WHERE kind = ? AND id = ?", (kind, account_id)
        )[0]
        _, lot_credit = L.split_credit(balance, amount)
        self.add_to_account(kind, account_id, balance=amount)
        if lot_credit:
            self.new_lot(kind, account_id, lot_credit, expires_us, now_us)

    def new_lot(
        self, kind: str, account_id: str, amount: int, expires_us: int | None, now_us: int
    ) -> None:
        expired = expires_us is not None and expires_us <= now_us
        self.conn.execute(
            "INSERT INTO lots (id, kind, account, remaining, expires_us, expired)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (self.ids.next("lot"), kind, account_id, amount, expires_us, int(expired)),
        )

    def refill(self, kind: str, account_id: str, lot_id: str, amount: int, now_us: int) -> None:
        """Return `amount` to a lot, keeping its expiry (an expired lot stays expired)."""
        expires_us = self.one("SELECT expires_us FROM lots WHERE id = ?", (lot_id,))[0]
        expired = expires_us is not None and expires_us <= now_us
        self.conn.execute(
            "UPDATE lots SET remaining = remaining + ?, expired = ? WHERE id = ?",
            (amount, int(expired), lot_id),
        )
        self.add_to_account(
            kind, account_id, balance=amount, expired_unswept=amount if expired else 0
        )

    def append_row(
        self,
        kind: str,
        account_id: str,
        amount: int,
        type_: str,
        metadata: dict[str, Any],
        now_us: int,
        **extra: Any,
    ) -> str:
        balance = self.one(
            "SELECT balance FROM accounts WHERE kind = ? AND id = ?", (kind, account_id)
        )[0]
        row_id = self.ids.next("tx")
        columns = ", ".join(extra)
        marks = ", ?" * len(extra)
        self.conn.execute(
            "INSERT INTO ledger (id, kind, account, amount, type, balance_after, metadata,"
            f" created_us{', ' if extra else ''}{columns}) VALUES (?, ?, ?, ?, ?, ?, ?, ?{marks})",
            (
                row_id,
                kind,
                account_id,
                amount,
                type_,
                balance,
                _dumps(metadata),
                now_us,
                *extra.values(),
            ),
        )
        return row_id

    def idem(
        self, kind: str, account_id: str, op: str, key: str | None, fingerprint: str
    ) -> tuple[bool, str | None]:
        """Return ``(True, stored result JSON)`` for a replay, ``(True, None)`` for a conflict."""
        if key is None:
            return False, None
        row = self.one(
            "SELECT fingerprint, result FROM idempotency"
            " WHERE kind = ? AND account = ? AND op = ? AND key = ?",
            (kind, account_id, op, key),
        )
        if row is None:
            return False, None
        return True, (row[1] if row[0] == fingerprint else None)

    def remember(
        self, kind: str, account_id: str, op: str, key: str | None, fingerprint: str, result: Any
    ) -> None:
        if key is not None:
            self.conn.execute(
                "INSERT INTO idempotency (kind, account, op, key, fingerprint, result)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (kind, account_id, op, key, fingerprint, result.model_dump_json()),
            )

    def available(self, kind: str, account_id: str, allowance: int = 0) -> int:
        row = self.account(kind, account_id)
        if row is None:
            return allowance
        return L.spendable(row[0], row[3], row[2], allowance)

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

    def allowance(self, user_id: str, now: datetime) -> tuple[PlanDefinition | None, int, int]:
        """The user's plan, allowance left and allowance used in `now`'s month."""
        row = self.one("SELECT plan_id FROM accounts WHERE kind = 'u' AND id = ?", (user_id,))
        plan = self.plan(row[0] if row else None)
        used_row = self.one(
            "SELECT amount FROM allowance_used WHERE user_id = ? AND month = ?",
            (user_id, L.month_key(now)),
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
        for cap_type in ("daily", "monthly"):
            window = L.cap_window_key(cap_type, at)
            for key in (_ALL_MODELS, model) if model is not None else (_ALL_MODELS,):
                self.conn.execute(
                    "INSERT INTO spend (user_id, cap_type, period, model, amount)"
                    " VALUES (?, ?, ?, ?, ?) ON CONFLICT (user_id, cap_type, period, model)"
                    " DO UPDATE SET amount = amount + excluded.amount",
                    (user_id, cap_type, window, key, amount),
                )

    def held_for(self, user_id: str, model: str | None) -> int:
        if model is None:
            row = self.one("SELECT reserved FROM accounts WHERE kind = 'u' AND id = ?", (user_id,))
        else:
            row = self.one(
                "SELECT amount FROM reserved_by_model WHERE kind = 'u' AND account = ?"
                " AND model = ?",
                (user_id, model),
            )
        return row[0] if row else 0

    def caps(self, user_id: str) -> list[SpendCap]:
        return [
            SpendCap(
                user_id=user_id, cap_type=cap_type, model=model or None, limit=limit, action=action
            )
            for cap_type, model, limit, action in self.conn.execute(
                "SELECT cap_type, model, cap_limit, action FROM caps WHERE user_id = ?"
                " ORDER BY cap_type, model",
                (user_id,),
            )
        ]

    # -- balances and grants -----------------------------------------------------------------

    def get_balance(self, user_id: str) -> BalanceResult:
        now, now_us = self.now()
        row = self.account("u", user_id)
        if row is None:
            return BalanceResult(user_id=user_id)
        self.lapse("u", user_id, now_us)
        balance, lifetime, reserved, expired_unswept, _, _ = self.account("u", user_id)
        allowance = self.allowance(user_id, now)[1]
        return BalanceResult(
            user_id=user_id,
            balance=balance,
            lifetime_purchased=lifetime,
            available=L.spendable(balance, expired_unswept, reserved, allowance),
            reserved=reserved,
            expired_unswept=expired_unswept,
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
        exists = self.account("u", user_id) is not None
        if exists:
            self.lapse("u", user_id, now_us)
        fp = L.fingerprint(amount, type_, expiry)
        replay, stored = self.idem("u", user_id, "grant", key, fp)
        if replay:
            return _replayed(AddCreditsResult, stored) or AddCreditsResult(
                user_id=user_id,
                amount=amount,
                idempotency_key=key,
                error=ErrorCode.IDEMPOTENCY_CONFLICT,
            )
        L.check_future("expires_at", expiry, now)
        row = self.account("u", user_id)
        balance = row[0] if row else 0
        available = self.available("u", user_id)
        if amount < 0 and available + amount < 0:
            return AddCreditsResult(
                user_id=user_id,
                amount=amount,
                new_balance=balance,
                available=available,
                error=ErrorCode.INSUFFICIENT_CREDITS,
            )
        L.check_balance_bound("balance", balance + amount)
        if type_ == "purchase" and row is not None:
            L.check_balance_bound("lifetime_purchased", row[1] + amount)
        self.ensure_account("u", user_id, now_us)
        expires_us = None if expiry is None else to_us(expiry)
        if amount > 0:
            self.credit("u", user_id, amount, expires_us, now_us)
        else:
            self.debit("u", user_id, -amount)
        if type_ == "purchase":
            self.add_to_account("u", user_id, lifetime_purchased=amount)
        tx = self.append_row(
            "u",
            user_id,
            amount,
            type_,
            L.row_metadata(meta, {"idempotency_key": key, "expires_at": L.iso(expiry)}),
            now_us,
            idempotency_key=key,
        )
        after = self.account("u", user_id)
        result = AddCreditsResult(
            transaction_id=tx,
            user_id=user_id,
            amount=amount,
            new_balance=after[0],
            lifetime_purchased=after[1],
            expires_at=expiry,
            available=L.spendable(after[0], after[3], after[2]),
            idempotency_key=key,
        )
        self.remember("u", user_id, "grant", key, fp, result)
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
        row = self.account("u", user_id)
        if row is not None:
            self.lapse("u", user_id, now_us)
        fp = L.fingerprint(amount, operation_type, model, use_allowance)
        replay, stored = self.idem("u", user_id, "reserve", key, fp)
        if replay:
            return _replayed(ReserveResult, stored) or ReserveResult(
                user_id=user_id,
                amount=amount,
                idempotency_key=key,
                error=ErrorCode.IDEMPOTENCY_CONFLICT,
            )
        allowance = self.allowance(user_id, now)[1] if use_allowance else 0
        available = self.available("u", user_id, allowance)
        refusal = self.refuse_hold(user_id, amount, min_balance, model, available, now)
        row = self.account("u", user_id)
        if refusal is not None:
            return ReserveResult(
                user_id=user_id,
                amount=amount,
                balance=row[0] if row else 0,
                reserved_total=row[2] if row else 0,
                available=available,
                idempotency_key=key,
                **refusal,
            )
        self.ensure_account("u", user_id, now_us)
        hold_id = self.ids.next("res")
        expires_at = now + lifetime
        self.conn.execute(
            "INSERT INTO holds (id, kind, account, amount, operation_type, model, use_allowance,"
            " expires_us) VALUES (?, 'u', ?, ?, ?, ?, ?, ?)",
            (
                hold_id,
                user_id,
                amount,
                operation_type,
                model,
                int(use_allowance),
                to_us(expires_at),
            ),
        )
        self.add_to_account("u", user_id, reserved=amount)
        if model is not None:
            self.conn.execute(
                "INSERT INTO reserved_by_model (kind, account, model, amount)"
                " VALUES ('u', ?, ?, ?) ON CONFLICT (kind, account, model)"
                " DO UPDATE SET amount = amount + excluded.amount",
                (user_id, model, amount),
            )
        balance, _, reserved, _, _, _ = self.account("u", user_id)
        result = ReserveResult(
            reservation_id=hold_id,
            user_id=user_id,
            amount=amount,
            balance=balance,
            reserved_total=reserved,
            expires_at=expires_at,
            available=available - amount,
            idempotency_key=key,
        )
        self.remember("u", user_id, "reserve", key, fp, result)
        return result

    def refuse_hold(
        self,
        user_id: str,
        amount: int,
        min_balance: int,
        model: str | None,
        available: int,
        now: datetime,
    ) -> dict[str, Any] | None:
        if available - amount < min_balance:
            return {"error": ErrorCode.INSUFFICIENT_CREDITS}
        for cap in self.caps(user_id):
            if cap.action != "deny" or not L.cap_applies(cap.model, model):
                continue
            spend = self.window_spend(user_id, cap.cap_type, cap.model, now)
            if L.cap_trips(spend, self.held_for(user_id, cap.model), amount, cap.limit):
                return {
                    "error": ErrorCode.SPEND_CAP_EXCEEDED,
                    "cap_limit": cap.limit,
                    "cap_spend": spend,
                    "cap_model": cap.model,
                }
        return None

    def deduct_credits(
        self,
        user_id: str,
        reservation_id: str,
        amount: int,
        key: str | None,
        meta: CreditMetadata | None,
    ) -> DeductionResult:
        now, now_us = self.now()
        row = self.account("u", user_id)
        if row is not None:
            self.lapse("u", user_id, now_us)
        fp = L.fingerprint(reservation_id, amount)
        replay, stored = self.idem("u", user_id, "deduct", key, fp)
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
        balance = self.account("u", user_id)[0]
        L.check_balance_bound("balance", balance - amount)
        if counted:
            self.uncount("u", user_id, reservation_id, held, hold_model)
        self.conn.execute(
            "UPDATE holds SET state = ? WHERE id = ?", (L.HOLD_SETTLED, reservation_id)
        )
        covered = 0
        if use_allowance and amount:
            covered = L.allowance_split(amount, self.allowance(user_id, now)[1])[0]
            if covered:
                self.use_allowance(user_id, now, covered)
        paid = amount - covered
        short = L.shortfall(balance, paid)
        draws = self.debit("u", user_id, paid)
        model = (meta.model if meta is not None else None) or hold_model
        system = {
            "model": model,
            "operation_type": operation_type,
            "reservation_id": reservation_id,
            "idempotency_key": key,
            "allowance_consumed": covered or None,
        }
        tx = self.append_row(
            "u",
            user_id,
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
            balance_after=balance - paid,
            allowance_consumed=covered,
            shortfall=short,
            idempotency_key=key,
            cap_warning=self.cap_warning(user_id, model, now),
        )
        self.remember("u", user_id, "deduct", key, fp, result)
        return result

    def cap_warning(self, user_id: str, model: str | None, now: datetime) -> str | None:
        for cap in self.caps(user_id):
            if cap.action == "deny" or not L.cap_applies(cap.model, model):
                continue
            if self.window_spend(user_id, cap.cap_type, cap.model, now) > cap.limit:
                return cap.action
        return None

    def release_reservation(self, user_id: str, reservation_id: str) -> ReleaseResult:
        _, now_us = self.now()
        hold = self.one(
            "SELECT amount, model, state, counted FROM holds"
            " WHERE id = ? AND kind = 'u' AND account = ?",
            (reservation_id, user_id),
        )
        if hold is None:
            return ReleaseResult(
                reservation_id=reservation_id,
                user_id=user_id,
                error=ErrorCode.RESERVATION_NOT_FOUND,
            )
        self.lapse("u", user_id, now_us)
        amount, model, state, _ = hold
        if state == L.HOLD_SETTLED:
            return ReleaseResult(
                reservation_id=reservation_id,
                user_id=user_id,
                amount=amount,
                available=self.available("u", user_id),
                error=ErrorCode.RESERVATION_ALREADY_SETTLED,
            )
        if state == L.HOLD_OPEN:
            if self.one("SELECT counted FROM holds WHERE id = ?", (reservation_id,))[0]:
                self.uncount("u", user_id, reservation_id, amount, model)
            self.conn.execute(
                "UPDATE holds SET state = ? WHERE id = ?", (L.HOLD_RELEASED, reservation_id)
            )
        return ReleaseResult(
            reservation_id=reservation_id,
            user_id=user_id,
            amount=amount,
            released=True,
            available=self.available("u", user_id),
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
        self.lapse(kind, account_id, now_us)
        fp = L.fingerprint(transaction_id, amount)
        replay, stored = self.idem(kind, account_id, "refund", key, fp)
        refundable = -debit - refunded
        balance = self.account(kind, account_id)[0]
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
                new_balance=balance,
                refundable=0 if error is ErrorCode.NOT_REFUNDABLE else refundable,
                idempotency_key=key,
                error=error,
            )
        L.check_balance_bound("balance", balance + give)
        draws = [(str(d[0]), int(d[1])) for d in json.loads(draws_json)] if draws_json else []
        totals = json.loads(draw_refunds) if draw_refunds else [0] * (1 + len(draws))
        plan = L.plan_refund(draws, totals, give, balance)
        self.add_to_account(kind, account_id, balance=plan.debt_paid)
        for lot_id, credit in plan.into_lots:
            self.refill(kind, account_id, lot_id, credit, now_us)
        if plan.new_lot:
            self.credit(kind, account_id, plan.new_lot, None, now_us)
        self.conn.execute(
            "UPDATE ledger SET refunded = ?, draw_refunds = ? WHERE id = ?",
            (totals[0], _dumps(totals), transaction_id),
        )
        created_at = from_us(created_us)
        if self.account("u", spender) is not None:
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
            kind,
            account_id,
            give,
            "refund",
            L.row_metadata(meta, system),
            now_us,
            idempotency_key=key,
        )
        result = RefundResult(
            refund_transaction_id=tx,
            original_transaction_id=transaction_id,
            user_id=spender,
            team_id=team_id,
            amount=give,
            new_balance=self.account(kind, account_id)[0],
            refundable=refundable - give,
            idempotency_key=key,
        )
        self.remember(kind, account_id, "refund", key, fp, result)
        return result

    def refund_account(self, transaction_id: str) -> tuple[str, str] | None:
        """The account a transaction belongs to (and, for team usage, the member)."""
        row = self.one("SELECT kind, account, spender FROM ledger WHERE id = ?", (transaction_id,))
        return None if row is None else (row[0], row[1])

    def sweep_expired_credits(self, dry_run: bool) -> SweepResult:
        _, now_us = self.now()
        due = self.conn.execute(
            "SELECT id, kind, account, remaining, expires_us FROM lots INDEXED BY lots_sweep"
            " WHERE remaining > 0 AND expires_us IS NOT NULL AND expires_us <= ?"
            " ORDER BY kind, account, seq",
            (now_us,),
        ).fetchall()
        count = total = 0
        lapsed: set[tuple[str, str]] = set()
        for lot_id, kind, account_id, remaining, expires_us in due:
            count += 1
            total += remaining
            if dry_run:
                continue
            if (kind, account_id) not in lapsed:
                self.lapse(kind, account_id, now_us)
                lapsed.add((kind, account_id))
            self.conn.execute("UPDATE lots SET remaining = 0 WHERE id = ?", (lot_id,))
            self.add_to_account(kind, account_id, balance=-remaining, expired_unswept=-remaining)
            self.append_row(
                kind,
                account_id,
                -remaining,
                "expiry",
                {"lot_id": lot_id, "expires_at": from_us(expires_us).isoformat()},
                now_us,
            )
        return SweepResult(expired_count=count, expired_amount=total, dry_run=dry_run)

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
        if self.account("u", user_id) is None:
            return []
        self.lapse("u", user_id, now_us)
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
        row = self.one("SELECT plan_id FROM accounts WHERE kind = 'u' AND id = ?", (user_id,))
        if row is None or row[0] is None:
            return GetUserPlanResult(user_id=user_id)
        plan = self.plan(row[0])
        if plan is None:
            return GetUserPlanResult(user_id=user_id, plan_id=row[0])
        return GetUserPlanResult(
            user_id=user_id,
            plan_id=row[0],
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
        self.ensure_account("u", user_id, now_us)
        self.conn.execute(
            "UPDATE accounts SET plan_id = ? WHERE kind = 'u' AND id = ?", (plan_id, user_id)
        )

    def check_allowance(self, user_id: str) -> AllowanceResult:
        now, _ = self.now()
        row = self.one("SELECT plan_id FROM accounts WHERE kind = 'u' AND id = ?", (user_id,))
        plan, remaining, used = self.allowance(user_id, now)
        start, end = L.month_bounds(now)
        return AllowanceResult(
            plan_id=(row[0] or "") if row else "",
            allowance_remaining=remaining,
            period_start=start.isoformat(),
            period_end=end.isoformat(),
            free_allowance=plan.free_allowance if plan is not None else 0,
            allowance_used=used,
        )

    def increment_usage_window(self, user_id: str, amount: int) -> None:
        now, now_us = self.now()
        self.ensure_account("u", user_id, now_us)
        self.use_allowance(user_id, now, amount)

    # -- spend caps --------------------------------------------------------------------------

    def check_spend_cap(self, user_id: str, model: str | None, extra: int) -> CapCheckResult:
        now, now_us = self.now()
        caps = self.caps(user_id)
        if not caps:
            return CapCheckResult()
        self.lapse("u", user_id, now_us)
        best: tuple[tuple[int, int], CapCheckResult] | None = None
        for cap in caps:
            if not L.cap_applies(cap.model, model):
                continue
            spend = self.window_spend(user_id, cap.cap_type, cap.model, now)
            held = self.held_for(user_id, cap.model)
            capped = L.cap_trips(spend, held, extra, cap.limit)
            rank = (
                0 if capped and cap.action == "deny" else 1 if capped else 2,
                cap.limit - spend - held,
            )
            if best is None or rank < best[0]:
                best = (
                    rank,
                    CapCheckResult(
                        capped=capped,
                        current_spend=spend,
                        cap_limit=cap.limit,
                        action=cap.action,
                        model=cap.model,
                        reserved=held,
                        cap_type=cap.cap_type,
                    ),
                )
        return best[1] if best is not None else CapCheckResult()

    def set_spend_cap(self, cap: SpendCap) -> None:
        _, now_us = self.now()
        self.ensure_account("u", cap.user_id, now_us)
        self.conn.execute(
            "INSERT INTO caps (user_id, cap_type, model, cap_limit, action) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (user_id, cap_type, model)"
            " DO UPDATE SET cap_limit = excluded.cap_limit, action = excluded.action",
            (cap.user_id, cap.cap_type, cap.model or _ALL_MODELS, cap.limit, cap.action),
        )

    def list_spend_caps(self, user_id: str) -> list[SpendCap]:
        return self.caps(user_id)

    def remove_spend_cap(
        self, user_id: str, cap_type: Literal["daily", "monthly"], model: str | None
    ) -> RemoveSpendCapResult:
        removed = self.conn.execute(
            "DELETE FROM caps WHERE user_id = ? AND cap_type = ? AND model = ?",
            (user_id, cap_type, model or _ALL_MODELS),
        ).rowcount
        return RemoveSpendCapResult(
            user_id=user_id, cap_type=cap_type, model=model, removed=removed > 0
        )

    # -- teams -------------------------------------------------------------------------------

    def create_team(self, name: str, initial_balance: int) -> CreateTeamResult:
        _, now_us = self.now()
        team_id = self.ids.next("team")
        self.conn.execute(
            "INSERT INTO accounts (kind, id, name, created_us) VALUES ('t', ?, ?, ?)",
            (team_id, name, now_us),
        )
        tx = None
        if initial_balance:
            self.credit("t", team_id, initial_balance, None, now_us)
            tx = self.append_row(
                "t", team_id, initial_balance, "team_topup", {"initial_balance": True}, now_us
            )
        return CreateTeamResult(
            team_id=team_id, name=name, balance=initial_balance, transaction_id=tx
        )

    def team(self, team_id: str) -> Any:
        return self.account("t", team_id)

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
        team = self.team(team_id)
        if team is None:
            return TeamTopupResult(team_id=team_id, amount=amount, error=ErrorCode.TEAM_NOT_FOUND)
        self.lapse("t", team_id, now_us)
        fp = L.fingerprint(amount, expiry)
        replay, stored = self.idem("t", team_id, "team_topup", key, fp)
        if replay:
            return _replayed(TeamTopupResult, stored) or TeamTopupResult(
                team_id=team_id,
                amount=amount,
                idempotency_key=key,
                error=ErrorCode.IDEMPOTENCY_CONFLICT,
            )
        L.check_future("expires_at", expiry, now)
        L.check_balance_bound("balance", team[0] + amount)
        self.credit("t", team_id, amount, None if expiry is None else to_us(expiry), now_us)
        tx = self.append_row(
            "t",
            team_id,
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
            team_balance_after=team[0] + amount,
            idempotency_key=key,
        )
        self.remember("t", team_id, "team_topup", key, fp, result)
        return result

    def get_team_balance(self, team_id: str) -> TeamBalanceResult:
        _, now_us = self.now()
        if self.team(team_id) is None:
            return TeamBalanceResult(team_id=team_id, error=ErrorCode.TEAM_NOT_FOUND)
        self.lapse("t", team_id, now_us)
        balance, _, reserved, expired_unswept, _, name = self.team(team_id)
        members = self.one("SELECT count(*) FROM team_members WHERE team_id = ?", (team_id,))[0]
        return TeamBalanceResult(
            team_id=team_id,
            name=name or "",
            balance=balance,
            member_count=members,
            available=L.spendable(balance, expired_unswept, reserved),
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
        if self.team(team_id) is None:
            return TeamDeductionResult(**base, error=ErrorCode.TEAM_NOT_FOUND)
        self.lapse("t", team_id, now_us)
        fp = L.fingerprint(user_id, amount)
        replay, stored = self.idem("t", team_id, "team_deduct", key, fp)
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
        team = self.team(team_id)
        available = L.spendable(team[0], team[3], team[2])
        base.update(team_balance_after=team[0], available=available)
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
        draws = self.debit("t", team_id, amount)
        model = L.metadata_model(meta)
        system = {"model": model, "user_id": user_id, "idempotency_key": key}
        tx = self.append_row(
            "t",
            team_id,
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
        self.ensure_account("u", user_id, now_us)
        self.add_spend(user_id, model, now, amount)
        result = TeamDeductionResult(
            transaction_id=tx,
            team_id=team_id,
            user_id=user_id,
            amount=amount,
            team_balance_after=team[0] - amount,
            available=available - amount,
            idempotency_key=key,
        )
        self.remember("t", team_id, "team_deduct", key, fp, result)
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
