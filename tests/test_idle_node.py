"""A node that only waits for work (a phone in the background) keeps onnxruntime, about
30 MiB, out of its memory until it runs a model: its throughput is measured in a child
process and the providers the build offers are recorded beside it."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import minilm_inputs, start_node

pytestmark = pytest.mark.slow


def loaded_onnxruntime(pid: int) -> bool:
    maps = Path(f"/proc/{pid}/maps").read_text()
    return "onnxruntime_pybind11_state" in maps


def test_an_idle_node_loads_onnxruntime_only_when_it_runs_a_model(tmp_path: Path) -> None:
    node = start_node(tmp_path / "node", "--threads", "1")
    try:
        with node.client() as client:
            status = client.status()
            assert status["capacity"]["gflops"] > 0  # measured, in a child
            assert "CPUExecutionProvider" in status["capacity"]["providers"]
            assert not loaded_onnxruntime(node.process.pid)
            outputs = client.infer("minilm", minilm_inputs(batch=1, tokens=8))
        assert np.isfinite(outputs["last_hidden_state"]).all()
        assert loaded_onnxruntime(node.process.pid)
    finally:
        node.stop()


def test_a_cached_figure_is_checked_without_loading_onnxruntime(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from salala import runtime\n"
        "first = runtime.cached_throughput(Path(sys.argv[1]), threads=1)\n"
        "assert runtime.cached_throughput(Path(sys.argv[1]), threads=1) == first\n"
        "assert first.offered and first.build, first\n"
        "print('onnxruntime' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "throughput.json")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
