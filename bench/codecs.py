"""Activation codecs on real sentences: what each costs in accuracy and saves in bytes.

MiniLM (the default model) is cut into 3 fragments and run on ``SENTENCES``, tokenized
with the model's own tokenizer. At each cut, every tensor the next stages need goes
through a real inference frame (``encode_frame``, then split and decoded as a receiver
does), so the byte counts include the ids and masks that always travel raw and the
codec's own metadata. The README's codec table comes from this module, and
``tests/test_codecs.py`` asserts the README's bounds on the same measurement.

Errors are over real tokens only: padded positions cross the wire too, but nothing
downstream reads them. The reference is the uncut model in one session.
"""

import tempfile
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
from salala.mesh.wire import CODECS, encode_frame, payload_size
from salala.mesh.wire._codecs import decode, part_layout
from salala.models import (
    ModelStore,
    builtin_models,
    encode_texts,
    sentence_embeddings,
    split_stored,
)
from salala.runtime import ModelSession

PARTS = 3

# Real, varied English: short and long, in pairs on 16 topics, so that each sentence has
# a nearest neighbour worth keeping.
SENTENCES = (
    "The train to Edinburgh was cancelled because of a signal failure near York.",
    "Rail passengers heading north faced delays after a fault on the line.",
    "Preheat the oven to 200 degrees and roast the vegetables for forty minutes.",
    "Slice the onions thinly and fry them slowly until they turn golden brown.",
    "The striker scored twice in the second half to win the cup final.",
    "Our goalkeeper saved a penalty in the last minute of the match.",
    "Python raises a KeyError when you look up a missing key in a dictionary.",
    "The compiler rejected the program because a variable was used before it was declared.",
    "Interest rates rose again, and mortgage payments went up for millions of homeowners.",
    "The central bank kept borrowing costs unchanged to curb inflation.",
    "Take one tablet twice a day with food, and stop if you feel dizzy.",
    "The doctor said the rash would clear up within a week.",
    "We hiked along the ridge at dawn and watched the fog lift from the valley.",
    "The mountain trail was steep, muddy and covered in loose stones.",
    "She practised the violin sonata every evening for a month before the recital.",
    "The band played their new album from start to finish, then an old favourite.",
    "Heavy rain and strong winds are expected across the coast tomorrow.",
    "It will be sunny and warm this weekend, with light breezes in the afternoon.",
    "My laptop battery drains in two hours even when the screen is dimmed.",
    "The new phone charges fully in thirty minutes.",
    "Honeybees communicate the direction of flowers with a waggle dance.",
    "Octopuses can change the colour and texture of their skin in a fraction of a second.",
    "The museum opens a new exhibition of Roman coins and pottery next month.",
    "Archaeologists found the remains of a Viking ship buried under a farm.",
    "Please send me the signed contract by Friday so we can start on Monday.",
    "The meeting has been moved to Thursday afternoon in the small conference room.",
    "Children learn to read faster when someone reads aloud to them at home.",
    "The school added an extra hour of maths every week.",
    "How far is it?",
    "Where is the nearest pharmacy?",
    "I love this song.",
    "Turn the music up, this is my favourite track!",
)


def _through_frame(tensors: dict[str, np.ndarray], codec: str) -> tuple[int, dict[str, Any]]:
    """Bytes of the frame that carries ``tensors``, and the tensors a receiver decodes."""
    head, views = encode_frame({"kind": "infer", "rid": "bench"}, tensors, codec)
    header = msgpack.unpackb(head[4:], raw=False)
    payload = b"".join(bytes(view) for view in views)
    assert payload_size(header) == len(payload)
    decoded, offset = {}, 0
    for tensor in header["tensors"]:
        parts = []
        for (dtype, shape), size in zip(part_layout(tensor), tensor["sizes"], strict=True):
            parts.append(np.frombuffer(payload[offset : offset + size], dtype).reshape(shape))
            offset += size
        decoded[tensor["name"]] = decode(tensor, parts)
    return len(head) + len(payload), decoded


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine in float64, written so that identical rows give exactly 1."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(axis=1) / np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))


def _nearest(embeddings: np.ndarray) -> np.ndarray:
    """Each sentence's most similar other sentence."""
    similarity = embeddings @ embeddings.T
    np.fill_diagonal(similarity, -np.inf)
    return similarity.argmax(axis=1)


def _fragments(model: Path) -> list[ModelSession]:
    """The model cut into PARTS fragments, loaded (a session keeps no hold on its file)."""
    with tempfile.TemporaryDirectory(prefix="salala-bench-") as tmp:
        store = ModelStore(Path(tmp))
        plan = split_stored(store, store.add(model, "minilm"), PARTS)
        return [ModelSession(fragment.path) for fragment in plan.fragments]


def measure(codecs: tuple[str, ...] = CODECS) -> list[dict[str, Any]]:
    """Per codec, a row for each cut (wire bytes, the codec's own error) and one for the
    output (error, embedding cosine and nearest neighbours against the uncut model).

    The codec is applied at every cut, as a deployment with ``--codec`` does.
    """
    feeds = encode_texts(list(SENTENCES))
    real = feeds["attention_mask"].astype(bool)
    model = builtin_models()["minilm"]
    exact = ModelSession(model).run(feeds)["last_hidden_state"]
    exact_embeddings = sentence_embeddings(exact, feeds["attention_mask"])
    stages = _fragments(model)
    rows: list[dict[str, Any]] = []
    for codec in codecs:
        values: dict[str, np.ndarray] = dict(feeds)
        for cut, stage in enumerate(stages, start=1):
            values.update(stage.run({spec.name: values[spec.name] for spec in stage.inputs}))
            if cut == len(stages):
                break
            later = {spec.name for after in stages[cut:] for spec in after.inputs}
            sent = {name: value for name, value in values.items() if name in later}
            size, received = _through_frame(sent, codec)
            raw_size, _ = _through_frame(sent, "raw")
            error = max(
                float(np.abs(received[name] - value)[real].max())
                for name, value in sent.items()
                if value.dtype == np.float32
            )
            rows.append(
                {
                    "codec": codec,
                    "at": f"cut {cut}",
                    "wire_pct": round(100 * size / raw_size, 2),
                    "max_abs_err": error,
                }
            )
            values.update(received)
        last = values["last_hidden_state"]
        embeddings = sentence_embeddings(last, feeds["attention_mask"])
        kept = _nearest(embeddings) == _nearest(exact_embeddings)
        rows.append(
            {
                "codec": codec,
                "at": "output",
                "max_abs_err": float(np.abs(last - exact)[real].max()),
                "one_minus_cosine": float(1 - _cosines(embeddings, exact_embeddings).min()),
                "nn_kept_pct": round(100 * float(kept.mean()), 2),
            }
        )
    return rows


def run() -> list[dict[str, Any]]:
    return measure()
