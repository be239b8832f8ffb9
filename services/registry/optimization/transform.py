"""The optimizer's child process: applies a job's methods to a parent version's weights,
packs the derived artifact and measures what can be measured off the serving path
(artifact size, parameter bytes, sparsity, held-out quality of parent and derived).

    python -m services.registry.optimization.transform < spec.json

It runs apart from the registry so that torch (its import, its threads, a crash) never
touches the registry's event loop. It reads its spec as JSON on stdin and writes JSON
lines on stdout: {"stage", "progress"} as it goes, then {"result": ...} or
{"error": reason} (exit 2) for a failure it can name. It runs the model's own code
(`<name>_arch.py` from the artifact), as a worker's Triton does.
"""

from __future__ import annotations

import importlib.util
import io
import json
import lzma
import sys
import tarfile
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune

from services.registry.optimization.evaluation import EVALUATORS, EvaluationError
from services.registry.optimization.methods import INT8_DYNAMIC, PRUNE


class OptimizationError(Exception):
    """A failure the job reports as its reason (the message says what and why)."""


def emit(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def _import_arch(folder: Path) -> tuple[str, ModuleType]:
    archs = sorted(folder.glob("*_arch.py"))
    if len(archs) != 1:
        raise OptimizationError(
            "the parent artifact must hold exactly one <model>_arch.py (the architecture "
            f"the optimizer rebuilds the model from); it holds {len(archs)}"
        )
    kind = archs[0].name.removesuffix("_arch.py")
    spec = importlib.util.spec_from_file_location(f"{kind}_arch", archs[0])
    if spec is None or spec.loader is None:
        raise OptimizationError(f"cannot import {archs[0].name}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    if not hasattr(module, "restore") or not hasattr(module, "read_checkpoint"):
        raise OptimizationError(
            f"{archs[0].name} of the parent cannot load optimized weights (no restore / "
            "read_checkpoint): upload the model again from the current models/repository"
        )
    return kind, module


def _prunable(model: nn.Module) -> list[nn.Linear]:
    """Float Linear layers whose weight is their own: a weight tied to another module
    (tinylm's output head shares the token embedding) is left alone, since pruning
    replaces the parameter and would untie it."""
    owners: dict[int, int] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners[id(param)] = owners.get(id(param), 0) + 1
    return [m for m in model.modules() if type(m) is nn.Linear and owners.get(id(m.weight), 0) == 1]


def apply_prune(model: nn.Module, sparsity: float) -> nn.Module:
    layers = _prunable(model)
    if not layers:
        raise OptimizationError(
            "prune: the model has no float Linear weights left to prune (int8-dynamic "
            "leaves only int8 weights: put prune before int8-dynamic)"
        )
    for layer in layers:
        prune.l1_unstructured(layer, name="weight", amount=sparsity)  # type: ignore[no-untyped-call]
        prune.remove(layer, "weight")  # type: ignore[no-untyped-call]  # permanent: the zeros are the weights now
    return model


def apply_int8(model: nn.Module, arch: ModuleType) -> nn.Module:
    if not any(type(m) is nn.Linear for m in model.modules()):
        raise OptimizationError(
            "int8-dynamic: the model has no float Linear layers left to quantize"
        )
    quantized: nn.Module = arch.quantized_int8(model)
    return quantized


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, tuple | list):
        return [t for item in value for t in _tensors(item)]
    return []


def weight_stats(model: nn.Module) -> tuple[float, float]:
    """(bytes the parameters take in memory, fraction of them that is not zero): every
    tensor of the state dict once (tied weights count once), int8 weights at one byte."""
    seen: set[int] = set()
    size = elements = nonzero = 0
    for value in model.state_dict().values():
        for tensor in _tensors(value):
            key = tensor.data_ptr() if not tensor.is_quantized else id(tensor)
            if key in seen or (not tensor.is_floating_point() and not tensor.is_quantized):
                continue
            seen.add(key)
            size += tensor.numel() * tensor.element_size()
            elements += tensor.numel()
            plain = tensor.int_repr() if tensor.is_quantized else tensor
            nonzero += int(torch.count_nonzero(plain).item())
    return float(size), nonzero / max(elements, 1)


def save_weights(model: nn.Module, ckpt: dict[str, Any], methods: list[str]) -> tuple[bytes, str]:
    """The derived checkpoint's bytes, xz-compressed when that makes them smaller (it
    does for pruned weights: their zeros are what shrinks), and the storage used."""
    buffer = io.BytesIO()
    torch.save(
        {"config": ckpt["config"], "state_dict": model.state_dict(), "optimization": methods},
        buffer,
    )
    raw = buffer.getvalue()
    packed = lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME)
    return (packed, "xz") if len(packed) < len(raw) else (raw, "raw")


def pack(folder: Path, target: Path) -> None:
    """A tar of the folder's files as the SDK packs uploads: sorted, no times, no owners."""
    with tarfile.open(target, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(folder.iterdir(), key=lambda p: p.name):
            if not path.is_file() or path.suffix == ".pyc":
                continue
            info = tarfile.TarInfo(path.name)
            info.size = path.stat().st_size
            info.mode = 0o644
            with path.open("rb") as data:
                tar.addfile(info, data)


def run(spec: dict[str, Any]) -> dict[str, Any]:
    work = Path(spec["workdir"])
    parent_dir, derived_dir = work / "parent", work / "derived"
    emit(stage="loading the parent", progress=0.05)
    parent_dir.mkdir()
    with tarfile.open(spec["parent_artifact"], "r:") as tar:
        tar.extractall(parent_dir, filter="data")
    kind, arch = _import_arch(parent_dir)
    if kind not in EVALUATORS:
        raise OptimizationError(
            f"no held-out evaluation set for a {kind} model: the optimizer knows "
            f"{', '.join(sorted(EVALUATORS))}"
        )
    weights = parent_dir / f"{kind}.pt"
    if not weights.is_file():
        raise OptimizationError(f"the parent artifact has no {weights.name} beside {kind}_arch.py")
    ckpt = arch.read_checkpoint(weights)
    # Loaded twice: the steps change `model` in place, the parent stays as it was.
    parent: nn.Module = arch.load_checkpoint(weights)
    model: nn.Module = arch.load_checkpoint(weights)
    methods = list(ckpt.get("optimization", []))
    torch.manual_seed(0)
    for step in spec["steps"]:
        emit(stage=f"applying {step['method']}", progress=0.1)
        if step["method"] == PRUNE:
            model = apply_prune(model, float(step["parameters"]["sparsity"]))
        elif step["method"] == INT8_DYNAMIC:
            model = apply_int8(model, arch)
        methods.append(step["method"])
    model.eval()
    data, storage = save_weights(model, ckpt, methods)
    derived_dir.mkdir()
    for path in parent_dir.iterdir():
        if path.is_file():
            (derived_dir / path.name).write_bytes(path.read_bytes())
    (derived_dir / weights.name).write_bytes(data)
    artifact = work / "derived.tar"
    pack(derived_dir, artifact)
    # The derived folder must load as a worker would load it: through the arch's own loader.
    served = arch.load_checkpoint(derived_dir / weights.name)
    quality, evaluate, evaluation_set = EVALUATORS[kind]
    data_dir = Path(spec["evaluation_dir"])
    emit(stage="evaluating the parent", progress=0.2)
    parent_quality = evaluate(parent, data_dir)
    emit(stage="evaluating the derived model", progress=0.35)
    derived_quality = evaluate(served, data_dir)
    parent_bytes, parent_nonzero = weight_stats(parent)
    derived_bytes, derived_nonzero = weight_stats(served)
    return {
        "artifact": str(artifact),
        "storage": storage,
        "quality_metric": quality.metric,
        "evaluation_set": evaluation_set,
        "torch": torch.__version__,
        "facts": {
            quality.metric: derived_quality,
            f"parent.{quality.metric}": parent_quality,
            "quality_loss": quality.loss(parent_quality, derived_quality),
            "param_bytes": derived_bytes,
            "parent.param_bytes": parent_bytes,
            "nonzero_param_fraction": derived_nonzero,
            "parent.nonzero_param_fraction": parent_nonzero,
            "weights_file_bytes": float(len(data)),
            "parent.weights_file_bytes": float(weights.stat().st_size),
        },
    }


def main() -> int:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # torch's deprecation notes are not the job's reason
    spec = json.load(sys.stdin)
    try:
        emit(result=run(spec))
    except (OptimizationError, EvaluationError) as exc:
        emit(error=str(exc))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
