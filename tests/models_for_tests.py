"""Small hand-built ONNX files for store edge cases (the real models come from pip)."""

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def linear_model(path: Path, *, external: bool = False, location: str = "weights.bin") -> Path:
    """y = x @ W with W in the file or in an external data file next to it."""
    weight = numpy_helper.from_array(np.arange(64, dtype=np.float32).reshape(8, 8) / 64, "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
        initializer=[weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    if external:
        (path.parent / location).parent.mkdir(parents=True, exist_ok=True)
        onnx.save(
            model,
            str(path),
            save_as_external_data=True,
            location=location,
            size_threshold=0,
            all_tensors_to_one_file=True,
        )
    else:
        onnx.save(model, str(path))
    return path


def point_external_data_at(path: Path, location: str) -> Path:
    """Rewrite every external-data location in a saved model (the attack: ../../etc/passwd)."""
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(model, str(path))
    return path


def mlp_model(path: Path, *, layers: int, width: int, seed: int, relu: bool = True) -> Path:
    """A chain of MatMul(+Relu) layers, each weight a ``width`` by ``width`` float32
    matrix: a model of known size (4 * layers * width**2 bytes, plus a little) that
    splits between any two layers. Without ``relu``, two layers have exactly one cut,
    into halves of equal size. Different seeds give different bytes (store objects)."""
    rng = np.random.default_rng(seed)
    nodes, weights = [], []
    current = "x"
    for i in range(layers):
        weight = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        weights.append(numpy_helper.from_array(weight, f"W{i}"))
        out = "y" if i == layers - 1 else f"a{i}"
        if relu:
            nodes.append(helper.make_node("MatMul", [current, f"W{i}"], [f"h{i}"]))
            nodes.append(helper.make_node("Relu", [f"h{i}"], [out]))
        else:
            nodes.append(helper.make_node("MatMul", [current, f"W{i}"], [out]))
        current = out
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
        initializer=weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path
