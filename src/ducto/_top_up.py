"""
Auto top-up: `AutoTopUp` (what the application configures) and the manager's runner.

When an operation takes a user's available credits down through the threshold (the crossing
low-balance events use), the manager starts a top-up in a task of its own: it claims the
user's one in-flight top-up in the store (`CreditStore.claim_top_up`; of every process that
saw a crossing, one wins), calls the application's ``charge`` (with retries, each attempt
bounded by ``timeout``), and finishes the claim (`CreditStore.finish_top_up`): with the
payment reference the credits are granted (once per reference); without one the month's
amount is given back. The request that crossed never waits for any of it and never sees its
errors. See docs/top-up.md.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import KW_ONLY, dataclass
from datetime import timedelta
from typing import Any, Final, TypeAlias

import anyio
import anyio.abc

from ducto._reporting import Reporter
from ducto._shown import shown
from ducto.errors import DuctoError, InvalidArgumentError
from ducto.events import CreditEventType
from ducto.interface.base import CreditStore
from ducto.interface.models import AddCreditsResult, CreditMetadata, TopUpResult

__all__ = ["AutoTopUp", "TopUpCharge", "TopUps"]

_log = logging.getLogger("ducto.manager")

TopUpCharge: TypeAlias = Callable[[str, int, str], Awaitable[str] | str]
"""
The application's payment call: ``charge(user_id, amount, claim_id)`` takes the payment for
`amount` credits and returns its reference (a non-empty str, such as a PaymentIntent id).
A coroutine function, or a plain function (run in a worker thread).
"""

_MAX_CREDITS: Final = 2**62
_MAX_TTL: Final = 366 * 86400
_MAX_RETRIES: Final = 10
_MAX_BACKOFF: Final = 3600.0
_MAX_TIMEOUT: Final = 86400.0
_MAX_REFERENCE: Final = 256
_MESSAGE_LENGTH: Final = 300
_REFERENCE_TYPE: Final = "auto_top_up"


def _seconds(
    name: str,
    value: object,
    *,
    low: float,
    high: float,
    open_low: bool,
    delta: bool = False,
) -> float:
    """`value` (seconds, or with `delta` a timedelta) as seconds, or raise naming `name`."""
    if delta and isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value) if abs(value) <= high else math.inf
    else:
        raise InvalidArgumentError(f"{name} must be seconds, got {shown(value)}")
    above_low = seconds > low if open_low else seconds >= low
    if not (math.isfinite(seconds) and above_low and seconds <= high):
        bound = "more than" if open_low else "at least"
        raise InvalidArgumentError(
            f"{name} must be {bound} {low:g} and at most {high:g} seconds, got {shown(value)}"
        )
    return seconds


def _credits(name: str, value: object, minimum: int) -> int:
    if type(value) is not int or not minimum <= value <= _MAX_CREDITS:
        raise InvalidArgumentError(
            f"{name} must be an int from {minimum} to 2**62 credits, got {shown(value)}"
        )
    return value


@dataclass(frozen=True, slots=True)
class AutoTopUp:
    """
    Buy credits for a user automatically when their balance runs low.

    Pass it to `CreditManager(auto_top_up=...)`. When an operation (a charge, a hold, a
    negative adjustment) takes a user's available credits from ``threshold`` or more to below
    it, the manager claims the top-up in the store, so that of all the processes sharing the
    store only one pays, then calls `charge` and grants `amount` credits as a ``purchase``
    under the payment reference it returns. The request that crossed does not wait for it.
    Top-ups run only while the manager is open (``async with manager:``); see
    docs/top-up.md for the guarantees and for what happens when a process crashes.

    ```python
    async def charge(user_id: str, amount: int, claim_id: str) -> str:
        intent = await stripe.PaymentIntent.create_async(
            amount=amount * 10, currency="usd", customer=customers[user_id],
            payment_method=cards[user_id], off_session=True, confirm=True,
            idempotency_key=claim_id,
        )
        return intent.id

    manager = CreditManager(store, auto_top_up=AutoTopUp(1_000, 5_000, 20_000, charge))
    ```

    Attributes:
        threshold: Top up when available credits fall below this (>= 0).
        amount: Credits each top-up grants (>= 1).
        monthly_limit: Most credits of top-ups per user per UTC month, counted from the
            claim (a failed top-up gives its amount back); at least `amount`.
        charge: Takes the payment: ``charge(user_id, amount, claim_id)`` returns the payment
            reference (a non-empty str of at most 256 characters). The claim id is the same
            on every retry of one top-up, so use it as the payment provider's idempotency
            key: a retry then never pays twice. A coroutine function, or a plain function
            (run in a worker thread). Whatever it raises is retried, then reported as a
            ``top_up_failed`` event; it never reaches the request that crossed.
        ttl: Seconds (or a timedelta) a claim blocks other top-ups of the user; past it a
            claim whose process died stops blocking the next crossing. Every attempt with
            its backoff must fit in it.
        retries: Further attempts after a failed `charge` (0 to 10).
        backoff: Seconds before the first retry; each next wait doubles.
        timeout: Seconds one `charge` attempt may take before it is abandoned and counted
            as failed. Closing the manager waits up to twice this for top-ups in flight
            (the attempt under way, then recording its outcome).

    Raises:
        InvalidArgumentError: An argument is invalid (the message names it), or the attempts
            and their backoff do not fit in `ttl`.
    """

    threshold: int
    amount: int
    monthly_limit: int
    charge: TopUpCharge
    _: KW_ONLY
    ttl: float | timedelta = 300.0
    retries: int = 2
    backoff: float = 1.0
    timeout: float = 30.0

    def __post_init__(self) -> None:
        """Check every field (see the class)."""
        _credits("threshold", self.threshold, 0)
        _credits("amount", self.amount, 1)
        _credits("monthly_limit", self.monthly_limit, 1)
        if self.monthly_limit < self.amount:
            raise InvalidArgumentError(
                f"monthly_limit must be at least amount ({self.amount}), "
                f"got {shown(self.monthly_limit)}"
            )
        if not callable(self.charge):
            raise InvalidArgumentError(f"charge must be callable, got {shown(self.charge)}")
        ttl = _seconds("ttl", self.ttl, low=0, high=_MAX_TTL, open_low=True, delta=True)
        if type(self.retries) is not int or not 0 <= self.retries <= _MAX_RETRIES:
            raise InvalidArgumentError(
                f"retries must be an int from 0 to {_MAX_RETRIES}, got {shown(self.retries)}"
            )
        backoff = _seconds("backoff", self.backoff, low=0, high=_MAX_BACKOFF, open_low=False)
        timeout = _seconds("timeout", self.timeout, low=0, high=_MAX_TIMEOUT, open_low=True)
        worst = timeout * (self.retries + 1) + backoff * (2**self.retries - 1)
        if worst >= ttl:
            raise InvalidArgumentError(
                f"ttl ({ttl:g} s) must be longer than every attempt of a top-up with its"
                f" backoff (timeout x (retries + 1) + backoff x (2**retries - 1) = {worst:g} s),"
                " so a claim never expires while its payment may still be running"
            )


def _ttl_seconds(config: AutoTopUp) -> float:
    ttl = config.ttl
    if isinstance(ttl, timedelta):
        return ttl.total_seconds()
    return float(ttl)


def _delay(config: AutoTopUp, retry: int) -> float:
    """Seconds to wait before retry number `retry` (from 1)."""
    return float(config.backoff) * 2.0 ** (retry - 1)


def _is_async(function: object) -> bool:
    if inspect.iscoroutinefunction(function):
        return True
    call = getattr(function, "__call__", None)  # noqa: B004 - an object with an async __call__
    return call is not None and inspect.iscoroutinefunction(call)


def _reference(value: object) -> str:
    """The payment reference `charge` returned, or `InvalidArgumentError`."""
    if type(value) is not str or not value or len(value) > _MAX_REFERENCE or "\x00" in value:
        raise InvalidArgumentError(
            "charge must return the payment reference, a non-empty str of at most"
            f" {_MAX_REFERENCE} characters, got {shown(value)}"
        )
    return value


def _message(exc: BaseException) -> str:
    text = str(exc)
    return text if len(text) <= _MESSAGE_LENGTH else text[: _MESSAGE_LENGTH - 3] + "..."


class TopUps:
    """
    Runs one manager's top-ups in a task group it owns while the manager is open.

    Top-ups of one user started by this manager do not overlap (a crossing while one runs
    is ignored); across processes the store's claim keeps them apart. Every top-up task
    catches everything but cancellation, so nothing reaches the manager's task group or the
    requests.
    """

    def __init__(
        self,
        config: AutoTopUp,
        store: CreditStore,
        reporter: Reporter,
        granted: Callable[[AddCreditsResult], Awaitable[None]],
    ) -> None:
        self._config = config
        self._store = store
        self._reporter = reporter
        self._granted = granted
        self._async = _is_async(config.charge)
        self._group: anyio.abc.TaskGroup | None = None
        self._closing: anyio.Event | None = None
        self._idle: anyio.Event | None = None
        self._pending: set[str] = set()
        self._scopes: set[anyio.CancelScope] = set()
        self._warned = False

    @property
    def config(self) -> AutoTopUp:
        """What was configured."""
        return self._config

    @property
    def pending(self) -> int:
        """How many top-ups this manager is running now."""
        return len(self._pending)

    def crossed(self, user_id: str) -> None:
        """A user's available credits crossed below the threshold: start a top-up."""
        group = self._group
        if group is None:
            if not self._warned:
                self._warned = True
                _log.warning(
                    "user %r crossed the auto top-up threshold, but top-ups run only while"
                    " the manager is open (async with manager:); none was started",
                    user_id,
                )
            return
        if user_id in self._pending:
            return
        self._pending.add(user_id)
        group.start_soon(self._top_up, user_id, name=f"ducto auto top-up of {user_id!r}")

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """
        Run top-ups for the duration of the block.

        On the way out no new top-up starts; those in flight get up to twice ``timeout``
        seconds to finish (the attempt under way ends within one ``timeout``, no new one
        starts, and its outcome is recorded), then are cancelled.
        """
        if self._group is not None:
            raise InvalidArgumentError("the manager is open already")
        closing = anyio.Event()
        async with anyio.create_task_group() as group:
            self._group, self._closing = group, closing
            try:
                yield
            finally:
                self._group = None
                closing.set()
                if self._pending:
                    idle = self._idle = anyio.Event()
                    grace = 2 * float(self._config.timeout)
                    with anyio.move_on_after(grace, shield=True):
                        await idle.wait()
                    if self._pending:
                        _log.warning(
                            "closing the manager cancelled %d auto top-ups in flight; their"
                            " claims expire after the claim ttl",
                            len(self._pending),
                        )
                for scope in tuple(self._scopes):
                    scope.cancel()
                self._idle = self._closing = None

    # -- one top-up --------------------------------------------------------------------------

    async def _top_up(self, user_id: str) -> None:
        # Shielded so that a cancellation of the manager's host does not cut a payment in
        # the middle; `running` cancels the scope itself once the grace period is over.
        with anyio.CancelScope(shield=True) as scope:
            self._scopes.add(scope)
            try:
                await self._claim_and_pay(user_id)
            except Exception:
                _log.exception("the auto top-up of user %r failed", user_id)
            finally:
                self._scopes.discard(scope)
                self._pending.discard(user_id)
                if not self._pending and self._idle is not None:
                    self._idle.set()
        if scope.cancelled_caught:
            _log.warning(
                "the auto top-up of user %r was cancelled; its claim expires after %g s",
                user_id,
                _ttl_seconds(self._config),
            )

    async def _claim_and_pay(self, user_id: str) -> None:
        config = self._config
        closing = self._closing
        if closing is None or closing.is_set():
            return
        try:
            claim = await self._store.claim_top_up(
                user_id,
                threshold=config.threshold,
                amount=config.amount,
                monthly_limit=config.monthly_limit,
                ttl=config.ttl,
            )
        except Exception as exc:
            _log.warning(
                "claiming the auto top-up of user %r failed (%s: %s)",
                user_id,
                type(exc).__name__,
                exc,
                exc_info=not isinstance(exc, DuctoError),
            )
            return
        if not claim.claimed:
            _log.debug("no auto top-up for user %r: %s", user_id, claim.reason)
            return
        reference, attempts, error = await self._pay(user_id, claim.claim_id, closing)
        details: dict[str, Any] = {"claim_id": claim.claim_id, "attempts": attempts}
        if reference is None:
            await self._give_back(user_id, claim.claim_id, error, details)
        else:
            await self._grant(user_id, claim.claim_id, reference, details)

    async def _pay(
        self, user_id: str, claim_id: str, closing: anyio.Event
    ) -> tuple[str | None, int, BaseException | None]:
        """Call `charge` until it succeeds, retries run out or the manager closes."""
        config = self._config
        error: BaseException | None = None
        attempts = 0
        for attempt in range(config.retries + 1):
            if attempt:
                with anyio.move_on_after(_delay(config, attempt)):
                    await closing.wait()
                if closing.is_set():
                    break  # the manager is closing: no new attempt
            attempts += 1
            try:
                with anyio.fail_after(float(config.timeout)):
                    return await self._call(user_id, claim_id), attempts, None
            except Exception as exc:
                error = exc
                _log.warning(
                    "auto top-up of user %r, attempt %d of %d: charge failed (%s: %s)",
                    user_id,
                    attempts,
                    config.retries + 1,
                    type(exc).__name__,
                    exc,
                )
        return None, attempts, error

    async def _call(self, user_id: str, claim_id: str) -> str:
        charge = self._config.charge
        amount = self._config.amount
        outcome: object
        if self._async:
            outcome = charge(user_id, amount, claim_id)
        else:
            call = functools.partial(charge, user_id, amount, claim_id)
            outcome = await anyio.to_thread.run_sync(call, abandon_on_cancel=True)
        if inspect.isawaitable(outcome):
            outcome = await outcome
        return _reference(outcome)

    async def _finish(self, user_id: str, claim_id: str, reference: str | None) -> TopUpResult:
        """`finish_top_up`, retried like `charge` when the store fails."""
        config = self._config
        meta = CreditMetadata(reference_type=_REFERENCE_TYPE, reference_id=claim_id)
        for attempt in range(config.retries + 1):
            if attempt:
                await anyio.sleep(_delay(config, attempt))
            try:
                return await self._store.finish_top_up(
                    user_id, claim_id, config.amount, payment_reference=reference, metadata=meta
                )
            except InvalidArgumentError:
                raise
            except Exception:
                if attempt == config.retries:
                    raise
                _log.warning(
                    "finishing the auto top-up of user %r failed; trying again",
                    user_id,
                    exc_info=True,
                )
        raise AssertionError("unreachable")  # pragma: no cover

    async def _grant(
        self, user_id: str, claim_id: str, reference: str, details: dict[str, Any]
    ) -> None:
        """Grant a payment that was taken: never cancelled, given up after ``timeout``."""
        config = self._config
        details["payment_reference"] = reference
        with anyio.CancelScope(shield=True):
            finished: TopUpResult | None = None
            failure = "TimeoutError"
            message = f"granting took longer than {config.timeout:g} s"
            with anyio.move_on_after(float(config.timeout)):
                try:
                    finished = await self._finish(user_id, claim_id, reference)
                except Exception as exc:
                    failure, message = type(exc).__name__, _message(exc)
            grant = finished.grant if finished is not None else None
            if finished is not None:
                details["month_total"] = finished.month_total
                if grant is None or grant.error is not None:
                    failure = message = "no_grant" if grant is None else str(grant.error)
            if grant is None or grant.error is not None:
                _log.error(
                    "user %r paid for an auto top-up (payment %r, claim %r) but granting it"
                    " failed (%s: %s); grant it with finish_top_up(payment_reference=%r)",
                    user_id,
                    reference,
                    claim_id,
                    failure,
                    message,
                    reference,
                )
                await self._failed(user_id, failure, "grant", message, details)
                return
            if not grant.idempotent:
                await self._granted(grant)
            _log.info(
                "auto top-up of user %r: %d credits granted (payment %r)",
                user_id,
                grant.amount,
                reference,
            )
            await self._reporter.emit(
                CreditEventType.TOP_UP,
                user_id=user_id,
                amount=grant.amount,
                balance_after=grant.new_balance,
                available=grant.available,
                transaction_id=grant.transaction_id,
                idempotency_key=reference,
                metadata={**details, "replayed": grant.idempotent},
            )

    async def _give_back(
        self,
        user_id: str,
        claim_id: str,
        error: BaseException | None,
        details: dict[str, Any],
    ) -> None:
        """Every attempt failed: end the claim without a payment (the month's amount is
        given back) and report it."""
        name = type(error).__name__ if error is not None else "Cancelled"
        message = _message(error) if error is not None else "the manager closed"
        try:
            finished = await self._finish(user_id, claim_id, None)
            details["month_total"] = finished.month_total
        except Exception:
            _log.warning(
                "ending the failed auto top-up of user %r failed; its claim expires after %g s",
                user_id,
                _ttl_seconds(self._config),
                exc_info=True,
            )
        await self._failed(user_id, name, "charge", message, details)

    async def _failed(
        self, user_id: str, error: str, stage: str, message: str, details: dict[str, Any]
    ) -> None:
        await self._reporter.emit(
            CreditEventType.TOP_UP_FAILED,
            user_id=user_id,
            amount=self._config.amount,
            error=error,
            metadata={**details, "stage": stage, "message": message},
        )
