"""
The engine's `Storage` for `PostgresStore`: one document of rows read, one of rows written.

A batch of operations runs in one short transaction. Its first round trip sends ``BEGIN`` and
one call of the schema's ``ducto_read`` function with a JSON document saying what the
operations may read (the `Need`, sized from their arguments): the function creates and locks
the accounts they change, in one fixed order, and answers with one JSON document of every row
asked for, read after the locks. The engine then runs each operation on a `Snapshot` of those
rows, one operation after another; the snapshot keeps what each one writes, so the next one
reads it (as `MemoryStore`'s dicts do), and gathers every write into one document
(`Writes`). The last round trip sends ``ducto_write`` with that document, and ``COMMIT``. A
batch is two round trips, however many operations share an account.

When an operation reads something the document did not bring (rare: a replayed key that names
an earlier hold, a pricing version this process has not parsed yet, more lots than its amount
suggested), the snapshot raises `Miss`; the store fetches it inside the same transaction (the
locks are still held) and runs the batch again from the start on a fresh snapshot. Nothing was
sent: writes are only recorded until the end. The few reads a snapshot cannot answer after an
earlier operation of the batch wrote what they read (a page of the ledger, the list of lots or
of a team's members) raise `Defer`: the operation moves to a later round, after the batch's
writes so far are applied.

A refund whose ledger row is gone learns in the same read whether the row was archived
(``ducto_read`` looks for it among the archived ids only when a row asked for is missing).
Idempotency records come with the instant they were written, which `recall` compares with the
retention's cutoff; a record past it is replaced by `remember`. Pruning and archiving do not
run on a snapshot: `PostgresStore` runs them as short transactions of their own.

What only some accounts need is read only for them, in the same document: caps, this window's
spend and counted holds by model for a user with caps, and the spend and counted holds in a
budget scope only for the scopes that user's caps name (a cap on another scope set earlier in
the batch defers the operation that asks for it). The pricing part (the pointer, the highest
version and the scheduled versions) comes when an operation needs it and, for a balance or a
settlement, only when an account read has a plan. A top-up claim and the month's top-up total
come only when the batch has a top-up operation.

The two functions only move data; every rule stays in the engine.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, TypeVar

from ducto.interface import _engine as E
from ducto.interface import _ledger as L
from ducto.interface import _retention as R
from ducto.interface.models import PlanDefinition, PricingConfigData, SpendCap, TeamMember

T = TypeVar("T")

_ALL_MODELS: Final = ""
_NO_SCOPE: Final = ""
_NEW_SEQ: Final = 1 << 62
"""Sequence numbers given to lots made in a batch: after every stored lot, in creation order."""
_NEVER: Final = datetime.max.replace(tzinfo=UTC)


class Miss(Exception):
    """The operation read something the document did not bring; `need` says what."""

    def __init__(self, need: Need) -> None:
        super().__init__("the snapshot lacks what the operation read")
        self.need = need


class Defer(Exception):
    """The operation reads what an earlier operation of the batch wrote and the snapshot cannot
    show: run it in a later round, after the writes so far are applied."""


def _dt(value: str | None) -> datetime | None:
    """A timestamptz rendered by Postgres in JSON."""
    if value is None:
        return None
    moment = datetime.fromisoformat(value)
    return moment if moment.tzinfo is UTC else moment.astimezone(UTC)


def timestamp(value: str) -> datetime:
    """A timestamptz as Postgres renders it (in JSON or as text), as an aware UTC datetime."""
    moment = _dt(value)
    assert moment is not None
    return moment


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def literal(document: Any) -> bytes:
    """
    `document` as JSON inside an SQL string literal, for ``ducto_read`` and ``ducto_write``.

    The JSON is ASCII (``ensure_ascii``), so it reads the same in any client encoding, and
    with ``standard_conforming_strings`` (which every store session has) only quotes need
    doubling.
    """
    return b"'" + _dumps(document).replace("'", "''").encode("ascii") + b"'"


_dumps: Final = json.JSONEncoder(separators=(",", ":")).encode


# -- what to read --------------------------------------------------------------------------------


@dataclass(slots=True)
class Need:
    """What a batch may read; each field becomes one part of the ``ducto_read`` document."""

    accounts: set[tuple[str, str]] = field(default_factory=set)
    keys: set[tuple[str, str, str]] = field(default_factory=set)
    holds: set[tuple[str, str, str]] = field(default_factory=set)
    debits: dict[tuple[str, str], int] = field(default_factory=dict)
    all_lots: set[tuple[str, str]] = field(default_factory=set)
    members: set[tuple[str, str]] = field(default_factory=set)
    member_lists: set[str] = field(default_factory=set)
    member_counts: set[str] = field(default_factory=set)
    pricing: int = 0
    """1: the pricing settings if an account read has a plan; 2: always."""
    pricing_versions: set[int] = field(default_factory=set)
    pricing_history: bool = False
    refunds: dict[str, str] = field(default_factory=dict)
    """Refunded ledger rows by id, with the refund's idempotency key ("" for none)."""
    pages: dict[tuple[Any, ...], None] = field(default_factory=dict)
    sweep: bool = False
    top_ups: set[str] = field(default_factory=set)
    """Users whose top-up claim and this month's top-up total are read (rare operations)."""

    def merge(self, other: Need, *, add_debits: bool = False) -> None:
        """
        Add everything `other` needs.

        Args:
            other: What to add.
            add_debits: Add the debited amounts of an account (two operations that both debit
                it draw one after the other) instead of keeping the larger.
        """
        self.accounts |= other.accounts
        self.keys |= other.keys
        self.holds |= other.holds
        for account, amount in other.debits.items():
            before = self.debits.get(account, 0)
            self.debits[account] = before + amount if add_debits else max(amount, before)
        self.all_lots |= other.all_lots
        self.members |= other.members
        self.member_lists |= other.member_lists
        self.member_counts |= other.member_counts
        self.pricing = max(self.pricing, other.pricing)
        self.pricing_versions |= other.pricing_versions
        self.pricing_history |= other.pricing_history
        for tx, key in other.refunds.items():
            if key or tx not in self.refunds:
                self.refunds[tx] = key
        self.pages.update(other.pages)
        self.sweep |= other.sweep
        self.top_ups |= other.top_ups

    def document(self) -> dict[str, Any]:
        """The ``ducto_read`` document (without the locks and the clock, which the store adds)."""
        doc: dict[str, Any] = {}
        if self.accounts:
            doc["accounts"] = list(self.accounts)
        if self.debits:
            doc["debits"] = [[*key, amount] for key, amount in self.debits.items()]
        if self.keys:
            doc["keys"] = list(self.keys)
        if self.holds:
            doc["holds"] = list(self.holds)
        if self.all_lots:
            doc["all_lots"] = list(self.all_lots)
        if self.members:
            doc["members"] = list(self.members)
        if self.member_lists:
            doc["member_lists"] = list(self.member_lists)
        if self.member_counts:
            doc["member_counts"] = list(self.member_counts)
        if self.pricing:
            doc["pricing"] = self.pricing
        if self.pricing_versions:
            doc["versions"] = list(self.pricing_versions)
        if self.pricing_history:
            doc["history"] = True
        if self.refunds:
            doc["debit_rows"] = [[tx, key] for tx, key in self.refunds.items()]
        if self.pages:
            doc["pages"] = [
                [kind, account, limit, before, None if types is None else sorted(types),
                 _iso(start), _iso(end)]
                for kind, account, limit, before, types, start, end in self.pages
            ]  # fmt: skip
        if self.sweep:
            doc["sweep"] = True
        if self.top_ups:
            doc["top_ups"] = list(self.top_ups)
        return doc


def need_for(op: Any, args: Sequence[Any]) -> Need:
    """
    The reads an engine operation's arguments determine (see the module docstring).

    Args:
        op: The engine operation.
        args: Its arguments after the storage.
    """
    need = Need()
    u, t = E.USER, E.TEAM
    if op is E.get_balance:
        (user,) = args
        need.accounts.add((u, user))
        need.pricing = 1
    elif op is E.add_credits:
        user, amount, _, _, _, key = args
        need.accounts.add((u, user))
        _key(need, u, user, key)
        if amount < 0:
            need.debits[(u, user)] = -amount
    elif op is E.reserve:
        user, _, _, _, _, _, use_allowance, key = args
        need.accounts.add((u, user))
        need.pricing = int(use_allowance)
        _key(need, u, user, key)
    elif op is E.deduct:
        user, rid, amount, key, _, team = args
        owner = (u, user) if team is None else (t, team)
        need.accounts.add(owner)
        need.holds.add((*owner, rid))
        need.debits[owner] = amount
        _key(need, *owner, key)
        if team is None:
            need.pricing = 1
    elif op is E.charge:
        user, amount, _, _, _, use_allowance, key = args
        need.accounts.add((u, user))
        need.debits[(u, user)] = amount
        need.pricing = int(use_allowance)
        _key(need, u, user, key)
    elif op is E.release:
        user, rid, team = args
        owner = (u, user) if team is None else (t, team)
        need.accounts.add(owner)
        need.holds.add((*owner, rid))
    elif op is E.refund:
        tx, _, _, _, key = args
        need.refunds[tx] = key or ""
    elif op is E.sweep:
        need.sweep = True
    elif op is E.now:
        pass  # every document brings the clock
    elif op is E.page:
        need.pages[tuple(args)] = None
    elif op is E.list_lots:
        (user,) = args
        need.accounts.add((u, user))
        need.all_lots.add((u, user))
    elif op in (E.get_active_pricing, E.get_pricing_history, E.set_active_pricing):
        need.pricing = 2
        need.pricing_history = op is E.get_pricing_history
    elif op in (E.activate_pricing, E.cancel_pricing, E.get_pricing_config):
        need.pricing = 2
        need.pricing_versions.add(args[0])
    elif op in (E.get_user_plan, E.check_allowance):
        (user,) = args
        need.accounts.add((u, user))
        need.pricing = 1
    elif op is E.set_user_plan:
        user, _ = args
        need.accounts.add((u, user))
        need.pricing = 2
    elif op is E.increment_usage_window:
        user, _ = args
        need.accounts.add((u, user))
    elif op in (E.check_spend_cap, E.list_spend_caps, E.remove_spend_cap):
        user = args[0]
        need.accounts.add((u, user))
    elif op is E.set_spend_cap:
        need.accounts.add((u, args[0].user_id))
    elif op is E.create_team:
        pass
    elif op is E.add_team_member:
        need.accounts.add((t, args[0]))
    elif op is E.remove_team_member:
        need.accounts.add((t, args[0]))
        need.members.add((args[0], args[1]))
    elif op is E.add_team_credits:
        team, _, _, _, key = args
        need.accounts.add((t, team))
        _key(need, t, team, key)
    elif op is E.get_team_balance:
        need.accounts.add((t, args[0]))
        need.member_counts.add(args[0])
    elif op is E.get_team_members:
        need.accounts.add((t, args[0]))
        need.member_lists.add(args[0])
    elif op is E.deduct_team:
        team, user, amount, _, key = args
        need.accounts.add((t, team))
        need.members.add((team, user))
        need.debits[(t, team)] = amount
        _key(need, t, team, key)
    elif op is E.reserve_team:
        team, user, _, _, _, _, key = args
        need.accounts.add((t, team))
        need.members.add((team, user))
        _key(need, t, team, key)
    elif op is E.claim_top_up:
        user = args[0]
        need.accounts.add((u, user))
        need.pricing = 1  # the plan allowance counts toward what is available
        need.top_ups.add(user)
    elif op is E.finish_top_up:
        user, _, _, reference, _ = args
        need.accounts.add((u, user))
        need.top_ups.add(user)
        _key(need, u, user, reference)  # the grant's key
    else:  # pragma: no cover - every engine operation is listed above
        raise AssertionError(f"no prefetch plan for {op!r}")
    return need


def _key(need: Need, kind: str, account: str, key: str | None) -> None:
    if key is not None:
        need.keys.add((kind, account, key))


# -- what was read -------------------------------------------------------------------------------


@dataclass(slots=True)
class Data:
    """The rows a ``ducto_read`` document brought, as plain values, keyed like the `Need`."""

    now: datetime
    accounts: dict[tuple[str, str], Any] = field(default_factory=dict)
    users: dict[str, Any] = field(default_factory=dict)
    """A user's caps, this window's spend and this month's allowance used (False: not read,
    because the account's caps count was 0 or it had no plan)."""
    keys: dict[tuple[str, str, str], dict[str, tuple[str, Any, str]]] = field(default_factory=dict)
    """Stored results by key and operation: fingerprint, result, when written (as text)."""
    holds: dict[tuple[str, str, str], Any] = field(default_factory=dict)
    debits: dict[tuple[str, str], tuple[int, Any, Any, bool, bool]] = field(default_factory=dict)
    """Lots for a debit: the amount asked for, the unexpired and the expired lots in their
    draw orders, and whether each list may have left lots out."""
    all_lots: dict[tuple[str, str], Any] = field(default_factory=dict)
    members: dict[tuple[str, str], Any] = field(default_factory=dict)
    member_lists: dict[str, Any] = field(default_factory=dict)
    member_counts: dict[str, int] = field(default_factory=dict)
    pricing: E.PricingState | None = None
    """The pointer and the scheduled versions (None: not read)."""
    last_version: int | None = None
    versions: dict[int, Any] = field(default_factory=dict)
    history: list[Any] | None = None
    debit_rows: dict[str, Any] = field(default_factory=dict)
    archived: set[str] = field(default_factory=set)
    """Ledger rows asked for as `debit_rows`, missing, and archived."""
    pages: dict[tuple[Any, ...], list[Any]] = field(default_factory=dict)
    sweep: list[Any] | None = None
    top_ups: dict[str, tuple[Any, int]] = field(default_factory=dict)
    """A user's top-up claim row (or None) and this month's top-up total."""

    def read(self, need: Need, doc: dict[str, Any]) -> None:
        """Add what a ``ducto_read`` document for `need` brought (missing rows as None)."""
        accounts = self.accounts
        users = self.users
        keys = self.keys
        holds = self.holds
        for key in need.accounts:
            accounts[key] = None
        for row in doc.get("accounts") or ():
            kind, account = key = (row[0], row[1])
            # balance ... caps, holds due, lots due, then holds by model and holds in the
            # scopes caps name (both read with caps)
            accounts[key] = [*row[2:11], False, False]
            if kind == E.USER:
                users[account] = [None, False, False]  # caps, window spend, allowance used
        for account, caps, spend, by_model, by_scope in doc.get("caps") or ():
            users[account][0:2] = caps, spend or []
            row = accounts[(E.USER, account)]
            row[9] = by_model or {}
            row[10] = by_scope or []
        for account, used in doc.get("allowance") or ():
            users[account][2] = used or 0
        for kind, account, live, expired in doc.get("debits") or ():
            key = (kind, account)
            amount = need.debits[key]
            live = live or []
            if expired is None:  # nothing unswept: only the lots lapsing now
                row = accounts.get(key)
                expired = sorted(
                    ([i, seq, left, at] for i, left, seq, at in (row and row[8]) or ()),
                    key=lambda lot: (timestamp(lot[3]), lot[1]),
                )
                partial = False
            else:
                partial = sum(lot[2] for lot in expired) >= amount
            self.debits[key] = (
                amount,
                live,
                expired,
                sum(lot[2] for lot in live) >= amount,
                partial,
            )
        for key3 in need.keys:
            keys[key3] = {}
        for kind, account, name, op, fingerprint, result, written in doc.get("keys") or ():
            keys.setdefault((kind, account, name), {})[op] = (fingerprint, result, written)
        for hold_key in need.holds:
            holds[hold_key] = None
        for row in doc.get("holds") or ():
            holds[(row[0], row[1], row[2])] = row[3:]
        for kind, account, lots in doc.get("all_lots") or ():
            self.all_lots[(kind, account)] = lots or []
        for team, user, membership, spent, held in doc.get("members") or ():
            self.members[(team, user)] = (membership, spent, held)
        for team, rows in doc.get("member_lists") or ():
            self.member_lists[team] = rows or []
        for team, count in doc.get("member_counts") or ():
            self.member_counts[team] = count
        pricing = doc.get("pricing")
        if pricing is not None:
            pointer, last, scheduled = pricing
            self.pricing = E.PricingState(
                None if pointer is None else int(pointer[0]),
                None if pointer is None else timestamp(pointer[1]),
                [(timestamp(at), version) for at, version in scheduled or ()],
            )
            self.last_version = last
        for version in need.pricing_versions:
            self.versions[version] = None
        for row in doc.get("versions") or ():
            self.versions[row[0]] = row
        if doc.get("history") is not None:
            self.history = doc.get("history")
        for tx in need.refunds:
            self.debit_rows[tx] = None
        for row in doc.get("debit_rows") or ():
            self.debit_rows[row[0]] = row[1:]
            refund_key = need.refunds.get(row[0])
            if refund_key:  # the refund's key, on the account the row names
                keys[(row[1], row[2], refund_key)] = {
                    e[0]: (e[1], e[2], e[3]) for e in row[11] or ()
                }
        self.archived.update(doc.get("archived") or ())
        for page, rows in zip(need.pages, doc.get("pages") or (), strict=False):
            self.pages[page] = rows
        if doc.get("sweep") is not None:
            self.sweep = doc.get("sweep")
        for user, claim, total in doc.get("top_ups") or ():
            self.top_ups[user] = (claim, total or 0)


def parse(need: Need, text: bytes) -> Data:
    """A ``ducto_read`` document as new `Data`."""
    doc = json.loads(text)
    data = Data(now=timestamp(doc["now"]))
    data.read(need, doc)
    return data


# -- what was written ----------------------------------------------------------------------------


class Writes:
    """What a batch's operations wrote, gathered per table into one ``ducto_write`` document."""

    __slots__ = (
        "accounts",
        "cancel",
        "caps",
        "caps_removed",
        "holds",
        "holds_new",
        "keys",
        "ledger",
        "lots",
        "lots_new",
        "members",
        "members_removed",
        "pointer",
        "pricing",
        "refunds",
        "top_up_claims",
        "totals",
    )

    def __init__(self) -> None:
        self.accounts: dict[tuple[str, str], tuple[bool, list[Any]]] = {}
        self.holds_new: list[list[Any]] = []
        self.holds: dict[str, int | None] = {}
        self.lots_new: list[list[Any]] = []
        self.lots: dict[str, list[Any]] = {}
        self.ledger: list[list[Any]] = []
        self.refunds: dict[str, list[Any]] = {}
        self.keys: list[list[Any]] = []
        self.totals: dict[tuple[Any, ...], int] = {}
        self.caps: dict[tuple[str, str, str, str], list[Any] | None] = {}
        self.caps_removed: list[list[Any]] = []
        self.members: dict[tuple[str, str], list[Any] | None] = {}
        self.members_removed: list[list[Any]] = []
        self.pricing: list[list[Any]] = []
        self.pointer: list[Any] | None = None
        self.cancel: list[list[Any]] = []
        self.top_up_claims: dict[str, list[Any] | None] = {}

    def hold(self, hold_id: str, state: int | None) -> None:
        """Mark a hold no longer counted, and closed in `state` when given."""
        if state is None:
            self.holds.setdefault(hold_id, None)
        else:
            self.holds[hold_id] = state

    def lot(self, lot_id: str, remaining: int | None = None, expired: bool | None = None) -> None:
        """Set a lot's remainder and/or its expired flag."""
        entry = self.lots.setdefault(lot_id, [lot_id, None, None])
        if remaining is not None:
            entry[1] = remaining
        if expired is not None:
            entry[2] = expired

    def add(self, table: str, key: tuple[Any, ...], delta: int) -> None:
        """Add `delta` to a running total (``model``, ``scope``, ``spend``, ...)."""
        full = (table, *key)
        self.totals[full] = self.totals.get(full, 0) + delta

    def document(self) -> dict[str, Any]:
        """The ``ducto_write`` document: one list of rows per table written."""
        doc: dict[str, Any] = {}
        new = [v for exists, v in self.accounts.values() if not exists]
        old = [v for exists, v in self.accounts.values() if exists]
        if new:
            doc["accounts_new"] = new
        if old:
            doc["accounts"] = old
        if self.holds_new:
            doc["holds_new"] = self.holds_new
        if self.holds:
            doc["holds"] = list(self.holds.items())
        if self.lots_new:
            doc["lots_new"] = self.lots_new
        if self.lots:
            doc["lots"] = list(self.lots.values())
        if self.ledger:
            doc["ledger"] = self.ledger
        if self.refunds:
            doc["refunds"] = list(self.refunds.values())
        if self.keys:
            doc["keys"] = self.keys
        for (table, *key), delta in self.totals.items():
            # A top-up total is written even back at zero, as a window counter that was
            # counted (`prune` counts it).
            if delta or table == "top_up":
                doc.setdefault(table, []).append([*key, delta])
        removed_caps = [[*k] for k, v in self.caps.items() if v is None]
        if removed_caps:
            doc["caps_removed"] = removed_caps
        caps = [v for v in self.caps.values() if v is not None]
        if caps:
            doc["caps"] = caps
        removed = [[*k] for k, v in self.members.items() if v is None]
        if removed:
            doc["members_removed"] = removed
        members = [v for v in self.members.values() if v is not None]
        if members:
            doc["members"] = members
        if self.pricing:
            doc["pricing"] = self.pricing
        if self.cancel:
            doc["cancel"] = self.cancel
        if self.pointer is not None:
            doc["pointer"] = self.pointer
        if self.top_up_claims:
            doc["top_up_claims"] = [[user, claim] for user, claim in self.top_up_claims.items()]
        return doc


# -- the snapshot --------------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class _Account(E.Account):
    caps: int = 0
    exists: bool = False


@dataclass(slots=True, eq=False)
class _Lot(L.Lot):
    owner: tuple[str, str] = ("", "")


def _live_order(lot: L.Lot) -> tuple[datetime, int]:
    return (_NEVER if lot.expires_at is None else lot.expires_at, lot.seq)


def _expired_order(lot: L.Lot) -> tuple[datetime, int]:
    assert lot.expires_at is not None
    return (lot.expires_at, lot.seq)


class Snapshot:
    """
    The engine's `Storage` over one batch's `Data`, shared by the batch's operations.

    Reads see the batch's earlier writes; every write is also recorded in `out`.

    Args:
        data: What the batch read.
        ids: The store's id source.
        configs: Parsed pricing configs by version (versions never change once written).
        retention: The store's retention settings.
    """

    def __init__(
        self,
        data: Data,
        ids: L.IdSource,
        configs: dict[int, PricingConfigData],
        retention: R.Retention,
    ) -> None:
        self.data = data
        self._ids = ids
        self._configs = configs
        self._retention = retention
        self.out = Writes()
        self._now = data.now
        self._month = L.month_key(data.now)
        self._accounts: dict[tuple[str, str], _Account] = {}
        self._dirty: dict[tuple[str, str], _Account] = {}
        self._held: dict[tuple[str, str], dict[str, int]] = {}
        self._held_unread: set[tuple[str, str]] = set()
        # Counted holds in a scope by (model or "", scope), and the scopes read (None: all,
        # for an account made in this batch); built when first asked for.
        self._held_scoped: dict[tuple[str, str], dict[tuple[str, str], int]] = {}
        self._held_scopes: dict[tuple[str, str], frozenset[str] | None] = {}
        self._member_held: dict[tuple[str, str], int] = {}
        self._caps: dict[str, dict[tuple[str, str | None, str | None], SpendCap]] = {}
        self._spend: dict[str, dict[tuple[str, int, str, str], int]] = {}
        self._spend_scopes: dict[str, frozenset[str]] = {}
        self._top_ups: dict[str, list[Any]] = {}
        self._pricing_state: E.PricingState | None = None
        self._last_version: int | None = None
        self._new_versions: dict[int, E.PricingVersion] = {}
        self._cancelled: dict[int, datetime] = {}
        self._allowance: dict[str, int] = {}
        self._lapsed: set[tuple[str, str, str]] = set()
        self._lapsed_ids: set[str] = set()
        self._holds: dict[tuple[str, str, str], E.Hold | None] = {}
        self._lots: dict[str, _Lot] = {}
        self._fetched: dict[tuple[tuple[str, str], int], tuple[list[_Lot], bool]] = {}
        self._extra_lots: dict[tuple[str, str], list[_Lot]] = {}
        self._lots_written: set[tuple[str, str]] = set()
        self._keys: dict[tuple[str, str, str], dict[str, tuple[str, Any, str]]] = {}
        self._debits: dict[str, E.Debit | None] = {}
        self._appended: dict[str, E.Debit] = {}
        self._ledger_written: set[tuple[str, str]] = set()
        self._members: dict[tuple[str, str], E.Member | None] = {}
        self._member_spend: dict[tuple[str, str], int] = {}
        self._memberships_written: set[str] = set()
        self._member_spend_written: set[str] = set()

    def finish(self) -> Writes:
        """Everything the batch wrote, each changed account once."""
        out = self.out
        for key, acct in self._dirty.items():
            out.accounts[key] = (
                acct.exists,
                [
                    acct.kind,
                    acct.id,
                    acct.balance,
                    acct.lifetime_purchased,
                    acct.reserved,
                    acct.expired_unswept,
                    acct.plan_id,
                    acct.name,
                    acct.caps,
                ],
            )
        self._dirty.clear()
        return out

    def now(self) -> datetime:
        return self._now

    def new_id(self, kind: str) -> str:
        return self._ids.next(kind)

    # -- accounts ----------------------------------------------------------------------------

    def account(self, kind: str, account_id: str) -> _Account | None:
        key = (kind, account_id)
        acct = self._accounts.get(key)
        if acct is not None:
            return acct
        try:
            row = self.data.accounts[key]
        except KeyError:
            raise Miss(Need(accounts={key})) from None
        if row is None:
            return None
        acct = _Account(
            kind,
            account_id,
            balance=row[0],
            lifetime_purchased=row[1],
            reserved=row[2],
            expired_unswept=row[3],
            plan_id=row[4],
            name=row[5],
            caps=row[6],
            exists=True,
        )
        if row[9] is False:
            self._held_unread.add(key)
        self._held[key] = dict(row[9] or {})
        self._accounts[key] = acct
        return acct

    def create(self, kind: str, account_id: str, now: datetime) -> _Account:
        acct = _Account(kind, account_id)
        key = (kind, account_id)
        self._accounts[key] = acct
        self._held[key] = {}
        self._held_scoped[key] = {}
        self._held_scopes[key] = None
        return acct

    def save(self, acct: E.Account) -> None:
        assert isinstance(acct, _Account)
        self._dirty[(acct.kind, acct.id)] = acct

    def lapse_holds(self, acct: E.Account, now: datetime) -> Sequence[E.Hold]:
        key = (acct.kind, acct.id)
        mark = ("h", *key)
        if mark in self._lapsed:
            return ()
        self._lapsed.add(mark)
        row = self.data.accounts.get(key)
        rows = row[7] if row is not None else None
        if not rows:
            return ()
        for hold_id, *_ in rows:
            self._lapsed_ids.add(hold_id)
            self.out.hold(hold_id, None)
            cached = self._holds.get((*key, hold_id))
            if cached is not None:
                cached.counted = False
        return [
            E.Hold(
                hold_id, amount, "", model, False, timestamp(expires), member=member, scope=scope
            )
            for hold_id, amount, model, member, expires, scope in rows
        ]

    def lapse_lots(self, acct: E.Account, now: datetime) -> Sequence[int]:
        key = (acct.kind, acct.id)
        mark = ("l", *key)
        if mark in self._lapsed:
            return ()
        self._lapsed.add(mark)
        row = self.data.accounts.get(key)
        rows = row[8] if row is not None else None
        if not rows:
            return ()
        for lot_id, *_ in rows:
            self.out.lot(lot_id, expired=True)
        return [row[1] for row in rows]

    # -- holds -------------------------------------------------------------------------------

    def hold(self, acct: E.Account, hold_id: str) -> E.Hold | None:
        key = (acct.kind, acct.id, hold_id)
        if key in self._holds:
            return self._holds[key]
        try:
            row = self.data.holds[key]
        except KeyError:
            raise Miss(Need(holds={key})) from None
        hold = None
        if row is not None:
            (amount, operation_type, model, use_allowance, expires, member, state, counted,
             scope) = row  # fmt: skip
            hold = E.Hold(
                hold_id,
                amount,
                operation_type,
                model,
                use_allowance,
                timestamp(expires),
                member=member,
                state=state,
                counted=counted and hold_id not in self._lapsed_ids,
                scope=scope,
            )
        self._holds[key] = hold
        return hold

    def add_hold(self, acct: E.Account, hold: E.Hold) -> None:
        self._holds[(acct.kind, acct.id, hold.id)] = hold
        self.out.holds_new.append(
            [
                hold.id,
                acct.kind,
                acct.id,
                hold.amount,
                hold.operation_type,
                hold.model,
                hold.use_allowance,
                hold.expires_at.isoformat(),
                hold.state,
                hold.counted,
                hold.member,
                hold.scope,
            ]
        )

    def close_hold(self, acct: E.Account, hold: E.Hold, state: int) -> None:
        self.out.hold(hold.id, state)
        hold.state = state

    def add_held(self, acct: E.Account, hold: E.Hold, delta: int) -> None:
        key = (acct.kind, acct.id)
        model = hold.model
        if model is not None:
            held = self._held.setdefault(key, {})
            held[model] = held.get(model, 0) + delta
            self.out.add("model", (*key, model), delta)
        scope = hold.scope
        if scope is not None:
            # A scope that was not read gets a wrong total here, but `held_for` defers
            # whoever asks for it.
            scoped = self._scoped_held(key)
            for name in (_ALL_MODELS, model) if model is not None else (_ALL_MODELS,):
                if scoped is not None:
                    scoped[(name, scope)] = scoped.get((name, scope), 0) + delta
                self.out.add("scope", (*key, name, scope), delta)
        if hold.member is not None:
            member_key = (acct.id, hold.member)
            self._member_held[member_key] = self.held_by_member(acct, hold.member) + delta
            self.out.add("member", (*key, hold.member), delta)

    def _scoped_held(self, key: tuple[str, str]) -> dict[tuple[str, str], int] | None:
        """The account's counted holds in the scopes read (None: none were read)."""
        scoped = self._held_scoped.get(key)
        if scoped is None:
            row = self.data.accounts.get(key)
            if row is None or row[10] is False:
                return None
            scoped = self._held_scoped[key] = {(m, s): n for m, s, n in row[10]}
            # Read for the scopes the account's caps named.
            caps = self.data.users[key[1]][0] or ()
            self._held_scopes[key] = frozenset(cap[4] for cap in caps if cap[4])
        return scoped

    def held_for(self, acct: E.Account, model: str | None, scope: str | None) -> int:
        key = (acct.kind, acct.id)
        if key in self._held_unread:
            raise Defer  # not read: the account had no caps when the batch read it
        if scope is None:
            assert model is not None
            return self._held.get(key, {}).get(model, 0)
        scoped = self._scoped_held(key)
        known = self._held_scopes.get(key)
        if scoped is None or (known is not None and scope not in known):
            raise Defer  # not read: no cap named the scope when the batch read it
        return scoped.get((model or _ALL_MODELS, scope), 0)

    def held_by_member(self, team: E.Account, user_id: str) -> int:
        key = (team.id, user_id)
        if key in self._member_held:
            return self._member_held[key]
        return int(self._member_row(key)[2] or 0)

    # -- lots --------------------------------------------------------------------------------

    def _lot_of(self, owner: tuple[str, str], row: Sequence[Any]) -> _Lot:
        lot = self._lots.get(row[0])
        if lot is None:
            lot = _Lot(row[0], row[1], row[2], _dt(row[3]), owner=owner)
            self._lots[lot.id] = lot
        return lot

    def _fetched_lots(self, acct: E.Account, which: int) -> tuple[list[_Lot], bool]:
        """The lots one of a debit's lists brought, and whether more may exist in the store."""
        key = (acct.kind, acct.id)
        found = self._fetched.get((key, which))
        if found is not None:
            return found
        fetched = self.data.debits.get(key)
        if fetched is None:
            raise Miss(Need(debits={key: max(1, acct.balance)}))
        rows, partial = (fetched[1], fetched[3]) if which == 0 else (fetched[2], fetched[4])
        lots = [self._lot_of(key, row) for row in rows]
        found = (lots, partial)
        self._fetched[(key, which)] = found
        return found

    def _draw_order(self, acct: E.Account, which: int) -> Iterator[L.Lot]:
        """
        Lots with credits for a draw, stored and made in this batch, in their order.

        The document brought the stored lots in order until they covered the requested
        amount; past the last of them (when it may have left some out) the order is not
        known here, so a draw that goes on raises `Miss` for more.
        """
        key = (acct.kind, acct.id)
        lots, partial = self._fetched_lots(acct, which)
        now = self._now
        order = _live_order if which == 0 else _expired_order
        extra = [
            lot
            for lot in self._extra_lots.get(key, ())
            if lot.remaining > 0 and (which == 1) == _expired(lot, now)
        ]
        if extra:
            known = {lot.id for lot in lots}
            merged = sorted([*lots, *(x for x in extra if x.id not in known)], key=order)
        else:
            merged = lots
        last = order(lots[-1]) if lots else None
        for lot in merged:
            if partial and (last is None or order(lot) > last):
                break
            if lot.remaining > 0:
                yield lot
        if partial:
            amount = self.data.debits[key][0]
            raise Miss(Need(debits={key: amount * 2 + 1}))

    def live_lots(self, acct: E.Account) -> Iterator[L.Lot]:
        return self._draw_order(acct, 0)

    def expired_lots(self, acct: E.Account) -> Iterator[L.Lot]:
        return self._draw_order(acct, 1)

    def lots_in_order(self, acct: E.Account) -> tuple[Sequence[L.Lot], Sequence[L.Lot]]:
        key = (acct.kind, acct.id)
        if key in self._lots_written:
            raise Defer
        try:
            rows = self.data.all_lots[key]
        except KeyError:
            raise Miss(Need(all_lots={key})) from None
        live: list[L.Lot] = []
        expired: list[L.Lot] = []
        for lot_id, seq, remaining, expires, gone in rows:
            (expired if gone else live).append(L.Lot(lot_id, seq, remaining, _dt(expires)))
        return live, expired

    def lots_drawn(self, acct: E.Account, draws: Sequence[tuple[L.Lot, int]]) -> None:
        self._lots_written.add((acct.kind, acct.id))
        for lot, _ in draws:
            self.out.lot(lot.id, remaining=lot.remaining)

    def add_lot(
        self, acct: E.Account, amount: int, expires_at: datetime | None, expired: bool
    ) -> None:
        key = (acct.kind, acct.id)
        lot = _Lot(self._ids.next("lot"), _NEW_SEQ + len(self._lots), amount, expires_at, key)
        self._lots[lot.id] = lot
        self._extra_lots.setdefault(key, []).append(lot)
        self._lots_written.add(key)
        self.out.lots_new.append([lot.id, acct.kind, acct.id, amount, _iso(expires_at), expired])

    def lot(self, acct: E.Account, lot_id: str) -> L.Lot:
        lot = self._lots.get(lot_id)
        if lot is not None:
            return lot
        for row in self.data.debit_rows.values():
            for found in (row or [None] * 10)[9] or ():
                if found[0] == lot_id:
                    return self._lot_of((acct.kind, acct.id), found)
        raise AssertionError(f"lot {lot_id!r} was not read")  # pragma: no cover

    def lot_refilled(self, acct: E.Account, lot: L.Lot, expired: bool) -> None:
        key = (acct.kind, acct.id)
        assert isinstance(lot, _Lot)
        self._lots_written.add(key)
        extra = self._extra_lots.setdefault(key, [])
        if lot not in extra:
            extra.append(lot)  # a lot drawn empty before may come back into the draw order
        self.out.lot(lot.id, remaining=lot.remaining, expired=expired)

    def sweep_due(self, now: datetime, consume: bool) -> list[tuple[str, str, L.Lot]]:
        if self.data.sweep is None:
            raise Miss(Need(sweep=True))
        return [
            (kind, account, self._lot_of((kind, account), (lot_id, seq, remaining, expires)))
            for kind, account, lot_id, seq, remaining, expires in self.data.sweep
        ]

    # -- ledger ------------------------------------------------------------------------------

    def append_row(
        self,
        acct: E.Account,
        amount: int,
        type_: str,
        metadata: dict[str, Any],
        now: datetime,
        *,
        reservation_id: str | None = None,
        idempotency_key: str | None = None,
        draws: tuple[tuple[str, int], ...] | None = None,
        spender: str | None = None,
        model: str | None = None,
        operation_type: str | None = None,
        allowance: int = 0,
        scope: str | None = None,
    ) -> str:
        row_id = self._ids.next("tx")
        self._ledger_written.add((acct.kind, acct.id))
        self.out.ledger.append(
            [
                row_id,
                acct.kind,
                acct.id,
                amount,
                type_,
                acct.balance,
                metadata,
                now.isoformat(),
                reservation_id,
                idempotency_key,
                draws,
                spender,
                model,
                operation_type,
                allowance,
                scope,
            ]
        )
        if type_ in L.REFUNDABLE_TYPES:
            self._appended[row_id] = E.Debit(
                row_id,
                acct.kind,
                acct.id,
                amount,
                type_,
                now,
                list(draws or ()),
                None,
                spender,
                model,
                scope,
            )
        return row_id

    def debit(self, transaction_id: str) -> E.Debit | None:
        if transaction_id in self._debits:
            return self._debits[transaction_id]
        found = self._appended.get(transaction_id)
        if found is None:
            try:
                row = self.data.debit_rows[transaction_id]
            except KeyError:
                raise Miss(Need(refunds={transaction_id: ""})) from None
            if row is not None:
                kind, account, amount, type_, created, draws, refunds, spender, model = row[:9]
                found = E.Debit(
                    transaction_id,
                    kind,
                    account,
                    amount,
                    type_,
                    timestamp(created),
                    [(str(d[0]), int(d[1])) for d in draws or ()],
                    list(refunds) if refunds else None,
                    spender,
                    model,
                    row[11],  # the scope, after the lots drawn and the key's results
                )
        self._debits[transaction_id] = found
        return found

    def set_refunds(self, debit: E.Debit, refunds: list[int]) -> None:
        debit.refunds = refunds
        self._ledger_written.add((debit.kind, debit.account))
        self.out.refunds[debit.id] = [debit.id, refunds[0], refunds]

    def page(
        self,
        kind: str,
        account_id: str,
        limit: int,
        before: int | None,
        types: frozenset[str] | None,
        start: datetime | None,
        end: datetime | None,
    ) -> tuple[list[E.StoredRow], bool]:
        if (kind, account_id) in self._ledger_written:
            raise Defer
        wanted = (kind, account_id, limit, before, types, start, end)
        rows = self.data.pages.get(wanted)
        if rows is None:
            raise Miss(Need(pages={wanted: None}))
        # Columns in StoredRow's order; created_at (the ninth) arrives as text.
        page = [E.StoredRow._make((*row[:8], timestamp(row[8]), *row[9:])) for row in rows[:limit]]
        return page, len(rows) > limit

    def spend_events(self, start: datetime, end: datetime) -> list[L.SpendEvent]:
        raise AssertionError("PostgresStore computes analytics in SQL")  # pragma: no cover

    # -- growth: retention and archiving -----------------------------------------------------

    @property
    def retention(self) -> R.Retention:
        return self._retention

    def prune(self, kind: R.PruneKind, cutoff: datetime, limit: int, dry_run: bool) -> int:
        raise AssertionError("PostgresStore prunes in SQL")  # pragma: no cover

    def archive_candidates(self, before: datetime, after: int, limit: int) -> list[E.StoredRow]:
        raise AssertionError("PostgresStore archives in SQL")  # pragma: no cover

    def archive(
        self,
        rows: Sequence[E.StoredRow],
        totals: Mapping[R.RollupKey, list[int]],
        before: datetime,
    ) -> None:
        raise AssertionError("PostgresStore archives in SQL")  # pragma: no cover

    def archived(self, transaction_id: str) -> bool:
        # Asked only after `debit` found no row, which read the archived ids along with it.
        if transaction_id not in self.data.debit_rows:
            raise Miss(Need(refunds={transaction_id: ""}))
        return transaction_id in self.data.archived

    def archived_before(self) -> datetime | None:
        raise AssertionError("PostgresStore computes analytics in SQL")  # pragma: no cover

    # -- idempotency -------------------------------------------------------------------------

    def _entries(self, acct: E.Account, key: str) -> dict[str, tuple[str, Any, str]]:
        full = (acct.kind, acct.id, key)
        entries = self._keys.get(full)
        if entries is not None:
            return entries
        try:
            entries = dict(self.data.keys[full])
        except KeyError:
            raise Miss(Need(keys={full})) from None
        self._keys[full] = entries
        return entries

    def recall(
        self,
        acct: E.Account,
        op: str,
        key: str,
        fingerprint: tuple[object, ...],
        result_type: type[T],
        since: datetime | None,
    ) -> tuple[bool, T | None]:
        assert isinstance(acct, _Account)
        if not acct.exists and (acct.kind, acct.id, key) not in self._keys:
            return False, None
        entry = self._entries(acct, key).get(op)
        if entry is None or (since is not None and timestamp(entry[2]) < since):
            return False, None
        if entry[0] != L.fingerprint(*fingerprint):
            return True, None
        result = result_type.model_validate(entry[1])  # type: ignore[attr-defined]
        result.idempotent = True
        return True, result

    def remember(
        self, acct: E.Account, op: str, key: str, fingerprint: tuple[object, ...], result: Any
    ) -> None:
        assert isinstance(acct, _Account)
        text = L.fingerprint(*fingerprint)
        # A JSON object in the document (stored as its text), not a string to escape twice.
        dumped = result.model_dump(mode="json")
        full = (acct.kind, acct.id, key)
        entries = self._keys.get(full)
        if entries is None:
            entries = self._entries(acct, key) if acct.exists else {}
            self._keys[full] = entries
        # Stamped with the batch's now; it replaces a record past retention.
        written = self._now.isoformat()
        entries[op] = (text, dumped, written)
        self.out.keys.append([acct.kind, acct.id, op, key, text, dumped, written])

    # -- plans and allowance -----------------------------------------------------------------

    def _config(self, version: int) -> PricingConfigData:
        config = self._configs.get(version)
        if config is None:
            added = self._new_versions.get(version)
            if added is not None:
                return added.config
            row = self.data.versions.get(version)
            if row is None:
                raise Miss(Need(pricing_versions={version}))
            config = self._configs[version] = PricingConfigData.model_validate_json(row[2])
        return config

    def plan(self, plan_id: str, version: int | None) -> PlanDefinition | None:
        if version is None:
            return None
        return (self._config(version).plans or {}).get(plan_id)

    def _user_row(self, user_id: str) -> Any:
        """A user's caps, window spend and allowance used, as the account's row brought."""
        row = self.data.users.get(user_id)
        if row is not None:
            return row
        key = (E.USER, user_id)
        if key not in self.data.accounts:
            raise Miss(Need(accounts={key}))
        return _NO_USER  # no account: no caps, no spend, no allowance used

    def allowance_used(self, acct: E.Account, month: int) -> int:
        if month != self._month:
            raise AssertionError("only this month's allowance is read")  # pragma: no cover
        used = self._allowance.get(acct.id)
        if used is None:
            stored = self._user_row(acct.id)[2]
            if stored is False:
                raise Defer  # not read: the account had no plan when the batch read it
            used = self._allowance[acct.id] = int(stored or 0)
        return used

    def use_allowance(self, acct: E.Account, month: int, amount: int) -> None:
        if month == self._month:
            if acct.id in self._allowance:
                self._allowance[acct.id] += amount
            elif self._user_row(acct.id)[2] is not False:
                self._allowance[acct.id] = self.allowance_used(acct, month) + amount
        self.out.add("allowance", (acct.id, month), amount)

    # -- caps and spend windows --------------------------------------------------------------

    def _cap_table(self, user_id: str) -> dict[tuple[str, str | None, str | None], SpendCap]:
        caps = self._caps.get(user_id)
        if caps is None:
            caps = self._caps[user_id] = {
                (cap_type, model or None, scope or None): SpendCap(
                    user_id=user_id,
                    cap_type=cap_type,
                    model=model or None,
                    limit=limit,
                    action=action,
                    scope=scope or None,
                )
                for cap_type, model, limit, action, scope in self._user_row(user_id)[0] or ()
            }
        return caps

    def caps(self, acct: E.Account) -> Sequence[SpendCap]:
        assert isinstance(acct, _Account)
        if not acct.caps:
            return ()
        return list(self._cap_table(acct.id).values())

    def put_cap(self, acct: E.Account, cap: SpendCap) -> None:
        assert isinstance(acct, _Account)
        caps = self._cap_table(acct.id)
        caps[(cap.cap_type, cap.model, cap.scope)] = cap
        acct.caps = len(caps)
        model = cap.model or _ALL_MODELS
        scope = cap.scope or _NO_SCOPE
        self.out.caps[(acct.id, cap.cap_type, model, scope)] = [
            acct.id,
            cap.cap_type,
            model,
            cap.limit,
            cap.action,
            scope,
        ]

    def remove_cap(
        self, acct: E.Account, cap_type: str, model: str | None, scope: str | None
    ) -> bool:
        assert isinstance(acct, _Account)
        caps = self._cap_table(acct.id)
        removed = caps.pop((cap_type, model, scope), None) is not None
        acct.caps = len(caps)
        if removed:
            key = (acct.id, cap_type, model or _ALL_MODELS, scope or _NO_SCOPE)
            self.out.caps[key] = None
        return removed

    def _spend_table(self, user_id: str) -> dict[tuple[str, int, str, str], int] | None:
        """The user's spend in the current windows (None: not read, as it had no caps)."""
        spend = self._spend.get(user_id)
        if spend is None:
            rows = self._user_row(user_id)[1]
            if rows is False:
                return None
            spend = self._spend[user_id] = {
                (kind, period, name, scope): amount
                for kind, period, name, scope, amount in rows or ()
            }
        return spend

    def _spend_read(self, user_id: str, scope: str) -> bool:
        """Whether the user's spend in `scope` was read (it is for the scopes caps named)."""
        scopes = self._spend_scopes.get(user_id)
        if scopes is None:
            caps = self._user_row(user_id)[0] or ()
            scopes = self._spend_scopes[user_id] = frozenset(cap[4] for cap in caps if cap[4])
        return scope in scopes

    def window_spend(
        self, user_id: str, cap_type: str, window: int, model: str | None, scope: str | None
    ) -> int:
        if window != L.cap_window_key(cap_type, self._now):
            raise AssertionError("only the current windows are read")  # pragma: no cover
        spend = self._spend_table(user_id)
        if spend is None or (scope is not None and not self._spend_read(user_id, scope)):
            raise Defer  # a cap set earlier in the batch: read the spend after its writes
        return spend.get((cap_type, window, model or _ALL_MODELS, scope or _NO_SCOPE), 0)

    def add_spend(
        self, user_id: str, model: str | None, scope: str | None, at: datetime, amount: int
    ) -> None:
        models = (_ALL_MODELS, model) if model is not None else (_ALL_MODELS,)
        scopes = (_NO_SCOPE, scope) if scope is not None else (_NO_SCOPE,)
        rows = [
            (user_id, cap_type, L.cap_window_key(cap_type, at), name, part)
            for cap_type in ("daily", "monthly")
            for part in scopes
            for name in models
        ]
        spend = self._spend_table(user_id) if user_id in self.data.users else None
        if spend is not None:
            # Keep the windows later reads see current (a scope that was not read gets a
            # wrong total here, but `window_spend` defers whoever asks for it).
            for _, cap_type, period, name, part in rows:
                key = (cap_type, period, name, part)
                spend[key] = spend.get(key, 0) + amount
        for row in rows:
            self.out.add("spend", row, amount)

    # -- auto top-up -------------------------------------------------------------------------

    def _top_up(self, acct: E.Account) -> list[Any]:
        """The user's ``[claim, this month's total]``, as read and written in this batch."""
        entry = self._top_ups.get(acct.id)
        if entry is None:
            try:
                row, total = self.data.top_ups[acct.id]
            except KeyError:
                raise Miss(Need(top_ups={acct.id})) from None
            claim = None
            if row is not None:
                claim = E.TopUpClaim(row[0], row[1], row[2], timestamp(row[3]))
            entry = self._top_ups[acct.id] = [claim, total]
        return entry

    def top_up_claim(self, acct: E.Account) -> E.TopUpClaim | None:
        claim: E.TopUpClaim | None = self._top_up(acct)[0]
        return claim

    def put_top_up_claim(self, acct: E.Account, claim: E.TopUpClaim | None) -> None:
        self._top_up(acct)[0] = claim
        self.out.top_up_claims[acct.id] = (
            None
            if claim is None
            else [claim.id, claim.amount, claim.month, claim.expires_at.isoformat()]
        )

    def top_up_total(self, acct: E.Account, month: int) -> int:
        if month != self._month:
            raise AssertionError("only this month's top-ups are read")  # pragma: no cover
        return int(self._top_up(acct)[1])

    def add_top_up_total(self, acct: E.Account, month: int, delta: int) -> None:
        if month == self._month:
            self._top_up(acct)[1] += delta
        self.out.add("top_up", (acct.id, month), delta)

    # -- teams -------------------------------------------------------------------------------

    def _member_row(self, key: tuple[str, str]) -> Any:
        try:
            return self.data.members[key]
        except KeyError:
            raise Miss(Need(members={key})) from None

    def member(self, team: E.Account, user_id: str) -> E.Member | None:
        key = (team.id, user_id)
        if key in self._members:
            return self._members[key]
        row = self._member_row(key)[0]
        member = None if row is None else E.Member(row[0], row[1])
        self._members[key] = member
        return member

    def put_member(self, team: E.Account, user_id: str, member: E.Member) -> None:
        self._members[(team.id, user_id)] = member
        self._memberships_written.add(team.id)
        self.out.members[(team.id, user_id)] = [team.id, user_id, member.role, member.spend_cap]

    def remove_member(self, team: E.Account, user_id: str) -> bool:
        existed = self.member(team, user_id) is not None
        self._members[(team.id, user_id)] = None
        self._memberships_written.add(team.id)
        self.out.members[(team.id, user_id)] = None
        return existed

    def members(self, team: E.Account, month: int) -> list[TeamMember]:
        if team.id in self._memberships_written or team.id in self._member_spend_written:
            raise Defer
        try:
            rows = self.data.member_lists[team.id]
        except KeyError:
            raise Miss(Need(member_lists={team.id})) from None
        return [
            TeamMember(user_id=user_id, role=role, spend_cap=cap, total_spent=spent or 0)
            for user_id, role, cap, spent in rows
        ]

    def member_count(self, team: E.Account) -> int:
        if team.id in self._memberships_written:
            raise Defer
        try:
            return self.data.member_counts[team.id]
        except KeyError:
            raise Miss(Need(member_counts={team.id})) from None

    def member_spend(self, team: E.Account, user_id: str, month: int) -> int:
        key = (team.id, user_id)
        spent = self._member_spend.get(key)
        if spent is None:
            spent = self._member_spend[key] = int(self._member_row(key)[1] or 0)
        return spent

    def add_member_spend(self, team: E.Account, user_id: str, month: int, amount: int) -> None:
        key = (team.id, user_id)
        self._member_spend_written.add(team.id)
        if month == self._month and (key in self._member_spend or key in self.data.members):
            self._member_spend[key] = self.member_spend(team, user_id, month) + amount
        self.out.add("member_spend", (team.id, user_id, month), amount)

    # -- pricing -----------------------------------------------------------------------------

    def pricing_state(self) -> E.PricingState:
        state = self._pricing_state
        if state is None:
            state = self.data.pricing
            if state is None:
                raise Miss(Need(pricing=2))
        return state

    def set_pricing_pointer(self, version: int, at: datetime) -> None:
        scheduled = [(when, v) for when, v in self.pricing_state().scheduled if when > at]
        self._pricing_state = E.PricingState(version, at, scheduled)
        self.out.pointer = [version, at.isoformat()]

    def cancel_pricing(self, version: int, at: datetime) -> None:
        state = self.pricing_state()
        scheduled = [(when, v) for when, v in state.scheduled if v != version]
        self._pricing_state = state._replace(scheduled=scheduled)
        self._cancelled[version] = at
        self.out.cancel.append([version, at.isoformat()])

    def _version(self, row: Sequence[Any]) -> E.PricingVersion:
        version, pricing_id, _, label, created, effective, cancelled = row
        if version not in self._configs:
            self._configs[version] = PricingConfigData.model_validate_json(row[2])
        return E.PricingVersion(
            version,
            pricing_id,
            self._configs[version],
            label,
            timestamp(created),
            timestamp(effective),
            self._cancelled.get(version) or _dt(cancelled),
        )

    def pricing(self, version: int) -> E.PricingVersion | None:
        added = self._new_versions.get(version)
        if added is not None:
            at = self._cancelled.get(version)
            return added if at is None else added._replace(cancelled_at=at)
        if version not in self.data.versions:
            raise Miss(Need(pricing_versions={version}))
        row = self.data.versions[version]
        return None if row is None else self._version(row)

    def pricing_history(self) -> list[E.PricingVersion]:
        if self.data.history is None:
            raise Miss(Need(pricing_history=True))
        added = sorted(self._new_versions, reverse=True)
        return [
            *(item for v in added if (item := self.pricing(v)) is not None),
            *(self._version(row) for row in self.data.history),
        ]

    def add_pricing(self, item: E.PricingVersion) -> None:
        # Kept in this batch only: the store's parsed configs take versions once committed.
        state = self.pricing_state()
        self._new_versions[item.version] = item
        self._last_version = item.version
        if state.pointer_at is None or item.effective_at > state.pointer_at:
            scheduled = [*state.scheduled, (item.effective_at, item.version)]
            self._pricing_state = state._replace(scheduled=scheduled)
        self.out.pricing.append(
            [
                item.version,
                item.id,
                item.config.model_dump_json(),
                item.label,
                item.created_at.isoformat(),
                item.effective_at.isoformat(),
            ]
        )

    def last_pricing_version(self) -> int:
        if self._last_version is not None:
            return self._last_version
        self.pricing_state()  # read with it
        assert self.data.last_version is not None
        return self.data.last_version


_NO_USER: Final[tuple[None, bool, int]] = (None, False, 0)
"""A user without an account: no caps, no allowance used, and window spend unread (spend may
be stored without an account; only a cap set in the same batch asks for it, and defers)."""


def _expired(lot: L.Lot, now: datetime) -> bool:
    return lot.expires_at is not None and lot.expires_at <= now
