"""A user's spend caps: check, set, list and remove."""

from __future__ import annotations

from typing import Literal

from ducto.interface import _ledger as L
from ducto.interface.models import CapCheckResult, RemoveSpendCapResult, SpendCap

from .common import _held_of, _load, _spend_of
from .storage import USER, Storage


def check_spend_cap(
    st: Storage, user_id: str, model: str | None, extra: int, scope: str | None
) -> CapCheckResult:
    """The advisory cap check (see `CreditStore.check_spend_cap`)."""
    now = st.now()
    acct = _load(st, USER, user_id, now)
    caps = st.caps(acct) if acct is not None else ()
    if acct is None or not caps:
        return CapCheckResult()
    spend, held = _spend_of(st, user_id, now), _held_of(st, acct)
    return L.check_caps(caps, model, scope, extra, spend, held, now)


def set_spend_cap(st: Storage, cap: SpendCap) -> SpendCap:
    """Create or replace a cap."""
    now = st.now()
    acct = _load(st, USER, cap.user_id, now) or st.create(USER, cap.user_id, now)
    st.put_cap(acct, cap)
    st.save(acct)
    return cap.model_copy()


def list_spend_caps(st: Storage, user_id: str) -> list[SpendCap]:
    """The user's caps, daily before monthly, then by model (None first)."""
    acct = st.account(USER, user_id)
    if acct is None:
        return []
    return sorted((c.model_copy() for c in st.caps(acct)), key=L.cap_sort_key)


def remove_spend_cap(
    st: Storage,
    user_id: str,
    cap_type: Literal["daily", "monthly"],
    model: str | None,
    scope: str | None,
) -> RemoveSpendCapResult:
    """Remove a cap."""
    acct = st.account(USER, user_id)
    removed = acct is not None and st.remove_cap(acct, cap_type, model, scope)
    if removed:
        assert acct is not None
        st.save(acct)
    return RemoveSpendCapResult(
        user_id=user_id, cap_type=cap_type, model=model, scope=scope, removed=removed
    )
