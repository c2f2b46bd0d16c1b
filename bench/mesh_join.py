"""Mesh membership: how fast a new node is seen by everyone, and what an idle node costs.

For meshes of 5 and 20 real node processes on loopback: start one more node (joining
through one member's address), and time from its process start until every member's
`peers()` lists it. Then, with the mesh settled, sample each node's CPU time over a
window and its resident memory.
"""

import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
from salala.mesh import MeshKey
from salala.node import connect
from salala.node._launch import local_mesh, spawn_node, wait_ready

from ._node import LOOPBACK
from ._stats import summarize

SIZES = (5, 20)
TRIALS = 8
IDLE_WINDOW_S = 10.0
POLL_S = 0.05


def _listed_by_all(data_dirs: list[Path], peer_id: str) -> bool:
    for data_dir in data_dirs:
        with connect(data_dir) as client:
            if peer_id not in {p["peer_id"] for p in client.peers()}:
                return False
    return True


def _start(data_dir: Path, key: MeshKey, bootstrap: str | None) -> subprocess.Popen[bytes]:
    args = [*LOOPBACK, "--mesh-key", str(key)] + (["--peer", bootstrap] if bootstrap else [])
    return spawn_node(data_dir, args)


def _one_size(root: Path, size: int) -> dict[str, Any]:
    with local_mesh(root / f"mesh-{size}", size) as nodes:
        dirs = [node.data_dir for node in nodes]
        key = MeshKey.parse((dirs[0] / "mesh.key").read_text())
        with connect(dirs[0]) as client:
            bootstrap = client.status()["addrs"][0]

        ready_ms, listed_ms = [], []
        for trial in range(TRIALS):
            data_dir = root / f"m{size}-join{trial}"
            started = time.perf_counter()
            process = _start(data_dir, key, bootstrap)
            wait_ready(data_dir, process)
            ready_ms.append((time.perf_counter() - started) * 1000)
            with connect(data_dir) as client:
                peer_id = client.status()["peer_id"]
            while not _listed_by_all(dirs, peer_id):
                time.sleep(POLL_S)
            listed_ms.append((time.perf_counter() - started) * 1000)
            process.terminate()
            process.wait(30)

        time.sleep(8)  # let the departed joiners be evicted; measure a settled mesh
        handles = [psutil.Process(node.process.pid) for node in nodes]
        before = [h.cpu_times() for h in handles]
        time.sleep(IDLE_WINDOW_S)
        cpu = [
            100
            * ((h.cpu_times().user + h.cpu_times().system) - (b.user + b.system))
            / IDLE_WINDOW_S
            for h, b in zip(handles, before, strict=True)
        ]
        rss = [h.memory_info().rss / 2**20 for h in handles]
    listed = summarize(listed_ms)
    return {
        "mesh": size,
        "ready_p50_ms": summarize(ready_ms)["p50_ms"],
        "listed_p50_ms": listed["p50_ms"],
        "listed_p95_ms": listed["p95_ms"],
        "after_ready_p50_ms": round(
            statistics.median(
                seen - ready for seen, ready in zip(listed_ms, ready_ms, strict=True)
            ),
            1,
        ),
        "idle_cpu_pct_mean": round(statistics.mean(cpu), 2),
        "idle_cpu_pct_max": round(max(cpu), 2),
        "rss_mib_mean": round(statistics.mean(rss), 1),
        "rss_mib_max": round(max(rss), 1),
        "trials": TRIALS,
    }


def run() -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="salala-bench-mesh-") as tmp:
        return [_one_size(Path(tmp), size) for size in SIZES]
