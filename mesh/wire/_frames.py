"""Inference frames: a msgpack header, then the raw bytes of every tensor part.

    [4-byte header length][msgpack header][part 0 bytes][part 1 bytes]...

The header names each tensor with its codec metadata and the byte size of each part,
so the receiver knows the whole frame's size before reading a byte of payload and can
refuse one over its limit. Parts are written from memoryviews in chunks of at most
4 MiB; nothing is copied on our side before py-libp2p frames it.
"""

import math
from typing import Any

import msgpack
import numpy as np
import trio
from libp2p.abc import INetStream

from .._errors import WireError
from . import _codecs
from ._budget import FrameBudget, Lease
from ._messages import HEADER, read_exactly, read_some, write_all
from ._schema import Check, SchemaError, validate

MAX_HEADER = 1 << 20
CHUNK = 4 << 20
# A frame's deadline grows with its size: a fixed one either declares a slow but live
# link dead on a big frame, or waits long on a dead one for a small frame. The floor is
# a poor Wi-Fi link to a phone; links are not measured yet (see docs/architecture.md).
FRAME_BASE_S = 10.0
FLOOR_RATE = 2 << 20  # bytes/s
STALL_S = 10.0  # a frame in progress that sends nothing for this long is abandoned


def frame_timeout(size: int) -> float:
    """Seconds a frame of ``size`` payload bytes may take to cross a live link."""
    return FRAME_BASE_S + size / FLOOR_RATE


def encode_frame(
    header: dict[str, Any], tensors: dict[str, np.ndarray], codec: str = "raw"
) -> tuple[bytes, list[memoryview]]:
    """The header bytes (with tensor metadata added) and the payload views to write."""
    described: list[dict[str, Any]] = []
    views: list[memoryview] = []
    for name, array in tensors.items():
        meta, parts = _codecs.encode(array, codec)
        described.append({"name": name, **meta, "sizes": [p.nbytes for p in parts]})
        views.extend(p.reshape(-1).view(np.uint8).data for p in parts)
    body = msgpack.packb({**header, "tensors": described}, use_bin_type=True)
    return HEADER.pack(len(body)) + body, views


async def write_frame(
    stream: INetStream, head: bytes, views: list[memoryview], timeout: float
) -> None:
    with trio.fail_after(timeout):
        await write_all(stream, head)
        for view in views:
            for start in range(0, len(view), CHUNK):
                await write_all(stream, view[start : start + CHUNK])


async def read_header(
    stream: INetStream, schema: Check, idle_timeout: float
) -> tuple[dict[str, Any], int]:
    """Wait (up to ``idle_timeout``) for the next frame; its header as ``schema`` admits it,
    with part sizes checked against shapes (SchemaError names a bad field)."""
    with trio.fail_after(idle_timeout):
        (length,) = HEADER.unpack(await read_exactly(stream, HEADER.size))
    if length > MAX_HEADER:
        raise WireError(f"frame header of {length} bytes is too large")
    with trio.fail_after(10):
        body = await read_exactly(stream, length, STALL_S)
    return parse_header(body, schema)


def parse_header(body: bytes, schema: Check) -> tuple[dict[str, Any], int]:
    """A frame header as ``schema`` admits it, and its payload size, with part sizes
    checked against shapes before anyone reads on (SchemaError names a bad field)."""
    try:
        header = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack's zoo of errors
        raise WireError(f"frame header is not msgpack: {exc}") from exc
    header = validate(header, schema)
    return header, payload_size(header)


def payload_size(header: dict[str, Any]) -> int:
    """Total payload bytes a schema-checked header announces; SchemaError names a tensor
    whose part sizes do not follow from its dtype, shape and codec."""
    total = 0
    for index, tensor in enumerate(header["tensors"]):
        layout = _codecs.part_layout(tensor)
        if tensor["codec"] != "raw" and (
            tensor["dtype"] != "float32" or len(tensor["shape"]) < 2 or not tensor["shape"][-1]
        ):
            raise SchemaError(f"tensors[{index}].codec", "only float32 of rank >= 2 is encoded")
        # Python integers: a product of huge dimensions must not wrap around.
        expected = [math.prod(shape) * np.dtype(dtype).itemsize for dtype, shape in layout]
        if tensor["sizes"] != expected:
            raise SchemaError(f"tensors[{index}].sizes", "do not match the tensor's shape")
        total += sum(expected)
    return total


async def read_payload(
    stream: INetStream, header: dict[str, Any], timeout: float
) -> dict[str, np.ndarray]:
    """Read and decode the tensors a validated header announced."""
    tensors = {}
    with trio.fail_after(timeout):
        for tensor in header["tensors"]:
            parts = []
            for (dtype, shape), size in zip(
                _codecs.part_layout(tensor), tensor["sizes"], strict=True
            ):
                data = await read_exactly(stream, size, STALL_S)
                parts.append(np.frombuffer(data, dtype=dtype).reshape(shape))
            try:
                tensors[str(tensor["name"])] = _codecs.decode(tensor, parts)
            except _codecs.CodecError as exc:
                raise WireError(f"tensor {tensor['name']!r}: {exc}") from exc
    return tensors


def decode_payload(header: dict[str, Any], payload: np.ndarray) -> dict[str, np.ndarray]:
    """The tensors of a frame whose payload arrived whole in one buffer (a direct link's):
    each a view into it, nothing copied unless a codec decodes it."""
    tensors, offset = {}, 0
    for tensor in header["tensors"]:
        parts = []
        for (dtype, shape), size in zip(_codecs.part_layout(tensor), tensor["sizes"], strict=True):
            parts.append(payload[offset : offset + size].view(dtype).reshape(shape))
            offset += size
        try:
            tensors[str(tensor["name"])] = _codecs.decode(tensor, parts)
        except _codecs.CodecError as exc:
            raise WireError(f"tensor {tensor['name']!r}: {exc}") from exc
    return tensors


async def read_leased_payload(
    stream: INetStream, header: dict[str, Any], size: int, budget: FrameBudget, peer_id: str
) -> tuple[dict[str, np.ndarray], Lease]:
    """Wait for room for ``size`` bytes in ``budget`` (and ``peer_id``'s share of it), then
    read the payload. The lease is the caller's to release once the frame's work is done;
    if reading fails it is released here."""
    lease = await budget.lease(peer_id, size)
    try:
        return await read_payload(stream, header, frame_timeout(size)), lease
    except BaseException:
        lease.release()
        raise


async def skip_payload(stream: INetStream, size: int, timeout: float) -> None:
    """Read and drop ``size`` payload bytes, in chunks, keeping the stream usable.

    Refusing a frame by resetting its stream makes the sender's write fail, and a sender
    reports a failed write as an unreachable peer: the requester would then replay the
    request around a live peer, racing the refusal that names the real cause.
    """
    with trio.fail_after(timeout):
        left = size
        while left:
            chunk = await read_some(stream, min(left, CHUNK), STALL_S)
            if not chunk:
                raise WireError(f"stream ended with {left} bytes of a refused frame unread")
            left -= len(chunk)
