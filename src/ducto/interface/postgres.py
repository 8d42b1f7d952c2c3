"""
`PostgresStore`: the contract on PostgreSQL, for fleets of processes on many hosts.

Every operation is the engine's (`_engine`), run in one short transaction in at most two round
trips in the common case (see `_postgres_storage` and ``docs/architecture.md``): the accounts
it changes are created if missing and locked in a fixed order (teams before users), everything
its arguments name is read *after* the lock in the same pipeline, the engine runs on that
snapshot, and the writes go with ``COMMIT`` in a second pipeline. The rules stay in Python;
nothing is written in PL/pgSQL.

Under asyncio it uses psycopg 3's async connections from a `psycopg_pool.AsyncConnectionPool`
(no thread hop per operation). psycopg's async side does not run under trio, so there the same
transactions run on psycopg's synchronous connections (a `psycopg_pool.ConnectionPool`) on
worker threads, one hop per operation. Serialization failures and deadlocks are retried inside
the store; "now" comes from the database server's clock, read after the locks, unless the
store is given a `clock`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Generator, Iterable, Sequence
from datetime import datetime
from decimal import ROUND_HALF_EVEN, Decimal
from functools import partial
from importlib import resources
from typing import TYPE_CHECKING, Any, Final, TypeVar
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import anyio
import sniffio
from anyio.lowlevel import checkpoint

from ducto._shown import shown
from ducto.errors import (
    InvalidArgumentError,
    StoreError,
    StoreUnavailableError,
    UnsupportedAsyncLibraryError,
)
from ducto.interface import _engine as E
from ducto.interface import _ledger as L
from ducto.interface._front import Keys, StoreFront
from ducto.interface._group import GroupCommit, Job
from ducto.interface._postgres_storage import (
    Bundle,
    Data,
    Miss,
    Need,
    Snapshot,
    Writes,
    arr,
    need_for,
)
from ducto.interface.models import (
    AggregateStatsRow,
    DailySpendRow,
    PricingConfigData,
    SetupResult,
    SpendByModelRow,
    SpendByUserRow,
    TopUserRow,
)

if TYPE_CHECKING:
    import psycopg
    import psycopg_pool

__all__ = ["PostgresStore"]

T = TypeVar("T")
SCHEMA_VERSION: Final = 2
_MIGRATIONS: Final = ("0001_schema.sql", "0002_team_holds.sql")
_SCHEMA_NAME: Final = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_MAX_ATTEMPTS: Final = 8
_RETRY: Final = frozenset({"40001", "40P01"})  # serialization failure, deadlock detected
# Class 08 (connection exception) and the administrator/crash shutdowns of class 57P.
_LOST: Final = re.compile(r"^(08|57P)")

# Operations that may create the account of a user they lock (INSERT ... ON CONFLICT DO
# NOTHING before the lock, since FOR UPDATE on a missing row locks nothing).
_CREATES: Final = frozenset(
    {
        E.add_credits,
        E.reserve,
        E.charge,
        E.deduct,
        E.set_user_plan,
        E.increment_usage_window,
        E.set_spend_cap,
        E.deduct_team,
        E.refund,
    }
)
_PRICING_WRITES: Final = frozenset({E.set_active_pricing, E.activate_pricing})
_ALONE: Final = frozenset({*_PRICING_WRITES, E.sweep})
"""Operations that run in a transaction of their own, never batched with others."""
_KNOWN_ACCOUNTS: Final = 100_000
"""Most account keys remembered as existing (the set is emptied when it grows past this)."""

Batch = list[tuple[str, tuple[Any, ...]]]
Steps = Generator[Batch, list[Any], T]
"""An operation as batches of statements: each yield is one round trip; the return value is
the operation's result (see `PostgresStore._transaction`)."""


class _Lost(Exception):
    """The connection broke; `sent_commit` says whether the outcome is unknown."""

    def __init__(self, cause: BaseException, sent_commit: bool) -> None:
        super().__init__()
        self.cause = cause
        self.sent_commit = sent_commit


def _statements(script: str) -> list[str]:
    """The statements of a migration script (split on semicolons at line ends)."""
    lines = [line for line in script.splitlines() if not line.lstrip().startswith("--")]
    return [part.strip() for part in "\n".join(lines).split(";\n") if part.strip()]


def _translate(exc: BaseException) -> StoreError:
    """A driver error as a `StoreError`, by SQLSTATE, with the cause chained."""
    sqlstate = getattr(exc, "sqlstate", None) or ""
    message = str(exc).strip() or type(exc).__name__
    lost = bool(_LOST.match(sqlstate)) or type(exc).__name__ in ("OperationalError", "PoolTimeout")
    error: StoreError = StoreUnavailableError(message) if lost else StoreError(message)
    error.__cause__ = exc
    return error


def _split_url(url: str) -> tuple[str, str | None]:
    """
    Take the ``schema`` option out of a ``postgresql://`` URL.

    Returns:
        The URL for libpq, and the schema it named (None when it named none).
    """
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    schema = None
    rest = []
    for key, value in query:
        if key == "schema":
            schema = value
        else:
            rest.append((key, value))
    return urlunsplit(parts._replace(query=urlencode(rest, quote_via=quote))), schema


class PostgresStore(StoreFront):
    """
    The complete store contract on PostgreSQL, on asyncio and trio, across many processes.

    Args:
        dsn: A libpq connection string or ``postgresql://`` URL (``?schema=name`` picks the
            schema); None reads ``DUCTO_STORE_URL``. Keep passwords out of it: libpq reads
            ``PGPASSWORD`` and ``~/.pgpass``.
        schema: The schema holding the tables (created by `setup`); several deployments or
            test runs can share one database in separate schemas. Overrides the URL's.
        pool: A `psycopg_pool.AsyncConnectionPool` (asyncio) or `psycopg_pool.ConnectionPool`
            (trio) to use instead of one the store owns; the store does not close it. Its
            connections must be in autocommit mode with the store's schema first on their
            ``search_path`` (checked when the store opens); ``SET plan_cache_mode TO
            force_generic_plan`` in its ``configure`` makes them as fast as the store's own.
        min_size: Connections the owned pool keeps open.
        max_size: Most connections the owned pool opens.
        connect_timeout: Seconds to wait for a connection before `StoreUnavailableError`.
        clock: Returns the current aware UTC datetime. Without it, "now" is the database
            server's clock, read inside each transaction, so hosts whose clocks disagree
            agree on time.
        group_commit: Under load, run concurrent operations in shared transactions: one
            commit for the batch, and one round trip pair for operations on different
            accounts (each operation that shares an account with an earlier one in the batch
            adds a round trip, after the earlier one's writes). Off, every operation is a
            transaction of its own.
        max_batch: The most operations one transaction carries.
        max_batches: The most batches in flight at once (at most ``max_size``). Fewer,
            larger batches cost the server and this process less per operation; more let
            other operations go on while a batch waits for an account another process has
            locked.
    """

    def __init__(
        self,
        dsn: str | None = None,
        *,
        schema: str | None = None,
        pool: psycopg_pool.AsyncConnectionPool[Any]
        | psycopg_pool.ConnectionPool[Any]
        | None = None,
        min_size: int = 1,
        max_size: int = 10,
        connect_timeout: float = 5.0,
        clock: Callable[[], datetime] | None = None,
        group_commit: bool = True,
        max_batch: int = 32,
        max_batches: int = 1,
    ) -> None:
        if dsn is None and pool is None:
            dsn = os.environ.get("DUCTO_STORE_URL")
            if not dsn:
                raise InvalidArgumentError(
                    "dsn is required: pass a postgresql:// URL or set DUCTO_STORE_URL"
                )
        if dsn is not None and (not isinstance(dsn, str) or "\x00" in dsn):
            raise InvalidArgumentError(f"dsn must be a str without NUL, got {shown(dsn)}")
        url_schema = None
        if dsn is not None and dsn.startswith(("postgresql://", "postgres://")):
            dsn, url_schema = _split_url(dsn)
        name = schema if schema is not None else url_schema or "ducto"
        if not isinstance(name, str) or not _SCHEMA_NAME.fullmatch(name):
            raise InvalidArgumentError(
                f"schema must be a lowercase SQL identifier (a-z, 0-9, _), got {shown(name)}"
            )
        L.check_limit(min_size, name="min_size", maximum=1000)
        L.check_limit(max_size, name="max_size", maximum=1000)
        if max_size < min_size:
            raise InvalidArgumentError(f"max_size ({max_size}) must be >= min_size ({min_size})")
        L.check_bool("group_commit", group_commit)
        L.check_limit(max_batch, name="max_batch", maximum=1000)
        L.check_limit(max_batches, name="max_batches", maximum=1000)
        if type(connect_timeout) not in (int, float) or not 0 < connect_timeout <= 600:
            raise InvalidArgumentError(
                f"connect_timeout must be more than 0 and at most 600 seconds, "
                f"got {shown(connect_timeout)}"
            )
        self._dsn = dsn
        self._schema = name
        self._given_pool = pool
        self._min_size = min_size
        self._max_size = max_size
        self._timeout = float(connect_timeout)
        self._clock = clock
        self._pool: Any = None
        self._async = True
        self._limiter: anyio.CapacityLimiter | None = None
        self._ids = L.IdSource()
        self._configs: dict[int, PricingConfigData] = {}
        self._known: set[E.AccountKey] = set()
        self._group: GroupCommit | None = None
        self._group_options = (group_commit, max_batch, max_batches)
        self._closed = False

    @property
    def schema(self) -> str:
        """The schema holding the store's tables."""
        return self._schema

    # -- lifecycle -----------------------------------------------------------------------------

    async def open(self) -> None:
        """Open (or adopt) the connection pool; ``async with`` does this for you."""
        if self._closed:
            raise StoreError("the store is closed")
        if self._pool is not None:
            return
        try:
            import psycopg_pool
        except ImportError as exc:  # pragma: no cover - the extra is missing
            raise StoreError(
                "PostgresStore needs the 'postgres' extra: pip install ducto[postgres]"
            ) from exc
        self._async = sniffio.current_async_library() == "asyncio"
        if not self._async:
            self._limiter = anyio.CapacityLimiter(self._max_size)
        given = self._given_pool
        if given is not None:
            if self._async != isinstance(given, psycopg_pool.AsyncConnectionPool):
                raise UnsupportedAsyncLibraryError(
                    "give an AsyncConnectionPool under asyncio and a ConnectionPool under trio"
                )
            self._pool = given
            await self._with_connection(self._check_session)
        elif self._async:
            pool = psycopg_pool.AsyncConnectionPool(
                self._dsn or "",
                min_size=self._min_size,
                max_size=self._max_size,
                kwargs=self._connection_options(),
                configure=self._configure_async,
                timeout=self._timeout,
                open=False,
            )
            try:
                await pool.open(wait=True, timeout=self._timeout)
            except Exception as exc:
                await pool.close()
                raise _translate(exc) from exc
            self._pool = pool
        else:
            sync_pool = psycopg_pool.ConnectionPool(
                self._dsn or "",
                min_size=self._min_size,
                max_size=self._max_size,
                kwargs=self._connection_options(),
                configure=self._configure_sync,
                timeout=self._timeout,
                open=False,
            )
            try:
                await anyio.to_thread.run_sync(
                    lambda: sync_pool.open(wait=True, timeout=self._timeout)
                )
            except Exception as exc:
                await anyio.to_thread.run_sync(sync_pool.close)
                raise _translate(exc) from exc
            self._pool = sync_pool
        self._start_group()

    def _start_group(self) -> None:
        enabled, max_batch, max_batches = self._group_options
        if enabled:
            size = self._pool.max_size if self._given_pool is not None else self._max_size
            self._group = GroupCommit(
                self._run_batch, max_batch=max_batch, max_leaders=min(size, max_batches)
            )

    def _connection_options(self) -> dict[str, Any]:
        return {"autocommit": True, "connect_timeout": max(1, round(self._timeout))}

    def _check_session(self) -> Steps[None]:
        """Refuse a given pool whose connections do not look in the store's schema first."""
        rows = yield [("SELECT current_schemas(false)", ())]
        schemas = rows[0][0][0]
        if not schemas or schemas[0] != self._schema:
            self._pool = None
            raise InvalidArgumentError(
                f"pool connections must use the store's schema first (search_path = "
                f"{self._schema}), found {schemas!r}; set it with configure= or options="
            )

    def _session(self) -> str:
        # The store's statements are few and keep their shape (arrays, not lists of values),
        # so one generic plan each serves every batch; custom plans are re-planned each time.
        return (
            f"SET search_path TO {self._schema}; SET TIME ZONE 'UTC';"
            " SET plan_cache_mode TO force_generic_plan"
        )

    async def _configure_async(self, conn: psycopg.AsyncConnection[Any]) -> None:
        await conn.execute(self._session(), prepare=False)

    def _configure_sync(self, conn: psycopg.Connection[Any]) -> None:
        conn.execute(self._session(), prepare=False)

    async def aclose(self) -> None:
        """Close the owned pool; later calls raise `StoreError`. Closing twice is harmless."""
        if self._closed:
            return
        self._closed = True
        if self._group is not None:
            with anyio.CancelScope(shield=True):
                await self._group.wait_idle()
        pool, self._pool = self._pool, None
        if pool is None or pool is self._given_pool:
            return
        with anyio.CancelScope(shield=True):
            if self._async:
                await pool.close()
            else:
                await anyio.to_thread.run_sync(pool.close)

    def _check_open(self) -> Any:
        if self._closed or self._pool is None:
            raise StoreError("the store is closed" if self._closed else "the store is not open")
        return self._pool

    # -- schema --------------------------------------------------------------------------------

    async def setup(self, database_url: str | None = None) -> SetupResult:
        """
        Create or migrate the schema, in one transaction under an advisory lock.

        Idempotent and safe to run from every process at every deploy: the version is read
        and migrated while holding a lock on the schema's name, so concurrent setups run one
        after the other and the later ones find nothing to do.

        Raises:
            StoreError: The schema is newer than this version of ducto.
        """
        return await self._with_connection(self._migrate_steps)

    def _migrate_steps(self) -> Steps[SetupResult]:
        schema = self._schema
        rows = yield [
            ("BEGIN", ()),
            ("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"ducto:{schema}",)),
            (f"CREATE SCHEMA IF NOT EXISTS {schema}", ()),
            (
                f"CREATE TABLE IF NOT EXISTS {schema}.ducto_schema (version integer NOT NULL)",
                (),
            ),
            (f"SELECT coalesce(max(version), 0) FROM {schema}.ducto_schema", ()),
        ]
        current = rows[-1][0][0]
        if current > SCHEMA_VERSION:
            yield [("ROLLBACK", ())]
            raise StoreError(
                f"the database schema {schema!r} is version {current}, newer than this ducto"
                f" ({SCHEMA_VERSION}); upgrade ducto"
            )
        created: list[str] = []
        batch: Batch = []
        package = resources.files("ducto.interface.sql.postgres")
        for version, name in enumerate(_MIGRATIONS, start=1):
            if version <= current:
                continue
            for statement in _statements(package.joinpath(name).read_text(encoding="utf-8")):
                batch.append((statement, ()))
                if statement.upper().startswith("CREATE TABLE"):
                    created.append(statement.split()[2])
        if batch:
            batch.append((f"DELETE FROM {schema}.ducto_schema", ()))
            batch.append((f"INSERT INTO {schema}.ducto_schema VALUES (%s)", (SCHEMA_VERSION,)))
        yield [*batch, ("COMMIT", ())]
        return SetupResult(tables_created=created, schema_version=SCHEMA_VERSION)

    # -- running operations --------------------------------------------------------------------

    async def _refund_keys(self, transaction_id: str) -> Keys:
        def steps() -> Steps[Keys]:
            rows = yield [
                ("SELECT kind, account, spender FROM ledger WHERE id = %s", (transaction_id,))
            ]
            if not rows[0]:
                return ()
            kind, account, spender = rows[0][0]
            return ((kind, account), (E.USER, spender or account))

        return await self._with_connection(steps)

    async def _run(self, op: Callable[..., T], keys: Keys, *args: Any, write: bool = True) -> T:
        self._check_open()
        job = Job(op, args, write, sorted(set(keys)), op in _ALONE)
        if self._group is not None and not job.alone:
            result: T = await self._group.submit(job)
            return result
        await self._with_connection(lambda: self._steps([job]))
        return job.outcome()  # type: ignore[no-any-return]

    async def _run_batch(self, jobs: list[Job]) -> None:
        """Run a batch of operations in one transaction (see `_group`); never raises."""
        try:
            await self._with_connection(lambda: self._steps(jobs))
        except StoreUnavailableError as exc:
            for job in jobs:
                job.result, job.error = None, exc
        except Exception:
            # The transaction failed as a whole (nothing committed): run each operation in
            # a transaction of its own, so one cannot fail the others.
            for job in jobs:
                try:
                    await self._with_connection(partial(self._steps, [job]))
                except Exception as exc:
                    job.result, job.error = None, exc

    def _steps(self, jobs: list[Job]) -> Steps[None]:
        """
        A batch of operations as one transaction, in rounds of operations on disjoint accounts.

        The first round trip locks every account the batch writes and reads the first round's
        bundle; each later one sends the previous round's writes and reads the next round's
        bundle after them; the last sends the writes and ``COMMIT``. A batch of operations on
        disjoint accounts is one round: two round trips.

        Each job's result or error is set on it. An operation that refuses or raises recorded
        no write; one that read something the bundle did not bring runs again after it is
        fetched (its first writes dropped).
        """
        for job in jobs:
            job.result = job.error = None
        write = any(job.write for job in jobs)
        locks = sorted({key for job in jobs if job.write for key in job.keys or ()})
        batch: Batch = []
        if write:
            batch.append(("BEGIN", ()))
            batch.extend(self._locks(jobs, locks))
        for round_jobs in _rounds(jobs):
            need = Need()
            for job in round_jobs:
                need.merge(need_for(job.fn, job.args))
            bundle = Bundle(need, self._now())
            batch.append(bundle.statement())
            rows = yield batch
            data = bundle.read(rows[-1][0])
            writes = Writes()
            pending = round_jobs
            while pending:
                missed = Need()
                again = []
                for job in pending:
                    snapshot = Snapshot(data, self._ids, self._configs)
                    try:
                        job.result = job.fn(snapshot, *job.args)
                        writes.merge(snapshot.finish())
                    except Miss as miss:
                        missed.merge(miss.need)
                        again.append(job)
                    except Exception as exc:  # the engine refused the arguments: nothing recorded
                        job.error = exc
                if not again:
                    break
                more: Batch = []
                extra = sorted(set(missed.accounts) - set(locks)) if write else []
                if extra:
                    # A sweep (alone in its batch) learns its accounts from its first read:
                    # lock them, then read everything again after the locks.
                    locks = sorted({*locks, *extra})
                    more.extend(self._locks(again, extra))
                    need.merge(missed)
                    bundle = Bundle(need, data.now)
                    data = Data(now=data.now)
                else:
                    bundle = Bundle(missed, data.now)
                    need.merge(missed)
                more.append(bundle.statement())
                rows = yield more
                data = bundle.read(rows[-1][0], data)
                pending = again
            batch = writes.statements()
            if not write:
                assert not batch, "a read-only operation recorded writes"
        if write:
            yield [*batch, ("COMMIT", ())]
            self._remember_accounts(
                key
                for job in jobs
                if job.fn in _CREATES
                for key in job.keys or ()
                if key[0] == E.USER
            )

    def _remember_accounts(self, keys: Iterable[E.AccountKey]) -> None:
        """Accounts known to exist (rows are never deleted): their INSERT can be skipped."""
        if len(self._known) > _KNOWN_ACCOUNTS:
            self._known.clear()
        self._known.update(keys)

    def _now(self) -> datetime | None:
        return None if self._clock is None else L.read_clock(self._clock)

    def _locks(self, jobs: Sequence[Job], locks: Sequence[E.AccountKey]) -> Batch:
        batch: Batch = []
        known = self._known
        wanted = set(locks)
        creates = sorted(
            {
                key
                for job in jobs
                if job.fn in _CREATES
                for key in job.keys or ()
                if key[0] == E.USER and key not in known and key in wanted
            }
        )
        if creates:
            batch.append(
                (
                    "INSERT INTO accounts (kind, id) SELECT * FROM unnest(%s::text[], %s::text[])"
                    " ON CONFLICT DO NOTHING",
                    (arr(k for k, _ in creates), arr(i for _, i in creates)),
                )
            )
        if locks:
            # Locked in the order of the rows' keys: teams ('t') before users ('u').
            batch.append(
                (
                    "SELECT 1 FROM accounts WHERE (kind, id) IN (SELECT * FROM"
                    " unnest(%s::text[], %s::text[])) ORDER BY kind, id FOR UPDATE",
                    (arr(k for k, _ in locks), arr(i for _, i in locks)),
                )
            )
        if any(job.fn in _PRICING_WRITES for job in jobs):
            batch.append(("SELECT 1 FROM settings WHERE key = 'pricing' FOR UPDATE", ()))
        return batch

    async def _with_connection(self, make_steps: Callable[[], Steps[T]]) -> T:
        """
        Run an operation's steps on a pooled connection, again from the start when that is safe.

        A serialization failure or deadlock, or a connection lost before ``COMMIT`` was sent,
        rolled everything back, so the steps run again (on another connection). A connection
        lost after ``COMMIT`` was sent leaves the outcome unknown, which the caller is told.
        """
        pool = self._check_open()
        # psycopg may finish a round trip without yielding to the loop (a local server answers
        # before it polls): make every call a checkpoint, where a cancellation lands before
        # anything happened.
        await checkpoint()
        attempts = 0
        while True:
            attempts += 1
            try:
                if self._async:
                    return await self._drive_async(pool, make_steps())
                assert self._limiter is not None
                return await anyio.to_thread.run_sync(
                    self._drive_sync, pool, make_steps(), limiter=self._limiter
                )
            except _Retry as retry:
                if attempts >= _MAX_ATTEMPTS:
                    raise _translate(retry.cause) from retry.cause
            except _Lost as lost:
                cause = lost.cause
                if lost.sent_commit:
                    raise StoreUnavailableError(
                        "the connection was lost while committing: the operation may or may"
                        " not have been applied; retry it with the same idempotency key"
                    ) from cause
                if attempts >= _MAX_ATTEMPTS:
                    raise _translate(cause) from cause

    async def _drive_async(self, pool: Any, steps: Steps[T]) -> T:
        """
        Run `steps` on one pooled connection, in one pipeline.

        Each batch but the last is one round trip (a sync); the last, ending in ``COMMIT``,
        goes with the sync that leaves the pipeline, so an operation costs two round trips.
        """
        import psycopg

        try:
            conn = await pool.getconn(timeout=self._timeout)
        except Exception as exc:
            raise _translate(exc) from exc
        sent_commit = False
        ok = False
        try:
            batch = next(steps)
            pipeline_cm = conn.pipeline()
            pipeline = await pipeline_cm.__aenter__()
            in_pipeline = True
            try:
                while True:
                    if batch and batch[-1][0] == "COMMIT":
                        # Once the writes and COMMIT are sent the call completes and reports
                        # it; a cancellation then reaches the caller at its next checkpoint.
                        sent_commit = True
                        with anyio.CancelScope(shield=True):
                            await _queue_async(conn, batch, read=False)
                            in_pipeline = False
                            await pipeline_cm.__aexit__(None, None, None)
                        results: list[Any] = []
                    else:
                        cursors = await _queue_async(conn, batch)
                        await pipeline.sync()
                        results = [None if c is None else await c.fetchall() for c in cursors]
                    try:
                        batch = steps.send(results)
                    except StopIteration as done:
                        value: T = done.value
                        break
            finally:
                if in_pipeline:
                    with anyio.CancelScope(shield=True):
                        await pipeline_cm.__aexit__(None, None, None)
            ok = True
            return value
        except psycopg.Error as exc:
            raise _classify(exc, sent_commit) from exc
        finally:
            with anyio.CancelScope(shield=True):
                if not ok and not conn.closed:
                    try:
                        if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                            await conn.rollback()
                    except psycopg.Error:
                        await conn.close()
                await pool.putconn(conn)

    def _drive_sync(self, pool: Any, steps: Steps[T]) -> T:
        """`_drive_async` on a synchronous connection, on a worker thread."""
        import psycopg

        try:
            conn = pool.getconn(timeout=self._timeout)
        except Exception as exc:
            raise _translate(exc) from exc
        sent_commit = False
        ok = False
        try:
            batch = next(steps)
            with conn.pipeline() as pipeline:
                while True:
                    commit = bool(batch) and batch[-1][0] == "COMMIT"
                    cursors = _queue_sync(conn, batch, read=not commit)
                    if commit:
                        sent_commit = True
                        results: list[Any] = []
                    else:
                        pipeline.sync()
                        results = [None if c is None else c.fetchall() for c in cursors]
                    try:
                        batch = steps.send(results)
                    except StopIteration as done:
                        value: T = done.value
                        break
            ok = True
            return value
        except psycopg.Error as exc:
            raise _classify(exc, sent_commit) from exc
        finally:
            if not ok and not conn.closed:
                try:
                    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                        conn.rollback()
                except psycopg.Error:
                    conn.close()
            pool.putconn(conn)

    # -- analytics, as SQL aggregates ------------------------------------------------------------

    async def _query(self, sql: str, params: tuple[Any, ...]) -> list[Any]:
        def steps() -> Steps[list[Any]]:
            rows = yield [(sql, params)]
            return list(rows[0])

        return await self._with_connection(steps)

    async def _spend(self, select: str, lo: datetime, hi: datetime, *more: Any) -> list[Any]:
        """Rows of `select` over ``w``: each usage debit in the window, net of refunds."""
        return await self._query(
            "WITH w AS (SELECT coalesce(spender, account) AS u, coalesce(model, %s) AS m,"
            " (created_at AT TIME ZONE 'UTC')::date AS d, -amount - refunded AS net"
            " FROM ledger WHERE type IN ('usage', 'team_usage') AND created_at >= %s"
            f" AND created_at < %s) {select}",
            (L.UNKNOWN_MODEL, lo, hi, *more),
        )

    async def spend_by_user(self, start: datetime, end: datetime) -> list[SpendByUserRow]:
        lo, hi = L.check_window(start, end)
        rows = await self._spend(
            'SELECT u, sum(net), count(*) FROM w GROUP BY u ORDER BY 2 DESC, u COLLATE "C"',
            lo,
            hi,
        )
        return [SpendByUserRow(user_id=u, total_spend=s, transaction_count=c) for u, s, c in rows]

    async def spend_by_model(self, start: datetime, end: datetime) -> list[SpendByModelRow]:
        lo, hi = L.check_window(start, end)
        rows = await self._spend(
            'SELECT m, sum(net), count(*) FROM w GROUP BY m ORDER BY 2 DESC, m COLLATE "C"',
            lo,
            hi,
        )
        return [SpendByModelRow(model=m, total_spend=s, transaction_count=c) for m, s, c in rows]

    async def daily_spend(self, start: datetime, end: datetime) -> list[DailySpendRow]:
        lo, hi = L.check_window(start, end)
        rows = await self._spend(
            "SELECT d, sum(net), count(*) FROM w GROUP BY d ORDER BY d", lo, hi
        )
        return [
            DailySpendRow(date=d.isoformat(), total_spend=s, transaction_count=c)
            for d, s, c in rows
        ]

    async def top_users(self, limit: int, start: datetime, end: datetime) -> list[TopUserRow]:
        L.check_limit(limit)
        lo, hi = L.check_window(start, end)
        rows = await self._spend(
            'SELECT u, sum(net) FROM w GROUP BY u ORDER BY 2 DESC, u COLLATE "C" LIMIT %s',
            lo,
            hi,
            limit,
        )
        return [TopUserRow(user_id=u, total_spend=s) for u, s in rows]

    async def aggregate_stats(self, start: datetime, end: datetime) -> AggregateStatsRow:
        lo, hi = L.check_window(start, end)
        rows = await self._spend(
            "SELECT coalesce(sum(net), 0), count(DISTINCT u), count(*),"
            ' (SELECT u FROM w GROUP BY u ORDER BY sum(net) DESC, u COLLATE "C" LIMIT 1),'
            ' (SELECT m FROM w GROUP BY m ORDER BY sum(net) DESC, m COLLATE "C" LIMIT 1)'
            " FROM w",
            lo,
            hi,
        )
        total, users, count, top_user, top_model = rows[0]
        average = (Decimal(total) / L.window_days(lo, hi)).quantize(
            Decimal("0.01"), rounding=ROUND_HALF_EVEN
        )
        return AggregateStatsRow(
            total_credits_consumed=total,
            active_users=users,
            avg_daily_spend=average,
            top_model=top_model or "",
            top_user=top_user or "",
            transaction_count=count,
        )


class _Retry(Exception):
    """A serialization failure or deadlock: run the operation again from the start."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__()
        self.cause = cause


def _classify(exc: BaseException, sent_commit: bool) -> BaseException:
    sqlstate = getattr(exc, "sqlstate", None)
    if sqlstate in _RETRY:
        return _Retry(exc)
    if _LOST.match(sqlstate or "") or type(exc).__name__ == "OperationalError":
        return _Lost(exc, sent_commit)
    return _translate(exc)


def _rounds(jobs: Sequence[Job]) -> list[list[Job]]:
    """
    Jobs in rounds of disjoint accounts, each after every earlier job it shares one with.

    A job without keys reads store-wide rows no write in a batch changes, so it goes first.
    """
    rounds: list[list[Job]] = []
    last: dict[E.AccountKey, int] = {}
    for job in jobs:
        keys = job.keys or ()
        n = max((last[key] + 1 for key in keys if key in last), default=0)
        if n == len(rounds):
            rounds.append([])
        rounds[n].append(job)
        for key in keys:
            last[key] = n
    return rounds


def _wants_rows(sql: str) -> bool:
    # Reads start with SELECT or WITH; a batch's bulk write is the one ``WITH w0 AS (...)``.
    return sql.startswith(("SELECT", "WITH")) and not sql.startswith("WITH w0 ")


async def _queue_async(conn: Any, batch: Batch, read: bool = True) -> list[Any]:
    """Queue a batch in the pipeline; a cursor for each statement whose rows are read."""
    shared = conn.cursor()
    cursors = []
    for sql, params in batch:
        if read and _wants_rows(sql):
            cursor = conn.cursor()
            await cursor.execute(sql, params)
            cursors.append(cursor)
        else:
            await shared.execute(sql, params)
            cursors.append(None)
    return cursors


def _queue_sync(conn: Any, batch: Batch, read: bool = True) -> list[Any]:
    """`_queue_async` on a synchronous connection."""
    shared = conn.cursor()
    cursors = []
    for sql, params in batch:
        if read and _wants_rows(sql):
            cursor = conn.cursor()
            cursor.execute(sql, params)
            cursors.append(cursor)
        else:
            shared.execute(sql, params)
            cursors.append(None)
    return cursors
