"""
The store contract as a `typing.Protocol`, and the store-level exceptions.

A store does not need to subclass `CreditStore`: matching it is enough. The meaning of every
method is in the project documentation (``docs/contract.md``) and is proven for each store by
the shared contract test suite.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from types import TracebackType
from typing import Literal, Protocol, Self, runtime_checkable

from ducto.errors import StoreError, StoreUnavailableError, UnsupportedAsyncLibraryError
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
        """Create or migrate the schema. Idempotent and safe on every deploy."""
        ...

    # -- balances and grants ---------------------------------------------------------------

    async def get_balance(self, user_id: str) -> BalanceResult:
        """Report the ledger balance, holds, unswept expired credits and what is available."""
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
        """Grant credits as a new lot (or, for a negative ``adjustment``, take them)."""
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
        """Hold credits for an upcoming operation, enforcing the floor and deny caps."""
        ...

    async def deduct_credits(
        self,
        user_id: str,
        reservation_id: str,
        amount: int,
        idempotency_key: str | None = None,
        metadata: CreditMetadata | None = None,
    ) -> DeductionResult:
        """Settle a hold, charging the actual amount in full."""
        ...

    async def release_reservation(self, user_id: str, reservation_id: str) -> ReleaseResult:
        """Free a hold; releasing twice is harmless."""
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
        """Refund (part of) a usage or team usage debit into the lots it drew from."""
        ...

    async def sweep_expired_credits(self, dry_run: bool = False) -> SweepResult:
        """Write off the unspent remainder of every expired lot."""
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
        """Page a user's ledger, newest first."""
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
        """Page a team pool's ledger, newest first."""
        ...

    async def list_lots(self, user_id: str) -> list[CreditLot]:
        """The user's lots that still hold credits, in the order debits consume them."""
        ...

    # -- pricing ---------------------------------------------------------------------------

    async def get_active_pricing(self) -> PricingConfigResult | None:
        """The active pricing version, or None before any was published."""
        ...

    async def set_active_pricing(self, config: PricingConfigData, label: str | None = None) -> str:
        """Publish `config` as a new version (highest + 1), make it active, return its id."""
        ...

    async def activate_pricing(self, version: int) -> str:
        """Make an existing version active; return its id."""
        ...

    async def get_pricing_config(self, version: int) -> PricingConfigResult | None:
        """One pricing version, or None."""
        ...

    async def get_pricing_history(self) -> list[PricingConfigHistoryItem]:
        """Every pricing version, newest first."""
        ...

    # -- plans -----------------------------------------------------------------------------

    async def get_user_plan(self, user_id: str) -> GetUserPlanResult:
        """The user's plan as the active pricing version defines it."""
        ...

    async def set_user_plan(self, user_id: str, plan_id: str) -> SetUserPlanResult:
        """Record the user's plan."""
        ...

    async def check_feature(self, user_id: str, feature: str) -> CheckFeatureResult:
        """Whether the user's plan has `feature`."""
        ...

    async def check_allowance(self, user_id: str) -> AllowanceResult:
        """The plan allowance left in the current UTC month."""
        ...

    async def increment_usage_window(self, user_id: str, plan_id: str, amount: int) -> None:
        """Record allowance consumption in the current UTC month."""
        ...

    # -- spend caps ------------------------------------------------------------------------

    async def check_spend_cap(
        self, user_id: str, model: str | None = None, amount: int | None = None
    ) -> CapCheckResult:
        """Advisory: would `amount` more trip a cap?"""
        ...

    async def set_spend_cap(self, cap: SpendCap) -> SpendCap:
        """Create or replace the cap for (user, cap type, model)."""
        ...

    async def list_spend_caps(self, user_id: str) -> list[SpendCap]:
        """The user's caps."""
        ...

    async def remove_spend_cap(
        self,
        user_id: str,
        cap_type: Literal["daily", "monthly"],
        model: str | None = None,
    ) -> RemoveSpendCapResult:
        """Remove the cap for (user, cap type, model)."""
        ...

    # -- teams -----------------------------------------------------------------------------

    async def create_team(self, name: str, initial_balance: int = 0) -> CreateTeamResult:
        """Create a team pool."""
        ...

    async def add_team_member(
        self,
        team_id: str,
        user_id: str,
        role: str = "member",
        spend_cap: int | None = None,
    ) -> AddTeamMemberResult:
        """Add a member, or update its role and monthly cap."""
        ...

    async def remove_team_member(self, team_id: str, user_id: str) -> RemoveTeamMemberResult:
        """Remove a member."""
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
        """Top up a team pool."""
        ...

    async def get_team_balance(self, team_id: str) -> TeamBalanceResult:
        """A team pool's balance."""
        ...

    async def get_team_members(self, team_id: str) -> list[TeamMember]:
        """A team's members with their spend this UTC month."""
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
        """Charge the team pool on behalf of a member."""
        ...

    # -- analytics -------------------------------------------------------------------------

    async def spend_by_user(self, start: datetime, end: datetime) -> list[SpendByUserRow]:
        """Net paid usage per user in ``[start, end)``."""
        ...

    async def spend_by_model(self, start: datetime, end: datetime) -> list[SpendByModelRow]:
        """Net paid usage per model in ``[start, end)``."""
        ...

    async def daily_spend(self, start: datetime, end: datetime) -> list[DailySpendRow]:
        """Net paid usage per UTC day in ``[start, end)``."""
        ...

    async def top_users(self, limit: int, start: datetime, end: datetime) -> list[TopUserRow]:
        """The users who spent most in ``[start, end)``."""
        ...

    async def aggregate_stats(self, start: datetime, end: datetime) -> AggregateStatsRow:
        """Totals over ``[start, end)``."""
        ...
