"""
LiteLLMBilling through ``litellm.acompletion`` with ``mock_response``: no network, real stores.

LiteLLM runs on asyncio only, so these tests do too. A guard refuses every connection that
does not go to loopback, so a tokenizer or price-list download would fail the test.
"""

from __future__ import annotations

import os
import socket
from collections import Counter
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import pytest
from tests.contract._checks import all_rows, assert_invariants
from tests.integrations._support import Settled, new_manager

# LiteLLM reads this when imported: use the price map it ships instead of fetching one.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
litellm = pytest.importorskip("litellm")

from ducto import (  # noqa: E402
    CreditError,
    CreditManager,
    InsufficientCreditsError,
    InsufficientTeamBalanceError,
    SpendCapExceededError,
    TeamNotFoundError,
    UserNotInTeamError,
)
from ducto.integrations import Payer  # noqa: E402
from ducto.integrations.litellm import LiteLLMBilling, NoPayerError  # noqa: E402
from ducto.interface.base import CreditStore  # noqa: E402
from ducto.interface.models import SpendCap  # noqa: E402

pytestmark = [
    pytest.mark.anyio,
    # LiteLLM's own types trip pydantic's warnings; they say nothing about ducto.
    pytest.mark.filterwarnings("ignore:.*using the `ReadOnly` qualifier:UserWarning"),
]

MESSAGES = [{"role": "user", "content": "Say hello to the billing team"}]


@pytest.fixture
def anyio_backend() -> str:
    """LiteLLM is built on asyncio."""
    return "asyncio"


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Refuse any connection that leaves the machine."""
    real_connect = socket.socket.connect

    def connect(sock: socket.socket, address: Any) -> Any:
        host = address[0] if isinstance(address, tuple) else str(address)
        if sock.family in (socket.AF_INET, socket.AF_INET6) and host not in (
            "127.0.0.1",
            "::1",
            "localhost",
        ):
            raise OSError(f"test guard: no network access (tried {address!r})")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)


@pytest.fixture
async def manager(store: CreditStore) -> CreditManager:
    return await new_manager(store)


@pytest.fixture
def billing(manager: CreditManager) -> Iterator[LiteLLMBilling]:
    """The callback, registered with LiteLLM for the test only."""
    callback = LiteLLMBilling(manager, payer=lambda call: call.get("user"))
    saved = litellm.callbacks
    litellm.callbacks = [callback]
    yield callback
    litellm.callbacks = saved
    # LiteLLM copies callbacks into its success and failure lists on first use, and keeps
    # one logger per class there: drop this one so the next test's is used.
    litellm.logging_callback_manager.remove_callback_from_all_lists(callback)


async def test_completion_is_held_then_charged_its_usage(
    manager: CreditManager, billing: LiteLLMBilling, user_id: str
) -> None:
    """The hold is placed before the call and settled for the response's usage."""
    await manager.add_credits(user_id, 10_000, "purchase")
    settled = Settled(manager)

    response = await litellm.acompletion(
        model="gpt-4o",
        messages=MESSAGES,
        mock_response="Hello, billing team!",
        user=user_id,
        max_tokens=100,
    )
    await settled.wait()

    usage = response.usage
    expected = usage.prompt_tokens * 1 + usage.completion_tokens * 10
    balance = await manager.get_balance(user_id)
    rows = [row for row in await all_rows(manager.store, user_id) if row.type == "usage"]
    assert settled.reserved.is_set()
    assert (10_000 - expected, 0) == (balance.balance, balance.reserved)
    assert [-expected] == [row.amount for row in rows]
    assert "gpt-4o" == rows[0].metadata["model"]
    assert 0 == billing.open_holds
    await assert_invariants(manager.store, user_id)


async def test_streamed_completion_is_charged_once_consumed(
    manager: CreditManager, billing: LiteLLMBilling, user_id: str
) -> None:
    """A stream is settled from LiteLLM's assembled response when it has been read."""
    await manager.add_credits(user_id, 10_000, "purchase")
    settled = Settled(manager)

    stream = await litellm.acompletion(
        model="gpt-4o",
        messages=MESSAGES,
        mock_response="Hello there, billing team",
        user=user_id,
        stream=True,
        stream_options={"include_usage": True},
        max_tokens=100,
    )
    chunks = [chunk async for chunk in stream]
    await settled.wait()

    usage = next(chunk.usage for chunk in reversed(chunks) if getattr(chunk, "usage", None))
    balance = await manager.get_balance(user_id)
    assert usage.completion_tokens > 0
    assert 10_000 - (usage.prompt_tokens + 10 * usage.completion_tokens) == balance.balance
    assert 0 == balance.reserved
    await assert_invariants(manager.store, user_id)


async def test_failed_call_releases_its_hold(
    manager: CreditManager, billing: LiteLLMBilling, user_id: str
) -> None:
    """A provider error releases the hold and charges nothing."""
    await manager.add_credits(user_id, 10_000, "purchase")
    settled = Settled(manager)

    with pytest.raises(Exception, match="boom"):
        await litellm.acompletion(
            model="gpt-4o",
            messages=MESSAGES,
            mock_response=Exception("boom"),
            user=user_id,
            max_tokens=10,
        )
    await settled.wait()

    balance = await manager.get_balance(user_id)
    assert (10_000, 0, 10_000) == (balance.balance, balance.reserved, balance.available)
    assert 0 == billing.open_holds


async def test_refused_calls_raise_before_the_provider_is_called(
    manager: CreditManager, billing: LiteLLMBilling, user_id: str
) -> None:
    """Not enough credits, a spend cap, or no payer: the call raises and nothing is charged."""
    await manager.add_credits(user_id, 30, "purchase")

    with pytest.raises(InsufficientCreditsError):
        await litellm.acompletion(
            model="gpt-4o", messages=MESSAGES, mock_response="hi", user=user_id, max_tokens=100
        )
    await manager.store.set_spend_cap(
        SpendCap(user_id=user_id, cap_type="daily", limit=5, action="deny")
    )
    with pytest.raises(SpendCapExceededError):
        await litellm.acompletion(
            model="gpt-4o", messages=MESSAGES, mock_response="hi", user=user_id, max_tokens=1
        )
    with pytest.raises(NoPayerError):
        await litellm.acompletion(model="gpt-4o", messages=MESSAGES, mock_response="hi")

    balance = await manager.get_balance(user_id)
    assert (30, 0) == (balance.balance, balance.reserved)
    assert [] == [row for row in await all_rows(manager.store, user_id) if row.type == "usage"]
    assert 0 == billing.open_holds


async def test_proxy_failure_hook_maps_refusals_to_http_errors(
    manager: CreditManager, billing: LiteLLMBilling
) -> None:
    """On the proxy, ducto's refusals become HTTP errors in OpenAI's shape; others pass."""
    refused = InsufficientCreditsError("alice", 100, 3)

    answer = await billing.async_post_call_failure_hook({}, refused, None)
    other = await billing.async_post_call_failure_hook({}, RuntimeError("x"), None)

    assert answer is not None
    assert 402 == answer.status_code
    assert "insufficient_credits" == answer.detail["error"]["code"]
    assert other is None


async def test_aclose_releases_holds_never_reported(
    manager: CreditManager, billing: LiteLLMBilling, user_id: str
) -> None:
    """A hold whose call LiteLLM never reports back is released at shutdown."""
    await manager.add_credits(user_id, 10_000, "purchase")
    kwargs = {"model": "gpt-4o", "messages": MESSAGES, "user": user_id, "max_tokens": 10}
    kwargs["litellm_call_id"] = "c-1"

    await billing.async_pre_call_deployment_hook(kwargs, "acompletion")
    held = await manager.get_balance(user_id)
    await billing.aclose()

    assert held.reserved > 0
    assert 0 == (await manager.get_balance(user_id)).reserved
    assert 0 == billing.open_holds


# -- team pools --------------------------------------------------------------------------------


def _member_of_team(call: Mapping[str, Any]) -> Payer | None:
    """The caller names the member with ``user`` and the pool in ``metadata``."""
    user = call.get("user")
    team_id = (call.get("metadata") or {}).get("team")
    return Payer(user, team_id=team_id) if user else None


@pytest.fixture
def team_billing(manager: CreditManager) -> Iterator[LiteLLMBilling]:
    """The callback with a resolver that bills team pools, registered for the test only."""
    callback = LiteLLMBilling(manager, payer=_member_of_team)
    saved = litellm.callbacks
    litellm.callbacks = [callback]
    yield callback
    litellm.callbacks = saved
    litellm.logging_callback_manager.remove_callback_from_all_lists(callback)


async def _team(manager: CreditManager, pool: int, *members: tuple[str, int | None]) -> str:
    team = await manager.store.create_team("research", pool)
    for user, cap in members:
        await manager.store.add_team_member(team.team_id, user, spend_cap=cap)
    return team.team_id


async def _member_call(user: str, team_id: str, **extra: Any) -> Any:
    return await litellm.acompletion(
        model="gpt-4o",
        messages=MESSAGES,
        mock_response=extra.pop("mock_response", "Hello, team!"),
        user=user,
        metadata={"team": team_id},
        max_tokens=extra.pop("max_tokens", 100),
        **extra,
    )


async def test_a_member_call_is_charged_to_the_pool(
    manager: CreditManager, team_billing: LiteLLMBilling
) -> None:
    """The pool is held and charged the response's usage; the row names the member."""
    team_id = await _team(manager, 10_000, ("alice", None))
    settled = Settled(manager)

    response = await _member_call("alice", team_id)
    await settled.wait()

    expected = response.usage.prompt_tokens + 10 * response.usage.completion_tokens
    pool = await manager.store.get_team_balance(team_id)
    page = await manager.store.list_team_transactions(team_id)
    rows = [row for row in page.items if row.type == "team_usage"]
    assert (10_000 - expected, 0) == (pool.balance, pool.reserved)
    assert [(-expected, "alice")] == [(row.amount, row.metadata["user_id"]) for row in rows]
    assert 0 == (await manager.get_balance("alice")).balance
    assert 0 == team_billing.open_holds


async def test_team_refusals_raise_before_the_provider_is_called(
    manager: CreditManager, team_billing: LiteLLMBilling
) -> None:
    """A short pool, a member cap, an outsider, an unknown team: typed errors, no charge."""
    poor = await _team(manager, 30, ("alice", None))
    capped = await _team(manager, 10_000, ("bob", 5))

    with pytest.raises(InsufficientTeamBalanceError):
        await _member_call("alice", poor)
    with pytest.raises(SpendCapExceededError):
        await _member_call("bob", capped)
    with pytest.raises(UserNotInTeamError):
        await _member_call("mallory", capped)
    with pytest.raises(TeamNotFoundError):
        await _member_call("alice", "no-such-team")

    pools = [await manager.store.get_team_balance(team) for team in (poor, capped)]
    assert [(30, 0), (10_000, 0)] == [(pool.balance, pool.reserved) for pool in pools]
    assert 0 == team_billing.open_holds


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (InsufficientTeamBalanceError("t", 100, 3), 402, "insufficient_team_balance"),
        (SpendCapExceededError("alice", 100, 50, 40), 429, "spend_cap_exceeded"),
        (UserNotInTeamError("t", "mallory"), 403, "user_not_in_team"),
        (TeamNotFoundError("t"), 403, "team_not_found"),
    ],
)
async def test_proxy_failure_hook_maps_team_refusals(
    manager: CreditManager,
    team_billing: LiteLLMBilling,
    error: Exception,
    status: int,
    code: str,
) -> None:
    """The proxy answers team refusals with the ASGI middleware's statuses."""
    answer = await team_billing.async_post_call_failure_hook({}, error, None)

    assert answer is not None
    assert (status, code) == (answer.status_code, answer.detail["error"]["code"])


async def _race(calls: list[tuple[str, str]]) -> tuple[int, Counter[type[BaseException]]]:
    """Run every (member, team) call at once; count successes and errors by type."""
    served = 0
    errors: Counter[type[BaseException]] = Counter()

    async def one(user: str, team_id: str) -> None:
        nonlocal served
        try:
            await _member_call(user, team_id, max_tokens=10)
        except CreditError as exc:
            errors[type(exc)] += 1
        else:
            served += 1

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            for user, team_id in calls:
                tg.start_soon(one, user, team_id)
    return served, errors


async def test_fifty_member_calls_against_a_pool_for_ten(
    manager: CreditManager, team_billing: LiteLLMBilling
) -> None:
    """Five members make 10 calls each at once, each costing its 100-credit hold."""
    await manager.publish_pricing({"models": {"_default": "100"}, "min_balance": 0})
    members = [f"member-{number}" for number in range(5)]
    team_id = await _team(manager, 1_000, *((member, None) for member in members))
    settled = Settled(manager)

    served, errors = await _race([(member, team_id) for member in members] * 10)
    await settled.wait(10)

    pool = await manager.store.get_team_balance(team_id)
    assert (10, {InsufficientTeamBalanceError: 40}) == (served, dict(errors))
    assert (0, 0) == (pool.balance, pool.reserved)
    assert 0 == team_billing.open_holds


async def test_a_member_cap_holds_under_racing_calls(
    manager: CreditManager, team_billing: LiteLLMBilling
) -> None:
    """A member capped at 3 calls makes 20 at once beside an uncapped member's 20."""
    await manager.publish_pricing({"models": {"_default": "100"}, "min_balance": 0})
    team_id = await _team(manager, 100_000, ("capped", 300), ("free", None))
    settled = Settled(manager)

    served, errors = await _race([("capped", team_id), ("free", team_id)] * 20)
    await settled.wait(23)

    spent = {m.user_id: m.total_spent for m in await manager.store.get_team_members(team_id)}
    assert (23, {SpendCapExceededError: 17}) == (served, dict(errors))
    assert {"capped": 300, "free": 2_000} == spent
    assert 0 == (await manager.store.get_team_balance(team_id)).reserved


# -- budget scopes -----------------------------------------------------------------------------


def _key_owner(call: Mapping[str, Any]) -> Payer | None:
    """The proxy's resolver of the LiteLLM recipe: the key's owner pays, in the key's scope."""
    metadata = call.get("metadata") or call.get("litellm_metadata") or {}
    user_id = metadata.get("user_api_key_user_id")
    if user_id is None:
        return None
    return Payer(
        user_id,
        team_id=metadata.get("user_api_key_team_id"),
        scope=metadata.get("user_api_key_hash"),
    )


@pytest.fixture
def key_billing(manager: CreditManager) -> Iterator[LiteLLMBilling]:
    """The callback with the proxy resolver, registered for the test only."""
    callback = LiteLLMBilling(manager, payer=_key_owner)
    saved = litellm.callbacks
    litellm.callbacks = [callback]
    yield callback
    litellm.callbacks = saved
    litellm.logging_callback_manager.remove_callback_from_all_lists(callback)


async def _key_call(user: str, key_hash: str, **extra: Any) -> Any:
    """A call as the proxy hands it on: the key's owner and hash in ``metadata``."""
    return await litellm.acompletion(
        model="gpt-4o",
        messages=MESSAGES,
        mock_response="Hello from a key",
        metadata={"user_api_key_user_id": user, "user_api_key_hash": key_hash},
        max_tokens=extra.pop("max_tokens", 20),
        **extra,
    )


@pytest.mark.parametrize("stream", [False, True])
async def test_a_key_budget_refuses_only_that_key(
    manager: CreditManager, key_billing: LiteLLMBilling, user_id: str, stream: bool
) -> None:
    """A daily cap scoped to key a refuses its call with the reset time; key b still spends."""
    await manager.add_credits(user_id, 10_000, "purchase")
    await manager.store.set_spend_cap(
        SpendCap(user_id=user_id, cap_type="daily", limit=5, scope="hash-a")
    )
    settled = Settled(manager)
    extra: dict[str, Any] = {"stream": True, "stream_options": {"include_usage": True}}

    with pytest.raises(SpendCapExceededError) as refused:
        await _key_call(user_id, "hash-a", **(extra if stream else {}))
    served = await _key_call(user_id, "hash-b", **(extra if stream else {}))
    if stream:
        _ = [chunk async for chunk in served]
    await settled.wait()

    rows = [row for row in await all_rows(manager.store, user_id) if row.type == "usage"]
    midnight = datetime(2026, 3, 16, tzinfo=UTC)  # the store's clock is 2026-03-15 12:00 UTC
    assert ("hash-a", midnight, "daily") == (
        refused.value.scope,
        refused.value.resets_at,
        refused.value.cap_type,
    )
    assert ["hash-b"] == [row.metadata["scope"] for row in rows]
    assert 0 == (await manager.get_balance(user_id)).reserved
    assert 0 == key_billing.open_holds
    await assert_invariants(manager.store, user_id)


async def test_the_proxy_resolver_holds_in_the_key_scope(
    manager: CreditManager, key_billing: LiteLLMBilling, user_id: str
) -> None:
    """The hook places the hold in the key's scope: it counts toward that key's cap only."""
    await manager.add_credits(user_id, 10_000, "purchase")
    await manager.store.set_spend_cap(
        SpendCap(user_id=user_id, cap_type="daily", limit=1_000, scope="hash-a")
    )
    metadata = {"user_api_key_user_id": user_id, "user_api_key_hash": "hash-a"}
    kwargs = {"model": "gpt-4o", "messages": MESSAGES, "metadata": metadata, "max_tokens": 10}
    kwargs["litellm_call_id"] = "c-scoped"

    await key_billing.async_pre_call_deployment_hook(kwargs, "acompletion")
    in_scope = await manager.store.check_spend_cap(user_id, scope="hash-a")
    elsewhere = await manager.store.check_spend_cap(user_id, scope="hash-b")
    await key_billing.aclose()

    assert in_scope.reserved > 0
    assert (None, 0) == (elsewhere.action, elsewhere.reserved)
    assert "hash-a" == in_scope.scope


async def test_proxy_failure_hook_says_when_a_budget_resets(
    manager: CreditManager, billing: LiteLLMBilling
) -> None:
    """A spend-cap refusal becomes a 429 naming the cap, its reset and when to retry."""
    resets_at = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=2)
    refused = SpendCapExceededError(
        "alice", 100, 50, 40, None, 0, "daily", scope="key_123", resets_at=resets_at
    )
    unknown = SpendCapExceededError("alice", 100, 50, 40)

    answer = await billing.async_post_call_failure_hook({}, refused, None)
    bare = await billing.async_post_call_failure_hook({}, unknown, None)

    assert answer is not None
    assert bare is not None
    error = answer.detail["error"]
    expected = resets_at.isoformat().replace("+00:00", "Z")
    assert (429, "spend_cap_exceeded") == (answer.status_code, error["code"])
    assert (expected, "daily", "key_123") == (error["resets_at"], error["cap_type"], error["scope"])
    assert expected == answer.headers["x-ducto-budget-resets-at"]
    assert 7_190 <= int(answer.headers["retry-after"]) <= 7_200
    assert (None, None) == (bare.detail["error"]["resets_at"], bare.detail["error"]["scope"])
    assert bare.headers is None
