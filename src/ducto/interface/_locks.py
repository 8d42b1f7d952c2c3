"""Per-key `anyio` locks, created on demand and dropped when nobody holds or waits for them."""

from __future__ import annotations

from types import TracebackType

import anyio

__all__ = ["KeyedLocks"]

Key = tuple[str, str]


class _Entry:
    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        # fast_acquire: an uncontended acquire does not yield, which halves the cost of a
        # store call; every store call still yields once at its own checkpoint.
        self.lock = anyio.Lock(fast_acquire=True)
        self.users = 0


class KeyedLocks:
    """
    A table of locks keyed by ``(kind, id)``.

    A key's lock exists only while some task holds or waits for it, so a million distinct
    users leave no million locks behind. Several keys are always taken in sorted order, so
    two operations that share keys cannot deadlock.
    """

    __slots__ = ("_table",)

    def __init__(self) -> None:
        self._table: dict[Key, _Entry] = {}

    def __len__(self) -> int:
        return len(self._table)

    def hold(self, *keys: Key) -> _Held:
        """Return an async context manager holding the locks of `keys` (sorted, deduplicated)."""
        return _Held(self._table, tuple(sorted(set(keys))) if len(keys) > 1 else keys)


class _Held:
    __slots__ = ("_entries", "_keys", "_table")

    def __init__(self, table: dict[Key, _Entry], keys: tuple[Key, ...]) -> None:
        self._table = table
        self._keys = keys
        self._entries: list[_Entry] = []

    async def __aenter__(self) -> None:
        table = self._table
        for key in self._keys:
            entry = table.get(key)
            if entry is None:
                entry = table[key] = _Entry()
            entry.users += 1
            try:
                await entry.lock.acquire()
            except BaseException:
                self._drop(key, entry)
                self._release_all()
                raise
            self._entries.append(entry)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._release_all()

    def _release_all(self) -> None:
        entries, self._entries = self._entries, []
        for key, entry in zip(reversed(self._keys[: len(entries)]), reversed(entries), strict=True):
            entry.lock.release()
            self._drop(key, entry)

    def _drop(self, key: Key, entry: _Entry) -> None:
        entry.users -= 1
        if entry.users == 0 and self._table.get(key) is entry:
            del self._table[key]
