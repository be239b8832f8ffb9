"""AsyncRegistryClient: the asyncio client for the model registry (tensorgate.registry.v1).

    async with AsyncRegistryClient("127.0.0.1:50051", api_key=key) as registry:
        await registry.create_model("digits", task="infer")
        version = await registry.upload("digits", "models/repository/digits")
        await registry.set_alias("digits", "production", version.version)

One method per registry RPC, with keyword arguments; failed calls raise
`tensorgate.errors`. Uploads and downloads stream the artifact in 1 MiB chunks and
verify its sha256; `progress(done_bytes, total_bytes)` follows them.
"""

from __future__ import annotations

import asyncio
import getpass
import hashlib
import os
import secrets
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import BinaryIO

import grpc
from google.protobuf import timestamp_pb2

from tensorgate._channel import AsyncChannelClient
from tensorgate.client_streams import is_accepted
from tensorgate.errors import DataLossError, from_rpc_error
from tensorgate.model_folder import PackedModel, pack
from tensorgate.registry.v1 import registry_pb2, registry_pb2_grpc

CHUNK_BYTES = 1 << 20
ACTOR_KEY = "x-tensorgate-actor"

Progress = Callable[[int, int], object]


def _default_actor() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no login name and no passwd entry, e.g. in a container
        return "unknown"


class AsyncRegistryClient(AsyncChannelClient):
    """One channel to the registry (directly, or through a gateway that forwards it).

    `api_key` travels as `authorization: Bearer ...`; `actor` (default: the login name)
    as `x-tensorgate-actor`, recorded with alias moves and new versions. `credentials`
    connects over TLS. `timeout` is the deadline of each unary call, in seconds.
    """

    def __init__(
        self,
        address: str,
        *,
        api_key: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        actor: str | None = None,
        timeout: float | None = 30.0,
    ) -> None:
        metadata = [(ACTOR_KEY, actor or _default_actor())]
        if api_key:
            metadata.append(("authorization", f"Bearer {api_key}"))
        super().__init__(
            address, credentials=credentials, metadata=tuple(metadata), timeout=timeout
        )
        self._stub = registry_pb2_grpc.ModelRegistryStub(self._channel)

    # Models

    async def create_model(
        self,
        name: str,
        *,
        task: str,
        description: str = "",
        labels: Mapping[str, str] | None = None,
    ) -> registry_pb2.Model:
        model = registry_pb2.Model(
            name=name, task=task, description=description, labels=dict(labels or {})
        )
        return await self._unary(
            self._stub.CreateModel, registry_pb2.CreateModelRequest(model=model)
        )

    async def get_model(self, name: str) -> registry_pb2.Model:
        request = registry_pb2.GetModelRequest(name=name)
        return await self._unary(self._stub.GetModel, request)

    async def list_models(
        self, *, task: str = "", labels: Mapping[str, str] | None = None
    ) -> list[registry_pb2.Model]:
        """Every model (all pages), in name order."""
        models: list[registry_pb2.Model] = []
        token = ""
        while True:
            request = registry_pb2.ListModelsRequest(
                page_size=1000, page_token=token, task=task, labels=dict(labels or {})
            )
            page = await self._unary(self._stub.ListModels, request)
            models.extend(page.models)
            token = page.next_page_token
            if not token:
                return models

    async def update_model(
        self,
        name: str,
        *,
        description: str | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> registry_pb2.Model:
        """Replaces the description and/or all labels, whichever is given."""
        request = registry_pb2.UpdateModelRequest(
            name=name,
            description=description,
            labels=dict(labels or {}),
            replace_labels=labels is not None,
        )
        return await self._unary(self._stub.UpdateModel, request)

    # Versions

    async def upload(
        self,
        model: str,
        folder_or_tar: str | os.PathLike[str],
        *,
        config: str | os.PathLike[str] | None = None,
        lineage: registry_pb2.Lineage | None = None,
        description: str = "",
        progress: Progress | None = None,
    ) -> registry_pb2.ModelVersion:
        """Registers a new version from a model folder, or a tar with its `config` file.

        The folder is packed first (tensorgate.model_folder), so its sha256 is known
        before the header goes out.
        """
        with await asyncio.to_thread(pack, folder_or_tar, config=config) as packed:
            header = registry_pb2.UploadVersionRequest.Header(
                model=model,
                sha256=packed.sha256,
                size_bytes=packed.size_bytes,
                format=packed.format,
                config_pbtxt=packed.config_pbtxt,
                lineage=lineage,
                description=description,
            )
            return await self._send_upload(header, packed, progress)

    async def _send_upload(
        self,
        header: registry_pb2.UploadVersionRequest.Header,
        packed: PackedModel,
        progress: Progress | None,
    ) -> registry_pb2.ModelVersion:
        # Written message by message, and the chunks only once the registry accepted the
        # header (tensorgate.client_streams): a refusal (no admin key, an unknown model, too
        # big) is then heard as its own status, never grpc.aio's "Internal error from Core".
        # No deadline: how long an upload takes depends on its size.
        # No request iterator: grpc then takes the messages from call.write (the stubs'
        # types predate that form).
        call = self._stub.UploadVersion(metadata=self._metadata)  # type: ignore[call-arg]
        try:
            with packed.path.open("rb") as data:
                await call.write(registry_pb2.UploadVersionRequest(header=header))
                if is_accepted(await call.initial_metadata()):
                    done = 0
                    # Reads go to a thread: a slow disk must not stall the caller's loop.
                    while chunk := await asyncio.to_thread(data.read, CHUNK_BYTES):
                        await call.write(registry_pb2.UploadVersionRequest(chunk=chunk))
                        done += len(chunk)
                        if progress is not None:
                            progress(done, packed.size_bytes)
                    await call.done_writing()
        except (asyncio.InvalidStateError, grpc.aio.AioRpcError):
            pass  # the registry ended the call: its status below says why
        try:
            return await call
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            if not call.done():
                call.cancel()

    async def get_version(self, model: str, version: int) -> registry_pb2.ModelVersion:
        request = registry_pb2.GetVersionRequest(model=model, version=version)
        return await self._unary(self._stub.GetVersion, request)

    async def list_versions(self, model: str) -> list[registry_pb2.ModelVersion]:
        """A model's versions (all pages), newest first."""
        found: list[registry_pb2.ModelVersion] = []
        token = ""
        while True:
            request = registry_pb2.ListVersionsRequest(model=model, page_token=token)
            page = await self._unary(self._stub.ListVersions, request)
            found.extend(page.versions)
            token = page.next_page_token
            if not token:
                return found

    async def download(
        self, model: str, version: int, dest: Path, *, progress: Progress | None = None
    ) -> registry_pb2.ModelVersion:
        """Writes a version's artifact (the tar) to `dest`, once its sha256 and size match.

        The bytes go to a temporary file beside `dest`, renamed onto it only when
        verified: `dest` never holds a partial or corrupt artifact.
        """
        dest = Path(dest)
        # Not mkstemp: its file is private to its owner, and the artifact should get the
        # permissions any new file of the caller's gets (umask).
        staging = dest.with_name(f".{dest.name}.{secrets.token_hex(6)}.part")
        try:
            with open(staging, "xb") as out:  # noqa: ASYNC230  one local open, not I/O-bound
                found = await self._receive(model, version, out, progress)
            os.replace(staging, dest)
        except BaseException:
            # Done inline: on cancellation an awaited cleanup could be cut off itself
            # and leave the partial file behind.
            staging.unlink(missing_ok=True)
            raise
        return found

    async def _receive(
        self, model: str, version: int, out: BinaryIO, progress: Progress | None
    ) -> registry_pb2.ModelVersion:
        request = registry_pb2.DownloadVersionRequest(model=model, version=version)
        call = self._stub.DownloadVersion(request, metadata=self._metadata)
        found: registry_pb2.ModelVersion | None = None
        digest = hashlib.sha256()
        done = 0
        try:
            async for part in call:
                if part.HasField("version"):
                    found = part.version
                    continue
                if found is None:
                    raise DataLossError(
                        grpc.StatusCode.DATA_LOSS, "the artifact's bytes came before its header"
                    )
                digest.update(part.chunk)
                await asyncio.to_thread(out.write, part.chunk)
                done += len(part.chunk)
                if progress is not None:
                    progress(done, found.artifact.size_bytes)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            if not call.done():
                call.cancel()
        if found is None:
            raise DataLossError(grpc.StatusCode.DATA_LOSS, f"{model}:{version}: no header came")
        expected = found.artifact
        if done != expected.size_bytes or digest.hexdigest() != expected.sha256:
            raise DataLossError(
                grpc.StatusCode.DATA_LOSS,
                f"{model}:{version}: received {done} bytes with sha256 {digest.hexdigest()}, "
                f"expected {expected.size_bytes} bytes with sha256 {expected.sha256}",
            )
        return found

    async def delete_version(self, model: str, version: int) -> None:
        request = registry_pb2.DeleteVersionRequest(model=model, version=version)
        await self._unary(self._stub.DeleteVersion, request)

    async def resolve_model_ref(self, ref: str) -> registry_pb2.ModelVersion:
        """`name` (newest version), `name:3` or `name@alias` to the version it means now."""
        request = registry_pb2.ResolveModelRefRequest(ref=ref)
        return await self._unary(self._stub.ResolveModelRef, request)

    # Aliases

    async def set_alias(
        self,
        model: str,
        alias: str,
        version: int,
        *,
        expected_version: int | None = None,
        reason: str = "",
        max_quality_loss: float | None = None,
        clear_policy: bool = False,
    ) -> registry_pb2.Alias:
        """Points `alias` at `version`; with `expected_version`, only if it points there now
        (0: only if the alias does not exist yet), else FailedPreconditionError. With
        `max_quality_loss`, the alias keeps that policy: a version that lost more quality
        against its parent is refused (FailedPreconditionError naming the figures)."""
        request = registry_pb2.SetAliasRequest(
            model=model,
            alias=alias,
            version=version,
            expected_version=expected_version,
            reason=reason,
            max_quality_loss=max_quality_loss,
            clear_policy=clear_policy,
        )
        return await self._unary(self._stub.SetAlias, request)

    async def rollback_alias(
        self, model: str, alias: str, *, reason: str = "", expected_version: int | None = None
    ) -> registry_pb2.Alias:
        """Points `alias` back where it pointed before its last move; with
        `expected_version`, only if it points there now (else FailedPreconditionError)."""
        request = registry_pb2.RollbackAliasRequest(
            model=model, alias=alias, reason=reason, expected_version=expected_version
        )
        return await self._unary(self._stub.RollbackAlias, request)

    async def delete_alias(self, model: str, alias: str, *, reason: str = "") -> None:
        request = registry_pb2.DeleteAliasRequest(model=model, alias=alias, reason=reason)
        await self._unary(self._stub.DeleteAlias, request)

    async def list_aliases(self, model: str = "") -> list[registry_pb2.Alias]:
        """A model's aliases; every model's when `model` is empty."""
        request = registry_pb2.ListAliasesRequest(model=model)
        response = await self._unary(self._stub.ListAliases, request)
        return list(response.aliases)

    async def get_alias_history(self, model: str, alias: str) -> list[registry_pb2.AliasMove]:
        """Every move of an alias, oldest first."""
        request = registry_pb2.GetAliasHistoryRequest(model=model, alias=alias)
        response = await self._unary(self._stub.GetAliasHistory, request)
        return list(response.moves)

    async def get_alias_at(self, model: str, alias: str, time: datetime) -> registry_pb2.AliasMove:
        """The move that set where `alias` pointed at `time` (an aware datetime)."""
        when = timestamp_pb2.Timestamp()
        when.FromDatetime(time)
        request = registry_pb2.GetAliasAtRequest(model=model, alias=alias, time=when)
        return await self._unary(self._stub.GetAliasAt, request)

    # Deployments

    async def set_deployment(
        self,
        model: str,
        *,
        version: int | None = None,
        alias: str | None = None,
        instances: int = 1,
    ) -> registry_pb2.Deployment:
        """Says `model:version` or `model@alias` (exactly one) must be served."""
        deployment = registry_pb2.Deployment(model=model, instances=instances)
        _set_target(deployment, version, alias)
        request = registry_pb2.SetDeploymentRequest(deployment=deployment)
        return await self._unary(self._stub.SetDeployment, request)

    async def delete_deployment(
        self, model: str, *, version: int | None = None, alias: str | None = None
    ) -> None:
        request = registry_pb2.DeleteDeploymentRequest(model=model)
        _set_target(request, version, alias)
        await self._unary(self._stub.DeleteDeployment, request)

    async def list_deployments(self) -> list[registry_pb2.Deployment]:
        response = await self._unary(
            self._stub.ListDeployments, registry_pb2.ListDeploymentsRequest()
        )
        return list(response.deployments)

    # The change feed

    async def start_optimization(
        self,
        ref: str,
        steps: list[tuple[str, dict[str, str]]],
        *,
        description: str = "",
        latency_calls: int = 0,
    ) -> registry_pb2.OptimizationJob:
        """Starts a job deriving an optimized version of `ref` (steps: (method, parameters),
        e.g. [("prune", {"sparsity": "0.5"}), ("int8-dynamic", {})]); returns it queued."""
        request = registry_pb2.StartOptimizationRequest(
            ref=ref,
            steps=[registry_pb2.OptimizationStep(method=m, parameters=p) for m, p in steps],
            description=description,
            latency_calls=latency_calls,
        )
        return await self._unary(self._stub.StartOptimization, request)

    async def get_optimization_job(self, job_id: str) -> registry_pb2.OptimizationJob:
        request = registry_pb2.GetOptimizationJobRequest(id=job_id)
        return await self._unary(self._stub.GetOptimizationJob, request)

    async def list_optimization_jobs(
        self, model: str = "", *, limit: int = 0
    ) -> list[registry_pb2.OptimizationJob]:
        request = registry_pb2.ListOptimizationJobsRequest(model=model, limit=limit)
        return list((await self._unary(self._stub.ListOptimizationJobs, request)).jobs)

    async def wait_optimization_job(
        self, job_id: str, *, interval: float = 0.5
    ) -> AsyncIterator[registry_pb2.OptimizationJob]:
        """The job each time its stage or progress changes, until it is DONE or FAILED
        (the last one yielded)."""
        finished = (registry_pb2.OptimizationJob.DONE, registry_pb2.OptimizationJob.FAILED)
        seen: tuple[str, float] | None = None
        while True:
            job = await self.get_optimization_job(job_id)
            if (job.stage, job.progress) != seen or job.state in finished:
                seen = (job.stage, job.progress)
                yield job
            if job.state in finished:
                return
            await asyncio.sleep(interval)

    async def watch(self, since_revision: int = 0) -> AsyncIterator[registry_pb2.RegistryEvent]:
        """Every event after `since_revision`, then live ones; leaving the loop ends the call."""
        call = self._stub.Watch(
            registry_pb2.WatchRequest(since_revision=since_revision), metadata=self._metadata
        )
        try:
            async for event in call:
                yield event
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            if not call.done():
                call.cancel()


def _set_target(
    message: registry_pb2.Deployment | registry_pb2.DeleteDeploymentRequest,
    version: int | None,
    alias: str | None,
) -> None:
    if (version is None) == (alias is None):
        raise ValueError("give exactly one of version and alias")
    if version is not None:
        message.version = version
    else:
        message.alias = alias or ""
