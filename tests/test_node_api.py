"""A real node process, driven through its Unix socket by the Python client."""

import os
import socket
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import trio
from conftest import NodeProcess, minilm_inputs, minilm_path, start_node
from models_for_tests import linear_model, point_external_data_at
from salala.node import (
    BadRequestError,
    Client,
    InvalidInputError,
    InvalidModelError,
    NodeNotRunningError,
    UnknownModelError,
    connect,
    connect_async,
)
from salala.node._launch import SALALA
from salala.node._protocol import HEADER, pack_frame

pytestmark = pytest.mark.slow


def plain_minilm(feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(str(minilm_path()), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def test_status_shows_identity_addresses_and_capacity(
    client: Client, shared_node: NodeProcess
) -> None:
    status = client.status()
    assert status["peer_id"].startswith("12D3KooW")
    assert status["peer_id"].endswith(status["short_id"]) and len(status["short_id"]) == 8
    assert status["addrs"] and all(a.startswith("/ip4/127.0.0.1/tcp/") for a in status["addrs"])
    assert status["pid"] == shared_node.process.pid
    capacity = status["capacity"]
    assert capacity["logical_cores"] >= 1 and capacity["memory_available"] > 0
    assert capacity["gflops"] > 0 and "CPUExecutionProvider" in capacity["providers"]


def test_api_socket_is_private_to_its_owner(shared_node: NodeProcess) -> None:
    mode = stat.S_IMODE(os.stat(shared_node.data_dir / "api.sock").st_mode)
    assert mode == 0o600
    assert stat.S_IMODE(os.stat(shared_node.data_dir / "identity.key").st_mode) == 0o600


def test_the_default_model_is_registered(client: Client) -> None:
    assert "minilm" in {m["name"] for m in client.models()}


def test_infer_matches_a_plain_onnxruntime_session(client: Client) -> None:
    feeds = minilm_inputs(batch=3, tokens=24, seed=7)
    outputs = client.infer("minilm", feeds)
    assert np.abs(outputs["last_hidden_state"] - plain_minilm(feeds)).max() <= 1e-5


async def test_the_async_client_gives_the_same_answers(shared_node: NodeProcess) -> None:
    feeds = minilm_inputs(seed=3)
    async with await connect_async(shared_node.data_dir) as node:
        async with trio.open_nursery() as nursery:
            results: list[dict[str, np.ndarray]] = []

            async def one() -> None:
                results.append(await node.infer("minilm", feeds))

            for _ in range(4):
                nursery.start_soon(one)
        assert (await node.status())["peer_id"]
    expected = plain_minilm(feeds)
    for result in results:
        assert np.abs(result["last_hidden_state"] - expected).max() <= 1e-5


def test_unknown_model_is_a_clear_error(client: Client) -> None:
    with pytest.raises(UnknownModelError, match=r"unknown model 'gpt-9'.*minilm"):
        client.infer("gpt-9", minilm_inputs())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda f: f.pop("token_type_ids"), "missing \\['token_type_ids'\\]"),
        (
            lambda f: f.update(input_ids=f["input_ids"].astype(np.float32)),
            "'input_ids' has dtype float32",
        ),
        (
            lambda f: f.update(attention_mask=f["attention_mask"][0]),
            "'attention_mask' has shape \\[16\\]",
        ),
    ],
)
def test_wrong_inputs_are_refused_by_name(client: Client, change, message: str) -> None:
    feeds = minilm_inputs()
    change(feeds)
    with pytest.raises(InvalidInputError, match=message):
        client.infer("minilm", feeds)
    assert client.infer("minilm", minilm_inputs())  # the same connection still serves


def bad_models(tmp_path: Path) -> dict[str, Path]:
    evil = point_external_data_at(
        linear_model(tmp_path / "evil" / "m.onnx", external=True), "../../etc/passwd"
    )
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(minilm_path().read_bytes()[:5_000_000])
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n")
    return {"escaping external data": evil, "truncated": truncated, "not onnx": text}


def test_bad_models_are_refused_while_the_node_keeps_serving(
    client: Client, tmp_path: Path
) -> None:
    before = {m["name"] for m in client.models()}
    for label, path in bad_models(tmp_path).items():
        with pytest.raises(InvalidModelError) as caught:
            client.add_model(path, "bad")
        assert str(path) in str(caught.value), label
        feeds = minilm_inputs()
        assert (
            np.abs(client.infer("minilm", feeds)["last_hidden_state"] - plain_minilm(feeds)).max()
            <= 1e-5
        )
    assert {m["name"] for m in client.models()} == before


def test_an_added_model_can_be_split_and_run(client: Client, tmp_path: Path) -> None:
    stored = client.add_model(linear_model(tmp_path / "lin.onnx"), "linear-api")
    assert stored["name"] == "linear-api" and len(stored["sha256"]) == 64
    x = np.ones((2, 8), dtype=np.float32)
    y = client.infer("linear-api", {"x": x})["y"]
    np.testing.assert_allclose(
        y, x @ (np.arange(64, dtype=np.float32).reshape(8, 8) / 64), rtol=1e-6
    )
    plan = client.split_model("minilm", 3)
    assert [f["index"] for f in plan["fragments"]] == [0, 1, 2]
    assert all(Path(f["path"]).is_file() for f in plan["fragments"])


def raw_socket(node: NodeProcess) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(str(node.data_dir / "api.sock"))
    return sock


def read_reply(sock: socket.socket) -> bytes:
    data = b""
    while len(data) < HEADER.size:
        data += sock.recv(HEADER.size - len(data))
    (length,) = HEADER.unpack(data)
    body = b""
    while len(body) < length:
        body += sock.recv(length - len(body))
    return body


def test_garbage_on_the_socket_gets_an_error_and_others_are_served(
    shared_node: NodeProcess, client: Client
) -> None:
    with raw_socket(shared_node) as sock:
        body = b"\xc1\xc1\xc1 definitely not msgpack"
        sock.sendall(HEADER.pack(len(body)) + body)
        assert b"bad_request" in read_reply(sock)
        sock.sendall(pack_frame({"id": 1, "method": "format_disk", "params": {}}))
        assert b"unknown method" in read_reply(sock)
    with raw_socket(shared_node) as sock:
        sock.sendall(b"\xff\xff\xff\xff")  # a 4 GiB frame
        assert b"exceeds this node's limit" in read_reply(sock)
    assert client.status()["peer_id"]


def test_requests_over_the_size_limit_are_refused(tmp_path: Path) -> None:
    node = start_node(tmp_path / "small-limit", "--max-request-mb", "1")
    try:
        with node.client() as client:
            with pytest.raises(BadRequestError, match="exceeds this node's limit"):
                client.infer("minilm", {"input_ids": np.zeros((1, 1 << 20), dtype=np.int64)})
        with node.client() as client:
            assert client.infer("minilm", minilm_inputs())["last_hidden_state"].shape == (
                2,
                16,
                384,
            )
    finally:
        assert node.stop() == 0


KILLED_CLIENT = textwrap.dedent(
    """
    import os, signal, socket, sys
    import numpy as np
    from salala.node._calls import infer
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(sys.argv[1])
    ones = np.ones((64, 256), np.int64)
    feeds = {"input_ids": ones, "attention_mask": ones,
             "token_type_ids": np.zeros((64, 256), np.int64)}
    frame = b"".join(infer("minilm", feeds).request(1))
    sock.sendall(frame if sys.argv[2] == "whole" else frame[: len(frame) // 2])
    print("sent", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


@pytest.mark.parametrize("how", ["whole", "half"])
def test_a_client_killed_mid_request_leaves_the_node_serving(
    shared_node: NodeProcess, client: Client, how: str
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", KILLED_CLIENT, str(shared_node.data_dir / "api.sock"), how],
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == -9 and b"sent" in done.stdout
    feeds = minilm_inputs(seed=11)
    assert (
        np.abs(client.infer("minilm", feeds)["last_hidden_state"] - plain_minilm(feeds)).max()
        <= 1e-5
    )
    assert shared_node.process.poll() is None


def test_identity_persists_and_a_second_node_on_the_same_dir_is_refused(tmp_path: Path) -> None:
    node = start_node(tmp_path / "home")
    with node.client() as client:
        peer_id = client.status()["peer_id"]
    second = subprocess.run(
        [
            SALALA,
            "node",
            "start",
            "--data-dir",
            str(node.data_dir),
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode == 1 and "already running" in second.stderr
    assert node.stop() == 0
    assert not (node.data_dir / "api.sock").exists()  # a clean stop removes the socket

    restarted = start_node(tmp_path / "home")
    try:
        with restarted.client() as client:
            assert client.status()["peer_id"] == peer_id
    finally:
        assert restarted.stop() == 0


def test_connecting_without_a_node_names_the_data_dir(tmp_path: Path) -> None:
    with pytest.raises(NodeNotRunningError, match=f"no node is running in {tmp_path}"):
        connect(tmp_path)


def test_sigint_stops_the_node_cleanly(tmp_path: Path) -> None:
    node = start_node(tmp_path / "ctrl-c")
    node.process.send_signal(2)
    assert node.process.wait(20) == 0
    with pytest.raises(NodeNotRunningError):
        connect(node.data_dir)
