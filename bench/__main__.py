"""Benchmarks the chain against Triton itself and against bare hops, in one run on one machine.

Starts the bundled CPU Triton, a worker and a gateway as in production, and two
bare pass-through hops (bench/bare_hop.py), each in its own process, and drives:
- unary: digits, batch 1, at concurrency 1 and 16, direct to Triton, through one
  bare hop, through two bare hops in a chain, through gateway -> worker, and through
  a second gateway that checks an API key and meters its quotas (every limit set,
  in-process counters) in front of the same worker, and through the first gateway's
  KServe v2 front door (ModelInfer, not Infer);
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
from dataclasses import dataclass
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
    KEYED_CHAIN,
    KEYED_GATEWAY,
    KSERVE_CHAIN,
    ONE_HOP,
    STUBS,
    TRITON,
    TWO_HOPS,
    WORKER,
    M,
    Slice,
    Streamed,
    Unary,
    interleaved,
    measure,
)
from bench.report import BUSY, report
from bench.stack import NOCOMPUTE, REPO, BenchStack

PROMPT = "ROMEO:\n"
CONCURRENCY = (1, BUSY)
# Room for the slowest start seen: tinylm loading torch on a busy machine.
START_TIMEOUT = 300.0


def _meter(stack: BenchStack) -> CpuMeter:
    meter = CpuMeter()
    meter.add_process(CLIENT, os.getpid())
    for role in (HOP_A, HOP_B, GATEWAY, KEYED_GATEWAY, WORKER):
        meter.add_process(role, stack.processes[role].pid)
    meter.add_process(TRITON, stack.triton_pid)
    # Triton leads its own process group; its backend stubs are the rest of it.
    meter.add_group(STUBS, stack.triton_pid, leader=False)
    return meter


@dataclass(frozen=True, kw_only=True)
class Options:
    """How long and how much to measure (the command line)."""

    seconds: float  # per unary measurement: one path at one concurrency
    stream_seconds: float  # per no-compute stream measurement
    rounds: int
    nocompute_tokens: int
    streams: int  # tinylm generations per path
    max_tokens: int  # per tinylm generation
    api_key: str


@dataclass(frozen=True)
class Targets:
    """One long-lived channel per path, as every hop keeps one to its upstream."""

    channels: dict[str, grpc.aio.Channel]
    gateway_metadata: calls.Metadata
    keyed_metadata: calls.Metadata

    def kserve(self, path: str) -> grpc.aio.Channel:
        return self.channels[path]

    @property
    def gateway(self) -> grpc.aio.Channel:
        return self.channels[CHAIN]


async def bench_unary(meter: CpuMeter, targets: Targets, options: Options) -> list[Unary]:
    paths = {path: calls.kserve_infer(targets.kserve(path)) for path in (DIRECT, ONE_HOP, TWO_HOPS)}
    paths[CHAIN] = calls.gateway_infer(targets.gateway, targets.gateway_metadata)
    paths[KEYED_CHAIN] = calls.gateway_infer(targets.channels[KEYED_CHAIN], targets.keyed_metadata)
    paths[KSERVE_CHAIN] = calls.kserve_infer(targets.gateway, targets.gateway_metadata)
    for call in paths.values():
        await warm_unary(call)
    seconds = options.seconds / options.rounds
    rows = []
    for concurrency in CONCURRENCY:
        slices = {
            path: Slice(
                partial(warm_unary, call, calls=10),
                partial(unary_load, call, concurrency=concurrency, seconds=seconds),
            )
            for path, call in paths.items()
        }
        rows += _progress(await interleaved(meter, slices, options.rounds))
    return rows


async def bench_nocompute(meter: CpuMeter, targets: Targets, options: Options) -> list[Streamed]:
    tokens = options.nocompute_tokens
    paths = {
        path: calls.kserve_stream(targets.kserve(path), NOCOMPUTE, PROMPT, tokens)
        for path in (DIRECT, TWO_HOPS)
    }
    paths[CHAIN] = calls.gateway_stream(
        targets.gateway, targets.gateway_metadata, NOCOMPUTE, PROMPT, tokens
    )
    seconds = options.stream_seconds / options.rounds
    rows = []
    for concurrency in CONCURRENCY:
        for stream in paths.values():
            await warm_stream(stream, concurrency=concurrency)
        slices = {
            path: Slice(
                partial(warm_stream, stream),
                partial(stream_load, stream, concurrency=concurrency, seconds=seconds),
            )
            for path, stream in paths.items()
        }
        rows += _progress(await interleaved(meter, slices, options.rounds))
    return rows


async def bench_tinylm(meter: CpuMeter, targets: Targets, options: Options) -> list[Streamed]:
    tokens = options.max_tokens
    paths = {
        DIRECT: calls.kserve_stream(targets.kserve(DIRECT), "tinylm", PROMPT, tokens),
        CHAIN: calls.gateway_stream(
            targets.gateway, targets.gateway_metadata, "tinylm", PROMPT, tokens
        ),
    }
    rows = []
    for path, stream in paths.items():
        await warm_stream(stream)
        run = partial(stream_load, stream, generations=options.streams)
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


async def main_async(options: Options) -> str:
    work_dir = Path(tempfile.mkdtemp(prefix="tensorgate-bench-"))
    stack = BenchStack(work_dir)
    print(f"starting Triton, worker, gateway and bare hops (logs in {work_dir})", file=sys.stderr)
    try:
        await stack.start(START_TIMEOUT)
        meter = _meter(stack)
        triton_processes = len(group_members(stack.triton_pid))
        addresses = {
            DIRECT: stack.triton.grpc_url,
            ONE_HOP: stack.address("hop-b"),
            TWO_HOPS: stack.address("hop-a"),
            CHAIN: stack.address("gateway"),
            KEYED_CHAIN: stack.address("gateway-keys"),
        }
        key = await calls.metered_key(
            stack.address("gateway-keys"), stack.admin_key_file.read_text().strip()
        )
        targets = Targets(
            {path: grpc.aio.insecure_channel(a) for path, a in addresses.items()},
            calls.gateway_metadata(options.api_key),
            calls.gateway_metadata(key),
        )
        try:
            print("measuring unary Infer...", file=sys.stderr)
            unary = await bench_unary(meter, targets, options)
            print("measuring no-compute streams...", file=sys.stderr)
            nocompute = await bench_nocompute(meter, targets, options)
            print("measuring tinylm...", file=sys.stderr)
            tinylm = await bench_tinylm(meter, targets, options)
        finally:
            for channel in targets.channels.values():
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
        nocompute_tokens=options.nocompute_tokens,
        tinylm_tokens=options.max_tokens,
        triton_processes=triton_processes,
        rounds=options.rounds,
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
    parser.add_argument(
        "--api-key",
        default=os.environ.get("TENSORGATE_API_KEY", ""),
        help="sent as `authorization: Bearer` on gateway calls (env TENSORGATE_API_KEY)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    if args.rounds < 1 or min(args.seconds, args.stream_seconds) <= 0:
        parser.error("--rounds must be >= 1 and --seconds, --stream-seconds > 0")
    options = Options(
        seconds=args.seconds,
        stream_seconds=args.stream_seconds,
        rounds=args.rounds,
        nocompute_tokens=args.nocompute_tokens,
        streams=args.streams,
        max_tokens=args.max_tokens,
        api_key=args.api_key,
    )
    table = asyncio.run(main_async(options))
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"bench-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}.md"
    path.write_text(table)
    print(f"written to {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
