"""
How `CreditManager` reports: events to the emitter's handlers, and low-balance crossings.

Handlers never hold billing up (see `ducto.events`). Sync handlers run at once; the
awaitables of async handlers go to a background task while the manager is open, and are
awaited in the calling task, each event bounded by ``handler_timeout``, when it is not. The
background task and its stream are created when the manager opens, inside the running
event loop, and end when it closes: nothing here outlives a loop.

Low-balance alerts come from the atomic figures of each operation's result: an operation
that took a user's available credits from ``before`` to ``after`` crosses every threshold
``t`` with ``before >= t > after``. Each downward crossing happens in exactly one operation
(the store orders a user's operations), so each fires exactly once, whatever order
concurrent calls report in, and no balance has to be read back or remembered. The same
crossing of the auto top-up threshold starts a top-up (`watch`).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any, Final, TypeAlias

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ducto._shown import shown
from ducto.errors import InvalidArgumentError
from ducto.events import (
    CreditEvent,
    CreditEventEmitter,
    CreditEventType,
    EventHandler,
    _discard,
    _finish,
)

__all__ = ["MAX_THRESHOLD", "Reporter", "check_thresholds"]

_log = logging.getLogger("ducto.events")

MAX_THRESHOLD: Final = 2**62
"""Largest magnitude of a low-balance threshold (the largest balance a store keeps)."""

_Pending: TypeAlias = list[tuple[EventHandler, Awaitable[object]]]
_Item: TypeAlias = tuple[CreditEvent, _Pending]


def check_thresholds(value: object) -> tuple[int, ...]:
    """The thresholds, highest first, or `InvalidArgumentError` naming the parameter."""
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise InvalidArgumentError(
            "low_balance_thresholds must be a list of ints,"
            f" got {type(value).__name__} {shown(value)}"
        )
    thresholds: set[int] = set()
    for threshold in value:
        if type(threshold) is not int or not -MAX_THRESHOLD <= threshold <= MAX_THRESHOLD:
            raise InvalidArgumentError(
                "low_balance_thresholds must hold ints from -2**62 to 2**62,"
                f" got {shown(threshold)}"
            )
        thresholds.add(threshold)
    return tuple(sorted(thresholds, reverse=True))


class Reporter:
    """Events and low-balance alerts for one manager."""

    __slots__ = ("_buffer", "_clock", "_emitter", "_send", "_thresholds", "_timeout", "_watch")

    def __init__(
        self,
        emitter: CreditEventEmitter,
        thresholds: tuple[int, ...],
        clock: Callable[[], datetime],
        handler_timeout: float,
        buffer: int,
    ) -> None:
        self._emitter = emitter
        self._thresholds = thresholds
        self._clock = clock
        self._timeout = handler_timeout
        self._buffer = buffer
        self._send: MemoryObjectSendStream[_Item] | None = None
        self._watch: tuple[int, Callable[[str], None]] | None = None

    @property
    def emitter(self) -> CreditEventEmitter:
        """The emitter handlers are registered on."""
        return self._emitter

    @property
    def running(self) -> bool:
        """Whether async handlers run in the background task."""
        return self._send is not None

    # -- events ------------------------------------------------------------------------------

    @property
    def alerts(self) -> bool:
        """Whether any threshold is watched (else `moved` has nothing to do)."""
        return bool(self._thresholds) or self._watch is not None

    def watch(self, threshold: int, crossed: Callable[[str], None]) -> None:
        """
        Call ``crossed(user_id)`` for every downward crossing of `threshold` (see `moved`).

        `crossed` runs in the task that made the change, so it must return at once.
        """
        self._watch = (threshold, crossed)

    def wants(self, kind: CreditEventType) -> bool:
        """Whether an event of `kind` would reach a handler (so it is worth building)."""
        return self._emitter.has_handlers(kind)

    async def emit(self, kind: CreditEventType, **fields: Any) -> None:
        """
        Report one event; never raises for a handler or a bad field (both are logged).

        Returns at once while the background task runs; else awaits the async handlers,
        for at most ``handler_timeout`` (a cancellation of the caller cancels them).
        """
        emitter = self._emitter
        if not emitter.has_handlers(kind):
            return
        try:
            event = CreditEvent(type=kind, timestamp=self._clock(), **fields)
        except Exception:
            _log.exception("building the %s event failed", kind.value)
            return
        pending = emitter._start(event)
        if not pending:
            return
        send = self._send
        if send is not None:
            try:
                send.send_nowait((event, pending))
            except anyio.WouldBlock:
                _log.error(
                    "dropped a %s event for user %r: %d events are waiting for slow handlers",
                    kind.value,
                    event.user_id,
                    self._buffer,
                )
                _drop(pending)
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                await self._deliver_inline(event, pending)
            return
        await self._deliver_inline(event, pending)

    async def _deliver_inline(self, event: CreditEvent, pending: _Pending) -> None:
        try:
            with anyio.move_on_after(self._timeout) as scope:
                while pending:
                    handler, outcome = pending.pop(0)
                    await _finish(handler, event, outcome)
        finally:
            _drop(pending)  # the caller was cancelled: the handlers not started never run
        if scope.cancelled_caught:
            _log.error(
                "event handlers for a %s event took longer than %s s and were cancelled",
                event.type.value,
                self._timeout,
            )

    async def _deliver_one(
        self, handler: EventHandler, event: CreditEvent, outcome: Awaitable[object]
    ) -> None:
        with anyio.move_on_after(self._timeout) as scope:
            await _finish(handler, event, outcome)
        if scope.cancelled_caught:
            _log.error(
                "event handler %r took longer than %s s on a %s event and was cancelled",
                handler,
                self._timeout,
                event.type.value,
            )

    async def _work(self, receive: MemoryObjectReceiveStream[_Item], done: anyio.Event) -> None:
        """The background task: deliver events in order until the stream closes."""
        current: _Pending = []
        try:
            async for event, pending in receive:
                current = pending
                while current:
                    handler, outcome = current.pop(0)
                    await self._deliver_one(handler, event, outcome)
        finally:
            _drop(current)
            while True:
                try:
                    _, left = receive.receive_nowait()
                except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                    break
                _drop(left)
            receive.close()
            done.set()

    @asynccontextmanager
    async def background(self) -> AsyncIterator[None]:
        """
        Run async handlers in a background task for the duration of the block.

        On the way out, events still waiting get up to ``handler_timeout`` to be
        delivered (shielded from cancellation); what is left then is dropped and logged.
        """
        if self._send is not None:
            raise InvalidArgumentError("the manager is open already")
        send, receive = anyio.create_memory_object_stream[_Item](self._buffer)
        done = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._work, receive, done)
            self._send = send
            try:
                yield
            finally:
                self._send = None
                send.close()
                with anyio.move_on_after(self._timeout, shield=True):
                    await done.wait()
                if not done.is_set():
                    _log.error(
                        "event handlers did not finish within %s s of closing; cancelling them",
                        self._timeout,
                    )
                tg.cancel_scope.cancel()

    # -- low balance ---------------------------------------------------------------------------

    async def moved(
        self, user_id: str, before: int, after: int, balance: int | None = None
    ) -> None:
        """
        Report an operation that took the user's available credits from `before` to `after`.

        Emits ``low_balance`` for every threshold crossed downwards, highest first, after
        telling the watcher (auto top-up) when its threshold was crossed.
        """
        watch = self._watch
        if watch is not None and before >= watch[0] > after:
            try:
                watch[1](user_id)
            except Exception:
                _log.exception("starting the auto top-up of user %r failed", user_id)
        for threshold in self._thresholds:
            if before >= threshold > after:
                await self.emit(
                    CreditEventType.LOW_BALANCE,
                    user_id=user_id,
                    available=after,
                    balance_after=balance,
                    threshold=threshold,
                )


def _drop(pending: _Pending) -> None:
    for _, outcome in pending:
        _discard(outcome)
    pending.clear()
