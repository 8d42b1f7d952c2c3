"""OpenTelemetry metrics: event-fed counters, the instrumented store, lapsed holds."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator, Mapping
from datetime import timedelta
from typing import Any

import anyio
import pytest

pytest.importorskip("opentelemetry.sdk", reason="the metrics tests need opentelemetry-sdk")

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader
from tests._manager_support import Recorder
from tests.conftest import FakeClock

import ducto.otel
from ducto import CreditManager, UsageMetrics
from ducto.errors import ErrorCode, InsufficientCreditsError, InvalidArgumentError
from ducto.events import CreditEvent, CreditEventEmitter, CreditEventType
from ducto.interface.base import CreditStore
from ducto.otel import CreditMetrics, InstrumentedStore

pytestmark = pytest.mark.anyio

PRICING: dict[str, Any] = {
    "models": {"gpt-4o": "input_tokens * 0.01 + output_tokens * 0.03", "_default": "0"},
    "plans": {"pro": {"id": "pro", "name": "Pro", "free_allowance": 30}},
    "min_balance": 0,
}
CALL = UsageMetrics(model="gpt-4o", input_tokens=1000, output_tokens=1000)
"""Costs 40 credits under PRICING."""


class Metrics:
    """What an in-memory reader collected, by instrument name and attribute set."""

    def __init__(self, reader: InMemoryMetricReader) -> None:
        self.points: dict[str, list[Any]] = {}
        data = reader.get_metrics_data()
        assert data is not None
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    self.points.setdefault(metric.name, []).extend(metric.data.data_points)

    def _matching(self, name: str, attrs: Mapping[str, str]) -> Iterator[Any]:
        for point in self.points.get(name, []):
            if all(point.attributes.get(k) == v for k, v in attrs.items()):
                yield point

    def total(self, name: str, **attrs: str) -> int:
        """The sum of a counter's points whose attributes include `attrs` (dots as __)."""
        wanted = {k.replace("__", "."): v for k, v in attrs.items()}
        return sum(int(p.value) for p in self._matching(name, wanted))

    def attributes(self, name: str) -> list[dict[str, Any]]:
        """The attribute sets an instrument reported."""
        return [dict(p.attributes) for p in self.points.get(name, [])]

    def calls(self, operation: str, outcome: str | None = None) -> int:
        """How many store calls the duration histogram recorded for `operation`."""
        wanted = {"ducto.operation": operation}
        if outcome is not None:
            wanted["ducto.outcome"] = outcome
        points = list(self._matching("ducto.store.operation.duration", wanted))
        assert all(isinstance(p, HistogramDataPoint) for p in points)
        return sum(p.count for p in points)


@pytest.fixture
def reader() -> InMemoryMetricReader:
    """An SDK reader that keeps what it collects in memory."""
    return InMemoryMetricReader()


@pytest.fixture
def metrics(reader: InMemoryMetricReader) -> CreditMetrics:
    """The ducto instruments on a meter provider read by `reader`."""
    return CreditMetrics(MeterProvider(metric_readers=[reader]))


@pytest.fixture
def instrumented(store: CreditStore, metrics: CreditMetrics, clock: FakeClock) -> CreditStore:
    """The store under test (opened, set up), measured."""
    return metrics.instrument(store, clock=clock)


@pytest.fixture
async def manager(instrumented: CreditStore, metrics: CreditMetrics) -> CreditManager:
    """A manager over the instrumented store whose events feed the metrics."""
    manager = CreditManager(instrumented)
    metrics.attach(manager.events)
    await manager.publish_pricing(PRICING)
    return manager


# -- the module --------------------------------------------------------------------------------


def test_import_ducto_does_not_import_opentelemetry() -> None:
    """`import ducto` (and the store layer) leave OpenTelemetry unimported."""
    code = textwrap.dedent(
        """
        import sys
        import ducto, ducto.interface, ducto.sync, ducto.events
        loaded = sorted(m for m in sys.modules if m.split(".")[0] == "opentelemetry")
        print(",".join(loaded))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )

    assert "" == done.stdout.strip()


def test_public_names() -> None:
    """`ducto.otel.__all__` names what the module defines."""
    assert ["DURATION_BUCKETS", "CreditMetrics", "InstrumentedStore"] == ducto.otel.__all__
    assert all(hasattr(ducto.otel, name) for name in ducto.otel.__all__)


def test_global_meter_provider_is_the_default() -> None:
    """Without a provider, CreditMetrics uses the global one, even one set afterwards."""
    code = textwrap.dedent(
        """
        from opentelemetry import metrics
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from ducto.events import CreditEvent, CreditEventType
        from ducto.otel import CreditMetrics

        credit_metrics = CreditMetrics()  # before the global provider exists
        reader = InMemoryMetricReader()
        metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
        credit_metrics.record_event(
            CreditEvent(type=CreditEventType.CREDITS_REFUNDED, user_id="a", amount=7)
        )
        data = reader.get_metrics_data()
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == "ducto.credits.refunded":
                        print(scope.scope.name, metric.data.data_points[0].value)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )

    assert "ducto 7" == done.stdout.strip()


def test_bad_arguments_are_refused(metrics: CreditMetrics) -> None:
    """Anything but a provider, store, emitter or clock raises, naming the parameter."""
    with pytest.raises(InvalidArgumentError, match="meter_provider"):
        CreditMetrics(object())  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="store"):
        metrics.instrument(object())  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="emitter"):
        metrics.attach(object())  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="clock"):
        InstrumentedStore(ducto.MemoryStore(), metrics, clock=5)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="metrics"):
        InstrumentedStore(ducto.MemoryStore(), object())  # type: ignore[arg-type]


# -- the instrumented store --------------------------------------------------------------------


async def test_wrapper_is_a_store(
    instrumented: CreditStore, store: CreditStore, user_id: str
) -> None:
    """The wrapper matches the protocol, forwards every call and opens the wrapped store."""
    assert isinstance(instrumented, InstrumentedStore)
    assert isinstance(instrumented, CreditStore)
    assert store is instrumented.store
    assert "InstrumentedStore(" in repr(instrumented)
    await instrumented.add_credits(user_id, 50, "purchase")

    assert 50 == (await store.get_balance(user_id)).balance
    assert (await store.get_balance(user_id)) == (await instrumented.get_balance(user_id))


async def test_wrapper_opens_and_closes_the_store(
    anyio_backend: str, metrics: CreditMetrics, reader: InMemoryMetricReader
) -> None:
    """`async with` on the wrapper opens the wrapped store and yields the wrapper."""
    inner = ducto.MemoryStore()
    async with metrics.instrument(inner) as opened:
        assert isinstance(opened, InstrumentedStore)
        await opened.add_credits("alice", 5, "purchase")
        assert 5 == (await inner.get_balance("alice")).balance

    with pytest.raises(ducto.StoreError):
        await inner.get_balance("alice")
    assert 1 == Metrics(reader).calls("add_credits", "ok")


async def test_other_attributes_are_forwarded(
    anyio_backend: str, metrics: CreditMetrics, reader: InMemoryMetricReader
) -> None:
    """A store's own extra methods are forwarded, coroutines measured too."""

    class Extended(ducto.MemoryStore):
        label = "extended"

        async def ping(self) -> str:
            return "pong"

    wrapped = metrics.instrument(Extended())

    assert "extended" == wrapped.label  # type: ignore[attr-defined]
    assert "pong" == await wrapped.ping()  # type: ignore[attr-defined]
    assert 1 == Metrics(reader).calls("ping", "ok")
    with pytest.raises(AttributeError):
        wrapped._private  # type: ignore[attr-defined]  # noqa: B018


async def test_every_call_is_timed_by_operation_and_outcome(
    instrumented: CreditStore, reader: InMemoryMetricReader, user_id: str
) -> None:
    """Each call adds one duration point under its operation and outcome."""
    await instrumented.add_credits(user_id, 100, "purchase")
    await instrumented.add_credits(user_id, 20, "purchase")
    hold = await instrumented.reserve_credits(user_id, 10, "chat")
    await instrumented.deduct_credits(user_id, hold.reservation_id, 8)
    await instrumented.get_balance(user_id)
    refused = await instrumented.reserve_credits(user_id, 10_000, "chat")
    with pytest.raises(InvalidArgumentError):
        await instrumented.add_credits(user_id, 0, "purchase")
    with anyio.CancelScope() as scope:
        scope.cancel()
        await instrumented.get_balance(user_id)
    m = Metrics(reader)

    assert ErrorCode.INSUFFICIENT_CREDITS == refused.error
    assert 2 == m.calls("add_credits", "ok")
    assert 1 == m.calls("add_credits", "error")
    assert 1 == m.calls("reserve_credits", "ok")
    assert 1 == m.calls("reserve_credits", "refused")
    assert 1 == m.calls("deduct_credits", "ok")
    assert 1 == m.calls("get_balance", "ok")
    assert 1 == m.calls("get_balance", "cancelled")
    errors = [
        a for a in m.attributes("ducto.store.operation.duration") if a["ducto.outcome"] == "error"
    ]
    assert [
        {
            "ducto.operation": "add_credits",
            "ducto.outcome": "error",
            "error.type": "InvalidArgumentError",
        }
    ] == errors
    durations = [p.sum for p in m._matching("ducto.store.operation.duration", {})]
    assert all(d >= 0 for d in durations)


async def test_refusals_are_counted_by_code(
    instrumented: CreditStore, reader: InMemoryMetricReader, user_id: str, other_user_id: str
) -> None:
    """Every result with an error adds one refusal under its operation and code."""
    await instrumented.add_credits(user_id, 10, "purchase")
    hold = await instrumented.reserve_credits(user_id, 4, "chat", min_balance=0)
    refusals = [
        await instrumented.reserve_credits(user_id, 50, "chat"),
        await instrumented.reserve_credits(user_id, 50, "chat"),
        await instrumented.deduct_credits(other_user_id, hold.reservation_id, 1),
        await instrumented.refund_credits("tx-that-does-not-exist"),
    ]
    await instrumented.release_reservation(user_id, hold.reservation_id)
    refusals.append(await instrumented.deduct_credits(user_id, hold.reservation_id, 1))
    m = Metrics(reader)

    assert all(not r.ok for r in refusals)
    assert 5 == m.total("ducto.refusals")
    assert 2 == m.total(
        "ducto.refusals",
        ducto__operation="reserve_credits",
        ducto__error__code="insufficient_credits",
    )
    assert 1 == m.total(
        "ducto.refusals",
        ducto__operation="deduct_credits",
        ducto__error__code="reservation_not_found",
    )
    assert 1 == m.total(
        "ducto.refusals",
        ducto__operation="refund_credits",
        ducto__error__code="transaction_not_found",
    )
    assert 1 == m.total(
        "ducto.refusals",
        ducto__operation="deduct_credits",
        ducto__error__code="reservation_released",
    )


async def test_lapsed_holds_are_counted_once(
    instrumented: CreditStore, reader: InMemoryMetricReader, clock: FakeClock, user_id: str
) -> None:
    """Only the hold left open past its TTL counts, once, even if it is settled afterwards."""
    await instrumented.add_credits(user_id, 1000, "purchase")
    settled = await instrumented.reserve_credits(user_id, 10, "chat", ttl=60)
    released = await instrumented.reserve_credits(user_id, 10, "chat", ttl=60)
    left = await instrumented.reserve_credits(user_id, 10, "chat", ttl=60, idempotency_key="k")
    later = await instrumented.reserve_credits(user_id, 10, "chat", ttl=3600)
    await instrumented.deduct_credits(user_id, settled.reservation_id, 10)
    await instrumented.release_reservation(user_id, released.reservation_id)
    replay = await instrumented.reserve_credits(user_id, 10, "chat", ttl=60, idempotency_key="k")
    assert replay.idempotent
    assert left.reservation_id == replay.reservation_id
    before = Metrics(reader).total("ducto.holds.expired")

    clock.advance(59)
    at_59 = Metrics(reader).total("ducto.holds.expired")
    clock.advance(1)
    at_60 = Metrics(reader).total("ducto.holds.expired")
    lapsed_balance = await instrumented.get_balance(user_id)
    await instrumented.deduct_credits(user_id, left.reservation_id, 10)
    clock.advance(60)
    after_settling = Metrics(reader).total("ducto.holds.expired")

    assert (0, 0, 1, 1) == (before, at_59, at_60, after_settling)
    assert later.amount == lapsed_balance.reserved  # the store agrees: only `later` counts
    assert isinstance(instrumented, InstrumentedStore)
    assert 1 == instrumented.open_holds


async def test_lapses_are_noticed_when_placing_holds(
    instrumented: CreditStore,
    metrics: CreditMetrics,
    reader: InMemoryMetricReader,
    clock: FakeClock,
    user_id: str,
) -> None:
    """Placing a hold counts the lapses due by then; many settled holds leave none open."""
    assert isinstance(instrumented, InstrumentedStore)
    await instrumented.add_credits(user_id, 10_000, "purchase")
    for _ in range(150):
        hold = await instrumented.reserve_credits(user_id, 1, "chat", ttl=30)
        await instrumented.deduct_credits(user_id, hold.reservation_id, 1)
    await instrumented.reserve_credits(user_id, 1, "chat", ttl=30)
    await instrumented.reserve_credits(user_id, 1, "chat", ttl=30)
    assert 2 == instrumented.open_holds
    clock.advance(31)
    await instrumented.reserve_credits(user_id, 1, "chat", ttl=30)

    assert 1 == instrumented.open_holds
    assert 0 == instrumented.lapse_holds()
    assert 2 == Metrics(reader).total("ducto.holds.expired")


# -- events ------------------------------------------------------------------------------------


async def test_events_feed_the_credit_counters(
    manager: CreditManager,
    reader: InMemoryMetricReader,
    clock: FakeClock,
    user_id: str,
    other_user_id: str,
) -> None:
    """Grants, charges, allowance, refunds and expiries add what the ledger records."""
    await manager.add_credits(user_id, 1000, "purchase", idempotency_key="pay-1")
    await manager.add_credits(user_id, 1000, "purchase", idempotency_key="pay-1")  # replay
    await manager.add_credits(user_id, 50, "signup_bonus", expires_at=clock.now + timedelta(days=1))
    await manager.add_credits(other_user_id, 200, "purchase")
    await manager.set_user_plan(other_user_id, "pro")
    charged = await manager.deduct(user_id, CALL, idempotency_key="req-1")
    await manager.deduct(user_id, CALL, idempotency_key="req-1")  # replay: no new event
    covered = await manager.deduct(other_user_id, CALL)
    adjustment = await manager.add_credits(user_id, -5, "adjustment")
    refund = await manager.refund_credits(charged.transaction_id, 15)
    clock.advance(days=2)
    sweep = await manager.sweep_expired_credits()
    m = Metrics(reader)

    assert 1000 + 50 + 200 == m.total("ducto.credits.granted")
    assert 1000 + 200 == m.total("ducto.credits.granted", ducto__transaction__type="purchase")
    assert 50 == m.total("ducto.credits.granted", ducto__transaction__type="signup_bonus")
    assert charged.charged + covered.charged == m.total(
        "ducto.credits.charged", ducto__charge__kind="usage"
    )
    assert 40 == charged.charged + charged.allowance_consumed
    assert (10, 30) == (covered.charged, covered.allowance_consumed)
    assert 50 == m.total("ducto.credits.charged", ducto__model="gpt-4o")
    assert 30 == m.total("ducto.allowance.consumed", ducto__model="gpt-4o")
    assert abs(adjustment.amount) == m.total(
        "ducto.credits.charged", ducto__charge__kind="adjustment"
    )
    assert refund.amount == m.total("ducto.credits.refunded")
    assert sweep.expired_amount == m.total("ducto.credits.expired")
    assert 0 < sweep.expired_amount


async def test_hold_lifecycle_counters(
    manager: CreditManager, reader: InMemoryMetricReader, user_id: str
) -> None:
    """hold() blocks are placed, then settled or released; deduct()'s hold is not a hold here."""
    await manager.add_credits(user_id, 1000, "purchase")
    async with manager.hold(user_id, CALL) as hold:
        hold.record(CALL)
    async with manager.hold(user_id, CALL):
        pass
    async with manager.hold(user_id, CALL) as hold:
        await hold.settle(CALL)
    with pytest.raises(InsufficientCreditsError):
        async with manager.hold(user_id, 10_000):
            pass
    await manager.deduct(user_id, CALL)
    m = Metrics(reader)

    assert 3 == m.total("ducto.holds.placed")
    assert 2 == m.total("ducto.holds.settled")
    assert 1 == m.total("ducto.holds.released")
    assert 120 == m.total("ducto.credits.charged")
    assert 1 == m.total(
        "ducto.refusals",
        ducto__operation="reserve_credits",
        ducto__error__code="insufficient_credits",
    )


async def test_failed_charges_are_counted(
    anyio_backend: str, metrics: CreditMetrics, reader: InMemoryMetricReader
) -> None:
    """A settlement that fails reports deduct_failed, counted by error type."""
    from tests._manager_support import ProxyStore

    proxy = ProxyStore(ducto.MemoryStore())
    proxy.deduct_failures = 1
    manager = CreditManager(metrics.instrument(proxy))  # type: ignore[arg-type]
    metrics.attach(manager.events)
    await manager.publish_pricing(PRICING)
    await manager.add_credits("alice", 100, "purchase")
    with pytest.raises(ducto.StoreError):
        async with manager.hold("alice", CALL) as hold:
            await hold.settle(CALL)
    m = Metrics(reader)

    assert 1 == m.total("ducto.charges.failed", error__type="StoreError")
    assert 1 == m.total("ducto.holds.placed")
    assert 0 == m.total("ducto.holds.settled") + m.total("ducto.holds.released")
    assert 1 == m.calls("deduct_credits", "error")


async def test_attach_once_and_detach(
    anyio_backend: str, metrics: CreditMetrics, reader: InMemoryMetricReader
) -> None:
    """Attaching twice counts once; after detach nothing more is counted."""
    emitter = CreditEventEmitter()
    recorder = Recorder()
    emitter.on(None, recorder)
    metrics.attach(emitter)
    metrics.attach(emitter)
    refund = CreditEvent(type=CreditEventType.CREDITS_REFUNDED, user_id="a", amount=3)
    await emitter.emit(refund)
    assert metrics.detach(emitter)
    assert not metrics.detach(emitter)
    await emitter.emit(refund)

    assert 3 == Metrics(reader).total("ducto.credits.refunded")
    assert 2 == len(recorder.events)


async def test_model_attribute_can_be_turned_off(
    anyio_backend: str, reader: InMemoryMetricReader
) -> None:
    """With record_model=False no charge carries the model."""
    metrics = CreditMetrics(MeterProvider(metric_readers=[reader]), record_model=False)
    manager = CreditManager(metrics.instrument(ducto.MemoryStore()))
    metrics.attach(manager.events)
    await manager.publish_pricing(PRICING)
    await manager.add_credits("alice", 100, "purchase")
    await manager.deduct("alice", CALL)
    m = Metrics(reader)

    assert [{"ducto.charge.kind": "usage"}] == m.attributes("ducto.credits.charged")


async def test_one_step_charges_and_team_holds(
    instrumented: CreditStore, reader: InMemoryMetricReader, clock: FakeClock, user_id: str
) -> None:
    """A one-step charge leaves no hold open; a team hold left open lapses like a user's."""
    assert isinstance(instrumented, InstrumentedStore)
    await instrumented.add_credits(user_id, 100, "purchase")
    charge = await instrumented.charge_credits(user_id, 10, "pdf_export")
    team = await instrumented.create_team("research", initial_balance=100)
    await instrumented.add_team_member(team.team_id, user_id)
    settled = await instrumented.reserve_team_credits(team.team_id, user_id, 10, "chat", ttl=60)
    left = await instrumented.reserve_team_credits(team.team_id, user_id, 10, "chat", ttl=60)
    await instrumented.deduct_credits(user_id, settled.reservation_id, 5, team_id=team.team_id)
    assert 1 == instrumented.open_holds
    clock.advance(60)
    m = Metrics(reader)

    assert charge.ok
    assert left.ok
    assert 0 == instrumented.open_holds
    assert 1 == m.total("ducto.holds.expired")
    assert 1 == m.calls("charge_credits", "ok")
    assert 2 == m.calls("reserve_team_credits", "ok")
