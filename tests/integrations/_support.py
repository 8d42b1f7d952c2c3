"""A fake upstream gateway (Starlette) speaking OpenAI and Anthropic shapes, for the tests."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ducto import CreditEvent, CreditEventType, CreditManager
from ducto.integrations import RequestEstimator

PRICING: dict[str, Any] = {
    "models": {"_default": "input_tokens * 1 + output_tokens * 10"},
    "cache": {"read": "cache_read_tokens * 0.5", "write": "cache_write_tokens * 2"},
    "search": {"web": "web_search_calls * 100"},
    "min_balance": 0,
}
"""1 credit per full-rate input token, 10 per output token: charges are easy to check."""

PROMPT_TOKENS = 25
"""What the fake upstream reports for every prompt."""

PROMPT = [{"role": "user", "content": "one two three"}]
"""3 tokens by `word_counter`."""


def word_counter(text: str) -> int:
    """One token per word: estimates and counts the tests can compute by hand."""
    return len(text.split())


def estimator() -> RequestEstimator:
    """An estimator whose figures are word counts with no overheads."""
    return RequestEstimator(counter=word_counter, message_overhead=0)


def words(count: int) -> list[str]:
    return [f"w{number}" for number in range(count)]


def sse(event: dict[str, Any], name: str | None = None) -> bytes:
    head = f"event: {name}\n" if name else ""
    return f"{head}data: {json.dumps(event)}\n\n".encode()


@dataclass
class FakeUpstream:
    """
    The gateway's own routes over a scripted model.

    The answer has ``max_tokens`` words (one token each). ``scenario`` in the request's
    ``metadata`` changes the script: ``stall`` streams `stall_after` words then waits
    forever; ``gate`` waits for `gate` before it starts the response, then streams nothing
    and waits forever; ``fail`` raises after two words; ``error`` answers 500.
    """

    calls: int = 0
    stall_after: int = 3
    gate: anyio.Event = field(default_factory=anyio.Event)
    streamed: int = 0

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/chat/completions", self.chat, methods=["POST"]),
                Route("/v1/messages", self.messages, methods=["POST"]),
                Route("/v1/responses", self.responses, methods=["POST"]),
                Route("/health", self.health, methods=["GET", "POST"]),
            ]
        )

    async def health(self, request: Request) -> Response:
        return JSONResponse({"ok": True})

    async def _start(self, request: Request) -> tuple[dict[str, Any], str, list[str]]:
        self.calls += 1
        body = await request.json()
        scenario = (body.get("metadata") or {}).get("scenario", "")
        limit = body.get("max_tokens") or body.get("max_output_tokens") or 5
        if scenario == "gate":
            await self.gate.wait()  # the response has not started: no byte sent yet
        return body, scenario, words(limit)

    async def _script(self, scenario: str, answer: list[str]) -> AsyncIterator[str]:
        if scenario == "gate":
            await anyio.sleep_forever()
        for number, word in enumerate(answer):
            if scenario == "stall" and number == self.stall_after:
                await anyio.sleep_forever()
            if scenario == "fail" and number == 2:
                raise RuntimeError("upstream connection reset")
            self.streamed += 1
            yield word
            await anyio.lowlevel.checkpoint()

    async def chat(self, request: Request) -> Response:
        body, scenario, answer = await self._start(request)
        if scenario == "error":
            return JSONResponse(
                {"error": {"message": "upstream down", "type": "server_error"}}, 500
            )
        base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": body["model"]}
        usage = {
            "prompt_tokens": PROMPT_TOKENS,
            "completion_tokens": len(answer),
            "total_tokens": PROMPT_TOKENS + len(answer),
        }
        if not body.get("stream"):
            return JSONResponse(
                {
                    "id": "chatcmpl-1",
                    "object": "chat.completion",
                    "model": body["model"],
                    "choices": [
                        {
                            "index": 0,
                            "finish_reason": "stop",
                            "message": {"role": "assistant", "content": " ".join(answer)},
                        }
                    ],
                    "usage": usage,
                }
            )
        include_usage = (body.get("stream_options") or {}).get("include_usage")

        async def stream() -> AsyncIterator[bytes]:
            async for word in self._script(scenario, answer):
                yield sse({**base, "choices": [{"index": 0, "delta": {"content": f" {word}"}}]})
            if include_usage:
                yield sse({**base, "choices": [], "usage": usage})
            yield b"data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    async def messages(self, request: Request) -> Response:
        body, scenario, answer = await self._start(request)
        usage = {
            "input_tokens": PROMPT_TOKENS,
            "cache_read_input_tokens": 0,
            "cache_creation_input_tokens": 0,
            "output_tokens": len(answer),
        }
        if not body.get("stream"):
            return JSONResponse(
                {
                    "id": "msg_1",
                    "type": "message",
                    "role": "assistant",
                    "model": body["model"],
                    "content": [{"type": "text", "text": " ".join(answer)}],
                    "stop_reason": "end_turn",
                    "usage": usage,
                }
            )

        async def stream() -> AsyncIterator[bytes]:
            start = {
                "type": "message_start",
                "message": {
                    "id": "msg_1",
                    "type": "message",
                    "role": "assistant",
                    "model": body["model"],
                    "content": [],
                    "usage": {**usage, "output_tokens": 1},
                },
            }
            first = True
            async for word in self._script(scenario, answer):
                if first:
                    yield sse(start, "message_start")
                    first = False
                delta = {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": f" {word}"},
                }
                yield sse(delta, "content_block_delta")
            yield sse(
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn"},
                    "usage": {"output_tokens": len(answer)},
                },
                "message_delta",
            )
            yield sse({"type": "message_stop"}, "message_stop")

        return StreamingResponse(stream(), media_type="text/event-stream")

    async def responses(self, request: Request) -> Response:
        body, scenario, answer = await self._start(request)
        usage = {
            "input_tokens": PROMPT_TOKENS,
            "input_tokens_details": {"cached_tokens": 5},
            "output_tokens": len(answer),
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": PROMPT_TOKENS + len(answer),
        }
        response = {
            "id": "resp_1",
            "object": "response",
            "model": body["model"],
            "output": [
                {
                    "type": "message",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": " ".join(answer)}],
                }
            ],
            "usage": usage,
        }
        if not body.get("stream"):
            return JSONResponse(response)

        async def stream() -> AsyncIterator[bytes]:
            async for word in self._script(scenario, answer):
                yield sse(
                    {"type": "response.output_text.delta", "delta": f" {word}"},
                    "response.output_text.delta",
                )
            yield sse({"type": "response.completed", "response": response}, "response.completed")

        return StreamingResponse(stream(), media_type="text/event-stream")


class Settled:
    """Waits for the manager to settle or release holds (its events), without timing."""

    def __init__(self, manager: CreditManager) -> None:
        self.count = 0
        self._wanted = 0
        self._event = anyio.Event()
        self.reserved = anyio.Event()
        manager.events.on(CreditEventType.CREDITS_DEDUCTED, self._seen)
        manager.events.on(CreditEventType.RELEASED, self._seen)
        manager.events.on(CreditEventType.RESERVED, lambda event: self.reserved.set())

    def _seen(self, event: CreditEvent) -> None:
        self.count += 1
        if self.count >= self._wanted:
            self._event.set()

    async def wait(self, count: int = 1) -> None:
        """Return once `count` holds in all have been settled or released."""
        self._wanted = count
        if self.count >= count:
            return
        self._event = anyio.Event()
        with anyio.fail_after(30):  # a hang is a failure, not a figure
            await self._event.wait()


async def new_manager(store: Any) -> CreditManager:
    manager = CreditManager(store)
    await manager.publish_pricing(PRICING)
    return manager


# -- driving an ASGI app in-process ------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode()


async def call(
    app: Any,
    path: str,
    body: Any,
    headers: dict[str, str] | None = None,
    *,
    method: str = "POST",
    disconnect_after: int | None = None,
    partial_body: bool = False,
) -> Reply:
    """
    Drive one HTTP request through an ASGI app.

    With `disconnect_after`, the client hangs up once it has received that many non-empty
    body messages (0: before the first byte). With `partial_body`, it hangs up before its
    request body is complete.
    """
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    all_headers = {"content-type": "application/json", "authorization": "Bearer alice"}
    all_headers.update(headers or {})
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.encode(), v.encode()) for k, v in all_headers.items()],
        "client": ("127.0.0.1", 5000),
        "server": ("testserver", 80),
    }
    gone = anyio.Event()
    if disconnect_after == 0:
        gone.set()
    requested = False
    start: dict[str, Any] = {}
    chunks: list[bytes] = []

    async def receive() -> dict[str, Any]:
        nonlocal requested
        if not requested:
            requested = True
            if partial_body:
                gone.set()
                return {"type": "http.request", "body": raw[:3], "more_body": True}
            return {"type": "http.request", "body": raw, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if gone.is_set():
            return  # like a server whose client has gone: the message goes nowhere
        if message["type"] == "http.response.start":
            start.update(message)
        elif message["type"] == "http.response.body" and message.get("body"):
            chunks.append(message["body"])
            if disconnect_after is not None and len(chunks) >= disconnect_after:
                gone.set()

    await app(scope, receive, send)
    headers_out = {k.decode(): v.decode() for k, v in start.get("headers", [])}
    return Reply(start.get("status", 0), headers_out, b"".join(chunks))


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": PROMPT, "max_tokens": 5, **extra}
