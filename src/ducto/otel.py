"""
OpenTelemetry metrics for ducto: credits, holds, refusals and store latency.

Needs the ``otel`` extra (``pip install "ducto[otel]"``), which brings only
``opentelemetry-api``; the application chooses and configures the SDK and its exporters.
``import ducto`` never imports OpenTelemetry: only ``import ducto.otel`` does.

Two sources feed the figures:

- **Events.** `CreditMetrics.attach` registers handlers on a `CreditEventEmitter`, the one
  a `CreditManager` reports to. Credits granted, charged, refunded and expired, allowance
  consumed, holds placed, settled and released, and failed charges are counted from the
  events, so they cover what goes through the manager.
- **The store.** `CreditMetrics.instrument` wraps any `CreditStore` in an
  `InstrumentedStore`, which forwards every call and times it (a histogram per operation,
  with its outcome), counts refusals by error code from each result's ``error``, and counts
  holds that lapse by their TTL.

```python
from ducto import CreditManager
from ducto.interface import open_store
from ducto.otel import CreditMetrics

metrics = CreditMetrics()  # the global meter provider, or CreditMetrics(meter_provider=...)
manager = CreditManager(metrics.instrument(open_store("sqlite:///billing.db")))
metrics.attach(manager.events)
```

Every instrument lives on the meter named ``ducto``.
"""

from __future__ import annotations

import heapq
import inspect
import threading
import weakref
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import UTC, datetime
from time import perf_counter
from types import TracebackType
from typing import Any, Final, Self

import anyio

from ducto._shown import shown
from ducto.errors import ErrorCode, InvalidArgumentError
from ducto.events import CreditEvent, CreditEventEmitter, CreditEventType
from ducto.interface.base import CreditStore
from ducto.interface.models import DeductionResult, ReleaseResult, ReserveResult

try:
    from opentelemetry import metrics as otel_metrics
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("ducto.otel needs OpenTelemetry: pip install 'ducto[otel]'") from exc

__all__ = ["DURATION_BUCKETS", "CreditMetrics", "InstrumentedStore"]

DURATION_BUCKETS: Final[tuple[float, ...]] = (
    0.00001,
    0.000025,
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
"""Histogram bucket bounds, in seconds, advised for ``ducto.store.operation.duration``.

They span 10 µs (an in-memory call) to 10 s (a store stuck behind a lock).
"""

_OPERATION: Final = "ducto.operation"
_OUTCOME: Final = "ducto.outcome"
_ERROR_CODE: Final = "ducto.error.code"
_ERROR_TYPE: Final = "error.type"
_TRANSACTION_TYPE: Final = "ducto.transaction.type"
_CHARGE_KIND: Final = "ducto.charge.kind"
_MODEL: Final = "ducto.model"

_COUNTED_EVENTS: Final = (
    CreditEventType.CREDITS_ADDED,
    CreditEventType.CREDITS_DEDUCTED,
    CreditEventType.CREDITS_REFUNDED,
    CreditEventType.CREDITS_EXPIRED,
    CreditEventType.RESERVED,
    CreditEventType.RELEASED,
    CreditEventType.DEDUCT_FAILED,
)
"""The event types `CreditMetrics.attach` listens to; others cost nothing to skip."""

_SETTLE_RESOLVED: Final = frozenset(
    {None, ErrorCode.RESERVATION_ALREADY_SETTLED, ErrorCode.RESERVATION_RELEASED}
)
"""``deduct_credits`` outcomes after which the hold is no longer open."""
_RELEASE_RESOLVED: Final = frozenset({None, ErrorCode.RESERVATION_ALREADY_SETTLED})
"""``release_reservation`` outcomes after which the hold is no longer open."""

_EVENT_HOLDS: Final = 100_000
"""Most placed-but-unresolved holds `CreditMetrics` remembers to match their settlement."""

_Attributes = Mapping[str, str]


def _utc_now() -> datetime:
    return datetime.now(UTC)


class CreditMetrics:
    """
    The ducto instruments on one meter, fed by event emitters and instrumented stores.

    One `CreditMetrics` can serve several emitters and stores, on any event loop: it holds
    no event-loop objects. Build it once per meter provider (each construction registers the
    instruments again on the provider's ``ducto`` meter).

    Instruments, with their unit and attributes (see the metrics page of the documentation
    for what each one counts exactly):

    - ``ducto.credits.granted`` (``{credit}``): ``credits_added`` events
      [``ducto.transaction.type``].
    - ``ducto.credits.charged`` (``{credit}``): ``credits_deducted`` events, the credits the
      balance paid [``ducto.charge.kind``: ``usage``, ``team`` or ``adjustment``;
      ``ducto.model``].
    - ``ducto.allowance.consumed`` (``{credit}``): usage the plan allowance covered, from
      ``credits_deducted`` events [``ducto.model``].
    - ``ducto.credits.refunded``, ``ducto.credits.expired`` (``{credit}``):
      ``credits_refunded`` and ``credits_expired`` events.
    - ``ducto.holds.placed``, ``ducto.holds.released`` (``{hold}``): ``reserved`` and
      ``released`` events.
    - ``ducto.holds.settled`` (``{hold}``): ``credits_deducted`` events that settle a hold
      counted in ``ducto.holds.placed``.
    - ``ducto.charges.failed`` (``{charge}``): ``deduct_failed`` events [``error.type``].
    - ``ducto.holds.expired`` (``{hold}``, observable): holds placed through an instrumented
      store that lapsed by their TTL while open.
    - ``ducto.refusals`` (``{refusal}``): instrumented store results with an ``error``
      [``ducto.operation``, ``ducto.error.code``].
    - ``ducto.store.operation.duration`` (``s``, histogram): instrumented store calls
      [``ducto.operation``, ``ducto.outcome``, ``error.type``].
    """

    def __init__(
        self,
        meter_provider: otel_metrics.MeterProvider | None = None,
        *,
        record_model: bool = True,
    ) -> None:
        """
        Create the instruments.

        Args:
            meter_provider: Where the instruments live; the global meter provider
                (``opentelemetry.metrics.get_meter_provider()``) when None. A global
                provider configured later is used from then on, as the OpenTelemetry API
                arranges.
            record_model: Put the model named by a charge in the ``ducto.model`` attribute.
                Turn it off when callers choose model names freely, which would give the
                charge counters one series per name.

        Raises:
            InvalidArgumentError: `meter_provider` is not a meter provider.
        """
        if meter_provider is None:
            meter_provider = otel_metrics.get_meter_provider()
        if not callable(getattr(meter_provider, "get_meter", None)):
            raise InvalidArgumentError(
                "meter_provider must be an OpenTelemetry MeterProvider,"
                f" got {shown(meter_provider)}"
            )
        from ducto import __version__

        self.record_model = bool(record_model)
        meter = meter_provider.get_meter("ducto", __version__)
        self.meter: otel_metrics.Meter = meter
        """The ``ducto`` meter the instruments were created on."""
        self._granted = meter.create_counter(
            "ducto.credits.granted", "{credit}", "Credits granted (purchases, bonuses, ...)."
        )
        self._charged = meter.create_counter(
            "ducto.credits.charged", "{credit}", "Credits the balance paid for usage."
        )
        self._allowance = meter.create_counter(
            "ducto.allowance.consumed", "{credit}", "Usage covered by the plan allowance."
        )
        self._refunded = meter.create_counter(
            "ducto.credits.refunded", "{credit}", "Credits refunded."
        )
        self._expired = meter.create_counter(
            "ducto.credits.expired", "{credit}", "Expired credits written off by sweeps."
        )
        self._placed = meter.create_counter("ducto.holds.placed", "{hold}", "Holds placed.")
        self._settled = meter.create_counter("ducto.holds.settled", "{hold}", "Holds settled.")
        self._released = meter.create_counter(
            "ducto.holds.released", "{hold}", "Holds released without a charge."
        )
        self._failed = meter.create_counter(
            "ducto.charges.failed", "{charge}", "Charges that failed after their hold."
        )
        self._refusals = meter.create_counter(
            "ducto.refusals", "{refusal}", "Store results refused with an error code."
        )
        self._duration = meter.create_histogram(
            "ducto.store.operation.duration",
            "s",
            "Duration of store operations.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self._lock = threading.Lock()
        self._expired_holds = 0
        self._stores: weakref.WeakSet[InstrumentedStore] = weakref.WeakSet()
        meter.create_observable_counter(
            "ducto.holds.expired",
            [self._observe_expired_holds],
            "{hold}",
            "Holds that lapsed by their TTL while open.",
        )
        self._attrs: dict[tuple[str, ...], _Attributes] = {}
        # Holds counted as placed and not yet settled, released or failed (insertion order,
        # so the oldest go first should a caller never resolve its holds).
        self._event_holds: dict[str, None] = {}

    # -- events ------------------------------------------------------------------------------

    def attach(self, emitter: CreditEventEmitter) -> None:
        """
        Count the events `emitter` delivers from now on.

        The handler is registered for the counted event types only, so the others still cost
        nothing. Attaching twice to one emitter counts once.

        Args:
            emitter: Usually ``manager.events``.

        Raises:
            InvalidArgumentError: `emitter` is not a `CreditEventEmitter`.
        """
        if not isinstance(emitter, CreditEventEmitter):
            raise InvalidArgumentError(
                f"emitter must be a CreditEventEmitter, got {shown(emitter)}"
            )
        for kind in _COUNTED_EVENTS:
            emitter.on(kind, self.record_event)

    def detach(self, emitter: CreditEventEmitter) -> bool:
        """
        Stop counting `emitter`'s events.

        Args:
            emitter: An emitter passed to `attach`.

        Returns:
            True when the handlers were registered and are now removed.
        """
        removed = False
        for kind in _COUNTED_EVENTS:
            removed = emitter.off(kind, self.record_event) or removed
        return removed

    def record_event(self, event: CreditEvent) -> None:
        """
        Count one event (the handler `attach` registers).

        Args:
            event: The event; types this class does not count are ignored.
        """
        kind = event.type
        # Event amounts are magnitudes; abs() keeps a counter monotonic whatever sign a
        # charge's amount is reported with.
        amount = abs(event.amount)
        meta = event.metadata
        if kind is CreditEventType.CREDITS_DEDUCTED:
            model = meta.get("model") if self.record_model else None
            if event.team_id is not None:
                charge = "team"
            elif event.reservation_id is not None:
                charge = "usage"
            else:
                charge = str(meta.get("transaction_type", "adjustment"))
            self._charged.add(amount, self._charge_attrs(charge, model))
            allowance = meta.get("allowance_consumed")
            if type(allowance) is int and allowance > 0:
                self._allowance.add(allowance, self._model_attrs(model))
            if self._close_hold(event.reservation_id):
                self._settled.add(1)
        elif kind is CreditEventType.CREDITS_ADDED:
            kind_of = str(meta.get("transaction_type", "adjustment"))
            self._granted.add(amount, self._cached((_TRANSACTION_TYPE, kind_of)))
        elif kind is CreditEventType.CREDITS_REFUNDED:
            self._refunded.add(amount)
        elif kind is CreditEventType.CREDITS_EXPIRED:
            self._expired.add(amount)
        elif kind is CreditEventType.RESERVED:
            self._placed.add(1)
            if event.reservation_id is not None:
                with self._lock:
                    holds = self._event_holds
                    holds[event.reservation_id] = None
                    if len(holds) > _EVENT_HOLDS:
                        del holds[next(iter(holds))]
        elif kind is CreditEventType.RELEASED:
            self._close_hold(event.reservation_id)
            self._released.add(1)
        elif kind is CreditEventType.DEDUCT_FAILED:
            self._close_hold(event.reservation_id)
            self._failed.add(1, self._cached((_ERROR_TYPE, event.error or "unknown")))

    def _close_hold(self, reservation_id: str | None) -> bool:
        """Forget a hold counted as placed; True when it was one."""
        if reservation_id is None:
            return False
        with self._lock:
            return self._event_holds.pop(reservation_id, False) is None

    # -- stores ------------------------------------------------------------------------------

    def instrument(
        self, store: CreditStore, *, clock: Callable[[], datetime] | None = None
    ) -> CreditStore:
        """
        Wrap `store` so its calls are timed and its refusals and lapsed holds counted.

        Use the returned store everywhere in place of `store` (open it, pass it to
        `CreditManager`); calls made on `store` directly are not measured.

        Args:
            store: Any `CreditStore`, opened or not.
            clock: Returns the aware current time; used to tell when holds lapse, so pass
                the store's own clock when it has one other than the wall clock.

        Returns:
            An `InstrumentedStore`.
        """
        return InstrumentedStore(store, self, clock=clock)

    def _observe_expired_holds(
        self, options: otel_metrics.CallbackOptions
    ) -> Iterable[otel_metrics.Observation]:
        for store in list(self._stores):
            store.lapse_holds()
        with self._lock:
            total = self._expired_holds
        return [otel_metrics.Observation(total)]

    def _count_expired_holds(self, count: int) -> None:
        with self._lock:
            self._expired_holds += count

    def _record_call(
        self, operation: str, started: float, outcome: str, error: str | None = None
    ) -> None:
        elapsed = perf_counter() - started
        if error is None:
            attrs = self._cached((_OPERATION, operation), (_OUTCOME, outcome))
        else:
            attrs = self._cached((_OPERATION, operation), (_OUTCOME, outcome), (_ERROR_TYPE, error))
        self._duration.record(elapsed, attrs)

    def _record_refusal(self, operation: str, code: str) -> None:
        self._refusals.add(1, self._cached((_OPERATION, operation), (_ERROR_CODE, code)))

    # -- attributes --------------------------------------------------------------------------

    def _cached(self, *pairs: tuple[str, str]) -> _Attributes:
        """One shared attribute mapping per distinct set of pairs (no dict per call)."""
        key = tuple(value for pair in pairs for value in pair)
        attrs = self._attrs.get(key)
        if attrs is None:
            attrs = self._attrs.setdefault(key, dict(pairs))
        return attrs

    def _charge_attrs(self, charge: str, model: object) -> _Attributes:
        if isinstance(model, str):
            return self._cached((_CHARGE_KIND, charge), (_MODEL, model))
        return self._cached((_CHARGE_KIND, charge))

    def _model_attrs(self, model: object) -> _Attributes:
        if isinstance(model, str):
            return self._cached((_MODEL, model))
        return self._cached()


class InstrumentedStore:
    """
    A `CreditStore` that forwards every call to another store, measuring it.

    Made by `CreditMetrics.instrument`. It has every method of the `CreditStore` protocol
    (and forwards any other attribute of the wrapped store unchanged). Each protocol call:

    - is timed into ``ducto.store.operation.duration`` with ``ducto.operation`` (the method
      name) and ``ducto.outcome``: ``ok``; ``refused`` when the result carries an
      ``error``; ``error`` when the call raised (``error.type`` names the exception class);
      ``cancelled`` when it raised the event loop's cancellation exception;
    - adds one to ``ducto.refusals`` for a refused result, with ``ducto.error.code``;
    - keeps track of the holds it placed, for ``ducto.holds.expired``.

    **Expired holds.** A hold that reaches its TTL stops counting, silently: the stores
    report no event for it. What can be known for sure is narrower: a hold placed through this
    object, and neither settled nor released through it, was open when its ``expires_at``
    passed. That is what is counted, once per hold, as soon as this object notices (on its
    next hold placement, or when the metrics are collected). A hold settled or released by
    another process or through another store object looks open from here and is counted when
    its TTL passes; a lapsed hold settled later (the work happened) is counted as expired and
    then as settled. Holds replayed by an idempotency key are not tracked again.

    Opening it (``async with``) opens the wrapped store and returns the instrumented one.
    """

    def __init__(
        self,
        store: CreditStore,
        metrics: CreditMetrics,
        *,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        """
        Wrap `store`; does no I/O.

        Args:
            store: The store to forward to.
            metrics: Where the measurements go.
            clock: Returns the aware current time, to tell when holds lapse; the wall clock
                when None.

        Raises:
            InvalidArgumentError: `store` is not a `CreditStore`, or `metrics` is not a
                `CreditMetrics`.
        """
        missing = [name for name in _PROTOCOL_METHODS if not callable(getattr(store, name, None))]
        if missing:
            raise InvalidArgumentError(
                f"store must be a CreditStore, got {shown(store)} (no {', '.join(missing[:3])})"
            )
        if not isinstance(metrics, CreditMetrics):
            raise InvalidArgumentError(f"metrics must be a CreditMetrics, got {shown(metrics)}")
        if clock is not None and not callable(clock):
            raise InvalidArgumentError(f"clock must be callable, got {shown(clock)}")
        self._store = store
        self._metrics = metrics
        self._clock = clock or _utc_now
        self._lock = threading.Lock()
        # Open holds placed through this object: id -> expires_at, plus a heap by expiry
        # whose entries for holds no longer open are skipped (and compacted away).
        self._open: dict[str, datetime] = {}
        self._heap: list[tuple[datetime, str]] = []
        metrics._stores.add(self)

    @property
    def store(self) -> CreditStore:
        """The wrapped store."""
        return self._store

    @property
    def open_holds(self) -> int:
        """Holds placed through this object and not yet settled, released or lapsed."""
        return len(self._open)

    async def __aenter__(self) -> Self:
        """Open the wrapped store."""
        await self._store.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the wrapped store."""
        await self._store.__aexit__(exc_type, exc, tb)

    def __getattr__(self, name: str) -> Any:
        """Forward any other attribute; coroutine methods are measured too."""
        if name.startswith("_"):
            raise AttributeError(name)
        value = getattr(self._store, name)
        if inspect.iscoroutinefunction(value):
            operation = name

            async def measured(*args: Any, **kwargs: Any) -> Any:
                return await self._call(operation, value, args, kwargs)

            return measured
        return value

    def __repr__(self) -> str:
        return f"InstrumentedStore({self._store!r})"

    async def _call(
        self,
        operation: str,
        method: Callable[..., Awaitable[Any]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        metrics = self._metrics
        started = perf_counter()
        try:
            result = await method(*args, **kwargs)
        except BaseException as exc:
            cancelled = isinstance(exc, anyio.get_cancelled_exc_class())
            metrics._record_call(
                operation, started, "cancelled" if cancelled else "error", type(exc).__name__
            )
            raise
        error = getattr(result, "error", None)
        if isinstance(error, str):
            metrics._record_call(operation, started, "refused")
            metrics._record_refusal(operation, str(error))
        else:
            metrics._record_call(operation, started, "ok")
        if isinstance(result, ReserveResult):
            if error is None and not result.idempotent and result.expires_at is not None:
                self._track(result.reservation_id, result.expires_at)
        elif isinstance(result, DeductionResult):
            if error in _SETTLE_RESOLVED:
                self._untrack(result.reservation_id or _reservation_arg(args, kwargs))
        elif isinstance(result, ReleaseResult) and error in _RELEASE_RESOLVED:
            self._untrack(result.reservation_id or _reservation_arg(args, kwargs))
        return result

    # -- hold tracking -----------------------------------------------------------------------

    def _track(self, reservation_id: str, expires_at: datetime) -> None:
        now = self._clock()
        with self._lock:
            self._open[reservation_id] = expires_at
            heap = self._heap
            heapq.heappush(heap, (expires_at, reservation_id))
            lapsed = self._pop_lapsed(now)
            if len(heap) > 64 and len(heap) > 2 * len(self._open):
                # Settled and released holds crowd the heap: keep the open ones only.
                self._heap = [(at, rid) for rid, at in self._open.items()]
                heapq.heapify(self._heap)
        if lapsed:
            self._metrics._count_expired_holds(lapsed)

    def _untrack(self, reservation_id: str) -> None:
        with self._lock:
            self._open.pop(reservation_id, None)

    def _pop_lapsed(self, now: datetime) -> int:
        """Drop the open holds whose TTL passed by `now`; return how many. Lock held."""
        heap, open_holds, lapsed = self._heap, self._open, 0
        while heap and heap[0][0] <= now:
            expires_at, reservation_id = heapq.heappop(heap)
            if open_holds.get(reservation_id) == expires_at:
                del open_holds[reservation_id]
                lapsed += 1
        return lapsed

    def lapse_holds(self) -> int:
        """
        Count the tracked holds whose TTL has passed (collection does this by itself).

        Returns:
            How many holds were found lapsed by this call.
        """
        now = self._clock()
        with self._lock:
            lapsed = self._pop_lapsed(now)
        if lapsed:
            self._metrics._count_expired_holds(lapsed)
        return lapsed


def _reservation_arg(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """The reservation id of a ``(user_id, reservation_id, ...)`` call."""
    if len(args) > 1:
        return str(args[1])
    return str(kwargs.get("reservation_id", ""))


def _measured(name: str) -> Callable[..., Awaitable[Any]]:
    async def method(self: InstrumentedStore, /, *args: Any, **kwargs: Any) -> Any:
        return await self._call(name, getattr(self._store, name), args, kwargs)

    method.__name__ = name
    method.__qualname__ = f"InstrumentedStore.{name}"
    method.__doc__ = getattr(CreditStore, name).__doc__
    return method


_PROTOCOL_METHODS: Final = tuple(
    name
    for name, value in vars(CreditStore).items()
    if not name.startswith("_") and inspect.iscoroutinefunction(value)
)
"""Every public coroutine method of the `CreditStore` protocol."""

# Defined on the class, so the wrapper grows with the protocol and
# ``isinstance(wrapper, CreditStore)`` holds (it inspects the class, not __getattr__).
for _name in _PROTOCOL_METHODS:
    setattr(InstrumentedStore, _name, _measured(_name))
del _name
