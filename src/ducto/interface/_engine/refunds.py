"""Refunds of usage debits."""

from __future__ import annotations

from datetime import datetime

from ducto.errors import ErrorCode
from ducto.interface import _ledger as L
from ducto.interface.models import CreditMetadata, RefundResult

from .common import _credit, _load, _recall, _remember
from .storage import TEAM, Account, Storage


def _refill(st: Storage, acct: Account, lot_id: str, amount: int, now: datetime) -> None:
    """Return `amount` to a lot; it keeps its expiry, so an expired lot stays expired."""
    lot = st.lot(acct, lot_id)
    expired = lot.expires_at is not None and lot.expires_at <= now
    lot.remaining += amount
    acct.balance += amount
    if expired:
        acct.expired_unswept += amount
    st.lot_refilled(acct, lot, expired)


def refund(
    st: Storage,
    transaction_id: str,
    amount: int | None,
    reason: str | None,
    meta: CreditMetadata | None,
    key: str | None,
) -> RefundResult:
    """Refund (part of) a usage debit (see `CreditStore.refund_credits`)."""
    now = st.now()
    original = st.debit(transaction_id)
    if original is None:
        return RefundResult(
            original_transaction_id=transaction_id,
            requested=amount,
            idempotency_key=key,
            error=(
                ErrorCode.TRANSACTION_ARCHIVED
                if st.archived(transaction_id)
                else ErrorCode.TRANSACTION_NOT_FOUND
            ),
        )
    acct = _load(st, original.kind, original.account, now)
    assert acct is not None
    spender = original.spender or acct.id
    team_id = acct.id if acct.kind == TEAM else None
    fingerprint = (transaction_id, amount)
    replay, stored = _recall(st, acct, "refund", key, fingerprint, RefundResult)
    refunds = original.refunds
    refundable = -original.amount - (refunds[0] if refunds else 0)
    error = (
        ErrorCode.IDEMPOTENCY_CONFLICT
        if replay
        else L.refund_error(original.type, refundable, amount)
    )
    give = amount if amount is not None else refundable
    if error is None:
        L.check_balance_bound("balance", acct.balance + give)
    if replay or error is not None:
        return stored or RefundResult(
            original_transaction_id=transaction_id,
            user_id=spender,
            team_id=team_id,
            requested=amount,
            new_balance=acct.balance,
            refundable=0 if error is ErrorCode.NOT_REFUNDABLE else refundable,
            idempotency_key=key,
            error=error,
        )
    if refunds is None:
        refunds = [0] * (1 + len(original.draws))
    plan = L.plan_refund(original.draws, refunds, give, acct.balance)
    acct.balance += plan.debt_paid
    for lot_id, credit in plan.into_lots:
        _refill(st, acct, lot_id, credit, now)
    if plan.new_lot:
        _credit(st, acct, plan.new_lot, None, now)
    st.set_refunds(original, refunds)
    if give:
        st.add_spend(spender, original.model, original.scope, original.created_at, -give)
        if team_id is not None:
            st.add_member_spend(acct, spender, L.month_key(original.created_at), -give)
    st.save(acct)
    system = {
        "original_transaction_id": transaction_id,
        "reason": reason,
        "idempotency_key": key,
        "model": original.model,
        "user_id": spender if team_id else None,
    }
    row_id = st.append_row(
        acct, give, "refund", L.row_metadata(meta, system), now, idempotency_key=key
    )
    result = RefundResult(
        refund_transaction_id=row_id,
        original_transaction_id=transaction_id,
        user_id=spender,
        team_id=team_id,
        amount=give,
        requested=amount,
        new_balance=acct.balance,
        refundable=refundable - give,
        idempotency_key=key,
    )
    _remember(st, acct, "refund", key, fingerprint, result)
    return result
