"""Steps shared by several operation families (loading, keys, lots, allowance, rows)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from ducto.interface import _ledger as L
from ducto.interface import _retention as R
from ducto.interface.models import CreditMetadata, PlanDefinition, SpendCap, TransactionRow

from .storage import TEAM, Account, Hold, Storage, StoredRow, T


def _load(st: Storage, kind: str, account_id: str, now: datetime) -> Account | None:
    """Load an account and lapse what its clock says has lapsed (persisted at once)."""
    acct = st.account(kind, account_id)
    if acct is not None and _lapse(st, acct, now):
        st.save(acct)
    return acct


def _lapse(st: Storage, acct: Account, now: datetime) -> bool:
    """Stop counting holds past their TTL; set aside lots past their expiry."""
    holds = st.lapse_holds(acct, now)
    for hold in holds:
        acct.reserved -= hold.amount
        st.add_held(acct, hold, -hold.amount)
    expired = st.lapse_lots(acct, now)
    for remaining in expired:
        acct.expired_unswept += remaining
    return bool(holds or expired)


def _spendable(acct: Account | None, allowance: int = 0) -> int:
    if acct is None:
        return allowance
    return L.spendable(acct.balance, acct.expired_unswept, acct.reserved, allowance)


def _recall(
    st: Storage,
    acct: Account | None,
    op: str,
    key: str | None,
    fingerprint: tuple[object, ...],
    result_type: type[T],
) -> tuple[bool, T | None]:
    if key is None or acct is None:
        return False, None
    return st.recall(acct, op, key, fingerprint, result_type, _since(st))


def _since(st: Storage) -> datetime | None:
    """Idempotency records written before this are past retention: a key is new again."""
    return R.replay_since(st.now(), st.retention)


def _remember(
    st: Storage,
    acct: Account,
    op: str,
    key: str | None,
    fingerprint: tuple[object, ...],
    result: Any,
) -> None:
    if key is not None:
        st.remember(acct, op, key, fingerprint, result)


def _debit(st: Storage, acct: Account, amount: int) -> tuple[tuple[str, int], ...]:
    """
    Take `amount` from the lots in burn-down order.

    Unexpired lots first (soonest-expiring first, non-expiring last, oldest first among
    equals), then expired-but-unswept lots; whatever is left takes the balance below zero.
    """
    draws: list[tuple[L.Lot, int]] = []
    if amount > 0 and acct.balance > 0:
        draws, rest = L.draw(st.live_lots(acct), amount)
        if rest and acct.expired_unswept:
            late, rest = L.draw(st.expired_lots(acct), rest)
            acct.expired_unswept -= sum(taken for _, taken in late)
            draws += late
        if draws:
            st.lots_drawn(acct, draws)
    acct.balance -= amount
    return tuple((lot.id, taken) for lot, taken in draws)


def _credit(
    st: Storage, acct: Account, amount: int, expires_at: datetime | None, now: datetime
) -> None:
    """Add `amount`: first pay a negative balance; the rest becomes a new lot."""
    _, lot_credit = L.split_credit(acct.balance, amount)
    acct.balance += amount
    if lot_credit:
        expired = expires_at is not None and expires_at <= now
        if expired:
            acct.expired_unswept += lot_credit
        st.add_lot(acct, lot_credit, expires_at, expired)


def _place(st: Storage, acct: Account, hold: Hold) -> None:
    acct.reserved += hold.amount
    st.add_hold(acct, hold)
    st.add_held(acct, hold, hold.amount)
    st.save(acct)


def _allowance(
    st: Storage, acct: Account | None, now: datetime
) -> tuple[PlanDefinition | None, int, int]:
    """The user's plan, the allowance left this month and the allowance used."""
    if acct is None:
        return None, 0, 0
    used = st.allowance_used(acct, L.month_key(now)) if acct.plan_id is not None else 0
    plan = _plan(st, acct.plan_id, now) if acct.plan_id is not None else None
    if plan is None:
        return None, 0, used
    return plan, max(0, plan.free_allowance - used), used


def _plan(st: Storage, plan_id: str, now: datetime) -> PlanDefinition | None:
    """The plan as the pricing version in force at `now` defines it."""
    from .pricing import current_version  # pricing imports this module

    return st.plan(plan_id, current_version(st, now))


def _spend_of(st: Storage, user_id: str, now: datetime) -> L.SpendOf:
    def spend(cap: SpendCap) -> int:
        return st.window_spend(
            user_id, cap.cap_type, L.cap_window_key(cap.cap_type, now), cap.model, cap.scope
        )

    return spend


def _held_of(st: Storage, acct: Account) -> L.HeldOf:
    def held(model: str | None, scope: str | None) -> int:
        if model is None and scope is None:
            return acct.reserved
        return st.held_for(acct, model, scope)

    return held


def _caller_metadata(meta: CreditMetadata | None) -> dict[str, Any]:
    return L.row_metadata(meta, {}) if meta is not None else {}


def _system_metadata(row: StoredRow) -> dict[str, Any]:
    """The system keys of a usage or team usage row (they win over the caller's)."""
    system: dict[str, Any] = {
        "model": row.model,
        "operation_type": row.operation_type,
        "reservation_id": row.reservation_id,
        "idempotency_key": row.idempotency_key,
        "scope": row.scope,
    }
    if row.type == "usage":
        system["allowance_consumed"] = row.allowance or None
    else:
        system["user_id"] = row.spender
    return system


def public_row(row: StoredRow) -> TransactionRow:
    """A stored ledger row as the public `TransactionRow`."""
    metadata = row.metadata
    if row.type in L.REFUNDABLE_TYPES:
        metadata = L.merge_system(metadata, _system_metadata(row))
    return TransactionRow(
        id=row.id,
        user_id=row.account,
        account_type="team" if row.kind == TEAM else "user",
        amount=row.amount,
        type=row.type,  # type: ignore[arg-type]
        balance_after=row.balance_after,
        metadata=metadata,
        created_at=row.created_at,
        reservation_id=row.reservation_id,
        idempotency_key=row.idempotency_key,
        refunded=row.refunded,
    )
