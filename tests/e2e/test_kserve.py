"""tritonclient (sync and asyncio) against the gateway's KServe v2 front door, with a key.

One gateway for the module, in front of the registry-driven worker (whose Triton names
each version `name__vN`, so the renaming on the way is exercised), checking keys with the
session's auth service and resolving aliases with its registry.
"""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton_sync
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from gateway.server import Gateway
from services.runtime.logging import flush_logs
from tests.auth_helpers import admin_at, bearer, digits_image, quota, settled_usage
from tests.conftest import AuthStack, RegistryStack, start_auth_gateway
from tests.helpers import metric_value, scrape

pytestmark = pytest.mark.integration

PROMPT = "ROMEO:"


@dataclass
class Front:
    gateway: Gateway
    key: str
    headers: dict[str, str]

    @property
    def url(self) -> str:
        return self.gateway.address


@pytest.fixture(scope="module")
async def front(auth_stack: AuthStack, registry_stack: RegistryStack) -> AsyncIterator[Front]:
    gateway = await start_auth_gateway(
        auth_stack.auth.address,
        registry_stack.worker,
        registry=registry_stack.registry.address,
    )
    try:
        async with admin_at(auth_stack.gateway.address, auth_stack.admin_key) as admin:
            tenant = await admin.tenant("kserve")
            key = (await admin.new_key(tenant)).secret
        yield Front(gateway, key, {"authorization": f"Bearer {key}"})
    finally:
        await gateway.stop()


def digits_inputs(module: Any) -> list[Any]:
    image = digits_image()
    tensor = module.InferInput("image", list(image.shape), "FP32")
    tensor.set_data_from_numpy(image)
    return [tensor]


def tinylm_inputs(module: Any, prompt: str = PROMPT, max_tokens: int = 8) -> list[Any]:
    values: list[tuple[str, str, Any]] = [
        ("prompt", "BYTES", np.array([prompt.encode()], dtype=np.object_)),
        ("max_tokens", "INT32", np.array([max_tokens], dtype=np.int32)),
        ("temperature", "FP32", np.array([0.0], dtype=np.float32)),
        ("top_p", "FP32", np.array([1.0], dtype=np.float32)),
        ("top_k", "INT32", np.array([0], dtype=np.int32)),
    ]
    inputs = []
    for name, datatype, array in values:
        tensor = module.InferInput(name, [1], datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


@pytest.fixture
async def client(front: Front) -> AsyncIterator[triton_aio.InferenceServerClient]:
    connected = triton_aio.InferenceServerClient(front.url)
    try:
        yield connected
    finally:
        await connected.close()


async def test_server_calls(front: Front, client: triton_aio.InferenceServerClient) -> None:
    assert await client.is_server_live(headers=front.headers)
    assert await client.is_server_ready(headers=front.headers)
    metadata = await client.get_server_metadata(headers=front.headers, as_json=True)
    assert metadata["name"] == "tensorgate"
    assert await client.is_model_ready("digits", headers=front.headers)
    assert await client.is_model_ready("digits", "1", headers=front.headers)
    assert not await client.is_model_ready("digits", "99", headers=front.headers)


async def test_model_metadata_and_config(
    front: Front, client: triton_aio.InferenceServerClient
) -> None:
    metadata = await client.get_model_metadata("digits@production", headers=front.headers)
    # Named as callers know it, not as the worker's Triton does (digits__v1).
    assert metadata.name == "digits"
    assert list(metadata.versions) == ["1"]
    assert [t.name for t in metadata.inputs] == ["image"]
    assert {t.name for t in metadata.outputs} == {"probabilities", "label"}
    config = (await client.get_model_config("digits", "1", headers=front.headers)).config
    assert config.name == "digits"
    assert config.max_batch_size == 64
    tinylm = (await client.get_model_config("tinylm", headers=front.headers)).config
    assert tinylm.model_transaction_policy.decoupled


@pytest.mark.parametrize(
    ("name", "version"), [("digits", ""), ("digits", "1"), ("digits@production", "")]
)
async def test_model_infer_asyncio(
    front: Front, client: triton_aio.InferenceServerClient, name: str, version: str
) -> None:
    result = await client.infer(
        name, digits_inputs(triton_aio), model_version=version, headers=front.headers
    )
    assert result.as_numpy("label").reshape(-1).tolist() == [0, 1, 2, 3]
    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (4, 10)
    response = result.get_response()
    assert (response.model_name, response.model_version) == ("digits", "1")


async def test_model_infer_sync(front: Front) -> None:
    def call() -> tuple[list[int], str, list[str]]:
        with triton_sync.InferenceServerClient(front.url) as client:
            assert client.is_server_live(headers=front.headers)
            result = client.infer(
                "digits", digits_inputs(triton_sync), model_version="1", headers=front.headers
            )
            versions = client.get_model_metadata("digits@production", headers=front.headers)
            return (
                result.as_numpy("label").reshape(-1).tolist(),
                result.get_response().model_name,
                list(versions.versions),
            )

    labels, name, versions = await asyncio.to_thread(call)
    assert (labels, name, versions) == ([0, 1, 2, 3], "digits", ["1"])


async def test_stream_infer_asyncio(front: Front, client: triton_aio.InferenceServerClient) -> None:
    async def requests() -> AsyncIterator[dict[str, Any]]:
        yield {
            "model_name": "tinylm@production",
            "inputs": tinylm_inputs(triton_aio, max_tokens=8),
            "request_id": "r1",
        }

    tokens: list[int] = []
    finals = []
    responses = client.stream_infer(requests(), headers=front.headers)
    async for result, error in responses:
        assert error is None, error
        response = result.get_response()
        assert response.model_name == "tinylm"
        tokens.extend(result.as_numpy("token_ids").tolist())
        final = response.parameters["triton_final_response"].bool_param
        finals.append(final)
        if final:
            completion = int(result.as_numpy("completion_tokens")[0])
            prompt_tokens = int(result.as_numpy("prompt_tokens")[0])
            break
    assert finals[-1] and not any(finals[:-1])
    assert completion == len(tokens) and 1 <= completion <= 8
    assert prompt_tokens == len(PROMPT)


async def test_stream_infer_sync(front: Front) -> None:
    def call() -> list[tuple[int, bool]]:
        received: list[tuple[int, bool]] = []
        done = __import__("threading").Event()

        def callback(result: Any, error: Any) -> None:
            if error is not None:
                received.append((-1, True))
                done.set()
                return
            response = result.get_response()
            final = response.parameters["triton_final_response"].bool_param
            received.append((len(result.as_numpy("token_ids")), final))
            if final:
                done.set()

        with triton_sync.InferenceServerClient(front.url) as client:
            client.start_stream(callback, headers=front.headers)
            client.async_stream_infer("tinylm", tinylm_inputs(triton_sync, max_tokens=5))
            assert done.wait(60)
            client.stop_stream()
        return received

    received = await asyncio.to_thread(call)
    assert received[-1][1] and all(n >= 0 for n, _ in received)
    assert 1 <= sum(n for n, _ in received) <= 5


async def test_model_statistics(front: Front, client: triton_aio.InferenceServerClient) -> None:
    await client.infer("digits", digits_inputs(triton_aio), headers=front.headers)
    stats = await client.get_inference_statistics("digits", headers=front.headers)
    (entry,) = stats.model_stats
    assert (entry.name, entry.version) == ("digits", "1")
    assert entry.inference_count >= 1
    every = await client.get_inference_statistics(headers=front.headers)
    assert {"digits", "tinylm"} <= {s.name for s in every.model_stats}


async def test_refused_without_a_key(
    front: Front, client: triton_aio.InferenceServerClient
) -> None:
    with pytest.raises(InferenceServerException) as refused:
        await client.infer("digits", digits_inputs(triton_aio))
    assert refused.value.status() == "StatusCode.UNAUTHENTICATED"
    with pytest.raises(InferenceServerException) as refused:
        await client.is_server_live(headers={"authorization": "Bearer tg_not-a-key"})
    assert refused.value.status() == "StatusCode.UNAUTHENTICATED"


async def test_unknown_model_and_bad_version(
    front: Front, client: triton_aio.InferenceServerClient
) -> None:
    with pytest.raises(InferenceServerException) as refused:
        await client.infer("nosuchmodel", digits_inputs(triton_aio), headers=front.headers)
    assert refused.value.status() == "StatusCode.NOT_FOUND"
    assert "nosuchmodel" in str(refused.value)
    with pytest.raises(InferenceServerException) as refused:
        await client.get_model_metadata("digits", "x", headers=front.headers)
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
    # A decoupled model over unary ModelInfer: told to stream.
    with pytest.raises(InferenceServerException) as refused:
        await client.infer("tinylm", tinylm_inputs(triton_aio), headers=front.headers)
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "ModelStreamInfer" in str(refused.value)


async def test_over_quota(front: Front, auth_stack: AuthStack) -> None:
    async with admin_at(auth_stack.gateway.address, auth_stack.admin_key) as admin:
        tenant = await admin.tenant("kserve-q")
        created = await admin.new_key(tenant, limits=quota(requests_per_minute=2))
    headers = {"authorization": f"Bearer {created.secret}"}
    client = triton_aio.InferenceServerClient(front.url)
    try:
        for _ in range(2):
            await client.infer("digits", digits_inputs(triton_aio), headers=headers)
        with pytest.raises(InferenceServerException) as refused:
            await client.infer("digits", digits_inputs(triton_aio), headers=headers)
        assert refused.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        assert "requests" in str(refused.value)

        async def requests() -> AsyncIterator[dict[str, Any]]:
            yield {"model_name": "tinylm", "inputs": tinylm_inputs(triton_aio)}

        # tritonclient's asyncio stream raises the stream's status as grpc's own error.
        with pytest.raises(grpc.aio.AioRpcError) as cut:
            async for _, error in client.stream_infer(requests(), headers=headers):
                raise AssertionError(f"the stream over quota was answered: {error}")
        assert cut.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        await client.close()


async def test_key_scope_is_checked(front: Front, auth_stack: AuthStack) -> None:
    async with admin_at(auth_stack.gateway.address, auth_stack.admin_key) as admin:
        tenant = await admin.tenant("kserve-scope")
        created = await admin.new_key(tenant, models=("tinylm",))
    headers = {"authorization": f"Bearer {created.secret}"}
    client = triton_aio.InferenceServerClient(front.url)
    try:
        for call in (
            client.infer("digits", digits_inputs(triton_aio), headers=headers),
            client.get_model_metadata("digits", headers=headers),
        ):
            with pytest.raises(InferenceServerException) as refused:
                await call
            assert refused.value.status() == "StatusCode.PERMISSION_DENIED"
        every = await client.get_inference_statistics(headers=headers)
        assert {s.name for s in every.model_stats} == {"tinylm"}
    finally:
        await client.close()


async def test_repository_and_shared_memory_refused(front: Front) -> None:
    async with grpc.aio.insecure_channel(front.url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        calls: list[tuple[Any, Any]] = [
            (stub.RepositoryIndex, service_pb2.RepositoryIndexRequest()),
            (stub.RepositoryModelLoad, service_pb2.RepositoryModelLoadRequest(model_name="x")),
            (stub.RepositoryModelUnload, service_pb2.RepositoryModelUnloadRequest(model_name="x")),
            (stub.SystemSharedMemoryStatus, service_pb2.SystemSharedMemoryStatusRequest()),
            (stub.SystemSharedMemoryRegister, service_pb2.SystemSharedMemoryRegisterRequest()),
            (stub.CudaSharedMemoryRegister, service_pb2.CudaSharedMemoryRegisterRequest()),
        ]
        for method, request in calls:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await method(request, metadata=bearer(front.key), timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
            assert "not offered" in (refused.value.details() or "")


@pytest.mark.parametrize("outputs", [(), ("token_ids",)])
async def test_stream_tokens_count_against_the_quota(
    front: Front, auth_stack: AuthStack, outputs: tuple[str, ...]
) -> None:
    # Each stream request reserves its prompt (6) plus max_tokens (8), and settles with what
    # it used (at most that): a second such request does not fit 20 tokens a minute. Asking
    # only for the tokens (not the usage outputs) is counted all the same.
    async with admin_at(auth_stack.gateway.address, auth_stack.admin_key) as admin:
        tenant = await admin.tenant("kserve-tokens")
        created = await admin.new_key(tenant, limits=quota(tokens_per_minute=20))
    headers = {"authorization": f"Bearer {created.secret}"}
    client = triton_aio.InferenceServerClient(front.url)

    async def requests() -> AsyncIterator[dict[str, Any]]:
        yield {
            "model_name": "tinylm",
            "inputs": tinylm_inputs(triton_aio, max_tokens=8),
            "outputs": [triton_aio.InferRequestedOutput(name) for name in outputs] or None,
        }

    try:
        async for result, error in client.stream_infer(requests(), headers=headers):
            assert error is None, error
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
        with pytest.raises(grpc.aio.AioRpcError) as cut:
            async for _, error in client.stream_infer(requests(), headers=headers):
                raise AssertionError(f"the stream over its token quota was answered: {error}")
        assert cut.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "tokens" in (cut.value.details() or "")
    finally:
        await client.close()


def _stream_request(model: str, *, prompt: str = PROMPT, max_tokens: int = 4) -> Any:
    """A greedy tinylm request as raw KServe v2 (BYTES: each element after its length)."""
    request = service_pb2.ModelInferRequest(model_name=model)
    raw = {
        "prompt": ("BYTES", struct.pack("<I", len(prompt.encode())) + prompt.encode()),
        "max_tokens": ("INT32", struct.pack("<i", max_tokens)),
        "temperature": ("FP32", struct.pack("<f", 0.0)),
        "top_p": ("FP32", struct.pack("<f", 1.0)),
        "top_k": ("INT32", struct.pack("<i", 0)),
    }
    for name, (datatype, contents) in raw.items():
        request.inputs.add(name=name, datatype=datatype, shape=[1])
        request.raw_input_contents.append(contents)
    return request


async def test_a_stream_serves_one_model(front: Front) -> None:
    async with grpc.aio.insecure_channel(front.url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        call = stub.ModelStreamInfer(metadata=bearer(front.key), timeout=60)
        await call.write(_stream_request("tinylm"))
        await call.write(_stream_request("digits"))
        await call.done_writing()
        finals = 0
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for message in call:
                assert not message.error_message
                finals += message.infer_response.parameters["triton_final_response"].bool_param
        # The request before the refused one was answered in full first.
        assert finals == 1
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "tinylm" in (refused.value.details() or "")


async def test_bad_requests_are_refused(front: Front) -> None:
    async with grpc.aio.insecure_channel(front.url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        garbage = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer", None, None)
        bad: list[Any] = [
            garbage(b"\xff\xff\xff", metadata=bearer(front.key), timeout=10),
            stub.ModelInfer(
                service_pb2.ModelInferRequest(model_name="digits", model_version="0"),
                metadata=bearer(front.key),
                timeout=10,
            ),
            stub.ModelInfer(
                service_pb2.ModelInferRequest(model_name="digits@production", model_version="1"),
                metadata=bearer(front.key),
                timeout=10,
            ),
            # No inputs: Triton's own words on what is missing come back.
            stub.ModelInfer(
                service_pb2.ModelInferRequest(model_name="digits"),
                metadata=bearer(front.key),
                timeout=10,
            ),
        ]
        for call in bad:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value
        # The gateway still serves.
        ready = await stub.ServerReady(
            service_pb2.ServerReadyRequest(), metadata=bearer(front.key), timeout=10
        )
        assert ready.ready


STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"


async def test_cancelled_stream_stops_in_triton_and_is_logged_and_counted(
    front: Front, registry_stack: RegistryStack, capsys: pytest.CaptureFixture[str]
) -> None:
    bundled = registry_stack.worker.bundled
    endpoint = front.gateway.service.metrics_endpoint
    assert bundled is not None and endpoint is not None
    gateway_metrics = f"http://127.0.0.1:{endpoint.port}/metrics"

    async def counts() -> tuple[float, float]:
        triton = await scrape(bundled.metrics_url)
        gateway = await scrape(gateway_metrics)
        return (
            metric_value(triton, "tinylm_requests_finished_total", finish_reason="cancelled"),
            metric_value(gateway, "tensorgate_rpc_requests_total", method=STREAM, code="CANCELLED"),
        )

    triton_before, gateway_before = await counts()
    capsys.readouterr()
    async with grpc.aio.insecure_channel(front.url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        call = stub.ModelStreamInfer(metadata=bearer(front.key), timeout=60)
        await call.write(_stream_request("tinylm", max_tokens=240))
        received = 0
        async for _ in call:
            received += 1
            if received == 3:
                break
        call.cancel()

    # The model polls for cancellation between tokens: wait until it has seen it.
    for _ in range(100):
        triton_after, gateway_after = await counts()
        if triton_after > triton_before and gateway_after > gateway_before:
            break
        await asyncio.sleep(0.1)
    assert (triton_after, gateway_after) == (triton_before + 1, gateway_before + 1)

    flush_logs()
    out = capsys.readouterr().out
    assert front.key not in out
    logs = [json.loads(line) for line in out.splitlines() if line[:1] == "{"]
    lines = [e for e in logs if e.get("event") == "rpc" and e.get("method") == STREAM]
    # The gateway's line, then the worker's (the same request id travels).
    gateway_line = next(e for e in lines if "key_id" in e)
    assert gateway_line["status"] == "CANCELLED"
    assert (gateway_line["model"], gateway_line["resolved"]) == ("tinylm", "tinylm:1")
    assert gateway_line["completion_tokens"] >= 3
    assert any(e["request_id"] == gateway_line["request_id"] and "key_id" not in e for e in lines)


async def test_kserve_calls_reach_the_usage_ledger(front: Front, auth_stack: AuthStack) -> None:
    async with admin_at(auth_stack.gateway.address, auth_stack.admin_key) as admin:
        tenant = await admin.tenant("kserve-usage")
        key = (await admin.new_key(tenant)).secret
        headers = {"authorization": f"Bearer {key}"}
        client = triton_aio.InferenceServerClient(front.url)

        async def requests() -> AsyncIterator[dict[str, Any]]:
            for max_tokens in (3, 5):  # two generations on one stream
                yield {
                    "model_name": "tinylm",
                    "inputs": tinylm_inputs(triton_aio, PROMPT, max_tokens),
                }

        try:
            await client.infer("digits@production", digits_inputs(triton_aio), headers=headers)
            finals = 0
            async for result, error in client.stream_infer(requests(), headers=headers):
                assert error is None, error
                finals += result.get_response().parameters["triton_final_response"].bool_param
                if finals == 2:
                    break
        finally:
            await client.close()
        usage = await settled_usage(admin, tenant, {"digits": 1, "tinylm": 2})
    assert usage["digits"].errors == 0
    tinylm = usage["tinylm"]
    assert tinylm.prompt_tokens == 2 * len(PROMPT)
    assert 2 <= tinylm.completion_tokens <= 8


async def test_a_streams_requests_each_take_a_worker_slot(
    auth_stack: AuthStack, registry_stack: RegistryStack
) -> None:
    # Two calls in flight per worker: a stream's third request at once is refused as
    # overloaded (not queued in Triton without limit), after the two before it are answered;
    # the slots come back when the stream ends.
    gateway = await start_auth_gateway(
        auth_stack.auth.address, registry_stack.worker, max_outstanding_per_worker=2
    )
    try:
        async with admin_at(auth_stack.gateway.address, auth_stack.admin_key) as admin:
            key = (await admin.new_key(await admin.tenant("kserve-slots"))).secret
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

            async def stream(count: int) -> tuple[int, grpc.StatusCode, str]:
                call = stub.ModelStreamInfer(metadata=bearer(key), timeout=60)
                for n in range(count):
                    request = _stream_request("tinylm", max_tokens=200)
                    request.id = f"r{n}"
                    await call.write(request)
                await call.done_writing()
                finals = 0
                try:
                    async for message in call:
                        assert not message.error_message
                        finals += message.infer_response.parameters[
                            "triton_final_response"
                        ].bool_param
                except grpc.aio.AioRpcError as exc:
                    return finals, exc.code(), exc.details() or ""
                return finals, grpc.StatusCode.OK, ""

            finals, code, details = await stream(3)
            assert (finals, code) == (2, grpc.StatusCode.RESOURCE_EXHAUSTED)
            assert "overloaded" in details
            assert (await stream(2))[:2] == (2, grpc.StatusCode.OK)
    finally:
        await gateway.stop()
