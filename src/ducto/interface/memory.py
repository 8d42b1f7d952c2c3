"""
`MemoryStore`: the whole contract in process memory.

For tests and single-process deployments. The operations are the engine's (`_engine`); this
module is where their data lives and how they run. Every per-operation lookup is a dict access
or a heap operation, so the cost of a call does not grow with users, history or open holds;
only analytics, sweeps, dry runs of `prune` and the search for rows to archive scan.

Bounded growth follows the same rule: what `prune` deletes is found through time-ordered
indexes kept as records are written (idempotency records by write time, finished holds by
expiry, counters by window), so a prune costs what it deletes, not what is kept. Archived
ledger rows leave their chunk (the slot becomes None, a chunk with no rows left goes whole);
positions never move, so a row's ``seq`` and every cursor stay valid.

Each call yields once, up front, at a checkpoint where cancellation can land before anything
was read or changed; it then takes its accounts' locks (team before user when it touches both)
and runs the engine operation, which never awaits. No other operation on the account can run
in between, so every operation is atomic and isolated, and the locks are never held across a
yield, so they never queue.
"""

from __future__ import annotations

import heapq
from array import array
from bisect import bisect_left
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final, NamedTuple, TypeVar

from anyio.lowlevel import checkpoint

from ducto.errors import StoreError
from ducto.interface import _engine as E
from ducto.interface import _ledger as L
from ducto.interface import _retention as RT
from ducto.interface._front import Keys, StoreFront
from ducto.interface._locks import KeyedLocks
from ducto.interface.models import PlanDefinition, SetupResult, SpendCap, TeamMember

__all__ = ["MemoryStore"]

R = TypeVar("R")
T = TypeVar("T")

_NOWHERE, _LIVE, _EXPIRED = 0, 1, 2
_DAILY, _MONTHLY = "daily", "monthly"
_ALLOWANCE, _MEMBER, _TOP_UP = "allowance", "member", "top_up"
"""With the cap types, the kinds of window counter `prune` deletes once their window closed."""
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_CHUNK: Final = 4096
"""Ledger rows per sealed chunk (a tuple the garbage collector can stop tracking)."""
_COLLECTIONS: Final = (
    "accounts",
    "lots",
    "holds",
    "ledger",
    "idempotency",
    "allowance_used",
    "spend",
    "caps",
    "team_members",
    "member_spend",
    "pricing",
)
"""What `setup` reports having created, as the SQL stores name their tables."""


@dataclass(slots=True, eq=False)
class _Lot(L.Lot):
    place: int = _NOWHERE
    indexed: bool = False


class _Row(NamedTuple):
    # The ledger keeps rows as plain tuples of atomic values (built by `append_row`, read
    # through `_Row._make`), which the cyclic garbage collector stops tracking: a long history
    # costs memory but no collection time. A NamedTuple instance would stay tracked.
    id: str
    seq: int
    account: tuple[str, str]
    amount: int
    type: str
    balance_after: int
    metadata: tuple[tuple[str, Any], ...] | None
    created_at: datetime
    reservation_id: str | None = None
    idempotency_key: str | None = None
    draws: tuple[tuple[str, int], ...] | None = None
    spender: str | None = None
    model: str | None = None
    operation_type: str | None = None
    allowance: int = 0
    scope: str | None = None


@dataclass(slots=True, eq=False)
class _Account(E.Account):
    reserved_by_model: dict[str, int] = field(default_factory=dict)
    # Counted holds in a scope, by ``(model or None, scope)``.
    reserved_by_scope: dict[tuple[str | None, str], int] = field(default_factory=dict)
    reserved_by_member: dict[str, int] = field(default_factory=dict)
    holds: dict[str, E.Hold] = field(default_factory=dict)
    # A settled or released hold, as ``amount * 4 + state``: a dict of str to int is never
    # tracked by the garbage collector, however long the history.
    closed: dict[str, int] = field(default_factory=dict)
    closed_members: dict[str, str] = field(default_factory=dict)
    hold_heap: list[tuple[datetime, str]] = field(default_factory=list)
    lots: dict[str, _Lot] = field(default_factory=dict)
    live: list[tuple[datetime, int, _Lot]] = field(default_factory=list)
    expired: list[tuple[datetime, int, _Lot]] = field(default_factory=list)
    # A key's request fingerprint, its result as JSON (a string the collector ignores) and
    # when it was written.
    idem: dict[tuple[str, str], tuple[tuple[object, ...], str, datetime]] = field(
        default_factory=dict
    )
    rows: array[int] = field(default_factory=lambda: array("q"))
    # Positions in `rows` whose row was archived, dropped from the array once they are half
    # of it, so archiving a long history in chunks costs time in proportion to it.
    archived_rows: int = 0
    allowance_used: dict[int, int] = field(default_factory=dict)
    # Window spend by ``(cap type, window, model or None, scope or None)``.
    spend: dict[tuple[str, int, str | None, str | None], int] = field(default_factory=dict)
    caps: dict[tuple[str, str | None, str | None], SpendCap] = field(default_factory=dict)
    members: dict[str, E.Member] = field(default_factory=dict)
    member_spend: dict[tuple[str, int], int] = field(default_factory=dict)
    top_up: E.TopUpClaim | None = None
    top_ups: dict[int, int] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str]:
        return (self.kind, self.id)


class _Memory:
    """The engine's `Storage` on dicts, heaps and arrays."""

    def __init__(self, clock: Callable[[], datetime], retention: RT.Retention) -> None:
        self._clock = clock
        self._retention = retention
        self._ids = L.IdSource()
        self._users: dict[str, _Account] = {}
        self._teams: dict[str, _Account] = {}
        # The ledger: rows in order, sealed into chunks; accounts, ids and analytics refer to
        # rows by position, in arrays and int-valued dicts the garbage collector never walks.
        # An archived row leaves a None in its slot, and a chunk left with none at all becomes
        # None itself, so positions (and with them ``seq`` and cursors) never move.
        self._chunks: list[tuple[tuple[Any, ...] | None, ...] | None] = []
        self._tail: list[tuple[Any, ...] | None] = []
        self._row_count = 0
        self._rows_by_id: dict[str, int] = {}
        self._refunded: dict[str, list[int]] = {}
        self._spend_rows: array[int] = array("q")
        self._spend_archived = 0  # positions in `_spend_rows` whose row was archived
        # Whether rows were appended in time order (the clock never went back): then the rows
        # older than an archive cutoff are a prefix of what is kept and the search stops early.
        self._in_order = True
        self._last_at = _EPOCH
        self._seq = 0
        # What `prune` deletes, in the order it becomes due, as tuples of atomic values the
        # collector stops tracking: ``(written, n, kind, account, op, key)`` per idempotency
        # record and ``(expires_at, n, kind, account, hold)`` per hold nothing counts any
        # more. An entry whose record was replaced or deleted since is skipped when it comes
        # up. Nothing is indexed for a retention of for ever: it is never pruned.
        self._idem_due: list[tuple[datetime, int, str, str, str, str]] = []
        self._holds_due: list[tuple[datetime, int, str, str, str]] = []
        self._due_count = 0
        # The accounts with a counter in each window, as ``(counter, kind, window)`` to a dict
        # of account ids, so a prune of closed windows visits only the accounts that have one.
        self._windows: dict[tuple[str, str, int], dict[str, None]] = {}
        # What archiving kept: paid usage per (UTC day, user, model) as ``(net, count)``, the
        # archived row ids, and the latest cutoff.
        self._rollups: dict[RT.RollupKey, tuple[int, int]] = {}
        self._archived: dict[str, None] = {}
        self._horizon: datetime | None = None
        self._expiring: list[tuple[datetime, int, _Account, _Lot]] = []
        self._pricing: list[E.PricingVersion] = []
        self._pointer: tuple[int, datetime] | None = None

    def now(self) -> datetime:
        return L.read_clock(self._clock)

    def new_id(self, kind: str) -> str:
        return self._ids.next(kind)

    @property
    def retention(self) -> RT.Retention:
        return self._retention

    # -- accounts ----------------------------------------------------------------------------

    def account(self, kind: str, account_id: str) -> _Account | None:
        return (self._users if kind == E.USER else self._teams).get(account_id)

    def create(self, kind: str, account_id: str, now: datetime) -> _Account:
        acct = _Account(kind, account_id)
        (self._users if kind == E.USER else self._teams)[account_id] = acct
        return acct

    def save(self, acct: E.Account) -> None:
        return None  # the engine changed the account in place

    def lapse_holds(self, acct: E.Account, now: datetime) -> Sequence[E.Hold]:
        assert isinstance(acct, _Account)
        heap = acct.hold_heap
        if not heap or heap[0][0] > now:
            return ()
        lapsed = []
        while heap and heap[0][0] <= now:
            hold = acct.holds.get(heapq.heappop(heap)[1])
            if hold is not None and hold.counted:
                hold.counted = False
                lapsed.append(hold)
                self._hold_due(acct, hold)  # open, but nothing counts it any more
        return lapsed

    def lapse_lots(self, acct: E.Account, now: datetime) -> Sequence[int]:
        assert isinstance(acct, _Account)
        live = acct.live
        if not live or live[0][0] > now:
            return ()
        expired = []
        while live and live[0][0] <= now:
            lot = heapq.heappop(live)[2]
            lot.place = _NOWHERE
            if lot.remaining > 0:
                expired.append(lot.remaining)
                self._to_expired_heap(acct, lot)
        return expired

    # -- holds -------------------------------------------------------------------------------

    def hold(self, acct: E.Account, hold_id: str) -> E.Hold | None:
        assert isinstance(acct, _Account)
        hold = acct.holds.get(hold_id)
        if hold is not None:
            return hold
        closed = acct.closed.get(hold_id)
        if closed is None:
            return None
        return E.Hold(
            hold_id,
            closed >> 2,
            "",
            None,
            False,
            _EPOCH,
            member=acct.closed_members.get(hold_id),
            state=closed & 3,
            counted=False,
        )

    def add_hold(self, acct: E.Account, hold: E.Hold) -> None:
        assert isinstance(acct, _Account)
        if hold.state != L.HOLD_OPEN:
            self._record_closed(acct, hold, hold.state)
            return
        acct.holds[hold.id] = hold
        heap = acct.hold_heap
        if len(heap) > 64 and len(heap) > 2 * len(acct.holds):
            # Settled holds crowd the heap: rebuild it from the counted ones.
            heap[:] = [(h.expires_at, rid) for rid, h in acct.holds.items() if h.counted]
            heapq.heapify(heap)
        heapq.heappush(heap, (hold.expires_at, hold.id))

    def close_hold(self, acct: E.Account, hold: E.Hold, state: int) -> None:
        assert isinstance(acct, _Account)
        del acct.holds[hold.id]
        hold.state = state
        self._record_closed(acct, hold, state)

    def _record_closed(self, acct: _Account, hold: E.Hold, state: int) -> None:
        acct.closed[hold.id] = hold.amount * 4 + state
        if hold.member is not None:
            acct.closed_members[hold.id] = hold.member
        # The compact record has no expiry: index the hold for `prune` now.
        self._hold_due(acct, hold)

    def _hold_due(self, acct: _Account, hold: E.Hold) -> None:
        """Index a hold nothing counts any more by its expiry, for `prune`."""
        if self._retention.holds is not None:
            self._due_count += 1
            heapq.heappush(
                self._holds_due, (hold.expires_at, self._due_count, acct.kind, acct.id, hold.id)
            )

    def add_held(self, acct: E.Account, hold: E.Hold, delta: int) -> None:
        assert isinstance(acct, _Account)
        if hold.model is not None:
            _add(acct.reserved_by_model, hold.model, delta)
        if hold.scope is not None:
            _add(acct.reserved_by_scope, (None, hold.scope), delta)
            if hold.model is not None:
                _add(acct.reserved_by_scope, (hold.model, hold.scope), delta)
        if hold.member is not None:
            _add(acct.reserved_by_member, hold.member, delta)

    def held_for(self, acct: E.Account, model: str | None, scope: str | None) -> int:
        assert isinstance(acct, _Account)
        if scope is None:
            return acct.reserved_by_model.get(model, 0) if model is not None else acct.reserved
        return acct.reserved_by_scope.get((model, scope), 0)

    def held_by_member(self, team: E.Account, user_id: str) -> int:
        assert isinstance(team, _Account)
        return team.reserved_by_member.get(user_id, 0)

    # -- lots --------------------------------------------------------------------------------

    def live_lots(self, acct: E.Account) -> Iterator[L.Lot]:
        assert isinstance(acct, _Account)
        return _consume(acct.live)

    def expired_lots(self, acct: E.Account) -> Iterator[L.Lot]:
        assert isinstance(acct, _Account)
        return _consume(acct.expired)

    def lots_in_order(self, acct: E.Account) -> tuple[Sequence[L.Lot], Sequence[L.Lot]]:
        assert isinstance(acct, _Account)
        return tuple(  # type: ignore[return-value]
            [e[2] for e in sorted(heap, key=lambda e: e[:2]) if e[2].remaining > 0]
            for heap in (acct.live, acct.expired)
        )

    def lots_drawn(self, acct: E.Account, draws: Sequence[tuple[L.Lot, int]]) -> None:
        return None  # lots changed in place; emptied ones leave their heap lazily

    def add_lot(
        self, acct: E.Account, amount: int, expires_at: datetime | None, expired: bool
    ) -> None:
        assert isinstance(acct, _Account)
        self._seq += 1
        lot = _Lot(self._ids.next("lot"), self._seq, amount, expires_at)
        acct.lots[lot.id] = lot
        self._file(acct, lot, expired)

    def lot(self, acct: E.Account, lot_id: str) -> L.Lot:
        assert isinstance(acct, _Account)
        return acct.lots[lot_id]

    def lot_refilled(self, acct: E.Account, lot: L.Lot, expired: bool) -> None:
        assert isinstance(acct, _Account)
        assert isinstance(lot, _Lot)
        self._file(acct, lot, expired)

    def _file(self, acct: _Account, lot: _Lot, expired: bool) -> None:
        """File a lot with credits where its expiry says it belongs, and index its expiry."""
        if expired:
            self._to_expired_heap(acct, lot)
        elif lot.place != _LIVE:
            heapq.heappush(acct.live, (*L.lot_order(lot.expires_at, lot.seq), lot))
            lot.place = _LIVE
        if lot.expires_at is not None and not lot.indexed:
            heapq.heappush(self._expiring, (lot.expires_at, lot.seq, acct, lot))
            lot.indexed = True

    def _to_expired_heap(self, acct: _Account, lot: _Lot) -> None:
        if lot.place != _EXPIRED:
            assert lot.expires_at is not None
            heapq.heappush(acct.expired, (lot.expires_at, lot.seq, lot))
            lot.place = _EXPIRED

    def sweep_due(self, now: datetime, consume: bool) -> list[tuple[str, str, L.Lot]]:
        if consume:
            due = []
            while self._expiring and self._expiring[0][0] <= now:
                entry = heapq.heappop(self._expiring)
                entry[3].indexed = False
                due.append(entry)
        else:
            due = [entry for entry in self._expiring if entry[0] <= now]
        due.sort(key=lambda e: (e[2].key, e[3].seq))
        return [(e[2].kind, e[2].id, e[3]) for e in due if e[3].remaining > 0]

    # -- ledger ------------------------------------------------------------------------------

    def append_row(
        self,
        acct: E.Account,
        amount: int,
        type_: str,
        metadata: dict[str, Any],
        now: datetime,
        *,
        reservation_id: str | None = None,
        idempotency_key: str | None = None,
        draws: tuple[tuple[str, int], ...] | None = None,
        spender: str | None = None,
        model: str | None = None,
        operation_type: str | None = None,
        allowance: int = 0,
        scope: str | None = None,
    ) -> str:
        assert isinstance(acct, _Account)
        position = self._row_count
        row_id = self._ids.next("tx")
        if now < self._last_at:
            self._in_order = False
        self._last_at = now
        row = (
            row_id,
            position,
            acct.key,
            amount,
            type_,
            acct.balance,
            # Items, not the dict: a tuple holding a dict can never be untracked.
            tuple(metadata.items()) if metadata else None,
            now,
            reservation_id,
            idempotency_key,
            draws,
            spender,
            model,
            operation_type,
            allowance,
            scope,
        )
        self._tail.append(row)
        self._row_count += 1
        if len(self._tail) == _CHUNK:
            self._chunks.append(tuple(self._tail))
            self._tail = []
        acct.rows.append(position)
        self._rows_by_id[row_id] = position
        if spender is not None:
            self._spend_rows.append(position)
        return row_id

    def _raw(self, position: int) -> tuple[Any, ...] | None:
        """The row at `position` as stored, or None once it was archived."""
        chunk, offset = divmod(position, _CHUNK)
        if chunk < len(self._chunks):
            sealed = self._chunks[chunk]
            return None if sealed is None else sealed[offset]
        return self._tail[offset]

    def _row(self, position: int) -> _Row | None:
        raw = self._raw(position)
        return None if raw is None else _Row._make(raw)

    def refund_keys(self, transaction_id: str) -> Keys:
        """The accounts a refund of the row touches: its account and the spender's."""
        position = self._rows_by_id.get(transaction_id)
        row = None if position is None else self._row(position)
        if row is None:
            return ()
        return (row.account, (E.USER, row.spender or row.account[1]))

    def debit(self, transaction_id: str) -> E.Debit | None:
        position = self._rows_by_id.get(transaction_id)
        row = None if position is None else self._row(position)
        if row is None:
            return None
        return E.Debit(
            row.id,
            row.account[0],
            row.account[1],
            row.amount,
            row.type,
            row.created_at,
            row.draws or (),
            self._refunded.get(row.id),
            row.spender,
            row.model,
            row.scope,
        )

    def set_refunds(self, debit: E.Debit, refunds: list[int]) -> None:
        self._refunded[debit.id] = refunds

    def _refund_total(self, row_id: str) -> int:
        refunds = self._refunded.get(row_id)
        return refunds[0] if refunds else 0

    def page(
        self,
        kind: str,
        account_id: str,
        limit: int,
        before: int | None,
        types: frozenset[str] | None,
        start: datetime | None,
        end: datetime | None,
    ) -> tuple[list[E.StoredRow], bool]:
        acct = self.account(kind, account_id)
        if acct is None:
            return [], False
        rows = acct.rows
        index = len(rows) if before is None else bisect_left(rows, before)
        picked: list[E.StoredRow] = []
        while index > 0:
            index -= 1
            row = self._row(rows[index])
            if row is None or (types is not None and row.type not in types):
                continue
            if (start is not None and row.created_at < start) or (
                end is not None and row.created_at >= end
            ):
                continue
            if len(picked) == limit:
                return picked, True
            picked.append(self._stored(row))
        return picked, False

    def _stored(self, row: _Row) -> E.StoredRow:
        return E.StoredRow(
            row.seq,
            row.id,
            row.account[0],
            row.account[1],
            row.amount,
            row.type,
            row.balance_after,
            dict(row.metadata or ()),
            row.created_at,
            row.reservation_id,
            row.idempotency_key,
            self._refund_total(row.id),
            row.spender,
            row.model,
            row.operation_type,
            row.allowance,
            row.scope,
        )

    def spend_events(self, start: datetime, end: datetime) -> list[L.SpendEvent]:
        events = []
        for position in self._spend_rows:
            row = self._row(position)
            if row is not None and start <= row.created_at < end:
                events.append(
                    L.SpendEvent(
                        row.spender or row.account[1],
                        row.model or L.UNKNOWN_MODEL,
                        row.created_at,
                        -row.amount - self._refund_total(row.id),
                        1,
                        row.scope,
                    )
                )
        if self._rollups:
            # Rollups stand at their day's UTC midnight: the days whose midnight is in range.
            first, stop = _first_midnight(start), _first_midnight(end)
            events += RT.rollup_events(
                (day, user, model, scope, net, count)
                for (day, user, model, scope), (net, count) in self._rollups.items()
                if first <= day < stop
            )
        return events

    # -- growth: archiving -------------------------------------------------------------------

    def archive_candidates(self, before: datetime, after: int, limit: int) -> list[E.StoredRow]:
        """
        The next rows older than `before` after position `after`, scanning forward.

        Archived chunks are skipped whole. While rows were appended in time order the scan
        stops at the first row not older than `before`; after the clock went back it reads
        on to the end of the ledger.
        """
        picked: list[E.StoredRow] = []
        position = max(after + 1, 0)
        sealed = len(self._chunks)
        while position < self._row_count:
            index, offset = divmod(position, _CHUNK)
            chunk = self._chunks[index] if index < sealed else self._tail
            position = (index + 1) * _CHUNK
            if chunk is None:
                continue
            for raw in chunk[offset:] if offset else chunk:
                if raw is None:
                    continue
                if raw[7] < before:
                    picked.append(self._stored(_Row._make(raw)))
                    if len(picked) == limit:
                        return picked
                elif self._in_order:
                    return picked
        return picked

    def archive(
        self,
        rows: Sequence[E.StoredRow],
        totals: Mapping[RT.RollupKey, list[int]],
        before: datetime,
    ) -> None:
        # Every row is checked before anything changes: a refund since they were read (or a
        # row already gone) leaves the store as it was.
        positions = set()
        for stored in rows:
            position = self._rows_by_id.get(stored.id)
            if position is None or self._refund_total(stored.id) != stored.refunded:
                raise E.ArchiveChanged(f"ledger row {stored.id} changed since it was read")
            positions.add(position)
        emptied: dict[int, list[int]] = {}
        per_account: dict[tuple[str, str], int] = {}
        for position in positions:
            raw = self._raw(position)
            assert raw is not None
            row_id, account = raw[0], raw[2]
            del self._rows_by_id[row_id]
            self._refunded.pop(row_id, None)
            self._archived[row_id] = None
            per_account[account] = per_account.get(account, 0) + 1
            if raw[11] is not None:
                self._spend_archived += 1
            chunk, offset = divmod(position, _CHUNK)
            emptied.setdefault(chunk, []).append(offset)
        for chunk, offsets in emptied.items():
            if chunk < len(self._chunks):
                sealed = self._chunks[chunk]
                assert sealed is not None
                slots = list(sealed)
                for offset in offsets:
                    slots[offset] = None
                # A new tuple without the rows releases them; a chunk with no row left goes.
                self._chunks[chunk] = (
                    tuple(slots) if any(slot is not None for slot in slots) else None
                )
            else:
                for offset in offsets:
                    self._tail[offset] = None
        for key, count in per_account.items():
            acct = self.account(*key)
            assert acct is not None
            acct.archived_rows += count
            if 2 * acct.archived_rows >= len(acct.rows):
                acct.rows = self._kept(acct.rows)
                acct.archived_rows = 0
        if 2 * self._spend_archived >= len(self._spend_rows):
            self._spend_rows = self._kept(self._spend_rows)
            self._spend_archived = 0
        rollups = self._rollups
        for rollup, (net, count) in totals.items():
            old = rollups.get(rollup)
            rollups[rollup] = (net, count) if old is None else (old[0] + net, old[1] + count)
        if self._horizon is None or before > self._horizon:
            self._horizon = before

    def _kept(self, positions: array[int]) -> array[int]:
        """The positions whose row was not archived."""
        return array("q", [p for p in positions if self._raw(p) is not None])

    def archived(self, transaction_id: str) -> bool:
        return transaction_id in self._archived

    def archived_before(self) -> datetime | None:
        return self._horizon

    # -- growth: prune -----------------------------------------------------------------------

    def prune(self, kind: RT.PruneKind, cutoff: datetime, limit: int, dry_run: bool) -> int:
        if kind == "idempotency":
            return self._prune_idempotency(cutoff, limit, dry_run)
        if kind == "holds":
            return self._prune_holds(cutoff, limit, dry_run)
        return self._prune_windows(cutoff, limit, dry_run)

    def _idem_current(self, entry: tuple[datetime, int, str, str, str, str]) -> _Account | None:
        """The account whose record `entry` indexes, if that record is still the one stored."""
        acct = self.account(entry[2], entry[3])
        if acct is None:
            return None
        record = acct.idem.get((entry[4], entry[5]))
        return acct if record is not None and record[2] == entry[0] else None

    def _prune_idempotency(self, cutoff: datetime, limit: int, dry_run: bool) -> int:
        due = self._idem_due
        if dry_run:
            # A record may be indexed twice at the same instant (rewritten after the clock
            # went back): count records, not entries.
            return len({e[2:] for e in due if e[0] < cutoff and self._idem_current(e) is not None})
        done = 0
        while due and done < limit and due[0][0] < cutoff:
            entry = heapq.heappop(due)
            acct = self._idem_current(entry)
            if acct is not None:
                del acct.idem[entry[4], entry[5]]
                done += 1
        return done

    def _hold_finished(self, entry: tuple[datetime, int, str, str, str]) -> _Account | None:
        """The account still keeping the finished hold `entry` indexes, if any."""
        acct = self.account(entry[2], entry[3])
        if acct is None:
            return None
        hold_id = entry[4]
        if hold_id in acct.closed:
            return acct
        hold = acct.holds.get(hold_id)
        return acct if hold is not None and not hold.counted else None

    def _prune_holds(self, cutoff: datetime, limit: int, dry_run: bool) -> int:
        due = self._holds_due
        if dry_run:
            # A hold that lapsed and was closed later is indexed twice.
            return len({e[2:] for e in due if e[0] < cutoff and self._hold_finished(e) is not None})
        done = 0
        while due and done < limit and due[0][0] < cutoff:
            entry = heapq.heappop(due)
            acct = self._hold_finished(entry)
            if acct is None:
                continue
            hold_id = entry[4]
            if acct.closed.pop(hold_id, None) is not None:
                acct.closed_members.pop(hold_id, None)
            else:
                del acct.holds[hold_id]  # open but lapsed: nothing counts it
            done += 1
        return done

    def _prune_windows(self, now: datetime, limit: int, dry_run: bool) -> int:
        day, month = RT.window_keys(now)
        closed = sorted(
            key for key in self._windows if key[2] < (day if key[0] == _DAILY else month)
        )
        done = 0
        for key in closed:
            group = self._windows[key]
            for account_id in list(group):
                table, entries = self._window_entries(key, account_id)
                if dry_run:
                    done += len(entries)
                    continue
                taken = entries[: limit - done]
                for entry in taken:
                    del table[entry]
                done += len(taken)
                if len(taken) < len(entries):
                    return done  # the limit: the rest goes in the next chunk
                del group[account_id]
            if not dry_run:
                del self._windows[key]
        return done

    def _window_entries(
        self, key: tuple[str, str, int], account_id: str
    ) -> tuple[dict[Any, int], list[Any]]:
        """An account's counters of one closed window: their table, and their keys in it."""
        counter, kind, window = key
        acct = self.account(kind, account_id)
        if acct is None:
            return {}, []
        if counter == _ALLOWANCE:
            table: dict[Any, int] = acct.allowance_used
            return table, [window] if window in table else []
        if counter == _MEMBER:
            table = acct.member_spend
            return table, [k for k in table if k[1] == window]
        if counter == _TOP_UP:
            table = acct.top_ups
            return table, [window] if window in table else []
        table = acct.spend
        return table, [k for k in table if k[0] == counter and k[1] == window]

    def _window_counted(self, counter: str, kind: str, window: int, account_id: str) -> None:
        """Note that the account has a counter in the window (for `prune`)."""
        key = (counter, kind, window)
        group = self._windows.get(key)
        if group is None:
            group = self._windows[key] = {}
        group[account_id] = None

    # -- idempotency -------------------------------------------------------------------------

    def recall(
        self,
        acct: E.Account,
        op: str,
        key: str,
        fingerprint: tuple[object, ...],
        result_type: type[T],
        since: datetime | None,
    ) -> tuple[bool, T | None]:
        assert isinstance(acct, _Account)
        entry = acct.idem.get((op, key))
        if entry is None or (since is not None and entry[2] < since):
            return False, None  # never used, or past retention (pruned or not)
        if entry[0] != fingerprint:
            return True, None
        result = result_type.model_validate_json(entry[1])  # type: ignore[attr-defined]
        result.idempotent = True
        return True, result

    def remember(
        self, acct: E.Account, op: str, key: str, fingerprint: tuple[object, ...], result: Any
    ) -> None:
        assert isinstance(acct, _Account)
        now = self.now()
        # Replaces a record past retention; `prune` skips the old one's index entry, whose
        # time no longer matches.
        old = acct.idem.get((op, key))
        acct.idem[(op, key)] = (fingerprint, result.model_dump_json(), now)
        if self._retention.idempotency is not None and (old is None or old[2] != now):
            self._due_count += 1
            heapq.heappush(self._idem_due, (now, self._due_count, acct.kind, acct.id, op, key))

    # -- plans and allowance -----------------------------------------------------------------

    def plan(self, plan_id: str, version: int | None) -> PlanDefinition | None:
        item = None if version is None else self.pricing(version)
        if item is None or not item.config.plans:
            return None
        return item.config.plans.get(plan_id)

    def allowance_used(self, acct: E.Account, month: int) -> int:
        assert isinstance(acct, _Account)
        return acct.allowance_used.get(month, 0)

    def use_allowance(self, acct: E.Account, month: int, amount: int) -> None:
        assert isinstance(acct, _Account)
        acct.allowance_used[month] = acct.allowance_used.get(month, 0) + amount
        self._window_counted(_ALLOWANCE, acct.kind, month, acct.id)

    # -- caps and spend windows --------------------------------------------------------------

    def caps(self, acct: E.Account) -> Collection[SpendCap]:
        assert isinstance(acct, _Account)
        return acct.caps.values()

    def put_cap(self, acct: E.Account, cap: SpendCap) -> None:
        assert isinstance(acct, _Account)
        acct.caps[(cap.cap_type, cap.model, cap.scope)] = cap

    def remove_cap(
        self, acct: E.Account, cap_type: str, model: str | None, scope: str | None
    ) -> bool:
        assert isinstance(acct, _Account)
        return acct.caps.pop((cap_type, model, scope), None) is not None

    def window_spend(
        self, user_id: str, cap_type: str, window: int, model: str | None, scope: str | None
    ) -> int:
        acct = self._users.get(user_id)
        return 0 if acct is None else acct.spend.get((cap_type, window, model, scope), 0)

    def add_spend(
        self, user_id: str, model: str | None, scope: str | None, at: datetime, amount: int
    ) -> None:
        acct = self._users.get(user_id) or self.create(E.USER, user_id, at)
        spend = acct.spend
        for cap_type in (_DAILY, _MONTHLY):
            window = L.cap_window_key(cap_type, at)
            # A counter back at zero stays, as in the SQL stores, until its window is pruned.
            for scoped in (None, scope) if scope is not None else (None,):
                _count(spend, (cap_type, window, None, scoped), amount)
                if model is not None:
                    _count(spend, (cap_type, window, model, scoped), amount)
            self._window_counted(cap_type, E.USER, window, user_id)

    # -- auto top-up -------------------------------------------------------------------------

    def top_up_claim(self, acct: E.Account) -> E.TopUpClaim | None:
        assert isinstance(acct, _Account)
        return acct.top_up

    def put_top_up_claim(self, acct: E.Account, claim: E.TopUpClaim | None) -> None:
        assert isinstance(acct, _Account)
        acct.top_up = claim

    def top_up_total(self, acct: E.Account, month: int) -> int:
        assert isinstance(acct, _Account)
        return acct.top_ups.get(month, 0)

    def add_top_up_total(self, acct: E.Account, month: int, delta: int) -> None:
        assert isinstance(acct, _Account)
        _count(acct.top_ups, month, delta)
        self._window_counted(_TOP_UP, acct.kind, month, acct.id)

    # -- teams -------------------------------------------------------------------------------

    def member(self, team: E.Account, user_id: str) -> E.Member | None:
        assert isinstance(team, _Account)
        return team.members.get(user_id)

    def put_member(self, team: E.Account, user_id: str, member: E.Member) -> None:
        assert isinstance(team, _Account)
        team.members[user_id] = member

    def remove_member(self, team: E.Account, user_id: str) -> bool:
        assert isinstance(team, _Account)
        return team.members.pop(user_id, None) is not None

    def members(self, team: E.Account, month: int) -> list[TeamMember]:
        assert isinstance(team, _Account)
        return [
            TeamMember(
                user_id=user_id,
                role=m.role,
                spend_cap=m.spend_cap,
                total_spent=team.member_spend.get((user_id, month), 0),
            )
            for user_id, m in sorted(team.members.items())
        ]

    def member_count(self, team: E.Account) -> int:
        assert isinstance(team, _Account)
        return len(team.members)

    def member_spend(self, team: E.Account, user_id: str, month: int) -> int:
        assert isinstance(team, _Account)
        return team.member_spend.get((user_id, month), 0)

    def add_member_spend(self, team: E.Account, user_id: str, month: int, amount: int) -> None:
        assert isinstance(team, _Account)
        _count(team.member_spend, (user_id, month), amount)
        self._window_counted(_MEMBER, team.kind, month, team.id)

    # -- pricing -----------------------------------------------------------------------------

    def pricing_state(self) -> E.PricingState:
        pointer = self._pointer
        since = None if pointer is None else pointer[1]
        scheduled = [
            (item.effective_at, item.version)
            for item in self._pricing
            if item.cancelled_at is None and (since is None or item.effective_at > since)
        ]
        if pointer is None:
            return E.PricingState(None, None, scheduled)
        return E.PricingState(pointer[0], pointer[1], scheduled)

    def set_pricing_pointer(self, version: int, at: datetime) -> None:
        self._pointer = (version, at)

    def cancel_pricing(self, version: int, at: datetime) -> None:
        self._pricing[version - 1] = self._pricing[version - 1]._replace(cancelled_at=at)

    def pricing(self, version: int) -> E.PricingVersion | None:
        return self._pricing[version - 1] if version <= len(self._pricing) else None

    def pricing_history(self) -> list[E.PricingVersion]:
        return self._pricing[::-1]

    def add_pricing(self, item: E.PricingVersion) -> None:
        self._pricing.append(item)

    def last_pricing_version(self) -> int:
        return len(self._pricing)


def _add(table: dict[Any, int], key: object, delta: int) -> None:
    """Add `delta` to ``table[key]``, dropping the entry when it reaches zero."""
    value = table.get(key, 0) + delta
    if value:
        table[key] = value
    else:
        table.pop(key, None)


def _count(table: dict[Any, int], key: object, delta: int) -> None:
    """Add `delta` to ``table[key]`` (a window counter: kept at zero, like a SQL row)."""
    table[key] = table.get(key, 0) + delta


def _first_midnight(moment: datetime) -> int:
    """The first UTC day (as an ordinal) whose midnight is at or after `moment`."""
    moment = moment.astimezone(UTC)
    past_midnight = moment.hour or moment.minute or moment.second or moment.microsecond
    return moment.toordinal() + (1 if past_midnight else 0)


def _consume(heap: list[tuple[datetime, int, _Lot]]) -> Iterator[L.Lot]:
    """
    The heap's lots with credits, in order, for a draw.

    A lot stays on top until its consumer has emptied it (then it leaves the heap); a draw
    stops at the first lot it does not empty, so no lot is yielded twice.
    """
    while heap:
        lot = heap[0][2]
        if lot.remaining > 0:
            yield lot
        if lot.remaining == 0:
            heapq.heappop(heap)
            lot.place = _NOWHERE


class MemoryStore(StoreFront):
    """
    The complete store contract in memory, safe under heavy concurrency on one event loop.

    Args:
        clock: Returns the current aware UTC datetime; tests pass a controllable one.
            Nothing else in the store reads the wall clock.
        idempotency_retention: How long an idempotency key replays after it was first used
            (a timedelta, or seconds as int or float; None keeps keys for ever). Past it the
            key is a new request, and `prune` deletes the record.
        hold_retention: How long a finished hold (settled, released or lapsed) is kept after
            its expiry time before `prune` deletes it (as above; None keeps holds for ever).
    """

    def __init__(
        self,
        *,
        clock: Callable[[], datetime] | None = None,
        idempotency_retention: timedelta | float | None = RT.DEFAULT_RETENTION,
        hold_retention: timedelta | float | None = RT.DEFAULT_RETENTION,
    ) -> None:
        retention = RT.Retention.of(idempotency_retention, hold_retention)
        self._st = _Memory(clock or L.utc_now, retention)
        self._locks = KeyedLocks()
        self._closed = False
        self._set_up = False

    def _ensure_open(self) -> None:
        if self._closed:
            raise StoreError("the store is closed")

    async def open(self) -> None:
        """Nothing to open; a closed store cannot be reopened."""
        self._ensure_open()

    async def aclose(self) -> None:
        """Close the store; later calls raise `StoreError`. The data is dropped."""
        self._closed = True

    async def setup(self, database_url: str | None = None) -> SetupResult:
        """Create the in-memory tables (the first call reports them; later ones nothing)."""
        self._ensure_open()
        await checkpoint()
        created = [] if self._set_up else list(_COLLECTIONS)
        self._set_up = True
        return SetupResult(tables_created=created, schema_version=1)

    async def _run(self, op: Callable[..., R], keys: Keys, *args: Any, write: bool = True) -> R:
        self._ensure_open()
        if keys:
            async with self._locks.hold(*keys):
                return op(self._st, *args)
        await checkpoint()
        return op(self._st, *args)

    async def _refund_keys(self, transaction_id: str) -> Keys:
        self._ensure_open()
        return self._st.refund_keys(transaction_id)
