"""The workers the gateway routes to: one long-lived channel each, what each has loaded.

Each worker pushes what it has loaded (WatchModels) and its health (Watch) on
streams of its own, so routing always sees the current state without polling.
Routing picks, among the workers that are serving, not ejected and have the
model version loaded, the one with the fewest outstanding calls (with more than two,
the less busy of two drawn at random: power of two choices); an alias goes to the
version `AliasRouting` says traffic is on. Each takes a slot of that model version
on that worker (gateway/admission.py): with none free the call waits in the model's
bounded queue, or is refused as overloaded. Discovery is followed as it pushes
changes (Consul), or re-read on a timer (the static list).

A failing worker is ejected, first for `eject_seconds`, then twice as long on each
ejection in a row up to `eject_max_seconds`. Failing means: a transport failure
(UNAVAILABLE that the worker did not answer itself: it cannot be reached), or
`eject_after_failures` answers in a row of its own that say it is broken
(UNAVAILABLE, INTERNAL, UNKNOWN: its Triton is gone or failing), like Envoy's
outlier detection. When an ejection ends, the next call routed there is its trial,
and no other call goes there until that one ends: served, the worker is back and its
backoff resets; failed, it is ejected again for twice as long.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Callable

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tensorgate.inference.v1 import inference_pb2
from tensorgate.model_ref import ModelRef
from tensorgate.worker.v1 import worker_pb2, worker_pb2_grpc

from gateway.admission import ModelSlots
from gateway.aliases import AliasRouting
from gateway.discovery import Discovery
from gateway.metrics import GatewayMetrics
from gateway.routing import Admission, RoutingPolicy
from services.runtime.channels import open_channel
from services.runtime.errors import NotFound, Unavailable, shown

log = structlog.get_logger("tensorgate.gateway.pool")

_RECONNECT_S = 1.0
_LEAVING_GRACE_S = 300.0
_LEAVING_POLL_S = 0.2
_WORKER_SERVICE = worker_pb2.DESCRIPTOR.services_by_name["InferenceWorker"].full_name
_INFER = f"/{_WORKER_SERVICE}/Infer"
_GENERATE = f"/{_WORKER_SERVICE}/Generate"
# What a worker answers itself when it, not the call, is broken (its Triton is gone).
_WORKER_FAULTS = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
)


class WorkerEndpoint:
    """One worker: its channel and stub, what it serves, and how busy it is."""

    def __init__(
        self,
        address: str,
        credentials: grpc.ChannelCredentials | None = None,
        *,
        on_models_changed: Callable[[], None] = lambda: None,
        on_health_changed: Callable[[], None] = lambda: None,
    ) -> None:
        self.address = address
        self._on_models_changed = on_models_changed
        self._on_health_changed = on_health_changed
        self.channel = open_channel(address, credentials)
        self.stub = worker_pb2_grpc.InferenceWorkerStub(self.channel)
        # The data plane leaves responses as bytes: the gateway passes them on as
        # they came instead of decoding and re-encoding their tensors.
        self.infer = self.channel.unary_unary(
            _INFER,
            request_serializer=inference_pb2.InferRequest.SerializeToString,
            response_deserializer=None,
            _registered_method=True,  # type: ignore[call-arg]  # grpc-stubs predates it
        )
        self.generate = self.channel.unary_stream(
            _GENERATE,
            request_serializer=inference_pb2.GenerateRequest.SerializeToString,
            response_deserializer=None,
            _registered_method=True,  # type: ignore[call-arg]
        )
        self._health = health_pb2_grpc.HealthStub(self.channel)
        self.models: dict[tuple[str, int], inference_pb2.ModelInfo] = {}
        self.serving = False
        # Whether this worker's models ever arrived: until then, a model the
        # gateway does not know may well be on it (UNAVAILABLE, not NOT_FOUND).
        self.reached = False
        self.models_known = asyncio.Event()
        self.outstanding = 0
        self.ejected_until = 0.0
        self.ejected_for = 0.0  # the length of the last ejection
        self.ejections = 0  # ejections in a row, with no call served since
        self.failures = 0  # failures in a row that the worker answered itself
        self.on_trial = False  # its ejection ended: one call decides whether it is back
        self._last_failure = ""
        self.health_known = asyncio.Event()  # set once the health stream said anything
        self._watches = (
            asyncio.create_task(self._watch_health(), name=f"health-watch-{address}"),
            asyncio.create_task(self._watch_models(), name=f"models-watch-{address}"),
        )

    async def _watch_health(self) -> None:
        # The one writer of `serving`: the worker's health stream, so a worker that
        # starts draining (NOT_SERVING) stops getting calls at once, and no slower
        # answer (a refresh's) can set it back.
        request = health_pb2.HealthCheckRequest()
        while True:
            try:
                async for response in self._health.Watch(request):
                    serving = response.status == health_pb2.HealthCheckResponse.SERVING
                    changed = serving != self.serving
                    self.serving = serving
                    self.health_known.set()
                    if changed:  # calls queued may take its slots, or need telling
                        self._on_health_changed()
            except grpc.aio.AioRpcError:
                changed = self.serving
                self.serving = False
                self.health_known.set()
                if changed:
                    self._on_health_changed()
            await asyncio.sleep(1.0)

    def available(self, now: float) -> bool:
        return self.serving and now >= self.ejected_until

    def eject(self, first_seconds: float, max_seconds: float, reason: str) -> None:
        """No calls for a while: `first_seconds`, doubled on each ejection in a row."""
        now = time.monotonic()
        if now < self.ejected_until and not self.on_trial:
            return  # calls that were in flight failing too: the same failure, once
        self.ejected_for = min(first_seconds * 2**self.ejections, max_seconds)
        self.ejections += 1
        self.failures = 0
        self.on_trial = False
        self.ejected_until = now + self.ejected_for
        log.warning(
            "worker ejected",
            worker=self.address,
            seconds=self.ejected_for,
            ejections_in_a_row=self.ejections,
            reason=reason,
        )

    def taken(self) -> None:
        """A slot was taken here: after an ejection, that call is the trial."""
        if self.ejections:
            self.begin_trial()

    def untaken(self) -> None:
        """A slot taken here went unused (its call ended while it waited): a trial it
        began is no trial; the next call is."""
        self.end_trial()

    def begin_trial(self) -> None:
        """A call was routed here after an ejection: no other until it ends."""
        if not self.on_trial:
            self.on_trial = True
            self.ejected_until = math.inf

    def end_trial(self) -> None:
        """The trial call ended saying nothing of the worker (cancelled, a deadline):
        the next call is a trial again."""
        if self.on_trial:
            self.on_trial = False
            self.ejected_until = 0.0

    def answered(self) -> None:
        """A call this worker served: resets its failures, and ends its ejections once
        a call after them (its trial) was served."""
        if self.failures or self.ejections:
            self._recovered()

    def _recovered(self) -> None:
        self.failures = 0
        if self.ejections and (self.on_trial or time.monotonic() >= self.ejected_until):
            log.info("worker returned", worker=self.address, after_ejections=self.ejections)
            self.ejections = 0
            self.on_trial = False
            self.ejected_until = 0.0

    async def _watch_models(self) -> None:
        # The one writer of `models` and `reached`: the worker's own WatchModels
        # stream, which sends its list at once and again on every load or unload.
        request = inference_pb2.ListModelsRequest()
        while True:
            try:
                async for listing in self.stub.WatchModels(request):
                    self._models_arrived({(m.name, m.version): m for m in listing.models})
            except grpc.aio.AioRpcError as exc:
                self._unreachable(f"{exc.code().name}: {exc.details()}")
            self.models_known.set()
            await asyncio.sleep(_RECONNECT_S)

    def _models_arrived(self, models: dict[tuple[str, int], inference_pb2.ModelInfo]) -> None:
        if self._last_failure:
            log.info("worker reachable again", worker=self.address)
            self._last_failure = ""
            self.ejected_until = 0.0  # it answers again: no need to wait out an ejection
        self.reached = True
        if models != self.models:
            self.models = models
            self._on_models_changed()
        self.models_known.set()

    def _unreachable(self, failure: str) -> None:
        # Logged when it starts or changes, not on every retry: a worker that was never
        # reachable (a refused TLS handshake, say) must show up too.
        if failure != self._last_failure:
            log.warning("worker unreachable", worker=self.address, error=failure[:300])
        self._last_failure = failure

    async def close(self) -> None:
        """Stops watching and closes the channel: calls still on it are cancelled."""
        await self._stop_watching()
        await self.channel.close(None)

    async def leave(self, grace: float) -> None:
        """It left discovery: no new calls (nor queued ones) go to it from now, and its
        channel closes once the calls on it have ended, `grace` seconds at most.

        grpc's own close with a grace waits for unary calls but cancels streams at once,
        which a caller would see as a stream cut without a status.
        """
        self.retire()
        await self._stop_watching()
        deadline = time.monotonic() + grace
        # Polled: `outstanding` is counted on every call (gateway/admission.py), and a
        # wake-up hook there would cost every call for the rare worker that leaves.
        while self.outstanding > 0 and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(_LEAVING_POLL_S)
        await self.channel.close(None)

    def retire(self) -> None:
        """Takes no call from now on (it left discovery)."""
        self.serving = False
        self.ejected_until = math.inf

    async def _stop_watching(self) -> None:
        for watch in self._watches:
            watch.cancel()
        # Waited for, not awaited: a cancel of the caller itself must not be swallowed.
        await asyncio.wait(self._watches)


def hand_back(worker: WorkerEndpoint, slots: ModelSlots[WorkerEndpoint]) -> None:
    """Gives back the slot `WorkerPool.route` took on `worker`. A trial the route began
    ends with it when the call gave no verdict (a cancel, or a call only routed): the
    worker must not stay 'on trial' with no call to decide it."""
    slots.release(worker)
    if worker.on_trial:
        worker.end_trial()


class WorkerPool:
    """All known workers, as discovery says (followed, or re-read on a timer)."""

    def __init__(
        self,
        discovery: Discovery,
        *,
        refresh_seconds: float,
        eject_seconds: float,
        credentials: grpc.ChannelCredentials | None = None,
        aliases: AliasRouting | None = None,
        policy: RoutingPolicy | None = None,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self._discovery = discovery
        self.policy = policy or RoutingPolicy()
        self._admission: Admission[WorkerEndpoint] = Admission(self.policy, metrics)
        self._aliases = aliases
        self._credentials = credentials
        self._refresh_seconds = refresh_seconds
        self.eject_seconds = eject_seconds
        self._workers: dict[str, WorkerEndpoint] = {}
        self._index: dict[str, dict[int, list[WorkerEndpoint]]] = {}
        self._refresh_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        # Workers that left discovery while calls were on them (a draining worker
        # leaves Consul first): closed in the background once those calls end.
        self._leaving: dict[asyncio.Task[None], WorkerEndpoint] = {}

    async def start(self) -> None:
        await self.refresh()
        # Health and models arrive on each worker's streams; wait briefly for the first
        # word so the gateway does not refuse calls in its first milliseconds.
        waits = [
            asyncio.wait_for(event.wait(), 2.0)
            for w in self._workers.values()
            for event in (w.health_known, w.models_known)
        ]
        await asyncio.gather(*waits, return_exceptions=True)
        changes = self._discovery.changes()
        self._task = asyncio.create_task(
            self._refresh_forever() if changes is None else self._follow(changes),
            name="worker-pool-refresh",
        )

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for task, worker in list(self._leaving.items()):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await worker.channel.close(None)
        for worker in self._workers.values():
            await worker.close()

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_seconds)
            try:
                await self.refresh()
            except Exception:  # a refresh must never end the loop
                log.exception("worker refresh failed")

    async def _follow(self, changes: AsyncIterator[None]) -> None:
        async for _ in changes:
            try:
                await self.refresh()
            except Exception:  # a refresh must never end the loop
                log.exception("worker refresh failed")

    async def refresh(self) -> None:
        """Re-reads discovery: opens new workers, closes those that left."""
        async with self._refresh_lock:
            addresses = await self._discovery.worker_addresses()
            for address in addresses:
                if address not in self._workers:
                    self._workers[address] = WorkerEndpoint(
                        address,
                        self._credentials,
                        on_models_changed=self._index_models,
                        on_health_changed=self._wake,
                    )
            gone = [self._workers.pop(a) for a in set(self._workers) - set(addresses)]
            for worker in gone:  # before any slot of theirs is given back and handed on
                worker.retire()
            # Routing never sees a worker that is about to be closed.
            self._index_models()
            for worker in gone:
                # Its calls in flight finish (the worker itself bounds them with its
                # grace period), rather than being cancelled here.
                task = asyncio.create_task(worker.leave(_LEAVING_GRACE_S))
                self._leaving[task] = worker
                task.add_done_callback(self._leaving.pop)

    def _index_models(self) -> None:
        # Who has which model version changes only here (a worker's models arrived,
        # a worker left), so routing looks it up in this index instead of scanning
        # every worker's models on every call. Every
        # worker's last known models count, reachable or not: a model whose workers
        # are all down is UNAVAILABLE, not unknown.
        index: dict[str, dict[int, list[WorkerEndpoint]]] = {}
        for worker in self._workers.values():
            for name, version in worker.models:
                index.setdefault(name, {}).setdefault(version, []).append(worker)
        self._index = index
        self._wake()

    def _wake(self) -> None:
        """Offers the slots of workers able to take calls to the calls queued for them."""
        if not self._admission.waiting():
            return
        self._admission.offer(
            {
                (name, version): workers
                for name, versions in self._index.items()
                for version, workers in versions.items()
            }
        )

    def serving_workers(self, name: str = "", version: int = 0) -> list[WorkerEndpoint]:
        """The workers whose health says SERVING (ejected ones included); with a model
        version, those of them that have it loaded."""
        if name:
            return [w for w in self._index.get(name, {}).get(version, ()) if w.serving]
        return [w for w in self._workers.values() if w.serving]

    def models(self) -> list[inference_pb2.ModelInfo]:
        now = time.monotonic()
        seen: dict[tuple[str, int], inference_pb2.ModelInfo] = {}
        for worker in self._workers.values():
            if worker.available(now):
                for key, info in worker.models.items():
                    seen.setdefault(key, info)
        return [seen[key] for key in sorted(seen)]

    async def route(
        self, ref: ModelRef, *, exclude: WorkerEndpoint | None = None
    ) -> tuple[WorkerEndpoint, inference_pb2.ModelInfo, ModelSlots[WorkerEndpoint]]:
        """The least busy available worker with `ref` loaded and a slot taken on it (give
        it back with `slots.release(worker)`), and the version it means; waits for a
        slot, or refuses the call as overloaded (see gateway/routing.py)."""
        versions = self._index.get(ref.name)
        if ref.alias is not None:
            if self._aliases is None:
                raise NotFound(
                    f"model {shown(str(ref))}: aliases need the model registry, which this gateway "
                    "is not connected to (--registry)"
                )
            version = self._aliases.settled(ref.name, ref.alias)
            if version is None:  # a rollout under way: where is each version served
                serving = {v: [w for w in ws if w.serving] for v, ws in (versions or {}).items()}
                version = self._aliases.version(ref.name, ref.alias, serving)
            if not versions or version not in versions:
                # The gateway does not know the deployments: say both things it may be.
                raise Unavailable(
                    f"model {shown(str(ref))} means version {version}, which no worker serves: "
                    "retry shortly if it was just deployed, else deploy it (tensorgate models "
                    f"deploy {ref.name}@{ref.alias})"
                )
        elif not versions and not self._workers:
            # Discovery lists no worker at all (a restart of every worker, an agent that
            # lost them): nothing can be said of the model yet.
            raise Unavailable(
                f"model {shown(ref.name)}: no worker is known to this gateway right now; "
                "retry shortly"
            )
        elif not versions:
            unreached = sum(not w.reached for w in self._workers.values())
            if unreached:
                raise Unavailable(
                    f"model {shown(ref.name)} is not on any reachable worker, and {unreached} "
                    "worker(s) could not be reached yet; retry shortly"
                )
            # Not the list of what is served: that would name models the caller's key
            # may not call. ListModels shows the ones it may.
            raise NotFound(
                f"model {shown(ref.name)} is not served here; ListModels shows the models "
                "this key may call"
            )
        elif ref.version is None:
            # The newest version some serving worker has: one loaded only on workers that
            # are draining or down must not take a bare name's calls off the others.
            served = [v for v, ws in versions.items() if any(w.serving for w in ws)]
            version = max(served or versions)
        else:
            version = ref.version
            if version not in versions:
                raise NotFound(
                    f"model {shown(ref.name)} has no version {version} loaded "
                    f"(loaded: {', '.join(map(str, sorted(versions)))})"
                )
        now = time.monotonic()
        having = [w for w in versions[version] if w is not exclude and w.serving]
        # Ejection is a preference: with only ejected workers left, try them anyway.
        candidates = [w for w in having if w.available(now)] or having
        if not candidates:
            raise Unavailable(f"no healthy worker has model {ref.name}:{version} loaded right now")
        key = (ref.name, version)
        admitted = self._admission.try_admit(key, candidates)
        if admitted is None:  # every slot taken: wait in the queue, or be refused
            admitted = await self._admission.admit(key, candidates, exclude)
        # A slot taken on a worker back from an ejection began its trial (`taken`).
        return admitted

    def failed(self, worker: WorkerEndpoint, code: grpc.StatusCode, *, own: bool) -> None:
        """A call to `worker` failed with `code`; `own`: the worker answered it itself
        (its request id came back), else the transport or Triton did."""
        policy = self.policy
        if not own:
            if code == grpc.StatusCode.UNAVAILABLE:  # it cannot be reached
                worker.eject(self.eject_seconds, policy.eject_max_seconds, "unreachable")
            else:
                worker.end_trial()  # a deadline, a cancel: nothing said of the worker
        elif code in _WORKER_FAULTS:
            worker.failures += 1
            if worker.on_trial or worker.failures >= policy.eject_after_failures:
                worker.eject(
                    self.eject_seconds,
                    policy.eject_max_seconds,
                    f"{worker.failures} failure(s) in a row, the last {code.name}",
                )
        else:  # it answered (bad input, a version it let go of): it works
            worker.answered()
