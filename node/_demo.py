"""`salala demo` (and `make run`): a mesh of local node processes running the default
model sharded across them. Each node is the same program a device runs, on loopback,
with mDNS off, in a throwaway data folder unless one is given."""

import subprocess
import tempfile
import time
from pathlib import Path

from rich.console import Console

from ..mesh import MeshKey
from ..models import DEFAULT_MODEL
from ._client import connect
from ._launch import spawn_node, wait_ready

console = Console()
FORM_TIMEOUT_S = 30.0


def _form(data_dirs: list[Path]) -> None:
    deadline = time.monotonic() + FORM_TIMEOUT_S
    while time.monotonic() < deadline:
        counts = []
        for data_dir in data_dirs:
            with connect(data_dir) as node:
                counts.append(len(node.peers()))
        if all(c == len(data_dirs) for c in counts):
            return
        time.sleep(0.2)
    raise TimeoutError(f"the local mesh did not form within {FORM_TIMEOUT_S} s")


def run_demo(count: int, texts: list[str], root: Path | None) -> None:
    from ._cli import run_text

    with tempfile.TemporaryDirectory(prefix="salala-demo-") as scratch:
        base = root or Path(scratch)
        key = MeshKey.generate()
        processes: list[subprocess.Popen[bytes]] = []
        dirs: list[Path] = []
        try:
            for i in range(count):
                data_dir = base / f"node-{i}"
                args = ["--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns", "--mesh-key", str(key)]
                if dirs:
                    with connect(dirs[0]) as first:
                        args += ["--peer", first.status()["addrs"][0]]
                processes.append(spawn_node(data_dir, args))
                wait_ready(data_dir, processes[-1])
                dirs.append(data_dir)
            _form(dirs)
            console.print(f"local mesh {key.mesh_id}: {count} nodes on 127.0.0.1")
            with connect(dirs[0]) as node:
                deployment = node.deploy(DEFAULT_MODEL, shards=count)
            stages = ", ".join(f"{s['stage']}→{s['peers'][0][-8:]}" for s in deployment["stages"])
            console.print(f"deployed {deployment['deployment']}: {stages}")
            run_text(DEFAULT_MODEL, texts, dirs[-1], as_json=False)
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                process.wait(30)
