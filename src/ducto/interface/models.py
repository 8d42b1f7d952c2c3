"""
Pydantic v2 inputs and results of every store operation.

The names and fields are ducto 1.x's; credits are `int` minor units everywhere, and new
fields have defaults so 1.x code keeps working. Every result with an ``error`` field also has
``ok`` and ``raise_for_error()``.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ducto.errors import ErrorCode, error_from_fields

__all__ = [
    "AddCreditsResult",
    "AddTeamMemberResult",
    "AggregateStatsRow",
    "AllowanceResult",
    "ArchiveResult",
    "BalanceResult",
    "CapCheckResult",
    "ChargeResult",
    "CheckFeatureResult",
    "CreateTeamResult",
    "CreditLot",
    "CreditMetadata",
    "DailySpendRow",
    "DeductionResult",
    "GetUserPlanResult",
    "PlanDefinition",
    "PricingConfigData",
    "PricingConfigHistoryItem",
    "PricingConfigResult",
    "PruneResult",
    "RefundResult",
    "ReleaseResult",
    "RemoveSpendCapResult",
    "RemoveTeamMemberResult",
    "ReserveResult",
    "RoundingMode",
    "SetUserPlanResult",
    "SetupResult",
    "SpendByModelRow",
    "SpendByScopeRow",
    "SpendByUserRow",
    "SpendCap",
    "SweepResult",
    "Team",
    "TeamBalanceResult",
    "TeamDeductionResult",
    "TeamMember",
    "TeamTopupResult",
    "TopUpClaimResult",
    "TopUpResult",
    "TopUserRow",
    "TransactionPage",
    "TransactionRow",
    "TransactionType",
]

TransactionType = Literal[
    "purchase",
    "subscription",
    "signup_bonus",
    "adjustment",
    "usage",
    "refund",
    "expiry",
    "team_usage",
    "team_topup",
]
"""Every kind of ledger row."""

RoundingMode = Literal["ceil", "floor", "half_up", "half_even"]
"""How a Decimal cost becomes whole credits."""


class _Result(BaseModel):
    """A result that may carry a business error code instead of raising."""

    error: ErrorCode | None = None

    @property
    def ok(self) -> bool:
        """True when the operation succeeded (``error`` is None)."""
        return self.error is None

    def raise_for_error(self) -> Self:
        """
        Raise the `CreditError` subclass matching ``error``, or return self when ok.

        Raises:
            CreditError: The subclass for ``error`` (``InsufficientCreditsError``, ...),
                carrying the result's data as attributes.
        """
        if self.error is None:
            return self
        raise error_from_fields(self.error, dict(self))


# -- Metadata ----------------------------------------------------------------------------------


class CreditMetadata(BaseModel):
    """
    Metadata attached to ledger rows and holds.

    The typed fields are the ones ducto itself reads (``model`` drives per-model caps and
    analytics); any other JSON-serialisable key passes through unchanged.
    """

    model_config = ConfigDict(extra="allow")

    input_tokens: int | None = None
    output_tokens: int | None = None
    model: str | None = None
    reference_type: str | None = None
    reference_id: str | None = None
    idempotency_key: str | None = None
    fixed_job: str | None = None
    scope: str | None = None
    """The budget scope a hold or charge counts in (an API key, a project): spend caps
    scoped to it apply, and its usage rows and analytics carry it."""


# -- Pricing configuration ---------------------------------------------------------------------


class PlanDefinition(BaseModel):
    """A subscription plan: a monthly free allowance, rate overrides and feature flags."""

    model_config = ConfigDict(extra="forbid")

    id: str
    name: str
    free_allowance: int = Field(default=0, ge=0, le=2**62, strict=True)
    rate_overrides: dict[str, str] | None = None
    features: dict[str, Any] | None = None


class PricingConfigData(BaseModel):
    """
    A pricing configuration: expressions per model, tool, search and cache, plus plans.

    ducto 1.x configs load unchanged. Unknown keys are refused.
    """

    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = 1
    models: dict[str, str]
    tools: dict[str, str] = Field(default_factory=lambda: {"_default": "tool_calls * 0"})
    search: dict[str, str] = Field(default_factory=dict)
    cache: dict[str, str] = Field(default_factory=dict)
    fixed: dict[str, int] = Field(default_factory=dict)
    min_balance: int = Field(default=5, ge=0, le=2**62, strict=True)
    plans: dict[str, PlanDefinition] | None = None
    rounding: RoundingMode = "ceil"

    @field_validator("models")
    @classmethod
    def _models_not_empty(cls, value: dict[str, str]) -> dict[str, str]:
        if not value:
            raise ValueError("models must define at least one model or '_default'")
        return value

    @field_validator("fixed")
    @classmethod
    def _fixed_non_negative(cls, value: dict[str, int]) -> dict[str, int]:
        for job, cost in value.items():
            if cost < 0:
                raise ValueError(f"fixed cost of {job!r} must be >= 0, got {cost}")
        return value


class PricingConfigResult(BaseModel):
    """
    A stored pricing version.

    ``active`` says whether it is the version in force now (by the store's clock);
    ``effective_at`` is when it takes (or took) effect, ``cancelled_at`` when a scheduled
    version was cancelled before it did.
    """

    id: str
    config: PricingConfigData
    version: int = 1
    label: str | None = None
    active: bool = False
    created_at: datetime | None = None
    effective_at: datetime | None = None
    cancelled_at: datetime | None = None


class PricingConfigHistoryItem(BaseModel):
    """
    A summary of one pricing version, for listings.

    ``scheduled`` is True for a version whose ``effective_at`` is still ahead and that was
    not cancelled.
    """

    id: str
    version: int
    label: str | None = None
    active: bool = False
    created_at: datetime | None = None
    effective_at: datetime | None = None
    cancelled_at: datetime | None = None
    scheduled: bool = False


class SetupResult(BaseModel):
    """What `setup()` created or migrated."""

    tables_created: list[str] = Field(default_factory=list)
    rpcs_created: list[str] = Field(default_factory=list)
    errors: list[str] = Field(default_factory=list)
    schema_version: int = 0

    @property
    def success(self) -> bool:
        """True when setup reported no errors."""
        return not self.errors


# -- Balances, grants, holds -------------------------------------------------------------------


class BalanceResult(BaseModel):
    """
    A user's balance.

    ``balance`` is the ledger balance; ``available`` is what can be spent now: balance minus
    active holds minus expired-but-unswept credits, plus the remaining plan allowance.
    """

    user_id: str
    balance: int = 0
    lifetime_purchased: int = 0
    available: int = 0
    reserved: int = 0
    expired_unswept: int = 0
    allowance_remaining: int = 0


class AddCreditsResult(_Result):
    """
    The outcome of a grant (or a negative adjustment).

    ``amount`` is the signed amount of the ledger row the call wrote (0 when refused);
    ``requested`` is the amount asked for.
    """

    transaction_id: str = ""
    user_id: str
    amount: int
    requested: int = 0
    new_balance: int = 0
    lifetime_purchased: int = 0
    expires_at: datetime | None = None
    available: int = 0
    idempotent: bool = False
    idempotency_key: str | None = None


class ReserveResult(_Result):
    """
    The outcome of `reserve_credits`: a hold, or the reason there is none.

    ``amount`` is the credits held (0 when refused); ``requested`` is the amount asked for.
    A refusal by the floor carries ``min_balance``; one by a spend cap carries the cap's
    ``cap_*`` figures (its window spend and the holds already counted against it).
    """

    reservation_id: str = ""
    user_id: str
    amount: int
    requested: int = 0
    team_id: str | None = None
    balance: int = 0
    reserved_total: int = 0
    expires_at: datetime | None = None
    available: int = 0
    idempotent: bool = False
    idempotency_key: str | None = None
    min_balance: int | None = None
    cap_limit: int | None = None
    cap_spend: int | None = None
    cap_model: str | None = None
    cap_type: Literal["daily", "monthly"] | None = None
    cap_reserved: int | None = None
    cap_scope: str | None = None
    cap_resets_at: datetime | None = None


class DeductionResult(_Result):
    """
    The outcome of settling a hold.

    ``amount`` is the signed amount of the usage row (``-charged``; 0 when refused);
    ``charged`` is what the balance paid (the charge minus ``allowance_consumed``), as a
    positive number; ``shortfall`` is the part of it that took the balance below zero.
    ``available`` is what the account can spend after the settlement (counting the plan
    allowance left when the hold used it). ``team_id`` is set when the hold was on a team
    pool.
    """

    transaction_id: str = ""
    user_id: str
    reservation_id: str = ""
    amount: int = 0
    charged: int = 0
    requested: int = 0
    available: int = 0
    team_id: str | None = None
    balance_after: int = 0
    allowance_consumed: int = 0
    shortfall: int = 0
    idempotent: bool = False
    idempotency_key: str | None = None
    cap_warning: str | None = None


class ChargeResult(DeductionResult):
    """
    The outcome of a one-step charge (a hold and its settlement in one transaction).

    On success it is the settlement; a refusal carries what a refused hold would:
    ``available``, ``min_balance`` and the cap figures.
    """

    min_balance: int | None = None
    cap_limit: int | None = None
    cap_spend: int | None = None
    cap_model: str | None = None
    cap_type: Literal["daily", "monthly"] | None = None
    cap_reserved: int | None = None
    cap_scope: str | None = None
    cap_resets_at: datetime | None = None


class ReleaseResult(_Result):
    """The outcome of `release_reservation`."""

    reservation_id: str
    user_id: str
    team_id: str | None = None
    amount: int = 0
    released: bool = False
    available: int = 0


class RefundResult(_Result):
    """The outcome of refunding (part of) a usage debit."""

    refund_transaction_id: str = ""
    original_transaction_id: str
    user_id: str = ""
    team_id: str | None = None
    amount: int = 0
    requested: int | None = None
    new_balance: int = 0
    refundable: int = 0
    idempotent: bool = False
    idempotency_key: str | None = None


class SweepResult(BaseModel):
    """What a sweep of expired credits found (and, unless a dry run, wrote off)."""

    expired_count: int = 0
    expired_amount: int = 0
    dry_run: bool = False


class PruneResult(BaseModel):
    """
    What `prune` deleted (on a dry run: would delete), per kind of record.

    Attributes:
        idempotency_keys: Stored results of idempotency keys older than the idempotency
            retention.
        holds: Settled, released or lapsed holds whose expiry is older than the hold
            retention.
        windows: Counters of spend-cap windows, allowance months and team-member months
            that have closed (nothing reads them again).
        dry_run: True when nothing was deleted.
    """

    idempotency_keys: int = 0
    holds: int = 0
    windows: int = 0
    dry_run: bool = False


class ArchiveResult(BaseModel):
    """
    What `archive_ledger` moved out of the ledger (on a dry run: would move).

    Attributes:
        rows: Ledger rows written to the archive file and deleted from the ledger.
        before: The cutoff: every row created before it was archived.
        destination: The archive file (gzip'd JSON Lines, one row per line).
        bytes_written: Compressed bytes appended to the file (0 on a dry run).
        dry_run: True when nothing was written or deleted.
    """

    rows: int = 0
    before: datetime
    destination: str
    bytes_written: int = 0
    dry_run: bool = False


# -- Ledger ------------------------------------------------------------------------------------


class TransactionRow(BaseModel):
    """One ledger row. ``user_id`` is the account: a user id, or a team id for team rows."""

    id: str
    user_id: str
    account_type: Literal["user", "team"] = "user"
    amount: int
    type: TransactionType
    balance_after: int
    metadata: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime
    reservation_id: str | None = None
    idempotency_key: str | None = None
    refunded: int = 0


class CreditLot(BaseModel):
    """A grant's unspent remainder, with its expiry (None: never expires)."""

    id: str
    remaining: int
    expires_at: datetime | None = None
    expired: bool = False


class TransactionPage(BaseModel):
    """A page of ledger rows, newest first; pass ``next_cursor`` to get the next page."""

    items: list[TransactionRow] = Field(default_factory=list)
    next_cursor: str | None = None


# -- Plans -------------------------------------------------------------------------------------


class AllowanceResult(BaseModel):
    """The free allowance of the current billing period (the UTC calendar month)."""

    plan_id: str
    allowance_remaining: int
    period_start: str
    period_end: str
    free_allowance: int = 0
    allowance_used: int = 0


class GetUserPlanResult(BaseModel):
    """A user's plan as defined by the active pricing version."""

    user_id: str
    plan_id: str | None = None
    plan_name: str | None = None
    free_allowance: int = 0
    features: dict[str, Any] = Field(default_factory=dict)


class CheckFeatureResult(BaseModel):
    """Whether a user's plan has a feature (present unless absent, None or False)."""

    user_id: str
    feature: str
    value: Any = None
    has_feature: bool = False


class SetUserPlanResult(BaseModel):
    """The plan now recorded for the user."""

    user_id: str
    plan_id: str


# -- Spend caps --------------------------------------------------------------------------------


class SpendCap(BaseModel):
    """
    A per-user spend limit over the UTC day or UTC month, optionally for one model.

    Accepts both ``cap_type=`` and its 1.x alias ``type=``. ``deny`` caps refuse holds that
    would exceed them; ``warn`` and ``notify`` caps only report.
    """

    model_config = ConfigDict(populate_by_name=True)

    user_id: str = ""
    cap_type: Literal["daily", "monthly"] = Field(default="daily", alias="type")
    model: str | None = None
    limit: int = Field(default=0, ge=0, le=2**62, strict=True)
    action: Literal["deny", "warn", "notify"] = "deny"
    scope: str | None = None
    """Only usage in this scope counts and is capped (``CreditMetadata.scope``, an API key or
    a project); None covers all of the user's usage."""


class CapCheckResult(BaseModel):
    """
    An advisory cap check of the most pressing matching cap.

    ``exceeded`` is True when window spend plus active holds plus the amount goes over that
    cap's limit; ``capped`` is True only when that cap would refuse the call (a ``deny``
    cap), as in ducto 1.x: an exceeded ``warn`` or ``notify`` cap lets the call through and
    says so in ``action``. ``action`` is None when no cap applies.
    """

    capped: bool = False
    exceeded: bool = False
    current_spend: int = 0
    cap_limit: int = 0
    action: Literal["deny", "warn", "notify"] | None = None
    model: str | None = None
    reserved: int = 0
    cap_type: Literal["daily", "monthly"] | None = None
    scope: str | None = None
    resets_at: datetime | None = None
    """When the cap's window (UTC day or month) ends and its spend starts again from 0."""


class RemoveSpendCapResult(BaseModel):
    """Whether a cap was removed."""

    user_id: str
    cap_type: Literal["daily", "monthly"]
    model: str | None = None
    removed: bool = False
    scope: str | None = None


# -- Teams -------------------------------------------------------------------------------------


class TeamBalanceResult(_Result):
    """A team pool's balance."""

    team_id: str = ""
    name: str = ""
    balance: int = 0
    member_count: int = 0
    available: int = 0
    reserved: int = 0


class TeamMember(BaseModel):
    """A team member, with its cap and its net team spend in the current UTC month."""

    user_id: str = ""
    role: str = ""
    spend_cap: int | None = None
    total_spent: int = 0


class Team(BaseModel):
    """A team pool as ducto 1.x named it: its id, name and ledger balance."""

    team_id: str = ""
    name: str = ""
    balance: int = 0
    member_count: int = 0


class CreateTeamResult(BaseModel):
    """A new team."""

    team_id: str = ""
    name: str = ""
    balance: int = 0
    transaction_id: str | None = None


class AddTeamMemberResult(_Result):
    """The membership as recorded."""

    team_id: str = ""
    user_id: str = ""
    role: str = "member"
    spend_cap: int | None = None


class RemoveTeamMemberResult(_Result):
    """Whether a member was removed."""

    team_id: str
    user_id: str
    removed: bool = False


class TeamTopupResult(_Result):
    """The outcome of adding credits to a team pool."""

    transaction_id: str = ""
    team_id: str
    amount: int
    requested: int = 0
    team_balance_after: int = 0
    idempotent: bool = False
    idempotency_key: str | None = None


class TeamDeductionResult(_Result):
    """
    The outcome of charging a team pool on behalf of a member.

    ``amount`` is the signed amount of the ``team_usage`` row (``-charged``; 0 when
    refused); ``charged`` is the positive figure, ``requested`` the amount asked for.
    """

    transaction_id: str = ""
    team_id: str = ""
    user_id: str = ""
    amount: int = 0
    charged: int = 0
    requested: int = 0
    team_balance_after: int = 0
    available: int = 0
    idempotent: bool = False
    idempotency_key: str | None = None
    cap_limit: int | None = None
    cap_spend: int | None = None
    cap_type: Literal["daily", "monthly"] | None = None
    cap_reserved: int | None = None
    cap_resets_at: datetime | None = None


# -- Auto top-up -------------------------------------------------------------------------------


class TopUpClaimResult(BaseModel):
    """
    The outcome of `claim_top_up`: the account's one in-flight top-up, or why there is none.

    ``reason`` is None when the claim was made; otherwise ``not_needed`` (available is not
    below the threshold), ``in_flight`` (another top-up holds an unexpired claim) or
    ``monthly_limit`` (the amount would take this UTC month's top-ups past the limit).
    ``month_total`` counts this month's claimed top-ups, this one included; a failed top-up
    gives its amount back.
    """

    user_id: str
    claimed: bool = False
    reason: Literal["not_needed", "in_flight", "monthly_limit"] | None = None
    claim_id: str = ""
    amount: int = 0
    available: int = 0
    month_total: int = 0
    expires_at: datetime | None = None


class TopUpResult(BaseModel):
    """
    The outcome of `finish_top_up`.

    With a payment reference, ``grant`` is the ``purchase`` grant made under that reference
    as its idempotency key (replayed when the same payment finishes twice); without one (the
    charge failed) there is no grant and the claim's amount no longer counts toward the month.
    ``released`` says whether the call ended the account's in-flight claim (False when the
    claim had already expired and been replaced, or was finished before).
    """

    user_id: str
    claim_id: str
    released: bool = False
    grant: AddCreditsResult | None = None
    month_total: int = 0


# -- Analytics ---------------------------------------------------------------------------------


class SpendByUserRow(BaseModel):
    """Net paid usage of one user in a window."""

    user_id: str = ""
    total_spend: int = 0
    transaction_count: int = 0


class SpendByScopeRow(BaseModel):
    """Net paid usage of one user in one budget scope in a window (``scope`` None: unscoped)."""

    user_id: str = ""
    scope: str | None = None
    total_spend: int = 0
    transaction_count: int = 0


class SpendByModelRow(BaseModel):
    """Net paid usage of one model in a window (``unknown`` when rows named no model)."""

    model: str = ""
    total_spend: int = 0
    transaction_count: int = 0


class TopUserRow(BaseModel):
    """One of the users who spent most in a window."""

    user_id: str = ""
    total_spend: int = 0


class DailySpendRow(BaseModel):
    """Net paid usage of one UTC day (``date`` is ``YYYY-MM-DD``)."""

    date: str = ""
    total_spend: int = 0
    transaction_count: int = 0


class AggregateStatsRow(BaseModel):
    """Totals over a window; ``avg_daily_spend`` divides by the UTC days the window spans."""

    total_credits_consumed: int = 0
    active_users: int = 0
    avg_daily_spend: Decimal = Decimal(0)
    top_model: str = ""
    top_user: str = ""
    transaction_count: int = 0
