"""CPU time of the bench's processes, read from /proc.

On a shared 2-core machine wall-clock throughput moves with whatever else runs;
the CPU seconds a process spends (utime + stime in /proc/PID/stat) per call or
per token are far steadier, so every measurement takes a snapshot before and
after. A role is one process (the gateway) or a process group (Triton with its
Python-backend stub processes). The machine's busy time from /proc/stat is kept
too, so a report can say how much CPU other work took while it measured.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
TICK = float(os.sysconf("SC_CLK_TCK"))


@dataclass(frozen=True)
class ProcStat:
    pgrp: int
    cpu_seconds: float


def read_stat(pid: int) -> ProcStat | None:
    """utime + stime of `pid` and its process group; None once it is gone."""
    try:
        raw = (PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name may hold spaces and parentheses: fields count from the last ')'.
    fields = raw[raw.rindex(")") + 2 :].split()
    # After the name: state(0) ppid(1) pgrp(2) ... utime(11) stime(12).
    return ProcStat(pgrp=int(fields[2]), cpu_seconds=(int(fields[11]) + int(fields[12])) / TICK)


def group_members(pgid: int) -> list[int]:
    """Every live process in process group `pgid` (Triton and its backend stubs)."""
    members = []
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            stat = read_stat(int(entry.name))
            if stat is not None and stat.pgrp == pgid:
                members.append(int(entry.name))
    return members


def machine_busy_seconds() -> float:
    """CPU seconds all cores have spent not idle since boot."""
    first = (PROC / "stat").read_text().splitlines()[0].split()
    ticks = [int(v) for v in first[1:9]]  # user nice system idle iowait irq softirq steal
    return (sum(ticks) - ticks[3] - ticks[4]) / TICK


# What a role's processes are right now: called at every snapshot, so a stub
# that Triton starts or restarts between snapshots is still counted.
Members = Callable[[], list[int]]


@dataclass(frozen=True)
class Snapshot:
    per_pid: Mapping[str, Mapping[int, float]]
    machine: float


@dataclass(frozen=True)
class CpuDelta:
    """CPU seconds between two snapshots, by role, and what the rest of the machine took."""

    by_role: Mapping[str, float]
    machine: float

    def __add__(self, other: CpuDelta) -> CpuDelta:
        roles = self.by_role.keys() | other.by_role.keys()
        return CpuDelta(
            {r: self.by_role.get(r, 0.0) + other.by_role.get(r, 0.0) for r in roles},
            self.machine + other.machine,
        )

    @property
    def others(self) -> float:
        """Busy seconds of processes that are not the bench's (tests, builds, ...)."""
        return max(0.0, self.machine - sum(self.by_role.values()))


class CpuMeter:
    """Snapshots of utime + stime for named roles."""

    def __init__(self) -> None:
        self._roles: dict[str, Members] = {}

    def add_process(self, role: str, pid: int) -> None:
        self._roles[role] = lambda: [pid]

    def add_group(self, role: str, pgid: int, *, leader: bool = True) -> None:
        """Every process in group `pgid`, or all but the group's leader."""
        self._roles[role] = lambda: [p for p in group_members(pgid) if leader or p != pgid]

    def snapshot(self) -> Snapshot:
        per_pid: dict[str, dict[int, float]] = {}
        for role, members in self._roles.items():
            seen: dict[int, float] = {}
            for pid in members():
                stat = read_stat(pid)
                if stat is not None:
                    seen[pid] = stat.cpu_seconds
            per_pid[role] = seen
        return Snapshot(per_pid, machine_busy_seconds())

    @staticmethod
    def delta(before: Snapshot, after: Snapshot) -> CpuDelta:
        by_role = {}
        for role, now in after.per_pid.items():
            then = before.per_pid.get(role, {})
            # A process born in between counts from zero; one that died is lost
            # (its time went to a parent that never waits for it).
            by_role[role] = sum(seconds - then.get(pid, 0.0) for pid, seconds in now.items())
        return CpuDelta(by_role, after.machine - before.machine)
