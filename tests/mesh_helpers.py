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
