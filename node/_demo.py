"""`salala demo` (and `make run`): a mesh of local node processes running the default
model sharded across them. Each node is the same program a device runs, on loopback,
with mDNS off, in a throwaway data folder unless one is given."""

import tempfile
from pathlib import Path

from rich.console import Console

from ..models import DEFAULT_MODEL
from ._client import connect
from ._launch import local_mesh

console = Console()


def run_demo(count: int, texts: list[str], root: Path | None) -> None:
    from ._cli import run_text

    with tempfile.TemporaryDirectory(prefix="salala-demo-") as scratch:
        with local_mesh(root or Path(scratch), count) as nodes:
            with connect(nodes[0].data_dir) as node:
                mesh_id = node.status()["mesh_id"]
                console.print(f"local mesh {mesh_id}: {count} nodes on 127.0.0.1")
                deployment = node.deploy(DEFAULT_MODEL, shards=count)
            stages = ", ".join(f"{s['stage']}→{s['peers'][0][-8:]}" for s in deployment["stages"])
            console.print(f"deployed {deployment['deployment']}: {stages}")
            run_text(DEFAULT_MODEL, texts, nodes[0].data_dir, as_json=False)
