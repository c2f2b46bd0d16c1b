"""Activation codecs: exact, half, and int8 per token with fp16 outlier channels."""

from typing import Any

import numpy as np
import pytest
from salala.mesh.wire import _codecs
from salala.mesh.wire._frames import encode_frame, payload_size

from bench.codecs import measure


def round_trip(array: np.ndarray, codec: str) -> np.ndarray:
    meta, parts = _codecs.encode(array, codec)
    assert [(p.dtype.name, p.shape) for p in parts] == [
        (d, s) for d, s in _codecs.part_layout(meta)
    ]
    copies = [np.frombuffer(p.tobytes(), dtype=p.dtype).reshape(p.shape) for p in parts]
    return _codecs.decode(meta, copies)


def activations(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    hidden = rng.standard_normal((2, 16, 384)).astype(np.float32)
    hidden[..., [5, 77, 300]] *= 60  # transformer-style outlier channels
    return hidden


def test_raw_is_exact_and_leaves_other_dtypes_alone() -> None:
    hidden = activations()
    np.testing.assert_array_equal(round_trip(hidden, "raw"), hidden)
    ids = np.arange(12, dtype=np.int64).reshape(3, 4)
    for codec in _codecs.CODECS:
        out = round_trip(ids, codec)
        assert out.dtype == np.int64
        np.testing.assert_array_equal(out, ids)


def test_fp16_halves_the_bytes_with_small_error() -> None:
    hidden = activations()
    _meta, parts = _codecs.encode(hidden, "fp16")
    assert sum(p.nbytes for p in parts) == hidden.nbytes // 2
    np.testing.assert_allclose(round_trip(hidden, "fp16"), hidden, rtol=1e-3, atol=1e-3)


def test_int8_keeps_outlier_channels_and_quarters_the_bytes() -> None:
    hidden = activations()
    _meta, parts = _codecs.encode(hidden, "int8")
    assert sum(p.nbytes for p in parts) < 0.35 * hidden.nbytes
    decoded = round_trip(hidden, "int8")
    np.testing.assert_allclose(decoded[..., [5, 77, 300]], hidden[..., [5, 77, 300]], rtol=1e-3)
    per_token = np.abs(decoded - hidden).max(axis=-1) / np.abs(hidden).max(axis=-1)
    assert per_token.max() < 0.2  # bounded by the token's own scale, not the outliers'


def test_frames_describe_every_part() -> None:
    hidden = activations()
    head, views = encode_frame(
        {"kind": "infer", "rid": "r"}, {"h": hidden, "m": np.ones((2, 16), np.int64)}, "int8"
    )
    assert head and sum(len(v) for v in views) > 0
    import msgpack

    header = msgpack.unpackb(head[4:], raw=False)
    assert payload_size(header) == sum(len(v) for v in views)


# What the README's codec table states, per codec: (bytes on the wire at each cut, % of
# raw; max abs error a cut adds; max abs error of the last hidden state; worst
# sentence-embedding cosine; nearest neighbours kept, %). Raw is bit-exact.
README_BOUNDS = {
    "raw": (100.0, 0.0, 0.0, 1.0, 100.0),
    "fp16": (51.0, 0.04, 0.002, 0.9999999, 100.0),
    "int8": (28.0, 0.04, 0.06, 0.9999, 100.0),
}


@pytest.fixture(scope="module")
def measured() -> list[dict[str, Any]]:
    """bench/codecs.py's measurement: real sentences through MiniLM in 3 fragments."""
    return measure()


@pytest.mark.parametrize("codec", _codecs.CODECS)
def test_the_readme_codec_table_holds_on_real_sentences(
    measured: list[dict[str, Any]], codec: str
) -> None:
    wire, cut_error, output_error, cosine, kept = README_BOUNDS[codec]
    rows = [row for row in measured if row["codec"] == codec]
    cuts = [row for row in rows if row["at"] != "output"]
    (output,) = (row for row in rows if row["at"] == "output")
    assert len(cuts) == 2
    for cut in cuts:
        assert cut["wire_pct"] <= wire, cut
        assert cut["max_abs_err"] <= cut_error, cut
    assert output["max_abs_err"] <= output_error, output
    assert 1 - output["one_minus_cosine"] >= cosine, output
    assert output["nn_kept_pct"] >= kept, output
