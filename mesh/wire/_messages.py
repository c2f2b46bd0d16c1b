"""Framed msgpack messages on libp2p streams, with a deadline on every read and write.

A frame is a 4-byte big-endian length and a msgpack map. py-libp2p's ``stream.read(n)``
returns *up to* n bytes, so reads loop until they have the whole frame; every peer is
untrusted, so lengths are capped before anything is allocated.
"""

import math
import struct
from typing import Any

import msgpack
import trio
from libp2p.abc import INetStream
from libp2p.exceptions import BaseLibp2pError

from .._errors import WireError
from ._schema import Check, validate

HEADER = struct.Struct(">I")
DEFAULT_MAX_FRAME = 1 << 20  # control messages; tensors get their own limit
IO_TIMEOUT_S = 10.0
_CHUNK = 1 << 20


def pack(message: dict[str, Any]) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    return HEADER.pack(len(body)) + body


def unpack(body: bytes) -> dict[str, Any]:
    try:
        message = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises ValueError, ExtraData, FormatError, ...
        raise WireError(f"not msgpack: {exc}") from exc
    if not isinstance(message, dict):
        raise WireError(f"expected a map, got {type(message).__name__}")
    return message


async def read_some(stream: INetStream, count: int, stall: float | None = None) -> bytes:
    """Up to ``count`` bytes, ``b""`` at the stream's end, within ``stall`` seconds.

    py-libp2p's own errors (a reset, a closed connection) become WireError here, so a
    peer breaking a stream never surfaces as a libp2p exception above the wire.
    """
    try:
        with trio.fail_after(stall if stall is not None else math.inf):
            return await stream.read(count)
    except EOFError:  # StreamEOF and the muxer's EOF both derive from it
        return b""
    except BaseLibp2pError as exc:
        raise WireError(f"the peer broke the stream: {exc!r}") from exc


async def write_all(stream: INetStream, data: bytes | memoryview) -> None:
    """Write ``data``; WireError if the peer broke the stream."""
    try:
        await stream.write(data)  # type: ignore[arg-type]  # any buffer will do
    except BaseLibp2pError as exc:
        raise WireError(f"the peer broke the stream: {exc!r}") from exc


async def read_exactly(stream: INetStream, count: int, stall: float | None = None) -> bytes:
    """Exactly ``count`` bytes (py-libp2p's read returns up to n); each read within
    ``stall`` seconds, so a peer that trickles cannot hold a reader forever."""
    buffer = bytearray()
    while len(buffer) < count:
        chunk = await read_some(stream, min(count - len(buffer), _CHUNK), stall)
        if not chunk:
            raise WireError(f"stream ended after {len(buffer)} of {count} bytes")
        buffer += chunk
    return bytes(buffer)


async def read_message(
    stream: INetStream,
    schema: Check,
    timeout: float = IO_TIMEOUT_S,
    max_frame: int = DEFAULT_MAX_FRAME,
) -> Any:
    """The next message, as ``schema`` admits it; SchemaError names a bad field."""
    with trio.fail_after(timeout):
        (length,) = HEADER.unpack(await read_exactly(stream, HEADER.size))
        if length > max_frame:
            raise WireError(f"frame of {length} bytes exceeds the limit of {max_frame}")
        return validate(unpack(await read_exactly(stream, length)), schema)


async def write_message(
    stream: INetStream, message: dict[str, Any], timeout: float = IO_TIMEOUT_S
) -> None:
    with trio.fail_after(timeout):
        await write_all(stream, pack(message))
