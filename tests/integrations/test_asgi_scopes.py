"""BillingMiddleware with budget scopes: per-key spend caps, their 429s, scoped usage rows."""

from __future__ import annotations

import math
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import pytest
from tests.conftest import FakeClock
from tests.contract._checks import all_rows, assert_invariants
from tests.integrations._support import (
    PROMPT,
    PROMPT_TOKENS,
    FakeUpstream,
    Reply,
    call,
    chat,
    estimator,
    new_manager,
)

from ducto import CreditManager, InvalidArgumentError
from ducto.integrations import Payer
from ducto.integrations.asgi import (
    HEADER_BUDGET_RESETS_AT,
    HEADER_CHARGED,
    BillingMiddleware,
    BillingRequest,
)
from ducto.interface.base import CreditStore
from ducto.interface.models import SpendCap

pytestmark = pytest.mark.anyio

COST = PROMPT_TOKENS + 5 * 10
"""What the fake upstream's answer to a 5-token request costs (its hold is 3 + 5 * 10)."""


def _payer(request: BillingRequest) -> Payer | None:
    """``Authorization: Bearer USER:KEY`` bills USER in the budget scope KEY."""
    token = request.headers.get("authorization", "").removeprefix("Bearer ")
    user, _, key = token.partition(":")
    if not user:
        return None
    return Payer(user, {"api_key": key} if key else None, scope=key or None)


@pytest.fixture
async def manager(store: CreditStore) -> CreditManager:
    return await new_manager(store)


@pytest.fixture
def upstream() -> FakeUpstream:
    return FakeUpstream()


@pytest.fixture
def gateway(manager: CreditManager, upstream: FakeUpstream) -> BillingMiddleware:
    return BillingMiddleware(upstream.app(), manager=manager, payer=_payer, estimator=estimator())


@pytest.fixture
def midnight(clock: FakeClock) -> datetime:
    """The store's clock at the wall clock's time (retry-after counts from it); the next UTC
    midnight, when a daily cap's window resets."""
    now = datetime.now(UTC)
    clock.set(now)
    return now.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1)


async def _as(gateway: BillingMiddleware, key: str, path: str, body: Any) -> Reply:
    return await call(gateway, path, body, {"authorization": f"Bearer alice:{key}"})


def _instant(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


SHAPES = [
    pytest.param("/v1/chat/completions", chat(), id="openai-plain"),
    pytest.param(
        "/v1/chat/completions",
        chat(stream=True, stream_options={"include_usage": True}),
        id="openai-stream",
    ),
    pytest.param(
        "/v1/messages",
        {"model": "claude-sonnet-4", "max_tokens": 5, "messages": PROMPT},
        id="anthropic-plain",
    ),
    pytest.param(
        "/v1/messages",
        {"model": "claude-sonnet-4", "max_tokens": 5, "messages": PROMPT, "stream": True},
        id="anthropic-stream",
    ),
]


@pytest.mark.parametrize(("path", "body"), SHAPES)
async def test_a_key_over_its_daily_budget_is_429_while_another_key_spends(
    manager: CreditManager,
    gateway: BillingMiddleware,
    upstream: FakeUpstream,
    midnight: datetime,
    path: str,
    body: dict[str, Any],
) -> None:
    """Key a's 100-credit daily cap refuses its second call; key b of the same user spends on."""
    await manager.add_credits("alice", 10_000, "purchase")
    await manager.store.set_spend_cap(
        SpendCap(user_id="alice", cap_type="daily", limit=100, scope="key-a")
    )

    first = await _as(gateway, "key-a", path, body)
    refused = await _as(gateway, "key-a", path, body)
    others = [await _as(gateway, "key-b", path, body) for _ in range(3)]

    error = refused.json()["error"]
    retry_after = int(refused.headers["retry-after"])
    left = (midnight - datetime.now(UTC)).total_seconds()
    assert 200 == first.status
    assert [200, 200, 200] == [reply.status for reply in others]
    assert 429 == refused.status
    assert ("spend_cap_exceeded", "spend_cap_exceeded") == (error["code"], error["type"])
    assert (_instant(midnight), "daily", "key-a") == (
        error["resets_at"],
        error["cap_type"],
        error["scope"],
    )
    assert _instant(midnight) == refused.headers[HEADER_BUDGET_RESETS_AT]
    assert math.floor(left) <= retry_after <= math.ceil(left) + 1
    assert "in scope 'key-a'" in error["message"]
    if path == "/v1/messages":
        assert "error" == refused.json()["type"]
    assert 4 == upstream.calls
    assert 10_000 - 4 * COST == (await manager.get_balance("alice")).balance
    await assert_invariants(manager.store, "alice")


async def test_usage_rows_carry_the_payer_scope_and_spend_by_scope_reports_it(
    manager: CreditManager, gateway: BillingMiddleware, midnight: datetime
) -> None:
    """The hold's scope lands on the usage row; spend_by_scope splits the user's spend by key."""
    await manager.add_credits("alice", 10_000, "purchase")

    await _as(gateway, "key-a", "/v1/chat/completions", chat())
    await _as(gateway, "key-b", "/v1/chat/completions", chat(stream=True))
    await _as(gateway, "", "/v1/chat/completions", chat())

    usage = [row for row in await all_rows(manager.store, "alice") if row.type == "usage"]
    start = midnight - timedelta(days=1)
    by_scope = await manager.store.spend_by_scope(start, midnight, user_id="alice")
    assert {"key-a", "key-b", None} == {row.metadata.get("scope") for row in usage}
    assert {("key-a", COST, 1), ("key-b", 3 + 5 * 10, 1), (None, COST, 1)} == {
        (row.scope, row.total_spend, row.transaction_count) for row in by_scope
    }


async def test_a_payer_scope_replaces_a_scope_key_in_its_metadata(
    manager: CreditManager, upstream: FakeUpstream
) -> None:
    """``Payer.scope`` is the hold's scope, whatever the payer's metadata says."""
    await manager.add_credits("alice", 10_000, "purchase")
    await manager.store.set_spend_cap(
        SpendCap(user_id="alice", cap_type="monthly", limit=10, scope="real")
    )

    def payer(request: BillingRequest) -> Payer:
        return Payer("alice", {"scope": "spoofed", "project": "p"}, scope="real")

    gateway = BillingMiddleware(upstream.app(), manager=manager, payer=payer)
    reply = await call(gateway, "/v1/chat/completions", chat())

    error = reply.json()["error"]
    assert 429 == reply.status
    assert ("monthly", "real") == (error["cap_type"], error["scope"])
    assert error["resets_at"].endswith("-01T00:00:00Z")
    assert 0 == upstream.calls


async def test_an_unscoped_cap_refuses_every_key_and_says_so(
    manager: CreditManager, gateway: BillingMiddleware, midnight: datetime
) -> None:
    """A cap without a scope covers all of the user's keys; its refusal's scope is null."""
    await manager.add_credits("alice", 10_000, "purchase")
    await manager.store.set_spend_cap(SpendCap(user_id="alice", cap_type="daily", limit=40))

    replies = [await _as(gateway, key, "/v1/chat/completions", chat()) for key in ("a", "b")]

    assert [429, 429] == [reply.status for reply in replies]
    assert [(_instant(midnight), "daily", None)] * 2 == [
        (r.json()["error"]["resets_at"], r.json()["error"]["cap_type"], r.json()["error"]["scope"])
        for r in replies
    ]
    assert [_instant(midnight)] * 2 == [r.headers[HEADER_BUDGET_RESETS_AT] for r in replies]


async def test_other_refusals_carry_no_budget_fields(
    manager: CreditManager, gateway: BillingMiddleware
) -> None:
    """A 402 has OpenAI's four error keys and no budget header."""
    await manager.add_credits("alice", 10, "purchase")

    reply = await _as(gateway, "key-a", "/v1/chat/completions", chat())

    assert 402 == reply.status
    assert {"message", "type", "param", "code"} == set(reply.json()["error"])
    assert HEADER_BUDGET_RESETS_AT not in reply.headers
    assert "retry-after" not in reply.headers


def test_a_payer_scope_must_be_a_non_empty_str() -> None:
    """Payer checks scope like team_id, naming it."""
    with pytest.raises(InvalidArgumentError, match="scope"):
        Payer("alice", scope="")
    with pytest.raises(InvalidArgumentError, match="scope"):
        Payer("alice", scope=7)  # type: ignore[arg-type]

    assert ("key_123", None) == (Payer("alice", scope="key_123").scope, Payer("alice").scope)


async def test_a_key_budget_holds_under_racing_requests(
    manager: CreditManager, gateway: BillingMiddleware, upstream: FakeUpstream
) -> None:
    """Key a, capped at 3 requests a day, sends 20 at once beside 20 of key b: 3 + 20 served."""
    await manager.publish_pricing({"models": {"_default": "output_tokens * 10"}, "min_balance": 0})
    await manager.add_credits("alice", 100_000, "purchase")
    await manager.store.set_spend_cap(
        SpendCap(user_id="alice", cap_type="daily", limit=300, scope="key-a")
    )
    statuses: Counter[tuple[str, int]] = Counter()
    body = {"model": "m", "max_tokens": 10, "messages": PROMPT}

    async def send(number: int, key: str) -> None:
        shaped = body | {"stream": True, "stream_options": {"include_usage": True}}
        reply = await _as(gateway, key, "/v1/chat/completions", shaped if number % 2 else body)
        statuses[key, reply.status] += 1

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            for number in range(40):
                tg.start_soon(send, number, "key-a" if number < 20 else "key-b")

    balance = await manager.get_balance("alice")
    assert {("key-a", 200): 3, ("key-a", 429): 17, ("key-b", 200): 20} == dict(statuses)
    assert 23 == upstream.calls
    assert (100_000 - 2_300, 0) == (balance.balance, balance.reserved)
    await assert_invariants(manager.store, "alice")


async def test_a_plain_response_reports_the_scoped_charge(
    manager: CreditManager, gateway: BillingMiddleware
) -> None:
    """A scoped call is charged and reported like any other."""
    await manager.add_credits("alice", 1_000, "purchase")

    reply = await _as(gateway, "key-a", "/v1/chat/completions", chat())

    assert (200, str(COST)) == (reply.status, reply.headers[HEADER_CHARGED])
