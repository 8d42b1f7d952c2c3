"""Helpers shared by the manager and hold() tests: an event recorder and a faulty store proxy."""

from __future__ import annotations

from typing import Any

import anyio
from tests.contract._checks import all_rows

from ducto.errors import InvalidArgumentError, StoreError
from ducto.events import CreditEvent, CreditEventType
from ducto.interface.base import CreditStore
from ducto.interface.models import TransactionRow


class Recorder:
    """An event handler that keeps every event."""

    def __init__(self) -> None:
        self.events: list[CreditEvent] = []

    def __call__(self, event: CreditEvent) -> None:
        self.events.append(event)

    def kinds(self) -> list[CreditEventType]:
        """The types of the events so far."""
        return [e.type for e in self.events]

    def of(self, kind: CreditEventType) -> list[CreditEvent]:
        """The events of one type, in order."""
        return [e for e in self.events if e.type == kind]


class ProxyStore:
    """Forwards to a real store; a test may make chosen calls fail or slow."""

    def __init__(self, inner: CreditStore) -> None:
        self._inner = inner
        self.deduct_failures = 0
        self.deduct_refusals = 0
        self.charge_failures = 0
        self.charge_delay = 0.0
        self.calls: list[str] = []
        self.deduct_delay = 0.0
        self.release_failures = 0
        self.reserve_delay = 0.0

    def __getattr__(self, name: str) -> Any:
        self.calls.append(name)
        return getattr(self._inner, name)

    async def charge_credits(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append("charge_credits")
        if self.charge_failures:
            self.charge_failures -= 1
            raise StoreError("disk I/O error")
        if self.charge_delay:
            await anyio.sleep(self.charge_delay)
        return await self._inner.charge_credits(*args, **kwargs)

    async def deduct_credits(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append("deduct_credits")
        if self.deduct_failures:
            self.deduct_failures -= 1
            raise StoreError("disk I/O error")
        if self.deduct_refusals:
            self.deduct_refusals -= 1
            raise InvalidArgumentError("amount would take the balance beyond -2**62")
        if self.deduct_delay:
            await anyio.sleep(self.deduct_delay)
        return await self._inner.deduct_credits(*args, **kwargs)

    async def reserve_credits(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append("reserve_credits")
        if self.reserve_delay:
            await anyio.sleep(self.reserve_delay)
        return await self._inner.reserve_credits(*args, **kwargs)

    async def release_reservation(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append("release_reservation")
        if self.release_failures:
            self.release_failures -= 1
            raise StoreError("connection lost")
        return await self._inner.release_reservation(*args, **kwargs)


async def usage_rows(store: CreditStore, user_id: str) -> list[TransactionRow]:
    """The user's usage rows, oldest first."""
    return [row for row in await all_rows(store, user_id) if row.type == "usage"]
