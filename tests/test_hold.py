"""CreditManager.hold(): reserve, record streamed usage, settle once, never leave a hold behind."""

from __future__ import annotations

import logging
import random
from collections import Counter
from typing import Any

import anyio
import pytest
from anyio.abc import TaskGroup
from anyio.lowlevel import checkpoint
from tests._manager_support import ProxyStore, Recorder, usage_rows
from tests.contract._checks import all_rows

from ducto import CreditManager, UsageMetrics
from ducto.errors import (
    IdempotencyConflictError,
    InsufficientCreditsError,
    InsufficientTeamBalanceError,
    InvalidArgumentError,
    ReservationAlreadySettledError,
    ReservationReleasedError,
    SpendCapExceededError,
    StoreError,
    UserNotInTeamError,
)
from ducto.events import CreditEvent, CreditEventEmitter, CreditEventType
from ducto.interface.base import CreditStore
from ducto.interface.models import SpendCap
from ducto.manager import Hold

pytestmark = pytest.mark.anyio

PRICING: dict[str, Any] = {
    "models": {
        "gpt-4o": "input_tokens * 0.01 + output_tokens * 0.03",
        "_default": "input_tokens * 0.001 + output_tokens * 0.002",
    },
    "min_balance": 0,
    "plans": {
        "pro": {
            "id": "pro",
            "name": "Pro",
            "rate_overrides": {"gpt-4o": "input_tokens * 0.005 + output_tokens * 0.01"},
        },
    },
}
CALL = UsageMetrics(model="gpt-4o", input_tokens=1000, output_tokens=1000)
"""Costs 40 credits at base rates, 15 on the pro plan."""
HALF = UsageMetrics(model="gpt-4o", input_tokens=500, output_tokens=500)
"""Costs 20 credits at base rates."""


class ProviderError(Exception):
    """The simulated model provider failed mid-stream."""


@pytest.fixture
def recorder() -> Recorder:
    """Records every event of the `manager` fixture."""
    return Recorder()


@pytest.fixture
async def manager(store: CreditStore, recorder: Recorder) -> CreditManager:
    """A manager over the store under test with PRICING published."""
    events = CreditEventEmitter()
    events.on(None, recorder)
    new_manager = CreditManager(store, events=events)
    await new_manager.publish_pricing(PRICING)
    return new_manager


async def _proxied(store: CreditStore) -> tuple[CreditManager, ProxyStore, Recorder]:
    proxy = ProxyStore(store)
    recorder = Recorder()
    events = CreditEventEmitter()
    events.on(None, recorder)
    manager = CreditManager(proxy, events=events)  # type: ignore[arg-type]
    await manager.publish_pricing(PRICING)
    return manager, proxy, recorder


# -- settling ----------------------------------------------------------------------------------


async def test_settle_charges_the_actual_usage(
    store: CreditStore, manager: CreditManager, user_id: str
) -> None:
    """The estimate is held on entry; settle charges the actual usage and frees the hold."""
    await manager.add_credits(user_id, 100, "purchase")

    async with manager.hold(user_id, CALL) as hold:
        during = await manager.get_balance(user_id)
        result = await hold.settle(HALF)

    assert (40, 40, 60) == (hold.estimate_credits, during.reserved, during.available)
    assert (20, 80) == (result.charged, result.balance_after)
    assert hold.reservation_id == result.reservation_id
    assert result is hold.result
    assert (True, False) == (hold.settled, hold.released)
    balance = await manager.get_balance(user_id)
    assert (80, 0) == (balance.balance, balance.reserved)
    [row] = await usage_rows(store, user_id)
    assert ("gpt-4o", 500) == (row.metadata["model"], row.metadata["input_tokens"])


async def test_recorded_usage_is_summed_and_settled(manager: CreditManager, user_id: str) -> None:
    """Partial usage recorded chunk by chunk is what settle() charges."""
    await manager.add_credits(user_id, 100, "purchase")
    chunks = [
        UsageMetrics(model="gpt-4o", input_tokens=1000),
        UsageMetrics(output_tokens=300),
        UsageMetrics(output_tokens=200),
    ]

    async with manager.hold(user_id, CALL) as hold:
        for chunk in chunks:
            hold.record(chunk)
        result = await hold.settle()

    assert UsageMetrics(model="gpt-4o", input_tokens=1000, output_tokens=500) == hold.recorded
    assert 25 == result.charged


async def test_settle_with_credits_or_nothing(manager: CreditManager, user_id: str) -> None:
    """settle(int) charges those credits; settle() with nothing recorded charges 0."""
    await manager.add_credits(user_id, 100, "purchase")

    async with manager.hold(user_id, 30) as first:
        seven = await first.settle(7)
    async with manager.hold(user_id, 30) as second:
        nothing = await second.settle()

    assert (7, 0) == (seven.charged, nothing.charged)
    assert (True, True) == (first.settled, second.settled)
    assert 93 == (await manager.get_balance(user_id)).balance


async def test_actual_cost_above_the_hold_is_charged_in_full(
    manager: CreditManager, user_id: str
) -> None:
    """An overrun is charged in full, past zero, and reported as a shortfall."""
    await manager.add_credits(user_id, 30, "purchase")

    async with manager.hold(user_id, 10) as hold:
        result = await hold.settle(CALL)

    assert (40, -10, 10) == (result.charged, result.balance_after, result.shortfall)


async def test_estimate_and_actual_use_the_plan_rates(manager: CreditManager, user_id: str) -> None:
    """A pro user's estimate and settlement are priced with the plan's overrides."""
    await manager.add_credits(user_id, 100, "purchase")
    await manager.set_user_plan(user_id, "pro")

    async with manager.hold(user_id, CALL) as hold:
        hold.record(CALL)

    assert 15 == hold.estimate_credits
    assert hold.result is not None
    assert 15 == hold.result.charged


async def test_a_second_settle_raises(manager: CreditManager, user_id: str) -> None:
    """A hold settles once: settling or recording again raises and charges nothing."""
    await manager.add_credits(user_id, 100, "purchase")

    async with manager.hold(user_id, 20) as hold:
        await hold.settle(5)
        with pytest.raises(ReservationAlreadySettledError) as info:
            await hold.settle(5)
        with pytest.raises(ReservationAlreadySettledError):
            hold.record(HALF)

    assert hold.reservation_id == info.value.reservation_id
    assert 95 == (await manager.get_balance(user_id)).balance


async def test_settle_after_the_hold_was_released_raises(
    manager: CreditManager, user_id: str
) -> None:
    """Once the block released the hold, settle raises ReservationReleasedError."""
    await manager.add_credits(user_id, 100, "purchase")

    async with manager.hold(user_id, 20) as hold:
        pass
    with pytest.raises(ReservationReleasedError):
        await hold.settle(5)

    assert hold.released is True


async def test_misuse_raises(manager: CreditManager, user_id: str) -> None:
    """Settling before entering, entering twice and bad estimates raise InvalidArgumentError."""
    await manager.add_credits(user_id, 100, "purchase")
    hold = manager.hold(user_id, 10)

    with pytest.raises(InvalidArgumentError, match="enter the hold"):
        await hold.settle(1)
    with pytest.raises(InvalidArgumentError, match="estimate"):
        manager.hold(user_id, 1.5)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="estimate"):
        manager.hold(user_id, 0)
    async with hold:
        with pytest.raises(InvalidArgumentError, match="UsageMetrics"):
            hold.record({"input_tokens": 4})  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="entered once"):
        async with hold:
            pass

    assert 0 == (await manager.get_balance(user_id)).reserved


# -- leaving the block -------------------------------------------------------------------------


async def test_leaving_without_settling(
    store: CreditStore, manager: CreditManager, user_id: str
) -> None:
    """Leaving unsettled charges what was recorded, or releases when nothing was."""
    await manager.add_credits(user_id, 100, "purchase")

    async with manager.hold(user_id, CALL) as recorded:
        recorded.record(HALF)
    async with manager.hold(user_id, CALL) as empty:
        pass

    assert (True, False) == (recorded.settled, recorded.released)
    assert (False, True) == (empty.settled, empty.released)
    assert [-20] == [row.amount for row in await usage_rows(store, user_id)]
    balance = await manager.get_balance(user_id)
    assert (80, 0) == (balance.balance, balance.reserved)


async def test_error_with_nothing_recorded_releases(
    store: CreditStore, manager: CreditManager, user_id: str, recorder: Recorder
) -> None:
    """A call that fails before any usage releases its hold; the error propagates."""
    await manager.add_credits(user_id, 100, "purchase")

    with pytest.raises(ProviderError):
        async with manager.hold(user_id, CALL) as hold:
            raise ProviderError("503")

    assert hold.released is True
    assert [] == await usage_rows(store, user_id)
    balance = await manager.get_balance(user_id)
    assert (100, 0) == (balance.balance, balance.reserved)
    assert [
        CreditEventType.CREDITS_ADDED,
        CreditEventType.RESERVED,
        CreditEventType.RELEASED,
    ] == recorder.kinds()
    reserved, released = recorder.events[1:]
    assert (40, hold.reservation_id) == (reserved.amount, reserved.reservation_id)
    assert (40, hold.reservation_id, 100) == (
        released.amount,
        released.reservation_id,
        released.available,
    )


async def test_error_after_recording_settles_the_recorded_usage(
    manager: CreditManager, user_id: str
) -> None:
    """A stream that breaks after usage was recorded is charged for that usage."""
    await manager.add_credits(user_id, 100, "purchase")

    hold = manager.hold(user_id, CALL)

    async def call() -> None:
        async with hold:
            hold.record(UsageMetrics(model="gpt-4o", input_tokens=1000))
            raise ProviderError("stream reset")

    with pytest.raises(ProviderError):
        await call()

    assert hold.settled is True
    assert hold.result is not None
    assert 10 == hold.result.charged
    assert 90 == (await manager.get_balance(user_id)).balance


async def test_cancellation_after_recording_settles_the_recorded_usage(
    manager: CreditManager, user_id: str
) -> None:
    """A stream cut by a timeout is charged for what was recorded before the cut."""
    await manager.add_credits(user_id, 100, "purchase")

    with anyio.move_on_after(0.05) as scope:
        async with manager.hold(user_id, CALL) as hold:
            hold.record(HALF)
            await anyio.sleep(10)

    assert scope.cancelled_caught is True
    assert hold.settled is True
    balance = await manager.get_balance(user_id)
    assert (80, 0) == (balance.balance, balance.reserved)


async def test_unpriceable_usage(store: CreditStore, user_id: str) -> None:
    """settle() refuses usage it cannot price and stays open; on exit, the estimate is charged."""
    manager = CreditManager(store)
    await manager.publish_pricing({"models": {"gpt-4o": "output_tokens * 0.03"}, "min_balance": 0})
    await manager.add_credits(user_id, 100, "purchase")
    mystery = UsageMetrics(model="mystery-1", output_tokens=100)

    async with manager.hold(user_id, 12) as explicit:
        with pytest.raises(InvalidArgumentError, match="mystery-1"):
            await explicit.settle(mystery)
        fixed = await explicit.settle(9)
    async with manager.hold(user_id, 12) as on_exit:
        on_exit.record(mystery)

    assert 9 == fixed.charged
    assert on_exit.result is not None
    assert 12 == on_exit.result.charged
    assert 79 == (await manager.get_balance(user_id)).balance


async def test_a_failing_resolution_does_not_mask_the_error(
    store: CreditStore, user_id: str, caplog: pytest.LogCaptureFixture
) -> None:
    """If releasing on the way out fails, the block's own error propagates with a note."""
    manager, proxy, _ = await _proxied(store)
    await manager.add_credits(user_id, 100, "purchase")
    proxy.release_failures = 1

    with (
        caplog.at_level(logging.ERROR, logger="ducto.manager"),
        pytest.raises(ProviderError) as info,
    ):
        async with manager.hold(user_id, 20) as hold:
            raise ProviderError("503")

    notes = getattr(info.value, "__notes__", [])
    assert 1 == len(notes)
    assert hold.reservation_id in notes[0]
    assert "connection lost" in notes[0]
    assert any(r.exc_info for r in caplog.records if r.name == "ducto.manager")
    await store.release_reservation(user_id, hold.reservation_id)


async def test_a_failing_resolution_raises_when_there_is_no_error(
    store: CreditStore, user_id: str
) -> None:
    """If releasing after a normal exit fails, that failure is raised."""
    manager, proxy, _ = await _proxied(store)
    await manager.add_credits(user_id, 100, "purchase")
    proxy.release_failures = 1

    with pytest.raises(StoreError, match="connection lost"):
        async with manager.hold(user_id, 20):
            pass


async def test_a_failing_settlement_releases_the_hold(store: CreditStore, user_id: str) -> None:
    """When the store fails the settlement, settle raises, frees the hold, reports it."""
    manager, proxy, recorder = await _proxied(store)
    await manager.add_credits(user_id, 100, "purchase")
    proxy.deduct_failures = 1

    hold = manager.hold(user_id, 20)

    async def call() -> None:
        async with hold:
            hold.record(HALF)
            await hold.settle()

    with pytest.raises(StoreError):
        await call()

    assert (False, True) == (hold.settled, hold.released)
    [failed] = [e for e in recorder.events if e.type == CreditEventType.DEDUCT_FAILED]
    assert (20, "StoreError", hold.reservation_id) == (
        failed.amount,
        failed.error,
        failed.reservation_id,
    )
    balance = await store.get_balance(user_id)
    assert (100, 0) == (balance.balance, balance.reserved)


async def test_a_cancellation_during_settle_lets_it_finish(
    store: CreditStore, user_id: str
) -> None:
    """A timeout that fires while the store settles takes effect once the charge is done."""
    manager, proxy, _ = await _proxied(store)
    await manager.add_credits(user_id, 100, "purchase")
    proxy.deduct_delay = 0.05

    async with manager.hold(user_id, 30) as hold:
        with anyio.move_on_after(0.01) as scope:
            await hold.settle(HALF)
            settled_before_the_cancellation = hold.settled
            await checkpoint()

    assert scope.cancelled_caught is True
    assert settled_before_the_cancellation is True
    balance = await store.get_balance(user_id)
    assert (80, 0) == (balance.balance, balance.reserved)


async def test_a_cancellation_while_placing_the_hold_releases_it(
    store: CreditStore, user_id: str
) -> None:
    """A timeout that fires while the hold is placed frees it, and the block never runs."""
    manager, proxy, recorder = await _proxied(store)
    await manager.add_credits(user_id, 100, "purchase")
    proxy.reserve_delay = 0.05
    ran: list[bool] = []

    with anyio.move_on_after(0.01) as scope:
        async with manager.hold(user_id, 30):
            ran.append(True)

    assert scope.cancelled_caught is True
    assert [] == ran
    assert [CreditEventType.RESERVED, CreditEventType.RELEASED] == recorder.kinds()[1:]
    balance = await store.get_balance(user_id)
    assert (100, 0) == (balance.balance, balance.reserved)


# -- refusals and keys -------------------------------------------------------------------------


async def test_refused_hold_raises_on_entry(manager: CreditManager, user_id: str) -> None:
    """A hold the user cannot afford raises on entry and the block never runs."""
    await manager.add_credits(user_id, 10, "purchase")
    ran: list[bool] = []

    with pytest.raises(InsufficientCreditsError) as info:
        async with manager.hold(user_id, CALL):
            ran.append(True)

    assert [] == ran
    assert (40, 10) == (info.value.needed, info.value.available)


async def test_hold_metadata_model_applies_per_model_caps(
    store: CreditStore, manager: CreditManager, user_id: str
) -> None:
    """A credits estimate with a model in its metadata counts toward that model's cap."""
    await manager.add_credits(user_id, 100, "purchase")
    await store.set_spend_cap(
        SpendCap(user_id=user_id, cap_type="daily", model="gpt-4o", limit=10, action="deny")
    )

    with pytest.raises(SpendCapExceededError) as info:
        async with manager.hold(user_id, 20, metadata={"model": "gpt-4o"}):
            pass
    async with manager.hold(user_id, 20, metadata={"model": "llama"}) as other:
        await other.settle(20)

    assert "gpt-4o" == info.value.model
    assert 80 == (await manager.get_balance(user_id)).balance


async def test_a_retried_request_is_charged_once(
    store: CreditStore, manager: CreditManager, user_id: str
) -> None:
    """The same request id replays the hold and its settlement; different usage conflicts."""
    await manager.add_credits(user_id, 100, "purchase")

    async with manager.hold(user_id, CALL, idempotency_key="req-1") as first:
        await first.settle(HALF)
    async with manager.hold(user_id, CALL, idempotency_key="req-1") as again:
        replay = await again.settle(HALF)
    with pytest.raises(IdempotencyConflictError):
        async with manager.hold(user_id, CALL, idempotency_key="req-1") as changed:
            await changed.settle(CALL)

    assert first.reservation_id == again.reservation_id
    assert replay.idempotent is True
    assert [-20] == [row.amount for row in await usage_rows(store, user_id)]
    balance = await manager.get_balance(user_id)
    assert (80, 0) == (balance.balance, balance.reserved)


async def test_a_request_retried_after_a_released_attempt_is_charged_once(
    store: CreditStore, manager: CreditManager, user_id: str
) -> None:
    """After an attempt failed and released its hold, the retry charges, and only once."""
    await manager.add_credits(user_id, 100, "purchase")

    with pytest.raises(ProviderError):
        async with manager.hold(user_id, CALL, idempotency_key="req-2"):
            raise ProviderError("503")
    async with manager.hold(user_id, CALL, idempotency_key="req-2") as retry:
        charged = await retry.settle(HALF)
    async with manager.hold(user_id, CALL, idempotency_key="req-2") as again:
        replay = await again.settle(HALF)

    assert (False, True) == (charged.idempotent, replay.idempotent)
    assert charged.transaction_id == replay.transaction_id
    assert [-20] == [row.amount for row in await usage_rows(store, user_id)]
    balance = await manager.get_balance(user_id)
    assert (80, 0) == (balance.balance, balance.reserved)


async def test_a_duplicate_attempt_never_releases_the_original_hold(
    store: CreditStore, manager: CreditManager, user_id: str
) -> None:
    """A concurrent duplicate of a request that fails leaves the original's hold alone."""
    await manager.add_credits(user_id, 100, "purchase")
    original = manager.hold(user_id, CALL, idempotency_key="req-3")
    duplicate = manager.hold(user_id, CALL, idempotency_key="req-3")

    async with original:
        with pytest.raises(ProviderError):
            async with duplicate:
                raise ProviderError("503")
        held = await manager.get_balance(user_id)
        result = await original.settle(HALF)

    assert original.reservation_id == duplicate.reservation_id
    assert (40, 20) == (held.reserved, result.charged)
    balance = await manager.get_balance(user_id)
    assert (80, 0) == (balance.balance, balance.reserved)


# -- cancellation at random points -------------------------------------------------------------

CANCEL_AFTER = (0, 1, 2, 3, 5, 8, 13, 21)


async def _cancel_after(scope: anyio.CancelScope, checkpoints: int) -> None:
    for _ in range(checkpoints):
        await checkpoint()
    scope.cancel()


async def _stream(hold: Hold, rng: random.Random) -> None:
    """A simulated streamed model call: chunks with partial usage, perhaps failing."""
    for _ in range(rng.randint(0, 4)):  # waiting for the first token
        await checkpoint()
    if rng.random() < 0.15:
        raise ProviderError("upstream refused the request")
    chunks = rng.randint(1, 6)
    fail_at = rng.randrange(chunks + 3)
    for index in range(chunks):
        for _ in range(rng.randint(0, 2)):
            await checkpoint()
        usage = UsageMetrics(
            model="gpt-4o",
            input_tokens=rng.randint(100, 900) if index == 0 else 0,
            output_tokens=rng.randint(1, 120),
        )
        hold.record(usage)
        if index == fail_at:
            raise ProviderError("stream reset")
    if rng.random() < 0.6:
        await hold.settle()


async def _request(
    manager: CreditManager,
    user_id: str,
    rng: random.Random,
    tg: TaskGroup,
    holds: list[Hold],
    number: int,
) -> None:
    estimate: UsageMetrics | int = (
        UsageMetrics(model="gpt-4o", input_tokens=800, output_tokens=300)
        if rng.random() < 0.5
        else rng.randint(1, 30)
    )
    key = f"{user_id}-{number}" if rng.random() < 0.4 else None
    hold = manager.hold(user_id, estimate, idempotency_key=key)
    holds.append(hold)
    mode = rng.random()
    try:
        if mode < 0.35:
            with anyio.move_on_after(rng.choice([0.0, 1e-6, rng.uniform(0.0, 2e-3)])):
                async with hold:
                    await _stream(hold, rng)
        elif mode < 0.75:
            with anyio.CancelScope() as scope:
                tg.start_soon(_cancel_after, scope, rng.choice(CANCEL_AFTER))
                async with hold:
                    await _stream(hold, rng)
        else:
            async with hold:
                await _stream(hold, rng)
    except ProviderError:
        pass


async def _slow_handler(event: CreditEvent) -> None:
    await checkpoint()
    await checkpoint()


@pytest.mark.parametrize("seed", [11, 2026])
async def test_random_cancellation_never_leaves_a_hold_or_charges_twice(
    store: CreditStore, seed: int
) -> None:
    """Holds cut at random points end settled at their recorded usage or released, once."""
    rng = random.Random(seed)
    events = CreditEventEmitter()
    events.on(None, _slow_handler)
    manager = CreditManager(store, events=events, low_balance_thresholds=[50_000, 1_000])
    await manager.publish_pricing(PRICING)
    users = [f"user-{seed}-{n}-{rng.getrandbits(32):x}" for n in range(4)]
    for user in users:
        await manager.add_credits(user, 100_000, "purchase")
    requests = 160 if type(store).__name__ == "MemoryStore" else 60
    holds: list[Hold] = []

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            for number in range(requests):
                tg.start_soon(_request, manager, rng.choice(users), rng, tg, holds, number)

    outcomes: Counter[str] = Counter()
    expected_rows: dict[str, dict[str, int]] = {user: {} for user in users}
    for hold in holds:
        if not hold.reservation_id:
            outcomes["never placed"] += 1
            assert hold.recorded is None
            continue
        assert hold.settled != hold.released, hold.reservation_id
        if hold.released:
            outcomes["released"] += 1
            assert hold.recorded is None
            continue
        outcomes["settled"] += 1
        assert hold.recorded is not None
        assert hold.result is not None
        assert manager.calculate(hold.recorded).credits == hold.result.charged
        expected_rows[hold.user_id][hold.reservation_id] = hold.result.charged
    assert outcomes["settled"] > 0
    assert outcomes["released"] + outcomes["never placed"] > 0

    for user in users:
        balance = await store.get_balance(user)
        rows = await all_rows(store, user)
        usage = [row for row in rows if row.type == "usage"]
        assert 0 == balance.reserved
        assert len(usage) == len({row.reservation_id for row in usage})
        assert expected_rows[user] == {str(row.reservation_id): -row.amount for row in usage}
        assert 100_000 - sum(expected_rows[user].values()) == balance.balance
        assert balance.balance == sum(row.amount for row in rows)


# -- amounts and usage a store cannot take -----------------------------------------------------

BIG: dict[str, Any] = {"models": {"_default": "input_tokens * 1000"}, "min_balance": 0}
"""Prices 2**62 input tokens far above the 2**62 credits a store accepts."""
HUGE = UsageMetrics(input_tokens=2**62)


async def test_an_amount_no_store_accepts_leaves_the_hold_open(
    store: CreditStore, manager: CreditManager, user_id: str
) -> None:
    """settle(2**62 + 1) raises InvalidArgumentError; the hold stays open for another settle."""
    await manager.add_credits(user_id, 100, "purchase")

    async with manager.hold(user_id, 20) as hold:
        with pytest.raises(InvalidArgumentError, match="actual"):
            await hold.settle(2**62 + 1)
        still_held = (await store.get_balance(user_id)).reserved
        result = await hold.settle(3)

    assert (20, 3) == (still_held, result.charged)
    assert [-3] == [row.amount for row in await usage_rows(store, user_id)]


async def test_usage_priced_above_the_maximum_leaves_the_hold_open(
    store: CreditStore, user_id: str
) -> None:
    """Usage that costs more than 2**62 credits is refused by settle; the hold stays open."""
    manager = CreditManager(store)
    await manager.publish_pricing(BIG)
    await manager.add_credits(user_id, 100, "purchase")

    async with manager.hold(user_id, 20) as hold:
        with pytest.raises(InvalidArgumentError, match="more than a store can charge"):
            await hold.settle(HUGE)
        result = await hold.settle(UsageMetrics(input_tokens=4))

    assert 4000 == manager.calculate(UsageMetrics(input_tokens=4)).credits
    assert (True, 4000) == (hold.settled, result.charged)
    balance = await store.get_balance(user_id)
    assert (100 - 4000, 0) == (balance.balance, balance.reserved)


async def test_a_store_refusing_the_amount_leaves_the_hold_open(
    store: CreditStore, user_id: str
) -> None:
    """A settlement the store refuses as invalid changed nothing, so the hold stays open."""
    manager, proxy, recorder = await _proxied(store)
    await manager.add_credits(user_id, 100, "purchase")
    proxy.deduct_refusals = 1

    async with manager.hold(user_id, 20) as hold:
        with pytest.raises(InvalidArgumentError, match="beyond"):
            await hold.settle(7)
        open_after_refusal = (hold.settled, hold.released)
        result = await hold.settle(7)

    assert (False, False) == open_after_refusal
    assert 7 == result.charged
    assert [] == recorder.of(CreditEventType.DEDUCT_FAILED)
    assert 93 == (await store.get_balance(user_id)).balance


async def test_oversized_usage_is_refused_when_recorded_and_never_free(
    store: CreditStore, user_id: str
) -> None:
    """record() refuses usage that prices above the maximum; leaving charges the estimate."""
    manager = CreditManager(store)
    await manager.publish_pricing(BIG)
    await manager.add_credits(user_id, 100, "purchase")

    async with manager.hold(user_id, 30) as hold:
        hold.record(UsageMetrics(input_tokens=0))
        with pytest.raises(InvalidArgumentError, match="more than a store can charge"):
            hold.record(HUGE)
        recorded = hold.recorded

    assert UsageMetrics(input_tokens=0) == recorded
    assert hold.result is not None
    assert 30 == hold.result.charged
    balance = await store.get_balance(user_id)
    assert (70, 0) == (balance.balance, balance.reserved)


async def test_oversized_usage_alone_is_charged_the_estimate(
    store: CreditStore, user_id: str
) -> None:
    """With nothing else recorded, a refused record still charges the estimate on exit."""
    manager = CreditManager(store)
    await manager.publish_pricing(BIG)
    await manager.add_credits(user_id, 100, "purchase")

    with pytest.raises(InvalidArgumentError):
        async with manager.hold(user_id, 30) as hold:
            hold.record(HUGE)

    assert (True, 30) == (hold.settled, hold.result.charged if hold.result else None)
    assert 0 == (await store.get_balance(user_id)).reserved


async def test_deduct_refuses_usage_priced_above_the_maximum(
    store: CreditStore, user_id: str
) -> None:
    """deduct() refuses usage no store can charge, before anything changes."""
    manager = CreditManager(store)
    await manager.publish_pricing(BIG)
    await manager.add_credits(user_id, 100, "purchase")

    with pytest.raises(InvalidArgumentError, match="more than a store can charge"):
        await manager.deduct(user_id, HUGE)
    with pytest.raises(InvalidArgumentError, match="more than a store can charge"):
        await _enter(manager.hold(user_id, HUGE))

    balance = await store.get_balance(user_id)
    assert (100, 0) == (balance.balance, balance.reserved)
    assert [] == await usage_rows(store, user_id)


async def _enter(hold: Hold) -> None:
    async with hold:
        pass


# -- records that skipped validation -----------------------------------------------------------


async def test_unvalidated_records_are_refused_and_never_leave_a_hold(
    store: CreditStore, manager: CreditManager, user_id: str
) -> None:
    """model_construct-ed usage (NaN, a non-str model) is refused; the hold is resolved."""
    await manager.add_credits(user_id, 100, "purchase")
    nan_count = UsageMetrics.model_construct(model="gpt-4o", input_tokens=float("nan"))
    bad_model = UsageMetrics.model_construct(model=5, input_tokens=10)

    async with manager.hold(user_id, 25) as hold:
        with pytest.raises(InvalidArgumentError, match="input_tokens"):
            hold.record(nan_count)
        with pytest.raises(InvalidArgumentError, match="model"):
            hold.record(bad_model)
        with pytest.raises(InvalidArgumentError, match="input_tokens"):
            await hold.settle(nan_count)

    assert None is hold.recorded
    assert hold.result is not None
    assert 25 == hold.result.charged  # what was used is unknown: never free
    balance = await store.get_balance(user_id)
    assert (75, 0) == (balance.balance, balance.reserved)


async def test_unvalidated_usage_is_refused_everywhere(
    store: CreditStore, manager: CreditManager, user_id: str
) -> None:
    """deduct, hold, deduct_team and calculate validate model_construct-ed usage again."""
    await manager.add_credits(user_id, 100, "purchase")
    bad = UsageMetrics.model_construct(model=5, input_tokens=-3)
    team = await store.create_team("t", 100)
    await store.add_team_member(team.team_id, user_id)

    with pytest.raises(InvalidArgumentError, match="metrics"):
        await manager.deduct(user_id, bad)
    with pytest.raises(InvalidArgumentError, match="estimate"):
        manager.hold(user_id, bad)
    with pytest.raises(InvalidArgumentError, match="usage"):
        await manager.deduct_team(team.team_id, user_id, bad)
    with pytest.raises(InvalidArgumentError, match="metrics"):
        manager.calculate(bad)

    balance = await store.get_balance(user_id)
    assert (100, 0) == (balance.balance, balance.reserved)


# -- low-balance alerts from holds -------------------------------------------------------------


async def test_placing_a_hold_counts_as_a_low_balance_observation(
    store: CreditStore, user_id: str
) -> None:
    """A hold that takes available from 1,000 to 600 crosses 800, once, for a new user."""
    await store.add_credits(user_id, 1000, "purchase")
    recorder = Recorder()
    events = CreditEventEmitter()
    events.on(CreditEventType.LOW_BALANCE, recorder)
    manager = CreditManager(store, events=events, low_balance_thresholds=[800])
    await manager.publish_pricing(PRICING)

    async with manager.hold(user_id, 400) as hold:
        crossed_at_hold = [(e.threshold, e.available) for e in recorder.events]
        await manager.deduct(user_id, UsageMetrics(model="gpt-4o", input_tokens=1000))
        await hold.settle(400)

    assert [(800, 600)] == crossed_at_hold
    assert [(800, 600)] == [(e.threshold, e.available) for e in recorder.events]
    assert 590 == (await store.get_balance(user_id)).available


# -- holds on a team pool ----------------------------------------------------------------------


async def test_a_team_hold_charges_the_pool(
    store: CreditStore, manager: CreditManager, user_id: str, recorder: Recorder
) -> None:
    """hold(team_id=...) holds the pool for a member and settles into a team_usage row."""
    team = await store.create_team("pool", 100)
    await store.add_team_member(team.team_id, user_id)

    async with manager.hold(user_id, CALL, team_id=team.team_id, idempotency_key="t-1") as hold:
        during = await store.get_team_balance(team.team_id)
        hold.record(HALF)

    assert (team.team_id, True) == (hold.team_id, hold.settled)
    assert hold.result is not None
    assert (20, team.team_id) == (hold.result.charged, hold.result.team_id)
    assert (100, 40) == (during.balance, during.reserved)
    pool = await store.get_team_balance(team.team_id)
    assert (80, 0) == (pool.balance, pool.reserved)
    assert 0 == (await store.get_balance(user_id)).balance
    page = await store.list_team_transactions(team.team_id, types=["team_usage"])
    assert [(-20, hold.reservation_id)] == [(r.amount, r.reservation_id) for r in page.items]
    reserved, charged = (e for e in recorder.events if e.user_id == user_id)
    assert (CreditEventType.RESERVED, team.team_id, 40) == (
        reserved.type,
        reserved.team_id,
        reserved.amount,
    )
    assert (CreditEventType.CREDITS_DEDUCTED, team.team_id, 20) == (
        charged.type,
        charged.team_id,
        charged.amount,
    )


async def test_team_holds_are_refused_and_released_like_the_pools_rules(
    store: CreditStore, manager: CreditManager, user_id: str, other_user_id: str, recorder: Recorder
) -> None:
    """Member caps apply when the hold is placed; non-members and overdrafts are refused."""
    team = await store.create_team("capped", 100)
    await store.add_team_member(team.team_id, user_id, spend_cap=50)

    async with manager.hold(user_id, 30, team_id=team.team_id) as first:
        with pytest.raises(SpendCapExceededError):
            async with manager.hold(user_id, 30, team_id=team.team_id):
                pass
        await first.settle(30)
    with pytest.raises(ProviderError):
        async with manager.hold(user_id, 10, team_id=team.team_id) as failed:
            raise ProviderError("503")
    with pytest.raises(UserNotInTeamError):
        async with manager.hold(other_user_id, 5, team_id=team.team_id):
            pass
    await store.add_team_member(team.team_id, other_user_id)
    with pytest.raises(InsufficientTeamBalanceError):
        async with manager.hold(other_user_id, 500, team_id=team.team_id):
            pass

    assert failed.released is True
    pool = await store.get_team_balance(team.team_id)
    assert (70, 0) == (pool.balance, pool.reserved)
    [reached] = recorder.of(CreditEventType.CAP_REACHED)
    assert (user_id, team.team_id, 30) == (reached.user_id, reached.team_id, reached.amount)
