"""How the pool judges a worker from its calls' outcomes: ejection with backoff, one
trial call when it ends, and what does not count (calls in flight when it was ejected,
a trial cut short, answers that show the worker works)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import pytest
from tensorgate.inference.v1 import inference_pb2

from gateway.discovery import StaticDiscovery
from gateway.routing import Admission, RoutingPolicy
from gateway.worker_pool import WorkerEndpoint, WorkerPool

UNAVAILABLE, INTERNAL = grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL


@pytest.fixture
async def worker() -> AsyncIterator[WorkerEndpoint]:
    # Nothing listens there: its watch streams only retry, and nothing here needs them.
    endpoint = WorkerEndpoint("127.0.0.1:1")
    yield endpoint
    await endpoint.close()


def _pool() -> WorkerPool:
    return WorkerPool(
        StaticDiscovery([]),
        refresh_seconds=60,
        eject_seconds=10,
        policy=RoutingPolicy(eject_max_seconds=25, eject_after_failures=3),
    )


def _end_ejection(worker: WorkerEndpoint) -> None:
    worker.ejected_until = 0.0  # as if its time were up


async def test_backoff_doubles_up_to_the_cap_and_resets_when_a_trial_is_served(
    worker: WorkerEndpoint,
) -> None:
    pool = _pool()
    lengths = []
    for _ in range(4):
        pool.failed(worker, UNAVAILABLE, own=False)
        lengths.append(worker.ejected_for)
        _end_ejection(worker)
        worker.begin_trial()
    assert lengths == [10, 20, 25, 25]
    worker.answered()
    assert (worker.ejections, worker.on_trial, worker.ejected_until) == (0, False, 0.0)
    pool.failed(worker, UNAVAILABLE, own=False)
    assert worker.ejected_for == 10


async def test_calls_in_flight_when_it_was_ejected_neither_double_nor_end_it(
    worker: WorkerEndpoint,
) -> None:
    pool = _pool()
    pool.failed(worker, UNAVAILABLE, own=False)
    until = worker.ejected_until
    pool.failed(worker, UNAVAILABLE, own=False)  # another call that was on its way
    assert worker.ejections == 1 and worker.ejected_until == until
    worker.answered()  # a call that started before and was served after
    assert worker.ejections == 1 and worker.ejected_until == until


async def test_a_trial_cut_short_leaves_the_next_call_to_be_the_trial(
    worker: WorkerEndpoint,
) -> None:
    pool = _pool()
    pool.failed(worker, UNAVAILABLE, own=False)
    _end_ejection(worker)
    worker.begin_trial()
    assert worker.on_trial and not worker.available(0.0)  # no other call meanwhile
    pool.failed(worker, grpc.StatusCode.DEADLINE_EXCEEDED, own=False)
    assert not worker.on_trial and worker.ejected_until == 0.0 and worker.ejections == 1


async def test_its_own_failures_eject_it_after_several_in_a_row_or_one_on_trial(
    worker: WorkerEndpoint,
) -> None:
    pool = _pool()
    pool.failed(worker, INTERNAL, own=True)
    pool.failed(worker, UNAVAILABLE, own=True)
    pool.failed(worker, grpc.StatusCode.NOT_FOUND, own=True)  # an answer: it works
    assert worker.failures == 0 and worker.ejections == 0
    for _ in range(3):
        pool.failed(worker, INTERNAL, own=True)
    assert worker.ejections == 1 and worker.ejected_for == 10
    _end_ejection(worker)
    worker.begin_trial()
    pool.failed(worker, INTERNAL, own=True)  # the trial failed: out again at once
    assert worker.ejections == 2 and worker.ejected_for == 20


async def test_a_trial_handed_to_a_call_that_gives_up_at_once_is_no_trial(
    worker: WorkerEndpoint,
) -> None:
    # The worker's ejection ran out while a call waited for a slot elsewhere; a new call
    # offers the worker's slot to the waiter (its trial begins), and the waiter's caller
    # cancels in that same turn. The worker must not stay "on trial" with no call on it.
    busy = WorkerEndpoint("127.0.0.1:2")
    try:
        key = ("digits", 1)
        for endpoint in (worker, busy):
            endpoint.serving = True
            endpoint.models = {key: inference_pb2.ModelInfo(name="digits", version=1)}
        _pool().failed(worker, UNAVAILABLE, own=False)
        admission: Admission[WorkerEndpoint] = Admission(
            RoutingPolicy(max_outstanding=1, queue_size=4, queue_seconds=30)
        )
        assert admission.try_admit(key, [busy]) is not None
        waiter = asyncio.ensure_future(admission.admit(key, [busy], None))
        await asyncio.sleep(0)
        _end_ejection(worker)
        assert admission.try_admit(key, [busy, worker]) is None  # handed to the waiter
        assert worker.on_trial
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert not worker.on_trial and worker.outstanding == 0
        assert worker.available(time.monotonic())  # the next call is its trial
    finally:
        await busy.close()
