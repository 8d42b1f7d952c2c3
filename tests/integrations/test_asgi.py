"""BillingMiddleware driven in-process: every endpoint shape, refusals, disconnects, headers."""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest
from tests.contract._checks import all_rows, assert_invariants
from tests.integrations._support import (
    PROMPT,
    PROMPT_TOKENS,
    FakeUpstream,
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
from ducto.interface.models import SpendCap

pytestmark = pytest.mark.anyio


def _payer(request: BillingRequest) -> str | None:
    token = request.headers.get("authorization", "").removeprefix("Bearer ")
    return token or None


@pytest.fixture
async def manager(store: CreditStore) -> CreditManager:
    return await new_manager(store)


@pytest.fixture
def upstream() -> FakeUpstream:
    return FakeUpstream()


@pytest.fixture
def gateway(manager: CreditManager, upstream: FakeUpstream) -> BillingMiddleware:
    return BillingMiddleware(upstream.app(), manager=manager, payer=_payer, estimator=estimator())


async def _funded(manager: CreditManager, user: str = "alice", amount: int = 1_000) -> None:
    await manager.add_credits(user, amount, "purchase")


async def _spent(manager: CreditManager, user: str = "alice", start: int = 1_000) -> int:
    balance = await manager.get_balance(user)
    assert 0 == balance.reserved
    await assert_invariants(manager.store, user)
    return start - balance.balance


# -- billed shapes -----------------------------------------------------------------------------


async def test_plain_chat_is_held_charged_and_reported(
    manager: CreditManager, gateway: BillingMiddleware
) -> None:
    """A plain response carries held, charged and remaining; the charge is the usage's price."""
    await _funded(manager)

    reply = await call(gateway, "/v1/chat/completions", chat())

    assert 200 == reply.status
    assert str(3 + 5 * 10) == reply.headers[HEADER_HELD]
    assert str(PROMPT_TOKENS + 5 * 10) == reply.headers[HEADER_CHARGED]
    assert str(1_000 - 75) == reply.headers[HEADER_REMAINING]
    assert str(len(reply.body)) == reply.headers["content-length"]
    assert "w0 w1 w2 w3 w4" == reply.json()["choices"][0]["message"]["content"]
    assert 75 == await _spent(manager)


async def test_streamed_chat_with_usage_chunk_is_exact(
    manager: CreditManager, gateway: BillingMiddleware
) -> None:
    """The final usage chunk decides the charge; a trailing SSE comment reports it."""
    await _funded(manager)

    reply = await call(
        gateway,
        "/v1/chat/completions",
        chat(stream=True, stream_options={"include_usage": True}),
    )

    assert 200 == reply.status
    assert str(53) == reply.headers[HEADER_HELD]
    assert reply.text.endswith(
        "data: [DONE]\n\n: ducto credits_charged=75 credits_remaining=925\n\n"
    )
    assert 75 == await _spent(manager)


async def test_streamed_chat_without_usage_is_billed_for_what_streamed(
    manager: CreditManager, gateway: BillingMiddleware
) -> None:
    """No usage chunk: the estimated prompt (3) plus the 5 streamed words, never zero."""
    await _funded(manager)

    reply = await call(gateway, "/v1/chat/completions", chat(stream=True))

    assert 200 == reply.status
    assert 3 + 5 * 10 == await _spent(manager)


async def test_a_long_stream_without_usage_is_billed_for_every_word(
    manager: CreditManager, gateway: BillingMiddleware
) -> None:
    """2,000 chunks (far more bytes than wait undecoded at a time): every word is counted."""
    await _funded(manager, amount=100_000)

    reply = await call(gateway, "/v1/chat/completions", chat(stream=True, max_tokens=2_000))

    assert 200 == reply.status
    assert len(reply.body) > 4 * 64 * 1024
    assert 3 + 2_000 * 10 == await _spent(manager, start=100_000)


def _raw_stream(*events: bytes) -> Any:
    """An ASGI app answering every request with these SSE bytes, one message each."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        headers = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for event in events:
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    return app


@pytest.mark.parametrize("cut", [False, True])
async def test_usage_spelt_unusually_still_decides_the_charge(
    manager: CreditManager, cut: bool
) -> None:
    """A usage chunk that does not look like one is still read before the hold is settled."""
    await _funded(manager)
    text = b'data: {"choices": [{"index": 0, "delta": {"content": " w"}}]}\r\n\r\n'
    usage = (
        b'data: {"choices": [], "\\u0075sage": {"prompt_tokens": 7, "completion_tokens": 2}}\n\n'
    )
    events = [text, text, usage, b"data: [DONE]\n\n"]
    upstream = _raw_stream(*(events[:2] if cut else events))
    gateway = BillingMiddleware(upstream, manager=manager, payer=_payer, estimator=estimator())

    reply = await call(gateway, "/v1/chat/completions", chat(stream=True))

    assert 200 == reply.status
    assert (3 + 2 * 10 if cut else 7 + 2 * 10) == await _spent(manager)


async def test_anthropic_messages_streamed_and_plain(
    manager: CreditManager, gateway: BillingMiddleware
) -> None:
    """/v1/messages is billed from message_start and message_delta, or from the body."""
    await _funded(manager)
    body = {"model": "claude-sonnet-4", "max_tokens": 4, "messages": PROMPT}

    streamed = await call(gateway, "/v1/messages", {**body, "stream": True})
    plain = await call(gateway, "/v1/messages", body)

    assert ": ducto credits_charged=65 credits_remaining=935" in streamed.text
    assert "65" == plain.headers[HEADER_CHARGED]
    assert 130 == await _spent(manager)


async def test_responses_api_streamed_and_plain(
    manager: CreditManager, gateway: BillingMiddleware
) -> None:
    """/v1/responses: 20 full-rate input, 5 cached at half price, 6 output tokens."""
    await _funded(manager)
    body = {"model": "gpt-4.1", "max_output_tokens": 6, "input": "one two three"}

    streamed = await call(gateway, "/v1/responses", {**body, "stream": True})
    plain = await call(gateway, "/v1/responses", body)

    expected = 20 + 3 + 60  # 2.5 credits of cache reads round up with the rest
    assert f"credits_charged={expected} " in streamed.text
    assert str(expected) == plain.headers[HEADER_CHARGED]
    assert 2 * expected == await _spent(manager)


async def test_usage_rows_name_the_requested_model_and_payer_metadata(
    manager: CreditManager, upstream: FakeUpstream
) -> None:
    """The hold and the charge name the request's model; the payer's metadata is stored."""
    await _funded(manager)

    async def payer(request: BillingRequest) -> Payer:
        await anyio.lowlevel.checkpoint()
        return Payer("alice", {"api_key": "k-1"})

    gateway = BillingMiddleware(upstream.app(), manager=manager, payer=payer)

    await call(gateway, "/v1/chat/completions", chat())

    usage = [row for row in await all_rows(manager.store, "alice") if row.type == "usage"]
    assert 1 == len(usage)
    assert "gpt-4o-mini" == usage[0].metadata["model"]
    assert "k-1" == usage[0].metadata["api_key"]
    assert "openai.chat" == usage[0].metadata["api"]


# -- refusals ----------------------------------------------------------------------------------


async def test_insufficient_credits_is_402_and_never_reaches_upstream(
    manager: CreditManager, gateway: BillingMiddleware, upstream: FakeUpstream
) -> None:
    """A hold the balance cannot cover is refused before the upstream is called."""
    await _funded(manager, amount=50)

    reply = await call(gateway, "/v1/chat/completions", chat())

    assert 402 == reply.status
    assert "insufficient_credits" == reply.json()["error"]["code"]
    assert {"message", "type", "param", "code"} == set(reply.json()["error"])
    assert "50" == reply.headers[HEADER_REMAINING]
    assert 0 == upstream.calls
    assert 0 == await _spent(manager, start=50)


async def test_spend_cap_is_429(
    manager: CreditManager, gateway: BillingMiddleware, upstream: FakeUpstream
) -> None:
    """A deny cap the hold would break is refused with 429."""
    await _funded(manager)
    await manager.store.set_spend_cap(
        SpendCap(user_id="alice", cap_type="daily", limit=40, action="deny")
    )

    reply = await call(gateway, "/v1/chat/completions", chat())

    assert 429 == reply.status
    assert "spend_cap_exceeded" == reply.json()["error"]["code"]
    assert 0 == upstream.calls


async def test_reused_idempotency_key_with_another_request_is_409(
    manager: CreditManager, gateway: BillingMiddleware
) -> None:
    """The same key for a different request is a conflict."""
    await _funded(manager)
    key = {"idempotency-key": "req-1"}

    first = await call(gateway, "/v1/chat/completions", chat(), key)
    second = await call(gateway, "/v1/chat/completions", chat(max_tokens=9), key)

    assert 200 == first.status
    assert 409 == second.status
    assert "idempotency_conflict" == second.json()["error"]["code"]


async def test_retried_request_is_charged_once(
    manager: CreditManager, gateway: BillingMiddleware
) -> None:
    """A retry with the same Idempotency-Key replays the settlement: one charge."""
    await _funded(manager)
    key = {"idempotency-key": "req-2"}

    first = await call(gateway, "/v1/chat/completions", chat(), key)
    second = await call(gateway, "/v1/chat/completions", chat(), key)

    assert first.headers[HEADER_CHARGED] == second.headers[HEADER_CHARGED] == "75"
    assert 75 == await _spent(manager)


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16", "utf-32-le"])
async def test_a_json_body_in_any_encoding_json_reads_is_billed(
    manager: CreditManager, gateway: BillingMiddleware, encoding: str
) -> None:
    """UTF-8 is read directly; a BOM or UTF-16/32 is read the way json.loads reads bytes."""
    await _funded(manager)
    body = json.dumps(chat(metadata={"note": "héllo ✓"})).encode(encoding)

    reply = await call(gateway, "/v1/chat/completions", body)

    assert (200, "75") == (reply.status, reply.headers[HEADER_CHARGED])


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{not json", 400, "invalid_json"),
        (b"[1, 2]", 400, "invalid_json"),
        (chat(max_tokens="lots"), 400, "invalid_argument"),
        (chat(model=""), 400, "invalid_argument"),
        (chat(n=0), 400, "invalid_argument"),
    ],
)
async def test_bad_requests_are_400(
    manager: CreditManager,
    gateway: BillingMiddleware,
    upstream: FakeUpstream,
    body: Any,
    status: int,
    code: str,
) -> None:
    """Malformed bodies and bad arguments are refused, naming the problem."""
    await _funded(manager)

    reply = await call(gateway, "/v1/chat/completions", body)

    assert (status, code) == (reply.status, reply.json()["error"]["code"])
    assert 0 == upstream.calls


async def test_no_payer_is_401_and_anthropic_errors_carry_their_type(
    manager: CreditManager, gateway: BillingMiddleware
) -> None:
    """A request nobody pays for is refused; Anthropic routes add "type": "error"."""
    reply = await call(gateway, "/v1/messages", chat(), {"authorization": ""})

    assert 401 == reply.status
    assert "error" == reply.json()["type"]
    assert "unauthenticated" == reply.json()["error"]["code"]


async def test_body_too_large_is_413(manager: CreditManager, upstream: FakeUpstream) -> None:
    """A body over max_body_bytes is refused."""
    gateway = BillingMiddleware(upstream.app(), manager=manager, payer=_payer, max_body_bytes=10)

    reply = await call(gateway, "/v1/chat/completions", chat())

    assert 413 == reply.status
    assert 0 == upstream.calls


def test_bad_configuration_is_refused(manager: CreditManager) -> None:
    """The middleware checks its arguments when built."""
    app = FakeUpstream().app()
    with pytest.raises(InvalidArgumentError, match="payer"):
        BillingMiddleware(app, manager=manager, payer=None)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="api"):
        BillingMiddleware(app, manager=manager, payer=_payer, routes={"/x": "grpc"})
    with pytest.raises(InvalidArgumentError, match="max_body_bytes"):
        BillingMiddleware(app, manager=manager, payer=_payer, max_body_bytes=0)


# -- what is not billed ------------------------------------------------------------------------


async def test_other_routes_and_methods_pass_through(
    manager: CreditManager, gateway: BillingMiddleware
) -> None:
    """GETs and unlisted paths are not billed (no payer needed)."""
    get = await call(gateway, "/v1/chat/completions", b"", {"authorization": ""}, method="GET")
    other = await call(gateway, "/health", chat(), {"authorization": ""})

    assert 405 == get.status
    assert 200 == other.status
    assert HEADER_HELD not in other.headers


async def test_upstream_error_releases_the_hold(
    manager: CreditManager, gateway: BillingMiddleware
) -> None:
    """An error status from the upstream is passed on and charges nothing."""
    await _funded(manager)

    reply = await call(gateway, "/v1/chat/completions", chat(metadata={"scenario": "error"}))

    assert 500 == reply.status
    assert "upstream down" == reply.json()["error"]["message"]
    assert 0 == await _spent(manager)


async def test_upstream_failure_mid_stream_charges_what_streamed(
    manager: CreditManager, gateway: BillingMiddleware
) -> None:
    """The app raises after two words: charged for them, and the error propagates."""
    await _funded(manager)

    with pytest.raises(Exception, match="upstream connection reset"):
        await call(
            gateway, "/v1/chat/completions", chat(stream=True, metadata={"scenario": "fail"})
        )

    assert 3 + 2 * 10 == await _spent(manager)


async def test_client_gone_before_its_body_is_complete(
    manager: CreditManager, gateway: BillingMiddleware, upstream: FakeUpstream
) -> None:
    """Nothing is held and the app is not called."""
    await _funded(manager)

    reply = await call(gateway, "/v1/chat/completions", chat(), partial_body=True)

    assert 0 == reply.status
    assert 0 == upstream.calls
    assert 0 == await _spent(manager)


# -- disconnects -------------------------------------------------------------------------------


async def test_client_gone_before_the_first_byte_leaves_no_hold(
    manager: CreditManager, gateway: BillingMiddleware, upstream: FakeUpstream
) -> None:
    """The stream never produced a byte: the hold is released as soon as the call ends."""
    await _funded(manager)
    upstream.gate.set()

    await call(
        gateway,
        "/v1/messages",
        {**chat(stream=True), "metadata": {"scenario": "gate"}},
        disconnect_after=0,
    )

    assert 1 == upstream.calls
    assert 0 == await _spent(manager)


async def test_client_disconnect_mid_stream_charges_what_was_recorded(
    manager: CreditManager, gateway: BillingMiddleware
) -> None:
    """message_start (25 prompt tokens) and three words streamed, then the client left."""
    await _funded(manager)

    reply = await call(
        gateway,
        "/v1/messages",
        {**chat(stream=True), "metadata": {"scenario": "stall"}},
        disconnect_after=4,
    )

    assert 4 == reply.text.count("data:")
    assert PROMPT_TOKENS + 3 * 10 == await _spent(manager)
