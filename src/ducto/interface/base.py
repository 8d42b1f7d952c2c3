"""
The store contract as a `typing.Protocol`, and the store-level exceptions.

A store does not need to subclass `CreditStore`: matching it is enough. Every method's meaning
is documented here, once; ``docs/contract.md`` states the rules and the decisions behind them,
and the shared contract test suite proves them for every store on asyncio and trio.

Conventions every method follows:

- Credits are `int` minor units; amounts are checked (an `int`, not a `bool`, within
  ``1 ..= 2**62`` unless zero is meaningful) before anything changes.
- Expected business outcomes come back on the result (``result.error``, an `ErrorCode`;
  ``result.ok``; ``result.raise_for_error()``), and a refused call changes nothing. A
  result's ``amount`` is the signed amount of the ledger row the call wrote (0 when it wrote
  none); ``requested`` is what was asked for.
- Misuse raises `InvalidArgumentError` naming the parameter; a backend failure raises
  `StoreError` with the driver's exception chained.
- Every datetime returned is aware UTC. Aware inputs in any zone are converted; naive inputs
  are local time, as `datetime.astimezone` reads them.
- Idempotency keys are scoped per account and per kind of operation; a key replays its
  original result (``idempotent=True``), and a key reused for a different request is
  refused with ``idempotency_conflict``. A key is kept for the store's
  ``idempotency_retention`` (7 days by default) after its first use; past it, the key is a
  new request (see `CreditStore.prune`).
- Analytics read archived days (see `CreditStore.archive_ledger`) from daily totals: a
  window bound before the latest archive cutoff must be a UTC midnight, else
  `InvalidArgumentError` names it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from os import PathLike
from types import TracebackType
from typing import Literal, Protocol, Self, runtime_checkable

from ducto.errors import StoreError, StoreUnavailableError, UnsupportedAsyncLibraryError
from ducto.interface.models import (
    AddCreditsResult,
    AddTeamMemberResult,
    AggregateStatsRow,
    AllowanceResult,
    ArchiveResult,
    BalanceResult,
    CapCheckResult,
    ChargeResult,
    CheckFeatureResult,
    CreateTeamResult,
    CreditLot,
    CreditMetadata,
    DailySpendRow,
    DeductionResult,
    GetUserPlanResult,
    PricingConfigData,
    PricingConfigHistoryItem,
    PricingConfigResult,
    PruneResult,
    RefundResult,
    ReleaseResult,
    RemoveSpendCapResult,
    RemoveTeamMemberResult,
    ReserveResult,
    SetupResult,
    SetUserPlanResult,
    SpendByModelRow,
    SpendByScopeRow,
    SpendByUserRow,
    SpendCap,
    SweepResult,
    TeamBalanceResult,
    TeamDeductionResult,
    TeamMember,
    TeamTopupResult,
    TopUpClaimResult,
    TopUpResult,
    TopUserRow,
    TransactionPage,
)

__all__ = ["CreditStore", "StoreError", "StoreUnavailableError", "UnsupportedAsyncLibraryError"]


@runtime_checkable
class CreditStore(Protocol):
    """Balances, holds, ledger, plans, teams, caps and pricing versions for many users."""

    async def __aenter__(self) -> Self:
        """Open the store (connect, start workers); constructors do no I/O."""
        ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the store."""
        ...

    async def aclose(self) -> None:
        """Close the store; later calls raise `StoreError`. Closing twice is harmless."""
        ...

    async def setup(self, database_url: str | None = None) -> SetupResult:
        """
        Create or migrate the schema to this version of ducto.

        Idempotent and safe to run from every process at every deploy.

        Args:
            database_url: Accepted for ducto 1.x compatibility; the store's own location is
                used.

        Returns:
            SetupResult listing what was created (nothing when the schema was current).

        Raises:
            StoreError: The schema is newer than this ducto understands.
        """
        ...

    # -- balances and grants ---------------------------------------------------------------

    async def get_balance(self, user_id: str) -> BalanceResult:
        """
        Report a user's balance.

        Args:
            user_id: The account; unknown users read as zeros.

        Returns:
            BalanceResult with ``balance`` (the ledger sum), ``reserved`` (active holds),
            ``expired_unswept``, ``allowance_remaining`` (the plan allowance left this UTC
            month) and ``available`` (balance minus holds minus expired credits, plus the
            allowance left).
        """
        ...

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

        A credit first pays a negative balance; the rest becomes a lot with its own expiry.
        A negative adjustment consumes lots like a debit.

        Args:
            user_id: The account.
            amount: Credits (> 0; an ``adjustment`` may be negative).
            type: ``purchase`` (counts toward ``lifetime_purchased``), ``subscription``,
                ``signup_bonus`` or ``adjustment``.
            metadata: Stored on the ledger row (a `CreditMetadata` or a dict).
            expires_at: When the lot stops being spendable; must be in the future.
            idempotency_key: A repeated key returns the original result and grants once (a
                webhook delivered twice grants once).

        Returns:
            AddCreditsResult; ``error`` is ``insufficient_credits`` when a negative
            adjustment would take available below zero, or ``idempotency_conflict``.
        """
        ...

    # -- holds -----------------------------------------------------------------------------

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

        Refused with ``insufficient_credits`` when spendable minus `amount` would fall below
        `min_balance`, then with ``spend_cap_exceeded`` when a deny cap covering the hold
        (a cap without a model, or the model ``metadata.model`` names) would see window
        spend plus active holds plus `amount` over its limit; when several would, the one
        with the least headroom is reported.

        Args:
            user_id: The account.
            amount: Credits to hold (>= 1).
            operation_type: What the hold is for (stored on the usage row it settles into).
            metadata: ``metadata.model`` makes the hold count toward that model's caps, and
                ``metadata.scope`` (an API key, a project) toward the caps scoped to it; the
                settlement's usage row and spend windows carry both.
            min_balance: The floor spendable credits must stay at or above after the hold
                (ducto 1.x's default of 5).
            ttl: Seconds (or a timedelta, at most 366 days) until the hold stops counting.
                A hold past its TTL can still be settled or released.
            use_allowance: Count (and later consume) the remaining plan allowance first.
            idempotency_key: A repeated key returns the original hold.

        Returns:
            ReserveResult with the hold (``amount`` held, ``expires_at``, ``available``
            after it), or ``error`` ``insufficient_credits`` (with ``min_balance``),
            ``spend_cap_exceeded`` (with the cap's figures) or ``idempotency_conflict``.
        """
        ...

    async def deduct_credits(
        self,
        user_id: str,
        reservation_id: str,
        amount: int,
        idempotency_key: str | None = None,
        metadata: CreditMetadata | None = None,
        *,
        team_id: str | None = None,
    ) -> DeductionResult:
        """
        Settle a hold, charging `amount` in full.

        The plan allowance pays first when the hold was made with ``use_allowance``, then the
        lots in burn-down order. A charge larger than the account can cover takes the balance
        negative and is reported as ``shortfall``; nothing is forgiven. A hold whose TTL
        passed can still be settled (the work happened).

        Args:
            user_id: The account that owns the hold (for a team hold, the member it is
                attributed to).
            reservation_id: The id the hold was placed with.
            amount: The actual cost (>= 0; 0 settles and charges nothing).
            idempotency_key: A repeated key with the same hold and amount returns the
                original result; with anything else, ``idempotency_conflict``.
            metadata: Stored on the usage row; ``model`` attributes the spend. The system
                keys (model, operation type, reservation id, idempotency key, allowance
                consumed) win over the caller's.
            team_id: The team pool, for a hold placed by `reserve_team_credits`.

        Returns:
            DeductionResult (``amount`` is the usage row's signed amount, ``charged`` what the
            balance paid, ``available`` what is left to spend), or ``error``
            ``reservation_not_found``, ``reservation_already_settled``,
            ``reservation_released`` or ``idempotency_conflict``.
        """
        ...

    async def charge_credits(
        self,
        user_id: str,
        amount: int,
        operation_type: str,
        metadata: CreditMetadata | None = None,
        min_balance: int = 5,
        *,
        use_allowance: bool = False,
        idempotency_key: str | None = None,
    ) -> ChargeResult:
        """
        Hold `amount` and settle it for `amount`, in one atomic step.

        Exactly `reserve_credits` followed by `deduct_credits` with the same key, in one
        transaction: the same refusals (the floor, then deny caps), the same allowance use,
        the same usage row, and the same idempotency keys (the key is recorded for both the
        hold and its settlement, so a request first made either way replays, and one whose
        hold was placed but never settled is settled now).

        Args:
            user_id: The account.
            amount: The cost (>= 0).
            operation_type: What the charge is for.
            metadata: Stored on the usage row; ``model`` applies per-model caps.
            min_balance: The floor spendable credits must stay at or above.
            use_allowance: Spend the remaining plan allowance first.
            idempotency_key: The request's id; a retry is charged once.

        Returns:
            ChargeResult: the settlement, or a refusal (``insufficient_credits``,
            ``spend_cap_exceeded``, ``idempotency_conflict``, or the settlement errors of a
            hold the key placed earlier) carrying ``available`` and the cap's figures.
        """
        ...

    async def release_reservation(
        self, user_id: str, reservation_id: str, *, team_id: str | None = None
    ) -> ReleaseResult:
        """
        Free a hold so its credits count as available again.

        Releasing twice is harmless; a hold that was already settled cannot be released.

        Args:
            user_id: The account that owns the hold (for a team hold, its member).
            reservation_id: The id the hold was placed with.
            team_id: The team pool, for a hold placed by `reserve_team_credits`.

        Returns:
            ReleaseResult with ``error`` set to ``reservation_not_found`` or
            ``reservation_already_settled`` when nothing was released.
        """
        ...

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
        can take becomes a non-expiring lot. Refunds are cumulative and count against the
        spend windows of the usage they refund.

        Args:
            transaction_id: The usage row to refund.
            amount: Credits to refund (>= 1); None refunds whatever is left.
            reason: Stored on the refund row.
            metadata: Stored on the refund row.
            idempotency_key: A repeated key returns the original refund.

        Returns:
            RefundResult, or ``error`` ``transaction_not_found``, ``transaction_archived``
            (the row was moved out by `archive_ledger`), ``not_refundable``,
            ``already_refunded``, ``over_refund`` or ``idempotency_conflict``.
        """
        ...

    async def sweep_expired_credits(self, dry_run: bool = False) -> SweepResult:
        """
        Write off the unspent remainder of every expired lot, one ``expiry`` row per lot.

        Expired credits were already unspendable; a sweep makes the ledger say so. A second
        sweep finds nothing.

        Args:
            dry_run: Report what would be written off without changing anything.

        Returns:
            SweepResult: ``expired_count`` lots, ``expired_amount`` credits.
        """
        ...

    # -- bounded growth --------------------------------------------------------------------

    async def prune(
        self, *, dry_run: bool = False, progress: Callable[[PruneResult], object] | None = None
    ) -> PruneResult:
        """
        Delete the replay data retention no longer keeps, and the counters of closed windows.

        Three kinds of record go, each in chunks of 1,000 per transaction, so traffic runs
        between chunks and no lock is held for long:

        - idempotency records written longer ago than the store's ``idempotency_retention``.
          Such a key is already a new request whether or not `prune` has deleted its record
          (the boundary does not depend on when `prune` runs);
        - holds nothing counts any more (settled, released, or lapsed unsettled) whose expiry
          time is longer ago than the store's ``hold_retention``. Such a hold then reads as
          unknown (``reservation_not_found``). A hold that lapsed on an account nothing has
          touched since still counts in that account's totals, and stays until the next
          operation on the account lapses it;
        - the counters of closed windows: spend-cap days and months, allowance months and
          team members' months before the current UTC day or month, which nothing reads again.

        A retention of None keeps that kind for ever. Safe while traffic flows and from
        several processes at once: each chunk is its own short transaction and deletes only
        what is past retention at that moment, so two prunes at once only share the work.

        Args:
            dry_run: Count what would be deleted and delete nothing.
            progress: Called with the running totals after each chunk that deleted (or, on a
                dry run, counted) something, on the caller's event loop; for progress reports
                on a long first prune.

        Returns:
            PruneResult: the records deleted (or that would be) per kind:
            ``idempotency_keys``, ``holds``, ``windows``, and ``dry_run``.

        Raises:
            InvalidArgumentError: `dry_run` is not a bool or `progress` is not callable.
        """
        ...

    async def archive_ledger(
        self,
        before: datetime,
        destination: str | PathLike[str],
        *,
        dry_run: bool = False,
        progress: Callable[[ArchiveResult], object] | None = None,
    ) -> ArchiveResult:
        """
        Move every ledger row created before `before` out of the store, into a file.

        The rows (of every account, user and team) are appended to `destination` as gzip'd
        JSON Lines, oldest first, in chunks of 2,000: one gzip member per chunk (members
        concatenate, so ``gzip.open`` reads the file as one stream), one row per line with the
        public transaction fields (those of `TransactionRow`) plus ``seq``, ``spender``,
        ``model``, ``operation_type`` and ``allowance``. Each chunk is written and synced
        before its rows are deleted, in one transaction that also keeps their paid usage as
        daily rollups. The chunk is deleted only if none of its rows changed since it was
        read; a refund that got there first makes the chunk be read again. After an
        interrupted run (a crash, a cancellation, a lost connection) a chunk may be in the
        file twice, with the same ids, but a row is never deleted without being in the file.
        An existing file is appended to.

        What stays is exact: balances, lots, holds, and every kept row (``balance_after``,
        refunds, `list_transactions` paging). Archived paid usage is kept as rollups (net
        spend and row count per UTC day, user and model), so analytics over archived days
        give the same answers as before for windows whose bounds there are UTC midnights; an
        analytics window bound inside an archived day (before the latest cutoff) is refused
        with `InvalidArgumentError`. A refund of an archived row is refused with
        ``transaction_archived``.

        Args:
            before: The cutoff, an aware datetime that is a UTC midnight no later than the
                start of the current UTC month, so no open spend-cap window or allowance
                month loses a row.
            destination: The archive file (its folder must exist).
            dry_run: Count the rows that would be archived; write and delete nothing.
            progress: Called with the running totals after each chunk, on the caller's event
                loop.

        Returns:
            ArchiveResult: ``rows`` archived (or that would be), the ``before`` cutoff (UTC),
            the ``destination``, the compressed ``bytes_written`` and ``dry_run``.

        Raises:
            InvalidArgumentError: `before` is naive, not a UTC midnight, or later than the
                start of the current UTC month; `destination` is not a file path in an
                existing folder; `dry_run` or `progress` is invalid.
            OSError: The archive file cannot be written (no row was deleted for its chunk).
        """
        ...

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
            cursor: ``next_cursor`` of the previous page; rows added later never shift a
                page.
            types: Only rows of these transaction types.
            start: Only rows created at or after this instant.
            end: Only rows created before this instant.

        Returns:
            TransactionPage; ``next_cursor`` is None on the last page.
        """
        ...

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
        ...

    async def list_lots(self, user_id: str) -> list[CreditLot]:
        """
        The user's lots that still hold credits, in the order debits consume them.

        Unexpired lots come first (soonest-expiring first, non-expiring last, oldest first
        among equals), then expired lots not yet swept (``expired=True``).
        """
        ...

    # -- pricing ---------------------------------------------------------------------------

    async def get_active_pricing(self) -> PricingConfigResult | None:
        """
        The version in force now by the store's clock, or None before any took effect.

        The version in force is the latest of: the last version published at once or
        activated (from that instant), and every scheduled version whose ``effective_at`` has
        passed and that was not cancelled.
        """
        ...

    async def set_active_pricing(
        self,
        config: PricingConfigData,
        label: str | None = None,
        *,
        effective_at: datetime | None = None,
    ) -> str:
        """
        Publish `config` as version highest + 1 (never reusing a number).

        Without `effective_at` (or with one not after the store's clock) the version is in
        force at once. With a later `effective_at` it is scheduled: the version in force does
        not change until then, and the scheduled one can be cancelled until then
        (`cancel_pricing`). Versions never change once published (but for being cancelled).
        The config is refused unless the pricing engine can price it, so no manager ever
        loads a version it cannot use.

        Args:
            config: The configuration (a dict is validated into `PricingConfigData`).
            label: A free-text label.
            effective_at: When the version takes effect (an aware datetime).

        Returns:
            The new version's id.

        Raises:
            InvalidArgumentError: The config, label or `effective_at` is invalid
                (`ExpressionError` names the section, key and position of a bad expression).
        """
        ...

    async def activate_pricing(self, version: int) -> str:
        """
        Put an existing version in force now without creating a new one; return its id.

        A rollback holds until the next scheduled version takes effect.

        Raises:
            PricingVersionNotFoundError: No such version.
            PricingVersionInEffectError: The version was cancelled.
        """
        ...

    async def cancel_pricing(self, version: int) -> PricingConfigResult:
        """
        Cancel a scheduled version before it takes effect; returns it with ``cancelled_at``.

        Cancelling a cancelled version again changes nothing.

        Raises:
            PricingVersionNotFoundError: No such version.
            PricingVersionInEffectError: The version has taken effect (or was activated).
        """
        ...

    async def get_pricing_config(self, version: int) -> PricingConfigResult | None:
        """One pricing version, or None if there is no such version."""
        ...

    async def get_pricing_history(self) -> list[PricingConfigHistoryItem]:
        """Every pricing version, newest first."""
        ...

    # -- plans -----------------------------------------------------------------------------

    async def get_user_plan(self, user_id: str) -> GetUserPlanResult:
        """The user's plan as the active pricing version defines it (empty if none)."""
        ...

    async def set_user_plan(self, user_id: str, plan_id: str) -> SetUserPlanResult:
        """
        Record the user's plan.

        Raises:
            InvalidArgumentError: The active pricing version does not define `plan_id`.
        """
        ...

    async def check_feature(self, user_id: str, feature: str) -> CheckFeatureResult:
        """Whether the user's plan has `feature` (present unless absent, None or False)."""
        ...

    async def check_allowance(self, user_id: str) -> AllowanceResult:
        """The plan allowance of the current UTC month: total, used, left and the period."""
        ...

    async def increment_usage_window(self, user_id: str, plan_id: str, amount: int) -> None:
        """Record `amount` of allowance consumed in the current UTC month."""
        ...

    # -- spend caps ------------------------------------------------------------------------

    async def check_spend_cap(
        self,
        user_id: str,
        model: str | None = None,
        amount: int | None = None,
        *,
        scope: str | None = None,
    ) -> CapCheckResult:
        """
        Advisory: would `amount` more (on `model`, in `scope`) go over one of the user's caps?

        Counts window spend plus active holds plus `amount`, as `reserve_credits` does, and
        reports the most pressing matching cap: a tripped deny cap first, then a tripped
        warn/notify cap, else the cap with the least headroom. ``capped`` is True only when
        that cap would refuse the call (a deny cap), as in ducto 1.x; ``exceeded`` says the
        limit would be passed whatever the action. ``resets_at`` is when that cap's window
        ends. Caps scoped to another scope than `scope` do not apply.
        """
        ...

    async def set_spend_cap(self, cap: SpendCap) -> SpendCap:
        """Create or replace the cap for (user, cap type, model, scope); returns the stored
        cap."""
        ...

    async def list_spend_caps(self, user_id: str) -> list[SpendCap]:
        """The user's caps, daily before monthly, then the all-model cap, then by model, then
        the unscoped cap, then by scope."""
        ...

    async def remove_spend_cap(
        self,
        user_id: str,
        cap_type: Literal["daily", "monthly"],
        model: str | None = None,
        *,
        scope: str | None = None,
    ) -> RemoveSpendCapResult:
        """Remove the cap for (user, cap type, model, scope); ``removed`` says whether one
        existed."""
        ...

    # -- auto top-up -----------------------------------------------------------------------

    async def claim_top_up(
        self,
        user_id: str,
        *,
        threshold: int,
        amount: int,
        monthly_limit: int,
        ttl: float | timedelta = 300.0,
    ) -> TopUpClaimResult:
        """
        Claim the user's one in-flight top-up, atomically.

        The claim is made only if the user's available credits (plan allowance included,
        as low-balance events count them) are below `threshold`, no other claim on the
        account is unexpired, and this UTC month's top-ups plus `amount` stay within
        `monthly_limit`; `amount` counts toward the month from the claim on. So however many
        processes see one crossing, one of them charges. A claim expires after `ttl`
        (a crashed process's claim stops blocking the next crossing); its amount keeps
        counting toward its month, because its payment may have been taken.

        Returns:
            TopUpClaimResult: ``claimed`` with the ``claim_id``, or the ``reason`` there is
            none (``not_needed``, ``in_flight``, ``monthly_limit``).

        Raises:
            InvalidArgumentError: An argument is invalid (naming it); nothing was changed.
        """
        ...

    async def finish_top_up(
        self,
        user_id: str,
        claim_id: str,
        amount: int,
        *,
        payment_reference: str | None = None,
        metadata: CreditMetadata | None = None,
    ) -> TopUpResult:
        """
        Finish a claimed top-up, atomically.

        With `payment_reference` (the payment succeeded), `amount` is granted as a
        ``purchase`` with the reference as its idempotency key, so a payment is granted once
        however often it is finished; without it (the charge failed), nothing is granted
        and the claim's amount no longer counts toward the month. Either way the claim ends
        (if it is still the account's). A claim that expired is still granted.

        Raises:
            InvalidArgumentError: An argument is invalid, or `amount` is not the claim's.
        """
        ...

    # -- teams -----------------------------------------------------------------------------

    async def create_team(self, name: str, initial_balance: int = 0) -> CreateTeamResult:
        """Create a team pool, optionally with an initial ``team_topup``."""
        ...

    async def add_team_member(
        self,
        team_id: str,
        user_id: str,
        role: str = "member",
        spend_cap: int | None = None,
    ) -> AddTeamMemberResult:
        """Add a member, or update its role and monthly team spend cap."""
        ...

    async def remove_team_member(self, team_id: str, user_id: str) -> RemoveTeamMemberResult:
        """Remove a member; ``removed`` is False when the user was not a member."""
        ...

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
        ...

    async def get_team_balance(self, team_id: str) -> TeamBalanceResult:
        """A team pool's balance; ``error`` is ``team_not_found`` for an unknown team."""
        ...

    async def get_team_members(self, team_id: str) -> list[TeamMember]:
        """A team's members (by user id) with their net team spend this UTC month."""
        ...

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
            TeamDeductionResult, or ``error`` ``team_not_found``, ``idempotency_conflict``,
            ``user_not_in_team``, ``insufficient_team_balance`` (a pool cannot go negative)
            or ``spend_cap_exceeded`` (the member's net team spend this UTC month, plus its
            active team holds, plus `amount`, over its cap), checked in that order.
        """
        ...

    async def reserve_team_credits(
        self,
        team_id: str,
        user_id: str,
        amount: int,
        operation_type: str,
        metadata: CreditMetadata | None = None,
        *,
        ttl: float | timedelta = 600.0,
        idempotency_key: str | None = None,
    ) -> ReserveResult:
        """
        Hold credits on a team pool for a member's upcoming call.

        Refused like `deduct_team` (``team_not_found``, ``idempotency_conflict``,
        ``user_not_in_team``, ``insufficient_team_balance``, ``spend_cap_exceeded`` with the
        member's cap counting its other active team holds), atomically. Settle it with
        `deduct_credits` (a ``team_usage`` row) or free it with `release_reservation`, both
        with ``team_id=``.

        Args:
            team_id: The pool.
            user_id: The member the hold (and its spend) is attributed to.
            amount: Credits to hold (>= 1).
            operation_type: What the hold is for.
            metadata: ``model`` is recorded on the usage row.
            ttl: Seconds (or a timedelta) until the hold stops counting.
            idempotency_key: A repeated key returns the original hold.

        Returns:
            ReserveResult with ``team_id`` set (``balance`` and ``available`` are the
            pool's), or the refusal.
        """
        ...

    # -- analytics -------------------------------------------------------------------------

    async def spend_by_user(self, start: datetime, end: datetime) -> list[SpendByUserRow]:
        """Net paid usage per user in ``[start, end)``, by spend descending then user id."""
        ...

    async def spend_by_model(self, start: datetime, end: datetime) -> list[SpendByModelRow]:
        """Net paid usage per model in ``[start, end)``, by spend descending then model."""
        ...

    async def daily_spend(self, start: datetime, end: datetime) -> list[DailySpendRow]:
        """Net paid usage per UTC day in ``[start, end)``, oldest day first."""
        ...

    async def top_users(self, limit: int, start: datetime, end: datetime) -> list[TopUserRow]:
        """The `limit` users (1 to 1000) with most net paid usage in ``[start, end)``."""
        ...

    async def spend_by_scope(
        self, start: datetime, end: datetime, *, user_id: str | None = None
    ) -> list[SpendByScopeRow]:
        """
        Net paid usage per user and budget scope in ``[start, end)`` (``scope`` None for
        unscoped usage), one user's with `user_id`; by spend descending, then user, then
        scope.
        """
        ...

    async def aggregate_stats(self, start: datetime, end: datetime) -> AggregateStatsRow:
        """Totals over ``[start, end)``: spend, active users, average per UTC day, top model
        and user."""
        ...
