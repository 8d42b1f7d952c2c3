"""What the engine works on: accounts, holds, rows and the `Storage` protocol behind them."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Literal, NamedTuple, Protocol, TypeVar

from ducto.errors import DuctoError
from ducto.interface import _ledger as L
from ducto.interface import _retention as R
from ducto.interface.models import PlanDefinition, PricingConfigData, SpendCap, TeamMember

T = TypeVar("T")


USER: Final = "u"


TEAM: Final = "t"


Kind = Literal["u", "t"]


AccountKey = tuple[str, str]
"""``(kind, id)``: kind ``"u"`` for a user, ``"t"`` for a team pool."""


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
    scope: str | None = None


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
    scope: str | None = None


@dataclass(slots=True, frozen=True)
class Member:
    """A team membership."""

    role: str
    spend_cap: int | None


class PricingVersion(NamedTuple):
    """
    A stored pricing version: immutable but for ``cancelled_at``.

    ``effective_at`` is when it takes effect: its publication for a version published at
    once, a later instant for a scheduled one.
    """

    version: int
    id: str
    config: PricingConfigData
    label: str | None
    created_at: datetime
    effective_at: datetime
    cancelled_at: datetime | None = None


class PricingState(NamedTuple):
    """
    What decides the version in force (see `pricing.current_version`).

    ``pointer`` is the version the last immediate publication or activation made current,
    at ``pointer_at``; ``scheduled`` holds ``(effective_at, version)`` of every version not
    cancelled whose ``effective_at`` is after ``pointer_at`` (every such version when there
    is no pointer), in any order.
    """

    pointer: int | None
    pointer_at: datetime | None
    scheduled: Sequence[tuple[datetime, int]]


@dataclass(slots=True, frozen=True)
class TopUpClaim:
    """An account's in-flight top-up: ``amount`` counted toward UTC month ``month``."""

    id: str
    amount: int
    month: int
    expires_at: datetime


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
    scope: str | None = None


class ArchiveChanged(DuctoError):
    """
    A row picked for archiving changed (a refund) or left before it was deleted.

    Internal: the store rolls back and `archive_ledger` reads the chunk again.
    """


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
        """Add `delta` to the per-model, per-scope and per-member totals of counted holds."""
        ...

    def held_for(self, acct: Account, model: str | None, scope: str | None) -> int:
        """
        Counted holds on the account that name `model` (None: any model) in `scope` (None:
        any scope). The engine never asks for both None (that is ``acct.reserved``).
        """
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
        scope: str | None = None,
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
        """
        Every usage and team usage row created in ``[start, end)``, net of refunds, and the
        rollups of archived days in that window (`_retention.rollup_events`).
        """
        ...

    # growth: retention and archiving (see `_retention`)
    @property
    def retention(self) -> R.Retention:
        """How long this store keeps idempotency records and finished holds."""
        ...

    def prune(self, kind: R.PruneKind, cutoff: datetime, limit: int, dry_run: bool) -> int:
        """
        Delete up to `limit` records of `kind` past `cutoff`; on a dry run count them all.

        ``idempotency``: records written before `cutoff`. ``holds``: holds no longer counted
        (settled, released or lapsed) that expire before `cutoff`. ``windows``: counters of
        spend-cap windows, allowance months and team-member months that do not contain
        `cutoff` (which is now; see `_retention.window_keys`).
        """
        ...

    def archive_candidates(self, before: datetime, after: int, limit: int) -> list[StoredRow]:
        """Up to `limit` ledger rows of any account created before `before`, after `after`
        in ``seq`` order (``seq`` ascending)."""
        ...

    def archive(
        self,
        rows: Sequence[StoredRow],
        totals: Mapping[R.RollupKey, list[int]],
        before: datetime,
    ) -> None:
        """
        Delete `rows` from the ledger, add `totals` to the stored rollups, remember the rows'
        ids as archived and the cutoff as the archive horizon (the latest cutoff).

        All or nothing: if any row is gone or its ``refunded`` changed since it was read,
        raise `ArchiveChanged` having changed nothing (or inside a transaction the store rolls
        back).
        """
        ...

    def archived(self, transaction_id: str) -> bool:
        """Whether `archive` moved this ledger row out."""
        ...

    def archived_before(self) -> datetime | None:
        """The archive horizon: the latest cutoff `archive` was given (None: never)."""
        ...

    # idempotency
    def recall(
        self,
        acct: Account,
        op: str,
        key: str,
        fingerprint: tuple[object, ...],
        result_type: type[T],
        since: datetime | None,
    ) -> tuple[bool, T | None]:
        """
        Look up an idempotency key of the account for one kind of operation.

        A record written before `since` (past the idempotency retention) counts as unused,
        whether or not it was pruned yet; `remember` then replaces it.

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
    def plan(self, plan_id: str, version: int | None) -> PlanDefinition | None:
        """The plan as pricing version `version` (the one in force) defines it, or None."""
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

    def remove_cap(
        self, acct: Account, cap_type: str, model: str | None, scope: str | None
    ) -> bool:
        """Remove the cap for (type, model, scope); whether one existed."""
        ...

    def window_spend(
        self, user_id: str, cap_type: str, window: int, model: str | None, scope: str | None
    ) -> int:
        """Net paid usage of the user in one window, for one model or (None) all, in one scope
        or (None) all."""
        ...

    def add_spend(
        self, user_id: str, model: str | None, scope: str | None, at: datetime, amount: int
    ) -> None:
        """
        Count `amount` of usage at `at` in the user's daily and monthly windows: for every
        model and for `model`, and, with a `scope`, for the scope on every model and on
        `model`.
        """
        ...

    # auto top-up
    def top_up_claim(self, acct: Account) -> TopUpClaim | None:
        """The account's top-up claim (expired or not), or None."""
        ...

    def put_top_up_claim(self, acct: Account, claim: TopUpClaim | None) -> None:
        """Replace the account's top-up claim (None: remove it)."""
        ...

    def top_up_total(self, acct: Account, month: int) -> int:
        """Top-ups counted toward the account in a UTC month (`_ledger.month_key`)."""
        ...

    def add_top_up_total(self, acct: Account, month: int, delta: int) -> None:
        """Add `delta` to a month's top-up total (a counter `prune` removes once the month
        closed, like the other window counters)."""
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
    def pricing_state(self) -> PricingState:
        """The pointer and the scheduled versions (see `PricingState`)."""
        ...

    def set_pricing_pointer(self, version: int, at: datetime) -> None:
        """Make `version` the one in force from `at` (a publication or an activation)."""
        ...

    def cancel_pricing(self, version: int, at: datetime) -> None:
        """Mark a scheduled version cancelled at `at`."""
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
