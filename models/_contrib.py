"""What onnxruntime adds to ONNX that checking and costing a graph must know.

Language models written by onnxruntime-genai's builder use onnxruntime's fused ops.
Those in the ``com.microsoft`` domain pass the ONNX checker (it skips foreign domains),
but ``SimplifiedLayerNormalization`` (RMS norm) is registered by onnxruntime in the
*default* domain, where the checker refuses any op it has no schema for. We register
a schema for it, as onnxruntime declares it, so that such graphs can be stored.

The builder writes a type and shape for every tensor, so the splitter needs no shape
inference for these ops; only their cost must be counted: MatMulNBits is a matrix
product with quantized weights, and GroupQueryAttention does two products over the
context per head.
"""

import math

import onnx
from onnx import defs
from onnx.defs import OpSchema

from ._graph import Shape

_FLOATS = ["tensor(float)", "tensor(float16)", "tensor(double)", "tensor(bfloat16)"]


def register_onnxruntime_schemas() -> None:
    """Teach onnx (its shape inference and checker) onnxruntime's default-domain RMS norm,
    which language models built by onnxruntime-genai use (idempotent)."""
    try:
        defs.get_schema("SimplifiedLayerNormalization", 1, "")
        return
    except defs.SchemaError:
        pass
    optional = OpSchema.FormalParameterOption.Optional
    defs.register_schema(
        OpSchema(
            "SimplifiedLayerNormalization",
            "",
            1,
            doc="onnxruntime's RMS normalization (contrib op in the default domain).",
            inputs=[OpSchema.FormalParameter("X", "T"), OpSchema.FormalParameter("scale", "V")],
            outputs=[
                OpSchema.FormalParameter("Y", "V"),
                OpSchema.FormalParameter("inv_std_var", "U", param_option=optional),
            ],
            type_constraints=[
                ("T", _FLOATS, "input types"),
                ("V", _FLOATS, "scale and output types"),
                ("U", ["tensor(float)", "tensor(double)"], "statistics type"),
            ],
            attributes=[
                OpSchema.Attribute("axis", OpSchema.AttrType.INT, "", required=False),
                OpSchema.Attribute("epsilon", OpSchema.AttrType.FLOAT, "", required=False),
                OpSchema.Attribute("stash_type", OpSchema.AttrType.INT, "", required=False),
            ],
        )
    )


def _attribute(node: onnx.NodeProto, name: str) -> int:
    return next((a.i for a in node.attribute if a.name == name), 0)


def _numel(shape: Shape | None) -> int:
    return 0 if shape is None else math.prod(d or 1 for d in shape)


def contrib_flops(node: onnx.NodeProto, shapes: dict[str, Shape]) -> int | None:
    """FLOPs of a heavy onnxruntime contrib op, None for any other op."""
    if node.domain != "com.microsoft":
        return None
    out = _numel(shapes.get(node.output[0])) if node.output else 0
    if node.op_type == "MatMulNBits":
        return 2 * out * _attribute(node, "K")
    if node.op_type == "GroupQueryAttention":
        # Scores and weighted sum: 2 products of (tokens x context) per head and head dim.
        present = shapes.get(node.output[1]) if len(node.output) > 1 else None
        context = (present[2] if present and len(present) == 4 else None) or 1
        return 4 * out * context
    return None
