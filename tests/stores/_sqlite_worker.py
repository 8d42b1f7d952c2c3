"""
Child processes for the SQLiteStore tests, run as ``python _sqlite_worker.py MODE CONFIG``.

``CONFIG`` is a JSON file written by the parent. Every mode runs one `SQLiteStore` on the
event loop the config names (``anyio.run`` on asyncio or trio) and reports through files:

- ``churn``: many tasks loop reserve, checkpoint, deduct (some keyed, some retried with the same
  key, some raced with a duplicate) or release, against users the parent funded; writes what it
  settled, released and saw go wrong to ``out`` as JSON.
- ``crash``: loops acknowledged deducts and releases forever until the parent kills it; before
  each settle it appends an ``intent`` line and after it an ``ack`` line to the side log, each
  flushed and fsynced. On start it first finishes the intents the previous child left open.
  With ``recover`` set it only does that and exits.
- ``setup``: waits for the parent's go file, then calls ``setup()`` and writes the result.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from anyio.lowlevel import checkpoint

from ducto.errors import ErrorCode
from ducto.interface.models import DeductionResult
from ducto.interface.sqlite import SQLiteStore

GO_POLL = 0.005


def _ready_then_wait(cfg: dict[str, Any], timeout: float = 60.0) -> None:
    """Tell the parent this process is ready, then block until its go file appears."""
    Path(cfg["ready"]).touch()
    go = Path(cfg["go"])
    deadline = time.monotonic() + timeout
    while not go.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{go} never appeared")
        time.sleep(GO_POLL)


def _report(cfg: dict[str, Any], text: str) -> None:
    """Write this process's result where the parent reads it."""
    Path(cfg["out"]).write_text(text, encoding="utf-8")


# -- churn -------------------------------------------------------------------------------------


@dataclass
class _Churn:
    """What one churn process saw."""

    settled: list[dict[str, Any]] = field(default_factory=list)
    released: list[str] = field(default_factory=list)
    refused: int = 0
    problems: list[str] = field(default_factory=list)

    def expect(self, condition: bool, message: str) -> None:
        """Record `message` when `condition` is false."""
        if not condition:
            self.problems.append(message)


async def _settle_into(
    into: list[DeductionResult], store: SQLiteStore, args: tuple[str, str, int, str]
) -> None:
    into.append(await store.deduct_credits(*args))


async def _churn_task(store: SQLiteStore, cfg: dict[str, Any], task: int, seen: _Churn) -> None:
    rng = random.Random(f"{cfg['seed']}-{cfg['process']}-{task}")
    users: list[str] = cfg["users"]
    for step in range(cfg["iterations"]):
        user = rng.choice(users)
        amount = rng.randint(1, 10)
        hold = await store.reserve_credits(user, amount, "churn", min_balance=0)
        if not hold.ok:
            seen.expect(ErrorCode.INSUFFICIENT_CREDITS == hold.error, f"reserve: {hold}")
            seen.refused += 1
            continue
        await checkpoint()
        rid = hold.reservation_id
        roll = rng.random()
        if roll < 0.15:
            released = await store.release_reservation(user, rid)
            seen.expect(released.ok and released.released, f"release: {released}")
            seen.released.append(rid)
            continue
        charge = rng.randint(0, amount)
        key = f"p{cfg['process']}-t{task}-s{step}" if roll < 0.65 else None
        if key is not None and roll < 0.35:
            # Two copies of the same keyed settle race each other.
            pair: list[DeductionResult] = []
            async with anyio.create_task_group() as tg:
                for _ in range(2):
                    tg.start_soon(_settle_into, pair, store, (user, rid, charge, key))
            first, second = pair
            seen.expect(first.ok and second.ok, f"raced settle: {pair}")
            seen.expect(first.transaction_id == second.transaction_id, f"raced: {pair}")
            seen.expect(1 == sum(not r.idempotent for r in pair), f"raced: {pair}")
            done = first if not first.idempotent else second
        else:
            done = await store.deduct_credits(user, rid, charge, key)
            seen.expect(done.ok and not done.idempotent, f"settle: {done}")
        if not done.ok:
            continue
        seen.expect(charge == done.charged, f"charged {done.charged}, not {charge}")
        seen.settled.append(
            {"user": user, "rid": rid, "tx": done.transaction_id, "charged": charge, "key": key}
        )
        if key is not None:
            await checkpoint()
            again = await store.deduct_credits(user, rid, charge, key)
            seen.expect(again.ok and again.idempotent, f"retry: {again}")
            seen.expect(done.transaction_id == again.transaction_id, f"retry tx: {again}")
            seen.expect(done.balance_after == again.balance_after, f"retry: {again}")
            if rng.random() < 0.3:
                other = await store.deduct_credits(user, rid, charge + 1, key)
                seen.expect(ErrorCode.IDEMPOTENCY_CONFLICT == other.error, f"conflict: {other}")
        elif rng.random() < 0.3:
            twice = await store.deduct_credits(user, rid, charge)
            seen.expect(ErrorCode.RESERVATION_ALREADY_SETTLED == twice.error, f"twice: {twice}")


async def _churn(cfg: dict[str, Any]) -> None:
    seen = _Churn()
    async with SQLiteStore(cfg["path"], synchronous=cfg["synchronous"], busy_timeout=60.0) as store:
        _ready_then_wait(cfg)
        async with anyio.create_task_group() as tg:
            for task in range(cfg["tasks"]):
                tg.start_soon(_churn_task, store, cfg, task, seen)
    _report(cfg, json.dumps(seen.__dict__))


# -- crash -------------------------------------------------------------------------------------


def read_log(path: Path) -> list[dict[str, Any]]:
    """The complete lines of a side log; a torn last line was never acknowledged."""
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    return [json.loads(line) for line in text.split("\n")[:-1]]


def _drop_torn_line(path: Path) -> None:
    """Cut a last line the previous child did not finish writing."""
    if not path.exists():
        return
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep != len(data):
        with path.open("r+b") as log:
            log.truncate(keep)
            os.fsync(log.fileno())


def _append(fd: int, entry: dict[str, Any]) -> None:
    """Append one line to the side log and make it durable before returning."""
    os.write(fd, (json.dumps(entry) + "\n").encode())
    os.fsync(fd)


def _open_intents(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The intents the log holds no ack for, oldest first."""
    acked = {e["key"] for e in entries if e["kind"] == "ack"}
    return [e for e in entries if e["kind"] == "intent" and e["key"] not in acked]


async def _finish(store: SQLiteStore, fd: int, intent: dict[str, Any], retried: bool) -> None:
    """Carry out one logged intent and log its acknowledgement."""
    user, rid, key = intent["user"], intent["rid"], intent["key"]
    if intent["op"] == "release":
        released = await store.release_reservation(user, rid)
        if not (released.ok and released.released):
            raise AssertionError(f"release {rid}: {released}")
        _append(fd, {"kind": "ack", "op": "release", "key": key, "rid": rid, "retried": retried})
        return
    done = await store.deduct_credits(user, rid, intent["amount"], key)
    if not done.ok or (done.idempotent and not retried):
        raise AssertionError(f"deduct {key}: {done}")
    _append(
        fd,
        {
            "kind": "ack",
            "op": "deduct",
            "key": key,
            "rid": rid,
            "tx": done.transaction_id,
            "amount": done.charged,
            "balance_after": done.balance_after,
            "retried": retried,
            "idempotent": done.idempotent,
        },
    )


async def _crash_task(store: SQLiteStore, fd: int, cfg: dict[str, Any], task: int) -> None:
    rng = random.Random(f"{cfg['seed']}-{cfg['round']}-{task}")
    user = cfg["user"]
    step = 0
    while True:
        step += 1
        amount = rng.randint(1, 5)
        hold = await store.reserve_credits(user, amount, "crash", min_balance=0)
        if not hold.ok:
            raise AssertionError(f"reserve: {hold}")
        op = "release" if rng.random() < 0.15 else "deduct"
        intent = {
            "kind": "intent",
            "op": op,
            "key": f"r{cfg['round']}-t{task}-s{step}",
            "user": user,
            "rid": hold.reservation_id,
            "amount": rng.randint(0, amount),
        }
        _append(fd, intent)
        await _finish(store, fd, intent, retried=False)


async def _crash(cfg: dict[str, Any]) -> None:
    log = Path(cfg["log"])
    _drop_torn_line(log)
    entries = read_log(log)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        async with SQLiteStore(cfg["path"], synchronous=cfg["synchronous"]) as store:
            await store.setup()
            balance = await store.get_balance(cfg["user"])
            _append(fd, {"kind": "start", "round": cfg["round"], "balance": balance.balance})
            for intent in _open_intents(entries):
                await _finish(store, fd, intent, retried=True)
            if cfg.get("recover"):
                return
            async with anyio.create_task_group() as tg:
                for task in range(cfg["tasks"]):
                    tg.start_soon(_crash_task, store, fd, cfg, task)
    finally:
        os.close(fd)


# -- setup -------------------------------------------------------------------------------------


async def _setup(cfg: dict[str, Any]) -> None:
    _ready_then_wait(cfg)
    async with SQLiteStore(cfg["path"], synchronous="NORMAL", busy_timeout=30.0) as store:
        result = await store.setup()
    _report(cfg, result.model_dump_json())


MODES = {"churn": _churn, "crash": _crash, "setup": _setup}


def main(argv: list[str]) -> int:
    """Run the mode `argv[1]` with the config file `argv[2]`."""
    mode, config = argv[1], Path(argv[2])
    cfg: dict[str, Any] = json.loads(config.read_text(encoding="utf-8"))
    try:
        anyio.run(MODES[mode], cfg, backend=cfg["backend"])
    except Exception:
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
