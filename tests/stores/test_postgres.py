"""
PostgresStore specifics: schemas and migrations, a fleet of processes, lost connections and an
unreachable server, the server's clock, and windows in UTC whatever the session's time zone.

Every test works in a schema of its own, dropped afterwards. The tests need
``DUCTO_TEST_POSTGRES_URL``; when ``DUCTO_REQUIRE_STORES`` names ``postgres`` they fail
without it instead of skipping.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any

import anyio
import pytest
from tests.conftest import FakeClock, drop_postgres_schema
from tests.contract._checks import all_rows, assert_invariants
from tests.stores._processes import (
    CHILD_TIMEOUT,
    CHURN_BACKENDS,
    CHURN_TASKS,
    check_churn,
    exist,
    finish,
    run_churn,
    spawn,
    wait_for,
)

from ducto.errors import ErrorCode, InvalidArgumentError, StoreError, StoreUnavailableError
from ducto.interface import open_store
from ducto.interface.models import DeductionResult, PricingConfigData, SpendCap

pytestmark = pytest.mark.postgres

psycopg = pytest.importorskip("psycopg")
psycopg_pool = pytest.importorskip("psycopg_pool")

from ducto.interface.postgres import SCHEMA_VERSION, PostgresStore  # noqa: E402


def _sql(url: str, statement: str, params: tuple[Any, ...] = ()) -> list[Any]:
    with psycopg.connect(url, autocommit=True) as conn:
        cursor = conn.execute(statement, params)
        return cursor.fetchall() if cursor.description is not None else []


@asynccontextmanager
async def opened(url: str, schema: str, **options: Any) -> AsyncIterator[PostgresStore]:
    """An open, set-up PostgresStore in `schema`."""
    async with PostgresStore(url, schema=schema, **options) as store:
        await store.setup()
        yield store


# -- schema and migrations ------------------------------------------------------------------------


async def test_setup_creates_the_schema_once(anyio_backend: str, url: str, schema: str) -> None:
    """The first setup creates every table in the store's schema; later ones find nothing."""
    async with PostgresStore(url, schema=schema) as store:
        first = await store.setup()
        second = await store.setup()

    tables = {
        row[0]
        for row in _sql(url, "SELECT tablename FROM pg_tables WHERE schemaname = %s", (schema,))
    }
    assert SCHEMA_VERSION == first.schema_version
    assert {"accounts", "ledger", "holds", "lots", "reserved_by_member"} <= set(
        first.tables_created
    )
    assert set(first.tables_created) | {"ducto_schema"} == tables
    assert ([], SCHEMA_VERSION) == (second.tables_created, second.schema_version)


async def test_a_store_in_another_schema_sees_nothing(
    anyio_backend: str, url: str, schema: str
) -> None:
    """Two schemas in one database are two separate stores."""
    other = f"{schema}_b"
    try:
        async with opened(url, schema) as one, opened(url, other) as two:
            await one.add_credits("alice", 50, "purchase")
            assert 0 == (await two.get_balance("alice")).balance
            assert 50 == (await one.get_balance("alice")).balance
    finally:
        drop_postgres_schema(other)


async def test_a_newer_schema_is_refused(anyio_backend: str, url: str, schema: str) -> None:
    """A schema written by a newer ducto is refused with a clear error and left alone."""
    async with opened(url, schema):
        pass
    _sql(url, f"UPDATE {schema}.ducto_schema SET version = %s", (SCHEMA_VERSION + 1,))

    async with PostgresStore(url, schema=schema) as store:
        with pytest.raises(StoreError, match=f"version {SCHEMA_VERSION + 1}, newer"):
            await store.setup()

    assert [(SCHEMA_VERSION + 1,)] == _sql(url, f"SELECT version FROM {schema}.ducto_schema")


async def test_a_version_1_schema_migrates_with_its_data(
    anyio_backend: str, url: str, schema: str
) -> None:
    """A schema at version 1 (before team holds) with data is migrated; the data still works."""
    script = resources.files("ducto.interface.sql.postgres").joinpath("0001_schema.sql")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
        conn.execute(f"SET search_path TO {schema}")
        conn.execute(script.read_text(encoding="utf-8"))
        conn.execute("CREATE TABLE ducto_schema (version integer NOT NULL)")
        conn.execute("INSERT INTO ducto_schema VALUES (1)")
        at = datetime(2026, 1, 10, tzinfo=UTC)
        conn.execute(
            "INSERT INTO accounts (kind, id, balance, lifetime_purchased, reserved)"
            " VALUES ('u', 'legacy', 200, 200, 30)"
        )
        conn.execute(
            "INSERT INTO lots (id, kind, account, remaining)"
            " VALUES ('lot_legacy', 'u', 'legacy', 200)"
        )
        conn.execute(
            "INSERT INTO ledger (id, kind, account, amount, type, balance_after, metadata,"
            " created_at) VALUES ('tx_legacy', 'u', 'legacy', 200, 'purchase', 200, '{}', %s)",
            (at,),
        )
        conn.execute(
            "INSERT INTO holds (id, kind, account, amount, operation_type, use_allowance,"
            " expires_at) VALUES ('res_legacy', 'u', 'legacy', 30, 'chat', false, %s)",
            (datetime(2030, 1, 1, tzinfo=UTC),),
        )

    async with PostgresStore(url, schema=schema) as store:
        migrated = await store.setup()
        before = await store.get_balance("legacy")
        settled = await store.deduct_credits("legacy", "res_legacy", 25)
        rows = await all_rows(store, "legacy")
        await assert_invariants(store, "legacy")

    assert (
        [
            "reserved_by_member",
            "rollups",
            "archived_rows",
            "reserved_by_scope",
            "top_up_claims",
            "top_up_totals",
        ],
        SCHEMA_VERSION,
    ) == (migrated.tables_created, migrated.schema_version)
    assert (200, 30, 170) == (before.balance, before.reserved, before.available)
    assert (True, 175) == (settled.ok, settled.balance_after)
    assert [("tx_legacy", 200), (settled.transaction_id, -25)] == [(r.id, r.amount) for r in rows]


async def test_a_version_4_schema_migrates_with_its_pricing_caps_and_rollups(
    anyio_backend: str, url: str, schema: str
) -> None:
    """
    A schema at version 4 with data migrates in place: the version active before (a rollback)
    stays in force and no earlier version counts as scheduled, caps, window spend and counted
    holds keep counting as unscoped, and archived rollups read as unscoped spend.
    """
    package = resources.files("ducto.interface.sql.postgres")
    one, two = datetime(2026, 1, 10, tzinfo=UTC), datetime(2026, 2, 10, tzinfo=UTC)
    now = datetime(2026, 3, 15, 12, tzinfo=UTC)
    config = json.dumps({"models": {"_default": "input_tokens * 1"}})
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
        conn.execute(f"SET search_path TO {schema}")
        for name in ("0001_schema.sql", "0002_team_holds.sql", "0003_data_path.sql"):
            conn.execute(package.joinpath(name).read_text(encoding="utf-8"))
        conn.execute(package.joinpath("0004_retention.sql").read_text(encoding="utf-8"))
        conn.execute("CREATE TABLE ducto_schema (version integer NOT NULL)")
        conn.execute("INSERT INTO ducto_schema VALUES (4)")
        for version, at in ((1, one), (2, two)):
            conn.execute(
                "INSERT INTO pricing (version, id, config, label, created_at)"
                " VALUES (%s, %s, %s, NULL, %s)",
                (version, f"price_old{version}", config, at),
            )
        conn.execute("UPDATE settings SET value = '1' WHERE key = 'pricing'")  # rolled back
        conn.execute(
            "INSERT INTO accounts (kind, id, balance, lifetime_purchased, reserved, caps)"
            " VALUES ('u', 'legacy', 500, 500, 40, 1)"
        )
        conn.execute(
            "INSERT INTO lots (id, kind, account, remaining) VALUES ('lot_old', 'u', 'legacy', 500)"
        )
        conn.execute(
            "INSERT INTO holds (id, kind, account, amount, operation_type, model, use_allowance,"
            " expires_at) VALUES ('res_old', 'u', 'legacy', 40, 'chat', 'm1', false, %s)",
            (datetime(2030, 1, 1, tzinfo=UTC),),
        )
        conn.execute("INSERT INTO reserved_by_model VALUES ('u', 'legacy', 'm1', 40)")
        conn.execute("INSERT INTO caps VALUES ('legacy', 'daily', '', 100, 'deny')")
        conn.execute("INSERT INTO spend VALUES ('legacy', 'daily', %s, '', 50)", (now.toordinal(),))
        conn.execute("INSERT INTO rollups VALUES (%s, 'legacy', 'm1', 30, 2)", (one.toordinal(),))
        conn.execute("UPDATE settings SET value = %s WHERE key = 'archived_before'", (two,))

    clock = FakeClock(now)
    async with PostgresStore(url, schema=schema, clock=clock) as store:
        migrated = await store.setup()
        active = await store.get_active_pricing()
        history = await store.get_pricing_history()
        caps = await store.list_spend_caps("legacy")
        check = await store.check_spend_cap("legacy", amount=11)
        refused = await store.reserve_credits("legacy", 20, "chat", min_balance=0)
        by_scope = await store.spend_by_scope(one, two)
        later = now + timedelta(hours=1)
        await store.set_active_pricing(
            PricingConfigData(models={"_default": "1"}), effective_at=later
        )
        before = await store.get_active_pricing()
        clock.set(later)
        after = await store.get_active_pricing()

    assert (["reserved_by_scope", "top_up_claims", "top_up_totals"], SCHEMA_VERSION) == (
        migrated.tables_created,
        migrated.schema_version,
    )
    assert active is not None
    assert (1, one, one) == (active.version, active.created_at, active.effective_at)
    assert [(2, False), (1, False)] == [(h.version, h.scheduled) for h in history]
    assert [(None, None, 100)] == [(c.model, c.scope, c.limit) for c in caps]
    assert (50, 40, True) == (check.current_spend, check.reserved, check.exceeded)
    assert ErrorCode.SPEND_CAP_EXCEEDED == refused.error
    assert [("legacy", None, 30, 2)] == [
        (r.user_id, r.scope, r.total_spend, r.transaction_count) for r in by_scope
    ]
    assert before is not None
    assert after is not None
    assert (1, 3) == (before.version, after.version)


def test_setup_from_several_processes_at_once(url: str, schema: str, tmp_path: Path) -> None:
    """Four processes (asyncio and trio) set up one schema together: one creates it."""
    go = tmp_path / "go"
    with_schema = f"{url}{'&' if '?' in url else '?'}schema={schema}"
    children = []
    from contextlib import ExitStack

    with ExitStack() as stack:
        for index, backend in enumerate(CHURN_BACKENDS):
            cfg = {
                "url": with_schema,
                "backend": backend,
                "go": str(go),
                "ready": str(tmp_path / f"ready-{index}"),
                "out": str(tmp_path / f"setup-{index}.result"),
            }
            children.append(stack.enter_context(spawn("setup", cfg, tmp_path, f"setup-{index}")))
        wait_for(
            lambda: exist(*(tmp_path / f"ready-{i}" for i in range(len(children)))),
            children,
            CHILD_TIMEOUT,
        )
        go.touch()
        for child in children:
            finish(child)
    results = [
        json.loads((tmp_path / f"setup-{i}.result").read_text(encoding="utf-8"))
        for i in range(len(children))
    ]

    assert [SCHEMA_VERSION] * len(children) == [r["schema_version"] for r in results]
    assert [False] * (len(children) - 1) + [True] == sorted(
        bool(r["tables_created"]) for r in results
    )


# -- URLs, pools and options ----------------------------------------------------------------------


async def test_the_url_names_the_schema(
    anyio_backend: str, url: str, schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``?schema=`` picks the schema; ``DUCTO_STORE_URL`` supplies the URL when none is given."""
    with_schema = f"{url}{'&' if '?' in url else '?'}schema={schema}"
    async with open_store(with_schema) as store:
        assert isinstance(store, PostgresStore)
        assert schema == store.schema
        await store.setup()
        await store.add_credits("alice", 5, "purchase")
    monkeypatch.setenv("DUCTO_STORE_URL", with_schema)
    async with open_store() as again:
        assert 5 == (await again.get_balance("alice")).balance


@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"schema": "Bad-Name"}, "schema"),
        ({"schema": "x" * 64}, "schema"),
        ({"min_size": 0}, "min_size"),
        ({"min_size": 5, "max_size": 2}, "max_size"),
        ({"connect_timeout": 0}, "connect_timeout"),
        ({"max_batch": 0}, "max_batch"),
        ({"max_batches": 0}, "max_batches"),
        ({"group_commit": "yes"}, "group_commit"),
    ],
)
def test_bad_options_are_refused(url: str, options: dict[str, Any], name: str) -> None:
    """Bad options raise InvalidArgumentError naming them, before anything connects."""
    with pytest.raises(InvalidArgumentError, match=name):
        PostgresStore(url, **options)


def test_a_dsn_is_required(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a DSN or DUCTO_STORE_URL the store says what is missing."""
    monkeypatch.delenv("DUCTO_STORE_URL", raising=False)
    with pytest.raises(InvalidArgumentError, match="DUCTO_STORE_URL"):
        PostgresStore()


async def test_a_given_pool_is_used_and_left_open(
    anyio_backend: str, url: str, schema: str
) -> None:
    """A pool the caller owns is used as is and not closed with the store."""
    async with opened(url, schema):
        pass
    options = {"autocommit": True, "options": f"-c search_path={schema}"}
    if anyio_backend == "asyncio":
        pool: Any = psycopg_pool.AsyncConnectionPool(url, min_size=1, kwargs=options, open=False)
        await pool.open()
    else:
        pool = psycopg_pool.ConnectionPool(url, min_size=1, kwargs=options, open=False)
        await anyio.to_thread.run_sync(pool.open)
    try:
        async with PostgresStore(pool=pool, schema=schema) as store:
            await store.add_credits("alice", 7, "purchase")
        assert not pool.closed
    finally:
        if anyio_backend == "asyncio":
            await pool.close()
        else:
            await anyio.to_thread.run_sync(pool.close)


async def test_a_given_pool_in_another_schema_is_refused(
    anyio_backend: str, url: str, schema: str
) -> None:
    """A pool whose connections look in another schema first is refused when the store opens."""
    if anyio_backend == "asyncio":
        pool: Any = psycopg_pool.AsyncConnectionPool(
            url, min_size=1, kwargs={"autocommit": True}, open=False
        )
        await pool.open()
    else:
        pool = psycopg_pool.ConnectionPool(url, min_size=1, kwargs={"autocommit": True}, open=False)
        await anyio.to_thread.run_sync(pool.open)
    try:
        with pytest.raises(InvalidArgumentError, match="search_path"):
            async with PostgresStore(pool=pool, schema=schema):
                pass
    finally:
        if anyio_backend == "asyncio":
            await pool.close()
        else:
            await anyio.to_thread.run_sync(pool.close)


# -- time ---------------------------------------------------------------------------------------


async def test_now_is_the_servers_clock(anyio_backend: str, url: str, schema: str) -> None:
    """Without a clock, every instant comes from the database server, inside the transaction."""
    async with opened(url, schema) as store:
        before = _sql(url, "SELECT clock_timestamp()")[0][0]
        granted = await store.add_credits("alice", 10, "purchase")
        after = _sql(url, "SELECT clock_timestamp()")[0][0]
        (row,) = await all_rows(store, "alice")
        hold = await store.reserve_credits("alice", 1, "chat", ttl=60)

    assert before <= row.created_at <= after
    assert granted.ok
    assert hold.expires_at is not None
    assert timedelta(seconds=59) < hold.expires_at - row.created_at < timedelta(seconds=70)
    assert timedelta(0) == row.created_at.utcoffset()


async def test_windows_are_utc_whatever_the_session_zone(
    anyio_backend: str, url: str, schema: str
) -> None:
    """With connections in UTC+14, daily caps and analytics still use the UTC calendar day."""
    clock = FakeClock(datetime(2026, 3, 15, 23, 30, tzinfo=UTC))  # 2026-03-16 13:30 at UTC+14
    async with opened(url, schema):
        pass
    options = {
        "autocommit": True,
        "options": f"-c search_path={schema} -c TimeZone=Pacific/Kiritimati",
    }
    if anyio_backend == "asyncio":
        pool: Any = psycopg_pool.AsyncConnectionPool(url, min_size=1, kwargs=options, open=False)
        await pool.open()
    else:
        pool = psycopg_pool.ConnectionPool(url, min_size=1, kwargs=options, open=False)
        await anyio.to_thread.run_sync(pool.open)
    try:
        async with PostgresStore(pool=pool, schema=schema, clock=clock) as store:
            await store.add_credits("alice", 100, "purchase")
            await store.set_spend_cap(SpendCap(user_id="alice", cap_type="daily", limit=50))
            charged = await store.charge_credits("alice", 30, "chat", min_balance=0)
            same_day = await store.check_spend_cap("alice")
            clock.advance(hours=1)  # 00:30 UTC on the 16th: a new UTC day
            next_day = await store.check_spend_cap("alice")
            daily = await store.daily_spend(
                datetime(2026, 3, 15, tzinfo=UTC), datetime(2026, 3, 17, tzinfo=UTC)
            )
            (row, *_) = (await store.list_transactions("alice")).items
    finally:
        if anyio_backend == "asyncio":
            await pool.close()
        else:
            await anyio.to_thread.run_sync(pool.close)

    assert charged.ok
    assert (30, 0) == (same_day.current_spend, next_day.current_spend)
    assert [("2026-03-15", 30)] == [(d.date, d.total_spend) for d in daily]
    assert datetime(2026, 3, 15, 23, 30, tzinfo=UTC) == row.created_at
    assert timedelta(0) == row.created_at.utcoffset()


# -- concurrency ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"max_batches": 16}, id="16-batches"),
        pytest.param({"group_commit": False}, id="no-group-commit"),
    ],
)
async def test_a_hot_user_is_never_overcommitted(
    anyio_backend: str, url: str, schema: str, options: dict[str, Any]
) -> None:
    """16 transactions at once x 20 holds of 1 against 100 credits: exactly 100 are placed.

    Held totals are read after the account's lock, so no hold is granted on a snapshot taken before
    another transaction's hold committed.
    """
    async with opened(url, schema, min_size=16, max_size=16, **options) as store:
        await store.add_credits("hot", 100, "purchase")
        results = []

        async def worker() -> None:
            for _ in range(20):
                results.append(await store.reserve_credits("hot", 1, "chat", min_balance=0))

        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                for _ in range(16):
                    tg.start_soon(worker)
        balance = await store.get_balance("hot")

    assert 100 == sum(r.ok for r in results)
    assert {ErrorCode.INSUFFICIENT_CREDITS} == {r.error for r in results if not r.ok}
    assert (100, 0) == (balance.reserved, balance.available)


async def test_a_refund_waits_for_its_accounts_lock(
    anyio_backend: str, url: str, schema: str
) -> None:
    """A refund, like every operation, runs only while it holds its account's advisory lock.

    Another session holds the lock of the debited account: the refund must wait for it (it
    names only a transaction, so its first read finds and locks the account), and go through
    once the lock is let go.
    """
    async with opened(url, schema) as store:
        await store.add_credits("refunded", 100, "purchase")
        hold = await store.reserve_credits("refunded", 10, "chat")
        usage = await store.deduct_credits("refunded", hold.reservation_id, 10)
        done: list[Any] = []

        async def refund() -> None:
            done.append(await store.refund_credits(usage.transaction_id, 4))

        holder = await psycopg.AsyncConnection.connect(url) if anyio_backend == "asyncio" else None
        blocker = psycopg.connect(url) if holder is None else None
        lock = "SELECT pg_advisory_xact_lock(hashtextextended('u/refunded', 7079))"
        if holder is not None:
            await holder.execute(lock)
        else:
            assert blocker is not None
            await anyio.to_thread.run_sync(blocker.execute, lock)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(refund)
                await anyio.sleep(0.5)
                assert [] == done  # still waiting for the lock
                if holder is not None:
                    await holder.commit()
                else:
                    assert blocker is not None
                    await anyio.to_thread.run_sync(blocker.commit)
        finally:
            if holder is not None:
                await holder.close()
            if blocker is not None:
                blocker.close()
        assert done[0].ok
        assert 94 == (await store.get_balance("refunded")).balance


@pytest.mark.slow
@pytest.mark.parametrize(
    ("user_count", "iterations"),
    [pytest.param(1, 30, id="one-hot-user"), pytest.param(1000, 30, id="1000-users")],
)
def test_a_fleet_of_processes_keeps_every_account_exact(
    url: str, schema: str, tmp_path: Path, user_count: int, iterations: int
) -> None:
    """Four processes (asyncio and trio) of 50 tasks each settle every hold once, with no
    overspend, every key applied once and no deadlock error surfacing."""
    users = [f"user-{i:04d}" for i in range(user_count)]
    grant = CHURN_TASKS * len(CHURN_BACKENDS) * iterations if user_count == 1 else 10**6
    with_schema = f"{url}{'&' if '?' in url else '?'}schema={schema}"

    async def fund() -> None:
        async with opened(url, schema) as store:
            for user in users:
                (await store.add_credits(user, grant, "purchase")).raise_for_error()

    anyio.run(fund)
    report = run_churn(
        {"url": with_schema, "options": {"min_size": 1, "max_size": 8}},
        tmp_path,
        users,
        iterations,
    )

    assert [] == report.problems
    if user_count == 1:
        assert report.refused > 0

    async def check() -> None:
        states = dict(_sql(url, f"SELECT id, state FROM {schema}.holds"))
        async with opened(url, schema, max_size=16) as store:
            await check_churn(store, states, users, grant, report)

    anyio.run(check, backend="trio")


# -- faults ---------------------------------------------------------------------------------------


async def test_terminated_backends_lose_nothing_acknowledged(
    anyio_backend: str, url: str, schema: str
) -> None:
    """Backends killed 20 times at random moments: every acknowledged charge is in the ledger,
    nothing is half-applied, retries with the same key converge, and the pool recovers."""
    app = f"ducto_fault_{uuid.uuid4().hex[:8]}"
    app_url = f"{url}{'&' if '?' in url else '?'}application_name={app}"
    rng = random.Random(20261127)
    acknowledged: dict[str, DeductionResult] = {}
    unknown: set[str] = set()
    lost = 0
    async with opened(app_url, schema, min_size=4, max_size=8) as store:
        await store.add_credits("alice", 10**9, "purchase")
        stop = anyio.Event()

        async def charge_loop(worker: int) -> None:
            nonlocal lost
            step = 0
            while not stop.is_set():
                key = f"w{worker}-s{step}"
                step += 1
                try:
                    result = await store.charge_credits("alice", 3, "chat", idempotency_key=key)
                except StoreUnavailableError:
                    lost += 1
                    unknown.add(key)
                    continue
                assert result.ok, result
                acknowledged[key] = result

        async def killer() -> None:
            for _ in range(20):
                await anyio.sleep(rng.uniform(0.01, 0.08))
                await anyio.to_thread.run_sync(
                    _sql,
                    url,
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE application_name = %s AND pid <> pg_backend_pid()",
                    (app,),
                )
            stop.set()

        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                for worker in range(8):
                    tg.start_soon(charge_loop, worker)
                tg.start_soon(killer)

        # The pool recovers; a retry of an unknown outcome with its key converges.
        for key in sorted(unknown):
            retried = await store.charge_credits("alice", 3, "chat", idempotency_key=key)
            assert retried.ok
            acknowledged[key] = retried
        rows = await all_rows(store, "alice")
        await assert_invariants(store, "alice")

    usage = {row.idempotency_key: row for row in rows if row.type == "usage"}
    assert lost > 0, "no connection was lost: the faults never hit an operation"
    assert set(acknowledged) == set(usage)
    assert all(usage[k].id == r.transaction_id for k, r in acknowledged.items())
    assert {1} == set(Counter(row.idempotency_key for row in rows if row.type == "usage").values())
    assert 10**9 - 3 * len(acknowledged) == rows[-1].balance_after


class _Proxy:
    """A TCP relay to the database that a test can take down and bring back on the same port."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self._scope: anyio.CancelScope | None = None

    async def serve(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        listener = await anyio.create_tcp_listener(
            local_host="127.0.0.1", local_port=self.port, reuse_port=False
        )
        self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
        with anyio.CancelScope() as scope:
            self._scope = scope
            task_status.started()
            async with listener:
                await listener.serve(self._relay)

    async def _relay(self, client: anyio.abc.SocketStream) -> None:
        async with client, await anyio.connect_tcp(*self.target) as server:

            async def pump(src: anyio.abc.SocketStream, dst: anyio.abc.SocketStream) -> None:
                async for chunk in src:
                    await dst.send(chunk)

            async with anyio.create_task_group() as tg:
                tg.start_soon(pump, client, server)
                tg.start_soon(pump, server, client)

    def down(self) -> None:
        assert self._scope is not None
        self._scope.cancel()


async def _until_it_fails(store: PostgresStore) -> None:
    """Read until a call fails (the first calls may still find a live connection)."""
    for _ in range(20):
        await store.get_balance("alice")
        await anyio.sleep(0.05)


async def test_an_unreachable_server_fails_fast_and_the_store_recovers(
    anyio_backend: str, url: str, schema: str
) -> None:
    """With the server gone, calls raise StoreUnavailableError within the connect timeout;
    once it is back, the same store works again."""
    async with opened(url, schema):
        pass
    info = psycopg.conninfo.conninfo_to_dict(url)
    proxy = _Proxy((str(info.get("host", "127.0.0.1")), int(info.get("port", 5432))))
    async with anyio.create_task_group() as tg:
        await tg.start(proxy.serve)
        relayed = url.replace(f":{info.get('port', 5432)}/", f":{proxy.port}/")
        async with PostgresStore(relayed, schema=schema, connect_timeout=2) as store:
            await store.add_credits("alice", 10, "purchase")
            proxy.down()
            started = time.monotonic()
            with pytest.raises(StoreUnavailableError):
                await _until_it_fails(store)
            assert time.monotonic() - started < 10
            await tg.start(proxy.serve)
            with anyio.fail_after(30):
                while True:
                    try:
                        balance = await store.get_balance("alice")
                        break
                    except StoreUnavailableError:
                        await anyio.sleep(0.2)
            assert 10 == balance.balance
            proxy.down()


async def test_a_server_that_is_not_there_at_open(anyio_backend: str, schema: str) -> None:
    """Opening a store on a port nothing listens on raises StoreUnavailableError promptly."""
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError):
        async with PostgresStore(
            "postgresql://postgres@127.0.0.1:1/test", schema=schema, connect_timeout=2
        ):
            pass
    assert time.monotonic() - started < 10
