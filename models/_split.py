"""Cutting an ONNX model into N contiguous fragments of balanced cost.

A cut is a point in the topological order where few live tensors are *activations*:
tensors that descend from a matrix product, a convolution or a large embedding lookup.
Only those travel to the next device. Every other tensor that crosses the cut depends
on graph inputs and constants alone (an attention mask, a shape, a decoder's sequence
lengths and rotary tables); the later fragment takes those graph inputs too and
recomputes them, which is cheap and keeps the wire small. A graph output (a decoder's
``present.{i}.key``) is emitted by the fragment that computes it, so it never crosses.

Most models have many points where exactly one activation crosses, and those are the
cuts. A decoder with fused residual norms (onnxruntime's SkipSimplifiedLayerNormalization)
has none between its layers: the residual stream and the block's output travel apart
until the next norm adds them. Such a graph also carries state: nodes that read a past
input and write the matching present output (GroupQueryAttention). Between two such
state nodes we admit one wider cut, of at most ``MAX_CUT_TENSORS`` activations: the
last point before the next state node where every crossing activation is read by the
very next node (the norm that joins them), that is the boundary between two layers.
Graphs without state nodes get exactly the single-activation cuts.

Among the valid cuts we choose the N-1 that minimise the most expensive fragment, since
in a pipeline the slowest stage sets the pace.
"""

import math
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import onnx
from onnx import helper, shape_inference
from onnx.utils import Extractor

from ._contrib import register_onnxruntime_schemas
from ._cost import node_flops
from ._cuts import Cut, CutAnalysis
from ._errors import SplitError
from ._graph import (
    Shape,
    known_shapes,
    node_inputs,
    tensor_bytes,
    typed_tensors,
    with_reference_dims,
)

register_onnxruntime_schemas()  # shape inference must know a decoder's RMS norm

_HEAVY_OPS = {
    "MatMul",
    "MatMulNBits",
    "MatMulInteger",
    "QLinearMatMul",
    "Gemm",
    "Conv",
    "ConvInteger",
    "QLinearConv",
    "ConvTranspose",
}
# A Gather from a table at least this many elements is an embedding lookup; so is
# onnxruntime's lookup in a block-quantized table (an int4 language model's embedding).
_QUANTIZED_GATHER = "GatherBlockQuantized"
# A Gather from a table at least this many elements is an embedding lookup.
_LARGE_GATHER = 64 * 1024
# A layer boundary of a decoder with fused residual norms carries 2 activations.
MAX_CUT_TENSORS = 2


@dataclass(frozen=True)
class FragmentGraph:
    index: int
    model: onnx.ModelProto
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    flops: int
    weight_bytes: int


def _constants(graph: onnx.GraphProto) -> set[str]:
    """Tensors computable from initializers alone; every fragment can rebuild them."""
    constant = {t.name for t in graph.initializer}
    for node in graph.node:
        reads = list(node_inputs(node))
        if node.op_type not in {"RandomNormal", "RandomUniform"} and all(
            name in constant for name in reads
        ):
            constant.update(node.output)
    return constant


def _activations(graph: onnx.GraphProto, shapes: dict[str, Shape]) -> set[str]:
    active: set[str] = set()
    for node in graph.node:
        reads = list(node_inputs(node))
        heavy = node.op_type in _HEAVY_OPS or node.op_type == _QUANTIZED_GATHER
        if node.op_type == "Gather" and node.input:
            table = shapes.get(node.input[0]) or ()
            heavy = None not in table and math.prod(d or 0 for d in table) >= _LARGE_GATHER
        if heavy or any(name in active for name in reads):
            active.update(name for name in node.output if name)
    return active


def _state_nodes(graph: onnx.GraphProto) -> list[int]:
    """Positions of nodes that read a graph input and write a graph output (a decoder's
    attention: past key/values in, present out)."""
    inputs = {i.name for i in graph.input}
    outputs = {o.name for o in graph.output}
    return [
        index
        for index, node in enumerate(graph.node)
        if any(name in inputs for name in node.input) and any(o in outputs for o in node.output)
    ]


def find_cuts(model: onnx.ModelProto) -> list[Cut]:
    """All cut points of a shape-inferred model, in order (see the module docstring)."""
    graph = model.graph
    nodes = list(graph.node)
    constant = _constants(graph)
    active = _activations(graph, known_shapes(model))
    declarable = typed_tensors(model)
    order = {name: index for index, node in enumerate(nodes) for name in node.output}
    last_use: dict[str, int] = {}
    for index, node in enumerate(nodes):
        for name in node_inputs(node):
            last_use[name] = index
    # A graph output nothing reads later leaves from the fragment that computes it.
    for output in graph.output:
        if output.name not in order:
            last_use[output.name] = len(nodes)

    state = _state_nodes(graph)
    single: dict[int, tuple[str, ...]] = {}
    joins: dict[int, tuple[str, ...]] = {}
    live: set[str] = {i.name for i in graph.input if i.name not in constant}
    for position in range(1, len(nodes)):
        live.update(name for name in nodes[position - 1].output if name and name not in constant)
        live = {name for name in live if last_use.get(name, -1) >= position}
        crossing = tuple(sorted((n for n in live if n in active), key=lambda n: order.get(n, -1)))
        if not crossing or not all(name in declarable for name in crossing):
            continue
        if len(crossing) == 1:
            single[position] = crossing
        elif state and len(crossing) <= MAX_CUT_TENSORS:
            reads = set(node_inputs(nodes[position]))
            if all(name in reads for name in crossing):
                joins[position] = crossing
    # Between two state nodes, keep the last join: the boundary before the next layer.
    wide = {}
    for before, after in pairwise(state):
        inside = [p for p in joins if before < p <= after]
        if inside:
            wide[max(inside)] = joins[max(inside)]

    cuts: list[Cut] = []
    for position, tensors in sorted({**single, **wide}.items()):
        if cuts and cuts[-1].tensors == tensors:
            continue  # same tensors as the cut before: a fragment between would be empty
        cuts.append(Cut(position, tensors))
    return cuts


def _balanced(prefix: np.ndarray, cuts: list[Cut], parts: int) -> list[Cut]:
    """Choose parts-1 cuts minimising the costliest fragment (dynamic programming)."""
    points = np.array([0] + [c.position for c in cuts] + [len(prefix) - 1])
    at = prefix[points]
    count = len(points)
    best = np.full((parts + 1, count), np.inf)
    came_from = np.zeros((parts + 1, count), dtype=int)
    best[1] = at - at[0]
    for used in range(2, parts + 1):
        for end in range(used - 1, count):
            options = np.maximum(best[used - 1, :end], at[end] - at[:end])
            came_from[used, end] = int(np.argmin(options))
            best[used, end] = options[came_from[used, end]]
    chosen, end = [], count - 1
    for used in range(parts, 1, -1):
        end = came_from[used, end]
        chosen.append(cuts[end - 1])
    return sorted(chosen, key=lambda c: c.position)


def _drop_unused_inputs(model: onnx.ModelProto) -> None:
    used = {name for node in model.graph.node for name in node_inputs(node)}
    used.update(o.name for o in model.graph.output)
    keep = [i for i in model.graph.input if i.name in used]
    del model.graph.input[:]
    model.graph.input.extend(keep)


def _weight_bytes(model: onnx.ModelProto) -> int:
    total = sum(tensor_bytes(t) for t in model.graph.initializer)
    for node in model.graph.node:
        if node.op_type == "Constant":
            total += sum(tensor_bytes(a.t) for a in node.attribute if a.HasField("t"))
    return total


def _weight_uses(graph: onnx.GraphProto) -> tuple[tuple[np.ndarray, int], ...]:
    sizes = {t.name: tensor_bytes(t) for t in graph.initializer}
    uses: dict[str, list[int]] = {}
    for position, node in enumerate(graph.node):
        for name in node_inputs(node):
            if name in sizes:
                uses.setdefault(name, []).append(position)
    return tuple((np.array(sorted(set(p))), sizes[name]) for name, p in uses.items())


def _first_use_weights(graph: onnx.GraphProto) -> np.ndarray:
    sizes = {t.name: tensor_bytes(t) for t in graph.initializer}
    seen: set[str] = set()
    per_node = []
    for node in graph.node:
        fresh = [name for name in node_inputs(node) if name in sizes and name not in seen]
        seen.update(fresh)
        per_node.append(sum(sizes[name] for name in fresh))
    return np.concatenate([[0.0], np.cumsum(per_node)])


def analyze(model: onnx.ModelProto) -> CutAnalysis:
    """Find the cut points and costs (run on the original graph, before any optimisation:
    fused contrib ops cannot be extracted)."""
    inferred = shape_inference.infer_shapes(model)
    reference = shape_inference.infer_shapes(with_reference_dims(model), data_prop=True)
    reference_shapes = known_shapes(reference)
    costs = np.array([node_flops(n, reference_shapes) for n in reference.graph.node], dtype=float)
    cuts = find_cuts(inferred)
    itemsize = {
        info.name: helper.tensor_dtype_to_np_dtype(info.type.tensor_type.elem_type).itemsize
        for info in inferred.graph.value_info
        if info.type.tensor_type.elem_type
    }
    cut_bytes = {
        cut.position: sum(
            math.prod(d or 1 for d in reference_shapes.get(name, ())) * itemsize.get(name, 4)
            for name in cut.tensors
        )
        for cut in cuts
    }
    return CutAnalysis(
        inferred=inferred,
        cuts=cuts,
        flops_before=np.concatenate([[0.0], np.cumsum(costs)]),
        weights_before=_first_use_weights(inferred.graph),
        cut_bytes=cut_bytes,
        weight_uses=_weight_uses(inferred.graph),
    )


def balanced_cuts(analysis: CutAnalysis, parts: int) -> list[Cut]:
    """The parts-1 cuts that minimise the costliest fragment on equal devices."""
    if parts < 1:
        raise SplitError(f"parts must be at least 1, not {parts}")
    if len(analysis.cuts) < parts - 1:
        raise SplitError(
            f"the model has {len(analysis.cuts)} cut points, "
            f"too few for {parts} fragments (at most {len(analysis.cuts) + 1})"
        )
    return _balanced(analysis.flops_before, analysis.cuts, parts) if parts > 1 else []


def extract_fragments(analysis: CutAnalysis, chosen: list[Cut]) -> list[FragmentGraph]:
    """Cut the model at ``chosen`` (valid cuts, in order) into fragments."""
    inferred = analysis.inferred
    valid = {c.position: c for c in analysis.cuts}
    if (
        any(valid.get(c.position) != c for c in chosen)
        or sorted(chosen, key=lambda c: c.position) != chosen
    ):
        raise SplitError("cuts must be this model's cut points, in order")
    prefix = analysis.flops_before
    graph_inputs = [i.name for i in inferred.graph.input]
    initializers = {t.name for t in inferred.graph.initializer}
    graph_inputs = [name for name in graph_inputs if name not in initializers]
    extractor = Extractor(inferred)
    bounds = [0] + [c.position for c in chosen] + [analysis.nodes]
    # What each fragment receives from upstream (beyond graph inputs) and passes on.
    received: list[list[str]] = [[]] + [list(c.tensors) for c in chosen]
    passed: list[list[str]] = [list(c.tensors) for c in chosen] + [[]]
    # Each graph output leaves from the fragment that computes it (inputs: the last).
    made_at = {name: i for i, node in enumerate(inferred.graph.node) for name in node.output}
    emitted: list[list[str]] = [[] for _ in bounds[1:]]
    for output in inferred.graph.output:
        at = made_at.get(output.name, analysis.nodes)
        emitted[max(i for i, start in enumerate(bounds[:-1]) if start <= at)].append(output.name)

    fragments = []
    for index in range(len(chosen) + 1):
        start, end = bounds[index], bounds[index + 1]
        outputs = [*passed[index], *(n for n in emitted[index] if n not in passed[index])]
        fragment = extractor.extract_model([*received[index], *graph_inputs], outputs)
        _drop_unused_inputs(fragment)
        fragments.append(
            FragmentGraph(
                index=index,
                model=fragment,
                inputs=tuple(i.name for i in fragment.graph.input),
                outputs=tuple(outputs),
                flops=int(prefix[end] - prefix[start]),
                weight_bytes=_weight_bytes(fragment),
            )
        )
    return fragments


def split_graph(model: onnx.ModelProto, parts: int) -> list[FragmentGraph]:
    """Cut a loaded model into ``parts`` fragments of balanced cost that, chained,
    compute the model."""
    analysis = analyze(model)
    return extract_fragments(analysis, balanced_cuts(analysis, parts))
