"""
End to end: a real server (uvicorn on asyncio, hypercorn on asyncio and trio) and a real
streaming HTTP client (httpx) on loopback, through BillingMiddleware.
"""

from __future__ import annotations

import json
import re
import socket
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from functools import partial
from typing import Any

import anyio
import httpx
import pytest
from tests.contract._checks import assert_invariants
from tests.integrations._support import (
    PROMPT_TOKENS,
    FakeUpstream,
    Settled,
    estimator,
    new_manager,
)

from ducto import CreditManager
from ducto.integrations import Payer
from ducto.integrations.asgi import HEADER_CHARGED, BillingMiddleware, BillingRequest
from ducto.interface.base import CreditStore

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["uvicorn", "hypercorn"])
def server_kind(request: pytest.FixtureRequest, anyio_backend: str) -> str:
    """The ASGI server; uvicorn serves asyncio only."""
    kind = str(request.param)
    if kind == "uvicorn" and anyio_backend != "asyncio":
        pytest.skip("uvicorn serves asyncio only")
    return kind


@asynccontextmanager
async def serving(app: Any, kind: str, backend: str) -> AsyncIterator[str]:
    """Serve `app` on a free loopback port; yield its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with sock:
        async with _serve(app, kind, backend, sock, url) as served:
            yield served


@asynccontextmanager
async def _serve(
    app: Any, kind: str, backend: str, sock: socket.socket, url: str
) -> AsyncIterator[str]:
    async with anyio.create_task_group() as tg:
        if kind == "uvicorn":
            import uvicorn

            server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
            tg.start_soon(server.serve, [sock])
            with anyio.fail_after(30):
                while not server.started:  # noqa: ASYNC110 (uvicorn has no started event)
                    await anyio.sleep(0.01)
            try:
                yield url
            finally:
                server.should_exit = True
        else:
            from hypercorn.config import Config

            if backend == "trio":
                from hypercorn.trio import serve
            else:
                from hypercorn.asyncio import serve  # type: ignore[assignment]
            sock.listen(128)
            config = Config()
            config.bind = [f"fd://{sock.detach()}"]  # hypercorn owns and closes it now
            config.graceful_timeout = 1
            config.errorlog = None
            stop = anyio.Event()
            tg.start_soon(partial(serve, app, config, shutdown_trigger=stop.wait))
            async with httpx.AsyncClient(base_url=url) as probe:
                with anyio.fail_after(30):
                    while True:
                        try:
                            await probe.get("/health")
                            break
                        except httpx.TransportError:
                            await anyio.sleep(0.01)
            try:
                yield url
            finally:
                stop.set()


def _payer(request: BillingRequest) -> str | None:
    return request.headers.get("authorization", "").removeprefix("Bearer ") or None


@pytest.fixture
async def manager(store: CreditStore) -> CreditManager:
    return await new_manager(store)


def _gateway(manager: CreditManager, upstream: FakeUpstream) -> BillingMiddleware:
    return BillingMiddleware(upstream.app(), manager=manager, payer=_payer, estimator=estimator())


async def test_fifty_concurrent_requests_against_a_balance_for_ten(
    manager: CreditManager, server_kind: str, anyio_backend: str, user_id: str
) -> None:
    """50 requests at once, each costing exactly its 100-credit hold: 10 served, 40 get 402."""
    await manager.publish_pricing({"models": {"_default": "output_tokens * 10"}, "min_balance": 0})
    await manager.add_credits(user_id, 1_000, "purchase")
    upstream = FakeUpstream()
    statuses: Counter[int] = Counter()
    charged: list[str] = []

    async def request(client: httpx.AsyncClient, number: int) -> None:
        body = {"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
        if number % 2:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            text = (await response.aread()).decode()
        statuses[response.status_code] += 1
        if response.status_code == 200:
            found = re.search(r"credits_charged=(\d+)", text)
            charged.append(response.headers.get(HEADER_CHARGED) or (found[1] if found else ""))

    headers = {"authorization": f"Bearer {user_id}"}
    async with serving(_gateway(manager, upstream), server_kind, anyio_backend) as url:
        limits = httpx.Limits(max_connections=50)
        async with (
            httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=30) as client,
            anyio.create_task_group() as tg,
        ):
            for number in range(50):
                tg.start_soon(request, client, number)

    balance = await manager.get_balance(user_id)
    assert {200: 10, 402: 40} == dict(statuses)
    assert 10 == upstream.calls
    assert ["100"] * 10 == charged
    assert (0, 0) == (balance.balance, balance.reserved)
    await assert_invariants(manager.store, user_id)


# Abandoning an httpx stream midway leaves httpx's inner response generators to the garbage
# collector, which trio reports; the stream itself is closed by the `async with`.
@pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <async_generator object:pytest.PytestUnraisableExceptionWarning"
)
async def test_client_disconnecting_mid_stream_is_charged_what_was_recorded(
    manager: CreditManager, server_kind: str, anyio_backend: str, user_id: str
) -> None:
    """The prompt (25 tokens) and the 3 words streamed before the client hung up, exactly."""
    await manager.add_credits(user_id, 1_000, "purchase")
    upstream = FakeUpstream(stall_after=3)
    settled = Settled(manager)
    body = {
        "model": "claude-sonnet-4",
        "max_tokens": 20,
        "stream": True,
        "messages": [{"role": "user", "content": "tell me a story"}],
        "metadata": {"scenario": "stall"},
    }

    async with serving(_gateway(manager, upstream), server_kind, anyio_backend) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            headers = {"authorization": f"Bearer {user_id}"}
            async with client.stream(
                "POST", "/v1/messages", json=body, headers=headers
            ) as response:
                events = []
                async with aclosing(response.aiter_lines()) as stream:
                    async for line in stream:
                        if line.startswith("data:"):
                            events.append(json.loads(line[5:]))
                        if len(events) == 4:  # message_start and three words
                            break
        await settled.wait()
        balance = await manager.get_balance(user_id)

    assert 3 == upstream.streamed
    assert ["message_start"] + ["content_block_delta"] * 3 == [e["type"] for e in events]
    assert (1_000 - (PROMPT_TOKENS + 3 * 10), 0) == (balance.balance, balance.reserved)
    await assert_invariants(manager.store, user_id)


async def test_client_gone_before_the_first_byte_leaves_no_hold(
    manager: CreditManager, server_kind: str, anyio_backend: str, user_id: str
) -> None:
    """The client hangs up while the route has not started its response: the hold is freed."""
    await manager.add_credits(user_id, 1_000, "purchase")
    upstream = FakeUpstream()
    settled = Settled(manager)
    body = {
        "model": "claude-sonnet-4",
        "max_tokens": 20,
        "stream": True,
        "messages": [{"role": "user", "content": "hello"}],
        "metadata": {"scenario": "gate"},
    }

    async with serving(_gateway(manager, upstream), server_kind, anyio_backend) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:

            async def send_and_wait() -> None:
                headers = {"authorization": f"Bearer {user_id}"}
                async with client.stream("POST", "/v1/messages", json=body, headers=headers):
                    pass

            async with anyio.create_task_group() as tg:
                tg.start_soon(send_and_wait)
                with anyio.fail_after(30):
                    await settled.reserved.wait()
                held = await manager.get_balance(user_id)
                tg.cancel_scope.cancel()  # the client gives up and closes its connection
        upstream.gate.set()  # the route goes on; the server finds its client gone
        await settled.wait()
        balance = await manager.get_balance(user_id)

    assert 1 + 20 * 10 == held.reserved  # the one-word prompt and max_tokens
    assert (1_000, 0, 1_000) == (balance.balance, balance.reserved, balance.available)
    await assert_invariants(manager.store, user_id)


async def test_retried_request_with_the_same_idempotency_key_is_charged_once(
    manager: CreditManager, server_kind: str, anyio_backend: str, user_id: str
) -> None:
    """Two identical streamed requests with one Idempotency-Key: both served, one charge."""
    await manager.add_credits(user_id, 1_000, "purchase")
    upstream = FakeUpstream()
    body = {
        "model": "gpt-4o",
        "max_tokens": 4,
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": "hi"}],
    }
    headers = {"authorization": f"Bearer {user_id}", "idempotency-key": "retry-1"}
    trailers = []

    async with (
        serving(_gateway(manager, upstream), server_kind, anyio_backend) as url,
        httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as client,
    ):
        for _ in range(2):
            async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                lines = [line async for line in response.aiter_lines() if line]
            assert 200 == response.status_code
            trailers.append(lines[-1])

    balance = await manager.get_balance(user_id)
    expected = PROMPT_TOKENS + 4 * 10
    assert [f": ducto credits_charged={expected} credits_remaining={1_000 - expected}"] * 2 == (
        trailers
    )
    assert (1_000 - expected, 0) == (balance.balance, balance.reserved)
    await assert_invariants(manager.store, user_id)


def _team_payer(request: BillingRequest) -> Payer | None:
    user = request.headers.get("authorization", "").removeprefix("Bearer ")
    return Payer(user, team_id=request.headers.get("x-team")) if user else None


async def _race_members(
    manager: CreditManager,
    server_kind: str,
    anyio_backend: str,
    team_id: str,
    members: list[str],
) -> tuple[Counter[int], Counter[str], FakeUpstream]:
    """One streamed or plain request per entry of `members`, all at once, through a server."""
    upstream = FakeUpstream()
    gateway = BillingMiddleware(
        upstream.app(), manager=manager, payer=_team_payer, estimator=estimator()
    )
    statuses: Counter[int] = Counter()
    codes: Counter[str] = Counter()

    async def request(client: httpx.AsyncClient, number: int, member: str) -> None:
        body = {"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
        if number % 2:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
        headers = {"authorization": f"Bearer {member}", "x-team": team_id}
        async with client.stream(
            "POST", "/v1/chat/completions", json=body, headers=headers
        ) as response:
            text = (await response.aread()).decode()
        statuses[response.status_code] += 1
        if response.status_code != 200:
            codes[json.loads(text)["error"]["code"]] += 1

    async with serving(gateway, server_kind, anyio_backend) as url:
        limits = httpx.Limits(max_connections=len(members))
        async with (
            httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client,
            anyio.create_task_group() as tg,
        ):
            for number, member in enumerate(members):
                tg.start_soon(request, client, number, member)
    return statuses, codes, upstream


async def test_fifty_member_requests_against_a_pool_for_ten(
    manager: CreditManager, server_kind: str, anyio_backend: str
) -> None:
    """Five members, 10 requests each at once, each costing its 100-credit hold: 10 served."""
    await manager.publish_pricing({"models": {"_default": "output_tokens * 10"}, "min_balance": 0})
    members = [f"member-{number}" for number in range(5)]
    team = await manager.store.create_team("research", 1_000)
    for member in members:
        await manager.store.add_team_member(team.team_id, member)

    statuses, codes, upstream = await _race_members(
        manager, server_kind, anyio_backend, team.team_id, members * 10
    )

    pool = await manager.store.get_team_balance(team.team_id)
    spent = [m.total_spent for m in await manager.store.get_team_members(team.team_id)]
    assert {200: 10, 402: 40} == dict(statuses)
    assert {"insufficient_team_balance": 40} == dict(codes)
    assert 10 == upstream.calls
    assert (0, 0) == (pool.balance, pool.reserved)
    assert 1_000 == sum(spent)


async def test_a_member_cap_holds_under_racing_requests(
    manager: CreditManager, server_kind: str, anyio_backend: str
) -> None:
    """A member capped at 3 requests sends 20 at once beside an uncapped member's 20."""
    await manager.publish_pricing({"models": {"_default": "output_tokens * 10"}, "min_balance": 0})
    team = await manager.store.create_team("research", 100_000)
    await manager.store.add_team_member(team.team_id, "capped", spend_cap=300)
    await manager.store.add_team_member(team.team_id, "free")

    statuses, codes, upstream = await _race_members(
        manager, server_kind, anyio_backend, team.team_id, ["capped", "free"] * 20
    )

    spent = {m.user_id: m.total_spent for m in await manager.store.get_team_members(team.team_id)}
    pool = await manager.store.get_team_balance(team.team_id)
    assert {200: 23, 429: 17} == dict(statuses)
    assert {"spend_cap_exceeded": 17} == dict(codes)
    assert 23 == upstream.calls
    assert {"capped": 300, "free": 2_000} == spent
    assert (100_000 - 2_300, 0) == (pool.balance, pool.reserved)
