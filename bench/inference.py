"""Sharded inference: the mesh against one onnxruntime session and a Ray actor pipeline.

Same machine, same fragments. For each model: p50/p95 latency at batch 1 (one request
at a time) and throughput with 8 requests in flight. Mesh nodes are real processes on
loopback; requests enter through node 0's local API. A last experiment limits every
node to one thread and compares 2 nodes against 1, the case where spreading work over
more devices must pay off.
"""

import importlib.util
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from salala.models import ModelStore, builtin_models, split_stored
from salala.node import connect
from salala.node._launch import local_mesh
from salala.runtime import ModelSession

from ._stats import summarize, time_calls
from .local import minilm_inputs

IN_FLIGHT = 8


def _ocr_det() -> Path:
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    assert spec and spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations))) / "models/ch_PP-OCRv4_det_infer.onnx"


def _det_inputs() -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(0).random((1, 3, 640, 640), dtype=np.float32)}


# name -> (model file, inputs, latency samples, throughput requests)
MODELS: dict[str, tuple[Callable[[], Path], Callable[[], dict[str, np.ndarray]], int, int]] = {
    "minilm (int8, 128 tokens)": (lambda: builtin_models()["minilm"], minilm_inputs, 100, 160),
    "PP-OCRv4 det (640x640)": (_ocr_det, _det_inputs, 20, 40),
}


def _throughput(make_call: Callable[[], Callable[[], object]], requests: int) -> float:
    """Requests per second with IN_FLIGHT callers, each with its own connection."""
    calls = [make_call() for _ in range(IN_FLIGHT)]
    for call in calls:
        call()
    counter = iter(range(requests))
    lock = threading.Lock()

    def worker(call: Callable[[], object]) -> None:
        while True:
            with lock:
                if next(counter, None) is None:
                    return
            call()

    threads = [threading.Thread(target=worker, args=(c,)) for c in calls]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return round(requests / (time.perf_counter() - started), 2)


def _mesh_rows(
    name: str,
    path: Path,
    feeds: dict[str, np.ndarray],
    samples: int,
    requests: int,
    nodes: int,
    threads: int | None = None,
    node_args: tuple[str, ...] = (),
) -> dict[str, Any]:
    extra = [*(["--threads", str(threads)] if threads else []), *node_args]
    with (
        tempfile.TemporaryDirectory(prefix="salala-bench-") as tmp,
        local_mesh(Path(tmp), nodes, extra) as mesh,
    ):
        dirs = [node.data_dir for node in mesh]
        with connect(dirs[0]) as client:
            client.add_model(path, "bench")
            deployment = client.deploy("bench", shards=nodes)
            while "bench" not in {d["model"] for d in client.deployments()}:
                time.sleep(0.1)
            latency = summarize(time_calls(lambda: client.infer("bench", feeds), samples))
            split = _compute_and_overhead(lambda: client.infer_traced("bench", feeds), samples)

        def make_call() -> Callable[[], object]:
            client = connect(dirs[0])
            return lambda: client.infer("bench", feeds)

        rate = _throughput(make_call, requests)
    label = (
        f"mesh, {nodes} node{'s' if nodes > 1 else ''}"
        + (f", {threads} thread" if threads else "")
        + (f" ({' '.join(node_args)})" if node_args else "")
    )
    return {
        "model": name,
        "setup": label,
        **latency,
        **split,
        "req_per_s": rate,
        "stages": len(deployment["stages"]),
    }


def _compute_and_overhead(
    call: Callable[[], tuple[object, list[dict[str, Any]]]], samples: int
) -> dict[str, float]:
    """Median milliseconds inside the stages' sessions and outside them (API, hops, queues).

    The second number is what the mesh adds to the model itself, whatever the split.
    """
    inside, outside = [], []
    for _ in range(samples):
        started = time.perf_counter()
        _, route = call()
        total = (time.perf_counter() - started) * 1000
        stages = sum(step["ms"] for step in route)
        inside.append(stages)
        outside.append(total - stages)
    return {
        "stage_ms": round(statistics.median(inside), 3),
        "overhead_ms": round(statistics.median(outside), 3),
    }


def _whole_rows(
    name: str, path: Path, feeds: dict[str, np.ndarray], samples: int, requests: int
) -> dict[str, Any]:
    session = ModelSession(path)
    latency = summarize(time_calls(lambda: session.run(feeds), samples))
    rate = _throughput(lambda: lambda: session.run(feeds), requests)
    return {
        "model": name,
        "setup": "whole model, 1 session",
        **latency,
        "req_per_s": rate,
        "stages": 1,
    }


def _ray_rows(
    name: str,
    path: Path,
    feeds: dict[str, np.ndarray],
    samples: int,
    requests: int,
    stages: int = 3,
) -> dict[str, Any]:
    """The same balanced fragments as a pipeline of Ray actors, bound to loopback."""
    os.environ.setdefault("RAY_AUTH_TOKEN", "salala-bench-local-only")
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray

    @ray.remote
    class Stage:
        def __init__(self, fragment: str) -> None:
            self.session = ModelSession(fragment)

        def run(self, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            outputs = self.session.run({s.name: values[s.name] for s in self.session.inputs})
            return {**values, **outputs}

    with tempfile.TemporaryDirectory(prefix="salala-bench-ray-") as tmp:
        store = ModelStore(Path(tmp))
        plan = split_stored(store, store.add(path, "bench"), stages)
        ray.init(
            _node_ip_address="127.0.0.1",
            include_dashboard=False,
            log_to_driver=False,
            num_cpus=os.cpu_count(),
        )
        try:
            actors = [Stage.remote(f.path) for f in plan.fragments]

            def chain() -> object:
                ref = ray.put(feeds)
                for actor in actors:
                    ref = actor.run.remote(ref)
                return ray.get(ref)

            latency = summarize(time_calls(chain, samples))
            rate = _throughput(lambda: chain, requests)
        finally:
            ray.shutdown()
    return {
        "model": name,
        "setup": f"Ray actors, {stages} stages",
        **latency,
        "req_per_s": rate,
        "stages": stages,
    }


def run() -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for name, (locate, make_inputs, samples, requests) in MODELS.items():
        path, feeds = locate(), make_inputs()
        rows.append(_whole_rows(name, path, feeds, samples, requests))
        for nodes in (1, 2, 3):
            rows.append(_mesh_rows(name, path, feeds, samples, requests, nodes))
        try:
            rows.append(_ray_rows(name, path, feeds, samples, requests))
        except ImportError:
            rows.append({"model": name, "setup": "Ray actors (ray not installed)"})
    minilm = next(iter(MODELS))
    path, make_inputs, samples, requests = MODELS[minilm]
    for nodes in (1, 2):
        rows.append(_mesh_rows(minilm, path(), make_inputs(), samples, requests, nodes, threads=1))
    return rows


def targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets, computed from the rows."""
    minilm = next(iter(MODELS))
    by = {(r["model"], r["setup"]): r for r in rows}
    whole = by[(minilm, "whole model, 1 session")]
    three = by[(minilm, "mesh, 3 nodes")]
    one_t = by[(minilm, "mesh, 1 node, 1 thread")]
    two_t = by[(minilm, "mesh, 2 nodes, 1 thread")]
    ray_row = by.get((minilm, "Ray actors, 3 stages"), {})
    return {
        "3-node latency / whole-model latency (target <= 1.15)": round(
            three["p50_ms"] / whole["p50_ms"], 3
        ),
        "2 single-thread nodes / 1 single-thread node, 8 in flight (target >= 1.7)": round(
            two_t["req_per_s"] / one_t["req_per_s"], 3
        ),
        "mesh 3-node time outside the sessions, ms (a 1.15x budget allows "
        f"{0.15 * whole['p50_ms']:.1f})": three["overhead_ms"],
        "mesh 3-node p50 / Ray p50 (target <= 1)": round(three["p50_ms"] / ray_row["p50_ms"], 3)
        if ray_row.get("p50_ms")
        else None,
        "mesh 3-node throughput / Ray throughput (target >= 1)": round(
            three["req_per_s"] / ray_row["req_per_s"], 3
        )
        if ray_row.get("req_per_s")
        else None,
    }


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    figure, axes = plt.subplots(len(models), 2, figsize=(12, 4 * len(models)), squeeze=False)
    for row_axes, model in zip(axes, models, strict=True):
        mine = [r for r in rows if r["model"] == model and "p50_ms" in r]
        labels = [r["setup"] for r in mine]
        row_axes[0].barh(
            labels,
            [r["p50_ms"] for r in mine],
            xerr=[[0] * len(mine), [r["p95_ms"] - r["p50_ms"] for r in mine]],
        )
        row_axes[0].set_title(f"{model}: latency p50 (bar) to p95, ms")
        row_axes[1].barh(labels, [r["req_per_s"] for r in mine], color="tab:green")
        row_axes[1].set_title(f"{model}: requests/s, {IN_FLIGHT} in flight")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
