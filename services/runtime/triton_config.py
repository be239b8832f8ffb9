"""Triton model configs (config.pbtxt): read when a version is registered, written by workers.

The registry parses the text a caller registers once, refuses what Triton would refuse
(with the reason in the caller's terms rather than a failed load minutes later on some
worker), and keeps both the structured facts and the normalized text. A worker renders
that text back under the name it loads the model as, with its instance count and the
parameters that let its catalog say which registry version a Triton model is.

The KServe datatype mapping lives here too: the worker's catalog reads Triton's own
configs with it, so a version's registered I/O and what the worker advertises agree.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from google.protobuf import text_format
from tensorgate.inference.v1 import inference_pb2
from tensorgate.registry.v1 import registry_pb2
from tritonclient.grpc import model_config_pb2

from services.runtime.errors import DataLoss, InvalidArgument, shown

FIELD = "config_pbtxt"
# Far above any real config (the demo ones are ~1.5 KB); it bounds what one
# registration can make the registry parse and store.
MAX_CONFIG_CHARS = 256 * 1024
MAX_TENSORS = 64
_BACKEND = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# A platform-only config (the older spelling) names its backend through the platform.
_PLATFORM_BACKENDS = {
    "onnxruntime_onnx": "onnxruntime",
    "pytorch_libtorch": "pytorch",
    "tensorrt_plan": "tensorrt",
    "tensorflow_graphdef": "tensorflow",
    "tensorflow_savedmodel": "tensorflow",
}
_WILDCARD_DIM = -1


def kserve_datatype(data_type: int) -> str:
    """A Triton config's data type in KServe v2 words: TYPE_FP32 -> FP32, TYPE_STRING -> BYTES."""
    name = model_config_pb2.DataType.Name(data_type).removeprefix("TYPE_")
    return "BYTES" if name == "STRING" else name


def tensor_specs(
    entries: Iterable[model_config_pb2.ModelInput] | Iterable[model_config_pb2.ModelOutput],
) -> list[inference_pb2.TensorSpec]:
    """A config's inputs or outputs as the contract's TensorSpecs."""
    return [
        inference_pb2.TensorSpec(
            name=e.name,
            datatype=kserve_datatype(e.data_type),
            shape=list(e.dims),
            # Only inputs can be optional; outputs have no such field.
            optional=getattr(e, "optional", False),
        )
        for e in entries
    ]


def parse_config(pbtxt: str) -> registry_pb2.TritonConfig:
    """The registered config.pbtxt as a TritonConfig, or InvalidArgument("config_pbtxt").

    Refuses what Triton would refuse to load: text that does not parse, no backend,
    no inputs or outputs, tensors without a name, type or dims, dims that are 0 or
    below -1. The `name` and `version_policy` are cleared from the kept text: a worker
    loads each version as version 1 of a model named by it (see render_config).
    """
    if len(pbtxt) > MAX_CONFIG_CHARS:
        raise InvalidArgument(FIELD, f"is {len(pbtxt)} characters; at most {MAX_CONFIG_CHARS}")
    model = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(pbtxt, model)
    except text_format.ParseError as exc:
        # "line:column : what", the same words Triton's loader would log.
        raise InvalidArgument(FIELD, f"does not parse as a Triton model config: {exc}") from exc
    backend = model.backend or _PLATFORM_BACKENDS.get(model.platform, model.platform)
    if not backend:
        raise InvalidArgument(FIELD, 'names no backend (e.g. backend: "python") or platform')
    if not _BACKEND.fullmatch(backend):
        # Triton finds a backend by its name on disk: a name is all it may be.
        raise InvalidArgument(FIELD, f"backend {backend[:64]!r} is not a backend name")
    if model.max_batch_size < 0:
        raise InvalidArgument(FIELD, f"max_batch_size is {model.max_batch_size}; it must be >= 0")
    _check_tensors("input", model.input)
    _check_tensors("output", model.output)
    params = {key: value.string_value for key, value in model.parameters.items()}
    model.ClearField("name")
    # Each registry version is version 1 of a Triton model of its own (the worker's
    # model repository); a policy naming other versions would leave nothing to load.
    model.ClearField("version_policy")
    return registry_pb2.TritonConfig(
        backend=backend,
        inputs=tensor_specs(model.input),
        outputs=tensor_specs(model.output),
        max_batch_size=model.max_batch_size,
        dynamic_batching=model.HasField("dynamic_batching"),
        decoupled=model.model_transaction_policy.decoupled,
        parameters=params,
        pbtxt=text_format.MessageToString(model),
    )


def _check_tensors(
    kind: str,
    entries: Iterable[model_config_pb2.ModelInput] | Iterable[model_config_pb2.ModelOutput],
) -> None:
    tensors = list(entries)
    if not tensors:
        raise InvalidArgument(FIELD, f"has no {kind}; a served model needs at least one")
    if len(tensors) > MAX_TENSORS:
        raise InvalidArgument(FIELD, f"has {len(tensors)} {kind}s; at most {MAX_TENSORS}")
    seen: set[str] = set()
    for position, tensor in enumerate(tensors):
        if not tensor.name:
            raise InvalidArgument(FIELD, f"{kind} #{position + 1} has no name")
        where = f"{kind} {shown(tensor.name)}"
        if tensor.name in seen:
            raise InvalidArgument(FIELD, f"{where} appears twice")
        seen.add(tensor.name)
        if tensor.data_type == model_config_pb2.TYPE_INVALID:
            raise InvalidArgument(FIELD, f"{where} has no data_type")
        if not tensor.dims:
            raise InvalidArgument(FIELD, f"{where} has no dims")
        bad = [d for d in tensor.dims if d == 0 or d < _WILDCARD_DIM]
        if bad:
            raise InvalidArgument(
                FIELD,
                f"{where} has dims {list(tensor.dims)}: each must be >= 1, "
                f"or -1 for a variable size",
            )


def render_config(
    config: registry_pb2.TritonConfig,
    *,
    triton_name: str,
    instances: int,
    parameters: Mapping[str, str],
) -> str:
    """The config.pbtxt a worker writes for a registered version.

    The registered text with `name` = triton_name, one instance group of `instances`
    (of the registered group's kind, KIND_CPU when it named none: how many instances
    run is the deployment's call, where they run is the model's), and `parameters`
    added as string parameters, replacing registered ones of the same key.
    """
    if instances < 1:
        raise ValueError(f"instances must be >= 1, not {instances}")
    if not config.pbtxt.strip():
        raise DataLoss("the registered Triton config has no config.pbtxt text")
    model = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(config.pbtxt, model)
    except text_format.ParseError as exc:
        # The registry only keeps text it parsed, so this is stored data gone bad.
        raise DataLoss(f"the registered Triton config no longer parses: {exc}") from exc
    model.name = triton_name
    group = model_config_pb2.ModelInstanceGroup(kind=model_config_pb2.ModelInstanceGroup.KIND_CPU)
    if model.instance_group:
        group.CopyFrom(model.instance_group[0])
    group.count = instances
    del model.instance_group[:]
    model.instance_group.append(group)
    for key, value in parameters.items():
        model.parameters[key].string_value = value
    return text_format.MessageToString(model)
