"""More instances of the store under test on the same data, as other processes would open it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

from tests.conftest import FakeClock, postgres_url

from ducto.interface.base import CreditStore


def _peer(store: CreditStore, tmp_path: Path, clock: FakeClock) -> CreditStore:
    """A new instance on `store`'s data (the conftest openers' file and schema), not emptied."""
    kind = type(store).__name__
    if kind == "SQLiteStore":
        from ducto.interface.sqlite import SQLiteStore

        return SQLiteStore(tmp_path / "ducto.db", clock=clock, synchronous="NORMAL")
    if kind == "PostgresStore":
        from ducto.interface.postgres import PostgresStore

        schema: str = getattr(store, "schema")  # noqa: B009 (not on the protocol)
        return PostgresStore(postgres_url(), schema=schema, clock=clock, min_size=1, max_size=2)
    raise AssertionError(f"no peer for {kind}")


@asynccontextmanager
async def peers(
    store: CreditStore, tmp_path: Path, clock: FakeClock, count: int
) -> AsyncIterator[list[CreditStore]]:
    """
    `count` stores on `store`'s data: `store` itself first, then new instances (each with
    its own connections, like separate processes). A `MemoryStore` has no other process, so
    its peers are the store itself.
    """
    if type(store).__name__ == "MemoryStore":
        yield [store] * count
        return
    async with AsyncExitStack() as stack:
        others = [
            await stack.enter_async_context(_peer(store, tmp_path, clock)) for _ in range(count - 1)
        ]
        yield [store, *others]
