"""Checking an ONNX file before it enters the store.

A model file is untrusted input: it may be garbage, cut short by a failed copy, or
carry external-data entries that point at files elsewhere on the machine (a model that
"loads" /etc/passwd as weights would leak it to every peer that runs it).
"""

import json
import mmap
from collections.abc import Iterator
from pathlib import Path

from . import _protobuf as pb
from ._errors import InvalidModelError
from ._llm_card import CARD_FILE, TOKENIZER_FILE, read_card

# Files an object may hold beside its graph, in the order the store hashes them.
SIDE_FILES = (CARD_FILE, TOKENIZER_FILE)
_MAX_TOKENIZER = 64 << 20  # large vocabularies (Llama 3, Qwen) take 10-20 MB

# Field numbers of the messages read here, from onnx.proto.
_MODEL_GRAPH, _MODEL_OPSETS, _MODEL_TRAINING_INFO, _MODEL_FUNCTIONS = 7, 8, 20, 25
_TRAINING_GRAPHS = (1, 2)  # TrainingInfoProto.initialization, .algorithm
_GRAPH_NODES, _GRAPH_INITIALIZERS, _GRAPH_OUTPUTS, _GRAPH_SPARSE_INITIALIZERS = 1, 5, 12, 15
_FUNCTION_NODES, _FUNCTION_ATTRIBUTE_DEFAULTS = 7, 11
_NODE_ATTRIBUTES = 5
_ATTRIBUTE_TENSOR, _ATTRIBUTE_GRAPH, _ATTRIBUTE_TENSORS, _ATTRIBUTE_GRAPHS = 5, 6, 10, 11
_ATTRIBUTE_SPARSE_TENSOR, _ATTRIBUTE_SPARSE_TENSORS = 22, 23
_SPARSE_VALUES, _SPARSE_INDICES = 1, 2
_TENSOR_NAME, _TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 8, 13, 14
_ENTRY_KEY, _ENTRY_VALUE = 1, 2
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL
_MAX_NESTING = 32  # subgraphs inside subgraphs (If, Loop, Scan); real models nest a few


def _message(number: int, value: int | memoryview) -> memoryview:
    if not isinstance(value, memoryview):
        raise InvalidModelError(f"field {number} is a number where a message belongs")
    return value


def _sparse_tensors(sparse: memoryview) -> Iterator[memoryview]:
    for number, value in pb.fields(sparse):
        if number in (_SPARSE_VALUES, _SPARSE_INDICES):
            yield _message(number, value)


def _attribute_tensors(attribute: memoryview, depth: int) -> Iterator[memoryview]:
    for number, value in pb.fields(attribute):
        if number in (_ATTRIBUTE_TENSOR, _ATTRIBUTE_TENSORS):
            yield _message(number, value)
        elif number in (_ATTRIBUTE_SPARSE_TENSOR, _ATTRIBUTE_SPARSE_TENSORS):
            yield from _sparse_tensors(_message(number, value))
        elif number in (_ATTRIBUTE_GRAPH, _ATTRIBUTE_GRAPHS):
            yield from _graph_tensors(_message(number, value), depth + 1)


def _node_tensors(node: memoryview, depth: int) -> Iterator[memoryview]:
    for attribute in pb.messages(node, _NODE_ATTRIBUTES):
        yield from _attribute_tensors(attribute, depth)


def _graph_tensors(graph: memoryview, depth: int) -> Iterator[memoryview]:
    """Initializers and tensor attributes, including those of nested subgraphs."""
    if depth > _MAX_NESTING:
        raise InvalidModelError(f"subgraphs nest deeper than {_MAX_NESTING} levels")
    for number, value in pb.fields(graph):
        if number == _GRAPH_INITIALIZERS:
            yield _message(number, value)
        elif number == _GRAPH_SPARSE_INITIALIZERS:
            yield from _sparse_tensors(_message(number, value))
        elif number == _GRAPH_NODES:
            yield from _node_tensors(_message(number, value), depth)


def _external_locations(tensor: memoryview) -> list[str]:
    """Every place the tensor names for its bytes outside the model file.

    Fails closed: every ``location`` entry counts, whatever ``data_location`` says (a
    parser might merge a repeated tensor, or read the enum otherwise), and a tensor
    marked external must name one.
    """
    locations = [
        pb.text(entry, _ENTRY_VALUE) or ""
        for entry in pb.messages(tensor, _TENSOR_EXTERNAL_DATA)
        if pb.text(entry, _ENTRY_KEY) == "location"
    ]
    marked = (pb.integer(tensor, _TENSOR_DATA_LOCATION) or 0) != 0
    if (marked and not locations) or "" in locations:
        name = pb.text(tensor, _TENSOR_NAME)
        raise InvalidModelError(f"tensor {name!r} keeps external data but names no location")
    return locations


def _external_data_files(model: memoryview, path: Path) -> list[Path]:
    """The external-data files the model at ``path`` names, each checked to lie beside it."""
    root = path.parent.resolve()
    files: set[Path] = set()
    graphs = [_message(n, v) for n, v in pb.fields(model) if n == _MODEL_GRAPH]
    for info in pb.messages(model, _MODEL_TRAINING_INFO):
        graphs += [_message(n, v) for n, v in pb.fields(info) if n in _TRAINING_GRAPHS]
    functions = [_message(n, v) for n, v in pb.fields(model) if n == _MODEL_FUNCTIONS]
    tensors = [t for graph in graphs for t in _graph_tensors(graph, 0)]
    for function in functions:
        for node in pb.messages(function, _FUNCTION_NODES):
            tensors.extend(_node_tensors(node, 0))
        for default in pb.messages(function, _FUNCTION_ATTRIBUTE_DEFAULTS):
            tensors.extend(_attribute_tensors(default, 0))
    for tensor, location in ((t, loc) for t in tensors for loc in _external_locations(t)):
        name = pb.text(tensor, _TENSOR_NAME)
        target = (root / location).resolve()
        if Path(location).is_absolute() or not target.is_relative_to(root):
            raise InvalidModelError(
                f"{path}: tensor {name!r} points its external data at {location!r}, "
                f"outside the model's folder"
            )
        if not target.is_file():
            raise InvalidModelError(
                f"{path}: tensor {name!r} needs external data file {location!r}, "
                f"which is missing from the model's folder"
            )
        files.add(target)
    return sorted(files)


def _has_graph_opsets_and_outputs(model: memoryview) -> bool:
    graphs = list(pb.messages(model, _MODEL_GRAPH))
    if not graphs or not any(True for _ in pb.messages(model, _MODEL_OPSETS)):
        return False
    graph = graphs[-1]
    return any(True for _ in pb.messages(graph, _GRAPH_NODES)) and any(
        True for _ in pb.messages(graph, _GRAPH_OUTPUTS)
    )


def check_model_file(path: Path) -> list[Path]:
    """Check a model file without reading its external data; return its external-data files.

    The file is read through a memory map and walked field by field, so the check needs
    neither the onnx package nor a copy of the weights. It checks what onnxruntime would
    not (where external data may be read from) and the form of the file; whether the
    graph is well formed, onnxruntime checks when it loads it, as every model is before
    it runs. (onnx's checker also did that, but costs a node 20 MB and phones lack it.)
    """
    if not path.is_file():
        raise InvalidModelError(f"{path} is not a file")
    try:
        with open(path, "rb") as file:
            if path.stat().st_size == 0:
                raise InvalidModelError(f"{path} is not a valid ONNX model: it is empty")
            # Unmapped when the last view of it goes (views may outlive this call in a
            # traceback, and closing a map with live views raises).
            view = memoryview(mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ))
        if not _has_graph_opsets_and_outputs(view):
            raise InvalidModelError(
                f"{path} is not a valid ONNX model: it has no graph, outputs or opset "
                "(a truncated file or another format)"
            )
        files = _external_data_files(view, path)
    except InvalidModelError as exc:
        if str(exc).startswith(str(path)):
            raise
        raise InvalidModelError(f"{path} is not a valid ONNX model: {exc}") from exc
    except (OSError, ValueError) as exc:
        raise InvalidModelError(f"{path} cannot be read as an ONNX model: {exc}") from exc
    return files


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
