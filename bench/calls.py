"""The calls the bench makes, built once and made the same way on every path.

KServe v2 paths (direct to Triton, through bare hops) use tritonclient's generated
stub; gateway paths use tensorgate's. Requests are built here from the protocol
alone, not from the worker's internals, so the bench keeps measuring the same
thing while the services change under it.
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np
from tensorgate.auth.v1 import auth_pb2, auth_pb2_grpc
from tensorgate.gateway.v1 import gateway_pb2_grpc
from tensorgate.inference.v1 import inference_pb2
from tensorgate.tensors import encode_bytes, to_tensor
from tritonclient.grpc import service_pb2, service_pb2_grpc

from bench.load import Stream, UnaryCall

STREAM_TIMEOUT = 120.0

# Sent with every gateway call: `authorization: Bearer <key>` when the bench has a key.
Metadata = tuple[tuple[str, str], ...]


def gateway_metadata(api_key: str) -> Metadata:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


def digits_image() -> np.ndarray[Any, np.dtype[np.float32]]:
    """One 8x8 image, batch 1, pixel values 0..16 like load_digits."""
    return np.random.default_rng(0).integers(0, 17, size=(1, 64)).astype(np.float32)


def kserve_infer(channel: grpc.aio.Channel, metadata: Metadata = ()) -> UnaryCall:
    """digits through KServe v2 ModelInfer (Triton itself, a bare hop in front of it, or
    the gateway's KServe front door)."""
    request = service_pb2.ModelInferRequest(model_name="digits", model_version="1")
    request.inputs.add(name="image", datatype="FP32", shape=[1, 64])
    request.raw_input_contents.append(digits_image().tobytes())
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    return lambda: stub.ModelInfer(request, metadata=metadata)


def gateway_infer(channel: grpc.aio.Channel, metadata: Metadata) -> UnaryCall:
    """digits through the gateway's Infer."""
    request = inference_pb2.InferRequest(
        model="digits", inputs=[to_tensor("image", digits_image())]
    )
    stub = gateway_pb2_grpc.InferenceGatewayStub(channel)
    return lambda: stub.Infer(request, metadata=metadata)


def _scalar(request: service_pb2.ModelInferRequest, name: str, datatype: str, raw: bytes) -> None:
    request.inputs.add(name=name, datatype=datatype, shape=[1])
    request.raw_input_contents.append(raw)


def kserve_generate_request(
    model: str, prompt: str, max_tokens: int
) -> service_pb2.ModelInferRequest:
    """A greedy generation in the generate-model contract (models/README.md)."""
    request = service_pb2.ModelInferRequest(model_name=model)
    _scalar(request, "prompt", "BYTES", encode_bytes([prompt.encode("utf-8")]))
    _scalar(request, "max_tokens", "INT32", struct.pack("<i", max_tokens))
    _scalar(request, "temperature", "FP32", struct.pack("<f", 0.0))
    _scalar(request, "top_p", "FP32", struct.pack("<f", 1.0))
    _scalar(request, "top_k", "INT32", struct.pack("<i", 0))
    return request


def kserve_stream(channel: grpc.aio.Channel, model: str, prompt: str, max_tokens: int) -> Stream:
    """Generations over KServe v2 ModelStreamInfer, counting token_ids per response."""
    request = kserve_generate_request(model, prompt, max_tokens)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

    async def generate() -> AsyncIterator[int]:
        call = stub.ModelStreamInfer(timeout=STREAM_TIMEOUT)
        await call.write(request)
        # Half-closed, Triton ends the stream after the final response.
        await call.done_writing()
        async for message in call:
            if message.error_message:
                raise RuntimeError(f"{model} failed: {message.error_message}")
            response = message.infer_response
            for output, raw in zip(response.outputs, response.raw_output_contents, strict=True):
                if output.name == "token_ids":
                    yield len(raw) // 4  # INT32

    return generate


def gateway_stream(
    channel: grpc.aio.Channel, metadata: Metadata, model: str, prompt: str, max_tokens: int
) -> Stream:
    """Generations through the gateway's Generate."""
    request = inference_pb2.GenerateRequest(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0.0
    )
    stub = gateway_pb2_grpc.InferenceGatewayStub(channel)

    async def generate() -> AsyncIterator[int]:
        async for chunk in stub.Generate(request, timeout=STREAM_TIMEOUT, metadata=metadata):
            yield len(chunk.token_ids)

    return generate


async def metered_key(address: str, admin_key: str) -> str:
    """A tenant and a key with every quota set (far above what the bench reaches), so each
    call is authenticated and checked against every limit; returns the key."""
    limits = auth_pb2.Quota(
        requests_per_minute=10**9,
        tokens_per_minute=10**12,
        tokens_per_day=10**12,
        concurrent_streams=10**6,
    )
    admin = gateway_metadata(admin_key)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        await stub.CreateTenant(
            auth_pb2.CreateTenantRequest(tenant=auth_pb2.Tenant(id="bench", quota=limits)),
            metadata=admin,
            timeout=10,
        )
        await stub.UpdateTenant(
            auth_pb2.UpdateTenantRequest(id="bench", monthly_spend_cap=10.0**9),
            metadata=admin,
            timeout=10,
        )
        created = await stub.CreateApiKey(
            auth_pb2.CreateApiKeyRequest(tenant_id="bench", models=["*"], quota=limits),
            metadata=admin,
            timeout=10,
        )
    return str(created.secret)
