"""Plans and the allowance they grant each UTC month."""

from __future__ import annotations

from ducto.errors import InvalidArgumentError
from ducto.interface import _ledger as L
from ducto.interface.models import AllowanceResult, GetUserPlanResult, SetUserPlanResult

from .common import _allowance, _load, _plan
from .storage import USER, Storage


def get_user_plan(st: Storage, user_id: str) -> GetUserPlanResult:
    """The user's plan as the active version defines it."""
    acct = st.account(USER, user_id)
    if acct is None or acct.plan_id is None:
        return GetUserPlanResult(user_id=user_id)
    plan = _plan(st, acct.plan_id, st.now())
    if plan is None:
        return GetUserPlanResult(user_id=user_id, plan_id=acct.plan_id)
    return GetUserPlanResult(
        user_id=user_id,
        plan_id=acct.plan_id,
        plan_name=plan.name,
        free_allowance=plan.free_allowance,
        features=dict(plan.features or {}),
    )


def set_user_plan(st: Storage, user_id: str, plan_id: str) -> SetUserPlanResult:
    """Record the user's plan; the active version must define it."""
    now = st.now()
    if _plan(st, plan_id, now) is None:
        raise InvalidArgumentError(
            f"plan_id {plan_id!r} is not defined by the pricing version in force"
        )
    acct = _load(st, USER, user_id, now) or st.create(USER, user_id, now)
    acct.plan_id = plan_id
    st.save(acct)
    return SetUserPlanResult(user_id=user_id, plan_id=plan_id)


def check_allowance(st: Storage, user_id: str) -> AllowanceResult:
    """The plan allowance of the current UTC month."""
    now = st.now()
    acct = st.account(USER, user_id)
    plan, remaining, used = _allowance(st, acct, now)
    start, end = L.month_bounds(now)
    return AllowanceResult(
        plan_id=(acct.plan_id or "") if acct is not None else "",
        allowance_remaining=remaining,
        period_start=start.isoformat(),
        period_end=end.isoformat(),
        free_allowance=plan.free_allowance if plan is not None else 0,
        allowance_used=used,
    )


def increment_usage_window(st: Storage, user_id: str, amount: int) -> None:
    """Record allowance consumption in the current UTC month."""
    now = st.now()
    acct = _load(st, USER, user_id, now) or st.create(USER, user_id, now)
    st.save(acct)
    if amount:
        st.use_allowance(acct, L.month_key(now), amount)
