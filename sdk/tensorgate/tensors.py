"""numpy arrays to and from tensorgate's KServe v2 tensors (raw little-endian bytes)."""

from __future__ import annotations

import struct
from collections.abc import Iterable

import numpy as np
import numpy.typing as npt

from tensorgate.inference.v1 import inference_pb2

_LENGTH = struct.Struct("<I")

DATATYPES: dict[str, str] = {
    "bool": "BOOL",
    "uint8": "UINT8",
    "uint16": "UINT16",
    "uint32": "UINT32",
    "uint64": "UINT64",
    "int8": "INT8",
    "int16": "INT16",
    "int32": "INT32",
    "int64": "INT64",
    "float16": "FP16",
    "float32": "FP32",
    "float64": "FP64",
}
NUMPY_TYPES = {datatype: np.dtype(name).newbyteorder("<") for name, datatype in DATATYPES.items()}


def encode_bytes(items: Iterable[bytes]) -> bytes:
    """BYTES contents: each element prefixed with its 4-byte little-endian length."""
    return b"".join(_LENGTH.pack(len(item)) + item for item in items)


def decode_bytes(raw: bytes) -> list[bytes]:
    items, offset = [], 0
    while offset + _LENGTH.size <= len(raw):
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += _LENGTH.size
        items.append(raw[offset : offset + length])
        offset += length
    if offset != len(raw):
        raise ValueError("BYTES contents end in the middle of an element")
    return items


def to_tensor(name: str, array: npt.ArrayLike, datatype: str | None = None) -> inference_pb2.Tensor:
    """A numpy array (or nested lists) as a tensor; strings and bytes become BYTES."""
    values = np.asarray(array)
    if values.dtype.kind in "OSU":
        items = [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in values.ravel()]
        return inference_pb2.Tensor(
            name=name, datatype="BYTES", shape=values.shape, raw_contents=encode_bytes(items)
        )
    datatype = datatype or DATATYPES.get(values.dtype.name)
    if datatype not in NUMPY_TYPES:
        raise ValueError(f"{name}: no KServe datatype for numpy dtype {values.dtype}")
    data = np.ascontiguousarray(values, dtype=NUMPY_TYPES[datatype])
    return inference_pb2.Tensor(
        name=name, datatype=datatype, shape=data.shape, raw_contents=data.tobytes()
    )


def from_tensor(tensor: inference_pb2.Tensor) -> npt.NDArray[np.generic]:
    if tensor.datatype == "BYTES":
        return np.array(decode_bytes(tensor.raw_contents), dtype=object).reshape(
            tuple(tensor.shape)
        )
    dtype = NUMPY_TYPES.get(tensor.datatype)
    if dtype is None:
        raise ValueError(f"{tensor.name}: unsupported datatype {tensor.datatype}")
    return np.frombuffer(tensor.raw_contents, dtype=dtype).reshape(tuple(tensor.shape))
