"""The worker's checks on a generation request, and Triton responses turned into chunks."""

from __future__ import annotations

import struct

import pytest
from tensorgate.inference.v1 import inference_pb2
from tensorgate.tensors import encode_bytes
from tritonclient.grpc import model_config_pb2, service_pb2

from services.runtime.errors import InvalidArgument
from services.worker.catalog import ModelCatalog, loaded_model
from services.worker.generation import check_generate, to_chunk, to_triton_stream_request


def _config(name: str, *, decoupled: bool, task: str) -> model_config_pb2.ModelConfig:
    config = model_config_pb2.ModelConfig(name=name, backend="python")
    config.model_transaction_policy.decoupled = decoupled
    config.parameters["task"].string_value = task
    config.parameters["context_length"].string_value = "32"
    config.parameters["tokenizer"].string_value = "bytes"
    return config


LM = loaded_model(1, _config("lm", decoupled=True, task="generate"))
CLASSIFIER = loaded_model(2, _config("cls", decoupled=False, task="infer"))


def _request(**fields: object) -> inference_pb2.GenerateRequest:
    values: dict[str, object] = {"model": "lm", "prompt": "hello", "max_tokens": 8}
    values.update(fields)
    return inference_pb2.GenerateRequest(**values)  # type: ignore[arg-type]


def test_a_good_request_passes_and_maps_every_parameter() -> None:
    request = _request(temperature=0.5, top_p=0.9, top_k=5, seed=42, stop=["\n\n"])
    check_generate(LM, request)
    triton = to_triton_stream_request(LM, request)
    assert (triton.model_name, triton.model_version) == ("lm", "1")
    inputs = dict(zip((i.name for i in triton.inputs), triton.raw_input_contents, strict=True))
    assert inputs["prompt"] == encode_bytes([b"hello"])
    assert struct.unpack("<i", inputs["max_tokens"]) == (8,)
    assert struct.unpack("<f", inputs["temperature"])[0] == pytest.approx(0.5)
    assert struct.unpack("<Q", inputs["seed"]) == (42,)
    assert inputs["stop"] == encode_bytes([b"\n\n"])


def test_unset_sampling_parameters_get_defaults_and_no_seed() -> None:
    triton = to_triton_stream_request(LM, _request())
    inputs = dict(zip((i.name for i in triton.inputs), triton.raw_input_contents, strict=True))
    assert struct.unpack("<f", inputs["temperature"]) == (1.0,)
    assert struct.unpack("<f", inputs["top_p"]) == (1.0,)
    assert "seed" not in inputs and "stop" not in inputs


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ({"prompt": ""}, "prompt", "must not be empty"),
        ({"prompt": "x" * 32}, "prompt", "is 32 tokens"),
        ({"max_tokens": 0}, "max_tokens", "must be between 1 and 27"),
        ({"max_tokens": -3}, "max_tokens", "got -3"),
        ({"max_tokens": 28}, "max_tokens", "context 32 minus 5 prompt tokens"),
        ({"temperature": -0.1}, "temperature", "must be >= 0"),
        ({"temperature": float("nan")}, "temperature", "must be >= 0"),
        ({"top_p": 0.0}, "top_p", "must be in (0, 1]"),
        ({"top_p": 1.5}, "top_p", "must be in (0, 1]"),
        ({"top_k": -1}, "top_k", "must be >= 0"),
        ({"stop": [""]}, "stop", "1..64 characters"),
        ({"stop": ["a"] * 9}, "stop", "at most 8"),
    ],
)
def test_bad_fields_are_named(fields: dict[str, object], field: str, message: str) -> None:
    with pytest.raises(InvalidArgument) as error:
        check_generate(LM, _request(**fields))
    assert error.value.violations[0].field == field
    assert message in error.value.message


def test_generate_on_an_infer_model_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="call Infer"):
        check_generate(CLASSIFIER, _request(model="cls"))


def test_catalog_resolves_newest_or_exact_version() -> None:
    newer = loaded_model(3, _config("lm", decoupled=True, task="generate"))
    catalog = ModelCatalog([LM, newer, CLASSIFIER])
    assert catalog.resolve("lm").label == "lm:3"
    assert catalog.resolve("lm:1").label == "lm:1"


def _response(text: bytes, ids: list[int], reason: bytes = b"") -> service_pb2.ModelInferResponse:
    response = service_pb2.ModelInferResponse(model_name="lm", model_version="1")
    for name, datatype, raw in [
        ("text", "BYTES", encode_bytes([text])),
        ("token_ids", "INT32", struct.pack(f"<{len(ids)}i", *ids)),
        ("finish_reason", "BYTES", encode_bytes([reason])),
        ("prompt_tokens", "INT32", struct.pack("<i", 5)),
        ("completion_tokens", "INT32", struct.pack("<i", 7)),
    ]:
        response.outputs.add(name=name, datatype=datatype, shape=[1])
        response.raw_output_contents.append(raw)
    return response


def test_chunks_carry_usage_only_at_the_end() -> None:
    middle = to_chunk("lm:1", [_response("é".encode(), [195, 169])])
    assert (middle.text, list(middle.token_ids), middle.model) == ("é", [195, 169], "lm:1")
    assert not middle.HasField("usage") and middle.finish_reason == 0
    last = to_chunk("lm:1", [_response(b"", [], b"length")])
    assert last.finish_reason == inference_pb2.FINISH_REASON_LENGTH
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (5, 7)


def test_tokens_waiting_together_become_one_chunk() -> None:
    # A character split across two byte tokens decodes whole once they are joined.
    first, second = "é".encode()[:1], "é".encode()[1:]
    chunk = to_chunk(
        "lm:1",
        [_response(first, [195]), _response(second, [169]), _response(b"!", [33], b"stop")],
    )
    assert (chunk.text, list(chunk.token_ids)) == ("é!", [195, 169, 33])
    assert chunk.finish_reason == inference_pb2.FINISH_REASON_STOP
    assert chunk.usage.completion_tokens == 7
