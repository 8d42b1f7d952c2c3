"""Auto top-up: one payment per crossing across processes, the monthly limit, retries, crashes."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from tests._manager_support import Recorder
from tests.conftest import FakeClock, postgres_url
from tests.contract._checks import all_rows

from ducto import AutoTopUp, CreditManager, PricingEngine, UsageMetrics
from ducto.errors import InsufficientCreditsError, InvalidArgumentError
from ducto.events import CreditEventEmitter, CreditEventType
from ducto.interface.base import CreditStore
from ducto.interface.models import TransactionRow

pytestmark = pytest.mark.anyio

THRESHOLD = 50
AMOUNT = 100
MONTHLY_LIMIT = 300
ENGINE = PricingEngine.from_dict({"models": {"_default": "input_tokens * 1"}, "min_balance": 0})
"""One credit per input token, no floor: usage of n input tokens costs n credits."""


# -- stores as other processes see them --------------------------------------------------------


class Borrowed:
    """A store the test opened and closes: a manager's ``async with`` leaves it open."""

    def __init__(self, inner: CreditStore) -> None:
        self._inner = inner
        self.claims: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def __aenter__(self) -> Borrowed:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        return None

    async def aclose(self) -> None:
        return None

    async def claim_top_up(self, user_id: str, **options: Any) -> Any:
        result = await self._inner.claim_top_up(user_id, **options)
        self.claims.append(result.reason or "claimed")
        return result


class Gated(Borrowed):
    """Holds every claim back until `gate` opens, so claims from many managers race."""

    def __init__(self, inner: CreditStore, gate: Gate) -> None:
        super().__init__(inner)
        self._gate = gate

    async def claim_top_up(self, user_id: str, **options: Any) -> Any:
        await self._gate.arrive()
        return await super().claim_top_up(user_id, **options)


class Gate:
    """Opens once `parties` callers have arrived."""

    def __init__(self, parties: int) -> None:
        self._parties = parties
        self._arrived = 0
        self._open = anyio.Event()

    async def arrive(self) -> None:
        self._arrived += 1
        if self._arrived >= self._parties:
            self._open.set()
        await self._open.wait()


def _peer(store: CreditStore, tmp_path: Path, clock: FakeClock) -> CreditStore:
    """
    A new instance on `store`'s data: the conftest opener's file, or the store's own schema
    (this module's import of ``tests.conftest`` is not the module pytest loaded, so its
    ``POSTGRES_SCHEMA`` would name another schema).
    """
    kind = type(store).__name__
    if kind == "SQLiteStore":
        from ducto.interface.sqlite import SQLiteStore

        return SQLiteStore(tmp_path / "ducto.db", clock=clock, synchronous="NORMAL")
    if kind == "PostgresStore":
        from ducto.interface.postgres import PostgresStore

        schema: str = getattr(store, "schema")  # noqa: B009 - not on the CreditStore protocol
        return PostgresStore(postgres_url(), schema=schema, clock=clock, min_size=1, max_size=2)
    raise AssertionError(f"no peer for {kind}")


@asynccontextmanager
async def peer_stores(
    store: CreditStore, tmp_path: Path, clock: FakeClock, count: int
) -> AsyncIterator[list[CreditStore]]:
    """
    `count` open stores on `store`'s data, as `count` processes would each open one: `store`
    first, then new instances with connections of their own. A `MemoryStore` has no other
    process, so its peers are the store itself.
    """
    if type(store).__name__ == "MemoryStore":
        yield [store] * count
        return
    async with AsyncExitStack() as stack:
        others = []
        for _ in range(count - 1):
            peer = await stack.enter_async_context(_peer(store, tmp_path, clock))
            await peer.setup()
            others.append(peer)
        yield [store, *others]


# -- helpers -----------------------------------------------------------------------------------


class Payments:
    """The application's charge function: records each call; can fail, hang or wait."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, str]] = []
        self.failures = 0
        """How many of the next calls raise."""
        self.gate: anyio.Event | None = None
        """When set, calls wait for it."""
        self.started = anyio.Event()

    async def __call__(self, user_id: str, amount: int, claim_id: str) -> str:
        self.calls.append((user_id, amount, claim_id))
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.failures:
            self.failures -= 1
            raise ConnectionError("card network unreachable")
        return f"pay_{claim_id}"


def _top_up(payments: Callable[[str, int, str], Awaitable[str] | str], **options: Any) -> AutoTopUp:
    settings: dict[str, Any] = {"backoff": 0.001, "timeout": 5.0, **options}
    return AutoTopUp(THRESHOLD, AMOUNT, MONTHLY_LIMIT, payments, **settings)


def _manager(
    store: CreditStore, clock: FakeClock, recorder: Recorder, top_up: AutoTopUp
) -> CreditManager:
    events = CreditEventEmitter()
    events.on(None, recorder)
    return CreditManager(store, ENGINE, events=events, clock=clock, auto_top_up=top_up)


async def _settled(*managers: CreditManager) -> None:
    """Wait until no manager has a top-up in flight."""
    with anyio.fail_after(20):
        while any(manager.pending_top_ups for manager in managers):  # noqa: ASYNC110
            await anyio.sleep(0.002)


async def _set_available(manager: CreditManager, user_id: str, target: int) -> None:
    """Adjust the user's available credits to `target` (by a grant or a debit)."""
    available = (await manager.get_balance(user_id)).available
    if available != target:
        await manager.add_credits(user_id, target - available, "adjustment")


async def _cross_with_a_hold(manager: CreditManager, user_id: str, credits: int = 20) -> None:
    """Place a hold that takes available below the threshold, then release it (holds that
    concurrent ones leave no room for are refused, and skipped)."""
    with contextlib.suppress(InsufficientCreditsError):
        async with manager.hold(user_id, credits):
            await anyio.lowlevel.checkpoint()


async def _swing(manager: CreditManager, user_id: str) -> None:
    """Take 20 credits (crossing when available was 50 to 69), then give them back."""
    try:
        await manager.add_credits(user_id, -20, "adjustment")
    except InsufficientCreditsError:
        return  # concurrent swings took available too low
    await anyio.lowlevel.checkpoint()
    await manager.add_credits(user_id, 20, "adjustment")


async def _top_up_rows(store: CreditStore, user_id: str) -> list[TransactionRow]:
    return [
        row
        for row in await all_rows(store, user_id)
        if row.type == "purchase" and row.metadata.get("reference_type") == "auto_top_up"
    ]


# -- one manager -------------------------------------------------------------------------------


async def test_a_crossing_tops_up_without_the_request_waiting(
    store: CreditStore, clock: FakeClock, user_id: str
) -> None:
    """A charge that crosses returns at once; the top-up is paid and granted behind it."""
    payments = Payments()
    payments.gate = anyio.Event()
    recorder = Recorder()
    manager = _manager(Borrowed(store), clock, recorder, _top_up(payments))  # type: ignore[arg-type]

    async with manager:
        await manager.add_credits(user_id, 60, "purchase")
        with anyio.fail_after(5):
            charged = await manager.deduct(user_id, UsageMetrics(input_tokens=20))
        with anyio.fail_after(5):
            await payments.started.wait()
        waiting = (manager.pending_top_ups, (await manager.get_balance(user_id)).available)
        payments.gate.set()
        await _settled(manager)

    assert (20, 40) == (charged.charged, charged.available)
    assert (1, 40) == waiting
    [(paid_user, paid_amount, claim_id)] = payments.calls
    assert (user_id, AMOUNT) == (paid_user, paid_amount)
    [row] = await _top_up_rows(store, user_id)
    assert (AMOUNT, claim_id) == (row.amount, row.metadata["reference_id"])
    assert 140 == (await store.get_balance(user_id)).available
    [event] = recorder.of(CreditEventType.TOP_UP)
    assert (user_id, AMOUNT, 140, 140) == (
        event.user_id,
        event.amount,
        event.balance_after,
        event.available,
    )
    assert (row.id, f"pay_{claim_id}") == (event.transaction_id, event.idempotency_key)
    assert {
        "claim_id": claim_id,
        "payment_reference": f"pay_{claim_id}",
        "attempts": 1,
        "month_total": AMOUNT,
        "replayed": False,
    } == event.metadata
    grants = recorder.of(CreditEventType.CREDITS_ADDED)
    assert [60, AMOUNT] == [e.amount for e in grants]
    assert [] == recorder.of(CreditEventType.TOP_UP_FAILED)


async def test_a_hold_that_crosses_starts_a_top_up(
    store: CreditStore, clock: FakeClock, user_id: str
) -> None:
    """Holds count: placing one that takes available below the threshold tops up."""
    payments = Payments()
    manager = _manager(Borrowed(store), clock, Recorder(), _top_up(payments))  # type: ignore[arg-type]

    async with manager:
        await manager.add_credits(user_id, 60, "purchase")
        async with manager.hold(user_id, 30) as hold:
            await _settled(manager)
            during = (await manager.get_balance(user_id)).available
            await hold.settle(30)
        after = (await manager.get_balance(user_id)).available

    assert 1 == len(payments.calls)
    assert (30 + AMOUNT, 30 + AMOUNT) == (during, after)


async def test_only_a_crossing_starts_a_top_up(
    store: CreditStore, clock: FakeClock, user_id: str
) -> None:
    """Charges that stay at the threshold or above, or that start below it, claim nothing."""
    payments = Payments()
    payments.failures = 10  # the top-up fails: the user stays below the threshold
    wrapped = Borrowed(store)
    top_up = _top_up(payments, retries=0)
    manager = _manager(wrapped, clock, Recorder(), top_up)  # type: ignore[arg-type]

    async with manager:
        await manager.add_credits(user_id, 100, "purchase")
        await manager.deduct(user_id, UsageMetrics(input_tokens=50))  # 100 -> 50: not below
        await _settled(manager)
        at_threshold = list(wrapped.claims)
        await manager.add_credits(user_id, -10, "adjustment")  # 50 -> 40: crosses
        await _settled(manager)
        await manager.deduct(user_id, UsageMetrics(input_tokens=1))  # 40 -> 39: below already
        async with manager.hold(user_id, 9):  # 39 -> 30
            pass
        await _settled(manager)

    assert [] == at_threshold
    assert ["claimed"] == wrapped.claims
    assert 1 == len(payments.calls)


async def test_a_failing_charge_is_retried_then_reported_and_frees_the_month(
    store: CreditStore, clock: FakeClock, user_id: str
) -> None:
    """Every attempt failing: retried with the same claim id, then top_up_failed; the month's
    amount is given back, so the next crossing can still top up within the limit."""
    payments = Payments()
    payments.failures = 3
    recorder = Recorder()
    top_up = AutoTopUp(THRESHOLD, AMOUNT, AMOUNT, payments, retries=2, backoff=0.001)
    manager = _manager(Borrowed(store), clock, recorder, top_up)  # type: ignore[arg-type]

    async with manager:
        await manager.add_credits(user_id, 60, "purchase")
        charged = await manager.deduct(user_id, UsageMetrics(input_tokens=20))
        await _settled(manager)
        failed_calls = list(payments.calls)
        after_failure = (await manager.get_balance(user_id)).available
        await _set_available(manager, user_id, 60)
        await manager.deduct(user_id, UsageMetrics(input_tokens=20))
        await _settled(manager)

    assert 20 == charged.charged
    assert 3 == len(failed_calls)
    assert 1 == len({claim_id for _, _, claim_id in failed_calls})
    assert 40 == after_failure
    [failed] = recorder.of(CreditEventType.TOP_UP_FAILED)
    assert (user_id, AMOUNT, "ConnectionError") == (failed.user_id, failed.amount, failed.error)
    assert {
        "claim_id": failed_calls[0][2],
        "attempts": 3,
        "month_total": 0,
        "stage": "charge",
        "message": "card network unreachable",
    } == failed.metadata
    [granted] = recorder.of(CreditEventType.TOP_UP)
    assert AMOUNT == granted.metadata["month_total"]
    assert [AMOUNT] == [row.amount for row in await _top_up_rows(store, user_id)]


async def test_a_charge_that_fails_once_is_granted_on_the_retry(
    store: CreditStore, clock: FakeClock, user_id: str
) -> None:
    """A transient failure is retried under the same claim id and granted once."""
    payments = Payments()
    payments.failures = 1
    recorder = Recorder()
    manager = _manager(Borrowed(store), clock, recorder, _top_up(payments))  # type: ignore[arg-type]

    async with manager:
        await manager.add_credits(user_id, 60, "purchase")
        await manager.add_credits(user_id, -20, "adjustment")
        await _settled(manager)

    assert 2 == len(payments.calls)
    assert payments.calls[0] == payments.calls[1]
    [event] = recorder.of(CreditEventType.TOP_UP)
    assert 2 == event.metadata["attempts"]
    assert [] == recorder.of(CreditEventType.TOP_UP_FAILED)
    assert [AMOUNT] == [row.amount for row in await _top_up_rows(store, user_id)]


async def test_a_plain_function_can_take_the_payment(
    store: CreditStore, clock: FakeClock, user_id: str
) -> None:
    """A sync charge function runs in a worker thread; its reference keys the grant."""
    calls: list[str] = []

    def charge(user: str, amount: int, claim_id: str) -> str:
        time.sleep(0.01)  # a blocking payment client
        calls.append(claim_id)
        return f"sync-{claim_id}"

    recorder = Recorder()
    manager = _manager(Borrowed(store), clock, recorder, _top_up(charge))  # type: ignore[arg-type]

    async with manager:
        await manager.add_credits(user_id, 60, "purchase")
        await manager.add_credits(user_id, -20, "adjustment")
        await _settled(manager)

    [claim_id] = calls
    [event] = recorder.of(CreditEventType.TOP_UP)
    assert f"sync-{claim_id}" == event.idempotency_key
    assert 140 == (await store.get_balance(user_id)).available


async def test_a_bad_payment_reference_is_a_failed_attempt(
    store: CreditStore, clock: FakeClock, user_id: str
) -> None:
    """A charge that returns no usable reference counts as failed and grants nothing."""

    async def charge(user: str, amount: int, claim_id: str) -> str:
        return ""

    recorder = Recorder()
    top_up = _top_up(charge, retries=1)
    manager = _manager(Borrowed(store), clock, recorder, top_up)  # type: ignore[arg-type]

    async with manager:
        await manager.add_credits(user_id, 60, "purchase")
        await manager.add_credits(user_id, -20, "adjustment")
        await _settled(manager)

    [failed] = recorder.of(CreditEventType.TOP_UP_FAILED)
    assert ("InvalidArgumentError", 2) == (failed.error, failed.metadata["attempts"])
    assert [] == await _top_up_rows(store, user_id)


# -- many processes ----------------------------------------------------------------------------


async def test_eight_managers_crossing_at_once_pay_and_grant_once(
    store: CreditStore, clock: FakeClock, user_id: str, tmp_path: Path
) -> None:
    """Eight managers (eight processes) each see the user cross and claim at the same
    moment: exactly one charge and one grant."""
    payments = Payments()
    recorder = Recorder()
    gate = Gate(8)
    async with peer_stores(store, tmp_path, clock, 8) as stores:
        wrapped = [Gated(peer, gate) for peer in stores]
        managers = [
            _manager(peer, clock, recorder, _top_up(payments))  # type: ignore[arg-type]
            for peer in wrapped
        ]
        payments.gate = anyio.Event()
        async with AsyncExitStack() as stack:
            for manager in managers:
                await stack.enter_async_context(manager)
            await managers[0].add_credits(user_id, 40, "purchase")
            for manager in managers:
                await manager.add_credits(user_id, 20, "adjustment")  # 40 -> 60
                await manager.add_credits(user_id, -20, "adjustment")  # 60 -> 40: crosses
            with anyio.fail_after(20):
                while sum(len(peer.claims) for peer in wrapped) < 8:  # noqa: ASYNC110
                    await anyio.sleep(0.002)
            payments.gate.set()  # the winner pays once every claim has been answered
            await _settled(*managers)
        claims = sorted(reason for peer in wrapped for reason in peer.claims)

    assert 1 == len(payments.calls)
    assert ["claimed"] + ["in_flight"] * 7 == claims
    assert [AMOUNT] == [row.amount for row in await _top_up_rows(store, user_id)]
    assert 1 == len(recorder.of(CreditEventType.TOP_UP))
    assert 40 + AMOUNT == (await store.get_balance(user_id)).available


async def test_the_monthly_limit_holds_under_a_storm_of_crossings(
    store: CreditStore, clock: FakeClock, user_id: str, tmp_path: Path
) -> None:
    """Four managers crossing over and over, concurrently, never top up more than the
    monthly limit in a UTC month; the next month starts again from zero."""
    payments = Payments()
    recorder = Recorder()
    async with peer_stores(store, tmp_path, clock, 4) as stores:
        managers = [
            _manager(Borrowed(peer), clock, recorder, _top_up(payments))  # type: ignore[arg-type]
            for peer in stores
        ]
        async with AsyncExitStack() as stack:
            for manager in managers:
                await stack.enter_async_context(manager)
            await managers[0].add_credits(user_id, 60, "purchase")
            for round_ in range(8):
                await _set_available(managers[0], user_id, 60)
                async with anyio.create_task_group() as tg:
                    for manager in managers:
                        for _ in range(3):
                            tg.start_soon(_swing, manager, user_id)
                            tg.start_soon(_cross_with_a_hold, manager, user_id, 15)
                await _settled(*managers)
                # And one crossing that leaves the user below the threshold.
                await _set_available(managers[0], user_id, 60)
                await managers[round_ % 4].add_credits(user_id, -20, "adjustment")
                await _settled(*managers)
            this_month = list(payments.calls)
            clock.set(datetime(2026, 4, 1, tzinfo=UTC))
            await _set_available(managers[0], user_id, 60)
            await managers[1].add_credits(user_id, -20, "adjustment")  # crosses
            await _settled(*managers)

    rows = await _top_up_rows(store, user_id)
    march = [row for row in rows if row.created_at < datetime(2026, 4, 1, tzinfo=UTC)]
    assert MONTHLY_LIMIT // AMOUNT == len(this_month)
    assert MONTHLY_LIMIT == sum(row.amount for row in march)
    assert [AMOUNT] == [row.amount for row in rows if row not in march]
    events = recorder.of(CreditEventType.TOP_UP)
    assert [100, 200, 300, 100] == [e.metadata["month_total"] for e in events]


async def test_a_claim_left_by_a_crashed_process_expires_then_the_next_crossing_tops_up(
    store: CreditStore, clock: FakeClock, user_id: str, tmp_path: Path
) -> None:
    """A process that claimed and died blocks top-ups until its claim expires; its amount
    still counts toward the month (its payment may have been taken)."""
    payments = Payments()
    recorder = Recorder()
    async with peer_stores(store, tmp_path, clock, 2) as (crashed, survivor):
        await survivor.add_credits(user_id, 40, "purchase")
        orphan = await crashed.claim_top_up(
            user_id, threshold=THRESHOLD, amount=AMOUNT, monthly_limit=MONTHLY_LIMIT, ttl=300
        )
        wrapped = Borrowed(survivor)
        manager = _manager(wrapped, clock, recorder, _top_up(payments))  # type: ignore[arg-type]
        async with manager:
            await _set_available(manager, user_id, 60)
            await manager.add_credits(user_id, -20, "adjustment")  # crosses
            await _settled(manager)
            blocked = list(wrapped.claims)
            clock.advance(301)
            await _set_available(manager, user_id, 60)
            await manager.add_credits(user_id, -20, "adjustment")  # crosses
            await _settled(manager)

    assert orphan.claimed is True
    assert ["in_flight", "claimed"] == wrapped.claims
    assert ["in_flight"] == blocked
    assert 1 == len(payments.calls)
    [event] = recorder.of(CreditEventType.TOP_UP)
    assert 2 * AMOUNT == event.metadata["month_total"]
    assert [AMOUNT] == [row.amount for row in await _top_up_rows(store, user_id)]


# -- lifecycle ---------------------------------------------------------------------------------


async def test_top_ups_run_only_while_the_manager_is_open(
    store: CreditStore, clock: FakeClock, user_id: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A crossing on a manager that is not open starts nothing and says why, once."""
    payments = Payments()
    manager = _manager(store, clock, Recorder(), _top_up(payments))

    with caplog.at_level(logging.WARNING, logger="ducto.manager"):
        await manager.add_credits(user_id, 60, "purchase")
        await manager.add_credits(user_id, -20, "adjustment")
        await manager.add_credits(user_id, 20, "adjustment")
        await manager.add_credits(user_id, -20, "adjustment")

    assert [] == payments.calls
    assert 0 == manager.pending_top_ups
    warnings = [r for r in caplog.records if "only while the manager is open" in r.getMessage()]
    assert 1 == len(warnings)
    assert 40 == (await store.get_balance(user_id)).available


async def test_closing_the_manager_stops_a_hung_payment_within_its_timeout(
    store: CreditStore, clock: FakeClock, user_id: str
) -> None:
    """Closing while a payment hangs waits at most the attempt's timeout, starts no retry,
    gives the month's amount back and reports top_up_failed."""

    started = anyio.Event()
    calls: list[str] = []

    async def charge(user: str, amount: int, claim_id: str) -> str:
        calls.append(claim_id)
        started.set()
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    recorder = Recorder()
    top_up = _top_up(charge, timeout=0.3, retries=3, backoff=0.01)
    manager = _manager(Borrowed(store), clock, recorder, top_up)  # type: ignore[arg-type]

    with anyio.fail_after(5):
        async with manager:
            await manager.add_credits(user_id, 60, "purchase")
            await manager.add_credits(user_id, -20, "adjustment")
            await started.wait()

    assert 0 == manager.pending_top_ups
    assert 1 == len(calls)
    [failed] = recorder.of(CreditEventType.TOP_UP_FAILED)
    assert ("TimeoutError", 1, 0) == (
        failed.error,
        failed.metadata["attempts"],
        failed.metadata["month_total"],
    )
    retry = await store.claim_top_up(
        user_id, threshold=THRESHOLD, amount=AMOUNT, monthly_limit=AMOUNT
    )
    assert retry.claimed is True


async def test_a_payment_in_flight_when_the_manager_closes_is_granted(
    store: CreditStore, clock: FakeClock, user_id: str
) -> None:
    """Closing waits for a payment that is under way, and grants it."""
    payments = Payments()
    payments.gate = anyio.Event()
    recorder = Recorder()
    manager = _manager(Borrowed(store), clock, recorder, _top_up(payments))  # type: ignore[arg-type]

    async with anyio.create_task_group() as tg, manager:
        await manager.add_credits(user_id, 60, "purchase")
        await manager.add_credits(user_id, -20, "adjustment")
        await payments.started.wait()
        tg.start_soon(_open_later, payments.gate)

    assert 1 == len(recorder.of(CreditEventType.TOP_UP))
    assert 140 == (await store.get_balance(user_id)).available


async def _open_later(gate: anyio.Event) -> None:
    await anyio.sleep(0.05)
    gate.set()


# -- configuration -----------------------------------------------------------------------------


async def _charge(user_id: str, amount: int, claim_id: str) -> str:
    return claim_id


@pytest.mark.parametrize(
    ("arguments", "options", "named"),
    [
        ((-1, 10, 10, _charge), {}, "threshold"),
        ((True, 10, 10, _charge), {}, "threshold"),
        ((5, 0, 10, _charge), {}, "amount"),
        ((5, 2**62 + 1, 10, _charge), {}, "amount"),
        ((5, 10, 5, _charge), {}, "monthly_limit"),
        ((5, 10, "100", _charge), {}, "monthly_limit"),
        ((5, 10, 10, "stripe"), {}, "charge"),
        ((5, 10, 10, _charge), {"ttl": 0}, "ttl"),
        ((5, 10, 10, _charge), {"ttl": float("nan")}, "ttl"),
        ((5, 10, 10, _charge), {"ttl": 10**400}, "ttl"),
        ((5, 10, 10, _charge), {"retries": -1}, "retries"),
        ((5, 10, 10, _charge), {"retries": 11}, "retries"),
        ((5, 10, 10, _charge), {"retries": 1.0}, "retries"),
        ((5, 10, 10, _charge), {"backoff": -1}, "backoff"),
        ((5, 10, 10, _charge), {"backoff": timedelta(seconds=1)}, "backoff"),
        ((5, 10, 10, _charge), {"timeout": 0}, "timeout"),
        ((5, 10, 10, _charge), {"timeout": None}, "timeout"),
        ((5, 10, 10, _charge), {"ttl": 60, "timeout": 30, "retries": 1}, "ttl"),
    ],
)
def test_bad_settings_name_the_parameter(
    arguments: tuple[Any, ...], options: dict[str, Any], named: str
) -> None:
    """Each invalid setting raises InvalidArgumentError naming it."""
    with pytest.raises(InvalidArgumentError, match=named):
        AutoTopUp(*arguments, **options)


def test_the_defaults_fit_in_the_claim_ttl() -> None:
    """The default attempts and backoff fit in the default claim ttl."""
    top_up = AutoTopUp(1_000, 5_000, 20_000, _charge)

    assert (300.0, 2, 1.0, 30.0) == (top_up.ttl, top_up.retries, top_up.backoff, top_up.timeout)
    assert AutoTopUp(0, 1, 1, _charge, ttl=timedelta(minutes=2)).ttl == timedelta(minutes=2)


def test_the_manager_takes_only_an_auto_top_up() -> None:
    """auto_top_up must be an AutoTopUp."""
    from ducto import MemoryStore

    with pytest.raises(InvalidArgumentError, match="auto_top_up"):
        CreditManager(MemoryStore(), auto_top_up={"threshold": 5})  # type: ignore[arg-type]
    configured = AutoTopUp(5, 10, 10, _charge)
    assert configured is CreditManager(MemoryStore(), auto_top_up=configured).auto_top_up
    assert CreditManager(MemoryStore()).auto_top_up is None
