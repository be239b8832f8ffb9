"""What the gateway and the worker share to pass the KServe v2 protocol through.

Both serve `inference.GRPCInferenceService` from tritonclient's generated modules (one
compiled copy of grpc_service.proto per process; a second would clash in the descriptor
pool). A call names a model the KServe way, `model_name` plus `model_version`; the
gateway reads that as a tensorgate model reference (`digits`, `digits` + version "3",
`digits@production`), and each hop rewrites only the name and version: the gateway to the
version it routed, the worker to what its Triton has loaded (`digits__v3` in registry
mode), and back on the way out.

Responses are passed on as bytes. The worker renames a response by appending the
name and version fields to its bytes: a protobuf parser keeps the last value of a
singular field and merges repeated occurrences of a message field, so the appended
fields win without the response (and its tensors) being parsed and encoded again.
"""

from __future__ import annotations

from typing import Any

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from services.runtime.errors import InvalidArgument, Unimplemented, shown

SERVICE = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
Context = grpc.aio.ServicerContext[Any, Any]


def model_ref(name: str, version: str, field: str = "model_name") -> str:
    """The tensorgate model reference a KServe (name, version) pair means."""
    if not name:
        raise InvalidArgument(field, "is required: a model name, or name@alias")
    if not version:
        return name
    # ASCII only: str.isdigit() also takes digits int() refuses ("²"), a bug's INTERNAL.
    if not (version.isascii() and version.isdigit()) or int(version) < 1 or len(version) > 18:
        raise InvalidArgument("model_version", f"must be a positive integer, got {shown(version)}")
    if "@" in name or ":" in name:
        raise InvalidArgument(
            "model_version",
            f"is given, so {field} must be a plain model name, not {shown(name)}",
        )
    return f"{name}:{version}"


class ResponseNames:
    """The bytes that rename a passed-on response, made once per model version."""

    __slots__ = ("infer", "stream")

    def __init__(self, name: str, version: str) -> None:
        renamed = service_pb2.ModelInferResponse(model_name=name, model_version=version)
        self.infer = renamed.SerializeToString()
        # In a stream response the infer response is field 2; a second occurrence of a
        # message field is merged into the first.
        self.stream = service_pb2.ModelStreamInferResponse(
            infer_response=renamed
        ).SerializeToString()


_REPOSITORY = (
    "model repository calls are not offered here: models are registered and deployed "
    "through the tensorgate registry (tensorgate models deploy NAME@ALIAS), and the "
    "workers load them"
)
_SHARED_MEMORY = (
    "shared-memory calls are not offered here: the server is not on the caller's host; "
    "send tensors in the request (raw_input_contents)"
)


class RefusedCalls(service_pb2_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    """The KServe calls tensorgate does not offer, each refused with UNIMPLEMENTED and
    what to do instead (the generated base class would fail with no explanation)."""

    async def RepositoryIndex(self, request: Any, context: Context) -> Any:
        raise Unimplemented(_REPOSITORY)

    async def RepositoryModelLoad(self, request: Any, context: Context) -> Any:
        raise Unimplemented(_REPOSITORY)

    async def RepositoryModelUnload(self, request: Any, context: Context) -> Any:
        raise Unimplemented(_REPOSITORY)

    async def SystemSharedMemoryStatus(self, request: Any, context: Context) -> Any:
        raise Unimplemented(_SHARED_MEMORY)

    async def SystemSharedMemoryRegister(self, request: Any, context: Context) -> Any:
        raise Unimplemented(_SHARED_MEMORY)

    async def SystemSharedMemoryUnregister(self, request: Any, context: Context) -> Any:
        raise Unimplemented(_SHARED_MEMORY)

    async def CudaSharedMemoryStatus(self, request: Any, context: Context) -> Any:
        raise Unimplemented(_SHARED_MEMORY)

    async def CudaSharedMemoryRegister(self, request: Any, context: Context) -> Any:
        raise Unimplemented(_SHARED_MEMORY)

    async def CudaSharedMemoryUnregister(self, request: Any, context: Context) -> Any:
        raise Unimplemented(_SHARED_MEMORY)

    async def TraceSetting(self, request: Any, context: Context) -> Any:
        raise Unimplemented("trace settings are not offered here; the metrics endpoint is")

    async def LogSettings(self, request: Any, context: Context) -> Any:
        raise Unimplemented("log settings are not offered here; services log to stdout")
