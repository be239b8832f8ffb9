"""The API reference (docs/api.md) is complete and current, like the generated code."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))

import gen_api_docs  # noqa: E402


@pytest.fixture(scope="module")
def descriptors() -> descriptor_pb2.FileDescriptorSet:
    return gen_api_docs.descriptor_set()


def test_reference_is_current(descriptors: descriptor_pb2.FileDescriptorSet) -> None:
    text, _ = gen_api_docs.reference(descriptors)
    committed = gen_api_docs.OUT.read_text() if gen_api_docs.OUT.exists() else ""
    assert committed == text, "docs/api.md is stale; run `make api-docs` (or `make protos`)"


def test_every_public_element_has_a_comment(descriptors: descriptor_pb2.FileDescriptorSet) -> None:
    _, elements = gen_api_docs.reference(descriptors)
    kinds = {e.kind for e in elements}
    assert {"service", "rpc", "message", "field", "enum", "enum value"} <= kinds
    missing = gen_api_docs.undocumented(elements)
    assert not missing, "add a comment to each (then `make api-docs`):\n" + "\n".join(missing)


def test_an_uncommented_field_is_caught(descriptors: descriptor_pb2.FileDescriptorSet) -> None:
    # The check can fail: drop one field's comment from the source info and it is named.
    changed = descriptor_pb2.FileDescriptorSet()
    changed.CopyFrom(descriptors)
    proto = next(f for f in changed.file if f.name == "tensorgate/inference/v1/inference.proto")
    for location in proto.source_code_info.location:
        if list(location.path) == [4, 0, 2, 0]:  # Tensor.name
            location.ClearField("leading_comments")
            location.ClearField("trailing_comments")
    _, elements = gen_api_docs.reference(changed)
    assert gen_api_docs.undocumented(elements) == ["field tensorgate.inference.v1.Tensor.name"]


def test_reference_shows_each_rpc_with_its_comment() -> None:
    text = gen_api_docs.OUT.read_text()
    assert "### service `InferenceGateway`" in text
    assert (
        "`rpc Generate(tensorgate.inference.v1.GenerateRequest) returns "
        "(stream tensorgate.inference.v1.GenerateChunk)`" in text
    )
    assert "| `max_tokens` | `int32` |" in text
