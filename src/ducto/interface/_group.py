"""
Group commit: callers queue their operations, and a leader runs a batch of them as one unit.

There is no background task. A caller that finds a free leader slot leads: it takes what is
queued (itself first), runs the batch, answers every caller in it, and hands leadership to the
oldest caller still queued. Others wait (on one event each, made only for a caller that waits)
until asked to lead, or until the batch that took their operation is done. A caller cancelled
before its operation was taken withdraws (nothing happened); once taken, its operation
completes and the call reports it, and the cancellation reaches the caller at its next
checkpoint. No caller is answered before the batch that holds its operation is done.

`SQLiteStore` runs one batch at a time (one connection; every operation in one
``BEGIN IMMEDIATE`` transaction, each in its own savepoint). `PostgresStore` runs a few batches
at once, each one transaction on a pooled connection, in rounds of operations on disjoint
accounts (an operation comes after the earlier ones that share an account with it).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio
from anyio.lowlevel import checkpoint

__all__ = ["GroupCommit", "Job"]


class Job:
    """One queued operation: what to run, on which accounts, and its outcome."""

    __slots__ = (
        "alone",
        "args",
        "error",
        "fn",
        "keys",
        "lead",
        "order",
        "result",
        "taken",
        "wake",
        "write",
    )

    def __init__(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        write: bool,
        keys: Sequence[tuple[str, str]] | None = None,
        alone: bool = False,
    ) -> None:
        self.fn = fn
        self.args = args
        self.write = write
        self.keys = keys
        self.alone = alone
        # Made only for a caller that waits: set when it is asked to lead a batch, or when the
        # batch that took its operation is done.
        self.wake: anyio.Event | None = None
        self.lead = False
        self.taken = False
        self.result: Any = None
        self.error: BaseException | None = None
        self.order = 0
        """Where the operation ran in its batch's serial order (set by stores that reorder)."""

    def outcome(self) -> Any:
        """The operation's result, or raise its error."""
        if self.error is not None:
            raise self.error
        return self.result


class GroupCommit:
    """
    The leader/follower queue (see the module docstring).

    Args:
        run: Runs a batch; it sets each job's ``result`` or ``error`` and must not raise.
        max_batch: The most operations one batch carries.
        max_leaders: How many batches may run at once.
    """

    def __init__(
        self,
        run: Callable[[list[Job]], Awaitable[None]],
        *,
        max_batch: int,
        max_leaders: int = 1,
    ) -> None:
        self._run = run
        self._max_batch = max_batch
        self._max_leaders = max_leaders
        self._queue: list[Job] = []
        self._leaders = 0
        self._idle: anyio.Event | None = None

    @property
    def busy(self) -> bool:
        """Whether a batch is running."""
        return self._leaders > 0

    async def wait_idle(self) -> None:
        """Wait until no batch is running (queued callers are then promoted as usual)."""
        while self._leaders:
            self._idle = anyio.Event()
            await self._idle.wait()

    async def submit(self, job: Job) -> Any:
        """Queue `job`, run it in some batch, and return its result (or raise its error)."""
        self._queue.append(job)
        if self._leaders >= self._max_leaders:
            wake = job.wake = anyio.Event()
            try:
                await wake.wait()
            except BaseException:
                if not job.taken:
                    # Nothing happened yet: withdraw (passing on leadership if it came).
                    self._queue.remove(job)
                    if job.lead:
                        self._leaders -= 1
                        self._promote()
                    raise
                # A leader took the operation as the cancellation arrived. It will run, so the
                # call completes and reports it; the cancellation, which anyio delivers at
                # every checkpoint of a cancelled scope, reaches the caller at its next one.
                with anyio.CancelScope(shield=True):
                    await wake.wait()
            if not job.lead:
                return job.outcome()  # woken because the batch that took it is done
        else:
            self._leaders += 1
            job.lead = True
            try:
                await checkpoint()
            except BaseException:
                self._queue.remove(job)
                self._leaders -= 1
                self._promote()
                raise
        try:
            batch = self._take(job)
            for queued in batch:
                queued.taken = True
            with anyio.CancelScope(shield=True):
                await self._run(batch)
            for queued in batch:
                if queued.wake is not None:
                    queued.wake.set()
        finally:
            self._leaders -= 1
            self._promote()
        return job.outcome()

    def _take(self, leader: Job) -> list[Job]:
        """The leader's batch: itself first, then what the queue holds, oldest first."""
        queue = self._queue
        queue.remove(leader)  # the oldest, or close to it
        batch = [leader]
        # Scan only the front of the queue (thousands may wait): callers asked to lead, but
        # not yet running, stay queued for their own batch.
        end = 0
        while end < len(queue) and len(batch) < self._max_batch:
            if not queue[end].lead:
                batch.append(queue[end])
            end += 1
        queue[:end] = [job for job in queue[:end] if job.lead]
        return batch

    def _promote(self) -> None:
        """Hand leadership to the oldest queued callers not yet asked, while slots are free."""
        for job in self._queue:
            if self._leaders >= self._max_leaders:
                break
            if not job.lead:
                self._leaders += 1
                job.lead = True
                assert job.wake is not None  # a queued caller waits on it
                job.wake.set()
        if not self._leaders and self._idle is not None:
            self._idle.set()
