"""What the worker's Triton has loaded: model versions with their I/O and serving facts.

Built from Triton's own model configs, so the gateway and callers see exactly
what Triton will enforce. Facts Triton has no field for (task, context length,
tokenizer, description) come from the config's `parameters`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from tensorgate.inference.v1 import inference_pb2
from tensorgate.model_ref import ModelRef
from tritonclient.grpc import model_config_pb2

from services.runtime.errors import InvalidArgument, NotFound, shown

# For a generate model whose config does not say (models/README.md has the contract).
DEFAULT_MAX_STOP_SEQUENCES = 8
DEFAULT_MAX_STOP_LENGTH = 64


@dataclass(frozen=True)
class LoadedModel:
    """One ready model version and how to call it."""

    info: inference_pb2.ModelInfo
    decoupled: bool
    tokenizer: str
    output_names: frozenset[str]
    # Limits on a generate model's `stop` input, from its config's parameters.
    max_stop_sequences: int = DEFAULT_MAX_STOP_SEQUENCES
    max_stop_length: int = DEFAULT_MAX_STOP_LENGTH

    @property
    def label(self) -> str:
        return f"{self.info.name}:{self.info.version}"

    def input_spec(self, name: str) -> inference_pb2.TensorSpec | None:
        return next((spec for spec in self.info.inputs if spec.name == name), None)


def _datatype(data_type: int) -> str:
    # TYPE_FP32 -> FP32, TYPE_STRING -> BYTES (the KServe v2 name).
    name = model_config_pb2.DataType.Name(data_type).removeprefix("TYPE_")
    return "BYTES" if name == "STRING" else name


def _specs(
    entries: Iterable[model_config_pb2.ModelInput] | Iterable[model_config_pb2.ModelOutput],
) -> list[inference_pb2.TensorSpec]:
    return [
        inference_pb2.TensorSpec(
            name=e.name,
            datatype=_datatype(e.data_type),
            shape=list(e.dims),
            optional=getattr(e, "optional", False),
        )
        for e in entries
    ]


def loaded_model(version: int, config: model_config_pb2.ModelConfig) -> LoadedModel:
    params = {key: value.string_value for key, value in config.parameters.items()}
    decoupled = config.model_transaction_policy.decoupled
    info = inference_pb2.ModelInfo(
        name=config.name,
        version=version,
        task=params.get("task", "generate" if decoupled else "infer"),
        description=params.get("description", ""),
        inputs=_specs(config.input),
        outputs=_specs(config.output),
        max_batch_size=config.max_batch_size,
        context_length=int(params.get("context_length", "0") or 0),
    )
    return LoadedModel(
        info=info,
        decoupled=decoupled,
        tokenizer=params.get("tokenizer", ""),
        output_names=frozenset(o.name for o in config.output),
        max_stop_sequences=int(params.get("max_stop_sequences") or DEFAULT_MAX_STOP_SEQUENCES),
        max_stop_length=int(params.get("max_stop_length") or DEFAULT_MAX_STOP_LENGTH),
    )


class ModelCatalog:
    """The ready model versions, looked up by "name" (newest) or "name:version"."""

    def __init__(self, models: Iterable[LoadedModel] = ()) -> None:
        self._by_name: dict[str, dict[int, LoadedModel]] = {}
        # Resolved refs, so a call pays one dict lookup rather than a parse. Only refs
        # that name a loaded model get in, so callers cannot grow it without bound.
        self._resolved: dict[str, LoadedModel] = {}
        for model in models:
            self._by_name.setdefault(model.info.name, {})[model.info.version] = model

    def models(self) -> list[LoadedModel]:
        return [m for versions in self._by_name.values() for _, m in sorted(versions.items())]

    def resolve(self, ref: str) -> LoadedModel:
        """The loaded version `ref` names ("name" means the newest loaded version)."""
        model = self._resolved.get(ref)
        if model is None:
            model = self._resolved[ref] = self._resolve(ref)
        return model

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
