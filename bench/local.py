"""One device: what the node's local API and fragment chaining cost over plain onnxruntime.

MiniLM (the default model), batch 1, 128 tokens, every session with the same threads.
"""

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from salala.models import ModelStore, builtin_models, split_stored
from salala.runtime import ModelSession

from ._node import running_node
from ._stats import summarize, time_calls

REPEATS = 200


def minilm_inputs() -> dict[str, np.ndarray]:
    """Batch 1, 128 tokens: the shape every benchmark here uses."""
    rng = np.random.default_rng(0)
    return {
        "input_ids": rng.integers(1000, 30000, (1, 128), dtype=np.int64),
        "attention_mask": np.ones((1, 128), dtype=np.int64),
        "token_type_ids": np.zeros((1, 128), dtype=np.int64),
    }


def run() -> list[dict[str, Any]]:
    model = builtin_models()["minilm"]
    feeds = minilm_inputs()
    rows: list[dict[str, Any]] = []

    plain = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    rows.append(
        {
            "setup": "onnxruntime defaults",
            **summarize(time_calls(lambda: plain.run(None, feeds), REPEATS)),
        }
    )

    session = ModelSession(model)
    rows.append(
        {
            "setup": "ModelSession (spinning off)",
            **summarize(time_calls(lambda: session.run(feeds), REPEATS)),
        }
    )

    with tempfile.TemporaryDirectory() as tmp:
        store = ModelStore(Path(tmp))
        stored = store.add(model, "minilm")
        for parts in (2, 3):
            sessions = [ModelSession(f.path) for f in split_stored(store, stored, parts).fragments]

            def chain(sessions: list[ModelSession] = sessions) -> None:
                values = dict(feeds)
                for stage in sessions:
                    values.update(stage.run({s.name: values[s.name] for s in stage.inputs}))

            rows.append(
                {
                    "setup": f"{parts} fragments chained in-process",
                    **summarize(time_calls(chain, REPEATS)),
                }
            )

        with running_node(Path(tmp) / "node") as client:
            rows.append(
                {
                    "setup": "local node API (Unix socket)",
                    **summarize(time_calls(lambda: client.infer("minilm", feeds), REPEATS)),
                }
            )
    return rows
