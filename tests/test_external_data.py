"""A model that keeps its weights in external data, held by one node, deploys over
the peers the plan names: its fragments (model plus data file) travel whole."""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import minilm_inputs, minilm_path
from mesh_helpers import formed, identity, mesh_of, wait_until

pytestmark = pytest.mark.slow


def minilm_with_external_data(folder: Path) -> Path:
    """MiniLM re-saved with its weights in one external file beside the graph."""
    folder.mkdir()
    path = folder / "model.onnx"
    onnx.save(
        onnx.load(str(minilm_path())),
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="model.onnx.data",
        size_threshold=1024,  # small shape constants stay inline: onnxruntime needs them so
    )
    return path


def test_a_model_with_external_data_spreads_over_the_planned_peers(tmp_path: Path) -> None:
    path = minilm_with_external_data(tmp_path / "external")
    feeds = minilm_inputs(batch=2, tokens=24, seed=5)
    expected = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[
        0
    ]
    with mesh_of(tmp_path, 3) as nodes:
        formed(nodes)
        ids = {identity(node)[0]: node for node in nodes}
        with nodes[0].client() as client:
            client.add_model(path, "minilm-ext")
            events: list[dict] = []
            deployment = client.deploy("minilm-ext", shards=3, on_progress=events.append)
        (planned,) = [e["stages"] for e in events if e.get("state") == "planned"]
        placed = [s["peers"] for s in deployment["stages"]]
        assert placed == planned
        assert len({peer for peers in placed for peer in peers}) == 3
        assert deployment["warnings"] == []
        for stage in deployment["stages"]:
            (host,) = stage["peers"]
            folder = ids[host].data_dir / "store" / "objects" / stage["fragment"]
            files = {p.name: p.stat().st_size for p in folder.iterdir()}
            assert set(files) == {"model.onnx", "model.onnx.data"}  # the fragment, whole
            ready = [
                e for e in events if e.get("stage") == stage["stage"] and e["state"] == "ready"
            ]
            assert [(e["bytes"], e["total"]) for e in ready] == [(sum(files.values()),) * 2]
        fetched = [e for e in events if e.get("state") == "fetching" and e["total"] > 1]
        remote = {s["stage"] for s in deployment["stages"] if s["peers"] != [identity(nodes[0])[0]]}
        assert remote and {e["stage"] for e in fetched} <= remote

        def answers() -> bool:
            for node in nodes:
                with node.client() as client:
                    outputs, route = client.infer_traced("minilm-ext", feeds)
                assert np.abs(outputs["last_hidden_state"] - expected).max() <= 1e-5
                assert [hop["peer"] for hop in route] == [p[0] for p in placed]
            return True

        wait_until(answers, 15, "every node answering through the three hosts")
