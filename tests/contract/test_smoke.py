"""The fixture wiring: every store opens on every loop."""

from __future__ import annotations

import pytest
from tests.contract._checks import assert_invariants

from ducto.interface.base import CreditStore

pytestmark = pytest.mark.anyio


async def test_unknown_user_reads_zero(store: CreditStore, user_id: str) -> None:
    """An unknown user's balance is all zeros."""
    balance = await store.get_balance(user_id)

    assert 0 == balance.balance
    assert 0 == balance.available


async def test_invariants_after_a_purchase(store: CreditStore, user_id: str) -> None:
    """A purchase leaves the account consistent."""
    await store.add_credits(user_id, 10, "purchase")

    await assert_invariants(store, user_id)
