"""
Billing for LiteLLM, SDK and proxy: a `CustomLogger` callback (extra ``litellm``).

```python
import litellm
from ducto.integrations.litellm import LiteLLMBilling

billing = LiteLLMBilling(manager, payer=lambda call: call.get("user"))
litellm.callbacks = [billing]

await litellm.acompletion(model="gpt-4o", messages=[...], user="alice")
```

The callback uses three of LiteLLM's hooks:

- ``async_pre_call_deployment_hook`` runs before LiteLLM sends a request, in the SDK and in
  the proxy. It resolves who pays, estimates the call (`RequestEstimator`) and places a
  hold; a refusal raises out of the LiteLLM call (`InsufficientCreditsError`,
  `SpendCapExceededError`, ...), so the provider is never called.
- ``async_log_success_event`` settles the hold for the usage of the response (for a
  stream, LiteLLM's assembled response once the stream is consumed).
- ``async_log_failure_event`` releases the hold.

A resolver that returns ``Payer(user_id, team_id=...)`` bills a team pool for that member
(on the proxy, for example, the API key's ``user_api_key_team_id``): the pool is held and
charged, and a refusal raises `InsufficientTeamBalanceError`, `SpendCapExceededError` (the
member's cap), `UserNotInTeamError` or `TeamNotFoundError`.

A resolver that returns ``Payer(user_id, scope=...)`` puts the call in a budget scope (on
the proxy, for example, the API key's ``user_api_key_hash``): the user's spend caps scoped
to it are checked when the hold is placed, and a refusal raises `SpendCapExceededError`
with the cap's ``scope`` and ``resets_at``.

On the proxy, ``async_post_call_failure_hook`` turns those refusals into HTTP errors in
OpenAI's error shape (402, 429, 403, 409, 400, 401); a spend-cap refusal's error also
carries ``resets_at``, ``cap_type`` and ``scope``, with the ``x-ducto-budget-resets-at``
and ``retry-after`` headers.

LiteLLM reports success and failure from background tasks, after the call has returned.
A call whose report never comes (a stream the caller abandons before its end) keeps its
hold until the hold's TTL ends it; `aclose` releases every hold still open, for shutdown.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import anyio
from litellm.integrations.custom_logger import CustomLogger

from ducto._shown import shown
from ducto.errors import DuctoError, InvalidArgumentError
from ducto.integrations._estimate import RequestEstimator
from ducto.integrations._payer import Payer, _as_payer, _hold_metadata
from ducto.integrations._refusal import _budget_fields, _budget_headers, _status
from ducto.integrations._usage import Api, _api, usage_from_anthropic, usage_from_openai
from ducto.manager import CreditManager, Hold
from ducto.pricing import UsageMetrics

if TYPE_CHECKING:
    from fastapi import HTTPException

__all__ = ["CALL_TYPES", "LiteLLMBilling", "NoPayerError", "PayerResolver"]

_log = logging.getLogger("ducto.integrations.litellm")

PayerResolver = Callable[[Mapping[str, Any]], Awaitable[Payer | str | None] | Payer | str | None]
"""
Names who pays for a call from LiteLLM's call arguments: a user id, a `Payer`, or None.

The SDK's arguments carry what the caller passed (``user``, ``metadata``); on the proxy,
``metadata`` also carries the API key's owner (``user_api_key_user_id``,
``user_api_key_team_id``) and the key itself (``user_api_key_hash``,
``user_api_key_alias``), a natural budget scope.
"""

CALL_TYPES: Final[Mapping[str, Api]] = {
    "completion": Api.OPENAI_CHAT,
    "acompletion": Api.OPENAI_CHAT,
    "text_completion": Api.OPENAI_COMPLETIONS,
    "atext_completion": Api.OPENAI_COMPLETIONS,
    "embedding": Api.OPENAI_EMBEDDINGS,
    "aembedding": Api.OPENAI_EMBEDDINGS,
    "responses": Api.OPENAI_RESPONSES,
    "aresponses": Api.OPENAI_RESPONSES,
    "anthropic_messages": Api.ANTHROPIC_MESSAGES,
    "aanthropic_messages": Api.ANTHROPIC_MESSAGES,
}
"""The LiteLLM call types billed, and the request and response shape of each."""


class NoPayerError(DuctoError, PermissionError):
    """The payer resolver named nobody for a call, so it was refused."""


@dataclass(slots=True)
class _Open:
    hold: Hold
    api: Api
    model: str | None


def _call_type(value: object) -> str:
    name = getattr(value, "value", value)
    return name if isinstance(name, str) else ""


def _http_status(exc: BaseException) -> tuple[int, str, str] | None:
    if isinstance(exc, NoPayerError):
        return 401, "authentication_error", "unauthenticated"
    return _status(exc)


class LiteLLMBilling(CustomLogger):
    """A LiteLLM callback that holds before each call and settles after it (see the module)."""

    def __init__(
        self,
        manager: CreditManager,
        payer: PayerResolver,
        *,
        estimator: RequestEstimator | None = None,
        call_types: Mapping[str, Api | str] | None = None,
        operation_type: str = "llm_call",
        hold_ttl: float | None = None,
    ) -> None:
        """
        Create the callback; register it with ``litellm.callbacks = [billing]``.

        Args:
            manager: Prices usage and holds credits; its pricing must be loaded.
            payer: Names who pays for a call (sync or async); None refuses the call with
                `NoPayerError`.
            estimator: Sizes holds; a default `RequestEstimator` when None.
            call_types: The LiteLLM call types to bill and their API shape; `CALL_TYPES`
                when None. Calls of other types pass unbilled.
            operation_type: Stored with each hold.
            hold_ttl: Seconds a hold counts for; the manager's ``hold_ttl`` when None.

        Raises:
            InvalidArgumentError: An argument has the wrong type.
        """
        super().__init__()
        if not isinstance(manager, CreditManager):
            raise InvalidArgumentError(f"manager must be a CreditManager, got {shown(manager)}")
        if not callable(payer):
            raise InvalidArgumentError(f"payer must be callable, got {shown(payer)}")
        if estimator is not None and not isinstance(estimator, RequestEstimator):
            raise InvalidArgumentError(
                f"estimator must be a RequestEstimator, got {shown(estimator)}"
            )
        self._manager = manager
        self._payer = payer
        self._estimator = estimator if estimator is not None else RequestEstimator()
        source = CALL_TYPES if call_types is None else call_types
        self._call_types = {name: _api(api) for name, api in source.items()}
        self._operation_type = operation_type
        self._ttl = hold_ttl
        self._open: dict[str, _Open] = {}

    @property
    def open_holds(self) -> int:
        """How many holds are placed and not yet settled or released."""
        return len(self._open)

    async def _resolve(self, kwargs: Mapping[str, Any]) -> Payer:
        answer = self._payer(kwargs)
        if inspect.isawaitable(answer):
            answer = await answer
        payer = _as_payer(answer, "the payer resolver")
        if payer is None:
            raise NoPayerError("no account to bill for this call")
        return payer

    # -- before the call -----------------------------------------------------------------------

    async def async_pre_call_deployment_hook(
        self, kwargs: dict[str, Any], call_type: object
    ) -> dict[str, Any] | None:
        """
        Place the hold for a call about to be sent; raise to refuse it.

        Args:
            kwargs: LiteLLM's call arguments (``model``, ``messages``, ``litellm_call_id``,
                ...).
            call_type: LiteLLM's ``CallTypes`` of the call.

        Returns:
            None: the call's arguments are not changed.

        Raises:
            NoPayerError: The resolver named nobody.
            InsufficientCreditsError, SpendCapExceededError, IdempotencyConflictError:
                The hold was refused.
            InsufficientTeamBalanceError, UserNotInTeamError, TeamNotFoundError: The
                payer named a team pool, and it refused the hold.
            InvalidArgumentError: The call cannot be estimated or priced.
        """
        api = self._call_types.get(_call_type(call_type))
        call_id = kwargs.get("litellm_call_id")
        if api is None or not isinstance(call_id, str) or call_id in self._open:
            return None  # not billed, or a retry of a call that already holds
        payer = await self._resolve(kwargs)
        estimate = self._estimator.estimate(api, kwargs)
        metadata = _hold_metadata(payer, litellm_call_id=call_id)
        hold = self._manager.hold(
            payer.user_id,
            estimate,
            operation_type=self._operation_type,
            metadata=metadata,
            ttl=self._ttl,
            team_id=payer.team_id,
        )
        await hold.__aenter__()
        self._open[call_id] = _Open(hold, api, estimate.model)
        return None

    # -- after the call ------------------------------------------------------------------------

    def _usage(self, api: Api, response: object, model: str | None) -> UsageMetrics:
        if api is Api.ANTHROPIC_MESSAGES:
            return usage_from_anthropic(response, model=model)
        return usage_from_openai(response, model=model)

    async def async_log_success_event(
        self, kwargs: dict[str, Any], response_obj: object, start_time: object, end_time: object
    ) -> None:
        """Settle the call's hold for the usage of its response (never raises)."""
        call_id = kwargs.get("litellm_call_id")
        entry = self._open.pop(call_id, None) if isinstance(call_id, str) else None
        if entry is None:
            return
        with anyio.CancelScope(shield=True):
            try:
                try:
                    usage = self._usage(entry.api, response_obj, entry.model)
                except InvalidArgumentError:
                    _log.warning("call %s reported no usage; charging its hold", call_id)
                    await entry.hold.settle(entry.hold.estimate_credits)
                else:
                    try:
                        await entry.hold.settle(usage)
                    except InvalidArgumentError:
                        _log.warning("usage %r cannot be priced; charging the hold", usage)
                        await entry.hold.settle(entry.hold.estimate_credits)
            except DuctoError:
                _log.exception("settling the hold of call %s failed", call_id)
            await self._close(entry.hold)

    async def async_log_failure_event(
        self, kwargs: dict[str, Any], response_obj: object, start_time: object, end_time: object
    ) -> None:
        """Release the failed call's hold, if it placed one (never raises)."""
        call_id = kwargs.get("litellm_call_id")
        entry = self._open.pop(call_id, None) if isinstance(call_id, str) else None
        if entry is not None:
            with anyio.CancelScope(shield=True):
                await self._close(entry.hold)

    async def _close(self, hold: Hold) -> None:
        try:
            await hold.__aexit__(None, None, None)
        except DuctoError:
            _log.exception("releasing hold %s failed", hold.reservation_id)

    async def aclose(self) -> None:
        """Release every hold still open (calls whose outcome LiteLLM never reported)."""
        while self._open:
            _, entry = self._open.popitem()
            with anyio.CancelScope(shield=True):
                await self._close(entry.hold)

    # -- proxy ---------------------------------------------------------------------------------

    async def async_post_call_failure_hook(
        self,
        request_data: dict[str, Any],
        original_exception: Exception,
        user_api_key_dict: object,
        traceback_str: str | None = None,
    ) -> HTTPException | None:
        """
        On the proxy, answer a billing refusal with its HTTP status in OpenAI's error shape.

        Returns:
            A ``fastapi.HTTPException`` for ducto's refusals, else None (LiteLLM's own
            handling). A spend-cap refusal's error also carries ``resets_at`` (ISO 8601 UTC),
            ``cap_type`` and ``scope``, and its headers ``x-ducto-budget-resets-at`` and
            ``retry-after``.
        """
        mapped = _http_status(original_exception)
        if mapped is None:
            return None
        from fastapi import HTTPException  # the proxy's own dependency

        status, type_, code = mapped
        error: dict[str, object] = {
            "message": str(original_exception),
            "type": type_,
            "param": None,
            "code": code,
        }
        error.update(_budget_fields(original_exception))
        return HTTPException(
            status_code=status,
            detail={"error": error},
            headers=_budget_headers(original_exception) or None,
        )
