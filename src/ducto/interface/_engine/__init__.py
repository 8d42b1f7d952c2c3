"""
Every store operation, written once, over a small synchronous storage interface.

`_ledger` holds the contract's rules on plain data; this package holds the *steps* of each
operation: load and lapse the account, replay or refuse by idempotency key, check the
refusals in the contract's order, mutate, append the ledger row, build the result and
remember it. A store supplies a `Storage` (where accounts, holds, lots, rows and keys live)
and decides how an operation runs: `MemoryStore` takes the account's lock and runs it on its
dicts; `SQLiteStore` runs it inside one ``BEGIN IMMEDIATE`` transaction on its connection
thread; `PostgresStore` prefetches what the arguments name in one round trip, runs it on that
snapshot and writes the changes in a second (see ``docs/architecture.md``).

Operations never await. Every check that can refuse or raise comes before the first write, so
an operation that refuses or raises has changed nothing, whatever the storage.

One module per operation family (`grants`, `holds`, `refunds`, `teams`, `caps`, `plans`,
`pricing`, `topups`, `sweep`, `retention`, `analytics`); `storage` holds the types and the `Storage`
protocol, and `common` the steps several families share.
"""

from __future__ import annotations

from .analytics import spend_events
from .caps import check_spend_cap, list_spend_caps, remove_spend_cap, set_spend_cap
from .common import public_row
from .grants import add_credits, get_balance, list_lots, page
from .holds import charge, deduct, release, reserve
from .plans import check_allowance, get_user_plan, increment_usage_window, set_user_plan
from .pricing import (
    activate_pricing,
    cancel_pricing,
    current_version,
    get_active_pricing,
    get_pricing_config,
    get_pricing_history,
    set_active_pricing,
)
from .refunds import refund
from .retention import archive, archive_candidates, now, prune
from .storage import (
    TEAM,
    USER,
    Account,
    AccountKey,
    ArchiveChanged,
    Debit,
    Hold,
    Kind,
    Member,
    PricingState,
    PricingVersion,
    Storage,
    StoredRow,
    TopUpClaim,
)
from .sweep import sweep
from .teams import (
    add_team_credits,
    add_team_member,
    create_team,
    deduct_team,
    get_team_balance,
    get_team_members,
    remove_team_member,
    reserve_team,
)
from .topups import claim_top_up, finish_top_up

__all__ = [
    "Account",
    "AccountKey",
    "Debit",
    "Hold",
    "Kind",
    "Member",
    "PricingState",
    "PricingVersion",
    "Storage",
    "StoredRow",
    "TopUpClaim",
    "TEAM",
    "USER",
    "activate_pricing",
    "add_credits",
    "add_team_credits",
    "add_team_member",
    "cancel_pricing",
    "charge",
    "claim_top_up",
    "check_allowance",
    "check_spend_cap",
    "create_team",
    "deduct",
    "current_version",
    "deduct_team",
    "finish_top_up",
    "get_active_pricing",
    "get_balance",
    "get_pricing_config",
    "get_pricing_history",
    "get_team_balance",
    "get_team_members",
    "get_user_plan",
    "increment_usage_window",
    "list_lots",
    "list_spend_caps",
    "page",
    "public_row",
    "refund",
    "release",
    "remove_spend_cap",
    "remove_team_member",
    "reserve",
    "reserve_team",
    "set_active_pricing",
    "set_spend_cap",
    "set_user_plan",
    "spend_events",
    "sweep",
    "archive",
    "archive_candidates",
    "now",
    "prune",
    "ArchiveChanged",
]
