"""Usage debits as analytics counts them."""

from __future__ import annotations

from datetime import datetime

from ducto.interface import _ledger as L

from .storage import Storage


def spend_events(st: Storage, start: datetime, end: datetime) -> list[L.SpendEvent]:
    """Every usage debit in ``[start, end)``, as analytics counts it."""
    return st.spend_events(start, end)
