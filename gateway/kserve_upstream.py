"""The KServe v2 calls to one worker, over the worker's one long-lived channel.

Made once per worker (not per call) and dropped with it. Inference responses and the
model descriptions stay bytes: the worker already named the model as callers know it,
and the gateway passes them on as they came. Statistics are parsed, since a call for
every model gathers them from several workers.
"""

from __future__ import annotations

import weakref
from typing import Any

import grpc
from tritonclient.grpc import service_pb2

from gateway.worker_pool import WorkerEndpoint
from services.runtime.kserve import SERVICE

_SERIALIZE = {
    "ModelInfer": service_pb2.ModelInferRequest.SerializeToString,
    "ModelMetadata": service_pb2.ModelMetadataRequest.SerializeToString,
    "ModelConfig": service_pb2.ModelConfigRequest.SerializeToString,
    "ModelStatistics": service_pb2.ModelStatisticsRequest.SerializeToString,
}


class KServeUpstream:
    """One worker's KServe v2 service."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        def unary(method: str, parse: Any = None) -> Any:
            return channel.unary_unary(
                f"/{SERVICE}/{method}",
                request_serializer=_SERIALIZE[method],
                response_deserializer=parse,
                _registered_method=True,  # type: ignore[call-arg]  # grpc-stubs predates it
            )

        self.infer = unary("ModelInfer")
        self.metadata = unary("ModelMetadata")
        self.config = unary("ModelConfig")
        self.statistics = unary("ModelStatistics", service_pb2.ModelStatisticsResponse.FromString)
        self.stream = channel.stream_stream(
            f"/{SERVICE}/ModelStreamInfer",
            request_serializer=service_pb2.ModelInferRequest.SerializeToString,
            response_deserializer=None,
            _registered_method=True,  # type: ignore[call-arg]
        )


class KServeUpstreams:
    """Each worker's `KServeUpstream`, made on its first KServe call."""

    def __init__(self) -> None:
        # Weak: a worker that leaves the pool takes its entry with it.
        self._by_worker: weakref.WeakKeyDictionary[WorkerEndpoint, KServeUpstream] = (
            weakref.WeakKeyDictionary()
        )

    def of(self, worker: WorkerEndpoint) -> KServeUpstream:
        upstream = self._by_worker.get(worker)
        if upstream is None:
            upstream = self._by_worker[worker] = KServeUpstream(worker.channel)
        return upstream
