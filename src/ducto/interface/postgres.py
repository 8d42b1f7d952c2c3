"""
`PostgresStore`: the contract on PostgreSQL, for fleets of processes on many hosts.

Every operation is the engine's (`_engine`), run in one short transaction of two round trips
(see `_postgres_storage` and ``docs/architecture.md``): ``BEGIN`` and one call of the schema's
``ducto_read`` function, which creates and locks the accounts the operation changes, in one
fixed order, and returns every row its arguments name, read after the locks; the engine runs on
that snapshot; then one call of ``ducto_write`` with what it wrote, and ``COMMIT``. Under load,
concurrent operations share these two round trips and one commit (group commit), operations
on one account included. The two functions only move data: every rule stays in Python.

The same code runs on asyncio and trio: each round trip is one message sent through psycopg's
libpq wrapper and awaited on the socket with anyio (`_pg_wire`), so there is no thread hop per
operation on either loop. Once a transaction's first message is on the wire it runs to its end
shielded from cancellation (bounded by ``statement_timeout``): a cancelled caller gets its
cancellation, the operation is applied whole or not at all, and no connection is lost to it.
Serialization failures and deadlocks are retried inside the store; "now" comes from the
database server's clock, read after the locks, unless the store is given a `clock`.

`prune` and `archive_ledger` run chunk by chunk, each chunk a short transaction of its own
beside the traffic (``ducto_prune``, ``ducto_archive_rows``, ``ducto_archive``), with cutoffs
and rollups computed by the engine's rules in Python. Deleting holds or ledger rows takes the
locks of their accounts as the data path does, so it never falls between an operation's read
and its commit. Analytics are SQL aggregates over the kept usage rows and the daily rollups
of archived days (kept per user, model and budget scope, so spend by scope reads them too).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Generator, Sequence
from datetime import datetime, time, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from functools import partial
from importlib import resources
from typing import TYPE_CHECKING, Any, Final, TypeVar
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import anyio
from anyio.lowlevel import checkpoint
from pydantic import BaseModel, ConfigDict

from ducto._shown import shown
from ducto.errors import (
    InvalidArgumentError,
    StoreError,
    StoreUnavailableError,
    UnsupportedAsyncLibraryError,
)
from ducto.interface import _engine as E
from ducto.interface import _ledger as L
from ducto.interface import _retention as R
from ducto.interface._front import Keys, StoreFront
from ducto.interface._group import GroupCommit, Job
from ducto.interface._postgres_storage import (
    Defer,
    Miss,
    Need,
    Snapshot,
    literal,
    need_for,
    parse,
    timestamp,
)
from ducto.interface.models import (
    AggregateStatsRow,
    DailySpendRow,
    PricingConfigData,
    SetupResult,
    SpendByModelRow,
    SpendByScopeRow,
    SpendByUserRow,
    TopUserRow,
)

if TYPE_CHECKING:
    import psycopg_pool

    from ducto.interface._pg_wire import BorrowedPool, Connection, Pool

__all__ = ["PostgresStats", "PostgresStore"]

T = TypeVar("T")
SCHEMA_VERSION: Final = 5
_MIGRATIONS: Final = (
    "0001_schema.sql",
    "0002_team_holds.sql",
    "0003_data_path.sql",
    "0004_retention.sql",
    "0005_scopes_schedules_top_ups.sql",
)
_SCHEMA_NAME: Final = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_TABLE: Final = re.compile(r"^CREATE TABLE (\w+)", re.MULTILINE)
_MAX_ATTEMPTS: Final = 8
_ARCHIVE_SPAN: Final = 1_000_000
"""Ledger sequence numbers one statement of `archive_ledger` looks through for old rows."""
_MAX_FETCHES: Final = 16
"""Most extra reads one batch makes for what its snapshot missed (each is rare)."""
_RETRY: Final = frozenset({"40001", "40P01"})  # serialization failure, deadlock detected
# Class 08 (connection exception) and the administrator/crash shutdowns of class 57P.
_LOST: Final = re.compile(r"^(08|57P)")
_TIMED_OUT: Final = "57014"  # query_canceled: statement_timeout

_PRICING_LOCK: Final = ("p", "pricing")
"""The lock that pricing writes take, as if the pricing settings were an account."""
_PRICING_WRITES: Final = frozenset({E.set_active_pricing, E.activate_pricing, E.cancel_pricing})
_ALONE: Final = frozenset({*_PRICING_WRITES, E.sweep})
"""Operations that run in a transaction of their own, never batched with others."""

Query = bytes | tuple[bytes, Sequence[bytes | None]]
Steps = Generator[Query, bytes | None, T]
"""A transaction as round trips: each yield is one message (simple protocol, or one statement
with parameters), sent with the answer's value; the return value is the transaction's."""


class PostgresStats(BaseModel):
    """What a `PostgresStore` has done since it opened, and its connections now."""

    model_config = ConfigDict(frozen=True)

    operations: int
    """Operations run (each public call that reaches the database is one)."""
    transactions: int
    """Transactions committed, and read-only batches answered."""
    round_trips: int
    """Messages sent and answered."""
    retries: int
    """Transactions run again after a serialization failure, a deadlock or a lost connection."""
    connections_opened: int
    """Connections the store opened (0 with a pool it was given)."""
    connections_lost: int
    """Connections found broken, or abandoned with no answer in time, and closed."""
    connections_closed: int
    """Connections closed with the store."""
    pool_size: int
    """Connections open now."""
    pool_available: int
    """Idle connections now."""
    requests_waiting: int
    """Requests waiting for a connection now."""


class _Counters:
    __slots__ = ("operations", "retries", "round_trips", "transactions")

    def __init__(self) -> None:
        self.operations = self.transactions = self.round_trips = self.retries = 0


class _Progress:
    """How far a transaction got: whether its ``COMMIT`` was sent."""

    __slots__ = ("sent_commit",)

    def __init__(self) -> None:
        self.sent_commit = False


class _Retry(Exception):
    """A serialization failure or deadlock: run the transaction again from the start."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__()
        self.cause = cause


class _Lost(Exception):
    """The connection broke; `sent_commit` says whether the outcome is unknown."""

    def __init__(self, cause: BaseException, sent_commit: bool) -> None:
        super().__init__()
        self.cause = cause
        self.sent_commit = sent_commit


def _translate(exc: BaseException) -> StoreError:
    """A driver or server error as a `StoreError`, by SQLSTATE, with the cause chained."""
    sqlstate = getattr(exc, "sqlstate", None) or ""
    message = str(exc).strip() or type(exc).__name__
    lost = bool(_LOST.match(sqlstate)) or type(exc).__name__ in ("OperationalError", "PoolTimeout")
    if sqlstate == _TIMED_OUT:
        message = f"the database did not finish in time (statement_timeout): {message}"
    error: StoreError = (
        StoreUnavailableError(message) if lost or sqlstate == _TIMED_OUT else StoreError(message)
    )
    error.__cause__ = exc
    return error


def _classify(exc: BaseException, sent_commit: bool) -> BaseException:
    sqlstate = getattr(exc, "sqlstate", None) or ""
    if sqlstate in _RETRY:
        return _Retry(exc)
    if _LOST.match(sqlstate):
        return _Lost(exc, sent_commit)
    return _translate(exc)


def _deferred(run: list[Job], job: Job) -> list[Job]:
    """
    `job` and every later job of `run` that must follow it into a later round.

    Those are the jobs that share an account with it (or with another deferred job), and the
    jobs whose accounts are not known before they run (a refund's).
    """
    accounts = set(job.keys or ())
    found = [job]
    for later in run[run.index(job) + 1 :]:
        keys = later.keys or ()
        if (later.write and not keys) or any(key in accounts for key in keys):
            found.append(later)
            accounts.update(keys)
    return found


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


def _first_day(moment: datetime) -> int:
    """The UTC day (proleptic ordinal) of the first UTC midnight at or after `moment` (UTC)."""
    return moment.toordinal() + (0 if moment.time() == time() else 1)


def _check_seconds(name: str, value: object) -> float:
    if type(value) not in (int, float) or not 0 < value <= 600:  # type: ignore[operator]
        raise InvalidArgumentError(
            f"{name} must be more than 0 and at most 600 seconds, got {shown(value)}"
        )
    return float(value)  # type: ignore[arg-type]


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
            (trio) to borrow connections from instead of the store's own; the store does not
            close it. Its connections must be in autocommit mode, with the store's schema first
            on their ``search_path``, ``client_encoding`` UTF8 and
            ``standard_conforming_strings`` on (checked when the store opens); ``SET
            plan_cache_mode TO force_generic_plan`` in its ``configure`` makes them as fast as
            the store's own.
        min_size: Connections the store's own pool keeps open.
        max_size: Most connections the store's own pool opens.
        connect_timeout: Seconds to wait for a connection before `StoreUnavailableError`.
        statement_timeout: Seconds the server may spend on one statement (lock waits
            included) before it gives up and the call raises `StoreUnavailableError`; a
            transaction is also bounded by it on the client side, so a call never waits for
            a server that stopped answering for longer than about this.
        clock: Returns the current aware UTC datetime. Without it, "now" is the database
            server's clock, read inside each transaction, so hosts whose clocks disagree
            agree on time.
        group_commit: Under load, run concurrent operations in shared transactions: the same
            two round trips and one commit for the whole batch, operations on the same
            account included. Off, every operation is a transaction of its own.
        max_batch: The most operations one transaction carries.
        max_batches: The most batches in flight at once (at most ``max_size``). Fewer,
            larger batches cost the server and this process less per operation; more let
            other operations go on while a batch waits for an account another process has
            locked.
        idempotency_retention: How long an idempotency record is kept after it was written
            (a `timedelta`, or seconds as an int or float; None keeps records for ever).
            Past it a key is a new request, whether or not `prune` has deleted the record.
        hold_retention: How long a hold nothing counts any more (settled, released, or
            lapsed) is kept after its expiry time before `prune` deletes it (a `timedelta`,
            or seconds; None keeps holds for ever).
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
        statement_timeout: float = 30.0,
        clock: Callable[[], datetime] | None = None,
        group_commit: bool = True,
        max_batch: int = 32,
        max_batches: int = 1,
        idempotency_retention: timedelta | float | None = R.DEFAULT_RETENTION,
        hold_retention: timedelta | float | None = R.DEFAULT_RETENTION,
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
        self._retention = R.Retention.of(idempotency_retention, hold_retention)
        self._timeout = _check_seconds("connect_timeout", connect_timeout)
        self._statement_timeout = _check_seconds("statement_timeout", statement_timeout)
        self._dsn = dsn
        self._schema = name
        self._given_pool = pool
        self._min_size = min_size
        self._max_size = max_size
        self._clock = clock
        self._pool: Pool | BorrowedPool | None = None
        self._ids = L.IdSource()
        self._configs: dict[int, PricingConfigData] = {}
        self._group: GroupCommit | None = None
        self._group_options = (group_commit, max_batch, max_batches)
        self._counters = _Counters()
        self._closed = False

    @property
    def schema(self) -> str:
        """The schema holding the store's tables."""
        return self._schema

    def statistics(self) -> PostgresStats:
        """Counts of what the store did since it opened, and its connections now."""
        counters = self._counters
        pool = self._pool
        return PostgresStats(
            operations=counters.operations,
            transactions=counters.transactions,
            round_trips=counters.round_trips,
            retries=counters.retries,
            connections_opened=pool.opened if pool is not None else 0,
            connections_lost=pool.lost if pool is not None else 0,
            connections_closed=pool.closed if pool is not None else 0,
            pool_size=pool.size if pool is not None else 0,
            pool_available=pool.available if pool is not None else 0,
            requests_waiting=pool.waiting if pool is not None else 0,
        )

    # -- lifecycle -----------------------------------------------------------------------------

    async def open(self) -> None:
        """Open the store's connections (or adopt the given pool); ``async with`` does this."""
        if self._closed:
            raise StoreError("the store is closed")
        if self._pool is not None:
            return
        try:
            from ducto.interface import _pg_wire
        except ImportError as exc:  # pragma: no cover - the extra is missing
            raise StoreError(
                "PostgresStore needs the 'postgres' extra: pip install ducto[postgres]"
            ) from exc
        given = self._given_pool
        if given is not None:
            import psycopg_pool
            import sniffio

            on_asyncio = sniffio.current_async_library() == "asyncio"
            if on_asyncio != isinstance(given, psycopg_pool.AsyncConnectionPool):
                raise UnsupportedAsyncLibraryError(
                    "give an AsyncConnectionPool under asyncio and a ConnectionPool under trio"
                )
            borrowed = _pg_wire.BorrowedPool(given, timeout=self._timeout)
            self._pool = borrowed
            try:
                await self._transact(self._check_session)
            except BaseException:
                self._pool = None
                raise
            size = given.max_size
        else:
            own = _pg_wire.Pool(
                self._connect,
                min_size=self._min_size,
                max_size=self._max_size,
                timeout=self._timeout,
            )
            try:
                await own.open()
            except BaseException:
                await own.aclose()
                raise
            self._pool = own
            size = self._max_size
        enabled, max_batch, max_batches = self._group_options
        if enabled:
            self._group = GroupCommit(
                self._run_batch, max_batch=max_batch, max_leaders=min(size, max_batches)
            )

    async def _connect(self) -> Connection:
        """One new connection, its session set up for the store."""
        import psycopg

        from ducto.interface._pg_wire import Connection, ConnectionLost, ServerError

        connect = partial(
            psycopg.Connection.connect,
            self._dsn or "",
            autocommit=True,
            connect_timeout=max(1, round(self._timeout)),
        )
        try:
            owner = await anyio.to_thread.run_sync(connect)
        except psycopg.Error as exc:
            raise _translate(exc) from exc
        conn = Connection(owner)
        try:
            with anyio.fail_after(self._timeout):
                await conn.query(self._session())
        except (ServerError, ConnectionLost, TimeoutError) as exc:
            conn.close()
            raise StoreUnavailableError(
                f"the new connection's session setup failed: {exc}"
            ) from exc
        return conn

    def _session(self) -> bytes:
        # The store's statements are few and keep their shape, so one generic plan each
        # serves every batch; custom plans would be re-planned each time.
        timeout = round(self._statement_timeout * 1000)
        return (
            f"SET search_path TO {self._schema};SET TIME ZONE 'UTC';"
            "SET plan_cache_mode TO force_generic_plan;SET client_encoding TO 'UTF8';"
            "SET standard_conforming_strings TO on;"
            f"SET statement_timeout TO {timeout};"
            f"SET idle_in_transaction_session_timeout TO {timeout}"
        ).encode()

    def _check_session(self) -> Steps[None]:
        """Refuse a given pool whose sessions would not read the store's statements right."""
        text = yield (
            b"SELECT json_build_array(current_schemas(false),"
            b" current_setting('client_encoding'),"
            b" current_setting('standard_conforming_strings'))::text"
        )
        assert text is not None
        schemas, encoding, conforming = json.loads(text)
        if not schemas or schemas[0] != self._schema:
            raise InvalidArgumentError(
                f"pool connections must use the store's schema first (search_path = "
                f"{self._schema}), found {schemas!r}; set it with configure= or options="
            )
        if encoding.upper() not in ("UTF8", "UTF-8") or conforming != "on":
            raise InvalidArgumentError(
                "pool connections must use client_encoding UTF8 and"
                f" standard_conforming_strings on, found {encoding!r} and {conforming!r}"
            )

    async def aclose(self) -> None:
        """Close the store's connections; later calls raise `StoreError`. Twice is harmless."""
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            if self._group is not None:
                await self._group.wait_idle()
            pool, self._pool = self._pool, None
            if pool is not None:
                await pool.aclose()

    def _check_open(self) -> Pool | BorrowedPool:
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
        return await self._transact(self._migrate_steps)

    def _migrate_steps(self) -> Steps[SetupResult]:
        schema = self._schema
        lock = "ducto:" + schema
        text = yield (
            f"BEGIN;SELECT pg_advisory_xact_lock(hashtext('{lock}'));"
            f"CREATE SCHEMA IF NOT EXISTS {schema};"
            f"CREATE TABLE IF NOT EXISTS {schema}.ducto_schema (version integer NOT NULL);"
            f"SELECT coalesce(max(version), 0) FROM {schema}.ducto_schema"
        ).encode()
        current = int(text or 0)
        if current > SCHEMA_VERSION:
            yield b"ROLLBACK"
            raise StoreError(
                f"the database schema {schema!r} is version {current}, newer than this ducto"
                f" ({SCHEMA_VERSION}); upgrade ducto"
            )
        created: list[str] = []
        scripts: list[str] = []
        package = resources.files("ducto.interface.sql.postgres")
        for version, name in enumerate(_MIGRATIONS, start=1):
            if version <= current:
                continue
            script = package.joinpath(name).read_text(encoding="utf-8")
            scripts.append(script)
            created.extend(_TABLE.findall(script))
        if scripts:
            scripts.append(
                f"DELETE FROM {schema}.ducto_schema;"
                f"INSERT INTO {schema}.ducto_schema VALUES ({SCHEMA_VERSION})"
            )
        yield ";\n".join([*scripts, "COMMIT"]).encode()
        return SetupResult(tables_created=created, schema_version=SCHEMA_VERSION)

    # -- running operations --------------------------------------------------------------------

    async def _refund_keys(self, transaction_id: str) -> Keys:
        # ducto_read finds and locks a refund's accounts itself, in the same round trip.
        return ()

    async def _run(self, op: Callable[..., T], keys: Keys, *args: Any, write: bool = True) -> T:
        self._check_open()
        job = Job(op, args, write, sorted(set(keys)), op in _ALONE)
        self._counters.operations += 1
        if self._group is not None and not job.alone:
            result: T = await self._group.submit(job)
            return result
        await self._transact(lambda: self._steps([job]))
        return job.outcome()  # type: ignore[no-any-return]

    async def _run_batch(self, jobs: list[Job]) -> None:
        """Run a batch of operations in one transaction (see `_group`); never raises."""
        try:
            # The leader that runs it has just passed a checkpoint.
            await self._transact(lambda: self._steps(jobs), checkpointed=True)
        except StoreUnavailableError as exc:
            for job in jobs:
                job.result, job.error = None, exc
        except Exception:
            if len(jobs) == 1:
                raise
            # The transaction failed as a whole (nothing committed): run each operation in
            # a transaction of its own, so one cannot fail the others.
            for job in jobs:
                try:
                    await self._transact(partial(self._steps, [job]))
                except Exception as exc:
                    job.result, job.error = None, exc

    def _now(self) -> datetime | None:
        return None if self._clock is None else L.read_clock(self._clock)

    def _steps(self, jobs: list[Job]) -> Steps[None]:
        """
        A batch of operations as one transaction on one shared snapshot.

        The first round trip locks every account the batch writes and reads what every
        operation may read; the engine runs the operations one after another on one
        `Snapshot`, which shows each the writes of those before it; the last round trip sends
        every write and ``COMMIT``. An operation whose snapshot missed something runs again
        (with the whole batch, from the start, on a fresh snapshot) after it is fetched; one
        that must see the batch's writes in the database (`Defer`) runs in a later round,
        after them. Read-only operations go first: they see the batch's accounts as locked.

        Each job's result or error is set on it, and its place in the serial order the batch
        ran in (``order``); an operation that refuses or raises leaves no write. An operation
        deferred to a later round takes every later operation on its accounts with it, so
        operations on one account run in the order they were queued.
        """
        readers: list[Job] = []
        writers: list[Job] = []
        locks: set[E.AccountKey] = set()
        for job in jobs:
            job.result = job.error = None
            if not job.write:
                readers.append(job)
                continue
            writers.append(job)
            locks.update(job.keys or ())
            if job.fn in _PRICING_WRITES:
                locks.add(_PRICING_LOCK)
        write = bool(writers)
        pending = readers + writers if readers else writers
        head = b""
        lock_doc: dict[str, Any] = {}
        if write:
            head = b"BEGIN;"
            lock_doc["lock"] = list(locks)
            # A refund's accounts are those of the row it names: ducto_read finds and locks
            # them along with the others.
            refunds = [job.args[0] for job in writers if job.fn is E.refund]
            if refunds:
                lock_doc["refunds"] = refunds
        now = self._now()
        order = 0
        while pending:
            if len(pending) == 1:
                need = need_for(pending[0].fn, pending[0].args)
            else:
                need = Need()
                for job in pending:
                    need.merge(need_for(job.fn, job.args), add_debits=True)
            doc = need.document()
            doc.update(lock_doc)
            if now is not None:
                doc["now"] = now.isoformat()
            text = yield head + b"SELECT ducto_read(" + literal(doc) + b")"
            assert text is not None
            head, lock_doc = b"", {}
            data = parse(need, text)
            now = data.now
            run = pending
            deferred: list[Job] = []
            fetches = 0
            while True:
                snapshot = Snapshot(data, self._ids, self._configs, self._retention)
                missed: Need | None = None
                blocked: set[E.AccountKey] = set()
                drop: list[Job] = []
                for job in run:
                    keys = job.keys or ()
                    if missed is not None and any(key in blocked for key in keys):
                        continue
                    try:
                        job.result = job.fn(snapshot, *job.args)
                        job.error = None
                    except Miss as miss:
                        missed = missed or Need()
                        missed.merge(miss.need)
                        blocked.update(keys)
                    except Defer:
                        if missed is None:
                            drop = _deferred(run, job)
                            deferred.extend(drop)
                            break
                    except Exception as exc:
                        # Trusted only in a pass that missed nothing (else the snapshot may
                        # hold a missed operation's half-done writes).
                        if missed is None:
                            job.result, job.error = None, exc
                            drop = [job]
                            break
                if drop:
                    # Run the batch again without them, on a fresh snapshot: whatever they did
                    # before they stopped is dropped with the old one.
                    run = [job for job in run if job not in drop]
                    continue
                if missed is None:
                    for job in run:
                        order += 1
                        job.order = order
                    break
                fetches += 1
                if fetches > _MAX_FETCHES:  # pragma: no cover - a prefetch plan that never fits
                    raise AssertionError("the snapshot kept missing rows")
                more = missed.document()
                more["now"] = data.now.isoformat()
                text = yield b"SELECT ducto_read(" + literal(more) + b")"
                assert text is not None
                data.read(missed, json.loads(text))
            writes = snapshot.finish().document()
            if writes:
                if not write:  # pragma: no cover - a read-only operation wrote
                    raise AssertionError("a read-only operation recorded writes")
                head = b"SELECT ducto_write(" + literal(writes) + b");"
            pending = deferred
        if write:
            yield head + b"COMMIT"

    async def _transact(
        self, make_steps: Callable[[], Steps[T]], *, checkpointed: bool = False
    ) -> T:
        """
        Run a transaction's steps on a pooled connection, again from the start when that is
        safe.

        Waiting for a connection can be cancelled (nothing was sent). From the first message
        on, the transaction runs to its end shielded from cancellation and bounded by the
        statement timeout; a cancellation then reaches the caller at its next checkpoint. A
        serialization failure or deadlock, or a connection lost before ``COMMIT`` was sent,
        rolled everything back, so the steps run again. A connection lost after ``COMMIT``
        was sent leaves the outcome unknown, which the caller is told.
        """
        pool = self._check_open()
        if not checkpointed:
            # A local server may answer before the loop polls: make every call a checkpoint,
            # where a cancellation lands before anything happened.
            await checkpoint()
        attempts = 0
        while True:
            attempts += 1
            conn = await pool.acquire()
            try:
                return await self._attempt(pool, conn, make_steps())
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
                    raise StoreUnavailableError(str(cause) or "the connection was lost") from cause
            self._counters.retries += 1

    async def _attempt(self, pool: Pool | BorrowedPool, conn: Connection, steps: Steps[T]) -> T:
        """One run of a transaction on `conn`, shielded and bounded by the statement timeout."""
        limit = self._statement_timeout + 5.0
        state = _Progress()
        # Shielded from the caller's cancellation; bounded by its own deadline.
        with anyio.CancelScope(shield=True, deadline=anyio.current_time() + limit):
            try:
                return await self._drive(conn, steps, state)
            finally:
                await pool.release(conn)
        # Only the deadline cancels the scope: the server stopped answering.
        raise _Lost(
            StoreUnavailableError(f"the database did not answer in {limit:g} s"),
            state.sent_commit,
        )

    async def _drive(self, conn: Connection, steps: Steps[T], state: _Progress) -> T:
        """Send each of `steps`' messages in turn on `conn` (within the caller's deadline)."""
        from ducto.interface._pg_wire import ConnectionLost, ServerError

        counters = self._counters
        in_transaction = sent_commit = False
        try:
            query = next(steps)
            while True:
                if isinstance(query, bytes):
                    if query.startswith(b"BEGIN"):
                        in_transaction = True
                    sent_commit = state.sent_commit = query.endswith(b"COMMIT")
                    text = await conn.query(query)
                else:
                    sql, params = query
                    text = await conn.query_params(sql, params)
                counters.round_trips += 1
                if sent_commit or query == b"ROLLBACK":
                    in_transaction = False
                try:
                    query = steps.send(text)
                except StopIteration as done:
                    counters.transactions += 1
                    value: T = done.value
                    return value
        except ServerError as exc:
            if in_transaction:
                await self._rollback(conn)
            raise _classify(exc, sent_commit) from exc
        except ConnectionLost as exc:
            raise _Lost(exc, sent_commit) from exc
        except BaseException:
            if in_transaction and conn.usable:
                await self._rollback(conn)
            raise

    async def _rollback(self, conn: Connection) -> None:
        from ducto.interface._pg_wire import ConnectionLost, ServerError

        with anyio.CancelScope(shield=True, deadline=anyio.current_time() + self._timeout):
            try:
                await conn.query(b"ROLLBACK")
                return
            except (ServerError, ConnectionLost):
                pass
        conn.usable = False

    # -- growth: prune and archive_ledger, each chunk a short transaction of its own ---------------

    async def _prune_chunk(self, kind: R.PruneKind, limit: int, dry_run: bool) -> int:
        now = self._now()
        if now is not None and R.prune_cutoff(kind, now, self._retention) is None:
            return 0  # kept for ever: nothing to ask the server
        count: int = await self._transact(partial(self._prune_steps, kind, limit, dry_run, now))
        return count

    def _prune_steps(
        self, kind: R.PruneKind, limit: int, dry_run: bool, now: datetime | None
    ) -> Steps[int]:
        """
        One chunk of `prune`: the cutoff from the engine's rules, then one ``ducto_prune``.

        "Now" is the store's clock, or else the server's, read first. The statement is a
        transaction of its own; pruning holds takes the locks of their accounts as operations
        do, so a hold is never deleted between an operation's read and its commit.
        """
        if now is None:
            text = yield b"SELECT to_json(clock_timestamp())"
            assert text is not None
            now = timestamp(json.loads(text))
        cutoff = R.prune_cutoff(kind, now, self._retention)
        if cutoff is None:
            return 0
        doc: dict[str, Any] = {"kind": kind, "limit": limit, "dry_run": dry_run}
        if kind == "windows":
            doc["day"], doc["month"] = R.window_keys(cutoff)
        else:
            doc["before"] = cutoff.isoformat()
        text = yield b"SELECT ducto_prune(" + literal(doc) + b")"
        return int(text or 0)

    async def _archive_candidates(self, before: datetime, after: int) -> list[E.StoredRow]:
        """
        The next chunk of rows to archive, read a range of ``seq`` per statement.

        Nothing indexes the whole ledger by time, so finding that no row older than the
        cutoff is left means reading every newer one: in ranges, each statement stays well
        inside the statement timeout however long the ledger.
        """
        rows: list[E.StoredRow] = []
        while len(rows) < R.ARCHIVE_CHUNK:
            doc = {
                "before": before.isoformat(),
                "after": after,
                "upto": after + _ARCHIVE_SPAN,
                "limit": R.ARCHIVE_CHUNK - len(rows),
            }
            found, last = await self._transact(partial(self._archive_rows_steps, doc))
            rows.extend(found)
            if len(rows) >= R.ARCHIVE_CHUNK or last is None or after + _ARCHIVE_SPAN >= last:
                break
            after += _ARCHIVE_SPAN
        return rows

    def _archive_rows_steps(
        self, doc: dict[str, Any]
    ) -> Steps[tuple[list[E.StoredRow], int | None]]:
        text = yield b"SELECT ducto_archive_rows(" + literal(doc) + b")"
        assert text is not None
        found, last = json.loads(text)
        # Columns in StoredRow's order; created_at (the ninth) arrives as text.
        return [E.StoredRow._make((*row[:8], timestamp(row[8]), *row[9:])) for row in found], last

    async def _archive_commit(self, rows: list[E.StoredRow], before: datetime) -> None:
        await self._transact(partial(self._archive_steps, rows, before))

    def _archive_steps(self, rows: Sequence[E.StoredRow], before: datetime) -> Steps[None]:
        """
        One archived chunk in one transaction of two round trips.

        ``ducto_archive`` takes the rows' accounts' locks (so a refund of one of them runs
        wholly before or after), deletes each row still there with the refund total it was
        read with, and records the chunk's rollups (computed here, by the engine's rule), the
        archived ids and the horizon. Unless every row was deleted the transaction is rolled
        back and `E.ArchiveChanged` raised.
        """
        totals = sorted(R.rollups(rows).items())  # one order for every writer of a rollup
        doc = {
            "rows": [[row.id, row.refunded] for row in rows],
            "accounts": sorted({(row.kind, row.account) for row in rows}),
            "rollups": [[*key, net, count] for key, (net, count) in totals],
            "before": before.isoformat(),
        }
        text = yield b"BEGIN;SELECT ducto_archive(" + literal(doc) + b")"
        if int(text or 0) != len(rows):
            yield b"ROLLBACK"
            raise E.ArchiveChanged("a row was refunded or archived since it was read")
        yield b"COMMIT"

    # -- analytics, as SQL aggregates ------------------------------------------------------------

    async def _query(self, sql: str, *params: object) -> Any:
        """One read-only statement whose one value is JSON, with ``$n`` parameters (None is
        NULL)."""
        encoded = [
            None if p is None else (p.isoformat() if isinstance(p, datetime) else str(p)).encode()
            for p in params
        ]

        def steps() -> Steps[Any]:
            text = yield (sql.encode(), encoded)
            return json.loads(text) if text is not None else None

        return await self._transact(steps)

    async def _spend(self, select: str, lo: datetime, hi: datetime, *more: object) -> Any:
        """
        `select` (one JSON value) over ``w``: usage in the window, as analytics counts it.

        ``w`` holds each usage debit in the window, net of refunds (``c`` 1), and each rollup
        of an archived day whose midnight is in it (``c`` the debits it stands for), with the
        budget scope ``s`` (NULL for none). The statement also reads the archive horizon, and a
        window that splits an archived day is refused (`_retention.check_archive_window`).
        """
        horizon, result = await self._query(
            "WITH w AS (SELECT coalesce(spender, account) AS u, coalesce(model, $1) AS m,"
            " (created_at AT TIME ZONE 'UTC')::date AS d, -amount - refunded AS net, 1 AS c,"
            " scope AS s FROM ledger WHERE type IN ('usage', 'team_usage')"
            " AND created_at >= $2 AND created_at < $3"
            " UNION ALL SELECT user_id, model, date '0001-01-01' + (day - 1), net, count,"
            " nullif(scope, '') FROM rollups WHERE day >= $4 AND day < $5)"
            " SELECT json_build_array((SELECT value FROM settings"
            f" WHERE key = 'archived_before'), ({select}))",
            L.UNKNOWN_MODEL,
            lo,
            hi,
            _first_day(lo),
            _first_day(hi),
            *more,
        )
        R.check_archive_window(lo, hi, timestamp(horizon) if horizon else None)
        return result

    async def spend_by_user(self, start: datetime, end: datetime) -> list[SpendByUserRow]:
        lo, hi = L.check_window(start, end)
        rows = await self._spend(
            "SELECT coalesce(json_agg(json_build_array(u, s, c) ORDER BY s DESC,"
            " u COLLATE \"C\"), '[]') FROM (SELECT u, sum(net) AS s, sum(c) AS c FROM w"
            " GROUP BY u) x",
            lo,
            hi,
        )
        return [SpendByUserRow(user_id=u, total_spend=s, transaction_count=c) for u, s, c in rows]

    async def spend_by_model(self, start: datetime, end: datetime) -> list[SpendByModelRow]:
        lo, hi = L.check_window(start, end)
        rows = await self._spend(
            "SELECT coalesce(json_agg(json_build_array(m, s, c) ORDER BY s DESC,"
            " m COLLATE \"C\"), '[]') FROM (SELECT m, sum(net) AS s, sum(c) AS c FROM w"
            " GROUP BY m) x",
            lo,
            hi,
        )
        return [SpendByModelRow(model=m, total_spend=s, transaction_count=c) for m, s, c in rows]

    async def daily_spend(self, start: datetime, end: datetime) -> list[DailySpendRow]:
        lo, hi = L.check_window(start, end)
        rows = await self._spend(
            "SELECT coalesce(json_agg(json_build_array(d, s, c) ORDER BY d), '[]') FROM"
            " (SELECT d, sum(net) AS s, sum(c) AS c FROM w GROUP BY d) x",
            lo,
            hi,
        )
        return [DailySpendRow(date=d, total_spend=s, transaction_count=c) for d, s, c in rows]

    async def top_users(self, limit: int, start: datetime, end: datetime) -> list[TopUserRow]:
        L.check_limit(limit)
        lo, hi = L.check_window(start, end)
        rows = await self._spend(
            'SELECT coalesce(json_agg(json_build_array(u, s) ORDER BY s DESC, u COLLATE "C"),'
            " '[]') FROM (SELECT u, sum(net) AS s FROM w GROUP BY u"
            ' ORDER BY 2 DESC, u COLLATE "C" LIMIT $6) x',
            lo,
            hi,
            limit,
        )
        return [TopUserRow(user_id=u, total_spend=s) for u, s in rows]

    async def spend_by_scope(
        self, start: datetime, end: datetime, *, user_id: str | None = None
    ) -> list[SpendByScopeRow]:
        lo, hi = L.check_window(start, end)
        if user_id is not None:
            L.check_id("user_id", user_id)
        rows = await self._spend(
            "SELECT coalesce(json_agg(json_build_array(u, s, t, c) ORDER BY t DESC,"
            ' u COLLATE "C", s IS NOT NULL, s COLLATE "C"), \'[]\')'
            " FROM (SELECT u, s, sum(net) AS t, sum(c) AS c FROM w"
            " WHERE $6::text IS NULL OR u = $6::text GROUP BY u, s) x",
            lo,
            hi,
            user_id,
        )
        return [
            SpendByScopeRow(user_id=u, scope=s, total_spend=t, transaction_count=c)
            for u, s, t, c in rows
        ]

    async def aggregate_stats(self, start: datetime, end: datetime) -> AggregateStatsRow:
        lo, hi = L.check_window(start, end)
        total, users, count, top_user, top_model = await self._spend(
            "SELECT json_build_array(coalesce(sum(net), 0), count(DISTINCT u),"
            " coalesce(sum(c), 0),"
            ' (SELECT u FROM w GROUP BY u ORDER BY sum(net) DESC, u COLLATE "C" LIMIT 1),'
            ' (SELECT m FROM w GROUP BY m ORDER BY sum(net) DESC, m COLLATE "C" LIMIT 1))'
            " FROM w",
            lo,
            hi,
        )
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
