"""Bounded growth: `prune` of replay data past retention, `archive_ledger`'s steps."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from ducto.interface import _retention as R

from .storage import Storage, StoredRow


def now(st: Storage) -> datetime:
    """The store's clock (the database's, for a store that reads it there)."""
    return st.now()


def prune(st: Storage, kind: R.PruneKind, limit: int, dry_run: bool) -> int:
    """Delete one chunk (at most `limit`) of `kind` past retention; a dry run counts them all."""
    cutoff = R.prune_cutoff(kind, st.now(), st.retention)
    if cutoff is None:
        return 0
    return st.prune(kind, cutoff, limit, dry_run)


def archive_candidates(st: Storage, before: datetime, after: int, limit: int) -> list[StoredRow]:
    """The next chunk of ledger rows older than the cutoff, oldest ``seq`` first."""
    return st.archive_candidates(before, after, limit)


def archive(st: Storage, rows: Sequence[StoredRow], before: datetime) -> None:
    """
    Move a chunk of rows (already written to the archive file) out of the ledger.

    Their paid usage joins the daily rollups, so analytics over whole UTC days keep their
    answers. Raises `ArchiveChanged` if a row was refunded or archived since it was read: the
    store rolls the operation back and the caller reads the chunk again.
    """
    st.archive(rows, R.rollups(rows), before)
