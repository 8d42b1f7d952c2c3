"""
`CreditManager`: pricing plus a store, the high-level API applications call.

The manager prices usage with the store's pricing version in force (switching to a
scheduled version at the instant it takes effect), charges it through any `CreditStore` as a
hold followed by its settlement, raises the typed `CreditError`s instead of returning error
results, and reports what happened as `CreditEvent`s. With ``maintenance_interval`` it also
sweeps expired credits and prunes what retention no longer keeps, in the background; with
``auto_top_up`` it buys credits for users whose balance runs low.

```python
async with CreditManager(MemoryStore()) as manager:
    await manager.setup()
    await manager.publish_pricing({"models": {"_default": "input_tokens * 0.001"}})
    await manager.add_credits("alice", 10_000, "purchase")

    # A charge for usage that already happened:
    await manager.deduct("alice", UsageMetrics(model="gpt-4o", input_tokens=1200))

    # A gateway: hold an estimate, stream, record usage as it arrives, settle once.
    async with manager.hold("alice", UsageMetrics(model="gpt-4o", input_tokens=1200,
                                                  output_tokens=800)) as hold:
        async for chunk in stream():
            hold.record(chunk.usage)
        await hold.settle()
```

ducto 1.x's spellings work too: ``CreditManager(store, engine, emitter)``,
``add_credits(..., tx_type=...)``, ``deduct_fixed(..., job_name=...)``,
``publish_pricing_from_dict``; passing both spellings of one argument is refused. The
charging core lives in ``ducto._charging``, `Hold` in ``ducto._hold``, the pricing schedule
in ``ducto._pricing_schedule`` and `AutoTopUp` in ``ducto._top_up``; all are used through
this module.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Final, Self, TypeVar

import anyio
from pydantic import BaseModel, ConfigDict

from ducto._charging import (
    DEFAULT_OPERATION,
    Charger,
    MetadataInput,
    Priced,
    charge_metadata,
    check_credits,
    check_ttl,
    checked_usage,
    error_name,
    usage_details,
)
from ducto._hold import Hold
from ducto._pricing_schedule import Rates, Schedule
from ducto._reporting import Reporter, check_thresholds
from ducto._shown import shown
from ducto._top_up import AutoTopUp, TopUpCharge, TopUps
from ducto.errors import (
    DuctoError,
    ErrorCode,
    InsufficientCreditsError,
    InvalidArgumentError,
    PricingNotLoadedError,
)
from ducto.events import CreditEventEmitter, CreditEventType
from ducto.interface.base import CreditStore
from ducto.interface.models import (
    AddCreditsResult,
    AggregateStatsRow,
    AllowanceResult,
    BalanceResult,
    CheckFeatureResult,
    CreditMetadata,
    DailySpendRow,
    DeductionResult,
    GetUserPlanResult,
    PricingConfigData,
    PricingConfigResult,
    PruneResult,
    RefundResult,
    ReserveResult,
    SetupResult,
    SetUserPlanResult,
    SpendByModelRow,
    SpendByUserRow,
    SweepResult,
    TeamDeductionResult,
    TopUserRow,
)
from ducto.pricing import CostBreakdown, PricingEngine, UsageMetrics

__all__ = [
    "AutoTopUp",
    "CreditManager",
    "Hold",
    "InsufficientCreditsError",
    "MaintenanceRun",
    "PricingNotLoadedError",
    "TopUpCharge",
]

_log = logging.getLogger("ducto.manager")

_T = TypeVar("_T")

_DEFAULT_HANDLER_TIMEOUT: Final = 10.0
_DEFAULT_EVENT_BUFFER: Final = 10_000
_MAX_MAINTENANCE_INTERVAL: Final = 366 * 86400
_DEFAULT_PRICING_REFRESH: Final = 60.0


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _either(name: str, value: _T | None, alias: str, alias_value: _T | None) -> _T | None:
    """The one of two spellings of an argument that was passed; both is an error."""
    if value is not None and alias_value is not None:
        raise InvalidArgumentError(f"pass {name}= or its ducto 1.x spelling {alias}=, not both")
    return value if value is not None else alias_value


def _check_interval(value: object, name: str = "maintenance_interval") -> float | None:
    """An interval in seconds, named `name`: None (off), or seconds or a timedelta."""
    if value is None:
        return None
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value) if abs(value) <= _MAX_MAINTENANCE_INTERVAL else math.inf
    else:
        raise InvalidArgumentError(
            f"{name} must be None (off), seconds (int or float) or a timedelta, got {shown(value)}"
        )
    if not math.isfinite(seconds) or not 0 < seconds <= _MAX_MAINTENANCE_INTERVAL:
        raise InvalidArgumentError(
            f"{name} must be more than 0 and at most"
            f" {_MAX_MAINTENANCE_INTERVAL} seconds, got {shown(value)}"
        )
    return seconds


class MaintenanceRun(BaseModel):
    """
    One run of a manager's background maintenance (see ``maintenance_interval``).

    Attributes:
        run: The run's number since the manager was created, from 1.
        started_at: When the run started (the manager's clock).
        finished_at: When it finished.
        swept: What `sweep_expired_credits` wrote off; None when the sweep failed.
        pruned: What `prune` deleted; None when it failed.
        sweep_error: Why the sweep failed (the exception's type and message), else None.
        prune_error: Why the prune failed, else None.
    """

    model_config = ConfigDict(frozen=True)

    run: int
    started_at: datetime
    finished_at: datetime
    swept: SweepResult | None = None
    pruned: PruneResult | None = None
    sweep_error: str | None = None
    prune_error: str | None = None

    @property
    def ok(self) -> bool:
        """Whether both steps succeeded."""
        return self.sweep_error is None and self.prune_error is None


def _check_timeout(value: object) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 < value <= 86400:
        return float(value)
    raise InvalidArgumentError(
        f"handler_timeout must be seconds, more than 0 and at most 86400, got {shown(value)}"
    )


class CreditManager:
    """
    Prices usage and charges it through a store; the high-level API of ducto.

    The manager holds the pricing engine in use, the event emitter and the low-balance
    thresholds; the store holds everything else, so several managers (in several
    processes) can share one store. Its calls raise the typed errors
    (`InsufficientCreditsError`, `SpendCapExceededError`, ...) where the store returns
    error results.

    Use it as an async context manager: that opens and closes the store, and runs event
    handlers in a background task so that they never hold billing up (see `ducto.events`).
    With ``maintenance_interval`` set, another background task sweeps expired credits and
    prunes what retention no longer keeps while the manager is open; with ``auto_top_up``,
    top-ups run in background tasks too (see `AutoTopUp`).

    Pricing comes from the store's pricing versions, once `publish_pricing` or
    `load_pricing_from_store` was called. Each charge is priced with the version in force
    when it is made, by the manager's clock: the manager knows the version in force and the
    scheduled ones (each version's config is fetched once), and switches to a scheduled
    version exactly at its ``effective_at``, without a store call. It refreshes what it knows
    from the store lazily, at most every ``pricing_refresh`` seconds and once when a
    scheduled version falls due, so a version another process publishes, schedules or
    cancels is seen within that interval (and a cancelled version never takes effect). A
    hold is priced throughout with the version in force when it was placed.
    """

    def __init__(
        self,
        store: CreditStore,
        engine: PricingEngine | None = None,
        emitter: CreditEventEmitter | None = None,
        *,
        events: CreditEventEmitter | None = None,
        hold_ttl: float | timedelta = 600,
        low_balance_thresholds: Iterable[int] = (),
        clock: Callable[[], datetime] | None = None,
        handler_timeout: float = _DEFAULT_HANDLER_TIMEOUT,
        event_buffer: int = _DEFAULT_EVENT_BUFFER,
        maintenance_interval: float | timedelta | None = None,
        pricing_refresh: float | timedelta | None = _DEFAULT_PRICING_REFRESH,
        auto_top_up: AutoTopUp | None = None,
    ) -> None:
        """
        Create a manager over `store`; does no I/O.

        Args:
            store: Any `CreditStore`.
            engine: The pricing engine to use at once; else call `publish_pricing` or
                `load_pricing_from_store` before pricing anything.
            emitter: ducto 1.x's name for `events`.
            events: Where events go; a new, empty emitter when None (see `events`).
            hold_ttl: Seconds (or a timedelta) the manager's holds live before they stop
                counting, unless `hold` is given its own ``ttl``.
            low_balance_thresholds: Available-balance levels that raise a ``low_balance``
                event each time a user's available credits cross down through them.
            clock: Returns the aware UTC time events are stamped with, and by which pricing
                versions take effect.
            handler_timeout: Seconds an async event handler may take on one event before
                it is cancelled and logged (see `ducto.events`).
            event_buffer: Most events waiting for async handlers while the manager is
                open; more are dropped and logged.
            maintenance_interval: Seconds (or a timedelta) between background maintenance
                runs while the manager is open (``async with manager:``): the first an
                interval after entering, each next one an interval after the last ended.
                None (the default) runs none. A run calls `sweep_expired_credits` (which
                emits ``credits_expired``) and then the store's `prune`; a failure is logged
                on the ``ducto.manager`` logger and tried again at the next run. Both are safe
                from several processes at once, so every process of a fleet may run it. See
                `last_maintenance`.
            pricing_refresh: Most seconds (or a timedelta) between refreshes of the pricing
                versions from the store (60 by default); None never refreshes (versions
                this manager scheduled itself still take effect on time). A refresh is made
                by the first charge after the interval, one at a time; one that fails is
                logged on the ``ducto.manager`` logger and the manager goes on pricing with
                the versions it knows.
            auto_top_up: Buy credits for users whose available balance crosses below a
                threshold (see `AutoTopUp`); top-ups run while the manager is open.

        Raises:
            InvalidArgumentError: An argument is invalid (the message names it), or both
                `events` and `emitter` were passed.
        """
        if not callable(getattr(store, "reserve_credits", None)):
            raise InvalidArgumentError(f"store must be a CreditStore, got {shown(store)}")
        if engine is not None and not isinstance(engine, PricingEngine):
            raise InvalidArgumentError(f"engine must be a PricingEngine, got {shown(engine)}")
        chosen: object = _either("events", events, "emitter", emitter)
        if chosen is None:
            chosen = CreditEventEmitter()
        elif not isinstance(chosen, CreditEventEmitter):
            name = "events" if events is not None else "emitter"
            raise InvalidArgumentError(f"{name} must be a CreditEventEmitter, got {shown(chosen)}")
        given_clock: object = clock
        if given_clock is not None and not callable(given_clock):
            raise InvalidArgumentError(
                f"clock must be a callable returning a datetime, got {shown(clock)}"
            )
        if type(event_buffer) is not int or not 1 <= event_buffer <= 10_000_000:
            raise InvalidArgumentError(
                f"event_buffer must be an int from 1 to 10_000_000, got {shown(event_buffer)}"
            )
        if auto_top_up is not None and not isinstance(auto_top_up, AutoTopUp):
            raise InvalidArgumentError(
                f"auto_top_up must be an AutoTopUp, got {shown(auto_top_up)}"
            )
        self._events = chosen
        self._clock = clock or _utc_now
        self._reporter = Reporter(
            self._events,
            check_thresholds(low_balance_thresholds),
            self._clock,
            _check_timeout(handler_timeout),
            event_buffer,
        )
        schedule = Schedule(store, self._clock, _check_interval(pricing_refresh, "pricing_refresh"))
        self._charger = Charger(store, self._reporter, check_ttl(hold_ttl, "hold_ttl"), schedule)
        if engine is not None:
            self._charger.use(engine)
        self._store = store
        self._stack: AsyncExitStack | None = None
        self._maintenance_every = _check_interval(maintenance_interval)
        self._maintenance_runs = 0
        self._last_maintenance: MaintenanceRun | None = None
        self._top_ups: TopUps | None = None
        if auto_top_up is not None:
            self._top_ups = TopUps(auto_top_up, store, self._reporter, self._top_up_granted)
            self._reporter.watch(auto_top_up.threshold, self._top_ups.crossed)

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        """
        Open the store, start delivering events to async handlers in the background, and
        start running auto top-ups and the background maintenance where they are set.

        Raises:
            InvalidArgumentError: The manager is open already.
        """
        if self._stack is not None:
            raise InvalidArgumentError("the manager is open already")
        stack = AsyncExitStack()
        await stack.enter_async_context(self._store)
        try:
            await stack.enter_async_context(self._reporter.background())
            if self._top_ups is not None:
                # Before the maintenance, so it stops after it; before the store closes and
                # while events are still delivered.
                await stack.enter_async_context(self._top_ups.running())
            if self._maintenance_every is not None:
                # Entered last, so it stops first: no run overlaps closing the store.
                await stack.enter_async_context(self._maintenance(self._maintenance_every))
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """
        Stop the maintenance and the auto top-ups, deliver the events still waiting, close
        the store.

        Top-ups in flight get up to twice the `AutoTopUp`'s ``timeout`` to finish (no new
        attempt of its ``charge`` starts), then are cancelled; waiting events get up to
        ``handler_timeout`` to be delivered.
        """
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.__aexit__(exc_type, exc, tb)

    async def aclose(self) -> None:
        """Close the store; closing twice is harmless."""
        await self._store.aclose()

    async def setup(self, database_url: str | None = None) -> SetupResult:
        """
        Create or migrate the store's schema (the store's `setup`); safe on every deploy.

        Args:
            database_url: Passed to the store, as in ducto 1.x.

        Returns:
            What was created or migrated.
        """
        return await self._store.setup(database_url)

    @property
    def last_maintenance(self) -> MaintenanceRun | None:
        """
        The latest background maintenance run (None before the first one finishes).

        For health checks and dashboards: ``ok``, what was swept and pruned, and when. A
        failed step has its error here and in the log, and is tried again next interval.
        """
        return self._last_maintenance

    @asynccontextmanager
    async def _maintenance(self, every: float) -> AsyncIterator[None]:
        """Run `_maintain` an interval after entering, then an interval after each run."""

        async def loop() -> None:
            while True:
                await anyio.sleep(every)
                try:
                    await self._maintain(every)
                except Exception:
                    # Only a bug gets here (a clock that raises, say); it must not cancel
                    # the application, which runs inside this task group.
                    _log.exception("background maintenance failed; trying again in %g s", every)

        async with anyio.create_task_group() as tg:
            tg.start_soon(loop)
            try:
                yield
            finally:
                tg.cancel_scope.cancel()

    async def _maintain(self, every: float) -> None:
        """One maintenance run: sweep, then prune; a failing step is logged, not raised."""
        self._maintenance_runs += 1
        started = self._clock()
        errors: dict[str, str] = {}
        swept = await self._maintenance_step("sweep", self.sweep_expired_credits, errors, every)
        pruned = await self._maintenance_step("prune", self._store.prune, errors, every)
        self._last_maintenance = MaintenanceRun(
            run=self._maintenance_runs,
            started_at=started,
            finished_at=self._clock(),
            swept=swept,
            pruned=pruned,
            sweep_error=errors.get("sweep"),
            prune_error=errors.get("prune"),
        )
        if swept is not None and pruned is not None:
            _log.debug(
                "background maintenance: swept %d lots, pruned %d keys, %d holds, %d windows",
                swept.expired_count,
                pruned.idempotency_keys,
                pruned.holds,
                pruned.windows,
            )

    @staticmethod
    async def _maintenance_step(
        name: str, call: Callable[[], Awaitable[_T]], errors: dict[str, str], every: float
    ) -> _T | None:
        try:
            return await call()
        except Exception as exc:
            # A store that is down now may be back by the next run; the application must
            # not fail because its housekeeping did.
            errors[name] = f"{type(exc).__name__}: {exc}"
            _log.error(
                "background maintenance: %s failed (%s); trying again in %g s",
                name,
                errors[name],
                every,
                exc_info=not isinstance(exc, DuctoError),
            )
            return None

    @property
    def store(self) -> CreditStore:
        """The store, for the calls the manager does not wrap (caps, teams, ledger pages)."""
        return self._store

    @property
    def auto_top_up(self) -> AutoTopUp | None:
        """The auto top-up configured, or None."""
        return self._top_ups.config if self._top_ups is not None else None

    @property
    def pending_top_ups(self) -> int:
        """How many auto top-ups this manager is running now (claiming, paying, granting)."""
        return self._top_ups.pending if self._top_ups is not None else 0

    async def _top_up_granted(self, result: AddCreditsResult) -> None:
        await self._after_grant(result, "purchase")

    @property
    def events(self) -> CreditEventEmitter:
        """The emitter the manager reports to; register handlers with ``events.on``."""
        return self._events

    @property
    def emitter(self) -> CreditEventEmitter:
        """ducto 1.x's name for `events`."""
        return self._events

    # -- pricing -----------------------------------------------------------------------------

    @property
    def engine(self) -> PricingEngine:
        """
        The pricing engine in force now (by the manager's clock).

        Raises:
            PricingNotLoadedError: No pricing is loaded yet.
        """
        return self._charger.engine

    @property
    def pricing_version(self) -> int | None:
        """
        The number of the store's pricing version in force now (by the manager's clock).

        None before pricing is loaded, or while the manager prices with an engine it was
        given rather than one from the store.
        """
        rates = self._charger.schedule.now()
        return rates.version if rates is not None else None

    @property
    def scheduled_pricing(self) -> list[tuple[datetime, int]]:
        """
        The scheduled versions this manager knows, as ``(effective_at, version)``, soonest
        first (as of its last refresh from the store, less those that took effect since).
        """
        return self._charger.schedule.upcoming()

    async def publish_pricing(
        self,
        config: PricingConfigData | Mapping[str, object],
        label: str | None = None,
        *,
        effective_at: datetime | None = None,
    ) -> str:
        """
        Publish a pricing config as the store's next version, in force now or at a time.

        The config is checked first by building the engine that will price with it (the
        check `validate_pricing_config` makes), so a config that cannot be priced is refused
        before anything reaches the store. The manager then reads the store's schedule back
        and follows the store from then on (see `CreditManager`): without `effective_at`
        it prices with the new version at once; with a later `effective_at` the version
        is scheduled and every manager prices with it from that instant on (this one
        exactly then, the others within their ``pricing_refresh``), unless it is cancelled
        first (`cancel_pricing`).

        Args:
            config: The config (`PricingConfig`), or its dict form as ducto 1.x wrote it.
            label: A name for the version, for people reading the history.
            effective_at: When the version takes effect (an aware datetime); None, or an
                instant not after the store's clock, puts it in force at once.

        Returns:
            The id of the new version.

        Raises:
            ConfigError: The config is invalid or cannot be priced (a
                `ConfigExpressionError` names the section and key).
            InvalidArgumentError: The label or `effective_at` is invalid.
        """
        if isinstance(config, PricingConfigData):
            engine = PricingEngine(config)
        elif isinstance(config, Mapping):
            engine = PricingEngine.from_dict(config)
        else:
            raise InvalidArgumentError(
                f"config must be PricingConfigData or a dict, got {type(config).__name__}"
            )
        if effective_at is None:
            version_id = await self._store.set_active_pricing(engine.config, label)
        else:
            version_id = await self._store.set_active_pricing(
                engine.config, label, effective_at=effective_at
            )
        schedule = self._charger.schedule
        try:
            await schedule.reload({version_id: engine})
        except Exception as exc:
            # Published, but not read back: price with it now if it is in force now, and
            # read the schedule at the next charge.
            _log.warning(
                "published pricing version %s but reading the schedule back failed (%s: %s)",
                version_id,
                type(exc).__name__,
                exc,
                exc_info=not isinstance(exc, DuctoError),
            )
            schedule.published_unread(engine, effective_at)
        return version_id

    async def publish_pricing_from_dict(
        self,
        data: PricingConfigData | Mapping[str, object],
        label: str | None = None,
        *,
        effective_at: datetime | None = None,
    ) -> str:
        """
        Publish a pricing config (ducto 1.x's name; the same as `publish_pricing`).

        Args:
            data: The config as a dict, or the `PricingConfig` model itself.
            label: A name for the version.
            effective_at: When the version takes effect; None: at once.

        Returns:
            The id of the new version.

        Raises:
            ConfigError: `data` is not a valid config.
        """
        if not isinstance(data, PricingConfigData | Mapping):
            raise InvalidArgumentError(
                f"data must be PricingConfigData or a dict, got {type(data).__name__}"
            )
        return await self.publish_pricing(data, label, effective_at=effective_at)

    async def cancel_pricing(self, version: int) -> PricingConfigResult:
        """
        Cancel a scheduled pricing version before it takes effect.

        This manager forgets it at once; the others within their ``pricing_refresh``, and
        in any case before its ``effective_at`` (a manager reads the schedule again when a
        scheduled version falls due), so it never takes effect.

        Args:
            version: The version's number (`PricingConfigHistoryItem.version`).

        Returns:
            The version, with ``cancelled_at`` set.

        Raises:
            PricingVersionNotFoundError: No such version.
            PricingVersionInEffectError: The version has taken effect (or was activated);
                only a scheduled version can be cancelled.
        """
        result = await self._store.cancel_pricing(version)
        self._charger.schedule.cancelled(result.version)
        return result

    async def load_pricing_from_store(self) -> PricingEngine:
        """
        Price with the store's pricing versions from now on: the one in force and the
        scheduled ones (see `CreditManager`).

        Returns:
            The engine in force now.

        Raises:
            PricingNotLoadedError: The store has no pricing version in force yet (the
                manager keeps the engine it had), as in ducto 1.x.
        """
        if await self._charger.schedule.reload() is None:
            raise PricingNotLoadedError(
                "the store has no pricing version: publish one with publish_pricing()"
            )
        return self._charger.engine

    def calculate(self, metrics: UsageMetrics, *, plan: str | None = None) -> CostBreakdown:
        """
        Price one usage record with the engine in use (no I/O, so not async).

        Args:
            metrics: What the call used.
            plan: A plan id of the config whose rate overrides apply, or None for base rates.

        Returns:
            The cost breakdown; ``credits`` is what a charge would take.

        Raises:
            PricingNotLoadedError: No pricing is loaded.
            InvalidArgumentError: The usage is invalid or cannot be priced.
        """
        return self.engine.calculate(checked_usage("metrics", metrics), plan=plan)

    # -- balances, grants, refunds, expiry ---------------------------------------------------

    async def get_balance(self, user_id: str) -> BalanceResult:
        """
        A user's balance.

        Args:
            user_id: The account.

        Returns:
            The ledger ``balance``, active holds (``reserved``) and what is ``available``.
        """
        return await self._store.get_balance(user_id)

    async def add_credits(
        self,
        user_id: str,
        amount: int,
        type: str | None = None,
        metadata: CreditMetadata | None = None,
        expires_at: datetime | None = None,
        *,
        idempotency_key: str | None = None,
        tx_type: str | None = None,
    ) -> AddCreditsResult:
        """
        Grant credits (or, with a negative ``adjustment``, take them back).

        The arguments are the store's. Emits ``credits_added`` (``credits_deducted`` for a
        negative adjustment) unless the key replayed an earlier grant.

        Args:
            user_id: The account.
            amount: Credits, > 0 (an ``adjustment`` may be negative).
            type: ``purchase``, ``subscription``, ``signup_bonus`` or ``adjustment`` (the
                default).
            metadata: Stored on the ledger row.
            expires_at: When the credits stop being spendable, or None.
            idempotency_key: A repeated key grants once and returns the original result.
            tx_type: ducto 1.x's name for `type`.

        Returns:
            The grant.

        Raises:
            InsufficientCreditsError: A negative adjustment would take available below 0.
            IdempotencyConflictError: The key was used for a different grant.
            InvalidArgumentError: An argument is invalid, or both `type` and `tx_type`
                were passed.
        """
        kind: object = _either("type", type, "tx_type", tx_type)
        if kind is None:
            kind = "adjustment"
        elif not isinstance(kind, str):
            name = "type" if type is not None else "tx_type"
            raise InvalidArgumentError(f"{name} must be a transaction type str, got {shown(kind)}")
        result = await self._store.add_credits(
            user_id, amount, kind, metadata, expires_at, idempotency_key=idempotency_key
        )
        result.raise_for_error()
        if not result.idempotent:
            await self._after_grant(result, kind)
        return result

    async def _after_grant(self, result: AddCreditsResult, kind: str) -> None:
        reporter = self._reporter
        added = result.amount > 0
        await reporter.emit(
            CreditEventType.CREDITS_ADDED if added else CreditEventType.CREDITS_DEDUCTED,
            user_id=result.user_id,
            amount=abs(result.amount),
            balance_after=result.new_balance,
            available=result.available,
            transaction_id=result.transaction_id,
            idempotency_key=result.idempotency_key,
            metadata={"transaction_type": kind},
        )
        if not added:
            await reporter.moved(
                result.user_id,
                result.available - result.amount,
                result.available,
                result.new_balance,
            )

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

        Emits ``credits_refunded``, or ``refund_failed`` when the store refuses or fails.

        Args:
            transaction_id: The usage row to refund.
            amount: Credits to refund; None refunds what is left.
            reason: Why, stored on the refund row.
            metadata: Stored on the refund row.
            idempotency_key: A repeated key refunds once.

        Returns:
            The refund.

        Raises:
            TransactionNotFoundError, NotRefundableError, AlreadyRefundedError,
            OverRefundError, IdempotencyConflictError: The store refused the refund.
            StoreError: The store failed.
        """
        try:
            result = await self._store.refund_credits(
                transaction_id, amount, reason, metadata, idempotency_key=idempotency_key
            )
        except InvalidArgumentError:
            raise
        except Exception as exc:
            await self._refund_failed(transaction_id, amount, error_name(exc))
            raise
        if not result.ok:
            await self._refund_failed(transaction_id, amount, str(result.error))
            result.raise_for_error()
        if not result.idempotent:
            await self._reporter.emit(
                CreditEventType.CREDITS_REFUNDED,
                user_id=result.user_id or None,
                team_id=result.team_id,
                amount=result.amount,
                balance_after=result.new_balance,
                transaction_id=result.refund_transaction_id,
                idempotency_key=result.idempotency_key,
                metadata={"original_transaction_id": result.original_transaction_id},
            )
        return result

    async def _refund_failed(self, transaction_id: str, amount: int | None, error: str) -> None:
        await self._reporter.emit(
            CreditEventType.REFUND_FAILED,
            transaction_id=transaction_id,
            amount=amount if type(amount) is int else 0,
            error=error,
        )

    async def sweep_expired_credits(self, dry_run: bool = False) -> SweepResult:
        """
        Write off the unspent remainder of every expired lot, for every user.

        Emits one ``credits_expired`` event (with no user) when a real sweep wrote anything
        off. Expired credits were already unspendable, so available balances do not change.

        Args:
            dry_run: Report what would be written off and change nothing.

        Returns:
            How many lots and credits expired.
        """
        result = await self._store.sweep_expired_credits(dry_run)
        if not dry_run and result.expired_count:
            await self._reporter.emit(
                CreditEventType.CREDITS_EXPIRED,
                amount=result.expired_amount,
                metadata={"expired_count": result.expired_count},
            )
        return result

    # -- plans -------------------------------------------------------------------------------

    async def set_user_plan(self, user_id: str, plan_id: str) -> SetUserPlanResult:
        """
        Put a user on a plan of the active pricing version.

        Args:
            user_id: The account.
            plan_id: A plan the active version defines.

        Returns:
            The plan now recorded.

        Raises:
            InvalidArgumentError: The active version does not define `plan_id`.
        """
        return await self._store.set_user_plan(user_id, plan_id)

    async def get_user_plan(self, user_id: str) -> GetUserPlanResult:
        """
        A user's plan as the active pricing version defines it.

        Args:
            user_id: The account.

        Returns:
            The plan id, name, free allowance and features (empty when none).
        """
        return await self._store.get_user_plan(user_id)

    async def check_feature(self, user_id: str, feature: str) -> CheckFeatureResult:
        """
        Whether a user's plan has a feature (present unless absent, None or False).

        Args:
            user_id: The account.
            feature: A key of the plan's ``features``.

        Returns:
            ``has_feature`` and the feature's ``value``.
        """
        return await self._store.check_feature(user_id, feature)

    async def check_allowance(self, user_id: str) -> AllowanceResult:
        """
        The plan allowance left in the current UTC month.

        Args:
            user_id: The account.

        Returns:
            The allowance, what is used and what is left, and the period.
        """
        return await self._store.check_allowance(user_id)

    # -- analytics ---------------------------------------------------------------------------

    async def spend_by_user(self, start: datetime, end: datetime) -> list[SpendByUserRow]:
        """
        Net paid usage per user in ``[start, end)``, most first.

        Args:
            start: The window's start (naive datetimes are taken as UTC).
            end: The window's end, excluded.

        Returns:
            One row per user who spent.
        """
        return await self._store.spend_by_user(start, end)

    async def spend_by_model(self, start: datetime, end: datetime) -> list[SpendByModelRow]:
        """
        Net paid usage per model in ``[start, end)``, most first.

        Args:
            start: The window's start.
            end: The window's end, excluded.

        Returns:
            One row per model (``unknown`` for usage that named none).
        """
        return await self._store.spend_by_model(start, end)

    async def daily_spend(self, start: datetime, end: datetime) -> list[DailySpendRow]:
        """
        Net paid usage per UTC day in ``[start, end)``, oldest first.

        Args:
            start: The window's start.
            end: The window's end, excluded.

        Returns:
            One row per day with usage.
        """
        return await self._store.daily_spend(start, end)

    async def top_users(self, limit: int, start: datetime, end: datetime) -> list[TopUserRow]:
        """
        The users who spent most in ``[start, end)``.

        Args:
            limit: How many users at most.
            start: The window's start.
            end: The window's end, excluded.

        Returns:
            Up to `limit` rows, most first.
        """
        return await self._store.top_users(limit, start, end)

    async def aggregate_stats(self, start: datetime, end: datetime) -> AggregateStatsRow:
        """
        Totals over ``[start, end)``.

        Args:
            start: The window's start.
            end: The window's end, excluded.

        Returns:
            Credits consumed, active users, average daily spend, top model and user.
        """
        return await self._store.aggregate_stats(start, end)

    # -- charging ----------------------------------------------------------------------------

    async def deduct(
        self,
        user_id: str,
        metrics: UsageMetrics,
        idempotency_key: str | None = None,
        metadata: MetadataInput = None,
        *,
        operation_type: str = DEFAULT_OPERATION,
    ) -> DeductionResult:
        """
        Price usage that happened and charge it: a hold for the cost, then its settlement.

        The price is the pricing version's in force now (by the manager's clock), with the
        user's plan rate overrides. The hold uses the plan allowance first, keeps the
        version's ``min_balance`` and names the model (so per-model spend caps apply). With
        an idempotency key, the same key keys the hold and the settlement, so a retry of the
        same request is charged once and returns the original result (``idempotent=True``),
        even when an earlier attempt failed half way.

        A usage that prices to 0 credits still places a 1-credit hold (a hold cannot be
        empty) and settles it for 0, so it writes a usage row like any other.

        If the settlement fails after the hold was placed, the hold is released (shielded
        from cancellation) before the error propagates. The store calls that place and settle
        the hold are shielded too (a nonconforming store may commit a call yet report it
        cancelled), so a cancellation that arrives during them takes effect once `deduct` has
        finished; one that arrives before (while the plan is looked up) charges nothing. Emits
        ``credits_deducted`` (and ``cap_warning``, ``low_balance`` where they apply),
        ``cap_reached`` when a deny cap refuses, or ``deduct_failed``.

        Args:
            user_id: The account.
            metrics: What the call used.
            idempotency_key: The request's id; retries with the same id charge once.
            metadata: Stored on the usage row; the system keys (``model``,
                ``input_tokens``, ``output_tokens``, ``cost_total``, ``pricing_model``,
                ``pricing_version``) replace the caller's keys of those names.
            operation_type: Stored with the hold.

        Returns:
            The settlement: ``charged`` (what the balance paid), ``allowance_consumed``,
            ``balance_after``, ``available``, ``transaction_id``.

        Raises:
            InsufficientCreditsError: The user cannot cover the cost above the floor.
            SpendCapExceededError: A deny spend cap would be exceeded.
            IdempotencyConflictError: The key was used for a different request.
            PricingNotLoadedError: No pricing is loaded.
            InvalidArgumentError: The usage is invalid or cannot be priced, costs more than
                a store can charge (2**62 credits), or an argument is invalid.
            StoreError: The store failed.
        """
        charger = self._charger
        metrics = checked_usage("metrics", metrics)
        rates = await charger.rates()
        plan = await charger.plan_for(user_id, rates)
        priced = charger.price_checked(metrics, plan, rates)
        meta = charge_metadata(metadata, priced.usage, priced.cost, pricing_version=priced.version)
        return await charger.charge(
            user_id, priced, operation_type, meta, idempotency_key, rates.min_balance
        )

    async def deduct_fixed(
        self,
        user_id: str,
        job: str | None = None,
        idempotency_key: str | None = None,
        metadata: MetadataInput = None,
        *,
        job_name: str | None = None,
    ) -> DeductionResult:
        """
        Charge the fixed cost of a named job from the pricing config's ``fixed`` section.

        Works like `deduct` (hold, then settlement; allowance first; the same idempotency
        rules; the pricing version in force now). The job name is stored as ``fixed_job``
        in the row's metadata, and the version as ``pricing_version``.

        Args:
            user_id: The account.
            job: A key of the config's ``fixed`` section.
            idempotency_key: The request's id; retries with the same id charge once.
            metadata: Stored on the usage row.
            job_name: ducto 1.x's name for `job`.

        Returns:
            The settlement.

        Raises:
            InvalidArgumentError: The job is not in the config (an unknown job is never
                free), neither or both of `job` and `job_name` were passed.
            PricingNotLoadedError: No pricing is loaded.
            InsufficientCreditsError, SpendCapExceededError, IdempotencyConflictError:
                As for `deduct`.
        """
        name = _either("job", job, "job_name", job_name)
        if not isinstance(name, str) or not name:
            raise InvalidArgumentError(f"job must be a non-empty str, got {shown(name)}")
        charger = self._charger
        rates = await charger.rates()
        priced = Priced(rates.engine.get_fixed_cost(name), version=rates.version)
        meta = charge_metadata(metadata, fixed_job=name, pricing_version=rates.version)
        return await charger.charge(
            user_id, priced, "fixed_job", meta, idempotency_key, rates.min_balance
        )

    async def reserve_credits(
        self,
        user_id: str,
        amount: int | UsageMetrics,
        operation_type: str = DEFAULT_OPERATION,
        metadata: MetadataInput = None,
        min_balance: int | None = None,
        *,
        ttl: float | timedelta | None = None,
        use_allowance: bool = False,
        idempotency_key: str | None = None,
    ) -> ReserveResult:
        """
        Hold credits, as the store's `reserve_credits` does, with the manager's defaults.

        ducto 1.x's manager call, with 1.x's behaviour: a refusal comes back on the result
        (``error`` set, ``amount`` 0) rather than raising, so 1.x code that tests
        ``result.error`` keeps working; `hold` and the other manager calls raise instead.
        The floor defaults to the pricing config's ``min_balance`` (5 before any pricing is
        loaded), and usage is priced with the user's plan. Settle or release the hold through
        `store`, or prefer `hold`, which never leaves one behind. Emits ``reserved`` (and
        ``low_balance``), or ``cap_reached`` when a deny cap refuses.

        Args:
            user_id: The account.
            amount: Credits to hold (>= 1), or the expected usage.
            operation_type: Stored with the hold.
            metadata: Stored with the hold; its ``model`` (or the usage's) makes per-model
                caps apply.
            min_balance: The floor the hold must leave; the config's when None.
            ttl: Seconds (or a timedelta) the hold counts for; the manager's ``hold_ttl``
                when None.
            use_allowance: Let the hold (and its settlement) use the plan allowance first.
            idempotency_key: A repeated key replays the original hold.

        Returns:
            The hold, or the refusal (``error`` is ``insufficient_credits``,
            ``spend_cap_exceeded`` or ``idempotency_conflict``; ``raise_for_error()`` raises
            it as the typed error).

        Raises:
            InvalidArgumentError: An argument is invalid, or the usage cannot be priced.
        """
        charger = self._charger
        model: str | None = None
        version: int | None = None
        if isinstance(amount, UsageMetrics):
            rates: Rates | None = await charger.rates()
            assert rates is not None
            plan = await charger.plan_for(user_id, rates)
            priced = charger.price("amount", amount, plan, rates)
            credits = max(charger.chargeable("amount", priced).credits, 1)
            model = priced.usage.model if priced.usage is not None else None
            version = priced.version
        else:
            credits = check_credits("amount", amount, minimum=1)
            rates = await charger.rates_or_none()
        floor = charger.min_balance(rates) if min_balance is None else min_balance
        hold_ttl = charger.hold_ttl if ttl is None else check_ttl(ttl, "ttl")
        if type(use_allowance) is not bool:
            raise InvalidArgumentError(f"use_allowance must be a bool, got {shown(use_allowance)}")
        meta = charge_metadata(metadata, model=model, pricing_version=version)
        held = await charger.place(
            user_id,
            credits,
            operation_type,
            meta,
            idempotency_key,
            hold_ttl,
            floor,
            use_allowance=use_allowance,
            raise_refusal=False,
        )
        if held.reservation.error is None:
            await charger.placed(held)
        return held.reservation

    async def deduct_team(
        self,
        team_id: str,
        user_id: str,
        usage: UsageMetrics | int,
        metadata: MetadataInput = None,
        *,
        idempotency_key: str | None = None,
    ) -> TeamDeductionResult:
        """
        Charge a team pool on behalf of a member, for usage or a number of credits.

        Usage is priced like `deduct` (with the member's plan rate overrides). A usage that
        prices to 0 credits charges nothing and writes nothing: the result has ``charged``
        0 and no transaction id. Emits ``credits_deducted`` with ``team_id`` set.

        Args:
            team_id: The team.
            user_id: The member spending.
            usage: What the call used, or the credits to charge (>= 1).
            metadata: Stored on the team usage row (system keys win, as for `deduct`).
            idempotency_key: A repeated key charges once.

        Returns:
            The team charge.

        Raises:
            TeamNotFoundError, UserNotInTeamError, InsufficientTeamBalanceError,
            SpendCapExceededError, IdempotencyConflictError: The store refused the charge.
            InvalidArgumentError: The usage cannot be priced, or an argument is invalid.
        """
        charger = self._charger
        if isinstance(usage, UsageMetrics):
            usage = checked_usage("usage", usage)
            rates = await charger.rates()
            plan = await charger.plan_for(user_id, rates)
            priced = charger.chargeable("usage", charger.price_checked(usage, plan, rates))
            if priced.credits == 0:
                return TeamDeductionResult(
                    team_id=team_id, user_id=user_id, idempotency_key=idempotency_key
                )
        else:
            priced = Priced(check_credits("usage", usage, minimum=1))
        meta = charge_metadata(metadata, priced.usage, priced.cost, pricing_version=priced.version)
        result = await self._store.deduct_team(
            team_id, user_id, priced.credits, meta, idempotency_key=idempotency_key
        )
        if result.error is not None:
            await self._team_refused(result, priced.credits, meta)
            result.raise_for_error()
        if not result.idempotent:
            await self._reporter.emit(
                CreditEventType.CREDITS_DEDUCTED,
                user_id=user_id,
                team_id=team_id,
                amount=result.charged,
                balance_after=result.team_balance_after,
                available=result.available,
                transaction_id=result.transaction_id,
                idempotency_key=result.idempotency_key,
                metadata=usage_details(priced.usage, priced.cost, meta),
            )
        return result

    async def _team_refused(
        self, result: TeamDeductionResult, amount: int, meta: CreditMetadata | None
    ) -> None:
        if result.error is not ErrorCode.SPEND_CAP_EXCEEDED:
            return
        details = {"limit": result.cap_limit, "current_spend": result.cap_spend, "action": "deny"}
        if meta is not None and meta.model is not None:
            details["model"] = meta.model
        await self._reporter.emit(
            CreditEventType.CAP_REACHED,
            user_id=result.user_id or None,
            team_id=result.team_id or None,
            amount=amount,
            idempotency_key=result.idempotency_key,
            error=str(result.error),
            metadata={k: v for k, v in details.items() if v is not None},
        )

    # -- holds -------------------------------------------------------------------------------

    def hold(
        self,
        user_id: str,
        estimate: UsageMetrics | int,
        *,
        operation_type: str = DEFAULT_OPERATION,
        idempotency_key: str | None = None,
        metadata: MetadataInput = None,
        ttl: float | timedelta | None = None,
        team_id: str | None = None,
    ) -> Hold:
        """
        Hold credits for a call about to run; settle them when it is done.

        ```python
        async with manager.hold(user_id, estimate) as hold:
            async for chunk in provider.stream(request):
                hold.record(chunk.usage)      # partial usage, as the stream goes
                yield chunk.text
            await hold.settle()               # charge what was recorded, exactly once
        ```

        Entering reserves the estimate (usage is priced with the user's plan; an int is
        credits) with the plan allowance first, the config's ``min_balance``, and the model
        named for per-model caps; a refusal raises there, before the call runs. The pricing
        version in force then prices everything recorded and settled on the hold, even after
        a scheduled price change. See `Hold` for what happens when the block is left without
        settling, or by an exception or a cancellation.

        With `team_id`, the hold is on the team pool, attributed to member `user_id`
        (`CreditStore.reserve_team_credits`): the pool must cover it and the member's
        monthly cap is enforced when it is placed; it settles into a ``team_usage`` row.

        Args:
            user_id: The account.
            estimate: The expected usage, or credits to hold (>= 1). Usage that prices to
                0 holds 1 credit.
            operation_type: Stored with the hold.
            idempotency_key: The request's id: keys the hold and its settlement, so a retried
                request is charged once.
            metadata: Stored with the hold and on the usage row (system keys win).
            ttl: Seconds (or a timedelta) the hold counts for; the manager's ``hold_ttl``
                when None.
            team_id: Hold (and charge) this team's pool instead of the user's credits.

        Returns:
            The hold, an async context manager.

        Raises:
            InvalidArgumentError: `estimate` is neither usage nor an int of credits, or
                `ttl` is invalid.
        """
        if isinstance(estimate, UsageMetrics):
            estimate = checked_usage("estimate", estimate)
        else:
            check_credits("estimate", estimate, minimum=1)
        charger = self._charger
        return Hold(
            charger,
            user_id,
            estimate,
            operation_type=operation_type,
            idempotency_key=idempotency_key,
            metadata=metadata,
            ttl=charger.hold_ttl if ttl is None else check_ttl(ttl, "ttl"),
            team_id=team_id,
        )
