"""The content-addressed model store and what it refuses to import."""

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import minilm_path
from models_for_tests import linear_model, point_external_data_at
from salala.models import InvalidModelError, ModelStore, UnknownModelError
from salala.runtime import ModelSession


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "store")


def test_models_are_stored_under_the_sha256_of_their_bytes(store: ModelStore) -> None:
    stored = store.add(minilm_path(), "minilm")
    assert stored.sha256 == hashlib.sha256(minilm_path().read_bytes()).hexdigest()
    assert stored.path.read_bytes() == minilm_path().read_bytes()
    assert store.get("minilm") == stored
    assert [m.name for m in store.list()] == ["minilm"]


def test_two_names_for_the_same_bytes_share_one_object(store: ModelStore, tmp_path: Path) -> None:
    copy = tmp_path / "elsewhere" / "copy.onnx"
    copy.parent.mkdir()
    shutil.copyfile(minilm_path(), copy)
    first = store.add(minilm_path(), "a")
    second = store.add(copy, "b")
    assert first.sha256 == second.sha256 and first.path == second.path
    assert len(list((store.root / "objects").iterdir())) == 1


def test_a_store_reopened_from_disk_knows_its_models(store: ModelStore) -> None:
    stored = store.add(minilm_path(), "minilm")
    assert ModelStore(store.root).get("minilm") == stored


def test_external_data_inside_the_model_folder_is_imported_with_it(
    store: ModelStore, tmp_path: Path
) -> None:
    source = linear_model(tmp_path / "src" / "linear.onnx", external=True, location="data/w.bin")
    stored = store.add(source, "linear")
    shutil.rmtree(tmp_path / "src")  # the store must not depend on the original
    assert (stored.path.parent / "data" / "w.bin").is_file()
    x = np.ones((2, 8), dtype=np.float32)
    y = ModelSession(stored.path).run({"x": x})["y"]
    np.testing.assert_allclose(y, x @ (np.arange(64, dtype=np.float32).reshape(8, 8) / 64))


@pytest.mark.parametrize("location", ["../../etc/passwd", "/etc/passwd", "data/../../secret.bin"])
def test_external_data_outside_the_model_folder_is_refused(
    store: ModelStore, tmp_path: Path, location: str
) -> None:
    path = point_external_data_at(
        linear_model(tmp_path / "m" / "evil.onnx", external=True), location
    )
    with pytest.raises(InvalidModelError, match="outside the model's folder"):
        store.add(path, "evil")
    assert store.list() == []


def test_missing_external_data_is_refused(store: ModelStore, tmp_path: Path) -> None:
    path = linear_model(tmp_path / "m" / "linear.onnx", external=True)
    (tmp_path / "m" / "weights.bin").unlink()
    with pytest.raises(InvalidModelError, match="missing"):
        store.add(path, "linear")


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.999])
def test_a_truncated_model_is_refused(store: ModelStore, tmp_path: Path, keep: float) -> None:
    data = minilm_path().read_bytes()
    path = tmp_path / "truncated.onnx"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(InvalidModelError, match="not a valid ONNX model"):
        store.add(path, "truncated")


@pytest.mark.parametrize(
    "content",
    [b"", b"hello, I am a text file\n", b"\x89PNG\r\n\x1a\n" + bytes(200), bytes(range(256)) * 40],
)
def test_files_that_are_not_onnx_are_refused(
    store: ModelStore, tmp_path: Path, content: bytes
) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(content)
    with pytest.raises(InvalidModelError):
        store.add(path, "junk")


def test_a_missing_file_is_refused(store: ModelStore, tmp_path: Path) -> None:
    with pytest.raises(InvalidModelError, match="is not a file"):
        store.add(tmp_path / "nope.onnx", "nope")


@pytest.mark.parametrize("name", ["", "../x", "a/b", ".hidden", "x" * 65, "white space"])
def test_unsafe_names_are_refused(store: ModelStore, name: str) -> None:
    with pytest.raises(InvalidModelError, match="invalid model name"):
        store.add(minilm_path(), name)


def test_unknown_names_list_what_the_store_has(store: ModelStore) -> None:
    store.add(minilm_path(), "minilm")
    with pytest.raises(UnknownModelError, match="unknown model 'bert'; this node has: minilm"):
        store.get("bert")
