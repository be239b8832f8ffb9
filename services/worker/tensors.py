"""Tensor checks and the KServe v2 conversions between tensorgate and Triton messages.

Tensor bytes are never decoded here: a checked input's raw contents go to
Triton as they came, and Triton's raw outputs come back the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from tensorgate.inference.v1 import inference_pb2
from tensorgate.tensors import NUMPY_TYPES, decode_bytes
from tritonclient.grpc import service_pb2

from services.runtime.errors import InvalidArgument

# BF16 has no numpy type; every other numeric datatype's size is its numpy itemsize.
ELEMENT_SIZE = {datatype: dtype.itemsize for datatype, dtype in NUMPY_TYPES.items()} | {"BF16": 2}


def check_input(
    tensor: inference_pb2.Tensor, spec: inference_pb2.TensorSpec, max_batch_size: int, field: str
) -> None:
    """Raises InvalidArgument unless `tensor` fits `spec` (datatype, shape, byte size)."""
    if tensor.datatype != spec.datatype:
        raise InvalidArgument(
            field,
            f"datatype of {spec.name!r} must be {spec.datatype}, got {tensor.datatype or 'none'}",
        )
    expected = list(spec.shape)
    if max_batch_size > 0:
        expected = [-1, *expected]
    shape = list(tensor.shape)
    want = f"shape of {spec.name!r} must be {_shape(expected)}"
    if len(shape) != len(expected):
        raise InvalidArgument(
            field, f"{want}, got {len(shape)} dimensions {_dims(shape)} instead of {len(expected)}"
        )
    for index, (size, wanted) in enumerate(zip(shape, expected, strict=True)):
        if size < 0:
            raise InvalidArgument(
                field, f"{want}, got {_dims(shape)}: dimension {index} is {size}, not a size"
            )
        if wanted != -1 and size != wanted:
            raise InvalidArgument(
                field, f"{want}, got {_dims(shape)}: dimension {index} must be {wanted}"
            )
    if max_batch_size > 0 and not 1 <= shape[0] <= max_batch_size:
        raise InvalidArgument(
            field, f"batch size of {spec.name!r} must be 1..{max_batch_size}, got {shape[0]}"
        )
    count = math.prod(shape)
    if tensor.datatype == "BYTES":
        try:
            elements = len(decode_bytes(tensor.raw_contents))
        except ValueError as exc:
            raise InvalidArgument(field, f"{spec.name!r}: {exc}") from None
        if elements != count:
            raise InvalidArgument(
                field, f"{spec.name!r} must hold {count} length-prefixed elements"
            )
        return
    size = count * ELEMENT_SIZE[tensor.datatype]
    if len(tensor.raw_contents) != size:
        raise InvalidArgument(
            field,
            f"{spec.name!r} with shape {_shape(shape)} and datatype "
            f"{tensor.datatype} needs {size} bytes, got "
            f"{len(tensor.raw_contents)}",
        )


def _shape(shape: Sequence[int]) -> str:
    """An expected shape, with N for a variable dimension."""
    return "[" + ", ".join("N" if d == -1 else str(d) for d in shape) + "]"


def _dims(shape: Sequence[int]) -> str:
    """A shape a caller sent, as sent."""
    return "[" + ", ".join(map(str, shape)) + "]"


def to_triton_request(
    model: str, version: str, request: inference_pb2.InferRequest
) -> service_pb2.ModelInferRequest:
    """The same tensors as a KServe v2 request; raw contents are referenced, not decoded."""
    triton = service_pb2.ModelInferRequest(model_name=model, model_version=version)
    # Field by field: cheaper than keyword construction on the per-call path.
    inputs, contents = triton.inputs, triton.raw_input_contents
    for tensor in request.inputs:
        entry = inputs.add()
        entry.name = tensor.name
        entry.datatype = tensor.datatype
        entry.shape.extend(tensor.shape)
        contents.append(tensor.raw_contents)
    for name in request.outputs:
        triton.outputs.add().name = name
    return triton


def from_triton_response(
    label: str, response: service_pb2.ModelInferResponse
) -> inference_pb2.InferResponse:
    result = inference_pb2.InferResponse(model=label)
    outputs = result.outputs
    for output, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        tensor = outputs.add()
        tensor.name = output.name
        tensor.datatype = output.datatype
        tensor.shape.extend(output.shape)
        tensor.raw_contents = raw
    return result
