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
