"""Facts about an ONNX graph that cutting and costing both need."""

from collections.abc import Iterator

import numpy as np
import onnx
from onnx import helper

Shape = tuple[int | None, ...]


def node_inputs(node: onnx.NodeProto) -> Iterator[str]:
    """The tensors a node reads, including outer-scope names used by its subgraphs."""
    yield from (name for name in node.input if name)
    for attribute in node.attribute:
        graphs = [attribute.g] if attribute.HasField("g") else list(attribute.graphs)
        for graph in graphs:
            local = {i.name for i in graph.input} | {t.name for t in graph.initializer}
            for inner in graph.node:
                for name in node_inputs(inner):
                    if name not in local:
                        yield name
                local.update(inner.output)


def tensor_bytes(tensor: onnx.TensorProto) -> int:
    count = int(np.prod(tensor.dims)) if tensor.dims else 1
    return count * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def known_shapes(model: onnx.ModelProto) -> dict[str, Shape]:
    """Shapes from value_info, inputs, outputs and initializers; None for free dims."""
    shapes: dict[str, Shape] = {}
    graph = model.graph
    for info in [*graph.input, *graph.value_info, *graph.output]:
        kind = info.type.WhichOneof("value")
        if kind != "tensor_type" or not info.type.tensor_type.HasField("shape"):
            continue
        shapes[info.name] = tuple(
            d.dim_value if d.HasField("dim_value") else None
            for d in info.type.tensor_type.shape.dim
        )
    for tensor in graph.initializer:
        shapes[tensor.name] = tuple(tensor.dims)
    return shapes


def typed_tensors(model: onnx.ModelProto) -> set[str]:
    """Tensors whose element type is known (a cut tensor must be declarable)."""
    graph = model.graph
    return {
        info.name
        for info in [*graph.input, *graph.value_info, *graph.output]
        if info.type.WhichOneof("value") == "tensor_type" and info.type.tensor_type.elem_type
    }


def with_reference_dims(
    model: onnx.ModelProto, batch: int = 1, other: int = 128
) -> onnx.ModelProto:
    """A copy whose free input dims are fixed, so shape inference yields numbers.

    The first free dim of each input is taken as the batch; the rest (sequence length,
    image size) get ``other``. Costs are only compared with each other, so the exact
    reference matters less than using the same one everywhere.
    """
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for info in fixed.graph.input:
        if info.type.WhichOneof("value") != "tensor_type":
            continue
        for position, dim in enumerate(info.type.tensor_type.shape.dim):
            if not dim.HasField("dim_value") or dim.dim_value <= 0:
                dim.Clear()
                dim.dim_value = batch if position == 0 else other
    return fixed
