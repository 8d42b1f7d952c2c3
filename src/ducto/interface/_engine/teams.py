"""Team pools: members, top-ups, balance, and charges and holds for a member."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from ducto.errors import ErrorCode
from ducto.interface import _ledger as L
from ducto.interface.models import (
    AddTeamMemberResult,
    CreateTeamResult,
    CreditMetadata,
    RemoveTeamMemberResult,
    ReserveResult,
    TeamBalanceResult,
    TeamDeductionResult,
    TeamMember,
    TeamTopupResult,
)

from .common import _caller_metadata, _credit, _debit, _load, _place, _recall, _remember, _spendable
from .storage import TEAM, Account, Hold, Member, Storage


def create_team(st: Storage, name: str, initial_balance: int) -> CreateTeamResult:
    """Create a team pool, optionally with an initial top-up."""
    now = st.now()
    team = st.create(TEAM, st.new_id("team"), now)
    team.name = name
    transaction_id = None
    if initial_balance:
        _credit(st, team, initial_balance, None, now)
    st.save(team)
    if initial_balance:
        transaction_id = st.append_row(
            team, initial_balance, "team_topup", {"initial_balance": True}, now
        )
    return CreateTeamResult(
        team_id=team.id, name=name, balance=team.balance, transaction_id=transaction_id
    )


def add_team_member(
    st: Storage, team_id: str, user_id: str, role: str, spend_cap: int | None
) -> AddTeamMemberResult:
    """Add a member, or update its role and cap."""
    team = st.account(TEAM, team_id)
    if team is None:
        return AddTeamMemberResult(
            team_id=team_id,
            user_id=user_id,
            role=role,
            spend_cap=spend_cap,
            error=ErrorCode.TEAM_NOT_FOUND,
        )
    st.put_member(team, user_id, Member(role, spend_cap))
    return AddTeamMemberResult(team_id=team_id, user_id=user_id, role=role, spend_cap=spend_cap)


def remove_team_member(st: Storage, team_id: str, user_id: str) -> RemoveTeamMemberResult:
    """Remove a member."""
    team = st.account(TEAM, team_id)
    if team is None:
        return RemoveTeamMemberResult(
            team_id=team_id, user_id=user_id, error=ErrorCode.TEAM_NOT_FOUND
        )
    removed = st.remove_member(team, user_id)
    return RemoveTeamMemberResult(team_id=team_id, user_id=user_id, removed=removed)


def add_team_credits(
    st: Storage,
    team_id: str,
    amount: int,
    meta: CreditMetadata | None,
    expiry: datetime | None,
    key: str | None,
) -> TeamTopupResult:
    """Top up a team pool."""
    now = st.now()
    team = _load(st, TEAM, team_id, now)
    if team is None:
        return TeamTopupResult(
            team_id=team_id, amount=0, requested=amount, error=ErrorCode.TEAM_NOT_FOUND
        )
    fingerprint = (amount, expiry)
    replay, stored = _recall(st, team, "team_topup", key, fingerprint, TeamTopupResult)
    if replay:
        return stored or TeamTopupResult(
            team_id=team_id,
            amount=0,
            requested=amount,
            idempotency_key=key,
            error=ErrorCode.IDEMPOTENCY_CONFLICT,
        )
    L.check_future("expires_at", expiry, now)
    L.check_balance_bound("balance", team.balance + amount)
    _credit(st, team, amount, expiry, now)
    st.save(team)
    row_id = st.append_row(
        team,
        amount,
        "team_topup",
        L.row_metadata(meta, {"idempotency_key": key, "expires_at": L.iso(expiry)}),
        now,
        idempotency_key=key,
    )
    result = TeamTopupResult(
        transaction_id=row_id,
        team_id=team_id,
        amount=amount,
        requested=amount,
        team_balance_after=team.balance,
        idempotency_key=key,
    )
    _remember(st, team, "team_topup", key, fingerprint, result)
    return result


def get_team_balance(st: Storage, team_id: str) -> TeamBalanceResult:
    """A team pool's balance."""
    now = st.now()
    team = _load(st, TEAM, team_id, now)
    if team is None:
        return TeamBalanceResult(team_id=team_id, error=ErrorCode.TEAM_NOT_FOUND)
    return TeamBalanceResult(
        team_id=team_id,
        name=team.name or "",
        balance=team.balance,
        member_count=st.member_count(team),
        available=_spendable(team),
        reserved=team.reserved,
    )


def get_team_members(st: Storage, team_id: str) -> list[TeamMember]:
    """A team's members with their net team spend this UTC month."""
    now = st.now()
    team = st.account(TEAM, team_id)
    if team is None:
        return []
    return st.members(team, L.month_key(now))


def _member_refusal(
    st: Storage, team: Account, user_id: str, amount: int, now: datetime
) -> tuple[ErrorCode | None, dict[str, Any]]:
    """Why a team charge or hold is refused: membership, the pool, then the member's cap."""
    member = st.member(team, user_id)
    available = _spendable(team)
    spent = held = 0
    cap = member.spend_cap if member is not None else None
    if cap is not None:
        spent = st.member_spend(team, user_id, L.month_key(now))
        held = st.held_by_member(team, user_id)
    error = L.team_deduct_error(member is not None, available, amount, spent + held, cap)
    details: dict[str, Any] = {"available": available}
    if error is ErrorCode.SPEND_CAP_EXCEEDED:
        details.update(
            cap_limit=cap,
            cap_spend=spent,
            cap_reserved=held,
            cap_type="monthly",
            cap_resets_at=L.cap_resets_at("monthly", now),
        )
    return error, details


def deduct_team(
    st: Storage,
    team_id: str,
    user_id: str,
    amount: int,
    meta: CreditMetadata | None,
    key: str | None,
) -> TeamDeductionResult:
    """Charge a team pool for a member (see `CreditStore.deduct_team`)."""
    now = st.now()
    base: dict[str, Any] = {
        "team_id": team_id,
        "user_id": user_id,
        "requested": amount,
        "idempotency_key": key,
    }
    team = _load(st, TEAM, team_id, now)
    if team is None:
        return TeamDeductionResult(**base, error=ErrorCode.TEAM_NOT_FOUND)
    fingerprint = (user_id, amount)
    replay, stored = _recall(st, team, "team_deduct", key, fingerprint, TeamDeductionResult)
    if replay:
        return stored or TeamDeductionResult(
            **base,
            team_balance_after=team.balance,
            available=_spendable(team),
            error=ErrorCode.IDEMPOTENCY_CONFLICT,
        )
    error, details = _member_refusal(st, team, user_id, amount, now)
    if error is not None:
        return TeamDeductionResult(**base, team_balance_after=team.balance, error=error, **details)
    draws = _debit(st, team, amount)
    model = L.metadata_model(meta)
    scope = L.metadata_scope(meta)
    st.save(team)
    row_id = st.append_row(
        team,
        -amount,
        "team_usage",
        _caller_metadata(meta),
        now,
        idempotency_key=key,
        draws=draws,
        spender=user_id,
        model=model,
        scope=scope,
    )
    if amount:
        st.add_member_spend(team, user_id, L.month_key(now), amount)
        st.add_spend(user_id, model, scope, now, amount)
    result = TeamDeductionResult(
        **base,
        transaction_id=row_id,
        amount=-amount,
        charged=amount,
        team_balance_after=team.balance,
        available=_spendable(team),
    )
    _remember(st, team, "team_deduct", key, fingerprint, result)
    return result


def reserve_team(
    st: Storage,
    team_id: str,
    user_id: str,
    amount: int,
    operation_type: str,
    meta: CreditMetadata | None,
    lifetime: timedelta,
    key: str | None,
) -> ReserveResult:
    """Hold credits on a team pool for a member (see `CreditStore.reserve_team_credits`)."""
    now = st.now()
    base: dict[str, Any] = {
        "user_id": user_id,
        "team_id": team_id,
        "amount": 0,
        "requested": amount,
        "idempotency_key": key,
    }
    team = _load(st, TEAM, team_id, now)
    if team is None:
        return ReserveResult(**base, error=ErrorCode.TEAM_NOT_FOUND)
    model = L.metadata_model(meta)
    fingerprint = (user_id, amount, operation_type, model)
    replay, stored = _recall(st, team, "reserve", key, fingerprint, ReserveResult)
    if replay:
        return stored or ReserveResult(**base, error=ErrorCode.IDEMPOTENCY_CONFLICT)
    error, details = _member_refusal(st, team, user_id, amount, now)
    if error is not None:
        return ReserveResult(
            **base,
            balance=team.balance,
            reserved_total=team.reserved,
            error=error,
            **details,
        )
    hold = Hold(
        st.new_id("res"),
        amount,
        operation_type,
        model,
        False,
        now + lifetime,
        member=user_id,
        scope=L.metadata_scope(meta),
    )
    available = _spendable(team)
    _place(st, team, hold)
    result = ReserveResult(
        **{**base, "amount": amount},
        reservation_id=hold.id,
        balance=team.balance,
        reserved_total=team.reserved,
        expires_at=hold.expires_at,
        available=available - amount,
    )
    _remember(st, team, "reserve", key, fingerprint, result)
    return result
