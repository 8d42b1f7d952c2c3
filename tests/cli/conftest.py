"""Fixtures of the command-line tests: a set-up store per test, on each event loop."""

from __future__ import annotations

import importlib.util
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.cli._cli_support import Cli
from tests.conftest import REQUIRED, drop_postgres_schema, postgres_url

STORE_KINDS = ["sqlite", "postgres"]
"""The stores the command line is tested on; each has a URL maker in `_url`."""


def _url(kind: str, tmp_path: Path) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'ducto.db'}"
    if kind == "postgres":
        url = postgres_url()
        return f"{url}{'&' if '?' in url else '?'}schema=cli_{uuid.uuid4().hex[:12]}"
    raise LookupError(kind)  # pragma: no cover - every kind in STORE_KINDS has a URL


@pytest.fixture(params=["asyncio", "trio"])
def backend(request: pytest.FixtureRequest) -> str:
    """The event loop the command line runs on (``--backend``)."""
    name = str(request.param)
    if name == "asyncio" and importlib.util.find_spec("aiosqlite") is None:
        pytest.skip("SQLiteStore needs aiosqlite (extra 'sqlite') under asyncio")
    return name


@pytest.fixture(params=[pytest.param(k, marks=getattr(pytest.mark, k), id=k) for k in STORE_KINDS])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL of an empty store of each kind (a Postgres one in a schema dropped after)."""
    kind = str(request.param)
    try:
        url = _url(kind, tmp_path)
    except LookupError as exc:
        if kind in REQUIRED:
            pytest.fail(f"{kind} store is required: {exc}")
        pytest.skip(f"{kind} store unavailable: {exc}")
    yield url
    if kind == "postgres":
        drop_postgres_schema(url.rsplit("schema=", 1)[1])


@pytest.fixture(autouse=True)
def _no_store_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests say which store they use; an operator's DUCTO_STORE_URL must not leak in."""
    monkeypatch.delenv("DUCTO_STORE_URL", raising=False)


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], store_url: str, backend: str, tmp_path: Path) -> Cli:
    """Runs ``ducto`` in-process against a store that ``ducto setup`` has just set up."""
    runner = Cli(capsys, store_url, backend, tmp_path)
    ran = runner("setup")
    assert 0 == ran.status, ran.err
    return runner
