"""Activation codecs: how a float tensor travels between two stages.

- ``raw``: the bytes as they are; exact.
- ``fp16``: half the bytes; about 1e-3 relative error.
- ``int8``: a quarter of the bytes. One scale per token (per row of the last axis),
  because a scale per tensor is ruined by a few huge activations; and the 8 channels
  with the largest magnitude kept in fp16, because transformers concentrate outliers in
  a few channels (DESIGN.md records this lifting SmolLM2's top-1 agreement from 96.9 % to
  99.2 %, measured before this repository; bench/codecs.py measures MiniLM).

Only float32 tensors of rank >= 2 are compressed; ids, masks and everything else
travel raw. Encoding returns the parts to send and the metadata needed to decode.
"""

from typing import Any

import numpy as np

CODECS = ("raw", "fp16", "int8")
# Tensor dtypes that may cross any wire (the local API or between peers).
WIRE_DTYPES = frozenset(
    [
        "float16",
        "float32",
        "float64",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "bool",
    ]
)
OUTLIER_CHANNELS = 8


class CodecError(ValueError):
    """Metadata or bytes that do not decode to the declared tensor."""


def _compressible(array: np.ndarray) -> bool:
    return array.dtype == np.float32 and array.ndim >= 2 and array.shape[-1] > OUTLIER_CHANNELS


def encode(array: np.ndarray, codec: str) -> tuple[dict[str, Any], list[np.ndarray]]:
    """(metadata, arrays whose raw bytes follow in order)."""
    array = np.ascontiguousarray(array)
    meta: dict[str, Any] = {"dtype": array.dtype.name, "shape": list(array.shape), "codec": "raw"}
    if codec == "raw" or not _compressible(array):
        return meta, [array]
    if codec == "fp16":
        return {**meta, "codec": "fp16"}, [array.astype(np.float16)]
    if codec != "int8":
        raise CodecError(f"unknown codec {codec!r}; known: {', '.join(CODECS)}")
    rows = array.reshape(-1, array.shape[-1])
    outliers = np.sort(np.argsort(np.abs(rows).max(axis=0))[-OUTLIER_CHANNELS:]).astype(np.int32)
    rest = rows.copy()
    rest[:, outliers] = 0.0
    scales = (np.abs(rest).max(axis=1) / 127.0).astype(np.float32)
    safe = np.where(scales > 0, scales, 1.0)
    quantized = np.clip(np.rint(rest / safe[:, None]), -127, 127).astype(np.int8)
    kept = rows[:, outliers].astype(np.float16)
    return {**meta, "codec": "int8"}, [quantized, scales, outliers, np.ascontiguousarray(kept)]


def part_layout(meta: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """dtype and shape of each part, to split the received bytes before decoding."""
    shape = tuple(meta["shape"])
    codec = meta["codec"]
    if codec == "raw":
        return [(meta["dtype"], shape)]
    if codec == "fp16":
        return [("float16", shape)]
    if codec == "int8":
        rows = int(np.prod(shape[:-1]))
        return [
            ("int8", (rows, shape[-1])),
            ("float32", (rows,)),
            ("int32", (OUTLIER_CHANNELS,)),
            ("float16", (rows, OUTLIER_CHANNELS)),
        ]
    raise CodecError(f"unknown codec {codec!r}")


def decode(meta: dict[str, Any], parts: list[np.ndarray]) -> np.ndarray:
    shape = tuple(meta["shape"])
    codec = meta["codec"]
    if codec == "raw":
        return parts[0]
    if codec == "fp16":
        return parts[0].astype(np.float32)
    quantized, scales, outliers, kept = parts
    if outliers.min(initial=0) < 0 or outliers.max(initial=0) >= shape[-1]:
        raise CodecError("int8 outlier channel out of range")
    rows = quantized.astype(np.float32) * scales[:, None]
    rows[:, outliers] = kept.astype(np.float32)
    return rows.reshape(shape)
