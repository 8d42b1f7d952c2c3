"""
What a manager prices with: the pricing version in force, and the scheduled ones it knows.

A store's pricing versions never change once published (but for a scheduled one being
cancelled before it takes effect), so a manager fetches each version's config once and keeps
the version in force plus the scheduled versions, sorted by when they take effect. Pricing a
charge reads the manager's clock and, when the next scheduled version is due, switches to it
there and then: exactly at its ``effective_at``, with no store call.

What the manager knows is refreshed from the store (`CreditStore.get_pricing_history`, plus
the config of a version it has not seen) lazily, by the first charge after the refresh
interval, and once when a known scheduled version falls due (so a cancellation made before
then, by any process, is honoured). One refresh runs at a time: charges that arrive during it
wait for it rather than start another. A refresh that fails is logged and the manager goes on
with what it knows, switching on its own at the instants it knows; it tries again an interval
later.

An engine given to `CreditManager(engine=...)` is priced with as it is until pricing comes
from the store (`publish_pricing` or `load_pricing_from_store`); only then does the manager
follow the store.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TypeAlias

import anyio

from ducto.errors import DuctoError
from ducto.interface.base import CreditStore
from ducto.interface.models import PricingConfigHistoryItem
from ducto.pricing import PricingEngine

__all__ = ["Rates", "Schedule"]

_log = logging.getLogger("ducto.manager")


@dataclass(frozen=True, slots=True)
class Rates:
    """
    One pricing version as the manager prices with it.

    ``version`` is the store's version number, or None for an engine the manager was given
    (or one it published but could not read back).
    """

    engine: PricingEngine
    version: int | None
    plans: frozenset[str]
    """The plan keys and ids that have rate overrides (only those need the user's plan)."""

    @classmethod
    def of(cls, engine: PricingEngine, version: int | None) -> Rates:
        """The rates of `engine`, as version `version`."""
        names: set[str] = set()
        for key, plan in (engine.config.plans or {}).items():
            if plan.rate_overrides:
                names.update((key, plan.id))
        return cls(engine, version, frozenset(names))

    @property
    def min_balance(self) -> int:
        """The floor holds keep under this version."""
        return self.engine.min_balance


_Upcoming: TypeAlias = tuple[datetime, int, Rates]
"""A scheduled version: when it takes effect, its number, its rates."""


class Schedule:
    """The rates in force now and the scheduled ones, kept in step with the store."""

    __slots__ = (
        "_cache",
        "_clock",
        "_every",
        "_inflight",
        "_rates",
        "_refresh_at",
        "_refreshed_at",
        "_store",
        "_upcoming",
    )

    def __init__(
        self, store: CreditStore, clock: Callable[[], datetime], every: float | None
    ) -> None:
        self._store = store
        self._clock = clock
        self._every = None if every is None else timedelta(seconds=every)
        self._rates: Rates | None = None
        self._upcoming: list[_Upcoming] = []
        self._cache: dict[int, Rates] = {}
        self._refresh_at: datetime | None = None
        """When the next refresh is due; None: never (not following the store, or no
        refresh interval)."""
        self._refreshed_at: datetime | None = None
        self._inflight: anyio.Event | None = None

    # -- no I/O ------------------------------------------------------------------------------

    def _now(self) -> datetime:
        now = self._clock()
        return now if now.tzinfo is not None else now.astimezone(UTC)

    def use(self, engine: PricingEngine) -> None:
        """Price with `engine` (a manager's constructor argument) until told otherwise."""
        self._rates = Rates.of(engine, None)

    def now(self) -> Rates | None:
        """The rates in force now by the clock (None before any), without a refresh."""
        return self._at(self._now())

    def upcoming(self) -> list[tuple[datetime, int]]:
        """The scheduled versions known, as (effective_at, version), soonest first."""
        self._at(self._now())
        return [(at, version) for at, version, _ in self._upcoming]

    def _at(self, now: datetime) -> Rates | None:
        upcoming = self._upcoming
        if upcoming and now >= upcoming[0][0]:
            # The latest (effective_at, version) that has passed wins, as in the store.
            passed = 0
            while passed < len(upcoming) and upcoming[passed][0] <= now:
                passed += 1
            self._rates = upcoming[passed - 1][2]
            self._upcoming = upcoming[passed:]
        return self._rates

    def cancelled(self, version: int) -> None:
        """Forget a scheduled version that was cancelled."""
        self._upcoming = [entry for entry in self._upcoming if entry[1] != version]
        self._cache.pop(version, None)

    def published_unread(self, engine: PricingEngine, effective_at: datetime | None) -> None:
        """
        A version was published but the schedule could not be read back: price with it now
        if it is in force now (its number unknown), and refresh at the next charge.
        """
        now = self._now()
        if effective_at is None or effective_at <= now:
            self._rates = Rates.of(engine, None)
        if self._every is not None:
            self._refresh_at = now

    # -- refreshing --------------------------------------------------------------------------

    async def fresh(self) -> Rates | None:
        """The rates in force now, after a refresh when one is due (see the module)."""
        due = self._refresh_at
        if due is None:
            return self._at(self._now())
        now = self._now()
        last = self._refreshed_at
        if now >= due or (last is not None and now < last):  # due, or the clock went back
            await self._refresh(force=False, seed={})
            now = self._now()
        return self._at(now)

    async def reload(self, seed: Mapping[str, PricingEngine] | None = None) -> Rates | None:
        """
        Refresh from the store now and follow it from then on.

        Args:
            seed: Engines already built, by version id (a version just published), so their
                configs are not fetched back.

        Returns:
            The store's version in force now, or None when it has none (the rates in use
            then stay as they were).

        Raises:
            StoreError: The store failed; what the manager knew is unchanged.
        """
        return await self._refresh(force=True, seed=seed or {})

    async def _refresh(self, *, force: bool, seed: Mapping[str, PricingEngine]) -> Rates | None:
        """One refresh at a time; without `force`, a refresh already running is enough."""
        while (running := self._inflight) is not None:
            await running.wait()
            if not force:
                return None
        done = anyio.Event()
        self._inflight = done
        started = self._now()
        try:
            return await self._load(started, seed)
        except Exception as exc:
            if force:
                raise
            self._plan_next(started)
            _log.warning(
                "refreshing the pricing schedule failed (%s: %s); pricing with the versions"
                " known, trying again in %s",
                type(exc).__name__,
                exc,
                self._every,
                exc_info=not isinstance(exc, DuctoError),
            )
            return None
        finally:
            self._inflight = None
            done.set()

    async def _load(self, started: datetime, seed: Mapping[str, PricingEngine]) -> Rates | None:
        """Read the schedule, fetch the configs not seen yet, then replace what is known."""
        history = await self._store.get_pricing_history()
        active: PricingConfigHistoryItem | None = None
        scheduled: list[PricingConfigHistoryItem] = []
        for item in history:
            if item.active:
                active = item
            elif item.scheduled and item.effective_at is not None:
                scheduled.append(item)
        known: dict[int, Rates] = {}
        for item in ([active] if active is not None else []) + scheduled:
            rates = self._cache.get(item.version)
            if rates is None:
                engine = seed.get(item.id)
                if engine is None:
                    stored = await self._store.get_pricing_config(item.version)
                    if stored is None:
                        continue  # cannot happen: versions are never deleted
                    engine = PricingEngine(stored.config)
                rates = Rates.of(engine, item.version)
            known[item.version] = rates
        # Nothing is replaced until everything was read: a failure leaves it all as it was.
        self._cache = known
        current = known.get(active.version) if active is not None else None
        if current is not None:
            self._rates = current
        self._upcoming = sorted(
            (item.effective_at, item.version, known[item.version])
            for item in scheduled
            if item.effective_at is not None and item.version in known
        )
        self._plan_next(started)
        return current

    def _plan_next(self, started: datetime) -> None:
        """Set when the next refresh is due: an interval on, or the next switch if sooner."""
        self._refreshed_at = started
        if self._every is None:
            self._refresh_at = None
            return
        due = started + self._every
        for effective_at, _, _ in self._upcoming:
            if effective_at > started:
                due = min(due, effective_at)
                break
        self._refresh_at = due
