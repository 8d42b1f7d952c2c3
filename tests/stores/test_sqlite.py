"""
SQLiteStore beyond the shared contract: what being the durable embedded default requires.

- Several processes on one file (asyncio and trio children, one hot user or a thousand users)
  never settle a hold twice, apply an idempotency key twice or break an account's invariants.
- A process killed with SIGKILL at random moments loses no acknowledged operation and leaves
  nothing half-applied; the next process carries on from what survived.
- A file made by an older schema migrates forward with its data; setup is idempotent, safe from
  two processes at once, and refuses a schema newer than the code.
- Backend details: WAL, INTEGER amounts, group commit batching with per-operation savepoints,
  closing, URLs and unreachable files.

The multi-process tests are plain sync tests that spawn fresh interpreters (``subprocess``, the
equivalent of the spawn start method) running `_sqlite_worker.py`; they read and check the file
afterwards through a new store and a plain `sqlite3` connection.
"""

from __future__ import annotations

import contextlib
import json
import random
import signal
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any

import anyio
import pytest
from tests.conftest import FakeClock
from tests.contract._checks import all_rows, assert_invariants
from tests.stores._processes import (
    CHILD_TIMEOUT,
    CHURN_BACKENDS,
    CHURN_TASKS,
    ChurnReport,
    check_churn,
    exist,
    finish,
    gather,
    run_churn,
    spawn,
    wait_for,
)
from tests.stores._sqlite_worker import read_log

from ducto.errors import (
    ErrorCode,
    InvalidArgumentError,
    StoreError,
    StoreUnavailableError,
)
from ducto.interface import _ledger as L
from ducto.interface import open_store
from ducto.interface.models import (
    AddCreditsResult,
    CreditMetadata,
    DeductionResult,
    PlanDefinition,
    PricingConfigData,
    RefundResult,
)
from ducto.interface.sqlite import SCHEMA_VERSION, SQLiteStore

pytestmark = [pytest.mark.anyio, pytest.mark.sqlite]


# -- helpers -------------------------------------------------------------------------------------


@contextlib.contextmanager
def raw(path: Path) -> Iterator[sqlite3.Connection]:
    """A plain `sqlite3` connection to `path` (autocommit), closed on exit."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        yield conn
    finally:
        conn.close()


def names_in(directory: Path) -> set[str]:
    """The names of the entries in `directory`."""
    return {entry.name for entry in directory.iterdir()}


def hold_states(path: Path) -> dict[str, int]:
    """Every hold in the file by id, with its state (`_ledger.HOLD_*`)."""
    with raw(path) as conn:
        return dict(conn.execute("SELECT id, state FROM holds").fetchall())


@dataclass
class Traced:
    """Every SQL statement the connections opened in a test ran, in order."""

    statements: list[str] = field(default_factory=list)

    def count(self, statement: str) -> int:
        """How many statements were exactly `statement`."""
        return sum(s == statement for s in self.statements)

    def clear(self) -> None:
        """Forget what ran so far."""
        self.statements.clear()


@pytest.fixture
def traced(monkeypatch: pytest.MonkeyPatch) -> Traced:
    """Trace every statement of every `sqlite3` connection opened from now on."""
    trace = Traced()
    real_connect = sqlite3.connect

    def connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        conn: sqlite3.Connection = real_connect(*args, **kwargs)
        conn.set_trace_callback(trace.statements.append)
        return conn

    monkeypatch.setattr(sqlite3, "connect", connect)
    return trace


@contextlib.asynccontextmanager
async def opened(path: Path | str, **options: Any) -> AsyncIterator[SQLiteStore]:
    """An open, set-up SQLiteStore on `path` (``synchronous="NORMAL"`` unless given)."""
    options.setdefault("synchronous", "NORMAL")
    async with SQLiteStore(path, **options) as store:
        await store.setup()
        yield store


# -- many processes, one file -----------------------------------------------------------------


async def fund(path: Path, users: list[str], amount: int) -> None:
    """Create the schema and grant `amount` to each user as a purchase."""
    async with opened(path) as store:

        async def grant(user: str) -> None:
            (await store.add_credits(user, amount, "purchase")).raise_for_error()

        await gather([partial(grant, u) for u in users])


@pytest.mark.slow
@pytest.mark.parametrize(
    ("user_count", "iterations"),
    [pytest.param(1, 40, id="one-hot-user"), pytest.param(1000, 40, id="1000-users")],
)
def test_processes_share_one_file(tmp_path: Path, user_count: int, iterations: int) -> None:
    """Four processes of 50 tasks each settle every hold once and keep every account exact."""
    path = tmp_path / "shared.db"
    users = [f"user-{i:04d}" for i in range(user_count)]
    # One hot user gets less than the churn would spend, so holds race at the floor too.
    grant = CHURN_TASKS * len(CHURN_BACKENDS) * iterations if user_count == 1 else 10**6
    anyio.run(fund, path, users, grant)

    report = run_churn({"path": str(path), "synchronous": "NORMAL"}, tmp_path, users, iterations)

    assert [] == report.problems
    if user_count == 1:
        assert report.refused > 0
    anyio.run(check_churn_file, path, users, grant, report, backend="trio")


async def check_churn_file(path: Path, users: list[str], grant: int, report: ChurnReport) -> None:
    """`check_churn` on the SQLite file."""
    async with opened(path) as store:
        await check_churn(store, hold_states(path), users, grant, report)


# -- crash safety --------------------------------------------------------------------------------

CRASH_TASKS = 4
CRASH_USER = "user-crash"
CRASH_GRANT = 10**9


def started(log: Path, round_: int) -> bool:
    """Whether the child of `round_` is past its retries and into new work."""
    return new_acks(log, round_) >= 3


def new_acks(log: Path, round_: int) -> int:
    """How many operations the child of `round_` acknowledged (retries not counted)."""
    prefix = f"r{round_}-"
    return sum(
        1
        for e in read_log(log)
        if e["kind"] == "ack" and not e["retried"] and e["key"].startswith(prefix)
    )


async def check_crash(path: Path, log: Path, round_: int, balance_before: int) -> int:
    """Check the file against the side log after the child of `round_` died; return the balance."""
    entries = read_log(log)
    starts = [e for e in entries if e["kind"] == "start"]
    intents = {e["key"]: e for e in entries if e["kind"] == "intent"}
    acks = [e for e in entries if e["kind"] == "ack"]
    acked = Counter(e["key"] for e in acks)
    async with opened(path) as store:
        await assert_invariants(store, CRASH_USER)
        rows = await all_rows(store, CRASH_USER)
        balance = await store.get_balance(CRASH_USER)
        lots = await store.list_lots(CRASH_USER)

    # The child started from exactly what the previous one left.
    assert (round_, balance_before) == (starts[-1]["round"], starts[-1]["balance"])
    assert {1} >= set(acked.values())
    open_intents = [k for k in intents if k not in acked]
    assert len(open_intents) <= CRASH_TASKS

    # Every acknowledged settle is in the ledger exactly as it was reported.
    usage = {row.id: row for row in rows if row.type == "usage"}
    for ack in (a for a in acks if a["op"] == "deduct"):
        row = usage.get(ack["tx"])
        assert row is not None, f"acknowledged {ack} is not in the ledger"
        assert (ack["key"], ack["rid"], -ack["amount"], ack["balance_after"]) == (
            row.idempotency_key,
            row.reservation_id,
            row.amount,
            row.balance_after,
        )

    # Every acknowledged hold (each intent names one) is still there.
    states = hold_states(path)
    assert set() == {i["rid"] for i in intents.values()} - set(states)

    # Nothing is half-applied: a usage row exactly for each settled hold, one per key.
    per_hold = Counter(row.reservation_id for row in usage.values())
    settled = {rid for rid, s in states.items() if s == L.HOLD_SETTLED}
    assert settled == set(per_hold)
    assert {1} == set(per_hold.values())
    keys = Counter(row.idempotency_key for row in usage.values())
    assert {1} == set(keys.values())
    assert set(keys) <= set(intents)
    for ack in (a for a in acks if a["op"] == "release"):
        assert L.HOLD_RELEASED == states[ack["rid"]]
    # A hold whose reserve committed but was never acknowledged stays open, counted in full.
    with raw(path) as conn:
        held = conn.execute(
            "SELECT coalesce(sum(amount), 0), count(*) FROM holds WHERE state = ?", (L.HOLD_OPEN,)
        ).fetchone()
    leaked = held[1] - sum(states[intents[k]["rid"]] == L.HOLD_OPEN for k in open_intents)
    assert leaked <= CRASH_TASKS * (round_ + 1)
    assert held[0] == balance.reserved
    assert balance.balance == sum(lot.remaining for lot in lots)
    return balance.balance


@pytest.mark.slow
@pytest.mark.parametrize(("synchronous", "rounds"), [("FULL", 20), ("NORMAL", 10)])
def test_sigkill_loses_no_acknowledged_operation(
    tmp_path: Path, synchronous: str, rounds: int
) -> None:
    """SIGKILLs at random moments lose no acknowledged settle and half-apply nothing."""
    rng = random.Random(f"crash-{synchronous}")
    path, log = tmp_path / "crash.db", tmp_path / "acks.log"
    anyio.run(fund, path, [CRASH_USER], CRASH_GRANT)
    base = {"path": str(path), "log": str(log), "user": CRASH_USER, "seed": 7}
    base |= {"tasks": CRASH_TASKS, "synchronous": synchronous}
    balance = CRASH_GRANT

    for round_ in range(rounds):
        cfg = base | {"round": round_, "backend": ("asyncio", "trio")[round_ % 2]}
        with spawn("crash", cfg, tmp_path, f"crash-{round_}") as child:
            wait_for(partial(started, log, round_), [child], CHILD_TIMEOUT)
            time.sleep(rng.uniform(0, 0.1))
            child.process.send_signal(signal.SIGKILL)
            child.process.wait()
        assert -signal.SIGKILL == child.process.returncode
        balance = anyio.run(check_crash, path, log, round_, balance)

    final = base | {"round": rounds, "backend": "asyncio", "recover": True}
    with spawn("crash", final, tmp_path, "recover") as child:
        finish(child)
    balance = anyio.run(check_crash, path, log, rounds, balance)

    entries = read_log(log)
    intents = {e["key"]: e for e in entries if e["kind"] == "intent"}
    acks = {e["key"]: e for e in entries if e["kind"] == "ack"}
    assert set(intents) == set(acks)
    spent = sum(e["amount"] for e in intents.values() if e["op"] == "deduct")
    assert CRASH_GRANT - spent == balance


# -- schema migration ----------------------------------------------------------------------------

MIGRATIONS = resources.files("ducto.interface.sql.sqlite")
LEGACY_USER = "legacy-user"
LEGACY_AT = datetime(2026, 3, 1, 9, 30, tzinfo=UTC)


def migration(name: str) -> str:
    """The text of one migration file as shipped in the package."""
    return MIGRATIONS.joinpath(name).read_text(encoding="utf-8")


def tables_in(script: str) -> list[str]:
    """The tables a migration script creates, in order."""
    return [
        line.split()[2] for line in script.splitlines() if line.upper().startswith("CREATE TABLE")
    ]


MIGRATION_FILES = (
    "0001_ledger.sql",
    "0002_plans_caps_teams.sql",
    "0003_team_holds.sql",
    "0004_idempotency_rowid.sql",
    "0005_retention.sql",
    "0006_scopes_schedules_top_ups.sql",
)


def renamed_in(script: str) -> set[str]:
    """The tables a migration script renames away (a rebuilt table's temporary name)."""
    return {
        line.split()[2]
        for line in script.splitlines()
        if line.upper().startswith("ALTER TABLE") and " RENAME TO " in line.upper()
    }


RENAMED = {table for name in MIGRATION_FILES for table in renamed_in(migration(name))}
EVERY_TABLE = [
    table
    for table in dict.fromkeys(
        table for name in MIGRATION_FILES for table in tables_in(migration(name))
    )
    if table not in RENAMED
]


def tables_of(path: Path) -> set[str]:
    """The tables the file holds."""
    with raw(path) as conn:
        return {
            row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }


def user_version(path: Path) -> int:
    """The schema version recorded in the file."""
    with raw(path) as conn:
        version: int = conn.execute("PRAGMA user_version").fetchone()[0]
    return version


def build_version_1(path: Path) -> None:
    """
    A file as schema version 1 left it: a purchase of 200 and a keyed usage of 50 drawn from it.

    Rows use the column layout of ``0001_ledger.sql`` and agree with each other: the account
    balance is the ledger sum, the lot holds the balance, the hold is settled by the usage row,
    and the deduct key's stored result is that row's.
    """
    at = int(LEGACY_AT.timestamp() * 1_000_000)
    stored = DeductionResult(
        transaction_id="tx_legacy_2",
        user_id=LEGACY_USER,
        reservation_id="res_legacy_1",
        amount=50,
        balance_after=150,
        idempotency_key="legacy-key",
    ).model_dump_json()
    with raw(path) as conn:
        conn.executescript(migration("0001_ledger.sql"))
        conn.execute("BEGIN")
        conn.execute(
            "INSERT INTO accounts (kind, id, balance, lifetime_purchased, reserved,"
            " expired_unswept, created_us) VALUES ('u', ?, 150, 200, 0, 0, ?)",
            (LEGACY_USER, at),
        )
        conn.execute(
            "INSERT INTO lots (seq, id, kind, account, remaining, expires_us, expired)"
            " VALUES (1, 'lot_legacy_1', 'u', ?, 150, NULL, 0)",
            (LEGACY_USER,),
        )
        conn.execute(
            "INSERT INTO holds (id, kind, account, amount, operation_type, model, use_allowance,"
            " expires_us, state, counted) VALUES ('res_legacy_1', 'u', ?, 60, 'chat', 'model-a',"
            " 0, ?, ?, 0)",
            (LEGACY_USER, at + 600_000_000, L.HOLD_SETTLED),
        )
        conn.execute(
            "INSERT INTO ledger (seq, id, kind, account, amount, type, balance_after, metadata,"
            " created_us) VALUES (1, 'tx_legacy_1', 'u', ?, 200, 'purchase', 200, '{}', ?)",
            (LEGACY_USER, at),
        )
        conn.execute(
            "INSERT INTO ledger (seq, id, kind, account, amount, type, balance_after, metadata,"
            " created_us, reservation_id, idempotency_key, draws, spender, model,"
            " operation_type) VALUES (2, 'tx_legacy_2', 'u', ?, -50, 'usage', 150, ?, ?,"
            " 'res_legacy_1', 'legacy-key', '[[\"lot_legacy_1\",50]]', ?, 'model-a', 'chat')",
            (LEGACY_USER, json.dumps({"model": "model-a"}), at + 1, LEGACY_USER),
        )
        conn.execute(
            "INSERT INTO idempotency (kind, account, op, key, fingerprint, result)"
            " VALUES ('u', ?, 'deduct', 'legacy-key', '[\"res_legacy_1\", 50]', ?)",
            (LEGACY_USER, stored),
        )
        conn.execute("COMMIT")
        conn.execute("PRAGMA user_version = 1")


async def test_version_1_file_migrates_with_its_data(
    anyio_backend: str, tmp_path: Path, clock: FakeClock
) -> None:
    """A version-1 file moves to version 2 and its balance, ledger, lot and key survive intact."""
    path = tmp_path / "v1.db"
    build_version_1(path)

    async with SQLiteStore(path, clock=clock) as store:
        result = await store.setup()
        balance = await store.get_balance(LEGACY_USER)
        rows = await all_rows(store, LEGACY_USER)
        lots = await store.list_lots(LEGACY_USER)
        replay = await store.deduct_credits(LEGACY_USER, "res_legacy_1", 50, "legacy-key")
        again = await store.deduct_credits(LEGACY_USER, "res_legacy_1", 50)
        await assert_invariants(store, LEGACY_USER)

    assert SCHEMA_VERSION == result.schema_version
    assert set(EVERY_TABLE) == tables_of(path)
    assert SCHEMA_VERSION == user_version(path)
    with raw(path) as conn:
        (idempotency,) = conn.execute(
            "SELECT sql FROM sqlite_master WHERE name = 'idempotency'"
        ).fetchone()
    assert "WITHOUT ROWID" not in idempotency.upper()  # rebuilt by 0004, keys kept
    assert (150, 200, 150, 0) == (
        balance.balance,
        balance.lifetime_purchased,
        balance.available,
        balance.reserved,
    )
    assert [
        ("tx_legacy_1", 200, "purchase", 200, None, None, LEGACY_AT),
        ("tx_legacy_2", -50, "usage", 150, "res_legacy_1", "legacy-key", LEGACY_AT),
    ] == [
        (
            r.id,
            r.amount,
            r.type,
            r.balance_after,
            r.reservation_id,
            r.idempotency_key,
            r.created_at.replace(microsecond=0),
        )
        for r in rows
    ]
    assert [("lot_legacy_1", 150, None, False)] == [
        (lot.id, lot.remaining, lot.expires_at, lot.expired) for lot in lots
    ]
    assert (True, True, "tx_legacy_2", 150) == (
        replay.ok,
        replay.idempotent,
        replay.transaction_id,
        replay.balance_after,
    )
    assert ErrorCode.RESERVATION_ALREADY_SETTLED == again.error


async def test_migrated_file_keeps_working(
    anyio_backend: str, tmp_path: Path, clock: FakeClock
) -> None:
    """After migrating, old rows refund into their old lot and new holds settle as usual."""
    path = tmp_path / "v1.db"
    build_version_1(path)

    async with opened(path, clock=clock) as store:
        refund = await store.refund_credits("tx_legacy_2", 20, "migrated")
        hold = await store.reserve_credits(LEGACY_USER, 30, "chat", CreditMetadata(model="m"))
        settled = await store.deduct_credits(LEGACY_USER, hold.reservation_id, 25, "new-key")
        plan = PlanDefinition(id="pro", name="Pro", free_allowance=10)
        await store.set_active_pricing(
            PricingConfigData(models={"_default": "0"}, plans={"pro": plan})
        )
        await store.set_user_plan(LEGACY_USER, "pro")
        user_plan = await store.get_user_plan(LEGACY_USER)
        lots = await store.list_lots(LEGACY_USER)
        balance = await store.get_balance(LEGACY_USER)
        await assert_invariants(store, LEGACY_USER)

    assert (True, 170, 30) == (refund.ok, refund.new_balance, refund.refundable)
    assert (True, 145, -25) == (settled.ok, settled.balance_after, settled.amount)
    assert ("pro", 10) == (user_plan.plan_id, user_plan.free_allowance)
    assert [("lot_legacy_1", 145)] == [(lot.id, lot.remaining) for lot in lots]
    assert (145, 200, 155) == (balance.balance, balance.lifetime_purchased, balance.available)


async def test_setup_twice_is_idempotent(anyio_backend: str, tmp_path: Path) -> None:
    """A second setup creates nothing, keeps the data and reports the same version."""
    path = tmp_path / "twice.db"
    async with SQLiteStore(path, synchronous="NORMAL") as store:
        first = await store.setup()
        await store.add_credits("user-a", 40, "purchase")
        second = await store.setup()
        balance = await store.get_balance("user-a")
    async with SQLiteStore(path, synchronous="NORMAL") as store:
        third = await store.setup()

    assert SCHEMA_VERSION == first.schema_version
    assert ([], SCHEMA_VERSION) == (second.tables_created, second.schema_version)
    assert ([], SCHEMA_VERSION) == (third.tables_created, third.schema_version)
    assert 40 == balance.balance
    assert SCHEMA_VERSION == user_version(path)
    assert set(EVERY_TABLE) == tables_of(path)


async def test_setup_reports_every_table_it_creates(anyio_backend: str, tmp_path: Path) -> None:
    """SetupResult.tables_created names every table made: all on a fresh file, later ones' on v1."""
    fresh, old = tmp_path / "fresh.db", tmp_path / "v1.db"
    build_version_1(old)

    async with SQLiteStore(fresh, synchronous="NORMAL") as store:
        created = await store.setup()
    async with SQLiteStore(old, synchronous="NORMAL") as store:
        migrated = await store.setup()

    assert EVERY_TABLE == created.tables_created
    assert [
        *tables_in(migration("0002_plans_caps_teams.sql")),
        *tables_in(migration("0003_team_holds.sql")),
        *tables_in(migration("0005_retention.sql")),
        *(t for t in tables_in(migration("0006_scopes_schedules_top_ups.sql")) if t not in RENAMED),
    ] == migrated.tables_created


@pytest.mark.slow
def test_setup_from_two_processes_at_once(tmp_path: Path) -> None:
    """Two processes setting up one fresh file at the same moment both succeed, once each."""
    for attempt in range(3):
        workdir = tmp_path / f"attempt-{attempt}"
        workdir.mkdir()
        path, go = workdir / "fresh.db", workdir / "go"
        with contextlib.ExitStack() as stack:
            children = [
                stack.enter_context(
                    spawn(
                        "setup",
                        {
                            "path": str(path),
                            "backend": backend,
                            "go": str(go),
                            "ready": str(workdir / f"ready-{backend}"),
                            "out": str(workdir / f"{backend}.result"),
                        },
                        workdir,
                        backend,
                    )
                )
                for backend in ("asyncio", "trio")
            ]
            wait_for(
                partial(exist, workdir / "ready-asyncio", workdir / "ready-trio"),
                children,
                CHILD_TIMEOUT,
            )
            go.touch()
            for child in children:
                finish(child)
        results = [
            json.loads((workdir / f"{b}.result").read_text(encoding="utf-8"))
            for b in ("asyncio", "trio")
        ]

        assert [SCHEMA_VERSION] * 2 == [r["schema_version"] for r in results]
        # One of them found the schema already there; the other created it.
        assert [False, True] == sorted(bool(r["tables_created"]) for r in results)
        assert SCHEMA_VERSION == user_version(path)
        assert set(EVERY_TABLE) == tables_of(path)


async def test_newer_schema_is_refused(anyio_backend: str, tmp_path: Path) -> None:
    """A file from a newer ducto (higher user_version) is refused and left untouched."""
    path = tmp_path / "future.db"
    with raw(path) as conn:
        conn.execute("CREATE TABLE from_the_future (x INTEGER)")
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")

    async with SQLiteStore(path, synchronous="NORMAL") as store:
        with pytest.raises(StoreError, match=f"version {SCHEMA_VERSION + 1}"):
            await store.setup()

    assert SCHEMA_VERSION + 1 == user_version(path)
    with raw(path) as conn:
        assert [("from_the_future",)] == conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'"
        ).fetchall()


# -- backend specifics ---------------------------------------------------------------------------


async def test_file_is_in_wal_mode_with_the_requested_sync(
    anyio_backend: str, tmp_path: Path, traced: Traced
) -> None:
    """A file database runs in WAL mode, with the synchronous level the caller chose."""
    async with opened(tmp_path / "normal.db", synchronous="NORMAL"):
        pass
    normal = list(traced.statements)
    traced.clear()
    async with SQLiteStore(tmp_path / "default.db") as store:
        await store.setup()
    default = list(traced.statements)

    with raw(tmp_path / "normal.db") as conn:
        assert "wal" == conn.execute("PRAGMA journal_mode").fetchone()[0]
    assert "PRAGMA journal_mode = WAL" in normal
    assert "PRAGMA synchronous = NORMAL" in normal
    assert "PRAGMA synchronous = FULL" in default
    assert "PRAGMA foreign_keys = ON" in default


async def test_amounts_are_stored_as_exact_integers(
    anyio_backend: str, tmp_path: Path, user_id: str
) -> None:
    """Every amount column holds SQLite INTEGERs, exact up to the 2**62 bound."""
    path = tmp_path / "ints.db"
    async with opened(path) as store:
        await store.add_credits(user_id, 2**62 - 1, "purchase")
        await store.add_credits(user_id, 1, "purchase")
        with pytest.raises(InvalidArgumentError, match="balance"):
            await store.add_credits(user_id, 1, "purchase")
        hold = await store.reserve_credits(user_id, 7, "chat", min_balance=0)
        settled = await store.deduct_credits(user_id, hold.reservation_id, 7)
        await store.refund_credits(settled.transaction_id, 3)
        await store.reserve_credits(user_id, 5, "chat", min_balance=0)
        balance = await store.get_balance(user_id)
        await assert_invariants(store, user_id)
    columns = {
        "ledger": ("amount", "balance_after", "refunded", "created_us"),
        "accounts": ("balance", "lifetime_purchased", "reserved", "expired_unswept"),
        "lots": ("remaining",),
        "holds": ("amount", "expires_us"),
    }
    with raw(path) as conn:
        kinds = {
            (table, column): {
                row[0] for row in conn.execute(f"SELECT DISTINCT typeof({column}) FROM {table}")
            }
            for table, columns_ in columns.items()
            for column in columns_
        }
        stored = conn.execute(
            "SELECT balance FROM accounts WHERE kind = 'u' AND id = ?", (user_id,)
        ).fetchone()[0]

    assert {key: {"integer"} for key in kinds} == kinds
    assert (2**62 - 4, 2**62 - 4) == (stored, balance.balance)
    assert (2**62, 5) == (balance.lifetime_purchased, balance.reserved)


CONCURRENT = 200


@pytest.mark.parametrize(
    ("options", "most_commits"),
    [
        pytest.param({}, CONCURRENT // 20, id="group-commit"),
        pytest.param({"max_batch": 1}, CONCURRENT, id="max-batch-1"),
        pytest.param({"group_commit": False}, CONCURRENT, id="no-group-commit"),
    ],
)
async def test_group_commit_batches_and_stays_exact(
    anyio_backend: str,
    tmp_path: Path,
    traced: Traced,
    options: dict[str, Any],
    most_commits: int,
) -> None:
    """200 concurrent settles share a few commits with group commit, one each without it."""
    users = [f"user-{i}" for i in range(20)]
    async with opened(tmp_path / "batch.db", **options) as store:
        for user in users:
            await store.add_credits(user, 1000, "purchase")
        holds = [
            (users[i % 20], (await store.reserve_credits(users[i % 20], 5, "chat")).reservation_id)
            for i in range(CONCURRENT)
        ]
        results: list[DeductionResult] = []

        async def settle(index: int) -> None:
            user, rid = holds[index]
            results.append(await store.deduct_credits(user, rid, 1 + index % 5, f"key-{index}"))

        traced.clear()
        await gather([partial(settle, i) for i in range(CONCURRENT)])
        commits = traced.count("COMMIT")
        balances = {user: (await store.get_balance(user)).balance for user in users}
        for user in users:
            await assert_invariants(store, user)

    spent: Counter[str] = Counter()
    for index in range(CONCURRENT):
        spent[users[index % 20]] += 1 + index % 5
    assert [True] * CONCURRENT == [r.ok and not r.idempotent for r in results]
    assert CONCURRENT == len({r.transaction_id for r in results})
    assert {user: 1000 - spent[user] for user in users} == balances
    assert commits <= most_commits
    if most_commits == CONCURRENT:
        assert CONCURRENT == commits


async def test_refused_operation_in_a_batch_changes_nothing(
    anyio_backend: str, tmp_path: Path, traced: Traced
) -> None:
    """An over-refund sharing a transaction with valid settles and a refund is refused alone."""
    async with opened(tmp_path / "refused.db") as store:
        await store.add_credits("user-a", 100, "purchase")
        hold = await store.reserve_credits("user-a", 10, "chat")
        usage = await store.deduct_credits("user-a", hold.reservation_id, 10)
        others = [f"user-{i}" for i in range(8)]
        holds: dict[str, str] = {}
        for user in others:
            await store.add_credits(user, 50, "purchase")
            holds[user] = (await store.reserve_credits(user, 5, "chat")).reservation_id
        refunds: dict[int, RefundResult] = {}
        settles: list[DeductionResult] = []

        async def refund(amount: int) -> None:
            refunds[amount] = await store.refund_credits(usage.transaction_id, amount)

        async def settle(user: str) -> None:
            settles.append(await store.deduct_credits(user, holds[user], 5))

        traced.clear()
        await gather(
            [partial(refund, 11), partial(refund, 4)] + [partial(settle, u) for u in others]
        )
        batches = (traced.count("BEGIN IMMEDIATE"), traced.count("COMMIT"))
        rows = await all_rows(store, "user-a")
        balances = [(await store.get_balance(user)).balance for user in others]
        for user in ["user-a", *others]:
            await assert_invariants(store, user)

    assert (1, 1) == batches
    assert ErrorCode.OVER_REFUND == refunds[11].error
    assert (True, 94, 6) == (refunds[4].ok, refunds[4].new_balance, refunds[4].refundable)
    assert [True] * len(others) == [s.ok for s in settles]
    assert [45] * len(others) == balances
    assert [("purchase", 100, 0), ("usage", -10, 4), ("refund", 4, 0)] == [
        (r.type, r.amount, r.refunded) for r in rows
    ]


async def test_failing_operation_in_a_batch_rolls_back_alone(
    anyio_backend: str, tmp_path: Path, traced: Traced
) -> None:
    """A settle refused by the -2**62 bound raises alone; its batch-mates all commit."""
    async with opened(tmp_path / "bound.db") as store:
        await store.add_credits("user-deep", 2, "purchase")
        first = await store.reserve_credits("user-deep", 1, "chat", min_balance=0)
        second = await store.reserve_credits("user-deep", 1, "chat", min_balance=0)
        await store.deduct_credits("user-deep", first.reservation_id, 2**62)
        others = [f"user-{i}" for i in range(8)]
        holds: dict[str, str] = {}
        for user in others:
            await store.add_credits(user, 50, "purchase")
            holds[user] = (await store.reserve_credits(user, 5, "chat")).reservation_id
        outcomes: dict[str, object] = {}

        async def settle(user: str, rid: str, amount: int) -> None:
            try:
                outcomes[user] = await store.deduct_credits(user, rid, amount)
            except InvalidArgumentError as exc:
                outcomes[user] = exc

        async def grant() -> None:
            outcomes["grant"] = await store.add_credits("user-new", 9, "purchase")

        traced.clear()
        calls: list[Callable[[], Awaitable[None]]] = [grant]
        calls.append(partial(settle, "user-deep", second.reservation_id, 3))
        calls.extend(partial(settle, u, holds[u], 4) for u in others)
        await gather(calls)
        batch = [traced.count(s) for s in ("BEGIN IMMEDIATE", "ROLLBACK TO op", "COMMIT")]
        deep = await store.get_balance("user-deep")
        deep_rows = await all_rows(store, "user-deep")
        balances = [(await store.get_balance(user)).balance for user in [*others, "user-new"]]
        # The refused settle left its hold open: it still settles at the bound exactly.
        retry = await store.deduct_credits("user-deep", second.reservation_id, 2)
        for user in ["user-deep", "user-new", *others]:
            await assert_invariants(store, user)

    assert [1, 1, 1] == batch
    assert isinstance(outcomes["user-deep"], InvalidArgumentError)
    assert all(isinstance(o, DeductionResult) and o.ok for u, o in outcomes.items() if u in others)
    assert isinstance(outcomes["grant"], AddCreditsResult)
    assert outcomes["grant"].ok
    assert [46] * len(others) + [9] == balances
    assert (2 - 2**62, 1) == (deep.balance, deep.reserved)
    assert ["purchase", "usage"] == [r.type for r in deep_rows]
    assert (True, -(2**62)) == (retry.ok, retry.balance_after)


POISON = (
    "CREATE TRIGGER poison BEFORE INSERT ON ledger"
    " WHEN NEW.account = 'user-poison' AND NEW.type = 'usage'"
    " BEGIN SELECT RAISE(ABORT, 'poisoned usage row'); END"
)


@pytest.mark.parametrize("batched", [True, False], ids=["in-a-batch", "alone"])
async def test_operation_failing_midway_rolls_back_alone(
    anyio_backend: str, tmp_path: Path, traced: Traced, batched: bool
) -> None:
    """A settle failing at its last write undoes its earlier writes; its batch-mates commit."""
    path = tmp_path / "poison.db"
    async with opened(path, max_batch=100 if batched else 1) as store:
        await store.add_credits("user-poison", 30, "purchase")
        poisoned = await store.reserve_credits("user-poison", 10, "chat", min_balance=0)
        others = [f"user-{i}" for i in range(6)]
        holds: dict[str, str] = {}
        for user in others:
            await store.add_credits(user, 50, "purchase")
            holds[user] = (await store.reserve_credits(user, 5, "chat")).reservation_id
        before = await store.get_balance("user-poison")
        lots_before = await store.list_lots("user-poison")
        with raw(path) as conn:
            conn.execute(POISON)
        outcomes: dict[str, object] = {}

        async def settle(user: str, rid: str) -> None:
            try:
                outcomes[user] = await store.deduct_credits(user, rid, 8, f"key-{user}")
            except StoreError as exc:
                outcomes[user] = exc

        traced.clear()
        await gather(
            [partial(settle, "user-poison", poisoned.reservation_id)]
            + [partial(settle, u, holds[u]) for u in others]
        )
        rolled_back = traced.count("ROLLBACK TO op") + traced.count("ROLLBACK")
        after = await store.get_balance("user-poison")
        lots_after = await store.list_lots("user-poison")
        with raw(path) as conn:
            conn.execute("DROP TRIGGER poison")
        # Nothing of the failed settle stuck: its hold and its key are still unused.
        retry = await store.deduct_credits(
            "user-poison", poisoned.reservation_id, 8, "key-user-poison"
        )
        for user in ["user-poison", *others]:
            await assert_invariants(store, user)

    assert isinstance(outcomes["user-poison"], StoreError)
    assert "poisoned usage row" in str(outcomes["user-poison"])
    assert isinstance(outcomes["user-poison"].__cause__, sqlite3.IntegrityError)
    assert [True] * len(others) == [
        isinstance(o, DeductionResult) and o.ok for u, o in outcomes.items() if u != "user-poison"
    ]
    assert 1 == rolled_back
    assert before == after
    assert lots_before == lots_after
    assert (True, False, 22) == (retry.ok, retry.idempotent, retry.balance_after)


def every_call(store: SQLiteStore) -> list[Callable[[], Awaitable[object]]]:
    """One call of each kind of store method, all valid on an open store."""
    now = datetime(2026, 3, 15, tzinfo=UTC)
    return [
        store.open,
        store.setup,
        lambda: store.get_balance("u"),
        lambda: store.add_credits("u", 1, "purchase"),
        lambda: store.reserve_credits("u", 1, "chat"),
        lambda: store.deduct_credits("u", "res_x", 1),
        lambda: store.release_reservation("u", "res_x"),
        lambda: store.refund_credits("tx_x"),
        store.sweep_expired_credits,
        lambda: store.list_transactions("u"),
        lambda: store.list_lots("u"),
        store.get_active_pricing,
        store.get_pricing_history,
        lambda: store.get_user_plan("u"),
        lambda: store.check_allowance("u"),
        lambda: store.check_spend_cap("u"),
        lambda: store.list_spend_caps("u"),
        lambda: store.create_team("team"),
        lambda: store.get_team_balance("team_x"),
        lambda: store.deduct_team("team_x", "u", 1),
        lambda: store.spend_by_user(now, now),
        lambda: store.aggregate_stats(now, now),
    ]


async def test_every_call_after_aclose_raises_store_error(
    anyio_backend: str, tmp_path: Path
) -> None:
    """Once closed, every method (and reopening) raises StoreError; closing again is harmless."""
    store = SQLiteStore(tmp_path / "closed.db", synchronous="NORMAL")
    async with store:
        await store.setup()
        await store.add_credits("u", 5, "purchase")
    await store.aclose()

    for call in every_call(store):
        with pytest.raises(StoreError, match="closed"):
            await call()


async def test_calls_before_open_raise_store_error(anyio_backend: str, tmp_path: Path) -> None:
    """A store that was never opened raises StoreError on use and creates no file."""
    store = SQLiteStore(tmp_path / "never.db")

    for call in every_call(store)[1:]:
        with pytest.raises(StoreError, match="not open"):
            await call()
    assert not (tmp_path / "never.db").exists()


async def test_aclose_during_traffic_answers_every_caller_truthfully(
    anyio_backend: str, tmp_path: Path
) -> None:
    """Closing mid-traffic: each caller gets its committed result or StoreError, never a lie."""
    path = tmp_path / "closing.db"
    outcomes: dict[str, object] = {}
    store = SQLiteStore(path, synchronous="NORMAL", max_batch=8)
    async with store:
        await store.setup()
        first_answer = anyio.Event()

        async def grant(index: int) -> None:
            key = f"grant-{index}"
            try:
                outcomes[key] = await store.add_credits("user-a", index + 1, idempotency_key=key)
            except StoreError as exc:
                outcomes[key] = exc
            first_answer.set()

        async def close() -> None:
            await first_answer.wait()
            await store.aclose()

        await gather([*(partial(grant, i) for i in range(100)), close])

    async with opened(path) as reopened:
        rows = await all_rows(reopened, "user-a")
        await assert_invariants(reopened, "user-a")

    done = {k: o for k, o in outcomes.items() if isinstance(o, AddCreditsResult)}
    failed = {k: o for k, o in outcomes.items() if isinstance(o, StoreError)}
    assert 100 == len(done) + len(failed)
    assert done
    assert failed
    assert {(o.transaction_id, k) for k, o in done.items()} == {
        (r.id, r.idempotency_key) for r in rows
    }


async def test_a_write_lock_held_elsewhere_is_store_unavailable(
    anyio_backend: str, tmp_path: Path
) -> None:
    """A write that cannot get the lock in busy_timeout is StoreUnavailableError; reads go on."""
    path = tmp_path / "locked.db"
    async with opened(path, busy_timeout=0.2) as store:
        await store.add_credits("user-a", 10, "purchase")
        with raw(path) as other:
            other.execute("BEGIN IMMEDIATE")
            with pytest.raises(StoreUnavailableError, match="locked") as refused:
                await store.add_credits("user-a", 5, "purchase")
            page = await store.list_transactions("user-a")
            other.execute("ROLLBACK")
        retried = await store.add_credits("user-a", 5, "purchase")
        rows = await all_rows(store, "user-a")

    assert isinstance(refused.value.__cause__, sqlite3.OperationalError)
    assert 1 == len(page.items)
    assert (True, 15) == (retried.ok, retried.new_balance)
    assert [10, 5] == [r.amount for r in rows]


async def test_two_stores_on_one_file_never_overspend(anyio_backend: str, tmp_path: Path) -> None:
    """Two connections racing 1-credit holds against 10 spendable credits: exactly 10 win."""
    path = tmp_path / "two.db"
    async with opened(path) as left, opened(path) as right:
        await left.add_credits("user-a", 15, "purchase")
        wins: list[bool] = []

        async def hold(store: SQLiteStore) -> None:
            result = await store.reserve_credits("user-a", 1, "chat", min_balance=5)
            wins.append(result.ok)

        await gather([partial(hold, s) for s in [left, right] * 20])
        seen_by_left = await left.get_balance("user-a")
        seen_by_right = await right.get_balance("user-a")

    assert 10 == sum(wins)
    assert (10, 5) == (seen_by_left.reserved, seen_by_left.available)
    assert seen_by_left == seen_by_right


async def test_open_store_urls(
    anyio_backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """sqlite:////absolute, sqlite:///relative and sqlite://:memory: all open working stores."""
    monkeypatch.chdir(tmp_path)
    urls = {
        "absolute": f"sqlite:///{tmp_path / 'absolute.db'}",
        "relative": "sqlite:///relative.db",
        "memory": "sqlite://:memory:",
    }
    balances: dict[str, int] = {}
    for name, url in urls.items():
        store = open_store(url, synchronous="NORMAL")
        assert isinstance(store, SQLiteStore)
        async with store:
            await store.setup()
            await store.add_credits("user-a", 7, "purchase")
            balances[name] = (await store.get_balance("user-a")).balance

    assert {"absolute": 7, "relative": 7, "memory": 7} == balances
    assert {"absolute.db", "relative.db"} <= names_in(tmp_path)
    assert ":memory:" not in names_in(tmp_path)


async def test_unreachable_files_raise_store_errors(anyio_backend: str, tmp_path: Path) -> None:
    """A path in a missing directory is StoreUnavailableError; a non-database file StoreError."""
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not an sqlite database file, just some bytes" * 100)
    missing = SQLiteStore(tmp_path / "no-such-dir" / "x.db")
    not_db = SQLiteStore(junk)

    with pytest.raises(StoreUnavailableError) as unavailable:
        await missing.open()
    with pytest.raises(StoreError) as broken:
        async with not_db:
            pass
    await missing.aclose()
    await not_db.aclose()

    assert isinstance(unavailable.value, StoreError)
    assert isinstance(unavailable.value.__cause__, sqlite3.OperationalError)
    assert isinstance(broken.value.__cause__, sqlite3.DatabaseError)
    assert not (tmp_path / "no-such-dir").exists()


@pytest.mark.parametrize(
    "options",
    [
        {"synchronous": "OFF"},
        {"busy_timeout": -1},
        {"busy_timeout": True},
        {"max_batch": 0},
        {"group_commit": "yes"},
    ],
)
def test_bad_constructor_arguments_raise(tmp_path: Path, options: dict[str, Any]) -> None:
    """Bad options are refused with InvalidArgumentError before any file is touched."""
    with pytest.raises(InvalidArgumentError, match=next(iter(options))):
        SQLiteStore(tmp_path / "x.db", **options)

    assert [] == list(tmp_path.iterdir())


def test_failed_open_leaves_no_thread_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refused open under asyncio stops its connection thread before the loop can close."""
    crashed: list[str] = []

    def excepthook(args: threading.ExceptHookArgs) -> None:
        crashed.append(f"{args.thread}: {args.exc_type.__name__}: {args.exc_value}")

    monkeypatch.setattr(threading, "excepthook", excepthook)
    before = set(threading.enumerate())

    async def refused_open() -> None:
        store = SQLiteStore(tmp_path / "no-such-dir" / "x.db")
        with pytest.raises(StoreUnavailableError):
            await store.open()
        await store.aclose()

    for _ in range(5):
        anyio.run(refused_open, backend="asyncio")
    for thread in set(threading.enumerate()) - before:
        thread.join(5)

    assert [] == crashed


# -- paths, URLs and the schema ------------------------------------------------------------------


async def test_a_file_uri_name_is_a_path_not_a_uri(
    anyio_backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A name SQLite would read as a URI (in-memory, shared cache) is a file, and keeps data."""
    monkeypatch.chdir(tmp_path)
    name = "file:billing.db?mode=memory&cache=shared"
    for _ in range(2):
        async with opened(name) as store:
            await store.add_credits("alice", 5, "purchase", idempotency_key="evt")
        async with opened(name) as store:
            balance = await store.get_balance("alice")

    assert 5 == balance.balance
    assert (tmp_path / name).exists()


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:///billing.db?mode=memory",
        "sqlite:///file:billing.db?mode=memory&cache=shared",
        "sqlite:///billing.db#x",
        "sqlite:///\x00.db",
        "memory://\x00",
    ],
)
def test_open_store_refuses_query_options_and_nul(url: str) -> None:
    """A sqlite URL names a file: no query string, no fragment, no NUL; nothing is created."""
    with pytest.raises(InvalidArgumentError, match="url"):
        open_store(url)


def test_a_nul_in_the_path_is_refused(tmp_path: Path) -> None:
    """SQLiteStore refuses a path with a NUL before anything is opened."""
    with pytest.raises(InvalidArgumentError, match="path"):
        SQLiteStore(str(tmp_path / "bad\x00.db"))


async def test_a_store_used_before_setup_says_to_call_setup(
    anyio_backend: str, tmp_path: Path
) -> None:
    """Before setup(), a call fails with a StoreError that says to call setup(), not SQL."""
    async with SQLiteStore(tmp_path / "new.db") as store:
        with pytest.raises(StoreError, match=r"call `await store.setup\(\)`"):
            await store.get_balance("alice")
        await store.setup()
        assert 0 == (await store.get_balance("alice")).balance


async def test_setup_by_another_process_is_seen(anyio_backend: str, tmp_path: Path) -> None:
    """A store opened before another one set the schema up works once it has."""
    path = tmp_path / "shared.db"
    async with SQLiteStore(path) as early:
        with pytest.raises(StoreError, match="setup"):
            await early.get_balance("alice")
        async with opened(path) as other:
            await other.add_credits("alice", 3, "purchase")
        assert 3 == (await early.get_balance("alice")).balance


def test_the_private_aiosqlite_hooks_still_exist() -> None:
    """The supported aiosqlite versions still queue a callable onto the connection thread
    through ``Connection._execute`` and keep the thread in ``_thread``.

    The store relies on both (one thread hop per transaction); this fails loudly when an
    aiosqlite release changes them.
    """
    aiosqlite = pytest.importorskip("aiosqlite")

    async def main() -> None:
        conn = aiosqlite.Connection(lambda: sqlite3.connect(":memory:"), iter_chunk_size=64)
        await conn
        try:
            assert isinstance(conn._thread, threading.Thread)
            assert threading.get_ident() != await conn._execute(threading.get_ident)
            assert 7 == await conn._execute(lambda a, b: a + b, 3, 4)
        finally:
            await conn.close()

    anyio.run(main, backend="asyncio")


@pytest.mark.parametrize(
    ("code", "unavailable"),
    [(sqlite3.SQLITE_BUSY, True), (sqlite3.SQLITE_CANTOPEN, True), (sqlite3.SQLITE_ERROR, False)],
)
def test_driver_errors_are_translated_by_result_code(code: int, unavailable: bool) -> None:
    """SQLite's result code (not the message text) decides StoreUnavailableError vs StoreError."""
    from ducto.interface.sqlite import _translate

    error = sqlite3.OperationalError("a message that mentions nothing useful")
    error.sqlite_errorcode = code
    translated = _translate(error)

    assert unavailable == isinstance(translated, StoreUnavailableError)
    assert isinstance(translated, StoreError)
    assert error is translated.__cause__
