"""Starting meshes of real node processes and waiting for them to agree."""

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from conftest import NodeProcess, start_node
from salala.mesh import MeshKey
from salala.node import NodeNotRunningError

T = TypeVar("T")


def wait_until(check: Callable[[], T], timeout: float, what: str, poll: float = 0.2) -> T:
    """Poll ``check`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(poll)
    raise AssertionError(f"{what} not within {timeout} s (last: {last!r})")


def peer_ids(node: NodeProcess) -> set[str]:
    try:
        with node.client() as client:
            return {p["peer_id"] for p in client.peers()}
    except NodeNotRunningError:
        return set()


def identity(node: NodeProcess) -> tuple[str, str]:
    """(peer id, first listen address)"""
    with node.client() as client:
        status = client.status()
    return status["peer_id"], status["addrs"][0]


def formed(nodes: list[NodeProcess]) -> None:
    """Wait until every node lists every node: each pair has met."""
    ids = {identity(node)[0] for node in nodes}
    wait_until(lambda: all(peer_ids(n) == ids for n in nodes), 15, "the mesh forming")


@contextmanager
def mesh_of(
    root: Path, count: int, key: MeshKey | None = None, *extra: str
) -> Iterator[list[NodeProcess]]:
    """``count`` nodes on loopback that all join through the first one's address."""
    key = key or MeshKey.generate()
    nodes: list[NodeProcess] = []
    try:
        nodes.append(start_node(root / "node-0", "--mesh-key", str(key), *extra))
        _, bootstrap = identity(nodes[0])
        for i in range(1, count):
            nodes.append(
                start_node(root / f"node-{i}", "--mesh-key", str(key), "--peer", bootstrap, *extra)
            )
        yield nodes
    finally:
        for node in nodes:
            if node.process.poll() is None:
                node.process.kill()
                node.process.wait(10)


def deployed_everywhere(nodes: list[NodeProcess], deployment: str) -> None:
    def seen() -> bool:
        for node in nodes:
            with node.client() as client:
                found = [d for d in client.deployments() if d["model"] == "minilm"]
            if not found or found[0]["deployment"] != deployment:
                return False
        return True

    wait_until(seen, 15, f"{deployment} visible on every node")


@contextmanager
def serving_minilm(root: Path) -> Iterator[list[NodeProcess]]:
    """Two nodes serving MiniLM in two stages; the attacks aim at the second."""
    with mesh_of(root, 2, None, "--max-tensor-mb", "1") as nodes:
        formed(nodes)
        with nodes[0].client() as client:
            deployment = client.deploy("minilm", shards=2)
        deployed_everywhere(nodes, deployment["deployment"])
        yield nodes
