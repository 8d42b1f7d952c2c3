"""ducto: credit billing for LLM applications, on asyncio and trio."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from ducto.errors import (
    CreditError,
    DuctoError,
    ErrorCode,
    InsufficientCreditsError,
    InvalidArgumentError,
    SpendCapExceededError,
    StoreError,
)
from ducto.events import CreditEvent, CreditEventEmitter, CreditEventType
from ducto.interface import CreditStore, MemoryStore, open_store
from ducto.interface.models import CreditMetadata, SpendCap
from ducto.manager import CreditManager, Hold
from ducto.pricing import CostBreakdown, PricingEngine, ToolCall, UsageMetrics

try:
    __version__ = version("ducto")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"

__all__ = [
    "CostBreakdown",
    "CreditError",
    "CreditEvent",
    "CreditEventEmitter",
    "CreditEventType",
    "CreditManager",
    "CreditMetadata",
    "CreditStore",
    "DuctoError",
    "ErrorCode",
    "Hold",
    "InsufficientCreditsError",
    "InvalidArgumentError",
    "MemoryStore",
    "PricingEngine",
    "SpendCap",
    "SpendCapExceededError",
    "StoreError",
    "ToolCall",
    "UsageMetrics",
    "__version__",
    "open_store",
]
