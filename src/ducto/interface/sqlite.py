"""
`SQLiteStore`: the embedded, durable default store.

Every operation is the engine's (`_engine`), run on the connection's thread over
`_sqlite_storage.SQLiteStorage` inside one ``BEGIN IMMEDIATE`` transaction, so the contract
holds across processes sharing the file, and each call costs one trip to that thread. Under
asyncio the connection is an `aiosqlite` connection; aiosqlite cannot run under trio, so there
the same functions run on the store's own worker thread through `anyio.to_thread`.

Group commit (`_group`): callers queue their operations; the first caller to find no transaction
running becomes the leader, takes everything queued (up to ``max_batch``) and runs it in one
transaction, each operation inside its own SAVEPOINT so a refused or failing one rolls back
alone; it commits once and then answers every caller. No caller is answered before the commit
that holds its operation is durable at the configured ``synchronous`` level. There is no
background task: leadership passes from caller to caller.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime, timedelta
from importlib import resources
from threading import Thread
from typing import Any, Final, Literal, Protocol, TypeVar

import anyio
import sniffio

from ducto._shown import shown
from ducto.errors import DuctoError, InvalidArgumentError, StoreError, StoreUnavailableError
from ducto.interface import _ledger as L
from ducto.interface import _retention as R
from ducto.interface._front import Keys, StoreFront
from ducto.interface._group import GroupCommit, Job
from ducto.interface._sqlite_storage import SQLiteStorage
from ducto.interface.models import SetupResult

__all__ = ["SQLiteStore"]

T = TypeVar("T")
SCHEMA_VERSION: Final = 6
_MIGRATIONS: Final = (
    "0001_ledger.sql",
    "0002_plans_caps_teams.sql",
    "0003_team_holds.sql",
    "0004_idempotency_rowid.sql",
    "0005_retention.sql",
    "0006_scopes_schedules_top_ups.sql",
)

# Primary result codes (``sqlite3.Error.sqlite_errorcode & 0xFF``) that mean the database
# cannot be used right now, rather than that a statement was wrong.
_UNAVAILABLE: Final = frozenset(
    {
        5,  # SQLITE_BUSY: another connection holds the lock past busy_timeout
        6,  # SQLITE_LOCKED
        8,  # SQLITE_READONLY
        10,  # SQLITE_IOERR
        11,  # SQLITE_CORRUPT
        13,  # SQLITE_FULL
        14,  # SQLITE_CANTOPEN
        15,  # SQLITE_PROTOCOL
        26,  # SQLITE_NOTADB
    }
)


class _Runner(Protocol):
    async def open(self, connect: Callable[[], sqlite3.Connection]) -> None: ...

    async def run(self, fn: Callable[..., T], *args: Any) -> T: ...

    async def close(self, conn: sqlite3.Connection) -> None: ...


class _ThreadRunner:
    """The connection on a worker thread of anyio's; used under trio."""

    def __init__(self) -> None:
        self._limiter = anyio.CapacityLimiter(1)

    async def open(self, connect: Callable[[], sqlite3.Connection]) -> None:
        await anyio.to_thread.run_sync(connect, limiter=self._limiter)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    async def close(self, conn: sqlite3.Connection) -> None:
        await anyio.to_thread.run_sync(conn.close, limiter=self._limiter)


class _AiosqliteRunner:
    """
    The connection on aiosqlite's thread; used under asyncio.

    aiosqlite's public API costs one thread hop per statement; an operation here is one hop
    per transaction, through ``Connection._execute`` (which queues any callable onto the
    connection thread). That private method, and ``_thread`` (joined after a failed connect,
    which aiosqlite does not wait for), are the only private parts used; the supported
    aiosqlite versions are pinned in the ``sqlite`` extra and
    ``tests/stores/test_sqlite.py`` checks both, so a change fails loudly.
    """

    async def open(self, connect: Callable[[], sqlite3.Connection]) -> None:
        import aiosqlite

        self._aio = aiosqlite.Connection(connect, iter_chunk_size=64)
        try:
            await self._aio
        except BaseException:
            # aiosqlite stops its thread on a failed connect without waiting for it; wait here,
            # while this loop can still take the thread's last callback.
            thread: Thread = self._aio._thread
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(thread.join)
            raise

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        result: T = await self._aio._execute(fn, *args)  # type: ignore[no-untyped-call]
        return result

    async def close(self, conn: sqlite3.Connection) -> None:
        await self._aio.close()


def _translate(exc: BaseException) -> StoreError:
    """A driver error as a `StoreError`, by SQLite's result code, with the cause chained."""
    message = str(exc) or type(exc).__name__
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int) and code & 0xFF in _UNAVAILABLE:
        error: StoreError = StoreUnavailableError(message)
    else:
        error = StoreError(message)
    error.__cause__ = exc
    return error


def _tables(conn: sqlite3.Connection) -> set[str]:
    """The names of the tables in the database."""
    return {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def _statements(script: str) -> Iterable[str]:
    """The statements of a migration script, without their leading comment lines."""
    buffer = ""
    for line in script.splitlines(keepends=True):
        if not buffer and (not line.strip() or line.lstrip().startswith("--")):
            continue
        buffer += line
        if sqlite3.complete_statement(buffer):
            yield buffer.strip()
            buffer = ""


def _resolve(path: str | os.PathLike[str]) -> str:
    """
    The database file as an absolute path (or ``:memory:``).

    A relative name such as ``file:billing.db?mode=memory`` is made absolute, so SQLite can
    never read it as a URI: a path is always a path.
    """
    name = os.fspath(path)
    if "\x00" in name:
        raise InvalidArgumentError(f"path must not contain a NUL character, got {shown(name)}")
    if name == ":memory:":
        return name
    if not name:
        raise InvalidArgumentError("path must not be empty")
    return os.path.abspath(name)


class SQLiteStore(StoreFront):
    """
    The complete store contract in one SQLite file, safe across threads, tasks and processes.

    Args:
        path: The database file (created if missing), or ``":memory:"``. A relative path is
            relative to the working directory when the store is made.
        synchronous: ``"FULL"`` (a commit survives power loss) or ``"NORMAL"`` (a commit
            survives a crash of the process; faster).
        clock: Returns the current aware UTC datetime; tests pass a controllable one.
        busy_timeout: Seconds to wait for another process's write lock.
        group_commit: Run concurrent operations in shared transactions (one commit each
            batch). Off, every operation commits on its own.
        max_batch: The most operations one transaction carries.
        idempotency_retention: How long an idempotency key replays after it was first used
            (a timedelta, or seconds as int or float; None keeps keys for ever). Past it the
            key is a new request, and `prune` deletes the record.
        hold_retention: How long a finished hold (settled, released or lapsed) is kept after
            its expiry time before `prune` deletes it (as above; None keeps holds for ever).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: Literal["FULL", "NORMAL"] = "FULL",
        clock: Callable[[], datetime] | None = None,
        busy_timeout: float = 5.0,
        group_commit: bool = True,
        max_batch: int = 100,
        idempotency_retention: timedelta | float | None = R.DEFAULT_RETENTION,
        hold_retention: timedelta | float | None = R.DEFAULT_RETENTION,
    ) -> None:
        if not isinstance(path, str | os.PathLike):
            raise InvalidArgumentError(f"path must be a str or path, got {shown(path)}")
        if synchronous not in ("FULL", "NORMAL"):
            raise InvalidArgumentError(
                f"synchronous must be 'FULL' or 'NORMAL', got {shown(synchronous)}"
            )
        if type(busy_timeout) not in (int, float) or not 0 <= busy_timeout <= 3600:
            raise InvalidArgumentError(
                f"busy_timeout must be 0 to 3600 seconds, got {shown(busy_timeout)}"
            )
        L.check_bool("group_commit", group_commit)
        L.check_limit(max_batch, name="max_batch", maximum=10_000)
        self._retention = R.Retention.of(idempotency_retention, hold_retention)
        self._path = _resolve(path)
        self._synchronous = synchronous
        self._clock: Callable[[], datetime] = clock or L.utc_now
        self._busy_timeout = float(busy_timeout)
        self._max_batch = max_batch if group_commit else 1
        self._runner: _Runner | None = None
        self._st: SQLiteStorage | None = None
        self._schema_ready = False
        self._group = GroupCommit(self._execute_batch, max_batch=self._max_batch)
        self._closed = False

    # -- lifecycle -----------------------------------------------------------------------------

    async def open(self) -> None:
        """Open the connection (``async with`` does this for you)."""
        if self._closed:
            raise StoreError("the store is closed")
        if self._runner is not None:
            return
        runner: _Runner = _AiosqliteRunner() if _on_asyncio() else _ThreadRunner()
        opened: list[sqlite3.Connection] = []

        def connect() -> sqlite3.Connection:
            conn = self._connect()
            opened.append(conn)
            return conn

        try:
            await runner.open(connect)
        except sqlite3.Error as exc:
            raise _translate(exc) from exc
        self._runner = runner
        self._st = SQLiteStorage(opened[0], self._clock, L.IdSource(), self._retention)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self._path,
            isolation_level=None,
            check_same_thread=False,
            timeout=self._busy_timeout,
        )
        try:
            self._enable_wal(conn)
            conn.execute(f"PRAGMA synchronous = {self._synchronous}")
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
            conn.execute("PRAGMA foreign_keys = ON")
        except BaseException:
            conn.close()
            raise
        return conn

    def _enable_wal(self, conn: sqlite3.Connection) -> None:
        """
        Switch the file to WAL, waiting up to ``busy_timeout`` for other openers.

        Switching the journal mode of a new file needs its exclusive lock, and SQLite reports
        "locked" at once (without its busy handler) while another process opens the same file.
        """
        deadline = time.monotonic() + self._busy_timeout
        pause = 0.001
        while True:
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode & 0xFF not in (5, 6) or time.monotonic() > deadline:
                    raise
                time.sleep(pause)
                pause = min(pause * 2, 0.05)

    async def aclose(self) -> None:
        """Close the connection; later calls raise `StoreError`. Closing twice is harmless."""
        if self._closed:
            return
        self._closed = True
        runner, self._runner = self._runner, None
        if runner is not None:
            with anyio.CancelScope(shield=True):
                # Let the transaction in flight finish; queued calls then fail as closed.
                await self._group.wait_idle()
                assert self._st is not None
                await runner.close(self._st.conn)

    async def setup(self, database_url: str | None = None) -> SetupResult:
        """
        Create or migrate the schema to the current version, in one transaction.

        Idempotent and safe while other processes use the file: the version is read and
        migrated under the write lock.
        """
        result = await self._call(self._migrate, write=True)
        self._schema_ready = True
        return result

    def _migrate(self) -> SetupResult:
        conn = self._storage().conn
        current = conn.execute("PRAGMA user_version").fetchone()[0]
        if current > SCHEMA_VERSION:
            raise StoreError(
                f"the database schema is version {current}, newer than this ducto"
                f" ({SCHEMA_VERSION}); upgrade ducto"
            )
        before = _tables(conn)
        created: list[str] = []
        package = resources.files("ducto.interface.sql.sqlite")
        for version, name in enumerate(_MIGRATIONS, start=1):
            if version <= current:
                continue
            for statement in _statements(package.joinpath(name).read_text(encoding="utf-8")):
                conn.execute(statement)
                code = "\n".join(
                    line for line in statement.splitlines() if not line.lstrip().startswith("--")
                ).strip()
                if code.upper().startswith("CREATE TABLE"):
                    created.append(code.split()[2])
            conn.execute(f"PRAGMA user_version = {version}")
        # A table rebuilt by a migration (made under a new name, then renamed) is not new.
        after = _tables(conn) - before
        created = [table for table in dict.fromkeys(created) if table in after]
        return SetupResult(tables_created=created, schema_version=SCHEMA_VERSION)

    def _storage(self) -> SQLiteStorage:
        if self._st is None or self._closed:
            raise StoreError("the store is closed" if self._closed else "the store is not open")
        return self._st

    def _check_schema(self) -> None:
        """Refuse to run before `setup` created the schema; runs on the connection thread."""
        version = self._storage().conn.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            raise StoreError(
                f"the database {self._path!r} has no ducto schema yet: call "
                "`await store.setup()` first (it is idempotent and safe on every deploy)"
            )

    async def _run(self, op: Callable[..., T], keys: Keys, *args: Any, write: bool = True) -> T:
        if not self._schema_ready:
            await self._call(self._check_schema, write=False)
            self._schema_ready = True
        return await self._call(op, self._storage(), *args, write=write)

    # -- the transaction pipeline ------------------------------------------------------------

    def _call(self, fn: Callable[..., T], *args: Any, write: bool = True) -> Awaitable[T]:
        """
        Queue `fn(*args)` for the connection thread; await the result.

        A plain function returning the queue's coroutine, so an operation in flight holds no
        coroutine frame of its own here (thousands may wait, and the collector walks each).
        """
        if self._closed or self._runner is None:
            raise StoreError("the store is closed" if self._closed else "the store is not open")
        return self._group.submit(Job(fn, args, write))

    async def _execute_batch(self, batch: list[Job]) -> None:
        runner = self._runner
        if runner is None:
            error = StoreError("the store is closed")
            for job in batch:
                job.error = error
            return
        try:
            await runner.run(self._run_batch, batch)
        except Exception as exc:  # the connection thread itself failed
            error = exc if isinstance(exc, StoreError) else _translate(exc)
            for job in batch:
                job.result, job.error = None, error

    def _run_batch(self, batch: list[Job]) -> None:
        """Run queued operations in one transaction; runs on the connection thread."""
        st = self._storage()
        conn = st.conn
        single = len(batch) == 1
        try:
            conn.execute("BEGIN IMMEDIATE" if any(j.write for j in batch) else "BEGIN")
        except sqlite3.Error as exc:
            for job in batch:
                job.error = _translate(exc)
            return
        try:
            for job in batch:
                if not single:
                    conn.execute("SAVEPOINT op")
                try:
                    job.result = job.fn(*job.args)
                except Exception as exc:
                    if single:
                        raise
                    conn.execute("ROLLBACK TO op")
                    st.forget()
                    job.error = exc if isinstance(exc, DuctoError) else _translate(exc)
                if not single:
                    conn.execute("RELEASE op")
            conn.execute("COMMIT")
        except BaseException as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            st.forget()
            error: BaseException = exc if isinstance(exc, DuctoError) else _translate(exc)
            for job in batch:
                job.result, job.error = None, error
            if not isinstance(exc, Exception):
                raise


def _on_asyncio() -> bool:
    try:
        return sniffio.current_async_library() == "asyncio"
    except sniffio.AsyncLibraryNotFoundError:
        return False
