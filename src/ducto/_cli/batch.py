"""
``ducto grant --csv FILE``: many grants from a CSV file, each under its own idempotency key.

The whole file is checked before anything is granted, so a typo on line 900 grants nothing.

A row's key is its ``key`` column, or else is made from what the row grants:
``BATCH:AMOUNT:TYPE[:EXPIRES][#N]``, where BATCH is ``--batch`` (the file's name without its
suffix by default), EXPIRES is the expiry as written, and ``#N`` numbers the second and later
identical rows of one user. Keys are per user. So re-running a batch (after an interruption, a
store failure, or a fix to some rows) applies nothing twice: rows applied before replay, and
adding or removing rows never changes another row's key. A row whose amount, type or expiry
was changed is a different grant.

An expiry written as a duration (``30d``) is counted from the moment of the run, so a re-run
asks for a slightly later expiry under the same key, which the store refuses as a
conflicting request; such a row counts as applied before when the user's ledger holds the
key's grant with the same amount and type.
"""

from __future__ import annotations

import csv
import hashlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Final

import anyio

from ducto._cli.commands import GRANT_TYPES, applied_before, expires_at, grant_amount
from ducto._cli.context import Context, refusal
from ducto._cli.output import Output, Progress
from ducto._cli.values import UsageError, parse_duration
from ducto._shown import shown
from ducto.errors import ErrorCode, InvalidArgumentError, StoreError
from ducto.interface.base import CreditStore

_COLUMNS: Final = {
    "user_id": "user_id",
    "user": "user_id",
    "amount": "amount",
    "type": "type",
    "expires": "expires",
    "expires_at": "expires",
    "key": "key",
    "idempotency_key": "key",
}
_MAX_KEY: Final = 256
_MAX_BATCH: Final = 200
_SHOWN_PROBLEMS: Final = 20


@dataclass
class Row:
    """One grant of the file, checked."""

    line: int
    user_id: str
    amount: int
    type: str
    expires_at: datetime | None
    key: str
    relative_expiry: bool = False
    outcome: str = "pending"
    transaction_id: str = ""
    error: str | None = None
    message: str | None = None

    def as_dict(self) -> dict[str, object]:
        """The row and what happened to it, as JSON data."""
        return {
            "line": self.line,
            "user_id": self.user_id,
            "amount": self.amount,
            "type": self.type,
            "expires_at": self.expires_at.isoformat() if self.expires_at else None,
            "key": self.key,
            "outcome": self.outcome,
            "transaction_id": self.transaction_id or None,
            "error": self.error,
            "message": self.message,
        }


@dataclass
class Tally:
    """Counts of outcomes, and the first store failure if one stopped the batch."""

    outcomes: Counter[str] = field(default_factory=Counter)
    credits: int = 0
    failure: StoreError | None = None


def derived_key(batch: str, amount: int, grant_type: str, expires: str, occurrence: int) -> str:
    """
    The idempotency key of a row of `batch` without a ``key`` column.

    Args:
        batch: The batch name.
        amount: The credits the row grants.
        grant_type: The ledger type.
        expires: The expiry as written ("" for none).
        occurrence: How many identical rows of this user came before it, plus one.
    """
    key = f"{batch}:{amount}:{grant_type}"
    if expires:
        key += f":{expires}"
    if occurrence > 1:
        key += f"#{occurrence}"
    if len(key) <= _MAX_KEY:
        return key
    return "csv:" + hashlib.sha256(key.encode()).hexdigest()


def read_rows(ctx: Context, name: str, batch: str) -> list[Row]:
    """
    Read and check every row of the CSV file; raise one usage error listing the bad rows.

    Raises:
        UsageError: The file is missing or unreadable, has no ``user_id`` and ``amount``
            columns or an unknown column, or some rows are invalid.
    """
    path = Path(name)
    try:
        handle = path.open(encoding="utf-8-sig", newline="")
    except FileNotFoundError:
        raise UsageError(f"{name}: no such file") from None
    except OSError as exc:
        raise UsageError(f"{name}: cannot read it ({exc.strerror or exc})") from None
    problems: list[str] = []
    rows: list[Row] = []
    seen: Counter[str] = Counter()
    with handle:
        try:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None:
                raise UsageError(f"{name}: the file is empty; it needs a header row")
            columns: list[str] = []
            for title in header:
                column = _COLUMNS.get(title.strip().lower())
                if column is None:
                    raise UsageError(
                        f"{name}: unknown column {title.strip()!r}; the columns are user_id, "
                        "amount, and optionally type, expires, key"
                    )
                columns.append(column)
            if "user_id" not in columns or "amount" not in columns:
                raise UsageError(f"{name}: the header must name the user_id and amount columns")
            for cells in reader:
                line = reader.line_num
                if not any(cell.strip() for cell in cells):
                    continue
                if len(cells) != len(columns):
                    problems.append(f"line {line}: {len(cells)} values for {len(columns)} columns")
                    continue
                values = dict(zip(columns, (cell.strip() for cell in cells), strict=True))
                row = _check_row(ctx, values, line, batch, seen, problems)
                if row is not None:
                    rows.append(row)
        except UnicodeDecodeError as exc:
            raise UsageError(f"{name}: not UTF-8 text ({exc.reason})") from None
        except csv.Error as exc:
            raise UsageError(f"{name}: not valid CSV: {exc}") from None
    if len(problems) == 1:
        raise UsageError(f"{name}: {problems[0]}; nothing was granted")
    if problems:
        for problem in problems[:_SHOWN_PROBLEMS]:
            Output.note(f"ducto: {name}: {problem}")
        hidden = len(problems) - _SHOWN_PROBLEMS
        shown = "listed above" if hidden <= 0 else f"the first {_SHOWN_PROBLEMS} listed above"
        raise UsageError(f"{name}: {len(problems)} bad rows ({shown}); nothing was granted")
    if not rows:
        raise UsageError(f"{name}: no rows to grant")
    return rows


def _check_row(
    ctx: Context,
    values: dict[str, str],
    line: int,
    batch: str,
    seen: Counter[str],
    problems: list[str],
) -> Row | None:
    try:
        return _row(ctx, values, line, batch, seen)
    except UsageError as exc:
        problems.append(f"line {line}: {exc}")
        return None


def _row(ctx: Context, values: dict[str, str], line: int, batch: str, seen: Counter[str]) -> Row:
    user_id = values["user_id"]
    grant_type = values.get("type") or ctx.args.type
    if not user_id:
        raise UsageError("user_id is empty")
    if grant_type not in GRANT_TYPES:
        raise UsageError(f"type must be one of {', '.join(GRANT_TYPES)}, got {shown(grant_type)}")
    amount = grant_amount(values["amount"], grant_type, "amount")
    expires = values.get("expires") or ctx.args.expires or ""
    expiry = expires_at(ctx, expires)
    key = values.get("key")
    if not key:
        identity = "\0".join((user_id, str(amount), grant_type, expires))
        seen[identity] += 1
        key = derived_key(batch, amount, grant_type, expires, seen[identity])
    if len(key) > _MAX_KEY:
        raise UsageError(f"key must be at most {_MAX_KEY} characters")
    relative = bool(expires) and parse_duration(expires) is not None
    return Row(line, user_id, amount, grant_type, expiry, key, relative)


async def _apply(store: CreditStore, row: Row, tally: Tally) -> None:
    try:
        result = await store.add_credits(
            row.user_id, row.amount, row.type, None, row.expires_at, idempotency_key=row.key
        )
    except InvalidArgumentError as exc:
        row.outcome, row.message = "invalid", str(exc)
    else:
        earlier = None
        if result.error is ErrorCode.IDEMPOTENCY_CONFLICT and row.relative_expiry:
            earlier = await applied_before(store, row.user_id, row.key, row.amount, row.type)
        if earlier is not None:
            row.outcome, row.transaction_id = "replayed", earlier.id
        elif result.error is not None:
            row.outcome, row.error = "refused", str(result.error)
            row.message = refusal(result, abs(row.amount))
        else:
            row.outcome = "replayed" if result.idempotent else "applied"
            row.transaction_id = result.transaction_id
            if not result.idempotent:
                tally.credits += row.amount
    tally.outcomes[row.outcome] += 1


async def cmd_grant_csv(ctx: Context) -> int:
    """Apply every grant of a CSV file; see the module docstring for the keys."""
    args = ctx.args
    if args.user is not None or args.amount is not None:
        raise UsageError("give either USER AMOUNT or --csv FILE, not both")
    if args.key is not None:
        raise UsageError("--key names one grant; with --csv put a key column in the file")
    name: str = args.csv
    batch: str = args.batch if args.batch is not None else Path(name).stem
    if not batch or len(batch) > _MAX_BATCH:
        raise UsageError(f"--batch must be 1 to {_MAX_BATCH} characters, got {shown(batch)}")
    rows = read_rows(ctx, name, batch)
    if args.dry_run:
        return _show(ctx, name, batch, rows, Tally(), dry_run=True)

    store = await ctx.store()
    tally = Tally()
    progress = Progress(len(rows), "granting", enabled=args.progress)
    pending: Iterator[Row] = iter(rows)

    async def worker(scope: anyio.CancelScope) -> None:
        for row in pending:
            try:
                await _apply(store, row, tally)
            except StoreError as exc:
                row.outcome = "not applied"
                if tally.failure is None:
                    tally.failure = exc
                scope.cancel()
                return
            progress.advance()

    try:
        async with anyio.create_task_group() as tg:
            for _ in range(min(args.jobs, len(rows))):
                tg.start_soon(worker, tg.cancel_scope)
    finally:
        progress.close()
    status = _show(ctx, name, batch, rows, tally, dry_run=False)
    if tally.failure is not None:
        Output.note(
            f"ducto: stopped after {sum(tally.outcomes.values()):,} of {len(rows):,} rows; "
            "run the same command again to finish (rows already applied are not applied twice)"
        )
        raise tally.failure
    return status


def _show(
    ctx: Context, name: str, batch: str, rows: list[Row], tally: Tally, *, dry_run: bool
) -> int:
    out = ctx.out
    outcomes = tally.outcomes
    if out.as_json:
        out.json(
            {
                "file": name,
                "batch": batch,
                "dry_run": dry_run,
                "rows": len(rows),
                "applied": outcomes["applied"],
                "replayed": outcomes["replayed"],
                "refused": outcomes["refused"],
                "invalid": outcomes["invalid"],
                "credits": tally.credits,
                "results": [row.as_dict() for row in rows],
            }
        )
    if dry_run:
        out.text(
            f"{name}: {len(rows):,} valid rows, batch {batch!r}; nothing was granted (dry run)"
        )
        out.table(
            ["line", "user", "amount", "type", "expires (UTC)", "key"],
            [(r.line, r.user_id, r.amount, r.type, r.expires_at, r.key) for r in rows],
            empty="",
        )
        return 0
    for row in rows:
        if row.outcome in ("refused", "invalid"):
            Output.note(f"ducto: {name} line {row.line}: {row.message}")
    out.text(f"{name}: batch {batch!r}, {len(rows):,} rows")
    out.pairs(
        [
            ("applied", outcomes["applied"]),
            ("credits granted", tally.credits),
            ("already applied before", outcomes["replayed"]),
            ("refused", outcomes["refused"]),
            ("invalid", outcomes["invalid"]),
        ]
    )
    if rows and outcomes["replayed"] == len(rows):
        Output.note(
            f"ducto: every row of batch {batch!r} was applied before; nothing was granted now "
            "(to grant these again, pass a new --batch)"
        )
    if outcomes["invalid"]:
        return 2
    if outcomes["refused"]:
        return 1
    return 0
