"""An alias's quality policy: the most quality a version it points at may have lost
against its parent, as that version's optimization job measured it (its `quality_loss`
fact, in the units of its `quality_metric`: accuracy for digits, held-out nats per byte
for tinylm).

An original version (no parent) passes: there is nothing it lost against. A derived
version without a measured loss does not: the policy asks for the figure.
"""

from __future__ import annotations

import math

from tensorgate.registry.v1 import registry_pb2 as pb

from services.runtime.errors import FailedPrecondition, InvalidArgument, shown


def check_bound(value: float) -> float:
    if not math.isfinite(value) or value < 0:
        raise InvalidArgument("max_quality_loss", f"must be a finite number >= 0, got {value}")
    return value


def require_within(version: pb.ModelVersion, alias: str, bound: float) -> None:
    """FAILED_PRECONDITION with the figures if `version` lost more than `bound`."""
    parent = version.lineage.parent_version
    if not parent:
        return
    named = f"version {version.version} of model {shown(version.model)}"
    rule = f"alias {shown(alias)} allows a quality loss of at most {bound:g} (max_quality_loss)"
    loss = version.facts.get("quality_loss")
    if loss is None:
        raise FailedPrecondition(
            f"{named} derives from version {parent} but has no measured quality_loss, and {rule}:"
            " derive it with `tensorgate models optimize`, or clear the policy"
        )
    if not loss <= bound:  # a NaN loss fails the policy, it does not pass it
        metric = version.lineage.parameters.get("quality_metric", "quality")
        mine, theirs = version.facts.get(metric), version.facts.get(f"parent.{metric}")
        figures = (
            f" ({metric} {theirs:.6g} for version {parent} -> {mine:.6g})"
            if mine is not None and theirs is not None
            else ""
        )
        raise FailedPrecondition(
            f"{named} lost {loss:.6g} of quality against its parent version {parent}{figures}, "
            f"and {rule}"
        )
