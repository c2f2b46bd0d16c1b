"""Checking an ONNX file before it enters the store.

A model file is untrusted input: it may be garbage, cut short by a failed copy, or
carry external-data entries that point at files elsewhere on the machine (a model that
"loads" /etc/passwd as weights would leak it to every peer that runs it).
"""

import json
from collections.abc import Iterator
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from ._contrib import register_onnxruntime_schemas
from ._errors import InvalidModelError
from ._llm_card import CARD_FILE, TOKENIZER_FILE, read_card

# Files an object may hold beside its graph, in the order the store hashes them.
SIDE_FILES = (CARD_FILE, TOKENIZER_FILE)
_MAX_TOKENIZER = 64 << 20  # large vocabularies (Llama 3, Qwen) take 10-20 MB

register_onnxruntime_schemas()  # so the checker accepts onnxruntime's RMS norm


def _all_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Initializers and tensor attributes, including those of nested subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from _all_tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from _all_tensors(subgraph)


def external_data_files(model: onnx.ModelProto, path: Path) -> list[Path]:
    """The external-data files the model at ``path`` names, each checked to lie beside it."""
    root = path.parent.resolve()
    files: set[Path] = set()
    for tensor in _all_tensors(model.graph):
        if not uses_external_data(tensor):
            continue
        location = ExternalDataInfo(tensor).location
        target = (root / location).resolve()
        if Path(location).is_absolute() or not target.is_relative_to(root):
            raise InvalidModelError(
                f"{path}: tensor {tensor.name!r} points its external data at {location!r}, "
                f"outside the model's folder"
            )
        if not target.is_file():
            raise InvalidModelError(
                f"{path}: tensor {tensor.name!r} needs external data file {location!r}, "
                f"which is missing from the model's folder"
            )
        files.add(target)
    return sorted(files)


def load_checked(path: Path) -> tuple[onnx.ModelProto, list[Path]]:
    """Parse and check a model without reading its external data.

    Returns the model (external tensors still unresolved) and its external-data files.
    """
    if not path.is_file():
        raise InvalidModelError(f"{path} is not a file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError, OSError) as exc:
        raise InvalidModelError(f"{path} is not a valid ONNX model: {exc}") from exc
    if not model.graph.node or not model.graph.output or not model.opset_import:
        raise InvalidModelError(
            f"{path} is not a valid ONNX model: it has no graph, outputs or opset "
            "(a truncated file or another format)"
        )
    files = external_data_files(model, path)
    try:
        onnx.checker.check_model(str(path))  # by path: resolves external data beside it
    except onnx.checker.ValidationError as exc:
        raise InvalidModelError(f"{path} fails the ONNX checker: {exc}") from exc
    return model, files


def side_files(path: Path, external: list[Path]) -> list[Path]:
    """The side files beside the model at ``path``, checked, in ``SIDE_FILES`` order.

    A card must be a valid card and a tokenizer a JSON object; neither may double as
    external data (its bytes would be hashed twice, under two meanings).
    """
    root = path.parent.resolve()
    found = []
    for name in SIDE_FILES:
        file = root / name
        if not file.is_file():
            continue
        if file in external:
            raise InvalidModelError(f"{path}: {name} cannot hold external data")
        if name == CARD_FILE:
            read_card(file)
        elif file.stat().st_size > _MAX_TOKENIZER:
            raise InvalidModelError(f"{file} is larger than {_MAX_TOKENIZER >> 20} MB")
        else:
            try:
                tokenizer = json.loads(file.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, ValueError) as exc:
                raise InvalidModelError(f"{file} is not JSON: {exc}") from exc
            if not isinstance(tokenizer, dict) or "model" not in tokenizer:
                raise InvalidModelError(f"{file} is not a tokenizers tokenizer.json")
        found.append(file)
    return found
