"""DigitsMLP: the classifier behind the Triton model `digits` (8x8 handwritten digits).

Shared by `models/training/train_digits.py` (imports this file by path) and `model.py` next
to it. Input rows are scikit-learn `load_digits` rows: 64 pixel values in 0..16; the model
divides by 16 itself, so callers send raw rows.
"""

from __future__ import annotations

import io
import lzma
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

N_PIXELS = 64
N_CLASSES = 10
PIXEL_MAX = 16.0


class DigitsMLP(nn.Module):
    def __init__(self, hidden: int = 128) -> None:
        super().__init__()
        self.hidden = hidden
        self.net = nn.Sequential(
            nn.Linear(N_PIXELS, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, N_CLASSES),
        )

    def forward(self, pixels: Tensor) -> Tensor:
        """Logits [batch, 10] for raw pixel rows [batch, 64]."""
        return self.net(pixels / PIXEL_MAX)


def save_checkpoint(model: DigitsMLP, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": {"hidden": model.hidden}, "state_dict": model.state_dict()}, path)


def load_checkpoint(path: Path) -> DigitsMLP:
    """Rebuild the model (eval mode) from a file written by `save_checkpoint`, or by the
    optimizer (quantized and/or compressed)."""
    ckpt = read_checkpoint(path)
    return restore(DigitsMLP(**ckpt["config"]), ckpt)  # type: ignore[return-value]


# A derived version (`tensorgate models optimize`) stores its weights as this same
# checkpoint with "optimization" naming the steps applied, possibly xz-compressed (pruned
# weights are mostly zeros). The loader lives here, not in a shared module: each model
# folder is loaded by Triton on its own and must carry everything it needs.
XZ_MAGIC = b"\xfd7zXZ\x00"


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint dict at `path`, xz-compressed or not."""
    raw = path.read_bytes()
    if raw.startswith(XZ_MAGIC):
        raw = lzma.decompress(raw)
    with warnings.catch_warnings():
        # Quantized tensors load through storage APIs torch marks deprecated.
        warnings.simplefilter("ignore", UserWarning)
        loaded: dict[str, Any] = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    return loaded


def quantized_int8(model: nn.Module) -> nn.Module:
    """`model` with its Linear layers dynamically quantized to int8 (torch's own
    quantize_dynamic: int8 weights, activations quantized per call)."""
    with warnings.catch_warnings():
        # torch.ao.quantization is deprecated in favour of torchao, which is not installed;
        # the eager API still works in the pinned torch.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


def restore(model: nn.Module, ckpt: dict[str, Any]) -> nn.Module:
    """`model` (freshly built) shaped as the checkpoint's optimization left it, with its
    weights loaded, in eval mode."""
    if "int8-dynamic" in ckpt.get("optimization", ()):
        model = quantized_int8(model)
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()
