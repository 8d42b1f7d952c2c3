"""
Billing for OpenAI- and Anthropic-style endpoints of any ASGI app, streamed or not.

`BillingMiddleware` wraps an ASGI app (Starlette, FastAPI, or a bare ASGI callable; it
imports neither). For each ``POST`` to a billed path it reads the request, resolves who
pays, places a hold for the estimate and only then calls the app, watching the response
as it passes:

```python
app = FastAPI()
...  # the gateway's routes, unchanged: they call the upstream and return its response
app.add_middleware(BillingMiddleware, manager=manager, payer=user_from_api_key)
```

A resolver that returns ``Payer(user_id, team_id=...)`` bills the team pool: the hold is
placed on the pool for that member (`CreditManager.hold` with ``team_id``), and the usage
is charged to the pool as the member's ``team_usage``. One that returns
``Payer(user_id, scope=api_key_id)`` puts the call in that budget scope: the user's spend
caps scoped to it are checked when the hold is placed, and the usage row carries it.

The hold's whole life is inside the middleware's own ``await`` of the app: it is placed
before the app runs, and when the app returns, raises or is cancelled (client gone,
before or after the first byte) it is settled for the usage recorded so far, or released
when nothing was recorded, shielded from cancellation. Nothing depends on a response body
generator that may never start.

What the client sees:

- a refusal as an HTTP error in OpenAI's error JSON shape (``{"error": {"message", "type",
  "param", "code"}}``, plus ``"type": "error"`` on Anthropic routes): 402 not enough
  credits (the user's, or the team pool's), 429 spend cap (the user's, or a team member's
  monthly cap), 403 a team the member does not belong to or that does not exist, 409
  idempotency conflict, 400 invalid request, 401 no payer, 413 body too large; the
  upstream is never called. A spend-cap refusal also says when the cap's window resets:
  ``resets_at`` (ISO 8601 UTC), ``cap_type`` and ``scope`` in the error object, and the
  ``x-ducto-budget-resets-at`` and ``retry-after`` (seconds) headers;
- ``x-ducto-credits-held`` on every billed response; on a plain (not streamed) response
  also ``x-ducto-credits-charged`` and ``x-ducto-credits-remaining`` (the response start is
  held back until the body is complete and settled); on a stream the same figures arrive
  as a final SSE comment line, ``: ducto credits_charged=N credits_remaining=M``, which SSE
  clients ignore. For a request billed to a team pool, "remaining" is the pool's;
- an ``Idempotency-Key`` request header keys the hold and its settlement, so a retried
  request is charged at most once.
"""

from __future__ import annotations

import inspect
import json
import logging
import re
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any, Final

import anyio

from ducto._shown import shown
from ducto.errors import (
    CreditError,
    DuctoError,
    InsufficientCreditsError,
    InsufficientTeamBalanceError,
    InvalidArgumentError,
)
from ducto.integrations._estimate import RequestEstimator
from ducto.integrations._payer import Payer, _as_payer, _hold_metadata
from ducto.integrations._refusal import (
    HEADER_BUDGET_RESETS_AT,
    _budget_fields,
    _budget_headers,
    _status,
)
from ducto.integrations._usage import Api, StreamUsage, _api, _provider_of
from ducto.interface.models import DeductionResult
from ducto.manager import CreditManager, Hold

__all__ = [
    "ASGIApp",
    "BillingMiddleware",
    "BillingRequest",
    "DEFAULT_ROUTES",
    "HEADER_BUDGET_RESETS_AT",
    "HEADER_CHARGED",
    "HEADER_HELD",
    "HEADER_REMAINING",
    "PayerResolver",
]

_log = logging.getLogger("ducto.integrations.asgi")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
"""An ASGI 3 application."""

HEADER_HELD: Final = "x-ducto-credits-held"
"""Response header: the credits held for the request."""
HEADER_CHARGED: Final = "x-ducto-credits-charged"
"""Response header: the credits the request cost (paid by the balance plus the allowance)."""
HEADER_REMAINING: Final = "x-ducto-credits-remaining"
"""Response header: what the account can still spend."""

DEFAULT_ROUTES: Final[Mapping[str, Api]] = {
    "/v1/chat/completions": Api.OPENAI_CHAT,
    "/chat/completions": Api.OPENAI_CHAT,
    "/v1/completions": Api.OPENAI_COMPLETIONS,
    "/v1/embeddings": Api.OPENAI_EMBEDDINGS,
    "/v1/responses": Api.OPENAI_RESPONSES,
    "/v1/messages": Api.ANTHROPIC_MESSAGES,
}
"""The paths billed by default and the API shape of each."""

_MAX_EVENT_BYTES: Final = 16 * 1024 * 1024
"""Largest SSE event parsed for usage; a bigger one is passed on and counted as nothing."""

_PENDING_BYTES: Final = 64 * 1024
"""Most bytes of undecoded SSE events kept per stream before they are decoded (see `_Exchange`)."""

_DECISIVE: Final[Mapping[Api, re.Pattern[bytes]]] = {
    # Events that can carry a stream's final (or Anthropic's cumulative) usage. Every other
    # event only adds streamed text (or a web search) to a total, in any order, so it can
    # wait; one that is missed here is decoded with the rest when the stream ends early.
    Api.OPENAI_CHAT: re.compile(rb'"usage"\s*:\s*\{'),
    Api.OPENAI_COMPLETIONS: re.compile(rb'"usage"\s*:\s*\{'),
    Api.OPENAI_EMBEDDINGS: re.compile(rb'"usage"\s*:\s*\{'),
    Api.OPENAI_RESPONSES: re.compile(rb'"response\.(?:completed|incomplete|failed)"'),
    Api.ANTHROPIC_MESSAGES: re.compile(rb'"message_(?:start|delta|stop)"'),
}

_HELD: Final = HEADER_HELD.encode()
_CHARGED: Final = HEADER_CHARGED.encode()
_REMAINING: Final = HEADER_REMAINING.encode()


@dataclass(frozen=True, slots=True)
class BillingRequest:
    """
    A billed request, as the payer resolver sees it.

    Attributes:
        api: The API shape of the endpoint.
        path: The request path.
        headers: The request headers, names in lower case (repeated headers joined by
            ``", "``).
        body: The parsed JSON body.
        scope: The ASGI scope (for the client address, the app state, ...).
    """

    api: Api
    path: str
    headers: Mapping[str, str]
    body: Mapping[str, Any]
    scope: Scope


PayerResolver = Callable[[BillingRequest], Awaitable[Payer | str | None] | Payer | str | None]
"""Names who pays for a request: a user id, a `Payer`, or None to refuse it (401)."""


class _BodyTooLarge(Exception):
    pass


class _SSEParser:
    """Splits a byte stream into the ``data`` payloads of its server-sent events."""

    __slots__ = ("_buffer", "_overflow")

    def __init__(self) -> None:
        self._buffer = b""
        self._overflow = False

    def feed(self, chunk: bytes) -> list[bytes]:
        buffer = self._buffer + chunk if self._buffer else chunk
        # Keep a trailing CR: it may be the first half of a CRLF split across chunks.
        keep = b""
        if b"\r" in buffer:
            if buffer.endswith(b"\r"):
                buffer, keep = buffer[:-1], b"\r"
            buffer = buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        events = buffer.split(b"\n\n")
        rest = events.pop() + keep
        if len(rest) > _MAX_EVENT_BYTES:
            rest, self._overflow = b"", True
        self._buffer = rest
        payloads = []
        for event in events:
            if event.startswith(b"data: ") and b"\n" not in event:
                payloads.append(event[6:])  # the usual event: one data line
                continue
            data = [
                line[5:].removeprefix(b" ")
                for line in event.split(b"\n")
                if line.startswith(b"data:")
            ]
            if data:
                payloads.append(b"\n".join(data))
        return payloads


def _json(raw: bytes) -> Any:
    """
    ``json.loads(raw)``, sparing it the work of guessing the encoding of UTF-8 text.

    Raises:
        ValueError: `raw` is not JSON.
    """
    try:
        return json.loads(raw.decode())
    except ValueError:  # not UTF-8 (or a BOM): let json find the encoding, or fail
        return json.loads(raw)


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


def _error_body(
    api: Api, message: str, type_: str, code: str, extra: Mapping[str, object] | None = None
) -> bytes:
    error: dict[str, Any] = {"message": message, "type": type_, "param": None, "code": code}
    error.update(extra or {})
    body: dict[str, Any] = {"error": error}
    if _provider_of(api) == "anthropic":
        body = {"type": "error", "error": error}
    return json.dumps(body).encode()


async def _send_json(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _refusal(exc: DuctoError) -> tuple[int, str, str]:
    """HTTP status, error type and error code for an exception raised placing a hold."""
    return _status(exc) or (503, "api_error", "billing_unavailable")


def _figures(result: DeductionResult) -> tuple[int, int]:
    """The credits a settlement cost (balance plus allowance) and what remains spendable."""
    return result.charged + result.allowance_consumed, result.available


class BillingMiddleware:
    """
    ASGI middleware that bills OpenAI- and Anthropic-style endpoints (see the module).

    Requests that are not ``POST`` to one of `routes` pass through untouched.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        manager: CreditManager,
        payer: PayerResolver,
        routes: Mapping[str, Api | str] | None = None,
        estimator: RequestEstimator | None = None,
        operation_type: str = "llm_call",
        hold_ttl: float | None = None,
        max_body_bytes: int = 32 * 1024 * 1024,
    ) -> None:
        """
        Wrap `app`.

        Args:
            app: The ASGI app whose responses are billed.
            manager: Prices usage and holds credits; its pricing must be loaded.
            payer: Names who pays for a request (sync or async); None refuses it with 401.
            routes: Billed paths and their API shape; `DEFAULT_ROUTES` when None.
            estimator: Sizes holds; a default `RequestEstimator` when None.
            operation_type: Stored with each hold.
            hold_ttl: Seconds a hold counts for; the manager's ``hold_ttl`` when None.
            max_body_bytes: Larger request bodies are refused with 413.

        Raises:
            InvalidArgumentError: An argument has the wrong type or a route an unknown API.
        """
        if not isinstance(manager, CreditManager):
            raise InvalidArgumentError(f"manager must be a CreditManager, got {shown(manager)}")
        if not callable(payer):
            raise InvalidArgumentError(f"payer must be callable, got {shown(payer)}")
        if type(max_body_bytes) is not int or max_body_bytes < 1:
            raise InvalidArgumentError(
                f"max_body_bytes must be a positive int, got {shown(max_body_bytes)}"
            )
        if estimator is not None and not isinstance(estimator, RequestEstimator):
            raise InvalidArgumentError(
                f"estimator must be a RequestEstimator, got {shown(estimator)}"
            )
        self.app = app
        self._manager = manager
        self._payer = payer
        source = DEFAULT_ROUTES if routes is None else routes
        self._routes = {path.rstrip("/") or "/": _api(api) for path, api in source.items()}
        self._estimator = estimator if estimator is not None else RequestEstimator()
        self._operation_type = operation_type
        self._ttl = hold_ttl
        self._max_body = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one ASGI connection, billing it when it is a billed request."""
        if scope["type"] == "http" and scope.get("method") == "POST":
            path: str = scope.get("path", "")
            api = self._routes.get(path.rstrip("/") or "/")
            if api is not None:
                await self._bill(api, path, scope, receive, send)
                return
        await self.app(scope, receive, send)

    # -- one request ---------------------------------------------------------------------------

    async def _read_body(self, receive: Receive) -> bytes | None:
        """The whole request body, or None when the client left before sending it."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self._max_body:
                raise _BodyTooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _resolve(self, request: BillingRequest) -> Payer | None:
        answer = self._payer(request)
        if inspect.isawaitable(answer):
            answer = await answer
        return _as_payer(answer, "the payer resolver")

    async def _bill(self, api: Api, path: str, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            raw = await self._read_body(receive)
        except _BodyTooLarge:
            message = f"request body is larger than {self._max_body} bytes"
            body = _error_body(api, message, "invalid_request_error", "body_too_large")
            await _send_json(send, 413, body)
            return
        if raw is None:
            return  # the client left before its request was complete: nothing to bill
        try:
            parsed = _json(raw)
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            message = "request body must be a JSON object"
            await _send_json(
                send, 400, _error_body(api, message, "invalid_request_error", "invalid_json")
            )
            return
        headers: dict[str, str] = {}
        for key, value in scope.get("headers", ()):
            name = key.decode("latin-1").lower()
            text = value.decode("latin-1")
            headers[name] = f"{headers[name]}, {text}" if name in headers else text
        request = BillingRequest(api, path, headers, parsed, scope)
        payer = await self._resolve(request)
        if payer is None:
            body = _error_body(
                api,
                "no account to bill for this request",
                "authentication_error",
                "unauthenticated",
            )
            await _send_json(send, 401, body)
            return
        key = headers.get("idempotency-key") or None
        try:
            estimate = self._estimator.estimate(api, parsed)
            metadata = _hold_metadata(payer, api=api.value)
            hold = self._manager.hold(
                payer.user_id,
                estimate,
                operation_type=self._operation_type,
                idempotency_key=key,
                metadata=metadata,
                ttl=self._ttl,
                team_id=payer.team_id,
            )
            await hold.__aenter__()
        except (CreditError, InvalidArgumentError) as exc:
            await self._refuse(api, exc, send)
            return
        tracker = StreamUsage(
            api,
            model=estimate.model,
            input_estimate=estimate.input_tokens,
            counter=self._estimator.counter,
        )
        exchange = _Exchange(api, hold, tracker, send)
        try:
            await self.app(scope, _replay(raw, receive), exchange.send)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await exchange.finish(failed=True)
            raise
        await exchange.finish(failed=False)

    async def _refuse(self, api: Api, exc: DuctoError, send: Send) -> None:
        status, type_, code = _refusal(exc)
        headers: list[tuple[bytes, bytes]] = []
        if isinstance(exc, InsufficientCreditsError | InsufficientTeamBalanceError):
            headers.append((_REMAINING, str(max(exc.available, 0)).encode()))
        headers.extend(
            (name.encode(), value.encode()) for name, value in _budget_headers(exc).items()
        )
        body = _error_body(api, str(exc), type_, code, _budget_fields(exc))
        await _send_json(send, status, body, headers)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that hands the app the body already read, then the client's messages."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


class _Exchange:
    """
    The response side of one billed request: watches, settles, adds the figures.

    A stream is passed on chunk by chunk, but not parsed chunk by chunk. Its bytes wait
    (up to `_PENDING_BYTES`) until a chunk may hold an event that carries the final usage
    (`_DECISIVE`); then what waited is split into events, those events are decoded, and
    the others (streamed text, counted only when the final usage never arrives) wait
    undecoded. Before the hold is resolved, everything still waiting is split, and decoded
    unless the final usage made it irrelevant. So a stream that ends with its usage costs
    one split and one decoded event, and one cut short, or whose usage did not look like
    usage, is still charged for every event it streamed.
    """

    __slots__ = (
        "_api",
        "_buffer",
        "_decisive",
        "_hold",
        "_pending",
        "_pending_bytes",
        "_pending_start",
        "_raw",
        "_raw_bytes",
        "_resolved",
        "_result",
        "_sent_start",
        "_settle_error",
        "_sse",
        "_streaming",
        "_tracker",
        "_trailer",
        "_upstream",
        "billable",
    )

    def __init__(self, api: Api, hold: Hold, tracker: StreamUsage, send: Send) -> None:
        self._api = api
        self._hold = hold
        self._tracker = tracker
        self._upstream = send
        self._pending_start: Message | None = None
        self._buffer: list[bytes] = []
        self._sse: _SSEParser | None = None
        self._decisive = _DECISIVE[api]
        self._raw: list[bytes] = []
        self._raw_bytes = 0
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._streaming = False
        self._trailer = False
        self._sent_start = False
        self._resolved = False
        self._result: DeductionResult | None = None
        self._settle_error: DuctoError | None = None
        self.billable = False

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            await self._start(message)
        elif kind == "http.response.body":
            await self._body(message)
        else:
            await self._upstream(message)

    async def _start(self, message: Message) -> None:
        status = int(message["status"])
        headers = list(message.get("headers", ()))
        content_type = (_header(headers, b"content-type") or b"").lower()
        self.billable = 200 <= status < 300
        self._streaming = content_type.startswith(b"text/event-stream")
        headers.append((_HELD, str(self._hold.estimate_credits).encode()))
        start = {**message, "headers": headers}
        if self.billable and not self._streaming:
            self._pending_start = start  # sent with the figures once the body is settled
            return
        if self._streaming and self.billable:
            self._sse = _SSEParser()
            self._trailer = _header(headers, b"content-length") is None
        self._sent_start = True
        await self._upstream(start)

    async def _body(self, message: Message) -> None:
        if self._sse is not None:
            chunk: bytes = message.get("body", b"")
            if chunk:
                self._raw.append(chunk)
                self._raw_bytes += len(chunk)
                if self._raw_bytes > _PENDING_BYTES or self._decisive.search(chunk) is not None:
                    self._split()
            if not message.get("more_body", False):
                result = await self._resolve()
                if result is not None and self._trailer:
                    charged, remaining = _figures(result)
                    trailer = f": ducto credits_charged={charged} credits_remaining={remaining}\n\n"
                    message = {**message, "body": chunk + trailer.encode()}
        elif self._pending_start is not None:
            self._buffer.append(message.get("body", b""))
            if not message.get("more_body", False):
                await self._flush_plain()
            return
        await self._upstream(message)

    def _split(self) -> None:
        """Split the bytes that waited into events; decode those that can decide the charge."""
        sse = self._sse
        raw, self._raw, self._raw_bytes = self._raw, [], 0
        if sse is None or not raw:
            return
        decisive = self._decisive
        for data in sse.feed(raw[0] if len(raw) == 1 else b"".join(raw)):
            if decisive.search(data) is not None:
                self._feed(data)
            elif data != b"[DONE]":
                self._pending.append(data)
                self._pending_bytes += len(data)
        if self._pending_bytes > _PENDING_BYTES:
            self._drain()

    def _feed(self, data: bytes) -> None:
        try:
            event = _json(data)
        except ValueError:
            return
        self._feed_event(event)

    def _feed_event(self, event: object) -> None:
        try:
            self._tracker.feed(event)
        except InvalidArgumentError:
            _log.warning(
                "ignoring a malformed usage report in a %s stream", self._api, exc_info=True
            )

    def _drain(self) -> None:
        """Decode the events that waited, in their order, and count them."""
        pending, self._pending, self._pending_bytes = self._pending, [], 0
        for data in pending:
            self._feed(data)

    async def _flush_plain(self) -> None:
        """Parse the complete plain body, settle, then send it with the figures."""
        start = self._pending_start
        assert start is not None
        self._pending_start = None
        body = b"".join(self._buffer)
        self._buffer = []
        try:
            self._tracker.feed_response(_json(body))
        except (ValueError, InvalidArgumentError):
            # Not the JSON the API promises: bill what the request was estimated to read.
            _log.warning("a %s response body has no readable usage", self._api, exc_info=True)
            self._tracker.feed_response({})
        result = await self._resolve()
        if result is None and self._settle_error is not None:
            # Fail closed: the response is withheld when its charge could not be recorded.
            status, type_, code = _refusal(self._settle_error)
            self._sent_start = True
            await _send_json(
                self._upstream, status, _error_body(self._api, str(self._settle_error), type_, code)
            )
            return
        headers = list(start["headers"])
        if result is not None:
            charged, remaining = _figures(result)
            headers.append((_CHARGED, str(charged).encode()))
            headers.append((_REMAINING, str(remaining).encode()))
        self._sent_start = True
        await self._upstream({**start, "headers": headers})
        await self._upstream({"type": "http.response.body", "body": body, "more_body": False})

    async def _resolve(self) -> DeductionResult | None:
        """Settle for the recorded usage, or release when there is none; once."""
        if self._resolved:
            return self._result
        self._resolved = True
        self._split()
        if self._tracker.complete:
            self._pending, self._pending_bytes = [], 0
        else:
            self._drain()
        hold = self._hold
        usage = self._tracker.usage if self.billable else None
        # Hold.settle and Hold.__aexit__ shield their store calls and have no other
        # checkpoint, so a cancellation cannot leave the hold half resolved here.
        try:
            if usage is not None:
                try:
                    self._result = await hold.settle(usage)
                except InvalidArgumentError:
                    # The usage cannot be priced (a model the config lacks): charge the hold
                    # rather than nothing.
                    _log.warning("usage %r cannot be priced; charging the hold", usage)
                    self._result = await hold.settle(hold.estimate_credits)
            await hold.__aexit__(None, None, None)
        except DuctoError as exc:
            self._settle_error = exc
            _log.exception("settling hold %s failed", hold.reservation_id)
        return self._result

    async def finish(self, *, failed: bool) -> None:
        """The app is done (or failed, or was cancelled): resolve the hold, flush leftovers."""
        if self._pending_start is not None and not failed:
            # The app returned without ending its body; send what it gave.
            await self._flush_plain()
            return
        await self._resolve()
