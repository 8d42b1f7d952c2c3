"""
`prune` and `archive_ledger` under traffic, on SQLiteStore and PostgresStore, on both loops.

A pool of users (and their team) has three months of keyed history. In the current month, 32
tasks reserve and settle with keys (some reusing a months-old key, which must be a new
request) while one task archives that history cutoff by cutoff, small chunks at a time, and
prunes between archives, and other tasks refund the old debits: a refund races the archive of
its row. Some refunds are also made to land exactly between an archive chunk's read and its
commit, so the chunk must be read again.

Afterwards nothing acknowledged is lost or kept twice: each row is either in the ledger or in
the archive file, every ledger and its archived rows still sum to the balance, each archived
debit carries exactly the refunds that were acknowledged, and analytics (kept rows plus
rollups) equal the sum of all acknowledged usage net of acknowledged refunds.
"""

from __future__ import annotations

import random
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import pytest
from anyio.lowlevel import checkpoint
from tests.conftest import OPENERS, REQUIRED, FakeClock, drop_postgres_schema, postgres_url
from tests.contract._checks import (
    all_rows,
    all_team_rows,
    assert_archived_invariants,
    read_archive,
)

from ducto.errors import ErrorCode
from ducto.interface import _engine as E
from ducto.interface import _retention as RT
from ducto.interface.base import CreditStore
from ducto.interface.models import (
    ArchiveResult,
    CreditMetadata,
    DeductionResult,
    PruneResult,
    RefundResult,
)

pytestmark = pytest.mark.anyio

KINDS = [
    pytest.param("sqlite", marks=pytest.mark.sqlite, id="sqlite"),
    pytest.param("postgres", marks=pytest.mark.postgres, id="postgres"),
]
USERS = 8
TASKS = 32
ROUNDS = 4
MODELS = ("m1", "m2", None)
HISTORY_DAYS = [
    datetime(2025, 12, 3, 10, tzinfo=UTC),
    datetime(2025, 12, 17, 15, tzinfo=UTC),
    datetime(2026, 1, 8, 9, tzinfo=UTC),
    datetime(2026, 1, 22, 23, tzinfo=UTC),
    datetime(2026, 2, 5, 0, 30, tzinfo=UTC),
    datetime(2026, 2, 19, 18, tzinfo=UTC),
]
NOW = datetime(2026, 3, 15, 12, tzinfo=UTC)
CUTOFFS = [
    datetime(2025, 12, 10, tzinfo=UTC),
    datetime(2026, 1, 1, tzinfo=UTC),
    datetime(2026, 1, 15, tzinfo=UTC),
    datetime(2026, 2, 1, tzinfo=UTC),
    datetime(2026, 2, 12, tzinfo=UTC),
    datetime(2026, 3, 1, tzinfo=UTC),
]
LAST_CUTOFF = CUTOFFS[-1]
WINDOW = (datetime(2025, 12, 1, tzinfo=UTC), datetime(2026, 4, 1, tzinfo=UTC))
INJECTED = 3
"""Archive commits preceded by a refund of one of the chunk's rows (each forces a re-read)."""
TIMEOUT = 120.0


@pytest.fixture(params=KINDS)
async def grown(
    request: pytest.FixtureRequest,
    anyio_backend: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[tuple[CreditStore, FakeClock]]:
    """A fresh store on a clock at the start of the history, archiving and pruning in small
    chunks so that many transactions interleave with the traffic."""
    monkeypatch.setattr(RT, "ARCHIVE_CHUNK", 7)
    monkeypatch.setattr(RT, "PRUNE_CHUNK", 5)
    clock = FakeClock(HISTORY_DAYS[0] - timedelta(days=1))
    kind: str = request.param
    schema: str | None = None
    try:
        if kind == "sqlite":
            store = OPENERS["sqlite"](tmp_path, clock)
        else:
            url = postgres_url()
            from ducto.interface.postgres import PostgresStore

            schema = f"ducto_g_{uuid.uuid4().hex[:12]}"
            store = PostgresStore(url, schema=schema, clock=clock, min_size=1, max_size=8)
    except (ImportError, LookupError) as exc:
        if kind in REQUIRED:
            pytest.fail(f"{kind} store is required: {exc}")
        pytest.skip(f"{kind} store unavailable: {exc}")
    try:
        async with store:
            await store.setup()
            yield store, clock
    finally:
        if schema is not None:
            drop_postgres_schema(schema)


@dataclass
class Books:
    """What the test was told: every acknowledged row, debit, key and refund."""

    users: list[str]
    team: str = ""
    history_rows: set[str] = field(default_factory=set)
    rows: set[str] = field(default_factory=set)
    """Every acknowledged row id (history and traffic, refunds included)."""
    old_debits: dict[str, str] = field(default_factory=dict)
    """Old usage and team usage row id -> the user who spent it."""
    spent: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    """Per user, acknowledged usage net of acknowledged refunds."""
    usage_rows: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    refunded: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    """Per old debit, the refunds acknowledged."""
    refused_as_archived: set[str] = field(default_factory=set)
    old_reserve_keys: dict[tuple[int, int], tuple[str, str]] = field(default_factory=dict)
    """(user index, history day) -> (key, reservation id) of an old keyed hold."""
    history_keys: int = 0
    history_holds: int = 0
    reused_keys: int = 0
    archives: list[ArchiveResult] = field(default_factory=list)
    prunes: list[PruneResult] = field(default_factory=list)
    injected: list[RefundResult] = field(default_factory=list)


def _refund_seen(books: Books, debit: str, result: RefundResult) -> None:
    """Book a refund of an old debit: it went through, or the row was archived first."""
    if result.ok:
        assert not result.idempotent
        books.refunded[debit] += result.amount
        books.spent[books.old_debits[debit]] -= result.amount
        books.rows.add(result.refund_transaction_id)
    else:
        assert ErrorCode.TRANSACTION_ARCHIVED == result.error, result
        books.refused_as_archived.add(debit)


async def _history(store: CreditStore, clock: FakeClock, books: Books, rng: random.Random) -> None:
    """Three months of keyed grants, holds, settlements, releases and team charges."""
    clock.set(HISTORY_DAYS[0] - timedelta(hours=1))
    team = await store.create_team("pool", 100_000)
    assert team.transaction_id is not None
    books.team = team.team_id
    books.history_rows.add(team.transaction_id)
    for n, user in enumerate(books.users):
        granted = await store.add_credits(user, 10_000, "purchase", idempotency_key=f"grant-{n}")
        assert granted.ok
        books.history_rows.add(granted.transaction_id)
        assert (await store.add_team_member(books.team, user)).ok
    books.history_keys += len(books.users)
    for day, moment in enumerate(HISTORY_DAYS):
        clock.set(moment)
        plans = [
            (n, user, rng.randint(2, 9), rng.randint(2, 9)) for n, user in enumerate(books.users)
        ]

        async def one(n: int, user: str, charge: int, team_charge: int, day: int = day) -> None:
            model = MODELS[(n + day) % len(MODELS)]
            key = f"old-hold-{n}-{day}"
            hold = await store.reserve_credits(
                user, 10, "chat", CreditMetadata(model=model), ttl=60, idempotency_key=key
            )
            assert hold.ok
            books.old_reserve_keys[n, day] = (key, hold.reservation_id)
            settled = await store.deduct_credits(
                user, hold.reservation_id, charge, f"old-settle-{n}-{day}"
            )
            assert settled.ok
            charged = await store.deduct_team(
                books.team, user, team_charge, idempotency_key=f"old-team-{n}-{day}"
            )
            assert charged.ok
            for row, amount in (
                (settled.transaction_id, charge),
                (charged.transaction_id, team_charge),
            ):
                books.history_rows.add(row)
                books.old_debits[row] = user
                books.spent[user] += amount
                books.usage_rows[user] += 1
            if n % 2:
                spare = await store.reserve_credits(user, 3, "chat", ttl=60)
                assert (await store.release_reservation(user, spare.reservation_id)).ok

        async with anyio.create_task_group() as tg:
            for plan in plans:
                tg.start_soon(one, *plan)
        books.history_keys += 3 * len(books.users)
        books.history_holds += len(books.users) + len(books.users) // 2
    books.rows |= books.history_rows


async def _settle(
    store: CreditStore, results: list[DeductionResult], user: str, hold: str, charge: int, key: str
) -> None:
    results.append(await store.deduct_credits(user, hold, charge, key))


class Pace:
    """
    Lets traffic and refunds wait for the archive to commit its next chunk.

    They then land while the archive reads and writes the chunk after; unpaced, a store may
    run them all before the archive gets going.
    """

    def __init__(self) -> None:
        self._event = anyio.Event()
        self._over = False

    def chunk_done(self, _: object = None) -> None:
        """`archive_ledger`'s progress callback: a chunk was committed."""
        self._event.set()
        self._event = anyio.Event()

    def over(self) -> None:
        """No more chunks to wait for."""
        self._over = True
        self._event.set()

    async def next_chunk(self) -> None:
        """Wait until the archive commits another chunk (at once when it is over)."""
        if not self._over:
            await self._event.wait()


async def _traffic(
    store: CreditStore, books: Books, index: int, rng: random.Random, pace: Pace
) -> None:
    """
    Keyed holds and settlements, a round per archived chunk; the last hold reuses a key of an
    old hold (one no other task reuses), which is a new request now.
    """
    for round_ in range(ROUNDS):
        await pace.next_chunk()
        n = (index + round_) % USERS
        user = books.users[n]
        if round_ == ROUNDS - 1:
            key, old_hold = books.old_reserve_keys[n, index // USERS]
        else:
            key, old_hold = f"hold-{index}-{round_}", ""
        hold = await store.reserve_credits(user, rng.randint(1, 5), "chat", idempotency_key=key)
        assert hold.ok, hold
        assert not hold.idempotent
        assert old_hold != hold.reservation_id
        if old_hold:
            books.reused_keys += 1
        await checkpoint()
        charge = rng.randint(1, 8)
        settle_key = f"settle-{index}-{round_}"
        copies = 2 if round_ % 2 else 1  # a retry racing the first attempt
        results: list[DeductionResult] = []

        async with anyio.create_task_group() as tg:
            for _ in range(copies):
                tg.start_soon(
                    _settle, store, results, user, hold.reservation_id, charge, settle_key
                )
        assert all(r.ok for r in results), results
        assert 1 == sum(not r.idempotent for r in results)
        assert 1 == len({r.transaction_id for r in results})
        books.rows.add(results[0].transaction_id)
        books.spent[user] += charge
        books.usage_rows[user] += 1


async def _refunds(store: CreditStore, books: Books, debits: list[str], pace: Pace) -> None:
    """Refund 1 credit of each old debit, in the given order, one per archived chunk."""
    for debit in debits:
        result = await store.refund_credits(debit, 1, idempotency_key=f"refund-{debit}")
        _refund_seen(books, debit, result)
        await pace.next_chunk()


async def _maintenance(
    store: CreditStore, books: Books, destination: Path, pace: Pace, done: anyio.Event
) -> None:
    """Archive cutoff by cutoff with prunes between, then keep going until traffic stops."""
    for cutoff in CUTOFFS:
        books.archives.append(
            await store.archive_ledger(cutoff, destination, progress=pace.chunk_done)
        )
        books.prunes.append(await store.prune())
    pace.over()
    while not done.is_set():
        books.archives.append(await store.archive_ledger(LAST_CUTOFF, destination))
        books.prunes.append(await store.prune())
        await anyio.sleep(0.01)


def _inject_refunds(store: CreditStore, books: Books, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    Before the first `INJECTED` archive commits, refund 1 credit of a debit in the chunk.

    The chunk was read (and written to the file) with the debit's old refund total, so the
    commit must refuse it and `archive_ledger` must read the chunk again.
    """
    commit = store._archive_commit  # type: ignore[attr-defined]

    async def refund_then_commit(rows: list[E.StoredRow], before: datetime) -> None:
        if len(books.injected) < INJECTED:
            # A debit not refunded this way yet: the chunk comes back with the same rows.
            done = {r.original_transaction_id for r in books.injected}
            debit = next(
                (row.id for row in rows if row.id in books.old_debits and row.id not in done),
                None,
            )
            if debit is not None:
                result = await store.refund_credits(debit, 1, idempotency_key=f"inject-{debit}")
                assert result.ok, result
                books.injected.append(result)
                _refund_seen(books, debit, result)
        await commit(rows, before)

    monkeypatch.setattr(store, "_archive_commit", refund_then_commit)


@pytest.mark.parametrize("seed", [7])
async def test_prune_and_archive_under_traffic_lose_nothing(
    grown: tuple[CreditStore, FakeClock],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    seed: int,
) -> None:
    """Traffic, refunds of old debits, prunes and archives at once: every book balances."""
    store, clock = grown
    rng = random.Random(seed)
    books = Books(users=[f"user-{n}-{uuid.uuid4().hex[:8]}" for n in range(USERS)])
    destination = tmp_path / "archive.jsonl.gz"
    await _history(store, clock, books, rng)
    clock.set(NOW)
    _inject_refunds(store, books, monkeypatch)
    # Old debits oldest first (the archive's order) for half the users, newest first for the
    # others: either way the refunds meet the archive as it moves through the months.
    by_user: dict[str, list[str]] = defaultdict(list)
    for debit, user in books.old_debits.items():
        by_user[user].append(debit)
    for n, user in enumerate(books.users):
        if n % 2:
            by_user[user].reverse()
    traffic_done = anyio.Event()
    pace = Pace()

    async def traffic() -> None:
        async with anyio.create_task_group() as tg:
            for index in range(TASKS):
                rng_task = random.Random(seed * 1000 + index)
                tg.start_soon(_traffic, store, books, index, rng_task, pace)
            for debits in by_user.values():
                tg.start_soon(_refunds, store, books, debits, pace)
        traffic_done.set()

    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(traffic)
            tg.start_soon(_maintenance, store, books, destination, pace, traffic_done)
        # Once more with nothing racing: whatever a racing refund re-created goes too.
        books.archives.append(await store.archive_ledger(LAST_CUTOFF, destination))
        books.prunes.append(await store.prune())
        quiet = await store.prune(dry_run=True)

    lines = read_archive(destination)
    archived = {line["id"]: line for line in lines}
    ledgers = {user: await all_rows(store, user) for user in books.users}
    ledgers[books.team] = await all_team_rows(store, books.team)
    kept = {row.id: row for rows in ledgers.values() for row in rows}

    # Each row is in exactly one place, archived once, and nothing acknowledged is missing.
    assert len(lines) == len(archived) == sum(a.rows for a in books.archives)
    assert set() == set(archived) & set(kept)
    assert set() == books.rows - set(archived) - set(kept)
    assert books.history_rows == set(archived)
    assert all(datetime.fromisoformat(line["created_at"]) < LAST_CUTOFF for line in lines)
    assert all(row.created_at >= LAST_CUTOFF for row in kept.values())
    # Each archived debit carries exactly the refunds acknowledged; a refused refund found
    # its row archived; injected refunds forced re-reads and still count.
    assert INJECTED == len(books.injected)
    for debit in books.old_debits:
        assert books.refunded[debit] == archived[debit]["refunded"], archived[debit]
    assert all(debit in archived for debit in books.refused_as_archived)
    # The archive (7 rows a chunk) outruns a refunder (1 debit a chunk) going oldest first,
    # and a refunder going newest first gets in ahead of it: both outcomes happen.
    assert books.refused_as_archived
    assert len(books.refused_as_archived) < len(books.old_debits)
    # Every ledger, its archived rows first, still sums to its balance.
    for user in books.users:
        await assert_archived_invariants(store, user, lines)
    await assert_archived_invariants(store, books.team, lines, team=True)
    # Analytics read kept rows and rollups: all acknowledged usage, net of refunds.
    stats = await store.aggregate_stats(*WINDOW)
    assert sum(books.spent.values()) == stats.total_credits_consumed
    assert sum(books.usage_rows.values()) == stats.transaction_count
    spend = {
        row.user_id: (row.total_spend, row.transaction_count)
        for row in await store.spend_by_user(*WINDOW)
    }
    assert {user: (books.spent[user], books.usage_rows[user]) for user in books.users} == spend
    daily = await store.daily_spend(*WINDOW)
    assert sum(books.spent.values()) == sum(day.total_spend for day in daily)
    # Old keys and finished holds were pruned (a reused key's record may have been replaced
    # before prune saw it); nothing is left to prune.
    pruned_keys = sum(p.idempotency_keys for p in books.prunes)
    assert TASKS == books.reused_keys
    assert books.history_keys - books.reused_keys <= pruned_keys <= books.history_keys
    assert books.history_holds == sum(p.holds for p in books.prunes)
    assert (0, 0, 0) == (quiet.idempotency_keys, quiet.holds, quiet.windows)
