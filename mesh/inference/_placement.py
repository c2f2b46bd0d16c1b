"""Placement: which contiguous fragments go to which peers. Pure; no I/O.

A pipeline runs at the pace of its slowest stage, so we minimise the slowest stage's
time: its compute (FLOPs over the peer's *measured* GFLOP/s, or reading its weights
once, whichever is slower) plus sending its activation on (bytes over bandwidth, plus
half the RTT). A stage must fit the peer's free memory.
Unlike splitting by memory alone (exo) or into equal slices (distributed-llama), a fast
device with little memory and a big slow one each get the share they can carry.

For a given number of shards we take that many of the fastest peers, in speed order
(and in reverse, keeping the better), and choose the cuts by dynamic programming over
the model's valid cut points. ``shards=None`` tries every count and keeps the smallest
whose slowest stage is within 5 % of the best, since every extra hop adds latency.
"""

from collections import Counter
from dataclasses import dataclass
from itertools import pairwise

import numpy as np

from ...models import Cut, CutAnalysis
from .._errors import MeshError

DEFAULT_BANDWIDTH = 100e6  # bytes/s; a LAN, assumed while no link has measured one
# bytes/s a device reads its weights at; not measured yet. Decoding one token reads
# every weight once and does little arithmetic on each, so it is this, not FLOP/s, that
# sets a language model stage's pace (a roofline: the slower of the two counts).
DEFAULT_MEMORY_BANDWIDTH = 10e9
MEMORY_FACTOR = 3.0  # a session needs about this many times its weight bytes
AUTO_TOLERANCE = 1.05
MAX_SHARDS = 16


class PlacementError(MeshError):
    """No placement fits: too few peers, too little memory, or too few cut points."""


@dataclass(frozen=True)
class PeerCapacity:
    peer_id: str
    gflops: float
    memory_available: float
    rtt_ms: float = 0.0


@dataclass(frozen=True)
class Stage:
    start: int  # first node
    end: int  # one past the last node
    cut: Cut | None  # the cut at ``end`` (None for the last stage)
    peers: tuple[str, ...]  # primary first, then replicas
    seconds: float  # estimated time on the primary


@dataclass(frozen=True)
class Placement:
    stages: tuple[Stage, ...]

    @property
    def bottleneck_s(self) -> float:
        return max(s.seconds for s in self.stages)

    @property
    def cuts(self) -> list[Cut]:
        return [s.cut for s in self.stages if s.cut is not None]


def _stage_costs(
    analysis: CutAnalysis, points: np.ndarray, peer: PeerCapacity, bandwidth: float
) -> np.ndarray:
    """seconds[a, b] for nodes points[a]..points[b] on ``peer`` (inf where it does not fit)."""
    flops = analysis.flops_before[points]
    memory = analysis.memory_between(points, MEMORY_FACTOR)
    out_bytes = np.array([analysis.cut_bytes.get(int(p), 0) for p in points], dtype=float)
    arithmetic = (flops[None, :] - flops[:, None]) / max(peer.gflops, 1e-3) / 1e9
    compute = np.maximum(arithmetic, analysis.weights_between(points) / DEFAULT_MEMORY_BANDWIDTH)
    send = out_bytes[None, :] / bandwidth + peer.rtt_ms / 2000
    send[:, -1] = 0.0  # the last stage's output goes back to the requester, not on
    seconds = compute + send
    fits = memory <= peer.memory_available
    valid = np.triu(np.ones_like(seconds, dtype=bool), k=1) & fits
    return np.where(valid, seconds, np.inf)


def _chain(
    analysis: CutAnalysis, peers: list[PeerCapacity], bandwidth: float
) -> tuple[float, list[int]] | None:
    """Best cuts for ``peers`` in this order: (bottleneck, point indexes), or None."""
    points = np.array([0] + [c.position for c in analysis.cuts] + [analysis.nodes])
    count = len(points)
    best = np.full(count, np.inf)
    best[0] = 0.0
    came_from = []
    for peer in peers:
        costs = _stage_costs(analysis, points, peer, bandwidth)
        options = np.maximum(best[:, None], costs)  # options[a, b]: stage a..b on this peer
        came_from.append(np.argmin(options, axis=0))
        best = options.min(axis=0)
    if not np.isfinite(best[-1]):
        return None
    path, end = [count - 1], count - 1
    for back in reversed(came_from):
        end = int(back[end])
        path.append(end)
    return float(best[-1]), list(reversed(path))


def measured_bandwidth(samples: list[float]) -> float:
    """The bandwidth to plan with: the median of what members' direct links measured
    (bytes/s), or DEFAULT_BANDWIDTH before any has."""
    positive = sorted(s for s in samples if s > 0)
    return positive[len(positive) // 2] if positive else DEFAULT_BANDWIDTH


def plan_placement(
    analysis: CutAnalysis,
    peers: list[PeerCapacity],
    shards: int | None = None,
    replicas: int = 1,
    bandwidth: float = DEFAULT_BANDWIDTH,
) -> Placement:
    """Choose cuts and peers; PlacementError says why none fits."""
    if not peers:
        raise PlacementError("no peers to place the model on")
    if replicas < 1:
        raise PlacementError(f"replicas must be at least 1, not {replicas}")
    # A peer that cannot hold even the smallest stretch between two cuts takes no stage
    # (a phone lending little memory must not displace a laptop from the fastest few).
    points = np.array([0] + [c.position for c in analysis.cuts] + [analysis.nodes])
    memory = analysis.memory_between(points, MEMORY_FACTOR)
    smallest = min(memory[i, i + 1] for i in range(len(points) - 1))
    able = [p for p in peers if p.memory_available >= smallest] or peers  # error below
    ranked = sorted(able, key=lambda p: (-p.gflops, p.rtt_ms, p.peer_id))
    fragments = len(analysis.cuts) + 1
    if shards and shards > min(fragments, MAX_SHARDS):
        raise PlacementError(
            f"cannot cut into {shards} shards: the model has {fragments} possible fragments"
        )
    # Asked for more shards than peers, some peers take two stages (round robin).
    counts = [shards] if shards else list(range(1, min(len(ranked), fragments, MAX_SHARDS) + 1))
    options: dict[int, tuple[float, list[int], list[PeerCapacity]]] = {}
    for n in counts:
        # Fastest first, and the reverse: the first stage often holds the embedding
        # table, which a fast peer with little memory cannot take.
        for order in (_cycle(ranked, n), _cycle(ranked, n)[::-1]):
            found = _chain(analysis, order, bandwidth)
            if found is not None and (n not in options or found[0] < options[n][0]):
                options[n] = (found[0], found[1], order)
    feasible = options
    if not feasible:
        whole = analysis.memory_between(np.array([0, analysis.nodes]), MEMORY_FACTOR)[0, 1]
        most = max(p.memory_available for p in peers)
        split = f"in {shards} shards " if shards else ""
        raise PlacementError(
            f"no placement {split}fits: the model needs about {whole / 2**20:.0f} MiB of "
            f"memory in all ({MEMORY_FACTOR:g} x its weights, plus its caches at full "
            f"context), and the {len(peers)} peer(s) lend at most {most / 2**20:.0f} MiB "
            "each; add devices or free memory"
        )
    best = min(found[0] for found in feasible.values())
    count = min(n for n, found in feasible.items() if found[0] <= best * AUTO_TOLERANCE)
    _, path, primaries = feasible[count]
    positions = [0] + [c.position for c in analysis.cuts] + [analysis.nodes]
    by_position = {c.position: c for c in analysis.cuts}
    stages = []
    used: Counter[str] = Counter()  # replicas spread out, so one loss never takes two
    for index, (a, b) in enumerate(pairwise(path)):
        start, end = positions[a], positions[b]
        peer = primaries[index]
        seconds = _stage_costs(analysis, np.array([start, end]), peer, bandwidth)[0, 1]
        extra = _replicas(analysis, start, end, peer, ranked, primaries, replicas - 1, used)
        used.update(extra)
        stages.append(
            Stage(start, end, by_position.get(end), (peer.peer_id, *extra), float(seconds))
        )
    return Placement(tuple(stages))


def _cycle(ranked: list[PeerCapacity], count: int) -> list[PeerCapacity]:
    return [ranked[i % len(ranked)] for i in range(count)]


def _replicas(
    analysis: CutAnalysis,
    start: int,
    end: int,
    primary: PeerCapacity,
    ranked: list[PeerCapacity],
    primaries: list[PeerCapacity],
    wanted: int,
    used: Counter[str],
) -> list[str]:
    """Peers to hold a copy: idle in the pipeline first, least used as replicas, fastest."""
    need = analysis.memory_between(np.array([start, end]), MEMORY_FACTOR)[0, 1]
    busy = {p.peer_id for p in primaries}
    spare = sorted(
        (p for p in ranked if p != primary and p.memory_available >= need),
        key=lambda p: (p.peer_id in busy, used[p.peer_id], ranked.index(p)),
    )
    return [p.peer_id for p in spare[:wanted]]
