"""
The engine's `Storage` on one `sqlite3` connection, for `SQLiteStore`.

Its methods run on the connection's thread, inside the transaction (and savepoint) the store
opened; they only read and write rows. Instants are stored as integer microseconds since the
Unix epoch (UTC) and credits as INTEGER.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from typing import Any, Final, TypeVar

from ducto.interface import _engine as E
from ducto.interface import _ledger as L
from ducto.interface import _retention as R
from ducto.interface.models import PlanDefinition, PricingConfigData, SpendCap, TeamMember

T = TypeVar("T")

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
NEVER_US: Final = 9223372036854775807
_ALL_MODELS: Final = ""
_NO_SCOPE: Final = ""
"""The scope column of a counter, total or cap that is not in a budget scope."""


def to_us(moment: datetime) -> int:
    """An aware datetime as integer microseconds since the Unix epoch."""
    delta = moment - _EPOCH
    return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_us(value: int) -> datetime:
    """Integer microseconds since the Unix epoch as an aware UTC datetime."""
    return _EPOCH + timedelta(microseconds=value)


def _opt_us(moment: datetime | None) -> int | None:
    return None if moment is None else to_us(moment)


def _opt_dt(value: int | None) -> datetime | None:
    return None if value is None else from_us(value)


def _dumps(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))


def _stored_row(row: Sequence[Any]) -> E.StoredRow:
    """A ledger row selected as `_ROW_COLUMNS`."""
    (
        seq,
        row_id,
        kind,
        account,
        amount,
        type_,
        balance_after,
        metadata,
        created_us,
        reservation_id,
        key,
        refunded,
        spender,
        model,
        operation_type,
        allowance,
        scope,
    ) = row
    return E.StoredRow(
        seq,
        row_id,
        kind,
        account,
        amount,
        type_,
        balance_after,
        json.loads(metadata),
        from_us(created_us),
        reservation_id,
        key,
        refunded,
        spender,
        model,
        operation_type,
        allowance,
        scope,
    )


def _first_day(moment: datetime) -> int:
    """The proleptic ordinal of the first UTC midnight at or after `moment`."""
    moment = moment.astimezone(UTC)
    day = moment.toordinal()
    return day if moment.timetz() == time(0, tzinfo=UTC) else day + 1


_LIVE_LOTS: Final = (
    "SELECT id, seq, remaining, expires_us FROM lots INDEXED BY lots_live"
    " WHERE kind = ? AND account = ? AND remaining > 0 AND expired = 0"
    f" ORDER BY coalesce(expires_us, {NEVER_US}), seq"
)
_EXPIRED_LOTS: Final = (
    "SELECT id, seq, remaining, expires_us FROM lots INDEXED BY lots_expired"
    " WHERE kind = ? AND account = ? AND remaining > 0 AND expired = 1"
    " ORDER BY expires_us, seq"
)
_ROW_COLUMNS: Final = (
    "seq, id, kind, account, amount, type, balance_after, metadata, created_us,"
    " reservation_id, idempotency_key, refunded, spender, model, operation_type, allowance,"
    " scope"
)
_POINTER: Final = "active_pricing"
_POINTER_AT: Final = "active_pricing_at"
"""The settings keys of the pricing pointer: its version, and since when (microseconds)."""
_PRICING_COLUMNS: Final = "version, id, config, label, created_us, effective_us, cancelled_us"
_PRICING_STATE: Final = (
    # One statement: the pointer's row (if any), then the versions scheduled after it, found
    # through an index that holds only versions not cancelled.
    f"SELECT 1, CAST(p.value AS INTEGER), CAST(a.value AS INTEGER) FROM settings p, settings a"
    f" WHERE p.key = '{_POINTER}' AND a.key = '{_POINTER_AT}'"
    " UNION ALL SELECT 0, version, effective_us FROM pricing INDEXED BY pricing_scheduled"
    " WHERE cancelled_us IS NULL AND effective_us > coalesce("
    f"(SELECT CAST(value AS INTEGER) FROM settings WHERE key = '{_POINTER_AT}'), -{NEVER_US})"
)
_HELD_ADD: Final = (
    "INSERT INTO reserved_by_model (kind, account, model, scope, amount) VALUES (?, ?, ?, ?, ?)"
    " ON CONFLICT (kind, account, model, scope) DO UPDATE SET amount = amount + excluded.amount"
)
_HELD_DROP: Final = (
    "DELETE FROM reserved_by_model WHERE kind = ? AND account = ? AND model = ? AND scope = ?"
    " AND amount = 0"
)
_HORIZON: Final = "archived_before"
"""The settings key of the archive horizon (microseconds)."""
_SEQ_MARK: Final = ""
"""
The id of the placeholder ledger row that keeps the highest ``seq`` once `archive` deleted the
newest rows (see `SQLiteStorage.archive`). No transaction id is empty, its kind and type match
no account and no usage, and it is created at the end of time, so nothing reads or archives it.
"""


@dataclass(slots=True, eq=False)
class _Account(E.Account):
    # The earliest instant a counted hold may lapse or a live lot may expire: before it, an
    # operation on the account need not look for either.
    hold_check_us: int = NEVER_US
    lot_check_us: int = NEVER_US
    caps: int = 0
    """How many spend caps the user has, so the common case skips looking for them."""
    exists: bool = False
    created_us: int = 0


class SQLiteStorage:
    """
    The engine's storage over one connection.

    Args:
        conn: The connection (autocommit off; the store opens the transactions).
        clock: The store clock.
        ids: The id source.
        retention: How long idempotency records and finished holds are kept.
    """

    def __init__(
        self,
        conn: sqlite3.Connection,
        clock: Callable[[], datetime],
        ids: L.IdSource,
        retention: R.Retention,
    ) -> None:
        self.conn = conn
        self._clock = clock
        self._ids = ids
        self._retention = retention
        self._configs: dict[int, PricingConfigData] = {}

    def _one(self, sql: str, params: Sequence[object] = ()) -> Any:
        return self.conn.execute(sql, params).fetchone()

    def now(self) -> datetime:
        return L.read_clock(self._clock)

    def new_id(self, kind: str) -> str:
        return self._ids.next(kind)

    # -- accounts ----------------------------------------------------------------------------

    def account(self, kind: str, account_id: str) -> _Account | None:
        row = self._one(
            "SELECT balance, lifetime_purchased, reserved, expired_unswept, hold_check_us,"
            " lot_check_us, plan_id, name, caps FROM accounts WHERE kind = ? AND id = ?",
            (kind, account_id),
        )
        if row is None:
            return None
        return _Account(
            kind,
            account_id,
            balance=row[0],
            lifetime_purchased=row[1],
            reserved=row[2],
            expired_unswept=row[3],
            plan_id=row[6],
            name=row[7],
            hold_check_us=row[4],
            lot_check_us=row[5],
            caps=row[8],
            exists=True,
        )

    def create(self, kind: str, account_id: str, now: datetime) -> _Account:
        return _Account(kind, account_id, created_us=to_us(now))

    def save(self, acct: E.Account) -> None:
        assert isinstance(acct, _Account)
        values = (
            acct.balance,
            acct.lifetime_purchased,
            acct.reserved,
            acct.expired_unswept,
            acct.hold_check_us,
            acct.lot_check_us,
            acct.plan_id,
            acct.name,
            acct.caps,
        )
        if acct.exists:
            self.conn.execute(
                "UPDATE accounts SET balance = ?, lifetime_purchased = ?, reserved = ?,"
                " expired_unswept = ?, hold_check_us = ?, lot_check_us = ?, plan_id = ?,"
                " name = ?, caps = ? WHERE kind = ? AND id = ?",
                (*values, acct.kind, acct.id),
            )
        else:
            self.conn.execute(
                "INSERT INTO accounts (balance, lifetime_purchased, reserved, expired_unswept,"
                " hold_check_us, lot_check_us, plan_id, name, caps, kind, id, created_us)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (*values, acct.kind, acct.id, acct.created_us),
            )
            acct.exists = True

    def lapse_holds(self, acct: E.Account, now: datetime) -> Sequence[E.Hold]:
        assert isinstance(acct, _Account)
        now_us = to_us(now)
        if now_us < acct.hold_check_us:
            return ()
        lapsed = [
            E.Hold(
                hold_id, amount, "", model, False, from_us(expires_us), member=member, scope=scope
            )
            for hold_id, amount, model, member, expires_us, scope in self.conn.execute(
                "SELECT id, amount, model, member, expires_us, scope FROM holds"
                " WHERE kind = ? AND account = ? AND counted = 1 AND expires_us <= ?",
                (acct.kind, acct.id, now_us),
            ).fetchall()
        ]
        if lapsed:
            self.conn.executemany(
                "UPDATE holds SET counted = 0 WHERE id = ?", [(h.id,) for h in lapsed]
            )
        acct.hold_check_us = self._one(
            "SELECT coalesce(min(expires_us), ?) FROM holds"
            " WHERE kind = ? AND account = ? AND counted = 1",
            (NEVER_US, acct.kind, acct.id),
        )[0]
        if not lapsed:
            self._save_check(acct)
        return lapsed

    def lapse_lots(self, acct: E.Account, now: datetime) -> Sequence[int]:
        assert isinstance(acct, _Account)
        now_us = to_us(now)
        if now_us < acct.lot_check_us:
            return ()
        expired = [
            row[0]
            for row in self.conn.execute(
                "UPDATE lots SET expired = 1 WHERE kind = ? AND account = ? AND remaining > 0"
                " AND expired = 0 AND expires_us <= ? RETURNING remaining",
                (acct.kind, acct.id, now_us),
            ).fetchall()
        ]
        acct.lot_check_us = self._one(
            f"SELECT coalesce(min(coalesce(expires_us, {NEVER_US})), {NEVER_US})"
            " FROM lots INDEXED BY lots_live"
            " WHERE kind = ? AND account = ? AND remaining > 0 AND expired = 0",
            (acct.kind, acct.id),
        )[0]
        if not expired:
            self._save_check(acct)
        return expired

    def _save_check(self, acct: _Account) -> None:
        """Persist a recomputed check instant when nothing else about the account changed."""
        self.conn.execute(
            "UPDATE accounts SET hold_check_us = ?, lot_check_us = ? WHERE kind = ? AND id = ?",
            (acct.hold_check_us, acct.lot_check_us, acct.kind, acct.id),
        )

    # -- holds -------------------------------------------------------------------------------

    def hold(self, acct: E.Account, hold_id: str) -> E.Hold | None:
        row = self._one(
            "SELECT amount, operation_type, model, use_allowance, expires_us, member, state,"
            " counted, scope FROM holds WHERE id = ? AND kind = ? AND account = ?",
            (hold_id, acct.kind, acct.id),
        )
        if row is None:
            return None
        amount, operation_type, model, use_allowance, expires_us, member, state, counted, scope = (
            row
        )
        return E.Hold(
            hold_id,
            amount,
            operation_type,
            model,
            bool(use_allowance),
            from_us(expires_us),
            member=member,
            state=state,
            counted=bool(counted),
            scope=scope,
        )

    def add_hold(self, acct: E.Account, hold: E.Hold) -> None:
        assert isinstance(acct, _Account)
        expires_us = to_us(hold.expires_at)
        self.conn.execute(
            "INSERT INTO holds (id, kind, account, amount, operation_type, model, use_allowance,"
            " expires_us, state, counted, member, scope)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                hold.id,
                acct.kind,
                acct.id,
                hold.amount,
                hold.operation_type,
                hold.model,
                int(hold.use_allowance),
                expires_us,
                hold.state,
                int(hold.counted),
                hold.member,
                hold.scope,
            ),
        )
        if hold.counted:
            acct.hold_check_us = min(acct.hold_check_us, expires_us)

    def close_hold(self, acct: E.Account, hold: E.Hold, state: int) -> None:
        self.conn.execute("UPDATE holds SET state = ?, counted = 0 WHERE id = ?", (state, hold.id))
        hold.state = state

    def add_held(self, acct: E.Account, hold: E.Hold, delta: int) -> None:
        model, scope = hold.model, hold.scope
        if scope is None:
            if model is not None:
                self.conn.execute(_HELD_ADD, (acct.kind, acct.id, model, _NO_SCOPE, delta))
                if delta < 0:
                    self.conn.execute(_HELD_DROP, (acct.kind, acct.id, model, _NO_SCOPE))
        else:
            # One statement for every total a hold in a scope counts in: the scope's on every
            # model, and with a model that model's and the scope's on that model.
            keys = [(_ALL_MODELS, scope)]
            if model is not None:
                keys += [(model, _NO_SCOPE), (model, scope)]
            self.conn.execute(
                "INSERT INTO reserved_by_model (kind, account, model, scope, amount) VALUES"
                + ", ".join(["(?, ?, ?, ?, ?)"] * len(keys))
                + " ON CONFLICT (kind, account, model, scope)"
                " DO UPDATE SET amount = amount + excluded.amount",
                [v for key in keys for v in (acct.kind, acct.id, *key, delta)],
            )
            if delta < 0:
                # Exactly the rows above: ('', '') is never written.
                self.conn.execute(
                    "DELETE FROM reserved_by_model WHERE kind = ? AND account = ?"
                    " AND model IN (?, '') AND scope IN (?, '') AND amount = 0",
                    (acct.kind, acct.id, model or _ALL_MODELS, scope),
                )
        member = hold.member
        if member is not None:
            params = (acct.kind, acct.id, member)
            self.conn.execute(
                "INSERT INTO reserved_by_member (kind, account, member, amount) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (kind, account, member)"
                " DO UPDATE SET amount = amount + excluded.amount",
                (*params, delta),
            )
            if delta < 0:
                self.conn.execute(
                    "DELETE FROM reserved_by_member WHERE kind = ? AND account = ? AND member = ?"
                    " AND amount = 0",
                    params,
                )

    def held_for(self, acct: E.Account, model: str | None, scope: str | None) -> int:
        row = self._one(
            "SELECT amount FROM reserved_by_model WHERE kind = ? AND account = ? AND model = ?"
            " AND scope = ?",
            (acct.kind, acct.id, model or _ALL_MODELS, scope or _NO_SCOPE),
        )
        return row[0] if row else 0

    def held_by_member(self, team: E.Account, user_id: str) -> int:
        row = self._one(
            "SELECT amount FROM reserved_by_member WHERE kind = ? AND account = ? AND member = ?",
            (team.kind, team.id, user_id),
        )
        return row[0] if row else 0

    # -- lots --------------------------------------------------------------------------------

    def _lots(self, acct: E.Account, sql: str) -> Iterator[L.Lot]:
        cursor = self.conn.execute(sql, (acct.kind, acct.id))
        while rows := cursor.fetchmany(8):
            for lot_id, seq, remaining, expires_us in rows:
                yield L.Lot(lot_id, seq, remaining, _opt_dt(expires_us))

    def live_lots(self, acct: E.Account) -> Iterator[L.Lot]:
        return self._lots(acct, _LIVE_LOTS)

    def expired_lots(self, acct: E.Account) -> Iterator[L.Lot]:
        return self._lots(acct, _EXPIRED_LOTS)

    def lots_in_order(self, acct: E.Account) -> tuple[Sequence[L.Lot], Sequence[L.Lot]]:
        return list(self._lots(acct, _LIVE_LOTS)), list(self._lots(acct, _EXPIRED_LOTS))

    def lots_drawn(self, acct: E.Account, draws: Sequence[tuple[L.Lot, int]]) -> None:
        self.conn.executemany(
            "UPDATE lots SET remaining = ? WHERE id = ?",
            [(lot.remaining, lot.id) for lot, _ in draws],
        )

    def add_lot(
        self, acct: E.Account, amount: int, expires_at: datetime | None, expired: bool
    ) -> None:
        assert isinstance(acct, _Account)
        expires_us = _opt_us(expires_at)
        self.conn.execute(
            "INSERT INTO lots (id, kind, account, remaining, expires_us, expired)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (self._ids.next("lot"), acct.kind, acct.id, amount, expires_us, int(expired)),
        )
        if expires_us is not None and not expired:
            acct.lot_check_us = min(acct.lot_check_us, expires_us)

    def lot(self, acct: E.Account, lot_id: str) -> L.Lot:
        seq, remaining, expires_us = self._one(
            "SELECT seq, remaining, expires_us FROM lots WHERE id = ?", (lot_id,)
        )
        return L.Lot(lot_id, seq, remaining, _opt_dt(expires_us))

    def lot_refilled(self, acct: E.Account, lot: L.Lot, expired: bool) -> None:
        assert isinstance(acct, _Account)
        self.conn.execute(
            "UPDATE lots SET remaining = ?, expired = ? WHERE id = ?",
            (lot.remaining, int(expired), lot.id),
        )
        if lot.expires_at is not None and not expired:
            acct.lot_check_us = min(acct.lot_check_us, to_us(lot.expires_at))

    def sweep_due(self, now: datetime, consume: bool) -> list[tuple[str, str, L.Lot]]:
        return [
            (kind, account, L.Lot(lot_id, seq, remaining, from_us(expires_us)))
            for lot_id, seq, kind, account, remaining, expires_us in self.conn.execute(
                "SELECT id, seq, kind, account, remaining, expires_us FROM lots"
                " INDEXED BY lots_sweep WHERE remaining > 0 AND expires_us IS NOT NULL"
                " AND expires_us <= ? ORDER BY kind, account, seq",
                (to_us(now),),
            )
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
        self.conn.execute(
            "INSERT INTO ledger (id, kind, account, amount, type, balance_after, metadata,"
            " created_us, reservation_id, idempotency_key, draws, spender, model,"
            " operation_type, allowance, scope)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                row_id,
                acct.kind,
                acct.id,
                amount,
                type_,
                acct.balance,
                _dumps(metadata),
                to_us(now),
                reservation_id,
                idempotency_key,
                None if draws is None else _dumps(draws),
                spender,
                model,
                operation_type,
                allowance,
                scope,
            ),
        )
        return row_id

    def debit(self, transaction_id: str) -> E.Debit | None:
        row = self._one(
            "SELECT kind, account, amount, type, created_us, draws, draw_refunds, spender, model,"
            " scope FROM ledger WHERE id = ?",
            (transaction_id,),
        )
        if row is None:
            return None
        kind, account, amount, type_, created_us, draws, refunds, spender, model, scope = row
        return E.Debit(
            transaction_id,
            kind,
            account,
            amount,
            type_,
            from_us(created_us),
            [(str(d[0]), int(d[1])) for d in json.loads(draws)] if draws else [],
            json.loads(refunds) if refunds else None,
            spender,
            model,
            scope,
        )

    def set_refunds(self, debit: E.Debit, refunds: list[int]) -> None:
        self.conn.execute(
            "UPDATE ledger SET refunded = ?, draw_refunds = ? WHERE id = ?",
            (refunds[0], _dumps(refunds), debit.id),
        )

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
        where = ["kind = ?", "account = ?"]
        params: list[object] = [kind, account_id]
        if before is not None:
            where.append("seq < ?")
            params.append(before)
        if types is not None:
            where.append(f"type IN ({', '.join('?' * len(types))})")
            params.extend(sorted(types))
        if start is not None:
            where.append("created_us >= ?")
            params.append(to_us(start))
        if end is not None:
            where.append("created_us < ?")
            params.append(to_us(end))
        rows = self.conn.execute(
            f"SELECT {_ROW_COLUMNS} FROM ledger WHERE {' AND '.join(where)}"
            " ORDER BY seq DESC LIMIT ?",
            (*params, limit + 1),
        ).fetchall()
        return [_stored_row(row) for row in rows[:limit]], len(rows) > limit

    def spend_events(self, start: datetime, end: datetime) -> list[L.SpendEvent]:
        events = [
            L.SpendEvent(
                spender or account, model or L.UNKNOWN_MODEL, from_us(created), net, 1, scope
            )
            for spender, account, model, created, net, scope in self.conn.execute(
                "SELECT spender, account, model, created_us, -amount - refunded, scope FROM ledger"
                " INDEXED BY ledger_usage WHERE type IN ('usage', 'team_usage')"
                " AND created_us >= ? AND created_us < ? ORDER BY seq",
                (to_us(start), to_us(end)),
            )
        ]
        # Archived days, each at its UTC midnight: those whose midnight is in the window.
        events += R.rollup_events(
            self.conn.execute(
                "SELECT day, user_id, model, scope, net, count FROM rollups"
                " WHERE day >= ? AND day < ? ORDER BY day, user_id, model, scope",
                (_first_day(start), _first_day(end)),
            )
        )
        return events

    # -- growth: retention and archiving ------------------------------------------------------

    @property
    def retention(self) -> R.Retention:
        return self._retention

    def prune(self, kind: R.PruneKind, cutoff: datetime, limit: int, dry_run: bool) -> int:
        if kind == "idempotency":
            return self._prune(
                "idempotency", "rowid", "created_us < ?", (to_us(cutoff),), limit, dry_run
            )
        if kind == "holds":
            return self._prune(
                "holds", "id", "counted = 0 AND expires_us < ?", (to_us(cutoff),), limit, dry_run
            )
        day, month = R.window_keys(cutoff)
        done = 0
        for table, key, where, params in (
            (
                "spend",
                "user_id, cap_type, period, model, scope",
                "(cap_type = 'daily' AND period < ?) OR (cap_type = 'monthly' AND period < ?)",
                (day, month),
            ),
            ("allowance_used", "user_id, month", "month < ?", (month,)),
            ("member_spend", "team_id, user_id, month", "month < ?", (month,)),
            # Its key leads with the month, but named in this order the chunk's rows are
            # deleted by the whole key (SQLite plans a list led by the month by month alone).
            ("top_up_totals", "kind, account, month", "month < ?", (month,)),
        ):
            if not dry_run and done >= limit:
                break
            done += self._prune(table, key, where, params, limit - done, dry_run)
        return done

    def _prune(
        self,
        table: str,
        key: str,
        where: str,
        params: tuple[object, ...],
        limit: int,
        dry_run: bool,
    ) -> int:
        """Delete up to `limit` rows of `table` matching `where` (a dry run counts them all)."""
        if dry_run:
            count: int = self._one(f"SELECT count(*) FROM {table} WHERE {where}", params)[0]
            return count
        # A bounded chunk (SQLite's DELETE ... LIMIT is a compile-time option), found through
        # the table's index on `where` where it has one.
        chunk = f"SELECT {key} FROM {table} WHERE {where} LIMIT ?"
        return self.conn.execute(
            f"DELETE FROM {table} WHERE ({key}) IN ({chunk})", (*params, limit)
        ).rowcount

    def archive_candidates(self, before: datetime, after: int, limit: int) -> list[E.StoredRow]:
        return [
            _stored_row(row)
            for row in self.conn.execute(
                f"SELECT {_ROW_COLUMNS} FROM ledger WHERE seq > ? AND created_us < ?"
                " ORDER BY seq LIMIT ?",
                (after, to_us(before), limit),
            )
        ]

    def archive(
        self,
        rows: Sequence[E.StoredRow],
        totals: Mapping[R.RollupKey, list[int]],
        before: datetime,
    ) -> None:
        top = self._one("SELECT max(seq) FROM ledger")[0]
        deleted = self.conn.executemany(
            "DELETE FROM ledger WHERE id = ? AND refunded = ?",
            [(row.id, row.refunded) for row in rows],
        ).rowcount
        if deleted != len(rows):
            # Refunded or gone since it was read: the store rolls this operation back.
            raise E.ArchiveChanged(f"{len(rows) - deleted} of {len(rows)} rows changed")
        # SQLite numbers a new row one past the highest ``seq`` present, so deleting the newest
        # rows would hand their numbers (and the cursors made of them) out again. A placeholder
        # keeps the highest number instead; it is moved up or dropped by the next archive.
        self.conn.execute("DELETE FROM ledger WHERE id = ?", (_SEQ_MARK,))
        left = self._one("SELECT max(seq) FROM ledger")[0]
        if top is not None and (left is None or left < top):
            self.conn.execute(
                "INSERT INTO ledger (seq, id, kind, account, amount, type, balance_after,"
                " metadata, created_us) VALUES (?, ?, '', '', 0, '', 0, '{}', ?)",
                (top, _SEQ_MARK, NEVER_US),
            )
        self.conn.executemany(
            "INSERT INTO rollups (day, user_id, model, scope, net, count)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (day, user_id, model, scope)"
            " DO UPDATE SET net = net + excluded.net, count = count + excluded.count",
            [(*key, net, count) for key, (net, count) in totals.items()],
        )
        self.conn.executemany(
            "INSERT INTO archived_rows (id) VALUES (?)", [(row.id,) for row in rows]
        )
        horizon = self.archived_before()
        if horizon is None or horizon < before:
            self.conn.execute(
                "INSERT INTO settings (key, value) VALUES (?, ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (_HORIZON, str(to_us(before))),
            )

    def archived(self, transaction_id: str) -> bool:
        return self._one("SELECT 1 FROM archived_rows WHERE id = ?", (transaction_id,)) is not None

    def archived_before(self) -> datetime | None:
        row = self._one("SELECT value FROM settings WHERE key = ?", (_HORIZON,))
        return None if row is None else from_us(int(row[0]))

    # -- idempotency -------------------------------------------------------------------------

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
        if not acct.exists:
            return False, None
        row = self._one(
            "SELECT fingerprint, result, created_us FROM idempotency"
            " WHERE kind = ? AND account = ? AND op = ? AND key = ?",
            (acct.kind, acct.id, op, key),
        )
        # A record past retention is gone whether or not `prune` has deleted it yet.
        if row is None or (since is not None and row[2] < to_us(since)):
            return False, None
        if row[0] != L.fingerprint(*fingerprint):
            return True, None
        result = result_type.model_validate_json(row[1])  # type: ignore[attr-defined]
        result.idempotent = True
        return True, result

    def remember(
        self, acct: E.Account, op: str, key: str, fingerprint: tuple[object, ...], result: Any
    ) -> None:
        # An upsert: a record past retention that `prune` has not deleted yet is replaced.
        self.conn.execute(
            "INSERT INTO idempotency (kind, account, op, key, fingerprint, result, created_us)"
            " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (kind, account, op, key) DO UPDATE SET"
            " fingerprint = excluded.fingerprint, result = excluded.result,"
            " created_us = excluded.created_us",
            (
                acct.kind,
                acct.id,
                op,
                key,
                L.fingerprint(*fingerprint),
                result.model_dump_json(),
                to_us(self.now()),
            ),
        )

    # -- plans and allowance -----------------------------------------------------------------

    def plan(self, plan_id: str, version: int | None) -> PlanDefinition | None:
        if version is None:
            return None
        # A version's config never changes once written: a parsed one needs no statement.
        config = self._configs.get(version)
        if config is None:
            item = self.pricing(version)
            if item is None:
                return None
            config = item.config
        return (config.plans or {}).get(plan_id)

    def allowance_used(self, acct: E.Account, month: int) -> int:
        row = self._one(
            "SELECT amount FROM allowance_used WHERE user_id = ? AND month = ?", (acct.id, month)
        )
        return row[0] if row else 0

    def use_allowance(self, acct: E.Account, month: int, amount: int) -> None:
        self.conn.execute(
            "INSERT INTO allowance_used (user_id, month, amount) VALUES (?, ?, ?)"
            " ON CONFLICT (user_id, month) DO UPDATE SET amount = amount + excluded.amount",
            (acct.id, month, amount),
        )

    # -- caps and spend windows --------------------------------------------------------------

    def caps(self, acct: E.Account) -> Sequence[SpendCap]:
        assert isinstance(acct, _Account)
        if not acct.caps:
            return ()
        return [
            SpendCap(
                user_id=acct.id,
                cap_type=cap_type,
                model=model or None,
                scope=scope or None,
                limit=limit,
                action=action,
            )
            for cap_type, model, scope, limit, action in self.conn.execute(
                "SELECT cap_type, model, scope, cap_limit, action FROM caps WHERE user_id = ?",
                (acct.id,),
            )
        ]

    def _count_caps(self, acct: _Account) -> None:
        acct.caps = self._one("SELECT count(*) FROM caps WHERE user_id = ?", (acct.id,))[0]

    def put_cap(self, acct: E.Account, cap: SpendCap) -> None:
        assert isinstance(acct, _Account)
        self.conn.execute(
            "INSERT INTO caps (user_id, cap_type, model, scope, cap_limit, action)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (user_id, cap_type, model, scope)"
            " DO UPDATE SET cap_limit = excluded.cap_limit, action = excluded.action",
            (
                acct.id,
                cap.cap_type,
                cap.model or _ALL_MODELS,
                cap.scope or _NO_SCOPE,
                cap.limit,
                cap.action,
            ),
        )
        self._count_caps(acct)

    def remove_cap(
        self, acct: E.Account, cap_type: str, model: str | None, scope: str | None
    ) -> bool:
        assert isinstance(acct, _Account)
        removed = self.conn.execute(
            "DELETE FROM caps WHERE user_id = ? AND cap_type = ? AND model = ? AND scope = ?",
            (acct.id, cap_type, model or _ALL_MODELS, scope or _NO_SCOPE),
        ).rowcount
        self._count_caps(acct)
        return removed > 0

    def window_spend(
        self, user_id: str, cap_type: str, window: int, model: str | None, scope: str | None
    ) -> int:
        row = self._one(
            "SELECT amount FROM spend WHERE user_id = ? AND cap_type = ? AND period = ?"
            " AND model = ? AND scope = ?",
            (user_id, cap_type, window, model or _ALL_MODELS, scope or _NO_SCOPE),
        )
        return row[0] if row else 0

    def add_spend(
        self, user_id: str, model: str | None, scope: str | None, at: datetime, amount: int
    ) -> None:
        models = (_ALL_MODELS, model) if model is not None else (_ALL_MODELS,)
        scopes = (_NO_SCOPE, scope) if scope is not None else (_NO_SCOPE,)
        rows = [
            (user_id, cap_type, L.cap_window_key(cap_type, at), key, scoped, amount)
            for cap_type in ("daily", "monthly")
            for scoped in scopes
            for key in models
        ]
        self.conn.execute(
            "INSERT INTO spend (user_id, cap_type, period, model, scope, amount) VALUES"
            + ", ".join(["(?, ?, ?, ?, ?, ?)"] * len(rows))
            + " ON CONFLICT (user_id, cap_type, period, model, scope)"
            " DO UPDATE SET amount = amount + excluded.amount",
            [value for row in rows for value in row],
        )

    # -- auto top-up -------------------------------------------------------------------------

    def top_up_claim(self, acct: E.Account) -> E.TopUpClaim | None:
        row = self._one(
            "SELECT id, amount, month, expires_us FROM top_up_claims"
            " WHERE kind = ? AND account = ?",
            (acct.kind, acct.id),
        )
        return None if row is None else E.TopUpClaim(row[0], row[1], row[2], from_us(row[3]))

    def put_top_up_claim(self, acct: E.Account, claim: E.TopUpClaim | None) -> None:
        if claim is None:
            self.conn.execute(
                "DELETE FROM top_up_claims WHERE kind = ? AND account = ?", (acct.kind, acct.id)
            )
            return
        self.conn.execute(
            "INSERT INTO top_up_claims (kind, account, id, amount, month, expires_us)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (kind, account) DO UPDATE SET"
            " id = excluded.id, amount = excluded.amount, month = excluded.month,"
            " expires_us = excluded.expires_us",
            (acct.kind, acct.id, claim.id, claim.amount, claim.month, to_us(claim.expires_at)),
        )

    def top_up_total(self, acct: E.Account, month: int) -> int:
        row = self._one(
            "SELECT amount FROM top_up_totals WHERE month = ? AND kind = ? AND account = ?",
            (month, acct.kind, acct.id),
        )
        return row[0] if row else 0

    def add_top_up_total(self, acct: E.Account, month: int, delta: int) -> None:
        # A total back at zero stays, like the other window counters, until `prune`.
        self.conn.execute(
            "INSERT INTO top_up_totals (month, kind, account, amount) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (month, kind, account) DO UPDATE SET amount = amount + excluded.amount",
            (month, acct.kind, acct.id, delta),
        )

    # -- teams -------------------------------------------------------------------------------

    def member(self, team: E.Account, user_id: str) -> E.Member | None:
        row = self._one(
            "SELECT role, spend_cap FROM team_members WHERE team_id = ? AND user_id = ?",
            (team.id, user_id),
        )
        return None if row is None else E.Member(row[0], row[1])

    def put_member(self, team: E.Account, user_id: str, member: E.Member) -> None:
        self.conn.execute(
            "INSERT INTO team_members (team_id, user_id, role, spend_cap) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (team_id, user_id)"
            " DO UPDATE SET role = excluded.role, spend_cap = excluded.spend_cap",
            (team.id, user_id, member.role, member.spend_cap),
        )

    def remove_member(self, team: E.Account, user_id: str) -> bool:
        removed = self.conn.execute(
            "DELETE FROM team_members WHERE team_id = ? AND user_id = ?", (team.id, user_id)
        ).rowcount
        return bool(removed)

    def members(self, team: E.Account, month: int) -> list[TeamMember]:
        return [
            TeamMember(user_id=user_id, role=role, spend_cap=cap, total_spent=spent or 0)
            for user_id, role, cap, spent in self.conn.execute(
                "SELECT m.user_id, m.role, m.spend_cap, s.amount FROM team_members m"
                " LEFT JOIN member_spend s ON s.team_id = m.team_id AND s.user_id = m.user_id"
                " AND s.month = ? WHERE m.team_id = ? ORDER BY m.user_id",
                (month, team.id),
            )
        ]

    def member_count(self, team: E.Account) -> int:
        count: int = self._one("SELECT count(*) FROM team_members WHERE team_id = ?", (team.id,))[0]
        return count

    def member_spend(self, team: E.Account, user_id: str, month: int) -> int:
        row = self._one(
            "SELECT amount FROM member_spend WHERE team_id = ? AND user_id = ? AND month = ?",
            (team.id, user_id, month),
        )
        return row[0] if row else 0

    def add_member_spend(self, team: E.Account, user_id: str, month: int, amount: int) -> None:
        self.conn.execute(
            "INSERT INTO member_spend (team_id, user_id, month, amount) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (team_id, user_id, month)"
            " DO UPDATE SET amount = amount + excluded.amount",
            (team.id, user_id, month, amount),
        )

    # -- pricing -----------------------------------------------------------------------------

    def _version(self, row: Sequence[Any]) -> E.PricingVersion:
        version, pricing_id, config, label, created_us, effective_us, cancelled_us = row
        parsed = self._configs.get(version)
        if parsed is None:
            # A version's config never changes once written, so a parsed one can be kept.
            parsed = self._configs[version] = PricingConfigData.model_validate_json(config)
        return E.PricingVersion(
            version,
            pricing_id,
            parsed,
            label,
            from_us(created_us),
            from_us(effective_us),
            _opt_dt(cancelled_us),
        )

    def forget(self) -> None:
        """Drop what was cached from rows a rollback may have taken back."""
        self._configs.clear()

    def pricing_state(self) -> E.PricingState:
        pointer: int | None = None
        pointer_at: datetime | None = None
        scheduled: list[tuple[datetime, int]] = []
        for is_pointer, version, at_us in self.conn.execute(_PRICING_STATE):
            if is_pointer:
                pointer, pointer_at = version, from_us(at_us)
            else:
                scheduled.append((from_us(at_us), version))
        return E.PricingState(pointer, pointer_at, scheduled)

    def set_pricing_pointer(self, version: int, at: datetime) -> None:
        self.conn.execute(
            "INSERT INTO settings (key, value) VALUES (?, ?), (?, ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (_POINTER, str(version), _POINTER_AT, str(to_us(at))),
        )

    def cancel_pricing(self, version: int, at: datetime) -> None:
        self.conn.execute(
            "UPDATE pricing SET cancelled_us = ? WHERE version = ?", (to_us(at), version)
        )

    def pricing(self, version: int) -> E.PricingVersion | None:
        row = self._one(f"SELECT {_PRICING_COLUMNS} FROM pricing WHERE version = ?", (version,))
        return None if row is None else self._version(row)

    def pricing_history(self) -> list[E.PricingVersion]:
        return [
            self._version(row)
            for row in self.conn.execute(
                f"SELECT {_PRICING_COLUMNS} FROM pricing ORDER BY version DESC"
            )
        ]

    def add_pricing(self, item: E.PricingVersion) -> None:
        self.conn.execute(
            "INSERT INTO pricing (version, id, config, label, created_us, effective_us,"
            " cancelled_us) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                item.version,
                item.id,
                item.config.model_dump_json(),
                item.label,
                to_us(item.created_at),
                to_us(item.effective_at),
                _opt_us(item.cancelled_at),
            ),
        )

    def last_pricing_version(self) -> int:
        last: int = self._one("SELECT coalesce(max(version), 0) FROM pricing")[0]
        return last
