"""BillingMiddleware billing team pools in-process: charges, refusals, concurrent members."""

from __future__ import annotations

from collections import Counter
from typing import Any

import anyio
import pytest
from tests.contract._checks import assert_invariants
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
    HEADER_CHARGED,
    HEADER_HELD,
    HEADER_REMAINING,
    BillingMiddleware,
    BillingRequest,
)
from ducto.interface.base import CreditStore
from ducto.interface.models import TransactionRow

pytestmark = pytest.mark.anyio

TEAM_HEADER = "x-team"
"""The fake gateway's resolver bills the team this header names (its API keys would)."""


def _payer(request: BillingRequest) -> Payer | None:
    user = request.headers.get("authorization", "").removeprefix("Bearer ")
    if not user:
        return None
    return Payer(user, {"api_key": f"k-{user}"}, team_id=request.headers.get(TEAM_HEADER))


@pytest.fixture
async def manager(store: CreditStore) -> CreditManager:
    return await new_manager(store)


@pytest.fixture
def upstream() -> FakeUpstream:
    return FakeUpstream()


@pytest.fixture
def gateway(manager: CreditManager, upstream: FakeUpstream) -> BillingMiddleware:
    return BillingMiddleware(upstream.app(), manager=manager, payer=_payer, estimator=estimator())


async def _team(manager: CreditManager, pool: int, *members: tuple[str, int | None]) -> str:
    team = await manager.store.create_team("research", pool)
    for user, cap in members:
        await manager.store.add_team_member(team.team_id, user, spend_cap=cap)
    return team.team_id


async def _team_usage(manager: CreditManager, team_id: str) -> list[TransactionRow]:
    page = await manager.store.list_team_transactions(team_id, limit=1000)
    return [row for row in page.items if row.type == "team_usage"]


async def _as(
    gateway: BillingMiddleware, user: str, team_id: str, body: Any, **headers: str
) -> Reply:
    sent = {"authorization": f"Bearer {user}", TEAM_HEADER: team_id, **headers}
    return await call(gateway, "/v1/chat/completions", body, sent)


# -- charges -----------------------------------------------------------------------------------


async def test_a_member_request_is_held_and_charged_to_the_pool(
    manager: CreditManager, gateway: BillingMiddleware
) -> None:
    """The pool pays, the row names the member, the member's own account is untouched."""
    team_id = await _team(manager, 1_000, ("alice", None))
    await manager.add_credits("alice", 500, "purchase")

    reply = await _as(gateway, "alice", team_id, chat())

    pool = await manager.store.get_team_balance(team_id)
    (row,) = await _team_usage(manager, team_id)
    (member,) = await manager.store.get_team_members(team_id)
    assert 200 == reply.status
    assert (str(3 + 5 * 10), "75", "925") == (
        reply.headers[HEADER_HELD],
        reply.headers[HEADER_CHARGED],
        reply.headers[HEADER_REMAINING],
    )
    assert (925, 0, 925) == (pool.balance, pool.reserved, pool.available)
    assert (-75, "alice", "k-alice", "gpt-4o-mini") == (
        row.amount,
        row.metadata["user_id"],
        row.metadata["api_key"],
        row.metadata["model"],
    )
    assert 75 == member.total_spent
    own = await manager.get_balance("alice")
    assert (500, 0) == (own.balance, own.reserved)
    await assert_invariants(manager.store, "alice")


async def test_a_member_stream_reports_the_pool_in_its_trailer(
    manager: CreditManager, gateway: BillingMiddleware
) -> None:
    """A streamed team request is settled from its usage chunk; the trailer names the pool."""
    team_id = await _team(manager, 1_000, ("alice", None))

    reply = await _as(
        gateway, "alice", team_id, chat(stream=True, stream_options={"include_usage": True})
    )

    assert 200 == reply.status
    assert reply.text.endswith(": ducto credits_charged=75 credits_remaining=925\n\n")
    assert 925 == (await manager.store.get_team_balance(team_id)).balance


async def test_a_member_disconnecting_mid_stream_is_charged_to_the_pool(
    manager: CreditManager, gateway: BillingMiddleware
) -> None:
    """message_start (25 prompt tokens) and three words, then the client left."""
    team_id = await _team(manager, 1_000, ("alice", None))
    body = {**chat(stream=True), "metadata": {"scenario": "stall"}}
    headers = {"authorization": "Bearer alice", TEAM_HEADER: team_id}

    reply = await call(gateway, "/v1/messages", body, headers, disconnect_after=4)

    pool = await manager.store.get_team_balance(team_id)
    assert 4 == reply.text.count("data:")
    assert (1_000 - (PROMPT_TOKENS + 3 * 10), 0) == (pool.balance, pool.reserved)


async def test_an_upstream_error_releases_the_team_hold(
    manager: CreditManager, gateway: BillingMiddleware
) -> None:
    """The pool's hold is freed and nothing is charged."""
    team_id = await _team(manager, 1_000, ("alice", None))

    reply = await _as(gateway, "alice", team_id, chat(metadata={"scenario": "error"}))

    pool = await manager.store.get_team_balance(team_id)
    assert 500 == reply.status
    assert (1_000, 0) == (pool.balance, pool.reserved)
    assert [] == await _team_usage(manager, team_id)


async def test_a_retried_member_request_is_charged_to_the_pool_once(
    manager: CreditManager, gateway: BillingMiddleware
) -> None:
    """The Idempotency-Key keys the team hold and its settlement."""
    team_id = await _team(manager, 1_000, ("alice", None))

    first = await _as(gateway, "alice", team_id, chat(), **{"idempotency-key": "t-1"})
    second = await _as(gateway, "alice", team_id, chat(), **{"idempotency-key": "t-1"})

    assert ("75", "75") == (first.headers[HEADER_CHARGED], second.headers[HEADER_CHARGED])
    assert 1 == len(await _team_usage(manager, team_id))
    assert 925 == (await manager.store.get_team_balance(team_id)).balance


# -- refusals ----------------------------------------------------------------------------------


async def test_a_pool_that_cannot_cover_the_hold_is_402(
    manager: CreditManager, gateway: BillingMiddleware, upstream: FakeUpstream
) -> None:
    """Like a user's balance: 402, the pool's available in the header, upstream not called."""
    team_id = await _team(manager, 50, ("alice", None))
    await manager.add_credits("alice", 10_000, "purchase")  # her own credits do not help

    reply = await _as(gateway, "alice", team_id, chat())

    assert (402, "insufficient_team_balance", "insufficient_quota") == (
        reply.status,
        reply.json()["error"]["code"],
        reply.json()["error"]["type"],
    )
    assert "50" == reply.headers[HEADER_REMAINING]
    assert 0 == upstream.calls


async def test_a_member_over_its_cap_is_429(
    manager: CreditManager, gateway: BillingMiddleware, upstream: FakeUpstream
) -> None:
    """The member's monthly cap refuses the hold although the pool could pay."""
    team_id = await _team(manager, 10_000, ("alice", 40))

    reply = await _as(gateway, "alice", team_id, chat())

    assert (429, "spend_cap_exceeded") == (reply.status, reply.json()["error"]["code"])
    assert 0 == upstream.calls


async def test_a_user_outside_the_team_or_an_unknown_team_is_403(
    manager: CreditManager, gateway: BillingMiddleware, upstream: FakeUpstream
) -> None:
    """Both are refused as permission errors, each with its own code."""
    team_id = await _team(manager, 10_000, ("alice", None))

    outsider = await _as(gateway, "mallory", team_id, chat())
    unknown = await _as(gateway, "alice", "team-that-does-not-exist", chat())

    assert (403, "user_not_in_team", "permission_error") == (
        outsider.status,
        outsider.json()["error"]["code"],
        outsider.json()["error"]["type"],
    )
    assert (403, "team_not_found", "permission_error") == (
        unknown.status,
        unknown.json()["error"]["code"],
        unknown.json()["error"]["type"],
    )
    assert 0 == upstream.calls
    assert 10_000 == (await manager.store.get_team_balance(team_id)).available


def test_a_payer_team_must_be_a_non_empty_str() -> None:
    """Payer checks team_id like user_id."""
    with pytest.raises(InvalidArgumentError, match="team_id"):
        Payer("alice", team_id="")
    with pytest.raises(InvalidArgumentError, match="team_id"):
        Payer("alice", team_id=7)  # type: ignore[arg-type]

    assert "t" == Payer("alice", {"k": 1}, team_id="t").team_id


# -- concurrency -------------------------------------------------------------------------------


async def _race(gateway: BillingMiddleware, requests: list[tuple[str, str]]) -> Counter[int]:
    """Send every (user, team) request at once; count the statuses."""
    statuses: Counter[int] = Counter()
    body = {"model": "m", "max_tokens": 10, "messages": PROMPT}

    async def send(number: int, user: str, team_id: str) -> None:
        shaped = body | {"stream": True, "stream_options": {"include_usage": True}}
        reply = await _as(gateway, user, team_id, shaped if number % 2 else body)
        statuses[reply.status] += 1

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            for number, (user, team_id) in enumerate(requests):
                tg.start_soon(send, number, user, team_id)
    return statuses


async def test_fifty_member_requests_against_a_pool_for_ten(
    manager: CreditManager, gateway: BillingMiddleware, upstream: FakeUpstream
) -> None:
    """Five members send 10 requests each, each costing its 100-credit hold: 10 are served."""
    await manager.publish_pricing({"models": {"_default": "output_tokens * 10"}, "min_balance": 0})
    members = [f"member-{number}" for number in range(5)]
    team_id = await _team(manager, 1_000, *((member, None) for member in members))

    statuses = await _race(gateway, [(members[n % 5], team_id) for n in range(50)])

    pool = await manager.store.get_team_balance(team_id)
    rows = await _team_usage(manager, team_id)
    assert {200: 10, 402: 40} == dict(statuses)
    assert 10 == upstream.calls
    assert (0, 0, 0) == (pool.balance, pool.reserved, pool.available)
    assert [-100] * 10 == [row.amount for row in rows]


async def test_a_member_cap_holds_under_racing_requests(
    manager: CreditManager, gateway: BillingMiddleware, upstream: FakeUpstream
) -> None:
    """A member capped at 3 requests sends 20 at once with an uncapped one: 3 + 20 served."""
    await manager.publish_pricing({"models": {"_default": "output_tokens * 10"}, "min_balance": 0})
    team_id = await _team(manager, 100_000, ("capped", 300), ("free", None))
    requests = [("capped", team_id), ("free", team_id)] * 20

    statuses = await _race(gateway, requests)

    members = {m.user_id: m.total_spent for m in await manager.store.get_team_members(team_id)}
    pool = await manager.store.get_team_balance(team_id)
    assert {200: 23, 429: 17} == dict(statuses)
    assert 23 == upstream.calls
    assert {"capped": 300, "free": 2_000} == members
    assert (100_000 - 2_300, 0) == (pool.balance, pool.reserved)
