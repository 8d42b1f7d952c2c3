"""
Connections for `PostgresStore`, driven on the running event loop, asyncio or trio.

psycopg's async connections run only on asyncio, and its synchronous ones block a thread per
call. The store needs neither: each round trip is one message sent through psycopg's libpq
wrapper (`psycopg.pq`, non-blocking), and the task waits for the socket with anyio. So one code
path serves both loops, with no thread hop per round trip and little Python per message:
a transaction is a handful of simple-protocol messages (``BEGIN;SELECT ducto_read('...')``,
then ``SELECT ducto_write('...');COMMIT``), each answered by one JSON document.

Connecting blocks (name resolution, authentication), so psycopg connects on a worker thread;
the connections are then kept in `Pool`, a small pool of the store's own. A store given a
`psycopg_pool` pool borrows its connections through `BorrowedPool` instead.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

import anyio
import psycopg
import sniffio
from anyio.lowlevel import checkpoint
from psycopg import pq

from ducto.errors import StoreUnavailableError

__all__ = ["BorrowedPool", "Connection", "ConnectionLost", "Pool", "ServerError"]

_SQLSTATE: Final = 0x43  # PG_DIAG_SQLSTATE ('C')
_OK: Final = pq.ConnStatus.OK
_IDLE: Final = pq.TransactionStatus.IDLE
_TUPLES: Final = pq.ExecStatus.TUPLES_OK
_FATAL: Final = pq.ExecStatus.FATAL_ERROR


class ServerError(Exception):
    """The server refused a statement; the connection is still usable."""

    def __init__(self, sqlstate: str, message: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


class ConnectionLost(Exception):
    """The connection broke (or stopped answering); it is not usable again."""


class Connection:
    """
    One server connection: the psycopg connection that owns it, and its libpq handle.

    Args:
        owner: A `psycopg.Connection` or `psycopg.AsyncConnection` in autocommit mode.
    """

    __slots__ = ("fd", "owner", "pg", "usable", "wait_readable")

    def __init__(self, owner: Any) -> None:
        self.owner = owner
        self.pg = owner.pgconn
        self.fd: int = self.pg.socket
        self.usable = True
        self.wait_readable: Callable[[int], Awaitable[Any]] = (
            _asyncio_readable
            if sniffio.current_async_library() == "asyncio"
            else anyio.wait_readable
        )

    @property
    def idle(self) -> bool:
        """Usable and outside any transaction."""
        return self.usable and self.pg.status == _OK and self.pg.transaction_status == _IDLE

    async def query(self, sql: bytes) -> bytes | None:
        """
        Send `sql` (one statement or several, simple protocol) and wait for the answers.

        Returns:
            The first column of the first row of the last answer that had rows (None when
            none had, or the value is NULL).

        Raises:
            ServerError: A statement failed (the statements after it did not run).
            ConnectionLost: The connection broke.
        """
        try:
            self.pg.send_query(sql)
            return await self._answers()
        except psycopg.OperationalError as exc:
            self.usable = False
            raise ConnectionLost(str(exc).strip() or "the connection broke") from exc

    async def query_params(self, sql: bytes, params: Sequence[bytes | None]) -> bytes | None:
        """`query` for one statement with ``$n`` parameters in text form (extended protocol)."""
        try:
            self.pg.send_query_params(sql, params)
            return await self._answers()
        except psycopg.OperationalError as exc:
            self.usable = False
            raise ConnectionLost(str(exc).strip() or "the connection broke") from exc

    async def _answers(self) -> bytes | None:
        pg = self.pg
        fd = self.fd
        try:
            while pg.flush():
                await anyio.wait_writable(fd)
            value: bytes | None = None
            error: Any = None
            wait_readable = self.wait_readable
            while True:
                while pg.is_busy():
                    await wait_readable(fd)
                    pg.consume_input()
                result = pg.get_result()
                if result is None:
                    break
                status = result.status
                if status == _TUPLES:
                    value = result.get_value(0, 0) if result.ntuples else None
                elif status == _FATAL and error is None:
                    error = result
        except BaseException:
            # Cancelled or timed out while a message was on the wire: its answer would
            # arrive later, out of step with the next query, so the connection is done.
            self.usable = False
            raise
        if error is not None:
            message = (error.error_message or b"").decode("utf-8", "replace").strip()
            if pg.status != _OK:
                self.usable = False
                raise ConnectionLost(message or "the connection broke")
            sqlstate = (error.error_field(_SQLSTATE) or b"").decode("ascii", "replace")
            raise ServerError(sqlstate, message or "the server refused the statement")
        return value

    def close(self) -> None:
        """Close a connection the store opened (no round trip)."""
        self.usable = False
        self.owner.close()


async def _asyncio_readable(fd: int) -> None:
    """Wait until `fd` is readable: `anyio.wait_readable` without its per-call lookups."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        loop.remove_reader(fd)


class _Waiter:
    __slots__ = ("conn", "event")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.conn: Connection | None = None


class Pool:
    """
    The store's own connections: at least `min_size` open, at most `max_size`.

    A connection serves one task at a time. A task that finds none idle opens one while there
    is room, or waits, first come first served, for one to be returned (at most `timeout`
    seconds, then `StoreUnavailableError`). A connection returned broken is closed and counted
    as lost; a waiting task then opens one in its place.

    Args:
        connect: Opens one connection (set up for the store's sessions).
        min_size: Connections opened by `open` and kept.
        max_size: The most connections open at once.
        timeout: Seconds a request waits for a connection.
    """

    def __init__(
        self,
        connect: Callable[[], Awaitable[Connection]],
        *,
        min_size: int,
        max_size: int,
        timeout: float,
    ) -> None:
        self._connect = connect
        self.min_size = min_size
        self.max_size = max_size
        self._timeout = timeout
        self._idle: list[Connection] = []
        self._size = 0
        self._waiters: deque[_Waiter] = deque()
        self._closed = False
        self.opened = 0
        """Connections opened."""
        self.lost = 0
        """Connections found broken (or abandoned mid-answer) and closed."""
        self.closed = 0
        """Connections closed with the pool."""

    @property
    def size(self) -> int:
        """Connections open or being opened."""
        return self._size

    @property
    def available(self) -> int:
        """Idle connections."""
        return len(self._idle)

    @property
    def waiting(self) -> int:
        """Requests waiting for a connection."""
        return len(self._waiters)

    async def open(self) -> None:
        """Open `min_size` connections (the first failure raises)."""
        while self._size < self.min_size:
            self._size += 1
            try:
                conn = await self._open_one()
            except BaseException:
                self._size -= 1
                raise
            self._idle.append(conn)

    async def _open_one(self) -> Connection:
        # Shielded: a connection being made is finished and kept, whatever happens to the
        # task that asked for it.
        with anyio.CancelScope(shield=True):
            conn = await self._connect()
        self.opened += 1
        return conn

    async def acquire(self) -> Connection:
        """A connection for one task (cancellable while it waits: nothing was sent yet)."""
        deadline = anyio.current_time() + self._timeout
        while True:
            if self._closed:
                raise StoreUnavailableError("the store's connection pool is closed")
            idle = self._idle
            while idle:
                conn = idle.pop()
                if conn.idle:
                    return conn
                self._discard(conn)
            if self._size < self.max_size:
                self._size += 1
                try:
                    conn = await self._open_one()
                except BaseException:
                    self._size -= 1
                    self._wake_one()
                    raise
                try:
                    await checkpoint()
                except BaseException:
                    await self.release(conn)
                    raise
                return conn
            waiter = _Waiter()
            self._waiters.append(waiter)
            try:
                with anyio.fail_at(deadline):
                    await waiter.event.wait()
            except BaseException as exc:
                if waiter.conn is not None:
                    await self.release(waiter.conn)  # handed over as we gave up: pass it on
                elif waiter in self._waiters:
                    self._waiters.remove(waiter)
                else:
                    self._wake_one()  # woken to open one: let the next waiter do it
                if isinstance(exc, TimeoutError):
                    raise StoreUnavailableError(
                        f"no database connection became free in {self._timeout:g} s"
                        f" (max_size={self.max_size})"
                    ) from None
                raise
            if waiter.conn is not None:
                return waiter.conn
            # Woken with no connection: one closed, so there is room to open another.

    async def release(self, conn: Connection) -> None:
        """Take a connection back: to the next waiter, to the idle list, or closed if broken."""
        if not conn.idle or self._closed:
            self._discard(conn)
            self._wake_one()
            return
        if self._waiters:
            waiter = self._waiters.popleft()
            waiter.conn = conn
            waiter.event.set()
            return
        self._idle.append(conn)

    def _discard(self, conn: Connection) -> None:
        self._size -= 1
        if self._closed and conn.idle:
            self.closed += 1
        else:
            self.lost += 1
        with contextlib.suppress(Exception):  # closing a broken connection may fail
            conn.close()

    def _wake_one(self) -> None:
        """A connection went away: the oldest waiter may open one in its place."""
        if self._waiters and self._size < self.max_size:
            self._waiters.popleft().event.set()

    async def aclose(self) -> None:
        """Close the idle connections now, and the ones in use when they come back."""
        self._closed = True
        while self._idle:
            self._discard(self._idle.pop())
        while self._waiters:
            self._waiters.popleft().event.set()


class BorrowedPool:
    """
    Connections borrowed from a `psycopg_pool` pool the store was given (and does not close).

    Args:
        pool: A `psycopg_pool.AsyncConnectionPool` (asyncio) or `psycopg_pool.ConnectionPool`.
        timeout: Seconds a request waits for a connection.
    """

    def __init__(self, pool: Any, *, timeout: float) -> None:
        import psycopg_pool

        self._pool = pool
        self._async = isinstance(pool, psycopg_pool.AsyncConnectionPool)
        self._timeout = timeout
        self.min_size: int = pool.min_size
        self.max_size: int = pool.max_size
        self.opened = 0
        self.lost = 0
        self.closed = 0
        self._limiter = anyio.CapacityLimiter(pool.max_size)

    def _stat(self, name: str) -> int:
        return int(self._pool.get_stats().get(name, 0))

    @property
    def size(self) -> int:
        """Connections the pool holds."""
        return self._stat("pool_size")

    @property
    def available(self) -> int:
        """Idle connections in the pool."""
        return self._stat("pool_available")

    @property
    def waiting(self) -> int:
        """Requests waiting for a connection."""
        return self._stat("requests_waiting")

    async def open(self) -> None:
        """Nothing to do: the pool is the caller's."""

    async def acquire(self) -> Connection:
        """A connection from the pool (`StoreUnavailableError` after the timeout)."""
        import psycopg_pool

        try:
            if self._async:
                owner = await self._pool.getconn(timeout=self._timeout)
            else:
                owner = await anyio.to_thread.run_sync(
                    self._pool.getconn, self._timeout, limiter=self._limiter
                )
        except psycopg_pool.PoolTimeout as exc:
            raise StoreUnavailableError(str(exc)) from exc
        return Connection(owner)

    async def release(self, conn: Connection) -> None:
        """Give the connection back (closed first if it broke, so the pool replaces it)."""
        owner = conn.owner
        if not conn.idle:
            self.lost += 1
            conn.usable = False
            if self._async:
                await owner.close()
            else:
                owner.close()
        if self._async:
            await self._pool.putconn(owner)
        else:
            self._pool.putconn(owner)

    async def aclose(self) -> None:
        """Nothing to do: the pool is the caller's."""
