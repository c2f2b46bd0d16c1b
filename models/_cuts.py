"""Where a model can be cut and what each stretch costs: the planner's view of a graph.

Kept apart from the splitter so that placement, which only reads these, runs on nodes
without the onnx package.
"""

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import onnx


@dataclass(frozen=True)
class Cut:
    """A valid cut before node ``position``; ``tensors`` are the activations crossing it
    (one for most models, up to ``MAX_CUT_TENSORS`` between a decoder's layers), in the
    order the graph computes them."""

    position: int
    tensors: tuple[str, ...]


@dataclass(frozen=True)
class CutAnalysis:
    """Where a model can be cut and what each stretch between cuts costs.

    ``flops_before[i]`` and ``weights_before[i]`` are totals over nodes before position
    ``i``; ``cut_bytes`` is the size of each cut's activations under reference dims.
    """

    inferred: "onnx.ModelProto"
    cuts: list[Cut]
    flops_before: np.ndarray
    weights_before: np.ndarray
    cut_bytes: dict[int, int]
    # Each initializer's bytes and the sorted positions of the nodes that read it: a
    # fragment holds every weight it reads, so a weight shared by two stretches (a tied
    # embedding and LM head) counts in both.
    weight_uses: tuple[tuple[np.ndarray, int], ...] = ()
    # The same for the key/value caches a decoder's stretch keeps (see ``with_caches``).
    cache_uses: tuple[tuple[np.ndarray, int], ...] = ()

    def weights_between(self, points: np.ndarray) -> np.ndarray:
        """bytes[a, b]: the weights a fragment from node points[a] to points[b] holds."""
        return _held(self.weight_uses, points)

    def memory_between(self, points: np.ndarray, weight_factor: float) -> np.ndarray:
        """bytes[a, b] such a fragment needs running: its weights times ``weight_factor``
        (a session's working memory) plus the caches of its layers."""
        return self.weights_between(points) * weight_factor + _held(self.cache_uses, points)

    def with_caches(self, bytes_per_past: int) -> "CutAnalysis":
        """This analysis with ``bytes_per_past`` reserved for each past key/value input a
        stretch reads (a decoder's cache at full context), so placement counts it."""
        graph = self.inferred.graph
        pasts = {i.name for i in graph.input if i.name.startswith("past_key_values.")}
        uses: dict[str, list[int]] = {}
        for position, node in enumerate(graph.node):
            for name in node.input:
                if name in pasts:
                    uses.setdefault(name, []).append(position)
        caches = tuple((np.array(sorted(set(p))), bytes_per_past) for p in uses.values())
        return replace(self, cache_uses=caches)

    @property
    def nodes(self) -> int:
        return len(self.inferred.graph.node)


def _held(uses: tuple[tuple[np.ndarray, int], ...], points: np.ndarray) -> np.ndarray:
    held = np.zeros((len(points), len(points)))
    for positions, size in uses:
        before = np.searchsorted(positions, points)  # uses before each point
        held += size * ((before[None, :] - before[:, None]) > 0)
    return held
