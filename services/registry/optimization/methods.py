"""The optimization methods a job may chain, and the checks on their parameters.

Pure: no torch here, so the registry refuses a malformed request (INVALID_ARGUMENT
naming the step and parameter) before any job exists. What can only fail once the
method meets the model's weights (prune after int8, which leaves no float weights to
prune) fails inside the job, which then says why and leaves no version.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from services.runtime.errors import InvalidArgument, shown

INT8_DYNAMIC = "int8-dynamic"
PRUNE = "prune"
METHODS = (INT8_DYNAMIC, PRUNE)
MAX_STEPS = 4


@dataclass(frozen=True)
class Step:
    """One method with its checked parameters, e.g. prune with sparsity 0.5."""

    method: str
    parameters: tuple[tuple[str, str], ...] = ()

    def describe(self) -> str:
        args = ",".join(f"{k}={v}" for k, v in self.parameters)
        return f"{self.method}({args})" if args else self.method

    def as_dict(self) -> dict[str, object]:
        return {"method": self.method, "parameters": dict(self.parameters)}


def _sparsity(field: str, value: str | None) -> str:
    if value is None:
        raise InvalidArgument(field, "prune needs sparsity: the fraction of weights to zero")
    try:
        number = float(value)
    except ValueError:
        raise InvalidArgument(field, f"must be a number, got {shown(value)}") from None
    if not math.isfinite(number) or not 0.0 < number < 1.0:
        raise InvalidArgument(field, f"must be in (0, 1), got {shown(value)}")
    return repr(number)


def check_step(index: int, method: str, parameters: Mapping[str, str]) -> Step:
    """The step as a job runs it; INVALID_ARGUMENT naming `steps[index]` otherwise."""
    where = f"steps[{index}]"
    if method not in METHODS:
        raise InvalidArgument(
            f"{where}.method", f"unknown method {shown(method)}; known: {', '.join(METHODS)}"
        )
    known = {PRUNE: {"sparsity"}, INT8_DYNAMIC: set()}[method]
    extra = sorted(set(parameters) - known)
    if extra:
        raise InvalidArgument(
            f"{where}.parameters",
            f"{method} takes no parameter {shown(extra[0])}"
            + (f" (it takes: {', '.join(sorted(known))})" if known else ""),
        )
    if method == PRUNE:
        sparsity = _sparsity(f"{where}.parameters.sparsity", parameters.get("sparsity"))
        return Step(PRUNE, (("sparsity", sparsity),))
    return Step(INT8_DYNAMIC)


def check_steps(steps: Sequence[tuple[str, Mapping[str, str]]]) -> list[Step]:
    if not steps:
        raise InvalidArgument("steps", f"name at least one method ({', '.join(METHODS)})")
    if len(steps) > MAX_STEPS:
        raise InvalidArgument("steps", f"at most {MAX_STEPS} steps, got {len(steps)}")
    return [check_step(i, method, params) for i, (method, params) in enumerate(steps)]


def transformation_name(steps: Sequence[Step]) -> str:
    """The lineage's transformation: the methods in order, e.g. "prune+int8-dynamic"."""
    return "+".join(step.method for step in steps)
