"""The blocking facades: the store and manager APIs from plain synchronous code and threads."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import pytest

from ducto import CreditManager, Hold, MemoryStore, UsageMetrics
from ducto._syncgen import generate, same_code, sync_module_path
from ducto._syncgen import main as syncgen_main
from ducto.errors import InsufficientCreditsError, InvalidArgumentError, StoreError
from ducto.events import CreditEvent, CreditEventEmitter, CreditEventType
from ducto.interface.base import CreditStore
from ducto.interface.models import (
    AddCreditsResult,
    BalanceResult,
    CreditMetadata,
    DeductionResult,
    PlanDefinition,
    ReserveResult,
)
from ducto.sync import SyncCreditManager, SyncCreditStore, SyncHold

PRICING: dict[str, Any] = {
    "models": {"gpt-4o": "input_tokens * 0.01 + output_tokens * 0.03", "_default": "0"},
    "min_balance": 0,
}
CALL = UsageMetrics(model="gpt-4o", input_tokens=1000, output_tokens=1000)
"""Costs 40 credits."""


def _sqlite(tmp_path: Path) -> CreditStore:
    from ducto.interface.sqlite import SQLiteStore

    return SQLiteStore(tmp_path / "sync.db", synchronous="NORMAL")


@pytest.fixture(params=["memory", "sqlite"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], CreditStore]:
    """Builds a fresh, unopened store of each kind."""
    if request.param == "memory":
        return MemoryStore
    pytest.importorskip("aiosqlite")
    return lambda: _sqlite(tmp_path)


@pytest.fixture(params=["asyncio", "trio"])
def backend(request: pytest.FixtureRequest) -> str:
    """The event loop the facade runs."""
    return str(request.param)


# -- SyncCreditStore ---------------------------------------------------------------------------


def test_store_facade_runs_the_store_api(
    make_store: Callable[[], CreditStore], backend: Any
) -> None:
    """Grants, holds, settlements and reads work without await and return the same models."""
    with SyncCreditStore(make_store(), backend=backend) as store:
        store.setup()
        store.add_credits("alice", 100, "purchase", idempotency_key="pay-1")
        hold = store.reserve_credits("alice", 30, "chat", min_balance=0)
        done = store.deduct_credits("alice", hold.reservation_id, 25)
        balance = store.get_balance("alice")
        page = store.list_transactions("alice")

    assert isinstance(done, DeductionResult)
    assert isinstance(balance, BalanceResult)
    assert (75, 0, 75) == (balance.balance, balance.reserved, done.balance_after)
    assert ["usage", "purchase"] == [row.type for row in page.items]


def test_store_facade_closes_the_store(backend: Any) -> None:
    """Leaving the block closes the store and the loop; later calls raise StoreError."""
    inner = MemoryStore()
    with SyncCreditStore(inner, backend=backend) as store:
        store.add_credits("alice", 5, "purchase")

    with pytest.raises(StoreError, match="closed"):
        store.get_balance("alice")
    with pytest.raises(StoreError):
        anyio.run(inner.get_balance, "alice")
    store.close()  # closing twice is harmless


def test_store_facade_from_url(tmp_path: Path, backend: Any) -> None:
    """from_url opens the store a URL names."""
    pytest.importorskip("aiosqlite")
    url = f"sqlite:///{tmp_path / 'from-url.db'}"

    with SyncCreditStore.from_url(url, backend=backend) as store:
        store.setup()
        store.add_credits("bob", 12, "purchase")
    with SyncCreditStore.from_url(url, backend=backend) as reopened:
        balance = reopened.get_balance("bob")

    assert 12 == balance.balance


def test_open_and_close_without_a_block() -> None:
    """open() and close() do what the with block does; opening twice raises."""
    store = SyncCreditStore(MemoryStore()).open()
    try:
        with pytest.raises(InvalidArgumentError, match="open already"):
            store.open()
        store.add_credits("carol", 3, "purchase")
        balance = store.get_balance("carol")
    finally:
        store.close()

    assert 3 == balance.balance


def test_calls_before_opening_and_bad_backends_raise() -> None:
    """A facade that is not open raises StoreError; an unknown backend is refused."""
    store = SyncCreditStore(MemoryStore())

    with pytest.raises(StoreError, match="closed"):
        store.get_balance("dave")
    with pytest.raises(InvalidArgumentError, match="backend"):
        SyncCreditStore(MemoryStore(), backend="curio")  # type: ignore[arg-type]


def test_store_facade_from_many_threads(
    make_store: Callable[[], CreditStore], backend: Any
) -> None:
    """Eight threads sharing one facade hold and settle without losing a credit."""
    users = [f"user-{n}" for n in range(4)]
    with SyncCreditStore(make_store(), backend=backend) as store:
        store.setup()
        for user in users:
            store.add_credits(user, 1000, "purchase")

        def work(n: int) -> int:
            user = users[n % len(users)]
            hold = store.reserve_credits(user, 5, "chat", min_balance=0)
            return store.deduct_credits(user, hold.reservation_id, 3).charged

        with ThreadPoolExecutor(max_workers=8) as pool:
            charged = list(pool.map(work, range(200)))
        balances = [store.get_balance(user) for user in users]

    assert [3] * 200 == charged
    assert [(1000 - 150, 0)] * 4 == [(b.balance, b.reserved) for b in balances]


# -- SyncCreditManager -------------------------------------------------------------------------


def test_manager_facade_prices_and_charges(
    make_store: Callable[[], CreditStore], backend: Any
) -> None:
    """Pricing, grants, charges, holds and typed errors work from synchronous code."""
    seen: list[tuple[CreditEventType, str | None]] = []
    events = CreditEventEmitter()
    events.on(None, lambda e: seen.append((e.type, threading.current_thread().name)))
    manager = CreditManager(make_store(), events=events)

    with SyncCreditManager(manager, backend=backend) as billing:
        billing.store.setup()
        billing.publish_pricing(PRICING, label="sync")
        billing.add_credits("alice", 100, "purchase")
        charged = billing.deduct("alice", CALL, "req-1")
        replayed = billing.deduct("alice", CALL, "req-1")
        with billing.hold("alice", CALL) as hold:
            hold.record(UsageMetrics(model="gpt-4o", input_tokens=500))
            settled = hold.settle()
        with pytest.raises(InsufficientCreditsError):
            billing.deduct("alice", CALL + CALL)
        balance = billing.get_balance("alice")
        price = billing.calculate(CALL).credits
        history = billing.store.get_pricing_history()

    assert (40, True, 5) == (charged.charged, replayed.idempotent, settled.charged)
    assert (55, 0) == (balance.balance, balance.reserved)
    assert 40 == price
    assert ["sync"] == [item.label for item in history]
    assert (hold.settled, hold.result) == (True, settled)
    assert {CreditEventType.CREDITS_ADDED, CreditEventType.RESERVED} <= {k for k, _ in seen}
    assert threading.current_thread().name not in {name for _, name in seen}


def test_sync_hold_releases_when_the_block_raises(backend: Any) -> None:
    """An exception in a synchronous hold block releases the hold and propagates."""
    with SyncCreditManager(CreditManager(MemoryStore()), backend=backend) as billing:
        billing.publish_pricing(PRICING)
        billing.add_credits("alice", 100, "purchase")
        hold = billing.hold("alice", 30)

        def call() -> None:
            with hold:
                raise TimeoutError("upstream timed out")

        with pytest.raises(TimeoutError):
            call()
        balance = billing.get_balance("alice")

    assert hold.released is True
    assert (100, 0) == (balance.balance, balance.reserved)


def test_manager_facade_from_many_threads(
    make_store: Callable[[], CreditStore], backend: Any
) -> None:
    """Threads charging at once, some repeating a request id, charge each request once."""
    low: list[CreditEvent] = []
    events = CreditEventEmitter()
    events.on(CreditEventType.LOW_BALANCE, low.append)
    manager = CreditManager(make_store(), events=events, low_balance_thresholds=[500])
    with SyncCreditManager(manager, backend=backend) as billing:
        billing.store.setup()
        billing.publish_pricing(PRICING)
        billing.add_credits("alice", 1600, "purchase")

        def work(n: int) -> str:
            return billing.deduct("alice", CALL, idempotency_key=f"req-{n // 2}").transaction_id

        with ThreadPoolExecutor(max_workers=8) as pool:
            transactions = list(pool.map(work, range(60)))
        balance = billing.get_balance("alice")

    assert 30 == len(set(transactions))
    assert (1600 - 30 * 40, 0) == (balance.balance, balance.reserved)
    assert [500] == [e.threshold for e in low]


def test_shared_store_facade_cannot_be_opened_alone() -> None:
    """The manager facade's store shares its loop, so it is opened and closed with it."""
    billing = SyncCreditManager(CreditManager(MemoryStore()))

    with pytest.raises(InvalidArgumentError, match="shares"):
        billing.store.open()
    billing.store.close()  # a no-op for a shared facade


# -- the generated methods ---------------------------------------------------------------------


def test_generated_methods_are_in_step_with_what_they_wrap() -> None:
    """Regenerating sync.py from the current signatures changes nothing (else: make sync)."""
    path = sync_module_path()
    text = path.read_text(encoding="utf-8")

    assert same_code(generate(text), text), "src/ducto/sync.py is stale: run 'make sync'"


def test_a_changed_signature_makes_the_facade_stale(monkeypatch: pytest.MonkeyPatch) -> None:
    """A new keyword on a store method, or a new store method, shows up as drift."""
    text = sync_module_path().read_text(encoding="utf-8")

    async def add_credits(
        self: CreditStore,
        user_id: str,
        amount: int,
        type: str = "adjustment",
        metadata: CreditMetadata | None = None,
        expires_at: datetime | None = None,
        *,
        idempotency_key: str | None = None,
        note: str | None = None,
    ) -> AddCreditsResult:
        raise NotImplementedError

    async def reserve_later(self: CreditStore, user_id: str, *, days: int = 1) -> ReserveResult:
        raise NotImplementedError

    async def get_plan_definition(self: CreditStore, plan_id: str) -> PlanDefinition:
        raise NotImplementedError

    monkeypatch.setattr(CreditStore, "add_credits", add_credits)
    monkeypatch.setattr(CreditStore, "reserve_later", reserve_later, raising=False)
    monkeypatch.setattr(CreditStore, "get_plan_definition", get_plan_definition, raising=False)
    fresh = generate(text)
    imports = fresh[: fresh.index("__all__")]

    assert not same_code(fresh, text)
    assert "*, idempotency_key: str | None = None, note: str | None = None)" in fresh
    assert "expires_at, idempotency_key=idempotency_key, note=note)" in fresh
    assert "def reserve_later(self, user_id: str, *, days: int = 1) -> ReserveResult:" in fresh
    assert "return self._call(self._store.reserve_later, user_id, days=days)" in fresh
    assert "PlanDefinition" in imports  # a type the annotations did not need before
    assert "PlanDefinition" not in text[: text.index("__all__")]


def test_every_public_method_has_a_blocking_twin() -> None:
    """The facades offer every public method of the store, the manager and the hold."""

    def public(cls: type[Any]) -> set[str]:
        return {n for n, v in vars(cls).items() if not n.startswith("_") and callable(v)}

    assert public(CreditStore) - {"aclose"} <= public(SyncCreditStore)
    assert public(CreditManager) - {"aclose"} <= public(SyncCreditManager)
    assert public(Hold) <= public(SyncHold)


def test_the_generator_check_mode(capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m ducto._syncgen --check`` exits 0 on an up-to-date file."""
    assert 0 == syncgen_main(["--check"])
    assert "" == capsys.readouterr().err


# -- closing while other threads use the facade ------------------------------------------------


def _open_billing(make_store: Callable[[], CreditStore], backend: Any) -> SyncCreditManager:
    billing = SyncCreditManager(
        CreditManager(make_store()), backend=backend, close_timeout=5
    ).open()
    billing.setup()
    billing.publish_pricing(PRICING)
    billing.add_credits("alice", 100, "purchase")
    return billing


@pytest.mark.parametrize("recorded", [True, False], ids=["recorded", "nothing-recorded"])
def test_close_resolves_a_hold_open_in_another_thread(
    make_store: Callable[[], CreditStore], backend: Any, recorded: bool
) -> None:
    """close() is bounded: it settles (or releases) a hold another thread still holds."""
    billing = _open_billing(make_store, backend)
    entered, leave = threading.Event(), threading.Event()
    outcome: list[object] = []

    def worker() -> None:
        try:
            with billing.hold("alice", 30) as hold:
                if recorded:
                    hold.record(UsageMetrics(model="gpt-4o", input_tokens=500))  # 5 credits
                entered.set()
                leave.wait(10)
            outcome.append((hold.settled, hold.released, hold.result))
        except BaseException as exc:  # the test reports whatever the thread got
            outcome.append(exc)

    thread = threading.Thread(target=worker)
    thread.start()
    assert entered.wait(10)
    closer = threading.Thread(target=billing.close)
    closer.start()
    closer.join(10)
    closed_in_time = not closer.is_alive()
    leave.set()
    thread.join(10)

    assert closed_in_time
    [(settled, released, result)] = outcome  # type: ignore[misc]
    assert (recorded, not recorded) == (settled, released)
    assert (5 if recorded else None) == (result.charged if result is not None else None)


def test_calls_while_closing_get_ducto_errors(
    make_store: Callable[[], CreditStore], backend: Any
) -> None:
    """Threads calling while the facade closes get StoreError, never an anyio error."""
    billing = _open_billing(make_store, backend)
    started = threading.Barrier(5)
    errors: list[BaseException] = []

    def caller() -> None:
        started.wait(10)
        for _ in range(10_000):
            try:
                billing.get_balance("alice")
                with billing.hold("alice", 1):
                    pass
            except BaseException as exc:  # the test checks what kind of error it is
                errors.append(exc)
                return

    threads = [threading.Thread(target=caller) for _ in range(4)]
    for thread in threads:
        thread.start()
    started.wait(10)
    billing.close()
    for thread in threads:
        thread.join(10)

    assert not any(thread.is_alive() for thread in threads)
    assert 4 == len(errors)
    assert all(isinstance(error, StoreError) for error in errors), errors


def test_a_facade_cannot_be_called_from_its_own_loop(backend: Any) -> None:
    """A call made on the facade's loop thread is refused with InvalidArgumentError."""
    with SyncCreditStore(MemoryStore(), backend=backend) as store:
        with pytest.raises(InvalidArgumentError, match="own event loop"):
            store._runner.portal.call(lambda: store.get_balance("alice"))
        balance = store.get_balance("alice")

    assert 0 == balance.balance


def test_bad_facade_arguments_are_refused() -> None:
    """A bad close_timeout or a manager that is not one raises InvalidArgumentError."""
    with pytest.raises(InvalidArgumentError, match="close_timeout"):
        SyncCreditStore(MemoryStore(), close_timeout=-1)
    with pytest.raises(InvalidArgumentError, match="manager"):
        SyncCreditManager(MemoryStore())  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="store"):
        SyncCreditStore("memory://")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="backend_options"):
        SyncCreditStore(MemoryStore(), backend_options=5)  # type: ignore[arg-type]
