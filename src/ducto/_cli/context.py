"""What every command gets: the parsed arguments, the output, and the store, opened on demand."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from typing import Any, Final

import anyio
from pydantic import BaseModel

from ducto._cli.output import Output
from ducto._cli.values import UsageError, redact, sqlite_path, url_password
from ducto.errors import ErrorCode, StoreError, StoreUnavailableError, error_from_fields
from ducto.interface import open_store
from ducto.interface.base import CreditStore

STORE_ENV: Final = "DUCTO_STORE_URL"
"""The environment variable that names the store when ``--store`` is not given."""

EXTRAS: Final = {
    "aiosqlite": "sqlite",
    "asyncpg": "postgres",
    "psycopg": "postgres",
    "psycopg_pool": "postgres",
    "trio": "trio",
    "yaml": "yaml",
}
"""The extra that installs each optional module a command may need."""


def missing_extra(exc: ImportError) -> UsageError | None:
    """A usage error saying which extra to install, when `exc` is about an optional module."""
    module = (exc.name or "").partition(".")[0]
    extra = EXTRAS.get(module)
    if extra is None:
        return None
    advice = f"this needs the {module!r} module: pip install 'ducto[{extra}]'"
    if module == "aiosqlite":
        advice += " (or pass --backend trio: SQLite under trio needs no driver)"
    return UsageError(advice)


class StoreSetupError(StoreError):
    """The store could not be opened; raised with a message that says what to do."""


class Context:
    """The state of one command: arguments, output, clock and the store (opened lazily)."""

    def __init__(
        self,
        args: argparse.Namespace,
        out: Output,
        url: str | None,
        stack: AsyncExitStack,
        *,
        url_from_flag: bool,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        """
        Prepare a command; nothing is opened until `store` is first awaited.

        Args:
            args: The parsed command line.
            out: Where results go.
            url: The store URL (from ``--store`` or the environment), if any.
            stack: Closes the store when the command is done.
            url_from_flag: Whether `url` came from ``--store`` (where a password is refused).
            options: Keywords for the store's constructor (``prune``'s retention).
        """
        self._options = dict(options or {})
        self.args = args
        self.out = out
        self.url = url
        self.now = datetime.now(UTC)
        self._stack = stack
        self._store: CreditStore | None = None
        self._url_from_flag = url_from_flag

    async def store(self, *, creating: bool = False) -> CreditStore:
        """
        The store, opened on first use.

        Args:
            creating: The command creates the database (``setup``), so a missing SQLite file
                is expected rather than a mistake.

        Raises:
            UsageError: No store URL is configured, a password is on the command line, or the
                URL is not one `open_store` knows.
            StoreError: The store cannot be opened.
        """
        if self._store is not None:
            return self._store
        url = self.url
        if not url:
            raise UsageError(
                f"no store: pass --store URL or set {STORE_ENV} (for example sqlite:///billing.db)"
            )
        if self._url_from_flag and url_password(url):
            raise UsageError(
                "--store must not carry a password (it would show in the process list and the "
                f"shell history): set {STORE_ENV}, or use the database's own password file"
            )
        path = sqlite_path(url)
        if path is not None and not creating and not await anyio.Path(path).exists():
            raise StoreUnavailableError(
                f"no database at {path!r}: create it with 'ducto setup' (or check --store)"
            )
        try:
            store = open_store(url, **self._options)
        except ImportError as exc:
            raise missing_extra(exc) or exc from None
        try:
            self._store = await self._stack.enter_async_context(store)
        except ImportError as exc:
            raise missing_extra(exc) or exc from None
        return self._store

    def redact(self, text: str) -> str:
        """`text` without the store URL's password."""
        return redact(text, self.url)


def refusal(result: BaseModel, asked: int | None = None) -> str:
    """
    One line saying why the store refused: the code, then the typed error's message, built
    from the result's fields and the amount that was asked for.
    """
    fields: dict[str, object] = dict(result)
    code = fields.get("error")
    if not isinstance(code, ErrorCode):
        raise TypeError(f"{type(result).__name__} has no error code")
    if asked is not None:
        fields["requested"] = fields["amount"] = asked
    return f"refused ({code}): {error_from_fields(code, fields)}"
