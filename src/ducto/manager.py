"""
`CreditManager`: pricing plus a store, the high-level API applications call.

The manager prices usage with a `PricingEngine`, charges it through any `CreditStore` as a
hold followed by its settlement, raises the typed `CreditError`s instead of returning error
results, and reports what happened as `CreditEvent`s.

```python
async with CreditManager(MemoryStore()) as manager:
    await manager.store.setup()
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
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Final, Self

import anyio
from anyio.lowlevel import checkpoint_if_cancelled
from pydantic import ValidationError

from ducto.errors import (
    CreditError,
    ErrorCode,
    InvalidArgumentError,
    ReservationAlreadySettledError,
    ReservationReleasedError,
)
from ducto.events import CreditEvent, CreditEventEmitter, CreditEventType
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
    RefundResult,
    ReserveResult,
    SetUserPlanResult,
    SpendByModelRow,
    SpendByUserRow,
    SweepResult,
    TeamDeductionResult,
    TopUserRow,
)
from ducto.pricing import CostBreakdown, PricingEngine, UsageMetrics

__all__ = ["CreditManager", "Hold"]

_log = logging.getLogger("ducto.manager")

_DEFAULT_OPERATION: Final = "llm_call"
"""The operation type of holds placed for model usage."""
_DEFAULT_MIN_BALANCE: Final = 5
"""The floor used before any pricing is loaded (the 1.x default of `reserve_credits`)."""
_MAX_LINKS: Final = 32
"""Most replacement holds one idempotency key may walk through (see `_Held`)."""
_LOW_BALANCE_USERS: Final = 100_000
"""Most users whose last-known available balance the low-balance alerts remember."""
_MAX_TTL_SECONDS: Final = 366 * 86400
_RELINK_ERRORS: Final = frozenset({ErrorCode.RESERVATION_RELEASED, ErrorCode.IDEMPOTENCY_CONFLICT})

_Metadata = CreditMetadata | Mapping[str, object] | None


def _utc_now() -> datetime:
    return datetime.now(UTC)


# -- helpers -----------------------------------------------------------------------------------


def _check_credits(name: str, value: object, *, minimum: int) -> int:
    if type(value) is not int:
        raise InvalidArgumentError(
            f"{name} must be UsageMetrics or an int number of credits, "
            f"got {type(value).__name__} {value!r}"
        )
    if value < minimum:
        raise InvalidArgumentError(f"{name} must be at least {minimum} credits, got {value}")
    return value


def _check_ttl(value: object, name: str = "hold_ttl") -> float | timedelta:
    seconds: float
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise InvalidArgumentError(f"{name} must be seconds or a timedelta, got {value!r}")
    if not 0 < seconds <= _MAX_TTL_SECONDS:
        raise InvalidArgumentError(
            f"{name} must be more than 0 and at most {_MAX_TTL_SECONDS} seconds, got {value!r}"
        )
    return value


def _check_metrics(name: str, value: object) -> UsageMetrics:
    if not isinstance(value, UsageMetrics):
        raise InvalidArgumentError(f"{name} must be UsageMetrics, got {type(value).__name__}")
    return value


def _charge_metadata(
    caller: object,
    usage: UsageMetrics | None = None,
    cost: CostBreakdown | None = None,
    **extra: object,
) -> CreditMetadata | None:
    """
    The caller's metadata with the manager's system keys on top.

    System keys win: ``model``, ``input_tokens`` and ``output_tokens`` of the usage,
    ``cost_total`` (the exact price before rounding, as a string) and ``pricing_model``
    (the pricing key the model resolved to), plus `extra`.
    """
    data: dict[str, Any]
    if caller is None:
        data = {}
    elif isinstance(caller, CreditMetadata):
        data = caller.model_dump(exclude_none=True)
    elif isinstance(caller, Mapping):
        data = dict(caller)
    else:
        raise InvalidArgumentError(
            f"metadata must be CreditMetadata, a dict or None, got {type(caller).__name__}"
        )
    if usage is not None:
        if usage.model is not None:
            data["model"] = usage.model
        data["input_tokens"] = usage.input_tokens
        data["output_tokens"] = usage.output_tokens
    if cost is not None:
        data["cost_total"] = str(cost.total)
        if cost.model is not None:
            data["pricing_model"] = cost.model
    data.update((key, value) for key, value in extra.items() if value is not None)
    if not data:
        return None
    try:
        return CreditMetadata.model_validate(data)
    except ValidationError as exc:
        raise InvalidArgumentError(f"metadata is not valid CreditMetadata: {exc}") from exc


def _usage_details(
    usage: UsageMetrics | None, cost: CostBreakdown | None, metadata: CreditMetadata | None
) -> dict[str, Any]:
    details: dict[str, Any] = {}
    model = usage.model if usage is not None else None
    if model is None and metadata is not None:
        model = metadata.model
    if model is not None:
        details["model"] = model
    if usage is not None:
        details["input_tokens"] = usage.input_tokens
        details["output_tokens"] = usage.output_tokens
    if cost is not None:
        details["cost_total"] = str(cost.total)
    return details


def _link_key(key: str, reservation_id: str) -> str:
    """The reserve key of the hold that replaces `reservation_id` for request `key`."""
    digest = hashlib.sha256(f"{key}\x00{reservation_id}".encode()).hexdigest()[:40]
    return f"ducto-relink:{digest}"


def _error_name(exc: BaseException) -> str:
    if isinstance(exc, CreditError):
        return str(exc.code)
    return type(exc).__name__


class _LowBalance:
    """
    Edge-triggered low-balance detection over a bounded map of last-known balances.

    An alert fires for threshold ``t`` when a user's available balance goes from ``>= t`` to
    ``< t``; it fires again only after a later observation shows ``>= t`` once more. The
    previous value is the last one this manager observed for the user; for a user it has
    not seen (or has forgotten), the value just before the operation when the caller knows
    it, else nothing fires.
    """

    __slots__ = ("_capacity", "_last", "thresholds")

    def __init__(self, thresholds: Sequence[int], capacity: int = _LOW_BALANCE_USERS) -> None:
        self.thresholds = tuple(sorted(set(thresholds), reverse=True))
        self._capacity = capacity
        self._last: OrderedDict[str, int] = OrderedDict()

    def observe(self, user_id: str, available: int, before: int | None = None) -> list[int]:
        """Record `available` for the user; return the thresholds it crossed down through."""
        last = self._last
        previous = last.pop(user_id, None)
        if previous is None:
            previous = before
        last[user_id] = available
        if len(last) > self._capacity:
            last.popitem(last=False)
        if previous is None:
            return []
        return [t for t in self.thresholds if previous >= t > available]


@dataclass(slots=True)
class _Held:
    """
    A hold the manager placed and must settle or release.

    With an idempotency key, the key names the request: the hold is reserved and settled
    under it. When a retry finds (by replay) a hold that an earlier, failed attempt
    released, nothing was charged under the key, so the charge moves to a replacement hold
    reserved under a key derived from the released hold's id (`_link_key`). Later retries
    walk the same chain and replay the settlement, so a request is charged at most once.
    """

    user_id: str
    reservation: ReserveResult
    amount: int
    operation_type: str
    metadata: CreditMetadata | None
    key: str | None
    ttl: float | timedelta

    @property
    def before(self) -> int | None:
        """The available balance just before this hold was placed, when it was placed now."""
        first = self.reservation
        return None if first.idempotent else first.available + first.amount


# -- the manager -------------------------------------------------------------------------------


class CreditManager:
    """
    Prices usage and charges it through a store; the high-level API of ducto.

    The manager holds the pricing engine in use, the event emitter and the low-balance
    state; the store holds everything else, so several managers (in several processes)
    can share one store. Its calls raise the typed errors (`InsufficientCreditsError`,
    `SpendCapExceededError`, ...) where the store returns error results.

    Use it as an async context manager to open and close the store with it.

    Pricing is loaded once, by `publish_pricing` or `load_pricing_from_store`; a version
    another process publishes is picked up on the next `load_pricing_from_store`.
    """

    def __init__(
        self,
        store: CreditStore,
        *,
        engine: PricingEngine | None = None,
        events: CreditEventEmitter | None = None,
        hold_ttl: float | timedelta = 600,
        low_balance_thresholds: Sequence[int] = (),
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        """
        Create a manager over `store`; does no I/O.

        Args:
            store: Any `CreditStore`.
            engine: The pricing engine to use at once; else call `publish_pricing` or
                `load_pricing_from_store` before pricing anything.
            events: Where events go; a new, empty emitter when None (see `events`).
            hold_ttl: Seconds (or a timedelta) the manager's holds live before they stop
                counting, unless `hold` is given its own ``ttl``.
            low_balance_thresholds: Available-balance levels that raise a ``low_balance``
                event when a user's available credits cross down through them.
            clock: Returns the aware UTC time events are stamped with.

        Raises:
            InvalidArgumentError: `hold_ttl`, a threshold or `engine` is invalid.
        """
        if engine is not None and not isinstance(engine, PricingEngine):
            raise InvalidArgumentError(f"engine must be a PricingEngine, got {engine!r}")
        if events is not None and not isinstance(events, CreditEventEmitter):
            raise InvalidArgumentError(f"events must be a CreditEventEmitter, got {events!r}")
        thresholds = list(low_balance_thresholds)
        for threshold in thresholds:
            if type(threshold) is not int:
                raise InvalidArgumentError(
                    f"low_balance_thresholds must hold ints, got {threshold!r}"
                )
        self._store = store
        self._engine: PricingEngine | None = None
        self._priced_plans: frozenset[str] = frozenset()
        if engine is not None:
            self._use(engine)
        self._events = events if events is not None else CreditEventEmitter()
        self._hold_ttl = _check_ttl(hold_ttl)
        self._low = _LowBalance(thresholds) if thresholds else None
        self._clock = clock or _utc_now

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        """Open the store."""
        await self._store.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the store."""
        await self._store.__aexit__(exc_type, exc, tb)

    async def aclose(self) -> None:
        """Close the store; closing twice is harmless."""
        await self._store.aclose()

    @property
    def store(self) -> CreditStore:
        """The store, for the calls the manager does not wrap (caps, teams, ledger pages)."""
        return self._store

    @property
    def events(self) -> CreditEventEmitter:
        """The emitter the manager reports to; register handlers with ``events.on``."""
        return self._events

    # -- pricing -----------------------------------------------------------------------------

    def _use(self, engine: PricingEngine) -> None:
        names: set[str] = set()
        for key, plan in (engine.config.plans or {}).items():
            if plan.rate_overrides:
                names.update((key, plan.id))
        self._engine = engine
        self._priced_plans = frozenset(names)

    @property
    def engine(self) -> PricingEngine:
        """
        The pricing engine in use.

        Raises:
            InvalidArgumentError: No pricing is loaded yet.
        """
        engine = self._engine
        if engine is None:
            raise InvalidArgumentError(
                "no pricing loaded: call publish_pricing() or load_pricing_from_store() first"
            )
        return engine

    async def publish_pricing(
        self, config: PricingConfigData | Mapping[str, object], label: str | None = None
    ) -> str:
        """
        Publish a pricing config as the store's new active version, and price with it.

        The config is checked first by building the engine that will price with it (the
        check `validate_pricing_config` makes), so a config that cannot be priced is refused
        before anything reaches the store.

        Args:
            config: The config, validated or in the dict form ducto 1.x used.
            label: A name for the version, for people reading the history.

        Returns:
            The id of the new version.

        Raises:
            InvalidArgumentError: The config is invalid or cannot be priced
                (`ExpressionError` names the section and key).
        """
        if isinstance(config, PricingConfigData):
            engine = PricingEngine(config)
        elif isinstance(config, Mapping):
            engine = PricingEngine.from_dict(config)
        else:
            raise InvalidArgumentError(
                f"config must be PricingConfigData or a dict, got {type(config).__name__}"
            )
        version_id = await self._store.set_active_pricing(engine.config, label)
        self._use(engine)
        return version_id

    async def load_pricing_from_store(self) -> PricingEngine | None:
        """
        Price with the store's active pricing version from now on.

        Returns:
            The new engine, or None when the store has no pricing yet (the manager then
            keeps the engine it had).
        """
        active = await self._store.get_active_pricing()
        if active is None:
            return None
        engine = PricingEngine(active.config)
        self._use(engine)
        return engine

    def calculate(self, metrics: UsageMetrics, *, plan: str | None = None) -> CostBreakdown:
        """
        Price one usage record with the engine in use (no I/O, so not async).

        Args:
            metrics: What the call used.
            plan: A plan id of the config whose rate overrides apply, or None for base rates.

        Returns:
            The cost breakdown; ``credits`` is what a charge would take.

        Raises:
            InvalidArgumentError: No pricing is loaded, or the usage cannot be priced.
        """
        return self.engine.calculate(metrics, plan=plan)

    async def _plan_for(self, user_id: str) -> str | None:
        """The user's plan id when it has rate overrides in the engine in use, else None."""
        if not self._priced_plans:
            return None
        plan = await self._store.get_user_plan(user_id)
        if plan.plan_id is None or plan.plan_name is None:
            return None  # no plan, or one the active version no longer defines
        return plan.plan_id if plan.plan_id in self._priced_plans else None

    # -- events ------------------------------------------------------------------------------

    async def _emit(self, kind: CreditEventType, **fields: Any) -> None:
        if self._events.has_handlers(kind):
            await self._events.emit(CreditEvent(type=kind, timestamp=self._clock(), **fields))

    async def _observe(
        self,
        user_id: str,
        available: int | None = None,
        before: int | None = None,
        balance: int | None = None,
    ) -> None:
        """Feed the low-balance detector; reads the balance when `available` is unknown."""
        low = self._low
        if low is None:
            return
        if available is None:
            current = await self._store.get_balance(user_id)
            available, balance = current.available, current.balance
        for threshold in low.observe(user_id, available, before):
            await self._emit(
                CreditEventType.LOW_BALANCE,
                user_id=user_id,
                available=available,
                balance_after=balance,
                threshold=threshold,
            )

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
        type: str = "adjustment",
        metadata: CreditMetadata | None = None,
        expires_at: datetime | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> AddCreditsResult:
        """
        Grant credits (or, with a negative ``adjustment``, take them back).

        The arguments are the store's. Emits ``credits_added`` (``credits_deducted`` for a
        negative adjustment) unless the key replayed an earlier grant.

        Args:
            user_id: The account.
            amount: Credits, > 0 (an ``adjustment`` may be negative).
            type: ``purchase``, ``subscription``, ``signup_bonus`` or ``adjustment``.
            metadata: Stored on the ledger row.
            expires_at: When the credits stop being spendable, or None.
            idempotency_key: A repeated key grants once and returns the original result.

        Returns:
            The grant.

        Raises:
            InsufficientCreditsError: A negative adjustment would take available below 0.
            IdempotencyConflictError: The key was used for a different grant.
        """
        result = await self._store.add_credits(
            user_id, amount, type, metadata, expires_at, idempotency_key=idempotency_key
        )
        result.raise_for_error()
        if not result.idempotent:
            with anyio.CancelScope(shield=True):
                await self._after_grant(result, type)
        return result

    async def _after_grant(self, result: AddCreditsResult, type_: str) -> None:
        try:
            kind = (
                CreditEventType.CREDITS_ADDED
                if result.amount > 0
                else CreditEventType.CREDITS_DEDUCTED
            )
            await self._emit(
                kind,
                user_id=result.user_id,
                amount=abs(result.amount),
                balance_after=result.new_balance,
                available=result.available,
                transaction_id=result.transaction_id,
                idempotency_key=result.idempotency_key,
                metadata={"transaction_type": type_},
            )
            await self._observe(
                result.user_id,
                result.available,
                before=result.available - result.amount,
                balance=result.new_balance,
            )
        except Exception:
            _log.exception("reporting the grant %s failed", result.transaction_id)

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
            with anyio.CancelScope(shield=True):
                await self._refund_failed(transaction_id, amount, _error_name(exc))
            raise
        if not result.ok:
            with anyio.CancelScope(shield=True):
                await self._refund_failed(transaction_id, amount, str(result.error))
            result.raise_for_error()
        if not result.idempotent:
            with anyio.CancelScope(shield=True):
                await self._after_refund(result)
        return result

    async def _refund_failed(self, transaction_id: str, amount: int | None, error: str) -> None:
        try:
            await self._emit(
                CreditEventType.REFUND_FAILED,
                transaction_id=transaction_id,
                amount=amount or 0,
                error=error,
            )
        except Exception:
            _log.exception("reporting the failed refund of %s failed", transaction_id)

    async def _after_refund(self, result: RefundResult) -> None:
        try:
            user_id = result.user_id or None
            await self._emit(
                CreditEventType.CREDITS_REFUNDED,
                user_id=user_id,
                team_id=result.team_id,
                amount=result.amount,
                balance_after=result.new_balance,
                transaction_id=result.refund_transaction_id,
                idempotency_key=result.idempotency_key,
                metadata={"original_transaction_id": result.original_transaction_id},
            )
            if user_id is not None and result.team_id is None:
                await self._observe(user_id)
        except Exception:
            _log.exception("reporting the refund %s failed", result.refund_transaction_id)

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
            with anyio.CancelScope(shield=True):
                try:
                    await self._emit(
                        CreditEventType.CREDITS_EXPIRED,
                        amount=result.expired_amount,
                        metadata={"expired_count": result.expired_count},
                    )
                except Exception:
                    _log.exception("reporting the expiry sweep failed")
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
        metadata: _Metadata = None,
        *,
        operation_type: str = _DEFAULT_OPERATION,
    ) -> DeductionResult:
        """
        Price usage that happened and charge it: a hold for the cost, then its settlement.

        The price uses the user's plan rate overrides. The hold uses the plan allowance
        first, keeps the pricing config's ``min_balance`` and names the model (so per-model
        spend caps apply). With an idempotency key, the same key keys the hold and the
        settlement, so a retry of the same request is charged once and returns the original
        result (``idempotent=True``), even when an earlier attempt failed half way.

        A usage that prices to 0 credits still places a 1-credit hold (a hold cannot be
        empty) and settles it for 0, so it writes a usage row like any other.

        If the settlement fails after the hold was placed, the hold is released (shielded
        from cancellation) before the error propagates. The store calls that place and settle
        the hold are shielded too (a nonconforming store may commit a call yet report it
        cancelled), so a cancellation that arrives during them takes effect once `deduct` has
        finished; one that arrives before (while the plan is looked up) charges nothing. Emits
        ``credits_deducted`` (and ``cap_warning``, ``low_balance`` where they apply), or
        ``deduct_failed``.

        Args:
            user_id: The account.
            metrics: What the call used.
            idempotency_key: The request's id; retries with the same id charge once.
            metadata: Stored on the usage row; the system keys (``model``,
                ``input_tokens``, ``output_tokens``, ``cost_total``, ``pricing_model``)
                replace the caller's keys of those names.
            operation_type: Stored with the hold.

        Returns:
            The settlement: ``amount`` paid by the balance, ``allowance_consumed``,
            ``balance_after``, ``transaction_id``.

        Raises:
            InsufficientCreditsError: The user cannot cover the cost above the floor.
            SpendCapExceededError: A deny spend cap would be exceeded.
            IdempotencyConflictError: The key was used for a different request.
            InvalidArgumentError: No pricing is loaded, the usage cannot be priced, or an
                argument is invalid.
            StoreError: The store failed.
        """
        metrics = _check_metrics("metrics", metrics)
        engine = self.engine
        plan = await self._plan_for(user_id)
        cost = engine.calculate(metrics, plan=plan)
        meta = _charge_metadata(metadata, metrics, cost)
        return await self._charge(
            user_id,
            cost.credits,
            operation_type,
            meta,
            idempotency_key,
            engine.min_balance,
            metrics,
            cost,
        )

    async def deduct_fixed(
        self,
        user_id: str,
        job: str,
        idempotency_key: str | None = None,
        metadata: _Metadata = None,
    ) -> DeductionResult:
        """
        Charge the fixed cost of a named job from the pricing config's ``fixed`` section.

        Works like `deduct` (hold, then settlement; allowance first; the same idempotency
        rules). The job name is stored as ``fixed_job`` in the row's metadata.

        Args:
            user_id: The account.
            job: A key of the config's ``fixed`` section.
            idempotency_key: The request's id; retries with the same id charge once.
            metadata: Stored on the usage row.

        Returns:
            The settlement.

        Raises:
            InvalidArgumentError: The job is not in the config (an unknown job is never
                free), or no pricing is loaded.
            InsufficientCreditsError, SpendCapExceededError, IdempotencyConflictError:
                As for `deduct`.
        """
        if not isinstance(job, str) or not job:
            raise InvalidArgumentError(f"job must be a non-empty str, got {job!r}")
        engine = self.engine
        amount = engine.get_fixed_cost(job)
        meta = _charge_metadata(metadata, fixed_job=job)
        return await self._charge(
            user_id, amount, "fixed_job", meta, idempotency_key, engine.min_balance, None, None
        )

    async def _charge(
        self,
        user_id: str,
        amount: int,
        operation_type: str,
        meta: CreditMetadata | None,
        key: str | None,
        min_balance: int,
        usage: UsageMetrics | None,
        cost: CostBreakdown | None,
    ) -> DeductionResult:
        """Hold `amount` (at least 1), settle it for `amount`; release on any failure."""
        # Shielded: a nonconforming store may commit a call yet report it cancelled, and the
        # manager must know whether it placed (or settled) a hold.
        with anyio.CancelScope(shield=True):
            reservation = await self._store.reserve_credits(
                user_id,
                max(amount, 1),
                operation_type,
                meta,
                min_balance,
                ttl=self._hold_ttl,
                use_allowance=True,
                idempotency_key=key,
            )
        reservation.raise_for_error()
        held = _Held(
            user_id, reservation, max(amount, 1), operation_type, meta, key, self._hold_ttl
        )
        try:
            with anyio.CancelScope(shield=True):
                result = await self._settle(held, amount, meta)
            result.raise_for_error()
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await self._abandon(held, amount, exc, usage, cost)
            raise
        if not result.idempotent:
            with anyio.CancelScope(shield=True):
                await self._after_deduct(held, result, usage, cost)
        return result

    async def _settle(
        self, held: _Held, amount: int, meta: CreditMetadata | None
    ) -> DeductionResult:
        """
        Settle `held` for `amount`, walking replacement holds for a retried key.

        Returns the store's result; error results are the caller's to raise.
        """
        store = self._store
        result: DeductionResult | None = None
        for _ in range(_MAX_LINKS):
            current = held.reservation
            result = await store.deduct_credits(
                held.user_id, current.reservation_id, amount, held.key, meta
            )
            if (
                result.ok
                or held.key is None
                or not current.idempotent
                or result.error not in _RELINK_ERRORS
            ):
                return result
            # A replayed hold that is released (or whose key settled a later link): the
            # request was not charged on this hold, so move to its replacement.
            replacement = await store.reserve_credits(
                held.user_id,
                held.amount,
                held.operation_type,
                held.metadata,
                0,
                ttl=held.ttl,
                use_allowance=True,
                idempotency_key=_link_key(held.key, current.reservation_id),
            )
            replacement.raise_for_error()
            held.reservation = replacement
        assert result is not None
        return result

    async def _abandon(
        self,
        held: _Held,
        amount: int,
        exc: BaseException,
        usage: UsageMetrics | None,
        cost: CostBreakdown | None,
    ) -> ErrorCode | None:
        """
        Release a hold whose settlement failed; report ``deduct_failed``. Never raises.

        Returns:
            None when the hold is now released; else why not: ``reservation_already_settled``
            (the failed call had committed after all), ``reservation_not_found``, or
            ``reservation_released`` standing for "the release failed too" (noted on `exc`
            and logged).
        """
        outcome: ErrorCode | None = ErrorCode.RESERVATION_RELEASED
        reservation_id = held.reservation.reservation_id
        try:
            if held.reservation.idempotent:
                outcome = None  # a replayed hold is the placing request's to resolve
            else:
                released = await self._store.release_reservation(held.user_id, reservation_id)
                outcome = released.error
        except Exception as release_error:
            _log.exception("releasing hold %s after a failed charge failed", reservation_id)
            exc.add_note(f"ducto: releasing hold {reservation_id!r} failed: {release_error!r}")
        try:
            await self._emit(
                CreditEventType.DEDUCT_FAILED,
                user_id=held.user_id,
                amount=amount,
                reservation_id=reservation_id,
                idempotency_key=held.key,
                error=_error_name(exc),
                metadata=_usage_details(usage, cost, held.metadata),
            )
        except Exception:
            _log.exception("reporting the failed charge on hold %s failed", reservation_id)
        return outcome

    async def _after_deduct(
        self,
        held: _Held,
        result: DeductionResult,
        usage: UsageMetrics | None,
        cost: CostBreakdown | None,
    ) -> None:
        """Report a settlement: events and low-balance alerts. Never raises."""
        try:
            details = _usage_details(usage, cost, held.metadata)
            await self._emit(
                CreditEventType.CREDITS_DEDUCTED,
                user_id=result.user_id,
                amount=result.charged,
                balance_after=result.balance_after,
                transaction_id=result.transaction_id,
                reservation_id=result.reservation_id,
                idempotency_key=result.idempotency_key,
                metadata={**details, "allowance_consumed": result.allowance_consumed},
            )
            if result.cap_warning is not None:
                await self._emit(
                    CreditEventType.CAP_WARNING,
                    user_id=result.user_id,
                    amount=result.charged,
                    balance_after=result.balance_after,
                    transaction_id=result.transaction_id,
                    reservation_id=result.reservation_id,
                    metadata={**details, "action": result.cap_warning},
                )
            await self._observe(result.user_id, before=held.before)
        except Exception:
            _log.exception("reporting the charge %s failed", result.transaction_id)

    async def deduct_team(
        self,
        team_id: str,
        user_id: str,
        usage: UsageMetrics | int,
        metadata: _Metadata = None,
        *,
        idempotency_key: str | None = None,
    ) -> TeamDeductionResult:
        """
        Charge a team pool on behalf of a member, for usage or a number of credits.

        Usage is priced like `deduct` (with the member's plan rate overrides). A usage that
        prices to 0 credits charges nothing and writes nothing: the result has ``amount``
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
        metrics: UsageMetrics | None = None
        cost: CostBreakdown | None = None
        if isinstance(usage, UsageMetrics):
            metrics = usage
            cost = self.engine.calculate(metrics, plan=await self._plan_for(user_id))
            amount = cost.credits
            if amount == 0:
                return TeamDeductionResult(
                    team_id=team_id, user_id=user_id, idempotency_key=idempotency_key
                )
        else:
            amount = _check_credits("usage", usage, minimum=1)
        meta = _charge_metadata(metadata, metrics, cost)
        result = await self._store.deduct_team(
            team_id, user_id, amount, meta, idempotency_key=idempotency_key
        )
        result.raise_for_error()
        if not result.idempotent:
            with anyio.CancelScope(shield=True):
                try:
                    await self._emit(
                        CreditEventType.CREDITS_DEDUCTED,
                        user_id=user_id,
                        team_id=team_id,
                        amount=result.charged,
                        balance_after=result.team_balance_after,
                        available=result.available,
                        transaction_id=result.transaction_id,
                        idempotency_key=result.idempotency_key,
                        metadata=_usage_details(metrics, cost, meta),
                    )
                except Exception:
                    _log.exception("reporting the team charge %s failed", result.transaction_id)
        return result

    # -- holds -------------------------------------------------------------------------------

    def hold(
        self,
        user_id: str,
        estimate: UsageMetrics | int,
        *,
        operation_type: str = _DEFAULT_OPERATION,
        idempotency_key: str | None = None,
        metadata: _Metadata = None,
        ttl: float | timedelta | None = None,
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
        named for per-model caps; a refusal raises there, before the call runs. See `Hold`
        for what happens when the block is left without settling, or by an exception or a
        cancellation.

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

        Returns:
            The hold, an async context manager.

        Raises:
            InvalidArgumentError: `estimate` is neither usage nor an int.
        """
        if not isinstance(estimate, UsageMetrics):
            _check_credits("estimate", estimate, minimum=1)
        return Hold(
            self,
            user_id,
            estimate,
            operation_type=operation_type,
            idempotency_key=idempotency_key,
            metadata=metadata,
            ttl=self._hold_ttl if ttl is None else _check_ttl(ttl, "ttl"),
        )


class Hold:
    """
    A hold on a user's credits for one call, settled once (made by `CreditManager.hold`).

    Inside the ``async with`` block, `record` adds partial usage as it arrives and `settle`
    charges the actual cost once. The hold never outlives the block:

    - **Settled inside the block**: nothing more happens on exit.
    - **Left normally without settling**: settled at the recorded usage when something was
      recorded, else released. This is the safe default: the hold never dangles, and the
      user is never charged for nothing.
    - **Left by an exception or a cancellation**: resolved the same way, shielded from
      cancellation, and the exception propagates. So a stream cut after the provider billed
      some tokens is still charged for what was recorded. If `settle` failed (the store
      refused or broke), the hold was released there.
    - Usage recorded for a model the pricing cannot price is charged at the held estimate
      rather than not at all.

    A hold whose idempotency key replayed one placed by an earlier or concurrent attempt
    of the same request is never released by this attempt: the attempt that placed it
    settles or releases it (or its TTL ends it).

    If resolving the hold on the way out fails, the original exception still propagates,
    with a note describing the failure (which is also logged).

    The store calls that place and settle the hold are shielded from cancellation, because
    a nonconforming store may commit a call yet report it cancelled, and a hold the manager
    does not know about could never be released. A cancellation that arrives while the hold is being
    placed releases it before the block runs; one that arrives during `settle` lets the
    settlement finish and takes effect right after.

    Attributes are meaningful once the block is entered.
    """

    def __init__(
        self,
        manager: CreditManager,
        user_id: str,
        estimate: UsageMetrics | int,
        *,
        operation_type: str,
        idempotency_key: str | None,
        metadata: _Metadata,
        ttl: float | timedelta,
    ) -> None:
        """Prepare a hold; use `CreditManager.hold` rather than this constructor."""
        self._manager = manager
        self._user_id = user_id
        self._estimate = estimate
        self._operation_type = operation_type
        self._key = idempotency_key
        self._metadata = metadata
        self._ttl = ttl
        self._plan: str | None = None
        self._held: _Held | None = None
        self._entered = False
        self._recorded: UsageMetrics | None = None
        self._result: DeductionResult | None = None
        self._pending: tuple[int, UsageMetrics | None, CostBreakdown | None] | None = None
        self._settling = False
        self._failed = False
        self._settled = False
        self._released = False

    # -- state -------------------------------------------------------------------------------

    @property
    def user_id(self) -> str:
        """The account the hold is on."""
        return self._user_id

    @property
    def reservation_id(self) -> str:
        """The store's id of the hold ("" before the block is entered)."""
        return self._held.reservation.reservation_id if self._held is not None else ""

    @property
    def estimate_credits(self) -> int:
        """The credits held (0 before the block is entered)."""
        return self._held.amount if self._held is not None else 0

    @property
    def recorded(self) -> UsageMetrics | None:
        """The sum of the usage recorded so far, or None when nothing was recorded."""
        return self._recorded

    @property
    def result(self) -> DeductionResult | None:
        """The settlement, once the hold is settled; else None."""
        return self._result

    @property
    def settled(self) -> bool:
        """Whether the hold was settled (charged)."""
        return self._settled

    @property
    def released(self) -> bool:
        """Whether the hold was released without a charge."""
        return self._released

    # -- the block ---------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        """
        Reserve the estimate.

        Raises:
            InsufficientCreditsError, SpendCapExceededError, IdempotencyConflictError:
                The store refused the hold.
            InvalidArgumentError: The estimate cannot be priced, or the hold was entered
                before.
        """
        if self._entered:
            raise InvalidArgumentError("a hold can be entered once; make a new one")
        self._entered = True
        manager = self._manager
        engine = manager._engine
        self._plan = await manager._plan_for(self._user_id)
        model: str | None = None
        if isinstance(self._estimate, UsageMetrics):
            amount = max(manager.engine.calculate(self._estimate, plan=self._plan).credits, 1)
            model = self._estimate.model
        else:
            amount = self._estimate
        meta = _charge_metadata(self._metadata, model=model)
        min_balance = engine.min_balance if engine is not None else _DEFAULT_MIN_BALANCE
        # Shielded: a nonconforming store may commit a call yet report it cancelled, and a hold
        # the manager does not know about could never be released.
        with anyio.CancelScope(shield=True):
            reservation = await manager._store.reserve_credits(
                self._user_id,
                amount,
                self._operation_type,
                meta,
                min_balance,
                ttl=self._ttl,
                use_allowance=True,
                idempotency_key=self._key,
            )
        reservation.raise_for_error()
        self._held = _Held(
            self._user_id, reservation, amount, self._operation_type, meta, self._key, self._ttl
        )
        try:
            if not reservation.idempotent:
                with anyio.CancelScope(shield=True):
                    await manager._emit(
                        CreditEventType.RESERVED,
                        user_id=self._user_id,
                        amount=amount,
                        available=reservation.available,
                        balance_after=reservation.balance,
                        reservation_id=reservation.reservation_id,
                        idempotency_key=self._key,
                        metadata=_usage_details(None, None, meta),
                    )
            # Cancelled while reserving: free the hold and never start the call.
            await checkpoint_if_cancelled()
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                try:
                    await self._release()
                except Exception as error:
                    _log.exception("releasing hold %s failed", reservation.reservation_id)
                    exc.add_note(
                        f"ducto: releasing hold {reservation.reservation_id!r} failed: {error!r}"
                    )
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Settle or release the hold unless that already happened (see `Hold`)."""
        if self._held is None or self._settled or self._released:
            return
        with anyio.CancelScope(shield=True):
            try:
                await self._resolve()
            except Exception as error:
                if exc is None:
                    raise
                _log.exception("resolving hold %s after %r failed", self.reservation_id, exc_type)
                exc.add_note(
                    f"ducto: resolving hold {self.reservation_id!r} on the way out "
                    f"failed: {error!r}"
                )

    async def _resolve(self) -> None:
        """Settle at the pending or recorded usage, or release when there is none."""
        held = self._held
        assert held is not None
        charge = self._pending if not self._failed else None
        if charge is None and not self._failed and self._recorded is not None:
            try:
                charge = self._price(self._recorded)
            except InvalidArgumentError:
                _log.warning(
                    "usage recorded on hold %s cannot be priced; charging the estimate",
                    held.reservation.reservation_id,
                    exc_info=True,
                )
                charge = (held.amount, self._recorded, None)
        if charge is None:
            await self._release()
        else:
            await self._charge(*charge)

    async def _release(self) -> None:
        held = self._held
        assert held is not None
        if held.reservation.idempotent:
            # The key replayed a hold another attempt placed; that attempt (still running,
            # or finished) resolves it, so releasing it here could undo its charge.
            self._released = True
            return
        manager = self._manager
        result = await manager._store.release_reservation(
            held.user_id, held.reservation.reservation_id
        )
        if result.error is ErrorCode.RESERVATION_ALREADY_SETTLED:
            self._settled = True
            return
        result.raise_for_error()
        self._released = True
        try:
            await manager._emit(
                CreditEventType.RELEASED,
                user_id=held.user_id,
                amount=result.amount,
                available=result.available,
                reservation_id=result.reservation_id,
                idempotency_key=held.key,
            )
            await manager._observe(held.user_id, result.available)
        except Exception:
            _log.exception("reporting the release of %s failed", result.reservation_id)

    # -- usage and settlement ----------------------------------------------------------------

    def _check_open(self, action: str) -> _Held:
        if self._held is None:
            raise InvalidArgumentError(f"enter the hold (async with) before you {action}")
        if self._settled:
            raise ReservationAlreadySettledError(self.reservation_id)
        if self._released:
            raise ReservationReleasedError(self.reservation_id)
        if self._settling:
            raise InvalidArgumentError(f"hold {self.reservation_id!r} is being settled")
        return self._held

    def record(self, usage: UsageMetrics) -> UsageMetrics:
        """
        Add partial usage, for example a streamed chunk's.

        Args:
            usage: What this part used; counters add up and tool calls concatenate.

        Returns:
            The total recorded so far.

        Raises:
            InvalidArgumentError: `usage` is not UsageMetrics, names a different model than
                earlier records, or the hold is not open.
            ReservationAlreadySettledError: The hold was settled.
            ReservationReleasedError: The hold was released.
        """
        self._check_open("record usage")
        usage = _check_metrics("usage", usage)
        total = usage if self._recorded is None else self._recorded + usage
        self._recorded = total
        return total

    def _price(
        self, actual: UsageMetrics | int
    ) -> tuple[int, UsageMetrics | None, CostBreakdown | None]:
        if isinstance(actual, UsageMetrics):
            cost = self._manager.engine.calculate(actual, plan=self._plan)
            return cost.credits, actual, cost
        return _check_credits("actual", actual, minimum=0), None, None

    async def settle(self, actual: UsageMetrics | int | None = None) -> DeductionResult:
        """
        Charge the call's actual cost, once.

        The actual cost may exceed the hold: it is charged in full (the balance may go
        negative and the result reports ``shortfall``).

        Args:
            actual: The call's total usage, or its cost in credits; None charges the usage
                recorded so far (0 credits when nothing was recorded).

        Returns:
            The settlement (also kept as `result`).

        Raises:
            ReservationAlreadySettledError: The hold was settled already.
            ReservationReleasedError: The hold was released.
            InvalidArgumentError: The usage cannot be priced (the hold stays open, so
                `settle` can be called again), or the hold was not entered.
            CreditError, StoreError: The store refused or failed the settlement; the hold
                has been released.
        """
        self._check_open("settle")
        if actual is None:
            usage = self._recorded
            charge = self._price(usage) if usage is not None else (0, None, None)
        else:
            charge = self._price(actual)
        return await self._charge(*charge)

    async def _charge(
        self, amount: int, usage: UsageMetrics | None, cost: CostBreakdown | None
    ) -> DeductionResult:
        held = self._held
        assert held is not None
        manager = self._manager
        # The store names the hold's model on the row when the usage names none.
        meta = _charge_metadata(self._metadata, usage, cost)
        self._pending = (amount, usage, cost)
        self._settling = True
        try:
            # Shielded for the same reason as the reserve: whether it happened must be known.
            with anyio.CancelScope(shield=True):
                result = await manager._settle(held, amount, meta)
            result.raise_for_error()
        except Exception as exc:
            self._failed = True
            with anyio.CancelScope(shield=True):
                outcome = await manager._abandon(held, amount, exc, usage, cost)
            if outcome is None or outcome is ErrorCode.RESERVATION_NOT_FOUND:
                self._released = True
            elif outcome is ErrorCode.RESERVATION_ALREADY_SETTLED:
                self._settled = True
            raise
        finally:
            self._settling = False
        self._settled = True
        self._result = result
        if not result.idempotent:
            with anyio.CancelScope(shield=True):
                await manager._after_deduct(held, result, usage, cost)
        return result
