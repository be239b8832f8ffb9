"""Stream plumbing: pass on a stream's items in batches of whatever is ready.

A hop that relays a token stream pays grpc's per-message cost on every message it
sends. When its caller reads more slowly than the upstream produces (many streams
at once), several items are waiting by the time the next message can go out;
sending them as one message costs one send instead of several. When the caller
keeps up, every item goes out alone and at once: batching never waits for items.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TypeVar

T = TypeVar("T")

_END = object()


async def ready_batches(
    source: AsyncIterator[T], *, limit: int = 64
) -> AsyncGenerator[list[T], None]:
    """Lists of `source`'s items, each holding what arrived since the last was taken.

    A reader task drains `source`; leaving this generator early (the caller was
    cancelled) cancels that task, which closes `source` where it waits.
    """
    queue: asyncio.Queue[object] = asyncio.Queue()

    async def read() -> None:
        try:
            async for item in source:
                queue.put_nowait(item)
        except BaseException as exc:  # handed to the consumer, which raises it
            queue.put_nowait(_Failure(exc))
            if isinstance(exc, asyncio.CancelledError):
                raise
        else:
            queue.put_nowait(_END)

    reader = asyncio.create_task(read())
    try:
        while True:
            item = await queue.get()
            batch: list[T] = []
            while True:
                if item is _END:
                    if batch:
                        yield batch
                    return
                if isinstance(item, _Failure):
                    if batch:
                        yield batch
                    raise item.error
                batch.append(item)  # type: ignore[arg-type]
                if len(batch) >= limit or queue.empty():
                    break
                item = queue.get_nowait()
            yield batch
    finally:
        if not reader.done():
            reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error
