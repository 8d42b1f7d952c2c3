"""
Every store operation, written once, over a small synchronous storage interface.

`_ledger` holds the contract's rules on plain data; this module holds the *steps* of each
operation: load and lapse the account, replay or refuse by idempotency key, check the
refusals in the contract's order, mutate, append the ledger row, build the result and
remember it. A store supplies a `Storage` (where accounts, holds, lots, rows and keys live)
and decides how an operation runs: `MemoryStore` takes the account's lock and runs it on its
dicts; `SQLiteStore` runs it inside one ``BEGIN IMMEDIATE`` transaction on its connection
thread; `PostgresStore` prefetches what the arguments name in one round trip, runs it on that
snapshot and writes the changes in a second (see ``docs/architecture.md``).

Operations never await. Every check that can refuse or raise comes before the first write, so
an operation that refuses or raises has changed nothing, whatever the storage.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final, Literal, NamedTuple, Protocol, TypeVar

from ducto.errors import ErrorCode, InvalidArgumentError, PricingVersionNotFoundError
from ducto.interface import _ledger as L
from ducto.interface.models import (
    AddCreditsResult,
    AddTeamMemberResult,
    AllowanceResult,
    BalanceResult,
    CapCheckResult,
    ChargeResult,
    CreateTeamResult,
    CreditLot,
    CreditMetadata,
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
    SetUserPlanResult,
    SpendCap,
    SweepResult,
    TeamBalanceResult,
    TeamDeductionResult,
    TeamMember,
    TeamTopupResult,
    TransactionPage,
    TransactionRow,
)

T = TypeVar("T")

USER: Final = "u"
TEAM: Final = "t"
Kind = Literal["u", "t"]
AccountKey = tuple[str, str]
"""``(kind, id)``: kind ``"u"`` for a user, ``"t"`` for a team pool."""

# -- what the engine works on --------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class Account:
    """
    An account's scalar state, loaded once per operation; stores may subclass it.

    The engine reads and changes these fields; the storage persists them in `Storage.save`.
    """

    kind: str
    id: str
    balance: int = 0
    lifetime_purchased: int = 0
    reserved: int = 0
    expired_unswept: int = 0
    plan_id: str | None = None
    name: str | None = None


@dataclass(slots=True, eq=False)
class Hold:
    """
    A hold. ``member`` is the user a team hold is attributed to (None on a user's hold).

    A closed hold (settled or released) need only carry its id, amount and state.
    """

    id: str
    amount: int
    operation_type: str
    model: str | None
    use_allowance: bool
    expires_at: datetime
    member: str | None = None
    state: int = L.HOLD_OPEN
    counted: bool = True


@dataclass(slots=True, eq=False)
class Debit:
    """A refundable ledger row as a refund needs it (see `Storage.debit`)."""

    id: str
    kind: str
    account: str
    amount: int
    type: str
    created_at: datetime
    draws: Sequence[tuple[str, int]]
    refunds: list[int] | None
    """``[total, per draw...]`` as `_ledger.plan_refund` keeps it, or None before any refund."""
    spender: str | None
    model: str | None


@dataclass(slots=True, frozen=True)
class Member:
    """A team membership."""

    role: str
    spend_cap: int | None


class PricingVersion(NamedTuple):
    """A stored pricing version."""

    version: int
    id: str
    config: PricingConfigData
    label: str | None
    created_at: datetime


class StoredRow(NamedTuple):
    """
    A ledger row as a storage returns it for paging.

    For ``usage`` and ``team_usage`` rows, ``metadata`` is the caller's; the system keys are
    merged in from the other fields when the row is shown (`public_row`).
    """

    seq: int
    id: str
    kind: str
    account: str
    amount: int
    type: str
    balance_after: int
    metadata: dict[str, Any]
    created_at: datetime
    reservation_id: str | None
    idempotency_key: str | None
    refunded: int
    spender: str | None
    model: str | None
    operation_type: str | None
    allowance: int


class Storage(Protocol):
    """
    Where one store keeps accounts, holds, lots, ledger rows, keys, caps, teams and pricing.

    An operation calls these methods synchronously while the store has made it the only
    operation on the accounts it touches. Reads return what is stored now (including what
    this operation wrote). Writes may be applied at once or collected and applied when the
    operation ends, as long as the operation sees its own writes.
    """

    def now(self) -> datetime:
        """The operation's one reading of the clock (aware UTC)."""
        ...

    def new_id(self, kind: str) -> str:
        """A new unique id with the given prefix (``tx``, ``res``, ``lot``, ``team``, ...)."""
        ...

    # accounts
    def account(self, kind: str, account_id: str) -> Account | None:
        """The account, or None if it was never written."""
        ...

    def create(self, kind: str, account_id: str, now: datetime) -> Account:
        """A new, empty account (persisted by `save`)."""
        ...

    def save(self, acct: Account) -> None:
        """Persist the account's scalar fields."""
        ...

    def lapse_holds(self, acct: Account, now: datetime) -> Sequence[Hold]:
        """Counted holds whose TTL passed by `now`, now marked as no longer counted."""
        ...

    def lapse_lots(self, acct: Account, now: datetime) -> Sequence[int]:
        """The remainders of unexpired lots that expired by `now`, now filed as expired."""
        ...

    # holds
    def hold(self, acct: Account, hold_id: str) -> Hold | None:
        """The account's hold with this id (open or closed), or None."""
        ...

    def add_hold(self, acct: Account, hold: Hold) -> None:
        """Store a new hold (open and counted, or already settled)."""
        ...

    def close_hold(self, acct: Account, hold: Hold, state: int) -> None:
        """Record an open hold as settled or released (it no longer counts)."""
        ...

    def add_held(self, acct: Account, hold: Hold, delta: int) -> None:
        """Add `delta` to the per-model and per-member totals of counted holds."""
        ...

    def held_for(self, acct: Account, model: str) -> int:
        """Counted holds on the account that name `model`."""
        ...

    def held_by_member(self, team: Account, user_id: str) -> int:
        """Counted holds on a team pool attributed to `user_id`."""
        ...

    # lots
    def live_lots(self, acct: Account) -> Iterable[L.Lot]:
        """
        Unexpired lots with credits, in burn-down order, for a draw.

        The iterable may be lazy and may rely on its consumer (`_ledger.draw`) to take
        everything from each lot it moves past.
        """
        ...

    def expired_lots(self, acct: Account) -> Iterable[L.Lot]:
        """Expired, unswept lots with credits, oldest expiry first, for a draw (as above)."""
        ...

    def lots_in_order(self, acct: Account) -> tuple[Sequence[L.Lot], Sequence[L.Lot]]:
        """The lots with credits, unexpired ones in burn-down order, then expired ones."""
        ...

    def lots_drawn(self, acct: Account, draws: Sequence[tuple[L.Lot, int]]) -> None:
        """Persist the remainders of lots a debit (or a sweep) lowered."""
        ...

    def add_lot(
        self, acct: Account, amount: int, expires_at: datetime | None, expired: bool
    ) -> None:
        """Store a new lot; `expired` when its expiry has already passed."""
        ...

    def lot(self, acct: Account, lot_id: str) -> L.Lot:
        """One of the account's lots."""
        ...

    def lot_refilled(self, acct: Account, lot: L.Lot, expired: bool) -> None:
        """Persist a lot whose remainder a refund raised; `expired` files it as expired."""
        ...

    def sweep_due(self, now: datetime, consume: bool) -> list[tuple[str, str, L.Lot]]:
        """
        Lots with credits whose expiry passed, as ``(kind, account, lot)``, by account.

        With `consume`, the storage may stop tracking them as due (they are being swept).
        """
        ...

    # ledger
    def append_row(
        self,
        acct: Account,
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
        """Append a row with ``balance_after = acct.balance``; return its id."""
        ...

    def debit(self, transaction_id: str) -> Debit | None:
        """A ledger row by id, as a refund sees it, or None."""
        ...

    def set_refunds(self, debit: Debit, refunds: list[int]) -> None:
        """Persist a row's refund totals."""
        ...

    def page(
        self,
        kind: str,
        account_id: str,
        limit: int,
        before: int | None,
        types: frozenset[str] | None,
        start: datetime | None,
        end: datetime | None,
    ) -> tuple[list[StoredRow], bool]:
        """Up to `limit` rows newest first (before ``seq`` `before`), and whether more exist."""
        ...

    def spend_events(self, start: datetime, end: datetime) -> list[L.SpendEvent]:
        """Every usage and team usage row created in ``[start, end)``, net of refunds."""
        ...

    # idempotency
    def recall(
        self,
        acct: Account,
        op: str,
        key: str,
        fingerprint: tuple[object, ...],
        result_type: type[T],
    ) -> tuple[bool, T | None]:
        """
        Look up an idempotency key of the account for one kind of operation.

        Returns:
            ``(False, None)`` for an unused key; ``(True, result)`` when the fingerprint
            matches (the stored result as `result_type`, with ``idempotent=True``);
            ``(True, None)`` when the key was used for a different request.
        """
        ...

    def remember(
        self, acct: Account, op: str, key: str, fingerprint: tuple[object, ...], result: Any
    ) -> None:
        """Keep `result` under the key."""
        ...

    # plans and allowance
    def plan(self, plan_id: str) -> PlanDefinition | None:
        """The plan as the active pricing version defines it, or None."""
        ...

    def allowance_used(self, acct: Account, month: int) -> int:
        """Allowance consumed by the user in a month (`_ledger.month_key`)."""
        ...

    def use_allowance(self, acct: Account, month: int, amount: int) -> None:
        """Record allowance consumption."""
        ...

    # caps and spend windows
    def caps(self, acct: Account) -> Collection[SpendCap]:
        """The user's caps (any order)."""
        ...

    def put_cap(self, acct: Account, cap: SpendCap) -> None:
        """Create or replace the cap for (user, type, model)."""
        ...

    def remove_cap(self, acct: Account, cap_type: str, model: str | None) -> bool:
        """Remove a cap; whether one existed."""
        ...

    def window_spend(self, user_id: str, cap_type: str, window: int, model: str | None) -> int:
        """Net paid usage of the user in one window, for one model or (None) all."""
        ...

    def add_spend(self, user_id: str, model: str | None, at: datetime, amount: int) -> None:
        """Count `amount` of usage at `at` in the user's daily and monthly windows."""
        ...

    # teams
    def member(self, team: Account, user_id: str) -> Member | None:
        """A team membership, or None."""
        ...

    def put_member(self, team: Account, user_id: str, member: Member) -> None:
        """Create or replace a membership."""
        ...

    def remove_member(self, team: Account, user_id: str) -> bool:
        """Remove a membership; whether it existed."""
        ...

    def members(self, team: Account, month: int) -> list[TeamMember]:
        """The members by user id, with their net team spend in `month`."""
        ...

    def member_count(self, team: Account) -> int:
        """How many members the team has."""
        ...

    def member_spend(self, team: Account, user_id: str, month: int) -> int:
        """A member's net spend from the pool in a month."""
        ...

    def add_member_spend(self, team: Account, user_id: str, month: int, amount: int) -> None:
        """Count `amount` of a member's team spend in a month."""
        ...

    # pricing versions
    def active_pricing(self) -> PricingVersion | None:
        """The active pricing version, or None."""
        ...

    def active_version(self) -> int | None:
        """The active version number, or None."""
        ...

    def pricing(self, version: int) -> PricingVersion | None:
        """One pricing version, or None."""
        ...

    def pricing_history(self) -> list[PricingVersion]:
        """Every version, newest first."""
        ...

    def add_pricing(self, item: PricingVersion) -> None:
        """Store a new version."""
        ...

    def last_pricing_version(self) -> int:
        """The highest version number used (0 when none)."""
        ...

    def activate(self, version: int) -> None:
        """Make a version the active one."""
        ...


# -- shared steps ---------------------------------------------------------------------------------


def _load(st: Storage, kind: str, account_id: str, now: datetime) -> Account | None:
    """Load an account and lapse what its clock says has lapsed (persisted at once)."""
    acct = st.account(kind, account_id)
    if acct is not None and _lapse(st, acct, now):
        st.save(acct)
    return acct


def _lapse(st: Storage, acct: Account, now: datetime) -> bool:
    """Stop counting holds past their TTL; set aside lots past their expiry."""
    holds = st.lapse_holds(acct, now)
    for hold in holds:
        acct.reserved -= hold.amount
        st.add_held(acct, hold, -hold.amount)
    expired = st.lapse_lots(acct, now)
    for remaining in expired:
        acct.expired_unswept += remaining
    return bool(holds or expired)


def _uncount(st: Storage, acct: Account, hold: Hold) -> None:
    hold.counted = False
    acct.reserved -= hold.amount
    st.add_held(acct, hold, -hold.amount)


def _spendable(acct: Account | None, allowance: int = 0) -> int:
    if acct is None:
        return allowance
    return L.spendable(acct.balance, acct.expired_unswept, acct.reserved, allowance)


def _recall(
    st: Storage,
    acct: Account | None,
    op: str,
    key: str | None,
    fingerprint: tuple[object, ...],
    result_type: type[T],
) -> tuple[bool, T | None]:
    if key is None or acct is None:
        return False, None
    return st.recall(acct, op, key, fingerprint, result_type)


def _remember(
    st: Storage,
    acct: Account,
    op: str,
    key: str | None,
    fingerprint: tuple[object, ...],
    result: Any,
) -> None:
    if key is not None:
        st.remember(acct, op, key, fingerprint, result)


def _debit(st: Storage, acct: Account, amount: int) -> tuple[tuple[str, int], ...]:
    """
    Take `amount` from the lots in burn-down order.

    Unexpired lots first (soonest-expiring first, non-expiring last, oldest first among
    equals), then expired-but-unswept lots; whatever is left takes the balance below zero.
    """
    draws: list[tuple[L.Lot, int]] = []
    if amount > 0 and acct.balance > 0:
        draws, rest = L.draw(st.live_lots(acct), amount)
        if rest and acct.expired_unswept:
            late, rest = L.draw(st.expired_lots(acct), rest)
            acct.expired_unswept -= sum(taken for _, taken in late)
            draws += late
        if draws:
            st.lots_drawn(acct, draws)
    acct.balance -= amount
    return tuple((lot.id, taken) for lot, taken in draws)


def _credit(
    st: Storage, acct: Account, amount: int, expires_at: datetime | None, now: datetime
) -> None:
    """Add `amount`: first pay a negative balance; the rest becomes a new lot."""
    _, lot_credit = L.split_credit(acct.balance, amount)
    acct.balance += amount
    if lot_credit:
        expired = expires_at is not None and expires_at <= now
        if expired:
            acct.expired_unswept += lot_credit
        st.add_lot(acct, lot_credit, expires_at, expired)


def _refill(st: Storage, acct: Account, lot_id: str, amount: int, now: datetime) -> None:
    """Return `amount` to a lot; it keeps its expiry, so an expired lot stays expired."""
    lot = st.lot(acct, lot_id)
    expired = lot.expires_at is not None and lot.expires_at <= now
    lot.remaining += amount
    acct.balance += amount
    if expired:
        acct.expired_unswept += amount
    st.lot_refilled(acct, lot, expired)


def _allowance(
    st: Storage, acct: Account | None, now: datetime
) -> tuple[PlanDefinition | None, int, int]:
    """The user's plan, the allowance left this month and the allowance used."""
    if acct is None:
        return None, 0, 0
    used = st.allowance_used(acct, L.month_key(now)) if acct.plan_id is not None else 0
    plan = st.plan(acct.plan_id) if acct.plan_id is not None else None
    if plan is None:
        return None, 0, used
    return plan, max(0, plan.free_allowance - used), used


def _spend_of(st: Storage, user_id: str, now: datetime) -> L.SpendOf:
    def spend(cap: SpendCap) -> int:
        return st.window_spend(
            user_id, cap.cap_type, L.cap_window_key(cap.cap_type, now), cap.model
        )

    return spend


def _held_of(st: Storage, acct: Account) -> L.HeldOf:
    def held(model: str | None) -> int:
        return acct.reserved if model is None else st.held_for(acct, model)

    return held


def _hold_refusal(
    st: Storage,
    acct: Account | None,
    amount: int,
    min_balance: int,
    model: str | None,
    available: int,
    now: datetime,
) -> dict[str, Any] | None:
    """Why a hold of `amount` is refused: the floor first, then a deny cap."""
    if available - amount < min_balance:
        return {"error": ErrorCode.INSUFFICIENT_CREDITS, "min_balance": min_balance}
    if acct is None:
        return None
    caps = st.caps(acct)
    if not caps:
        return None
    return L.hold_cap_refusal(caps, model, amount, _spend_of(st, acct.id, now), _held_of(st, acct))


def _caller_metadata(meta: CreditMetadata | None) -> dict[str, Any]:
    return L.row_metadata(meta, {}) if meta is not None else {}


def _system_metadata(row: StoredRow) -> dict[str, Any]:
    """The system keys of a usage or team usage row (they win over the caller's)."""
    system: dict[str, Any] = {
        "model": row.model,
        "operation_type": row.operation_type,
        "reservation_id": row.reservation_id,
        "idempotency_key": row.idempotency_key,
    }
    if row.type == "usage":
        system["allowance_consumed"] = row.allowance or None
    else:
        system["user_id"] = row.spender
    return system


def public_row(row: StoredRow) -> TransactionRow:
    """A stored ledger row as the public `TransactionRow`."""
    metadata = row.metadata
    if row.type in L.REFUNDABLE_TYPES:
        metadata = L.merge_system(metadata, _system_metadata(row))
    return TransactionRow(
        id=row.id,
        user_id=row.account,
        account_type="team" if row.kind == TEAM else "user",
        amount=row.amount,
        type=row.type,  # type: ignore[arg-type]
        balance_after=row.balance_after,
        metadata=metadata,
        created_at=row.created_at,
        reservation_id=row.reservation_id,
        idempotency_key=row.idempotency_key,
        refunded=row.refunded,
    )


# -- balances and grants ------------------------------------------------------------------------


def get_balance(st: Storage, user_id: str) -> BalanceResult:
    """A user's balance (see `CreditStore.get_balance`)."""
    now = st.now()
    acct = _load(st, USER, user_id, now)
    if acct is None:
        return BalanceResult(user_id=user_id)
    allowance = _allowance(st, acct, now)[1]
    return BalanceResult(
        user_id=user_id,
        balance=acct.balance,
        lifetime_purchased=acct.lifetime_purchased,
        available=_spendable(acct, allowance),
        reserved=acct.reserved,
        expired_unswept=acct.expired_unswept,
        allowance_remaining=allowance,
    )


def add_credits(
    st: Storage,
    user_id: str,
    amount: int,
    type_: str,
    meta: CreditMetadata | None,
    expiry: datetime | None,
    key: str | None,
) -> AddCreditsResult:
    """Grant credits, or take them with a negative adjustment (`CreditStore.add_credits`)."""
    now = st.now()
    acct = _load(st, USER, user_id, now)
    fingerprint = (amount, type_, expiry)
    replay, stored = _recall(st, acct, "grant", key, fingerprint, AddCreditsResult)
    if replay:
        return stored or AddCreditsResult(
            user_id=user_id,
            amount=0,
            requested=amount,
            idempotency_key=key,
            error=ErrorCode.IDEMPOTENCY_CONFLICT,
        )
    L.check_future("expires_at", expiry, now)
    balance = acct.balance if acct is not None else 0
    available = _spendable(acct)
    if amount < 0 and available + amount < 0:
        return AddCreditsResult(
            user_id=user_id,
            amount=0,
            requested=amount,
            new_balance=balance,
            lifetime_purchased=acct.lifetime_purchased if acct is not None else 0,
            available=available,
            idempotency_key=key,
            error=ErrorCode.INSUFFICIENT_CREDITS,
        )
    L.check_balance_bound("balance", balance + amount)
    if type_ == "purchase" and acct is not None:
        L.check_balance_bound("lifetime_purchased", acct.lifetime_purchased + amount)
    if acct is None:
        acct = st.create(USER, user_id, now)
    if amount > 0:
        _credit(st, acct, amount, expiry, now)
    else:
        _debit(st, acct, -amount)
    if type_ == "purchase":
        acct.lifetime_purchased += amount
    st.save(acct)
    row_id = st.append_row(
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
        requested=amount,
        new_balance=acct.balance,
        lifetime_purchased=acct.lifetime_purchased,
        expires_at=expiry,
        available=_spendable(acct),
        idempotency_key=key,
    )
    _remember(st, acct, "grant", key, fingerprint, result)
    return result


# -- holds ----------------------------------------------------------------------------------------


def reserve(
    st: Storage,
    user_id: str,
    amount: int,
    operation_type: str,
    meta: CreditMetadata | None,
    min_balance: int,
    lifetime: timedelta,
    use_allowance: bool,
    key: str | None,
) -> ReserveResult:
    """Hold credits (see `CreditStore.reserve_credits`)."""
    now = st.now()
    acct = _load(st, USER, user_id, now)
    model = L.metadata_model(meta)
    fingerprint = (amount, operation_type, model, use_allowance)
    replay, stored = _recall(st, acct, "reserve", key, fingerprint, ReserveResult)
    if replay:
        return stored or ReserveResult(
            user_id=user_id,
            amount=0,
            requested=amount,
            idempotency_key=key,
            error=ErrorCode.IDEMPOTENCY_CONFLICT,
        )
    allowance = _allowance(st, acct, now)[1] if use_allowance else 0
    available = _spendable(acct, allowance)
    refusal = _hold_refusal(st, acct, amount, min_balance, model, available, now)
    if refusal is not None:
        return ReserveResult(
            user_id=user_id,
            amount=0,
            requested=amount,
            balance=acct.balance if acct is not None else 0,
            reserved_total=acct.reserved if acct is not None else 0,
            available=available,
            idempotency_key=key,
            **refusal,
        )
    if acct is None:
        acct = st.create(USER, user_id, now)
    hold = Hold(st.new_id("res"), amount, operation_type, model, use_allowance, now + lifetime)
    _place(st, acct, hold)
    result = ReserveResult(
        reservation_id=hold.id,
        user_id=user_id,
        amount=amount,
        requested=amount,
        balance=acct.balance,
        reserved_total=acct.reserved,
        expires_at=hold.expires_at,
        available=available - amount,
        idempotency_key=key,
    )
    _remember(st, acct, "reserve", key, fingerprint, result)
    return result


def _place(st: Storage, acct: Account, hold: Hold) -> None:
    acct.reserved += hold.amount
    st.add_hold(acct, hold)
    st.add_held(acct, hold, hold.amount)
    st.save(acct)


def deduct(
    st: Storage,
    user_id: str,
    reservation_id: str,
    amount: int,
    key: str | None,
    meta: CreditMetadata | None,
    team_id: str | None,
) -> DeductionResult:
    """Settle a hold (see `CreditStore.deduct_credits`)."""
    now = st.now()
    acct = _load(st, USER, user_id, now) if team_id is None else _load(st, TEAM, team_id, now)
    return _deduct_hold(st, acct, user_id, reservation_id, amount, key, meta, now, DeductionResult)


D = TypeVar("D", bound=DeductionResult)


def _deduct_hold(
    st: Storage,
    acct: Account | None,
    user_id: str,
    reservation_id: str,
    amount: int,
    key: str | None,
    meta: CreditMetadata | None,
    now: datetime,
    result_type: type[D],
) -> D:
    fingerprint = (reservation_id, amount)
    replay, stored = _recall(st, acct, "deduct", key, fingerprint, result_type)
    hold = None
    if not replay and acct is not None:
        hold = st.hold(acct, reservation_id)
        if hold is not None and hold.member != (user_id if acct.kind == TEAM else None):
            hold = None  # a team hold is settled by the member it is attributed to
    error = None if replay else L.hold_error(None if hold is None else hold.state)
    if replay or error is not None:
        return stored or result_type(
            user_id=user_id,
            reservation_id=reservation_id,
            requested=amount,
            idempotency_key=key,
            team_id=acct.id if acct is not None and acct.kind == TEAM else None,
            error=error or ErrorCode.IDEMPOTENCY_CONFLICT,
        )
    assert acct is not None
    assert hold is not None
    L.check_balance_bound("balance", acct.balance - amount)
    if hold.counted:
        _uncount(st, acct, hold)
    st.close_hold(acct, hold, L.HOLD_SETTLED)
    return _bill(st, acct, hold, user_id, amount, key, meta, now, fingerprint, result_type)


def _bill(
    st: Storage,
    acct: Account,
    hold: Hold,
    user_id: str,
    amount: int,
    key: str | None,
    meta: CreditMetadata | None,
    now: datetime,
    fingerprint: tuple[object, ...],
    result_type: type[D],
) -> D:
    """Charge `amount` for a settled hold: allowance first, then the lots, in full."""
    team = acct.kind == TEAM
    covered = left = 0
    if hold.use_allowance:
        left = _allowance(st, acct, now)[1]
        covered = L.allowance_split(amount, left)[0]
        if covered:
            st.use_allowance(acct, L.month_key(now), covered)
    paid = amount - covered
    short = L.shortfall(acct.balance, paid)
    draws = _debit(st, acct, paid)
    model = (meta.model if meta is not None else None) or hold.model
    st.save(acct)
    row_id = st.append_row(
        acct,
        -paid,
        "team_usage" if team else "usage",
        _caller_metadata(meta),
        now,
        reservation_id=hold.id,
        idempotency_key=key,
        draws=draws,
        spender=user_id,
        model=model,
        operation_type=hold.operation_type,
        allowance=covered,
    )
    st.add_spend(user_id, model, now, paid)
    if team:
        st.add_member_spend(acct, user_id, L.month_key(now), paid)
    result = result_type(
        transaction_id=row_id,
        user_id=user_id,
        reservation_id=hold.id,
        amount=-paid,
        charged=paid,
        requested=amount,
        available=_spendable(acct, left - covered),
        balance_after=acct.balance,
        allowance_consumed=covered,
        shortfall=short,
        idempotency_key=key,
        cap_warning=None if team else _cap_warning(st, acct, model, now),
        team_id=acct.id if team else None,
    )
    _remember(st, acct, "deduct", key, fingerprint, result)
    return result


def _cap_warning(st: Storage, acct: Account, model: str | None, now: datetime) -> str | None:
    caps = st.caps(acct)
    if not caps:
        return None
    return L.cap_warning(caps, model, _spend_of(st, acct.id, now))


def charge(
    st: Storage,
    user_id: str,
    amount: int,
    operation_type: str,
    meta: CreditMetadata | None,
    min_balance: int,
    use_allowance: bool,
    key: str | None,
) -> ChargeResult:
    """
    Hold `amount` and settle it in one step (see `CreditStore.charge_credits`).

    The refusals, allowance, caps, ledger row and idempotency keys are those of
    `reserve` followed by `deduct` with the same key: a key first used by either replays
    (or finishes) that request.
    """
    now = st.now()
    acct = _load(st, USER, user_id, now)
    model = L.metadata_model(meta)
    reserve_print = (amount, operation_type, model, use_allowance)
    if key is not None and acct is not None:
        replay, stored = st.recall(acct, "reserve", key, reserve_print, ReserveResult)
        if replay and stored is not None:
            # The key placed a hold before: settle it (or replay its settlement).
            return _deduct_hold(
                st, acct, user_id, stored.reservation_id, amount, key, meta, now, ChargeResult
            )
        if replay or st.recall(acct, "deduct", key, (), ChargeResult)[0]:
            return ChargeResult(
                user_id=user_id,
                requested=amount,
                idempotency_key=key,
                error=ErrorCode.IDEMPOTENCY_CONFLICT,
            )
    allowance = _allowance(st, acct, now)[1] if use_allowance else 0
    available = _spendable(acct, allowance)
    refusal = _hold_refusal(st, acct, amount, min_balance, model, available, now)
    if refusal is not None:
        return ChargeResult(
            user_id=user_id,
            requested=amount,
            balance_after=acct.balance if acct is not None else 0,
            available=available,
            idempotency_key=key,
            **refusal,
        )
    L.check_balance_bound("balance", (acct.balance if acct is not None else 0) - amount)
    if acct is None:
        acct = st.create(USER, user_id, now)
    hold = Hold(
        st.new_id("res"),
        amount,
        operation_type,
        model,
        use_allowance,
        now,
        state=L.HOLD_SETTLED,
        counted=False,
    )
    st.add_hold(acct, hold)
    if key is not None:
        st.remember(
            acct,
            "reserve",
            key,
            reserve_print,
            ReserveResult(
                reservation_id=hold.id,
                user_id=user_id,
                amount=amount,
                requested=amount,
                balance=acct.balance,
                reserved_total=acct.reserved,
                expires_at=now,
                available=available - amount,
                idempotency_key=key,
            ),
        )
    return _bill(st, acct, hold, user_id, amount, key, meta, now, (hold.id, amount), ChargeResult)


def release(st: Storage, user_id: str, reservation_id: str, team_id: str | None) -> ReleaseResult:
    """Free a hold (see `CreditStore.release_reservation`)."""
    now = st.now()
    acct = _load(st, USER if team_id is None else TEAM, team_id or user_id, now)
    hold = st.hold(acct, reservation_id) if acct is not None else None
    if acct is None or hold is None or hold.member != (None if team_id is None else user_id):
        return ReleaseResult(
            reservation_id=reservation_id,
            user_id=user_id,
            team_id=team_id,
            error=ErrorCode.RESERVATION_NOT_FOUND,
        )
    if hold.state == L.HOLD_OPEN:
        if hold.counted:
            _uncount(st, acct, hold)
        st.close_hold(acct, hold, L.HOLD_RELEASED)
        st.save(acct)
    settled = hold.state == L.HOLD_SETTLED
    return ReleaseResult(
        reservation_id=reservation_id,
        user_id=user_id,
        team_id=team_id,
        amount=0 if settled else hold.amount,
        released=not settled,
        available=_spendable(acct),
        error=ErrorCode.RESERVATION_ALREADY_SETTLED if settled else None,
    )


# -- refunds and expiry -------------------------------------------------------------------------


def refund(
    st: Storage,
    transaction_id: str,
    amount: int | None,
    reason: str | None,
    meta: CreditMetadata | None,
    key: str | None,
) -> RefundResult:
    """Refund (part of) a usage debit (see `CreditStore.refund_credits`)."""
    now = st.now()
    original = st.debit(transaction_id)
    if original is None:
        return RefundResult(
            original_transaction_id=transaction_id,
            requested=amount,
            idempotency_key=key,
            error=ErrorCode.TRANSACTION_NOT_FOUND,
        )
    acct = _load(st, original.kind, original.account, now)
    assert acct is not None
    spender = original.spender or acct.id
    team_id = acct.id if acct.kind == TEAM else None
    fingerprint = (transaction_id, amount)
    replay, stored = _recall(st, acct, "refund", key, fingerprint, RefundResult)
    refunds = original.refunds
    refundable = -original.amount - (refunds[0] if refunds else 0)
    error = (
        ErrorCode.IDEMPOTENCY_CONFLICT
        if replay
        else L.refund_error(original.type, refundable, amount)
    )
    give = amount if amount is not None else refundable
    if error is None:
        L.check_balance_bound("balance", acct.balance + give)
    if replay or error is not None:
        return stored or RefundResult(
            original_transaction_id=transaction_id,
            user_id=spender,
            team_id=team_id,
            requested=amount,
            new_balance=acct.balance,
            refundable=0 if error is ErrorCode.NOT_REFUNDABLE else refundable,
            idempotency_key=key,
            error=error,
        )
    if refunds is None:
        refunds = [0] * (1 + len(original.draws))
    plan = L.plan_refund(original.draws, refunds, give, acct.balance)
    acct.balance += plan.debt_paid
    for lot_id, credit in plan.into_lots:
        _refill(st, acct, lot_id, credit, now)
    if plan.new_lot:
        _credit(st, acct, plan.new_lot, None, now)
    st.set_refunds(original, refunds)
    st.add_spend(spender, original.model, original.created_at, -give)
    if team_id is not None:
        st.add_member_spend(acct, spender, L.month_key(original.created_at), -give)
    st.save(acct)
    system = {
        "original_transaction_id": transaction_id,
        "reason": reason,
        "idempotency_key": key,
        "model": original.model,
        "user_id": spender if team_id else None,
    }
    row_id = st.append_row(
        acct, give, "refund", L.row_metadata(meta, system), now, idempotency_key=key
    )
    result = RefundResult(
        refund_transaction_id=row_id,
        original_transaction_id=transaction_id,
        user_id=spender,
        team_id=team_id,
        amount=give,
        requested=amount,
        new_balance=acct.balance,
        refundable=refundable - give,
        idempotency_key=key,
    )
    _remember(st, acct, "refund", key, fingerprint, result)
    return result


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


# -- ledger ---------------------------------------------------------------------------------------


def page(
    st: Storage,
    kind: str,
    account_id: str,
    limit: int,
    before: int | None,
    types: frozenset[str] | None,
    start: datetime | None,
    end: datetime | None,
) -> TransactionPage:
    """A page of an account's ledger, newest first (see `CreditStore.list_transactions`)."""
    rows, more = st.page(kind, account_id, limit, before, types, start, end)
    return TransactionPage(
        items=[public_row(row) for row in rows],
        next_cursor=L.encode_cursor(rows[-1].seq) if more and rows else None,
    )


def list_lots(st: Storage, user_id: str) -> list[CreditLot]:
    """The user's lots with credits, in the order debits take them."""
    now = st.now()
    acct = _load(st, USER, user_id, now)
    if acct is None:
        return []
    live, expired = st.lots_in_order(acct)
    return [
        CreditLot(id=lot.id, remaining=lot.remaining, expires_at=lot.expires_at, expired=gone)
        for lots, gone in ((live, False), (expired, True))
        for lot in lots
    ]


def spend_events(st: Storage, start: datetime, end: datetime) -> list[L.SpendEvent]:
    """Every usage debit in ``[start, end)``, as analytics counts it."""
    return st.spend_events(start, end)


# -- pricing --------------------------------------------------------------------------------------


def _pricing_result(item: PricingVersion, active: int | None) -> PricingConfigResult:
    return PricingConfigResult(
        id=item.id,
        config=item.config,
        version=item.version,
        label=item.label,
        active=item.version == active,
        created_at=item.created_at,
    )


def get_active_pricing(st: Storage) -> PricingConfigResult | None:
    """The active version, or None."""
    item = st.active_pricing()
    return None if item is None else _pricing_result(item, item.version)


def set_active_pricing(st: Storage, config: PricingConfigData, label: str | None) -> str:
    """Publish `config` as version highest + 1 and activate it; return its id."""
    now = st.now()
    item = PricingVersion(st.last_pricing_version() + 1, st.new_id("price"), config, label, now)
    st.add_pricing(item)
    st.activate(item.version)
    return item.id


def activate_pricing(st: Storage, version: int) -> str:
    """Make an existing version active; `PricingVersionNotFoundError` otherwise."""
    item = st.pricing(version)
    if item is None:
        raise PricingVersionNotFoundError(version)
    st.activate(version)
    return item.id


def get_pricing_config(st: Storage, version: int) -> PricingConfigResult | None:
    """One version, or None."""
    item = st.pricing(version)
    return None if item is None else _pricing_result(item, st.active_version())


def get_pricing_history(st: Storage) -> list[PricingConfigHistoryItem]:
    """Every version, newest first."""
    active = st.active_version()
    return [
        PricingConfigHistoryItem(
            id=item.id,
            version=item.version,
            label=item.label,
            active=item.version == active,
            created_at=item.created_at,
        )
        for item in st.pricing_history()
    ]


# -- plans ----------------------------------------------------------------------------------------


def get_user_plan(st: Storage, user_id: str) -> GetUserPlanResult:
    """The user's plan as the active version defines it."""
    acct = st.account(USER, user_id)
    if acct is None or acct.plan_id is None:
        return GetUserPlanResult(user_id=user_id)
    plan = st.plan(acct.plan_id)
    if plan is None:
        return GetUserPlanResult(user_id=user_id, plan_id=acct.plan_id)
    return GetUserPlanResult(
        user_id=user_id,
        plan_id=acct.plan_id,
        plan_name=plan.name,
        free_allowance=plan.free_allowance,
        features=dict(plan.features or {}),
    )


def set_user_plan(st: Storage, user_id: str, plan_id: str) -> SetUserPlanResult:
    """Record the user's plan; the active version must define it."""
    if st.plan(plan_id) is None:
        raise InvalidArgumentError(
            f"plan_id {plan_id!r} is not defined by the active pricing version"
        )
    now = st.now()
    acct = _load(st, USER, user_id, now) or st.create(USER, user_id, now)
    acct.plan_id = plan_id
    st.save(acct)
    return SetUserPlanResult(user_id=user_id, plan_id=plan_id)


def check_allowance(st: Storage, user_id: str) -> AllowanceResult:
    """The plan allowance of the current UTC month."""
    now = st.now()
    acct = st.account(USER, user_id)
    plan, remaining, used = _allowance(st, acct, now)
    start, end = L.month_bounds(now)
    return AllowanceResult(
        plan_id=(acct.plan_id or "") if acct is not None else "",
        allowance_remaining=remaining,
        period_start=start.isoformat(),
        period_end=end.isoformat(),
        free_allowance=plan.free_allowance if plan is not None else 0,
        allowance_used=used,
    )


def increment_usage_window(st: Storage, user_id: str, amount: int) -> None:
    """Record allowance consumption in the current UTC month."""
    now = st.now()
    acct = _load(st, USER, user_id, now) or st.create(USER, user_id, now)
    st.save(acct)
    st.use_allowance(acct, L.month_key(now), amount)


# -- spend caps -----------------------------------------------------------------------------------


def check_spend_cap(st: Storage, user_id: str, model: str | None, extra: int) -> CapCheckResult:
    """The advisory cap check (see `CreditStore.check_spend_cap`)."""
    now = st.now()
    acct = _load(st, USER, user_id, now)
    caps = st.caps(acct) if acct is not None else ()
    if acct is None or not caps:
        return CapCheckResult()
    return L.check_caps(caps, model, extra, _spend_of(st, user_id, now), _held_of(st, acct))


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
    st: Storage, user_id: str, cap_type: Literal["daily", "monthly"], model: str | None
) -> RemoveSpendCapResult:
    """Remove a cap."""
    acct = st.account(USER, user_id)
    removed = acct is not None and st.remove_cap(acct, cap_type, model)
    if removed:
        assert acct is not None
        st.save(acct)
    return RemoveSpendCapResult(user_id=user_id, cap_type=cap_type, model=model, removed=removed)


# -- teams ----------------------------------------------------------------------------------------


def create_team(st: Storage, name: str, initial_balance: int) -> CreateTeamResult:
    """Create a team pool, optionally with an initial top-up."""
    now = st.now()
    team = st.create(TEAM, st.new_id("team"), now)
    team.name = name
    transaction_id = None
    if initial_balance:
        _credit(st, team, initial_balance, None, now)
    st.save(team)
    if initial_balance:
        transaction_id = st.append_row(
            team, initial_balance, "team_topup", {"initial_balance": True}, now
        )
    return CreateTeamResult(
        team_id=team.id, name=name, balance=team.balance, transaction_id=transaction_id
    )


def add_team_member(
    st: Storage, team_id: str, user_id: str, role: str, spend_cap: int | None
) -> AddTeamMemberResult:
    """Add a member, or update its role and cap."""
    team = st.account(TEAM, team_id)
    if team is None:
        return AddTeamMemberResult(
            team_id=team_id,
            user_id=user_id,
            role=role,
            spend_cap=spend_cap,
            error=ErrorCode.TEAM_NOT_FOUND,
        )
    st.put_member(team, user_id, Member(role, spend_cap))
    return AddTeamMemberResult(team_id=team_id, user_id=user_id, role=role, spend_cap=spend_cap)


def remove_team_member(st: Storage, team_id: str, user_id: str) -> RemoveTeamMemberResult:
    """Remove a member."""
    team = st.account(TEAM, team_id)
    if team is None:
        return RemoveTeamMemberResult(
            team_id=team_id, user_id=user_id, error=ErrorCode.TEAM_NOT_FOUND
        )
    removed = st.remove_member(team, user_id)
    return RemoveTeamMemberResult(team_id=team_id, user_id=user_id, removed=removed)


def add_team_credits(
    st: Storage,
    team_id: str,
    amount: int,
    meta: CreditMetadata | None,
    expiry: datetime | None,
    key: str | None,
) -> TeamTopupResult:
    """Top up a team pool."""
    now = st.now()
    team = _load(st, TEAM, team_id, now)
    if team is None:
        return TeamTopupResult(
            team_id=team_id, amount=0, requested=amount, error=ErrorCode.TEAM_NOT_FOUND
        )
    fingerprint = (amount, expiry)
    replay, stored = _recall(st, team, "team_topup", key, fingerprint, TeamTopupResult)
    if replay:
        return stored or TeamTopupResult(
            team_id=team_id,
            amount=0,
            requested=amount,
            idempotency_key=key,
            error=ErrorCode.IDEMPOTENCY_CONFLICT,
        )
    L.check_future("expires_at", expiry, now)
    L.check_balance_bound("balance", team.balance + amount)
    _credit(st, team, amount, expiry, now)
    st.save(team)
    row_id = st.append_row(
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
        requested=amount,
        team_balance_after=team.balance,
        idempotency_key=key,
    )
    _remember(st, team, "team_topup", key, fingerprint, result)
    return result


def get_team_balance(st: Storage, team_id: str) -> TeamBalanceResult:
    """A team pool's balance."""
    now = st.now()
    team = _load(st, TEAM, team_id, now)
    if team is None:
        return TeamBalanceResult(team_id=team_id, error=ErrorCode.TEAM_NOT_FOUND)
    return TeamBalanceResult(
        team_id=team_id,
        name=team.name or "",
        balance=team.balance,
        member_count=st.member_count(team),
        available=_spendable(team),
        reserved=team.reserved,
    )


def get_team_members(st: Storage, team_id: str) -> list[TeamMember]:
    """A team's members with their net team spend this UTC month."""
    now = st.now()
    team = st.account(TEAM, team_id)
    if team is None:
        return []
    return st.members(team, L.month_key(now))


def _member_refusal(
    st: Storage, team: Account, user_id: str, amount: int, now: datetime
) -> tuple[ErrorCode | None, dict[str, Any]]:
    """Why a team charge or hold is refused: membership, the pool, then the member's cap."""
    member = st.member(team, user_id)
    available = _spendable(team)
    spent = held = 0
    cap = member.spend_cap if member is not None else None
    if cap is not None:
        spent = st.member_spend(team, user_id, L.month_key(now))
        held = st.held_by_member(team, user_id)
    error = L.team_deduct_error(member is not None, available, amount, spent + held, cap)
    details: dict[str, Any] = {"available": available}
    if error is ErrorCode.SPEND_CAP_EXCEEDED:
        details.update(cap_limit=cap, cap_spend=spent, cap_reserved=held, cap_type="monthly")
    return error, details


def deduct_team(
    st: Storage,
    team_id: str,
    user_id: str,
    amount: int,
    meta: CreditMetadata | None,
    key: str | None,
) -> TeamDeductionResult:
    """Charge a team pool for a member (see `CreditStore.deduct_team`)."""
    now = st.now()
    base: dict[str, Any] = {
        "team_id": team_id,
        "user_id": user_id,
        "requested": amount,
        "idempotency_key": key,
    }
    team = _load(st, TEAM, team_id, now)
    if team is None:
        return TeamDeductionResult(**base, error=ErrorCode.TEAM_NOT_FOUND)
    fingerprint = (user_id, amount)
    replay, stored = _recall(st, team, "team_deduct", key, fingerprint, TeamDeductionResult)
    if replay:
        return stored or TeamDeductionResult(
            **base,
            team_balance_after=team.balance,
            available=_spendable(team),
            error=ErrorCode.IDEMPOTENCY_CONFLICT,
        )
    error, details = _member_refusal(st, team, user_id, amount, now)
    if error is not None:
        return TeamDeductionResult(**base, team_balance_after=team.balance, error=error, **details)
    draws = _debit(st, team, amount)
    model = L.metadata_model(meta)
    st.save(team)
    row_id = st.append_row(
        team,
        -amount,
        "team_usage",
        _caller_metadata(meta),
        now,
        idempotency_key=key,
        draws=draws,
        spender=user_id,
        model=model,
    )
    st.add_member_spend(team, user_id, L.month_key(now), amount)
    st.add_spend(user_id, model, now, amount)
    result = TeamDeductionResult(
        **base,
        transaction_id=row_id,
        amount=-amount,
        charged=amount,
        team_balance_after=team.balance,
        available=_spendable(team),
    )
    _remember(st, team, "team_deduct", key, fingerprint, result)
    return result


def reserve_team(
    st: Storage,
    team_id: str,
    user_id: str,
    amount: int,
    operation_type: str,
    meta: CreditMetadata | None,
    lifetime: timedelta,
    key: str | None,
) -> ReserveResult:
    """Hold credits on a team pool for a member (see `CreditStore.reserve_team_credits`)."""
    now = st.now()
    base: dict[str, Any] = {
        "user_id": user_id,
        "team_id": team_id,
        "amount": 0,
        "requested": amount,
        "idempotency_key": key,
    }
    team = _load(st, TEAM, team_id, now)
    if team is None:
        return ReserveResult(**base, error=ErrorCode.TEAM_NOT_FOUND)
    model = L.metadata_model(meta)
    fingerprint = (user_id, amount, operation_type, model)
    replay, stored = _recall(st, team, "reserve", key, fingerprint, ReserveResult)
    if replay:
        return stored or ReserveResult(**base, error=ErrorCode.IDEMPOTENCY_CONFLICT)
    error, details = _member_refusal(st, team, user_id, amount, now)
    if error is not None:
        return ReserveResult(
            **base,
            balance=team.balance,
            reserved_total=team.reserved,
            error=error,
            **details,
        )
    hold = Hold(
        st.new_id("res"), amount, operation_type, model, False, now + lifetime, member=user_id
    )
    available = _spendable(team)
    _place(st, team, hold)
    result = ReserveResult(
        **{**base, "amount": amount},
        reservation_id=hold.id,
        balance=team.balance,
        reserved_total=team.reserved,
        expires_at=hold.expires_at,
        available=available - amount,
    )
    _remember(st, team, "reserve", key, fingerprint, result)
    return result
