"""A failing worker is ejected with exponential backoff and probed back by one trial
call; a stream cut by a lost worker says so; deadlines and cancels reach the worker.

Workers here are bare gRPC servers (tests/fake_worker.py) that fail on cue: a lost
transport (UNAVAILABLE with no request id) or their own answers (with a request id).
Nothing here reads a clock: the backoff is checked by the lengths the gateway chose.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import grpc
import numpy as np
import pytest
from tensorgate import AsyncGatewayClient, TensorgateClientError

from gateway.server import Gateway
from gateway.worker_pool import WorkerEndpoint
from tests.fake_worker import FakeWorker, routing_gateway
from tests.helpers import until

IMAGE = {"image": np.zeros((1, 64), np.float32)}


async def _gateway(*workers: str, **overrides: object) -> Gateway:
    # Short ejections, so backoff and return are seen in a test's time.
    return await routing_gateway(
        *workers, **{"eject_seconds": 0.2, "eject_max_seconds": 0.8, **overrides}
    )


def _endpoint(gateway: Gateway, fake: FakeWorker) -> WorkerEndpoint:
    return gateway.pool._workers[fake.address]


@pytest.fixture
async def pair() -> AsyncIterator[tuple[FakeWorker, FakeWorker]]:
    flaky, steady = await FakeWorker.start(), await FakeWorker.start()
    yield flaky, steady
    await flaky.stop()
    await steady.stop()


async def _calls_until(
    client: AsyncGatewayClient, check: Callable[[], bool], what: str, seconds: float = 60
) -> int:
    """Infer calls, one at a time and each one succeeding, until `check()`; how many."""
    for count in range(1, int(seconds / 0.02)):
        await asyncio.wait_for(client.infer("digits", IMAGE), 30)
        if check():
            return count
        await asyncio.sleep(0.02)
    raise AssertionError(f"still not true after {seconds}s: {what}")


def _ejected(endpoint: WorkerEndpoint, times: int) -> Callable[[], bool]:
    return lambda: endpoint.ejections == times


async def test_a_failing_worker_is_ejected_with_backoff_and_probed_back(
    pair: tuple[FakeWorker, FakeWorker],
) -> None:
    flaky, steady = pair
    gateway = await _gateway(flaky.address, steady.address)
    try:
        endpoint = _endpoint(gateway, flaky)
        async with AsyncGatewayClient(gateway.address) as client:
            await _calls_until(client, lambda: flaky.calls > 0, "a call on the flaky worker")
            flaky.failing = grpc.StatusCode.UNAVAILABLE  # it cannot be reached, say
            lengths = []
            # Every call still succeeds (retried on the steady worker). The flaky one
            # gets one trial call each time its ejection ends, and fails it: ejected
            # again for twice as long, up to the cap.
            for ejections in range(1, 5):
                await _calls_until(client, _ejected(endpoint, ejections), f"ejection {ejections}")
                assert flaky.calls == ejections + 1  # one trial after each, not a burst
                assert endpoint.ejections == ejections
                lengths.append(endpoint.ejected_for)
            assert lengths == [0.2, 0.4, 0.8, 0.8]
            flaky.failing = None  # it recovers: its next trial is served
            reached = flaky.calls
            await _calls_until(client, lambda: endpoint.ejections == 0, "the worker back")
            assert flaky.calls == reached + 1 and not endpoint.on_trial
            # Back in rotation: it takes calls again, and a new failure starts from the
            # first ejection length.
            reached = flaky.calls
            await _calls_until(client, lambda: flaky.calls >= reached + 3, "calls on it again")
            flaky.failing = grpc.StatusCode.UNAVAILABLE
            await _calls_until(client, lambda: endpoint.ejections == 1, "a new ejection")
            assert endpoint.ejected_for == 0.2
        assert steady.calls > 0
    finally:
        await gateway.stop()


async def test_a_worker_that_answers_failures_itself_is_ejected_after_several(
    pair: tuple[FakeWorker, FakeWorker],
) -> None:
    flaky, steady = pair
    gateway = await _gateway(flaky.address, steady.address, eject_after_failures=3)
    try:
        endpoint = _endpoint(gateway, flaky)
        flaky.failing = grpc.StatusCode.UNAVAILABLE
        flaky.own_failure = True  # its Triton is gone: it says so, with its request id
        async with AsyncGatewayClient(gateway.address) as client:
            await _calls_until(client, lambda: flaky.calls == 2, "two failures")
            assert endpoint.ejections == 0 and endpoint.failures == 2
            await _calls_until(client, lambda: flaky.calls == 3, "a third failure")
            assert endpoint.ejections == 1 and endpoint.failures == 0
    finally:
        await gateway.stop()


async def test_a_stream_whose_worker_is_lost_says_so_and_is_not_retried(
    pair: tuple[FakeWorker, FakeWorker],
) -> None:
    flaky, steady = pair
    flaky.break_streams = True
    gateway = await _gateway(flaky.address, steady.address)
    try:
        async with AsyncGatewayClient(gateway.address) as client:
            got = 0
            with pytest.raises(TensorgateClientError) as error:
                async for _ in client.generate("tinylm", "Hi", max_tokens=2):
                    got += 1
            assert got == 1  # the first chunk came: no retry may repeat it
            assert error.value.code == grpc.StatusCode.UNAVAILABLE
            assert "worker serving model tinylm:1 was lost" in error.value.message
            assert "retry" in error.value.message
            assert steady.calls == 0
            # Before its first chunk a stream is retried on another worker.
            flaky.failing = grpc.StatusCode.UNAVAILABLE
            _endpoint(gateway, flaky).ejected_until = 0.0
            _endpoint(gateway, flaky).on_trial = False
            chunks = [c async for c in client.generate("tinylm", "Hi", max_tokens=2)]
            assert len(chunks) == 2 and steady.calls == 1
    finally:
        await gateway.stop()


async def test_deadlines_and_cancels_reach_the_worker(pair: tuple[FakeWorker, FakeWorker]) -> None:
    fake, _ = pair
    gateway = await _gateway(fake.address, upstream_timeout=77)
    try:
        async with AsyncGatewayClient(gateway.address) as client:
            await client.infer("digits", IMAGE, timeout=30)
            await client.infer("digits", IMAGE)
            with_deadline, without = fake.deadlines[-2:]
            # grpc sends a deadline rounded up a little: hence the second of slack.
            assert with_deadline is not None and 0 < with_deadline <= 31
            assert without is not None and 31 < without <= 78  # the gateway's own default (77 s)
            fake.hold = asyncio.Event()
            call = asyncio.create_task(client.infer("digits", IMAGE))
            await until(lambda: fake.in_flight > 0, "the call on the worker", 60)
            call.cancel()
            await asyncio.gather(call, return_exceptions=True)
            await until(lambda: fake.cancelled > 0, "the cancel at the worker", 60)
            assert fake.cancelled == 1
    finally:
        await gateway.stop()


async def test_streams_on_a_worker_that_leaves_discovery_finish(
    pair: tuple[FakeWorker, FakeWorker],
) -> None:
    # A draining worker leaves discovery (Consul) before its calls end: the gateway must
    # send it nothing new, hand none of its slots to queued calls, and let the streams
    # already on it finish, not cut them (grpc's close with a grace cancels streams).
    leaving, staying = pair
    leaving.hold = asyncio.Event()
    gateway = await _gateway(leaving.address)
    try:
        async with AsyncGatewayClient(gateway.address) as client:
            chunks: list[str] = []

            async def stream() -> None:
                async for chunk in client.generate("tinylm", "Hi", max_tokens=2):
                    chunks.append(chunk.text)

            task = asyncio.create_task(stream())
            await until(lambda: bool(chunks), "the first chunk")
            assert chunks == ["a"]
            # Discovery now lists only the other worker.
            gateway.pool._discovery._addresses = [staying.address]  # type: ignore[attr-defined]
            await gateway.pool.refresh()
            assert list(gateway.pool._workers) == [staying.address]
            await asyncio.wait_for(_endpoint(gateway, staying).models_known.wait(), 30)
            # New calls go to the worker that stayed, while the stream is still open.
            await asyncio.wait_for(client.infer("digits", IMAGE), 30)
            assert staying.calls == 1 and not task.done()
            leaving.hold.set()
            await asyncio.wait_for(task, 30)
            assert chunks == ["a", "b"]
            assert leaving.cancelled == 0
            # Its calls ended: its channel is closed and forgotten.
            await until(lambda: not gateway.pool._leaving, "its channel let go")
    finally:
        await gateway.stop()
