"""
The store layer: the `CreditStore` contract and its implementations.

`MemoryStore` is always available. `SQLiteStore` (extra ``sqlite``) and `PostgresStore` (extra
``postgres``) load on first access, so ``import ducto`` needs no optional driver.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

from ducto._shown import shown
from ducto.errors import InvalidArgumentError
from ducto.interface.base import CreditStore, StoreError
from ducto.interface.memory import MemoryStore

if TYPE_CHECKING:
    from ducto.interface.postgres import PostgresStore
    from ducto.interface.sqlite import SQLiteStore

__all__ = ["CreditStore", "MemoryStore", "PostgresStore", "SQLiteStore", "StoreError", "open_store"]

_LAZY = {"SQLiteStore": "ducto.interface.sqlite", "PostgresStore": "ducto.interface.postgres"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def open_store(url: str | None = None, **options: Any) -> CreditStore:
    """
    Build a store from a URL (no I/O happens until it is opened with ``async with``).

    Supported URLs: ``memory://``; ``sqlite:///relative/path.db``,
    ``sqlite:////absolute/path.db`` and ``sqlite://:memory:`` (extra ``sqlite``);
    ``postgresql://user@host:port/db?schema=name`` (extra ``postgres``; ``postgres://`` too).
    Keep passwords out of the URL: libpq reads ``PGPASSWORD`` and ``~/.pgpass``.

    Args:
        url: Where the data lives; None reads the ``DUCTO_STORE_URL`` environment variable.
        **options: Passed to the store's constructor (``clock=``, ``synchronous=``, ...).

    Raises:
        InvalidArgumentError: The URL is missing, malformed or of an unsupported scheme.
    """
    if url is None:
        url = os.environ.get("DUCTO_STORE_URL")
        if not url:
            raise InvalidArgumentError("url is required: pass one or set DUCTO_STORE_URL")
    if not isinstance(url, str):
        raise InvalidArgumentError(f"url must be a str, got {type(url).__name__}")
    if "\x00" in url:
        raise InvalidArgumentError(f"url must not contain a NUL character, got {shown(url)}")
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise InvalidArgumentError(f"url must look like 'scheme://...', got {shown(url)}")
    if scheme == "memory":
        if rest:
            raise InvalidArgumentError(f"a memory:// url takes no path, got {shown(url)}")
        return MemoryStore(**options)
    if scheme == "sqlite":
        from ducto.interface.sqlite import SQLiteStore

        if rest == ":memory:":
            return SQLiteStore(":memory:", **options)
        if not rest.startswith("/") or len(rest) < 2:
            raise InvalidArgumentError(
                f"a sqlite url looks like 'sqlite:///path.db', got {shown(url)}"
            )
        if "?" in rest or "#" in rest:
            raise InvalidArgumentError(
                f"a sqlite url names a file and takes no query options, got {shown(url)}; "
                "pass store options as keyword arguments"
            )
        return SQLiteStore(rest[1:], **options)
    if scheme in ("postgresql", "postgres"):
        from ducto.interface.postgres import PostgresStore

        return PostgresStore(url, **options)
    raise InvalidArgumentError(f"unsupported store url scheme {scheme!r} in {url!r}")
