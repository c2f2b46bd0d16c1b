"""Estimated compute per node, used to balance fragments.

Only the ops that dominate a forward pass are counted precisely (matrix products and
convolutions, at 2 FLOPs per multiply-add); every other op is charged one FLOP per
output element, which keeps elementwise-heavy graphs from looking free.
"""

import math

import onnx

from ._contrib import contrib_flops
from ._graph import Shape

_MATMULS = {"MatMul", "MatMulInteger", "QLinearMatMul", "FusedMatMul"}
_CONVS = {"Conv", "ConvInteger", "QLinearConv"}


def _numel(shape: Shape | None) -> int | None:
    """Element count; a dim that inference left free counts as 1 (usually the batch)."""
    if shape is None:
        return None
    return math.prod(d or 1 for d in shape)


def node_flops(node: onnx.NodeProto, shapes: dict[str, Shape]) -> int:
    """FLOPs of one node under reference shapes; 0 where shapes are unknown."""
    out = _numel(shapes.get(node.output[0])) if node.output else None
    if out is None:
        return 0
    fused = contrib_flops(node, shapes)
    if fused is not None:
        return fused
    inputs = [shapes.get(name) for name in node.input]
    if node.op_type in _MATMULS and inputs and inputs[0]:
        return 2 * out * (inputs[0][-1] or 0)
    if node.op_type == "Gemm" and inputs and inputs[0]:
        trans_a = any(a.name == "transA" and a.i for a in node.attribute)
        inner = inputs[0][0] if trans_a else inputs[0][-1]
        return 2 * out * (inner or 0)
    weight = (
        node.input[3]
        if node.op_type == "QLinearConv"
        else (node.input[1] if len(node.input) > 1 else "")
    )
    if node.op_type in _CONVS and shapes.get(weight):
        kernel = _numel(shapes[weight][1:]) or 0
        return 2 * out * kernel
    if node.op_type == "ConvTranspose" and len(inputs) > 1 and inputs[1]:
        per_input = _numel(inputs[1][1:]) or 0
        return 2 * (_numel(inputs[0]) or 0) * per_input
    return out
