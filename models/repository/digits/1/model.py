"""Triton Python-backend model `digits`: classifies 8x8 handwritten digits.

Input `image` is a batch of raw scikit-learn load_digits rows (64 float pixel values,
0..16); outputs are the class `probabilities` [10] and the arg-max `label` [1] per row.
Dynamic batching may hand `execute` several requests at once: they run as one tensor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# The Python backend puts this version folder on sys.path: the one architecture
# definition, shared with models/training, sits beside this file.
import digits_arch
import numpy as np
import torch
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.model = digits_arch.load_checkpoint(version_dir / "digits.pt")
        torch.set_num_threads(1)

    def execute(self, requests: list[Any]) -> list[Any]:
        images = [pb_utils.get_input_tensor_by_name(r, "image").as_numpy() for r in requests]
        sizes = [len(batch) for batch in images]
        with torch.inference_mode():
            probs = torch.softmax(self.model(torch.from_numpy(np.concatenate(images))), dim=1)
        probs_np = probs.numpy().astype(np.float32)
        labels = probs_np.argmax(axis=1).astype(np.int64).reshape(-1, 1)
        responses = []
        start = 0
        for size in sizes:
            end = start + size
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor("probabilities", probs_np[start:end]),
                        pb_utils.Tensor("label", labels[start:end]),
                    ]
                )
            )
            start = end
        return responses
