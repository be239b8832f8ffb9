"""The worker's KServe v2 passthrough: the gateway's Triton-protocol calls, to this Triton.

A request names a model as the gateway resolved it (`model_name` "digits",
`model_version` "3"); it goes to Triton renamed to what Triton has loaded (`digits__v3`
in registry mode) and nothing else changed: its tensors are not decoded or checked
here (Triton checks them, and its INVALID_ARGUMENT reaches the caller). Inference
responses come back as bytes and leave renamed by appending the name fields
(services/runtime/kserve.py says why that is enough, and where in a stream response).

A stream serves one model, the one its first request names: the gateway routed the
whole stream on it. A later request naming another one ends the stream, once the
requests already sent have been answered, with INVALID_ARGUMENT.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any, TypeAlias

import grpc
from tritonclient.grpc import service_pb2

from services.runtime import calls
from services.runtime.errors import InvalidArgument, NotFound, upstream_error
from services.runtime.kserve import RefusedCalls, ResponseNames, model_ref
from services.worker.catalog import LoadedModel, ModelCatalog
from services.worker.triton_client import TritonConnection

Context = grpc.aio.ServicerContext[Any, Any]
Request: TypeAlias = service_pb2.ModelInferRequest


class TritonPassthroughServicer(RefusedCalls):
    def __init__(self, catalog: ModelCatalog, triton: TritonConnection) -> None:
        self._catalog = catalog
        self._triton = triton
        self._names: dict[str, ResponseNames] = {}

    def _resolve(self, name: str, version: str, field: str = "model_name") -> LoadedModel:
        calls.note(model=name)
        model = self._catalog.resolve(model_ref(name, version, field))
        calls.note(resolved=model.label)
        return model

    def _renamed(self, model: LoadedModel) -> ResponseNames:
        names = self._names.get(model.label)
        if names is None:
            names = self._names[model.label] = ResponseNames(
                model.info.name, str(model.info.version)
            )
        return names

    async def ServerLive(
        self, request: service_pb2.ServerLiveRequest, context: Context
    ) -> service_pb2.ServerLiveResponse:
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: service_pb2.ServerReadyRequest, context: Context
    ) -> service_pb2.ServerReadyResponse:
        return service_pb2.ServerReadyResponse(ready=bool(self._catalog.models()))

    async def ServerMetadata(
        self, request: service_pb2.ServerMetadataRequest, context: Context
    ) -> service_pb2.ServerMetadataResponse:
        return service_pb2.ServerMetadataResponse(name="tensorgate-worker")

    async def ModelReady(
        self, request: service_pb2.ModelReadyRequest, context: Context
    ) -> service_pb2.ModelReadyResponse:
        try:
            self._resolve(request.name, request.version, "name")
        except NotFound:
            return service_pb2.ModelReadyResponse(ready=False)
        return service_pb2.ModelReadyResponse(ready=True)

    async def ModelInfer(self, request: Request, context: Context) -> bytes:
        model = self._resolve(request.model_name, request.model_version)
        if model.decoupled:
            raise InvalidArgument(
                "model_name", f"{model.label} streams its responses: call ModelStreamInfer for it"
            )
        request.model_name, request.model_version = model.triton_name, model.triton_version
        response = await self._triton.infer_bytes(request, calls.remaining())
        renamed: bytes = self._renamed(model).infer
        return response + renamed

    async def ModelStreamInfer(
        self, requests: AsyncIterator[Request], context: Context
    ) -> AsyncIterator[bytes]:
        requests = aiter(requests)
        first = await anext(requests, None)
        if first is None:
            return
        asked = (first.model_name, first.model_version)
        model = self._resolve(*asked)
        renamed = self._renamed(model).rename_stream
        upstream = self._triton.open_stream(calls.remaining())
        refusal: list[Exception] = []
        pump = asyncio.ensure_future(self._pump(first, requests, asked, model, upstream, refusal))
        try:
            async for response in upstream:
                yield renamed(response)
        except grpc.aio.AioRpcError as exc:
            if refusal:
                raise refusal[0] from None
            raise upstream_error(exc, f"model {model.label}") from exc
        finally:
            pump.cancel()
            if not upstream.done():
                upstream.cancel()  # the caller went away: the requests in Triton stop too
        if refusal:
            raise refusal[0]

    async def _pump(
        self,
        first: Request,
        requests: AsyncIterator[Request],
        asked: tuple[str, str],
        model: LoadedModel,
        upstream: grpc.aio.StreamStreamCall[Any, bytes],
        refusal: list[Exception],
    ) -> None:
        """Writes the caller's requests to Triton, renamed, until they end or one is
        refused; then half-closes, so Triton ends the stream once it has answered."""
        try:
            request: Request | None = first
            while request is not None:
                if (request.model_name, request.model_version) != asked:
                    raise InvalidArgument(
                        "model_name",
                        f"this stream serves {model.label}, the model its first request "
                        "named; open another stream for another model",
                    )
                request.model_name = model.triton_name
                request.model_version = model.triton_version
                await upstream.write(request)
                request = await anext(requests, None)
        except (asyncio.InvalidStateError, grpc.aio.AioRpcError):
            return  # the stream ended upstream: its status says why
        except Exception as exc:  # a refusal, or a bug: the call ends with it either way
            refusal.append(exc)
        with contextlib.suppress(asyncio.InvalidStateError, grpc.aio.AioRpcError):
            await upstream.done_writing()

    async def ModelMetadata(
        self, request: service_pb2.ModelMetadataRequest, context: Context
    ) -> service_pb2.ModelMetadataResponse:
        model = self._resolve(request.name, request.version, "name")
        response: service_pb2.ModelMetadataResponse = await self._triton.describe(
            "ModelMetadata",
            service_pb2.ModelMetadataRequest(name=model.triton_name, version=model.triton_version),
            calls.remaining(),
        )
        response.name = model.info.name
        del response.versions[:]
        response.versions.append(str(model.info.version))
        return response

    async def ModelConfig(
        self, request: service_pb2.ModelConfigRequest, context: Context
    ) -> service_pb2.ModelConfigResponse:
        model = self._resolve(request.name, request.version, "name")
        response: service_pb2.ModelConfigResponse = await self._triton.describe(
            "ModelConfig",
            service_pb2.ModelConfigRequest(name=model.triton_name, version=model.triton_version),
            calls.remaining(),
        )
        response.config.name = model.info.name
        return response

    async def ModelStatistics(
        self, request: service_pb2.ModelStatisticsRequest, context: Context
    ) -> service_pb2.ModelStatisticsResponse:
        """One model version's statistics, or (no name) those of every model loaded."""
        asked = service_pb2.ModelStatisticsRequest()
        if request.name:
            model = self._resolve(request.name, request.version, "name")
            asked.name, asked.version = model.triton_name, model.triton_version
        response: service_pb2.ModelStatisticsResponse = await self._triton.describe(
            "ModelStatistics", asked, calls.remaining()
        )
        loaded = {(m.triton_name, m.triton_version): m for m in self._catalog.models()}
        renamed = service_pb2.ModelStatisticsResponse()
        for stats in response.model_stats:
            found = loaded.get((stats.name, stats.version))
            if found is None:
                continue  # in Triton but not served (being loaded or let go)
            entry = renamed.model_stats.add()
            entry.CopyFrom(stats)
            entry.name, entry.version = found.info.name, str(found.info.version)
        return renamed
