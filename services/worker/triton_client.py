"""The worker's connection to Triton: one long-lived channel, errors mapped once.

Control calls (load, config, readiness) go through tritonclient's asyncio
client. The data plane uses tritonclient's generated KServe v2 stub directly,
so request and response tensors travel as raw bytes without a numpy round trip.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import structlog
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from services.runtime.channels import open_channel
from services.runtime.errors import UpstreamFailure, upstream_error
from services.runtime.readiness import poll_until

log = structlog.get_logger("tensorgate.triton")

# A model in these states still holds its folder and its instances.
_IN_USE = frozenset({"READY", "UNLOADING", "LOADING"})
# Calls in flight finish before an unload does: a long generation may hold it this long.
_UNLOAD_TIMEOUT_S = 330.0
_KSERVE = "/" + service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


class TritonConnection:
    """A Triton server reached over gRPC at `url` (host:port)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._control = triton_aio.InferenceServerClient(url)
        self._channel = open_channel(url)
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        # The KServe passthrough (kserve_servicer.py) leaves Triton's responses as bytes.
        self._infer_bytes = self._channel.unary_unary(
            f"{_KSERVE}/ModelInfer",
            request_serializer=service_pb2.ModelInferRequest.SerializeToString,
            response_deserializer=None,
        )
        self._stream_bytes = self._channel.stream_stream(
            f"{_KSERVE}/ModelStreamInfer",
            request_serializer=service_pb2.ModelInferRequest.SerializeToString,
            response_deserializer=None,
        )

    async def close(self) -> None:
        await self._control.close()
        await self._channel.close(None)

    async def wait_ready(self, timeout: float) -> None:
        async def ready() -> bool | None:
            return await self._control.is_server_ready() or None

        await poll_until(
            ready,
            timeout=timeout,
            interval=0.2,
            what=f"Triton at {self.url}",
            expected=(InferenceServerException,),
        )

    async def load_model(self, name: str) -> None:
        started = time.perf_counter()
        try:
            await self._control.load_model(name)
        except InferenceServerException as exc:
            raise RuntimeError(f"Triton could not load {name}: {exc}") from exc
        log.info("model loaded", model=name, seconds=round(time.perf_counter() - started, 2))

    async def unload_model(self, name: str) -> None:
        """Unloads `name` and returns once Triton has let go of it.

        Triton lets the requests in flight finish first, and its unload call returns
        before the model is gone: until its state leaves UNLOADING, its folder is in use
        (a Python backend's stub still runs from it) and a load of the same name races.
        """
        started = time.perf_counter()
        try:
            await self._control.unload_model(name)
        except InferenceServerException as exc:
            raise RuntimeError(f"Triton could not unload {name}: {exc}") from exc

        async def gone() -> bool | None:
            index = await self._control.get_model_repository_index()
            states = {entry.state for entry in index.models if entry.name == name}
            return True if not states & _IN_USE else None

        try:
            await poll_until(
                gone,
                timeout=_UNLOAD_TIMEOUT_S,
                interval=0.05,
                what=f"Triton to unload {name}",
                expected=(InferenceServerException,),
            )
        except TimeoutError as exc:
            raise RuntimeError(str(exc)) from exc
        log.info("model unloaded", model=name, seconds=round(time.perf_counter() - started, 2))

    async def ready_versions(self) -> dict[str, list[int]]:
        """Model name -> versions in state READY, from Triton's repository index."""
        index = await self._control.get_model_repository_index()
        ready: dict[str, list[int]] = {}
        for entry in index.models:
            if entry.state == "READY" and entry.version:
                ready.setdefault(entry.name, []).append(int(entry.version))
        return ready

    async def model_config(self, name: str, version: int) -> model_config_pb2.ModelConfig:
        response = await self._control.get_model_config(name, str(version))
        config: model_config_pb2.ModelConfig = response.config
        return config

    async def infer(
        self, request: service_pb2.ModelInferRequest, timeout: float | None
    ) -> service_pb2.ModelInferResponse:
        try:
            response: service_pb2.ModelInferResponse = await self._stub.ModelInfer(
                request, timeout=timeout
            )
        except grpc.aio.AioRpcError as exc:
            raise upstream_error(exc, f"model {_label(request)}") from exc
        return response

    async def infer_bytes(
        self, request: service_pb2.ModelInferRequest, timeout: float | None
    ) -> bytes:
        """ModelInfer with Triton's response left as it came (its tensors not parsed)."""
        try:
            response: bytes = await self._infer_bytes(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise upstream_error(exc, f"model {_label(request)}") from exc
        return response

    def open_stream(self, timeout: float | None) -> grpc.aio.StreamStreamCall[Any, bytes]:
        """A ModelStreamInfer call to write requests to (`write`, `done_writing`) and read
        Triton's responses from as bytes; the caller maps its errors and cancels it."""
        # No request iterator: the caller writes the requests itself.
        call: grpc.aio.StreamStreamCall[Any, bytes] = self._stream_bytes(  # type: ignore[call-arg]
            timeout=timeout
        )
        return call

    async def describe(self, method: str, request: Any, timeout: float | None) -> Any:
        """One of Triton's model description calls (ModelMetadata, ModelConfig,
        ModelStatistics), its errors mapped."""
        try:
            return await getattr(self._stub, method)(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise upstream_error(exc, f"Triton's {method}") from exc

    async def stream(
        self, request: service_pb2.ModelInferRequest, timeout: float | None
    ) -> AsyncIterator[service_pb2.ModelInferResponse]:
        """Streams a decoupled model's responses until Triton marks one final.

        Leaving the iteration early (the caller was cancelled, or stopped
        reading) cancels the gRPC stream, which cancels the request in Triton.
        """
        # Given as an iterable, the request is written and the stream half-closed
        # (Triton then ends it after the final response) by grpc in the background,
        # while this already waits for the first token: two round trips off the
        # time to first token.
        call = self._stub.ModelStreamInfer(iter((request,)), timeout=timeout)
        final = False
        try:
            async for message in call:
                if message.error_message:
                    raise UpstreamFailure(f"{_label(request)} failed: {message.error_message}")
                yield message.infer_response
                final = message.infer_response.parameters["triton_final_response"].bool_param
            if not final:
                raise UpstreamFailure(
                    f"{_label(request)} ended its stream without a final response"
                )
        except grpc.aio.AioRpcError as exc:
            raise upstream_error(exc, f"model {_label(request)}") from exc
        finally:
            if not call.done():
                call.cancel()


def _label(request: service_pb2.ModelInferRequest) -> str:
    return (
        f"{request.model_name}:{request.model_version}"
        if request.model_version
        else request.model_name
    )
