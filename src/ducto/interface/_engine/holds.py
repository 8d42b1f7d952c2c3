"""Holds: reserve, deduct (settle), charge (hold and settle at once) and release."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, TypeVar

from ducto.errors import ErrorCode
from ducto.interface import _ledger as L
from ducto.interface.models import (
    ChargeResult,
    CreditMetadata,
    DeductionResult,
    ReleaseResult,
    ReserveResult,
)

from .common import (
    _allowance,
    _caller_metadata,
    _debit,
    _held_of,
    _load,
    _place,
    _recall,
    _remember,
    _since,
    _spend_of,
    _spendable,
)
from .storage import TEAM, USER, Account, Hold, Storage


def _uncount(st: Storage, acct: Account, hold: Hold) -> None:
    hold.counted = False
    acct.reserved -= hold.amount
    st.add_held(acct, hold, -hold.amount)


def _hold_refusal(
    st: Storage,
    acct: Account | None,
    amount: int,
    min_balance: int,
    model: str | None,
    scope: str | None,
    available: int,
    now: datetime,
) -> dict[str, Any] | None:
    """Why a hold of `amount` is refused: the floor first, then a deny cap."""
    if available - amount < min_balance:
        return {"error": ErrorCode.INSUFFICIENT_CREDITS, "min_balance": min_balance}
    if acct is None:
        return None
    caps = st.caps(acct)
    if not caps:
        return None
    spend, held = _spend_of(st, acct.id, now), _held_of(st, acct)
    return L.hold_cap_refusal(caps, model, scope, amount, spend, held, now)


def reserve(
    st: Storage,
    user_id: str,
    amount: int,
    operation_type: str,
    meta: CreditMetadata | None,
    min_balance: int,
    lifetime: timedelta,
    use_allowance: bool,
    key: str | None,
) -> ReserveResult:
    """Hold credits (see `CreditStore.reserve_credits`)."""
    now = st.now()
    acct = _load(st, USER, user_id, now)
    model = L.metadata_model(meta)
    scope = L.metadata_scope(meta)
    fingerprint = _hold_print(amount, operation_type, model, use_allowance, scope)
    replay, stored = _recall(st, acct, "reserve", key, fingerprint, ReserveResult)
    if replay:
        return stored or ReserveResult(
            user_id=user_id,
            amount=0,
            requested=amount,
            idempotency_key=key,
            error=ErrorCode.IDEMPOTENCY_CONFLICT,
        )
    allowance = _allowance(st, acct, now)[1] if use_allowance else 0
    available = _spendable(acct, allowance)
    refusal = _hold_refusal(st, acct, amount, min_balance, model, scope, available, now)
    if refusal is not None:
        return ReserveResult(
            user_id=user_id,
            amount=0,
            requested=amount,
            balance=acct.balance if acct is not None else 0,
            reserved_total=acct.reserved if acct is not None else 0,
            available=available,
            idempotency_key=key,
            **refusal,
        )
    if acct is None:
        acct = st.create(USER, user_id, now)
    hold = Hold(
        st.new_id("res"), amount, operation_type, model, use_allowance, now + lifetime, scope=scope
    )
    _place(st, acct, hold)
    result = ReserveResult(
        reservation_id=hold.id,
        user_id=user_id,
        amount=amount,
        requested=amount,
        balance=acct.balance,
        reserved_total=acct.reserved,
        expires_at=hold.expires_at,
        available=available - amount,
        idempotency_key=key,
    )
    _remember(st, acct, "reserve", key, fingerprint, result)
    return result


def deduct(
    st: Storage,
    user_id: str,
    reservation_id: str,
    amount: int,
    key: str | None,
    meta: CreditMetadata | None,
    team_id: str | None,
) -> DeductionResult:
    """Settle a hold (see `CreditStore.deduct_credits`)."""
    now = st.now()
    acct = _load(st, USER, user_id, now) if team_id is None else _load(st, TEAM, team_id, now)
    return _deduct_hold(st, acct, user_id, reservation_id, amount, key, meta, now, DeductionResult)


D = TypeVar("D", bound=DeductionResult)


def _deduct_hold(
    st: Storage,
    acct: Account | None,
    user_id: str,
    reservation_id: str,
    amount: int,
    key: str | None,
    meta: CreditMetadata | None,
    now: datetime,
    result_type: type[D],
) -> D:
    fingerprint = (reservation_id, amount)
    replay, stored = _recall(st, acct, "deduct", key, fingerprint, result_type)
    hold = None
    if not replay and acct is not None:
        hold = st.hold(acct, reservation_id)
        if hold is not None and hold.member != (user_id if acct.kind == TEAM else None):
            hold = None  # a team hold is settled by the member it is attributed to
    error = None if replay else L.hold_error(None if hold is None else hold.state)
    if replay or error is not None:
        return stored or result_type(
            user_id=user_id,
            reservation_id=reservation_id,
            requested=amount,
            idempotency_key=key,
            team_id=acct.id if acct is not None and acct.kind == TEAM else None,
            error=error or ErrorCode.IDEMPOTENCY_CONFLICT,
        )
    assert acct is not None
    assert hold is not None
    L.check_balance_bound("balance", acct.balance - amount)
    if hold.counted:
        _uncount(st, acct, hold)
    st.close_hold(acct, hold, L.HOLD_SETTLED)
    return _bill(st, acct, hold, user_id, amount, key, meta, now, fingerprint, result_type)


def _bill(
    st: Storage,
    acct: Account,
    hold: Hold,
    user_id: str,
    amount: int,
    key: str | None,
    meta: CreditMetadata | None,
    now: datetime,
    fingerprint: tuple[object, ...],
    result_type: type[D],
) -> D:
    """Charge `amount` for a settled hold: allowance first, then the lots, in full."""
    team = acct.kind == TEAM
    covered = left = 0
    if hold.use_allowance:
        left = _allowance(st, acct, now)[1]
        covered = L.allowance_split(amount, left)[0]
        if covered:
            st.use_allowance(acct, L.month_key(now), covered)
    paid = amount - covered
    short = L.shortfall(acct.balance, paid)
    draws = _debit(st, acct, paid)
    model = (meta.model if meta is not None else None) or hold.model
    st.save(acct)
    row_id = st.append_row(
        acct,
        -paid,
        "team_usage" if team else "usage",
        _caller_metadata(meta),
        now,
        reservation_id=hold.id,
        idempotency_key=key,
        draws=draws,
        spender=user_id,
        model=model,
        operation_type=hold.operation_type,
        allowance=covered,
        scope=hold.scope,
    )
    if paid:  # a window counter is written only when it changes (prune counts counters)
        st.add_spend(user_id, model, hold.scope, now, paid)
        if team:
            st.add_member_spend(acct, user_id, L.month_key(now), paid)
    result = result_type(
        transaction_id=row_id,
        user_id=user_id,
        reservation_id=hold.id,
        amount=-paid,
        charged=paid,
        requested=amount,
        available=_spendable(acct, left - covered),
        balance_after=acct.balance,
        allowance_consumed=covered,
        shortfall=short,
        idempotency_key=key,
        cap_warning=None if team else _cap_warning(st, acct, model, hold.scope, now),
        team_id=acct.id if team else None,
    )
    _remember(st, acct, "deduct", key, fingerprint, result)
    return result


def _cap_warning(
    st: Storage, acct: Account, model: str | None, scope: str | None, now: datetime
) -> str | None:
    caps = st.caps(acct)
    if not caps:
        return None
    return L.cap_warning(caps, model, scope, _spend_of(st, acct.id, now))


def _hold_print(
    amount: int, operation_type: str, model: str | None, use_allowance: bool, scope: str | None
) -> tuple[object, ...]:
    """A hold request's fingerprint (a scope only where one is given, so keys stored before
    scopes existed still match)."""
    if scope is None:
        return (amount, operation_type, model, use_allowance)
    return (amount, operation_type, model, use_allowance, scope)


def charge(
    st: Storage,
    user_id: str,
    amount: int,
    operation_type: str,
    meta: CreditMetadata | None,
    min_balance: int,
    use_allowance: bool,
    key: str | None,
) -> ChargeResult:
    """
    Hold `amount` and settle it in one step (see `CreditStore.charge_credits`).

    The refusals, allowance, caps, ledger row and idempotency keys are those of
    `reserve` followed by `deduct` with the same key: a key first used by either replays
    (or finishes) that request.
    """
    now = st.now()
    acct = _load(st, USER, user_id, now)
    model = L.metadata_model(meta)
    scope = L.metadata_scope(meta)
    reserve_print = _hold_print(amount, operation_type, model, use_allowance, scope)
    if key is not None and acct is not None:
        since = _since(st)
        replay, stored = st.recall(acct, "reserve", key, reserve_print, ReserveResult, since)
        if replay and stored is not None:
            # The key placed a hold before: settle it (or replay its settlement).
            return _deduct_hold(
                st, acct, user_id, stored.reservation_id, amount, key, meta, now, ChargeResult
            )
        if replay or st.recall(acct, "deduct", key, (), ChargeResult, since)[0]:
            return ChargeResult(
                user_id=user_id,
                requested=amount,
                idempotency_key=key,
                error=ErrorCode.IDEMPOTENCY_CONFLICT,
            )
    allowance = _allowance(st, acct, now)[1] if use_allowance else 0
    available = _spendable(acct, allowance)
    refusal = _hold_refusal(st, acct, amount, min_balance, model, scope, available, now)
    if refusal is not None:
        return ChargeResult(
            user_id=user_id,
            requested=amount,
            balance_after=acct.balance if acct is not None else 0,
            available=available,
            idempotency_key=key,
            **refusal,
        )
    L.check_balance_bound("balance", (acct.balance if acct is not None else 0) - amount)
    if acct is None:
        acct = st.create(USER, user_id, now)
    hold = Hold(
        st.new_id("res"),
        amount,
        operation_type,
        model,
        use_allowance,
        now,
        state=L.HOLD_SETTLED,
        counted=False,
        scope=scope,
    )
    st.add_hold(acct, hold)
    if key is not None:
        st.remember(
            acct,
            "reserve",
            key,
            reserve_print,
            ReserveResult(
                reservation_id=hold.id,
                user_id=user_id,
                amount=amount,
                requested=amount,
                balance=acct.balance,
                reserved_total=acct.reserved,
                expires_at=now,
                available=available - amount,
                idempotency_key=key,
            ),
        )
    return _bill(st, acct, hold, user_id, amount, key, meta, now, (hold.id, amount), ChargeResult)


def release(st: Storage, user_id: str, reservation_id: str, team_id: str | None) -> ReleaseResult:
    """Free a hold (see `CreditStore.release_reservation`)."""
    now = st.now()
    acct = _load(st, USER if team_id is None else TEAM, team_id or user_id, now)
    hold = st.hold(acct, reservation_id) if acct is not None else None
    if acct is None or hold is None or hold.member != (None if team_id is None else user_id):
        return ReleaseResult(
            reservation_id=reservation_id,
            user_id=user_id,
            team_id=team_id,
            error=ErrorCode.RESERVATION_NOT_FOUND,
        )
    if hold.state == L.HOLD_OPEN:
        if hold.counted:
            _uncount(st, acct, hold)
        st.close_hold(acct, hold, L.HOLD_RELEASED)
        st.save(acct)
    settled = hold.state == L.HOLD_SETTLED
    return ReleaseResult(
        reservation_id=reservation_id,
        user_id=user_id,
        team_id=team_id,
        amount=0 if settled else hold.amount,
        released=not settled,
        available=_spendable(acct),
        error=ErrorCode.RESERVATION_ALREADY_SETTLED if settled else None,
    )
