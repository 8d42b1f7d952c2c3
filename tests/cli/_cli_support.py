"""Running the command line in-process, and seeding a store the command line cannot write to."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import anyio
import pytest

from ducto import CreditMetadata
from ducto.cli import main
from ducto.interface import CreditStore, open_store

T = TypeVar("T")


@dataclass
class Ran:
    """The outcome of one command: its exit status and what it printed."""

    status: int
    out: str
    err: str

    def json(self) -> Any:
        """stdout parsed as one JSON document."""
        return json.loads(self.out)

    def error_line(self) -> str:
        """stderr, checked to be exactly one line with no traceback."""
        lines = self.err.strip().splitlines()
        assert 1 == len(lines), self.err
        assert "Traceback" not in self.err
        assert lines[0].startswith("ducto")
        return lines[0]


class Cli:
    """Calls `ducto.cli.main` with ``--store`` and ``--backend``, capturing its output."""

    def __init__(
        self, capsys: pytest.CaptureFixture[str], url: str, backend: str, tmp_path: Path
    ) -> None:
        self.capsys = capsys
        self.url = url
        self.backend = backend
        self.tmp_path = tmp_path

    def __call__(self, *args: str, store: bool = True) -> Ran:
        """Run ``ducto ARGS`` (after ``--store URL --backend NAME`` unless `store` is False)."""
        argv = ["--backend", self.backend, *args]
        if store:
            argv = ["--store", self.url, *argv]
        self.capsys.readouterr()
        status = main(argv)
        out, err = self.capsys.readouterr()
        return Ran(status, out, err)

    def ok(self, *args: str) -> Ran:
        """Run a command that must succeed."""
        ran = self(*args)
        assert 0 == ran.status, ran.err
        return ran

    def json(self, *args: str) -> Any:
        """Run a command with ``--json`` that must succeed; its parsed output."""
        return self.ok("--json", *args).json()

    def file(self, name: str, text: str) -> str:
        """Write a file in the test's directory; its path."""
        path = self.tmp_path / name
        path.write_text(text, encoding="utf-8")
        return str(path)

    def with_store(
        self,
        work: Callable[[CreditStore], Awaitable[T]],
        clock: Callable[[], datetime] | None = None,
    ) -> T:
        """Run `work` on the same store through the Python API (what the CLI cannot do)."""

        async def run() -> T:
            options = {} if clock is None else {"clock": clock}
            async with open_store(self.url, **options) as store:
                return await work(store)

        return anyio.run(run, backend=self.backend)

    def usage(self, user_id: str, held: int, charged: int, model: str = "gpt-4o") -> str:
        """A settled hold: the usage row's transaction id."""

        async def work(store: CreditStore) -> str:
            hold = await store.reserve_credits(
                user_id, held, "chat", CreditMetadata(model=model), min_balance=0
            )
            hold.raise_for_error()
            result = await store.deduct_credits(user_id, hold.reservation_id, charged)
            result.raise_for_error()
            return result.transaction_id

        return self.with_store(work)

    def hold(self, user_id: str, amount: int) -> str:
        """An open hold's reservation id."""

        async def work(store: CreditStore) -> str:
            hold = await store.reserve_credits(user_id, amount, "chat", min_balance=0)
            hold.raise_for_error()
            return hold.reservation_id

        return self.with_store(work)
