"""
The commands: each takes the `Context`, does its work through the async store API and
returns the exit status (0 done, 1 refused by the books).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Literal

import anyio
from pydantic import BaseModel

from ducto._cli.context import Context, refusal
from ducto._cli.output import Output, cell
from ducto._cli.pricing_files import (
    check_config,
    diff_configs,
    read_config_file,
    summary,
    write_config_text,
)
from ducto._cli.values import (
    NotFoundError,
    UsageError,
    parse_aware_instant,
    parse_credits,
    parse_duration,
    parse_instant,
)
from ducto._shown import shown
from ducto.errors import ErrorCode, PricingVersionNotFoundError
from ducto.interface.base import CreditStore
from ducto.interface.models import (
    AddCreditsResult,
    PricingConfigData,
    PricingConfigHistoryItem,
    SpendCap,
    TransactionPage,
    TransactionRow,
)

OK = 0
REFUSED = 1


def report(
    ctx: Context, result: BaseModel, show: Callable[[], None], asked: int | None = None
) -> int:
    """
    Print a store result (JSON, or `show` for people) and turn its ``error`` into the status.

    A refused result prints its JSON too (scripts read the code there) and one line on stderr.
    """
    error = getattr(result, "error", None)
    if ctx.out.as_json:
        ctx.out.json(result)
    if error is not None:
        Output.note(f"ducto: {refusal(result, asked)}")
        return REFUSED
    if not ctx.out.as_json:
        show()
    return OK


def _model_of(row: TransactionRow) -> object:
    return row.metadata.get("model")


def _ledger_table(out: Output, page: TransactionPage, account: str) -> None:
    out.table(
        [
            "time (UTC)",
            "transaction",
            "type",
            "amount",
            "balance after",
            "refunded",
            "model",
            "key",
        ],
        [
            (
                row.created_at,
                row.id,
                row.type,
                row.amount,
                row.balance_after,
                row.refunded or None,
                _model_of(row),
                row.idempotency_key,
            )
            for row in page.items
        ],
        empty=f"no ledger rows for {account!r}",
    )
    if page.next_cursor is not None:
        out.text(f"more rows: add --cursor {page.next_cursor}")


def _window(ctx: Context) -> tuple[datetime, datetime]:
    args = ctx.args
    until = (
        parse_instant(args.until, "--until", now=ctx.now, future=False) if args.until else ctx.now
    )
    since = (
        parse_instant(args.since, "--since", now=ctx.now, future=False)
        if args.since
        else until - timedelta(days=30)
    )
    if since >= until:
        raise UsageError(
            f"--since must be before --until, got {since:%Y-%m-%d %H:%M:%SZ} "
            f"and {until:%Y-%m-%d %H:%M:%SZ}"
        )
    return since, until


def expires_at(ctx: Context, text: str | None) -> datetime | None:
    """The ``--expires`` value as an aware instant, checked to be in the future."""
    if not text:
        return None
    moment = parse_instant(text, "--expires", now=ctx.now, future=True)
    if moment <= ctx.now:
        raise UsageError(f"--expires must be in the future, got {shown(text)}")
    return moment


# -- setup ---------------------------------------------------------------------------------------


async def cmd_setup(ctx: Context) -> int:
    """Create or migrate the schema."""
    store = await ctx.store(creating=True)
    result = await store.setup()
    if ctx.out.as_json:
        ctx.out.json(result)
    for error in result.errors:
        Output.note(f"ducto: setup: {ctx.redact(error)}")
    if result.errors:
        return 3
    created = ", ".join(result.tables_created)
    ctx.out.text(
        f"schema version {result.schema_version} is ready"
        + (f" (created {created})" if created else " (nothing to do)")
    )
    return OK


# -- pricing -------------------------------------------------------------------------------------


async def cmd_pricing_validate(ctx: Context) -> int:
    """Check a pricing file the way publishing would, reporting every problem."""
    name: str = ctx.args.file
    data = read_config_file(name)
    problems = check_config(data)
    if ctx.out.as_json:
        ctx.out.json(
            {"file": name, "valid": not problems, "problems": [p.as_dict() for p in problems]}
        )
    for problem in problems:
        Output.note(f"ducto: {name}: {problem}")
    if len(problems) > 1:
        Output.note(f"ducto: {name}: {len(problems)} problems")
    if problems:
        return 2
    ctx.out.text(f"{name}: valid ({summary(PricingConfigData.model_validate(data))})")
    return OK


def _checked_config(name: str) -> PricingConfigData:
    data = read_config_file(name)
    problems = check_config(data)
    if len(problems) == 1:
        raise UsageError(f"{name}: {problems[0]}; nothing was published")
    if problems:
        for problem in problems:
            Output.note(f"ducto: {name}: {problem}")
        raise UsageError(f"{name}: {len(problems)} problems (listed above); nothing was published")
    return PricingConfigData.model_validate(data)


def _state(item: PricingConfigHistoryItem) -> str | None:
    """Whether a version is in force, scheduled or cancelled (None: none of these now)."""
    if item.cancelled_at is not None:
        return "cancelled"
    if item.active:
        return "in force"
    if item.scheduled:
        return "scheduled"
    return None


def _next_scheduled(history: Sequence[PricingConfigHistoryItem]) -> PricingConfigHistoryItem | None:
    """The scheduled version that takes effect first, if any."""
    pending = [item for item in history if item.scheduled and item.effective_at is not None]
    return min(pending, key=lambda item: (item.effective_at, item.version), default=None)


def _effective_at(ctx: Context) -> datetime | None:
    """``--effective-at``: an aware instant after now, or None to publish at once."""
    text: str | None = ctx.args.effective_at
    if text is None:
        return None
    moment = parse_aware_instant(text, "--effective-at")
    if moment <= ctx.now:
        raise UsageError(
            f"--effective-at must be in the future (leave it out to publish now), got {shown(text)}"
        )
    return moment


async def cmd_pricing_set(ctx: Context) -> int:
    """Publish a pricing file as a new version, in force now or scheduled."""
    config = _checked_config(ctx.args.file)
    effective_at = _effective_at(ctx)
    store = await ctx.store()
    version_id = await store.set_active_pricing(config, ctx.args.label, effective_at=effective_at)
    history = await store.get_pricing_history()
    item = next((entry for entry in history if entry.id == version_id), None)
    version = item.version if item is not None else None
    if ctx.out.as_json:
        fields = {"id", "version", "label", "active", "scheduled", "effective_at"}
        ctx.out.json(
            item.model_dump(mode="json", include=fields)
            if item is not None
            else {"id": version_id, "version": None, "label": ctx.args.label}
        )
        return OK
    number = version if version is not None else "?"
    if item is not None and item.scheduled:
        current = next((entry for entry in history if entry.active), None)
        until = (
            f"; version {current.version} stays in force until then"
            if current is not None
            else "; no version is in force until then"
        )
        ctx.out.text(
            f"scheduled pricing version {number} (id {version_id}) to take effect at "
            f"{cell(item.effective_at)}{until}: {summary(config)}"
        )
        return OK
    ctx.out.text(
        f"published pricing version {number} (id {version_id}), in force now: {summary(config)}"
    )
    following = _next_scheduled(history)
    if following is not None:
        Output.note(
            f"ducto: scheduled version {following.version} still takes effect at "
            f"{cell(following.effective_at)}"
        )
    return OK


async def cmd_pricing_get(ctx: Context) -> int:
    """Show the pricing version in force."""
    store = await ctx.store()
    active = await store.get_active_pricing()
    if active is None:
        if ctx.out.as_json:
            ctx.out.json(None)
        first = _next_scheduled(await store.get_pricing_history())
        if first is not None:
            raise NotFoundError(
                f"no pricing in force yet: version {first.version} takes effect at "
                f"{cell(first.effective_at)}"
            )
        raise NotFoundError("no pricing published yet: publish one with 'ducto pricing set FILE'")
    if ctx.out.as_json:
        ctx.out.json(active)
        return OK
    following = _next_scheduled(await store.get_pricing_history())
    ctx.out.pairs(
        [
            ("version", active.version),
            ("id", active.id),
            ("label", active.label),
            ("created", active.created_at),
            ("effective", active.effective_at),
            (
                "next",
                f"version {following.version} at {cell(following.effective_at)}"
                if following is not None
                else None,
            ),
            ("prices", summary(active.config)),
        ]
    )
    ctx.out.text()
    ctx.out.text(write_config_text(active.config, as_yaml=False).rstrip())
    return OK


async def cmd_pricing_list(ctx: Context) -> int:
    """List every pricing version, newest first, with when it takes effect and its state."""
    store = await ctx.store()
    history = await store.get_pricing_history()
    if ctx.out.as_json:
        ctx.out.json(history)
        return OK
    ctx.out.table(
        ["version", "state", "effective (UTC)", "label", "created (UTC)", "id"],
        [
            (item.version, _state(item), item.effective_at, item.label, item.created_at, item.id)
            for item in history
        ],
        empty="no pricing published yet",
    )
    return OK


def _version(text: str) -> int | Literal["active"]:
    if text == "active":
        return "active"
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise UsageError(f"VERSION must be a version number (1, 2, ...) or 'active', got {shown(text)}")


async def _load_version(ctx: Context, text: str) -> PricingConfigData:
    version = _version(text)
    store = await ctx.store()
    found = (
        await store.get_active_pricing()
        if version == "active"
        else await store.get_pricing_config(version)
    )
    if found is None:
        if version == "active":
            raise NotFoundError("no pricing version is in force, so there is no active version")
        raise PricingVersionNotFoundError(version)
    return found.config


def _version_number(text: str, command: str) -> int:
    version = _version(text)
    if version == "active":
        raise UsageError(f"{command} needs a version number")
    return version


async def cmd_pricing_activate(ctx: Context) -> int:
    """Put an existing pricing version in force now."""
    version = _version_number(ctx.args.version, "activate")
    store = await ctx.store()
    version_id = await store.activate_pricing(version)
    if ctx.out.as_json:
        ctx.out.json({"id": version_id, "version": version, "active": True})
        return OK
    ctx.out.text(f"pricing version {version} (id {version_id}) is now in force")
    following = _next_scheduled(await store.get_pricing_history())
    if following is not None:
        Output.note(
            f"ducto: until scheduled version {following.version} takes effect at "
            f"{cell(following.effective_at)} (cancel it with "
            f"'ducto pricing cancel {following.version}' to keep version {version})"
        )
    return OK


async def cmd_pricing_cancel(ctx: Context) -> int:
    """Cancel a scheduled pricing version before it takes effect."""
    version = _version_number(ctx.args.version, "cancel")
    store = await ctx.store()
    cancelled = await store.cancel_pricing(version)
    if ctx.out.as_json:
        ctx.out.json(cancelled)
        return OK
    ctx.out.text(
        f"cancelled pricing version {version} (id {cancelled.id}), which was to take effect "
        f"at {cell(cancelled.effective_at)}"
    )
    return OK


async def cmd_pricing_export(ctx: Context) -> int:
    """Write a version's config in the form ``pricing set`` reads."""
    config = await _load_version(ctx, ctx.args.version)
    output: str | None = ctx.args.output
    fmt: str | None = ctx.args.format
    if fmt is None:
        fmt = "yaml" if output and Path(output).suffix.lower() in (".yaml", ".yml") else "json"
    if ctx.out.as_json and fmt == "yaml":
        raise UsageError("--json writes JSON; leave out --format yaml")
    text = write_config_text(config, as_yaml=fmt == "yaml")
    if output is None:
        ctx.out.out.write(text)
        return OK
    try:
        await anyio.Path(output).write_text(text, encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"{output}: cannot write it ({exc.strerror or exc})") from None
    Output.note(f"wrote pricing version {ctx.args.version} to {output}")
    return OK


async def _diff_side(ctx: Context, text: str) -> tuple[str, PricingConfigData]:
    if text == "active" or text.isdigit():
        label = "the active version" if text == "active" else f"version {text}"
        return label, await _load_version(ctx, text)
    return text, _checked_config(text)


async def cmd_pricing_diff(ctx: Context) -> int:
    """Compare two pricing configs (versions, ``active`` or files), entry by entry."""
    old_label, old = await _diff_side(ctx, ctx.args.old)
    new_label, new = await _diff_side(ctx, ctx.args.new)
    changes = diff_configs(old, new)
    if ctx.out.as_json:
        ctx.out.json(
            {
                "old": ctx.args.old,
                "new": ctx.args.new,
                "changes": [change.as_dict() for change in changes],
            }
        )
        return OK
    if not changes:
        ctx.out.text(f"no differences between {old_label} and {new_label}")
        return OK
    ctx.out.text(
        f"from {old_label} to {new_label}: {len(changes)} change{'s' if len(changes) > 1 else ''}"
    )
    for change in changes:
        if change.change == "added":
            ctx.out.text(f"  + {change.where}: {change.new!r}")
        elif change.change == "removed":
            ctx.out.text(f"  - {change.where}: {change.old!r}")
        else:
            ctx.out.text(f"  ~ {change.where}: {change.old!r} -> {change.new!r}")
    return OK


# -- accounts ------------------------------------------------------------------------------------


GRANT_TYPES = ("adjustment", "purchase", "subscription", "signup_bonus")


def grant_amount(text: str, grant_type: str, name: str = "AMOUNT") -> int:
    """Credits to grant: positive, or negative for an ``adjustment`` (it takes credits back)."""
    if grant_type == "adjustment":
        amount = parse_credits(text, name, minimum=-(2**62))
        if amount == 0:
            raise UsageError(f"{name} must not be 0")
        return amount
    if text.strip().startswith("-"):
        raise UsageError(
            f"{name} must be positive for a {grant_type!r} grant "
            f"(only an 'adjustment' may be negative), got {shown(text)}"
        )
    return parse_credits(text, name)


async def applied_before(
    store: CreditStore, user_id: str, key: str, amount: int, grant_type: str
) -> TransactionRow | None:
    """
    The user's ledger row granted under `key` with this amount and type, if there is one.

    Used when a grant whose expiry is a duration (so a new instant at each run) meets its
    own key again. Reads at most 1,000 of the user's newest rows of that type.
    """
    cursor: str | None = None
    seen = 0
    while seen < 1_000:
        page = await store.list_transactions(user_id, limit=100, cursor=cursor, types=[grant_type])
        for row in page.items:
            if row.idempotency_key == key:
                return row if row.amount == amount else None
        seen += len(page.items)
        cursor = page.next_cursor
        if cursor is None:
            break
    return None


async def cmd_grant(ctx: Context) -> int:
    """Grant credits to one user (``--csv`` is handled by the batch module)."""
    args = ctx.args
    if args.user is None or args.amount is None:
        raise UsageError("grant needs USER and AMOUNT, or --csv FILE")
    amount = grant_amount(args.amount, args.type)
    expiry = expires_at(ctx, args.expires)
    store = await ctx.store()
    result = await store.add_credits(
        args.user, amount, args.type, None, expiry, idempotency_key=args.key
    )
    if (
        result.error is ErrorCode.IDEMPOTENCY_CONFLICT
        and args.key
        and parse_duration(args.expires or "") is not None
    ):
        earlier = await applied_before(store, args.user, args.key, amount, args.type)
        if earlier is not None:
            # The same grant, asked again later: its duration gave a later instant.
            result = AddCreditsResult(
                transaction_id=earlier.id,
                user_id=args.user,
                amount=earlier.amount,
                requested=amount,
                new_balance=earlier.balance_after,
                idempotent=True,
                idempotency_key=args.key,
            )

    def show() -> None:
        if result.idempotent:
            ctx.out.text(
                f"already applied: key {result.idempotency_key!r} was used before; "
                "nothing was granted this time"
            )
            ctx.out.pairs(
                [
                    ("transaction", result.transaction_id),
                    ("user", result.user_id),
                    ("amount", result.amount),
                    ("key", result.idempotency_key),
                ]
            )
            return
        ctx.out.pairs(
            [
                ("transaction", result.transaction_id),
                ("user", result.user_id),
                ("amount", result.amount),
                ("type", args.type),
                ("expires (UTC)", result.expires_at),
                ("balance", result.new_balance),
                ("available", result.available),
                ("key", result.idempotency_key),
            ]
        )

    return report(ctx, result, show, asked=abs(amount))


async def cmd_balance(ctx: Context) -> int:
    """Show a user's balance and the lots it is made of."""
    store = await ctx.store()
    user: str = ctx.args.user
    balance = await store.get_balance(user)
    lots = await store.list_lots(user)
    if ctx.out.as_json:
        ctx.out.json(
            {
                **balance.model_dump(mode="json"),
                "lots": [lot.model_dump(mode="json") for lot in lots],
            }
        )
        return OK
    ctx.out.pairs(
        [
            ("user", balance.user_id),
            ("balance", balance.balance),
            ("available", balance.available),
            ("held", balance.reserved),
            ("expired, not swept", balance.expired_unswept),
            ("plan allowance left", balance.allowance_remaining),
            ("lifetime purchased", balance.lifetime_purchased),
        ]
    )
    if lots:
        ctx.out.text()
        ctx.out.table(
            ["lot", "remaining", "expires (UTC)", "expired"],
            [(lot.id, lot.remaining, lot.expires_at, lot.expired) for lot in lots],
            empty="",
        )
    return OK


async def cmd_ledger(ctx: Context) -> int:
    """Show a user's ledger rows, newest first."""
    args = ctx.args
    store = await ctx.store()
    start = parse_instant(args.since, "--since", now=ctx.now, future=False) if args.since else None
    end = parse_instant(args.until, "--until", now=ctx.now, future=False) if args.until else None
    page = await store.list_transactions(
        args.user, limit=args.limit, cursor=args.cursor, types=args.types, start=start, end=end
    )
    if ctx.out.as_json:
        ctx.out.json(page)
        return OK
    _ledger_table(ctx.out, page, args.user)
    return OK


async def cmd_refund(ctx: Context) -> int:
    """Refund (part of) a usage debit."""
    args = ctx.args
    amount = parse_credits(args.amount, "AMOUNT") if args.amount is not None else None
    store = await ctx.store()
    result = await store.refund_credits(
        args.transaction, amount, args.reason, idempotency_key=args.key
    )

    def show() -> None:
        if result.idempotent:
            ctx.out.text(f"already applied: key {result.idempotency_key!r} was used before")
        ctx.out.pairs(
            [
                ("refund", result.refund_transaction_id),
                ("of", result.original_transaction_id),
                ("account", result.team_id or result.user_id),
                ("amount", result.amount),
                ("balance", result.new_balance),
                ("still refundable", result.refundable),
            ]
        )

    return report(ctx, result, show, asked=amount)


async def cmd_release(ctx: Context) -> int:
    """Free a hold."""
    store = await ctx.store()
    result = await store.release_reservation(
        ctx.args.user, ctx.args.reservation, team_id=ctx.args.team
    )

    def show() -> None:
        ctx.out.text(f"hold {result.reservation_id} is released")
        ctx.out.pairs(
            [
                ("user", result.user_id),
                ("team", result.team_id),
                ("credits freed", result.amount),
                ("available", result.available),
            ]
        )

    return report(ctx, result, show)


async def cmd_sweep(ctx: Context) -> int:
    """Write off the unspent remainder of every expired lot."""
    store = await ctx.store()
    result = await store.sweep_expired_credits(ctx.args.dry_run)
    if ctx.out.as_json:
        ctx.out.json(result)
        return OK
    verb = "would write off" if result.dry_run else "wrote off"
    ctx.out.text(
        f"{verb} {result.expired_amount:,} credits from {result.expired_count:,} expired lots"
    )
    return OK


async def cmd_stats(ctx: Context) -> int:
    """Spend over a window: totals, or grouped by user, model, day or budget scope."""
    args = ctx.args
    if args.user is not None and args.by != "scope":
        raise UsageError("--user goes with --by scope")
    since, until = _window(ctx)
    store = await ctx.store()
    window = {"since": since, "until": until}
    top: int | None = args.top
    if args.by is None:
        totals = await store.aggregate_stats(since, until)
        leaders = await store.top_users(top, since, until) if top else []
        if ctx.out.as_json:
            ctx.out.json({**window, "totals": totals, "top_users": leaders})
            return OK
        ctx.out.text(f"spend from {since:%Y-%m-%d %H:%M:%SZ} to {until:%Y-%m-%d %H:%M:%SZ} (UTC)")
        ctx.out.pairs(
            [
                ("credits consumed", totals.total_credits_consumed),
                ("charges", totals.transaction_count),
                ("active users", totals.active_users),
                ("average per day", totals.avg_daily_spend),
                ("top model", totals.top_model or None),
                ("top user", totals.top_user or None),
            ]
        )
        if top:
            ctx.out.text()
            ctx.out.table(
                ["user", "spend"],
                [(r.user_id, r.total_spend) for r in leaders],
                empty="no spend in this window",
            )
        return OK
    headers: Sequence[str]
    rows: list[tuple[object, ...]]
    if args.by == "user":
        by_user = await store.spend_by_user(since, until)
        data: list[BaseModel] = list(by_user[: top or None])
        headers = ["user", "spend", "charges"]
        rows = [(r.user_id, r.total_spend, r.transaction_count) for r in by_user[: top or None]]
    elif args.by == "model":
        by_model = await store.spend_by_model(since, until)
        data = list(by_model[: top or None])
        headers = ["model", "spend", "charges"]
        rows = [(r.model, r.total_spend, r.transaction_count) for r in by_model[: top or None]]
    elif args.by == "scope":
        by_scope = await store.spend_by_scope(since, until, user_id=args.user)
        data = list(by_scope[: top or None])
        headers = ["user", "scope", "spend", "charges"]
        rows = [
            (r.user_id, r.scope or _UNSCOPED, r.total_spend, r.transaction_count)
            for r in by_scope[: top or None]
        ]
    else:
        by_day = await store.daily_spend(since, until)
        data = list(by_day[: top or None])
        headers = ["day (UTC)", "spend", "charges"]
        rows = [(r.date, r.total_spend, r.transaction_count) for r in by_day[: top or None]]
    if ctx.out.as_json:
        ctx.out.json({**window, "by": args.by, "rows": data})
        return OK
    whose = f" of {args.user!r}" if args.user is not None else ""
    ctx.out.text(
        f"spend by {args.by}{whose} from {since:%Y-%m-%d %H:%M:%SZ} "
        f"to {until:%Y-%m-%d %H:%M:%SZ} (UTC)"
    )
    ctx.out.table(headers, rows, empty="no spend in this window")
    return OK


# -- spend caps ----------------------------------------------------------------------------------


_UNSCOPED = "(unscoped)"
_ALL_USAGE = "(all usage)"


def _cap_rows(caps: Sequence[SpendCap]) -> list[tuple[object, ...]]:
    return [
        (
            cap.user_id,
            cap.cap_type,
            cap.model or "(all models)",
            cap.scope or _ALL_USAGE,
            cap.limit,
            cap.action,
        )
        for cap in caps
    ]


_CAP_HEADERS = ["user", "period", "model", "scope", "limit", "action"]


def _scope(ctx: Context) -> str | None:
    """``--scope``, refused when empty (an empty scope would name no budget)."""
    scope: str | None = ctx.args.scope
    if scope is not None and not scope:
        raise UsageError("--scope must not be empty (leave it out for all of the user's spend)")
    return scope


def _cap_name(period: str, model: str | None, scope: str | None) -> str:
    """``daily cap on 'gpt-4o' in scope 'key_1'``."""
    return (
        f"{period} cap"
        + (f" on {model!r}" if model else "")
        + (f" in scope {scope!r}" if scope is not None else "")
    )


async def cmd_caps_set(ctx: Context) -> int:
    """Create or replace a spend cap."""
    args = ctx.args
    limit = parse_credits(args.limit, "LIMIT", minimum=0)
    cap = SpendCap(
        user_id=args.user,
        cap_type=args.period,
        model=args.model,
        limit=limit,
        action=args.action,
        scope=_scope(ctx),
    )
    store = await ctx.store()
    saved = await store.set_spend_cap(cap)
    if ctx.out.as_json:
        ctx.out.json(saved)
        return OK
    ctx.out.table(_CAP_HEADERS, _cap_rows([saved]), empty="")
    return OK


async def cmd_caps_list(ctx: Context) -> int:
    """List a user's spend caps."""
    store = await ctx.store()
    caps = await store.list_spend_caps(ctx.args.user)
    if ctx.out.as_json:
        ctx.out.json(caps)
        return OK
    ctx.out.table(_CAP_HEADERS, _cap_rows(caps), empty=f"no spend caps for {ctx.args.user!r}")
    return OK


async def cmd_caps_remove(ctx: Context) -> int:
    """Remove a spend cap."""
    args = ctx.args
    scope = _scope(ctx)
    store = await ctx.store()
    result = await store.remove_spend_cap(args.user, args.period, args.model, scope=scope)
    if ctx.out.as_json:
        ctx.out.json(result)
    cap = _cap_name(args.period, args.model, scope)
    if not result.removed:
        Output.note(f"ducto: {args.user!r} has no {cap}")
        return REFUSED
    ctx.out.text(f"removed the {cap} of {args.user!r}")
    return OK


async def cmd_caps_check(ctx: Context) -> int:
    """Advisory: would more spend trip a cap?"""
    args = ctx.args
    amount = parse_credits(args.amount, "--amount", minimum=0) if args.amount is not None else None
    scope = _scope(ctx)
    store = await ctx.store()
    result = await store.check_spend_cap(args.user, args.model, amount, scope=scope)
    if ctx.out.as_json:
        ctx.out.json(result)
        return OK
    if result.action is None:
        ctx.out.text(
            f"no spend cap applies to {args.user!r}"
            + (f" for {args.model!r}" if args.model else "")
            + (f" in scope {scope!r}" if scope is not None else "")
        )
        return OK
    if result.capped:
        verdict = "would be refused (deny cap)"
    elif result.exceeded:
        verdict = f"over the limit ({result.action} cap: allowed, reported)"
    else:
        verdict = "within the limit"
    ctx.out.pairs(
        [
            ("verdict", verdict),
            ("period", result.cap_type),
            ("model", result.model or "(all models)"),
            ("scope", result.scope or _ALL_USAGE),
            ("limit", result.cap_limit),
            ("spent", result.current_spend),
            ("held", result.reserved),
            ("action", result.action),
            ("resets (UTC)", result.resets_at),
        ]
    )
    return OK


# -- teams ---------------------------------------------------------------------------------------


async def cmd_teams_create(ctx: Context) -> int:
    """Create a team pool."""
    balance = parse_credits(ctx.args.balance, "--balance", minimum=0)
    store = await ctx.store()
    result = await store.create_team(ctx.args.name, balance)
    if ctx.out.as_json:
        ctx.out.json(result)
        return OK
    ctx.out.text(f"created team {result.team_id}")
    ctx.out.pairs([("team", result.team_id), ("name", result.name), ("balance", result.balance)])
    return OK


async def cmd_teams_show(ctx: Context) -> int:
    """Show a team's pool and its members."""
    store = await ctx.store()
    team = await store.get_team_balance(ctx.args.team)
    members = await store.get_team_members(ctx.args.team) if team.ok else []
    if ctx.out.as_json:
        ctx.out.json(
            {
                **team.model_dump(mode="json"),
                "members": [m.model_dump(mode="json") for m in members],
            }
        )
    if not team.ok:
        Output.note(f"ducto: {refusal(team)}")
        return REFUSED
    if ctx.out.as_json:
        return OK
    ctx.out.pairs(
        [
            ("team", team.team_id),
            ("name", team.name),
            ("balance", team.balance),
            ("available", team.available),
            ("held", team.reserved),
            ("members", team.member_count),
        ]
    )
    ctx.out.text()
    ctx.out.table(
        ["member", "role", "monthly cap", "spent this month"],
        [(m.user_id, m.role, m.spend_cap, m.total_spent) for m in members],
        empty="no members",
    )
    return OK


async def cmd_teams_add_member(ctx: Context) -> int:
    """Add a member to a team, or change its role and cap."""
    args = ctx.args
    cap = parse_credits(args.cap, "--cap", minimum=0) if args.cap is not None else None
    store = await ctx.store()
    result = await store.add_team_member(args.team, args.user, args.role, cap)

    def show() -> None:
        ctx.out.text(
            f"{result.user_id!r} is in team {result.team_id} as {result.role}"
            + (f", monthly cap {result.spend_cap:,}" if result.spend_cap is not None else "")
        )

    return report(ctx, result, show)


async def cmd_teams_remove_member(ctx: Context) -> int:
    """Remove a member from a team."""
    store = await ctx.store()
    result = await store.remove_team_member(ctx.args.team, ctx.args.user)
    if result.ok and not result.removed:
        if ctx.out.as_json:
            ctx.out.json(result)
        Output.note(f"ducto: {ctx.args.user!r} is not a member of team {ctx.args.team}")
        return REFUSED

    def show() -> None:
        ctx.out.text(f"removed {result.user_id!r} from team {result.team_id}")

    return report(ctx, result, show)


async def cmd_teams_credit(ctx: Context) -> int:
    """Top up a team pool."""
    args = ctx.args
    amount = parse_credits(args.amount, "AMOUNT")
    expiry = expires_at(ctx, args.expires)
    store = await ctx.store()
    result = await store.add_team_credits(
        args.team, amount, None, expires_at=expiry, idempotency_key=args.key
    )

    def show() -> None:
        if result.idempotent:
            ctx.out.text(f"already applied: key {result.idempotency_key!r} was used before")
        ctx.out.pairs(
            [
                ("transaction", result.transaction_id),
                ("team", result.team_id),
                ("amount", result.amount),
                ("team balance", result.team_balance_after),
                ("key", result.idempotency_key),
            ]
        )

    return report(ctx, result, show, asked=amount)


async def cmd_teams_ledger(ctx: Context) -> int:
    """Show a team pool's ledger rows, newest first."""
    args = ctx.args
    store = await ctx.store()
    page = await store.list_team_transactions(args.team, limit=args.limit, cursor=args.cursor)
    if ctx.out.as_json:
        ctx.out.json(page)
        return OK
    _ledger_table(ctx.out, page, args.team)
    return OK
