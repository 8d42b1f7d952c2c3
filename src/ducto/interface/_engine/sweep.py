"""The sweep that writes off the remainders of expired lots."""

from __future__ import annotations

from ducto.interface import _ledger as L
from ducto.interface.models import SweepResult

from .common import _load
from .storage import Account, Storage


def sweep(st: Storage, dry_run: bool) -> SweepResult:
    """Write off every expired lot's remainder (see `CreditStore.sweep_expired_credits`)."""
    now = st.now()
    due = st.sweep_due(now, not dry_run)
    count = len(due)
    total = sum(lot.remaining for _, _, lot in due)
    if dry_run:
        return SweepResult(expired_count=count, expired_amount=total, dry_run=True)
    acct: Account | None = None
    for kind, account_id, lot in due:
        if acct is None or (acct.kind, acct.id) != (kind, account_id):
            if acct is not None:
                st.save(acct)
            acct = _load(st, kind, account_id, now)
            assert acct is not None
        remaining = lot.remaining
        lot.remaining = 0
        st.lots_drawn(acct, ((lot, remaining),))
        acct.balance -= remaining
        acct.expired_unswept -= remaining
        st.append_row(
            acct,
            -remaining,
            "expiry",
            {"lot_id": lot.id, "expires_at": L.iso(lot.expires_at)},
            now,
        )
    if acct is not None:
        st.save(acct)
    return SweepResult(expired_count=count, expired_amount=total, dry_run=False)
