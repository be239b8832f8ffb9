"""Closed-loop load: N concurrent callers, each issuing calls back to back for a while."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterable, Awaitable, Callable
from dataclasses import dataclass

import numpy as np
from tensorgate.inference.v1 import inference_pb2


@dataclass(frozen=True)
class UnaryResult:
    concurrency: int
    calls: int
    seconds: float
    p50_ms: float
    p99_ms: float

    @property
    def per_second(self) -> float:
        return self.calls / self.seconds


async def unary_load(
    call: Callable[[], Awaitable[object]], *, concurrency: int, seconds: float, warmup: int = 50
) -> UnaryResult:
    for _ in range(warmup):
        await call()
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def caller() -> None:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    ms = np.asarray(latencies) * 1000
    return UnaryResult(
        concurrency,
        len(latencies),
        elapsed,
        float(np.percentile(ms, 50)),
        float(np.percentile(ms, 99)),
    )


@dataclass(frozen=True)
class StreamResult:
    streams: int
    ttft_p50_ms: float
    tokens_per_second: float
    tokens: int


async def _timed(chunks: AsyncIterable[inference_pb2.GenerateChunk]) -> tuple[float, float, int]:
    """(seconds to the first chunk, seconds in all, tokens) of one generation."""
    started, first, count = time.perf_counter(), 0.0, 0
    async for chunk in chunks:
        count += len(chunk.token_ids)
        first = first or time.perf_counter() - started
    return first, time.perf_counter() - started, count


async def stream_load(
    stream: Callable[[], AsyncIterable[inference_pb2.GenerateChunk]], *, streams: int
) -> StreamResult:
    """Runs `streams` generations one after another, after one to warm up."""
    await _timed(stream())
    firsts, rates, tokens = [], [], 0
    for _ in range(streams):
        first, total, count = await _timed(stream())
        firsts.append(first * 1000)
        rates.append(count / total)
        tokens += count
    return StreamResult(streams, float(np.median(firsts)), float(np.median(rates)), tokens)
