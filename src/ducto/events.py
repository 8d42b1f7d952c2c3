"""
Billing events: what `CreditManager` reports after each change, and the emitter that delivers it.

Register handlers on a `CreditEventEmitter` (plain functions or coroutine functions) for one
event type or for all of them, and pass the emitter to `CreditManager(events=...)`:

```python
events = CreditEventEmitter()


async def alert(event: CreditEvent) -> None:
    await notify_user(event.user_id, f"only {event.available} credits left")


events.on(CreditEventType.LOW_BALANCE, alert)
events.on(None, lambda event: log.info("billing event %s", event.type))
manager = CreditManager(store, events=events, low_balance_thresholds=[1000, 100])
```

ducto 1.x's event names are accepted wherever a type is: ``credits.added``,
``credits.deducted``, ``credits.refunded``, ``credits.expired``, ``credits.cap_warning``, and
``credits.cap_reached``, which is `CreditEventType.CAP_REACHED` (a deny spend cap refused a
hold or a charge).
An event's ``type`` also compares equal to its 1.x name (``event.type ==
"credits.deducted"``), and ``event.data`` is a read-only mapping of its details, as 1.x
handlers read them (``event.data["amount"]``).

`CreditEventEmitter.emit` calls the handlers in registration order and awaits async ones.
`CreditManager` delivers its events so that handlers never hold billing up:

- Sync handlers run at once, in registration order, in the task that made the change.
  (A sync handler blocks the event loop while it runs, wherever it runs: keep it quick.)
- Async handlers (and awaitables a sync handler returns) run in the manager's own
  background task while the manager is open (``async with CreditManager(...)``, or any
  `ducto.sync` facade): the billing call returns, and can be cancelled, without waiting
  for them. Events reach them in the order they happened; each handler call may take up
  to the manager's ``handler_timeout`` before it is cancelled and logged. Events that
  arrive while ``event_buffer`` events are already waiting are dropped and logged.
  Closing the manager gives waiting events up to ``handler_timeout`` to be delivered.
- Outside ``async with`` the manager has no task to run them in, so async handlers are
  awaited in the calling task, for at most ``handler_timeout`` per event, and a
  cancellation of the caller cancels them.

A handler that raises is logged on the ``ducto.events`` logger with its traceback and the
next handler runs: an event handler never breaks billing.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from enum import StrEnum
from types import MappingProxyType
from typing import Any, Final, TypeAlias

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ducto._shown import shown
from ducto.errors import InvalidArgumentError

__all__ = ["CreditEvent", "CreditEventEmitter", "CreditEventType", "EventHandler"]

_log = logging.getLogger("ducto.events")


class CreditEventType(StrEnum):
    """The kinds of event `CreditManager` emits; each equals its string value."""

    CREDITS_ADDED = "credits_added"
    """Credits were granted (``add_credits``); ``amount`` is what was added."""
    CREDITS_DEDUCTED = "credits_deducted"
    """Usage was charged (a settlement, a team charge or a negative adjustment)."""
    CREDITS_REFUNDED = "credits_refunded"
    """A usage debit was refunded (in part or in full)."""
    CREDITS_EXPIRED = "credits_expired"
    """A sweep wrote off expired credits; ``user_id`` is None (a sweep covers every user)."""
    LOW_BALANCE = "low_balance"
    """A user's available credits crossed down through a configured threshold."""
    CAP_WARNING = "cap_warning"
    """A charge took a user's spend past a ``warn`` or ``notify`` spend cap."""
    RESERVED = "reserved"
    """A hold was placed."""
    RELEASED = "released"
    """A hold was freed without charging."""
    DEDUCT_FAILED = "deduct_failed"
    """A charge failed after its hold was placed; the hold was released."""
    REFUND_FAILED = "refund_failed"
    """A refund was refused or failed."""
    CAP_REACHED = "cap_reached"
    """A deny spend cap refused a hold or a charge (ducto 1.x's ``credits.cap_reached``)."""
    TOP_UP = "top_up"
    """
    An auto top-up was paid and granted (see `ducto.AutoTopUp`). ``amount`` is the credits
    granted; ``balance_after`` and ``available`` are the user's after the grant;
    ``transaction_id`` is the ``purchase`` row; ``idempotency_key`` is the payment
    reference the app's ``charge`` returned. ``metadata``: ``claim_id``,
    ``payment_reference``, ``attempts`` (calls of ``charge``), ``month_total`` (this UTC
    month's top-ups, this one included) and ``replayed`` (the payment had been granted
    before, by its reference). The grant is also reported as ``credits_added``.
    """
    TOP_UP_FAILED = "top_up_failed"
    """
    An auto top-up was claimed but did not end in a grant. ``amount`` is the credits it was
    for; ``error`` is the exception class name of the last failure (or the store's error
    code). ``metadata``: ``claim_id``, ``attempts``, ``stage`` (``charge``: every attempt
    failed, nothing was paid, and the amount no longer counts toward the month; ``grant``:
    the payment was taken but granting it failed, so ``payment_reference`` is given for
    finishing it later with `CreditStore.finish_top_up`), ``message`` (the last failure's
    text) and ``month_total`` where the store reported it.
    """

    @classmethod
    def _missing_(cls, value: object) -> CreditEventType | None:
        """Accept ducto 1.x's dotted names (``credits.added``, ...) as aliases."""
        if isinstance(value, str):
            return _ALIASES.get(value)
        return None

    def __eq__(self, other: object) -> bool:
        """Equal to its value and, for the 1.x kinds, to 1.x's dotted name too."""
        if str.__eq__(self, other) is True:
            return True
        return isinstance(other, str) and _ALIASES.get(other) is self

    def __ne__(self, other: object) -> bool:
        return not self.__eq__(other)

    # Hashes as its value: in a dict or set, the 1.x name is a different key.
    __hash__ = str.__hash__


_ALIASES: Final[dict[str, CreditEventType]] = {
    "credits.added": CreditEventType.CREDITS_ADDED,
    "credits.deducted": CreditEventType.CREDITS_DEDUCTED,
    "credits.refunded": CreditEventType.CREDITS_REFUNDED,
    "credits.expired": CreditEventType.CREDITS_EXPIRED,
    "credits.cap_warning": CreditEventType.CAP_WARNING,
    "credits.cap_reached": CreditEventType.CAP_REACHED,
}
"""ducto 1.x's event names, by the type each now names."""


def _utc_now() -> datetime:
    return datetime.now(UTC)


class CreditEvent(BaseModel):
    """
    One billing event.

    Amounts are positive magnitudes in credits: what was added, charged, refunded, held,
    released or written off. Fields that do not apply to an event type are None.

    Attributes:
        type: What happened.
        user_id: The user concerned (the member, for a team charge); None for a sweep.
        amount: The credits involved.
        balance_after: The ledger balance after the change, when the store reported it.
        available: The spendable credits after the change, when known.
        transaction_id: The ledger row the change wrote.
        reservation_id: The hold involved.
        team_id: The team pool charged, for team charges.
        idempotency_key: The key the caller gave.
        threshold: The threshold crossed, for ``low_balance``.
        error: The error code or exception class name, for ``deduct_failed`` and
            ``refund_failed``.
        metadata: Details: the model and token counts of a charge, the cap action of a
            ``cap_warning``, the number of lots of an expiry.
        timestamp: When the manager observed the change (aware UTC; a naive value given
            is read as local time, as `datetime.astimezone` reads it).
    """

    model_config = ConfigDict(frozen=True)

    type: CreditEventType
    user_id: str | None = None
    amount: int = 0
    balance_after: int | None = None
    available: int | None = None
    transaction_id: str | None = None
    reservation_id: str | None = None
    team_id: str | None = None
    idempotency_key: str | None = None
    threshold: int | None = None
    error: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    timestamp: datetime = Field(default_factory=_utc_now)

    @field_validator("timestamp")
    @classmethod
    def _aware_utc(cls, value: datetime) -> datetime:
        """Naive timestamps are local time (as everywhere in ducto); all become aware UTC."""
        return value.astimezone(UTC)

    @property
    def data(self) -> Mapping[str, Any]:
        """
        The event's details in one read-only mapping, as ducto 1.x handlers read them.

        ``event.data["amount"]`` and the rest: every field of the event that is set (except
        ``type``, ``user_id`` and ``timestamp``, which stay attributes), under its own name,
        then the entries of ``metadata`` (``model``, token counts, a cap's ``limit``, ...).
        A settlement's ``balance_after`` is also given as 1.x's ``new_balance``.
        """
        details: dict[str, Any] = {
            name: value for name in _DATA_FIELDS if (value := getattr(self, name)) is not None
        }
        if self.balance_after is not None:
            details["new_balance"] = self.balance_after
        details.update(self.metadata)
        return MappingProxyType(details)


_DATA_FIELDS: Final = (
    "amount",
    "balance_after",
    "available",
    "transaction_id",
    "reservation_id",
    "team_id",
    "idempotency_key",
    "threshold",
    "error",
)

EventHandler: TypeAlias = Callable[[CreditEvent], Awaitable[None] | None]
"""A function or coroutine function taking one `CreditEvent`."""


def _is_async(handler: object) -> bool:
    if inspect.iscoroutinefunction(handler):
        return True
    call = getattr(handler, "__call__", None)  # noqa: B004 - an object with an async __call__
    return call is not None and inspect.iscoroutinefunction(call)


class CreditEventEmitter:
    """
    Delivers `CreditEvent`s to registered handlers, sync and async alike.

    Handlers are called in registration order. A failing handler is logged (logger
    ``ducto.events``, with the traceback) and never stops the others or the caller. The
    emitter holds no event-loop objects, so one emitter may serve managers on any loop.
    """

    def __init__(self) -> None:
        """Create an emitter with no handlers."""
        # (event type or None for all, handler, handler is a coroutine function)
        self._handlers: list[tuple[CreditEventType | None, EventHandler, bool]] = []

    def on(self, event_type: CreditEventType | str | None, handler: EventHandler) -> EventHandler:
        """
        Call `handler` for every event of `event_type` (None: for every event).

        Registering the same handler for the same type again changes nothing.

        Args:
            event_type: A `CreditEventType` (or its string value, or its ducto 1.x name
                such as ``credits.added``), or None for all events.
            handler: A function or coroutine function taking the `CreditEvent`.

        Returns:
            `handler`, so ``on`` can be used as ``emitter.on(kind, handler)`` inline.

        Raises:
            InvalidArgumentError: `event_type` is not an event type, or `handler` is not
                callable.
        """
        kind = _event_type(event_type)
        if not callable(handler):
            raise InvalidArgumentError(f"handler must be callable, got {shown(handler)}")
        if not any(k == kind and h == handler for k, h, _ in self._handlers):
            self._handlers.append((kind, handler, _is_async(handler)))
        return handler

    def off(self, event_type: CreditEventType | str | None, handler: EventHandler) -> bool:
        """
        Stop calling `handler` for `event_type` (None: undo an ``on(None, handler)``).

        Args:
            event_type: The type the handler was registered for.
            handler: The handler.

        Returns:
            True when a registration was removed, False when there was none.
        """
        kind = _event_type(event_type)
        for index, (k, h, _) in enumerate(self._handlers):
            if k == kind and h == handler:
                del self._handlers[index]
                return True
        return False

    def has_handlers(self, event_type: CreditEventType) -> bool:
        """
        Whether any handler would receive an event of `event_type`.

        The manager checks this first, so events nobody listens to cost nothing.

        Args:
            event_type: The event type.

        Returns:
            True when a handler is registered for `event_type` or for all events.
        """
        return any(k is None or k == event_type for k, _, _ in self._handlers)

    async def emit(self, event: CreditEvent) -> None:
        """
        Deliver `event` to its handlers, in registration order; never raises for them.

        Async handlers are awaited before the next handler runs. A sync handler that
        returns an awaitable has it awaited too. Exceptions from handlers are logged and
        swallowed; cancellation is not swallowed.

        Args:
            event: The event.
        """
        for kind, handler, is_async in tuple(self._handlers):
            if kind is not None and kind != event.type:
                continue
            try:
                outcome = handler(event)
                if outcome is not None and (is_async or inspect.isawaitable(outcome)):
                    await outcome
            except Exception:
                _log_failure(handler, event)

    def _start(self, event: CreditEvent) -> list[tuple[EventHandler, Awaitable[object]]]:
        """
        Run the sync handlers for `event` now; return the awaitables left to await.

        Calling an async handler only creates its coroutine, so nothing of it runs here.
        The caller must await (or close) every awaitable returned, each with
        `_finish`. Failures of sync handlers are logged.
        """
        pending: list[tuple[EventHandler, Awaitable[object]]] = []
        for kind, handler, is_async in tuple(self._handlers):
            if kind is not None and kind != event.type:
                continue
            try:
                outcome = handler(event)
            except Exception:
                _log_failure(handler, event)
                continue
            if outcome is not None and (is_async or inspect.isawaitable(outcome)):
                pending.append((handler, outcome))
        return pending


async def _finish(handler: EventHandler, event: CreditEvent, outcome: Awaitable[object]) -> None:
    """Await what a handler returned; log its failure. Cancellation propagates."""
    try:
        await outcome
    except Exception:
        _log_failure(handler, event)


def _discard(outcome: Awaitable[object]) -> None:
    """Drop an awaitable that will never be awaited (closing a coroutine, so it never warns)."""
    if inspect.iscoroutine(outcome):
        outcome.close()


def _log_failure(handler: EventHandler, event: CreditEvent) -> None:
    _log.exception(
        "event handler %r failed on %s event for user %r",
        handler,
        event.type.value,
        event.user_id,
    )


def _event_type(value: object) -> CreditEventType | None:
    if value is None or isinstance(value, CreditEventType):
        return value
    if isinstance(value, str):
        try:
            return CreditEventType(value)
        except ValueError:
            pass
    kinds = ", ".join(repr(k.value) for k in CreditEventType)
    raise InvalidArgumentError(f"event_type must be None or one of {kinds}, got {shown(value)}")
