"""Bad input gets the status from the error contract, names what is wrong, kills nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from tensorgate import to_tensor
from tensorgate.gateway.v1 import gateway_pb2_grpc
from tensorgate.inference.v1 import inference_pb2

from gateway.server import SERVICE_NAME, Gateway
from services.worker.server import Worker
from tests.helpers import health_status


@pytest.fixture(scope="module")
async def stub(gateway: Gateway) -> AsyncIterator[gateway_pb2_grpc.InferenceGatewayAsyncStub]:
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        yield gateway_pb2_grpc.InferenceGatewayStub(channel)


async def _generate_error(
    stub: gateway_pb2_grpc.InferenceGatewayAsyncStub, **fields: object
) -> grpc.aio.AioRpcError:
    values: dict[str, object] = {"model": "tinylm", "prompt": "Hello", "max_tokens": 8}
    values.update(fields)
    call = stub.Generate(inference_pb2.GenerateRequest(**values))  # type: ignore[arg-type]
    with pytest.raises(grpc.aio.AioRpcError) as error:
        async for _ in call:
            pass
    return error.value


def _bad_field(error: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "INVALID_ARGUMENT must carry a google.rpc.BadRequest detail"
    bad_request = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad_request)
    field: str = bad_request.field_violations[0].field
    return field


@pytest.mark.parametrize(
    ("model", "named"),
    [("nosuchmodel", "'nosuchmodel'"), ("tinylm:7", "no version 7"), ("tinylm@prod", "prod")],
)
async def test_unknown_model_version_or_alias_is_not_found(
    stub: gateway_pb2_grpc.InferenceGatewayAsyncStub, model: str, named: str
) -> None:
    error = await _generate_error(stub, model=model)
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert named in (error.details() or "")
    # What else is served is not listed (it could name models the key may not call).
    assert "digits" not in (error.details() or "")


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -5}, "max_tokens"),
        ({"max_tokens": 100_000}, "max_tokens"),
        ({"temperature": -0.5}, "temperature"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "x" * 5000}, "prompt"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"model": ""}, "model"),
        ({"model": "digits"}, "model"),
    ],
)
async def test_bad_generate_fields_are_invalid_argument_naming_the_field(
    stub: gateway_pb2_grpc.InferenceGatewayAsyncStub, fields: dict[str, object], field: str
) -> None:
    error = await _generate_error(stub, **fields)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (error.details() or "").startswith(f"{field}:")
    assert _bad_field(error) == field


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ([to_tensor("image", np.zeros((2, 64), np.float64))], "must be FP32"),
        ([to_tensor("image", np.zeros((2, 10), np.float32))], "must be [N, 64]"),
        ([to_tensor("pixels", np.zeros((1, 64), np.float32))], "no input 'pixels'"),
        ([], "needs input(s) image"),
    ],
)
async def test_bad_tensors_are_invalid_argument(
    stub: gateway_pb2_grpc.InferenceGatewayAsyncStub,
    inputs: list[inference_pb2.Tensor],
    message: str,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stub.Infer(inference_pb2.InferRequest(model="digits", inputs=inputs))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (error.value.details() or "")


async def test_infer_on_a_streaming_model_is_refused(
    stub: gateway_pb2_grpc.InferenceGatewayAsyncStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stub.Infer(inference_pb2.InferRequest(model="tinylm"))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "call Generate" in (error.value.details() or "")


async def test_garbage_bytes_do_not_crash_the_gateway(gateway: Gateway) -> None:
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        raw = channel.unary_unary(f"/{SERVICE_NAME}/Infer", None, None)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await raw(b"\xff\xff\xff\xff not a protobuf")
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (error.value.details() or "").startswith("request: is not a valid message")


async def test_every_service_still_serves_after_bad_input(
    gateway: Gateway, worker: Worker, stub: gateway_pb2_grpc.InferenceGatewayAsyncStub
) -> None:
    assert await health_status(gateway.address) == "SERVING"
    assert await health_status(worker.address) == "SERVING"
    chunks = [
        c
        async for c in stub.Generate(
            inference_pb2.GenerateRequest(model="tinylm", prompt="Hi", max_tokens=3)
        )
    ]
    assert chunks[-1].finish_reason in {
        inference_pb2.FINISH_REASON_LENGTH,
        inference_pb2.FINISH_REASON_EOS,
        inference_pb2.FINISH_REASON_STOP,
    }
    assert chunks[-1].usage.completion_tokens == sum(len(c.token_ids) for c in chunks)


@pytest.mark.parametrize("model", ["tinylm:\u00b2", "tinylm:\u0661", "tinylm\n", "x" * 20_000])
async def test_odd_model_refs_are_invalid_argument_with_a_short_message(
    stub: gateway_pb2_grpc.InferenceGatewayAsyncStub, model: str
) -> None:
    error = await _generate_error(stub, model=model)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(error.details() or "") < 200


async def test_a_tiny_temperature_is_near_greedy_not_an_error(
    stub: gateway_pb2_grpc.InferenceGatewayAsyncStub,
) -> None:
    def request(temperature: float) -> inference_pb2.GenerateRequest:
        return inference_pb2.GenerateRequest(
            model="tinylm", prompt="ROMEO:", max_tokens=20, temperature=temperature
        )

    tiny = [c async for c in stub.Generate(request(1e-40))]
    greedy = [c async for c in stub.Generate(request(0.0))]
    # Chunk boundaries may differ (tokens of a fast stream can share a chunk); tokens not.
    assert [t for c in tiny for t in c.token_ids] == [t for c in greedy for t in c.token_ids]


async def test_an_unknown_output_is_invalid_argument_and_a_known_one_is_returned_alone(
    stub: gateway_pb2_grpc.InferenceGatewayAsyncStub,
) -> None:
    image = to_tensor("image", np.zeros((1, 64), np.float32))
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stub.Infer(inference_pb2.InferRequest(model="digits", inputs=[image], outputs=["x"]))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "has no output 'x' (outputs: label, probabilities)" in (error.value.details() or "")
    response = await stub.Infer(
        inference_pb2.InferRequest(model="digits", inputs=[image], outputs=["label"])
    )
    assert [t.name for t in response.outputs] == ["label"]


async def test_an_input_given_twice_is_invalid_argument_in_our_words(
    stub: gateway_pb2_grpc.InferenceGatewayAsyncStub,
) -> None:
    image = to_tensor("image", np.zeros((1, 64), np.float32))
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stub.Infer(inference_pb2.InferRequest(model="digits", inputs=[image, image]))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details() == "inputs: each input may be given once: image"
