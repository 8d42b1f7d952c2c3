"""The gateway demo (`make demo`): it runs small, checks its books, and repeats itself."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import anyio
import pytest

from ducto import MemoryStore

DEMO = Path(__file__).resolve().parents[2] / "examples" / "gateway_demo.py"
SMALL = ["--users", "30", "--requests", "300", "--concurrency", "10", "--latency-ms", "1"]


def _backend() -> str:
    return "asyncio" if importlib.util.find_spec("aiosqlite") is not None else "trio"


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(DEMO), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _books(output: str) -> str:
    """The output without its first line (the database path) and its timings."""
    lines = output.splitlines()[1:]
    return "\n".join(lines[: lines.index("Timing (wall clock, differs from run to run)")])


def _demo() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gateway_demo", DEMO)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gateway_demo"] = module
    spec.loader.exec_module(module)
    return module


def test_small_run_balances_its_books(tmp_path: Path) -> None:
    """A small run exits 0 with every book check passed and every section printed."""
    completed = _run(*SMALL, "--backend", _backend(), cwd=tmp_path)

    out = completed.stdout
    assert 0 == completed.returncode, out + completed.stderr
    assert "books: every balance equals its ledger, no hold left open" in out
    assert "FAIL" not in out
    assert 9 == out.count("\n  ok    ")
    for section in (
        "What a credit is",
        "Streamed chat: manager.hold()",
        "Plain calls: manager.deduct()",
        "Team calls: manager.deduct_team()",
        "Refunds, expiry and alerts",
        "One user's ledger",
    ):
        assert section in out


def test_same_seed_same_books(tmp_path: Path) -> None:
    """Two runs with one seed print the same books, whatever the loop; another seed differs."""
    first = _run(*SMALL, "--seed", "11", "--backend", _backend(), cwd=tmp_path)
    second = _run(*SMALL, "--seed", "11", "--backend", "trio", cwd=tmp_path)
    other = _run(*SMALL, "--seed", "12", "--backend", "trio", cwd=tmp_path)

    assert 0 == first.returncode == second.returncode == other.returncode
    assert _books(first.stdout) == _books(second.stdout)
    assert _books(first.stdout) != _books(other.stdout)


def test_kept_database_can_be_read_with_the_cli(tmp_path: Path) -> None:
    """--db keeps the database, which the ducto command line then reads."""
    db = tmp_path / "demo.db"
    completed = _run(*SMALL, "--db", str(db), "--backend", _backend(), cwd=tmp_path)
    again = _run(*SMALL, "--db", str(db), cwd=tmp_path)
    ledger = subprocess.run(
        [
            sys.executable,
            "-m",
            "ducto",
            "--store",
            f"sqlite:///{db}",
            "--backend",
            "trio",
            "--json",
            "stats",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert 0 == completed.returncode
    assert 2 == again.returncode
    assert "exists" in again.stderr
    assert 0 == ledger.returncode, ledger.stderr


def test_the_books_check_can_fail() -> None:
    """A tally that disagrees with the ledger is reported as a failed check."""
    demo = _demo()
    users = [demo.User("user-0", 100, pro=False, team=False, capped=False)]

    async def check(wrong_by: int) -> tuple[bool, list[str]]:
        async with MemoryStore() as store:
            await store.add_credits("user-0", 100, "purchase")
            team = await store.create_team("t", 10)
            hold = await store.reserve_credits("user-0", 10, "chat", min_balance=0)
            await store.deduct_credits("user-0", hold.reservation_id, 7)
            tally = demo.Tally(user_charged=7 + wrong_by)
            books = await demo.check_books(store, users, team.team_id, tally, 0)
            return books.ok, [label for label, passed in books.checks if not passed]

    assert (True, []) == anyio.run(check, 0)
    assert (False, ["charges the gateway saw equal the ledger's usage rows"]) == anyio.run(check, 1)


def test_open_hold_fails_the_books() -> None:
    """A hold left open is caught by the check."""
    demo = _demo()
    users = [demo.User("user-0", 100, pro=False, team=False, capped=False)]

    async def check() -> list[str]:
        async with MemoryStore() as store:
            await store.add_credits("user-0", 100, "purchase")
            team = await store.create_team("t", 10)
            await store.reserve_credits("user-0", 10, "chat", min_balance=0)
            books = await demo.check_books(store, users, team.team_id, demo.Tally(), 0)
            return [label for label, passed in books.checks if not passed]

    assert ["no hold is left open"] == anyio.run(check)


@pytest.mark.parametrize("option", ["--users", "--requests", "--concurrency"])
def test_sizes_must_be_positive(tmp_path: Path, option: str) -> None:
    """A size of 0 is refused by the option parser."""
    completed = _run(option, "0", cwd=tmp_path)

    assert 2 == completed.returncode
    assert "must be at least 1" in completed.stderr
