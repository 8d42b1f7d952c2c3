"""
Gateway integrations: provider usage adapters, hold estimates, ASGI and LiteLLM billing.

This package needs no provider SDK and no web framework: the adapters read SDK objects
(by attribute) and plain dicts alike. The optional parts live in submodules that import
their dependencies when loaded:

- `ducto.integrations.asgi`: `BillingMiddleware`, billing OpenAI- and Anthropic-style
  endpoints of any ASGI app (Starlette, FastAPI), streamed or not;
- `ducto.integrations.litellm`: `LiteLLMBilling`, a callback for the LiteLLM SDK and proxy
  (extra ``litellm``).

The usage convention all adapters follow is described in `ducto.integrations._usage` and in
``docs/integrations.md``.
"""

from __future__ import annotations

from ducto.integrations._estimate import RequestEstimator
from ducto.integrations._payer import Payer
from ducto.integrations._usage import (
    Api,
    StreamUsage,
    TokenCounter,
    heuristic_token_count,
    usage_from_anthropic,
    usage_from_openai,
    usage_from_response,
)

__all__ = [
    "Api",
    "Payer",
    "RequestEstimator",
    "StreamUsage",
    "TokenCounter",
    "heuristic_token_count",
    "usage_from_anthropic",
    "usage_from_openai",
    "usage_from_response",
]
