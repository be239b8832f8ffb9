"""Held-out quality of a demo model, measured the same way for a parent and its derived
version: digits' accuracy on the images its training held out, tinylm's loss per byte
on the held-out tail of its corpus.

The sets are files the project ships (models/data): `digits_heldout.npz`, written by
models/training/train_digits.py from scikit-learn's load_digits with the training's own
split (so the registry needs no scikit-learn), and `corpus.txt`, whose last 5 % the
tinylm training never saw. Runs in the optimizer's child process (it imports torch).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# What train_tinylm.py holds out: the corpus after its first 95 %.
TINYLM_TRAIN_FRACTION = 0.95
TINYLM_EOS = 256


class EvaluationError(Exception):
    """The evaluation set is missing or does not fit the model."""


@dataclass(frozen=True)
class Quality:
    """One figure of quality: its name, and whether higher is better."""

    metric: str
    higher_is_better: bool

    def loss(self, parent: float, derived: float) -> float:
        """How much worse `derived` is than `parent` (negative: better)."""
        return parent - derived if self.higher_is_better else derived - parent


ACCURACY = Quality("accuracy", higher_is_better=True)
LOSS_PER_BYTE = Quality("heldout_loss_per_byte", higher_is_better=False)


def digits_accuracy(model: nn.Module, data_dir: Path) -> float:
    path = data_dir / "digits_heldout.npz"
    if not path.is_file():
        raise EvaluationError(f"{path} is missing: run models/training/train_digits.py")
    with np.load(path) as held_out:
        images = torch.from_numpy(held_out["images"].astype(np.float32))
        labels = torch.from_numpy(held_out["labels"].astype(np.int64))
    with torch.inference_mode():
        predicted = model(images).argmax(dim=1)
    return float((predicted == labels).float().mean().item())


def encode_corpus(text: str) -> torch.Tensor:
    """The corpus as tinylm's training encodes it (train_tinylm.encode_corpus): UTF-8
    bytes, with EOS in place of the blank line that ends each speech."""
    ids: list[int] = []
    for speech in text.split("\n\n"):
        if speech.strip():
            ids.extend(speech.strip("\n").encode("utf-8") + b"\n")
            ids.append(TINYLM_EOS)
    return torch.tensor(ids, dtype=torch.long)


def tinylm_loss_per_byte(model: nn.Module, data_dir: Path, context: int = 256) -> float:
    """Mean next-token cross-entropy (nats) over the held-out tail, in non-overlapping
    windows of the model's context: every held-out token is predicted once."""
    path = data_dir / "corpus.txt"
    if not path.is_file():
        raise EvaluationError(f"{path} is missing")
    data = encode_corpus(path.read_text(encoding="utf-8"))
    held_out = data[int(len(data) * TINYLM_TRAIN_FRACTION) :]
    windows = [held_out[i : i + context + 1] for i in range(0, len(held_out) - 1, context)]
    total, count = 0.0, 0
    with torch.inference_mode():
        for window in windows:
            if len(window) < 2:
                continue
            logits, _ = model(window[:-1].unsqueeze(0))
            loss = F.cross_entropy(logits[0], window[1:], reduction="sum")
            total += float(loss.item())
            count += len(window) - 1
    return total / count


# By model kind (its <kind>_arch.py): the figure, how to take it, and the set it is taken on.
EVALUATORS: dict[str, tuple[Quality, Callable[[nn.Module, Path], float], str]] = {
    "digits": (
        ACCURACY,
        digits_accuracy,
        "digits_heldout.npz: the 360 load_digits images training held out (20 %, seed 0)",
    ),
    "tinylm": (
        LOSS_PER_BYTE,
        tinylm_loss_per_byte,
        "corpus.txt after its first 95 %: the tail tinylm's training held out",
    ),
}
