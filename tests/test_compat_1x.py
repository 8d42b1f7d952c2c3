"""ducto 1.x code, run unchanged through `ducto.sync`: every name and spelling 1.x had."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import OPENERS, REQUIRED, STORES, FakeClock

from ducto import (
    AddCreditsResult,
    BalanceResult,
    CheckFeatureResult,
    ConfigError,
    CreditEvent,
    CreditEventEmitter,
    CreditEventType,
    CreditManager,
    DeductionResult,
    ExpressionError,
    InsufficientCreditsError,
    MemoryStore,
    PricingConfig,
    PricingConfigData,
    PricingEngine,
    PricingNotLoadedError,
    ReserveResult,
    SpendCap,
    SpendCapExceededError,
    Team,
    UsageMetrics,
    evaluate_expression,
    validate_expression,
)
from ducto.errors import InvalidArgumentError
from ducto.interface.base import CreditStore
from ducto.manager import InsufficientCreditsError as ManagerInsufficientCreditsError
from ducto.manager import PricingNotLoadedError as ManagerPricingNotLoadedError
from ducto.sync import SyncCreditManager, SyncCreditStore

PRICING = {
    "models": {"gpt-4": "input_tokens * 0.03 + output_tokens * 0.06", "_default": "1"},
    "fixed": {"image_generation": 50},
    "min_balance": 10,
    "plans": {"pro": {"id": "pro", "name": "Pro", "features": {"gpt4_access": True}}},
}


@pytest.fixture(params=STORES)
def new_store(
    request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock
) -> Callable[[], CreditStore]:
    """Makes the store a 1.x program would use, of each kind."""
    kind: str = request.param
    try:
        OPENERS[kind](tmp_path, clock)  # the driver is there and, for Postgres, a database
    except (ImportError, LookupError) as exc:
        if kind in REQUIRED:
            pytest.fail(f"{kind} store is required: {exc}")
        pytest.skip(f"{kind} store unavailable: {exc}")
    return lambda: OPENERS[kind](tmp_path, clock)


@pytest.fixture(params=["asyncio", "trio"])
def backend(request: pytest.FixtureRequest) -> str:
    """The loop the blocking facade runs."""
    return str(request.param)


@pytest.fixture
def events() -> tuple[CreditEventEmitter, list[tuple[str, int]]]:
    """An emitter with handlers registered under 1.x's event names."""
    emitter = CreditEventEmitter()
    seen: list[tuple[str, int]] = []
    for name in (
        "credits.added",
        "credits.deducted",
        "credits.refunded",
        "credits.expired",
        "credits.cap_reached",
        "credits.cap_warning",
    ):
        emitter.on(name, lambda event, name=name: seen.append((name, event.amount)))
    return emitter, seen


@pytest.fixture
def manager(
    new_store: Callable[[], CreditStore],
    backend: Any,
    events: tuple[CreditEventEmitter, list[tuple[str, int]]],
) -> Iterator[SyncCreditManager]:
    """``CreditManager(store, engine, emitter)``, positional, as 1.x built it, made blocking."""
    engine = PricingEngine.from_dict(PRICING)
    with SyncCreditManager(
        CreditManager(new_store(), engine, events[0]), backend=backend
    ) as billing:
        billing.setup()
        yield billing


def test_names_import_from_the_top_level() -> None:
    """1.x's top-level names are there, and map onto the error tree honestly."""
    assert issubclass(ConfigError, InvalidArgumentError)
    assert issubclass(PricingNotLoadedError, InvalidArgumentError)
    assert ManagerInsufficientCreditsError is InsufficientCreditsError
    assert ManagerPricingNotLoadedError is PricingNotLoadedError
    assert PricingConfig(models={"_default": "1"}).min_balance == 5
    assert Team(team_id="t", name="research", balance=3).balance == 3


def test_expression_helpers() -> None:
    """evaluate_expression and validate_expression, as 1.x tests call them."""
    assert Decimal("3.5") == evaluate_expression("input_tokens * 0.5 + 1", {"input_tokens": 5})
    assert Decimal("0.3") == evaluate_expression("a + b", {"a": 0.1, "b": 0.2})
    assert validate_expression("input_tokens * 0.03 + output_tokens * 0.06") is None
    with pytest.raises(ExpressionError):
        validate_expression("input_tokens *")
    with pytest.raises(ExpressionError):
        validate_expression("secret_variable * 2")
    with pytest.raises(ExpressionError):
        evaluate_expression("1 / x", {"x": 0})


def test_invalid_configs_raise_config_error() -> None:
    """A bad config raises ConfigError; a bad expression in it is also an ExpressionError."""
    with pytest.raises(ConfigError):
        PricingEngine.from_dict({"models": {}})
    with pytest.raises(ConfigError):
        PricingEngine.from_dict({"models": {"_default": "1"}, "colour": "blue"})
    with pytest.raises(ConfigError) as info:
        PricingEngine.from_dict({"models": {"gpt-4": "input_tokens *"}})

    assert isinstance(info.value, ExpressionError)


def test_pricing_not_loaded(new_store: Callable[[], CreditStore], backend: Any) -> None:
    """Without pricing, engine and load_pricing_from_store raise PricingNotLoadedError."""
    with SyncCreditManager(CreditManager(new_store()), backend=backend) as billing:
        billing.setup()
        with pytest.raises(PricingNotLoadedError):
            billing.load_pricing_from_store()
        with pytest.raises(PricingNotLoadedError):
            billing.engine  # noqa: B018
        with pytest.raises(PricingNotLoadedError):
            billing.deduct("alice", UsageMetrics(model="gpt-4", input_tokens=10))


def test_publish_and_load_pricing(manager: SyncCreditManager) -> None:
    """publish_pricing_from_dict and publish_pricing(config, label) store active versions."""
    first = manager.publish_pricing_from_dict(PRICING)
    second = manager.publish_pricing(PricingConfig(**{**PRICING, "min_balance": 0}), "v2")
    engine = manager.load_pricing_from_store()

    assert first != second
    assert 0 == engine.min_balance
    assert ["v2", None] == [item.label for item in manager.store.get_pricing_history()]


def test_grants_charges_and_refunds(
    manager: SyncCreditManager, events: tuple[CreditEventEmitter, list[tuple[str, int]]]
) -> None:
    """add_credits(tx_type=...), deduct, deduct_fixed(job_name=...), refund, with 1.x events."""
    added = manager.add_credits("alice", 1000, tx_type="purchase")
    usage = UsageMetrics(model="gpt-4", input_tokens=500, output_tokens=200)
    charged = manager.deduct("alice", usage)
    image = manager.deduct_fixed("alice", job_name="image_generation")
    refund = manager.refund_credits(image.transaction_id, 20, "blurry")
    balance = manager.get_balance("alice")

    assert isinstance(added, AddCreditsResult)
    assert isinstance(charged, DeductionResult)
    assert isinstance(balance, BalanceResult)
    assert (27, 50, 20) == (charged.charged, image.charged, refund.amount)
    assert 1000 - 27 - 50 + 20 == balance.balance
    assert [
        ("credits.added", 1000),
        ("credits.deducted", 27),
        ("credits.deducted", 50),
        ("credits.refunded", 20),
    ] == events[1]
    with pytest.raises(InvalidArgumentError, match="tx_type"):
        manager.add_credits("alice", 5, "purchase", tx_type="purchase")
    with pytest.raises(InvalidArgumentError, match="job_name"):
        manager.deduct_fixed("alice", "image_generation", job_name="image_generation")


def test_reserve_credits_keeps_the_configs_floor(manager: SyncCreditManager) -> None:
    """The manager's reserve_credits defaults min_balance to the engine's (10 here)."""
    manager.add_credits("bob", 100, "purchase")

    hold = manager.reserve_credits("bob", 85, "chat")
    refused = manager.reserve_credits("bob", 10, "chat")
    allowed = manager.reserve_credits("bob", 10, "chat", min_balance=0)
    settled = manager.store.deduct_credits("bob", hold.reservation_id, 80)

    assert isinstance(hold, ReserveResult)
    assert (85, 15) == (hold.amount, hold.available)
    assert ("insufficient_credits", 0) == (refused.error, refused.amount)
    assert 5 == allowed.available
    assert 80 == settled.charged


def test_features_teams_caps_and_expiry(
    manager: SyncCreditManager,
    events: tuple[CreditEventEmitter, list[tuple[str, int]]],
    clock: FakeClock,
) -> None:
    """Plans and features, teams, caps (warn and deny) and expiry, as 1.x programs use them."""
    store: SyncCreditStore = manager.store
    manager.publish_pricing_from_dict(PRICING)
    manager.add_credits("carol", 500, "purchase")
    manager.set_user_plan("carol", "pro")
    feature = manager.check_feature("carol", "gpt4_access")
    created = store.create_team("research", 300)
    store.add_team_member(created.team_id, "carol")
    team_balance = store.get_team_balance(created.team_id)
    team = Team(team_id=created.team_id, name=created.name, balance=team_balance.balance)
    store.set_spend_cap(SpendCap(user_id="carol", type="daily", limit=50, action="warn"))
    manager.deduct("carol", UsageMetrics(model="gpt-4", input_tokens=1000, output_tokens=500))
    store.set_spend_cap(SpendCap(user_id="carol", type="daily", limit=50, action="deny"))
    with pytest.raises(SpendCapExceededError):
        manager.deduct("carol", UsageMetrics(model="gpt-4", input_tokens=100))
    manager.add_credits("carol", 40, "signup_bonus", expires_at=clock.now + timedelta(hours=1))
    clock.advance(hours=2)
    swept = manager.sweep_expired_credits()

    assert isinstance(feature, CheckFeatureResult)
    assert feature.has_feature is True
    assert ("research", 300) == (team.name, team.balance)
    assert 40 == swept.expired_amount
    names = [name for name, _ in events[1]]
    assert ["credits.deducted", "credits.cap_warning"] == names[1:3]
    assert ("credits.cap_reached", 3) == events[1][3]
    assert ("credits.expired", 40) == events[1][-1]


def test_both_spellings_of_the_emitter_are_refused() -> None:
    """CreditManager(store, emitter=..., events=...) names both spellings."""
    with pytest.raises(InvalidArgumentError, match="emitter"):
        CreditManager(MemoryStore(), emitter=CreditEventEmitter(), events=CreditEventEmitter())


def test_the_manager_works_with_keyword_names(new_store: Callable[[], CreditStore]) -> None:
    """CreditManager(store=..., engine=..., emitter=...) as 1.x keyword calls wrote it."""
    emitter = CreditEventEmitter()
    built = CreditManager(
        store=new_store(), engine=PricingEngine.from_dict(PRICING), emitter=emitter
    )

    assert built.events is emitter
    assert built.emitter is emitter
    assert 10 == built.engine.min_balance


# -- what 1.0.3's manager tests expect ---------------------------------------------------------


def test_publish_pricing_takes_the_config_model(manager: SyncCreditManager) -> None:
    """publish_pricing and publish_pricing_from_dict take PricingConfigData as well as a dict."""
    config = PricingConfigData.model_validate(PRICING)
    first = manager.publish_pricing_from_dict(config)
    second = manager.publish_pricing(config, "again")
    third = manager.publish_pricing_from_dict({**PRICING, "min_balance": 0})

    assert 3 == len({first, second, third})
    assert 0 == manager.load_pricing_from_store().min_balance
    with pytest.raises(InvalidArgumentError, match="data"):
        manager.publish_pricing_from_dict("models: {}")  # type: ignore[arg-type]


def test_reserve_credits_returns_a_refusal(manager: SyncCreditManager) -> None:
    """manager.reserve_credits past the balance returns error "insufficient_credits" and
    amount 0, as 1.x did, and holds nothing; hold() still raises."""
    manager.add_credits("dora", 70, "purchase")

    refused = manager.reserve_credits("dora", 80, "chat", min_balance=0)

    assert "insufficient_credits" == refused.error
    assert (False, 0, "") == (refused.ok, refused.amount, refused.reservation_id)
    assert 0 == manager.get_balance("dora").reserved
    with pytest.raises(InsufficientCreditsError):
        refused.raise_for_error()


def test_reserve_credits_returns_a_cap_refusal(
    manager: SyncCreditManager, events: tuple[CreditEventEmitter, list[tuple[str, int]]]
) -> None:
    """A deny cap's refusal comes back on the result too, and is still reported."""
    manager.add_credits("erin", 500, "purchase")
    manager.store.set_spend_cap(SpendCap(user_id="erin", type="daily", limit=20))

    refused = manager.reserve_credits("erin", 30, "chat")

    assert ("spend_cap_exceeded", 0) == (refused.error, refused.amount)
    assert ("credits.cap_reached", 30) == events[1][-1]


def test_events_compare_to_their_1x_names(
    manager: SyncCreditManager, events: tuple[CreditEventEmitter, list[tuple[str, int]]]
) -> None:
    """A 1.x handler's ``event.type == "credits.deducted"`` and ``event.data[...]`` work."""
    seen: list[CreditEvent] = []
    events[0].on(None, seen.append)
    manager.publish_pricing_from_dict(PRICING)
    manager.add_credits("fay", 1000, "purchase")
    manager.deduct("fay", UsageMetrics(model="gpt-4", input_tokens=500, output_tokens=200))

    added, charged = (e for e in seen if e.type in ("credits.added", "credits.deducted"))
    assert added.type == "credits.added"
    assert added.type == "credits_added"
    assert added.type != "credits.deducted"
    assert charged.type == "credits.deducted"
    assert charged.type is CreditEventType.CREDITS_DEDUCTED
    assert (1000, 1000) == (added.data["amount"], added.data["new_balance"])
    assert (27, "gpt-4") == (charged.data["amount"], charged.data["model"])
    assert charged.data["transaction_id"] == charged.transaction_id
    with pytest.raises(TypeError):
        charged.data["amount"] = 0  # type: ignore[index]


def test_a_spend_cap_refusal_is_an_insufficient_credits_error(
    manager: SyncCreditManager,
) -> None:
    """1.x code catching InsufficientCreditsError still catches a deny cap's refusal."""
    manager.publish_pricing_from_dict(PRICING)
    manager.add_credits("gus", 1000, "purchase")
    manager.store.set_spend_cap(SpendCap(user_id="gus", type="daily", limit=5))

    with pytest.raises(InsufficientCreditsError, match="Spend cap exceeded") as caught:
        manager.deduct("gus", UsageMetrics(model="gpt-4", input_tokens=1000))

    assert isinstance(caught.value, SpendCapExceededError)
    assert "spend_cap_exceeded" == caught.value.code
    assert (30, 5) == (caught.value.needed, caught.value.available)


def test_pricing_not_loaded_says_what_1x_said(
    new_store: Callable[[], CreditStore], backend: Any
) -> None:
    """The message keeps 1.x's words, "PricingEngine not loaded"."""
    with SyncCreditManager(CreditManager(new_store()), backend=backend) as billing:
        billing.setup()
        with pytest.raises(PricingNotLoadedError, match="PricingEngine not loaded"):
            billing.engine  # noqa: B018
