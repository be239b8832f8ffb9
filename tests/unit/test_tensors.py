"""Tensor conversion and the input checks the worker makes before calling Triton."""

from __future__ import annotations

import numpy as np
import pytest
from tensorgate import from_tensor, to_tensor
from tensorgate.inference.v1 import inference_pb2
from tensorgate.tensors import decode_bytes, encode_bytes

from services.runtime.errors import InvalidArgument
from services.worker.tensors import check_input

IMAGE = inference_pb2.TensorSpec(name="image", datatype="FP32", shape=[64])


def test_numeric_round_trip_is_little_endian_row_major() -> None:
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    tensor = to_tensor("x", array)
    assert (tensor.datatype, list(tensor.shape)) == ("FP32", [3, 4])
    assert tensor.raw_contents == array.astype("<f4").tobytes()
    np.testing.assert_array_equal(from_tensor(tensor), array)


def test_bytes_round_trip() -> None:
    tensor = to_tensor("s", np.array(["héllo", "", "x"], dtype=object))
    assert tensor.datatype == "BYTES"
    assert decode_bytes(tensor.raw_contents) == ["héllo".encode(), b"", b"x"]
    assert from_tensor(tensor).tolist() == ["héllo".encode(), b"", b"x"]
    assert decode_bytes(encode_bytes([b"ab", b"c"])) == [b"ab", b"c"]


def test_truncated_bytes_are_refused() -> None:
    with pytest.raises(ValueError, match="middle of an element"):
        decode_bytes(encode_bytes([b"abcdef"])[:-2])


def test_good_batch_passes() -> None:
    check_input(to_tensor("image", np.zeros((5, 64), np.float32)), IMAGE, 64, "inputs[0]")


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        (to_tensor("image", np.zeros((2, 64), np.float64)), "datatype of 'image' must be FP32"),
        (
            to_tensor("image", np.zeros((2, 63), np.float32)),
            "shape of 'image' must be [N, 64], got [2, 63]: dimension 1 must be 64",
        ),
        (
            to_tensor("image", np.zeros(64, np.float32)),
            "shape of 'image' must be [N, 64], got 1 dimensions [64] instead of 2",
        ),
        (
            inference_pb2.Tensor(name="image", datatype="FP32", shape=[-1, 64]),
            "shape of 'image' must be [N, 64], got [-1, 64]: dimension 0 is -1, not a size",
        ),
        (to_tensor("image", np.zeros((65, 64), np.float32)), "batch size of 'image' must be 1..64"),
        (
            inference_pb2.Tensor(
                name="image", datatype="FP32", shape=[1, 64], raw_contents=b"\0" * 7
            ),
            "needs 256 bytes, got 7",
        ),
    ],
)
def test_bad_tensors_name_what_is_wrong(tensor: inference_pb2.Tensor, message: str) -> None:
    with pytest.raises(InvalidArgument) as error:
        check_input(tensor, IMAGE, 64, "inputs[0]")
    assert message in error.value.message
    assert error.value.violations[0].field == "inputs[0]"
