"""CreditEvent and CreditEventEmitter: registration, order, sync and async handlers, failures."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta, timezone

import anyio
import pytest
from anyio.lowlevel import checkpoint

from ducto.errors import InvalidArgumentError
from ducto.events import CreditEvent, CreditEventEmitter, CreditEventType

pytestmark = pytest.mark.anyio


def _event(kind: CreditEventType = CreditEventType.CREDITS_ADDED, user: str = "u") -> CreditEvent:
    return CreditEvent(type=kind, user_id=user, amount=10)


async def test_handlers_run_in_registration_order() -> None:
    """Sync and async handlers for a type run one after the other, in registration order."""
    emitter = CreditEventEmitter()
    calls: list[str] = []

    def first(event: CreditEvent) -> None:
        calls.append("first")

    async def second(event: CreditEvent) -> None:
        await checkpoint()
        calls.append("second")

    def third(event: CreditEvent) -> None:
        calls.append("third")

    emitter.on(CreditEventType.CREDITS_ADDED, first)
    emitter.on(CreditEventType.CREDITS_ADDED, second)
    emitter.on(CreditEventType.CREDITS_ADDED, third)
    await emitter.emit(_event())

    assert ["first", "second", "third"] == calls


async def test_async_handlers_are_awaited_before_emit_returns() -> None:
    """An async handler has finished by the time emit returns: nothing is fire-and-forget."""
    emitter = CreditEventEmitter()
    done: list[int] = []

    async def slow(event: CreditEvent) -> None:
        for _ in range(5):
            await checkpoint()
        done.append(event.amount)

    emitter.on(None, slow)
    await emitter.emit(_event())

    assert [10] == done


async def test_handlers_receive_only_their_type() -> None:
    """A typed handler gets only its type; a handler registered with None gets every event."""
    emitter = CreditEventEmitter()
    typed: list[CreditEventType] = []
    every: list[CreditEventType] = []
    emitter.on(CreditEventType.LOW_BALANCE, lambda e: typed.append(e.type))
    emitter.on(None, lambda e: every.append(e.type))

    await emitter.emit(_event(CreditEventType.CREDITS_ADDED))
    await emitter.emit(_event(CreditEventType.LOW_BALANCE))

    assert [CreditEventType.LOW_BALANCE] == typed
    assert [CreditEventType.CREDITS_ADDED, CreditEventType.LOW_BALANCE] == every


async def test_string_event_types_are_accepted() -> None:
    """An event type may be given by its string value, as in ducto 1.x."""
    emitter = CreditEventEmitter()
    seen: list[str] = []
    emitter.on("credits_deducted", lambda e: seen.append(e.type.value))

    await emitter.emit(_event(CreditEventType.CREDITS_DEDUCTED))

    assert ["credits_deducted"] == seen
    assert CreditEventType.CREDITS_DEDUCTED == "credits_deducted"


async def test_off_removes_a_registration() -> None:
    """After off, the handler is no longer called; off reports whether it removed anything."""
    emitter = CreditEventEmitter()
    seen: list[int] = []

    def handler(event: CreditEvent) -> None:
        seen.append(event.amount)

    emitter.on(CreditEventType.CREDITS_ADDED, handler)
    removed = emitter.off(CreditEventType.CREDITS_ADDED, handler)
    removed_again = emitter.off(CreditEventType.CREDITS_ADDED, handler)
    await emitter.emit(_event())

    assert removed is True
    assert removed_again is False
    assert [] == seen
    assert emitter.has_handlers(CreditEventType.CREDITS_ADDED) is False


async def test_registering_twice_calls_once() -> None:
    """Registering the same handler for the same type twice changes nothing."""
    emitter = CreditEventEmitter()
    seen: list[int] = []

    def handler(event: CreditEvent) -> None:
        seen.append(event.amount)

    emitter.on(None, handler)
    emitter.on(None, handler)
    await emitter.emit(_event())

    assert [10] == seen


async def test_failing_sync_handler_is_logged_and_the_rest_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A sync handler that raises is logged with its traceback; later handlers still run."""
    emitter = CreditEventEmitter()
    seen: list[str] = []

    def broken(event: CreditEvent) -> None:
        raise RuntimeError("webhook down")

    emitter.on(None, broken)
    emitter.on(None, lambda e: seen.append("after"))
    with caplog.at_level(logging.ERROR, logger="ducto.events"):
        await emitter.emit(_event())

    assert ["after"] == seen
    [record] = [r for r in caplog.records if r.name == "ducto.events"]
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], RuntimeError)
    assert "credits_added" in record.getMessage()


async def test_failing_async_handler_is_logged_and_the_rest_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An async handler that raises after awaiting is logged; emit itself never raises."""
    emitter = CreditEventEmitter()
    seen: list[str] = []

    async def broken(event: CreditEvent) -> None:
        await checkpoint()
        raise ValueError("bad payload")

    emitter.on(CreditEventType.CREDITS_ADDED, broken)
    emitter.on(CreditEventType.CREDITS_ADDED, lambda e: seen.append("after"))
    with caplog.at_level(logging.ERROR, logger="ducto.events"):
        await emitter.emit(_event())

    assert ["after"] == seen
    [record] = [r for r in caplog.records if r.name == "ducto.events"]
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], ValueError)


async def test_callable_object_with_async_call_is_awaited() -> None:
    """An object whose __call__ is a coroutine function is detected and awaited."""
    emitter = CreditEventEmitter()

    class Sink:
        def __init__(self) -> None:
            self.seen: list[int] = []

        async def __call__(self, event: CreditEvent) -> None:
            await checkpoint()
            self.seen.append(event.amount)

    sink = Sink()
    emitter.on(None, sink)
    await emitter.emit(_event())

    assert [10] == sink.seen


async def test_sync_handler_returning_an_awaitable_is_awaited() -> None:
    """A plain function that returns a coroutine (a lambda around one) has it awaited."""
    emitter = CreditEventEmitter()
    seen: list[int] = []

    async def record(event: CreditEvent) -> None:
        seen.append(event.amount)

    emitter.on(None, lambda e: record(e))
    await emitter.emit(_event())

    assert [10] == seen


async def test_cancellation_is_not_swallowed() -> None:
    """A cancelled emit propagates the cancellation instead of logging it as a failure."""
    emitter = CreditEventEmitter()
    after: list[str] = []

    async def slow(event: CreditEvent) -> None:
        await anyio.sleep(10)

    emitter.on(None, slow)
    emitter.on(None, lambda e: after.append("after"))
    with anyio.move_on_after(0.01) as scope:
        await emitter.emit(_event())

    assert scope.cancelled_caught is True
    assert [] == after


def test_bad_registrations_are_refused() -> None:
    """An unknown event type or a non-callable handler raises InvalidArgumentError."""
    emitter = CreditEventEmitter()

    with pytest.raises(InvalidArgumentError, match="event_type"):
        emitter.on("credits_vanished", lambda e: None)
    with pytest.raises(InvalidArgumentError, match="callable"):
        emitter.on(None, 42)  # type: ignore[arg-type]


def test_has_handlers_counts_catch_all_handlers() -> None:
    """has_handlers is true for a type with its own handler or with a catch-all handler."""
    emitter = CreditEventEmitter()
    emitter.on(CreditEventType.RESERVED, lambda e: None)

    assert emitter.has_handlers(CreditEventType.RESERVED) is True
    assert emitter.has_handlers(CreditEventType.RELEASED) is False
    emitter.on(None, lambda e: None)
    assert emitter.has_handlers(CreditEventType.RELEASED) is True


def test_event_timestamps_are_aware_utc() -> None:
    """A naive timestamp is local time, an aware one is converted, the default is now."""
    naive = CreditEvent(type=CreditEventType.RESERVED, timestamp=datetime(2026, 1, 2, 3, 4))
    paris = timezone(timedelta(hours=1))
    aware = CreditEvent(
        type=CreditEventType.RESERVED, timestamp=datetime(2026, 1, 2, 4, 4, tzinfo=paris)
    )
    default = CreditEvent(type=CreditEventType.RESERVED)

    assert datetime(2026, 1, 2, 3, 4).astimezone(UTC) == naive.timestamp
    assert UTC == naive.timestamp.tzinfo
    assert datetime(2026, 1, 2, 3, 4, tzinfo=UTC) == aware.timestamp
    assert UTC == aware.timestamp.tzinfo
    assert timedelta(0) == default.timestamp.utcoffset()


def test_event_types_cover_the_documented_kinds() -> None:
    """The event types include the 1.x kinds, the hold lifecycle and auto top-ups."""
    expected = {
        "credits_added",
        "credits_deducted",
        "credits_refunded",
        "credits_expired",
        "low_balance",
        "cap_warning",
        "reserved",
        "released",
        "deduct_failed",
        "refund_failed",
        "cap_reached",
        "top_up",
        "top_up_failed",
    }

    assert expected == {kind.value for kind in CreditEventType}


async def test_1x_event_names_are_aliases() -> None:
    """Registering under a ducto 1.x name (credits.added, ...) receives the event."""
    emitter = CreditEventEmitter()
    seen: list[tuple[str, CreditEventType]] = []
    aliases = {
        "credits.added": CreditEventType.CREDITS_ADDED,
        "credits.deducted": CreditEventType.CREDITS_DEDUCTED,
        "credits.refunded": CreditEventType.CREDITS_REFUNDED,
        "credits.expired": CreditEventType.CREDITS_EXPIRED,
        "credits.cap_reached": CreditEventType.CAP_REACHED,
        "credits.cap_warning": CreditEventType.CAP_WARNING,
    }
    for name in aliases:
        emitter.on(name, lambda e, name=name: seen.append((name, e.type)))

    for kind in CreditEventType:
        await emitter.emit(_event(kind))
    removed = emitter.off("credits.added", emitter._handlers[0][1])

    assert sorted(aliases.items()) == sorted(seen)
    assert removed is True
    assert CreditEventType.CAP_REACHED is CreditEventType("credits.cap_reached")
    assert CreditEventType.CREDITS_DEDUCTED == CreditEvent(type="credits.deducted").type  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="event_type"):
        emitter.on("credits.vanished", lambda e: None)
