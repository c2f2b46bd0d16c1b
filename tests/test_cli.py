"""The `salala` command, run as a user would: a real binary against a real node."""

import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import NodeProcess, minilm_inputs, minilm_path, start_node
from salala.node._launch import SALALA

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def salala(node: NodeProcess | Path, *args: str) -> subprocess.CompletedProcess[str]:
    data_dir = node if isinstance(node, Path) else node.data_dir
    return subprocess.run(
        [SALALA, *args, "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
    )


def test_node_status_json_has_peer_id_and_addrs(shared_node: NodeProcess) -> None:
    done = salala(shared_node, "node", "status", "--json")
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert status["peer_id"].startswith("12D3KooW") and status["addrs"]
    assert status["capacity"]["gflops"] > 0


def test_node_status_for_people_is_a_table(shared_node: NodeProcess) -> None:
    done = salala(shared_node, "node", "status")
    assert done.returncode == 0
    assert "peer id" in done.stdout and "GFLOP/s" in done.stdout


def test_models_list_and_add(shared_node: NodeProcess, tmp_path: Path) -> None:
    listed = json.loads(salala(shared_node, "models", "list", "--json").stdout)
    assert "minilm" in {m["name"] for m in listed}
    added = salala(
        shared_node, "models", "add", str(minilm_path()), "--name", "minilm-copy", "--json"
    )
    assert (
        json.loads(added.stdout)["sha256"]
        == next(m for m in listed if m["name"] == "minilm")["sha256"]
    )
    assert "minilm-copy" in salala(shared_node, "models", "list").stdout


def test_models_split_json_lists_the_fragment_files(shared_node: NodeProcess) -> None:
    done = salala(shared_node, "models", "split", "minilm", "--parts", "3", "--json")
    assert done.returncode == 0, done.stderr
    fragments = json.loads(done.stdout)["fragments"]
    assert len(fragments) == 3 and all(Path(f["path"]).is_file() for f in fragments)


def test_run_with_two_texts_prints_their_cosine_similarity(shared_node: NodeProcess) -> None:
    close = salala(
        shared_node,
        "run",
        "minilm",
        "--text",
        "A cat sits on the mat.",
        "--text",
        "A kitten is sitting on a rug.",
        "--json",
    )
    far = salala(
        shared_node,
        "run",
        "minilm",
        "--text",
        "A cat sits on the mat.",
        "--text",
        "Interest rates rose by a quarter point.",
        "--json",
    )
    assert close.returncode == 0, close.stderr
    close_result, far_result = json.loads(close.stdout), json.loads(far.stdout)
    assert len(close_result["embeddings"][0]) == 384
    assert close_result["cosine"] > 0.5 > far_result["cosine"]
    people = salala(shared_node, "run", "minilm", "--text", "hello", "--text", "hi there")
    assert "cosine similarity" in people.stdout


def test_run_with_npz_input_and_output(shared_node: NodeProcess, tmp_path: Path) -> None:
    feeds = minilm_inputs()
    np.savez(tmp_path / "in.npz", **feeds)
    done = salala(
        shared_node,
        "run",
        "minilm",
        "--input",
        str(tmp_path / "in.npz"),
        "--output",
        str(tmp_path / "out.npz"),
    )
    assert done.returncode == 0, done.stderr
    assert "last_hidden_state" in done.stdout
    with np.load(tmp_path / "out.npz") as out:
        assert out["last_hidden_state"].shape == (2, 16, 384)


def test_errors_are_one_line_and_exit_1(shared_node: NodeProcess, tmp_path: Path) -> None:
    unknown = salala(shared_node, "run", "nope", "--text", "x")
    assert unknown.returncode == 1 and unknown.stderr.startswith("error: unknown model 'nope'")
    bad = tmp_path / "bad.onnx"
    bad.write_text("not a model")
    refused = salala(shared_node, "models", "add", str(bad))
    assert refused.returncode == 1 and "not a valid ONNX model" in refused.stderr
    nobody = salala(tmp_path / "empty", "node", "status")
    assert nobody.returncode == 1 and "no node is running" in nobody.stderr


def test_make_run_streams_an_answer_from_smollm2_sharded_over_three_nodes() -> None:
    """The README's first command: SmolLM2 imported (once), in 3 stages on 3 nodes."""
    done = subprocess.run(
        ["make", "--no-print-directory", "run"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    placed = re.search(r"deployed smollm2@\S+: 0→(\w+), 1→(\w+), 2→(\w+)", done.stdout)
    assert placed and len(set(placed.groups())) == 3, done.stdout
    answer = re.search(r"> .*\n(.+)\n(\d+) tokens in [\d.]+ s through 3 nodes", done.stdout)
    assert answer and answer[1].strip() and int(answer[2]) > 0, done.stdout


def test_the_embedding_demo_shards_minilm() -> None:
    done = subprocess.run(
        [str(ROOT / ".venv/bin/salala"), "demo", "--nodes", "2"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "cosine similarity" in done.stdout and "Where each fragment ran" in done.stdout
    assert done.stdout.count("│ 0 ") + done.stdout.count("│ 1 ") >= 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--peer", "/ip4/127.0.0.1/tcp/1"], "needs a /p2p/<peer id> part"),
        (["--peer", "/ip4/127.0.0.1/tcp/1/p2p/notanid"], "invalid peer address"),
        (
            ["--interface", "nope0", "--listen", "/ip4/127.0.0.1/tcp/0"],
            "no usable IPv4 interface named",
        ),
        (["--listen", "/ip9/x"], "invalid listen address"),
        (["--join", "salala://join?x=1"], "--join: the join URI has no mesh key"),
        (["--mesh-key", "hunter2"], "mesh key"),
    ],
)
def test_bad_start_settings_are_one_clear_line(
    tmp_path: Path, args: list[str], message: str
) -> None:
    done = subprocess.run(
        [SALALA, "node", "start", "--data-dir", str(tmp_path), "--no-mdns", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr.startswith("error: ") and message in done.stderr
    assert "Traceback" not in done.stderr


def test_node_stop_is_answered_and_the_node_exits_cleanly(tmp_path: Path) -> None:
    node = start_node(tmp_path)
    try:
        done = salala(node, "node", "stop")
        assert done.returncode == 0, done.stderr
        assert "node stopping" in done.stdout
        assert node.process.wait(30) == 0
    finally:
        if node.process.poll() is None:
            node.process.kill()
            node.process.wait(10)


def _qr_image(text: str) -> np.ndarray:
    """The half-block QR code a terminal shows, as a grey image (one char: two modules
    stacked; a full block is two light ones), scaled up for a decoder."""
    lines = [line for line in text.splitlines() if line and set(line) <= set("█▀▄ ")]
    rows = []
    for line in lines:
        rows.append([255 if c in "█▀" else 0 for c in line])
        rows.append([255 if c in "█▄" else 0 for c in line])
    image = np.array(rows, dtype=np.uint8)
    return np.kron(image, np.ones((4, 4), dtype=np.uint8))


def test_mesh_invite_qr_encodes_the_join_uri(shared_node: NodeProcess) -> None:
    import zxingcpp

    done = salala(shared_node, "mesh", "invite", "--qr")
    assert done.returncode == 0, done.stderr
    uri = done.stdout.splitlines()[0]
    assert uri.startswith("salala://join?")
    found = zxingcpp.read_barcodes(_qr_image(done.stdout))
    assert [code.text for code in found] == [uri]
