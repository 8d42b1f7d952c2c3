"""
The store layer: the `CreditStore` contract and its implementations.

`MemoryStore` is always available. `SQLiteStore` (extra ``sqlite``) and `PostgresStore`
(extra ``postgres``) load on first access, so ``import ducto`` needs no optional driver.
"""

from __future__ import annotations

import importlib
from typing import Any

from ducto.errors import InvalidArgumentError
from ducto.interface.base import CreditStore, StoreError
from ducto.interface.memory import MemoryStore

__all__ = ["CreditStore", "MemoryStore", "StoreError", "open_store"]

_LAZY: dict[str, str] = {}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def open_store(url: str, **options: Any) -> CreditStore:
    """
    Build a store from a URL (no I/O happens until it is opened with ``async with``).

    Supported URLs: ``memory://``.

    Args:
        url: Where the data lives.
        **options: Passed to the store's constructor (``clock=``, ``synchronous=``, ...).

    Raises:
        InvalidArgumentError: The URL's scheme is not supported.
    """
    if not isinstance(url, str):
        raise InvalidArgumentError(f"url must be a str, got {type(url).__name__}")
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise InvalidArgumentError(f"url must look like 'scheme://...', got {url!r}")
    if scheme == "memory":
        if rest:
            raise InvalidArgumentError(f"a memory:// url takes no path, got {url!r}")
        return MemoryStore(**options)
    raise InvalidArgumentError(f"unsupported store url scheme {scheme!r} in {url!r}")
