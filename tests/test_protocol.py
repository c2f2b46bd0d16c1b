"""The local API's framing and tensor encoding: pure functions, no sockets."""

import numpy as np
import pytest
from salala.node import BadRequestError
from salala.node._protocol import (
    HEADER,
    decode_tensors,
    encode_tensors,
    frame_length,
    pack_frame,
    unpack_body,
)


@pytest.mark.parametrize("dtype", ["float32", "float16", "int64", "int8", "bool", "uint8"])
def test_tensors_round_trip_exactly(dtype: str) -> None:
    array = (np.arange(24).reshape(2, 3, 4) % 3).astype(dtype)
    frame = pack_frame({"inputs": encode_tensors({"x": array, "empty": np.zeros((0, 5), dtype)})})
    (length,) = HEADER.unpack(frame[: HEADER.size])
    decoded = decode_tensors(unpack_body(frame[HEADER.size : HEADER.size + length])["inputs"])
    assert decoded["x"].dtype == array.dtype
    np.testing.assert_array_equal(decoded["x"], array)
    assert decoded["empty"].shape == (0, 5)


def test_non_contiguous_arrays_are_sent_in_logical_order() -> None:
    array = np.arange(12, dtype=np.float32).reshape(3, 4).T
    frame = pack_frame(encode_tensors({"x": array}))
    np.testing.assert_array_equal(decode_tensors(unpack_body(frame[HEADER.size :]))["x"], array)


@pytest.mark.parametrize(
    ("packed", "message"),
    [
        ({"dtype": "object", "shape": [1], "data": b"x"}, "unsupported dtype"),
        ({"dtype": "float32", "shape": [2, 3], "data": b"\0" * 8}, "8 bytes do not match"),
        ({"dtype": "float32", "shape": [-1], "data": b""}, "invalid shape"),
        ({"dtype": "float32", "shape": [1], "data": "text"}, "must be bytes"),
        ({"dtype": "float32", "shape": [1]}, "map of dtype, shape and data"),
        ([1, 2, 3], "map of dtype, shape and data"),
    ],
)
def test_malformed_tensors_are_refused_by_name(packed: object, message: str) -> None:
    with pytest.raises(BadRequestError, match=message) as caught:
        decode_tensors({"attention_mask": packed})
    assert "attention_mask" in str(caught.value)


def test_frames_over_the_limit_are_refused() -> None:
    with pytest.raises(BadRequestError, match="exceeds this node's limit of 100"):
        frame_length(HEADER.pack(101), limit=100)
    assert frame_length(HEADER.pack(100), limit=100) == 100


@pytest.mark.parametrize("body", [b"\xc1", b"\x93\x01\x02\x03", b"", b"\x81\x01\x02"])
def test_bodies_that_are_not_msgpack_maps_with_string_keys_are_refused(body: bytes) -> None:
    with pytest.raises(BadRequestError):
        unpack_body(body)
