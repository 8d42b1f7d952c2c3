"""
Auto top-up: claim an account's one in-flight top-up, then finish it with or without a payment.

The store keeps, per user account, at most one claim and a total per UTC month. A claim is
made only when the account's available credits (plan allowance included, as low-balance
events count them) are below the threshold, no unexpired claim exists and the month's total
plus the amount stays within the monthly limit; the amount counts toward the month from the
claim on. Finishing with a payment reference grants the amount as a ``purchase`` under that
reference as its idempotency key; finishing without one (the charge failed) gives the amount
back to the month. A claim past its expiry no longer blocks a new one, but its amount keeps
counting toward its month (its payment may have been taken), and finishing it later with a
payment still grants the credits.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Literal

from ducto.errors import InvalidArgumentError
from ducto.interface import _ledger as L
from ducto.interface.models import CreditMetadata, TopUpClaimResult, TopUpResult

from .common import _allowance, _load, _spendable
from .grants import add_credits
from .storage import USER, Storage, TopUpClaim


def claim_top_up(
    st: Storage,
    user_id: str,
    threshold: int,
    amount: int,
    monthly_limit: int,
    lifetime: timedelta,
) -> TopUpClaimResult:
    """Claim the user's in-flight top-up (see `CreditStore.claim_top_up`)."""
    now = st.now()
    acct = _load(st, USER, user_id, now)
    available = _spendable(acct, _allowance(st, acct, now)[1])
    month = L.month_key(now)
    total = st.top_up_total(acct, month) if acct is not None else 0

    def refused(reason: Literal["not_needed", "in_flight", "monthly_limit"]) -> TopUpClaimResult:
        held = st.top_up_claim(acct) if acct is not None and reason == "in_flight" else None
        return TopUpClaimResult(
            user_id=user_id,
            reason=reason,
            available=available,
            month_total=total,
            claim_id=held.id if held is not None else "",
            expires_at=held.expires_at if held is not None else None,
        )

    if available >= threshold:
        return refused("not_needed")
    held = st.top_up_claim(acct) if acct is not None else None
    if held is not None and held.expires_at > now:
        return refused("in_flight")
    if total + amount > monthly_limit:
        return refused("monthly_limit")
    if acct is None:
        acct = st.create(USER, user_id, now)
    claim = TopUpClaim(st.new_id("topup"), amount, month, now + lifetime)
    st.put_top_up_claim(acct, claim)
    st.add_top_up_total(acct, month, amount)
    st.save(acct)
    return TopUpClaimResult(
        user_id=user_id,
        claimed=True,
        claim_id=claim.id,
        amount=amount,
        available=available,
        month_total=total + amount,
        expires_at=claim.expires_at,
    )


def finish_top_up(
    st: Storage,
    user_id: str,
    claim_id: str,
    amount: int,
    reference: str | None,
    meta: CreditMetadata | None,
) -> TopUpResult:
    """Finish a claimed top-up (see `CreditStore.finish_top_up`)."""
    now = st.now()
    acct = _load(st, USER, user_id, now)
    held = st.top_up_claim(acct) if acct is not None else None
    released = held is not None and held.id == claim_id
    if released and held is not None and held.amount != amount:
        raise InvalidArgumentError(f"amount must be the claimed amount {held.amount}, got {amount}")
    grant = None
    if reference is not None:
        # Replays by reference: a payment finished twice grants once.
        grant = add_credits(st, user_id, amount, "purchase", meta, None, reference)
        if grant.error is not None:
            return TopUpResult(user_id=user_id, claim_id=claim_id, grant=grant)
        acct = st.account(USER, user_id)
    if released:
        assert acct is not None
        assert held is not None
        st.put_top_up_claim(acct, None)
        if reference is None:
            st.add_top_up_total(acct, held.month, -held.amount)
        st.save(acct)
    month = L.month_key(now)
    return TopUpResult(
        user_id=user_id,
        claim_id=claim_id,
        released=released,
        grant=grant,
        month_total=st.top_up_total(acct, month) if acct is not None else 0,
    )
