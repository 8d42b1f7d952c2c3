"""
The engine's `Storage` for `PostgresStore`: a snapshot read in one round trip, writes recorded.

An operation on Postgres runs in one short transaction. Its first round trip sends, in one
pipeline: ``BEGIN``; the account rows it changes, created if missing and locked in a fixed order
(teams before users); then one *bundle* query that reads, after the lock, everything the
operation's arguments say it may read (the `Need`): the accounts, their holds and lots due to
lapse, the hold and idempotency keys it names, the lots a debit of the requested amount can
reach, caps and their window spend, the plan allowance, team membership. The engine then runs
the operation synchronously on a `Snapshot` of those rows, which records every write as a
statement; the second round trip sends the writes and ``COMMIT``.

When the operation reads something the bundle did not bring (rare: a replayed key that names an
earlier hold, a pricing version this process has not parsed yet, a sweep's accounts), the
snapshot raises `Miss`; the store fetches it inside the same transaction and runs the operation
again from the start. Nothing was sent: writes are only recorded until the end.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any, Final, TypeVar

from ducto.interface import _engine as E
from ducto.interface import _ledger as L
from ducto.interface.models import PlanDefinition, PricingConfigData, SpendCap, TeamMember

T = TypeVar("T")
Statement = tuple[str, tuple[Any, ...]]

_ALL_MODELS: Final = ""
# The UTC day (as `datetime.toordinal`) and month (`_ledger.month_key`) of the instant `n.t`.
_DAY: Final = "((n.t AT TIME ZONE 'UTC')::date - date '0001-01-01' + 1)"
_MONTH: Final = (
    "(extract(year FROM n.t AT TIME ZONE 'UTC')::int * 12"
    " + extract(month FROM n.t AT TIME ZONE 'UTC')::int - 1)"
)


def _totals(table: str, columns: str, types: Sequence[str]) -> tuple[str, Sequence[str]]:
    names = ", ".join(f"%s::{t}[]" for t in types)
    return (
        f"INSERT INTO {table} ({columns}, amount) SELECT * FROM unnest({names})"
        f" ON CONFLICT ({columns}) DO UPDATE SET amount = {table}.amount + excluded.amount",
        types,
    )


_TOTALS: Final = {
    "model": _totals("reserved_by_model", "kind, account, model", ("text",) * 3 + ("bigint",)),
    "member": _totals("reserved_by_member", "kind, account, member", ("text",) * 3 + ("bigint",)),
    "spend": _totals(
        "spend", "user_id, cap_type, period, model", ("text", "text", "int", "text", "bigint")
    ),
    "member_spend": _totals(
        "member_spend", "team_id, user_id, month", ("text", "text", "int", "bigint")
    ),
    "allowance": _totals("allowance_used", "user_id, month", ("text", "int", "bigint")),
}
"""Running totals an operation adds to: the upsert of each, and its columns' types."""


def _add(table: dict[tuple[Any, ...], int], key: tuple[Any, ...], delta: int) -> None:
    table[key] = table.get(key, 0) + delta


def _element(value: Any) -> str:
    if value is None:
        return "NULL"
    kind = type(value)
    if kind is str:
        text: str = value
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if kind is bool:
        return "t" if value else "f"
    if kind is int:
        return str(value)
    if isinstance(value, datetime):
        return '"' + value.isoformat() + '"'
    if isinstance(value, str | int):  # subclasses, as their plain values
        return _element(str.__str__(value) if isinstance(value, str) else int(value))
    raise TypeError(f"cannot send {kind.__name__} in an array")  # pragma: no cover


def arr(values: Iterable[Any]) -> str:
    """
    `values` as an array literal, sent as text and cast in the SQL (``%s::bigint[]``).

    psycopg's list adaptation inspects every element in Python; a batch's columns are plain
    str, int, bool, datetime or None, so the literal is built directly. A NUL in a string
    is refused by the driver when the literal is sent, as for any text.
    """
    return "{" + ",".join(map(_element, values)) + "}"


class Miss(Exception):
    """The operation read something the bundle did not bring; `need` says what."""

    def __init__(self, need: Need) -> None:
        super().__init__("the snapshot lacks what the operation read")
        self.need = need


def _dt(value: str | None) -> datetime | None:
    """A timestamptz rendered by Postgres in JSON (session time zone UTC)."""
    if value is None:
        return None
    moment = datetime.fromisoformat(value)
    return moment if moment.tzinfo is UTC else moment.astimezone(UTC)


def _req_dt(value: str) -> datetime:
    moment = _dt(value)
    assert moment is not None
    return moment


@dataclass(slots=True)
class Need:
    """What one operation may read; every field adds fragments to the bundle query."""

    accounts: set[tuple[str, str]] = field(default_factory=set)
    user_data: set[str] = field(default_factory=set)
    keys: set[tuple[str, str, str]] = field(default_factory=set)
    holds: set[tuple[str, str, str]] = field(default_factory=set)
    debits: dict[tuple[str, str], int] = field(default_factory=dict)
    all_lots: set[tuple[str, str]] = field(default_factory=set)
    members: set[tuple[str, str]] = field(default_factory=set)
    member_lists: set[str] = field(default_factory=set)
    member_counts: set[str] = field(default_factory=set)
    pricing: bool = False
    pricing_versions: set[int] = field(default_factory=set)
    pricing_history: bool = False
    debit_rows: set[str] = field(default_factory=set)
    pages: set[tuple[Any, ...]] = field(default_factory=set)
    sweep: bool = False

    def merge(self, other: Need) -> None:
        """Add everything `other` needs."""
        self.accounts |= other.accounts
        self.user_data |= other.user_data
        self.keys |= other.keys
        self.holds |= other.holds
        for account, amount in other.debits.items():
            self.debits[account] = max(amount, self.debits.get(account, 0))
        self.all_lots |= other.all_lots
        self.members |= other.members
        self.member_lists |= other.member_lists
        self.member_counts |= other.member_counts
        self.pricing |= other.pricing
        self.pricing_versions |= other.pricing_versions
        self.pricing_history |= other.pricing_history
        self.debit_rows |= other.debit_rows
        self.pages |= other.pages
        self.sweep |= other.sweep


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
        need.user_data.add(user)
        need.pricing = True
    elif op is E.add_credits:
        user, amount, _, _, _, key = args
        need.accounts.add((u, user))
        _key(need, u, user, key)
        if amount < 0:
            need.debits[(u, user)] = -amount
    elif op is E.reserve:
        user, _, _, _, _, _, use_allowance, key = args
        need.accounts.add((u, user))
        need.user_data.add(user)
        need.pricing = use_allowance
        _key(need, u, user, key)
    elif op is E.deduct:
        user, rid, amount, key, _, team = args
        owner = (u, user) if team is None else (t, team)
        need.accounts.add(owner)
        need.holds.add((*owner, rid))
        need.debits[owner] = amount
        _key(need, *owner, key)
        if team is None:
            need.user_data.add(user)
            need.pricing = True
    elif op is E.charge:
        user, amount, _, _, _, use_allowance, key = args
        need.accounts.add((u, user))
        need.user_data.add(user)
        need.debits[(u, user)] = amount
        need.pricing = use_allowance
        _key(need, u, user, key)
    elif op is E.release:
        user, rid, team = args
        owner = (u, user) if team is None else (t, team)
        need.accounts.add(owner)
        need.holds.add((*owner, rid))
    elif op is E.refund:
        tx, _, _, _, key = args
        need.debit_rows.add(tx)
        need.pricing = False
        if key is not None:
            need.keys.add(("?", tx, key))  # resolved once the debit row names its account
    elif op is E.sweep:
        need.sweep = True
    elif op is E.page:
        need.pages.add(tuple(args))
    elif op is E.list_lots:
        (user,) = args
        need.accounts.add((u, user))
        need.all_lots.add((u, user))
    elif op in (E.get_active_pricing, E.get_pricing_history, E.set_active_pricing):
        need.pricing = True
        need.pricing_history = op is E.get_pricing_history
    elif op in (E.activate_pricing, E.get_pricing_config):
        need.pricing = True
        need.pricing_versions.add(args[0])
    elif op in (E.get_user_plan, E.check_allowance):
        (user,) = args
        need.accounts.add((u, user))
        need.user_data.add(user)
        need.pricing = True
    elif op is E.set_user_plan:
        user, _ = args
        need.accounts.add((u, user))
        need.pricing = True
    elif op is E.increment_usage_window:
        user, _ = args
        need.accounts.add((u, user))
    elif op in (E.check_spend_cap, E.list_spend_caps, E.remove_spend_cap):
        user = args[0]
        need.accounts.add((u, user))
        need.user_data.add(user)
    elif op is E.set_spend_cap:
        need.accounts.add((u, args[0].user_id))
        need.user_data.add(args[0].user_id)
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
    else:  # pragma: no cover - every engine operation is listed above
        raise AssertionError(f"no prefetch plan for {op!r}")
    return need


def _key(need: Need, kind: str, account: str, key: str | None) -> None:
    if key is not None:
        need.keys.add((kind, account, key))


class Bundle:
    """
    Builds the bundle query for a `Need` and reads its one row back into `Data`.

    Each kind of read is one fragment driven by arrays of keys, so the query's text depends
    only on which kinds of read a batch needs, not on how many operations it holds: the
    server and psycopg reuse its prepared plan.
    """

    def __init__(self, need: Need, now: datetime | None) -> None:
        self.need = need
        self._fragments: list[str] = []
        self._params: list[Any] = []
        self._readers: list[Any] = []
        self._now = now

    def _add(self, sql: str, params: Sequence[Any], reader: Any) -> None:
        self._fragments.append(sql)
        self._params.extend(params)
        self._readers.append(reader)

    def statement(self) -> Statement:
        """The bundle query: one row, one column per fragment, after the now column."""
        need = self.need
        if need.accounts:
            keys = sorted(need.accounts)
            self._add(
                "(SELECT json_agg(json_build_array(a.kind, a.id, a.balance,"
                " a.lifetime_purchased, a.reserved, a.expired_unswept, a.plan_id, a.name, a.caps,"
                " (SELECT json_agg(json_build_array(h.id, h.amount, h.model, h.member,"
                " h.expires_at)) FROM holds h WHERE h.kind = a.kind AND h.account = a.id AND"
                " h.counted AND h.expires_at <= n.t), (SELECT json_agg(json_build_array(l.id,"
                " l.remaining)) FROM lots l WHERE l.kind = a.kind AND l.account = a.id AND"
                " l.remaining > 0 AND NOT l.expired AND l.expires_at <= n.t), (SELECT"
                " json_object_agg(r.model, r.amount) FROM reserved_by_model r WHERE"
                " r.kind = a.kind AND r.account = a.id))) FROM unnest(%s::text[], %s::text[])"
                " AS k(kind, id) JOIN accounts a ON a.kind = k.kind AND a.id = k.id)",
                (arr(k for k, _ in keys), arr(i for _, i in keys)),
                partial(_read_accounts, keys),
            )
        if need.user_data:
            users = sorted(need.user_data)
            self._add(
                "(SELECT json_agg(json_build_array(u.id,"
                " (SELECT json_agg(json_build_array(c.cap_type, c.model, c.cap_limit, c.action))"
                " FROM caps c WHERE c.user_id = u.id),"
                " (SELECT json_agg(json_build_array(s.cap_type, s.period, s.model, s.amount))"
                f" FROM spend s WHERE s.user_id = u.id AND ((s.cap_type = 'daily' AND"
                f" s.period = {_DAY}) OR (s.cap_type = 'monthly' AND s.period = {_MONTH}))),"
                f" (SELECT w.amount FROM allowance_used w WHERE w.user_id = u.id AND"
                f" w.month = {_MONTH}))) FROM unnest(%s::text[]) AS u(id))",
                (arr(users),),
                partial(_read_rows, "users", users, lambda row: row[0], lambda row: row[1:]),
            )
        keys3 = sorted(k for k in need.keys if k[0] != "?")
        if keys3:
            self._add(
                "(SELECT json_agg(json_build_array(i.kind, i.account, i.key, i.op,"
                " i.fingerprint, i.result)) FROM unnest(%s::text[], %s::text[], %s::text[])"
                " AS k(kind, account, key) JOIN idempotency i ON i.kind = k.kind AND"
                " i.account = k.account AND i.key = k.key)",
                tuple(arr(k[n] for k in keys3) for n in range(3)),
                partial(_read_keys, keys3),
            )
        holds = sorted(need.holds)
        if holds:
            self._add(
                "(SELECT json_agg(json_build_array(h.kind, h.account, h.id, h.amount,"
                " h.operation_type, h.model, h.use_allowance, h.expires_at, h.member, h.state,"
                " h.counted)) FROM unnest(%s::text[], %s::text[], %s::text[])"
                " AS k(kind, account, id) JOIN holds h ON h.id = k.id AND h.kind = k.kind AND"
                " h.account = k.account)",
                tuple(arr(k[n] for k in holds) for n in range(3)),
                partial(_read_rows, "holds", holds, lambda row: tuple(row[:3]), lambda r: r[3:]),
            )
        debits = sorted(need.debits.items())
        if debits:
            # Unexpired lots, in burn-down order, until they cover the amount; then expired
            # ones (including those lapsing now), oldest expiry first, likewise.
            self._add(
                "(SELECT json_agg(json_build_array(k.kind, k.account, k.amount,"
                " (SELECT json_agg(json_build_array(id, seq, remaining, expires_at)"
                " ORDER BY coalesce(expires_at, 'infinity'), seq) FROM (SELECT id, seq,"
                " remaining, expires_at, sum(remaining) OVER (ORDER BY coalesce(expires_at,"
                " 'infinity'), seq) AS run FROM lots WHERE kind = k.kind AND account = k.account"
                " AND remaining > 0 AND NOT expired AND (expires_at IS NULL OR"
                " expires_at > n.t)) x WHERE run - remaining < k.amount),"
                " (SELECT json_agg(json_build_array(id, seq, remaining, expires_at)"
                " ORDER BY expires_at, seq) FROM (SELECT id, seq, remaining, expires_at,"
                " sum(remaining) OVER (ORDER BY expires_at, seq) AS run FROM lots"
                " WHERE kind = k.kind AND account = k.account AND remaining > 0 AND"
                " (expired OR expires_at <= n.t)) x WHERE run - remaining < k.amount)))"
                " FROM unnest(%s::text[], %s::text[], %s::bigint[]) AS k(kind, account, amount))",
                (
                    arr(d[0][0] for d in debits),
                    arr(d[0][1] for d in debits),
                    arr(d[1] for d in debits),
                ),
                _read_debits,
            )
        all_lots = sorted(need.all_lots)
        if all_lots:
            self._add(
                "(SELECT json_agg(json_build_array(k.kind, k.account, (SELECT"
                " json_agg(json_build_array(l.id, l.seq, l.remaining, l.expires_at,"
                " l.expired OR l.expires_at <= n.t) ORDER BY l.expired OR l.expires_at <= n.t,"
                " CASE WHEN l.expired OR l.expires_at <= n.t THEN l.expires_at"
                " ELSE coalesce(l.expires_at, 'infinity') END, l.seq) FROM lots l"
                " WHERE l.kind = k.kind AND l.account = k.account AND l.remaining > 0)))"
                " FROM unnest(%s::text[], %s::text[]) AS k(kind, account))",
                (arr(k for k, _ in all_lots), arr(a for _, a in all_lots)),
                partial(
                    _read_rows, "all_lots", all_lots, lambda r: tuple(r[:2]), lambda r: r[2] or []
                ),
            )
        members = sorted(need.members)
        if members:
            self._add(
                "(SELECT json_agg(json_build_array(k.team, k.uid,"
                " (SELECT json_build_array(m.role, m.spend_cap) FROM team_members m"
                " WHERE m.team_id = k.team AND m.user_id = k.uid),"
                " (SELECT s.amount FROM member_spend s WHERE s.team_id = k.team AND"
                f" s.user_id = k.uid AND s.month = {_MONTH}),"
                " (SELECT r.amount FROM reserved_by_member r WHERE r.kind = 't' AND"
                " r.account = k.team AND r.member = k.uid)))"
                " FROM unnest(%s::text[], %s::text[]) AS k(team, uid))",
                (arr(t for t, _ in members), arr(u for _, u in members)),
                partial(_read_rows, "members", members, lambda r: tuple(r[:2]), lambda r: r[2:]),
            )
        teams = sorted(need.member_lists)
        if teams:
            self._add(
                "(SELECT json_agg(json_build_array(k.team, (SELECT"
                " json_agg(json_build_array(m.user_id, m.role, m.spend_cap, s.amount)"
                " ORDER BY m.user_id) FROM team_members m LEFT JOIN member_spend s"
                f" ON s.team_id = m.team_id AND s.user_id = m.user_id AND s.month = {_MONTH}"
                " WHERE m.team_id = k.team))) FROM unnest(%s::text[]) AS k(team))",
                (arr(teams),),
                partial(_read_rows, "member_lists", teams, lambda r: r[0], lambda r: r[1] or []),
            )
        counted = sorted(need.member_counts)
        if counted:
            self._add(
                "(SELECT json_agg(json_build_array(k.team, (SELECT count(*) FROM team_members m"
                " WHERE m.team_id = k.team))) FROM unnest(%s::text[]) AS k(team))",
                (arr(counted),),
                partial(_read_rows, "member_counts", counted, lambda r: r[0], lambda r: r[1]),
            )
        if need.pricing:
            self._add(
                "(SELECT json_build_array(s.value, (SELECT coalesce(max(version), 0)"
                " FROM pricing)) FROM settings s WHERE s.key = 'pricing')",
                (),
                _read_pricing,
            )
        versions = sorted(need.pricing_versions)
        if versions:
            self._add(
                "(SELECT json_agg(json_build_array(version, id, config, label, created_at))"
                " FROM pricing WHERE version = ANY(%s::int[]))",
                (arr(versions),),
                partial(_read_rows, "versions", versions, lambda r: r[0], lambda r: r),
            )
        if need.pricing_history:
            self._add(
                "(SELECT json_agg(json_build_array(version, id, config, label, created_at)"
                " ORDER BY version DESC) FROM pricing)",
                (),
                lambda d, v: d.__setattr__("history", v or []),
            )
        txs = sorted(need.debit_rows)
        if txs:
            with_keys = {a: k for kind, a, k in need.keys if kind == "?"}
            self._add(
                "(SELECT json_agg(json_build_array(g.id, g.kind, g.account, g.amount, g.type,"
                " g.created_at, g.draws, g.draw_refunds, g.spender, g.model, (SELECT"
                " json_agg(json_build_array(l.id, l.seq, l.remaining, l.expires_at)) FROM lots l"
                " WHERE l.id IN (SELECT jsonb_array_elements(g.draws)->>0)), (SELECT"
                " json_agg(json_build_array(i.op, i.fingerprint, i.result)) FROM idempotency i"
                " WHERE i.kind = g.kind AND i.account = g.account AND i.key = k.key)))"
                " FROM unnest(%s::text[], %s::text[]) AS k(id, key) JOIN ledger g ON g.id = k.id)",
                (arr(txs), arr(with_keys.get(tx, "") for tx in txs)),
                partial(_read_rows, "debit_rows", txs, lambda r: r[0], lambda r: r[1:]),
            )
        for page in need.pages:
            self._page(page)
        if need.sweep:
            self._add(
                "(SELECT json_agg(json_build_array(kind, account, id, seq, remaining,"
                " expires_at) ORDER BY kind, account, seq) FROM lots"
                " WHERE remaining > 0 AND expires_at IS NOT NULL AND expires_at <= n.t)",
                (),
                lambda d, v: d.__setattr__("sweep", v or []),
            )
        now_sql = "clock_timestamp()" if self._now is None else "%s::timestamptz"
        now_params: tuple[Any, ...] = () if self._now is None else (self._now,)
        columns = ", ".join(["n.t", *self._fragments])
        sql = f"WITH n AS MATERIALIZED (SELECT {now_sql} AS t) SELECT {columns} FROM n"
        return sql, (*now_params, *self._params)

    def _page(self, page: tuple[Any, ...]) -> None:
        """One page of an account's ledger, read into ``data.pages[page]``."""
        kind, account, limit, before, types, start, end = page
        where = ["kind = %s", "account = %s"]
        params: list[Any] = [kind, account]
        if before is not None:
            where.append("seq < %s")
            params.append(before)
        if types is not None:
            where.append("type = ANY(%s::text[])")
            params.append(arr(sorted(types)))
        if start is not None:
            where.append("created_at >= %s")
            params.append(start)
        if end is not None:
            where.append("created_at < %s")
            params.append(end)
        self._add(
            "(SELECT json_agg(json_build_array(seq, id, kind, account, amount, type,"
            " balance_after, metadata, created_at, reservation_id, idempotency_key, refunded,"
            " spender, model, operation_type, allowance) ORDER BY seq DESC) FROM (SELECT *"
            f" FROM ledger WHERE {' AND '.join(where)} ORDER BY seq DESC LIMIT %s) p)",
            (*params, limit + 1),
            lambda d, v: d.pages.__setitem__(page, v or []),
        )

    def read(self, row: Sequence[Any], into: Data | None = None) -> Data:
        """The bundle's row as `Data` (merged into `into` when given)."""
        data = into if into is not None else Data(now=_as_utc(row[0]))
        for reader, value in zip(self._readers, row[1:], strict=True):
            reader(data, value)
        return data


def _read_accounts(keys: Sequence[tuple[str, str]], data: Data, value: Any) -> None:
    """Accounts by key: the row after its kind and id, or None for a missing account."""
    accounts = data.accounts
    for key in keys:
        accounts[key] = None
    for row in value or ():
        accounts[(row[0], row[1])] = row[2:]


def _read_rows(
    field_name: str,
    keys: Sequence[Any],
    key_of: Callable[[Any], Any],
    value_of: Callable[[Any], Any],
    data: Data,
    value: Any,
) -> None:
    """Rows of one kind of read into ``data.<field_name>``; keys that found none get None."""
    table = getattr(data, field_name)
    for key in keys:
        table[key] = None
    for row in value or ():
        table[key_of(row)] = value_of(row)


def _read_keys(keys: Sequence[tuple[str, str, str]], data: Data, value: Any) -> None:
    for key in keys:
        data.keys[key] = {}
    for kind, account, key, op, fingerprint, result in value or ():
        data.keys[(kind, account, key)][op] = (fingerprint, result)


def _read_debits(data: Data, value: Any) -> None:
    for kind, account, amount, live, expired in value or ():
        data.debits[(kind, account)] = (amount, (live, expired))


def _as_utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo is UTC else moment.astimezone(UTC)


def _read_pricing(data: Data, value: Any) -> None:
    active, last = value
    data.active_version = int(active) if active else None
    data.last_version = last


@dataclass(slots=True)
class Data:
    """The rows a bundle brought, as plain values, keyed like the `Need` that asked."""

    now: datetime
    accounts: dict[tuple[str, str], Any] = field(default_factory=dict)
    users: dict[str, Any] = field(default_factory=dict)
    keys: dict[tuple[str, str, str], dict[str, tuple[str, str]]] = field(default_factory=dict)
    holds: dict[tuple[str, str, str], Any] = field(default_factory=dict)
    debits: dict[tuple[str, str], tuple[int, Any]] = field(default_factory=dict)
    all_lots: dict[tuple[str, str], Any] = field(default_factory=dict)
    members: dict[tuple[str, str], Any] = field(default_factory=dict)
    member_lists: dict[str, Any] = field(default_factory=dict)
    member_counts: dict[str, int] = field(default_factory=dict)
    active_version: int | None = None
    last_version: int | None = None
    versions: dict[int, Any] = field(default_factory=dict)
    history: list[Any] | None = None
    debit_rows: dict[str, Any] = field(default_factory=dict)
    pages: dict[tuple[Any, ...], list[Any]] = field(default_factory=dict)
    sweep: list[Any] | None = None


@dataclass(slots=True, eq=False)
class _Account(E.Account):
    caps: int = 0
    exists: bool = False


class Writes:
    """
    What operations wrote, gathered per table so a batch sends one statement per table.

    Operations of one batch touch disjoint accounts, so their rows never collide; within one
    operation, later values for a row win (a hold lapsed then settled, a lot expired then
    drawn) and running totals add up.
    """

    def __init__(self) -> None:
        self.accounts: dict[tuple[str, str], tuple[bool, tuple[Any, ...]]] = {}
        self.holds_new: list[tuple[Any, ...]] = []
        self.holds: dict[str, int | None] = {}
        self.lots: dict[str, list[Any]] = {}
        self.lots_new: list[tuple[Any, ...]] = []
        self.ledger: list[tuple[Any, ...]] = []
        self.refunds: dict[str, tuple[int, str]] = {}
        self.keys: list[tuple[Any, ...]] = []
        self.totals: dict[tuple[Any, ...], int] = {}
        self.other: list[Statement] = []

    def hold(self, hold_id: str, state: int | None) -> None:
        """Mark a hold no longer counted, and closed in `state` when given."""
        if state is None:
            self.holds.setdefault(hold_id, None)
        else:
            self.holds[hold_id] = state

    def lot(self, lot_id: str, remaining: int | None = None, expired: bool | None = None) -> None:
        """Set a lot's remainder and/or its expired flag."""
        entry = self.lots.setdefault(lot_id, [None, None])
        if remaining is not None:
            entry[0] = remaining
        if expired is not None:
            entry[1] = expired

    def merge(self, other: Writes) -> None:
        """Add another operation's writes (on other accounts)."""
        self.accounts.update(other.accounts)
        self.holds_new += other.holds_new
        self.holds.update(other.holds)
        self.lots.update(other.lots)
        self.lots_new += other.lots_new
        self.ledger += other.ledger
        self.refunds.update(other.refunds)
        self.keys += other.keys
        for key, delta in other.totals.items():
            _add(self.totals, key, delta)
        self.other += other.other

    def statements(self) -> list[Statement]:
        """What applies everything: one statement over the tables written in bulk, then the rest."""
        out: list[Statement] = []
        new = [(k, v) for k, (exists, v) in self.accounts.items() if not exists]
        old = [(k, v) for k, (exists, v) in self.accounts.items() if exists]
        if new:
            out.append(_columns(_NEW_ACCOUNTS, [(*k, *v) for k, v in new], 9))
        if old:
            out.append(_columns(_UPDATE_ACCOUNTS, [(*k, *v) for k, v in old], 9))
        if self.holds_new:
            out.append(_columns(_NEW_HOLDS, self.holds_new, 11))
        if self.holds:
            out.append(_columns(_UPDATE_HOLDS, list(self.holds.items()), 2))
        if self.lots:
            out.append(_columns(_UPDATE_LOTS, [(i, *v) for i, v in self.lots.items()], 3))
        if self.lots_new:
            out.append(_columns(_NEW_LOTS, self.lots_new, 6))
        if self.ledger:
            out.append(_columns(_NEW_ROWS, self.ledger, 15))
        if self.refunds:
            out.append(_columns(_REFUNDS, [(i, *v) for i, v in self.refunds.items()], 3))
        if self.keys:
            out.append(_columns(_NEW_KEYS, self.keys, 6))
        groups: dict[str, list[tuple[Any, ...]]] = {}
        for (table, *key), delta in self.totals.items():
            if delta:
                groups.setdefault(table, []).append((*key, delta))
        for table, rows in groups.items():
            sql, types = _TOTALS[table]
            out.append(_columns(sql, rows, len(types)))
        if len(out) > 1:
            # One statement: each table's write a data-modifying CTE of the last one. They
            # touch different tables (or different rows of one), so none needs another's effect.
            ctes = ", ".join(f"w{n} AS ({sql})" for n, (sql, _) in enumerate(out[:-1]))
            params = tuple(p for _, ps in out for p in ps)
            out = [(f"WITH {ctes} {out[-1][0]}", params)]
        return out + self.other


def _columns(sql: str, rows: Sequence[tuple[Any, ...]], width: int) -> Statement:
    """A statement over `unnest` of arrays: the rows' values, column by column."""
    return sql, tuple(arr(row[i] for row in rows) for i in range(width))


_NEW_ACCOUNTS: Final = (
    "INSERT INTO accounts (kind, id, balance, lifetime_purchased, reserved, expired_unswept,"
    " plan_id, name, caps) SELECT * FROM unnest(%s::text[], %s::text[], %s::bigint[],"
    " %s::bigint[], %s::bigint[], %s::bigint[], %s::text[], %s::text[], %s::int[])"
)
_UPDATE_ACCOUNTS: Final = (
    "UPDATE accounts a SET balance = v.balance, lifetime_purchased = v.lifetime,"
    " reserved = v.reserved, expired_unswept = v.expired, plan_id = v.plan, name = v.name,"
    " caps = v.caps FROM unnest(%s::text[], %s::text[], %s::bigint[], %s::bigint[],"
    " %s::bigint[], %s::bigint[], %s::text[], %s::text[], %s::int[]) AS v(kind, id, balance,"
    " lifetime, reserved, expired, plan, name, caps) WHERE a.kind = v.kind AND a.id = v.id"
)
_NEW_HOLDS: Final = (
    "INSERT INTO holds (id, kind, account, amount, operation_type, model, use_allowance,"
    " expires_at, state, counted, member) SELECT * FROM unnest(%s::text[], %s::text[],"
    " %s::text[], %s::bigint[], %s::text[], %s::text[], %s::boolean[], %s::timestamptz[],"
    " %s::smallint[], %s::boolean[], %s::text[])"
)
_UPDATE_HOLDS: Final = (
    "UPDATE holds h SET state = coalesce(v.state, h.state), counted = false"
    " FROM unnest(%s::text[], %s::smallint[]) AS v(id, state) WHERE h.id = v.id"
)
_UPDATE_LOTS: Final = (
    "UPDATE lots l SET remaining = coalesce(v.remaining, l.remaining),"
    " expired = coalesce(v.expired, l.expired) FROM unnest(%s::text[], %s::bigint[],"
    " %s::boolean[]) AS v(id, remaining, expired) WHERE l.id = v.id"
)
_NEW_LOTS: Final = (
    "INSERT INTO lots (id, kind, account, remaining, expires_at, expired) SELECT * FROM"
    " unnest(%s::text[], %s::text[], %s::text[], %s::bigint[], %s::timestamptz[],"
    " %s::boolean[])"
)
_NEW_ROWS: Final = (
    "INSERT INTO ledger (id, kind, account, amount, type, balance_after, metadata, created_at,"
    " reservation_id, idempotency_key, draws, spender, model, operation_type, allowance)"
    " SELECT id, kind, account, amount, type, balance_after, metadata::jsonb, created_at,"
    " reservation_id, idempotency_key, draws::jsonb, spender, model, operation_type,"
    " allowance FROM unnest(%s::text[], %s::text[], %s::text[], %s::bigint[], %s::text[],"
    " %s::bigint[], %s::text[], %s::timestamptz[], %s::text[], %s::text[], %s::text[],"
    " %s::text[], %s::text[], %s::text[], %s::bigint[]) WITH ORDINALITY AS v(id, kind,"
    " account, amount, type, balance_after, metadata, created_at, reservation_id,"
    " idempotency_key, draws, spender, model, operation_type, allowance, position)"
    " ORDER BY position"
)
_REFUNDS: Final = (
    "UPDATE ledger g SET refunded = v.refunded, draw_refunds = v.draws::jsonb"
    " FROM unnest(%s::text[], %s::bigint[], %s::text[]) AS v(id, refunded, draws)"
    " WHERE g.id = v.id"
)
_NEW_KEYS: Final = (
    "INSERT INTO idempotency (kind, account, op, key, fingerprint, result) SELECT * FROM"
    " unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[])"
)


class Snapshot:
    """
    The engine's `Storage` over one bundle's `Data`; writes are recorded in `writes`.

    Args:
        data: What the bundle read.
        ids: The store's id source.
        configs: Parsed pricing configs by version (versions never change once written).
    """

    def __init__(self, data: Data, ids: L.IdSource, configs: dict[int, PricingConfigData]) -> None:
        self.data = data
        self._ids = ids
        self._configs = configs
        self.out = Writes()
        self._accounts: dict[tuple[str, str], _Account] = {}
        self._dirty: dict[tuple[str, str], _Account] = {}
        self._held: dict[tuple[str, str], dict[str, int]] = {}
        self._member_held: dict[tuple[str, str], int] = {}
        self._caps: dict[str, dict[tuple[str, str | None], SpendCap]] = {}
        self._spend: dict[str, dict[tuple[str, int, str], int]] = {}
        self._lapsed: set[tuple[str, str, str]] = set()
        self._lapsed_ids: set[str] = set()
        self._keys: dict[tuple[str, str, str], dict[str, tuple[str, str]]] = {}

    def finish(self) -> Writes:
        """What the operation wrote, each changed account once."""
        for key, acct in self._dirty.items():
            self.out.accounts[key] = (
                acct.exists,
                (
                    acct.balance,
                    acct.lifetime_purchased,
                    acct.reserved,
                    acct.expired_unswept,
                    acct.plan_id,
                    acct.name,
                    acct.caps,
                ),
            )
        self._dirty.clear()
        return self.out

    def _write(self, sql: str, *params: Any) -> None:
        self.out.other.append((sql, params))

    def now(self) -> datetime:
        return self.data.now

    def new_id(self, kind: str) -> str:
        return self._ids.next(kind)

    # -- accounts ----------------------------------------------------------------------------

    def account(self, kind: str, account_id: str) -> _Account | None:
        key = (kind, account_id)
        acct = self._accounts.get(key)
        if acct is not None:
            return acct
        if key not in self.data.accounts:
            raise Miss(Need(accounts={key}))
        row = self.data.accounts[key]
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
        self._held[key] = dict(row[9] or {})
        self._accounts[key] = acct
        return acct

    def create(self, kind: str, account_id: str, now: datetime) -> _Account:
        acct = _Account(kind, account_id)
        self._accounts[(kind, account_id)] = acct
        self._held[(kind, account_id)] = {}
        return acct

    def save(self, acct: E.Account) -> None:
        assert isinstance(acct, _Account)
        self._dirty[(acct.kind, acct.id)] = acct

    def lapse_holds(self, acct: E.Account, now: datetime) -> Sequence[E.Hold]:
        key = (acct.kind, acct.id)
        if ("h", *key) in self._lapsed:
            return ()
        self._lapsed.add(("h", *key))
        rows = self.data.accounts[key][7] or ()
        if not rows:
            return ()
        self._lapsed_ids.update(row[0] for row in rows)
        ids = arr(row[0] for row in rows)
        self._write("UPDATE holds SET counted = false WHERE id = ANY(%s::text[])", ids)
        return [
            E.Hold(hold_id, amount, "", model, False, _req_dt(expires), member=member)
            for hold_id, amount, model, member, expires in rows
        ]

    def lapse_lots(self, acct: E.Account, now: datetime) -> Sequence[int]:
        key = (acct.kind, acct.id)
        if ("l", *key) in self._lapsed:
            return ()
        self._lapsed.add(("l", *key))
        rows = self.data.accounts[key][8] or ()
        if not rows:
            return ()
        for row in rows:
            self.out.lot(row[0], expired=True)
        return [row[1] for row in rows]

    # -- holds -------------------------------------------------------------------------------

    def hold(self, acct: E.Account, hold_id: str) -> E.Hold | None:
        key = (acct.kind, acct.id, hold_id)
        if key not in self.data.holds:
            raise Miss(Need(holds={key}))
        row = self.data.holds[key]
        if row is None:
            return None
        amount, operation_type, model, use_allowance, expires, member, state, counted = row
        if hold_id in self._lapsed_ids:
            counted = False
        return E.Hold(
            hold_id,
            amount,
            operation_type,
            model,
            use_allowance,
            _req_dt(expires),
            member=member,
            state=state,
            counted=counted,
        )

    def add_hold(self, acct: E.Account, hold: E.Hold) -> None:
        self.out.holds_new.append(
            (
                hold.id,
                acct.kind,
                acct.id,
                hold.amount,
                hold.operation_type,
                hold.model,
                hold.use_allowance,
                hold.expires_at,
                hold.state,
                hold.counted,
                hold.member,
            )
        )

    def close_hold(self, acct: E.Account, hold: E.Hold, state: int) -> None:
        self.out.hold(hold.id, state)
        hold.state = state

    def add_held(self, acct: E.Account, hold: E.Hold, delta: int) -> None:
        key = (acct.kind, acct.id)
        if hold.model is not None:
            held = self._held.setdefault(key, {})
            held[hold.model] = held.get(hold.model, 0) + delta
            _add(self.out.totals, ("model", *key, hold.model), delta)
        if hold.member is not None:
            member_key = (acct.id, hold.member)
            self._member_held[member_key] = self.held_by_member(acct, hold.member) + delta
            _add(self.out.totals, ("member", *key, hold.member), delta)

    def held_for(self, acct: E.Account, model: str) -> int:
        return self._held.get((acct.kind, acct.id), {}).get(model, 0)

    def held_by_member(self, team: E.Account, user_id: str) -> int:
        key = (team.id, user_id)
        if key in self._member_held:
            return self._member_held[key]
        if key not in self.data.members:
            raise Miss(Need(members={key}))
        return int(self.data.members[key][2] or 0)

    # -- lots --------------------------------------------------------------------------------

    def _lots(self, acct: E.Account, which: int) -> Iterator[L.Lot]:
        key = (acct.kind, acct.id)
        fetched = self.data.debits.get(key)
        if fetched is None:
            raise Miss(Need(debits={key: max(1, -acct.balance, acct.balance)}))
        amount, rows = fetched
        covered = 0
        for lot_id, seq, remaining, expires in rows[which] or ():
            covered += remaining
            yield L.Lot(lot_id, seq, remaining, _dt(expires))
        if covered >= amount:
            raise Miss(Need(debits={key: amount * 2 + 1}))

    def live_lots(self, acct: E.Account) -> Iterator[L.Lot]:
        return self._lots(acct, 0)

    def expired_lots(self, acct: E.Account) -> Iterator[L.Lot]:
        return self._lots(acct, 1)

    def lots_in_order(self, acct: E.Account) -> tuple[Sequence[L.Lot], Sequence[L.Lot]]:
        key = (acct.kind, acct.id)
        if key not in self.data.all_lots:
            raise Miss(Need(all_lots={key}))
        live: list[L.Lot] = []
        expired: list[L.Lot] = []
        for lot_id, seq, remaining, expires, gone in self.data.all_lots[key]:
            (expired if gone else live).append(L.Lot(lot_id, seq, remaining, _dt(expires)))
        return live, expired

    def lots_drawn(self, acct: E.Account, draws: Sequence[tuple[L.Lot, int]]) -> None:
        for lot, _ in draws:
            self.out.lot(lot.id, remaining=lot.remaining)

    def add_lot(
        self, acct: E.Account, amount: int, expires_at: datetime | None, expired: bool
    ) -> None:
        self.out.lots_new.append(
            (self._ids.next("lot"), acct.kind, acct.id, amount, expires_at, expired)
        )

    def lot(self, acct: E.Account, lot_id: str) -> L.Lot:
        for row in self.data.debit_rows.values():
            for found_id, seq, remaining, expires in (row or [None] * 10)[9] or ():
                if found_id == lot_id:
                    return L.Lot(found_id, seq, remaining, _dt(expires))
        raise AssertionError(f"lot {lot_id!r} was not prefetched")  # pragma: no cover

    def lot_refilled(self, acct: E.Account, lot: L.Lot, expired: bool) -> None:
        self.out.lot(lot.id, remaining=lot.remaining, expired=expired)

    def sweep_due(self, now: datetime, consume: bool) -> list[tuple[str, str, L.Lot]]:
        if self.data.sweep is None:
            raise Miss(Need(sweep=True))
        return [
            (kind, account, L.Lot(lot_id, seq, remaining, _dt(expires)))
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
    ) -> str:
        row_id = self._ids.next("tx")
        self.out.ledger.append(
            (
                row_id,
                acct.kind,
                acct.id,
                amount,
                type_,
                acct.balance,
                json.dumps(metadata, separators=(",", ":")),
                now,
                reservation_id,
                idempotency_key,
                None if draws is None else json.dumps(draws, separators=(",", ":")),
                spender,
                model,
                operation_type,
                allowance,
            )
        )
        return row_id

    def debit(self, transaction_id: str) -> E.Debit | None:
        if transaction_id not in self.data.debit_rows:
            raise Miss(Need(debit_rows={transaction_id}))
        row = self.data.debit_rows[transaction_id]
        if row is None:
            return None
        kind, account, amount, type_, created, draws, refunds, spender, model = row[:9]
        return E.Debit(
            transaction_id,
            kind,
            account,
            amount,
            type_,
            _req_dt(created),
            [(str(d[0]), int(d[1])) for d in draws or ()],
            list(refunds) if refunds else None,
            spender,
            model,
        )

    def set_refunds(self, debit: E.Debit, refunds: list[int]) -> None:
        self.out.refunds[debit.id] = (refunds[0], json.dumps(refunds))

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
        wanted = (kind, account_id, limit, before, types, start, end)
        rows = self.data.pages.get(wanted)
        if rows is None:
            raise Miss(Need(pages={wanted}))
        # Columns in StoredRow's order; created_at (the ninth) arrives as text.
        page = [E.StoredRow._make((*row[:8], _req_dt(row[8]), *row[9:])) for row in rows[:limit]]
        return page, len(rows) > limit

    def spend_events(self, start: datetime, end: datetime) -> list[L.SpendEvent]:
        raise AssertionError("PostgresStore computes analytics in SQL")  # pragma: no cover

    # -- idempotency -------------------------------------------------------------------------

    def _entries(self, acct: E.Account, key: str) -> dict[str, tuple[str, str]]:
        full = (acct.kind, acct.id, key)
        entries = self._keys.get(full)
        if entries is not None:
            return entries
        if full in self.data.keys:
            entries = dict(self.data.keys[full])
        else:
            entries = None
            for row in self.data.debit_rows.values():
                if row is not None and (row[0], row[1]) == (acct.kind, acct.id):
                    entries = {e[0]: (e[1], e[2]) for e in row[10] or ()}
            if entries is None:
                raise Miss(Need(keys={full}))
        self._keys[full] = entries
        return entries

    def recall(
        self,
        acct: E.Account,
        op: str,
        key: str,
        fingerprint: tuple[object, ...],
        result_type: type[T],
    ) -> tuple[bool, T | None]:
        assert isinstance(acct, _Account)
        if not acct.exists:
            return False, None
        entry = self._entries(acct, key).get(op)
        if entry is None:
            return False, None
        if entry[0] != L.fingerprint(*fingerprint):
            return True, None
        result = result_type.model_validate_json(entry[1])  # type: ignore[attr-defined]
        result.idempotent = True
        return True, result

    def remember(
        self, acct: E.Account, op: str, key: str, fingerprint: tuple[object, ...], result: Any
    ) -> None:
        text = L.fingerprint(*fingerprint)
        dumped = result.model_dump_json()
        self._keys.setdefault((acct.kind, acct.id, key), {})[op] = (text, dumped)
        self.out.keys.append((acct.kind, acct.id, op, key, text, dumped))

    # -- plans and allowance -----------------------------------------------------------------

    def _config(self, version: int) -> PricingConfigData:
        config = self._configs.get(version)
        if config is None:
            row = self.data.versions.get(version)
            if row is None:
                raise Miss(Need(pricing_versions={version}))
            config = self._configs[version] = PricingConfigData.model_validate_json(row[2])
        return config

    def plan(self, plan_id: str) -> PlanDefinition | None:
        version = self.active_version()
        if version is None:
            return None
        return (self._config(version).plans or {}).get(plan_id)

    def _user_row(self, user_id: str) -> Any:
        if user_id not in self.data.users:
            raise Miss(Need(user_data={user_id}))
        return self.data.users[user_id]

    def allowance_used(self, acct: E.Account, month: int) -> int:
        if month != L.month_key(self.data.now):
            raise AssertionError("only this month's allowance is read")  # pragma: no cover
        return int(self._user_row(acct.id)[2] or 0)

    def use_allowance(self, acct: E.Account, month: int, amount: int) -> None:
        _add(self.out.totals, ("allowance", acct.id, month), amount)

    # -- caps and spend windows --------------------------------------------------------------

    def _cap_table(self, user_id: str) -> dict[tuple[str, str | None], SpendCap]:
        caps = self._caps.get(user_id)
        if caps is None:
            caps = self._caps[user_id] = {
                (cap_type, model or None): SpendCap(
                    user_id=user_id,
                    cap_type=cap_type,
                    model=model or None,
                    limit=limit,
                    action=action,
                )
                for cap_type, model, limit, action in self._user_row(user_id)[0] or ()
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
        caps[(cap.cap_type, cap.model)] = cap
        acct.caps = len(caps)
        self._write(
            "INSERT INTO caps (user_id, cap_type, model, cap_limit, action)"
            " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (user_id, cap_type, model)"
            " DO UPDATE SET cap_limit = excluded.cap_limit, action = excluded.action",
            acct.id,
            cap.cap_type,
            cap.model or _ALL_MODELS,
            cap.limit,
            cap.action,
        )

    def remove_cap(self, acct: E.Account, cap_type: str, model: str | None) -> bool:
        assert isinstance(acct, _Account)
        caps = self._cap_table(acct.id)
        removed = caps.pop((cap_type, model), None) is not None
        acct.caps = len(caps)
        if removed:
            self._write(
                "DELETE FROM caps WHERE user_id = %s AND cap_type = %s AND model = %s",
                acct.id,
                cap_type,
                model or _ALL_MODELS,
            )
        return removed

    def _spend_table(self, user_id: str) -> dict[tuple[str, int, str], int]:
        spend = self._spend.get(user_id)
        if spend is None:
            spend = self._spend[user_id] = {
                (kind, period, name): amount
                for kind, period, name, amount in self._user_row(user_id)[1] or ()
            }
        return spend

    def window_spend(self, user_id: str, cap_type: str, window: int, model: str | None) -> int:
        if window != L.cap_window_key(cap_type, self.data.now):
            raise AssertionError("only the current windows are read")  # pragma: no cover
        return self._spend_table(user_id).get((cap_type, window, model or _ALL_MODELS), 0)

    def add_spend(self, user_id: str, model: str | None, at: datetime, amount: int) -> None:
        rows = [
            (user_id, cap_type, L.cap_window_key(cap_type, at), key)
            for cap_type in ("daily", "monthly")
            for key in ((_ALL_MODELS, model) if model is not None else (_ALL_MODELS,))
        ]
        if user_id in self.data.users:  # keep the windows this operation may read current
            spend = self._spend_table(user_id)
            for _, cap_type, period, key in rows:
                spend[(cap_type, period, key)] = spend.get((cap_type, period, key), 0) + amount
        for row in rows:
            _add(self.out.totals, ("spend", *row), amount)

    # -- teams -------------------------------------------------------------------------------

    def member(self, team: E.Account, user_id: str) -> E.Member | None:
        key = (team.id, user_id)
        if key not in self.data.members:
            raise Miss(Need(members={key}))
        row = self.data.members[key][0]
        return None if row is None else E.Member(row[0], row[1])

    def put_member(self, team: E.Account, user_id: str, member: E.Member) -> None:
        self._write(
            "INSERT INTO team_members (team_id, user_id, role, spend_cap) VALUES (%s, %s, %s, %s)"
            " ON CONFLICT (team_id, user_id)"
            " DO UPDATE SET role = excluded.role, spend_cap = excluded.spend_cap",
            team.id,
            user_id,
            member.role,
            member.spend_cap,
        )

    def remove_member(self, team: E.Account, user_id: str) -> bool:
        # The engine reads the answer: it is fetched (not inferred) with the membership.
        key = (team.id, user_id)
        if key not in self.data.members:
            raise Miss(Need(members={key}))
        self._write(
            "DELETE FROM team_members WHERE team_id = %s AND user_id = %s", team.id, user_id
        )
        return self.data.members[key][0] is not None

    def members(self, team: E.Account, month: int) -> list[TeamMember]:
        if team.id not in self.data.member_lists:
            raise Miss(Need(member_lists={team.id}))
        return [
            TeamMember(user_id=user_id, role=role, spend_cap=cap, total_spent=spent or 0)
            for user_id, role, cap, spent in self.data.member_lists[team.id]
        ]

    def member_count(self, team: E.Account) -> int:
        if team.id not in self.data.member_counts:
            raise Miss(Need(member_counts={team.id}))
        return self.data.member_counts[team.id]

    def member_spend(self, team: E.Account, user_id: str, month: int) -> int:
        key = (team.id, user_id)
        if key not in self.data.members:
            raise Miss(Need(members={key}))
        return int(self.data.members[key][1] or 0)

    def add_member_spend(self, team: E.Account, user_id: str, month: int, amount: int) -> None:
        _add(self.out.totals, ("member_spend", team.id, user_id, month), amount)

    # -- pricing -----------------------------------------------------------------------------

    def _pricing_loaded(self) -> None:
        if self.data.last_version is None:
            raise Miss(Need(pricing=True))

    def active_version(self) -> int | None:
        self._pricing_loaded()
        return self.data.active_version

    def _version(self, row: Sequence[Any]) -> E.PricingVersion:
        version, pricing_id, _, label, created = row
        if version not in self._configs:
            self._configs[version] = PricingConfigData.model_validate_json(row[2])
        return E.PricingVersion(
            version, pricing_id, self._configs[version], label, _req_dt(created)
        )

    def active_pricing(self) -> E.PricingVersion | None:
        version = self.active_version()
        return None if version is None else self.pricing(version)

    def pricing(self, version: int) -> E.PricingVersion | None:
        if version not in self.data.versions:
            raise Miss(Need(pricing_versions={version}))
        row = self.data.versions[version]
        return None if row is None else self._version(row)

    def pricing_history(self) -> list[E.PricingVersion]:
        if self.data.history is None:
            raise Miss(Need(pricing_history=True))
        return [self._version(row) for row in self.data.history]

    def add_pricing(self, item: E.PricingVersion) -> None:
        self._write(
            "INSERT INTO pricing (version, id, config, label, created_at)"
            " VALUES (%s, %s, %s, %s, %s)",
            item.version,
            item.id,
            item.config.model_dump_json(),
            item.label,
            item.created_at,
        )

    def last_pricing_version(self) -> int:
        self._pricing_loaded()
        assert self.data.last_version is not None
        return self.data.last_version

    def activate(self, version: int) -> None:
        self._write("UPDATE settings SET value = %s WHERE key = 'pricing'", str(version))
