"""Triton model configs: what the registry reads from config.pbtxt, what workers write."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import text_format
from tensorgate.inference.v1 import inference_pb2
from tensorgate.registry.v1 import registry_pb2
from tritonclient.grpc import model_config_pb2

from services.runtime.errors import DataLoss, InvalidArgument
from services.runtime.triton_config import (
    kserve_datatype,
    parse_config,
    render_config,
)

MODELS = Path(__file__).resolve().parents[2] / "models" / "repository"


def _spec(name: str, datatype: str, shape: list[int], optional: bool = False) -> object:
    return inference_pb2.TensorSpec(name=name, datatype=datatype, shape=shape, optional=optional)


def test_digits_config_is_read_field_by_field() -> None:
    config = parse_config((MODELS / "digits" / "config.pbtxt").read_text())
    assert config.backend == "python"
    assert list(config.inputs) == [_spec("image", "FP32", [64])]
    assert list(config.outputs) == [
        _spec("probabilities", "FP32", [10]),
        _spec("label", "INT64", [1]),
    ]
    assert config.max_batch_size == 64
    assert config.dynamic_batching is True
    assert config.decoupled is False
    assert dict(config.parameters) == {
        "task": "infer",
        "description": "Digits: MLP classifying 8x8 handwritten digits "
        "(raw load_digits rows, pixel values 0..16)",
    }
    kept = text_format.Parse(config.pbtxt, model_config_pb2.ModelConfig())
    assert kept.name == ""
    assert kept.max_batch_size == 64 and kept.instance_group[0].count == 1


def test_tinylm_config_is_read_field_by_field() -> None:
    config = parse_config((MODELS / "tinylm" / "config.pbtxt").read_text())
    assert config.backend == "python"
    assert list(config.inputs) == [
        _spec("prompt", "BYTES", [1]),
        _spec("max_tokens", "INT32", [1]),
        _spec("temperature", "FP32", [1]),
        _spec("top_p", "FP32", [1]),
        _spec("top_k", "INT32", [1]),
        _spec("seed", "UINT64", [1], optional=True),
        _spec("stop", "BYTES", [-1], optional=True),
    ]
    assert [(s.name, s.datatype, list(s.shape)) for s in config.outputs] == [
        ("text", "BYTES", [1]),
        ("token_ids", "INT32", [-1]),
        ("finish_reason", "BYTES", [1]),
        ("prompt_tokens", "INT32", [1]),
        ("completion_tokens", "INT32", [1]),
    ]
    assert config.max_batch_size == 0
    assert config.dynamic_batching is False
    assert config.decoupled is True
    params = dict(config.parameters)
    assert params.pop("description").startswith("TinyLM: ")
    assert params == {
        "task": "generate",
        "context_length": "256",
        "tokenizer": "bytes",
        "max_stop_sequences": "8",
        "max_stop_length": "64",
        "max_concurrency": "2",
    }
    assert "tinylm" not in config.pbtxt


def test_the_kept_text_parses_to_the_same_facts() -> None:
    first = parse_config((MODELS / "tinylm" / "config.pbtxt").read_text())
    assert parse_config(first.pbtxt) == first


def test_a_platform_only_config_names_its_backend() -> None:
    config = parse_config(
        'platform: "onnxruntime_onnx"\n'
        'input { name: "x" data_type: TYPE_FP16 dims: [ -1, 3 ] }\n'
        'output { name: "y" data_type: TYPE_BF16 dims: [ 2 ] }\n'
    )
    assert config.backend == "onnxruntime"
    assert [s.datatype for s in (*config.inputs, *config.outputs)] == ["FP16", "BF16"]


@pytest.mark.parametrize(
    ("data_type", "datatype"),
    [
        (model_config_pb2.TYPE_FP32, "FP32"),
        (model_config_pb2.TYPE_STRING, "BYTES"),
        (model_config_pb2.TYPE_BOOL, "BOOL"),
        (model_config_pb2.TYPE_UINT8, "UINT8"),
    ],
)
def test_triton_types_get_their_kserve_names(data_type: int, datatype: str) -> None:
    assert kserve_datatype(data_type) == datatype


_IO = (
    'input { name: "x" data_type: TYPE_FP32 dims: [ 4 ] }\n'
    'output { name: "y" data_type: TYPE_FP32 dims: [ 1 ] }\n'
)


@pytest.mark.parametrize(
    ("pbtxt", "says"),
    [
        ('backend: "python"\nbogus_field: 1\n' + _IO, "2:1 : "),
        ("backend: python\n" + _IO, "1:10 : "),
        (_IO, "names no backend"),
        ('backend: "python"\noutput { name: "y" data_type: TYPE_FP32 dims: [ 1 ] }', "no input"),
        ('backend: "python"\ninput { name: "x" data_type: TYPE_FP32 dims: [ 1 ] }', "no output"),
        ('backend: "python"\nmax_batch_size: -1\n' + _IO, "max_batch_size is -1"),
        (
            'backend: "python"\ninput { name: "x" data_type: TYPE_FP32 dims: [ 4, 0 ] }\n' + _IO,
            "dims [4, 0]",
        ),
        (
            'backend: "python"\ninput { name: "z" data_type: TYPE_FP32 dims: [ -2 ] }\n' + _IO,
            "input 'z' has dims [-2]",
        ),
        ('backend: "python"\ninput { name: "z" data_type: TYPE_FP32 }\n' + _IO, "has no dims"),
        ('backend: "python"\ninput { name: "z" dims: [ 1 ] }\n' + _IO, "has no data_type"),
        ('backend: "python"\ninput { data_type: TYPE_FP32 dims: [ 1 ] }\n' + _IO, "#1 has no name"),
        ('backend: "python"\n' + _IO + _IO, "input 'x' appears twice"),
        (
            'backend: "python"\n'
            + "".join(
                f'input {{ name: "i{n}" data_type: TYPE_FP32 dims: [ 1 ] }}\n' for n in range(65)
            )
            + _IO.split("\n")[1],
            "has 65 inputs; at most 64",
        ),
        ("#" * (256 * 1024 + 1), "characters; at most"),
    ],
)
def test_configs_triton_would_refuse_are_refused(pbtxt: str, says: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        parse_config(pbtxt)
    assert refused.value.violations[0].field == "config_pbtxt"
    assert says in refused.value.message


def test_render_sets_name_instances_and_parameters() -> None:
    registered = parse_config((MODELS / "digits" / "config.pbtxt").read_text())
    text = render_config(
        registered,
        triton_name="digits__v3",
        instances=3,
        parameters={"tensorgate_model": "digits", "tensorgate_version": "3", "task": "x"},
    )
    rendered = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert rendered.name == "digits__v3"
    assert [(g.kind, g.count) for g in rendered.instance_group] == [
        (model_config_pb2.ModelInstanceGroup.KIND_CPU, 3)
    ]
    params = {key: value.string_value for key, value in rendered.parameters.items()}
    assert params["tensorgate_model"] == "digits"
    assert params["tensorgate_version"] == "3"
    assert params["task"] == "x"
    assert params["description"].startswith("Digits: ")
    # Everything else is the registered config as it was.
    again = parse_config(text)
    assert (again.inputs, again.outputs) == (registered.inputs, registered.outputs)
    assert (again.max_batch_size, again.dynamic_batching) == (64, True)


def test_render_keeps_the_instance_kind_and_defaults_to_cpu() -> None:
    gpu = parse_config('backend: "python"\ninstance_group [ { kind: KIND_GPU count: 2 } ]\n' + _IO)
    text = render_config(gpu, triton_name="m", instances=1, parameters={})
    groups = text_format.Parse(text, model_config_pb2.ModelConfig()).instance_group
    assert [(g.kind, g.count) for g in groups] == [
        (model_config_pb2.ModelInstanceGroup.KIND_GPU, 1)
    ]

    bare = parse_config('backend: "python"\n' + _IO)
    text = render_config(bare, triton_name="m", instances=2, parameters={})
    groups = text_format.Parse(text, model_config_pb2.ModelConfig()).instance_group
    assert [(g.kind, g.count) for g in groups] == [
        (model_config_pb2.ModelInstanceGroup.KIND_CPU, 2)
    ]


def test_render_refuses_what_it_cannot_write() -> None:
    registered = parse_config('backend: "python"\n' + _IO)
    with pytest.raises(ValueError, match="instances must be >= 1"):
        render_config(registered, triton_name="m", instances=0, parameters={})
    with pytest.raises(DataLoss, match=r"no config\.pbtxt"):
        render_config(registry_pb2.TritonConfig(), triton_name="m", instances=1, parameters={})


def test_the_name_and_a_version_policy_are_not_kept() -> None:
    # A worker loads each registry version as version 1 of a model it names: a policy
    # asking for version 7 would leave Triton nothing to load.
    pbtxt = (MODELS / "digits" / "config.pbtxt").read_text()
    pbtxt += "\nversion_policy { specific { versions: [7] } }\n"
    kept = text_format.Parse(parse_config(pbtxt).pbtxt, model_config_pb2.ModelConfig())
    assert kept.name == "" and not kept.HasField("version_policy")
