"""Training packages: what a node needs to train a model without torch.

A package is a folder made once on a machine with torch (see ``export_training``):

    training.json             the manifest below
    f<i>.forward.onnx         (params..., x) -> y
    f<i>.backward.onnx        (params..., x, grad_y) -> (grad_params..., grad_x)
    f<last>.backward.onnx     (params..., x, labels) -> (loss, grad_params..., grad_x)
    params.onnx               the initial parameters, as the initializers of a tiny graph

Backward graphs recompute their fragment's forward from its input, so a stage keeps
only each micro-batch's input between the two passes. The first fragment's backward
returns no grad_x: nothing upstream wants it. Parameters travel in ONNX because the
store, the transfer protocol and the validator already speak it.
"""

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._errors import InvalidModelError
from ._onnx import require_onnx

MANIFEST = "training.json"
PARAMS_FILE = "params.onnx"


@dataclass(frozen=True)
class TrainingFragment:
    forward: str  # file name inside the package
    backward: str
    params: list[str]  # parameter input names, in graph order


@dataclass(frozen=True)
class TrainingPackage:
    folder: Path
    fragments: list[TrainingFragment]

    def file(self, name: str) -> Path:
        return self.folder / name

    def initial_params(self) -> list[dict[str, np.ndarray]]:
        """Each fragment's parameters, by name."""
        return split_params(read_params(self.folder / PARAMS_FILE), self)


def write_manifest(package: TrainingPackage) -> None:
    fields = asdict(package)
    del fields["folder"]
    (package.folder / MANIFEST).write_text(json.dumps(fields, indent=1))


def load_package(folder: Path) -> TrainingPackage:
    """Read and check a package folder; InvalidModelError says what is missing."""
    folder = Path(folder)
    try:
        fields: dict[str, Any] = json.loads((folder / MANIFEST).read_text())
        fragments = [TrainingFragment(**f) for f in fields.pop("fragments")]
        package = TrainingPackage(folder=folder, fragments=fragments, **fields)
    except FileNotFoundError as exc:
        raise InvalidModelError(f"{folder} is not a training package: no {MANIFEST}") from exc
    except (ValueError, TypeError, KeyError) as exc:
        raise InvalidModelError(f"{folder / MANIFEST} is malformed: {exc}") from exc
    if not package.fragments:
        raise InvalidModelError(f"{folder / MANIFEST} names no fragments")
    for fragment in package.fragments:
        for name in (fragment.forward, fragment.backward):
            if "/" in name or not (folder / name).is_file():
                raise InvalidModelError(f"training package {folder} lacks {name}")
    if not (folder / PARAMS_FILE).is_file():
        raise InvalidModelError(f"training package {folder} lacks {PARAMS_FILE}")
    return package


def write_params(path: Path, params: dict[str, np.ndarray]) -> None:
    """Parameters as a graph with no inputs whose outputs are its initializers."""
    onnx = require_onnx("writing training parameters")
    helper, numpy_helper = onnx.helper, onnx.numpy_helper
    names = list(params)
    graph = helper.make_graph(
        [helper.make_node("Identity", [n], [f"out.{n}"]) for n in names],
        "params",
        [],
        [
            helper.make_tensor_value_info(
                f"out.{n}", helper.np_dtype_to_tensor_dtype(a.dtype), a.shape
            )
            for n, a in params.items()
        ],
        [numpy_helper.from_array(np.ascontiguousarray(a), n) for n, a in params.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, path)


def read_params(path: Path) -> dict[str, np.ndarray]:
    onnx = require_onnx("reading training parameters")
    model = onnx.load(str(path))
    return {t.name: onnx.numpy_helper.to_array(t).copy() for t in model.graph.initializer}


def qualified(index: int, name: str) -> str:
    """A parameter's name across the whole model: fragments may reuse local names."""
    return f"f{index}.{name}"


def split_params(
    flat: dict[str, np.ndarray], package: TrainingPackage
) -> list[dict[str, np.ndarray]]:
    try:
        return [
            {n: flat[qualified(i, n)] for n in fragment.params}
            for i, fragment in enumerate(package.fragments)
        ]
    except KeyError as exc:
        raise InvalidModelError(f"parameters lack {exc.args[0]}") from exc


def compose_inference(
    package: TrainingPackage, params: list[dict[str, np.ndarray]], path: Path
) -> None:
    """One ONNX file for inference: the forward graphs chained, parameters baked in.

    Names inside fragment i get an ``f<i>.`` prefix so that graphs written separately
    cannot collide; fragment i's output feeds fragment i+1's input.
    """
    onnx = require_onnx("composing the trained model")
    helper, numpy_helper = onnx.helper, onnx.numpy_helper
    nodes: list[Any] = []  # onnx's NodeProto, TensorProto, ValueInfoProto
    initializers: list[Any] = []
    graph_input: Any = None
    carried = ""
    output: Any = None
    opsets: dict[str, int] = {}
    ir_version = int(onnx.IR_VERSION)
    for index, fragment in enumerate(package.fragments):
        model = onnx.load(str(package.file(fragment.forward)))
        ir_version = min(ir_version, model.ir_version)
        if model.functions:
            raise InvalidModelError(f"{fragment.forward} uses local functions; inline them")
        for opset in model.opset_import:
            opsets[opset.domain] = max(opsets.get(opset.domain, 0), opset.version)
        graph = model.graph
        (data_input,) = [i for i in graph.input if i.name not in fragment.params]
        prefix = f"f{index}."
        rename = {data_input.name: carried if index else data_input.name}

        def renamed(name: str, prefix: str = prefix, rename: dict[str, str] = rename) -> str:
            return "" if not name else rename.get(name, prefix + name)

        for tensor in graph.initializer:
            constant = onnx.TensorProto()
            constant.CopyFrom(tensor)
            constant.name = renamed(tensor.name)
            initializers.append(constant)
        for name in fragment.params:
            initializers.append(numpy_helper.from_array(params[index][name], renamed(name)))
        for node in graph.node:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.name = renamed(node.name) if node.name else ""
            copy.input[:] = [renamed(n) for n in node.input]
            copy.output[:] = [renamed(n) for n in node.output]
            nodes.append(copy)
        if index == 0:
            graph_input = onnx.ValueInfoProto()
            graph_input.CopyFrom(data_input)
            graph_input.name = renamed(data_input.name)
        (out,) = graph.output
        carried = renamed(out.name)
        output = onnx.ValueInfoProto()
        output.CopyFrom(out)
        output.name = carried
    assert graph_input is not None and output is not None
    nodes.append(helper.make_node("Identity", [carried], ["y"]))
    output.name = "y"
    graph = helper.make_graph(nodes, "trained", [graph_input], [output], initializers)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()],
        ir_version=ir_version,
    )
    onnx.checker.check_model(model)
    onnx.save(model, path)
