"""
The manager's charging core: price, hold, settle, release, and report each step.

`CreditManager.deduct`, `deduct_fixed` and `reserve_credits`, and every `Hold`, charge
through one `Charger`, so each rule is written once:

- What can be charged: usage is validated again (a ``model_construct``-ed record is not
  trusted), priced with the user's plan, and refused with `InvalidArgumentError` before
  any store call when it costs more than a store accepts (`MAX_CREDITS`).
- Holds and settlements: the store calls that place and settle a hold are shielded from
  cancellation, because a nonconforming store may commit a call yet report it cancelled,
  and a hold the manager does not know about could never be released. A settlement the
  store refuses as invalid input changed nothing, so the hold stays open; any other
  failure releases it (``deduct_failed``).
- Retried requests: see `Held`.
- Reporting: events, and low-balance crossings from each result's atomic figures.

- Pricing versions: every charge is priced with the `Rates` in force when it is made (see
  `ducto._pricing_schedule`), and a hold keeps the rates it was placed with, so a call is
  priced at one version however long it runs. The usage row names the version
  (``pricing_version``).

Its interface to the rest of the package is the public methods below (`rates`, `plan_for`,
`price`, `price_checked`, `chargeable`, `place`, `placed`, `settle`, `release`, `charge`),
and the state of each hold is on its `Held`. A store call is made in one place each
(`_reserve`, `_deduct`, `_release`, and ``charge_credits`` in `charge`), for a user's
credits or, with a team id, a team pool's.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Final, Literal, TypeAlias

import anyio

from ducto._pricing_schedule import Rates, Schedule
from ducto._reporting import Reporter
from ducto._shown import shown
from ducto.errors import (
    CreditError,
    ErrorCode,
    InvalidArgumentError,
    PricingNotLoadedError,
)
from ducto.events import CreditEventType
from ducto.interface.base import CreditStore
from ducto.interface.models import (
    ChargeResult,
    CreditMetadata,
    DeductionResult,
    ReleaseResult,
    ReserveResult,
)
from ducto.pricing import CostBreakdown, PricingEngine, ToolCall, UsageMetrics
from ducto.pricing.metrics import MAX_COUNT

__all__ = [
    "DEFAULT_MIN_BALANCE",
    "DEFAULT_OPERATION",
    "MAX_CREDITS",
    "Charger",
    "Held",
    "MetadataInput",
    "Priced",
    "charge_metadata",
    "check_credits",
    "check_ttl",
    "checked_usage",
    "error_name",
    "usage_details",
]

_log = logging.getLogger("ducto.manager")

MetadataInput: TypeAlias = CreditMetadata | Mapping[str, object] | None
"""What the manager accepts as metadata: a `CreditMetadata`, a plain dict, or None."""

DEFAULT_OPERATION: Final = "llm_call"
"""The operation type of holds placed for model usage."""
DEFAULT_MIN_BALANCE: Final = 5
"""The floor used before any pricing is loaded (the 1.x default of `reserve_credits`)."""
MAX_CREDITS: Final = 2**62
"""The largest amount a store accepts in one call."""
MAX_TTL_SECONDS: Final = 366 * 86400
"""The longest hold TTL a store accepts."""
_MAX_LINKS: Final = 32
"""Most replacement holds one idempotency key may walk through (see `Held`)."""
_RELINK_ERRORS: Final = frozenset({ErrorCode.RESERVATION_RELEASED, ErrorCode.IDEMPOTENCY_CONFLICT})

OPEN: Final = "open"
SETTLED: Final = "settled"
RELEASED: Final = "released"
HoldState: TypeAlias = Literal["open", "settled", "released"]


# -- argument checks ---------------------------------------------------------------------------


def check_credits(name: str, value: object, *, minimum: int) -> int:
    """`value` as a number of credits from `minimum` to `MAX_CREDITS`, or raise."""
    if type(value) is not int:
        raise InvalidArgumentError(
            f"{name} must be UsageMetrics or an int number of credits, "
            f"got {type(value).__name__} {shown(value)}"
        )
    if not minimum <= value <= MAX_CREDITS:
        raise InvalidArgumentError(
            f"{name} must be from {minimum} to 2**62 credits, got {shown(value)}"
        )
    return value


def check_ttl(value: object, name: str) -> float | timedelta:
    """A hold TTL (seconds, or a timedelta) in ``(0, 366 days]``, or raise naming `name`."""
    if isinstance(value, timedelta):
        valid = timedelta(0) < value <= timedelta(seconds=MAX_TTL_SECONDS)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        valid = 0 < value <= MAX_TTL_SECONDS  # exact for ints of any size; False for NaN
    else:
        raise InvalidArgumentError(f"{name} must be seconds or a timedelta, got {shown(value)}")
    if not valid:
        raise InvalidArgumentError(
            f"{name} must be more than 0 and at most {MAX_TTL_SECONDS} seconds, got {shown(value)}"
        )
    return value


_USAGE_FIELDS: Final = frozenset(UsageMetrics.model_fields)
_USAGE_COUNTERS: Final = tuple(
    name for name in UsageMetrics.model_fields if name not in ("model", "tool_calls", "fixed_job")
)


def _plainly_valid(fields: dict[str, Any]) -> bool:
    """
    Whether a record's fields are ones `UsageMetrics` validation accepts as they are.

    Checks the common case only (the exact field set; exact ``int`` counters in range;
    ``str`` or None names; `ToolCall` records with a non-empty ``str`` name); anything else
    answers False and is validated in full.
    """
    if fields.keys() != _USAGE_FIELDS:
        return False
    for counter in _USAGE_COUNTERS:
        count = fields[counter]
        if type(count) is not int or not 0 <= count <= MAX_COUNT:
            return False
    model = fields["model"]
    if model is not None and type(model) is not str:
        return False
    job = fields["fixed_job"]
    if job is not None and (type(job) is not str or not job):
        return False
    calls = fields["tool_calls"]
    if type(calls) is not list:
        return False
    for call in calls:
        if type(call) is not ToolCall:
            return False
        call_fields = call.__dict__
        if call_fields.keys() != {"name"} or type(call_fields["name"]) is not str:
            return False
        if not call_fields["name"]:
            return False
    return True


def checked_usage(name: str, value: object) -> UsageMetrics:
    """
    `value` validated again as `UsageMetrics`, or `InvalidArgumentError` naming `name`.

    A record built with ``model_construct`` (or changed in place) skipped validation, so
    every record is validated before it is priced or added up.
    """
    if not isinstance(value, UsageMetrics):
        raise InvalidArgumentError(f"{name} must be UsageMetrics, got {type(value).__name__}")
    if type(value) is UsageMetrics and _plainly_valid(value.__dict__):
        # What validation would accept unchanged: copy it (the caller may change the
        # original later) without paying for validation.
        copy = value.__copy__()
        copy.__dict__["tool_calls"] = list(value.tool_calls)
        return copy
    fields = dict(value.__dict__)
    calls = fields.get("tool_calls")
    if isinstance(calls, list):
        fields["tool_calls"] = [
            dict(call.__dict__) if isinstance(call, ToolCall) else call for call in calls
        ]
    try:
        return UsageMetrics.model_validate(fields)
    except InvalidArgumentError as exc:
        raise InvalidArgumentError(f"{name} is not valid usage: {exc}") from exc


def charge_metadata(
    caller: object,
    usage: UsageMetrics | None = None,
    cost: CostBreakdown | None = None,
    *,
    pricing_version: int | None = None,
    **extra: object,
) -> CreditMetadata | None:
    """
    The caller's metadata with the manager's system keys on top.

    System keys win: ``model``, ``input_tokens`` and ``output_tokens`` of the usage,
    ``cost_total`` (the exact price before rounding, as a string), ``pricing_model``
    (the pricing key the model resolved to) and ``pricing_version`` (the number of the
    store's pricing version that priced it), plus `extra`.
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
    if pricing_version is not None:
        data["pricing_version"] = pricing_version
    data.update((key, value) for key, value in extra.items() if value is not None)
    if not data:
        return None
    try:
        return CreditMetadata.model_validate(data)
    except ValueError as exc:
        raise InvalidArgumentError(f"metadata is not valid CreditMetadata: {exc}") from exc


def usage_details(
    usage: UsageMetrics | None, cost: CostBreakdown | None, metadata: CreditMetadata | None
) -> dict[str, Any]:
    """An event's ``metadata``: the model, token counts and exact cost of a charge."""
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


def error_name(exc: BaseException) -> str:
    if isinstance(exc, CreditError):
        return str(exc.code)
    return type(exc).__name__


# -- values ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Priced:
    """
    An amount to charge, with the usage and price it came from when it was usage, and the
    pricing version that priced it (None when no store version did).
    """

    credits: int
    usage: UsageMetrics | None = None
    cost: CostBreakdown | None = None
    version: int | None = None


@dataclass(slots=True)
class Held:
    """
    A hold the manager placed and must settle or release, and what became of it.

    With an idempotency key, the key names the request: the hold is reserved and settled
    under it. When a retry finds (by replay) a hold that an earlier, failed attempt
    released, nothing was charged under the key, so the charge moves to a replacement hold
    reserved under a key derived from the released hold's id (`_link_key`). Later retries
    walk the same chain and replay the settlement, so a request is charged at most once.

    A hold replayed by its key (``reservation.idempotent``) was placed by another attempt
    of the same request; this attempt never releases it.
    """

    user_id: str
    reservation: ReserveResult
    amount: int
    operation_type: str
    metadata: CreditMetadata | None
    key: str | None
    ttl: float | timedelta
    team_id: str | None = None
    state: HoldState = OPEN
    result: DeductionResult | None = None
    unreported: list[ReserveResult] = field(default_factory=list)
    """Holds placed by this attempt whose low-balance crossings are not reported yet."""

    @property
    def reservation_id(self) -> str:
        """The id of the hold the charge is on now (a replacement's, after a relink)."""
        return self.reservation.reservation_id

    @property
    def replayed(self) -> bool:
        """Whether the key replayed a hold another attempt placed."""
        return self.reservation.idempotent


# -- the charger -------------------------------------------------------------------------------


class Charger:
    """Prices usage and charges it through the store, reporting each step."""

    __slots__ = ("_reporter", "_schedule", "_store", "hold_ttl")

    def __init__(
        self,
        store: CreditStore,
        reporter: Reporter,
        hold_ttl: float | timedelta,
        schedule: Schedule,
    ) -> None:
        self._store = store
        self._reporter = reporter
        self._schedule = schedule
        self.hold_ttl = hold_ttl

    @property
    def store(self) -> CreditStore:
        """The store charges go to."""
        return self._store

    @property
    def reporter(self) -> Reporter:
        """Where events and low-balance crossings go."""
        return self._reporter

    @property
    def schedule(self) -> Schedule:
        """The pricing versions: the one in force and the scheduled ones."""
        return self._schedule

    # -- pricing -----------------------------------------------------------------------------

    @property
    def engine(self) -> PricingEngine:
        """The engine in force now; `PricingNotLoadedError` before pricing is loaded."""
        rates = self._schedule.now()
        if rates is None:
            raise PricingNotLoadedError()
        return rates.engine

    @property
    def loaded(self) -> bool:
        """Whether pricing is loaded."""
        return self._schedule.now() is not None

    def use(self, engine: PricingEngine) -> None:
        """Price with `engine` from now on (until pricing comes from the store)."""
        self._schedule.use(engine)

    async def rates(self) -> Rates:
        """
        The rates in force now (refreshed from the store when due).

        Raises:
            PricingNotLoadedError: No pricing is loaded.
        """
        rates = await self._schedule.fresh()
        if rates is None:
            raise PricingNotLoadedError()
        return rates

    async def rates_or_none(self) -> Rates | None:
        """The rates in force now (refreshed when due), or None before pricing is loaded."""
        return await self._schedule.fresh()

    @staticmethod
    def min_balance(rates: Rates | None) -> int:
        """The floor holds keep: the config's ``min_balance``, or 5 before pricing."""
        return rates.min_balance if rates is not None else DEFAULT_MIN_BALANCE

    async def plan_for(self, user_id: str, rates: Rates) -> str | None:
        """The user's plan id when it has rate overrides in `rates`, else None."""
        if not rates.plans:
            return None
        plan = await self._store.get_user_plan(user_id)
        if plan.plan_id is None or plan.plan_name is None:
            return None  # no plan, or one the active version no longer defines
        return plan.plan_id if plan.plan_id in rates.plans else None

    def price(self, name: str, usage: object, plan: str | None, rates: Rates) -> Priced:
        """
        Validate and price `usage`; the result may exceed `MAX_CREDITS` (see `chargeable`).

        Raises:
            InvalidArgumentError: The usage is invalid or cannot be priced (no price for
                its model or tool, an expression failed).
        """
        return self.price_checked(checked_usage(name, usage), plan, rates)

    @staticmethod
    def price_checked(usage: UsageMetrics, plan: str | None, rates: Rates) -> Priced:
        """`price` for usage that `checked_usage` returned (it is not validated again)."""
        cost = rates.engine.calculate(usage, plan=plan)
        return Priced(cost.credits, usage, cost, rates.version)

    @staticmethod
    def chargeable(name: str, priced: Priced) -> Priced:
        """`priced` when a store can charge it, else `InvalidArgumentError` naming `name`."""
        if priced.credits > MAX_CREDITS:
            raise InvalidArgumentError(
                f"{name} costs {priced.credits} credits, more than a store can charge (2**62)"
            )
        return priced

    # -- holds -------------------------------------------------------------------------------

    async def place(
        self,
        user_id: str,
        amount: int,
        operation_type: str,
        meta: CreditMetadata | None,
        key: str | None,
        ttl: float | timedelta,
        min_balance: int,
        *,
        use_allowance: bool = True,
        team_id: str | None = None,
        raise_refusal: bool = True,
    ) -> Held:
        """
        Reserve `amount` (on the team pool when `team_id` is given), shielded.

        The store's refusal is raised as a typed error (or, without `raise_refusal`, left on
        the returned hold's reservation); a deny spend cap's refusal is reported as
        ``cap_reached`` first. Nothing else is reported here: `placed` does that once the
        caller can release the hold.
        """
        # Shielded: a nonconforming store may commit a call yet report it cancelled, and a
        # hold the manager does not know about could never be released.
        with anyio.CancelScope(shield=True):
            reservation = await self._reserve(
                user_id, team_id, amount, operation_type, meta, ttl, min_balance, key, use_allowance
            )
        if reservation.error is not None:
            await self._refused(reservation, user_id, team_id, amount, meta)
            if raise_refusal:
                reservation.raise_for_error()
        held = Held(user_id, reservation, amount, operation_type, meta, key, ttl, team_id)
        if not reservation.idempotent:
            held.unreported.append(reservation)
        return held

    async def _refused(
        self,
        result: ReserveResult | ChargeResult,
        user_id: str,
        team_id: str | None,
        amount: int,
        meta: CreditMetadata | None,
    ) -> None:
        """Report a deny spend cap's refusal as ``cap_reached``."""
        if result.error is not ErrorCode.SPEND_CAP_EXCEEDED:
            return
        details: dict[str, Any] = {
            "limit": result.cap_limit,
            "current_spend": result.cap_spend,
            "cap_type": result.cap_type,
            "action": "deny",
        }
        model = result.cap_model or (meta.model if meta is not None else None)
        if model is not None:
            details["model"] = model
        await self._reporter.emit(
            CreditEventType.CAP_REACHED,
            user_id=user_id,
            team_id=team_id,
            amount=amount,
            idempotency_key=result.idempotency_key,
            error=str(result.error),
            metadata={k: v for k, v in details.items() if v is not None},
        )

    async def placed(self, held: Held) -> None:
        """Report a hold this attempt placed: ``reserved`` and low-balance crossings."""
        reservation = held.reservation
        if reservation.idempotent:
            return
        reporter = self._reporter
        if reporter.wants(CreditEventType.RESERVED):
            await reporter.emit(
                CreditEventType.RESERVED,
                user_id=held.user_id,
                team_id=held.team_id,
                amount=held.amount,
                available=reservation.available,
                balance_after=reservation.balance,
                reservation_id=reservation.reservation_id,
                idempotency_key=held.key,
                metadata=usage_details(None, None, held.metadata),
            )
        await self._report_placements(held)

    async def _report_placements(self, held: Held) -> None:
        """Report the low-balance crossings of the holds this attempt placed."""
        if not self._reporter.alerts:
            held.unreported.clear()
            return
        while held.unreported:
            placed = held.unreported.pop(0)
            if held.team_id is None:  # a team hold moves the pool, not the member
                await self._reporter.moved(
                    held.user_id, placed.available + held.amount, placed.available, placed.balance
                )

    async def settle(
        self, held: Held, priced: Priced, meta: CreditMetadata | None
    ) -> DeductionResult:
        """
        Settle `held` for `priced` and report it.

        Raises:
            InvalidArgumentError: The store refused the amount as invalid; it changed
                nothing and the hold stays open.
            CreditError, StoreError: The store refused or failed; the hold has been
                released where it could be (``held.state`` says).
        """
        amount = self.chargeable("the charge", priced).credits
        try:
            # Shielded for the same reason as the reserve: whether it happened must be known.
            with anyio.CancelScope(shield=True):
                result = await self._deduct(held, amount, meta)
            result.raise_for_error()
        except InvalidArgumentError:
            raise
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await self._abandon(held, priced, exc)
            raise
        held.state, held.result = SETTLED, result
        await self._report_placements(held)
        if not result.idempotent:
            await self._settled(
                held.user_id, held.team_id, held.metadata, result, priced, held.amount
            )
        return result

    async def charge(
        self,
        user_id: str,
        priced: Priced,
        operation_type: str,
        meta: CreditMetadata | None,
        key: str | None,
        min_balance: int,
    ) -> DeductionResult:
        """
        Charge `priced` at once, in one store call (`CreditStore.charge_credits`).

        The plan allowance is used first and `min_balance` (the pricing config's) is kept;
        with a key, a retry charges once. A charge is atomic, so a failed one changed
        nothing and leaves nothing to release.
        """
        amount = self.chargeable("the charge", priced).credits
        freed = 0
        try:
            # Shielded: whether the charge happened must be known before anything else.
            with anyio.CancelScope(shield=True):
                result: DeductionResult = await self._store.charge_credits(
                    user_id,
                    amount,
                    operation_type,
                    meta,
                    min_balance,
                    use_allowance=True,
                    idempotency_key=key,
                )
                if key is not None and result.error in _RELINK_ERRORS and result.reservation_id:
                    result, freed = await self._charge_relinked(
                        user_id, result, amount, operation_type, meta, key
                    )
        except InvalidArgumentError:
            raise
        except Exception as exc:
            await self._failed(user_id, None, priced, meta, key, "", exc)
            raise
        if isinstance(result, ChargeResult) and result.error is not None:
            await self._refused(result, user_id, None, amount, meta)
        result.raise_for_error()
        if not result.idempotent:
            await self._settled(user_id, None, meta, result, priced, freed)
        return result

    async def _charge_relinked(
        self,
        user_id: str,
        refused: DeductionResult,
        amount: int,
        operation_type: str,
        meta: CreditMetadata | None,
        key: str,
    ) -> tuple[DeductionResult, int]:
        """
        Charge a request whose key placed a hold that was released without a charge.

        Such a hold comes from an attempt through `Hold` that failed; the charge moves to
        the replacement holds that attempt's retries use (see `Held`), so a request is
        charged once however its attempts were made. Returns the result and the hold
        its settlement freed.
        """
        replayed = ReserveResult(
            reservation_id=refused.reservation_id,
            user_id=user_id,
            amount=max(amount, 1),
            idempotent=True,
        )
        held = Held(user_id, replayed, max(amount, 1), operation_type, meta, key, self.hold_ttl)
        result = await self._deduct(held, amount, meta)
        freed = held.amount if held.unreported else 0
        await self._report_placements(held)
        return result, freed

    async def release(self, held: Held) -> None:
        """
        Release `held` and report it (a hold replayed by its key is left to its owner).

        Raises:
            CreditError, StoreError: The store refused or failed the release.
        """
        if held.replayed:
            # The key replayed a hold another attempt placed; that attempt (still running,
            # or finished) resolves it, so releasing it here could undo its charge.
            held.state = RELEASED
            return
        result = await self._release(held)
        if result.error is ErrorCode.RESERVATION_ALREADY_SETTLED:
            held.state = SETTLED
            return
        result.raise_for_error()
        held.state = RELEASED
        await self._reporter.emit(
            CreditEventType.RELEASED,
            user_id=held.user_id,
            team_id=held.team_id,
            amount=result.amount,
            available=result.available,
            reservation_id=result.reservation_id,
            idempotency_key=held.key,
        )

    # -- the store calls of a hold (a user's, or a team pool's) --------------------------------

    async def _reserve(
        self,
        user_id: str,
        team_id: str | None,
        amount: int,
        operation_type: str,
        meta: CreditMetadata | None,
        ttl: float | timedelta,
        min_balance: int,
        key: str | None,
        use_allowance: bool,
    ) -> ReserveResult:
        if team_id is not None:
            return await self._store.reserve_team_credits(
                team_id, user_id, amount, operation_type, meta, ttl=ttl, idempotency_key=key
            )
        return await self._store.reserve_credits(
            user_id,
            amount,
            operation_type,
            meta,
            min_balance,
            ttl=ttl,
            use_allowance=use_allowance,
            idempotency_key=key,
        )

    async def _deduct(
        self, held: Held, amount: int, meta: CreditMetadata | None
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
                held.user_id,
                current.reservation_id,
                amount,
                held.key,
                meta,
                team_id=held.team_id,
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
            replacement = await self._reserve(
                held.user_id,
                held.team_id,
                held.amount,
                held.operation_type,
                held.metadata,
                held.ttl,
                0,
                _link_key(held.key, current.reservation_id),
                True,
            )
            replacement.raise_for_error()
            held.reservation = replacement
            if not replacement.idempotent:
                held.unreported.append(replacement)
        assert result is not None
        return result

    async def _release(self, held: Held) -> ReleaseResult:
        return await self._store.release_reservation(
            held.user_id, held.reservation_id, team_id=held.team_id
        )

    # -- reporting ---------------------------------------------------------------------------

    async def _abandon(self, held: Held, priced: Priced, exc: BaseException) -> None:
        """
        Release a hold whose settlement failed; report ``deduct_failed``. Never raises.

        Sets ``held.state``: released (or not found), settled (the failed call had
        committed after all), or still open when the release failed too (noted on `exc`
        and logged).
        """
        reservation_id = held.reservation_id
        try:
            if held.replayed:
                held.state = RELEASED  # a replayed hold is the placing request's to resolve
            else:
                released = await self._release(held)
                if released.error is ErrorCode.RESERVATION_ALREADY_SETTLED:
                    held.state = SETTLED
                elif released.error in (None, ErrorCode.RESERVATION_NOT_FOUND):
                    held.state = RELEASED
        except Exception as release_error:
            _log.exception("releasing hold %s after a failed charge failed", reservation_id)
            exc.add_note(f"ducto: releasing hold {reservation_id!r} failed: {release_error!r}")
        await self._report_placements(held)
        await self._failed(
            held.user_id, held.team_id, priced, held.metadata, held.key, reservation_id, exc
        )

    async def _failed(
        self,
        user_id: str,
        team_id: str | None,
        priced: Priced,
        meta: CreditMetadata | None,
        key: str | None,
        reservation_id: str,
        exc: BaseException,
    ) -> None:
        await self._reporter.emit(
            CreditEventType.DEDUCT_FAILED,
            user_id=user_id,
            team_id=team_id,
            amount=priced.credits,
            reservation_id=reservation_id or None,
            idempotency_key=key,
            error=error_name(exc),
            metadata=usage_details(priced.usage, priced.cost, meta),
        )

    async def _settled(
        self,
        user_id: str,
        team_id: str | None,
        meta: CreditMetadata | None,
        result: DeductionResult,
        priced: Priced,
        freed: int,
    ) -> None:
        """
        Report a settlement: ``credits_deducted``, ``cap_warning``, low-balance crossings.

        `freed` is the hold the settlement closed (0 for a one-step charge, whose hold
        never counted).
        """
        reporter = self._reporter
        deducted = reporter.wants(CreditEventType.CREDITS_DEDUCTED)
        warned = result.cap_warning is not None
        details = usage_details(priced.usage, priced.cost, meta) if deducted or warned else {}
        if deducted:
            await reporter.emit(
                CreditEventType.CREDITS_DEDUCTED,
                user_id=user_id,
                team_id=team_id,
                amount=result.charged,
                balance_after=result.balance_after,
                available=result.available,
                transaction_id=result.transaction_id,
                reservation_id=result.reservation_id,
                idempotency_key=result.idempotency_key,
                metadata={**details, "allowance_consumed": result.allowance_consumed},
            )
        if warned:
            await reporter.emit(
                CreditEventType.CAP_WARNING,
                user_id=user_id,
                team_id=team_id,
                amount=result.charged,
                balance_after=result.balance_after,
                transaction_id=result.transaction_id,
                reservation_id=result.reservation_id,
                metadata={**details, "action": result.cap_warning},
            )
        if team_id is None and reporter.alerts:
            # Each step moves available on its own (other calls may run between them): a
            # hold took its amount when placed; the settlement takes the charge less the
            # hold it frees.
            taken = result.charged + result.allowance_consumed - freed
            await reporter.moved(
                user_id, result.available + taken, result.available, result.balance_after
            )
