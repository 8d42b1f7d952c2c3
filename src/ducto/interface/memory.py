"""
`MemoryStore`: the whole contract in process memory.

For tests and single-process deployments. The operations are the engine's (`_engine`); this
module is where their data lives and how they run. Every per-operation lookup is a dict access
or a heap operation, so the cost of a call does not grow with users, history or open holds;
only analytics and sweeps scan.

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
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, NamedTuple, TypeVar

from anyio.lowlevel import checkpoint

from ducto.errors import StoreError
from ducto.interface import _engine as E
from ducto.interface import _ledger as L
from ducto.interface._front import Keys, StoreFront
from ducto.interface._locks import KeyedLocks
from ducto.interface.models import PlanDefinition, SetupResult, SpendCap, TeamMember

__all__ = ["MemoryStore"]

R = TypeVar("R")
T = TypeVar("T")

_NOWHERE, _LIVE, _EXPIRED = 0, 1, 2
_DAILY, _MONTHLY = "daily", "monthly"
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


@dataclass(slots=True, eq=False)
class _Account(E.Account):
    reserved_by_model: dict[str, int] = field(default_factory=dict)
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
    # A key's request fingerprint and its result as JSON (strings the collector ignores).
    idem: dict[tuple[str, str], tuple[tuple[object, ...], str]] = field(default_factory=dict)
    rows: array[int] = field(default_factory=lambda: array("q"))
    allowance_used: dict[int, int] = field(default_factory=dict)
    spend: dict[tuple[str, int, str | None], int] = field(default_factory=dict)
    caps: dict[tuple[str, str | None], SpendCap] = field(default_factory=dict)
    members: dict[str, E.Member] = field(default_factory=dict)
    member_spend: dict[tuple[str, int], int] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str]:
        return (self.kind, self.id)


class _Memory:
    """The engine's `Storage` on dicts, heaps and arrays."""

    def __init__(self, clock: Callable[[], datetime]) -> None:
        self._clock = clock
        self._ids = L.IdSource()
        self._users: dict[str, _Account] = {}
        self._teams: dict[str, _Account] = {}
        # The ledger: rows in order, sealed into chunks; accounts, ids and analytics refer to
        # rows by position, in arrays and int-valued dicts the garbage collector never walks.
        self._chunks: list[tuple[tuple[Any, ...], ...]] = []
        self._tail: list[tuple[Any, ...]] = []
        self._row_count = 0
        self._rows_by_id: dict[str, int] = {}
        self._refunded: dict[str, list[int]] = {}
        self._spend_rows: array[int] = array("q")
        self._seq = 0
        self._expiring: list[tuple[datetime, int, _Account, _Lot]] = []
        self._pricing: list[E.PricingVersion] = []
        self._active_version: int | None = None

    def now(self) -> datetime:
        return L.read_clock(self._clock)

    def new_id(self, kind: str) -> str:
        return self._ids.next(kind)

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

    def add_held(self, acct: E.Account, hold: E.Hold, delta: int) -> None:
        assert isinstance(acct, _Account)
        if hold.model is not None:
            _add(acct.reserved_by_model, hold.model, delta)
        if hold.member is not None:
            _add(acct.reserved_by_member, hold.member, delta)

    def held_for(self, acct: E.Account, model: str) -> int:
        assert isinstance(acct, _Account)
        return acct.reserved_by_model.get(model, 0)

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
    ) -> str:
        assert isinstance(acct, _Account)
        position = self._row_count
        row_id = self._ids.next("tx")
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

    def _row(self, position: int) -> _Row:
        chunk, offset = divmod(position, _CHUNK)
        if chunk < len(self._chunks):
            return _Row._make(self._chunks[chunk][offset])
        return _Row._make(self._tail[offset])

    def refund_keys(self, transaction_id: str) -> Keys:
        """The accounts a refund of the row touches: its account and the spender's."""
        position = self._rows_by_id.get(transaction_id)
        if position is None:
            return ()
        row = self._row(position)
        return (row.account, (E.USER, row.spender or row.account[1]))

    def debit(self, transaction_id: str) -> E.Debit | None:
        position = self._rows_by_id.get(transaction_id)
        if position is None:
            return None
        row = self._row(position)
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
            if types is not None and row.type not in types:
                continue
            if (start is not None and row.created_at < start) or (
                end is not None and row.created_at >= end
            ):
                continue
            if len(picked) == limit:
                return picked, True
            picked.append(
                E.StoredRow(
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
                )
            )
        return picked, False

    def spend_events(self, start: datetime, end: datetime) -> list[L.SpendEvent]:
        events = []
        for position in self._spend_rows:
            row = self._row(position)
            if start <= row.created_at < end:
                events.append(
                    L.SpendEvent(
                        row.spender or row.account[1],
                        row.model or L.UNKNOWN_MODEL,
                        row.created_at,
                        -row.amount - self._refund_total(row.id),
                    )
                )
        return events

    # -- idempotency -------------------------------------------------------------------------

    def recall(
        self,
        acct: E.Account,
        op: str,
        key: str,
        fingerprint: tuple[object, ...],
        result_type: type[T],
    ) -> tuple[bool, T | None]:
        assert isinstance(acct, _Account)
        entry = acct.idem.get((op, key))
        if entry is None:
            return False, None
        if entry[0] != fingerprint:
            return True, None
        result = result_type.model_validate_json(entry[1])  # type: ignore[attr-defined]
        result.idempotent = True
        return True, result

    def remember(
        self, acct: E.Account, op: str, key: str, fingerprint: tuple[object, ...], result: Any
    ) -> None:
        assert isinstance(acct, _Account)
        acct.idem[(op, key)] = (fingerprint, result.model_dump_json())

    # -- plans and allowance -----------------------------------------------------------------

    def plan(self, plan_id: str) -> PlanDefinition | None:
        active = self.active_pricing()
        if active is None or not active.config.plans:
            return None
        return active.config.plans.get(plan_id)

    def allowance_used(self, acct: E.Account, month: int) -> int:
        assert isinstance(acct, _Account)
        return acct.allowance_used.get(month, 0)

    def use_allowance(self, acct: E.Account, month: int, amount: int) -> None:
        assert isinstance(acct, _Account)
        acct.allowance_used[month] = acct.allowance_used.get(month, 0) + amount

    # -- caps and spend windows --------------------------------------------------------------

    def caps(self, acct: E.Account) -> Collection[SpendCap]:
        assert isinstance(acct, _Account)
        return acct.caps.values()

    def put_cap(self, acct: E.Account, cap: SpendCap) -> None:
        assert isinstance(acct, _Account)
        acct.caps[(cap.cap_type, cap.model)] = cap

    def remove_cap(self, acct: E.Account, cap_type: str, model: str | None) -> bool:
        assert isinstance(acct, _Account)
        return acct.caps.pop((cap_type, model), None) is not None

    def window_spend(self, user_id: str, cap_type: str, window: int, model: str | None) -> int:
        acct = self._users.get(user_id)
        return 0 if acct is None else acct.spend.get((cap_type, window, model), 0)

    def add_spend(self, user_id: str, model: str | None, at: datetime, amount: int) -> None:
        acct = self._users.get(user_id) or self.create(E.USER, user_id, at)
        spend = acct.spend
        for cap_type in (_DAILY, _MONTHLY):
            window = L.cap_window_key(cap_type, at)
            _add(spend, (cap_type, window, None), amount)
            if model is not None:
                _add(spend, (cap_type, window, model), amount)

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
        _add(team.member_spend, (user_id, month), amount)

    # -- pricing -----------------------------------------------------------------------------

    def active_pricing(self) -> E.PricingVersion | None:
        version = self._active_version
        return None if version is None else self._pricing[version - 1]

    def active_version(self) -> int | None:
        return self._active_version

    def pricing(self, version: int) -> E.PricingVersion | None:
        return self._pricing[version - 1] if version <= len(self._pricing) else None

    def pricing_history(self) -> list[E.PricingVersion]:
        return self._pricing[::-1]

    def add_pricing(self, item: E.PricingVersion) -> None:
        self._pricing.append(item)

    def last_pricing_version(self) -> int:
        return len(self._pricing)

    def activate(self, version: int) -> None:
        self._active_version = version


def _add(table: dict[Any, int], key: object, delta: int) -> None:
    """Add `delta` to ``table[key]``, dropping the entry when it reaches zero."""
    value = table.get(key, 0) + delta
    if value:
        table[key] = value
    else:
        table.pop(key, None)


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
    """

    def __init__(self, *, clock: Callable[[], datetime] | None = None) -> None:
        self._st = _Memory(clock or L.utc_now)
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
