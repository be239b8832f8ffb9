"""One measurement: a load run on one path, with the CPU each process spent on it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from bench.cpu import CpuDelta, CpuMeter
from bench.load import StreamResult, UnaryResult

# Roles of the processes, in the order the report shows them.
CLIENT, HOP_A, HOP_B, GATEWAY, WORKER = "client", "hop-a", "hop-b", "gateway", "worker"
# A second gateway in front of the same worker, with API keys and quotas on.
KEYED_GATEWAY = "gateway-keys"
# Triton is two roles: the server, and its Python-backend stubs (one process per
# model instance, where the models' Python code runs).
TRITON, STUBS = "triton", "stubs"
ROLES = (CLIENT, HOP_A, HOP_B, GATEWAY, KEYED_GATEWAY, WORKER, TRITON, STUBS)

# Paths a call can take, and the processes on each (the client is on all of them).
DIRECT, ONE_HOP, TWO_HOPS, CHAIN = "direct", "1 bare hop", "2 bare hops", "gateway"
KEYED_CHAIN = "gateway, keys+quota"
# The same gateway and worker as CHAIN, called through KServe v2 ModelInfer, not Infer.
KSERVE_CHAIN = "gateway, KServe"
PATH_ROLES: dict[str, tuple[str, ...]] = {
    DIRECT: (CLIENT, TRITON, STUBS),
    ONE_HOP: (CLIENT, HOP_B, TRITON, STUBS),
    TWO_HOPS: (CLIENT, HOP_A, HOP_B, TRITON, STUBS),
    CHAIN: (CLIENT, GATEWAY, WORKER, TRITON, STUBS),
    KEYED_CHAIN: (CLIENT, KEYED_GATEWAY, WORKER, TRITON, STUBS),
    KSERVE_CHAIN: (CLIENT, GATEWAY, WORKER, TRITON, STUBS),
}

R = TypeVar("R", UnaryResult, StreamResult)


@dataclass(frozen=True)
class Measured(Generic[R]):
    """A load result and the CPU seconds each process on its path spent meanwhile."""

    path: str
    result: R
    cpu: CpuDelta

    def __add__(self, other: Measured[R]) -> Measured[R]:
        """Two slices of one measurement as one."""
        return Measured(self.path, self.result + other.result, self.cpu + other.cpu)

    @property
    def units(self) -> int:
        """What CPU is divided by: calls for unary, tokens for streams."""
        if isinstance(self.result, UnaryResult):
            return self.result.calls
        return self.result.tokens

    def cpu_us(self, role: str) -> float | None:
        """Microseconds of `role`'s CPU per call or per token; None off this path."""
        if role not in PATH_ROLES[self.path] or self.units == 0:
            return None
        return self.cpu.by_role.get(role, 0.0) / self.units * 1e6

    @property
    def others_cores(self) -> float:
        """How many cores other work kept busy meanwhile, on average."""
        return self.cpu.others / self.result.seconds


Unary = Measured[UnaryResult]
Streamed = Measured[StreamResult]
M = TypeVar("M", Unary, Streamed)


async def measure(meter: CpuMeter, path: str, run: Callable[[], Awaitable[R]]) -> Measured[R]:
    before = meter.snapshot()
    result = await run()
    after = meter.snapshot()
    return Measured(path, result, CpuMeter.delta(before, after))


@dataclass(frozen=True)
class Slice(Generic[R]):
    """How to take a share of one path's measurement: warm it up, then run it."""

    warm: Callable[[], Awaitable[None]]
    run: Callable[[], Awaitable[R]]


async def interleaved(
    meter: CpuMeter, slices: dict[str, Slice[R]], rounds: int
) -> list[Measured[R]]:
    """Measures each path in `rounds` slices, taking the paths in turn.

    Other work on a shared machine comes and goes; taking the paths in turn gives
    each the same share of it, so paths compare fairly even when absolute
    numbers move. A slice's warm-up wakes its processes and is not measured.
    """
    totals: dict[str, Measured[R]] = {}
    for _ in range(rounds):
        for path, part in slices.items():
            await part.warm()
            measured = await measure(meter, path, part.run)
            totals[path] = totals[path] + measured if path in totals else measured
    return list(totals.values())
