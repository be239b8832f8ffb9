"""InferenceWorker: forwards Generate and Infer to this worker's Triton, and says what it has."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from tensorgate.inference.v1 import inference_pb2
from tensorgate.worker.v1 import worker_pb2_grpc

from services.runtime import calls
from services.runtime.errors import InvalidArgument, shown
from services.runtime.streams import ready_batches
from services.worker.catalog import ModelCatalog
from services.worker.generation import check_generate, to_chunk, to_triton_stream_request
from services.worker.tensors import check_input, from_triton_response, to_triton_request
from services.worker.triton_client import TritonConnection

Context = grpc.aio.ServicerContext[Any, Any]


class InferenceWorkerServicer(worker_pb2_grpc.InferenceWorkerServicer):
    def __init__(
        self, catalog: ModelCatalog, triton: TritonConnection, *, stream_linger: float = 0.0
    ) -> None:
        self._catalog = catalog
        self._triton = triton
        self._stream_linger = stream_linger

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: Context
    ) -> AsyncIterator[inference_pb2.GenerateChunk]:
        model = self._catalog.resolve(request.model)
        check_generate(model, request)
        triton_request = to_triton_stream_request(model, request)
        last: inference_pb2.GenerateChunk | None = None
        # The first token goes out at once; later ones of a fast stream may share a
        # chunk (streams.py says when), which saves a message's CPU on every hop.
        responses_of = ready_batches(
            self._triton.stream(triton_request, calls.remaining()), linger=self._stream_linger
        )
        async for responses in responses_of:
            last = to_chunk(model.label, responses)
            yield last
        calls.note(resolved=model.label)
        if last is not None:
            calls.note(finish_reason=inference_pb2.FinishReason.Name(last.finish_reason))
            calls.note_usage(last.usage.prompt_tokens, last.usage.completion_tokens)

    async def Infer(
        self, request: inference_pb2.InferRequest, context: Context
    ) -> inference_pb2.InferResponse:
        model = self._catalog.resolve(request.model)
        if model.decoupled:
            raise InvalidArgument(
                "model",
                f"{model.label} is a {model.info.task!r} model that streams; call Generate for it",
            )
        given = {t.name for t in request.inputs}
        if len(given) != len(request.inputs):
            names = [t.name for t in request.inputs]
            twice = sorted({n for n in names if names.count(n) > 1})
            raise InvalidArgument("inputs", f"each input may be given once: {', '.join(twice)}")
        for index, tensor in enumerate(request.inputs):
            spec = model.input_spec(tensor.name)
            if spec is None:
                known = ", ".join(s.name for s in model.info.inputs)
                raise InvalidArgument(
                    f"inputs[{index}]",
                    f"{model.label} has no input {shown(tensor.name)} (inputs: {known})",
                )
            check_input(tensor, spec, model.info.max_batch_size, f"inputs[{index}]")
        missing = [s.name for s in model.info.inputs if not s.optional and s.name not in given]
        if missing:
            raise InvalidArgument("inputs", f"{model.label} needs input(s) {', '.join(missing)}")
        for name in request.outputs:
            if name not in model.output_names:
                raise InvalidArgument(
                    "outputs",
                    f"{model.label} has no output {shown(name)} "
                    f"(outputs: {', '.join(sorted(model.output_names))})",
                )
        calls.note(resolved=model.label)
        triton_request = to_triton_request(model.triton_name, model.triton_version, request)
        response = await self._triton.infer(triton_request, calls.remaining())
        return from_triton_response(model.label, response)

    async def ListModels(
        self, request: inference_pb2.ListModelsRequest, context: Context
    ) -> inference_pb2.ListModelsResponse:
        return inference_pb2.ListModelsResponse(models=[m.info for m in self._catalog.models()])

    async def WatchModels(
        self, request: inference_pb2.ListModelsRequest, context: Context
    ) -> AsyncIterator[inference_pb2.ListModelsResponse]:
        # Until the caller goes away (or the worker shuts down); each message is the
        # whole list, the latest one only, however many changes happened meanwhile.
        async for models in self._catalog.watch():
            yield inference_pb2.ListModelsResponse(models=[m.info for m in models])
