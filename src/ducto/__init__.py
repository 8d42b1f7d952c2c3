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
from ducto.interface import CreditStore, MemoryStore, open_store
from ducto.interface.models import CreditMetadata, SpendCap

try:
    __version__ = version("ducto")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"

__all__ = [
    "CreditError",
    "CreditMetadata",
    "CreditStore",
    "DuctoError",
    "ErrorCode",
    "InsufficientCreditsError",
    "InvalidArgumentError",
    "MemoryStore",
    "SpendCap",
    "SpendCapExceededError",
    "StoreError",
    "__version__",
    "open_store",
]
