"""The optimization methods' checks, the alias quality policy and the CLI's comparison,
without servers; and the methods themselves on a small torch model."""

from __future__ import annotations

import warnings

import pytest
import torch
from tensorgate.registry.v1 import registry_pb2 as pb
from torch import nn

from launcher.optimize_commands import compare_rows, steps_of
from launcher.options import UsageError
from services.registry.alias_policy import check_bound, require_within
from services.registry.optimization.methods import check_steps, transformation_name
from services.registry.optimization.runner import _with_deltas
from services.registry.optimization.transform import (
    OptimizationError,
    apply_prune,
    weight_stats,
)
from services.runtime.errors import FailedPrecondition, InvalidArgument


def test_steps_are_checked_in_order_with_their_parameters() -> None:
    steps = check_steps([("prune", {"sparsity": "0.5"}), ("int8-dynamic", {})])
    assert [s.describe() for s in steps] == ["prune(sparsity=0.5)", "int8-dynamic"]
    assert transformation_name(steps) == "prune+int8-dynamic"


@pytest.mark.parametrize(
    ("steps", "field", "words"),
    [
        ([], "steps", "at least one"),
        ([("int8-dynamic", {})] * 5, "steps", "at most 4"),
        ([("fp4", {})], "steps[0].method", "unknown method 'fp4'"),
        ([("prune", {})], "steps[0].parameters.sparsity", "needs sparsity"),
        ([("prune", {"sparsity": "1.5"})], "steps[0].parameters.sparsity", "in (0, 1)"),
        ([("prune", {"sparsity": "nan"})], "steps[0].parameters.sparsity", "in (0, 1)"),
        ([("prune", {"sparsity": "half"})], "steps[0].parameters.sparsity", "a number"),
        ([("int8-dynamic", {"bits": "4"})], "steps[0].parameters", "no parameter 'bits'"),
    ],
)
def test_malformed_steps_are_refused_naming_the_field(
    steps: list[tuple[str, dict[str, str]]], field: str, words: str
) -> None:
    with pytest.raises(InvalidArgument) as refused:
        check_steps(steps)
    assert refused.value.violations[0].field == field
    assert words in str(refused.value)


def derived(loss: float | None, parent: int = 1) -> pb.ModelVersion:
    version = pb.ModelVersion(model="tinylm", version=2)
    version.lineage.parent_version = parent
    version.lineage.parameters["quality_metric"] = "heldout_loss_per_byte"
    if loss is not None:
        version.facts.update(
            {
                "quality_loss": loss,
                "heldout_loss_per_byte": 1.83 + loss,
                "parent.heldout_loss_per_byte": 1.83,
            }
        )
    return version


def test_the_policy_refuses_more_loss_than_its_bound_naming_the_figures() -> None:
    require_within(derived(0.01), "production", 0.01)  # at the bound: allowed
    require_within(derived(None, parent=0), "production", 0.0)  # an original passes
    with pytest.raises(FailedPrecondition) as refused:
        require_within(derived(0.0147), "production", 0.01)
    message = str(refused.value)
    assert "lost 0.0147" in message and "1.83 for version 1 -> 1.8447" in message
    assert "at most 0.01" in message
    with pytest.raises(FailedPrecondition, match="no measured quality_loss"):
        require_within(derived(None), "production", 1.0)
    with pytest.raises(FailedPrecondition):  # a loss that is no number fails closed
        require_within(derived(float("nan")), "production", 1.0)
    with pytest.raises(InvalidArgument):
        check_bound(-0.1)


def test_deltas_are_taken_for_every_figure_measured_for_both() -> None:
    facts = _with_deltas({"param_bytes": 10.0, "parent.param_bytes": 40.0, "job_only": 1.0})
    assert facts["delta.param_bytes"] == -30.0
    assert "delta.job_only" not in facts


def test_compare_uses_the_parent_figures_of_the_same_run() -> None:
    first = pb.ModelVersion(model="digits", version=1, facts={"artifact_bytes": 999.0})
    second = pb.ModelVersion(model="digits", version=2)
    second.lineage.parent_version = 1
    second.lineage.transformation = "int8-dynamic"
    second.facts.update({"artifact_bytes": 40.0, "parent.artifact_bytes": 120.0})
    rows, note = compare_rows(first, second)
    assert rows[0] == ("artifact size (bytes)", "120", "40", "-80 (-66.7%)")
    assert "same run" in note
    # Version 1 of another model is not the parent: its own figures, not digits:1's.
    other = pb.ModelVersion(model="tinylm", version=1, facts={"artifact_bytes": 999.0})
    rows, note = compare_rows(other, second)
    assert rows[0] == ("artifact size (bytes)", "999", "40", "-959 (-96.0%)")
    assert "same run" not in note


def test_the_cli_turns_methods_into_steps() -> None:
    assert steps_of(["prune", "int8-dynamic"], 0.5) == [
        ("prune", {"sparsity": "0.5"}),
        ("int8-dynamic", {}),
    ]
    with pytest.raises(UsageError, match="--sparsity"):
        steps_of(["prune"], None)
    with pytest.raises(UsageError, match="--method prune"):
        steps_of(["int8-dynamic"], 0.5)


def test_pruning_is_permanent_and_leaves_tied_weights_alone() -> None:
    torch.manual_seed(0)
    embedding = nn.Embedding(8, 4)
    head = nn.Linear(4, 8, bias=False)
    head.weight = embedding.weight  # tied, as tinylm's head is
    model = nn.Sequential(nn.Linear(4, 4), embedding, head)
    apply_prune(model, 0.5)
    first = model[0]
    assert isinstance(first, nn.Linear)
    assert not hasattr(first, "weight_orig")  # prune.remove made it permanent
    assert int((first.weight == 0).sum()) == 8
    assert head.weight is embedding.weight and int((head.weight == 0).sum()) == 0
    size, nonzero = weight_stats(model)
    assert size == (16 + 4 + 32) * 4  # the tied weight once
    assert nonzero == pytest.approx((52 - 8) / 52)


def test_pruning_int8_weights_fails_saying_why() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated (for torchao)
        model = torch.ao.quantization.quantize_dynamic(  # type: ignore[no-untyped-call]
            model, {nn.Linear}, dtype=torch.qint8
        )
    with pytest.raises(OptimizationError, match="put prune before int8-dynamic"):
        apply_prune(model, 0.5)
