"""Train the `digits` demo classifier on scikit-learn's bundled load_digits data.

No download: the 1,797 8x8 images ship inside scikit-learn. Trains the MLP defined in
`models/repository/digits/1/digits_arch.py` with a fixed seed, prints the held-out
accuracy and writes `models/repository/digits/1/digits.pt` and the held-out images
(`models/data/digits_heldout.npz`, for the optimizer's evaluation).

    python models/training/train_digits.py            # a few seconds
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from arch import load_arch  # the sibling models/training/arch.py
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

MODELS = Path(__file__).resolve().parents[1]
OUT = MODELS / "repository" / "digits" / "1" / "digits.pt"
# The images this training holds out, for the optimizer's held-out accuracy
# (services/registry/optimization/evaluation.py): shipped, so the registry needs no sklearn.
HELD_OUT = MODELS / "data" / "digits_heldout.npz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    arch = load_arch("digits")
    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data, digits.target, test_size=0.2, random_state=args.seed, stratify=digits.target
    )
    xtr = torch.tensor(x_train, dtype=torch.float32)
    ytr = torch.tensor(y_train, dtype=torch.long)
    xte = torch.tensor(x_test, dtype=torch.float32)
    yte = torch.tensor(y_test, dtype=torch.long)

    model = arch.DigitsMLP()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(args.seed)
    for _ in range(args.epochs):
        model.train()
        for idx in torch.randperm(len(xtr), generator=gen).split(32):  # type: ignore[no-untyped-call]
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()

    model.eval()
    with torch.inference_mode():
        accuracy = (model(xte).argmax(dim=1) == yte).float().mean().item()
    print(f"train {len(xtr)} / test {len(xte)} images; final batch loss {loss.item():.4f}")
    print(f"held-out accuracy: {accuracy:.4f}")
    arch.save_checkpoint(model, args.out)
    np.savez_compressed(HELD_OUT, images=x_test.astype(np.uint8), labels=y_test.astype(np.uint8))
    print(f"saved {args.out} ({args.out.stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
