"""JobRunner: runs optimization jobs inside the registry, one at a time.

A job goes: queued -> running (transform in a child process, register the derived
version, deploy parent and derived on a worker, measure latency, undeploy what it
deployed) -> done, or failed with the reason. The torch work runs in a child process
(transform.py) so the registry's event loop never waits on it; the rest is I/O the
registry does anyway. One job at a time, so that two jobs' latency figures do not
disturb each other. Why here and not a service of its own: a job needs the registry's
store and artifacts on every step (read the parent, write the version, set and delete
deployments), which a separate service would reach through RPCs the registry would
have to add for it; and the derived version must vanish when a job fails, which is one
transaction here.

A failed job leaves no version: one that fails after its version was registered
(while measuring latency) deletes it again, and a job a stopping registry cut short is
failed, and its version deleted, when the registry starts again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import sys
from collections import deque
from pathlib import Path
from typing import Any

import grpc
import structlog
from tensorgate.registry.v1 import registry_pb2 as pb

from services.registry.artifacts import LocalArtifactStore
from services.registry.feed import subject_of
from services.registry.optimization.jobs import now_us
from services.registry.optimization.latency import CONCURRENCIES, LatencyProbe
from services.registry.optimization.methods import Step, transformation_name
from services.registry.store import RegistryStore
from services.runtime.channels import open_channel
from services.runtime.errors import ResourceExhausted, TensorgateError

log = structlog.get_logger("tensorgate.registry.optimization")

_CHUNK = 1 << 20
# A registry touches its unfinished jobs this often; one untouched for STALE_S was
# abandoned (its registry stopped), and any registry on the database fails it.
HEARTBEAT_S = 10.0
STALE_S = 60.0
# Jobs queued or running in one registry at most; more are refused, never queued unbounded.
MAX_PENDING = 16


class JobFailed(Exception):
    """Ends a job as FAILED with this message as its reason."""


def _with_deltas(facts: dict[str, float]) -> dict[str, float]:
    """Adds delta.X = X - parent.X for every figure measured for both."""
    deltas = {
        f"delta.{key}": value - facts[f"parent.{key}"]
        for key, value in facts.items()
        if f"parent.{key}" in facts
    }
    return {**facts, **deltas}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as data:
        while chunk := data.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class JobRunner:
    def __init__(
        self,
        store: RegistryStore,
        artifacts: LocalArtifactStore,
        *,
        workers: tuple[str, ...],
        credentials: grpc.ChannelCredentials | None,
        latency_calls: int,
        load_timeout: float,
        evaluation_dir: Path,
        max_bytes: int,
    ) -> None:
        self._store = store
        self._artifacts = artifacts
        self._workers = workers
        self._channel = open_channel(workers[0], credentials) if workers else None
        self.latency_calls = latency_calls
        self._load_timeout = load_timeout
        self._evaluation_dir = evaluation_dir
        self._max_bytes = max_bytes
        self._one_at_a_time = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._active: set[str] = set()  # ids of this process's queued and running jobs
        self._starting = 0  # starts past the MAX_PENDING check, their job not yet created
        self._keeper: asyncio.Task[None] | None = None

    async def recover(self) -> None:
        """Fails the unfinished jobs no registry has kept alive for STALE_S (their registry
        stopped or crashed), deleting their versions; then keeps this one's jobs alive.

        Jobs of another registry replica sharing the database keep running: it touches
        them every HEARTBEAT_S, so only abandoned ones look stale."""
        await self._sweep()
        self._keeper = asyncio.create_task(self._keep_alive())

    async def _sweep(self) -> None:
        stale_before = now_us() - int(STALE_S * 1e6)
        for row in await self._store.jobs.unfinished():
            if row.id in self._active or row.updated_us >= stale_before:
                continue
            version = row.result_version or await self._unrecorded_version(row)
            if version:
                await self._discard(row.model, version, job_id=row.id)
            await self._undeploy_parent(row.model, row.parent_version, job_id=row.id)
            await self._store.jobs.update(
                row.id,
                state="failed",
                error="the registry running this job stopped before it finished; start it again",
            )
            log.info("abandoned optimization job failed", job=row.id)

    async def _unrecorded_version(self, row: Any) -> int:
        """The version an abandoned job registered but had not recorded on itself yet (its
        registry died between the two writes), found by the job id its lineage names; 0
        if there is none. Newest first, back to when the job was created."""
        token = ""
        while True:
            try:
                page, token = await self._store.list_versions(row.model, page_token=token)
            except TensorgateError:  # the model is gone, and its versions with it
                return 0
            for version in page:
                if version.lineage.parameters.get("job") == row.id:
                    return version.version
                if version.create_time.ToMicroseconds() < row.created_us:
                    return 0
            if not token:
                return 0

    async def _keep_alive(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            try:
                await self._store.jobs.touch(self._active)
                await self._sweep()
            except Exception as exc:  # the database is away: next time, then
                log.warning("could not keep optimization jobs alive", reason=repr(exc))

    async def close(self) -> None:
        if self._keeper is not None:
            self._keeper.cancel()
            await asyncio.wait([self._keeper])
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks)
        if self._channel is not None:
            await self._channel.close(None)

    async def start(
        self,
        parent: pb.ModelVersion,
        steps: list[Step],
        *,
        description: str,
        latency_calls: int,
        actor: str,
    ) -> pb.OptimizationJob:
        # Counted before the first await: concurrent starts all see each other's slot.
        if len(self._active) + self._starting >= MAX_PENDING:
            raise ResourceExhausted(
                f"the registry has {MAX_PENDING} optimization jobs queued or running already; "
                "start this one when one of them has finished",
                subject="registry:optimization_jobs",
                retry_after_s=30.0,
            )
        calls = latency_calls or self.latency_calls
        description = description or (
            f"{transformation_name(steps)} of version {parent.version} "
            f"({', '.join(step.describe() for step in steps)})"
        )
        self._starting += 1
        try:
            job = await self._store.jobs.create(
                parent.model,
                parent.version,
                steps,
                description=description,
                latency_calls=calls,
                actor=actor,
            )
        finally:
            self._starting -= 1
        task = asyncio.create_task(self._run(job.id, parent, steps, description, calls, actor))
        self._tasks.add(task)
        self._active.add(job.id)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda _: self._active.discard(job.id))
        return job

    async def _progress(self, job_id: str, stage: str, progress: float) -> None:
        await self._store.jobs.update(job_id, stage=stage, progress=round(progress, 3))

    async def _run(
        self,
        job_id: str,
        parent: pb.ModelVersion,
        steps: list[Step],
        description: str,
        calls: int,
        actor: str,
    ) -> None:
        jobs = self._store.jobs
        try:
            async with self._one_at_a_time:
                await jobs.update(job_id, state="running", stage="starting", progress=0.01)
                version = await self._execute(job_id, parent, steps, description, calls, actor)
                await jobs.update(
                    job_id, state="done", stage="done", progress=1.0, result_version=version
                )
                log.info("optimization done", job=job_id, model=parent.model, version=version)
        except asyncio.CancelledError:
            # close() cancels once and waits: the clean-up below still runs to its end.
            with contextlib.suppress(Exception):
                await jobs.update(
                    job_id,
                    state="failed",
                    error="the registry stopped while this job ran; start it again",
                )
            raise
        except (JobFailed, TensorgateError) as exc:
            log.info("optimization failed", job=job_id, reason=str(exc))
            await jobs.update(job_id, state="failed", error=str(exc))
        except Exception:
            log.exception("optimization failed unexpectedly", job=job_id)
            await jobs.update(
                job_id,
                state="failed",
                error=f"the job failed unexpectedly; the registry's log has the details "
                f"(job {job_id})",
            )

    async def _execute(
        self,
        job_id: str,
        parent: pb.ModelVersion,
        steps: list[Step],
        description: str,
        calls: int,
        actor: str,
    ) -> int:
        if self._channel is None:
            raise JobFailed(
                "the registry has no worker to measure latency on: start it with "
                "--workers host:port (tensorgate up does)"
            )
        if not await self._artifacts.verify(parent.artifact.sha256):
            raise JobFailed(
                f"the artifact of {parent.model}:{parent.version} is missing or corrupt in "
                "the store: upload the version again"
            )
        with self._artifacts.work_dir() as work:
            spec = {
                "workdir": work,
                "parent_artifact": str(self._artifacts.blob_path(parent.artifact.sha256)),
                "steps": [step.as_dict() for step in steps],
                "evaluation_dir": str(self._evaluation_dir),
            }
            result = await self._transform(job_id, spec)
            await self._progress(job_id, "registering the derived version", 0.45)
            artifact = await self._store_artifact(Path(result["artifact"]), parent.artifact.format)
        facts = dict(result["facts"])
        facts["artifact_bytes"] = float(artifact.size_bytes)
        facts["parent.artifact_bytes"] = float(parent.artifact.size_bytes)
        parameters = {key: value for step in steps for key, value in step.parameters}
        parameters.update(
            steps=",".join(step.describe() for step in steps),
            torch=result["torch"],
            quality_metric=result["quality_metric"],
            evaluation_set=result["evaluation_set"],
            weights_storage=result["storage"],
            job=job_id,
        )
        lineage = pb.Lineage(
            parent_version=parent.version,
            transformation=transformation_name(steps),
            parameters=parameters,
        )
        version = await self._store.create_version(
            parent.model,
            artifact=artifact,
            config=parent.config,
            lineage=lineage,
            facts=_with_deltas(facts),
            description=description,
            actor=actor,
        )
        await self._store.jobs.update(job_id, result_version=version.version)
        try:
            latency = await self._measure(job_id, parent, version, calls)
            await self._store.add_facts(parent.model, version.version, latency)
        except BaseException:
            await self._discard(parent.model, version.version, job_id=job_id)
            raise
        return version.version

    async def _transform(self, job_id: str, spec: dict[str, Any]) -> dict[str, Any]:
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "services.registry.optimization.transform",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert child.stdin is not None and child.stdout is not None and child.stderr is not None
        errors: deque[str] = deque(maxlen=20)

        async def drain_stderr(stream: asyncio.StreamReader) -> None:
            async for line in stream:
                errors.append(line.decode(errors="replace").rstrip())

        drain = asyncio.create_task(drain_stderr(child.stderr))
        outcome: dict[str, Any] = {}
        try:
            child.stdin.write(json.dumps(spec).encode())
            await child.stdin.drain()
            child.stdin.close()
            async for raw in child.stdout:
                try:
                    line = json.loads(raw)
                except ValueError:
                    continue  # a library's print: not ours
                if "stage" in line:
                    await self._progress(job_id, str(line["stage"]), float(line["progress"]))
                else:
                    outcome = line
            code = await child.wait()
            await drain
        except BaseException:
            if child.returncode is None:
                child.kill()
                await child.wait()
            drain.cancel()
            raise
        if "error" in outcome:
            raise JobFailed(str(outcome["error"]))
        if code != 0 or "result" not in outcome:
            last = next((line for line in reversed(errors) if line.strip()), "no output")
            raise JobFailed(f"the optimizer process exited with {code}: {last}")
        result: dict[str, Any] = outcome["result"]
        return result

    async def _store_artifact(self, path: Path, format: str) -> pb.Artifact:
        sha256 = await asyncio.to_thread(_sha256, path)
        size = (await asyncio.to_thread(path.stat)).st_size
        async with self._artifacts.writer(self._max_bytes) as writer:
            with path.open("rb") as data:
                while chunk := await asyncio.to_thread(data.read, _CHUNK):
                    await writer.write(chunk)
            return await writer.commit(sha256, size, format)

    async def _measure(
        self, job_id: str, parent: pb.ModelVersion, version: pb.ModelVersion, calls: int
    ) -> dict[str, float]:
        """Latency of parent and derived, on the first worker, each deployed for the
        measurement unless it already was (and undeployed after, if it was not)."""
        assert self._channel is not None
        model, actor = parent.model, f"optimization:{job_id}"
        served = {
            d.resolved_version for d in await self._store.list_deployments() if d.model == model
        }
        added: list[int] = []
        probe = LatencyProbe(self._channel)
        try:
            for number in (parent.version, version.version):
                if number not in served:
                    await self._store.set_deployment(
                        pb.Deployment(model=model, version=number, instances=1), actor=actor
                    )
                    added.append(number)
            await self._progress(job_id, f"waiting for worker {self._workers[0]} to load", 0.5)
            try:
                await probe.wait_loaded([parent, version], self._load_timeout)
            except (TimeoutError, RuntimeError):
                raise JobFailed(
                    f"waiting for the worker to load {model}:{parent.version}, "
                    f"{model}:{version.version}: worker {self._workers[0]} did not serve them "
                    f"within {self._load_timeout:g}s (is it running, following this registry?)"
                ) from None
            try:
                figures = await self._latency(job_id, probe, parent, version, calls)
            except grpc.aio.AioRpcError as exc:
                raise JobFailed(
                    f"a latency call to worker {self._workers[0]} failed: "
                    f"{exc.code().name} {exc.details()}"
                ) from None
            figures["latency_calls"] = float(calls)
            return _with_deltas(figures)
        finally:
            for number in added:
                await self._store.delete_deployment(model, version=number, alias=None, actor=actor)

    async def _latency(
        self,
        job_id: str,
        probe: LatencyProbe,
        parent: pb.ModelVersion,
        version: pb.ModelVersion,
        calls: int,
    ) -> dict[str, float]:
        """Parent and derived alternate, one concurrency at a time, so that a machine that
        gets busier meanwhile weighs on both alike."""
        await probe.warm_up([parent, version])
        figures: dict[str, float] = {}
        rounds = [
            (c, prefix, v)
            for c in CONCURRENCIES
            for prefix, v in (("parent.", parent), ("", version))
        ]
        for done, (concurrency, prefix, measured) in enumerate(rounds):
            stage = f"measuring latency of version {measured.version} (concurrency {concurrency})"
            await self._progress(job_id, stage, 0.55 + 0.4 * done / len(rounds))
            measured_figures = await probe.measure(measured, calls, concurrency)
            figures.update({prefix + key: value for key, value in measured_figures.items()})
        return figures

    async def _undeploy_parent(self, model: str, version: int, *, job_id: str) -> None:
        """Deletes the parent's deployment an abandoned job set to measure it, if the
        newest change to that deployment is still the job's (the feed says who made it)."""
        actor = f"optimization:{job_id}"
        target = pb.RegistryEvent(deployment_set=pb.Deployment(model=model, version=version))
        last = await self._store.feed.last_event(subject_of(target))
        if last is None or last.WhichOneof("change") != "deployment_set" or last.actor != actor:
            return
        with contextlib.suppress(TensorgateError):
            await self._store.delete_deployment(model, version=version, alias=None, actor=actor)

    async def _discard(self, model: str, version: int, *, job_id: str) -> None:
        """Deletes a failed job's version (and a deployment of it the job left)."""
        actor = f"optimization:{job_id}"
        with contextlib.suppress(TensorgateError):
            await self._store.delete_deployment(model, version=version, alias=None, actor=actor)
        try:
            await self._store.delete_version(model, version, actor=actor)
        except TensorgateError as exc:
            # Kept in result_version, so the job says which version is left over.
            log.warning("could not delete a failed job's version", job=job_id, reason=str(exc))
            return
        await self._store.jobs.update(job_id, result_version=0)
