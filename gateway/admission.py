"""Overload control for one model version: bounded slots per worker and a bounded FIFO queue.

Each worker serves at most `limit` outstanding calls of one model version through this
gateway (a stream holds its slot until it ends). A call that finds every slot taken
waits in the model's queue, oldest first, for at most a given time; a full queue, or a
wait that runs out, is refused at once (RESOURCE_EXHAUSTED with a retry-after) rather
than queued without limit. A slot given back goes straight to the oldest waiter that
may use that worker, so its count never drops and rises again in between.

The hot path, a free slot and nobody waiting, is `free()` and `take()`: a dict lookup,
two additions and the worker's `taken()` check, no future and no await. Only a call
that must wait allocates one.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Iterable
from typing import Generic, Protocol, TypeVar


class Worker(Protocol):
    """What a slot needs of a worker: its calls in flight over every model, and whether
    it may take a call now (serving and not ejected)."""

    outstanding: int

    def available(self, now: float) -> bool: ...

    def taken(self) -> None:
        """A slot was taken on it (a worker back from an ejection starts its trial)."""
        ...

    def untaken(self) -> None:
        """A slot taken on it went to a call that ended before using it."""
        ...


W = TypeVar("W", bound=Worker)


class QueueFull(Exception):
    """Every slot is taken and the queue holds as many waiters as it may."""


class QueueTimeout(Exception):
    """The wait ran out before a slot was handed over."""


class _Waiter(Generic[W]):
    __slots__ = ("exclude", "future", "since")

    def __init__(self, future: asyncio.Future[W], exclude: W | None) -> None:
        self.future = future
        self.exclude = exclude
        self.since = time.perf_counter()


class ModelSlots(Generic[W]):
    """The slots of one model version on every worker that serves it, and its queue."""

    __slots__ = ("in_use", "limit", "queue_size", "waiters")

    def __init__(self, *, limit: int, queue_size: int) -> None:
        self.limit = limit
        self.queue_size = queue_size
        self.in_use: dict[W, int] = {}
        self.waiters: deque[_Waiter[W]] = deque()

    def free(self, worker: W) -> bool:
        return self.in_use.get(worker, 0) < self.limit

    def take(self, worker: W) -> None:
        """Takes a slot on `worker` (the caller checked `free`)."""
        self.in_use[worker] = self.in_use.get(worker, 0) + 1
        worker.outstanding += 1
        worker.taken()

    def release(self, worker: W) -> None:
        """Gives a slot back: to the oldest waiter that may use `worker`, else freed."""
        if self.waiters and self._hand_over(worker):
            return
        worker.outstanding -= 1
        left = self.in_use[worker] - 1
        if left:
            self.in_use[worker] = left
        else:  # no entry kept for a worker that left the pool
            del self.in_use[worker]

    def _hand_over(self, worker: W) -> bool:
        if not worker.available(time.monotonic()):
            return False  # ejected or draining: its slot is not worth waiting for
        for waiter in self.waiters:
            if waiter.exclude is not worker and not waiter.future.done():
                self.waiters.remove(waiter)
                worker.taken()  # taken anew by the waiter (a worker back on trial starts it)
                waiter.future.set_result(worker)  # the slot, and its counts, pass on as they are
                return True
        return False

    def offer(self, workers: Iterable[W]) -> None:
        """Hands free slots on `workers` to waiters, oldest first: for capacity that did
        not come from a call ending (a worker that joined, came back to serving, or
        whose ejection ran out), which would otherwise sit idle behind the queue."""
        if not self.waiters:
            return
        now = time.monotonic()
        for worker in workers:
            while self.waiters and self.free(worker) and worker.available(now):
                waiter = next(
                    (w for w in self.waiters if w.exclude is not worker and not w.future.done()),
                    None,
                )
                if waiter is None:
                    break
                self.waiters.remove(waiter)
                self.take(worker)
                waiter.future.set_result(worker)

    def abandon(self, error: Exception) -> None:
        """Ends every wait with `error`: no worker serves this model version any more."""
        waiters, self.waiters = self.waiters, deque()
        for waiter in waiters:
            if not waiter.future.done():
                waiter.future.set_exception(error)

    async def wait(self, timeout: float, *, exclude: W | None = None) -> tuple[W, float]:
        """Waits for a slot handed over (FIFO): the worker and how long it took.

        QueueFull at once if the queue is full; QueueTimeout after `timeout`. A
        waiter cancelled or timed out leaves the queue, and a slot handed to it in
        that same moment is passed on, never lost.
        """
        if len(self.waiters) >= self.queue_size or timeout <= 0:
            raise QueueFull
        waiter: _Waiter[W] = _Waiter(asyncio.get_running_loop().create_future(), exclude)
        self.waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout):
                worker = await waiter.future
        except BaseException as exc:
            future = waiter.future
            if future.done() and not future.cancelled() and future.exception() is None:
                # Handed a slot as the wait ended: unused (a trial it began is undone),
                # it goes to the next in line.
                worker = future.result()
                worker.untaken()
                self.release(worker)
            else:
                future.cancel()
                with contextlib.suppress(ValueError):  # a hand-over took it out
                    self.waiters.remove(waiter)
            if isinstance(exc, TimeoutError):
                raise QueueTimeout from None
            raise
        return worker, time.perf_counter() - waiter.since

    def __len__(self) -> int:
        """Calls waiting."""
        return len(self.waiters)
