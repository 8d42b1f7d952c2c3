"""
`MemoryStore`: the whole contract in process memory.

For tests and single-process deployments. Every per-operation lookup is a dict access or a
heap operation, so the cost of a call does not grow with users, history or open holds; only
analytics and sweeps scan.

Each operation yields once, up front, at a checkpoint where cancellation can land before
anything was read or changed; it then takes its account's lock (team before user when it
touches both) and reads, decides and writes without awaiting again. No other operation on the
account can run in between, so every operation is atomic and isolated, and under heavy
concurrency the locks are never held across a yield, so they never queue.
"""

from __future__ import annotations

import heapq
from array import array
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, Literal, NamedTuple, Self

import anyio
from anyio.lowlevel import checkpoint

from ducto.errors import ErrorCode, InvalidArgumentError, PricingVersionNotFoundError, StoreError
from ducto.interface import _ledger as L
from ducto.interface._locks import KeyedLocks
from ducto.interface.models import (
    AddCreditsResult,
    AddTeamMemberResult,
    AggregateStatsRow,
    AllowanceResult,
    BalanceResult,
    CapCheckResult,
    CheckFeatureResult,
    CreateTeamResult,
    CreditLot,
    CreditMetadata,
    DailySpendRow,
    DeductionResult,
    GetUserPlanResult,
    PlanDefinition,
    PricingConfigData,
    PricingConfigHistoryItem,
    PricingConfigResult,
    RefundResult,
    ReleaseResult,
    RemoveSpendCapResult,
    RemoveTeamMemberResult,
    ReserveResult,
    SetupResult,
    SetUserPlanResult,
    SpendByModelRow,
    SpendByUserRow,
    SpendCap,
    SweepResult,
    TeamBalanceResult,
    TeamDeductionResult,
    TeamMember,
    TeamTopupResult,
    TopUserRow,
    TransactionPage,
    TransactionRow,
)

__all__ = ["MemoryStore"]

_SETTLED, _RELEASED = L.HOLD_SETTLED, L.HOLD_RELEASED
_NOWHERE, _LIVE, _EXPIRED = 0, 1, 2
_DAILY, _MONTHLY = "daily", "monthly"
_NO_METADATA: dict[str, Any] = {}
_CHUNK = 4096
"""Ledger rows per sealed chunk (a tuple the garbage collector can stop tracking)."""


@dataclass(slots=True, eq=False)
class _Lot(L.Lot):
    place: int = _NOWHERE
    indexed: bool = False


@dataclass(slots=True, eq=False)
class _Hold:
    """An open hold: active, or past its TTL but neither settled nor released."""

    amount: int
    operation_type: str
    model: str | None
    use_allowance: bool
    expires_at: datetime
    counted: bool = True


class _Row(NamedTuple):
    # The ledger keeps rows as plain tuples of atomic values (built by `_append_row`, read
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
class _Member:
    role: str
    spend_cap: int | None


@dataclass(slots=True, eq=False)
class _Account:
    kind: str
    id: str
    balance: int = 0
    lifetime_purchased: int = 0
    reserved: int = 0
    expired_unswept: int = 0
    reserved_by_model: dict[str, int] = field(default_factory=dict)
    holds: dict[str, _Hold] = field(default_factory=dict)
    # A settled or released hold, as ``amount * 4 + state``: a dict of str to int is never
    # tracked by the garbage collector, however long the history.
    closed: dict[str, int] = field(default_factory=dict)
    hold_heap: list[tuple[datetime, str]] = field(default_factory=list)
    lots: dict[str, _Lot] = field(default_factory=dict)
    live: list[tuple[datetime, int, _Lot]] = field(default_factory=list)
    expired: list[tuple[datetime, int, _Lot]] = field(default_factory=list)
    idem: dict[tuple[str, str], tuple[tuple[object, ...], type[Any], str]] = field(
        default_factory=dict
    )
    rows: array[int] = field(default_factory=lambda: array("q"))
    allowance_used: dict[int, int] = field(default_factory=dict)
    spend: dict[tuple[str, int, str | None], int] = field(default_factory=dict)
    caps: dict[tuple[str, str | None], SpendCap] = field(default_factory=dict)
    plan_id: str | None = None
    # teams only
    name: str = ""
    members: dict[str, _Member] = field(default_factory=dict)
    member_spend: dict[tuple[str, int], int] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str]:
        return (self.kind, self.id)


@dataclass(slots=True, eq=False)
class _PricingVersion:
    id: str
    version: int
    config: PricingConfigData
    label: str | None
    created_at: datetime


class MemoryStore:
    """
    The complete store contract in memory, safe under heavy concurrency on one event loop.

    Args:
        clock: Returns the current aware UTC datetime; tests pass a controllable one.
            Nothing else in the store reads the wall clock.
    """

    def __init__(self, *, clock: Callable[[], datetime] | None = None) -> None:
        self._clock: Callable[[], datetime] = clock or L.utc_now
        self._ids = L.IdSource()
        self._locks = KeyedLocks()
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
        self._sweep_backlog: list[tuple[datetime, int, _Account, _Lot]] = []
        self._sweep_lock: anyio.Lock | None = None
        self._pricing: list[_PricingVersion] = []
        self._active_version: int | None = None
        self._closed = False

    # -- lifecycle -----------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        """Return the store; there is nothing to open."""
        self._ensure_open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the store."""
        await self.aclose()

    async def aclose(self) -> None:
        """Close the store; later calls raise `StoreError`. The data is dropped."""
        self._closed = True

    async def setup(self, database_url: str | None = None) -> SetupResult:
        """Nothing to create; kept so every store is set up the same way."""
        self._ensure_open()
        await checkpoint()
        return SetupResult()

    def _ensure_open(self) -> None:
        if self._closed:
            raise StoreError("the store is closed")

    def _now(self) -> datetime:
        self._ensure_open()
        return L.read_clock(self._clock)

    # -- account internals ---------------------------------------------------------------------

    def _refund_total(self, row_id: str) -> int:
        refunds = self._refunded.get(row_id)
        return refunds[0] if refunds else 0

    def _account(self, key: tuple[str, str]) -> _Account:
        return self._users[key[1]] if key[0] == "u" else self._teams[key[1]]

    def _user(self, user_id: str) -> _Account:
        acct = self._users.get(user_id)
        if acct is None:
            acct = self._users[user_id] = _Account("u", user_id)
        return acct

    def _lapse(self, acct: _Account, now: datetime) -> None:
        """Stop counting holds whose TTL passed and set aside lots that expired."""
        heap = acct.hold_heap
        while heap and heap[0][0] <= now:
            hold = acct.holds.get(heapq.heappop(heap)[1])
            if hold is not None and hold.counted:
                self._uncount(acct, hold)
        live = acct.live
        while live and live[0][0] <= now:
            lot = heapq.heappop(live)[2]
            lot.place = _NOWHERE
            if lot.remaining > 0:
                acct.expired_unswept += lot.remaining
                self._to_expired_heap(acct, lot)

    def _close(self, acct: _Account, hold_id: str, hold: _Hold, state: int) -> None:
        """Settle or release an open hold; only its final state and amount are kept."""
        if hold.counted:
            self._uncount(acct, hold)
        del acct.holds[hold_id]
        acct.closed[hold_id] = hold.amount * 4 + state

    def _uncount(self, acct: _Account, hold: _Hold) -> None:
        hold.counted = False
        acct.reserved -= hold.amount
        if hold.model is not None:
            left = acct.reserved_by_model[hold.model] - hold.amount
            if left:
                acct.reserved_by_model[hold.model] = left
            else:
                del acct.reserved_by_model[hold.model]

    def _to_expired_heap(self, acct: _Account, lot: _Lot) -> None:
        if lot.place != _EXPIRED:
            assert lot.expires_at is not None
            heapq.heappush(acct.expired, (lot.expires_at, lot.seq, lot))
            lot.place = _EXPIRED

    def _iter_heap(self, heap: list[tuple[datetime, int, _Lot]]) -> Iterator[_Lot]:
        while heap:
            lot = heap[0][2]
            if lot.remaining > 0:
                yield lot
            if lot.remaining == 0:
                heapq.heappop(heap)
                lot.place = _NOWHERE

    def _debit(self, acct: _Account, amount: int) -> tuple[tuple[str, int], ...]:
        """Take `amount` from the lots in burn-down order; the rest takes the balance below 0."""
        draws, rest = L.draw(self._iter_heap(acct.live), amount)
        if rest:
            late, rest = L.draw(self._iter_heap(acct.expired), rest)
            acct.expired_unswept -= sum(taken for _, taken in late)
            draws += late
        acct.balance -= amount
        return tuple((lot.id, taken) for lot, taken in draws)

    def _credit(
        self, acct: _Account, amount: int, expires_at: datetime | None, now: datetime
    ) -> None:
        """Add `amount`: first pay any negative balance, then the rest becomes a new lot."""
        _, lot_credit = L.split_credit(acct.balance, amount)
        acct.balance += amount
        if lot_credit:
            self._seq += 1
            lot = _Lot(self._ids.next("lot"), self._seq, 0, expires_at)
            acct.lots[lot.id] = lot
            self._refill(acct, lot, lot_credit, now)

    def _refill(self, acct: _Account, lot: _Lot, amount: int, now: datetime) -> None:
        """Put `amount` into `lot` and file it where its expiry says it belongs."""
        lot.remaining += amount
        if lot.expires_at is not None and lot.expires_at <= now:
            acct.expired_unswept += amount
            self._to_expired_heap(acct, lot)
        elif lot.place != _LIVE:
            heapq.heappush(acct.live, (*L.lot_order(lot.expires_at, lot.seq), lot))
            lot.place = _LIVE
        if lot.expires_at is not None and not lot.indexed:
            heapq.heappush(self._expiring, (lot.expires_at, lot.seq, acct, lot))
            lot.indexed = True

    def _append_row(
        self,
        acct: _Account,
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
        """Append a ledger row (a plain tuple in `_Row`'s field order) and return its id."""
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

    def _allowance(self, acct: _Account | None, now: datetime) -> tuple[PlanDefinition | None, int]:
        """The user's plan in the active pricing version and the allowance left this month."""
        if acct is None or acct.plan_id is None:
            return None, 0
        plan = self._plan(acct.plan_id)
        if plan is None:
            return None, 0
        used = acct.allowance_used.get(L.month_key(now), 0)
        return plan, max(0, plan.free_allowance - used)

    def _plan(self, plan_id: str) -> PlanDefinition | None:
        active = self._active()
        if active is None or not active.config.plans:
            return None
        return active.config.plans.get(plan_id)

    def _window_spend(self, acct: _Account, cap_type: str, model: str | None, now: datetime) -> int:
        return acct.spend.get((cap_type, L.cap_window_key(cap_type, now), model), 0)

    def _add_spend(self, acct: _Account, model: str | None, at: datetime, amount: int) -> None:
        spend = acct.spend
        for cap_type in (_DAILY, _MONTHLY):
            window = L.cap_window_key(cap_type, at)
            for key in ((cap_type, window, None), (cap_type, window, model)):
                spend[key] = spend.get(key, 0) + amount
                if model is None:
                    break

    def _held_for(self, acct: _Account, model: str | None) -> int:
        return acct.reserved if model is None else acct.reserved_by_model.get(model, 0)

    def _idem(
        self, acct: _Account | None, kind: str, key: str | None, fingerprint: tuple[object, ...]
    ) -> tuple[bool, Any]:
        """Return ``(True, stored result)`` for a replay, ``(True, None)`` for a conflict."""
        if key is None or acct is None:
            return False, None
        entry = acct.idem.get((kind, key))
        if entry is None:
            return False, None
        if entry[0] != fingerprint:
            return True, None
        return True, entry[1].model_validate_json(entry[2]).model_copy(update={"idempotent": True})

    def _available(self, acct: _Account, allowance: int = 0) -> int:
        return L.spendable(acct.balance, acct.expired_unswept, acct.reserved, allowance)

    # -- balances and grants -------------------------------------------------------------------

    async def get_balance(self, user_id: str) -> BalanceResult:
        """
        Report a user's balance.

        Args:
            user_id: The account; unknown users read as zeros.

        Returns:
            BalanceResult with ``balance`` (the ledger sum), ``reserved`` (active holds),
            ``expired_unswept``, ``allowance_remaining`` and ``available``.
        """
        L.check_id("user_id", user_id)
        self._ensure_open()
        async with self._locks.hold(("u", user_id)):
            now = self._now()
            acct = self._users.get(user_id)
            if acct is None:
                return BalanceResult(user_id=user_id)
            self._lapse(acct, now)
            _, allowance = self._allowance(acct, now)
            return BalanceResult(
                user_id=user_id,
                balance=acct.balance,
                lifetime_purchased=acct.lifetime_purchased,
                available=self._available(acct, allowance),
                reserved=acct.reserved,
                expired_unswept=acct.expired_unswept,
                allowance_remaining=allowance,
            )

    async def add_credits(
        self,
        user_id: str,
        amount: int,
        type: str = "adjustment",
        metadata: CreditMetadata | None = None,
        expires_at: datetime | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> AddCreditsResult:
        """
        Grant credits as a new lot, or take them back with a negative ``adjustment``.

        Args:
            user_id: The account.
            amount: Credits (> 0; an ``adjustment`` may be negative).
            type: ``purchase`` (counts toward ``lifetime_purchased``), ``subscription``,
                ``signup_bonus`` or ``adjustment``.
            metadata: Stored on the ledger row.
            expires_at: When the lot stops being spendable; must be in the future.
            idempotency_key: A repeated key returns the original result and grants once.

        Returns:
            AddCreditsResult; ``error`` is ``insufficient_credits`` when a negative
            adjustment would take available below zero, or ``idempotency_conflict``.
        """
        type_, meta, expiry, key = L.check_grant(
            user_id, amount, type, metadata, expires_at, idempotency_key
        )
        self._ensure_open()
        async with self._locks.hold(("u", user_id)):
            now = self._now()
            acct = self._users.get(user_id)
            if acct is not None:
                self._lapse(acct, now)
            replay, stored = self._idem(acct, "grant", key, (amount, type_, expiry))
            if replay:
                return stored or AddCreditsResult(
                    user_id=user_id,
                    amount=amount,
                    idempotency_key=key,
                    error=ErrorCode.IDEMPOTENCY_CONFLICT,
                )
            L.check_future("expires_at", expiry, now)
            balance = acct.balance if acct else 0
            available = self._available(acct) if acct else 0
            if amount < 0 and available + amount < 0:
                return AddCreditsResult(
                    user_id=user_id,
                    amount=amount,
                    new_balance=balance,
                    available=available,
                    error=ErrorCode.INSUFFICIENT_CREDITS,
                )
            L.check_balance_bound("balance", balance + amount)
            if type_ == "purchase" and acct is not None:
                L.check_balance_bound("lifetime_purchased", acct.lifetime_purchased + amount)
            acct = self._user(user_id)
            if amount > 0:
                self._credit(acct, amount, expiry, now)
            else:
                self._debit(acct, -amount)
            if type_ == "purchase":
                acct.lifetime_purchased += amount
            row_id = self._append_row(
                acct,
                amount,
                type_,
                L.row_metadata(meta, {"idempotency_key": key, "expires_at": L.iso(expiry)}),
                now,
                idempotency_key=key,
            )
            result = AddCreditsResult(
                transaction_id=row_id,
                user_id=user_id,
                amount=amount,
                new_balance=acct.balance,
                lifetime_purchased=acct.lifetime_purchased,
                expires_at=expiry,
                available=self._available(acct),
                idempotency_key=key,
            )
            if key is not None:
                acct.idem[("grant", key)] = (
                    (amount, type_, expiry),
                    result.__class__,
                    result.model_dump_json(),
                )
            return result

    # -- holds ---------------------------------------------------------------------------------

    async def reserve_credits(
        self,
        user_id: str,
        amount: int,
        operation_type: str,
        metadata: CreditMetadata | None = None,
        min_balance: int = 5,
        *,
        ttl: float | timedelta = 600.0,
        use_allowance: bool = False,
        idempotency_key: str | None = None,
    ) -> ReserveResult:
        """
        Hold credits for an upcoming operation.

        Args:
            user_id: The account.
            amount: Credits to hold (>= 1).
            operation_type: What the hold is for (stored on the ledger row it settles into).
            metadata: ``metadata.model`` makes the hold count toward that model's caps.
            min_balance: The floor spendable credits must stay at or above after the hold.
            ttl: Seconds (or a timedelta) until the hold stops counting.
            use_allowance: Count (and later consume) the remaining plan allowance first.
            idempotency_key: A repeated key returns the original hold.

        Returns:
            ReserveResult with the hold, or ``error`` ``insufficient_credits``,
            ``spend_cap_exceeded`` or ``idempotency_conflict``.
        """
        meta, lifetime, key = L.check_reserve(
            user_id,
            amount,
            operation_type,
            metadata,
            min_balance,
            ttl,
            use_allowance,
            idempotency_key,
        )
        model = L.metadata_model(meta)
        self._ensure_open()
        async with self._locks.hold(("u", user_id)):
            now = self._now()
            acct = self._users.get(user_id)
            if acct is not None:
                self._lapse(acct, now)
            fingerprint = (amount, operation_type, model, use_allowance)
            replay, stored = self._idem(acct, "reserve", key, fingerprint)
            if replay:
                return stored or ReserveResult(
                    user_id=user_id,
                    amount=amount,
                    idempotency_key=key,
                    error=ErrorCode.IDEMPOTENCY_CONFLICT,
                )
            allowance = self._allowance(acct, now)[1] if use_allowance else 0
            available = self._available(acct, allowance) if acct else allowance
            refusal = self._refuse_hold(acct, amount, min_balance, model, available, now)
            if refusal is not None:
                return ReserveResult(
                    user_id=user_id,
                    amount=amount,
                    balance=acct.balance if acct else 0,
                    reserved_total=acct.reserved if acct else 0,
                    available=available,
                    idempotency_key=key,
                    **refusal,
                )
            acct = acct or self._user(user_id)
            hold_id = self._ids.next("res")
            hold = _Hold(amount, operation_type, model, use_allowance, now + lifetime)
            acct.holds[hold_id] = hold
            _push_hold(acct, hold.expires_at, hold_id)
            acct.reserved += amount
            if model is not None:
                acct.reserved_by_model[model] = acct.reserved_by_model.get(model, 0) + amount
            result = ReserveResult(
                reservation_id=hold_id,
                user_id=user_id,
                amount=amount,
                balance=acct.balance,
                reserved_total=acct.reserved,
                expires_at=hold.expires_at,
                available=available - amount,
                idempotency_key=key,
            )
            if key is not None:
                acct.idem[("reserve", key)] = (
                    fingerprint,
                    result.__class__,
                    result.model_dump_json(),
                )
            return result

    def _refuse_hold(
        self,
        acct: _Account | None,
        amount: int,
        min_balance: int,
        model: str | None,
        available: int,
        now: datetime,
    ) -> dict[str, Any] | None:
        if available - amount < min_balance:
            return {"error": ErrorCode.INSUFFICIENT_CREDITS}
        if acct is None or not acct.caps:
            return None
        return L.hold_cap_refusal(
            acct.caps.values(), model, amount, self._spend_of(acct, now), self._held_of(acct)
        )

    def _spend_of(self, acct: _Account, now: datetime) -> L.SpendOf:
        return lambda cap: self._window_spend(acct, cap.cap_type, cap.model, now)

    def _held_of(self, acct: _Account) -> L.HeldOf:
        return lambda model: self._held_for(acct, model)

    async def deduct_credits(
        self,
        user_id: str,
        reservation_id: str,
        amount: int,
        idempotency_key: str | None = None,
        metadata: CreditMetadata | None = None,
    ) -> DeductionResult:
        """
        Settle a hold, charging `amount` in full.

        The plan allowance pays first when the hold was made with ``use_allowance``, then the
        lots in burn-down order. A charge larger than the account can cover takes the balance
        negative and is reported as ``shortfall``; nothing is forgiven. A hold whose TTL passed
        can still be settled.

        Args:
            user_id: The account that owns the hold.
            reservation_id: The id `reserve_credits` returned.
            amount: The actual cost (>= 0; 0 settles and charges nothing).
            idempotency_key: A repeated key with the same hold and amount returns the original
                result; with anything else, ``idempotency_conflict``.
            metadata: Stored on the usage row; ``model`` attributes the spend.

        Returns:
            DeductionResult, or ``error`` ``reservation_not_found``,
            ``reservation_already_settled``, ``reservation_released`` or
            ``idempotency_conflict``.
        """
        key, meta = L.check_deduct(user_id, reservation_id, amount, idempotency_key, metadata)
        self._ensure_open()
        async with self._locks.hold(("u", user_id)):
            now = self._now()
            acct = self._users.get(user_id)
            if acct is not None:
                self._lapse(acct, now)
            replay, stored = self._idem(acct, "deduct", key, (reservation_id, amount))
            hold = acct.holds.get(reservation_id) if acct is not None else None
            error = _hold_error(acct, reservation_id, hold) if not replay else None
            if error is None and not replay and acct is not None:
                L.check_balance_bound("balance", acct.balance - amount)
            if replay or error is not None:
                return stored or DeductionResult(
                    user_id=user_id,
                    reservation_id=reservation_id,
                    amount=amount,
                    idempotency_key=key,
                    error=error or ErrorCode.IDEMPOTENCY_CONFLICT,
                )
            assert acct is not None
            assert hold is not None
            self._close(acct, reservation_id, hold, _SETTLED)
            covered = 0
            if hold.use_allowance and amount:
                covered = L.allowance_split(amount, self._allowance(acct, now)[1])[0]
                if covered:
                    month = L.month_key(now)
                    acct.allowance_used[month] = acct.allowance_used.get(month, 0) + covered
            paid = amount - covered
            short = L.shortfall(acct.balance, paid)
            draws = self._debit(acct, paid)
            model = (meta.model if meta is not None else None) or hold.model
            # The system keys of a usage row are merged in when the row is read.
            row_id = self._append_row(
                acct,
                -paid,
                "usage",
                L.row_metadata(meta, {}) if meta is not None else _NO_METADATA,
                now,
                reservation_id=reservation_id,
                idempotency_key=key,
                draws=draws,
                spender=user_id,
                model=model,
                operation_type=hold.operation_type,
                allowance=covered,
            )
            self._add_spend(acct, model, now, paid)
            result = DeductionResult(
                transaction_id=row_id,
                user_id=user_id,
                reservation_id=reservation_id,
                amount=paid,
                charged=paid,
                balance_after=acct.balance,
                available=self._available(
                    acct, self._allowance(acct, now)[1] if hold.use_allowance else 0
                ),
                allowance_consumed=covered,
                shortfall=short,
                idempotency_key=key,
                cap_warning=self._cap_warning(acct, model, now),
            )
            if key is not None:
                acct.idem[("deduct", key)] = (
                    (reservation_id, amount),
                    result.__class__,
                    result.model_dump_json(),
                )
            return result

    def _cap_warning(self, acct: _Account, model: str | None, now: datetime) -> str | None:
        return L.cap_warning(acct.caps.values(), model, self._spend_of(acct, now))

    async def release_reservation(self, user_id: str, reservation_id: str) -> ReleaseResult:
        """
        Free a hold so its credits count as available again.

        Releasing twice is harmless; a hold that was already settled cannot be released.

        Args:
            user_id: The account that owns the hold.
            reservation_id: The id that `reserve_credits` returned.

        Returns:
            ReleaseResult with `error` set to `reservation_not_found` or
            `reservation_already_settled` when nothing was released.
        """
        L.check_id("user_id", user_id)
        L.check_id("reservation_id", reservation_id)
        self._ensure_open()
        async with self._locks.hold(("u", user_id)):
            now = self._now()
            acct = self._users.get(user_id)
            hold = acct.holds.get(reservation_id) if acct is not None else None
            closed = acct.closed.get(reservation_id) if acct is not None else None
            if acct is None or (hold is None and closed is None):
                return ReleaseResult(
                    reservation_id=reservation_id,
                    user_id=user_id,
                    error=ErrorCode.RESERVATION_NOT_FOUND,
                )
            self._lapse(acct, now)
            if hold is not None:
                amount = hold.amount
                self._close(acct, reservation_id, hold, _RELEASED)
            else:
                assert closed is not None
                state, amount = closed & 3, closed >> 2
                if state == _SETTLED:
                    return ReleaseResult(
                        reservation_id=reservation_id,
                        user_id=user_id,
                        amount=amount,
                        available=self._available(acct),
                        error=ErrorCode.RESERVATION_ALREADY_SETTLED,
                    )
            return ReleaseResult(
                reservation_id=reservation_id,
                user_id=user_id,
                amount=amount,
                released=True,
                available=self._available(acct),
            )

    # -- refunds and expiry --------------------------------------------------------------------

    async def refund_credits(
        self,
        transaction_id: str,
        amount: int | None = None,
        reason: str | None = None,
        metadata: CreditMetadata | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> RefundResult:
        """
        Refund (part of) a usage or team usage debit.

        Credits go back to the debited account: first paying any negative balance, then into
        the lots the debit drew from (newest-drawn first, keeping their expiry); what no lot
        can take becomes a non-expiring lot. Refunds are cumulative.

        Args:
            transaction_id: The usage row to refund.
            amount: Credits to refund (>= 1); None refunds whatever is left.
            reason: Stored on the refund row.
            metadata: Stored on the refund row.
            idempotency_key: A repeated key returns the original refund.

        Returns:
            RefundResult, or ``error`` ``transaction_not_found``, ``not_refundable``,
            ``already_refunded``, ``over_refund`` or ``idempotency_conflict``.
        """
        reason, meta, key = L.check_refund(
            transaction_id, amount, reason, metadata, idempotency_key
        )
        self._ensure_open()
        position = self._rows_by_id.get(transaction_id)
        if position is None:
            await checkpoint()
            return RefundResult(
                original_transaction_id=transaction_id,
                amount=amount or 0,
                idempotency_key=key,
                error=ErrorCode.TRANSACTION_NOT_FOUND,
            )
        original = self._row(position)
        acct = self._account(original.account)
        spender = original.spender or acct.id
        team_id = acct.id if acct.kind == "t" else None
        user_key = ("u", spender)
        async with self._locks.hold(acct.key, user_key):
            now = self._now()
            self._lapse(acct, now)
            replay, stored = self._idem(acct, "refund", key, (transaction_id, amount))
            refunds = self._refunded.get(transaction_id)
            refundable = -original.amount - (refunds[0] if refunds else 0)
            base: dict[str, Any] = {
                "original_transaction_id": transaction_id,
                "user_id": spender,
                "team_id": team_id,
                "amount": amount or refundable,
                "new_balance": acct.balance,
                "refundable": refundable,
                "idempotency_key": key,
            }
            error = (
                ErrorCode.IDEMPOTENCY_CONFLICT
                if replay
                else L.refund_error(original.type, refundable, amount)
            )
            if error is ErrorCode.NOT_REFUNDABLE:
                base["refundable"] = 0
            give = amount if amount is not None else refundable
            if error is None:
                L.check_balance_bound("balance", acct.balance + give)
            if replay or error is not None:
                return stored or RefundResult(**base, error=error)
            if refunds is None:
                refunds = self._refunded[transaction_id] = [0] * (1 + len(original.draws or ()))
            plan = L.plan_refund(original.draws or (), refunds, give, acct.balance)
            acct.balance += plan.debt_paid
            for lot_id, credit in plan.into_lots:
                acct.balance += credit
                self._refill(acct, acct.lots[lot_id], credit, now)
            if plan.new_lot:
                self._credit(acct, plan.new_lot, None, now)
            self._unspend(original, give)
            system = {
                "original_transaction_id": transaction_id,
                "reason": reason,
                "idempotency_key": key,
                "model": original.model,
                "user_id": spender if team_id else None,
            }
            row_id = self._append_row(
                acct, give, "refund", L.row_metadata(meta, system), now, idempotency_key=key
            )
            result = RefundResult(
                refund_transaction_id=row_id,
                original_transaction_id=transaction_id,
                user_id=spender,
                team_id=team_id,
                amount=give,
                new_balance=acct.balance,
                refundable=refundable - give,
                idempotency_key=key,
            )
            if key is not None:
                acct.idem[("refund", key)] = (
                    (transaction_id, amount),
                    result.__class__,
                    result.model_dump_json(),
                )
            return result

    def _unspend(self, original: _Row, amount: int) -> None:
        """Take a refund off the spend windows the refunded usage counted in."""
        spender = self._users.get(original.spender or "")
        if spender is not None:
            self._add_spend(spender, original.model, original.created_at, -amount)
        if original.account[0] == "t" and original.spender is not None:
            key = (original.spender, L.month_key(original.created_at))
            spend = self._teams[original.account[1]].member_spend
            spend[key] = spend.get(key, 0) - amount

    async def sweep_expired_credits(self, dry_run: bool = False) -> SweepResult:
        """
        Write off the unspent remainder of every expired lot, one ``expiry`` row per lot.

        Args:
            dry_run: Report what would be written off without changing anything.

        Returns:
            SweepResult: ``expired_count`` lots, ``expired_amount`` credits.
        """
        L.check_bool("dry_run", dry_run)
        now = self._now()
        if self._sweep_lock is None:
            self._sweep_lock = anyio.Lock()
        async with self._sweep_lock:
            due = self._sweep_backlog
            while self._expiring and self._expiring[0][0] <= now:
                entry = heapq.heappop(self._expiring)
                entry[3].indexed = False
                due.append(entry)
            by_account: dict[tuple[str, str], list[tuple[datetime, int, _Account, _Lot]]] = {}
            for entry in due:
                by_account.setdefault(entry[2].key, []).append(entry)
            count = total = 0
            for acct_key, entries in sorted(by_account.items()):
                async with self._locks.hold(acct_key):
                    acct = entries[0][2]
                    self._lapse(acct, now)
                    lots = sorted({e[3].id: e[3] for e in entries}.values(), key=lambda x: x.seq)
                    lots = [lot for lot in lots if lot.remaining > 0]
                    for lot in lots:
                        count += 1
                        total += lot.remaining
                        if not dry_run:
                            self._expire_lot(acct, lot, now)
                if dry_run:
                    continue
                done = set(map(id, entries))
                self._sweep_backlog = due = [e for e in due if id(e) not in done]
            if dry_run:
                for entry in due:
                    if not entry[3].indexed:
                        heapq.heappush(self._expiring, entry)
                        entry[3].indexed = True
                self._sweep_backlog = []
            return SweepResult(expired_count=count, expired_amount=total, dry_run=dry_run)

    def _expire_lot(self, acct: _Account, lot: _Lot, now: datetime) -> None:
        amount = lot.remaining
        lot.remaining = 0
        acct.expired_unswept -= amount
        acct.balance -= amount
        self._append_row(
            acct,
            -amount,
            "expiry",
            {"lot_id": lot.id, "expires_at": L.iso(lot.expires_at)},
            now,
        )

    # -- ledger --------------------------------------------------------------------------------

    async def list_transactions(
        self,
        user_id: str,
        *,
        limit: int = 100,
        cursor: str | None = None,
        types: Iterable[str] | None = None,
        start: datetime | None = None,
        end: datetime | None = None,
    ) -> TransactionPage:
        """
        Page a user's ledger, newest first.

        Args:
            user_id: The account.
            limit: Rows per page (1 to 1000).
            cursor: ``next_cursor`` of the previous page; stable while rows are added.
            types: Only rows of these transaction types.
            start: Only rows created at or after this instant.
            end: Only rows created before this instant.

        Returns:
            TransactionPage; ``next_cursor`` is None on the last page.
        """
        L.check_id("user_id", user_id)
        return await self._page(self._users, user_id, limit, cursor, types, start, end)

    async def list_team_transactions(
        self,
        team_id: str,
        *,
        limit: int = 100,
        cursor: str | None = None,
        types: Iterable[str] | None = None,
        start: datetime | None = None,
        end: datetime | None = None,
    ) -> TransactionPage:
        """Page a team pool's ledger, newest first; the arguments are `list_transactions`'s."""
        L.check_id("team_id", team_id)
        return await self._page(self._teams, team_id, limit, cursor, types, start, end)

    async def _page(
        self,
        accounts: dict[str, _Account],
        account_id: str,
        limit: int,
        cursor: str | None,
        types: Iterable[str] | None,
        start: datetime | None,
        end: datetime | None,
    ) -> TransactionPage:
        before, wanted, lo, hi = L.check_page(limit, cursor, types, start, end)
        self._ensure_open()
        await checkpoint()
        acct = accounts.get(account_id)
        if acct is None:
            return TransactionPage()
        rows = acct.rows
        index = len(rows) if before is None else bisect_left(rows, before)
        picked: list[_Row] = []
        more = False
        while index > 0:
            index -= 1
            row = self._row(rows[index])
            if wanted is not None and row.type not in wanted:
                continue
            if (lo is not None and row.created_at < lo) or (
                hi is not None and row.created_at >= hi
            ):
                continue
            if len(picked) == limit:
                more = True
                break
            picked.append(row)
        return TransactionPage(
            items=[_public_row(row, self._refund_total(row.id)) for row in picked],
            next_cursor=L.encode_cursor(picked[-1].seq) if more else None,
        )

    async def list_lots(self, user_id: str) -> list[CreditLot]:
        """
        The user's lots that still hold credits, in the order debits consume them.

        Unexpired lots come first (soonest-expiring first, non-expiring last), then expired
        lots not yet swept (``expired=True``).
        """
        L.check_id("user_id", user_id)
        self._ensure_open()
        async with self._locks.hold(("u", user_id)):
            now = self._now()
            acct = self._users.get(user_id)
            if acct is None:
                return []
            self._lapse(acct, now)
            live = sorted((e for e in acct.live if e[2].remaining > 0), key=lambda e: e[:2])
            gone = sorted((e for e in acct.expired if e[2].remaining > 0), key=lambda e: e[:2])
            return [
                CreditLot(
                    id=e[2].id,
                    remaining=e[2].remaining,
                    expires_at=e[2].expires_at,
                    expired=expired,
                )
                for entries, expired in ((live, False), (gone, True))
                for e in entries
            ]

    # -- pricing -------------------------------------------------------------------------------

    def _active(self) -> _PricingVersion | None:
        if self._active_version is None:
            return None
        return self._pricing[self._active_version - 1]

    def _pricing_result(self, item: _PricingVersion) -> PricingConfigResult:
        return PricingConfigResult(
            id=item.id,
            config=item.config,
            version=item.version,
            label=item.label,
            active=item.version == self._active_version,
            created_at=item.created_at,
        )

    async def get_active_pricing(self) -> PricingConfigResult | None:
        """The active pricing version, or None before any was published."""
        self._ensure_open()
        await checkpoint()
        active = self._active()
        return None if active is None else self._pricing_result(active)

    async def set_active_pricing(self, config: PricingConfigData, label: str | None = None) -> str:
        """
        Publish `config` as version highest + 1 and make it active.

        Args:
            config: The configuration (a dict is validated into `PricingConfigData`).
            label: A free-text label.

        Returns:
            The new version's id.
        """
        data = L.check_pricing(config)
        label = L.check_optional_text("label", label, max_length=256)
        self._ensure_open()
        await checkpoint()
        now = self._now()
        version = len(self._pricing) + 1
        item = _PricingVersion(self._ids.next("price"), version, data, label, now)
        self._pricing.append(item)
        self._active_version = version
        return item.id

    async def activate_pricing(self, version: int) -> str:
        """
        Make an existing version active without creating a new one.

        Raises:
            PricingVersionNotFoundError: No such version.
        """
        L.check_version(version)
        self._ensure_open()
        await checkpoint()
        if version > len(self._pricing):
            raise PricingVersionNotFoundError(version)
        self._active_version = version
        return self._pricing[version - 1].id

    async def get_pricing_config(self, version: int) -> PricingConfigResult | None:
        """One pricing version, or None if there is no such version."""
        L.check_version(version)
        self._ensure_open()
        await checkpoint()
        if version > len(self._pricing):
            return None
        return self._pricing_result(self._pricing[version - 1])

    async def get_pricing_history(self) -> list[PricingConfigHistoryItem]:
        """Every pricing version, newest first."""
        self._ensure_open()
        await checkpoint()
        return [
            PricingConfigHistoryItem(
                id=item.id,
                version=item.version,
                label=item.label,
                active=item.version == self._active_version,
                created_at=item.created_at,
            )
            for item in reversed(self._pricing)
        ]

    # -- plans ---------------------------------------------------------------------------------

    async def get_user_plan(self, user_id: str) -> GetUserPlanResult:
        """The user's plan as the active pricing version defines it (empty if none)."""
        L.check_id("user_id", user_id)
        self._ensure_open()
        await checkpoint()
        acct = self._users.get(user_id)
        if acct is None or acct.plan_id is None:
            return GetUserPlanResult(user_id=user_id)
        plan = self._plan(acct.plan_id)
        if plan is None:
            return GetUserPlanResult(user_id=user_id, plan_id=acct.plan_id)
        return GetUserPlanResult(
            user_id=user_id,
            plan_id=acct.plan_id,
            plan_name=plan.name,
            free_allowance=plan.free_allowance,
            features=dict(plan.features or {}),
        )

    async def set_user_plan(self, user_id: str, plan_id: str) -> SetUserPlanResult:
        """
        Record the user's plan.

        Raises:
            InvalidArgumentError: The active pricing version does not define `plan_id`.
        """
        L.check_id("user_id", user_id)
        L.check_id("plan_id", plan_id)
        self._ensure_open()
        if self._plan(plan_id) is None:
            raise InvalidArgumentError(
                f"plan_id {plan_id!r} is not defined by the active pricing version"
            )
        async with self._locks.hold(("u", user_id)):
            self._user(user_id).plan_id = plan_id
        return SetUserPlanResult(user_id=user_id, plan_id=plan_id)

    async def check_feature(self, user_id: str, feature: str) -> CheckFeatureResult:
        """Whether the user's plan has `feature` (present unless absent, None or False)."""
        L.check_id("feature", feature)
        plan = await self.get_user_plan(user_id)
        present, value = L.feature_present(plan.features, feature)
        return CheckFeatureResult(
            user_id=user_id, feature=feature, value=value, has_feature=present
        )

    async def check_allowance(self, user_id: str) -> AllowanceResult:
        """The plan allowance left in the current UTC month."""
        L.check_id("user_id", user_id)
        self._ensure_open()
        await checkpoint()
        now = self._now()
        acct = self._users.get(user_id)
        plan, remaining = self._allowance(acct, now)
        start, end = L.month_bounds(now)
        used = acct.allowance_used.get(L.month_key(now), 0) if acct is not None else 0
        return AllowanceResult(
            plan_id=(acct.plan_id or "") if acct is not None else "",
            allowance_remaining=remaining,
            period_start=start.isoformat(),
            period_end=end.isoformat(),
            free_allowance=plan.free_allowance if plan is not None else 0,
            allowance_used=used,
        )

    async def increment_usage_window(self, user_id: str, plan_id: str, amount: int) -> None:
        """Record `amount` of allowance consumed in the current UTC month."""
        L.check_id("user_id", user_id)
        L.check_id("plan_id", plan_id)
        L.check_amount("amount", amount)
        self._ensure_open()
        async with self._locks.hold(("u", user_id)):
            now = self._now()
            acct = self._user(user_id)
            month = L.month_key(now)
            acct.allowance_used[month] = acct.allowance_used.get(month, 0) + amount

    # -- spend caps ----------------------------------------------------------------------------

    async def check_spend_cap(
        self, user_id: str, model: str | None = None, amount: int | None = None
    ) -> CapCheckResult:
        """
        Advisory: would `amount` more (on `model`) trip one of the user's caps?

        Counts window spend plus active holds plus `amount`, like `reserve_credits` does.
        Reports a tripped deny cap first, then a tripped warn/notify cap, else the matching
        cap with the least headroom.
        """
        L.check_id("user_id", user_id)
        if model is not None:
            L.check_id("model", model)
        extra = 0 if amount is None else L.check_amount("amount", amount, minimum=0)
        self._ensure_open()
        async with self._locks.hold(("u", user_id)):
            now = self._now()
            acct = self._users.get(user_id)
            if acct is None or not acct.caps:
                return CapCheckResult()
            self._lapse(acct, now)
            return L.check_caps(
                acct.caps.values(), model, extra, self._spend_of(acct, now), self._held_of(acct)
            )

    async def set_spend_cap(self, cap: SpendCap) -> SpendCap:
        """Create or replace the cap for (user, cap type, model); returns the stored cap."""
        L.check_spend_cap(cap)
        self._ensure_open()
        stored = cap.model_copy()
        async with self._locks.hold(("u", cap.user_id)):
            self._user(cap.user_id).caps[(stored.cap_type, stored.model)] = stored
        return stored.model_copy()

    async def list_spend_caps(self, user_id: str) -> list[SpendCap]:
        """The user's caps, daily before monthly, then by model."""
        L.check_id("user_id", user_id)
        self._ensure_open()
        await checkpoint()
        acct = self._users.get(user_id)
        if acct is None:
            return []
        return [
            acct.caps[k].model_copy()
            for k in sorted(acct.caps, key=lambda k: (k[0], k[1] is not None, k[1] or ""))
        ]

    async def remove_spend_cap(
        self,
        user_id: str,
        cap_type: Literal["daily", "monthly"],
        model: str | None = None,
    ) -> RemoveSpendCapResult:
        """Remove the cap for (user, cap type, model); ``removed`` says whether one existed."""
        L.check_id("user_id", user_id)
        kind = L.check_cap_type(cap_type)
        if model is not None:
            L.check_id("model", model)
        self._ensure_open()
        async with self._locks.hold(("u", user_id)):
            acct = self._users.get(user_id)
            removed = acct is not None and acct.caps.pop((kind, model), None) is not None
        return RemoveSpendCapResult(user_id=user_id, cap_type=kind, model=model, removed=removed)

    # -- teams ---------------------------------------------------------------------------------

    async def create_team(self, name: str, initial_balance: int = 0) -> CreateTeamResult:
        """Create a team pool, optionally with an initial ``team_topup``."""
        L.check_id("name", name)
        L.check_amount("initial_balance", initial_balance, minimum=0)
        self._ensure_open()
        await checkpoint()
        now = self._now()
        team = _Account("t", self._ids.next("team"), name=name)
        self._teams[team.id] = team
        transaction_id = None
        if initial_balance:
            self._credit(team, initial_balance, None, now)
            transaction_id = self._append_row(
                team, initial_balance, "team_topup", {"initial_balance": True}, now
            )
        return CreateTeamResult(
            team_id=team.id, name=name, balance=team.balance, transaction_id=transaction_id
        )

    async def add_team_member(
        self,
        team_id: str,
        user_id: str,
        role: str = "member",
        spend_cap: int | None = None,
    ) -> AddTeamMemberResult:
        """Add a member, or update its role and monthly team spend cap."""
        L.check_team_member(team_id, user_id, role, spend_cap)
        self._ensure_open()
        async with self._locks.hold(("t", team_id)):
            team = self._teams.get(team_id)
            if team is None:
                return AddTeamMemberResult(
                    team_id=team_id,
                    user_id=user_id,
                    role=role,
                    spend_cap=spend_cap,
                    error=ErrorCode.TEAM_NOT_FOUND,
                )
            team.members[user_id] = _Member(role, spend_cap)
        return AddTeamMemberResult(team_id=team_id, user_id=user_id, role=role, spend_cap=spend_cap)

    async def remove_team_member(self, team_id: str, user_id: str) -> RemoveTeamMemberResult:
        """Remove a member; ``removed`` is False when the user was not a member."""
        L.check_id("team_id", team_id)
        L.check_id("user_id", user_id)
        self._ensure_open()
        async with self._locks.hold(("t", team_id)):
            team = self._teams.get(team_id)
            if team is None:
                return RemoveTeamMemberResult(
                    team_id=team_id, user_id=user_id, error=ErrorCode.TEAM_NOT_FOUND
                )
            removed = team.members.pop(user_id, None) is not None
        return RemoveTeamMemberResult(team_id=team_id, user_id=user_id, removed=removed)

    async def add_team_credits(
        self,
        team_id: str,
        amount: int,
        metadata: CreditMetadata | None = None,
        *,
        expires_at: datetime | None = None,
        idempotency_key: str | None = None,
    ) -> TeamTopupResult:
        """Top up a team pool with a new lot (a ``team_topup`` row)."""
        meta, expiry, key = L.check_team_topup(
            team_id, amount, metadata, expires_at, idempotency_key
        )
        self._ensure_open()
        async with self._locks.hold(("t", team_id)):
            now = self._now()
            team = self._teams.get(team_id)
            if team is None:
                return TeamTopupResult(
                    team_id=team_id, amount=amount, error=ErrorCode.TEAM_NOT_FOUND
                )
            self._lapse(team, now)
            replay, stored = self._idem(team, "team_topup", key, (amount, expiry))
            if not replay:
                L.check_future("expires_at", expiry, now)
                L.check_balance_bound("balance", team.balance + amount)
            if replay:
                return stored or TeamTopupResult(
                    team_id=team_id,
                    amount=amount,
                    idempotency_key=key,
                    error=ErrorCode.IDEMPOTENCY_CONFLICT,
                )
            self._credit(team, amount, expiry, now)
            row_id = self._append_row(
                team,
                amount,
                "team_topup",
                L.row_metadata(meta, {"idempotency_key": key, "expires_at": L.iso(expiry)}),
                now,
                idempotency_key=key,
            )
            result = TeamTopupResult(
                transaction_id=row_id,
                team_id=team_id,
                amount=amount,
                team_balance_after=team.balance,
                idempotency_key=key,
            )
            if key is not None:
                team.idem[("team_topup", key)] = (
                    (amount, expiry),
                    result.__class__,
                    result.model_dump_json(),
                )
            return result

    async def get_team_balance(self, team_id: str) -> TeamBalanceResult:
        """A team pool's balance; ``error`` is ``team_not_found`` for an unknown team."""
        L.check_id("team_id", team_id)
        self._ensure_open()
        async with self._locks.hold(("t", team_id)):
            now = self._now()
            team = self._teams.get(team_id)
            if team is None:
                return TeamBalanceResult(team_id=team_id, error=ErrorCode.TEAM_NOT_FOUND)
            self._lapse(team, now)
            return TeamBalanceResult(
                team_id=team_id,
                name=team.name,
                balance=team.balance,
                member_count=len(team.members),
                available=self._available(team),
            )

    async def get_team_members(self, team_id: str) -> list[TeamMember]:
        """A team's members (sorted by user id) with their net team spend this UTC month."""
        L.check_id("team_id", team_id)
        now = self._now()
        await checkpoint()
        team = self._teams.get(team_id)
        if team is None:
            return []
        month = L.month_key(now)
        return [
            TeamMember(
                user_id=user_id,
                role=m.role,
                spend_cap=m.spend_cap,
                total_spent=team.member_spend.get((user_id, month), 0),
            )
            for user_id, m in sorted(team.members.items())
        ]

    async def deduct_team(
        self,
        team_id: str,
        user_id: str,
        amount: int,
        metadata: CreditMetadata | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> TeamDeductionResult:
        """
        Charge the team pool on behalf of a member (a ``team_usage`` row on the team).

        Returns:
            TeamDeductionResult, or ``error`` ``team_not_found``, ``user_not_in_team``,
            ``insufficient_team_balance``, ``spend_cap_exceeded`` (the member's net team
            spend this UTC month plus `amount` over its cap) or ``idempotency_conflict``.
        """
        meta, key = L.check_team_deduct(team_id, user_id, amount, metadata, idempotency_key)
        self._ensure_open()
        async with self._locks.hold(("t", team_id), ("u", user_id)):
            now = self._now()
            team = self._teams.get(team_id)
            base: dict[str, Any] = {
                "team_id": team_id,
                "user_id": user_id,
                "amount": amount,
                "idempotency_key": key,
            }
            if team is None:
                return TeamDeductionResult(**base, error=ErrorCode.TEAM_NOT_FOUND)
            self._lapse(team, now)
            replay, stored = self._idem(team, "team_deduct", key, (user_id, amount))
            member = team.members.get(user_id)
            month = L.month_key(now)
            spent = team.member_spend.get((user_id, month), 0)
            available = self._available(team)
            base.update(team_balance_after=team.balance, available=available)
            error = (
                ErrorCode.IDEMPOTENCY_CONFLICT
                if replay
                else L.team_deduct_error(
                    member is not None,
                    available,
                    amount,
                    spent,
                    member.spend_cap if member is not None else None,
                )
            )
            if error is ErrorCode.SPEND_CAP_EXCEEDED and member is not None:
                base.update(cap_limit=member.spend_cap, cap_spend=spent)
            if error is not None:
                return stored or TeamDeductionResult(**base, error=error)
            draws = self._debit(team, amount)
            model = L.metadata_model(meta)
            system = {"model": model, "user_id": user_id, "idempotency_key": key}
            row_id = self._append_row(
                team,
                -amount,
                "team_usage",
                L.row_metadata(meta, system),
                now,
                idempotency_key=key,
                draws=draws,
                spender=user_id,
                model=model,
            )
            team.member_spend[(user_id, month)] = spent + amount
            self._add_spend(self._user(user_id), model, now, amount)
            result = TeamDeductionResult(
                transaction_id=row_id,
                team_id=team_id,
                user_id=user_id,
                amount=amount,
                charged=amount,
                team_balance_after=team.balance,
                available=self._available(team),
                idempotency_key=key,
            )
            if key is not None:
                team.idem[("team_deduct", key)] = (
                    (user_id, amount),
                    result.__class__,
                    result.model_dump_json(),
                )
            return result

    # -- analytics -----------------------------------------------------------------------------

    async def _events(self) -> list[L.SpendEvent]:
        self._ensure_open()
        await checkpoint()
        return [
            L.SpendEvent(
                row.spender or row.account[1],
                row.model or L.UNKNOWN_MODEL,
                row.created_at,
                -row.amount - self._refund_total(row.id),
            )
            for row in map(self._row, self._spend_rows)
        ]

    async def spend_by_user(self, start: datetime, end: datetime) -> list[SpendByUserRow]:
        """Net paid usage per user in ``[start, end)``, by spend descending then user id."""
        lo, hi = L.check_window(start, end)
        return L.spend_by_user(await self._events(), lo, hi)

    async def spend_by_model(self, start: datetime, end: datetime) -> list[SpendByModelRow]:
        """Net paid usage per model in ``[start, end)``, by spend descending then model."""
        lo, hi = L.check_window(start, end)
        return L.spend_by_model(await self._events(), lo, hi)

    async def daily_spend(self, start: datetime, end: datetime) -> list[DailySpendRow]:
        """Net paid usage per UTC day in ``[start, end)``, oldest day first."""
        lo, hi = L.check_window(start, end)
        return L.daily_spend(await self._events(), lo, hi)

    async def top_users(self, limit: int, start: datetime, end: datetime) -> list[TopUserRow]:
        """The `limit` users with most net paid usage in ``[start, end)``."""
        L.check_limit(limit)
        lo, hi = L.check_window(start, end)
        return L.top_users(await self._events(), limit, lo, hi)

    async def aggregate_stats(self, start: datetime, end: datetime) -> AggregateStatsRow:
        """Totals over ``[start, end)``."""
        lo, hi = L.check_window(start, end)
        return L.aggregate_stats(await self._events(), lo, hi)


def _push_hold(acct: _Account, expires_at: datetime, hold_id: str) -> None:
    """File a new hold under its expiry; rebuild the heap when settled holds crowd it."""
    heap = acct.hold_heap
    if len(heap) > 64 and len(heap) > 2 * len(acct.holds):
        heap[:] = [(h.expires_at, rid) for rid, h in acct.holds.items() if h.counted]
        heapq.heapify(heap)
    heapq.heappush(heap, (expires_at, hold_id))


def _hold_error(acct: _Account | None, hold_id: str, hold: _Hold | None) -> ErrorCode | None:
    if hold is not None:
        return None
    closed = acct.closed.get(hold_id) if acct is not None else None
    return L.hold_error(None if closed is None else closed & 3)


def _row_metadata(row: _Row) -> dict[str, Any]:
    metadata = dict(row.metadata or ())
    if row.type != "usage":
        return metadata
    system = {
        "model": row.model,
        "operation_type": row.operation_type,
        "reservation_id": row.reservation_id,
        "idempotency_key": row.idempotency_key,
        "allowance_consumed": row.allowance or None,
    }
    return L.merge_system(metadata, system)


def _public_row(row: _Row, refunded: int) -> TransactionRow:
    return TransactionRow(
        id=row.id,
        user_id=row.account[1],
        account_type="team" if row.account[0] == "t" else "user",
        amount=row.amount,
        type=row.type,  # type: ignore[arg-type]
        balance_after=row.balance_after,
        metadata=_row_metadata(row),
        created_at=row.created_at,
        reservation_id=row.reservation_id,
        idempotency_key=row.idempotency_key,
        refunded=refunded,
    )
