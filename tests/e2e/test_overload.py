"""Overload at the gateway: each worker takes a bounded number of calls per model, more
wait in a bounded queue for a bounded time, and the rest are refused at once with
RESOURCE_EXHAUSTED and a RetryInfo; the admitted calls all succeed; a waiter that gives
up (its deadline, a cancel) leaves no slot behind.

The workers are bare gRPC servers (tests/fake_worker.py) that hold calls until the test
lets them go, so that "every slot is taken" is a fact, not a race; the last test runs a
burst through the real worker and Triton.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import grpc
import numpy as np
import pytest
from tensorgate import AsyncGatewayClient, ResourceExhaustedError, TensorgateClientError

from gateway.server import Gateway
from services.worker.server import Worker
from tests.fake_worker import FakeWorker, routing_gateway
from tests.helpers import metric_value, scrape, until

IMAGE = {"image": np.zeros((1, 64), np.float32)}


async def _metrics(gateway: Gateway) -> str:
    assert gateway.service.metrics_endpoint is not None
    return await scrape(f"http://127.0.0.1:{gateway.service.metrics_endpoint.port}/metrics")


@pytest.fixture
async def fake() -> AsyncIterator[FakeWorker]:
    worker = await FakeWorker.start()
    worker.hold = asyncio.Event()
    yield worker
    await worker.stop()


def _refused(error: BaseException | None) -> ResourceExhaustedError:
    assert isinstance(error, ResourceExhaustedError), error
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.subject == "model_concurrency:digits:1"
    assert error.retry_after_s is not None and error.retry_after_s > 0, "no RetryInfo"
    assert "overloaded" in error.message and "retry after" in error.message
    return error


async def test_a_burst_beyond_the_slots_and_the_queue_is_refused_at_once(
    fake: FakeWorker,
) -> None:
    gateway = await routing_gateway(fake.address, max_outstanding_per_worker=2, queue_size=3)
    try:
        async with AsyncGatewayClient(gateway.address) as client:
            burst = [asyncio.create_task(client.infer("digits", IMAGE)) for _ in range(10)]
            # Two calls on the worker, three queued, and five refused while the
            # worker still holds every call it took: nobody waited for a slot to free.
            await until(lambda: sum(t.done() for t in burst) == 5, "five refusals")
            assert fake.in_flight == 2
            refused = [_refused(t.exception()) for t in burst if t.done()]
            assert all("3 more are waiting" in e.message for e in refused)
            text = await _metrics(gateway)
            assert metric_value(text, "tensorgate_gateway_queue_depth", model="digits") == 3
            assert fake.hold is not None
            fake.hold.set()
            # Every call admitted, at once or from the queue, succeeds.
            admitted = await asyncio.wait_for(
                asyncio.gather(*[t for t in burst if not t.done()]), 60
            )
            assert len(admitted) == 5
        assert fake.calls == 5
        text = await _metrics(gateway)
        assert metric_value(text, "tensorgate_gateway_queue_depth", model="digits") == 0
        assert (
            metric_value(text, "tensorgate_gateway_overload_refusals_total", reason="queue_full")
            == 5
        )
        assert metric_value(text, "tensorgate_gateway_queue_wait_seconds_count") == 3
    finally:
        await gateway.stop()


async def test_a_queued_call_waits_no_longer_than_the_queue_time(fake: FakeWorker) -> None:
    gateway = await routing_gateway(
        fake.address, max_outstanding_per_worker=1, queue_size=10, queue_seconds=0.5
    )
    try:
        async with AsyncGatewayClient(gateway.address) as client:
            held = asyncio.create_task(client.infer("digits", IMAGE))
            await until(lambda: fake.in_flight == 1, "the first call on the worker")
            # The held call never ends by itself: the queued ones are refused when
            # their wait runs out, while it still holds the only slot.
            queued = [asyncio.create_task(client.infer("digits", IMAGE)) for _ in range(3)]
            # The held call never ends, so a waiter that ignored the queue time would
            # wait for ever; one that waited 30 times the queue time fails this too.
            done, _ = await asyncio.wait(queued, timeout=15)
            assert len(done) == 3 and not held.done() and fake.in_flight == 1
            for task in queued:
                error = _refused(task.exception())
                assert "none freed one within 0.5s" in error.message
            assert fake.hold is not None
            fake.hold.set()
            await asyncio.wait_for(held, 60)
            # The slots the waiters gave up are all back: the next call goes straight in.
            fake.hold = asyncio.Event()
            again = [asyncio.create_task(client.infer("digits", IMAGE)) for _ in range(1)]
            await until(lambda: fake.in_flight == 1, "a new call on the worker")
            fake.hold.set()
            await asyncio.wait_for(asyncio.gather(*again), 60)
        text = await _metrics(gateway)
        reason = "queue_timeout"
        assert metric_value(text, "tensorgate_gateway_overload_refusals_total", reason=reason) == 3
        assert metric_value(text, "tensorgate_gateway_queue_depth", model="digits") == 0
        assert _slots_in_use(gateway) == 0
    finally:
        await gateway.stop()


def _slots_in_use(gateway: Gateway) -> int:
    return sum(w.outstanding for w in gateway.pool._workers.values())


async def test_a_waiter_whose_deadline_or_caller_gives_up_leaves_no_slot_behind(
    fake: FakeWorker,
) -> None:
    gateway = await routing_gateway(
        fake.address, max_outstanding_per_worker=1, queue_size=10, queue_seconds=120
    )
    try:
        async with AsyncGatewayClient(gateway.address) as client:
            held = asyncio.create_task(client.infer("digits", IMAGE))
            await until(lambda: fake.in_flight == 1, "the first call on the worker")
            # The caller's deadline is shorter than the queue time: it bounds the wait.
            with pytest.raises(TensorgateClientError) as error:
                await asyncio.wait_for(client.infer("digits", IMAGE, timeout=0.5), 60)
            assert error.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            cancelled = asyncio.create_task(client.infer("digits", IMAGE))
            await until(lambda: _queued(gateway) == 1, "a call in the queue")
            cancelled.cancel()
            await asyncio.gather(cancelled, return_exceptions=True)
            await until(lambda: _queued(gateway) == 0, "the cancelled call leaving the queue")
            assert fake.hold is not None
            fake.hold.set()
            await asyncio.wait_for(held, 60)
            await until(lambda: _slots_in_use(gateway) == 0, "every slot given back")
            # Only the held call reached the worker: the two that gave up never did.
            assert fake.calls == 1
            await asyncio.wait_for(client.infer("digits", IMAGE), 60)
    finally:
        await gateway.stop()


def _queued(gateway: Gateway) -> int:
    return sum(len(s) for s in gateway.pool._admission._slots.values())


async def test_a_stream_holds_its_slot_until_it_ends(fake: FakeWorker) -> None:
    gateway = await routing_gateway(fake.address, max_outstanding_per_worker=1, queue_size=0)
    try:
        async with AsyncGatewayClient(gateway.address) as client:
            chunks: list[Any] = []

            async def stream() -> None:
                async for chunk in client.generate("tinylm", "Hi", max_tokens=2):
                    chunks.append(chunk)

            streaming = asyncio.create_task(stream())
            await until(lambda: len(chunks) == 1, "the stream's first chunk")
            # Its first chunk came, and the stream is still open: the slot is taken.
            with pytest.raises(ResourceExhaustedError):
                await asyncio.wait_for(_one_stream(client), 60)
            assert fake.hold is not None
            fake.hold.set()
            await asyncio.wait_for(streaming, 60)
            assert len(chunks) == 2
            await asyncio.wait_for(_one_stream(client), 60)
    finally:
        await gateway.stop()


async def _one_stream(client: AsyncGatewayClient) -> None:
    async for _ in client.generate("tinylm", "Hi", max_tokens=2):
        pass


async def test_a_burst_through_the_real_worker_is_admitted_or_refused_with_retry_info(
    worker: Worker,
) -> None:
    # The real Triton answers fast, so how many are refused depends on timing: what is
    # checked is that every call either succeeds or is refused as overloaded, with a
    # RetryInfo, and that the gateway counted each refusal.
    gateway = await routing_gateway(
        worker.address, max_outstanding_per_worker=1, queue_size=2, queue_seconds=30
    )
    try:
        async with AsyncGatewayClient(gateway.address) as client:
            calls: list[Awaitable[Any]] = [client.infer("digits", IMAGE) for _ in range(24)]
            results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 120)
        refused = [_refused(r) for r in results if isinstance(r, BaseException)]
        served = [r for r in results if not isinstance(r, BaseException)]
        assert all(r["label"].shape == (1, 1) for r in served)
        assert len(served) >= 1
        text = await _metrics(gateway)
        counted = metric_value(text, "tensorgate_gateway_overload_refusals_total")
        assert counted == len(refused)
        assert _slots_in_use(gateway) == 0
    finally:
        await gateway.stop()
