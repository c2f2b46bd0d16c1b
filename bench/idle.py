"""What a node costs a device that is doing nothing: import time, idle memory, idle CPU.

A phone keeps the node in the background, so its resident memory and the CPU it burns
while idle matter more than anything it does under load. For one node alone and for each
node of a 3-node loopback mesh (so the mesh's idle chatter shows): start the real node
program, let it settle, then read its memory (VmRSS and RssAnon from /proc/PID/status,
PSS from /proc/PID/smaps_rollup, which splits shared library pages between the nodes that
map them) and its CPU seconds over an idle window (utime + stime from /proc/PID/stat).

The breakdown says where the memory goes: each heavy package imported alone into a fresh
interpreter, and again on top of libp2p (what it adds once libp2p, which the node cannot
do without, is loaded). Import time is the node program's imports in a fresh interpreter,
the median of several runs.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from salala.node._launch import local_mesh, spawn_node, wait_ready

from ._node import LOOPBACK

GOAL_RSS_MIB = 150e6 / 2**20  # the 150 MB, in the MiB that /proc reports
SETTLE_S = 10.0  # after the API answers: the first adverts and handshakes
IDLE_WINDOW_S = 15.0
IMPORT_RUNS = 5
BREAKDOWN_RUNS = 3
MESH_SIZE = 3

# What `salala node start` imports before it runs the node.
NODE_PROGRAM = "salala.node._cli, salala.node._daemon"
# Heavy packages a node imports (directly or through a dependency). Where a package's
# own __init__ is lazy, the submodule the node ends up importing is named instead.
PACKAGES = (
    "libp2p",
    "onnxruntime",
    "numpy",
    "onnx",
    "tokenizers",
    "zeroconf",
    "hypercorn.trio",
    "typer",
    "rich.console",
    "trio",
    "cryptography.x509",
    "multiaddr",
    "aioquic.quic.connection",
    "dns.asyncresolver",
    "requests",
    "httpx",
    "google.protobuf.message",
    "prometheus_client",
    "nacl.bindings",
    "coincurve",
    "fastecdsa.keys",
    "Crypto.Hash.SHA256",
    "msgpack",
    "psutil",
)

# Run in a fresh interpreter: import $BASE, then $TARGET; print what each step cost.
_PROBE = """
import json, sys, time
def rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
start = rss()
for name in filter(None, sys.argv[1].split(",")):
    __import__(name.strip())
base = rss()
t = time.perf_counter()
for name in filter(None, sys.argv[2].split(",")):
    __import__(name.strip())
print(json.dumps({"seconds": time.perf_counter() - t, "base_mib": base - start,
                  "mib": rss() - base, "modules": len(sys.modules)}))
"""


def _probe(target: str, base: str = "") -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, base, target],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        cwd=tempfile.gettempdir(),  # not the repository: `import bench` etc. must not shadow
    )
    result: dict[str, float] = json.loads(out.stdout)
    return result


def _median_probe(target: str, runs: int, base: str = "") -> dict[str, float]:
    samples = [_probe(target, base) for _ in range(runs)]
    return {key: statistics.median(s[key] for s in samples) for key in samples[0]}


def _status(pid: int, field: str) -> int:
    """A number from /proc/PID/status (kB for the memory fields)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _pss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    raise KeyError("Pss")


def _cpu_seconds(pid: int) -> float:
    # The command name (field 2) may hold spaces; fields after its ')' are fixed.
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def _idle_rows(setup: str, pids: list[int]) -> list[dict[str, Any]]:
    """Settle, then memory now and CPU over the idle window, for each process."""
    time.sleep(SETTLE_S)
    before = [_cpu_seconds(pid) for pid in pids]
    time.sleep(IDLE_WINDOW_S)
    rows = []
    for i, (pid, cpu_before) in enumerate(zip(pids, before, strict=True)):
        cpu = _cpu_seconds(pid) - cpu_before
        rows.append(
            {
                "part": "idle node",
                "setup": setup,
                "node": i,
                "rss_mib": round(_status(pid, "VmRSS") / 1024, 1),
                "pss_mib": round(_pss_kib(pid) / 1024, 1),
                "anon_mib": round(_status(pid, "RssAnon") / 1024, 1),
                "peak_rss_mib": round(_status(pid, "VmHWM") / 1024, 1),
                "threads": _status(pid, "Threads"),
                "idle_cpu_s": round(cpu, 3),
                "idle_cpu_pct": round(100 * cpu / IDLE_WINDOW_S, 2),
            }
        )
    return rows


def _alone(root: Path) -> list[dict[str, Any]]:
    """Twice on one data dir: a first start measures the device's throughput (an
    onnxruntime session whose memory stays with the process); a restart reads it back."""
    rows = []
    for setup in ("1 node alone, first start", "1 node alone, restarted"):
        data_dir = root / "alone"
        process = spawn_node(data_dir, LOOPBACK)
        try:
            wait_ready(data_dir, process)
            rows += _idle_rows(setup, [process.pid])
        finally:
            process.terminate()
            process.wait(30)
    return rows


def _mesh(root: Path) -> list[dict[str, Any]]:
    with local_mesh(root / "mesh", MESH_SIZE) as nodes:
        return _idle_rows(
            f"node of a {MESH_SIZE}-node mesh", [node.process.pid for node in nodes]
        )


def _import_row() -> dict[str, Any]:
    program = _median_probe(NODE_PROGRAM, IMPORT_RUNS)
    return {
        "part": "import",
        "setup": f"import {NODE_PROGRAM}",
        "import_s": round(program["seconds"], 3),
        "rss_mib": round(program["mib"], 1),
        "modules": int(program["modules"]),
        "runs": IMPORT_RUNS,
    }


def _breakdown() -> list[dict[str, Any]]:
    """Each package alone, and what it adds on top of libp2p, in fresh interpreters.

    Memory barely varies between runs; the median is for the import time."""
    rows = []
    for name in PACKAGES:
        alone = _median_probe(name, BREAKDOWN_RUNS)
        on_top = alone if name == "libp2p" else _probe(name, "libp2p")  # memory only
        rows.append(
            {
                "part": "imports",
                "package": name,
                "alone_mib": round(alone["mib"], 1),
                "over_libp2p_mib": 0.0 if name == "libp2p" else round(on_top["mib"], 1),
                "alone_import_s": round(alone["seconds"], 3),
                "modules": int(alone["modules"]),
            }
        )
    return rows


def run() -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="salala-bench-idle-") as tmp:
        nodes = _alone(Path(tmp)) + _mesh(Path(tmp))
    return [_import_row(), *nodes, *_breakdown()]


def targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's goal: idle RSS at most 150 MB (143.1 MiB) for every node."""
    nodes = [r for r in rows if r["part"] == "idle node"]
    worst = max(r["rss_mib"] for r in nodes)
    return {
        f"idle RSS, worst node, MiB (target <= {GOAL_RSS_MIB:.1f}, i.e. 150 MB)": (
            f"{worst:.1f} ({'PASS' if worst <= GOAL_RSS_MIB else 'MISS'})"
        ),
        "import time of the node program (s)": next(
            r["import_s"] for r in rows if r["part"] == "import"
        ),
        "idle CPU, worst node (%)": max(r["idle_cpu_pct"] for r in nodes),
    }
