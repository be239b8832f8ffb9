"""What the worker's Triton has loaded: model versions with their I/O and serving facts.

Built from Triton's own model configs, so the gateway and callers see exactly
what Triton will enforce. Facts Triton has no field for (task, context length,
tokenizer, description) come from the config's `parameters`; so does the registry
model and version a Triton model serves (`tensorgate_model`, `tensorgate_version`),
since in registry mode each version is its own Triton model (`digits__v3`).

The catalog changes while the worker runs (registry mode loads and retires
versions); `watch` follows it, always giving the latest list.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

from tensorgate.inference.v1 import inference_pb2
from tensorgate.model_ref import ModelRef
from tritonclient.grpc import model_config_pb2

from services.runtime.errors import InvalidArgument, NotFound, shown
from services.runtime.triton_config import tensor_specs

# For a generate model whose config does not say (models/README.md has the contract).
DEFAULT_MAX_STOP_SEQUENCES = 8
DEFAULT_MAX_STOP_LENGTH = 64
# Config parameters a registry-mode worker writes (model_loader.py).
MODEL_PARAMETER = "tensorgate_model"
VERSION_PARAMETER = "tensorgate_version"


@dataclass(frozen=True)
class LoadedModel:
    """One ready model version and how to call it."""

    info: inference_pb2.ModelInfo
    decoupled: bool
    tokenizer: str
    output_names: frozenset[str]
    # The model and version as Triton knows them; `info` has them as callers do.
    triton_name: str
    triton_version: str
    # Limits on a generate model's `stop` input, from its config's parameters.
    max_stop_sequences: int = DEFAULT_MAX_STOP_SEQUENCES
    max_stop_length: int = DEFAULT_MAX_STOP_LENGTH

    @property
    def label(self) -> str:
        return f"{self.info.name}:{self.info.version}"

    def input_spec(self, name: str) -> inference_pb2.TensorSpec | None:
        return next((spec for spec in self.info.inputs if spec.name == name), None)


def loaded_model(version: int, config: model_config_pb2.ModelConfig) -> LoadedModel:
    """A Triton model version from its config; named as the registry names it, if it says."""
    params = {key: value.string_value for key, value in config.parameters.items()}
    decoupled = config.model_transaction_policy.decoupled
    info = inference_pb2.ModelInfo(
        name=params.get(MODEL_PARAMETER) or config.name,
        version=int(params.get(VERSION_PARAMETER) or version),
        task=params.get("task", "generate" if decoupled else "infer"),
        description=params.get("description", ""),
        inputs=tensor_specs(config.input),
        outputs=tensor_specs(config.output),
        max_batch_size=config.max_batch_size,
        context_length=int(params.get("context_length", "0") or 0),
    )
    return LoadedModel(
        info=info,
        decoupled=decoupled,
        tokenizer=params.get("tokenizer", ""),
        output_names=frozenset(o.name for o in config.output),
        triton_name=config.name,
        triton_version=str(version),
        max_stop_sequences=int(params.get("max_stop_sequences") or DEFAULT_MAX_STOP_SEQUENCES),
        max_stop_length=int(params.get("max_stop_length") or DEFAULT_MAX_STOP_LENGTH),
    )


class ModelCatalog:
    """The ready model versions, looked up by "name" (newest) or "name:version"."""

    def __init__(self, models: Iterable[LoadedModel] = ()) -> None:
        self._by_name: dict[str, dict[int, LoadedModel]] = {}
        # Resolved refs, so a call pays one dict lookup rather than a parse. Only refs
        # that name a loaded model get in, so callers cannot grow it without bound;
        # any change empties it ("name" may now mean another version).
        self._resolved: dict[str, LoadedModel] = {}
        # Set (and replaced) on every change: a watcher waits on the one it saw last.
        self._changed = asyncio.Event()
        self._closed = False
        # Triton model name -> when a call last resolved to it (time.monotonic()), so a
        # replaced version is let go only once callers have stopped using it.
        self._used: dict[str, float] = {}
        for model in models:
            self._by_name.setdefault(model.info.name, {})[model.info.version] = model

    def models(self) -> list[LoadedModel]:
        """Every loaded version, by name and then version."""
        return [
            model
            for _, versions in sorted(self._by_name.items())
            for _, model in sorted(versions.items())
        ]

    def add(self, model: LoadedModel) -> None:
        """Makes `model` routable (replacing an entry with the same name and version)."""
        versions = self._by_name.setdefault(model.info.name, {})
        replaced = versions.get(model.info.version)
        if replaced is not None:
            self._used.pop(replaced.triton_name, None)
        versions[model.info.version] = model
        self._changed_now()

    def remove(self, name: str, version: int) -> LoadedModel | None:
        """Stops routing to `name:version`; the entry removed, or None if there was none."""
        versions = self._by_name.get(name, {})
        model = versions.pop(version, None)
        if not versions:
            self._by_name.pop(name, None)
        if model is not None:
            self._used.pop(model.triton_name, None)
            self._changed_now()
        return model

    def _changed_now(self) -> None:
        self._resolved.clear()
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def close(self) -> None:
        """Ends every `watch` after its next list (the worker is shutting down)."""
        self._closed = True
        self._changed.set()

    async def watch(self) -> AsyncIterator[list[LoadedModel]]:
        """The current models at once, then again after each change.

        A watcher that is slow to take a list is given only the latest one when it
        comes back, however many changes it missed: what is loaded is a state, not
        a queue of events.
        """
        while True:
            changed = self._changed
            yield self.models()
            if self._closed:
                return
            await changed.wait()

    def resolve(self, ref: str) -> LoadedModel:
        """The loaded version `ref` names ("name" means the newest loaded version)."""
        model = self._resolved.get(ref)
        if model is None:
            model = self._resolved[ref] = self._resolve(ref)
        self._used[model.triton_name] = time.monotonic()
        return model

    def last_used(self, triton_name: str) -> float | None:
        """When a call last resolved to Triton model `triton_name` (time.monotonic())."""
        return self._used.get(triton_name)

    def _resolve(self, ref: str) -> LoadedModel:
        parsed = ModelRef.parse(ref)
        if parsed.alias is not None:
            raise InvalidArgument("model", "aliases are resolved by the gateway; send name:version")
        versions = self._by_name.get(parsed.name)
        if not versions:
            raise NotFound(f"model {shown(parsed.name)} is not loaded on this worker")
        if parsed.version is None:
            return versions[max(versions)]
        model = versions.get(parsed.version)
        if model is None:
            raise NotFound(f"model {shown(parsed.name)} has no loaded version {parsed.version}")
        return model
