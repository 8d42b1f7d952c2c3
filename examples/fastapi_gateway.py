"""
An OpenAI-compatible gateway on FastAPI, billed by ducto, in front of a fake streaming model.

The gateway's routes know nothing about billing: `BillingMiddleware` holds credits before
each ``/v1/chat/completions`` call reaches the route, records usage as the response (plain
or streamed) passes, settles when it ends, and charges what was recorded when a client
disconnects. Each API key is a budget scope: one of alice's keys has a daily budget of its
own on her balance, answered with 429 and the time it resets once spent. One API key bills a
team pool instead of its owner. Balances live in SQLite.

    python examples/fastapi_gateway.py           # serve on a free port, make a few requests, exit
    python examples/fastapi_gateway.py --serve   # serve on 127.0.0.1:8000 until Ctrl-C

    curl -N localhost:8000/v1/chat/completions -H 'Authorization: Bearer key-alice' \\
      -d '{"model": "gpt-4o-mini", "stream": true, "messages": [{"role": "user", "content": "Hi"}]}'
    curl localhost:8000/v1/balance -H 'Authorization: Bearer key-alice'

Needs ``fastapi``, ``uvicorn`` and ``httpx`` (all in the ``dev`` extra).
"""

from __future__ import annotations

import argparse
import json
import socket
import tempfile
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import httpx
import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ducto import CreditManager, SpendCap, open_store
from ducto.integrations import Payer
from ducto.integrations.asgi import (
    HEADER_BUDGET_RESETS_AT,
    HEADER_CHARGED,
    HEADER_HELD,
    HEADER_REMAINING,
    BillingMiddleware,
    BillingRequest,
)

# 1 credit = $0.00001. gpt-4o-mini: $0.15 / $0.60 per million input / output tokens, cached
# input at half price; every charge is rounded up once.
PRICING = {
    "models": {
        "gpt-4o-mini": "input_tokens * 0.015 + output_tokens * 0.06",
        "gpt-4o": "input_tokens * 0.25 + output_tokens * 1.0",
    },
    "cache": {"read": "cache_read_tokens * 0.0075", "write": "cache_write_tokens * 0.015"},
    "min_balance": 0,
}
API_KEYS = {
    "key-alice": ("alice", "alice-web"),
    "key-alice-ci": ("alice", "alice-ci"),
    "key-bob": ("bob", "bob-web"),
    "key-carol": ("carol", "carol-web"),
}
"""Each API key's owner and id; the id is the key's budget scope (never the secret itself)."""
KEY_BUDGETS = {("alice", "alice-ci"): 1_000}
"""Daily budgets of single keys, in credits, on their owner's balance."""
TEAM_KEYS: dict[str, str] = {}
"""API keys billed to a team pool, and the pool's id (filled in when the team is created)."""
ANSWER = "Credits are held before the call and settled for what the model really produced."


def payer_for(request: BillingRequest) -> Payer | None:
    """The account behind the request's API key; None (401) for an unknown key."""
    token = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
    if token not in API_KEYS:
        return None
    user_id, key_id = API_KEYS[token]
    return Payer(user_id, {"api_key": key_id}, team_id=TEAM_KEYS.get(token), scope=key_id)


# -- a fake upstream model ---------------------------------------------------------------------


def _prompt_tokens(body: dict[str, Any]) -> int:
    text = " ".join(str(message.get("content", "")) for message in body.get("messages", []))
    return 8 + len(text.split())


async def fake_stream(body: dict[str, Any], delay: float) -> AsyncIterator[bytes]:
    """OpenAI-style chunks, one word each; a final usage chunk when the request asks for it."""
    words = ANSWER.split(" ")[: body.get("max_tokens") or None]
    base = {"id": "chatcmpl-demo", "object": "chat.completion.chunk", "model": body["model"]}
    for number, word in enumerate(words):
        delta = {"content": word if number == 0 else " " + word}
        chunk = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
        yield f"data: {json.dumps(chunk)}\n\n".encode()
        await anyio.sleep(delay)
    if (body.get("stream_options") or {}).get("include_usage"):
        usage = {"prompt_tokens": _prompt_tokens(body), "completion_tokens": len(words)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        yield f"data: {json.dumps({**base, 'choices': [], 'usage': usage})}\n\n".encode()
    yield b"data: [DONE]\n\n"


def fake_completion(body: dict[str, Any]) -> dict[str, Any]:
    words = ANSWER.split(" ")[: body.get("max_tokens") or None]
    prompt = _prompt_tokens(body)
    return {
        "id": "chatcmpl-demo",
        "object": "chat.completion",
        "model": body["model"],
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": " ".join(words)},
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": len(words),
            "total_tokens": prompt + len(words),
            "prompt_tokens_details": {"cached_tokens": 0},
        },
    }


# -- the gateway -------------------------------------------------------------------------------


def build_app(manager: CreditManager, *, chunk_delay: float = 0.01) -> BillingMiddleware:
    """The FastAPI gateway, wrapped by the billing middleware."""
    app = FastAPI(title="ducto gateway example")

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(request: Request) -> StreamingResponse | JSONResponse:
        body = await request.json()
        if body.get("stream"):
            stream = fake_stream(body, chunk_delay)
            return StreamingResponse(stream, media_type="text/event-stream")
        return JSONResponse(fake_completion(body))

    @app.get("/v1/balance")
    async def balance(request: Request) -> dict[str, int | str]:
        token = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if token not in API_KEYS:
            raise HTTPException(401, "unknown API key")
        user_id = API_KEYS[token][0]
        result = await manager.get_balance(user_id)
        return {"user": user_id, "balance": result.balance, "available": result.available}

    return BillingMiddleware(app, manager=manager, payer=payer_for)


# -- running it --------------------------------------------------------------------------------


async def exercise(base_url: str) -> None:
    """Make a few requests against the running gateway and print what happened."""
    alice = {"Authorization": "Bearer key-alice"}
    bob = {"Authorization": "Bearer key-bob"}
    chat = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "How does billing work?"}],
    }
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
        response = await client.post("/v1/chat/completions", json=chat, headers=alice)
        print(
            f"plain:      {response.status_code} held {response.headers[HEADER_HELD]}, "
            f"charged {response.headers[HEADER_CHARGED]}, "
            f"remaining {response.headers[HEADER_REMAINING]}"
        )

        streamed = {**chat, "stream": True, "stream_options": {"include_usage": True}}
        async with client.stream(
            "POST", "/v1/chat/completions", json=streamed, headers=alice
        ) as response:
            lines = [line async for line in response.aiter_lines() if line]
        print(f"streamed:   {response.status_code} {len(lines)} lines, last: {lines[-1]!r}")

        # A client that reads three chunks and hangs up: charged for what was streamed.
        before = (await client.get("/v1/balance", headers=alice)).json()["available"]
        async with client.stream(
            "POST", "/v1/chat/completions", json=streamed, headers=alice
        ) as response:
            read = 0
            async for line in response.aiter_lines():
                read += line.startswith("data:")
                if read == 3:
                    break
        after = before
        for _ in range(100):  # the server settles right after it notices the disconnect
            after = (await client.get("/v1/balance", headers=alice)).json()["available"]
            if after != before:
                break
            await anyio.sleep(0.02)
        print(f"hung up:    after 3 chunks, charged {before - after}")

        # The same request sent twice with one Idempotency-Key is charged once.
        retry = {**alice, "Idempotency-Key": "order-42"}
        first = await client.post("/v1/chat/completions", json=chat, headers=retry)
        second = await client.post("/v1/chat/completions", json=chat, headers=retry)
        print(
            f"retried:    charged {first.headers[HEADER_CHARGED]} then replayed "
            f"{second.headers[HEADER_CHARGED]}, remaining {second.headers[HEADER_REMAINING]}"
        )

        # Alice's CI key has a daily budget of its own: a call it cannot cover is refused
        # with the time the budget resets, while her other key spends on.
        ci = {"Authorization": "Bearer key-alice-ci"}
        big = {**chat, "model": "gpt-4o", "max_tokens": 4000}
        small = await client.post("/v1/chat/completions", json=chat, headers=ci)
        response = await client.post("/v1/chat/completions", json=big, headers=ci)
        print(
            f"key budget: {small.status_code} then {response.status_code} "
            f"{response.json()['error']['code']}, resets at "
            f"{response.headers[HEADER_BUDGET_RESETS_AT]} "
            f"(retry-after {response.headers['retry-after']} s)"
        )
        response = await client.post("/v1/chat/completions", json=big, headers=alice)
        print(f"other key:  {response.status_code} charged {response.headers[HEADER_CHARGED]}")

        # Bob's balance covers almost nothing: refused before the upstream is called.
        response = await client.post("/v1/chat/completions", json=big, headers=bob)
        print(f"bob:        {response.status_code} {response.json()['error']['code']}")
        response = await client.post("/v1/chat/completions", json=chat, headers={})
        print(f"no key:     {response.status_code} {response.json()['error']['code']}")

        # Carol's key bills her team's pool, within her monthly member cap.
        carol = {"Authorization": "Bearer key-carol"}
        response = await client.post("/v1/chat/completions", json=chat, headers=carol)
        print(
            f"team:       {response.status_code} charged {response.headers[HEADER_CHARGED]} "
            f"to the pool, {response.headers[HEADER_REMAINING]} left in it"
        )
        response = await client.post("/v1/chat/completions", json=big, headers=carol)
        print(f"team cap:   {response.status_code} {response.json()['error']['code']}")
        for headers in (alice, bob):
            print("balance:   ", (await client.get("/v1/balance", headers=headers)).json())


async def main(serve: bool, port: int, db: Path) -> None:
    async with CreditManager(open_store(f"sqlite:///{db}")) as manager:
        await manager.store.setup()
        await manager.publish_pricing(PRICING, label="example prices")
        await manager.add_credits("alice", 5_000, "purchase", idempotency_key="alice-signup")
        await manager.add_credits("bob", 100, "purchase", idempotency_key="bob-signup")
        for (user_id, key_id), budget in KEY_BUDGETS.items():
            await manager.store.set_spend_cap(
                SpendCap(user_id=user_id, cap_type="daily", limit=budget, scope=key_id)
            )
        team = await manager.store.create_team("research", 20_000)
        await manager.store.add_team_member(team.team_id, "carol", spend_cap=2_000)
        TEAM_KEYS["key-carol"] = team.team_id
        app = build_app(manager)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port if serve else 0))
        config = uvicorn.Config(app, log_level="warning", lifespan="off")
        server = uvicorn.Server(config)
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.serve, [sock])
            while not server.started:  # noqa: ASYNC110 (uvicorn has no started event)
                await anyio.sleep(0.01)
            host, bound = sock.getsockname()
            print(f"serving on http://{host}:{bound} (SQLite at {db})")
            if not serve:
                started = time.perf_counter()
                await exercise(f"http://{host}:{bound}")
                print(f"done in {time.perf_counter() - started:.2f} s")
                server.should_exit = True
        today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        window = (today, today + timedelta(days=1))
        for row in await manager.store.spend_by_scope(*window, user_id="alice"):
            print(f"spend by key: {row.scope} {row.total_spend} in {row.transaction_count} calls")
        balance = await manager.get_balance("alice")
        pool = await manager.store.get_team_balance(team.team_id)
        assert balance.reserved == pool.reserved == 0, "a hold was left open"
        print("books: no hold left open")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", action="store_true", help="serve until interrupted")
    parser.add_argument("--port", type=int, default=8000, help="port for --serve")
    parser.add_argument("--db", type=Path, help="SQLite file (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        database = args.db or Path(scratch) / "gateway.db"
        anyio.run(main, args.serve, args.port, database)
