"""Stream plumbing: pass on a stream's items in batches of what is ready.

A hop that relays a token stream pays grpc's per-message cost (tens of microseconds
of CPU) on every message it sends, whatever the message holds. Tokens that arrive
close together can share a message: the first item goes out at once, and later
ones wait at most `linger` seconds for company, but only while the stream is fast
(its items arrive less than `linger` apart). A stream slower than that, which is
any real language model serving a person, never waits. This is what vLLM's
`--stream-interval` and Kafka's `linger.ms` trade, bounded in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TypeVar

T = TypeVar("T")

_END = object()


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


async def ready_batches(
    source: AsyncIterator[T], *, linger: float = 0.0, limit: int = 64
) -> AsyncGenerator[list[T], None]:
    """Lists of `source`'s items in order: the first alone and at once, then what is ready.

    A reader task drains `source` after its first item; leaving this generator
    early (the caller was cancelled) cancels that task, which closes `source`.
    """
    try:
        # Straight from the source: the first item (time to first token) never
        # waits for a task switch.
        first = await anext(source)
    except StopAsyncIteration:
        return
    except BaseException:
        await _close(source)
        raise
    queue: asyncio.Queue[tuple[float, object]] = asyncio.Queue()

    async def read() -> None:
        try:
            async for item in source:
                queue.put_nowait((time.monotonic(), item))
        except BaseException as exc:  # handed to the consumer, which raises it
            queue.put_nowait((0.0, _Failure(exc)))
            if isinstance(exc, asyncio.CancelledError):
                raise
        else:
            queue.put_nowait((0.0, _END))

    reader: asyncio.Task[None] | None = None
    try:
        yield [first]
        reader = asyncio.create_task(read())
        previous = time.monotonic()
        while True:
            arrived, item = await queue.get()
            if linger > 0 and queue.empty() and arrived - previous < linger:
                # A fast stream: let the next few items catch up with this one.
                await asyncio.sleep(linger)
            previous = arrived
            batch: list[T] = []
            while True:
                if item is _END or isinstance(item, _Failure):
                    if batch:
                        yield batch
                    if isinstance(item, _Failure):
                        raise item.error
                    return
                batch.append(item)  # type: ignore[arg-type]
                if len(batch) >= limit or queue.empty():
                    break
                arrived, item = queue.get_nowait()
                previous = arrived
            yield batch
    finally:
        if reader is None:
            await _close(source)
        elif not reader.done():
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader


async def _close(source: AsyncIterator[T]) -> None:
    aclose = getattr(source, "aclose", None)
    if aclose is not None:
        await aclose()
