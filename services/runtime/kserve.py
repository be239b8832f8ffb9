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
singular field, so the appended fields win without the response (and its tensors) being
parsed and encoded again. A stream response's names go inside its `infer_response`
field, not after it as a second occurrence: protobufjs (@grpc/proto-loader, Node)
replaces a repeated message field instead of merging it, and would keep only the names.
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


def _varint(data: bytes, at: int) -> tuple[int, int]:
    """The varint at `at` in `data`, and where it ends (IndexError when cut short)."""
    value = shift = 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7


def _as_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


# ModelStreamInferResponse.infer_response: field 2, length-delimited.
_INFER_RESPONSE_TAG = 2 << 3 | 2


class ResponseNames:
    """The bytes that rename a passed-on response, made once per model version."""

    __slots__ = ("infer", "stream")

    def __init__(self, name: str, version: str) -> None:
        renamed = service_pb2.ModelInferResponse(model_name=name, model_version=version)
        self.infer: bytes = renamed.SerializeToString()
        # A stream response with no infer_response (an error only) gets one with the names.
        self.stream: bytes = service_pb2.ModelStreamInferResponse(
            infer_response=renamed
        ).SerializeToString()

    def rename_stream(self, response: bytes) -> bytes:
        """A ModelStreamInferResponse's bytes with the names appended inside its (last)
        infer_response field: only its top-level field headers are read."""
        found: tuple[int, int, int] | None = None  # tag start, payload start and end
        at, size = 0, len(response)
        try:
            while at < size:
                start = at
                tag, at = _varint(response, at)
                kind = tag & 7
                if kind == 0:
                    _, at = _varint(response, at)
                elif kind == 2:
                    length, at = _varint(response, at)
                    if tag == _INFER_RESPONSE_TAG:
                        found = (start, at, at + length)
                    at += length
                elif kind in (1, 5):
                    at += 8 if kind == 1 else 4
                else:
                    return response + self.stream  # groups: not in this message
        except IndexError:
            found = None
        if found is None or at != size:  # none, or cut short: the receiver's parser says so
            return response + self.stream
        start, payload, end = found
        view = memoryview(response)
        return b"".join(
            (
                view[:start],
                _as_varint(_INFER_RESPONSE_TAG),
                _as_varint(end - payload + len(self.infer)),
                view[payload:end],
                self.infer,
                view[end:],
            )
        )


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
