"""Closed-loop load: N concurrent callers, each issuing calls (or streams) back to back.

Results keep their samples, so slices of one measurement taken at different times
(the bench interleaves paths, see bench/__main__.py) add up to one result.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterable, Awaitable, Callable
from dataclasses import dataclass

import numpy as np

UnaryCall = Callable[[], Awaitable[object]]
# One generation: yields how many tokens each streamed message carried.
Stream = Callable[[], AsyncIterable[int]]


def _percentile(samples: tuple[float, ...], q: float) -> float:
    return float(np.percentile(samples, q)) if samples else float("nan")


@dataclass(frozen=True)
class UnaryResult:
    concurrency: int
    seconds: float
    latencies_ms: tuple[float, ...]

    @property
    def calls(self) -> int:
        return len(self.latencies_ms)

    @property
    def p50_ms(self) -> float:
        return _percentile(self.latencies_ms, 50)

    @property
    def p99_ms(self) -> float:
        return _percentile(self.latencies_ms, 99)

    @property
    def per_second(self) -> float:
        return self.calls / self.seconds

    def __add__(self, other: UnaryResult) -> UnaryResult:
        return UnaryResult(
            self.concurrency, self.seconds + other.seconds, self.latencies_ms + other.latencies_ms
        )


async def warm_unary(call: UnaryCall, *, calls: int = 50) -> None:
    """Calls made before a measurement, so connections and caches are warm."""
    for _ in range(calls):
        await call()


async def unary_load(call: UnaryCall, *, concurrency: int, seconds: float) -> UnaryResult:
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def caller() -> None:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            await call()
            latencies.append((time.perf_counter() - started) * 1000)

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return UnaryResult(concurrency, time.perf_counter() - started, tuple(latencies))


@dataclass(frozen=True)
class StreamResult:
    concurrency: int
    seconds: float
    tokens: int
    ttfts_ms: tuple[float, ...]  # time to the first message, per generation
    rates: tuple[float, ...]  # tokens/s of each generation on its own

    @property
    def generations(self) -> int:
        return len(self.ttfts_ms)

    @property
    def ttft_p50_ms(self) -> float:
        return _percentile(self.ttfts_ms, 50)

    @property
    def stream_rate_p50(self) -> float:
        return _percentile(self.rates, 50)

    @property
    def tokens_per_second(self) -> float:
        """All callers together."""
        return self.tokens / self.seconds

    def __add__(self, other: StreamResult) -> StreamResult:
        return StreamResult(
            self.concurrency,
            self.seconds + other.seconds,
            self.tokens + other.tokens,
            self.ttfts_ms + other.ttfts_ms,
            self.rates + other.rates,
        )


async def _timed(stream: Stream) -> tuple[float, float, int]:
    """(seconds to the first message, seconds in all, tokens) of one generation."""
    started, first, count = time.perf_counter(), 0.0, 0
    async for tokens in stream():
        count += tokens
        first = first or time.perf_counter() - started
    return first, time.perf_counter() - started, count


async def warm_stream(stream: Stream, *, concurrency: int = 1) -> None:
    """One generation per caller before a measurement."""
    await asyncio.gather(*(_timed(stream) for _ in range(concurrency)))


async def stream_load(
    stream: Stream,
    *,
    concurrency: int = 1,
    seconds: float | None = None,
    generations: int | None = None,
) -> StreamResult:
    """`concurrency` callers run generations back to back, until `seconds` have passed
    (each finishes the generation it is in) or `generations` are done in all."""
    if (seconds is None) == (generations is None):
        raise ValueError("give either seconds or generations")
    firsts: list[float] = []
    rates: list[float] = []
    tokens = 0
    deadline = time.perf_counter() + seconds if seconds is not None else float("inf")
    remaining = generations if generations is not None else -1

    async def caller() -> None:
        nonlocal tokens, remaining
        while time.perf_counter() < deadline and remaining != 0:
            remaining -= 1
            first, total, count = await _timed(stream)
            firsts.append(first * 1000)
            rates.append(count / total)
            tokens += count

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return StreamResult(
        concurrency, time.perf_counter() - started, tokens, tuple(firsts), tuple(rates)
    )
