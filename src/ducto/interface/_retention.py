"""
The rules of bounded growth: retention of replay data, ledger archiving, daily rollups.

Pure functions on plain data, shared by every store (the steps live in `_engine/retention.py`).

- An idempotency record is kept for the idempotency retention after it was written; older, it
  is gone whether or not `prune` has deleted it yet, so the boundary does not depend on when
  `prune` runs: a key is replayed inside the retention and is a new request past it.
- A hold is kept for the hold retention after its expiry time once nothing counts it any more
  (settled, released, or lapsed unsettled). A hold is always finished by its expiry time or
  earlier, so it is kept at least that long after it finished.
- Closed counters (a spend-cap window, an allowance month, a team member's month) are never
  read again and go at the next prune.
- `archive_ledger` moves ledger rows created before a cutoff to a file. The cutoff is a UTC
  midnight no later than the start of the current UTC month, so no open spend-cap window or
  allowance month loses a row; each archived UTC day of paid usage is kept as rollups (net
  spend and row count per user and model), so analytics over whole UTC days stay exact.
"""

from __future__ import annotations

import gzip
import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any, BinaryIO, Final, Literal

import anyio
import anyio.to_thread

from ducto._shown import shown
from ducto.errors import InvalidArgumentError
from ducto.interface import _ledger as L
from ducto.interface.models import ArchiveResult

DEFAULT_RETENTION: Final = timedelta(days=7)
"""How long idempotency records and finished holds are kept unless a store is told otherwise."""

MAX_RETENTION_SECONDS: Final = 100 * 366 * 86400

PruneKind = Literal["idempotency", "holds", "windows"]
PRUNE_KINDS: Final[tuple[PruneKind, ...]] = ("idempotency", "holds", "windows")

PRUNE_CHUNK: Final = 1000
"""Records deleted per transaction by `prune`, so no lock is held for long."""

ARCHIVE_CHUNK: Final = 2000
"""Ledger rows archived per transaction (and per gzip member) by `archive_ledger`."""


def check_retention(name: str, value: object) -> timedelta | None:
    """Return a retention (seconds as int/float, or a timedelta; None = for ever)."""
    if value is None:
        return None
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif type(value) is int:
        seconds = float(value) if abs(value) <= MAX_RETENTION_SECONDS else math.inf
    elif type(value) is float:
        seconds = value
    else:
        raise InvalidArgumentError(
            f"{name} must be None (for ever), seconds (int or float) or a timedelta,"
            f" got {shown(value)}"
        )
    if not math.isfinite(seconds) or not 0 < seconds <= MAX_RETENTION_SECONDS:
        raise InvalidArgumentError(
            f"{name} must be more than 0 and at most {MAX_RETENTION_SECONDS} seconds,"
            f" got {shown(value)}"
        )
    return timedelta(seconds=seconds)


@dataclass(frozen=True, slots=True)
class Retention:
    """A store's retention settings (None: kept for ever)."""

    idempotency: timedelta | None = DEFAULT_RETENTION
    holds: timedelta | None = DEFAULT_RETENTION

    @classmethod
    def of(cls, idempotency: object, holds: object) -> Retention:
        """Check both settings, naming the parameter at fault."""
        return cls(
            check_retention("idempotency_retention", idempotency),
            check_retention("hold_retention", holds),
        )


def replay_since(now: datetime, retention: Retention) -> datetime | None:
    """Idempotency records written before this instant are gone (None: all are kept)."""
    return None if retention.idempotency is None else now - retention.idempotency


def prune_cutoff(kind: PruneKind, now: datetime, retention: Retention) -> datetime | None:
    """
    What `prune` deletes of `kind`: records older than the instant returned (None: nothing).

    For ``windows`` it is `now` itself: a storage deletes the counters of every window that
    does not contain `now` (see `window_keys`).
    """
    if kind == "idempotency":
        return replay_since(now, retention)
    if kind == "holds":
        return None if retention.holds is None else now - retention.holds
    return now


def window_keys(now: datetime) -> tuple[int, int]:
    """The current UTC day and month keys: counters of earlier windows are closed."""
    return L.day_key(now), L.month_key(now)


# -- archiving --------------------------------------------------------------------------------


def month_start(moment: datetime) -> datetime:
    """The start of the UTC calendar month holding `moment`."""
    return datetime(moment.year, moment.month, 1, tzinfo=UTC)


def check_archive_before(before: object, now: datetime) -> datetime:
    """
    Return an archive cutoff: an aware UTC midnight no later than the start of this month.

    Spend-cap windows are a day or a month and allowance is monthly, so a cutoff at or before
    the start of the current UTC month leaves every open window whole.
    """
    if not isinstance(before, datetime) or before.tzinfo is None:
        raise InvalidArgumentError(f"before must be an aware datetime, got {shown(before)}")
    cutoff = before.astimezone(UTC)
    if cutoff.timetz() != time(0, tzinfo=UTC):
        raise InvalidArgumentError(
            "before must be a UTC midnight (archived usage is kept as daily totals),"
            f" got {cutoff.isoformat()}"
        )
    limit = month_start(now)
    if cutoff > limit:
        raise InvalidArgumentError(
            f"before must be no later than {limit.isoformat()}, the start of the current UTC"
            " month (an open spend-cap window or allowance month may not lose rows),"
            f" got {cutoff.isoformat()}"
        )
    return cutoff


def check_destination(value: object) -> Path:
    """Return the archive file's path: a str or path whose folder exists."""
    if not isinstance(value, (str, os.PathLike)):
        raise InvalidArgumentError(
            f"destination must be a file path (str or os.PathLike), got {shown(value)}"
        )
    text = os.fspath(value)
    if not isinstance(text, str) or not text or "\x00" in text:
        raise InvalidArgumentError(f"destination must be a file path, got {shown(value)}")
    path = Path(text)
    if path.is_dir():
        raise InvalidArgumentError(f"destination must be a file, not a folder: {text!r}")
    if not path.parent.is_dir():
        raise InvalidArgumentError(f"destination's folder does not exist: {text!r}")
    return path


def check_archive_window(start: datetime, end: datetime, horizon: datetime | None) -> None:
    """
    Refuse an analytics window that splits a day kept only as a daily total.

    Days before `horizon` (the latest archive cutoff) live on as rollups per UTC day, which
    answer exactly for a window whose bounds there are UTC midnights.
    """
    if horizon is None:
        return
    for name, bound in (("start", start), ("end", end)):
        if bound < horizon and bound.timetz() != time(0, tzinfo=UTC):
            raise InvalidArgumentError(
                f"{name} must be a UTC midnight before {horizon.isoformat()}: usage before it is"
                f" archived and kept as daily totals, got {bound.isoformat()}"
            )


RollupKey = tuple[int, str, str, str]
"""(UTC day as a proleptic ordinal, user id, model, budget scope or "" for none)."""


def rollups(rows: Iterable[Any]) -> dict[RollupKey, list[int]]:
    """
    Daily totals of paid usage in `rows` (ledger rows about to be archived).

    Each usage or team usage row counts, net of its refunds, for the user who spent it (the
    member for team usage), under its model and budget scope, on its UTC day: the same
    definition analytics read from the rows themselves. Values are ``[net, count]``.
    """
    totals: dict[RollupKey, list[int]] = {}
    for row in rows:
        if row.type not in L.REFUNDABLE_TYPES:
            continue
        key = (
            row.created_at.toordinal(),
            row.spender or row.account,
            row.model or L.UNKNOWN_MODEL,
            row.scope or "",
        )
        entry = totals.setdefault(key, [0, 0])
        entry[0] += -row.amount - row.refunded
        entry[1] += 1
    return totals


def rollup_events(rows: Iterable[tuple[int, str, str, str, int, int]]) -> list[L.SpendEvent]:
    """Stored rollups ``(day, user, model, scope, net, count)`` as analytics events at UTC
    midnight (scope "" for none)."""
    return [
        L.SpendEvent(
            user,
            model,
            datetime.combine(date.fromordinal(day), time(0), UTC),
            net,
            count,
            scope or None,
        )
        for day, user, model, scope, net, count in rows
    ]


def archive_line(row: Any, public: Mapping[str, Any]) -> dict[str, Any]:
    """One archived row: the public transaction fields plus what only the store kept."""
    return {
        **public,
        "seq": row.seq,
        "spender": row.spender,
        "model": row.model,
        "operation_type": row.operation_type,
        "allowance": row.allowance,
        "scope": row.scope,
    }


def archive_member(lines: Iterable[Mapping[str, Any]]) -> bytes:
    """A chunk of archived rows as one gzip member of JSON Lines (members concatenate)."""
    text = "".join(json.dumps(line, separators=(",", ":"), sort_keys=True) + "\n" for line in lines)
    return gzip.compress(text.encode(), compresslevel=6, mtime=0)


@dataclass(slots=True)
class ArchiveProgress:
    """Running totals of an `archive_ledger` call."""

    before: datetime
    destination: str
    dry_run: bool
    rows: int = 0
    bytes_written: int = 0

    def result(self) -> ArchiveResult:
        """The totals so far as the public result."""
        return ArchiveResult(
            rows=self.rows,
            before=self.before,
            destination=self.destination,
            bytes_written=self.bytes_written,
            dry_run=self.dry_run,
        )


class ArchiveFile:
    """
    The archive file, appended to one synced gzip member at a time (on a worker thread).

    A new file's folder is synced too, so the file itself survives a crash.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._file: BinaryIO | None = None

    async def __aenter__(self) -> ArchiveFile:
        self._file = await anyio.to_thread.run_sync(self._open)
        return self

    def _open(self) -> BinaryIO:
        existed = self._path.exists()
        file = self._path.open("ab")
        if not existed:
            os.fsync(file.fileno())
            _sync_folder(self._path.parent)
        return file

    async def __aexit__(self, *exc: object) -> None:
        file, self._file = self._file, None
        if file is not None:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(file.close)

    async def append(self, data: bytes) -> int:
        """Append `data` and sync it; return the offset it starts at (for `cut`)."""
        file = self._file
        assert file is not None

        def write() -> int:
            mark = file.seek(0, os.SEEK_END)
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
            return mark

        return await anyio.to_thread.run_sync(write)

    async def cut(self, mark: int) -> None:
        """Drop what was appended from `mark` on, and sync."""
        file = self._file
        assert file is not None

        def cut() -> None:
            file.truncate(mark)
            file.flush()
            os.fsync(file.fileno())

        await anyio.to_thread.run_sync(cut)


def _sync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - a platform that cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - a file system that cannot sync folders
        pass
    finally:
        os.close(fd)
