"""The bench's Markdown report, with DESIGN.md's hot-path budgets judged from the same run."""

from __future__ import annotations

import datetime as dt
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass

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
    ROLES,
    STUBS,
    TRITON,
    TWO_HOPS,
    WORKER,
    M,
    Streamed,
    Unary,
)

# DESIGN.md, "The hot path".
HOP_CPU_FACTOR = 1.3  # CPU per unary call of a Python hop, against the bare hop
ADDED_P50_FACTOR = 1.3  # p50 the chain adds at concurrency 1, against two bare hops
TOKEN_CPU_US = 40.0  # CPU per streamed token, per hop
STREAM_SHARE = 0.90  # 16 no-compute streams through the gateway, share of direct tokens/s
TTFT_EXTRA_MS = 1.5  # time to first token, over direct
BUSY = 16  # the concurrency the throughput budgets are judged at
ACCESS_CPU_US = 50.0  # authentication and quota together, per call (in-process counters)
# The KServe front door adds no more than Infer (the bar); the rest is noise room.
KSERVE_CPU_FACTOR = 1.1

ROLE_TITLES = {
    CLIENT: "client",
    HOP_A: "hop A",
    HOP_B: "hop B",
    GATEWAY: "gateway",
    KEYED_GATEWAY: "gateway (keys)",
    WORKER: "worker",
    TRITON: "Triton",
    STUBS: "stubs",
}


@dataclass(frozen=True)
class Budget:
    target: str
    measured: str
    limit: str
    met: bool
    bare: str  # the same figure for bare hops, from the same run: the floor


def _find(rows: Sequence[M], path: str, conc: int) -> M:
    for row in rows:
        if row.path == path and row.result.concurrency == conc:
            return row
    raise LookupError(f"no measurement of {path} at concurrency {conc}")


def _us(row: Unary | Streamed, role: str) -> float:
    value = row.cpu_us(role)
    if value is None or value <= 0:
        # Judged as 0 it would pass every budget: refuse instead.
        raise LookupError(f"no CPU figure for {role} on {row.path}; the budgets cannot be judged")
    return value


def budgets(unary: Sequence[Unary], nocompute: Sequence[Streamed]) -> list[Budget]:
    out = []
    # Each Python hop is judged against the bare hop in the same place of a two-hop
    # chain: CPU per call falls as a process's call rate rises (more calls per
    # wake-up), so a lone bare hop, running about twice as many calls per second as
    # any two-hop chain can, would be a floor no chain of two reaches, bare or not.
    alone = _us(_find(unary, ONE_HOP, BUSY), HOP_B)
    hops = _find(unary, TWO_HOPS, BUSY)
    chain = _find(unary, CHAIN, BUSY)
    for role, bare_role, place in ((GATEWAY, HOP_A, "front"), (WORKER, HOP_B, "back")):
        used, floor = _us(chain, role), _us(hops, bare_role)
        out.append(
            Budget(
                f"CPU per unary call, {role} (concurrency {BUSY})",
                f"{used:.0f} us = {used / floor:.2f}x the bare hop in its place",
                f"<= {HOP_CPU_FACTOR}x {floor:.0f} = {HOP_CPU_FACTOR * floor:.0f} us",
                used <= HOP_CPU_FACTOR * floor,
                f"{floor:.0f} us ({place} of two bare hops; a lone bare hop: {alone:.0f} us "
                f"= {used / alone:.2f}x)",
            )
        )
    direct_p50 = _find(unary, DIRECT, 1).result.p50_ms
    added = _find(unary, CHAIN, 1).result.p50_ms - direct_p50
    two_hops = _find(unary, TWO_HOPS, 1).result.p50_ms - direct_p50
    one_hop = _find(unary, ONE_HOP, 1).result.p50_ms - direct_p50
    out.append(
        Budget(
            "unary p50 added by the chain (concurrency 1)",
            f"{added:.2f} ms over direct ({direct_p50:.2f} ms)",
            f"<= {ADDED_P50_FACTOR}x {two_hops:.2f} = {ADDED_P50_FACTOR * two_hops:.2f} ms",
            added <= ADDED_P50_FACTOR * two_hops,
            f"two hops add {two_hops:.2f} ms, one {one_hop:.2f} ms",
        )
    )
    keyed = _find(unary, KEYED_CHAIN, BUSY)
    plain = _us(chain, GATEWAY)
    added_us = _us(keyed, KEYED_GATEWAY) - plain
    out.append(
        Budget(
            f"CPU per unary call added by keys + quotas, gateway (concurrency {BUSY})",
            f"{added_us:+.0f} us ({_us(keyed, KEYED_GATEWAY):.0f} vs {plain:.0f} us without)",
            f"< {ACCESS_CPU_US:.0f} us",
            added_us < ACCESS_CPU_US,
            "in-process counters; key cached; every limit set",
        )
    )
    kserve = _find(unary, KSERVE_CHAIN, BUSY)
    infer_us = _us(chain, GATEWAY) + _us(chain, WORKER)
    kserve_us = _us(kserve, GATEWAY) + _us(kserve, WORKER)
    kserve_added = _find(unary, KSERVE_CHAIN, 1).result.p50_ms - direct_p50
    out.append(
        Budget(
            f"CPU per unary call, gateway + worker, KServe ModelInfer (concurrency {BUSY})",
            f"{kserve_us:.0f} us = {kserve_us / infer_us:.2f}x Infer's {infer_us:.0f} us; "
            f"p50 added at concurrency 1: {kserve_added:.2f} ms (Infer {added:.2f} ms)",
            f"<= {KSERVE_CPU_FACTOR}x {infer_us:.0f} = {KSERVE_CPU_FACTOR * infer_us:.0f} us",
            kserve_us <= KSERVE_CPU_FACTOR * infer_us,
            "same gateway and worker, the platform's Infer",
        )
    )
    streams = _find(nocompute, CHAIN, BUSY)
    bare_streams = _find(nocompute, TWO_HOPS, BUSY)
    per_hop = f"A {_us(bare_streams, HOP_A):.0f} us, B {_us(bare_streams, HOP_B):.0f} us"
    for role in (GATEWAY, WORKER):
        used = _us(streams, role)
        out.append(
            Budget(
                f"CPU per streamed token, {role} ({BUSY} no-compute streams)",
                f"{used:.0f} us",
                f"<= {TOKEN_CPU_US:.0f} us",
                used <= TOKEN_CPU_US,
                per_hop,
            )
        )
    direct = _find(nocompute, DIRECT, BUSY).result.tokens_per_second
    through = streams.result.tokens_per_second
    out.append(
        Budget(
            f"{BUSY} no-compute streams through the gateway, tokens/s",
            f"{through:.0f} = {through / direct:.0%} of direct ({direct:.0f})",
            f">= {STREAM_SHARE:.0%}",
            through >= STREAM_SHARE * direct,
            f"two hops: {bare_streams.result.tokens_per_second / direct:.0%}",
        )
    )
    ttft = _find(nocompute, CHAIN, 1).result.ttft_p50_ms
    ttft_direct = _find(nocompute, DIRECT, 1).result.ttft_p50_ms
    ttft_hops = _find(nocompute, TWO_HOPS, 1).result.ttft_p50_ms
    out.append(
        Budget(
            "time to first token p50, one no-compute stream",
            f"{ttft:.2f} ms = direct ({ttft_direct:.2f}) + {ttft - ttft_direct:.2f}",
            f"<= direct + {TTFT_EXTRA_MS} = {ttft_direct + TTFT_EXTRA_MS:.2f} ms",
            ttft <= ttft_direct + TTFT_EXTRA_MS,
            f"two hops: direct + {ttft_hops - ttft_direct:.2f} ms",
        )
    )
    return out


def _us_cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def _cpu_cells(row: Unary | Streamed) -> list[str]:
    """One cell per process, then the path's total."""
    values = [row.cpu_us(role) for role in ROLES]
    return [*map(_us_cell, values), _us_cell(sum(v for v in values if v is not None))]


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    align = ["---" if i == 0 else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def report(
    unary: Sequence[Unary],
    nocompute: Sequence[Streamed],
    tinylm: Sequence[Streamed],
    *,
    nocompute_tokens: int,
    tinylm_tokens: int,
    triton_processes: int,
    rounds: int,
) -> str:
    cpu_titles = [*(ROLE_TITLES[r] for r in ROLES), "path total"]
    lines = [
        f"# tensorgate bench, {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC",
        "",
        f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores, Python "
        f"{platform.python_version()}, bundled CPU Triton 2.51; every process below shares "
        "the machine.",
        "",
        "- Paths: direct = client -> Triton (KServe v2); 1 bare hop = client -> hop B -> "
        "Triton; 2 bare hops = client -> hop A -> hop B -> Triton; gateway = client -> "
        "gateway -> worker -> Triton; 'gateway, keys+quota' = the same through a second "
        "gateway that checks an API key and meters every quota of it (in-process counters); "
        "'gateway, KServe' = client -> gateway -> worker -> Triton through the gateway's "
        "KServe v2 ModelInfer instead of Infer. "
        "A bare hop is a grpc.aio generic handler that forwards "
        "bytes (bench/bare_hop.py).",
        "- CPU columns: utime + stime from /proc, per call or per token, by process. Triton "
        f"is tritonserver; stubs are its {triton_processes - 1} Python-backend stub processes, "
        "where model code runs; - = not on that path. Once the cores are saturated, a path's "
        "throughput is at most cores / its total CPU per call or token.",
        '- "others": cores that processes outside the bench kept busy meanwhile; high values '
        "mean a shared, noisy run.",
        f"- Unary and no-compute rows are each taken in {rounds} slices with the paths in turn, "
        "so every path meets the same outside load.",
        "",
        "## Unary Infer (digits, batch 1)",
        "",
        "CPU in microseconds per call.",
        "",
    ]
    rows = []
    for row in unary:
        r = row.result
        base = _find(unary, DIRECT, r.concurrency).result.p50_ms
        rows.append(
            [
                row.path,
                str(r.concurrency),
                str(r.calls),
                f"{r.p50_ms:.3f}",
                f"{r.p50_ms - base:+.3f}",
                f"{r.p99_ms:.3f}",
                f"{r.per_second:.0f}",
                *_cpu_cells(row),
                f"{row.others_cores:.2f}",
            ]
        )
    header = ["path", "concurrency", "calls", "p50 ms", "added p50 ms", "p99 ms", "calls/s"]
    lines += _table([*header, *cpu_titles, "others"], rows)
    lines += [
        "",
        f"## Streaming, no-compute model ({nocompute_tokens} tokens per generation)",
        "",
        "Direct and bare hops use ModelStreamInfer, the gateway Generate. "
        "CPU in microseconds per token.",
        "",
    ]
    lines += _stream_table(nocompute, cpu_titles)
    lines += [
        "",
        f"## Streaming, tinylm (greedy, {tinylm_tokens} tokens, one generation at a time)",
        "",
    ]
    lines += _stream_table(tinylm, cpu_titles)
    lines += ["", '## Budgets (DESIGN.md, "The hot path")', ""]
    verdicts = [
        [b.target, b.measured, b.limit, "met" if b.met else "**missed**", b.bare]
        for b in budgets(unary, nocompute)
    ]
    lines += _table(["target", "measured", "budget", "verdict", "bare hops, same run"], verdicts)
    return "\n".join(lines) + "\n"


def _stream_table(rows: Sequence[Streamed], cpu_titles: list[str]) -> list[str]:
    cells = []
    for row in rows:
        r = row.result
        cells.append(
            [
                row.path,
                str(r.concurrency),
                str(r.generations),
                str(r.tokens),
                f"{r.ttft_p50_ms:.2f}",
                f"{r.stream_rate_p50:.0f}",
                f"{r.tokens_per_second:.0f}",
                *_cpu_cells(row),
                f"{row.others_cores:.2f}",
            ]
        )
    header = ["path", "streams", "generations", "tokens", "TTFT p50 ms", "tokens/s per stream"]
    return _table([*header, "tokens/s all", *cpu_titles, "others"], cells)
