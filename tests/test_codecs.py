"""Activation codecs: exact, half, and int8 per token with fp16 outlier channels."""

import numpy as np
import pytest
from conftest import minilm_path
from salala.mesh.wire import _codecs
from salala.mesh.wire._frames import encode_frame, payload_size
from salala.models import ModelStore, sentence_embeddings, split_stored
from salala.runtime import ModelSession


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


@pytest.fixture(scope="module")
def fragments(tmp_path_factory: pytest.TempPathFactory) -> list[ModelSession]:
    store = ModelStore(tmp_path_factory.mktemp("codec-store"))
    plan = split_stored(store, store.add(minilm_path(), "minilm"), 3)
    return [ModelSession(f.path) for f in plan.fragments]


def chained(sessions: list[ModelSession], feeds: dict[str, np.ndarray], codec: str) -> np.ndarray:
    values = dict(feeds)
    for stage in sessions:
        outputs = stage.run({spec.name: values[spec.name] for spec in stage.inputs})
        values.update({k: round_trip(v, codec) for k, v in outputs.items()})
    return values["last_hidden_state"]


@pytest.mark.parametrize(
    ("codec", "min_cosine"), [("raw", 1.0), ("fp16", 0.99999), ("int8", 0.998)]
)
def test_codec_error_on_real_minilm_activations(
    fragments: list[ModelSession], codec: str, min_cosine: float
) -> None:
    """The numbers the README quotes: sentence-embedding cosine against the exact chain."""
    from conftest import minilm_inputs

    feeds = minilm_inputs(batch=4, tokens=32, seed=5)
    exact = chained(fragments, feeds, "raw")
    approx = chained(fragments, feeds, codec)
    a = sentence_embeddings(exact, feeds["attention_mask"])
    b = sentence_embeddings(approx, feeds["attention_mask"])
    cosine = (a * b).sum(axis=1)
    assert cosine.min() >= min_cosine - 1e-6
    if codec == "raw":
        assert np.abs(approx - exact).max() == 0.0
