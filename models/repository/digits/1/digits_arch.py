"""DigitsMLP: the classifier behind the Triton model `digits` (8x8 handwritten digits).

Shared by `models/training/train_digits.py` (imports this file by path) and `model.py` next
to it. Input rows are scikit-learn `load_digits` rows: 64 pixel values in 0..16; the model
divides by 16 itself, so callers send raw rows.
"""

from __future__ import annotations

from pathlib import Path

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
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = DigitsMLP(**ckpt["config"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()
