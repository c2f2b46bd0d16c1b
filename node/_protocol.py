"""The local API's wire format, shared by the server and both client faces.

One frame is a 4-byte big-endian length and a msgpack map. Requests are
``{"id", "method", "params"}``; replies are ``{"id", "ok": true, "result"}`` or
``{"id", "ok": false, "error": {"code", "message"}}``. A tensor is
``{"dtype", "shape", "data"}`` with its raw bytes. A tensor is copied once each way:
msgpack packs it from a memoryview into the body, which is written after its length
(not joined to it), and a body is received with ``recv_into`` into one buffer allocated
at its announced length, which msgpack reads the tensor out of.
"""

import struct
from collections.abc import Mapping
from typing import Any

import msgpack
import numpy as np

from ..mesh.wire import WIRE_DTYPES as ALLOWED_DTYPES  # one list for every wire
from ._errors import BadRequestError

HEADER = struct.Struct(">I")
MAX_FRAME_LIMIT = HEADER.size + 0xFFFFFFFF


def frame_parts(message: Mapping[str, Any]) -> tuple[bytes, bytes]:
    """A frame as its two writes: the length, then the body."""
    body = msgpack.packb(message, use_bin_type=True)
    return HEADER.pack(len(body)), body


def pack_frame(message: Mapping[str, Any]) -> bytes:
    return b"".join(frame_parts(message))


def frame_length(header: bytes | bytearray, limit: int) -> int:
    (length,) = HEADER.unpack(header)
    if length > limit:
        raise BadRequestError(f"message of {length} bytes exceeds this node's limit of {limit}")
    return length


def unpack_body(body: bytes | bytearray) -> dict[str, Any]:
    try:
        message = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises a zoo of ValueError/ExtraData/...
        raise BadRequestError(f"message is not valid msgpack: {exc}") from exc
    if not isinstance(message, dict):
        raise BadRequestError(f"message must be a map, not {type(message).__name__}")
    return message


def encode_tensor(array: np.ndarray) -> dict[str, Any]:
    array = np.ascontiguousarray(array)
    if array.dtype.name not in ALLOWED_DTYPES:
        raise BadRequestError(f"tensors of dtype {array.dtype} cannot be sent")
    data = array.reshape(-1).view(np.uint8).data  # a memoryview of the raw bytes, no copy
    return {"dtype": array.dtype.name, "shape": list(array.shape), "data": data}


def decode_tensor(name: str, packed: Any) -> np.ndarray:
    if not isinstance(packed, dict) or set(packed) != {"dtype", "shape", "data"}:
        raise BadRequestError(f"tensor {name!r} must be a map of dtype, shape and data")
    dtype, shape, data = packed["dtype"], packed["shape"], packed["data"]
    if dtype not in ALLOWED_DTYPES:
        raise BadRequestError(f"tensor {name!r} has unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise BadRequestError(f"tensor {name!r} has invalid shape {shape!r}")
    if not isinstance(data, bytes):
        raise BadRequestError(f"tensor {name!r} data must be bytes")
    expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if expected != len(data):
        raise BadRequestError(
            f"tensor {name!r}: {len(data)} bytes do not match shape {shape} of {dtype} "
            f"({expected} bytes)"
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def encode_tensors(tensors: Mapping[str, np.ndarray]) -> dict[str, Any]:
    return {name: encode_tensor(np.asarray(value)) for name, value in tensors.items()}


def decode_tensors(packed: Any) -> dict[str, np.ndarray]:
    if not isinstance(packed, dict) or not all(isinstance(k, str) for k in packed):
        raise BadRequestError("tensors must be a map from names to tensors")
    return {name: decode_tensor(name, value) for name, value in packed.items()}
