"""Running worker processes against a store, shared by the SQLite and Postgres store tests."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest
from tests.contract._checks import all_rows, assert_invariants

from ducto.interface import _ledger as L
from ducto.interface.base import CreditStore
from ducto.interface.models import TransactionRow

WORKER = Path(__file__).with_name("_sqlite_worker.py")
CHILD_TIMEOUT = 120.0
ASYNC_TIMEOUT = 60.0


def exist(*paths: Path) -> bool:
    """Whether every one of `paths` exists."""
    return all(path.exists() for path in paths)


@dataclass
class Child:
    """One worker process and the file its output goes to."""

    process: subprocess.Popen[bytes]
    output: Path

    def failure(self) -> str:
        """The worker's exit code and output, for an assertion message."""
        return f"worker exited {self.process.returncode}:\n{self.output.read_text()}"


@contextlib.contextmanager
def spawn(mode: str, cfg: dict[str, Any], workdir: Path, name: str) -> Iterator[Child]:
    """Start `_sqlite_worker.py` in a fresh interpreter; kill and reap it on exit."""
    config = workdir / f"{name}.json"
    config.write_text(json.dumps(cfg), encoding="utf-8")
    output = workdir / f"{name}.out"
    with output.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, str(WORKER), mode, str(config)],
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        yield Child(process, output)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


def wait_for(condition: Callable[[], bool], children: list[Child], timeout: float) -> None:
    """Poll `condition` until true; fail early if a child exits, or after `timeout`."""
    deadline = time.monotonic() + timeout
    while not condition():
        for child in children:
            if child.process.poll() is not None:
                pytest.fail(child.failure())
        if time.monotonic() > deadline:
            pytest.fail("timed out waiting for the workers")
        time.sleep(0.002)


def finish(child: Child, timeout: float = CHILD_TIMEOUT) -> None:
    """Wait for `child` to exit and fail the test unless it exited 0."""
    try:
        child.process.wait(timeout)
    except subprocess.TimeoutExpired:
        child.process.kill()
        child.process.wait()
        pytest.fail(f"worker did not finish in {timeout}s:\n{child.output.read_text()}")
    if child.process.returncode != 0:
        pytest.fail(child.failure())


async def gather(calls: Sequence[Callable[[], Awaitable[object]]], limit: int = 0) -> None:
    """Run every call as its own task at once (at most `limit` at a time if given)."""
    limiter = anyio.CapacityLimiter(limit) if limit else None

    async def run(call: Callable[[], Awaitable[object]]) -> None:
        if limiter is None:
            await call()
            return
        async with limiter:
            await call()

    with anyio.fail_after(ASYNC_TIMEOUT):
        async with anyio.create_task_group() as tg:
            for call in calls:
                tg.start_soon(run, call)


CHURN_BACKENDS = ("asyncio", "trio", "asyncio", "trio")
CHURN_TASKS = 50


@dataclass
class ChurnReport:
    """What every churn process reported, merged."""

    settled: list[dict[str, Any]]
    released: list[str]
    refused: int
    problems: list[str]


def run_churn(
    target: dict[str, Any], workdir: Path, users: list[str], iterations: int
) -> ChurnReport:
    """
    Run the churn workers all at once and merge their reports.

    Args:
        target: The store the workers open: ``{"path": ..., "synchronous": ...}`` for a
            SQLite file or ``{"url": ...}`` for any `open_store` URL.
        workdir: Where configs, results and outputs go.
        users: The users to churn (funded already).
        iterations: Steps per task.
    """
    go = workdir / "go"
    base = {
        **target,
        "users": users,
        "tasks": CHURN_TASKS,
        "iterations": iterations,
        "seed": 20260315,
        "go": str(go),
    }
    with contextlib.ExitStack() as stack:
        children: list[Child] = []
        for index, backend in enumerate(CHURN_BACKENDS):
            cfg = base | {
                "backend": backend,
                "process": index,
                "ready": str(workdir / f"ready-{index}"),
                "out": str(workdir / f"churn-{index}.result"),
            }
            children.append(stack.enter_context(spawn("churn", cfg, workdir, f"churn-{index}")))
        wait_for(
            partial(exist, *(workdir / f"ready-{i}" for i in range(len(children)))),
            children,
            CHILD_TIMEOUT,
        )
        go.touch()
        for child in children:
            finish(child)
    report = ChurnReport([], [], 0, [])
    for index in range(len(CHURN_BACKENDS)):
        part = json.loads((workdir / f"churn-{index}.result").read_text(encoding="utf-8"))
        report.settled += part["settled"]
        report.released += part["released"]
        report.refused += part["refused"]
        report.problems += part["problems"]
    return report


async def check_churn(
    store: CreditStore,
    states: dict[str, int],
    users: list[str],
    grant: int,
    report: ChurnReport,
) -> None:
    """
    Check a store against the workers' merged reports, user by user and hold by hold.

    Args:
        store: The store, open and set up.
        states: Every hold the store has, by id, with its state (`_ledger.HOLD_*`).
        users: The users the workers churned.
        grant: What each user was granted before.
        report: What the workers reported.
    """
    by_rid = {s["rid"]: s for s in report.settled}
    charged: Counter[str] = Counter()
    for settled in report.settled:
        charged[settled["user"]] += settled["charged"]
    usage: list[TransactionRow] = []
    balances: dict[str, int] = {}

    async def check(user: str) -> None:
        await assert_invariants(store, user)
        rows = await all_rows(store, user)
        usage.extend(r for r in rows if r.type == "usage")
        balances[user] = (await store.get_balance(user)).balance

    await gather([partial(check, u) for u in users], limit=16)

    per_hold = Counter(row.reservation_id for row in usage)
    assert set() == {rid for rid, n in per_hold.items() if n != 1}
    assert set(by_rid) == set(per_hold)
    for row in usage:
        settled = by_rid[row.reservation_id]
        assert (settled["tx"], -settled["charged"], settled["key"]) == (
            row.id,
            row.amount,
            row.idempotency_key,
        )
    keys = Counter(row.idempotency_key for row in usage if row.idempotency_key is not None)
    assert {s["key"] for s in report.settled if s["key"] is not None} == set(keys)
    assert {1} == set(keys.values())
    assert {u: grant - charged[u] for u in users} == balances
    assert min(balances.values()) >= 0

    assert len(report.settled) + len(report.released) == len(states)
    assert dict.fromkeys(by_rid, L.HOLD_SETTLED) == {
        rid: s for rid, s in states.items() if s == L.HOLD_SETTLED
    }
    assert dict.fromkeys(report.released, L.HOLD_RELEASED) == {
        rid: s for rid, s in states.items() if s == L.HOLD_RELEASED
    }
