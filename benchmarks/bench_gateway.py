"""
What `BillingMiddleware` adds to each request, measured in-process (no network).

An instant fake upstream (a bare ASGI app answering an OpenAI chat request, plain or as a
stream of 10 chunks plus a usage chunk) is driven directly through ASGI, once bare and once
wrapped by the billing middleware, in alternating rounds of the same run. Each billed
request is a real hold and settlement on the store (1,000 users, large balances).

Two ways, for each store and response shape:

- sequential: one request at a time; requests/s for both, and the overhead per request
  (billed minus bare latency) at the median and the 99th percentile, in microseconds;
- concurrent: ``--concurrency`` requests in flight (64 by default), where SQLite's group
  commit lets requests share a transaction and its fsync; requests/s for both, and the
  overhead per request as ``1/throughput`` billed minus bare, in microseconds.

For comparison it also prints the median cost of the same hold and settlement made through
`CreditManager.hold()` alone (the floor the middleware builds on).

    python benchmarks/bench_gateway.py                       # memory and sqlite, asyncio
    python benchmarks/bench_gateway.py --store sqlite --requests 5000 --backend trio
    python benchmarks/bench_gateway.py --synchronous NORMAL  # SQLite's durability level
    python benchmarks/bench_gateway.py --concurrency 0       # sequential only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio

from ducto import CreditManager, MemoryStore, UsageMetrics
from ducto.integrations.asgi import BillingMiddleware, BillingRequest
from ducto.interface.base import CreditStore

PRICING = {"models": {"_default": "input_tokens * 0.01 + output_tokens * 0.03"}, "min_balance": 0}
USERS = 1_000
BODY = json.dumps(
    {
        "model": "gpt-4o-mini",
        "max_tokens": 256,
        "messages": [{"role": "user", "content": "Summarise the meeting notes in three bullets."}],
    }
).encode()
STREAM_BODY = json.dumps({**json.loads(BODY), "stream": True}).encode()
USAGE = {"prompt_tokens": 24, "completion_tokens": 10, "total_tokens": 34}
PLAIN_REPLY = json.dumps(
    {
        "id": "c",
        "object": "chat.completion",
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "a " * 10}}],
        "usage": USAGE,
    }
).encode()
CHUNK = (
    b'data: {"id":"c","object":"chat.completion.chunk","model":"gpt-4o-mini",'
    b'"choices":[{"index":0,"delta":{"content":" word"}}]}\n\n'
)
LAST = (
    "data: " + json.dumps({"id": "c", "choices": [], "usage": USAGE}) + "\n\ndata: [DONE]\n\n"
).encode()

Send = Callable[[dict[str, Any]], Awaitable[None]]


async def upstream(scope: dict[str, Any], receive: Any, send: Send) -> None:
    """An instant model: reads the request, answers plain JSON or a 10-chunk stream."""
    message = await receive()
    if b'"stream": true' in message["body"]:
        headers = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for _ in range(10):
            await send({"type": "http.response.body", "body": CHUNK, "more_body": True})
        await send({"type": "http.response.body", "body": LAST, "more_body": False})
        return
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(PLAIN_REPLY)).encode()),
    ]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": PLAIN_REPLY, "more_body": False})


async def request(app: Any, user: str, body: bytes) -> int:
    """Drive one request through `app`; return its status."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "root_path": "",
        "client": ("127.0.0.1", 1),
        "server": ("bench", 80),
        "headers": [(b"content-type", b"application/json"), (b"x-user", user.encode())],
    }
    status = 0
    received = False

    async def receive() -> dict[str, Any]:
        nonlocal received
        if not received:
            received = True
            return {"type": "http.request", "body": body, "more_body": False}
        await anyio.sleep_forever()
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    return status


def payer(request: BillingRequest) -> str:
    return request.headers["x-user"]


async def hold_only(manager: CreditManager, count: int) -> list[float]:
    """The same hold and settlement through CreditManager.hold() alone, no ASGI (µs each)."""
    estimate = UsageMetrics(model="gpt-4o-mini", input_tokens=14, output_tokens=256)
    actual = UsageMetrics(model="gpt-4o-mini", input_tokens=24, output_tokens=10)
    times = []
    for number in range(count):
        t0 = time.perf_counter_ns()
        async with manager.hold(f"u{number % USERS}", estimate) as hold:
            await hold.settle(actual)
        times.append((time.perf_counter_ns() - t0) / 1000)
    return times


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def concurrently(app: Any, body: bytes, count: int, tasks: int, first: int) -> float:
    """Drive `count` requests with `tasks` in flight; return the wall time in seconds."""
    issued = 0

    async def worker() -> None:
        nonlocal issued
        while issued < count:
            number = first + issued
            issued += 1
            status = await request(app, f"u{number % USERS}", body)
            assert status == 200, status

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(tasks):
            tg.start_soon(worker)
    return time.perf_counter() - started


async def measure(
    store: CreditStore, label: str, requests: int, rounds: int, concurrency: int
) -> None:
    async with CreditManager(store) as manager:
        await manager.store.setup()
        await manager.publish_pricing(PRICING)
        for number in range(USERS):
            await manager.add_credits(f"u{number}", 10**12, "purchase")
        billed = BillingMiddleware(upstream, manager=manager, payer=payer)
        for shape, body in (("plain", BODY), ("stream", STREAM_BODY)):
            times: dict[str, list[float]] = {"off": [], "on": []}
            wall: dict[str, float] = {"off": 0.0, "on": 0.0}
            per_round = requests // rounds
            for round_ in range(rounds):
                for mode, app in (("off", upstream), ("on", billed)):
                    started = time.perf_counter()
                    for number in range(per_round):
                        user = f"u{(round_ * per_round + number) % USERS}"
                        t0 = time.perf_counter_ns()
                        status = await request(app, user, body)
                        times[mode].append((time.perf_counter_ns() - t0) / 1000)
                        assert status == 200, status
                    wall[mode] += time.perf_counter() - started
            off, on = times["off"], times["on"]
            overhead_50 = statistics.median(on) - statistics.median(off)
            overhead_99 = percentile(on, 0.99) - percentile(off, 0.99)
            hold = await hold_only(manager, per_round)
            print(
                f"{label:<13} {shape:<6} sequential  off {len(off) / wall['off']:>8,.0f} req/s"
                f" | on {len(on) / wall['on']:>6,.0f} req/s"
                f" | overhead p50 {overhead_50:>7.1f} µs, p99 {overhead_99:>7.1f} µs"
                f" | hold()+settle() alone p50 {statistics.median(hold):>7.1f} µs"
            )
            if concurrency < 1:
                continue
            spent = {"off": 0.0, "on": 0.0}
            for round_ in range(rounds):
                for mode, app in (("off", upstream), ("on", billed)):
                    first = round_ * per_round
                    spent[mode] += await concurrently(app, body, per_round, concurrency, first)
            rate_off, rate_on = requests / spent["off"], requests / spent["on"]
            print(
                f"{label:<13} {shape:<6} {concurrency:>3} at once off {rate_off:>8,.0f} req/s"
                f" | on {rate_on:>6,.0f} req/s"
                f" | overhead 1/throughput {1e6 / rate_on - 1e6 / rate_off:>7.1f} µs per request"
            )
        balance = await manager.get_balance("u0")
        assert balance.reserved == 0, "a hold was left open"


async def main(args: argparse.Namespace) -> None:
    print(
        f"python {sys.version.split()[0]}, {args.backend}, {args.requests} requests per "
        f"shape and mode in {args.rounds} alternating rounds; {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.2f} at start"
    )
    if args.store in ("memory", "all"):
        await measure(MemoryStore(), "MemoryStore", args.requests, args.rounds, args.concurrency)
    if args.store in ("sqlite", "all"):
        from ducto.interface.sqlite import SQLiteStore

        with tempfile.TemporaryDirectory() as scratch:
            store = SQLiteStore(Path(scratch) / "bench.db", synchronous=args.synchronous)
            label = f"SQLite {args.synchronous}"
            await measure(store, label, args.requests, args.rounds, args.concurrency)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", choices=["memory", "sqlite", "all"], default="all")
    parser.add_argument("--requests", type=int, default=4000, help="per shape and mode")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--synchronous", choices=["NORMAL", "FULL"], default="FULL")
    parser.add_argument(
        "--concurrency", type=int, default=64, help="requests in flight (0: sequential only)"
    )
    arguments = parser.parse_args()
    anyio.run(main, arguments, backend=arguments.backend)
