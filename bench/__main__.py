"""Benchmarks the chain against Triton itself, in one run on one machine.

Starts the bundled Triton, then a worker (connected to that Triton) and a gateway,
each in its own process as in production, and drives the same models both straight
at Triton (tritonclient's KServe v2 stub) and through the gateway:
- unary: the digits model, batch 1, p50/p99 and calls/s at concurrency 1 and 16;
- streaming: tinylm, greedy, time to first token and tokens/s.
Prints a Markdown table and writes it to bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import platform
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
from tensorgate import to_tensor
from tensorgate.gateway.v1 import gateway_pb2_grpc
from tensorgate.inference.v1 import inference_pb2
from tritonclient.grpc import service_pb2, service_pb2_grpc

from bench.load import StreamResult, UnaryResult, stream_load, unary_load
from launcher.local import LocalPlatform
from services.worker.catalog import ModelCatalog
from services.worker.generation import to_chunk, to_triton_stream_request
from services.worker.server import load_catalog
from services.worker.triton_client import TritonConnection
from services.worker.triton_process import BundledTriton

REPO = Path(__file__).resolve().parent.parent
PROMPT = "ROMEO:\n"


async def bench_unary(
    triton_url: str, gateway: str, seconds: float
) -> list[tuple[str, UnaryResult]]:
    image = np.random.default_rng(0).integers(0, 17, size=(1, 64)).astype(np.float32)
    tensor = to_tensor("image", image)
    direct_request = service_pb2.ModelInferRequest(model_name="digits", model_version="1")
    direct_request.inputs.add(name="image", datatype="FP32", shape=[1, 64])
    direct_request.raw_input_contents.append(tensor.raw_contents)
    gateway_request = inference_pb2.InferRequest(model="digits", inputs=[tensor])
    rows = []
    async with (
        grpc.aio.insecure_channel(triton_url) as triton,
        grpc.aio.insecure_channel(gateway) as front,
    ):
        triton_stub = service_pb2_grpc.GRPCInferenceServiceStub(triton)
        gateway_stub = gateway_pb2_grpc.InferenceGatewayStub(front)
        calls = {
            "direct": lambda: triton_stub.ModelInfer(direct_request),
            "gateway": lambda: gateway_stub.Infer(gateway_request),
        }
        for concurrency in (1, 16):
            for path, call in calls.items():
                result = await unary_load(call, concurrency=concurrency, seconds=seconds)
                rows.append((path, result))
    return rows


async def bench_stream(
    triton: TritonConnection, catalog: ModelCatalog, gateway: str, streams: int, max_tokens: int
) -> list[tuple[str, StreamResult]]:
    request = inference_pb2.GenerateRequest(
        model="tinylm", prompt=PROMPT, max_tokens=max_tokens, temperature=0.0
    )
    direct_request = to_triton_stream_request(catalog.resolve("tinylm"), request)

    async def direct() -> AsyncIterator[inference_pb2.GenerateChunk]:
        # The same decoding the worker does, so both paths count tokens alike.
        async for response in triton.stream(direct_request, timeout=120):
            yield to_chunk("tinylm:1", response)

    async with grpc.aio.insecure_channel(gateway) as channel:
        stub = gateway_pb2_grpc.InferenceGatewayStub(channel)
        return [
            ("direct", await stream_load(direct, streams=streams)),
            (
                "gateway",
                await stream_load(lambda: stub.Generate(request, timeout=120), streams=streams),
            ),
        ]


def report(
    unary: list[tuple[str, UnaryResult]], stream: list[tuple[str, StreamResult]], max_tokens: int
) -> str:
    lines = [
        f"# tensorgate bench, {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC",
        "",
        f"Machine: {platform.machine()}, {_cores()} cores, Python {platform.python_version()}; "
        "bundled CPU Triton 2.51; client, gateway, worker and Triton share the machine.",
        "",
        "## Unary Infer (digits, batch 1)",
        "",
        "| path | concurrency | calls | p50 ms | p99 ms | calls/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for path, r in unary:
        lines.append(
            f"| {path} | {r.concurrency} | {r.calls} | {r.p50_ms:.3f} | "
            f"{r.p99_ms:.3f} | {r.per_second:.0f} |"
        )
    lines += [
        "",
        f"## Streaming Generate (tinylm, greedy, {max_tokens} tokens, one stream at a time)",
        "",
        "| path | streams | time to first token p50 ms | tokens/s p50 |",
        "|---|---:|---:|---:|",
    ]
    for path, s in stream:
        lines.append(f"| {path} | {s.streams} | {s.ttft_p50_ms:.2f} | {s.tokens_per_second:.0f} |")
    return "\n".join(lines) + "\n"


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0))


async def main_async(args: argparse.Namespace) -> str:
    data_dir = Path(tempfile.mkdtemp(prefix="tensorgate-bench-"))
    triton = BundledTriton(REPO / "models" / "repository", data_dir / "triton")
    await triton.start(timeout=120)
    local = LocalPlatform(
        gateway_port=0,
        data_dir=data_dir,
        log_file=data_dir / "services.log",
        worker_args=("--triton-url", triton.grpc_url),
    )
    connection = TritonConnection(triton.grpc_url)
    try:
        await local.start()
        catalog = await load_catalog(connection, ())
        print("platform up; measuring...", file=sys.stderr)
        unary = await bench_unary(triton.grpc_url, local.gateway_address, args.seconds)
        stream = await bench_stream(
            connection, catalog, local.gateway_address, args.streams, args.max_tokens
        )
    finally:
        await local.stop()
        await connection.close()
        await triton.stop()
    return report(unary, stream, args.max_tokens)


def main() -> int:
    parser = argparse.ArgumentParser(prog="make bench", description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0, help="per unary measurement")
    parser.add_argument("--streams", type=int, default=5, help="generations per path")
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    table = asyncio.run(main_async(args))
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"bench-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}.md"
    path.write_text(table)
    print(f"written to {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
