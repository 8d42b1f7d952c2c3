"""
The public methods every store shares: check the arguments, then run one engine operation.

A store subclasses `StoreFront` and supplies only what is particular to it: `open`, `aclose`,
`setup` and `_run` (how an operation executes: under the account locks in memory, in one
SQLite transaction on the connection thread, in one short Postgres transaction). The meaning
of each method is documented once, on the `CreditStore` protocol this class implements.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, Literal, Self, TypeVar

from ducto._shown import shown
from ducto.errors import InvalidArgumentError
from ducto.interface import _engine as E
from ducto.interface import _ledger as L
from ducto.interface import _retention as RT
from ducto.interface.base import CreditStore
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

__all__ = ["StoreFront"]

R = TypeVar("R")
Keys = Sequence[E.AccountKey]


def _check_progress(progress: object) -> None:
    if progress is not None and not callable(progress):
        raise InvalidArgumentError(f"progress must be callable or None, got {shown(progress)}")


def _user(user_id: str) -> tuple[E.AccountKey]:
    return ((E.USER, user_id),)


def _team(team_id: str) -> tuple[E.AccountKey]:
    return ((E.TEAM, team_id),)


def _both(team_id: str, user_id: str) -> tuple[E.AccountKey, E.AccountKey]:
    return ((E.TEAM, team_id), (E.USER, user_id))


class StoreFront(CreditStore):
    """
    The shared public layer of the stores (see the module docstring).

    Subclasses implement `open`, `aclose`, `setup` and `_run`.
    """

    # -- what a store supplies -------------------------------------------------------------------

    async def open(self) -> None:
        """Open the store (``async with`` does it)."""
        raise NotImplementedError

    async def _run(self, op: Callable[..., R], keys: Keys, *args: Any, write: bool = True) -> R:
        """
        Run one engine operation (``op(storage, *args)``) as the store runs operations.

        Args:
            op: The operation.
            keys: The accounts it changes, for stores that lock per account.
            *args: Its arguments, already checked.
            write: False when the operation never writes.
        """
        raise NotImplementedError

    async def _refund_keys(self, transaction_id: str) -> Keys:
        """The accounts a refund of `transaction_id` touches (for stores that lock them)."""
        return ()

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- balances and grants -----------------------------------------------------------------

    async def get_balance(self, user_id: str) -> BalanceResult:
        L.check_id("user_id", user_id)
        return await self._run(E.get_balance, _user(user_id), user_id)

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
        type_, meta, expiry, key = L.check_grant(
            user_id, amount, type, metadata, expires_at, idempotency_key
        )
        return await self._run(
            E.add_credits, _user(user_id), user_id, amount, type_, meta, expiry, key
        )

    # -- holds -------------------------------------------------------------------------------

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
        return await self._run(
            E.reserve,
            _user(user_id),
            user_id,
            amount,
            operation_type,
            meta,
            min_balance,
            lifetime,
            use_allowance,
            key,
        )

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
        key, meta = L.check_deduct(user_id, reservation_id, amount, idempotency_key, metadata)
        keys = _user(user_id) if team_id is None else _both(L.check_id("team_id", team_id), user_id)
        return await self._run(E.deduct, keys, user_id, reservation_id, amount, key, meta, team_id)

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
        meta, key = L.check_charge(
            user_id, amount, operation_type, metadata, min_balance, use_allowance, idempotency_key
        )
        return await self._run(
            E.charge,
            _user(user_id),
            user_id,
            amount,
            operation_type,
            meta,
            min_balance,
            use_allowance,
            key,
        )

    async def release_reservation(
        self, user_id: str, reservation_id: str, *, team_id: str | None = None
    ) -> ReleaseResult:
        L.check_id("user_id", user_id)
        L.check_id("reservation_id", reservation_id)
        keys = _user(user_id) if team_id is None else _team(L.check_id("team_id", team_id))
        return await self._run(E.release, keys, user_id, reservation_id, team_id)

    # -- refunds and expiry ------------------------------------------------------------------

    async def refund_credits(
        self,
        transaction_id: str,
        amount: int | None = None,
        reason: str | None = None,
        metadata: CreditMetadata | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> RefundResult:
        reason, meta, key = L.check_refund(
            transaction_id, amount, reason, metadata, idempotency_key
        )
        keys = await self._refund_keys(transaction_id)
        return await self._run(E.refund, keys, transaction_id, amount, reason, meta, key)

    async def sweep_expired_credits(self, dry_run: bool = False) -> SweepResult:
        L.check_bool("dry_run", dry_run)
        return await self._run(E.sweep, (), dry_run, write=not dry_run)

    # -- growth: retention and archiving -----------------------------------------------------

    async def prune(
        self, *, dry_run: bool = False, progress: Callable[[PruneResult], object] | None = None
    ) -> PruneResult:
        dry = L.check_bool("dry_run", dry_run)
        _check_progress(progress)
        counts = dict.fromkeys(RT.PRUNE_KINDS, 0)

        def result() -> PruneResult:
            return PruneResult(
                idempotency_keys=counts["idempotency"],
                holds=counts["holds"],
                windows=counts["windows"],
                dry_run=dry,
            )

        for kind in RT.PRUNE_KINDS:
            while True:
                # One short transaction per chunk: traffic runs between them.
                done = await self._prune_chunk(kind, RT.PRUNE_CHUNK, dry)
                counts[kind] += done
                if progress is not None and done:
                    progress(result())
                if dry or done < RT.PRUNE_CHUNK:
                    break
        return result()

    async def _prune_chunk(self, kind: RT.PruneKind, limit: int, dry_run: bool) -> int:
        """Delete one chunk of `kind` past retention (a dry run counts them all)."""
        return await self._run(E.prune, (), kind, limit, dry_run, write=not dry_run)

    async def archive_ledger(
        self,
        before: datetime,
        destination: str | os.PathLike[str],
        *,
        dry_run: bool = False,
        progress: Callable[[ArchiveResult], object] | None = None,
    ) -> ArchiveResult:
        dry = L.check_bool("dry_run", dry_run)
        _check_progress(progress)
        now = await self._run(E.now, (), write=False)
        cutoff = RT.check_archive_before(before, now)
        path = RT.check_destination(destination)
        done = RT.ArchiveProgress(cutoff, str(path), dry)
        if dry:
            after = -1
            while rows := await self._archive_candidates(cutoff, after):
                done.rows += len(rows)
                after = rows[-1].seq
                if progress is not None:
                    progress(done.result())
            return done.result()
        async with RT.ArchiveFile(path) as file:
            after = -1
            while rows := await self._archive_candidates(cutoff, after):
                member = RT.archive_member(
                    RT.archive_line(row, E.public_row(row).model_dump(mode="json")) for row in rows
                )
                # Written and synced before a row is deleted. If the deletion does not happen
                # the chunk is cut off the file again; if its outcome is unknown (the store
                # failed, or the caller was cancelled mid-commit) it stays, and a later run
                # writes whatever was not deleted once more: rows may repeat, never vanish.
                mark = await file.append(member)
                try:
                    await self._archive_commit(rows, cutoff)
                except E.ArchiveChanged:
                    await file.cut(mark)  # a refund got there first: read the chunk again
                    continue
                done.rows += len(rows)
                done.bytes_written += len(member)
                after = rows[-1].seq
                if progress is not None:
                    progress(done.result())
        return done.result()

    async def _archive_candidates(self, before: datetime, after: int) -> list[E.StoredRow]:
        """The next chunk of ledger rows to archive (empty: none left)."""
        return await self._run(
            E.archive_candidates, (), before, after, RT.ARCHIVE_CHUNK, write=False
        )

    async def _archive_commit(self, rows: list[E.StoredRow], before: datetime) -> None:
        """Delete an archived chunk, keep its rollups; `E.ArchiveChanged` changes nothing."""
        await self._run(E.archive, (), rows, before)

    # -- ledger ------------------------------------------------------------------------------

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
        L.check_id("user_id", user_id)
        args = L.check_page(limit, cursor, types, start, end)
        return await self._run(E.page, (), E.USER, user_id, limit, *args, write=False)

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
        L.check_id("team_id", team_id)
        args = L.check_page(limit, cursor, types, start, end)
        return await self._run(E.page, (), E.TEAM, team_id, limit, *args, write=False)

    async def list_lots(self, user_id: str) -> list[CreditLot]:
        L.check_id("user_id", user_id)
        return await self._run(E.list_lots, _user(user_id), user_id)

    # -- pricing -----------------------------------------------------------------------------

    async def get_active_pricing(self) -> PricingConfigResult | None:
        return await self._run(E.get_active_pricing, (), write=False)

    async def set_active_pricing(
        self,
        config: PricingConfigData,
        label: str | None = None,
        *,
        effective_at: datetime | None = None,
    ) -> str:
        data = L.check_pricing(config)
        label = L.check_optional_text("label", label, max_length=256)
        at = L.to_optional_utc("effective_at", effective_at)
        return await self._run(E.set_active_pricing, (), data, label, at)

    async def activate_pricing(self, version: int) -> str:
        L.check_version(version)
        return await self._run(E.activate_pricing, (), version)

    async def cancel_pricing(self, version: int) -> PricingConfigResult:
        L.check_version(version)
        return await self._run(E.cancel_pricing, (), version)

    async def get_pricing_config(self, version: int) -> PricingConfigResult | None:
        L.check_version(version)
        return await self._run(E.get_pricing_config, (), version, write=False)

    async def get_pricing_history(self) -> list[PricingConfigHistoryItem]:
        return await self._run(E.get_pricing_history, (), write=False)

    # -- plans -------------------------------------------------------------------------------

    async def get_user_plan(self, user_id: str) -> GetUserPlanResult:
        L.check_id("user_id", user_id)
        return await self._run(E.get_user_plan, (), user_id, write=False)

    async def set_user_plan(self, user_id: str, plan_id: str) -> SetUserPlanResult:
        L.check_id("user_id", user_id)
        L.check_id("plan_id", plan_id)
        return await self._run(E.set_user_plan, _user(user_id), user_id, plan_id)

    async def check_feature(self, user_id: str, feature: str) -> CheckFeatureResult:
        L.check_id("feature", feature)
        plan = await self.get_user_plan(user_id)
        present, value = L.feature_present(plan.features, feature)
        return CheckFeatureResult(
            user_id=user_id, feature=feature, value=value, has_feature=present
        )

    async def check_allowance(self, user_id: str) -> AllowanceResult:
        L.check_id("user_id", user_id)
        return await self._run(E.check_allowance, (), user_id, write=False)

    async def increment_usage_window(self, user_id: str, plan_id: str, amount: int) -> None:
        L.check_id("user_id", user_id)
        L.check_id("plan_id", plan_id)
        L.check_amount("amount", amount)
        await self._run(E.increment_usage_window, _user(user_id), user_id, amount)

    # -- spend caps --------------------------------------------------------------------------

    async def check_spend_cap(
        self,
        user_id: str,
        model: str | None = None,
        amount: int | None = None,
        *,
        scope: str | None = None,
    ) -> CapCheckResult:
        L.check_id("user_id", user_id)
        if model is not None:
            L.check_id("model", model)
        extra = 0 if amount is None else L.check_amount("amount", amount, minimum=0)
        if scope is not None:
            L.check_id("scope", scope)
        return await self._run(E.check_spend_cap, _user(user_id), user_id, model, extra, scope)

    async def set_spend_cap(self, cap: SpendCap) -> SpendCap:
        stored = L.check_spend_cap(cap).model_copy()
        return await self._run(E.set_spend_cap, _user(stored.user_id), stored)

    async def list_spend_caps(self, user_id: str) -> list[SpendCap]:
        L.check_id("user_id", user_id)
        return await self._run(E.list_spend_caps, (), user_id, write=False)

    async def remove_spend_cap(
        self,
        user_id: str,
        cap_type: Literal["daily", "monthly"],
        model: str | None = None,
        *,
        scope: str | None = None,
    ) -> RemoveSpendCapResult:
        L.check_id("user_id", user_id)
        kind = L.check_cap_type(cap_type)
        if model is not None:
            L.check_id("model", model)
        if scope is not None:
            L.check_id("scope", scope)
        return await self._run(E.remove_spend_cap, _user(user_id), user_id, kind, model, scope)

    # -- auto top-up -------------------------------------------------------------------------

    async def claim_top_up(
        self,
        user_id: str,
        *,
        threshold: int,
        amount: int,
        monthly_limit: int,
        ttl: float | timedelta = 300.0,
    ) -> TopUpClaimResult:
        L.check_id("user_id", user_id)
        L.check_amount("threshold", threshold, minimum=0)
        L.check_amount("amount", amount)
        L.check_amount("monthly_limit", monthly_limit, minimum=0)
        lifetime = L.check_ttl(ttl)
        return await self._run(
            E.claim_top_up, _user(user_id), user_id, threshold, amount, monthly_limit, lifetime
        )

    async def finish_top_up(
        self,
        user_id: str,
        claim_id: str,
        amount: int,
        *,
        payment_reference: str | None = None,
        metadata: CreditMetadata | None = None,
    ) -> TopUpResult:
        L.check_id("user_id", user_id)
        L.check_id("claim_id", claim_id)
        L.check_amount("amount", amount)
        key = L.check_optional_key("payment_reference", payment_reference)
        meta = L.check_metadata(metadata)
        return await self._run(
            E.finish_top_up, _user(user_id), user_id, claim_id, amount, key, meta
        )

    # -- teams -------------------------------------------------------------------------------

    async def create_team(self, name: str, initial_balance: int = 0) -> CreateTeamResult:
        L.check_id("name", name)
        L.check_amount("initial_balance", initial_balance, minimum=0)
        return await self._run(E.create_team, (), name, initial_balance)

    async def add_team_member(
        self,
        team_id: str,
        user_id: str,
        role: str = "member",
        spend_cap: int | None = None,
    ) -> AddTeamMemberResult:
        L.check_team_member(team_id, user_id, role, spend_cap)
        return await self._run(E.add_team_member, _team(team_id), team_id, user_id, role, spend_cap)

    async def remove_team_member(self, team_id: str, user_id: str) -> RemoveTeamMemberResult:
        L.check_id("team_id", team_id)
        L.check_id("user_id", user_id)
        return await self._run(E.remove_team_member, _team(team_id), team_id, user_id)

    async def add_team_credits(
        self,
        team_id: str,
        amount: int,
        metadata: CreditMetadata | None = None,
        *,
        expires_at: datetime | None = None,
        idempotency_key: str | None = None,
    ) -> TeamTopupResult:
        meta, expiry, key = L.check_team_topup(
            team_id, amount, metadata, expires_at, idempotency_key
        )
        return await self._run(
            E.add_team_credits, _team(team_id), team_id, amount, meta, expiry, key
        )

    async def get_team_balance(self, team_id: str) -> TeamBalanceResult:
        L.check_id("team_id", team_id)
        return await self._run(E.get_team_balance, _team(team_id), team_id)

    async def get_team_members(self, team_id: str) -> list[TeamMember]:
        L.check_id("team_id", team_id)
        return await self._run(E.get_team_members, (), team_id, write=False)

    async def deduct_team(
        self,
        team_id: str,
        user_id: str,
        amount: int,
        metadata: CreditMetadata | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> TeamDeductionResult:
        meta, key = L.check_team_deduct(team_id, user_id, amount, metadata, idempotency_key)
        return await self._run(
            E.deduct_team, _both(team_id, user_id), team_id, user_id, amount, meta, key
        )

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
        meta, lifetime, key = L.check_team_reserve(
            team_id, user_id, amount, operation_type, metadata, ttl, idempotency_key
        )
        return await self._run(
            E.reserve_team,
            _team(team_id),
            team_id,
            user_id,
            amount,
            operation_type,
            meta,
            lifetime,
            key,
        )

    # -- analytics ---------------------------------------------------------------------------

    async def _spend_events(self, start: datetime, end: datetime) -> list[L.SpendEvent]:
        return await self._run(E.spend_events, (), start, end, write=False)

    async def spend_by_user(self, start: datetime, end: datetime) -> list[SpendByUserRow]:
        lo, hi = L.check_window(start, end)
        return L.spend_by_user(await self._spend_events(lo, hi), lo, hi)

    async def spend_by_model(self, start: datetime, end: datetime) -> list[SpendByModelRow]:
        lo, hi = L.check_window(start, end)
        return L.spend_by_model(await self._spend_events(lo, hi), lo, hi)

    async def daily_spend(self, start: datetime, end: datetime) -> list[DailySpendRow]:
        lo, hi = L.check_window(start, end)
        return L.daily_spend(await self._spend_events(lo, hi), lo, hi)

    async def top_users(self, limit: int, start: datetime, end: datetime) -> list[TopUserRow]:
        L.check_limit(limit)
        lo, hi = L.check_window(start, end)
        return L.top_users(await self._spend_events(lo, hi), limit, lo, hi)

    async def spend_by_scope(
        self, start: datetime, end: datetime, *, user_id: str | None = None
    ) -> list[SpendByScopeRow]:
        lo, hi = L.check_window(start, end)
        if user_id is not None:
            L.check_id("user_id", user_id)
        return L.spend_by_scope(await self._spend_events(lo, hi), lo, hi, user_id)

    async def aggregate_stats(self, start: datetime, end: datetime) -> AggregateStatsRow:
        lo, hi = L.check_window(start, end)
        return L.aggregate_stats(await self._spend_events(lo, hi), lo, hi)

    # -- lifecycle ---------------------------------------------------------------------------

    async def aclose(self) -> None:
        raise NotImplementedError

    async def setup(self, database_url: str | None = None) -> SetupResult:
        raise NotImplementedError
