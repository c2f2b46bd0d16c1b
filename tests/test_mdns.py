"""mDNS discovery between nodes in three network namespaces on a private bridge."""

from pathlib import Path

import pytest
from conftest import NodeProcess, start_node
from mesh_helpers import identity, peer_ids, wait_until
from netns import private_lan
from salala.mesh import MeshKey

pytestmark = pytest.mark.slow


def test_nodes_on_a_lan_find_each_other_without_any_peer_address(tmp_path: Path) -> None:
    """Three nodes of one mesh and one of another, each in its own namespace."""
    ours, theirs = str(MeshKey.generate()), str(MeshKey.generate())
    with private_lan(4) as lan:
        nodes: list[NodeProcess] = []
        try:
            for i, (namespace, _) in enumerate(lan):
                # Default listen address and default mDNS interfaces: in the namespace,
                # that is lan0 alone.
                nodes.append(
                    start_node(
                        tmp_path / namespace,
                        "--mesh-key",
                        ours if i < 3 else theirs,
                        prefix=("ip", "netns", "exec", namespace),
                        listen="/ip4/0.0.0.0/tcp/0",
                        mdns=True,
                    )
                )
            members, outsider = nodes[:3], nodes[3]
            ids = {identity(node)[0] for node in members}
            wait_until(
                lambda: all(peer_ids(n) == ids for n in members), 20, "all three finding each other"
            )
            for node, (_, address) in zip(members, lan, strict=False):
                with node.client() as client:
                    status = client.status()
                assert status["mdns_interfaces"] == ["lan0"]
                assert all(f"/ip4/{address}/tcp/" in a for a in status["addrs"])
            assert peer_ids(outsider) == {identity(outsider)[0]}  # another mesh stays apart
        finally:
            for node in nodes:
                node.stop()
