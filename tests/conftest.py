"""Shared fixtures: the event loop, the store under test, a controllable clock, fresh ids."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from ducto.interface.base import CreditStore
from ducto.interface.memory import MemoryStore

REQUIRED = set(filter(None, os.environ.get("DUCTO_REQUIRE_STORES", "").split(",")))
STORE_KINDS = ("memory", "sqlite", "postgres")
POSTGRES_URL = os.environ.get("DUCTO_TEST_POSTGRES_URL", "")
"""A database the Postgres tests may use; each test run works in a schema of its own."""
POSTGRES_SCHEMA = f"ducto_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
STORES = [pytest.param(k, marks=getattr(pytest.mark, k), id=k) for k in STORE_KINDS]


class FakeClock:
    """A clock tests move by hand; stores read it through their ``clock=`` argument."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float = 0, **delta: float) -> datetime:
        """Move time forward and return the new instant."""
        self.now += timedelta(seconds=seconds, **delta)
        return self.now

    def set(self, moment: datetime) -> None:
        """Jump to `moment` (aware)."""
        self.now = moment


def _open_memory(tmp_path: Path, clock: FakeClock, **options: Any) -> CreditStore:
    return MemoryStore(clock=clock, **options)


def _open_sqlite(tmp_path: Path, clock: FakeClock, **options: Any) -> CreditStore:
    import aiosqlite  # noqa: F401  (the extra the store needs under asyncio)

    from ducto.interface.sqlite import SQLiteStore

    return SQLiteStore(tmp_path / "ducto.db", clock=clock, synchronous="NORMAL", **options)


def postgres_url() -> str:
    """The test database's URL; LookupError when the run has none."""
    if not POSTGRES_URL:
        raise LookupError("DUCTO_TEST_POSTGRES_URL is not set")
    return POSTGRES_URL


def _open_postgres(tmp_path: Path, clock: FakeClock, **options: Any) -> CreditStore:
    """A PostgresStore in this run's schema, emptied first (tests assume an empty store)."""
    import psycopg

    from ducto.interface.postgres import PostgresStore

    url = postgres_url()
    with psycopg.connect(url, autocommit=True) as conn:
        tables = [
            row[0]
            for row in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = %s AND tablename <> %s",
                (POSTGRES_SCHEMA, "ducto_schema"),
            )
        ]
        if tables:
            names = ", ".join(f"{POSTGRES_SCHEMA}.{table}" for table in tables)
            conn.execute(f"TRUNCATE {names} RESTART IDENTITY")
            conn.execute(f"INSERT INTO {POSTGRES_SCHEMA}.settings VALUES ('pricing', '')")
    return PostgresStore(
        url, schema=POSTGRES_SCHEMA, clock=clock, min_size=1, max_size=8, **options
    )


def drop_postgres_schema(schema: str) -> None:
    """Drop a schema the tests made (and everything in it)."""
    import psycopg

    with psycopg.connect(postgres_url(), autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


OPENERS: dict[str, Callable[..., CreditStore]] = {
    "memory": _open_memory,
    "sqlite": _open_sqlite,
    "postgres": _open_postgres,
}


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Drop this run's Postgres schema."""
    if POSTGRES_URL:
        drop_postgres_schema(POSTGRES_SCHEMA)


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Run each anyio test on asyncio and on trio."""
    return str(request.param)


@pytest.fixture
def clock() -> FakeClock:
    """A clock at 2026-03-15 12:00 UTC (mid-month, mid-day) that tests move by hand."""
    return FakeClock(datetime(2026, 3, 15, 12, 0, tzinfo=UTC))


@pytest.fixture(params=STORES)
async def store(
    request: pytest.FixtureRequest, anyio_backend: str, tmp_path: Path, clock: FakeClock
) -> AsyncIterator[CreditStore]:
    """Every store kind, opened and set up, reading time from `clock`."""
    kind: str = request.param
    try:
        new_store = OPENERS[kind](tmp_path, clock)
    except (ImportError, LookupError) as exc:
        if kind in REQUIRED:
            pytest.fail(f"{kind} store is required: {exc}")
        pytest.skip(f"{kind} store unavailable: {exc}")
    async with new_store:
        await new_store.setup()
        yield new_store


@pytest.fixture
def user_id() -> str:
    """A fresh user id: safe on a shared database, no truncation needed."""
    return f"user-{uuid.uuid4().hex}"


@pytest.fixture
def other_user_id() -> str:
    """A second fresh user id."""
    return f"user-{uuid.uuid4().hex}"
