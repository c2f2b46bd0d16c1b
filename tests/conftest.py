"""Shared fixtures: real node processes on loopback, real models from pip packages."""

import importlib.util
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from salala.models import builtin_models
from salala.node import Client, connect
from salala.node._launch import spawn_node, wait_ready

START_TIMEOUT_S = 60.0
LOOPBACK = "/ip4/127.0.0.1/tcp/0"


def ocr_model_path() -> Path:
    """PP-OCRv4 text recognition (a CNN + transformer), shipped in rapidocr's wheel."""
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    assert spec and spec.submodule_search_locations, "make install provides rapidocr"
    return Path(next(iter(spec.submodule_search_locations))) / "models/ch_PP-OCRv4_rec_infer.onnx"


def minilm_path() -> Path:
    return builtin_models()["minilm"]


def minilm_inputs(batch: int = 2, tokens: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, tokens), dtype=np.int64)
    mask[0, tokens // 2 :] = 0  # one padded row, so the attention mask matters
    return {
        "input_ids": rng.integers(1000, 30000, (batch, tokens), dtype=np.int64),
        "attention_mask": mask,
        "token_type_ids": np.zeros((batch, tokens), dtype=np.int64),
    }


def ocr_inputs(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.random((1, 3, 48, 320), dtype=np.float32)}


@dataclass
class NodeProcess:
    data_dir: Path
    process: subprocess.Popen[bytes]

    def client(self) -> Client:
        return connect(self.data_dir)

    def stop(self, timeout: float = 20.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def log(self) -> str:
        return (self.data_dir / "node.log").read_text(errors="replace")


def start_node(
    data_dir: Path,
    *extra: str,
    prefix: tuple[str, ...] = (),
    listen: str = LOOPBACK,
    mdns: bool = False,
) -> NodeProcess:
    """A real node process; returns once its API answers.

    mDNS is off unless asked for, and then only run inside a test's own network
    namespace (``prefix``): tests never multicast on the machine's real network.
    """
    assert not mdns or prefix[:3] == ("ip", "netns", "exec"), "mDNS only inside a test namespace"
    mdns_flag = () if mdns else ("--no-mdns",)
    process = spawn_node(data_dir, ["--listen", listen, *mdns_flag, *extra], list(prefix))
    wait_ready(data_dir, process, START_TIMEOUT_S)
    return NodeProcess(data_dir, process)


@pytest.fixture(scope="session")
def shared_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """One node for the API tests that leave it as they found it."""
    node = start_node(tmp_path_factory.mktemp("shared-node"))
    yield node
    assert node.stop() == 0, node.log()


@pytest.fixture
def client(shared_node: NodeProcess) -> Iterator[Client]:
    with shared_node.client() as connection:
        yield connection
