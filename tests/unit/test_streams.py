"""ready_batches: what has arrived goes out together, nothing waits, errors and cancels pass."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from services.runtime.streams import ready_batches


async def _items(gate: asyncio.Queue[int | None], closed: list[bool]) -> AsyncIterator[int]:
    try:
        while (item := await gate.get()) is not None:
            yield item
    finally:
        closed.append(True)


async def test_items_that_are_ready_travel_together_and_none_waits() -> None:
    gate: asyncio.Queue[int | None] = asyncio.Queue()
    closed: list[bool] = []
    batches = ready_batches(_items(gate, closed))
    gate.put_nowait(1)
    assert await anext(batches) == [1]  # alone and at once: nothing else was ready
    for item in (2, 3, 4):
        gate.put_nowait(item)
    await asyncio.sleep(0.01)  # the reader takes all three before the next batch is asked for
    assert await anext(batches) == [2, 3, 4]
    gate.put_nowait(None)
    with pytest.raises(StopAsyncIteration):
        await anext(batches)
    assert closed == [True]


async def test_a_batch_is_capped() -> None:
    async def many() -> AsyncIterator[int]:
        for item in range(10):
            yield item

    sizes = [len(batch) async for batch in ready_batches(many(), limit=4)]
    assert sizes[0] == 1  # the first item alone
    assert sum(sizes) == 10
    assert max(sizes) == 4  # the reader outruns the consumer, and a batch stops at the cap


async def test_an_error_comes_after_the_items_before_it() -> None:
    async def failing() -> AsyncIterator[int]:
        yield 1
        raise ValueError("upstream broke")

    received = []
    with pytest.raises(ValueError, match="upstream broke"):
        async for batch in ready_batches(failing()):
            received.extend(batch)
    assert received == [1]


async def test_leaving_early_closes_the_source() -> None:
    gate: asyncio.Queue[int | None] = asyncio.Queue()
    closed: list[bool] = []
    batches = ready_batches(_items(gate, closed))
    gate.put_nowait(1)
    assert await anext(batches) == [1]
    await batches.aclose()  # as when the caller cancels mid-stream
    assert closed == [True]


async def test_a_fast_stream_lingers_a_slow_one_does_not() -> None:
    async def paced(gap: float, count: int) -> AsyncIterator[int]:
        for item in range(count):
            await asyncio.sleep(gap)
            yield item

    fast = [len(b) async for b in ready_batches(paced(0.001, 40), linger=0.02)]
    assert fast[0] == 1 and sum(fast) == 40
    assert len(fast) < 20, f"items 1 ms apart should share messages, got {fast}"
    slow = [len(b) async for b in ready_batches(paced(0.1, 5), linger=0.005)]
    assert slow == [1, 1, 1, 1, 1]  # 100 ms apart: never held back


async def test_cancelling_before_the_first_item_closes_the_source() -> None:
    gate: asyncio.Queue[int | None] = asyncio.Queue()
    closed: list[bool] = []
    batches = ready_batches(_items(gate, closed))
    waiting = asyncio.create_task(anext(batches))
    await asyncio.sleep(0.01)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert closed == [True]
