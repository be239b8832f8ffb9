"""ModelRegistry: the registry's RPCs, each a thin step from the request to the store.

What a call may do and what it means lives in the store (store.py) and the artifact
path (uploads.py); this file reads requests, says who is acting, and hands back
messages. Domain errors raised below become statuses in the runtime's pipeline.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import UTC
from typing import Any

import grpc
import structlog
from tensorgate.client_streams import ACCEPTED
from tensorgate.model_ref import ModelRef
from tensorgate.registry.v1 import registry_pb2, registry_pb2_grpc

from services.registry import requests as check
from services.registry.artifacts import ArtifactStore
from services.registry.optimization.runner import JobRunner
from services.registry.optimization_rpcs import OptimizationRpcs
from services.registry.store import RegistryStore
from services.registry.uploads import artifact_chunks, check_header, receive_artifact
from services.runtime import calls
from services.runtime.errors import (
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from services.runtime.triton_config import parse_config

Context = grpc.aio.ServicerContext[Any, Any]

log = structlog.get_logger("tensorgate.registry")

ACTOR_KEY = "x-tensorgate-actor"
# A watcher re-reads the database this often even when this process saw no commit,
# so writes made through another registry replica reach it too.
_WATCH_RECHECK_S = 1.0


def actor() -> str:
    """Who is acting, for the records: the authenticated key id when there is one, else
    the name the client gave (unverified until keys are required), else "anonymous"."""
    call = calls.current()
    if call is None:
        return "anonymous"
    if call.principal is not None:
        return f"key:{call.principal.key_id}"
    claimed = call.metadata_value(ACTOR_KEY)
    if isinstance(claimed, str) and claimed:
        return claimed[:128]
    return "anonymous"


class ModelRegistryServicer(OptimizationRpcs, registry_pb2_grpc.ModelRegistryServicer):
    def __init__(
        self,
        store: RegistryStore,
        artifacts: ArtifactStore,
        *,
        runner: JobRunner,
        max_bytes: int,
        chunk_bytes: int,
        max_uploads: int,
        upload_idle_seconds: float,
    ) -> None:
        self._store = store
        self._artifacts = artifacts
        self._runner = runner
        self._max_bytes = max_bytes
        self._chunk_bytes = chunk_bytes
        self._max_uploads = max_uploads
        self._upload_idle = upload_idle_seconds
        # Uploads in flight, by the sha256 they declared: a refused upload removes its
        # stored bytes only when no other upload of the same bytes is on its way.
        self._uploading: dict[str, int] = {}  # sha256 -> uploads of those bytes under way
        self._begun: dict[str, int] = {}  # sha256 -> uploads of them begun while any was

    def _actor(self) -> str:
        return actor()

    # --- models ---------------------------------------------------------------------------

    async def CreateModel(
        self, request: registry_pb2.CreateModelRequest, context: Context
    ) -> registry_pb2.Model:
        calls.note(model=request.model.name)
        check.model(request.model)
        return await self._store.create_model(request.model, actor=actor())

    async def GetModel(
        self, request: registry_pb2.GetModelRequest, context: Context
    ) -> registry_pb2.Model:
        check.name("name", request.name)
        return await self._store.get_model(request.name)

    async def ListModels(
        self, request: registry_pb2.ListModelsRequest, context: Context
    ) -> registry_pb2.ListModelsResponse:
        check.optional_name("task", request.task)
        # Each label is one more join: bounded as a model's own labels are.
        check.labels("labels", request.labels)
        models, token = await self._store.list_models(
            page_size=request.page_size,
            page_token=request.page_token,
            task=request.task,
            labels=dict(request.labels),
        )
        return registry_pb2.ListModelsResponse(models=models, next_page_token=token)

    async def UpdateModel(
        self, request: registry_pb2.UpdateModelRequest, context: Context
    ) -> registry_pb2.Model:
        calls.note(model=request.name)
        check.name("name", request.name)
        check.text("description", request.description, check.MAX_DESCRIPTION)
        check.labels("labels", request.labels)
        return await self._store.update_model(
            request.name,
            description=request.description if request.HasField("description") else None,
            labels=dict(request.labels) if request.replace_labels else None,
            actor=actor(),
        )

    # --- versions -------------------------------------------------------------------------

    async def UploadVersion(
        self, request_iterator: AsyncIterator[registry_pb2.UploadVersionRequest], context: Context
    ) -> registry_pb2.ModelVersion:
        first = await anext(aiter(request_iterator), None)
        if first is None or not first.HasField("header"):
            raise InvalidArgument("header", "the first message of an upload must be its header")
        header = first.header
        calls.note(model=header.model)
        check.name("header.model", header.model)
        check.text("header.description", header.description, check.MAX_DESCRIPTION)
        check.lineage(header.lineage)
        # Refused before a byte is stored: an unknown model or parent, a config Triton
        # would not load, a registry already taking as many uploads as it may.
        await self._store.get_model(header.model)
        if header.lineage.parent_version:
            await self._store.get_version(header.model, header.lineage.parent_version)
        config = parse_config(header.config_pbtxt)
        if sum(self._uploading.values()) >= self._max_uploads:
            raise ResourceExhausted(
                f"the registry is taking {self._max_uploads} uploads already; retry shortly",
                subject="registry:concurrent_uploads",
                retry_after_s=1.0,
            )
        check_header(header, max_bytes=self._max_bytes)
        sha256 = header.sha256.lower()
        self._uploading[sha256] = self._uploading.get(sha256, 0) + 1
        self._begun[sha256] = self._begun.get(sha256, 0) + 1
        try:
            # Everything the header alone can fail on is checked: the caller may stream.
            await context.send_initial_metadata(ACCEPTED)
            return await self._register(header, config, request_iterator)
        finally:
            self._uploading[sha256] -= 1
            if not self._uploading[sha256]:
                del self._uploading[sha256], self._begun[sha256]

    async def _register(
        self,
        header: registry_pb2.UploadVersionRequest.Header,
        config: registry_pb2.TritonConfig,
        parts: AsyncIterator[registry_pb2.UploadVersionRequest],
    ) -> registry_pb2.ModelVersion:
        artifact = await receive_artifact(
            header,
            parts,
            self._artifacts,
            max_bytes=self._max_bytes,
            idle_seconds=self._upload_idle,
        )
        try:
            version = await self._store.create_version(
                header.model,
                artifact=artifact,
                config=config,
                lineage=header.lineage,
                facts={"artifact_bytes": float(artifact.size_bytes)},
                description=header.description,
                actor=actor(),
            )
        except BaseException:
            await self._drop_unregistered(artifact.sha256)
            raise
        calls.note(resolved=f"{version.model}:{version.version}")
        return version

    async def _drop_unregistered(self, sha256: str) -> None:
        """Removes a blob whose upload failed after it landed, unless a version has it
        or another upload of the same bytes was under way at any moment since: one
        that was under way when this began (it may commit and end during the database
        read, which could not see its version), or one that began since (it may be
        using the blob). Whatever is kept, the start-up sweep removes if no version
        names it."""
        if self._uploading.get(sha256) != 1:
            return
        begun = self._begun[sha256]
        try:
            in_use = await self._store.artifact_in_use(sha256)
        except Exception as exc:
            log.warning("could not check an unregistered artifact", sha256=sha256, reason=repr(exc))
            return
        if not in_use:
            await self._artifacts.remove_unused(
                sha256, lambda: self._begun.get(sha256) == begun and self._uploading[sha256] == 1
            )

    async def GetVersion(
        self, request: registry_pb2.GetVersionRequest, context: Context
    ) -> registry_pb2.ModelVersion:
        check.model_version(request.model, request.version)
        return await self._store.get_version(request.model, request.version)

    async def ListVersions(
        self, request: registry_pb2.ListVersionsRequest, context: Context
    ) -> registry_pb2.ListVersionsResponse:
        check.name("model", request.model)
        found, token = await self._store.list_versions(
            request.model, page_size=request.page_size, page_token=request.page_token
        )
        return registry_pb2.ListVersionsResponse(versions=found, next_page_token=token)

    async def DownloadVersion(
        self, request: registry_pb2.DownloadVersionRequest, context: Context
    ) -> AsyncIterator[registry_pb2.DownloadVersionResponse]:
        calls.note(model=f"{request.model}:{request.version}")
        check.model_version(request.model, request.version)
        version = await self._store.get_version(request.model, request.version)
        async for part in artifact_chunks(version, self._artifacts, chunk_size=self._chunk_bytes):
            yield part

    async def DeleteVersion(
        self, request: registry_pb2.DeleteVersionRequest, context: Context
    ) -> registry_pb2.DeleteVersionResponse:
        calls.note(model=f"{request.model}:{request.version}")
        check.model_version(request.model, request.version)
        await self._store.delete_version(request.model, request.version, actor=actor())
        return registry_pb2.DeleteVersionResponse()

    # --- aliases --------------------------------------------------------------------------

    async def SetAlias(
        self, request: registry_pb2.SetAliasRequest, context: Context
    ) -> registry_pb2.Alias:
        calls.note(model=f"{request.model}@{request.alias}")
        check.alias(request.model, request.alias, request.reason)
        check.version_number("version", request.version)
        expected = request.expected_version if request.HasField("expected_version") else None
        await self._require_intact(request.model, request.version)
        return await self._store.set_alias(
            request.model,
            request.alias,
            request.version,
            expected_version=expected,
            reason=request.reason,
            actor=actor(),
            policy=request.max_quality_loss if request.HasField("max_quality_loss") else None,
            clear_policy=request.clear_policy,
        )

    async def RollbackAlias(
        self, request: registry_pb2.RollbackAliasRequest, context: Context
    ) -> registry_pb2.Alias:
        calls.note(model=f"{request.model}@{request.alias}")
        check.alias(request.model, request.alias, request.reason)
        expected = request.expected_version if request.HasField("expected_version") else None
        target = await self._store.rollback_target(request.model, request.alias)
        if target is not None:
            await self._require_intact(request.model, target)
        return await self._store.rollback_alias(
            request.model,
            request.alias,
            expected_version=expected,
            reason=request.reason,
            actor=actor(),
        )

    async def DeleteAlias(
        self, request: registry_pb2.DeleteAliasRequest, context: Context
    ) -> registry_pb2.DeleteAliasResponse:
        calls.note(model=f"{request.model}@{request.alias}")
        check.alias(request.model, request.alias, request.reason)
        await self._store.delete_alias(
            request.model, request.alias, reason=request.reason, actor=actor()
        )
        return registry_pb2.DeleteAliasResponse()

    async def ListAliases(
        self, request: registry_pb2.ListAliasesRequest, context: Context
    ) -> registry_pb2.ListAliasesResponse:
        # The revision is read first: the list may then include later moves too, which
        # a watcher starting from this revision replays harmlessly (a move is absolute).
        check.optional_name("model", request.model)
        revision, at_us = await self._store.feed.current_revision_at()
        listing = registry_pb2.ListAliasesResponse(
            aliases=await self._store.list_aliases(request.model or None), revision=revision
        )
        if revision:
            listing.revision_time.FromMicroseconds(at_us)
        return listing

    async def GetAliasHistory(
        self, request: registry_pb2.GetAliasHistoryRequest, context: Context
    ) -> registry_pb2.GetAliasHistoryResponse:
        check.alias(request.model, request.alias)
        return registry_pb2.GetAliasHistoryResponse(
            moves=await self._store.alias_history(request.model, request.alias)
        )

    async def GetAliasAt(
        self, request: registry_pb2.GetAliasAtRequest, context: Context
    ) -> registry_pb2.AliasMove:
        if not request.HasField("time"):
            raise InvalidArgument("time", "is required: the moment to look the alias up at")
        check.alias(request.model, request.alias)
        check.timestamp("time", request.time)
        return await self._store.alias_at(
            request.model, request.alias, request.time.ToDatetime(tzinfo=UTC)
        )

    async def ResolveModelRef(
        self, request: registry_pb2.ResolveModelRefRequest, context: Context
    ) -> registry_pb2.ModelVersion:
        calls.note(model=request.ref)
        return await self._store.resolve(ModelRef.parse(request.ref))

    # --- deployments ----------------------------------------------------------------------

    async def SetDeployment(
        self, request: registry_pb2.SetDeploymentRequest, context: Context
    ) -> registry_pb2.Deployment:
        deployment = request.deployment
        calls.note(model=deployment.model)
        check.name("deployment.model", deployment.model)
        if deployment.WhichOneof("target") == "version":
            check.version_number("deployment.version", deployment.version)
            await self._require_intact(deployment.model, deployment.version)
        elif deployment.WhichOneof("target") == "alias":
            check.name("deployment.alias", deployment.alias)
            ref = ModelRef(deployment.model, alias=deployment.alias)
            with contextlib.suppress(NotFound):  # the store says so, in its own words
                target = await self._store.resolve(ref)
                await self._require_intact(target.model, target.version)
        return await self._store.set_deployment(deployment, actor=actor())

    async def _require_intact(self, model: str, version: int) -> None:
        """DATA_LOSS naming the version if its stored bytes no longer match their sha256:
        an alias or a deployment must not send workers to an artifact none can load."""
        try:
            stored = await self._store.get_version(model, version)
        except NotFound:
            return  # the store refuses the change itself, naming what is missing
        if not await self._artifacts.verify(stored.artifact.sha256):
            raise DataLoss(
                f"artifact of {model}:{version} (sha256 {stored.artifact.sha256}) is missing "
                "or corrupt in the store: upload the version again"
            )

    async def DeleteDeployment(
        self, request: registry_pb2.DeleteDeploymentRequest, context: Context
    ) -> registry_pb2.DeleteDeploymentResponse:
        calls.note(model=request.model)
        target = request.WhichOneof("target")
        check.name("model", request.model)
        if target == "version":
            check.version_number("version", request.version)
        elif target == "alias":
            check.name("alias", request.alias)
        await self._store.delete_deployment(
            request.model,
            version=request.version if target == "version" else None,
            alias=request.alias if target == "alias" else None,
            actor=actor(),
        )
        return registry_pb2.DeleteDeploymentResponse()

    async def ListDeployments(
        self, request: registry_pb2.ListDeploymentsRequest, context: Context
    ) -> registry_pb2.ListDeploymentsResponse:
        return registry_pb2.ListDeploymentsResponse(
            deployments=await self._store.list_deployments()
        )

    # --- the change feed ------------------------------------------------------------------

    async def Watch(
        self, request: registry_pb2.WatchRequest, context: Context
    ) -> AsyncIterator[registry_pb2.RegistryEvent]:
        seen = request.since_revision
        if seen < 0:
            raise InvalidArgument("since_revision", f"must be >= 0, got {seen}")
        current = await self._store.feed.current_revision()
        if seen > current:
            # The client saw revisions this registry never wrote: its database was
            # replaced. Resuming would silently skip; the client must start over.
            raise FailedPrecondition(
                f"since_revision {seen} is ahead of this registry (revision {current}); "
                "its history was reset: watch again from 0"
            )
        if seen and request.HasField("since_time"):
            check.timestamp("since_time", request.since_time)
            recorded = await self._store.feed.event_time(seen)
            if recorded != request.since_time.ToMicroseconds():
                # Same revision, another change: the database was restored or replaced
                # and has moved on since; resuming would silently mix two histories.
                raise FailedPrecondition(
                    f"this registry's change at revision {seen} is not the one you saw: "
                    "its history was replaced or restored since; watch again from 0"
                )
        while True:
            events = await self._store.feed.events_after(seen, compact_until=request.compact_until)
            for event in events:
                yield event
                seen = event.revision
            if not events:
                await self._store.feed.wait_for_change(seen, timeout=_WATCH_RECHECK_S)
