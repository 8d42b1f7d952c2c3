"""`ducto prune` and `ducto archive` through `main(argv)`: results as text and JSON, dry runs,
retention options, progress on stderr, and one-line errors."""

from __future__ import annotations

import gzip
import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from tests.cli._cli_support import Cli

import ducto.cli
from ducto.interface.base import CreditStore


def _old_key_and_hold(cli: Cli, days_ago: float) -> None:
    """Alice's keyed grant and a released hold, `days_ago` days in the past."""
    then = datetime.now(UTC) - timedelta(days=days_ago)

    async def work(store: CreditStore) -> None:
        (
            await store.add_credits("alice", 100, "purchase", idempotency_key="pay-1")
        ).raise_for_error()
        hold = await store.reserve_credits("alice", 10, "chat", min_balance=0, ttl=60)
        hold.raise_for_error()
        (await store.release_reservation("alice", hold.reservation_id)).raise_for_error()

    cli.with_store(work, clock=lambda: then)


def _cutoff() -> datetime:
    """The first UTC midnight of the month after the one 70 days ago: after `_old_usage`'s
    rows, before anything 39 days old or newer, and no later than this month's start."""
    then = datetime.now(UTC) - timedelta(days=70)
    first = datetime(then.year, then.month, 1, tzinfo=UTC)
    return (first + timedelta(days=32)).replace(day=1)


def _old_usage(cli: Cli, count: int) -> list[str]:
    """`count` settled usage rows of alice's, created 70 days ago (before this month)."""
    then = datetime.now(UTC) - timedelta(days=70)

    async def work(store: CreditStore) -> list[str]:
        (await store.add_credits("alice", 1000, "purchase")).raise_for_error()
        ids = []
        for _ in range(count):
            hold = await store.reserve_credits("alice", 10, "chat", min_balance=0)
            hold.raise_for_error()
            done = await store.deduct_credits("alice", hold.reservation_id, 7)
            done.raise_for_error()
            ids.append(done.transaction_id)
        return ids

    return cli.with_store(work, clock=lambda: then)


def test_prune_dry_run_counts_then_prune_deletes(cli: Cli) -> None:
    """A dry run counts the old key and hold and deletes nothing; prune deletes them once."""
    _old_key_and_hold(cli, days_ago=10)

    dry = cli.json("prune", "--dry-run")
    dry_again = cli.json("prune", "--dry-run")
    pruned = cli.json("prune")
    again = cli.json("prune")

    assert (1, 1, True) == (dry["idempotency_keys"], dry["holds"], dry["dry_run"])
    assert dry == dry_again
    assert (1, 1, False) == (pruned["idempotency_keys"], pruned["holds"], pruned["dry_run"])
    assert (0, 0) == (again["idempotency_keys"], again["holds"])
    assert {"idempotency_keys", "holds", "windows", "dry_run"} == set(pruned)


def test_prune_text_output(cli: Cli) -> None:
    """Without --json, prune says what it deleted (or would) in one sentence on stdout."""
    _old_key_and_hold(cli, days_ago=10)

    dry = cli.ok("prune", "--dry-run")
    done = cli.ok("prune")

    assert dry.out.startswith("would delete 1 idempotency records, 1 holds and ")
    assert done.out.startswith("deleted 1 idempotency records, 1 holds and ")
    assert done.out.rstrip().endswith("past retention")
    assert "" == done.err


def test_prune_keeps_what_the_retention_options_keep(cli: Cli) -> None:
    """--idempotency-retention and --hold-retention set the store's retention for the run."""
    _old_key_and_hold(cli, days_ago=10)

    kept = cli.json("prune", "--idempotency-retention", "30d", "--hold-retention", "forever")
    keys_only = cli.json("prune", "--idempotency-retention", "1d12h", "--hold-retention", "2w")
    rest = cli.json("prune", "--hold-retention", "24h")

    assert (0, 0) == (kept["idempotency_keys"], kept["holds"])
    assert (1, 0) == (keys_only["idempotency_keys"], keys_only["holds"])
    assert (0, 1) == (rest["idempotency_keys"], rest["holds"])


def test_a_pruned_key_is_a_new_request(cli: Cli) -> None:
    """A grant repeated with a key past retention (and pruned) is granted again."""
    _old_key_and_hold(cli, days_ago=10)
    cli.ok("prune")

    again = cli.json("grant", "alice", "100", "--type", "purchase", "--key", "pay-1")

    assert 200 == again["new_balance"]


@pytest.mark.parametrize(
    "value", ["3x", "0d", "", "7 days", "-1d"], ids=["unit", "zero", "empty", "words", "negative"]
)
def test_prune_refuses_a_bad_retention(cli: Cli, value: str) -> None:
    """A retention that is neither a duration nor 'forever' is a usage error naming it."""
    ran = cli("prune", "--idempotency-retention", value)

    assert 2 == ran.status
    assert "--idempotency-retention" in ran.error_line() or "duration" in ran.error_line()


def test_archive_dry_run_then_archive(cli: Cli, tmp_path: Path) -> None:
    """A dry run counts and writes nothing; the archive writes every old row and leaves the
    balance whole."""
    ids = _old_usage(cli, 3)
    before = _cutoff().strftime("%Y-%m-%d")
    target = tmp_path / "ledger.jsonl.gz"
    balance = cli.json("balance", "alice")["balance"]

    dry = cli.json("archive", "--before", before, "--to", str(target), "--dry-run")
    existed_after_dry_run = target.exists()
    done = cli.json("archive", "--before", before, "--to", str(target))
    with gzip.open(target, "rt", encoding="utf-8") as file:
        lines = [json.loads(line) for line in file]
    again = cli.json("archive", "--before", before, "--to", str(target))

    assert (4, True, 0) == (dry["rows"], dry["dry_run"], dry["bytes_written"])
    assert not existed_after_dry_run
    assert (4, False) == (done["rows"], done["dry_run"])
    assert done["bytes_written"] == target.stat().st_size
    assert f"{before}T00:00:00Z" == done["before"]
    assert str(target) == done["destination"]
    assert set(ids) < {line["id"] for line in lines}
    assert 4 == len(lines)
    assert {"seq", "spender", "model", "operation_type", "allowance"} <= set(lines[0])
    assert 0 == again["rows"]
    assert [] == cli.json("ledger", "alice")["items"]
    assert balance == cli.json("balance", "alice")["balance"]


def test_archive_text_output(cli: Cli, tmp_path: Path) -> None:
    """Without --json, archive says how many rows went where, in one sentence on stdout."""
    _old_usage(cli, 1)
    before = _cutoff()
    target = tmp_path / "a.jsonl.gz"
    day = before.strftime("%Y-%m-%d")

    dry = cli.ok("archive", "--before", day, "--to", str(target), "--dry-run")
    done = cli.ok("archive", "--before", day, "--to", str(target))

    assert f"would archive 2 ledger rows created before {day} 00:00:00Z\n" == dry.out
    assert done.out.startswith(f"archived 2 ledger rows created before {day} 00:00:00Z to ")
    assert f"({target.stat().st_size:,} bytes)" in done.out


def test_refund_of_an_archived_row_is_refused(cli: Cli, tmp_path: Path) -> None:
    """An archived usage row cannot be refunded: status 1 and transaction_archived."""
    (usage,) = _old_usage(cli, 1)
    cli.ok("archive", "--before", _cutoff().strftime("%Y-%m-%d"), "--to", str(tmp_path / "a"))

    ran = cli("refund", usage)

    assert 1 == ran.status
    assert "transaction_archived" in ran.error_line()


@pytest.mark.parametrize(
    "before",
    ["2026-13-01", "2026-1-1", "yesterday", "2026-01-01T00:00:00Z", "30d", ""],
    ids=["month", "short", "word", "instant", "duration", "empty"],
)
def test_archive_refuses_a_bad_before(cli: Cli, tmp_path: Path, before: str) -> None:
    """--before must be a date YYYY-MM-DD: anything else is a usage error naming it."""
    ran = cli("archive", "--before", before, "--to", str(tmp_path / "a.gz"))

    assert 2 == ran.status
    assert "--before must be a date YYYY-MM-DD" in ran.error_line()
    assert not (tmp_path / "a.gz").exists()


def test_archive_refuses_a_cutoff_in_the_current_month(cli: Cli, tmp_path: Path) -> None:
    """A cutoff after the start of the current UTC month would split open windows: refused."""
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%d")

    ran = cli("archive", "--before", tomorrow, "--to", str(tmp_path / "a.gz"))

    assert 2 == ran.status
    assert "before must be no later than" in ran.error_line()
    assert not (tmp_path / "a.gz").exists()


def test_archive_needs_before_and_to(cli: Cli, tmp_path: Path) -> None:
    """Both options are required; a missing one is a usage error."""
    no_before = cli("archive", "--to", str(tmp_path / "a.gz"))
    no_to = cli("archive", "--before", "2026-01-01")

    assert (2, 2) == (no_before.status, no_to.status)
    assert "--before" in no_before.error_line()
    assert "--to" in no_to.error_line()


def test_archive_into_a_missing_folder_is_refused(cli: Cli, tmp_path: Path) -> None:
    """A destination whose folder does not exist is a usage error, before anything moves."""
    ran = cli("archive", "--before", "2026-01-01", "--to", str(tmp_path / "no" / "a.gz"))

    assert 2 == ran.status
    assert "folder does not exist" in ran.error_line()


def test_archive_that_cannot_write_is_one_line(cli: Cli) -> None:
    """A full disk is a one-line error, and no row leaves the ledger."""
    full = Path("/dev/full")
    if not full.exists():  # pragma: no cover - a system without /dev/full
        pytest.skip("needs /dev/full")
    _old_usage(cli, 1)

    ran = cli("archive", "--before", _cutoff().strftime("%Y-%m-%d"), "--to", str(full))

    assert 2 == ran.status
    assert "cannot write the archive" in ran.error_line()
    assert 2 == len(cli.json("ledger", "alice")["items"])


def test_progress_goes_to_stderr(cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With no throttle, each chunk is reported on stderr; stdout keeps only the JSON;
    --no-progress reports nothing."""
    monkeypatch.setattr(ducto.cli, "PROGRESS_EVERY", 0.0)
    _old_key_and_hold(cli, days_ago=10)
    quiet = cli.ok("--json", "prune", "--dry-run", "--no-progress")
    pruned = cli.ok("--json", "prune")
    _old_usage(cli, 1)
    before = _cutoff().strftime("%Y-%m-%d")

    archived = cli.ok("--json", "archive", "--before", before, "--to", str(tmp_path / "a.gz"))

    assert "" == quiet.err
    assert [
        "pruning: 1 idempotency records, 0 holds and 0 window counters so far",
        "pruning: 1 idempotency records, 1 holds and 0 window counters so far",
    ] == pruned.err.splitlines()
    assert 1 == pruned.json()["holds"]
    assert archived.err.startswith("archiving: 2 rows, ")
    assert 2 == archived.json()["rows"]


def test_progress_is_throttled() -> None:
    """The progress reporter writes nothing for a short run and at most a line per period."""
    now = [100.0]
    stream = io.StringIO()
    ticker = ducto.cli._Ticker(str, every=0.5, clock=lambda: now[0], stream=stream)

    ticker(1)
    now[0] += 0.4
    ticker(2)
    now[0] += 0.2
    ticker(3)
    ticker(4)
    now[0] += 0.5
    ticker(5)

    assert "3\n5\n" == stream.getvalue()


def test_every_growth_command_has_help(cli: Cli) -> None:
    """prune and archive answer --help with their options."""
    prune = cli.ok("prune", "--help")
    archive = cli.ok("archive", "--help")

    assert "--idempotency-retention" in prune.out
    assert "--dry-run" in prune.out
    assert all(option in archive.out for option in ("--before", "--to", "--dry-run"))


def test_retention_options_keep_the_store_checks(cli: Cli, tmp_path: Path) -> None:
    """With retention options the store is still refused a password on --store, a missing
    SQLite file, or no URL at all, as for every command."""
    missing = cli(
        "--store",
        f"sqlite:///{tmp_path / 'nope.db'}",
        "prune",
        "--hold-retention",
        "1d",
        store=False,
    )
    password = cli(
        "--store",
        "postgresql://u:hunter2@127.0.0.1/db",
        "prune",
        "--hold-retention",
        "1d",
        store=False,
    )
    nothing = cli("prune", "--idempotency-retention", "forever", store=False)

    assert 3 == missing.status
    assert "no database at" in missing.error_line()
    assert not (tmp_path / "nope.db").exists()
    assert 2 == password.status
    assert "--store must not carry a password" in password.error_line()
    assert "hunter2" not in password.err
    assert 2 == nothing.status
    assert "no store" in nothing.error_line()


def test_retention_options_on_a_memory_store(cli: Cli) -> None:
    """memory:// takes the retention options too (an empty store: nothing to prune)."""
    ran = cli(
        "--store", "memory://", "--json", "prune", "--idempotency-retention", "1h", store=False
    )

    assert 0 == ran.status, ran.err
    assert {"idempotency_keys": 0, "holds": 0, "windows": 0, "dry_run": False} == ran.json()
