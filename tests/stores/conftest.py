"""Fixtures of the store-specific tests: the Postgres test database and a schema per test."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from tests.conftest import REQUIRED, drop_postgres_schema, postgres_url


@pytest.fixture
def url() -> str:
    """The Postgres test database's URL (the test skips, or fails when Postgres is required,
    without one)."""
    try:
        return postgres_url()
    except LookupError as exc:
        if "postgres" in REQUIRED:
            pytest.fail(f"postgres store is required: {exc}")
        pytest.skip(f"postgres store unavailable: {exc}")


@pytest.fixture
def schema(url: str) -> Iterator[str]:
    """A fresh Postgres schema name, dropped after the test."""
    name = f"ducto_t_{uuid.uuid4().hex[:12]}"
    yield name
    drop_postgres_schema(name)
