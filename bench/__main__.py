"""Benchmarks the chain against Triton itself and against bare hops, in one run on one machine.

Starts the bundled CPU Triton, a worker and a gateway as in production, and two
bare pass-through hops (bench/bare_hop.py), each in its own process, and drives:
- unary: digits, batch 1, at concurrency 1 and 16, direct to Triton, through one
  bare hop, through two bare hops in a chain, and through gateway -> worker;
- streaming: the bench's no-compute model (bench/models/nocompute), one stream and
  16 concurrent, direct, through two bare hops and through the gateway;
- streaming: tinylm, greedy, one generation at a time, direct and through the gateway.
Every measurement reads each process's CPU time from /proc before and after, so the
report gives CPU per call and per token for every process, and judges DESIGN.md's
hot-path budgets from this run. Prints Markdown and writes it to bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import shutil
import sys
import tempfile
from functools import partial
from pathlib import Path

import grpc

from bench import calls
from bench.cpu import CpuMeter, group_members
from bench.load import UnaryResult, stream_load, unary_load, warm_stream, warm_unary
from bench.measure import (
    CHAIN,
    CLIENT,
    DIRECT,
    GATEWAY,
    HOP_A,
    HOP_B,
    ONE_HOP,
    STUBS,
    TRITON,
    TWO_HOPS,
    WORKER,
    Slice,
    interleaved,
    measure,
)
from bench.report import BUSY, M, Streamed, Unary, report
from bench.stack import NOCOMPUTE, REPO, BenchStack

PROMPT = "ROMEO:\n"
CONCURRENCY = (1, BUSY)
# Room for the slowest start seen: tinylm loading torch on a busy machine.
START_TIMEOUT = 300.0


def _meter(stack: BenchStack) -> CpuMeter:
    meter = CpuMeter()
    meter.add_process(CLIENT, os.getpid())
    for role in (HOP_A, HOP_B, GATEWAY, WORKER):
        meter.add_process(role, stack.processes[role].pid)
    meter.add_process(TRITON, stack.triton_pid)
    # Triton leads its own process group; its backend stubs are the rest of it.
    meter.add_group(STUBS, stack.triton_pid, leader=False)
    return meter


async def bench_unary(
    meter: CpuMeter, seconds: float, rounds: int, channels: dict[str, grpc.aio.Channel]
) -> list[Unary]:
    paths = {
        DIRECT: calls.kserve_infer(channels[DIRECT]),
        ONE_HOP: calls.kserve_infer(channels[ONE_HOP]),
        TWO_HOPS: calls.kserve_infer(channels[TWO_HOPS]),
        CHAIN: calls.gateway_infer(channels[CHAIN]),
    }
    for call in paths.values():
        await warm_unary(call)
    rows = []
    for concurrency in CONCURRENCY:
        slices = {
            path: Slice(
                partial(warm_unary, call, calls=10),
                partial(unary_load, call, concurrency=concurrency, seconds=seconds / rounds),
            )
            for path, call in paths.items()
        }
        rows += _progress(await interleaved(meter, slices, rounds))
    return rows


async def bench_nocompute(
    meter: CpuMeter,
    seconds: float,
    rounds: int,
    tokens: int,
    channels: dict[str, grpc.aio.Channel],
) -> list[Streamed]:
    paths = {
        DIRECT: calls.kserve_stream(channels[DIRECT], NOCOMPUTE, PROMPT, tokens),
        TWO_HOPS: calls.kserve_stream(channels[TWO_HOPS], NOCOMPUTE, PROMPT, tokens),
        CHAIN: calls.gateway_stream(channels[CHAIN], NOCOMPUTE, PROMPT, tokens),
    }
    rows = []
    for concurrency in CONCURRENCY:
        for stream in paths.values():
            await warm_stream(stream, concurrency=concurrency)
        slices = {
            path: Slice(
                partial(warm_stream, stream),
                partial(stream_load, stream, concurrency=concurrency, seconds=seconds / rounds),
            )
            for path, stream in paths.items()
        }
        rows += _progress(await interleaved(meter, slices, rounds))
    return rows


async def bench_tinylm(
    meter: CpuMeter, generations: int, tokens: int, channels: dict[str, grpc.aio.Channel]
) -> list[Streamed]:
    paths = {
        DIRECT: calls.kserve_stream(channels[DIRECT], "tinylm", PROMPT, tokens),
        CHAIN: calls.gateway_stream(channels[CHAIN], "tinylm", PROMPT, tokens),
    }
    rows = []
    for path, stream in paths.items():
        await warm_stream(stream)
        run = partial(stream_load, stream, generations=generations)
        rows += _progress([await measure(meter, path, run)])
    return rows


def _progress(rows: list[M]) -> list[M]:
    for row in rows:
        r = row.result
        unit = "calls" if isinstance(r, UnaryResult) else "tokens"
        print(
            f"  {row.path:<12} concurrency {r.concurrency:>2}: "
            f"{row.units} {unit} in {r.seconds:.1f}s",
            file=sys.stderr,
        )
    return rows


async def main_async(args: argparse.Namespace) -> str:
    work_dir = Path(tempfile.mkdtemp(prefix="tensorgate-bench-"))
    stack = BenchStack(work_dir)
    print(f"starting Triton, worker, gateway and bare hops (logs in {work_dir})", file=sys.stderr)
    addresses = {
        DIRECT: "",
        ONE_HOP: stack.address("hop-b"),
        TWO_HOPS: stack.address("hop-a"),
        CHAIN: stack.address("gateway"),
    }
    try:
        await stack.start(START_TIMEOUT)
        addresses[DIRECT] = stack.triton.grpc_url
        meter = _meter(stack)
        triton_processes = len(group_members(stack.triton_pid))
        # One long-lived channel per path, as every hop keeps one to its upstream.
        channels = {path: grpc.aio.insecure_channel(a) for path, a in addresses.items()}
        try:
            print("measuring unary Infer...", file=sys.stderr)
            unary = await bench_unary(meter, args.seconds, args.rounds, channels)
            print("measuring no-compute streams...", file=sys.stderr)
            nocompute = await bench_nocompute(
                meter, args.stream_seconds, args.rounds, args.nocompute_tokens, channels
            )
            print("measuring tinylm...", file=sys.stderr)
            tinylm = await bench_tinylm(meter, args.streams, args.max_tokens, channels)
        finally:
            for channel in channels.values():
                await channel.close(None)
    except BaseException:
        print(f"bench failed; service logs kept in {work_dir}", file=sys.stderr)
        await stack.stop()
        raise
    await stack.stop()
    shutil.rmtree(work_dir, ignore_errors=True)
    return report(
        unary,
        nocompute,
        tinylm,
        nocompute_tokens=args.nocompute_tokens,
        tinylm_tokens=args.max_tokens,
        triton_processes=triton_processes,
        rounds=args.rounds,
    )


def main() -> int:
    parser = argparse.ArgumentParser(prog="make bench", description=__doc__)
    parser.add_argument(
        "--seconds", type=float, default=5.0, help="per unary measurement (path, concurrency)"
    )
    parser.add_argument(
        "--stream-seconds", type=float, default=5.0, help="per no-compute stream measurement"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="slices each measurement is taken in, the paths in turn (fair on a shared machine)",
    )
    parser.add_argument(
        "--nocompute-tokens", type=int, default=256, help="tokens per no-compute generation"
    )
    parser.add_argument("--streams", type=int, default=5, help="tinylm generations per path")
    parser.add_argument("--max-tokens", type=int, default=200, help="tokens per tinylm generation")
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
