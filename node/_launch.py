"""Starting node processes from Python: for local meshes, benchmarks and tests.

A node is always its own process (the same program a device runs); this only spawns
``salala node start`` and waits until its API answers.
"""

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..mesh import MeshKey
from ._client import connect
from ._errors import NodeNotRunningError

SALALA = str(Path(sys.executable).parent / "salala")
READY_TIMEOUT_S = 60.0


def spawn_node(
    data_dir: Path, args: list[str], prefix: list[str] | None = None
) -> subprocess.Popen[bytes]:
    """Start ``salala node start --data-dir DATA_DIR ARGS``, logging to DATA_DIR/node.log."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with (data_dir / "node.log").open("ab") as log:  # the child keeps its own copy
        return subprocess.Popen(
            [*(prefix or []), SALALA, "node", "start", "--data-dir", str(data_dir), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


def wait_ready(
    data_dir: Path, process: subprocess.Popen[bytes], timeout: float = READY_TIMEOUT_S
) -> None:
    """Return once the node answers on its API; raise if it exits or times out first."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            log = (data_dir / "node.log").read_text(errors="replace")[-4000:]
            raise NodeNotRunningError(f"node exited with {process.returncode}:\n{log}")
        try:
            with connect(data_dir) as client:
                client.status()
            return
        except NodeNotRunningError:
            if time.monotonic() > deadline:
                process.kill()
                raise
            time.sleep(0.05)


@dataclass(frozen=True)
class LocalNode:
    data_dir: Path
    process: subprocess.Popen[bytes]


def _formed(nodes: list[LocalNode]) -> bool:
    for node in nodes:
        with connect(node.data_dir) as client:
            if len(client.peers()) != len(nodes):
                return False
    return True


@contextmanager
def local_mesh(root: Path, count: int, extra: list[str] | None = None) -> Iterator[list[LocalNode]]:
    """``count`` nodes on loopback (mDNS off) joined through the first; stopped on exit."""
    key = MeshKey.generate()
    nodes: list[LocalNode] = []
    try:
        for i in range(count):
            data_dir = root / f"node-{i}"
            args = ["--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns", "--mesh-key", str(key)]
            if nodes:
                with connect(nodes[0].data_dir) as first:
                    args += ["--peer", first.status()["addrs"][0]]
            process = spawn_node(data_dir, [*args, *(extra or [])])
            nodes.append(LocalNode(data_dir, process))
            wait_ready(data_dir, process)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not _formed(nodes):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{count} local nodes did not form a mesh")
            time.sleep(0.1)
        yield nodes
    finally:
        for node in nodes:
            node.process.terminate()
        for node in nodes:
            node.process.wait(30)
