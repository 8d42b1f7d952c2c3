"""Per-key locks that exist only while some task holds or waits for them."""

from __future__ import annotations

from collections import deque
from types import TracebackType

import anyio
from anyio.lowlevel import checkpoint

__all__ = ["KeyedLocks"]

Key = tuple[str, str]


class _Waiter:
    __slots__ = ("event", "granted")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.granted = False


class KeyedLocks:
    """
    A table of FIFO mutexes keyed by ``(kind, id)``.

    A key is locked while it is in the table; its entry holds the queue of waiters, created
    only under contention, so an uncontended acquire costs a dict insert. Release hands the
    lock straight to the oldest waiter, so nobody starves, and drops the entry when nobody
    waits: a million distinct users leave no million locks behind. Several keys are always
    taken in sorted order, so two operations that share keys cannot deadlock.

    Entering `hold` is always a checkpoint (a cancellation and scheduling point) that comes
    before any lock is taken: a store operation yields once, up front, and then runs its
    read-modify-write without yielding while it holds the lock.
    """

    __slots__ = ("_table",)

    def __init__(self) -> None:
        self._table: dict[Key, deque[_Waiter] | None] = {}

    def __len__(self) -> int:
        return len(self._table)

    def hold(self, *keys: Key) -> _Held:
        """Return an async context manager holding the locks of `keys` (sorted, deduplicated)."""
        return _Held(self, keys if len(keys) == 1 else tuple(sorted(set(keys))))

    async def acquire(self, key: Key) -> None:
        """Take the lock of `key`, waiting in line if another task holds it."""
        table = self._table
        if key not in table:
            table[key] = None
            return
        waiters = table[key]
        if waiters is None:
            waiters = table[key] = deque()
        waiter = _Waiter()
        waiters.append(waiter)
        try:
            await waiter.event.wait()
        except BaseException:
            if waiter.granted:
                # The lock was handed over just as we were cancelled: pass it on.
                self.release(key)
            else:
                waiters.remove(waiter)
            raise

    def release(self, key: Key) -> None:
        """Release the lock of `key`, handing it to the oldest waiter if there is one."""
        waiters = self._table[key]
        if waiters:
            waiter = waiters.popleft()
            waiter.granted = True
            waiter.event.set()
        else:
            del self._table[key]


class _Held:
    __slots__ = ("_count", "_keys", "_locks")

    def __init__(self, locks: KeyedLocks, keys: tuple[Key, ...]) -> None:
        self._locks = locks
        self._keys = keys
        self._count = 0

    async def __aenter__(self) -> None:
        await checkpoint()
        keys = self._keys
        table = self._locks._table
        if len(keys) == 1 and keys[0] not in table:
            # The uncontended single-key case, without a nested coroutine.
            table[keys[0]] = None
            self._count = 1
            return
        try:
            for key in keys:
                await self._locks.acquire(key)
                self._count += 1
        except BaseException:
            self._release()
            raise

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._release()

    def _release(self) -> None:
        count, self._count = self._count, 0
        for key in reversed(self._keys[:count]):
            self._locks.release(key)
