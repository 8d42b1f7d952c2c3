"""A user's balance, grants and lots, and pages of an account's ledger."""

from __future__ import annotations

from datetime import datetime

from ducto.errors import ErrorCode
from ducto.interface import _ledger as L
from ducto.interface.models import (
    AddCreditsResult,
    BalanceResult,
    CreditLot,
    CreditMetadata,
    TransactionPage,
)

from .common import _allowance, _credit, _debit, _load, _recall, _remember, _spendable, public_row
from .storage import USER, Storage


def get_balance(st: Storage, user_id: str) -> BalanceResult:
    """A user's balance (see `CreditStore.get_balance`)."""
    now = st.now()
    acct = _load(st, USER, user_id, now)
    if acct is None:
        return BalanceResult(user_id=user_id)
    allowance = _allowance(st, acct, now)[1]
    return BalanceResult(
        user_id=user_id,
        balance=acct.balance,
        lifetime_purchased=acct.lifetime_purchased,
        available=_spendable(acct, allowance),
        reserved=acct.reserved,
        expired_unswept=acct.expired_unswept,
        allowance_remaining=allowance,
    )


def add_credits(
    st: Storage,
    user_id: str,
    amount: int,
    type_: str,
    meta: CreditMetadata | None,
    expiry: datetime | None,
    key: str | None,
) -> AddCreditsResult:
    """Grant credits, or take them with a negative adjustment (`CreditStore.add_credits`)."""
    now = st.now()
    acct = _load(st, USER, user_id, now)
    fingerprint = (amount, type_, expiry)
    replay, stored = _recall(st, acct, "grant", key, fingerprint, AddCreditsResult)
    if replay:
        return stored or AddCreditsResult(
            user_id=user_id,
            amount=0,
            requested=amount,
            idempotency_key=key,
            error=ErrorCode.IDEMPOTENCY_CONFLICT,
        )
    L.check_future("expires_at", expiry, now)
    balance = acct.balance if acct is not None else 0
    available = _spendable(acct)
    if amount < 0 and available + amount < 0:
        return AddCreditsResult(
            user_id=user_id,
            amount=0,
            requested=amount,
            new_balance=balance,
            lifetime_purchased=acct.lifetime_purchased if acct is not None else 0,
            available=available,
            idempotency_key=key,
            error=ErrorCode.INSUFFICIENT_CREDITS,
        )
    L.check_balance_bound("balance", balance + amount)
    if type_ == "purchase" and acct is not None:
        L.check_balance_bound("lifetime_purchased", acct.lifetime_purchased + amount)
    if acct is None:
        acct = st.create(USER, user_id, now)
    if amount > 0:
        _credit(st, acct, amount, expiry, now)
    else:
        _debit(st, acct, -amount)
    if type_ == "purchase":
        acct.lifetime_purchased += amount
    st.save(acct)
    row_id = st.append_row(
        acct,
        amount,
        type_,
        L.row_metadata(meta, {"idempotency_key": key, "expires_at": L.iso(expiry)}),
        now,
        idempotency_key=key,
    )
    result = AddCreditsResult(
        transaction_id=row_id,
        user_id=user_id,
        amount=amount,
        requested=amount,
        new_balance=acct.balance,
        lifetime_purchased=acct.lifetime_purchased,
        expires_at=expiry,
        available=_spendable(acct),
        idempotency_key=key,
    )
    _remember(st, acct, "grant", key, fingerprint, result)
    return result


def list_lots(st: Storage, user_id: str) -> list[CreditLot]:
    """The user's lots with credits, in the order debits take them."""
    now = st.now()
    acct = _load(st, USER, user_id, now)
    if acct is None:
        return []
    live, expired = st.lots_in_order(acct)
    return [
        CreditLot(id=lot.id, remaining=lot.remaining, expires_at=lot.expires_at, expired=gone)
        for lots, gone in ((live, False), (expired, True))
        for lot in lots
    ]


def page(
    st: Storage,
    kind: str,
    account_id: str,
    limit: int,
    before: int | None,
    types: frozenset[str] | None,
    start: datetime | None,
    end: datetime | None,
) -> TransactionPage:
    """A page of an account's ledger, newest first (see `CreditStore.list_transactions`)."""
    rows, more = st.page(kind, account_id, limit, before, types, start, end)
    return TransactionPage(
        items=[public_row(row) for row in rows],
        next_cursor=L.encode_cursor(rows[-1].seq) if more and rows else None,
    )
