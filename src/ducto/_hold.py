"""`Hold`: one call's hold, settled once (made by `CreditManager.hold`; see `ducto.manager`)."""

from __future__ import annotations

import logging
from datetime import timedelta
from types import TracebackType
from typing import Self

import anyio
from anyio.lowlevel import checkpoint_if_cancelled

from ducto._charging import (
    MAX_CREDITS,
    OPEN,
    RELEASED,
    SETTLED,
    Charger,
    Held,
    MetadataInput,
    Priced,
    charge_metadata,
    check_credits,
    checked_usage,
)
from ducto._pricing_schedule import Rates
from ducto.errors import (
    InvalidArgumentError,
    PricingNotLoadedError,
    ReservationAlreadySettledError,
    ReservationReleasedError,
)
from ducto.interface.models import DeductionResult
from ducto.pricing import UsageMetrics

__all__ = ["Hold"]

_log = logging.getLogger("ducto.manager")


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
    - **Usage the hold cannot charge exactly is never free.** When recorded usage has no
      price (its model or a tool is not in the pricing), or `record` refused a record (it
      was invalid, named another model, or took the total past what a store can charge,
      2**62 credits), leaving without `settle` charges the held estimate, or the recorded
      usage's price when that is higher and can be charged. `record` and `settle` raise
      `InvalidArgumentError` at once for such usage, and the hold stays open.

    **One price for the whole call.** The hold is priced with the pricing version in force
    when it is placed, and everything recorded and settled on it is priced with that
    version too, so a stream that runs across a scheduled price change is billed at the
    prices it started under (its usage row names the version, ``pricing_version``).

    A hold whose idempotency key replayed one placed by an earlier or concurrent attempt
    of the same request is never released by this attempt: the attempt that placed it
    settles or releases it (or its TTL ends it).

    If resolving the hold on the way out fails, the original exception still propagates,
    with a note describing the failure (which is also logged).

    The store calls that place and settle the hold are shielded from cancellation, because
    a nonconforming store may commit a call yet report it cancelled, and a hold the manager
    does not know about could never be released. A cancellation that arrives while the
    hold is being placed releases it before the block runs; one that arrives during
    `settle` lets the settlement finish and takes effect right after.

    Attributes are meaningful once the block is entered.
    """

    def __init__(
        self,
        charger: Charger,
        user_id: str,
        estimate: UsageMetrics | int,
        *,
        operation_type: str,
        idempotency_key: str | None,
        metadata: MetadataInput,
        ttl: float | timedelta,
        team_id: str | None = None,
    ) -> None:
        """Prepare a hold; use `CreditManager.hold` rather than this constructor."""
        self._charger = charger
        self._user_id = user_id
        self._estimate = estimate
        self._operation_type = operation_type
        self._key = idempotency_key
        self._metadata = metadata
        self._ttl = ttl
        self._team_id = team_id
        self._plan: str | None = None
        self._rates: Rates | None = None
        self._held: Held | None = None
        self._entered = False
        self._recorded: UsageMetrics | None = None
        self._refused = False
        self._settling = False
        self._failed = False

    # -- state -------------------------------------------------------------------------------

    @property
    def user_id(self) -> str:
        """The account the hold is on."""
        return self._user_id

    @property
    def team_id(self) -> str | None:
        """The team pool the hold is on, or None for the user's own credits."""
        return self._team_id

    @property
    def reservation_id(self) -> str:
        """The store's id of the hold ("" before the block is entered)."""
        return self._held.reservation_id if self._held is not None else ""

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
        return self._held.result if self._held is not None else None

    @property
    def settled(self) -> bool:
        """Whether the hold was settled (charged)."""
        return self._held is not None and self._held.state == SETTLED

    @property
    def released(self) -> bool:
        """Whether the hold was released without a charge."""
        return self._held is not None and self._held.state == RELEASED

    @property
    def open(self) -> bool:
        """Whether the hold was placed and is neither settled nor released yet."""
        return self._held is not None and self._held.state == OPEN

    # -- the block ---------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        """
        Reserve the estimate.

        Raises:
            InsufficientCreditsError, SpendCapExceededError, IdempotencyConflictError:
                The store refused the hold.
            TeamNotFoundError, UserNotInTeamError, InsufficientTeamBalanceError: The
                store refused a hold on a team pool.
            InvalidArgumentError: The estimate cannot be priced, or the hold was entered
                before.
        """
        if self._entered:
            raise InvalidArgumentError("a hold can be entered once; make a new one")
        self._entered = True
        charger = self._charger
        estimate = self._estimate
        if isinstance(estimate, UsageMetrics):
            rates: Rates | None = await charger.rates()
        else:
            rates = await charger.rates_or_none()
        self._rates = rates
        if rates is not None and rates.plans:
            self._plan = await charger.plan_for(self._user_id, rates)
        model: str | None = None
        if isinstance(estimate, UsageMetrics):
            assert rates is not None
            priced = charger.chargeable(
                "estimate", charger.price_checked(estimate, self._plan, rates)
            )
            amount = max(priced.credits, 1)
            model = priced.usage.model if priced.usage is not None else None
        else:
            amount = estimate
        meta = charge_metadata(self._metadata, model=model)
        held = await charger.place(
            self._user_id,
            amount,
            self._operation_type,
            meta,
            self._key,
            self._ttl,
            charger.min_balance(rates),
            team_id=self._team_id,
        )
        self._held = held
        try:
            await charger.placed(held)
            # Cancelled while reserving: free the hold and never start the call.
            await checkpoint_if_cancelled()
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                try:
                    await charger.release(held)
                except Exception as error:
                    _log.exception("releasing hold %s failed", held.reservation_id)
                    exc.add_note(f"ducto: releasing hold {held.reservation_id!r} failed: {error!r}")
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Settle or release the hold unless that already happened (see `Hold`)."""
        if not self.open:
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
        """Settle at the recorded usage (at least the estimate when some was unpriceable)."""
        held = self._held
        assert held is not None
        charger = self._charger
        if self._failed or (self._recorded is None and not self._refused):
            await charger.release(held)
            return
        charge = self._exit_charge(held)
        try:
            await self._settle(charge)
        except InvalidArgumentError:
            # The store refused the amount and changed nothing: charge the estimate instead,
            # and if even that is refused, release rather than leave the hold behind.
            _log.exception("the store refused to settle hold %s", held.reservation_id)
            if charge.credits != held.amount:
                try:
                    await self._settle(Priced(held.amount, charge.usage, None, charge.version))
                    return
                except InvalidArgumentError:
                    _log.exception("the store refused the estimate of %s", held.reservation_id)
            await charger.release(held)

    def _pricing(self) -> Rates:
        """
        The rates the hold prices with: those in force when it was placed (or, for a hold
        of credits placed before any pricing was loaded, those in force now).

        Raises:
            PricingNotLoadedError: No pricing is loaded.
        """
        rates = self._rates
        if rates is None:
            rates = self._charger.schedule.now()
            if rates is None:
                raise PricingNotLoadedError()
        return rates

    def _exit_charge(self, held: Held) -> Priced:
        """What leaving unsettled charges: the recorded usage, or the estimate (see `Hold`)."""
        version = self._rates.version if self._rates is not None else None
        estimate = Priced(held.amount, self._recorded, None, version)
        recorded = self._recorded
        if recorded is None:
            return estimate
        try:
            priced = self._charger.price_checked(recorded, self._plan, self._pricing())
        except Exception:
            _log.warning(
                "usage recorded on hold %s cannot be priced; charging the estimate",
                held.reservation_id,
                exc_info=True,
            )
            return estimate
        if priced.credits > MAX_CREDITS:
            return estimate
        if self._refused and priced.credits < held.amount:
            return estimate
        return priced

    # -- usage and settlement ----------------------------------------------------------------

    def _check_open(self, action: str) -> Held:
        held = self._held
        if held is None:
            raise InvalidArgumentError(f"enter the hold (async with) before you {action}")
        if held.state == SETTLED:
            raise ReservationAlreadySettledError(held.reservation_id)
        if held.state == RELEASED:
            raise ReservationReleasedError(held.reservation_id)
        if self._settling:
            raise InvalidArgumentError(f"hold {held.reservation_id!r} is being settled")
        return held

    def record(self, usage: UsageMetrics) -> UsageMetrics:
        """
        Add partial usage, for example a streamed chunk's.

        Every record is validated (even one built with ``model_construct``), and the total
        is priced when pricing is loaded, so usage the hold cannot charge is refused here,
        at once; see `Hold` for what leaving the block then charges.

        Args:
            usage: What this part used; counters add up and tool calls concatenate.

        Returns:
            The total recorded so far.

        Raises:
            InvalidArgumentError: `usage` is not valid UsageMetrics, names a different model
                than earlier records, takes a counter or the total's price beyond what can
                be charged, or the hold is not open. The record is not added.
            ReservationAlreadySettledError: The hold was settled.
            ReservationReleasedError: The hold was released.
        """
        self._check_open("record usage")
        charger = self._charger
        try:
            part = checked_usage("usage", usage)
            total = part if self._recorded is None else self._recorded + part
            rates = self._rates or charger.schedule.now()
            if rates is not None:
                try:
                    priced = charger.price_checked(total, self._plan, rates)
                except InvalidArgumentError:
                    pass  # no price for it: leaving the block charges the estimate
                else:
                    charger.chargeable("recorded usage", priced)
        except InvalidArgumentError:
            self._refused = True
            raise
        self._recorded = total
        return total

    def _priced(self, actual: UsageMetrics | int | None) -> Priced:
        charger = self._charger
        if actual is None:
            if self._recorded is None:
                return Priced(0)
            actual = self._recorded
        if isinstance(actual, UsageMetrics):
            usage = checked_usage("actual", actual)
            return charger.chargeable(
                "actual", charger.price_checked(usage, self._plan, self._pricing())
            )
        return Priced(check_credits("actual", actual, minimum=0))

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
            InvalidArgumentError: The usage is invalid or cannot be priced, or the amount
                is more than a store can charge (the hold stays open, so `settle` can be
                called again), or the hold was not entered.
            CreditError, StoreError: The store refused or failed the settlement; the hold
                has been released.
        """
        self._check_open("settle")
        return await self._settle(self._priced(actual))

    async def _settle(self, charge: Priced) -> DeductionResult:
        held = self._held
        assert held is not None
        # The store names the hold's model on the row when the usage names none.
        meta = charge_metadata(
            self._metadata, charge.usage, charge.cost, pricing_version=charge.version
        )
        self._settling = True
        try:
            return await self._charger.settle(held, charge, meta)
        except InvalidArgumentError:
            raise  # nothing changed: the hold stays open
        except Exception:
            self._failed = True
            raise
        finally:
            self._settling = False

    async def _close(self) -> bool:
        """Resolve the hold as leaving the block would; True when it was still open."""
        if not self.open or self._settling:
            return False
        await self.__aexit__(None, None, None)
        return True
