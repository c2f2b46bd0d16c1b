"""The fetch manifest lists an object's files in the store's digest order, so bytes
laid end to end in that order hash to the object's sha256 on arrival."""

import json
from pathlib import Path

from models_for_tests import linear_model
from salala.mesh.wire._transfer import _digest_of, object_manifest
from salala.models import ModelStore


def test_an_object_with_external_data_and_side_files_hashes_to_its_sha_in_manifest_order(
    tmp_path: Path,
) -> None:
    # one rule for every file after model.onnx, external data or side file: by name
    source = linear_model(tmp_path / "src" / "model.onnx", external=True, location="zz/w.bin")
    (source.parent / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE"}}))
    store = ModelStore(tmp_path / "store")
    sha256, size = store.add_object(source)
    folder = store.object_path(sha256).parent
    manifest = object_manifest(folder)
    assert [name for name, _ in manifest] == ["model.onnx", "tokenizer.json", "zz/w.bin"]
    assert sum(file_size for _, file_size in manifest) == size == store.object_size(sha256)
    laid_out = tmp_path / "object.part"
    laid_out.write_bytes(b"".join((folder / name).read_bytes() for name, _ in manifest))
    assert _digest_of(laid_out, manifest) == sha256
