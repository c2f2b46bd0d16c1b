"""A node needs onnxruntime and numpy, not onnx: phones have no onnx wheel. A fresh
venv with ``pip install .`` (no extras) runs a node that joins a mesh, hosts a fragment
another node deployed, and answers correctly; splitting there says what to install."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from conftest import minilm_inputs, minilm_path, start_node
from mesh_helpers import deployed_everywhere, formed, identity
from salala.models import ModelStore, OnnxMissingError, split_stored
from salala.node import CannotSplitError

ROOT = Path(__file__).resolve().parent.parent


def test_splitting_without_onnx_names_the_extra_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ModelStore(tmp_path / "store")
    stored = store.add(minilm_path(), "minilm")  # storing and checking need no onnx
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` now fails
    stored = store.add(minilm_path(), "minilm-again")
    with pytest.raises(OnnxMissingError, match=r"pip install 'salala\[onnx\]'"):
        split_stored(store, stored, 2)
    import salala.models

    with pytest.raises(OnnxMissingError, match=r"analyze\(\) needs the onnx package"):
        salala.models.analyze  # noqa: B018  # loaded on first use


@pytest.fixture(scope="module")
def venv_without_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pip install .`` into a fresh venv: the dependencies a phone would get."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(ROOT)],
        check=True,
        timeout=900,
    )
    probe = subprocess.run([python, "-c", "import onnx"], capture_output=True)
    assert probe.returncode != 0, "pip install . must not bring onnx"
    return python


@pytest.mark.slow
def test_a_node_without_onnx_hosts_a_fragment_and_answers(
    tmp_path: Path, venv_without_onnx: Path
) -> None:
    planner = start_node(tmp_path / "planner", "--threads", "1")
    key = (planner.data_dir / "mesh.key").read_text().strip()
    _, address = identity(planner)
    # The node program run by the fresh venv's interpreter (the script is plain Python).
    bare = start_node(
        tmp_path / "bare",
        "--threads",
        "1",
        "--mesh-key",
        key,
        "--peer",
        address,
        prefix=(str(venv_without_onnx),),
    )
    nodes = [planner, bare]
    try:
        formed(nodes)
        bare_id, _ = identity(bare)
        with planner.client() as client:
            deployment = client.deploy("minilm", shards=2)
        deployed_everywhere(nodes, deployment["deployment"])
        feeds = minilm_inputs(batch=2, tokens=16, seed=3)
        whole = ort.InferenceSession(str(minilm_path()), providers=["CPUExecutionProvider"])
        expected = whole.run(["last_hidden_state"], feeds)[0]
        for node in nodes:
            with node.client() as client:
                result, route = client.infer_traced("minilm", feeds)
            assert bare_id in [hop["peer"] for hop in route]
            np.testing.assert_allclose(result["last_hidden_state"], expected, atol=1e-5)
        with bare.client() as client, pytest.raises(CannotSplitError, match=r"salala\[onnx\]"):
            client.split_model("minilm", 2)
    finally:
        for node in nodes:
            node.stop()
