"""Which worker takes a call, and when a call is refused because every worker is busy.

`Admission` keeps one `ModelSlots` per model version (gateway/admission.py) and picks,
among the candidates the pool found (serving, not ejected, the version loaded), the
least busy one with a free slot: of two drawn at random when there are more than two
(power of two choices: no scan of every worker per call, and no herd on the one that
looked idlest), else of all. With none free the call waits in the model's queue, for
at most `queue_seconds` and never past its own deadline; then, or at once when the
queue is full, it is refused with RESOURCE_EXHAUSTED and a RetryInfo.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from tensorgate.inference.v1 import inference_pb2

from gateway.admission import ModelSlots, QueueFull, QueueTimeout
from gateway.admission import Worker as SlotWorker
from gateway.metrics import GatewayMetrics
from services.runtime import calls
from services.runtime.errors import DeadlineExceeded, ResourceExhausted, Unavailable


@dataclass(frozen=True, kw_only=True)
class RoutingPolicy:
    """Overload and ejection limits (GatewaySettings documents each)."""

    max_outstanding: int = 64
    queue_size: int = 256
    queue_seconds: float = 2.0
    eject_max_seconds: float = 300.0
    eject_after_failures: int = 5


class RoutedWorker(SlotWorker, Protocol):
    models: dict[tuple[str, int], inference_pb2.ModelInfo]
    serving: bool


W = TypeVar("W", bound=RoutedWorker)


class Admission(Generic[W]):
    """The slots and queues of every model version this gateway routes."""

    def __init__(self, policy: RoutingPolicy, metrics: GatewayMetrics | None = None) -> None:
        self.policy = policy
        self._metrics = metrics
        self._slots: dict[tuple[str, int], ModelSlots[W]] = {}
        self._random = random.Random()

    def try_admit(
        self, key: tuple[str, int], candidates: list[W]
    ) -> tuple[W, inference_pb2.ModelInfo, ModelSlots[W]] | None:
        """The hot path, with no await: a worker for model version `key` with a slot taken
        on it (give it back with `slots.release(worker)`), what it serves, and its slots;
        None when every slot is taken or others already wait (then `admit`)."""
        slots = self._slots.get(key)
        if slots is None:
            slots = self._slots[key] = ModelSlots(
                limit=self.policy.max_outstanding, queue_size=self.policy.queue_size
            )
        if slots.waiters:
            # Capacity that appeared without a call ending goes to those waiting first.
            slots.offer(candidates)
            if slots.waiters:
                return None  # first come, first served: behind those already waiting
        worker = self.pick(candidates, slots)
        if worker is None:
            return None
        slots.take(worker)
        return worker, worker.models[key], slots

    async def admit(
        self, key: tuple[str, int], candidates: list[W], exclude: W | None
    ) -> tuple[W, inference_pb2.ModelInfo, ModelSlots[W]]:
        """As `try_admit`, waiting in the model's queue if it must; or refused."""
        admitted = self.try_admit(key, candidates)
        if admitted is not None:
            return admitted
        info = candidates[0].models[key]
        slots = self._slots[key]
        worker = await self._wait(slots, key, len(candidates), exclude)
        # Handed over by a worker that may have let the version go meanwhile.
        return worker, worker.models.get(key, info), slots

    def waiting(self) -> bool:
        """Whether any call waits in a queue."""
        return any(slots.waiters for slots in self._slots.values())

    def offer(self, serving: dict[tuple[str, int], list[W]]) -> None:
        """Wakes waiters of every model version with slots free on the workers now
        serving it (`serving`: model version -> its workers): a worker joined, its
        models arrived, or its health changed. Waiters of a version no worker serves
        any more are told UNAVAILABLE at once rather than left to time out."""
        for key, slots in self._slots.items():
            if slots.waiters:
                workers = serving.get(key)
                if workers and any(w.serving for w in workers):
                    slots.offer(workers)
                else:  # all gone or draining: waiting longer cannot help
                    slots.abandon(
                        Unavailable(
                            f"no worker serves model {key[0]}:{key[1]} any more (they left "
                            "or are draining) while this call waited; retry shortly"
                        )
                    )

    def pick(self, candidates: list[W], slots: ModelSlots[W]) -> W | None:
        """The least busy candidate with a free slot (see the module docstring)."""
        count = len(candidates)
        if count > 2:
            first = self._random.randrange(count)
            second = self._random.randrange(count - 1)
            a, b = candidates[first], candidates[second + (second >= first)]
            if b.outstanding < a.outstanding:
                a, b = b, a
            if slots.free(a):
                return a
            if slots.free(b):
                return b
        best: W | None = None
        for worker in candidates:
            if slots.free(worker) and (best is None or worker.outstanding < best.outstanding):
                best = worker
        return best

    async def _wait(
        self, slots: ModelSlots[W], key: tuple[str, int], workers: int, exclude: W | None
    ) -> W:
        model = f"{key[0]}:{key[1]}"
        policy = self.policy
        remaining = calls.remaining()
        timeout = policy.queue_seconds
        if remaining is not None:  # never past the caller's own deadline
            timeout = min(timeout, remaining)
        busy = f"its {workers} worker(s) each have {policy.max_outstanding} calls in flight"
        metrics = self._metrics
        depth = metrics.queue_depth.labels(key[0]) if metrics is not None else None
        if depth is not None:
            depth.inc()
        try:
            worker, waited = await slots.wait(timeout, exclude=exclude)
        except QueueFull:
            if remaining is not None and remaining <= 0:
                raise DeadlineExceeded(f"deadline passed before model {model} was called") from None
            queued = (
                "this gateway queues no calls (--queue-size or --queue-seconds is 0)"
                if policy.queue_size == 0 or policy.queue_seconds <= 0
                else f"{len(slots)} more are waiting (the most that may)"
            )
            raise self._overloaded(
                key, "queue_full", f"model {model} is overloaded: {busy} and {queued}"
            ) from None
        except QueueTimeout:
            if remaining is not None and remaining <= policy.queue_seconds:
                raise DeadlineExceeded(
                    f"deadline passed while model {model} waited for a free worker"
                ) from None
            raise self._overloaded(
                key,
                "queue_timeout",
                f"model {model} is overloaded: {busy} and none freed one within "
                f"{policy.queue_seconds:g}s",
            ) from None
        finally:
            if depth is not None:
                depth.dec()
        if metrics is not None:
            metrics.queue_wait.labels(key[0]).observe(waited)
        return worker

    def _overloaded(self, key: tuple[str, int], reason: str, message: str) -> ResourceExhausted:
        if self._metrics is not None:
            self._metrics.overload_refusals.labels(key[0], reason).inc()
        retry_after = max(self.policy.queue_seconds, 0.1)
        return ResourceExhausted(
            f"{message}; retry after {retry_after:g}s, or send fewer calls at once",
            subject=f"model_concurrency:{key[0]}:{key[1]}",
            retry_after_s=retry_after,
        )
