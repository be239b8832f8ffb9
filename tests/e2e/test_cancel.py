"""A client's cancel stops the generation inside Triton, and the gateway logs CANCELLED."""

from __future__ import annotations

import asyncio
import json
import time

import grpc
import pytest
from tensorgate.gateway.v1 import gateway_pb2_grpc
from tensorgate.inference.v1 import inference_pb2

from gateway.server import Gateway
from services.runtime.logging import flush_logs
from services.worker.triton_process import BundledTriton
from tests.helpers import metric_value, scrape

GENERATE = "/tensorgate.gateway.v1.InferenceGateway/Generate"


async def test_cancel_mid_stream_stops_generation_in_triton(
    gateway: Gateway, triton: BundledTriton, capsys: pytest.CaptureFixture[str]
) -> None:
    assert gateway.service.metrics_endpoint is not None
    gateway_metrics = f"http://127.0.0.1:{gateway.service.metrics_endpoint.port}/metrics"
    models = {m.name: m for m in gateway.pool.models()}
    prompt = "MENENIUS:\n"
    max_tokens = models["tinylm"].context_length - len(prompt)

    before = await scrape(triton.metrics_url)
    cancelled_before = metric_value(
        before, "tinylm_requests_finished_total", finish_reason="cancelled"
    )
    tokens_before = metric_value(before, "tinylm_generated_tokens_total")
    gateway_cancelled_before = metric_value(
        await scrape(gateway_metrics),
        "tensorgate_rpc_requests_total",
        method=GENERATE,
        code="CANCELLED",
    )

    capsys.readouterr()
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        stub = gateway_pb2_grpc.InferenceGatewayStub(channel)
        call = stub.Generate(
            inference_pb2.GenerateRequest(
                model="tinylm", prompt=prompt, max_tokens=max_tokens, seed=3
            )
        )
        received = 0
        async for _chunk in call:
            received += 1
            if received == 3:
                break
        call.cancel()

    # The model polls for cancellation between tokens; give it a moment.
    for _ in range(100):
        after = await scrape(triton.metrics_url)
        if metric_value(after, "tinylm_requests_finished_total", finish_reason="cancelled") > (
            cancelled_before
        ):
            break
        await asyncio.sleep(0.1)

    generated = metric_value(after, "tinylm_generated_tokens_total") - tokens_before
    assert (
        metric_value(after, "tinylm_requests_finished_total", finish_reason="cancelled")
        == cancelled_before + 1
    )
    assert 3 <= generated < max_tokens, f"generated {generated} of {max_tokens} tokens"

    flush_logs()
    logs = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line[:1] == "{"]
    rpc_lines = [e for e in logs if e.get("event") == "rpc" and e.get("method") == GENERATE]
    assert [e["status"] for e in rpc_lines] == ["CANCELLED"]
    assert rpc_lines[0]["request_id"]
    assert (
        metric_value(
            await scrape(gateway_metrics),
            "tensorgate_rpc_requests_total",
            method=GENERATE,
            code="CANCELLED",
        )
        == gateway_cancelled_before + 1
    )


async def test_service_still_serves_after_a_cancel(gateway: Gateway) -> None:
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        stub = gateway_pb2_grpc.InferenceGatewayStub(channel)
        chunks = [
            c
            async for c in stub.Generate(
                inference_pb2.GenerateRequest(model="tinylm", prompt="Hi", max_tokens=5)
            )
        ]
    assert chunks[-1].finish_reason != inference_pb2.FINISH_REASON_UNSPECIFIED


async def test_deadline_reaches_triton(gateway: Gateway, triton: BundledTriton) -> None:
    models = {m.name: m for m in gateway.pool.models()}
    prompt = "ROMEO:\n"
    request = inference_pb2.GenerateRequest(
        model="tinylm",
        prompt=prompt,
        max_tokens=models["tinylm"].context_length - len(prompt),
        temperature=0.0,
    )
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        stub = gateway_pb2_grpc.InferenceGatewayStub(channel)
        started = time.perf_counter()
        chunks = [c async for c in stub.Generate(request)]
        full = time.perf_counter() - started
        assert chunks[-1].finish_reason == inference_pb2.FINISH_REASON_LENGTH

        before = await scrape(triton.metrics_url)
        # A deadline that lands mid-generation: a third of what the whole one took.
        with pytest.raises(grpc.aio.AioRpcError) as error:
            async for _ in stub.Generate(request, timeout=full / 3):
                pass
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    name = "tinylm_requests_finished_total"
    for _ in range(100):
        after = await scrape(triton.metrics_url)
        if metric_value(after, name, finish_reason="cancelled") > metric_value(
            before, name, finish_reason="cancelled"
        ):
            break
        await asyncio.sleep(0.1)
    assert metric_value(after, name, finish_reason="cancelled") == (
        metric_value(before, name, finish_reason="cancelled") + 1
    )
    assert metric_value(after, name, finish_reason="length") == metric_value(
        before, name, finish_reason="length"
    )
