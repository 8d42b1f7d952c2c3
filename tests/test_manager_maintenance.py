"""CreditManager's background maintenance: it sweeps and prunes while the manager is open,
stops on exit, survives failures, and refuses bad intervals."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import anyio
import pytest
from tests._manager_support import Recorder
from tests.conftest import FakeClock

from ducto import CreditManager, MemoryStore
from ducto.errors import ErrorCode, InvalidArgumentError, StoreError
from ducto.events import CreditEventEmitter, CreditEventType
from ducto.interface.models import PruneResult, SpendCap, SweepResult
from ducto.manager import MaintenanceRun

pytestmark = pytest.mark.anyio

EVERY = 0.01
"""The interval the tests run maintenance at, in seconds."""


class FlakyStore(MemoryStore):
    """A MemoryStore whose sweep and prune a test may make fail or hang."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock=clock)
        self.sweep_failures: list[Exception] = []
        self.prune_failures: list[Exception] = []
        self.prune_hangs = False
        self.prunes_started = 0

    async def sweep_expired_credits(self, dry_run: bool = False) -> SweepResult:
        if self.sweep_failures:
            raise self.sweep_failures.pop(0)
        return await super().sweep_expired_credits(dry_run)

    async def prune(
        self, *, dry_run: bool = False, progress: Callable[[PruneResult], object] | None = None
    ) -> PruneResult:
        self.prunes_started += 1
        if self.prune_hangs:
            await anyio.sleep_forever()
        if self.prune_failures:
            raise self.prune_failures.pop(0)
        return await super().prune(dry_run=dry_run, progress=progress)


async def _old_data(store: MemoryStore, clock: FakeClock, user_id: str) -> str:
    """A released hold, a capped usage and a keyed grant that expires in an hour; then the
    clock moves 8 days on (past the 7-day retention). Returns the released hold's id."""
    await store.set_spend_cap(SpendCap(user_id=user_id, period="daily", limit=1000))
    await store.add_credits(user_id, 100, "purchase")
    hold = await store.reserve_credits(user_id, 10, "chat", min_balance=0, ttl=60)
    (await store.release_reservation(user_id, hold.reservation_id)).raise_for_error()
    spent = await store.reserve_credits(user_id, 5, "chat", min_balance=0)
    (await store.deduct_credits(user_id, spent.reservation_id, 5)).raise_for_error()
    grant = await store.add_credits(
        user_id,
        50,
        "purchase",
        expires_at=clock.now + timedelta(hours=1),
        idempotency_key="pay-1",
    )
    grant.raise_for_error()
    clock.advance(days=8)
    return hold.reservation_id


async def _wait_for(condition: Callable[[], bool], seconds: float = 10) -> None:
    # Polled: the manager offers no event to wait on, only `last_maintenance` to read.
    with anyio.fail_after(seconds):
        while not condition():  # noqa: ASYNC110
            await anyio.sleep(EVERY / 4)


def _runs(manager: CreditManager) -> int:
    last = manager.last_maintenance
    return 0 if last is None else last.run


async def test_a_run_sweeps_the_expired_lot_and_prunes_the_old_key(
    clock: FakeClock, user_id: str
) -> None:
    """The first run writes the expired lot off and deletes the key, hold and closed windows
    past retention, and says so on `last_maintenance`."""
    store = MemoryStore(clock=clock)
    hold_id = await _old_data(store, clock, user_id)
    recorder = Recorder()
    events = CreditEventEmitter()
    events.on(None, recorder)
    manager = CreditManager(store, events=events, clock=clock, maintenance_interval=EVERY)

    async with manager:
        await _wait_for(lambda: manager.last_maintenance is not None)
        first = manager.last_maintenance
        again = await store.add_credits(user_id, 50, "purchase", idempotency_key="pay-1")
        released = await store.release_reservation(user_id, hold_id)

    assert isinstance(first, MaintenanceRun)
    assert (1, True) == (first.run, first.ok)
    assert (clock.now, clock.now) == (first.started_at, first.finished_at)
    assert first.swept is not None
    assert (1, 50) == (first.swept.expired_count, first.swept.expired_amount)
    assert first.pruned is not None
    assert (1, 2) == (first.pruned.idempotency_keys, first.pruned.holds)
    assert first.pruned.windows >= 1
    assert (None, None) == (first.sweep_error, first.prune_error)
    assert not again.idempotent
    assert ErrorCode.RESERVATION_NOT_FOUND == released.error
    assert [50] == [e.amount for e in recorder.of(CreditEventType.CREDITS_EXPIRED)]


async def test_runs_repeat_and_catch_up_with_new_data(clock: FakeClock, user_id: str) -> None:
    """Runs go on every interval: a key that ages past retention while the manager is open
    is pruned by a later run."""
    store = MemoryStore(clock=clock)
    manager = CreditManager(store, clock=clock, maintenance_interval=timedelta(seconds=EVERY))

    async with manager:
        await store.add_credits(user_id, 10, "purchase", idempotency_key="k")
        await _wait_for(lambda: _runs(manager) >= 2)
        kept = await store.add_credits(user_id, 10, "purchase", idempotency_key="k")
        clock.advance(days=7, seconds=1)
        seen = _runs(manager)
        await _wait_for(lambda: _runs(manager) >= seen + 2)
        past = await store.add_credits(user_id, 10, "purchase", idempotency_key="k")

    assert kept.idempotent
    assert not past.idempotent
    assert 20 == past.new_balance


async def test_maintenance_stops_on_exit(clock: FakeClock) -> None:
    """After the manager exits no run starts, and the store is closed."""
    store = FlakyStore(clock)
    manager = CreditManager(store, clock=clock, maintenance_interval=EVERY)

    with anyio.fail_after(5):
        async with manager:
            await _wait_for(lambda: _runs(manager) >= 1)
    runs, prunes = _runs(manager), store.prunes_started
    await anyio.sleep(EVERY * 10)

    assert (runs, prunes) == (_runs(manager), store.prunes_started)
    with pytest.raises(StoreError):
        await store.get_balance("alice")


async def test_exit_cancels_a_run_in_flight(clock: FakeClock) -> None:
    """A run that hangs is cancelled on exit: leaving the manager does not wait for it."""
    store = FlakyStore(clock)
    store.prune_hangs = True
    manager = CreditManager(store, clock=clock, maintenance_interval=EVERY)

    with anyio.fail_after(5):
        async with manager:
            await _wait_for(lambda: store.prunes_started >= 1)

    assert 1 == store.prunes_started
    assert manager.last_maintenance is None


async def test_a_failure_is_logged_and_retried(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A failing step is logged (a traceback only for a bug), recorded on
    `last_maintenance`, does not stop the other step, and the next run tries again; the
    application's own work goes on undisturbed."""
    store = FlakyStore(clock)
    store.prune_failures = [StoreError("connection lost")]
    store.sweep_failures = [RuntimeError("a bug")]
    manager = CreditManager(store, clock=clock, maintenance_interval=EVERY)
    runs: list[MaintenanceRun] = []

    def collect() -> bool:
        last = manager.last_maintenance
        if last is not None and (not runs or runs[-1].run != last.run):
            runs.append(last)
        return bool(runs) and runs[-1].ok

    with caplog.at_level(logging.ERROR, logger="ducto.manager"):
        async with manager:
            await _wait_for(collect)
            balance = await store.add_credits("alice", 5, "purchase")

    failed = runs[0]
    assert (1, False) == (failed.run, failed.ok)
    assert "RuntimeError: a bug" == failed.sweep_error
    assert "StoreError: connection lost" == failed.prune_error
    assert (None, None) == (failed.swept, failed.pruned)
    assert runs[-1].ok
    assert runs[-1].run >= 2
    assert 5 == balance.new_balance
    records = [r for r in caplog.records if r.name == "ducto.manager"]
    assert ["sweep", "prune"] == [r.args[0] for r in records if isinstance(r.args, tuple)]
    assert all("trying again" in r.getMessage() for r in records)
    assert [True, False] == [bool(r.exc_info) for r in records]


async def test_a_failing_sweep_does_not_stop_the_prune(clock: FakeClock, user_id: str) -> None:
    """The prune runs and reports even when the sweep before it failed."""
    store = FlakyStore(clock)
    await _old_data(store, clock, user_id)
    store.sweep_failures = [StoreError("busy")]
    manager = CreditManager(store, clock=clock, maintenance_interval=EVERY)

    async with manager:
        await _wait_for(lambda: manager.last_maintenance is not None)
        first = manager.last_maintenance

    assert first is not None
    assert "StoreError: busy" == first.sweep_error
    assert first.pruned is not None
    assert 1 == first.pruned.idempotency_keys


async def test_no_maintenance_by_default(clock: FakeClock) -> None:
    """Without maintenance_interval nothing runs in the background."""
    store = FlakyStore(clock)
    manager = CreditManager(store, clock=clock)

    async with manager:
        await anyio.sleep(EVERY * 5)

    assert manager.last_maintenance is None
    assert 0 == store.prunes_started


@pytest.mark.parametrize(
    "value",
    [
        0,
        -1,
        0.0,
        -0.5,
        math.nan,
        math.inf,
        10**30,
        400 * 86400,
        timedelta(0),
        timedelta(seconds=-1),
        timedelta(days=400),
        True,
        "60",
        [60],
    ],
    ids=repr,
)
def test_bad_intervals_are_refused(value: Any) -> None:
    """An interval that is not a positive number of seconds (up to a year) or a timedelta is
    refused, naming the parameter."""
    with pytest.raises(InvalidArgumentError, match="maintenance_interval"):
        CreditManager(MemoryStore(), maintenance_interval=value)


@pytest.mark.parametrize("value", [None, 1, 0.01, 60.5, timedelta(minutes=5), 366 * 86400])
def test_good_intervals_are_accepted(value: Any) -> None:
    """None, seconds and a timedelta are accepted; nothing runs before the manager opens."""
    manager = CreditManager(MemoryStore(), maintenance_interval=value)

    assert manager.last_maintenance is None


async def test_the_manager_still_refuses_a_second_enter(clock: FakeClock) -> None:
    """Entering an open manager is refused and leaves the running maintenance alone."""
    manager = CreditManager(MemoryStore(clock=clock), clock=clock, maintenance_interval=EVERY)

    async with manager:
        with pytest.raises(InvalidArgumentError, match="open already"):
            await manager.__aenter__()
        seen = _runs(manager)
        await _wait_for(lambda: _runs(manager) > seen)
