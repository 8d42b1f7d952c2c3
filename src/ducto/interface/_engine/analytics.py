"""Usage debits as analytics counts them."""

from __future__ import annotations

from datetime import datetime

from ducto.interface import _ledger as L
from ducto.interface import _retention as R

from .storage import Storage


def spend_events(st: Storage, start: datetime, end: datetime) -> list[L.SpendEvent]:
    """
    Every usage debit in ``[start, end)``, as analytics counts it, archived days included.

    A window whose bound splits an archived day is refused: that day is kept only as daily
    totals, which cannot answer for part of it.
    """
    R.check_archive_window(start, end, st.archived_before())
    return st.spend_events(start, end)
