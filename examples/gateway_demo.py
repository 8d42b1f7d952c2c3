"""
A simulated LLM gateway billing many concurrent users with ducto, on the embedded SQLite store.

Everything goes through `CreditManager` with a published pricing config: streamed chat calls
hold an estimate with ``manager.hold()``, record usage as chunks arrive and settle once;
plain calls are priced and charged in one step with ``manager.deduct``; members of a team
spend the team's pool with ``manager.deduct_team``. Some users are on a plan with a monthly
free allowance, some have a daily spend cap, everyone gets a welcome bonus that expires, some
answers are refunded, and some providers fail before or during a stream.

The simulation covers two days on a simulated clock (the store's ``clock=``), so the bonus
expires between them and a sweep writes off what was left of it. Each user's requests run
one after another, many users at a time; every random choice comes from ``--seed``, so two
runs with the same options print the same books (only the timings differ).

At the end the demo checks its books: every balance equals the sum of its ledger rows (row
by row), no hold is left open, each balance's lots add up to it, and the credits the gateway
saw charged, refunded and expired are exactly the ledger's. It exits with status 1 if not.

    python examples/gateway_demo.py                   # the default run, in a temporary database
    python examples/gateway_demo.py --users 500 --requests 10000 --backend trio
    python examples/gateway_demo.py --db billing.db   # keep it, to look at with `ducto`
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import anyio.lowlevel

from ducto import (
    CreditError,
    CreditEvent,
    CreditEventType,
    CreditManager,
    Hold,
    SpendCap,
    SpendCapExceededError,
    ToolCall,
    UsageMetrics,
    open_store,
)
from ducto.interface import CreditStore
from ducto.interface.models import TransactionRow

# One credit is $0.001 here: prices per token below are list prices per million tokens / 1000.
PRICING = {
    "models": {
        "gpt-4o": "input_tokens * 0.0025 + output_tokens * 0.01",
        "gpt-4o-mini": "input_tokens * 0.00015 + output_tokens * 0.0006",
        "claude-sonnet": "input_tokens * 0.003 + output_tokens * 0.015",
        "_default": "input_tokens * 0.001 + output_tokens * 0.002",
    },
    "tools": {"_default": "tool_calls * 0", "web_search": "tool_calls * 10"},
    "cache": {"cached_input": "cache_read_tokens * 0.00125"},
    "plans": {
        "pro": {
            "id": "pro",
            "name": "Pro",
            "free_allowance": 100,
            "rate_overrides": {"gpt-4o-mini": "input_tokens * 0.0001 + output_tokens * 0.0004"},
            "features": {"web_search": True},
        }
    },
    "rounding": "ceil",
    "min_balance": 5,
}
MODELS = ("gpt-4o", "gpt-4o-mini", "claude-sonnet", "llama-70b")
DAY_ONE = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
BONUS = 100
TEAM_POOL = 20_000
TEAM_MEMBER_CAP = 400
DAILY_CAP = 150
KEY_CAP = 25
LOW_BALANCE = 50
KEYS = ("web", "mobile", "ci")


class ProviderError(Exception):
    """The model provider failed (a timeout, a 5xx, a dropped stream)."""


class SimulatedClock:
    """The time the store and the manager read; it moves only between the simulated days."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now


@dataclass(frozen=True)
class User:
    """A simulated customer."""

    id: str
    purchase: int
    pro: bool
    team: bool
    capped: bool
    ci_budget: bool = False  # the user's "ci" API key has a daily budget of its own


@dataclass(frozen=True)
class Request:
    """One simulated gateway request; every field comes from the request's own seed."""

    n: int
    user: User
    day: int
    kind: str  # "stream" or "plain" ("plain" is billed to the team pool for team members)
    model: str
    input_tokens: int
    output_chunks: tuple[int, ...]
    max_output: int
    cache_read_tokens: int
    web_searches: int
    failure: str | None  # None, "before" (no token came) or "mid" (the stream broke)
    refund: bool
    latency: float
    api_key: str = "web"  # the API key the call came with: its budget scope

    @property
    def key(self) -> str:
        """The request id, used as the idempotency key of its hold and settlement."""
        return f"req-{self.n}"


@dataclass
class Line:
    """One row of an outcome table."""

    requests: int = 0
    charged: int = 0
    allowance: int = 0


@dataclass
class Tally:
    """What the gateway saw, to compare with the ledger at the end."""

    tables: dict[str, dict[str, Line]] = field(default_factory=dict)
    user_charged: int = 0
    team_charged: int = 0
    refunded: int = 0
    refunds: int = 0
    key_refusals: dict[str, int] = field(default_factory=dict)
    low_balance_users: set[str] = field(default_factory=set)
    latencies: list[float] = field(default_factory=list)

    def add(self, table: str, outcome: str, charged: int = 0, allowance: int = 0) -> None:
        line = self.tables.setdefault(table, {}).setdefault(outcome, Line())
        line.requests += 1
        line.charged += charged
        line.allowance += allowance


STREAM = "Streamed chat: manager.hold() holds an estimate, records each chunk, settles once"
PLAIN = "Plain calls: manager.deduct() prices the usage and charges it in one step"
TEAM = "Team calls: manager.deduct_team() charges the team pool for a member"


def make_users(count: int, seed: int) -> list[User]:
    """The customers: purchases, plans, team membership and caps, from the seed."""
    rng = random.Random(f"{seed}:users")
    keys = random.Random(f"{seed}:keys")
    users = []
    for n in range(count):
        small = rng.random() < 0.1  # a few nearly empty accounts, to meet refusals
        users.append(
            User(
                id=f"user-{n:04d}",
                purchase=rng.randint(10, 60) if small else rng.randint(300, 3000),
                pro=rng.random() < 0.25,
                team=rng.random() < 0.15,
                capped=rng.random() < 0.1,
                ci_budget=keys.random() < 0.3,
            )
        )
    return users


def make_requests(users: Sequence[User], count: int, seed: int, latency_ms: float) -> list[Request]:
    """The traffic: which user, model, tokens and fate each request has, from the seed."""
    requests = []
    for n in range(count):
        rng = random.Random(f"{seed}:request:{n}")
        user = users[rng.randrange(len(users))]
        max_output = rng.choice((256, 512, 1024))
        output = rng.randint(20, max_output)
        chunks = max(1, output // 120)
        sizes = [output // chunks] * chunks
        sizes[-1] += output - sum(sizes)
        roll = rng.random()
        requests.append(
            Request(
                n=n,
                user=user,
                day=1 if n < count // 2 else 2,
                kind="stream" if rng.random() < 0.65 else "plain",
                model=rng.choice(MODELS),
                input_tokens=rng.randint(200, 4000),
                output_chunks=tuple(sizes),
                max_output=max_output,
                cache_read_tokens=rng.choice((0, 0, 0, 1024, 2048)),
                web_searches=rng.choice((0, 0, 0, 0, 1, 2)),
                failure="before" if roll < 0.03 else "mid" if roll < 0.07 else None,
                refund=rng.random() < 0.03,
                latency=rng.uniform(0.0005, max(latency_ms, 0.5) / 1000),
                api_key=random.Random(f"{seed}:key:{n}").choice(KEYS),
            )
        )
    return requests


def refused(tally: Tally, table: str, request: Request, exc: CreditError) -> None:
    """Count a refusal; one by the budget of the call's API key is told apart."""
    if isinstance(exc, SpendCapExceededError) and exc.scope is not None:
        tally.add(table, f"refused: key {exc.scope!r} over its daily budget")
        tally.key_refusals[exc.scope] = tally.key_refusals.get(exc.scope, 0) + 1
        return
    tally.add(table, f"refused: {exc.code}")


def key_of(request: Request) -> dict[str, str]:
    """The call's metadata: its API key as the budget scope of its hold and usage row."""
    return {"scope": request.api_key}


async def stream(hold: Hold, request: Request) -> None:
    """The provider's side of a streamed call: first token, then chunks, maybe a failure."""
    await anyio.sleep(request.latency)  # time to first token
    if request.failure == "before":
        raise ProviderError("no response")
    hold.record(UsageMetrics(model=request.model, input_tokens=request.input_tokens))
    for index, size in enumerate(request.output_chunks):
        if request.failure == "mid" and index == len(request.output_chunks) // 2:
            raise ProviderError("stream dropped")
        await anyio.lowlevel.checkpoint()
        hold.record(UsageMetrics(model=request.model, output_tokens=size))


async def stream_call(manager: CreditManager, request: Request, tally: Tally) -> None:
    """A streamed chat completion billed with a hold."""
    estimate = UsageMetrics(
        model=request.model, input_tokens=request.input_tokens, output_tokens=request.max_output
    )
    hold = manager.hold(
        request.user.id, estimate, idempotency_key=request.key, metadata=key_of(request)
    )
    try:
        async with hold:
            await stream(hold, request)
            await hold.settle()
    except ProviderError:
        pass  # leaving the block charged what was recorded, or released the hold
    except CreditError as exc:
        refused(tally, STREAM, request, exc)
        return
    result = hold.result
    if result is None:
        tally.add(STREAM, "provider failed, nothing streamed: released")
        return
    label = "stream broke: charged what streamed" if request.failure else "settled"
    tally.add(STREAM, label, result.charged, result.allowance_consumed)
    tally.user_charged += result.charged
    if request.refund and not request.failure and result.charged:
        refund = await manager.refund_credits(
            result.transaction_id, reason="bad answer", idempotency_key=f"{request.key}-refund"
        )
        tally.refunded += refund.amount
        tally.refunds += 1


def plain_usage(request: Request) -> UsageMetrics:
    """What a non-streamed call used, tools and cache included."""
    return UsageMetrics(
        model=request.model,
        input_tokens=request.input_tokens,
        output_tokens=sum(request.output_chunks),
        cache_read_tokens=min(request.cache_read_tokens, request.input_tokens),
        tool_calls=[ToolCall(name="web_search")] * request.web_searches,
    )


async def plain_call(manager: CreditManager, request: Request, tally: Tally) -> None:
    """A plain call, charged after it ran (no hold is needed for usage that happened)."""
    await anyio.sleep(request.latency)
    try:
        result = await manager.deduct(
            request.user.id,
            plain_usage(request),
            idempotency_key=request.key,
            metadata=key_of(request),
        )
    except CreditError as exc:
        refused(tally, PLAIN, request, exc)
        return
    tally.add(PLAIN, "charged", result.charged, result.allowance_consumed)
    tally.user_charged += result.charged


async def team_call(manager: CreditManager, team_id: str, request: Request, tally: Tally) -> None:
    """A plain call of a team member, billed to the team's pool."""
    await anyio.sleep(request.latency)
    try:
        result = await manager.deduct_team(
            team_id, request.user.id, plain_usage(request), idempotency_key=request.key
        )
    except CreditError as exc:
        tally.add(TEAM, f"refused: {exc.code}")
        return
    tally.add(TEAM, "charged to the pool", result.charged)
    tally.team_charged += result.charged


async def serve(
    manager: CreditManager,
    team_id: str,
    requests: Sequence[Request],
    concurrency: int,
    tally: Tally,
) -> None:
    """Serve each user's requests in order, `concurrency` users at a time."""
    by_user: dict[str, list[Request]] = {}
    for request in requests:
        by_user.setdefault(request.user.id, []).append(request)
    queue = iter(list(by_user.values()))

    async def worker() -> None:
        for mine in queue:
            for request in mine:
                started = time.perf_counter()
                if request.kind == "stream":
                    await stream_call(manager, request, tally)
                elif request.user.team:
                    await team_call(manager, team_id, request, tally)
                else:
                    await plain_call(manager, request, tally)
                tally.latencies.append(time.perf_counter() - started)

    async with anyio.create_task_group() as tg:
        for _ in range(min(concurrency, len(by_user))):
            tg.start_soon(worker)


async def open_accounts(
    manager: CreditManager, users: Sequence[User], bonus_expiry: datetime
) -> str:
    """Purchases, welcome bonuses, plans, caps and the team pool; returns the team id."""
    store = manager.store
    team = await store.create_team("acme", TEAM_POOL)
    limiter = anyio.CapacityLimiter(32)

    async def open_one(user: User) -> None:
        async with limiter:
            await manager.add_credits(
                user.id, user.purchase, "purchase", idempotency_key=f"{user.id}-purchase"
            )
            await manager.add_credits(
                user.id,
                BONUS,
                "signup_bonus",
                expires_at=bonus_expiry,
                idempotency_key=f"{user.id}-welcome",
            )
            if user.pro:
                await manager.set_user_plan(user.id, "pro")
            if user.capped:
                await store.set_spend_cap(
                    SpendCap(user_id=user.id, cap_type="daily", limit=DAILY_CAP)
                )
            if user.ci_budget:
                await store.set_spend_cap(
                    SpendCap(user_id=user.id, cap_type="daily", limit=KEY_CAP, scope="ci")
                )
            if user.team:
                joined = await store.add_team_member(
                    team.team_id, user.id, "member", TEAM_MEMBER_CAP
                )
                joined.raise_for_error()

    async with anyio.create_task_group() as tg:
        for user in users:
            tg.start_soon(open_one, user)
    return team.team_id


async def full_ledger(
    store: CreditStore, user_id: str, *, team: bool = False
) -> list[TransactionRow]:
    """Every ledger row of an account, newest first."""
    rows: list[TransactionRow] = []
    cursor = None
    while True:
        if team:
            page = await store.list_team_transactions(user_id, limit=1000, cursor=cursor)
        else:
            page = await store.list_transactions(user_id, limit=1000, cursor=cursor)
        rows.extend(page.items)
        cursor = page.next_cursor
        if cursor is None:
            return rows


@dataclass
class Books:
    """The end-of-run check of the ledger against the balances and the gateway's tally."""

    checks: list[tuple[str, bool]] = field(default_factory=list)
    telling: str = ""  # the user whose ledger shows the most kinds of row
    usage: int = 0
    refunds: int = 0
    expired: int = 0

    @property
    def ok(self) -> bool:
        return all(passed for _, passed in self.checks)


async def check_books(
    store: CreditStore, users: Sequence[User], team_id: str, tally: Tally, swept: int
) -> Books:
    """Read every account back and compare it with itself and with what the gateway saw."""
    books = Books()
    matches = running = lots_ok = True
    open_holds = 0
    best = -1
    for user in users:
        balance = await store.get_balance(user.id)
        rows = await full_ledger(store, user.id)
        matches &= sum(row.amount for row in rows) == balance.balance
        total = 0
        for row in reversed(rows):
            total += row.amount
            running &= total == row.balance_after
        open_holds += balance.reserved
        lots = await store.list_lots(user.id)
        lots_ok &= sum(lot.remaining for lot in lots) == max(balance.balance, 0)
        books.usage -= sum(row.amount for row in rows if row.type == "usage")
        books.refunds += sum(row.amount for row in rows if row.type == "refund")
        books.expired -= sum(row.amount for row in rows if row.type == "expiry")
        kinds: set[str] = {row.type for row in rows}
        kinds |= {"paid" for row in rows if row.type == "usage" and row.amount}
        kinds |= {"free" for row in rows if row.metadata.get("allowance_consumed")}
        if len(kinds) > best:
            best, books.telling = len(kinds), user.id
    team = await store.get_team_balance(team_id)
    team_rows = await full_ledger(store, team_id, team=True)
    team_usage = -sum(row.amount for row in team_rows if row.type == "team_usage")
    books.checks = [
        (f"every balance equals the sum of its ledger rows ({len(users)} users)", matches),
        ("every row's balance_after is the running sum of the rows before it", running),
        (
            "the team pool's balance equals its ledger",
            sum(r.amount for r in team_rows) == team.balance,
        ),
        ("no hold is left open", open_holds == 0),
        ("each balance's credit lots add up to it", lots_ok),
        (
            "charges the gateway saw equal the ledger's usage rows",
            books.usage == tally.user_charged,
        ),
        (
            "team charges the gateway saw equal the pool's usage rows",
            team_usage == tally.team_charged,
        ),
        (
            "refunds the gateway made equal the ledger's refund rows",
            books.refunds == tally.refunded,
        ),
        ("credits the sweep wrote off equal the ledger's expiry rows", books.expired == swept),
    ]
    return books


def table(headers: Sequence[str], rows: Iterable[Sequence[object]], indent: str = "  ") -> str:
    """Aligned columns: numbers right-aligned with thousands separators, text left-aligned."""

    def text(value: object) -> str:
        if value is None:
            return "-"
        if isinstance(value, int) and not isinstance(value, bool):
            return f"{value:,}"
        if isinstance(value, datetime):
            return value.strftime("%m-%d %H:%M")
        return str(value)

    rows = list(rows)
    cells = [[text(value) for value in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    numeric = [
        bool(rows) and all(isinstance(r[i], int) or r[i] in (None, "") for r in rows)
        for i in range(len(headers))
    ]

    def line(values: Sequence[str]) -> str:
        return (
            indent
            + "  ".join(
                v.rjust(w) if num else v.ljust(w)
                for v, w, num in zip(values, widths, numeric, strict=True)
            ).rstrip()
        )

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, cells)])


def describe_row(row: TransactionRow) -> str:
    """What a ledger row was for, in a few words."""
    meta = row.metadata
    if row.type == "usage":
        model = meta.get("model", "?")
        what = f"{model}: {meta.get('input_tokens', 0):,} in, {meta.get('output_tokens', 0):,} out"
        allowance = meta.get("allowance_consumed")
        return what + (f"; {allowance} from the allowance" if allowance else "")
    if row.type == "refund":
        return f"refund: {meta.get('reason', '')}".rstrip(": ")
    if row.type == "expiry":
        return "the unspent welcome bonus"
    return row.idempotency_key or ""


async def run(args: argparse.Namespace, db: Path) -> int:
    users = make_users(args.users, args.seed)
    requests = make_requests(users, args.requests, args.seed, args.latency_ms)
    clock = SimulatedClock(DAY_ONE)
    tally = Tally()

    def low_balance(event: CreditEvent) -> None:
        if event.user_id is not None:
            tally.low_balance_users.add(event.user_id)

    store = open_store(f"sqlite:///{db}", clock=clock)
    async with CreditManager(store, clock=clock, low_balance_thresholds=(LOW_BALANCE,)) as manager:
        manager.events.on(CreditEventType.LOW_BALANCE, low_balance)
        await store.setup()
        await manager.publish_pricing(PRICING, label="launch prices")
        active = await store.get_active_pricing()
        version = active.version if active is not None else 0
        bonus_expiry = DAY_ONE.replace(hour=23, minute=59)
        team_id = await open_accounts(manager, users, bonus_expiry)

        started = time.perf_counter()
        await serve(manager, team_id, [r for r in requests if r.day == 1], args.concurrency, tally)
        clock.now = DAY_ONE + timedelta(days=1)  # the welcome bonus has expired
        swept = await manager.sweep_expired_credits()
        await serve(manager, team_id, [r for r in requests if r.day == 2], args.concurrency, tally)
        elapsed = time.perf_counter() - started

        two_days = (DAY_ONE.replace(hour=0), DAY_ONE.replace(hour=0) + timedelta(days=2))
        by_model = await store.spend_by_model(*two_days)
        by_key: dict[str, list[int]] = {}
        for row in await store.spend_by_scope(*two_days):
            entry = by_key.setdefault(row.scope or "-", [0, 0])
            entry[0] += row.total_spend
            entry[1] += row.transaction_count
        books = await check_books(store, users, team_id, tally, swept.expired_amount)
        shown = args.show_user or books.telling
        shown_rows = await full_ledger(store, shown)
        shown_balance = await store.get_balance(shown)

    report(
        args,
        db,
        users,
        requests,
        version,
        tally,
        swept.expired_count,
        swept.expired_amount,
        by_model,
        by_key,
        books,
        shown,
        shown_rows,
        shown_balance.balance,
        elapsed,
    )
    return 0 if books.ok else 1


def report(
    args: argparse.Namespace,
    db: Path,
    users: Sequence[User],
    requests: Sequence[Request],
    version: int,
    tally: Tally,
    expired_lots: int,
    expired_credits: int,
    by_model: Sequence[object],
    by_key: dict[str, list[int]],
    books: Books,
    shown: str,
    shown_rows: Sequence[TransactionRow],
    shown_balance: int,
    elapsed: float,
) -> None:
    print(
        f"ducto gateway demo: {len(users):,} users, {len(requests):,} requests, "
        f"{args.concurrency} users served at once, seed {args.seed}, SQLite at {db}"
    )
    print()
    print("What a credit is")
    print("  Balances and prices are whole credits (Python ints); here 1 credit = $0.001.")
    print("  Pricing is an expression per model over the usage, computed exactly and rounded")
    print("  up once per call: gpt-4o is 'input_tokens * 0.0025 + output_tokens * 0.01', so")
    print("  1,200 tokens in and 300 out cost 3 + 3 = 6 credits. The prices are published")
    print(f"  as version {version} of the store's pricing history, checked before they are stored.")
    print()
    pro = sum(u.pro for u in users)
    team = sum(u.team for u in users)
    capped = sum(u.capped for u in users)
    print("The accounts (two simulated days from 2026-03-02 09:00 UTC)")
    print(
        textwrap.fill(
            f"{len(users):,} users bought {sum(u.purchase for u in users):,} credits, and each "
            f"got a {BONUS}-credit welcome bonus that expires at the end of day one. {pro} are "
            "on the Pro plan (100 free credits a month, cheaper gpt-4o-mini); "
            f"{team} share the team pool 'acme' ({TEAM_POOL:,} credits, at most "
            f"{TEAM_MEMBER_CAP} a month per member); {capped} have a daily spend cap of "
            f"{DAILY_CAP} credits.",
            width=88,
            initial_indent="  ",
            subsequent_indent="  ",
        )
    )
    for title in (STREAM, PLAIN, TEAM):
        lines = tally.tables.get(title, {})
        print()
        print(title)
        print(
            table(
                ["outcome", "requests", "credits charged", "from allowance"],
                [
                    (
                        name,
                        line.requests,
                        None if name.startswith("refused") else line.charged,
                        None if name.startswith("refused") else line.allowance,
                    )
                    for name, line in sorted(lines.items(), key=lambda item: -item[1].requests)
                ],
            )
        )
    print()
    print("Refunds, expiry and alerts")
    print(
        table(
            ["what", "count", "credits"],
            [
                ("refunded bad answers", tally.refunds, tally.refunded),
                ("welcome bonus expired: sweep wrote off", expired_lots, expired_credits),
                (
                    f"users alerted: available fell below {LOW_BALANCE}",
                    len(tally.low_balance_users),
                    None,
                ),
            ],
        )
    )
    print()
    print("Spend by model (net paid usage of user accounts and the team pool)")
    print(
        table(
            ["model", "credits", "calls"],
            [(row.model, row.total_spend, row.transaction_count) for row in by_model],  # type: ignore[attr-defined]
        )
    )
    print()
    budgeted = sum(u.ci_budget for u in users)
    print(
        textwrap.fill(
            f"Spend by API key: each call names its key as the budget scope; {budgeted} users' "
            f"'ci' keys have a daily budget of {KEY_CAP} credits of their own, enforced when "
            "the hold is placed, while their other keys spend on from the same balance",
            width=88,
        )
    )
    print(
        table(
            ["key", "credits", "calls", "calls refused by the key's budget"],
            [
                (
                    key if key != "-" else "- (team pool)",
                    credits,
                    calls,
                    tally.key_refusals.get(key, 0),
                )
                for key, (credits, calls) in sorted(by_key.items(), key=lambda kv: -kv[1][0])
            ],
        )
    )
    print()
    rows: list[TransactionRow | None] = list(shown_rows[::-1])
    if len(rows) > 16:
        rows = [*rows[:8], None, *rows[-8:]]
    print(f"One user's ledger, oldest first: {shown} (balance {shown_balance:,})")
    print(
        table(
            ["day", "type", "amount", "balance after", "what"],
            [
                (
                    (row.created_at.date() - DAY_ONE.date()).days + 1,
                    row.type,
                    row.amount,
                    row.balance_after,
                    describe_row(row),
                )
                if row is not None
                else ("", f"... {len(shown_rows) - 16} more", "", "", "")
                for row in rows
            ],
        )
    )
    print()
    print("Books")
    for label, passed in books.checks:
        print(f"  {'ok  ' if passed else 'FAIL'}  {label}")
    print(
        "  books: every balance equals its ledger, no hold left open"
        if books.ok
        else "  books: INCONSISTENT"
    )
    print()
    latencies = sorted(tally.latencies)
    p50 = latencies[len(latencies) // 2] * 1000 if latencies else 0.0
    p99 = latencies[int(len(latencies) * 0.99)] * 1000 if latencies else 0.0
    print("Timing (wall clock, differs from run to run)")
    print(
        f"  {len(requests):,} requests in {elapsed:.2f} s ({len(requests) / elapsed:,.0f}/s); "
        f"per request p50 {p50:.1f} ms, p99 {p99:.1f} ms, simulated model time included"
    )


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def default_backend() -> str:
    """asyncio when its SQLite driver is installed; else trio, whose SQLite store needs none."""
    return "asyncio" if importlib.util.find_spec("aiosqlite") is not None else "trio"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").strip().splitlines()[0],
        epilog="Every random choice comes from --seed: the same options print the same books.",
    )
    parser.add_argument(
        "--users",
        metavar="N",
        type=positive,
        default=200,
        help="simulated customers (default: %(default)s)",
    )
    parser.add_argument(
        "--requests",
        metavar="N",
        type=positive,
        default=4000,
        help="gateway requests over the two simulated days (default: %(default)s)",
    )
    parser.add_argument(
        "--concurrency",
        metavar="N",
        type=positive,
        default=100,
        help="users served at once, each with one request in flight (default: %(default)s)",
    )
    parser.add_argument(
        "--seed",
        metavar="N",
        type=int,
        default=7,
        help="seed of every random choice (default: %(default)s)",
    )
    parser.add_argument(
        "--latency-ms",
        metavar="MS",
        type=float,
        default=20.0,
        help="longest simulated model time per call, in ms (default: %(default)s)",
    )
    parser.add_argument(
        "--db",
        metavar="PATH",
        type=Path,
        help="SQLite file to create and keep (default: a new file in a temporary "
        "directory, removed at the end)",
    )
    parser.add_argument(
        "--backend",
        choices=("asyncio", "trio"),
        default=default_backend(),
        help="event loop (default: asyncio, or trio when aiosqlite, which SQLite needs under "
        "asyncio, is not installed)",
    )
    parser.add_argument(
        "--show-user",
        metavar="USER_ID",
        help="whose ledger to print (default: the user whose ledger has the most kinds of row)",
    )
    args = parser.parse_args(argv)
    if args.db is not None and args.db.exists():
        parser.error(f"--db {args.db} exists; the demo starts from an empty database")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        db = args.db or Path(tmp) / "ducto-demo.db"
        status: int = anyio.run(run, args, db, backend=args.backend)
        return status


if __name__ == "__main__":
    sys.exit(main())
