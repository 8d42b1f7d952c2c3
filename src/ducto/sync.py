"""
Blocking facades over any store and over `CreditManager`, for synchronous code.

Django views, Flask handlers, Celery tasks and scripts keep the ducto 1.x call shapes: the
same method names, arguments and results, without ``await``. Each facade runs one event loop
on a background thread (an anyio blocking portal, asyncio unless you choose trio) and opens
the store inside it; every call is handed to that loop and waits for its result.

```python
from ducto import CreditManager, MemoryStore, UsageMetrics
from ducto.sync import SyncCreditManager

with SyncCreditManager(CreditManager(MemoryStore())) as billing:
    billing.store.setup()
    billing.publish_pricing({"models": {"_default": "input_tokens * 0.01"}})
    billing.add_credits("alice", 1000, "purchase")
    billing.deduct("alice", UsageMetrics(model="gpt-4o", input_tokens=1200))
    with billing.hold("alice", 50) as hold:
        hold.record(UsageMetrics(input_tokens=300))
        hold.settle()
```

The ``with`` block opens the portal and the store and closes both; `open` and `close` do
the same without a block (open and close from one thread). While open, a facade may be
called from any number of threads at once: the portal hands every call to the one loop,
where the store's own locking keeps each user's operations in order. Calling a facade from
code already running on its loop's thread is refused (it would wait for itself); use the
async API there.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager, AbstractContextManager, ExitStack
from datetime import datetime, timedelta
from types import TracebackType
from typing import Literal, Self, TypeVar

from anyio.from_thread import BlockingPortal, start_blocking_portal

from ducto.errors import InvalidArgumentError, StoreError
from ducto.events import CreditEventEmitter
from ducto.interface import open_store
from ducto.interface.base import CreditStore
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
from ducto.manager import CreditManager, Hold
from ducto.pricing import CostBreakdown, PricingEngine, UsageMetrics

__all__ = ["SyncCreditManager", "SyncCreditStore", "SyncHold"]

T = TypeVar("T")

_Metadata = CreditMetadata | Mapping[str, object] | None


class _Runner:
    """One blocking portal (an event loop on its own thread) shared by facades."""

    def __init__(self, backend: str, backend_options: Mapping[str, object] | None) -> None:
        if backend not in ("asyncio", "trio"):
            raise InvalidArgumentError(f"backend must be 'asyncio' or 'trio', got {backend!r}")
        self._backend = backend
        self._options = dict(backend_options) if backend_options is not None else None
        self._stack: ExitStack | None = None
        self._portal: BlockingPortal | None = None

    def start(self) -> BlockingPortal:
        if self._portal is not None:
            raise InvalidArgumentError("this facade is open already")
        stack = ExitStack()
        self._portal = stack.enter_context(start_blocking_portal(self._backend, self._options))
        self._stack = stack
        return self._portal

    def stop(self) -> None:
        stack, self._stack, self._portal = self._stack, None, None
        if stack is not None:
            stack.close()

    @property
    def portal(self) -> BlockingPortal:
        portal = self._portal
        if portal is None:
            raise StoreError("the facade is closed: use it in a with block, or call open()")
        return portal

    def call(self, func: Callable[[], Awaitable[T]]) -> T:
        return self.portal.call(func)

    def call_sync(self, func: Callable[[], T]) -> T:
        return self.portal.call(func)


class _Facade:
    """Opens a portal and an async context manager in it; closes both."""

    _runner: _Runner
    _owner: bool
    _cm: AbstractContextManager[object] | None

    def _target(self) -> AbstractAsyncContextManager[object]:
        raise NotImplementedError

    def open(self) -> Self:
        """
        Start the event loop thread and open the store in it.

        Returns:
            The facade itself.

        Raises:
            InvalidArgumentError: The facade is open already, or it shares another
                facade's loop (open and close that one instead).
        """
        if not self._owner:
            raise InvalidArgumentError(
                "this facade shares its manager's event loop; open and close the manager"
            )
        portal = self._runner.start()
        try:
            cm: AbstractContextManager[object] = portal.wrap_async_context_manager(self._target())
            cm.__enter__()
        except BaseException:
            self._runner.stop()
            raise
        self._cm = cm
        return self

    def close(self) -> None:
        """Close the store, then stop the event loop thread; closing twice is harmless."""
        self._exit(None, None, None)

    def _exit(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._owner:
            return
        cm, self._cm = self._cm, None
        try:
            if cm is not None:
                cm.__exit__(exc_type, exc, tb)
        finally:
            self._runner.stop()

    def __enter__(self) -> Self:
        """Open the facade (see `open`)."""
        return self.open()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the facade (see `close`)."""
        self._exit(exc_type, exc, tb)


class SyncCreditStore(_Facade):
    """
    A blocking `CreditStore`: the same methods and results, without ``await``.

    ```python
    with SyncCreditStore(SQLiteStore("billing.db")) as store:
        store.setup()
        store.add_credits("alice", 500, "purchase")
        hold = store.reserve_credits("alice", 40, "chat")
        store.deduct_credits("alice", hold.reservation_id, 35)
    ```

    See the module documentation for threads and the event loop.
    """

    def __init__(
        self,
        store: CreditStore,
        *,
        backend: Literal["asyncio", "trio"] = "asyncio",
        backend_options: Mapping[str, object] | None = None,
    ) -> None:
        """
        Wrap `store`; nothing starts until the facade is opened.

        Args:
            store: Any store, not yet opened (the facade opens and closes it).
            backend: The event loop to run: ``"asyncio"`` or ``"trio"``.
            backend_options: Passed to anyio (for example ``{"use_uvloop": True}``).

        Raises:
            InvalidArgumentError: `backend` is unknown.
        """
        self._store = store
        self._runner = _Runner(backend, backend_options)
        self._owner = True
        self._cm = None

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        backend: Literal["asyncio", "trio"] = "asyncio",
        backend_options: Mapping[str, object] | None = None,
        **store_options: object,
    ) -> SyncCreditStore:
        """
        Wrap the store a URL names (see `ducto.interface.open_store`).

        Args:
            url: ``memory://`` or ``sqlite:///path.db`` and so on.
            backend: The event loop to run.
            backend_options: Passed to anyio.
            **store_options: Passed to the store's constructor.

        Returns:
            The facade, not yet opened.
        """
        return cls(
            open_store(url, **store_options), backend=backend, backend_options=backend_options
        )

    @classmethod
    def _sharing(cls, store: CreditStore, runner: _Runner) -> SyncCreditStore:
        facade = cls.__new__(cls)
        facade._store = store
        facade._runner = runner
        facade._owner = False
        facade._cm = None
        return facade

    def _target(self) -> CreditStore:
        return self._store

    @property
    def store(self) -> CreditStore:
        """The async store underneath (call it only from its own loop)."""
        return self._store

    # -- the CreditStore methods, blocking --------------------------------------------------

    def setup(self, database_url: str | None = None) -> SetupResult:
        """Blocking `CreditStore.setup`."""
        return self._runner.call(lambda: self._store.setup(database_url))

    def get_balance(self, user_id: str) -> BalanceResult:
        """Blocking `CreditStore.get_balance`."""
        return self._runner.call(lambda: self._store.get_balance(user_id))

    def add_credits(
        self,
        user_id: str,
        amount: int,
        type: str = "adjustment",
        metadata: CreditMetadata | None = None,
        expires_at: datetime | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> AddCreditsResult:
        """Blocking `CreditStore.add_credits`."""
        return self._runner.call(
            lambda: self._store.add_credits(
                user_id, amount, type, metadata, expires_at, idempotency_key=idempotency_key
            )
        )

    def reserve_credits(
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
        """Blocking `CreditStore.reserve_credits`."""
        return self._runner.call(
            lambda: self._store.reserve_credits(
                user_id,
                amount,
                operation_type,
                metadata,
                min_balance,
                ttl=ttl,
                use_allowance=use_allowance,
                idempotency_key=idempotency_key,
            )
        )

    def deduct_credits(
        self,
        user_id: str,
        reservation_id: str,
        amount: int,
        idempotency_key: str | None = None,
        metadata: CreditMetadata | None = None,
    ) -> DeductionResult:
        """Blocking `CreditStore.deduct_credits`."""
        return self._runner.call(
            lambda: self._store.deduct_credits(
                user_id, reservation_id, amount, idempotency_key, metadata
            )
        )

    def release_reservation(self, user_id: str, reservation_id: str) -> ReleaseResult:
        """Blocking `CreditStore.release_reservation`."""
        return self._runner.call(lambda: self._store.release_reservation(user_id, reservation_id))

    def refund_credits(
        self,
        transaction_id: str,
        amount: int | None = None,
        reason: str | None = None,
        metadata: CreditMetadata | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> RefundResult:
        """Blocking `CreditStore.refund_credits`."""
        return self._runner.call(
            lambda: self._store.refund_credits(
                transaction_id, amount, reason, metadata, idempotency_key=idempotency_key
            )
        )

    def sweep_expired_credits(self, dry_run: bool = False) -> SweepResult:
        """Blocking `CreditStore.sweep_expired_credits`."""
        return self._runner.call(lambda: self._store.sweep_expired_credits(dry_run))

    def list_transactions(
        self,
        user_id: str,
        *,
        limit: int = 100,
        cursor: str | None = None,
        types: Iterable[str] | None = None,
        start: datetime | None = None,
        end: datetime | None = None,
    ) -> TransactionPage:
        """Blocking `CreditStore.list_transactions`."""
        return self._runner.call(
            lambda: self._store.list_transactions(
                user_id, limit=limit, cursor=cursor, types=types, start=start, end=end
            )
        )

    def list_team_transactions(
        self,
        team_id: str,
        *,
        limit: int = 100,
        cursor: str | None = None,
        types: Iterable[str] | None = None,
        start: datetime | None = None,
        end: datetime | None = None,
    ) -> TransactionPage:
        """Blocking `CreditStore.list_team_transactions`."""
        return self._runner.call(
            lambda: self._store.list_team_transactions(
                team_id, limit=limit, cursor=cursor, types=types, start=start, end=end
            )
        )

    def list_lots(self, user_id: str) -> list[CreditLot]:
        """Blocking `CreditStore.list_lots`."""
        return self._runner.call(lambda: self._store.list_lots(user_id))

    def get_active_pricing(self) -> PricingConfigResult | None:
        """Blocking `CreditStore.get_active_pricing`."""
        return self._runner.call(self._store.get_active_pricing)

    def set_active_pricing(self, config: PricingConfigData, label: str | None = None) -> str:
        """Blocking `CreditStore.set_active_pricing`."""
        return self._runner.call(lambda: self._store.set_active_pricing(config, label))

    def activate_pricing(self, version: int) -> str:
        """Blocking `CreditStore.activate_pricing`."""
        return self._runner.call(lambda: self._store.activate_pricing(version))

    def get_pricing_config(self, version: int) -> PricingConfigResult | None:
        """Blocking `CreditStore.get_pricing_config`."""
        return self._runner.call(lambda: self._store.get_pricing_config(version))

    def get_pricing_history(self) -> list[PricingConfigHistoryItem]:
        """Blocking `CreditStore.get_pricing_history`."""
        return self._runner.call(self._store.get_pricing_history)

    def get_user_plan(self, user_id: str) -> GetUserPlanResult:
        """Blocking `CreditStore.get_user_plan`."""
        return self._runner.call(lambda: self._store.get_user_plan(user_id))

    def set_user_plan(self, user_id: str, plan_id: str) -> SetUserPlanResult:
        """Blocking `CreditStore.set_user_plan`."""
        return self._runner.call(lambda: self._store.set_user_plan(user_id, plan_id))

    def check_feature(self, user_id: str, feature: str) -> CheckFeatureResult:
        """Blocking `CreditStore.check_feature`."""
        return self._runner.call(lambda: self._store.check_feature(user_id, feature))

    def check_allowance(self, user_id: str) -> AllowanceResult:
        """Blocking `CreditStore.check_allowance`."""
        return self._runner.call(lambda: self._store.check_allowance(user_id))

    def increment_usage_window(self, user_id: str, plan_id: str, amount: int) -> None:
        """Blocking `CreditStore.increment_usage_window`."""
        self._runner.call(lambda: self._store.increment_usage_window(user_id, plan_id, amount))

    def check_spend_cap(
        self, user_id: str, model: str | None = None, amount: int | None = None
    ) -> CapCheckResult:
        """Blocking `CreditStore.check_spend_cap`."""
        return self._runner.call(lambda: self._store.check_spend_cap(user_id, model, amount))

    def set_spend_cap(self, cap: SpendCap) -> SpendCap:
        """Blocking `CreditStore.set_spend_cap`."""
        return self._runner.call(lambda: self._store.set_spend_cap(cap))

    def list_spend_caps(self, user_id: str) -> list[SpendCap]:
        """Blocking `CreditStore.list_spend_caps`."""
        return self._runner.call(lambda: self._store.list_spend_caps(user_id))

    def remove_spend_cap(
        self,
        user_id: str,
        cap_type: Literal["daily", "monthly"],
        model: str | None = None,
    ) -> RemoveSpendCapResult:
        """Blocking `CreditStore.remove_spend_cap`."""
        return self._runner.call(lambda: self._store.remove_spend_cap(user_id, cap_type, model))

    def create_team(self, name: str, initial_balance: int = 0) -> CreateTeamResult:
        """Blocking `CreditStore.create_team`."""
        return self._runner.call(lambda: self._store.create_team(name, initial_balance))

    def add_team_member(
        self,
        team_id: str,
        user_id: str,
        role: str = "member",
        spend_cap: int | None = None,
    ) -> AddTeamMemberResult:
        """Blocking `CreditStore.add_team_member`."""
        return self._runner.call(
            lambda: self._store.add_team_member(team_id, user_id, role, spend_cap)
        )

    def remove_team_member(self, team_id: str, user_id: str) -> RemoveTeamMemberResult:
        """Blocking `CreditStore.remove_team_member`."""
        return self._runner.call(lambda: self._store.remove_team_member(team_id, user_id))

    def add_team_credits(
        self,
        team_id: str,
        amount: int,
        metadata: CreditMetadata | None = None,
        *,
        expires_at: datetime | None = None,
        idempotency_key: str | None = None,
    ) -> TeamTopupResult:
        """Blocking `CreditStore.add_team_credits`."""
        return self._runner.call(
            lambda: self._store.add_team_credits(
                team_id, amount, metadata, expires_at=expires_at, idempotency_key=idempotency_key
            )
        )

    def get_team_balance(self, team_id: str) -> TeamBalanceResult:
        """Blocking `CreditStore.get_team_balance`."""
        return self._runner.call(lambda: self._store.get_team_balance(team_id))

    def get_team_members(self, team_id: str) -> list[TeamMember]:
        """Blocking `CreditStore.get_team_members`."""
        return self._runner.call(lambda: self._store.get_team_members(team_id))

    def deduct_team(
        self,
        team_id: str,
        user_id: str,
        amount: int,
        metadata: CreditMetadata | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> TeamDeductionResult:
        """Blocking `CreditStore.deduct_team`."""
        return self._runner.call(
            lambda: self._store.deduct_team(
                team_id, user_id, amount, metadata, idempotency_key=idempotency_key
            )
        )

    def spend_by_user(self, start: datetime, end: datetime) -> list[SpendByUserRow]:
        """Blocking `CreditStore.spend_by_user`."""
        return self._runner.call(lambda: self._store.spend_by_user(start, end))

    def spend_by_model(self, start: datetime, end: datetime) -> list[SpendByModelRow]:
        """Blocking `CreditStore.spend_by_model`."""
        return self._runner.call(lambda: self._store.spend_by_model(start, end))

    def daily_spend(self, start: datetime, end: datetime) -> list[DailySpendRow]:
        """Blocking `CreditStore.daily_spend`."""
        return self._runner.call(lambda: self._store.daily_spend(start, end))

    def top_users(self, limit: int, start: datetime, end: datetime) -> list[TopUserRow]:
        """Blocking `CreditStore.top_users`."""
        return self._runner.call(lambda: self._store.top_users(limit, start, end))

    def aggregate_stats(self, start: datetime, end: datetime) -> AggregateStatsRow:
        """Blocking `CreditStore.aggregate_stats`."""
        return self._runner.call(lambda: self._store.aggregate_stats(start, end))


class SyncHold:
    """
    A blocking `Hold`: ``with billing.hold(...) as hold:`` in synchronous code.

    Entering reserves, `record` adds usage, `settle` charges once; leaving the block
    settles or releases exactly as `Hold` documents, and an exception raised in the block
    reaches the hold the same way.
    """

    def __init__(self, hold: Hold, runner: _Runner) -> None:
        """Wrap `hold`; use `SyncCreditManager.hold` rather than this constructor."""
        self._hold = hold
        self._runner = runner
        self._cm: AbstractContextManager[Hold] | None = None

    def __enter__(self) -> Self:
        """Reserve the estimate (see `Hold.__aenter__`)."""
        if self._cm is not None:
            raise InvalidArgumentError("a hold can be entered once; make a new one")
        cm = self._runner.portal.wrap_async_context_manager(self._hold)
        cm.__enter__()
        self._cm = cm
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Settle or release the hold unless that already happened (see `Hold`)."""
        if self._cm is not None:
            self._cm.__exit__(exc_type, exc, tb)

    @property
    def reservation_id(self) -> str:
        """The store's id of the hold."""
        return self._hold.reservation_id

    @property
    def estimate_credits(self) -> int:
        """The credits held."""
        return self._hold.estimate_credits

    @property
    def recorded(self) -> UsageMetrics | None:
        """The usage recorded so far, or None."""
        return self._hold.recorded

    @property
    def result(self) -> DeductionResult | None:
        """The settlement, once settled."""
        return self._hold.result

    @property
    def settled(self) -> bool:
        """Whether the hold was settled."""
        return self._hold.settled

    @property
    def released(self) -> bool:
        """Whether the hold was released."""
        return self._hold.released

    def record(self, usage: UsageMetrics) -> UsageMetrics:
        """Blocking `Hold.record`."""
        return self._runner.call_sync(lambda: self._hold.record(usage))

    def settle(self, actual: UsageMetrics | int | None = None) -> DeductionResult:
        """Blocking `Hold.settle`."""
        return self._runner.call(lambda: self._hold.settle(actual))


class SyncCreditManager(_Facade):
    """
    A blocking `CreditManager`: the same methods and results, without ``await``.

    Entering opens the portal and the manager's store; `store` is a `SyncCreditStore`
    over that store sharing the same loop. See the module documentation.
    """

    def __init__(
        self,
        manager: CreditManager,
        *,
        backend: Literal["asyncio", "trio"] = "asyncio",
        backend_options: Mapping[str, object] | None = None,
    ) -> None:
        """
        Wrap `manager`; nothing starts until the facade is opened.

        Args:
            manager: The manager, whose store is not yet opened (the facade opens and
                closes it).
            backend: The event loop to run: ``"asyncio"`` or ``"trio"``.
            backend_options: Passed to anyio.

        Raises:
            InvalidArgumentError: `backend` is unknown.
        """
        self._manager = manager
        self._runner = _Runner(backend, backend_options)
        self._owner = True
        self._cm = None
        self._store = SyncCreditStore._sharing(manager.store, self._runner)

    def _target(self) -> CreditManager:
        return self._manager

    @property
    def manager(self) -> CreditManager:
        """The async manager underneath (call it only from its own loop)."""
        return self._manager

    @property
    def store(self) -> SyncCreditStore:
        """The manager's store, blocking, on the same loop."""
        return self._store

    @property
    def events(self) -> CreditEventEmitter:
        """The manager's emitter; handlers run on the loop's thread."""
        return self._manager.events

    @property
    def engine(self) -> PricingEngine:
        """The pricing engine in use (see `CreditManager.engine`)."""
        return self._manager.engine

    def calculate(self, metrics: UsageMetrics, *, plan: str | None = None) -> CostBreakdown:
        """`CreditManager.calculate` (pure computation, run on the calling thread)."""
        return self._manager.calculate(metrics, plan=plan)

    def publish_pricing(
        self, config: PricingConfigData | Mapping[str, object], label: str | None = None
    ) -> str:
        """Blocking `CreditManager.publish_pricing`."""
        return self._runner.call(lambda: self._manager.publish_pricing(config, label))

    def load_pricing_from_store(self) -> PricingEngine | None:
        """Blocking `CreditManager.load_pricing_from_store`."""
        return self._runner.call(self._manager.load_pricing_from_store)

    def get_balance(self, user_id: str) -> BalanceResult:
        """Blocking `CreditManager.get_balance`."""
        return self._runner.call(lambda: self._manager.get_balance(user_id))

    def add_credits(
        self,
        user_id: str,
        amount: int,
        type: str = "adjustment",
        metadata: CreditMetadata | None = None,
        expires_at: datetime | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> AddCreditsResult:
        """Blocking `CreditManager.add_credits`."""
        return self._runner.call(
            lambda: self._manager.add_credits(
                user_id, amount, type, metadata, expires_at, idempotency_key=idempotency_key
            )
        )

    def refund_credits(
        self,
        transaction_id: str,
        amount: int | None = None,
        reason: str | None = None,
        metadata: CreditMetadata | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> RefundResult:
        """Blocking `CreditManager.refund_credits`."""
        return self._runner.call(
            lambda: self._manager.refund_credits(
                transaction_id, amount, reason, metadata, idempotency_key=idempotency_key
            )
        )

    def sweep_expired_credits(self, dry_run: bool = False) -> SweepResult:
        """Blocking `CreditManager.sweep_expired_credits`."""
        return self._runner.call(lambda: self._manager.sweep_expired_credits(dry_run))

    def set_user_plan(self, user_id: str, plan_id: str) -> SetUserPlanResult:
        """Blocking `CreditManager.set_user_plan`."""
        return self._runner.call(lambda: self._manager.set_user_plan(user_id, plan_id))

    def get_user_plan(self, user_id: str) -> GetUserPlanResult:
        """Blocking `CreditManager.get_user_plan`."""
        return self._runner.call(lambda: self._manager.get_user_plan(user_id))

    def check_feature(self, user_id: str, feature: str) -> CheckFeatureResult:
        """Blocking `CreditManager.check_feature`."""
        return self._runner.call(lambda: self._manager.check_feature(user_id, feature))

    def check_allowance(self, user_id: str) -> AllowanceResult:
        """Blocking `CreditManager.check_allowance`."""
        return self._runner.call(lambda: self._manager.check_allowance(user_id))

    def spend_by_user(self, start: datetime, end: datetime) -> list[SpendByUserRow]:
        """Blocking `CreditManager.spend_by_user`."""
        return self._runner.call(lambda: self._manager.spend_by_user(start, end))

    def spend_by_model(self, start: datetime, end: datetime) -> list[SpendByModelRow]:
        """Blocking `CreditManager.spend_by_model`."""
        return self._runner.call(lambda: self._manager.spend_by_model(start, end))

    def daily_spend(self, start: datetime, end: datetime) -> list[DailySpendRow]:
        """Blocking `CreditManager.daily_spend`."""
        return self._runner.call(lambda: self._manager.daily_spend(start, end))

    def top_users(self, limit: int, start: datetime, end: datetime) -> list[TopUserRow]:
        """Blocking `CreditManager.top_users`."""
        return self._runner.call(lambda: self._manager.top_users(limit, start, end))

    def aggregate_stats(self, start: datetime, end: datetime) -> AggregateStatsRow:
        """Blocking `CreditManager.aggregate_stats`."""
        return self._runner.call(lambda: self._manager.aggregate_stats(start, end))

    def deduct(
        self,
        user_id: str,
        metrics: UsageMetrics,
        idempotency_key: str | None = None,
        metadata: _Metadata = None,
        *,
        operation_type: str = "llm_call",
    ) -> DeductionResult:
        """Blocking `CreditManager.deduct`."""
        return self._runner.call(
            lambda: self._manager.deduct(
                user_id, metrics, idempotency_key, metadata, operation_type=operation_type
            )
        )

    def deduct_fixed(
        self,
        user_id: str,
        job: str,
        idempotency_key: str | None = None,
        metadata: _Metadata = None,
    ) -> DeductionResult:
        """Blocking `CreditManager.deduct_fixed`."""
        return self._runner.call(
            lambda: self._manager.deduct_fixed(user_id, job, idempotency_key, metadata)
        )

    def deduct_team(
        self,
        team_id: str,
        user_id: str,
        usage: UsageMetrics | int,
        metadata: _Metadata = None,
        *,
        idempotency_key: str | None = None,
    ) -> TeamDeductionResult:
        """Blocking `CreditManager.deduct_team`."""
        return self._runner.call(
            lambda: self._manager.deduct_team(
                team_id, user_id, usage, metadata, idempotency_key=idempotency_key
            )
        )

    def hold(
        self,
        user_id: str,
        estimate: UsageMetrics | int,
        *,
        operation_type: str = "llm_call",
        idempotency_key: str | None = None,
        metadata: _Metadata = None,
        ttl: float | timedelta | None = None,
    ) -> SyncHold:
        """
        A blocking `CreditManager.hold`, used as ``with billing.hold(...) as hold:``.

        Args:
            user_id: The account.
            estimate: The expected usage, or credits to hold.
            operation_type: Stored with the hold.
            idempotency_key: The request's id.
            metadata: Stored with the hold and on the usage row.
            ttl: Seconds (or a timedelta) the hold counts for.

        Returns:
            The hold, a context manager.
        """
        hold = self._manager.hold(
            user_id,
            estimate,
            operation_type=operation_type,
            idempotency_key=idempotency_key,
            metadata=metadata,
            ttl=ttl,
        )
        return SyncHold(hold, self._runner)
