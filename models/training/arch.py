"""Imports a model's architecture module from its Triton repository folder.

The one definition of each architecture lives beside the model's `model.py`
(`repository/<model>/1/<model>_arch.py`), where Triton's Python backend loads it;
the repository is not a package, so training imports it by path.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPOSITORY = Path(__file__).resolve().parents[1] / "repository"


def load_arch(model: str) -> ModuleType:
    name = f"{model}_arch"
    path = REPOSITORY / model / "1" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
