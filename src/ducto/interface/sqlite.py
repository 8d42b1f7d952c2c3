"""
`SQLiteStore`: the embedded, durable default store.

Every operation is a synchronous function (`_sqlite_ops.Ops`) that runs on the connection's
thread inside one ``BEGIN IMMEDIATE`` transaction, so the contract holds across processes
sharing the file, and each call costs one trip to that thread. Under asyncio the connection
is an `aiosqlite` connection; aiosqlite cannot run under trio, so there the same functions run
on the store's own worker thread through `anyio.to_thread`.

Group commit: callers queue their operations; the first caller to find no transaction running
becomes the leader, takes everything queued (up to ``max_batch``) and runs it in one
transaction, each operation inside its own SAVEPOINT so a refused or failing one rolls back
alone; it commits once and then answers every caller. No caller is answered before the commit
that holds its operation is durable at the configured ``synchronous`` level. There is no
background task: leadership passes from caller to caller.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from importlib import resources
from types import TracebackType
from typing import Any, Final, Literal, Protocol, Self, TypeVar

import anyio
from anyio.lowlevel import checkpoint

from ducto.errors import DuctoError, InvalidArgumentError, StoreError, StoreUnavailableError
from ducto.interface import _ledger as L
from ducto.interface._sqlite_ops import Ops
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

__all__ = ["SQLiteStore"]

T = TypeVar("T")
SCHEMA_VERSION: Final = 2
_MIGRATIONS: Final = ("0001_ledger.sql", "0002_plans_caps_teams.sql")


class _Runner(Protocol):
    conn: sqlite3.Connection

    async def open(self, connect: Callable[[], sqlite3.Connection]) -> None: ...

    async def run(self, fn: Callable[..., T], *args: Any) -> T: ...

    async def close(self) -> None: ...


class _ThreadRunner:
    """The connection on a worker thread of anyio's; used under trio."""

    conn: sqlite3.Connection

    def __init__(self) -> None:
        self._limiter = anyio.CapacityLimiter(1)

    async def open(self, connect: Callable[[], sqlite3.Connection]) -> None:
        self.conn = await anyio.to_thread.run_sync(connect, limiter=self._limiter)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    async def close(self) -> None:
        await anyio.to_thread.run_sync(self.conn.close, limiter=self._limiter)


class _AiosqliteRunner:
    """The connection on aiosqlite's thread; used under asyncio."""

    conn: sqlite3.Connection

    async def open(self, connect: Callable[[], sqlite3.Connection]) -> None:
        import aiosqlite

        self._aio = aiosqlite.Connection(connect, iter_chunk_size=64)
        try:
            await self._aio
        except BaseException:
            # aiosqlite stops its thread on a failed connect without waiting for it; wait here,
            # while this loop can still take the thread's last callback.
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._aio._thread.join)
            raise
        self.conn = self._aio._conn

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        # aiosqlite queues any callable onto its connection thread this way; the public API
        # would cost one thread hop per statement instead of one per transaction.
        result: T = await self._aio._execute(fn, *args)  # type: ignore[no-untyped-call]
        return result

    async def close(self) -> None:
        await self._aio.close()


class _Job:
    __slots__ = ("args", "done", "error", "fn", "lead", "result", "taken", "wake", "write")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], write: bool) -> None:
        self.fn = fn
        self.args = args
        self.write = write
        self.wake = anyio.Event()  # taken into a transaction, or asked to lead one
        self.done = anyio.Event()
        self.lead = False
        self.taken = False
        self.result: Any = None
        self.error: BaseException | None = None

    def outcome(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.result


def _translate(exc: BaseException) -> StoreError:
    message = str(exc) or type(exc).__name__
    lost = ("locked", "unable to open", "disk i/o", "readonly", "no such table", "closed")
    if isinstance(exc, sqlite3.OperationalError | sqlite3.ProgrammingError) and any(
        word in message.lower() for word in lost
    ):
        error: StoreError = StoreUnavailableError(message)
    else:
        error = StoreError(message)
    error.__cause__ = exc
    return error


def _statements(script: str) -> Iterable[str]:
    """The statements of a migration script, without their leading comment lines."""
    buffer = ""
    for line in script.splitlines(keepends=True):
        if not buffer and (not line.strip() or line.lstrip().startswith("--")):
            continue
        buffer += line
        if sqlite3.complete_statement(buffer):
            yield buffer.strip()
            buffer = ""


class SQLiteStore:
    """
    The complete store contract in one SQLite file, safe across threads, tasks and processes.

    Args:
        path: The database file (created if missing), or ``":memory:"``.
        synchronous: ``"FULL"`` (a commit survives power loss) or ``"NORMAL"`` (a commit
            survives a crash of the process; faster).
        clock: Returns the current aware UTC datetime; tests pass a controllable one.
        busy_timeout: Seconds to wait for another process's write lock.
        group_commit: Run concurrent operations in shared transactions (one commit each
            batch). Off, every operation commits on its own.
        max_batch: The most operations one transaction carries.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: Literal["FULL", "NORMAL"] = "FULL",
        clock: Callable[[], datetime] | None = None,
        busy_timeout: float = 5.0,
        group_commit: bool = True,
        max_batch: int = 100,
    ) -> None:
        if not isinstance(path, str | os.PathLike):
            raise InvalidArgumentError(f"path must be a str or path, got {path!r}")
        if synchronous not in ("FULL", "NORMAL"):
            raise InvalidArgumentError(
                f"synchronous must be 'FULL' or 'NORMAL', got {synchronous!r}"
            )
        if type(busy_timeout) not in (int, float) or not 0 <= busy_timeout <= 3600:
            raise InvalidArgumentError(
                f"busy_timeout must be 0 to 3600 seconds, got {busy_timeout!r}"
            )
        L.check_bool("group_commit", group_commit)
        L.check_limit(max_batch, name="max_batch", maximum=10_000)
        self._path = os.fspath(path)
        self._synchronous = synchronous
        self._clock: Callable[[], datetime] = clock or L.utc_now
        self._busy_timeout = float(busy_timeout)
        self._max_batch = max_batch if group_commit else 1
        self._runner: _Runner | None = None
        self._ops: Ops | None = None
        self._queue: list[_Job] = []
        self._leading = False
        self._idle: anyio.Event | None = None
        self._closed = False

    # -- lifecycle -----------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        """Open the database file."""
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the database file."""
        await self.aclose()

    async def open(self) -> None:
        """Open the connection (``async with`` does this for you)."""
        if self._closed:
            raise StoreError("the store is closed")
        if self._runner is not None:
            return
        runner: _Runner = _AiosqliteRunner() if _on_asyncio() else _ThreadRunner()
        try:
            await runner.open(self._connect)
        except sqlite3.Error as exc:
            raise _translate(exc) from exc
        self._runner = runner
        self._ops = Ops(runner.conn, self._clock, L.IdSource())

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self._path,
            isolation_level=None,
            check_same_thread=False,
            timeout=self._busy_timeout,
        )
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(f"PRAGMA synchronous = {self._synchronous}")
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
            conn.execute("PRAGMA foreign_keys = ON")
        except BaseException:
            conn.close()
            raise
        return conn

    async def aclose(self) -> None:
        """Close the connection; later calls raise `StoreError`. Closing twice is harmless."""
        if self._closed:
            return
        self._closed = True
        runner, self._runner = self._runner, None
        if runner is not None:
            with anyio.CancelScope(shield=True):
                if self._leading:
                    # Let the transaction in flight finish; queued calls then fail as closed.
                    self._idle = anyio.Event()
                    await self._idle.wait()
                await runner.close()

    async def setup(self, database_url: str | None = None) -> SetupResult:
        """
        Create or migrate the schema to the current version, in one transaction.

        Idempotent and safe while other processes use the file: the version is read and
        migrated under the write lock.
        """
        return await self._call(self._migrate, write=True)

    def _migrate(self) -> SetupResult:
        assert self._ops is not None
        conn = self._ops.conn
        current = conn.execute("PRAGMA user_version").fetchone()[0]
        if current > SCHEMA_VERSION:
            raise StoreError(
                f"the database schema is version {current}, newer than this ducto"
                f" ({SCHEMA_VERSION}); upgrade ducto"
            )
        created: list[str] = []
        package = resources.files("ducto.interface.sql.sqlite")
        for version, name in enumerate(_MIGRATIONS, start=1):
            if version <= current:
                continue
            for statement in _statements(package.joinpath(name).read_text(encoding="utf-8")):
                conn.execute(statement)
                if statement.upper().startswith("CREATE TABLE"):
                    created.append(statement.split()[2])
            conn.execute(f"PRAGMA user_version = {version}")
        return SetupResult(tables_created=created, schema_version=SCHEMA_VERSION)

    # -- the transaction pipeline ------------------------------------------------------------

    async def _call(self, fn: Callable[..., T], *args: Any, write: bool = True) -> T:
        if self._closed or self._runner is None:
            raise StoreError("the store is closed" if self._closed else "the store is not open")
        job = _Job(fn, args, write)
        self._queue.append(job)
        if self._leading:
            try:
                await job.wake.wait()
            except BaseException:
                if not job.taken:
                    # Nothing happened yet: withdraw (passing on leadership if it came).
                    self._queue.remove(job)
                    if job.lead:
                        self._leading = False
                        self._promote()
                    raise
                # A leader took the operation as the cancellation arrived. It will commit, so
                # the call completes and reports it; the cancellation, which anyio delivers at
                # every checkpoint of a cancelled scope, reaches the caller at its next one.
            if not job.lead:
                with anyio.CancelScope(shield=True):
                    await job.done.wait()
                return job.outcome()  # type: ignore[no-any-return]
        else:
            self._leading = True
            try:
                await checkpoint()
            except BaseException:
                self._queue.remove(job)
                self._leading = False
                self._promote()
                raise
        try:
            batch = self._queue[: self._max_batch]
            del self._queue[: len(batch)]
            for queued in batch:
                queued.taken = True
                if queued is not job:
                    queued.wake.set()
            with anyio.CancelScope(shield=True):
                await self._run(batch)
            for queued in batch:
                queued.done.set()
        finally:
            self._leading = False
            self._promote()
        return job.outcome()  # type: ignore[no-any-return]

    def _promote(self) -> None:
        """Hand leadership to the oldest queued caller, if any."""
        if self._leading:
            return
        if self._queue:
            self._leading = True
            nxt = self._queue[0]
            nxt.lead = True
            nxt.wake.set()
        elif self._idle is not None:
            self._idle.set()

    async def _run(self, batch: list[_Job]) -> None:
        runner = self._runner
        if runner is None:
            error = StoreError("the store is closed")
            for job in batch:
                job.error = error
            return
        try:
            await runner.run(self._run_batch, batch)
        except Exception as exc:  # the connection thread itself failed
            error = exc if isinstance(exc, StoreError) else _translate(exc)
            for job in batch:
                job.result, job.error = None, error

    def _run_batch(self, batch: list[_Job]) -> None:
        """Run queued operations in one transaction; runs on the connection thread."""
        assert self._ops is not None
        conn = self._ops.conn
        single = len(batch) == 1
        try:
            conn.execute("BEGIN IMMEDIATE" if any(j.write for j in batch) else "BEGIN")
        except sqlite3.Error as exc:
            for job in batch:
                job.error = _translate(exc)
            return
        try:
            for job in batch:
                if not single:
                    conn.execute("SAVEPOINT op")
                try:
                    job.result = job.fn(*job.args)
                except Exception as exc:
                    if single:
                        raise
                    conn.execute("ROLLBACK TO op")
                    job.error = exc if isinstance(exc, DuctoError) else _translate(exc)
                if not single:
                    conn.execute("RELEASE op")
            conn.execute("COMMIT")
        except BaseException as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            error: BaseException = exc if isinstance(exc, DuctoError) else _translate(exc)
            for job in batch:
                job.result, job.error = None, error
            if not isinstance(exc, Exception):
                raise

    def _op(self) -> Ops:
        if self._ops is None:
            raise StoreError("the store is closed" if self._closed else "the store is not open")
        return self._ops

    # -- balances and grants -----------------------------------------------------------------

    async def get_balance(self, user_id: str) -> BalanceResult:
        """Report a user's balance (see `CreditStore.get_balance`)."""
        L.check_id("user_id", user_id)
        return await self._call(self._op().get_balance, user_id)

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
        """Grant credits as a new lot, or take them back with a negative ``adjustment``."""
        type_, meta, expiry, key = L.check_grant(
            user_id, amount, type, metadata, expires_at, idempotency_key
        )
        return await self._call(self._op().add_credits, user_id, amount, type_, meta, expiry, key)

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
        """Hold credits for an upcoming operation (see `CreditStore.reserve_credits`)."""
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
        return await self._call(
            self._op().reserve_credits,
            user_id,
            amount,
            operation_type,
            L.metadata_model(meta),
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
    ) -> DeductionResult:
        """Settle a hold, charging `amount` in full (see `CreditStore.deduct_credits`)."""
        key, meta = L.check_deduct(user_id, reservation_id, amount, idempotency_key, metadata)
        return await self._call(
            self._op().deduct_credits, user_id, reservation_id, amount, key, meta
        )

    async def release_reservation(self, user_id: str, reservation_id: str) -> ReleaseResult:
        """Free a hold; releasing twice is harmless."""
        L.check_id("user_id", user_id)
        L.check_id("reservation_id", reservation_id)
        return await self._call(self._op().release_reservation, user_id, reservation_id)

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
        """Refund (part of) a usage or team usage debit into the lots it drew from."""
        reason, meta, key = L.check_refund(
            transaction_id, amount, reason, metadata, idempotency_key
        )
        return await self._call(
            self._op().refund_credits, transaction_id, amount, reason, meta, key
        )

    async def sweep_expired_credits(self, dry_run: bool = False) -> SweepResult:
        """Write off the unspent remainder of every expired lot, one ``expiry`` row per lot."""
        L.check_bool("dry_run", dry_run)
        return await self._call(self._op().sweep_expired_credits, dry_run)

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
        """Page a user's ledger, newest first."""
        L.check_id("user_id", user_id)
        args = L.check_page(limit, cursor, types, start, end)
        return await self._call(self._op().page, "u", user_id, limit, *args, write=False)

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
        L.check_id("team_id", team_id)
        args = L.check_page(limit, cursor, types, start, end)
        return await self._call(self._op().page, "t", team_id, limit, *args, write=False)

    async def list_lots(self, user_id: str) -> list[CreditLot]:
        """The user's lots that still hold credits, in the order debits consume them."""
        L.check_id("user_id", user_id)
        return await self._call(self._op().list_lots, user_id)

    # -- pricing -------------------------------------------------------------------------------

    async def get_active_pricing(self) -> PricingConfigResult | None:
        """The active pricing version, or None before any was published."""
        return await self._call(self._op().get_active_pricing, write=False)

    async def set_active_pricing(self, config: PricingConfigData, label: str | None = None) -> str:
        """Publish `config` as version highest + 1 and make it active; return its id."""
        data = L.check_pricing(config)
        label = L.check_optional_text("label", label, max_length=256)
        return await self._call(self._op().set_active_pricing, data, label)

    async def activate_pricing(self, version: int) -> str:
        """Make an existing version active; `PricingVersionNotFoundError` if there is none."""
        L.check_version(version)
        return await self._call(self._op().activate_pricing, version)

    async def get_pricing_config(self, version: int) -> PricingConfigResult | None:
        """One pricing version, or None."""
        L.check_version(version)
        return await self._call(self._op().get_pricing_config, version, write=False)

    async def get_pricing_history(self) -> list[PricingConfigHistoryItem]:
        """Every pricing version, newest first."""
        return await self._call(self._op().get_pricing_history, write=False)

    # -- plans ---------------------------------------------------------------------------------

    async def get_user_plan(self, user_id: str) -> GetUserPlanResult:
        """The user's plan as the active pricing version defines it."""
        L.check_id("user_id", user_id)
        return await self._call(self._op().get_user_plan, user_id, write=False)

    async def set_user_plan(self, user_id: str, plan_id: str) -> SetUserPlanResult:
        """Record the user's plan; the active pricing version must define it."""
        L.check_id("user_id", user_id)
        L.check_id("plan_id", plan_id)
        await self._call(self._op().set_user_plan, user_id, plan_id)
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
        return await self._call(self._op().check_allowance, user_id, write=False)

    async def increment_usage_window(self, user_id: str, plan_id: str, amount: int) -> None:
        """Record `amount` of allowance consumed in the current UTC month."""
        L.check_id("user_id", user_id)
        L.check_id("plan_id", plan_id)
        L.check_amount("amount", amount)
        await self._call(self._op().increment_usage_window, user_id, amount)

    # -- spend caps ----------------------------------------------------------------------------

    async def check_spend_cap(
        self, user_id: str, model: str | None = None, amount: int | None = None
    ) -> CapCheckResult:
        """Advisory: would `amount` more (on `model`) trip one of the user's caps?"""
        L.check_id("user_id", user_id)
        if model is not None:
            L.check_id("model", model)
        extra = 0 if amount is None else L.check_amount("amount", amount, minimum=0)
        return await self._call(self._op().check_spend_cap, user_id, model, extra)

    async def set_spend_cap(self, cap: SpendCap) -> SpendCap:
        """Create or replace the cap for (user, cap type, model); returns the stored cap."""
        L.check_spend_cap(cap)
        stored = cap.model_copy()
        await self._call(self._op().set_spend_cap, stored)
        return stored

    async def list_spend_caps(self, user_id: str) -> list[SpendCap]:
        """The user's caps, daily before monthly, then by model."""
        L.check_id("user_id", user_id)
        return await self._call(self._op().list_spend_caps, user_id, write=False)

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
        return await self._call(self._op().remove_spend_cap, user_id, kind, model)

    # -- teams ---------------------------------------------------------------------------------

    async def create_team(self, name: str, initial_balance: int = 0) -> CreateTeamResult:
        """Create a team pool, optionally with an initial ``team_topup``."""
        L.check_id("name", name)
        L.check_amount("initial_balance", initial_balance, minimum=0)
        return await self._call(self._op().create_team, name, initial_balance)

    async def add_team_member(
        self,
        team_id: str,
        user_id: str,
        role: str = "member",
        spend_cap: int | None = None,
    ) -> AddTeamMemberResult:
        """Add a member, or update its role and monthly team spend cap."""
        L.check_team_member(team_id, user_id, role, spend_cap)
        return await self._call(self._op().add_team_member, team_id, user_id, role, spend_cap)

    async def remove_team_member(self, team_id: str, user_id: str) -> RemoveTeamMemberResult:
        """Remove a member; ``removed`` is False when the user was not a member."""
        L.check_id("team_id", team_id)
        L.check_id("user_id", user_id)
        return await self._call(self._op().remove_team_member, team_id, user_id)

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
        return await self._call(self._op().add_team_credits, team_id, amount, meta, expiry, key)

    async def get_team_balance(self, team_id: str) -> TeamBalanceResult:
        """A team pool's balance; ``error`` is ``team_not_found`` for an unknown team."""
        L.check_id("team_id", team_id)
        return await self._call(self._op().get_team_balance, team_id)

    async def get_team_members(self, team_id: str) -> list[TeamMember]:
        """A team's members (sorted by user id) with their net team spend this UTC month."""
        L.check_id("team_id", team_id)
        return await self._call(self._op().get_team_members, team_id, write=False)

    async def deduct_team(
        self,
        team_id: str,
        user_id: str,
        amount: int,
        metadata: CreditMetadata | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> TeamDeductionResult:
        """Charge the team pool on behalf of a member (a ``team_usage`` row on the team)."""
        meta, key = L.check_team_deduct(team_id, user_id, amount, metadata, idempotency_key)
        return await self._call(self._op().deduct_team, team_id, user_id, amount, meta, key)

    # -- analytics -----------------------------------------------------------------------------

    async def _events(self, start: datetime, end: datetime) -> list[L.SpendEvent]:
        return await self._call(self._op().spend_events, start, end, write=False)

    async def spend_by_user(self, start: datetime, end: datetime) -> list[SpendByUserRow]:
        """Net paid usage per user in ``[start, end)``, by spend descending then user id."""
        lo, hi = L.check_window(start, end)
        return L.spend_by_user(await self._events(lo, hi), lo, hi)

    async def spend_by_model(self, start: datetime, end: datetime) -> list[SpendByModelRow]:
        """Net paid usage per model in ``[start, end)``, by spend descending then model."""
        lo, hi = L.check_window(start, end)
        return L.spend_by_model(await self._events(lo, hi), lo, hi)

    async def daily_spend(self, start: datetime, end: datetime) -> list[DailySpendRow]:
        """Net paid usage per UTC day in ``[start, end)``, oldest day first."""
        lo, hi = L.check_window(start, end)
        return L.daily_spend(await self._events(lo, hi), lo, hi)

    async def top_users(self, limit: int, start: datetime, end: datetime) -> list[TopUserRow]:
        """The `limit` users with most net paid usage in ``[start, end)``."""
        L.check_limit(limit)
        lo, hi = L.check_window(start, end)
        return L.top_users(await self._events(lo, hi), limit, lo, hi)

    async def aggregate_stats(self, start: datetime, end: datetime) -> AggregateStatsRow:
        """Totals over ``[start, end)``."""
        lo, hi = L.check_window(start, end)
        return L.aggregate_stats(await self._events(lo, hi), lo, hi)


def _on_asyncio() -> bool:
    try:
        import asyncio

        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
