"""The gateway's overload control as pure data structures: slots per worker, the bounded
FIFO queue that hands a freed slot to the oldest waiter, waiters that time out or are
cancelled without leaking a slot, and the power-of-two-choices pick."""

from __future__ import annotations

import asyncio
import random

import pytest
from tensorgate.inference.v1 import inference_pb2

from gateway.admission import ModelSlots, QueueFull, QueueTimeout
from gateway.routing import Admission, RoutingPolicy
from services.runtime.errors import ResourceExhausted, Unavailable

_KEY = ("digits", 1)


class _Worker:
    def __init__(self, name: str, *, outstanding: int = 0) -> None:
        self.name = name
        self.outstanding = outstanding
        self.up = True
        self.serving = True
        self.trials = 0  # slots taken (a pool's worker starts a trial on one)
        self.models = {_KEY: inference_pb2.ModelInfo(name="digits", version=1)}

    def available(self, now: float) -> bool:
        return self.up

    def taken(self) -> None:
        self.trials += 1

    def untaken(self) -> None:
        self.trials -= 1

    def __repr__(self) -> str:
        return self.name


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def _full(limit: int = 1, queue_size: int = 8) -> tuple[ModelSlots[_Worker], _Worker]:
    slots: ModelSlots[_Worker] = ModelSlots(limit=limit, queue_size=queue_size)
    worker = _Worker("a")
    for _ in range(limit):
        assert slots.free(worker)
        slots.take(worker)
    assert not slots.free(worker)
    return slots, worker


async def test_a_freed_slot_goes_to_the_oldest_waiter_first() -> None:
    slots, worker = _full()
    order: list[int] = []

    async def wait(n: int) -> None:
        got, _ = await slots.wait(30)
        assert got is worker
        order.append(n)
        await asyncio.sleep(0)
        slots.release(got)

    waiters = []
    for n in range(4):
        waiters.append(asyncio.create_task(wait(n)))
        await _settle()  # each one queued before the next
    assert len(slots) == 4
    slots.release(worker)
    await asyncio.gather(*waiters)
    assert order == [0, 1, 2, 3]
    assert len(slots) == 0
    # Every slot came back: nothing held, nothing counted against the worker.
    assert slots.in_use == {} and worker.outstanding == 0


async def test_a_full_queue_refuses_at_once() -> None:
    slots, worker = _full(queue_size=2)
    waiters = [asyncio.create_task(slots.wait(30)) for _ in range(2)]
    await _settle()
    with pytest.raises(QueueFull):
        await slots.wait(30)
    for waiter in waiters:
        waiter.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
    assert len(slots) == 0
    slots.release(worker)
    assert slots.in_use == {} and worker.outstanding == 0


async def test_no_queue_refuses_at_once() -> None:
    slots, _ = _full(queue_size=0)
    with pytest.raises(QueueFull):
        await slots.wait(30)


async def test_a_waiter_that_times_out_leaves_the_queue_and_holds_no_slot() -> None:
    slots, worker = _full()
    with pytest.raises(QueueTimeout):
        await slots.wait(0.01)
    assert len(slots) == 0
    slots.release(worker)
    assert slots.in_use == {} and worker.outstanding == 0
    assert slots.free(worker)


async def test_a_cancelled_waiter_leaves_the_queue_and_the_next_one_gets_the_slot() -> None:
    slots, worker = _full()
    first = asyncio.create_task(slots.wait(30))
    await _settle()
    second = asyncio.create_task(slots.wait(30))
    await _settle()
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    assert len(slots) == 1
    slots.release(worker)
    got, _ = await second
    assert got is worker and slots.in_use == {worker: 1}
    slots.release(got)
    assert slots.in_use == {} and worker.outstanding == 0


async def test_a_slot_handed_over_as_the_waiter_is_cancelled_passes_to_the_next() -> None:
    slots, worker = _full()
    first = asyncio.create_task(slots.wait(30))
    await _settle()
    second = asyncio.create_task(slots.wait(30))
    await _settle()
    # The hand-over and the cancel in the same loop turn: the first waiter's future
    # holds the slot when its task wakes up cancelled.
    slots.release(worker)
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    assert first.cancelled()
    got, _ = await second
    assert got is worker
    slots.release(got)
    assert slots.in_use == {} and worker.outstanding == 0 and len(slots) == 0


async def test_an_unavailable_worker_frees_its_slot_instead_of_handing_it_over() -> None:
    slots, worker = _full()
    waiter = asyncio.create_task(slots.wait(30))
    await _settle()
    worker.up = False  # ejected: a waiter would only fail there
    slots.release(worker)
    assert slots.in_use == {} and worker.outstanding == 0
    assert not waiter.done()
    other = _Worker("b")
    slots.take(other)
    slots.release(other)
    got, _ = await waiter
    assert got is other
    slots.release(got)
    assert slots.in_use == {}


async def test_a_retry_waiter_is_not_handed_the_worker_it_left() -> None:
    slots, worker = _full()
    retry = asyncio.create_task(slots.wait(30, exclude=worker))
    await _settle()
    fresh = asyncio.create_task(slots.wait(30))
    await _settle()
    slots.release(worker)
    got, _ = await fresh
    assert got is worker and not retry.done()
    retry.cancel()
    await asyncio.gather(retry, return_exceptions=True)
    slots.release(got)
    assert slots.in_use == {} and len(slots) == 0


async def test_a_burst_is_admitted_up_to_the_limit_queued_up_to_the_queue_then_refused() -> None:
    admission: Admission[_Worker] = Admission(
        RoutingPolicy(max_outstanding=2, queue_size=3, queue_seconds=30)
    )
    workers = [_Worker("a"), _Worker("b")]
    tasks = [asyncio.create_task(admission.admit(_KEY, workers, None)) for _ in range(10)]
    await _settle()
    done = [t for t in tasks if t.done()]
    admitted = [t.result() for t in done if t.exception() is None]
    refused = [t.exception() for t in done if t.exception() is not None]
    assert len(admitted) == 4  # two slots on each worker
    assert {w.outstanding for w in workers} == {2}
    assert len(refused) == 3 and all(isinstance(e, ResourceExhausted) for e in refused)
    assert all(e.retry_after_s > 0 for e in refused if isinstance(e, ResourceExhausted))
    waiting = [t for t in tasks if not t.done()]
    assert len(waiting) == 3
    # Every call that ends gives its slot to a waiter, until no one waits.
    for worker, _, slots in admitted:
        slots.release(worker)
    for worker, _, slots in await asyncio.gather(*waiting):
        slots.release(worker)
    assert {w.outstanding for w in workers} == {0}


async def test_a_wait_that_runs_out_is_refused_with_a_retry_after() -> None:
    admission: Admission[_Worker] = Admission(
        RoutingPolicy(max_outstanding=1, queue_size=4, queue_seconds=0.01)
    )
    worker = _Worker("a")
    held, _, slots = await admission.admit(_KEY, [worker], None)
    with pytest.raises(ResourceExhausted) as refused:
        await admission.admit(_KEY, [worker], None)
    assert "none freed one" in refused.value.message
    assert refused.value.subject == "model_concurrency:digits:1"
    assert refused.value.retry_after_s > 0
    slots.release(held)
    assert worker.outstanding == 0 and slots.in_use == {}


def test_power_of_two_choices_takes_the_less_busy_of_two_drawn() -> None:
    admission: Admission[_Worker] = Admission(RoutingPolicy())
    admission._random = random.Random(7)
    workers = [_Worker("idle", outstanding=0), _Worker("mid", outstanding=5)]
    workers.append(_Worker("busy", outstanding=9))
    slots: ModelSlots[_Worker] = ModelSlots(limit=64, queue_size=0)
    picks = [admission.pick(workers, slots) for _ in range(300)]
    names = {p.name for p in picks if p is not None}
    # Never the busiest (it loses every pair it is drawn in); the middle one wins
    # when it is drawn with the busiest: two of them drawn, not all scanned.
    assert names == {"idle", "mid"}


def test_power_of_two_choices_falls_back_to_any_worker_with_a_free_slot() -> None:
    admission: Admission[_Worker] = Admission(RoutingPolicy())
    workers = [_Worker(n) for n in "abcd"]
    slots: ModelSlots[_Worker] = ModelSlots(limit=1, queue_size=0)
    for worker in workers[:3]:
        slots.take(worker)
    for _ in range(20):
        assert admission.pick(workers, slots) is workers[3]
    slots.take(workers[3])
    assert admission.pick(workers, slots) is None


def test_two_workers_go_to_the_less_busy() -> None:
    admission: Admission[_Worker] = Admission(RoutingPolicy())
    workers = [_Worker("a", outstanding=3), _Worker("b", outstanding=1)]
    slots: ModelSlots[_Worker] = ModelSlots(limit=64, queue_size=0)
    assert admission.pick(workers, slots) is workers[1]


async def test_capacity_that_appears_goes_to_the_waiters_before_new_calls() -> None:
    # A second worker joins (or comes back) while calls wait for the first one: its free
    # slots go to those waiting, oldest first, and a new call no longer queues behind them.
    slots, busy = _full(limit=1)
    joined = _Worker("b")
    joined.up = False
    first = asyncio.create_task(slots.wait(30))
    second = asyncio.create_task(slots.wait(30))
    await _settle()
    slots.offer([joined])  # not able to take calls yet: nothing handed over
    assert len(slots) == 2 and not first.done()
    joined.up = True
    slots.offer([busy, joined])  # the busy one has no free slot; the new one has one
    worker, _ = await first
    assert worker is joined and joined.trials == 1
    assert not second.done() and len(slots) == 1
    slots.release(joined)  # the ordinary hand-over goes on from there
    worker, _ = await second
    assert worker is joined and len(slots) == 0


async def test_a_new_call_offers_free_slots_to_the_queue_first() -> None:
    admission: Admission[_Worker] = Admission(RoutingPolicy(max_outstanding=1, queue_size=4))
    busy, joined = _Worker("a"), _Worker("b")
    assert admission.try_admit(_KEY, [busy]) is not None  # busy's one slot
    waiting = asyncio.create_task(admission.admit(_KEY, [busy], None))
    await _settle()
    assert not waiting.done()
    # A call that sees the joined worker hands its slot to the waiter, then has none left.
    assert admission.try_admit(_KEY, [busy, joined]) is None
    worker, _, _ = await waiting
    assert worker is joined


async def test_waiters_are_told_unavailable_when_no_worker_serves_the_model_any_more() -> None:
    admission: Admission[_Worker] = Admission(RoutingPolicy(max_outstanding=1, queue_size=4))
    only = _Worker("a")
    assert admission.try_admit(_KEY, [only]) is not None
    waiting = asyncio.create_task(admission.admit(_KEY, [only], None))
    await _settle()
    only.serving = False  # it drains (or left: no workers at all)
    admission.offer({_KEY: [only]})
    with pytest.raises(Unavailable, match="no worker serves model digits:1"):
        await waiting
    # The slot the draining worker still holds is its own call's, given back as usual.
    slots = admission._slots[_KEY]
    slots.release(only)
    assert only.outstanding == 0 and len(slots) == 0
