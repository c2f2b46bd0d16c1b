"""Placement is pure: cuts and peers from costs and capacities, no network."""

import itertools
from pathlib import Path

import onnx
import pytest
from conftest import minilm_path
from models_for_tests import mlp_model
from salala.mesh.inference._deploy import peer_capacity
from salala.mesh.inference._placement import (
    DEFAULT_BANDWIDTH,
    MEMORY_FACTOR,
    PeerCapacity,
    PlacementError,
    measured_bandwidth,
    plan_placement,
)
from salala.models import CutAnalysis, analyze


@pytest.fixture(scope="module")
def minilm() -> CutAnalysis:
    return analyze(onnx.load(str(minilm_path())))


def peer(name: str, gflops: float = 100.0, memory: float = 8e9, rtt: float = 1.0) -> PeerCapacity:
    return PeerCapacity(name, gflops, memory, rtt)


def flops(analysis: CutAnalysis, start: int, end: int) -> float:
    return float(analysis.flops_before[end] - analysis.flops_before[start])


def test_stages_are_contiguous_and_cover_the_model(minilm: CutAnalysis) -> None:
    placement = plan_placement(minilm, [peer("a"), peer("b"), peer("c")], shards=3)
    bounds = [(s.start, s.end) for s in placement.stages]
    assert bounds[0][0] == 0 and bounds[-1][1] == minilm.nodes
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
    assert [s.cut for s in placement.stages][:-1] == placement.cuts
    assert {s.peers[0] for s in placement.stages} == {"a", "b", "c"}


def test_a_faster_peer_gets_a_larger_share(minilm: CutAnalysis) -> None:
    placement = plan_placement(minilm, [peer("slow", 50), peer("fast", 400)], shards=2)
    share = {s.peers[0]: flops(minilm, s.start, s.end) for s in placement.stages}
    assert share["fast"] > 2 * share["slow"]


def test_splitting_over_equal_peers_lowers_the_bottleneck(minilm: CutAnalysis) -> None:
    one = plan_placement(minilm, [peer("a")], shards=1)
    three = plan_placement(minilm, [peer("a"), peer("b"), peer("c")], shards=3)
    assert three.bottleneck_s < 0.6 * one.bottleneck_s


def test_a_peer_without_memory_for_its_share_gets_less_or_nothing(minilm: CutAnalysis) -> None:
    total_weights = float(minilm.weights_before[-1])
    roomy, tiny = (
        peer("roomy", 100, memory=10 * total_weights),
        peer("tiny", 1000, memory=total_weights),
    )
    placement = plan_placement(minilm, [roomy, tiny], shards=2)
    for stage in placement.stages:
        if stage.peers[0] == "tiny":
            weights = minilm.weights_before[stage.end] - minilm.weights_before[stage.start]
            assert weights * 3 <= total_weights
    with pytest.raises(PlacementError, match="free memory"):
        plan_placement(minilm, [peer("tiny", memory=1e3)], shards=1)


def test_auto_uses_the_peers_that_pay_off(minilm: CutAnalysis) -> None:
    assert len(plan_placement(minilm, [peer("a")]).stages) == 1
    assert len(plan_placement(minilm, [peer("a"), peer("b"), peer("c")]).stages) >= 2


def test_more_shards_than_peers_reuses_peers(minilm: CutAnalysis) -> None:
    placement = plan_placement(minilm, [peer("a"), peer("b"), peer("c")], shards=4)
    assert len(placement.stages) == 4
    assert [s.peers[0] for s in placement.stages].count("a") == 2


def test_replicas_are_other_peers(minilm: CutAnalysis) -> None:
    peers = [peer(name) for name in "abcd"]
    placement = plan_placement(minilm, peers, shards=2, replicas=2)
    for stage in placement.stages:
        assert len(stage.peers) == 2 and len(set(stage.peers)) == 2
    assert {s.peers[1] for s in placement.stages} <= {"c", "d"}  # idle peers first


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"shards": 500}, "possible fragments"),
        ({"replicas": 0}, "replicas"),
    ],
)
def test_impossible_requests_say_why(minilm: CutAnalysis, kwargs: dict, message: str) -> None:
    with pytest.raises(PlacementError, match=message):
        plan_placement(minilm, [peer("a")], **kwargs)
    with pytest.raises(PlacementError, match="no peers"):
        plan_placement(minilm, [])


def test_the_plan_follows_the_measured_bandwidth(minilm: CutAnalysis) -> None:
    """Over a fast link, splitting pays; over a slow one, sending activations costs more
    than the compute it spreads, and the plan keeps the model on fewer peers."""
    peers = [peer("a"), peer("b"), peer("c")]
    fast = plan_placement(minilm, peers, bandwidth=measured_bandwidth([1e10, 2e10, 3e10]))
    slow = plan_placement(minilm, peers, bandwidth=measured_bandwidth([1e4, 2e4]))
    assert len(slow.stages) < len(fast.stages)
    assert measured_bandwidth([]) == DEFAULT_BANDWIDTH
    assert measured_bandwidth([3.0, 1.0, 2.0, 0.0]) == 2.0


def gpu_advert(free: int, host_memory: int) -> dict:
    """An advert's capacity from a peer whose sessions run on its CUDA device."""
    return {
        "gflops": 1000.0,
        "memory_available": host_memory,
        "providers": ["CUDAExecutionProvider", "CPUExecutionProvider"],
        "accelerators": [
            {
                "provider": "CUDAExecutionProvider",
                "name": "NVIDIA T4",
                "memory_total": 16 << 30,
                "memory_free": free,
            }
        ],
    }


def test_a_gpu_peer_is_planned_by_its_devices_free_memory(tmp_path: Path) -> None:
    """Eight equal 1 MiB layers: a roomy GPU takes half, a GPU with room for two layers
    takes two, and one with almost nothing free takes no stage, whatever its host has."""
    mlp = analyze(
        onnx.load(str(mlp_model(tmp_path / "m.onnx", layers=8, width=512, seed=0, relu=False)))
    )
    layer = 4 * 512 * 512
    roomy_host = 1000 * layer
    # an older advert, without accelerators: host memory
    cpu = peer_capacity("cpu", {"gflops": 100.0, "memory_available": roomy_host}, 0.0)
    assert cpu == PeerCapacity("cpu", 100.0, roomy_host, 0.0)

    def gpu_layers(free: int, shards: int | None) -> int:
        gpu = peer_capacity("gpu", gpu_advert(free, roomy_host), 0.0)
        assert gpu.memory_available == free and gpu.gflops == 1000.0
        placement = plan_placement(mlp, [cpu, gpu], shards=shards)
        weights = sum(
            float(mlp.weights_before[s.end] - mlp.weights_before[s.start])
            for s in placement.stages
            if s.peers[0] == "gpu"
        )
        return round(weights / layer)

    assert gpu_layers(roomy_host, shards=2) == 4
    assert gpu_layers(int(MEMORY_FACTOR * 2 * layer), shards=2) == 2
    assert gpu_layers(1000, shards=None) == 0


def test_accelerator_memory_counts_only_when_that_accelerator_runs_the_stages() -> None:
    on_cpu = gpu_advert(1000, 8 << 30) | {"providers": ["CPUExecutionProvider"]}
    assert peer_capacity("p", on_cpu, 0.0).memory_available == 8 << 30
    shared = {
        "gflops": 20.0,
        "memory_available": 4 << 30,
        "providers": ["NnapiExecutionProvider", "CPUExecutionProvider"],
        "accelerators": [
            {
                "provider": "NnapiExecutionProvider",
                "name": "NNAPI",
                "memory_total": None,
                "memory_free": None,
            }
        ],
    }
    assert peer_capacity("phone", shared, 0.0).memory_available == 4 << 30  # unified memory
