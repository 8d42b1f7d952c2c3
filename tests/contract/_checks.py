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
