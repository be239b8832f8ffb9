"""The worker against the real bundled Triton: what it loaded, unary and streamed calls."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest
from sklearn.datasets import load_digits
from tensorgate import from_tensor, to_tensor
from tensorgate.inference.v1 import inference_pb2
from tensorgate.worker.v1 import worker_pb2_grpc

from services.worker.server import SERVICE_NAME, Worker
from tests.helpers import health_status


@pytest.fixture(scope="module")
async def stub(worker: Worker) -> AsyncIterator[worker_pb2_grpc.InferenceWorkerAsyncStub]:
    async with grpc.aio.insecure_channel(worker.address) as channel:
        yield worker_pb2_grpc.InferenceWorkerStub(channel)


async def test_lists_what_triton_loaded(stub: worker_pb2_grpc.InferenceWorkerAsyncStub) -> None:
    listing = await stub.ListModels(inference_pb2.ListModelsRequest())
    models = {(m.name, m.version): m for m in listing.models}
    tinylm, digits = models[("tinylm", 1)], models[("digits", 1)]
    assert tinylm.task == "generate" and tinylm.context_length > 0
    assert {s.name for s in tinylm.inputs} >= {"prompt", "max_tokens", "temperature"}
    assert digits.task == "infer" and digits.max_batch_size > 0
    assert [(s.name, s.datatype, list(s.shape)) for s in digits.inputs] == [("image", "FP32", [64])]


async def test_digits_classifier_is_accurate_through_triton(
    stub: worker_pb2_grpc.InferenceWorkerAsyncStub,
) -> None:
    data = load_digits()
    predicted = []
    for start in range(0, len(data.data), 64):
        batch = data.data[start : start + 64].astype(np.float32)
        response = await stub.Infer(
            inference_pb2.InferRequest(model="digits", inputs=[to_tensor("image", batch)])
        )
        outputs = {t.name: from_tensor(t) for t in response.outputs}
        assert outputs["probabilities"].shape == (len(batch), 10)
        np.testing.assert_allclose(outputs["probabilities"].sum(axis=1), 1.0, rtol=1e-4)
        predicted.extend(outputs["label"].ravel().tolist())
    accuracy = float(np.mean(np.asarray(predicted) == data.target))
    assert accuracy > 0.95, accuracy


async def test_generate_streams_from_the_decoupled_model(
    stub: worker_pb2_grpc.InferenceWorkerAsyncStub,
) -> None:
    request = inference_pb2.GenerateRequest(model="tinylm:1", prompt="KING:", max_tokens=16, seed=5)
    chunks = [chunk async for chunk in stub.Generate(request)]
    assert len(chunks) > 1
    assert all(c.model == "tinylm:1" for c in chunks)
    assert chunks[-1].usage.completion_tokens == sum(len(c.token_ids) for c in chunks)


async def test_worker_reports_serving(worker: Worker) -> None:
    assert await health_status(worker.address) == "SERVING"
    assert await health_status(worker.address, SERVICE_NAME) == "SERVING"
