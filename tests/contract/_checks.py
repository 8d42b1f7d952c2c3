"""Invariant checks every contract test can call, through the public API only."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from ducto.interface.base import CreditStore
from ducto.interface.models import TransactionPage, TransactionRow


async def all_rows(store: CreditStore, user_id: str) -> list[TransactionRow]:
    """The user's whole ledger, oldest first."""
    return await _every_page(store.list_transactions, user_id)


async def all_team_rows(store: CreditStore, team_id: str) -> list[TransactionRow]:
    """A team pool's whole ledger, oldest first."""
    return await _every_page(store.list_team_transactions, team_id)


async def _every_page(
    list_page: Callable[..., Awaitable[TransactionPage]], account: str
) -> list[TransactionRow]:
    rows: list[TransactionRow] = []
    cursor: str | None = None
    while True:
        page = await list_page(account, limit=1000, cursor=cursor)
        rows.extend(page.items)
        if page.next_cursor is None:
            return rows[::-1]
        cursor = page.next_cursor


async def assert_invariants(store: CreditStore, user_id: str) -> None:
    """
    Check the contract's account invariants for one user.

    Balance equals the ledger sum, each row's balance_after is the running sum, lot remainders
    sum to the positive part of the balance, and available is derived from the parts.
    """
    balance = await store.get_balance(user_id)
    rows = await all_rows(store, user_id)
    running = 0
    for row in rows:
        running += row.amount
        assert running == row.balance_after, f"balance_after broken at {row}"
    assert running == balance.balance
    lots = await store.list_lots(user_id)
    assert all(lot.remaining > 0 for lot in lots)
    assert max(balance.balance, 0) == sum(lot.remaining for lot in lots)
    assert sum(lot.remaining for lot in lots if lot.expired) == balance.expired_unswept
    assert balance.reserved >= 0
    expected_available = (
        balance.balance - balance.reserved - balance.expired_unswept + balance.allowance_remaining
    )
    assert expected_available == balance.available


# -- archived ledgers --------------------------------------------------------------------------

import gzip  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
from collections.abc import Iterable, Mapping  # noqa: E402
from datetime import datetime  # noqa: E402
from typing import Any  # noqa: E402


def read_archive(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """
    Every line of an `archive_ledger` file, in file order (none when there is no file).

    The file is gzip'd JSON Lines written one gzip member per chunk; `gzip.open` reads the
    concatenated members as one stream.
    """
    if not os.path.exists(path):
        return []
    with gzip.open(path, "rt", encoding="utf-8") as file:
        return [json.loads(line) for line in file]


async def assert_archived_invariants(
    store: CreditStore, account: str, archived: Iterable[Mapping[str, Any]], *, team: bool = False
) -> None:
    """
    Check an account's invariants when its oldest rows were archived (`archived`: lines of
    `read_archive`, of any accounts).

    The account's archived rows, in ``seq`` order, followed by its kept rows must still be
    one running sum: each ``balance_after`` continues from the one before, across the cut,
    and the last equals the balance. Archived rows are all older than any kept row. For a
    user, lots and available are checked as in `assert_invariants`.
    """
    kind = "team" if team else "user"
    mine = sorted(
        (line for line in archived if (line["user_id"], line["account_type"]) == (account, kind)),
        key=lambda line: line["seq"],
    )
    kept = await (all_team_rows(store, account) if team else all_rows(store, account))
    if mine and kept:
        newest = max(datetime.fromisoformat(line["created_at"]) for line in mine)
        assert newest <= kept[0].created_at, f"an archived row is newer than {kept[0]}"
    running = 0
    for line in mine:
        running += line["amount"]
        assert running == line["balance_after"], f"archived balance_after broken at {line}"
    for row in kept:
        running += row.amount
        assert running == row.balance_after, f"balance_after broken at {row}"
    if team:
        pool = await store.get_team_balance(account)
        assert pool.ok
        assert running == pool.balance
        assert pool.reserved >= 0
        return
    balance = await store.get_balance(account)
    assert running == balance.balance
    lots = await store.list_lots(account)
    assert all(lot.remaining > 0 for lot in lots)
    assert max(balance.balance, 0) == sum(lot.remaining for lot in lots)
    assert sum(lot.remaining for lot in lots if lot.expired) == balance.expired_unswept
    assert balance.reserved >= 0
    expected_available = (
        balance.balance - balance.reserved - balance.expired_unswept + balance.allowance_remaining
    )
    assert expected_available == balance.available
